"""The trained result as ordinary folders: `save_final_model` (what `final/` holds, gathered from any
layout) and `merge_checkpoint` (a sharded DCP checkpoint -> HF model folder, PEFT adapter folder or
THUDM P-tuning folder)."""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from ..checkpoint.hf import (MODEL_FOLDER_FILES, MODEL_FOLDER_PREFIXES, PREFIX_ENCODER, CheckpointError,
                             estimate_model_bytes, load_model, save_pretrained)
from ..config import ChatGLMConfig
from ..extras import import_extra
from ..io import atomic_folder
from ..model import ChatGLMForConditionalGeneration
from ..safety import check_output_dir, folder_bytes
from .dcp import (PEFT_PREFIX, copy_tokenizer, load_full_model_state, method_of, model_parts, read_checkpoint_info,
                  tied_keys)
from .parallel import barrier, is_main_process


def _strip_peft_prefix(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


@torch.no_grad()
def _base_model_from_state(config: ChatGLMConfig, tensors: dict[str, torch.Tensor], directory: Path):
    """Build the ChatGLM model from a full state dict (keys without any PEFT prefix); fail on any mismatch."""
    model = ChatGLMForConditionalGeneration(config, device="meta")
    expected = dict(model.named_parameters(remove_duplicate=False))
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{directory}: the model tensors do not match config.json (missing: {missing[:5]}, "
                              f"unexpected: {unexpected[:5]})")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{directory}: {name} has shape {list(tensor.shape)}, config.json gives "
                                  f"{list(expected[name].shape)}")
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    return model


