"""Checkpoint conversion between MindFormers `.ckpt` files and HF folders / PEFT adapters (`glm6b convert`).

    MindFormers -> HF:  glm_6b.ckpt       -> HF folder (safetensors + config.json + tokenizer files)
                        glm_6b_lora.ckpt  -> HF folder of the base + PEFT adapter folder (MindPet LoRA)
                        rank_*/ + strategy -> the same, merged from a sharded set (mindspore_shards)
    HF -> MindFormers:  HF folder (+ PEFT adapter) -> .ckpt with the names and dtypes MindFormers'
                        convert_weight.py writes (float16; MindPet names for the adapter)

The formats and the name map live in glm6b.checkpoint.mindspore; this module only moves tensors.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from .checkpoint import hf
from .checkpoint import mindspore as ms
from .checkpoint.adapters import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from .checkpoint.errors import CheckpointError
from .checkpoint.mindspore_shards import ShardedCheckpoint
from .config import ChatGLMConfig, LoraConfig
from .model.model import rotary_inv_freq
from .tokenizer import load_tokenizer
from .train.lora import apply_lora

_FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def _dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in _FLOAT_DTYPES:
        raise ValueError(f"dtype {name!r}: expected one of {', '.join(_FLOAT_DTYPES)}")
    return getattr(torch, name)


def _stored_dtype(entries: list[ms.CkptEntry], path: Path) -> torch.dtype:
    """The dtype of the word embeddings in the file (what "keep the stored dtype" means)."""
    name = ms.to_mindformers_name("transformer.word_embeddings.weight")
    for entry in entries:
        if entry.name == name and ms.DTYPES.get(entry.tensor_type, torch.int8).is_floating_point:
            return ms.DTYPES[entry.tensor_type]
    raise CheckpointError(f"{path}: no floating-point {name}; is this a ChatGLM-6B checkpoint?")


def mindspore_to_hf(input_path: str | os.PathLike, output_dir: str | os.PathLike,
                    adapter_output: str | os.PathLike | None = None, lora_rank: int | None = None,
                    lora_alpha: float | None = None, dtype: str | torch.dtype | None = None,
                    config: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None,
                    max_shard_size: int | str = "2GB", strategy: str | os.PathLike | None = None) -> Path:
    """Convert a MindFormers ChatGLM-6B `.ckpt` (or sharded set) into an HF folder (and a PEFT adapter for a
    LoRA file).

    Optimizer state and other training entries are skipped. A file with MindPet LoRA tensors
    (glm_6b_lora) becomes the base model in `output_dir` and a PEFT LoRA adapter in `adapter_output`
    (update (alpha / r) * B @ A, as MindPet's); load them with `--adapter`, or merge them with
    `glm6b merge-lora`.

    Args:
        input_path: the `.ckpt` file, or the folder holding a sharded set's `rank_<r>/` folders.
        output_dir: the HF folder to write (config.json, model*.safetensors, tokenizer files).
        adapter_output: the PEFT adapter folder to write; required for a LoRA file, refused otherwise.
        lora_rank: the LoRA rank; None reads it from the tensors (a given rank is checked against them).
        lora_alpha: the LoRA alpha (MindPet does not store it; MindFormers' glm_6b_lora recipe uses 32).
        dtype: dtype of the written weights; None keeps the file's.
        config: config.json to use (default: the one beside the file, else the glm_6b preset).
        tokenizer: tokenizer folder (default: the folder of the file).
        max_shard_size: largest safetensors shard.
        strategy: a sharded set's strategy file (default: found beside `rank_*/`, see
            glm6b.checkpoint.mindspore_shards.find_strategy).

    Returns:
        The output folder.

    Raises:
        CheckpointError: unreadable or mismatched checkpoint, LoRA options that do not fit the file; a
            sharded set with a missing rank or a strategy that does not fit it.
        TokenizerError: no tokenizer files found.
    """
    input_path, output_dir = Path(input_path), Path(output_dir)
    sharded = hf.is_sharded_set(input_path)
    if strategy is not None and not sharded:
        raise CheckpointError(f"--strategy goes with a sharded set (a folder holding rank_*/); {input_path} is not one")
    if sharded:
        with ShardedCheckpoint(input_path, strategy) as source:
            entries = source.entries
    else:
        entries = ms.scan_ckpt(input_path)
    lora = [e for e in entries if ms.is_model_entry(e.name) and ms.is_lora_entry(e.name)]
    if lora and adapter_output is None:
        raise CheckpointError(f"{input_path} holds {len(lora)} MindPet LoRA tensors: pass --adapter-output DIR "
                              f"(and --lora-alpha) to write them as a PEFT adapter")
    if not lora and adapter_output is not None:
        raise CheckpointError(f"{input_path} holds no MindPet LoRA tensors (*.mindpet_delta_lora_a/b); "
                              f"drop --adapter-output")
    if lora:
        unmapped = [e.name for e in entries if ms.is_model_entry(e.name) and not ms.is_lora_entry(e.name)
                    and ms.to_hf_name(e.name) is None]
        if unmapped:  # the LoRA load below is not strict: check the rest of the names here
            raise CheckpointError(f"{input_path}: tensor {unmapped[0]} is not a ChatGLM-6B tensor "
                                  f"({len(unmapped)} such)")
        rank = _check_lora_options(input_path, entries, lora_rank, lora_alpha)
    tok = load_tokenizer(tokenizer if tokenizer is not None else input_path)
    torch_dtype = _dtype(dtype) or _stored_dtype(entries, input_path)
    model = hf.load_model(input_path, dtype=torch_dtype, config=config, strict=not lora, strategy=strategy)
    hf.save_pretrained(model, output_dir, tokenizer=tok, max_shard_size=max_shard_size)
    if lora:
        _write_peft_adapter(model, input_path, Path(adapter_output), rank, lora_alpha, output_dir, tok, strategy)
    return output_dir


def _check_lora_options(path: Path, entries: list[ms.CkptEntry], rank: int | None, alpha: float | None) -> int:
    found = ms.lora_rank(entries)
    if rank is not None and rank != found:
        raise CheckpointError(f"--lora-rank {rank} does not match {path}: its mindpet_delta_lora_a tensors have "
                              f"rank {found}")
    if alpha is None:
        raise CheckpointError(f"{path}: pass --lora-alpha (MindPet does not store it; use the lora_alpha of the "
                              f"MindFormers pet_config the file was trained with, 32 in run_glm_6b_lora.yaml)")
    return found


def _write_peft_adapter(model, path: Path, adapter_dir: Path, rank: int, alpha: float, base_dir: Path,
                        tokenizer, strategy: str | os.PathLike | None = None) -> None:
    """Put the file's MindPet tensors into a PEFT LoRA wrapping of `model` and save the adapter folder."""
    import contextlib
    import peft

    state = {}
    with contextlib.ExitStack() as stack:
        if hf.is_sharded_set(path):
            source = stack.enter_context(ShardedCheckpoint(path, strategy))
            tensors = list(source.iter_model_tensors(skip=lambda name: not ms.is_lora_entry(name)))
        else:
            tensors = list(ms.iter_ckpt(path, skip=lambda name: not ms.is_lora_entry(name)))
    for name, tensor in tensors:
        peft_name = ms.mindpet_to_peft_name(name)
        if peft_name is None:
            raise CheckpointError(f"{path}: LoRA tensor {name} adapts a layer ChatGLM-6B does not have")
        state[peft_name] = tensor
    modules = sorted({n[len(ms.PEFT_PREFIX):].rsplit(".lora_", 1)[0] for n in state})
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    every_layer = len(modules) == len(leaves) * model.config.num_layers
    targets = leaves if every_layer else modules  # leaf names when every layer is adapted, as MindFormers does
    peft_model = apply_lora(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets),
                            base_model_name_or_path=str(base_dir.resolve()))
    result = peft.set_peft_model_state_dict(peft_model, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise CheckpointError(f"{path}: LoRA tensors that do not fit the model: {unexpected[:3]}")
    loaded = {n for n, _ in peft_model.named_parameters() if "lora_" in n}
    if len(loaded) != len(state):
        raise CheckpointError(f"{path}: {len(state)} LoRA tensors for {len(loaded)} LoRA parameters; expected one "
                              f"mindpet_delta_lora_a and one _b per adapted layer")
    _save_adapter_folder(peft_model, adapter_dir, tokenizer)


def _save_adapter_folder(peft_model, adapter_dir: Path, tokenizer) -> None:
    """PEFT's save_pretrained into a temporary folder, then each file renamed into place (atomic per file)."""
    adapter_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{adapter_dir.name}.", dir=adapter_dir.parent))
    try:
        # save_embedding_layers=False: the embeddings are never adapted (see Trainer._save_weights)
        peft_model.save_pretrained(str(tmp), save_embedding_layers=False)
        tokenizer.save_pretrained(tmp)
        for file in tmp.iterdir():
            os.replace(file, adapter_dir / file.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------- HF -> MindFormers


def hf_to_mindspore(input_dir: str | os.PathLike, output_path: str | os.PathLike, dtype: str | torch.dtype = "float16",
                    adapter: str | os.PathLike | None = None, crc_check: bool = False) -> Path:
    """Convert an HF ChatGLM-6B folder (and a PEFT LoRA adapter) into a `.ckpt` file MindFormers loads.

    Names and dtypes are those of MindFormers' convert_weight.py: the NAME_MAP names, every tensor in
    `dtype` except `input_layernorm` (always float16), `lm_head.weight` (the tied word embeddings)
    and the per-layer `rotary_emb.inv_freq` included. An adapter's tensors are added under MindPet's
    names (`<layer>.mindpet_delta_lora_a/b`, in `dtype`), as in a glm_6b_lora checkpoint; set the same
    lora_rank and lora_alpha in the MindFormers pet_config. Tensors stream from the folder one at a time.

    Args:
        input_dir: the HF folder (a file inside it is taken to mean its folder, as the seed's
            --pt_ckpt_path was).
        output_path: the `.ckpt` file to write (atomically).
        dtype: float16 (MindFormers' choice), bfloat16 or float32.
        adapter: a PEFT LoRA adapter folder to include.
        crc_check: append MindSpore's CRC32 trailer (MindSpore >= 2.3 only).

    Returns:
        The output file.

    Raises:
        CheckpointError: a tensor without a MindFormers name, a quantized or incomplete folder, or
            an adapter that is not a plain LoRA of this model.
    """
    folder = Path(input_dir)
    if folder.is_file():
        folder = folder.parent
    torch_dtype = _dtype(dtype)
    hf.find_weight_files(folder)  # a clear error for a folder without config.json or weights, before writing
    config = ChatGLMConfig.from_json_file(folder / hf.CONFIG_NAME)
    adapter_tensors = _read_peft_adapter(Path(adapter)) if adapter is not None else []
    ms.save_ckpt(output_path, _mindformers_entries(folder, config, torch_dtype, adapter_tensors), crc_check=crc_check)
    return Path(output_path)


def _expected_hf_names(config: ChatGLMConfig) -> list[str]:
    names = []
    for hf_name, _ in ms.NAME_MAP:
        names.extend([hf_name.format(i) for i in range(config.num_layers)] if "{}" in hf_name else [hf_name])
    return names


def _mindformers_entries(folder: Path, config: ChatGLMConfig, dtype: torch.dtype,
                         adapter_tensors: list[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    seen = set()
    for name, tensor in hf.iter_checkpoint_tensors(folder):
        ms_name = ms.to_mindformers_name(name)
        if ms_name is None:
            raise CheckpointError(f"{folder}: tensor {name} has no MindFormers name (not a ChatGLM-6B tensor; "
                                  f"P-tuning prefixes are not converted)")
        if not tensor.is_floating_point():
            raise CheckpointError(f"{folder}: tensor {name} is {tensor.dtype}; quantized checkpoints cannot be "
                                  f"converted (convert the float16 model)")
        seen.add(name)
        yield ms_name, tensor.to(ms.mindformers_dtype(name, dtype))
    embedding = "transformer.word_embeddings.weight"
    if "lm_head.weight" not in seen and embedding in seen:  # tied: glm6b folders store it once
        for _, tensor in hf.iter_checkpoint_tensors(folder, skip=lambda n: n != embedding):
            seen.add("lm_head.weight")
            yield ms.to_mindformers_name("lm_head.weight"), tensor.to(dtype)
    inv_freq = rotary_inv_freq(config.head_dim // 2)
    for i in range(config.num_layers):
        name = f"transformer.layers.{i}.attention.rotary_emb.inv_freq"
        if name not in seen:
            seen.add(name)
            yield ms.to_mindformers_name(name), inv_freq.to(ms.mindformers_dtype(name, dtype))
    missing = [n for n in _expected_hf_names(config) if n not in seen]
    if missing:
        raise CheckpointError(f"{folder}: {len(missing)} tensor(s) missing: {', '.join(missing[:3])}")
    for name, tensor in adapter_tensors:
        yield name, tensor.to(dtype)


def _read_peft_adapter(adapter: Path) -> list[tuple[str, torch.Tensor]]:
    import json

    config_path = adapter / ADAPTER_CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{adapter}: no {ADAPTER_CONFIG_NAME}; expected a PEFT LoRA adapter folder")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("peft_type") not in (None, "LORA") or config.get("use_dora") or config.get("fan_in_fan_out"):
        raise CheckpointError(f"{config_path}: MindPet holds plain LoRA only (peft_type LORA, no DoRA, "
                              f"no fan_in_fan_out)")
    weights = adapter / ADAPTER_WEIGHTS_NAME
    if not weights.is_file():
        weights = adapter / "adapter_model.bin"
    tensors = []
    for name, tensor in hf.iter_file_tensors(weights):
        ms_name = ms.peft_to_mindpet_name(name)
        if ms_name is None:
            raise CheckpointError(f"{weights}: tensor {name} is not a LoRA A/B weight of a ChatGLM-6B layer")
        tensors.append((ms_name, tensor.clone()))
    if not tensors:
        raise CheckpointError(f"{weights}: no LoRA tensors")
    return tensors
