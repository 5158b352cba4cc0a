"""PEFT LoRA adapter folders (what `PeftModel.save_pretrained` writes: adapter_config.json +
adapter_model.safetensors): checking them and loading them onto a model, over float or quantized layers.

peft (and the transformers it imports, ~10 s) is imported inside the functions, only when an adapter is used.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path

import torch

from ..extras import import_extra
from ..quant.linear import QuantizedLinear
from .errors import CheckpointError

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """True if `path` is a folder holding a PEFT adapter_config.json."""
    return (Path(path) / ADAPTER_CONFIG_NAME).is_file()


@contextlib.contextmanager
def quiet_about_quantized_layers():
    """PEFT warns about any base layer type it does not know; QuantizedLinear is handled (see below)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Unsupported layer type .*QuantizedLinear")
        yield


def allow_quantized_base(config, model: torch.nn.Module):
    """Let PEFT wrap glm6b's int8/int4 QuantizedLinear layers with its ordinary LoRA Linear (QLoRA-style).

    PEFT's LoRA Linear computes base_layer(x) + lora_B(lora_A(x)) * scaling whatever the base layer
    is, so the adapter's tensors and names are those of a float base: the adapter folder loads on
    either. (Merging into a quantized base is not supported; merge into the float base.)
    """
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        from peft.tuners.lora.layer import Linear as LoraLinear

        config._register_custom_module({QuantizedLinear: LoraLinear})
    return config


def load_adapter(model: torch.nn.Module, adapter_dir: str | os.PathLike, is_trainable: bool = False):
    """Wrap `model` with the adapter saved in `adapter_dir` (not merged).

    Args:
        model: the base ChatGLMForConditionalGeneration.
        adapter_dir: a PEFT adapter folder.
        is_trainable: keep the adapter trainable (to continue fine-tuning) instead of inference mode.

    Returns:
        The peft.PeftModel.

    Raises:
        CheckpointError: the folder is missing or has no adapter_config.json, or its weights are
            corrupt or do not fit `model` (one line naming the folder and the first bad tensor).
    """
    adapter_dir = Path(adapter_dir)
    check_adapter_folder(adapter_dir)
    peft = import_extra("peft", "train", "LoRA")
    try:
        config = allow_quantized_base(peft.LoraConfig.from_pretrained(str(adapter_dir)), model)
        with quiet_about_quantized_layers():
            return peft.PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=is_trainable, config=config)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # safetensors, PEFT and load_state_dict each raise their own types
        raise CheckpointError(f"{adapter_dir}: not a usable LoRA adapter for this model ({_adapter_reason(e)})") from e


def check_adapter_folder(adapter_dir: str | os.PathLike) -> None:
    """Check that `adapter_dir` is a PEFT LoRA folder with a readable adapter_config.json (cheap: no weights read).

    Raises:
        CheckpointError: missing folder or config, unreadable config, not LoRA, or a bad rank.
    """
    adapter_dir = Path(adapter_dir)
    if not is_adapter_folder(adapter_dir):
        what = "does not exist" if not adapter_dir.exists() else f"has no {ADAPTER_CONFIG_NAME}"
        raise CheckpointError(f"{adapter_dir}: {what}; expected a PEFT LoRA adapter folder "
                              f"({ADAPTER_CONFIG_NAME} + {ADAPTER_WEIGHTS_NAME})")
    path = adapter_dir / ADAPTER_CONFIG_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the adapter config ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    peft_type = data.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise CheckpointError(f"{path}: peft_type is {peft_type!r}; expected 'LORA'")
    rank = data.get("r", 8)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise CheckpointError(f"{path}: field 'r' = {rank!r}: expected a positive integer")


def _adapter_reason(e: BaseException) -> str:
    """The first informative line of a loading error (size mismatches: the first tensor and both shapes)."""
    text = str(e)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    mismatch = next((line for line in lines if line.startswith("size mismatch")), None)
    if mismatch:
        count = sum(line.startswith("size mismatch") for line in lines)
        return f"{count} tensor(s) of the wrong shape, e.g. {mismatch.removeprefix('size mismatch for ')}"
    line = lines[0] if lines else type(e).__name__
    return line if len(line) <= 300 else line[:297] + "..."
