"""Training checkpoints and the trained result of one Trainer: checkpoint-<step>/ folders (local files on
one process, DCP shards under torchrun), resume from them, and `final/`.

A local checkpoint holds the method's weights (full: an HF folder; lora: the PEFT adapter;
ptuning: the THUDM prefix-encoder folder), optimizer.pt, scheduler.pt, rng_state.pt (and
scaler.pt with fp16) and trainer_state.json; it is written as checkpoint-<step>.tmp, then renamed.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint.hf import (PREFIX_ENCODER, CheckpointError, iter_checkpoint_tensors, iter_file_tensors,
                             load_ptuning_state, save_pretrained, save_ptuning_checkpoint)
from ..io import atomic_folder
from ..model import ChatGLMForConditionalGeneration
from .args import TrainerError, TrainerState
from .dcp import is_sharded_checkpoint, load_sharded, read_checkpoint_info, save_sharded
from .lora import ADAPTER_WEIGHTS_NAME, is_adapter_folder
from .parallel import barrier, data_parallel_rank_and_size, get_rank, get_world_size, is_main_process, unwrap_model

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_NAME = "trainer_state.json"


def checkpoint_kind(path: Path) -> str:
    """'lora' (PEFT adapter folder), 'ptuning' (THUDM prefix-only folder) or 'full' (HF model folder)."""
    if is_adapter_folder(path):
        return "lora"
    weights = path / "pytorch_model.bin"
    if weights.is_file() and not (path / "model.safetensors").is_file():
        names: list[str] = []
        for _ in iter_file_tensors(weights, skip=lambda name: names.append(name) or True):
            pass
        if names and all(name.startswith(PREFIX_ENCODER) for name in names):
            return "ptuning"
    return "full"


def save_model(trainer, directory: str | os.PathLike) -> Path:
    """Save the result of the method into `directory` (written as <directory>.tmp, then renamed).

    full -> HF folder with the tokenizer; lora -> PEFT adapter folder (+ tokenizer files);
    ptuning -> THUDM P-tuning folder (pytorch_model.bin with the prefix encoder + config.json).

    Returns:
        The folder.
    """
    directory = Path(directory)
    with atomic_folder(directory) as tmp:
        save_weights(trainer, tmp)
        if trainer.method != "ptuning":
            trainer.tokenizer.save_pretrained(tmp)
    return directory


def save_weights(trainer, folder: Path) -> None:
    """Write the method's weights into `folder` (HF model folder, PEFT adapter or THUDM prefix encoder)."""
    if trainer.method == "full":
        save_pretrained(trainer.model, folder)
    elif trainer.method == "lora":
        # save_embedding_layers="auto" would call model.config.__class__.from_pretrained to compare
        # vocabularies; ChatGLMConfig has no from_pretrained, and the embeddings are never adapted.
        trainer.model.save_pretrained(str(folder), save_embedding_layers=False)
    else:
        save_ptuning_checkpoint(unwrap_model(trainer.model), folder)


