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

from ..checkpoint.adapters import ADAPTER_WEIGHTS_NAME, is_adapter_folder
from ..checkpoint.hf import (PREFIX_ENCODER, CheckpointError, iter_checkpoint_tensors, iter_file_tensors,
                             load_ptuning_state, save_pretrained, save_ptuning_checkpoint)
from ..config import TrainerError
from ..io import atomic_folder, atomic_write_text
from ..model import ChatGLMForConditionalGeneration
from .args import TrainerState
from .dcp import is_sharded_checkpoint, load_sharded, read_checkpoint_info, save_sharded
from .parallel import barrier, data_parallel_rank_and_size, get_rank, get_world_size, is_main_process, unwrap_model

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_NAME = "trainer_state.json"
RUN_NAME = "run.json"  # {"run_id": ...}: which run owns the folder; `latest` resumes only its checkpoints
# What a run writes into output_dir besides checkpoint-<step>/ (removed by overwrite_output_dir, nothing else is).
RUN_FILES = ("final", "train_log.jsonl", "eval_log.jsonl", "training_args.json", "recipe.json", "loss.png",
             "tensorboard", RUN_NAME)
# Settings the restored state fixes: resuming with another value is refused (the data position,
# the rows of each step and the shuffle order would no longer be those of the run).
FIXED_ON_RESUME = ("per_device_train_batch_size", "gradient_accumulation_steps", "seed", "shuffle")
# Settings a resume applies from the restored step on (schedule rebuilt, optimizer groups updated).
APPLIED_ON_RESUME = ("learning_rate", "lr_scheduler_type", "warmup_steps", "warmup_ratio", "max_steps",
                     "num_train_epochs", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm")


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
                      "trainer_state": {**asdict(trainer.state), "method": trainer.method,
                                        "global_batch": global_batch(trainer),
                                        "hyperparameters": json.dumps(hyperparameters(trainer))},
                      f"rng_rank{rank}": _rng_state()},
                     folder, tokenizer=trainer.tokenizer, parallel_config=trainer.parallel_config)
        if is_main_process():
            write_run_id(folder, trainer.state.run_id)
        if trainer.args.save_total_limit and is_main_process():
            for old in own_checkpoints(output_dir, trainer.state.run_id)[:-trainer.args.save_total_limit]:
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
            {**asdict(trainer.state), "method": trainer.method, **hyperparameters(trainer)}, indent=2) + "\n")
    if trainer.args.save_total_limit:
        for old in own_checkpoints(output_dir, trainer.state.run_id)[:-trainer.args.save_total_limit]:
            shutil.rmtree(old)
    return folder


def own_checkpoints(output_dir: Path, run_id: str) -> list[Path]:
    """The checkpoint-<step> folders of output_dir written by run `run_id`, oldest first (what
    save_total_limit may prune: never another run's)."""
    return [p for p in list_checkpoints(output_dir) if checkpoint_run_id(p) == run_id]


def find_checkpoint(trainer, resume: str | os.PathLike) -> Path:
    """The checkpoint folder `resume` names: a checkpoint-<step> folder, or "latest" in output_dir."""
    return resume_candidates(trainer, resume)[0]


def resume_candidates(trainer, resume: str | os.PathLike) -> list[Path]:
    """The checkpoints to try, best first: [the folder `resume` names], or for "latest" the run's own
    checkpoint-<step> folders in output_dir, newest first (a corrupt one falls back to the one before).

    Checkpoints of another run (another run id than output_dir/run.json) are never picked.

    Raises:
        CheckpointError: no such checkpoint.
    """
    if str(resume) in ("latest", "True", "true"):
        output_dir = Path(trainer.args.output_dir)
        run_id = read_run_id(output_dir)
        found, foreign = [], []
        for folder in reversed(list_checkpoints(output_dir)):
            owner = checkpoint_run_id(folder)
            (foreign if run_id is not None and owner is not None and owner != run_id else found).append(folder)
        if foreign:
            warnings.warn(f"ignoring {', '.join(p.name for p in foreign)} in {output_dir}: written by another run "
                          f"than {output_dir / RUN_NAME} records", stacklevel=3)
        if not found:
            raise CheckpointError(f"resume_from_checkpoint='latest': no checkpoint-<step> folder of this run in "
                                  f"{output_dir}")
        return found
    path = Path(resume)
    if not (path / STATE_NAME).is_file() and not is_sharded_checkpoint(path):
        raise CheckpointError(f"{path}: not a training checkpoint (no {STATE_NAME})")
    return [path]


