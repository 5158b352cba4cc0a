"""Imports inside glm6b point down only, package by package, and no module imports another's private names.

Each package (and each top-level module) sits on one layer; a module may import from its own package and
from packages of lower layers only. Function-level (lazy) imports count too: a lazy upward import is
still an upward dependency. A new package or top-level module must be given a layer here, which is
the moment to decide where it belongs.

The order, bottom up: the torch-free base (io, safety, extras, config); the network (model); the
tokenizer, which builds the model's masks; the quantized layers; the checkpoint formats (which build
models, quantized or not); decoding (inference); `api`, the one loader and the model class with chat;
loading by name (auto); data rows (which render the chat prompt); evaluation; training (which evaluates
while it trains); the tools built on training (convert writes adapters, the quickstart trains); the
server; the command line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "glm6b"

# Package or top-level module (under glm6b) -> layer.
LAYERS = {
    "io": 0,
    "safety": 0,
    "extras": 0,
    "config": 0,
    "model": 1,
    "tokenizer": 2,
    "tokenizer_builder": 3,
    "sample_data": 4,
    "quant": 5,
    "checkpoint": 6,
    "inference": 7,
    "api": 8,
    "auto": 9,
    "data": 10,
    "eval": 11,
    "train": 12,
    "convert": 13,
    "quickstart": 13,
    "serve": 14,
    "cli": 15,
    "__main__": 16,
}
# The package root only re-exports names lazily (module __getattr__); it sits above everything.
TOP = {"__init__"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def unit_of(module: str) -> str:
    """The package (or top-level module) a module belongs to."""
    return module.split(".")[0]


def is_module(dotted: str) -> bool:
    path = PACKAGE.joinpath(*dotted.split(".")) if dotted else PACKAGE
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_names(path: Path, module: str) -> list[tuple[int, str, str | None]]:
    """(line, dotted module under glm6b, imported name or None) for every glm6b import in the file, lazy
    ones included; `from .x import y` gives (x, y) unless y is a module itself (then (x.y, None))."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            elif node.module == "glm6b" or (node.module or "").startswith("glm6b."):
                base = node.module.split(".")[1:]
            else:
                continue
            target = ".".join(base)
            for alias in node.names:  # `from . import chat` names a module, `from .chat import x` a name
                sub = f"{target}.{alias.name}".lstrip(".")
                found.append((node.lineno, sub, None) if is_module(sub) else (node.lineno, target, alias.name))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("glm6b."):
                    found.append((node.lineno, alias.name[len("glm6b."):], None))
    return [item for item in found if item[1]]


def imported_modules(path: Path, module: str) -> list[tuple[int, str]]:
    return [(line, target) for line, target, _ in imported_names(path, module)]


def all_modules() -> list[tuple[Path, str]]:
    return [(p, module_name(p)) for p in sorted(PACKAGE.rglob("*.py"))]


def _where(path: Path, line: int) -> str:
    return f"{path.relative_to(PACKAGE.parent) if path.is_relative_to(PACKAGE.parent) else path}:{line}"


def upward_imports(path: Path, module: str) -> list[str]:
    """The imports of `module` that point to its own layer's other units or above."""
    source = unit_of(module)
    found = []
    for line, target in imported_modules(path, module):
        unit = unit_of(target)
        if unit == source or unit not in LAYERS:
            continue  # inside a package; an unknown unit is reported by test_every_unit_has_a_layer
        if LAYERS[unit] >= LAYERS[source]:
            found.append(f"{_where(path, line)} imports glm6b.{target} "
                         f"({unit}: layer {LAYERS[unit]} >= {source}: {LAYERS[source]})")
    return found


def private_imports(path: Path, module: str) -> list[str]:
    """`from x import _name` of another module's private name (a module's own helpers stay its own)."""
    return [f"{_where(path, line)} imports {name} from glm6b.{target}"
            for line, target, name in imported_names(path, module)
            if name is not None and name.startswith("_") and not name.startswith("__") and target != module]


def test_every_unit_has_a_layer():
    missing = sorted({unit_of(m) for _, m in all_modules() if m not in TOP and unit_of(m) not in LAYERS})
    assert not missing, f"give these packages or modules a layer in tests/test_layering.py: {missing}"


@pytest.mark.parametrize("path,module", [pytest.param(p, m, id=m) for p, m in all_modules() if m not in TOP])
def test_imports_point_down(path: Path, module: str):
    upward = upward_imports(path, module)
    assert not upward, "upward imports:\n" + "\n".join(upward)


@pytest.mark.parametrize("path,module", [pytest.param(p, m, id=m) for p, m in all_modules()])
def test_no_private_name_crosses_modules(path: Path, module: str):
    crossing = private_imports(path, module)
    assert not crossing, "private names imported from other modules:\n" + "\n".join(crossing)


def test_the_checker_sees_a_lazy_upward_import(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text("def f():\n    from ..inference.chat import chat\n")
    assert imported_modules(sample, "model.model") == [(2, "inference.chat")]
    assert upward_imports(sample, "model.model") == [f"{sample}:2 imports glm6b.inference.chat (inference: layer 7 >= model: 1)"]


def test_the_checker_fails_on_a_package_back_edge_and_a_private_name(tmp_path):
    # checkpoint (layer 6) importing from inference (layer 7) is a back edge; within a package it is not.
    sample = tmp_path / "x.py"
    sample.write_text("from ..inference.engine import DecodeEngine\nfrom .hf import _shape\nfrom .hf import load_model\n")
    assert [line.split(" imports ")[1] for line in upward_imports(sample, "checkpoint.sample")] == [
        "glm6b.inference.engine (inference: layer 7 >= checkpoint: 6)"]
    assert [line.split(" imports ")[1] for line in private_imports(sample, "checkpoint.sample")] == [
        "_shape from glm6b.checkpoint.hf"]
    sample.write_text("from ..model import GLMBlock\n")
    assert upward_imports(sample, "checkpoint.sample") == []