def save_checkpoint(trainer) -> Path:
    """Write output_dir/checkpoint-<step>/ (weights, optimizer, scheduler, RNG, position); prune old ones."""
    output_dir = Path(trainer.args.output_dir)
    folder = output_dir / f"checkpoint-{trainer.state.global_step}"
    if get_world_size() > 1:
        # DCP: every rank writes its shard (atomic: <folder>.tmp renamed by rank 0); any world size resumes it
        rank = get_rank()
        save_sharded({"model": trainer.model, "optimizer": trainer.optimizer,
                      "scheduler": _scheduler_state(trainer.scheduler),
                      "trainer_state": {**asdict(trainer.state), "method": trainer.method, "seed": trainer.args.seed,
                                        "global_batch": global_batch(trainer)},
                      f"rng_rank{rank}": _rng_state()},
                     folder, tokenizer=trainer.tokenizer, parallel_config=trainer.parallel_config)
        if trainer.args.save_total_limit and is_main_process():
            for old in list_checkpoints(output_dir)[:-trainer.args.save_total_limit]:
                shutil.rmtree(old)
        barrier()
        return folder
    with atomic_folder(folder) as tmp:
        save_weights(trainer, tmp)
        torch.save(trainer.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(trainer.scheduler.state_dict(), tmp / "scheduler.pt")
        if trainer.scaler is not None:
            torch.save(trainer.scaler.state_dict(), tmp / "scaler.pt")
        torch.save(_rng_state(), tmp / "rng_state.pt")
        (tmp / STATE_NAME).write_text(json.dumps(
            {**asdict(trainer.state), "method": trainer.method, "seed": trainer.args.seed,
             "per_device_train_batch_size": trainer.args.per_device_train_batch_size,
             "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
             "dataset_rows": len(trainer.train_dataset)}, indent=2) + "\n")
    if trainer.args.save_total_limit:
        for old in list_checkpoints(output_dir)[:-trainer.args.save_total_limit]:
            shutil.rmtree(old)
    return folder


def find_checkpoint(trainer, resume: str | os.PathLike) -> Path:
    """The checkpoint folder `resume` names: a checkpoint-<step> folder, or "latest" in output_dir."""
    if str(resume) in ("latest", "True", "true"):
        found = list_checkpoints(Path(trainer.args.output_dir))
        if not found:
            raise CheckpointError(f"resume_from_checkpoint='latest': no checkpoint-<step> folder in "
                                  f"{trainer.args.output_dir}")
        return found[-1]
    path = Path(resume)
    if not (path / STATE_NAME).is_file() and not is_sharded_checkpoint(path):
        raise CheckpointError(f"{path}: not a training checkpoint (no {STATE_NAME})")
    return path


def global_batch(trainer) -> int:
    """Rows per optimizer step over all data-parallel ranks."""
    return (trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps
            * data_parallel_rank_and_size(trainer.mesh)[1])


def _load_sharded_checkpoint(trainer, folder: Path) -> None:
    """Resume from a save_sharded checkpoint, with this run's world size (DCP reshards)."""
    rank = get_rank()
    keys = read_checkpoint_info(folder)["keys"]
    request: dict[str, Any] = {"model": trainer.model, "optimizer": trainer.optimizer, "scheduler": {},
                               "trainer_state": {}}
    if f"rng_rank{rank}" in keys:
        request[f"rng_rank{rank}"] = {}
    else:
        warnings.warn(f"{folder} has no RNG state for rank {rank} (written with another world size): the "
                      f"resume is not exact where randomness (dropout) is used", stacklevel=4)
    load_sharded(request, folder)
    state = request["trainer_state"]
    if state["method"] != trainer.method:
        raise TrainerError(f"{folder} was written by a {state['method']!r} run; this run's method is "
                           f"{trainer.method!r}")
    if state.get("global_batch") != global_batch(trainer) or state.get("seed") != trainer.args.seed:
        warnings.warn(f"resuming {folder} with a global batch of {global_batch(trainer)} rows and seed "
                      f"{trainer.args.seed} (written with {state.get('global_batch')} and {state.get('seed')}): the "
                      f"run will not continue exactly", stacklevel=4)
    sched = dict(request["scheduler"])
    sched["lr_lambdas"] = [None] * len(trainer.optimizer.param_groups)
    trainer.scheduler.load_state_dict(sched)
    if f"rng_rank{rank}" in request:
        _set_rng_state(request[f"rng_rank{rank}"])
    trainer.state = TrainerState(**{k: state[k] for k in asdict(TrainerState()) if k in state})
    _convert_position(trainer)


def _convert_position(trainer) -> None:
    """Re-express the data position when the rows per global micro-batch changed (another dp / batch size)."""
    rows = trainer.args.per_device_train_batch_size * data_parallel_rank_and_size(trainer.mesh)[1]
    old = trainer.state.rows_per_micro_batch
    if old and old != rows:
        per_epoch = trainer.batches_per_epoch(len(trainer.train_dataset))
        index = trainer.state.batch_index * old // rows
        trainer.state.micro_batches = trainer.state.epoch * per_epoch + index
        trainer.state.batch_index = index
    trainer.state.rows_per_micro_batch = rows


def load_checkpoint(trainer, folder: Path) -> None:
    """Restore weights, optimizer, scheduler, RNG and data position from a local or sharded checkpoint."""
    if is_sharded_checkpoint(folder):
        _load_sharded_checkpoint(trainer, folder)
        return
    state = json.loads((folder / STATE_NAME).read_text())
    if state["method"] != trainer.method:
        raise TrainerError(f"{folder} was written by a {state['method']!r} run; this run's method is "
                           f"{trainer.method!r}")
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "seed"):
        ours = trainer.args.seed if key == "seed" else getattr(trainer.args, key)
        if state[key] != ours:
            warnings.warn(f"resuming {folder} with {key}={ours} (it was written with {state[key]}): "
                          f"the run will not continue exactly", stacklevel=4)
    base = unwrap_model(trainer.model)
    if trainer.method == "full":
        copy_weights(base, folder)
    elif trainer.method == "lora":
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        result = set_peft_model_state_dict(trainer.model, load_file(folder / ADAPTER_WEIGHTS_NAME))
        if getattr(result, "unexpected_keys", None):
            raise CheckpointError(f"{folder}: adapter tensors not in this model: {result.unexpected_keys[:5]}")
    else:
        load_ptuning_state(base, folder)
    trainer.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=trainer.device,
                                                 weights_only=True))
    trainer.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    if trainer.scaler is not None and (folder / "scaler.pt").is_file():
        trainer.scaler.load_state_dict(torch.load(folder / "scaler.pt", weights_only=True))
    _set_rng_state(torch.load(folder / "rng_state.pt", weights_only=True))
    trainer.state = TrainerState(**{k: state[k] for k in asdict(TrainerState()) if k in state})


def list_checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-<step> folders of output_dir, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


@torch.no_grad()
def copy_weights(model: ChatGLMForConditionalGeneration, folder: Path) -> None:
    """Copy an HF folder's tensors into the (already built) model, in place; every parameter must be found."""
    params = dict(model.named_parameters())
    seen = set()
    for name, tensor in iter_checkpoint_tensors(folder, skip=lambda n: n.endswith(".rotary_emb.inv_freq")):
        if name not in params:
            if name == "lm_head.weight" and model.config.tie_word_embeddings:
                continue
            raise CheckpointError(f"{folder}: tensor {name} is not a parameter of this model")
        if params[name].shape != tensor.shape:
            raise CheckpointError(f"{folder}: {name} has shape {list(tensor.shape)}, the model "
                                  f"{list(params[name].shape)}")
        params[name].copy_(tensor)
        seen.add(name)
    missing = sorted(set(params) - seen)
    if missing:
        raise CheckpointError(f"{folder}: {len(missing)} parameter(s) missing, e.g. {missing[:3]}")


def _scheduler_state(scheduler) -> dict[str, Any]:
    """The LR scheduler's state without its lambdas (DCP stores plain values; the lambdas are rebuilt)."""
    return {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}


def _rng_state() -> dict[str, Any]:
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [version, list(state), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    version, values, gauss = state["python"]
    random.setstate((version, tuple(values), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