def checkpoint_run_id(folder: Path) -> str | None:
    """The run id a checkpoint records (None for one written before run ids, or unreadable)."""
    for name in (STATE_NAME, RUN_NAME):
        try:
            value = json.loads((folder / name).read_text(encoding="utf-8")).get("run_id")
        except (OSError, ValueError, AttributeError):
            continue
        if value:
            return value
    return None


def read_run_id(output_dir: Path) -> str | None:
    """The run id in output_dir/run.json, or None."""
    try:
        return json.loads((Path(output_dir) / RUN_NAME).read_text(encoding="utf-8")).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def write_run_id(output_dir: Path, run_id: str) -> None:
    """Record the run that owns output_dir (output_dir/run.json)."""
    atomic_write_text(Path(output_dir) / RUN_NAME, json.dumps({"run_id": run_id}) + "\n")


def run_contents(output_dir: Path) -> list[Path]:
    """What earlier runs wrote into output_dir: checkpoint-<step>/ folders and RUN_FILES."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    return list_checkpoints(output_dir) + [output_dir / name for name in RUN_FILES if (output_dir / name).exists()]


def prepare_run_folder(output_dir: str | os.PathLike, resume, overwrite: bool) -> None:
    """Refuse to start a new run in a folder that holds another run, unless told to resume or overwrite.

    A folder holds a run if it has a checkpoint-<step>/ or final/. With `overwrite`, what earlier runs
    wrote (checkpoint-<step>/, final/, logs, run.json, ...) is removed; so are the logs of a run that
    left nothing to resume. Other files in the folder are never touched.

    Args:
        output_dir: trainer.output_dir.
        resume: the resume_from_checkpoint setting (a run that resumes may use its folder).
        overwrite: trainer.overwrite_output_dir.

    Raises:
        TrainerError: the folder holds a run and neither resume nor overwrite is set.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise TrainerError(f"trainer.output_dir {output_dir} is a file; expected a folder")
    # A run that left no checkpoint and no final/ (killed early) has nothing to resume: its files go.
    holds_run = bool(list_checkpoints(output_dir)) or (output_dir / "final").exists()
    if resume:
        theirs, ours = read_run_id(output_dir), None
        if str(resume) not in ("latest", "True", "true"):
            ours = checkpoint_run_id(Path(resume))
        if holds_run and theirs and ours and theirs != ours:
            raise TrainerError(f"trainer.output_dir {output_dir} holds another run than the checkpoint {resume} "
                               f"(see {RUN_NAME}); resume into that checkpoint's own folder or a new one")
        return
    contents = run_contents(output_dir)
    if overwrite or not holds_run:
        for path in contents:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        return
    state = "a finished run (final/)" if (output_dir / "final").exists() else "a run"
    shown = ", ".join(p.name for p in contents[:4]) + (", ..." if len(contents) > 4 else "")
    raise TrainerError(f"trainer.output_dir {output_dir} already holds {state} ({shown}); continue it with "
                       f"--set trainer.resume_from_checkpoint=latest, start over with --set "
                       f"trainer.overwrite_output_dir=true (deletes its checkpoints, logs and final/), or choose "
                       f"another --output-dir")


