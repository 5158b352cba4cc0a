"""Imports inside glm6b point down only: each module sits on a layer and may import only lower layers.

Function-level (lazy) imports count too: a lazy upward import is still an upward dependency. A new
module must be given a layer here, which is the moment to decide where it belongs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "glm6b"

# module (dotted, under glm6b) -> layer; a package's __init__ is listed under the package name.
# Modules not listed by full name take the layer of their nearest listed parent package.
LAYERS = {
    "io": 0,
    "safety": 0,
    "extras": 0,
    "config": 0,
    "data.mindrecord": 0,
    "data.adgen_mindrecord": 1,
    "data": 1,
    "tokenizer": 2,
    "model.masks": 1,
    "model.cache": 2,
    "model.model": 3,
    "model": 4,
    "quant.thudm": 5,
    "quant.cpu_kernels": 5,
    "quant.linear": 6,
    "quant": 6,
    "tokenizer_builder": 3,
    "sample_data": 4,
    "checkpoint": 10,
    "checkpoint.errors": 5,
    "checkpoint.mindspore": 8,
    "checkpoint.mindspore_shards": 9,
    "checkpoint.hf": 10,
    "quant.folder": 11,
    "inference.engine": 17,
    "inference.sampling": 17,
    "inference.beam": 18,
    "inference.generation": 20,
    "inference.chat": 21,
    "api": 22,
    "inference.scheduler": 22,
    "auto": 23,
    "inference.pipelines": 24,
    "inference": 17,
    "train.data": 24,
    "convert": 26,
    "train.preprocess": 25,
    "train.lora": 15,
    "eval.metrics": 1,
    "eval.evaluate": 30,
    "eval": 30,
    "train.args": 1,
    "train.loss": 27,
    "train.logs": 1,
    "train.parallel": 26,
    "train.frozen_linear": 7,
    "train.build": 31,
    "train.dcp": 31,
    "train.export": 32,
    "train.state": 32,
    "train.evaluation": 33,
    "train.trainer": 34,
    "train.recipe": 35,
    "train": 31,
    "quickstart": 40,
    "serve.protocol": 45,
    "serve.metrics": 45,
    "serve.openai": 46,
    "serve.thudm": 46,
    "serve.app": 47,
    "serve": 48,
    "cli": 90,
    "__main__": 91,
}
# The package root only re-exports names lazily (module __getattr__); it sits above everything.
TOP = {"__init__"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> int:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        if name in LAYERS:
            return LAYERS[name]
    raise KeyError(module)


def is_module(dotted: str) -> bool:
    path = PACKAGE.joinpath(*dotted.split(".")) if dotted else PACKAGE
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, dotted module under glm6b) for every glm6b import in the file, lazy ones included."""
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
                found.append((node.lineno, sub if is_module(sub) else target))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("glm6b."):
                    found.append((node.lineno, alias.name[len("glm6b."):]))
    return [(line, target) for line, target in found if target]


def all_modules() -> list[tuple[Path, str]]:
    return [(p, module_name(p)) for p in sorted(PACKAGE.rglob("*.py"))]


def test_every_module_has_a_layer():
    missing = [m for _, m in all_modules() if m not in TOP and not _has_layer(m)]
    assert not missing, f"give these modules a layer in tests/test_layering.py: {missing}"


def _has_layer(module: str) -> bool:
    try:
        layer_of(module)
        return True
    except KeyError:
        return False


@pytest.mark.parametrize("path,module", [pytest.param(p, m, id=m) for p, m in all_modules() if m not in TOP])
def test_imports_point_down(path: Path, module: str):
    source_layer = layer_of(module)
    upward = []
    for line, target in imported_modules(path, module):
        if not _has_layer(target):
            continue  # reported by test_every_module_has_a_layer
        if target == module or module.startswith(target + ".") and path.name == "__init__.py":
            continue
        if layer_of(target) >= source_layer:
            upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports glm6b.{target} "
                          f"(layer {layer_of(target)} >= {source_layer})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_checker_sees_a_lazy_upward_import(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text("def f():\n    from ..inference.chat import chat\n")
    assert imported_modules(sample, "model.model") == [(2, "inference.chat")]
