"""Optional dependencies (the `train` and `eval` extras): import them, or fail with one line saying what to install."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the pip command that installs it."""


def import_extra(module: str, extra: str, purpose: str) -> ModuleType:
    """Import `module`, which the `extra` of glm6b installs.

    Args:
        module: the dotted module name, e.g. "peft" or "matplotlib.pyplot".
        extra: the glm6b extra that provides it: "train" or "eval".
        purpose: what needs it, for the message (e.g. "LoRA fine-tuning").

    Returns:
        The module.

    Raises:
        MissingExtraError: it cannot be imported; the message is one line ending with
            `pip install "glm6b[<extra>]"`.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = e.name or module.split(".")[0]
        raise MissingExtraError(f"{purpose} needs the Python package {missing!r}, which is not installed: "
                                f'pip install "glm6b[{extra}]"') from None