def remove_unfinished_run(output_dir: str | os.PathLike, existed: bool) -> None:
    """After a failed run: if it left nothing to resume (no checkpoint, no final/), remove what it wrote
    (and the folder, if the run created it and it is now empty), so the folder does not look like a run."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir() or list_checkpoints(output_dir) or (output_dir / "final").exists():
        return
    for path in run_contents(output_dir):
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    if not existed and not any(output_dir.iterdir()):
        output_dir.rmdir()


def hyperparameters(trainer) -> dict[str, Any]:
    """The settings a checkpoint records, to check a resume against (FIXED_ON_RESUME + APPLIED_ON_RESUME)."""
    values = {key: getattr(trainer.args, key) for key in FIXED_ON_RESUME + APPLIED_ON_RESUME}
    path = getattr(trainer.train_dataset, "path", None) or getattr(trainer.train_dataset, "folder", None)
    values["train_data"] = os.path.abspath(path) if path else None
    values["dataset_rows"] = len(trainer.train_dataset)
    return values


def check_resume(trainer, folder: Path, recorded: dict[str, Any]) -> dict[str, list]:
    """Compare this run's settings with those `folder` was written with.

    Returns:
        {setting: [old, new]} for the APPLIED_ON_RESUME settings that changed (the caller applies them).

    Raises:
        TrainerError: a FIXED_ON_RESUME setting, the data file or its row count changed.
    """
    ours = hyperparameters(trainer)
    for key in FIXED_ON_RESUME:
        if key in recorded and recorded[key] != ours[key]:
            raise TrainerError(f"resuming {folder}: trainer.{key} = {ours[key]!r} but the checkpoint was written "
                               f"with {recorded[key]!r}, which its data position and batches depend on; resume "
                               f"with {key} = {recorded[key]!r}, or start a new run")
    if "dataset_rows" in recorded and recorded["dataset_rows"] != ours["dataset_rows"]:
        raise TrainerError(f"resuming {folder}: the training data has {ours['dataset_rows']} rows but the checkpoint "
                           f"was trained on {recorded['dataset_rows']}; resume with the same data, or start a new run")
    if recorded.get("train_data") and ours["train_data"] and Path(recorded["train_data"]) != Path(ours["train_data"]):
        raise TrainerError(f"resuming {folder}: data.train_data = {ours['train_data']} but the checkpoint was "
                           f"trained on {recorded['train_data']}; resume with the same data, or start a new run "
                           f"(--load-checkpoint on its weights)")
    return {key: [recorded[key], ours[key]] for key in APPLIED_ON_RESUME
            if key in recorded and recorded[key] != ours[key]}


def apply_schedule(trainer, lr_lambda) -> None:
    """After a resume: this run's learning rate, schedule and AdamW settings from the restored step on.

    The restored optimizer carries the old run's lr / betas / eps / weight decay and the scheduler its
    base learning rate; here they take this run's values, and the lr of the next step is this run's
    schedule at the restored step (so a longer max_steps continues the decay instead of stepping at lr 0).
    """
    args = trainer.args
    step = trainer.scheduler.last_epoch
    trainer.scheduler.base_lrs = [args.learning_rate for _ in trainer.optimizer.param_groups]
    trainer.scheduler.lr_lambdas = [lr_lambda for _ in trainer.optimizer.param_groups]
    for i, group in enumerate(trainer.optimizer.param_groups):
        group["initial_lr"] = args.learning_rate
        group["lr"] = args.learning_rate * lr_lambda(step)
        group["betas"] = (args.adam_beta1, args.adam_beta2)
        group["eps"] = args.adam_epsilon
        if i == 0:  # the decay group (see Trainer._build_optimizer)
            group["weight_decay"] = args.weight_decay
    trainer.scheduler._last_lr = [group["lr"] for group in trainer.optimizer.param_groups]


def load_resume_checkpoint(trainer, resume) -> tuple[Path, dict[str, list]]:
    """Restore the checkpoint `resume` names; for "latest", a corrupt newest checkpoint falls back to the
    one before it, with a warning.

    Returns:
        (the folder restored, {setting: [old, new]} of the settings that changed, see check_resume).

    Raises:
        CheckpointError: no usable checkpoint. TrainerError: a setting the checkpoint fixes changed.
    """
    candidates = resume_candidates(trainer, resume)
    for i, folder in enumerate(candidates):
        try:
            return folder, load_checkpoint(trainer, folder)
        except CheckpointError as e:
            if i + 1 == len(candidates):
                raise
            warnings.warn(f"{folder} cannot be restored ({e}); falling back to {candidates[i + 1].name}", stacklevel=3)
    raise AssertionError("unreachable")


def estimate_checkpoint_bytes(trainer) -> int:
    """Disk space of one checkpoint plus final/: the trained weights twice and AdamW's two moments."""
    trained = sum(p.numel() * p.dtype.itemsize for _, p in trainer._trainable())
    return 4 * trained