def merge_checkpoint(input_dir: str | os.PathLike, output_dir: str | os.PathLike,
                     base_model_path: str | os.PathLike | None = None,
                     dtype: torch.dtype | str | None = None, overwrite: bool = False) -> Path:
    """Turn a sharded (DCP) checkpoint into a normal folder (MindFormers' transform_checkpoints step).

    Runs in one process, no process group (`glm6b merge-checkpoint --input DIR --output DIR
    [--base-model DIR] [--dtype bfloat16]`). Written as `<output_dir>.tmp`, then renamed.

    * full fine-tuning: an HF folder (config.json, model.safetensors, tokenizer files) that
      `glm6b.load_model` reads.
    * LoRA: with `base_model_path`, the adapter merged into the base weights (W + B A * scaling),
      as an HF folder; without it, the PEFT adapter folder (adapter_config.json +
      adapter_model.safetensors, + tokenizer files) for `glm6b.checkpoint.adapters.load_adapter` /
      `PeftModel.from_pretrained`. A LoRA checkpoint written with trainable_only=False carries
      its base and merges without `base_model_path`.
    * P-tuning: with `base_model_path`, an HF folder holding the base and the prefix encoder
      (config.json has pre_seq_len); without it, the THUDM P-tuning folder (pytorch_model.bin with
      the prefix encoder + config.json).

    Args:
        input_dir: folder written by `save_sharded`.
        output_dir: the folder to write. It must not be, contain or lie inside the checkpoint or the
            base model (so the run folder holding the checkpoint is refused), and must be new or empty,
            or, with `overwrite`, hold only an earlier merge's files (glm6b.safety.check_output_dir).
        base_model_path: base HF model folder, for checkpoints that hold only trainable tensors.
        dtype: dtype of the written weights (None: as stored, i.e. float32 master weights).
        overwrite: replace an earlier merge's output in `output_dir`.

    Returns:
        The output folder.

    Raises:
        CheckpointError: not a sharded checkpoint, tensors that do not match, a missing base.
        OutputError: an output that would destroy an input or other files, or cannot be written;
            checked before any tensor is read.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    info = read_checkpoint_info(input_dir)
    config = ChatGLMConfig.from_json_file(input_dir / "config.json")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."))
    writes_model = not info["trainable_only"] or base_model_path is not None
    check_output_dir(output_dir, inputs=[input_dir, base_model_path], overwrite=overwrite,
                     owned=MODEL_FOLDER_FILES, owned_prefixes=MODEL_FOLDER_PREFIXES,
                     needed_bytes=estimate_model_bytes(config, dtype) if writes_model else folder_bytes(input_dir))
    tensors = load_full_model_state(input_dir)
    kind, has_base = info["kind"], not info["trainable_only"]
    if not has_base and base_model_path is None:
        if kind == "lora":
            writer = functools.partial(_write_adapter_folder, tensors, input_dir, info.get("adapter_name", "default"))
        elif kind == "ptuning":
            writer = functools.partial(_write_ptuning_folder, tensors, config)
        else:
            raise CheckpointError(f"{input_dir} holds only the trainable tensors of a full fine-tuning run: pass "
                                  f"base_model_path (--base-model) for the others")
    else:
        model = _merged_model(kind, tensors, config, input_dir, None if has_base else base_model_path)
        if dtype is not None:
            model = model.to(dtype)
            model.tie_weights()
        writer = functools.partial(_write_model_folder, model)
    with atomic_folder(output_dir) as tmp:
        writer(tmp, dtype)
        copy_tokenizer(input_dir, tmp)
    return output_dir


def _merged_model(kind: str, tensors: dict[str, torch.Tensor], config: ChatGLMConfig, input_dir: Path,
                  base_model_path) -> ChatGLMForConditionalGeneration:
    """The full model: base weights (the checkpoint's own, or base_model_path's) + the trained tensors."""
    if kind == "lora":
        return _merged_lora_model(tensors, config, input_dir, base_model_path)
    if base_model_path is None:
        return _base_model_from_state(config, tensors, input_dir)
    # Only the trainable tensors were stored: start from the base, overwrite them.
    model = load_model(base_model_path, dtype=torch.float32, pre_seq_len=config.pre_seq_len,
                       prefix_projection=config.prefix_projection if config.pre_seq_len else None)
    params = dict(model.named_parameters())
    for name, tensor in tensors.items():
        if name not in params or params[name].shape != tensor.shape:
            raise CheckpointError(f"{input_dir}: {name} {list(tensor.shape)} does not match the model of "
                                  f"{base_model_path}")
        params[name].data.copy_(tensor)
    return model


def _merged_lora_model(tensors: dict[str, torch.Tensor], config: ChatGLMConfig, input_dir: Path,
                       base_model_path) -> ChatGLMForConditionalGeneration:
    """Rebuild the PEFT model around the base, load the adapter tensors, merge (PEFT's merge_and_unload)."""
    peft = import_extra("peft", "train", "merging a LoRA checkpoint")

    peft_config = peft.LoraConfig.from_pretrained(str(input_dir))
    if base_model_path is not None:
        base = load_model(base_model_path, dtype=torch.float32)
    else:  # a LoRA checkpoint saved with trainable_only=False carries its base
        base_tensors = {}
        for name, tensor in tensors.items():
            name = _strip_peft_prefix(name)
            if ".lora_" not in name:
                base_tensors[name.replace(".base_layer.", ".")] = tensor
        base = _base_model_from_state(config, base_tensors, input_dir)
    peft_model = peft.get_peft_model(base, peft_config)
    lora_tensors = {k: v for k, v in tensors.items() if ".lora_" in k}
    if not lora_tensors:
        raise CheckpointError(f"{input_dir}: a LoRA checkpoint without lora_A/lora_B tensors")
    try:
        result = peft_model.load_state_dict(lora_tensors, strict=False)
    except RuntimeError as e:
        bad = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e).splitlines()[0])
        raise CheckpointError(f"{input_dir}: the LoRA tensors do not fit the base model "
                              f"{base_model_path or 'stored in the checkpoint'} ({bad})") from None
    if result.unexpected_keys:
        raise CheckpointError(f"{input_dir}: tensors not in the LoRA model: {result.unexpected_keys[:5]}")
    not_loaded = [k for k in result.missing_keys if ".lora_" in k]
    if not_loaded:
        raise CheckpointError(f"{input_dir}: LoRA tensors missing from the checkpoint: {not_loaded[:5]}")
    merged = peft_model.merge_and_unload()
    merged.tie_weights()
    return merged


def _write_model_folder(model: ChatGLMForConditionalGeneration, folder: Path, dtype) -> None:
    save_pretrained(model, folder)


