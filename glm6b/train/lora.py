"""LoRA through PEFT: wrap a model with fresh adapters to train, and merge a trained adapter into its base
(`glm6b merge-lora`). Adapter folders themselves are read by glm6b.checkpoint.adapters.

PEFT works on our plain nn.Module as it is: `target_modules=["query_key_value"]` matches the HF
module names kept by glm6b.model, `model.config.to_dict()` gives PEFT the config it records, and the
LoRA layers are injected in place, so `peft_model.get_base_model()` is a ChatGLMForConditionalGeneration
whose forward (and glm6b.inference.generation) includes the adapters.

peft (and the transformers it imports, ~10 s) is imported inside the functions, only when LoRA is used.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from ..api import load, resolve
from ..checkpoint import hf
from ..checkpoint.adapters import allow_quantized_base, quiet_about_quantized_layers
from ..config import ChatGLMConfig, LoadConfig, LoraArguments, LoraConfig  # LoraArguments: the first releases' name
from ..extras import import_extra
from ..io import atomic_folder
from ..safety import check_output_dir

__all__ = ["LoraArguments", "LoraConfig", "apply_lora", "merge_lora"]


def apply_lora(model: torch.nn.Module, args: LoraConfig, base_model_name_or_path: str | None = None):
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
    with quiet_about_quantized_layers():
        return peft.get_peft_model(model, allow_quantized_base(config, model))


def merge_lora(model: LoadConfig, output_dir: str | os.PathLike, save_dtype: torch.dtype | str | None = None,
               overwrite: bool = False) -> Path:
    """Merge a LoRA adapter into its base model and save a full HF-layout folder (`glm6b merge-lora`).

    The merge (W + B @ A * alpha / r) is done in model.dtype (float32 by default, which keeps it
    exact); the result is saved in `save_dtype`. Its outputs equal those of base + adapter (up to the
    rounding of save_dtype).

    Args:
        model: the base model and its adapter (model.adapter is required; the merge always happens).
        output_dir: where to write config.json, the weights and the tokenizer files.
        save_dtype: dtype of the saved weights; None keeps the model's.
        overwrite: replace a model folder an earlier merge wrote there. A folder holding anything
            else, or the base or adapter folder itself, is always refused (glm6b.safety).

    Returns:
        The output folder.

    Raises:
        CheckpointError: unusable base or adapter folder.
        OutputError: an output that would destroy an input or other files, or cannot be written;
            checked before the model is loaded.
    """
    if model.adapter is None:
        raise ValueError("merge_lora: model.adapter (the PEFT adapter folder) is not set")
    model = dataclasses.replace(model, merge_adapter=True, dtype=model.dtype or "float32")
    base = resolve(model).checkpoint
    if base.is_dir() and not (base / hf.CONFIG_NAME).is_file():
        hf.find_weight_files(base)  # the reader's own message for a folder that is not a model
    out_dtype = save_dtype if save_dtype is not None else model.dtype
    config = ChatGLMConfig.from_json_file(base / hf.CONFIG_NAME) if base.is_dir() else None
    check_output_dir(output_dir, inputs=[base, model.adapter], overwrite=overwrite, owned=hf.MODEL_FOLDER_FILES,
                     owned_prefixes=hf.MODEL_FOLDER_PREFIXES,
                     needed_bytes=hf.estimate_model_bytes(config, out_dtype) if config else None)
    merged, tokenizer, _ = load(model)
    if save_dtype is not None:
        merged = merged.to(hf.as_dtype(save_dtype))
        merged.tie_weights()
    output_dir = Path(output_dir)
    with atomic_folder(output_dir) as tmp:  # a full disk or a kill leaves no half-written model folder
        hf.save_pretrained(merged, tmp, tokenizer=tokenizer)
    return output_dir