def global_batch(trainer) -> int:
    """Rows per optimizer step over all data-parallel ranks."""
    return (trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps
            * data_parallel_rank_and_size(trainer.mesh)[1])


def _load_sharded_checkpoint(trainer, folder: Path) -> dict[str, list]:
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
    if state.get("global_batch") != global_batch(trainer):
        raise TrainerError(f"resuming {folder}: {global_batch(trainer)} rows per optimizer step (per-device batch x "
                           f"accumulation x data parallel) but the checkpoint was written with "
                           f"{state.get('global_batch')}; resume with the same global batch, or start a new run")
    recorded = json.loads(state["hyperparameters"]) if isinstance(state.get("hyperparameters"), str) else {}
    # the per-device batch and accumulation may change with the world size (the global batch is checked above)
    recorded = {k: v for k, v in recorded.items()
                if k not in ("per_device_train_batch_size", "gradient_accumulation_steps")}
    changes = check_resume(trainer, folder, recorded)
    sched = dict(request["scheduler"])
    sched["lr_lambdas"] = [None] * len(trainer.optimizer.param_groups)
    trainer.scheduler.load_state_dict(sched)
    if f"rng_rank{rank}" in request:
        _set_rng_state(request[f"rng_rank{rank}"])
    trainer.state = TrainerState(**{k: state[k] for k in asdict(TrainerState()) if k in state})
    _convert_position(trainer)
    return changes


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


def load_checkpoint(trainer, folder: Path) -> dict[str, list]:
    """Restore weights, optimizer, scheduler, RNG and data position from a local or sharded checkpoint.

    Returns:
        {setting: [old, new]} for the settings this run changes and applies from here (see check_resume).

    Raises:
        CheckpointError: a missing, truncated or corrupt file (the message names it).
        TrainerError: another method, a setting the checkpoint fixes changed, or a one-process checkpoint
            for pipeline stages.
    """
    if is_sharded_checkpoint(folder):
        return _load_sharded_checkpoint(trainer, folder)
    if getattr(trainer, "pipeline", None) is not None:
        raise TrainerError(f"{folder} was written by one process (not a sharded checkpoint): resume it on one "
                           f"process, or with a layout without parallel.pipeline_stage; pipeline stages resume "
                           f"the sharded checkpoints of runs under torchrun")
    try:
        state = json.loads((folder / STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder / STATE_NAME}: cannot read the trainer state ({e})") from None
    if state.get("method") != trainer.method:
        raise TrainerError(f"{folder} was written by a {state.get('method')!r} run; this run's method is "
                           f"{trainer.method!r}")
    changes = check_resume(trainer, folder, state)
    base = unwrap_model(trainer.model)
    if trainer.method == "full":
        copy_weights(base, folder)
    elif trainer.method == "lora":
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = folder / ADAPTER_WEIGHTS_NAME
        try:
            tensors = load_file(weights)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
            raise CheckpointError(f"{weights} is missing, truncated or corrupt ({e})") from None
        result = set_peft_model_state_dict(trainer.model, tensors)
        if getattr(result, "unexpected_keys", None):
            raise CheckpointError(f"{folder}: adapter tensors not in this model: {result.unexpected_keys[:5]}")
    else:
        load_ptuning_state(base, folder)
    trainer.optimizer.load_state_dict(_load_pt(folder / "optimizer.pt", map_location=trainer.device))
    trainer.scheduler.load_state_dict(_load_pt(folder / "scheduler.pt"))
    if trainer.scaler is not None and (folder / "scaler.pt").is_file():
        trainer.scaler.load_state_dict(_load_pt(folder / "scaler.pt"))
    _set_rng_state(_load_pt(folder / "rng_state.pt"))
    trainer.state = TrainerState(**{k: state[k] for k in asdict(TrainerState()) if k in state})
    return changes


def _load_pt(path: Path, **kwargs) -> Any:
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except Exception as e:  # noqa: BLE001 - unpickling and zip errors come in many types
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise CheckpointError(f"{path} is truncated or corrupt ({reason[:200]})") from None


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