def _write_adapter_weights(tensors: dict[str, torch.Tensor], adapter_name: str, folder: Path, dtype) -> None:
    """adapter_model.safetensors in PEFT's layout: keys without the adapter name (`lora_A.default.weight`
    -> `lora_A.weight`), as PeftModel.save_pretrained writes them."""
    from safetensors.torch import save_file

    adapter = {name.replace(f".{adapter_name}.", "."): tensor.to(dtype or tensor.dtype).contiguous()
               for name, tensor in tensors.items() if ".lora_" in name}
    save_file(adapter, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def _write_adapter_folder(tensors: dict[str, torch.Tensor], input_dir: Path, adapter_name: str, folder: Path,
                          dtype) -> None:
    _write_adapter_weights(tensors, adapter_name, folder, dtype)
    shutil.copyfile(input_dir / "adapter_config.json", folder / "adapter_config.json")
    shutil.copyfile(input_dir / "config.json", folder / "config.json")


def _write_ptuning_folder(tensors: dict[str, torch.Tensor], config: ChatGLMConfig, folder: Path, dtype) -> None:
    state = {name: tensor.to(dtype or tensor.dtype).contiguous() for name, tensor in tensors.items()
             if name.startswith(PREFIX_ENCODER)}
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(config.to_json_string(), encoding="utf-8")


def save_final_model(model: nn.Module, directory: str | os.PathLike, tokenizer=None) -> Path:
    """Write the trained result on rank 0 in the single-process formats (what `final/` holds).

    Collective: every rank calls it; the full tensors are gathered to rank 0's CPU, and rank 0
    writes `<directory>.tmp`, then renames it. Formats (as glm6b.train.trainer's save_model writes them):
    full -> HF folder (config.json, model.safetensors) for `load_model`; LoRA -> PEFT adapter
    folder (adapter_config.json, adapter_model.safetensors); P-tuning -> THUDM folder
    (pytorch_model.bin with the prefix encoder, config.json). On one process it is a plain save.

    Args:
        model: the trained model, as parallelized (FSDP2 / TP / DDP / PEFT / plain).
        directory: the output folder (replaced if it exists).
        tokenizer: a tokenizer or a folder with its files, copied into the folder.

    Returns:
        The folder.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    module, base, peft_config = model_parts(model)
    trainable_only = method_of(base, peft_config) != "full"
    # full_state_dict + cpu_offload: the full tensors land on rank 0's CPU only (the others get {}).
    tensors = get_model_state_dict(model, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only))
    directory = Path(directory)
    if is_main_process():
        if trainable_only:
            trainable = {name for name, p in module.named_parameters() if p.requires_grad}
            tensors = {k: v for k, v in tensors.items() if k in trainable}
        write_final_folder(model, tensors, directory, tokenizer=tokenizer)
    barrier()
    return directory


def write_final_folder(model: nn.Module, tensors: dict[str, torch.Tensor], directory: str | os.PathLike,
                       tokenizer=None) -> Path:
    """Write what `final/` holds from the model's full state dict (one process: no collective).

    Args:
        model: the trained model (any wrapping): gives the method, the config and the PEFT config.
        tensors: its full tensors by state-dict name: every tensor (full fine-tuning) or the trainable
            ones (LoRA, P-tuning); a tied lm_head is left out.
        directory: the output folder (written as <directory>.tmp, then renamed; replaced if it exists).
        tokenizer: a tokenizer or a folder with its files, copied into the folder.

    Returns:
        The folder.
    """
    module, base, peft_config = model_parts(model)
    kind = method_of(base, peft_config)
    directory = Path(directory)
    tied = tied_keys(model)
    tensors = {k: v for k, v in tensors.items() if not (tied and k == tied[0])}
    with atomic_folder(directory) as tmp:
        if kind == "full":
            _write_model_folder(_base_model_from_state(base.config, dict(tensors), directory), tmp, None)
        elif kind == "lora":
            _write_adapter_weights(tensors, getattr(module, "active_adapter", "default"), tmp, None)
            peft_config.save_pretrained(str(tmp))
        else:
            _write_ptuning_folder(tensors, base.config, tmp, None)
        copy_tokenizer(tokenizer, tmp)
    return directory
