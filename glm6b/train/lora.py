"""LoRA through PEFT: wrap the model, load adapters in PEFT's folder format, merge them into the base.

PEFT works on our plain nn.Module as it is: `target_modules=["query_key_value"]` matches the HF
module names kept by glm6b.model, `model.config.to_dict()` gives PEFT the config it records, and the
LoRA layers are injected in place, so `peft_model.get_base_model()` is a ChatGLMForConditionalGeneration
whose forward (and glm6b.inference.generation) includes the adapters. An adapter folder is what
`PeftModel.save_pretrained` writes: adapter_config.json + adapter_model.safetensors.

peft (and the transformers it imports, ~10 s) is imported inside the functions, only when LoRA is used.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint.hf import CheckpointError, load_model, save_pretrained
from ..extras import import_extra
from ..io import atomic_folder
from ..tokenizer import load_tokenizer

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


@dataclass
class LoraArguments:
    """LoRA settings (the `lora:` section of a recipe; the MindFormers ADGEN values by default).

    Attributes:
        r: rank of the update B @ A.
        lora_alpha: scaling numerator (the update is scaled by lora_alpha / r).
        lora_dropout: dropout on the LoRA branch's input.
        target_modules: module names to adapt (the fused attention projection).
    """

    r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: ["query_key_value"])

    def __post_init__(self) -> None:
        # Checked here, when the recipe is read, not by PEFT after the model has loaded.
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"lora: {message}")

        need(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r >= 1,
             f"r={self.r!r} must be a positive integer (the rank of the update)")
        need(isinstance(self.lora_alpha, (int, float)) and not isinstance(self.lora_alpha, bool)
             and self.lora_alpha > 0, f"lora_alpha={self.lora_alpha!r} must be a positive number")
        need(isinstance(self.lora_dropout, (int, float)) and not isinstance(self.lora_dropout, bool)
             and 0.0 <= self.lora_dropout < 1.0, f"lora_dropout={self.lora_dropout!r} must be in [0, 1)")
        need(isinstance(self.target_modules, list) and len(self.target_modules) > 0
             and all(isinstance(m, str) and m for m in self.target_modules),
             f"target_modules={self.target_modules!r} must be a non-empty list of module names")


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """True if `path` is a folder holding a PEFT adapter_config.json."""
    return (Path(path) / ADAPTER_CONFIG_NAME).is_file()


def apply_lora(model: torch.nn.Module, args: LoraArguments, base_model_name_or_path: str | None = None):
    """Wrap `model` with fresh LoRA adapters; everything else is frozen.

    The adapters are float32 even over a bfloat16/float16 base (PEFT's autocast_adapter_dtype), and
    the frozen base weights are not copied.

    Args:
        model: a ChatGLMForConditionalGeneration.
        args: rank, alpha, dropout, target modules.
        base_model_name_or_path: recorded in adapter_config.json (where the base weights live).

    Returns:
        The peft.PeftModel.
    """
    peft = import_extra("peft", "train", "LoRA")
    if base_model_name_or_path is not None:
        # get_peft_model records the model's `name_or_path` attribute in adapter_config.json
        model.name_or_path = str(base_model_name_or_path)
    config = peft.LoraConfig(r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                             target_modules=list(args.target_modules),
                             base_model_name_or_path=getattr(model, "name_or_path", None))
    with _quiet_about_quantized_layers():
        return peft.get_peft_model(model, _with_quantized_layers(config, model))


@contextlib.contextmanager
def _quiet_about_quantized_layers():
    """PEFT warns about any base layer type it does not know; QuantizedLinear is handled (see below)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Unsupported layer type .*QuantizedLinear")
        yield


def _with_quantized_layers(config, model: torch.nn.Module):
    """Let PEFT wrap glm6b's int8/int4 QuantizedLinear layers with its ordinary LoRA Linear (QLoRA-style).

    PEFT's LoRA Linear computes base_layer(x) + lora_B(lora_A(x)) * scaling whatever the base layer
    is, so the adapter's tensors and names are those of a float base: the adapter folder loads on
    either. (Merging into a quantized base is not supported; merge into the float base.)
    """
    from ..quant.linear import QuantizedLinear

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
        config = _with_quantized_layers(peft.LoraConfig.from_pretrained(str(adapter_dir)), model)
        with _quiet_about_quantized_layers():
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


def merge_lora(base: str | os.PathLike, adapter: str | os.PathLike, output_dir: str | os.PathLike,
               dtype: torch.dtype | str = torch.float32, save_dtype: torch.dtype | str | None = None,
               overwrite: bool = False) -> Path:
    """Merge a LoRA adapter into its base model and save a full HF-layout folder.

    The merge (W + B @ A * alpha / r) is done in `dtype`; the result is saved in `save_dtype`. Its
    outputs equal those of base + adapter (up to the rounding of save_dtype).

    Args:
        base: the base model folder.
        adapter: the PEFT adapter folder.
        output_dir: where to write config.json, the weights and the tokenizer files.
        dtype: dtype to load and merge in (float32 keeps the merge exact).
        save_dtype: dtype of the saved weights; None keeps `dtype`.
        overwrite: replace a model folder an earlier merge wrote there. A folder holding anything
            else, or the base or adapter folder itself, is always refused (glm6b.safety).

    Returns:
        The output folder.

    Raises:
        CheckpointError: unusable base or adapter folder.
        OutputError: an output that would destroy an input or other files, or cannot be written;
            checked before the model is loaded.
    """
    from ..checkpoint.hf import MODEL_FOLDER_FILES, MODEL_FOLDER_PREFIXES, estimate_model_bytes
    from ..config import ChatGLMConfig
    from ..safety import check_output_dir

    if not Path(base, "config.json").is_file():
        load_model(base)  # the loader's own message for a missing or wrong folder
    out_dtype = save_dtype if save_dtype is not None else dtype
    check_output_dir(output_dir, inputs=[base, adapter], overwrite=overwrite, owned=MODEL_FOLDER_FILES,
                     owned_prefixes=MODEL_FOLDER_PREFIXES,
                     needed_bytes=estimate_model_bytes(ChatGLMConfig.from_json_file(Path(base, "config.json")),
                                                       out_dtype))
    check_adapter_folder(adapter)
    model = load_model(base, dtype=dtype)
    merged = load_adapter(model, adapter).merge_and_unload()
    if save_dtype is not None:
        merged = merged.to(getattr(torch, str(save_dtype).removeprefix("torch.")))
        merged.tie_weights()
    output_dir = Path(output_dir)
    with atomic_folder(output_dir) as tmp:  # a full disk or a kill leaves no half-written model folder
        save_pretrained(merged, tmp, tokenizer=load_tokenizer(base))
    return output_dir
