"""The trainer's plain records (its state in a checkpoint, what `train` returns) and the method names; the
settings dataclasses of a recipe live in glm6b.config."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Method = Literal["full", "lora", "ptuning"]
METHODS = ("full", "lora", "ptuning")


@dataclass
class TrainerState:
    """What a checkpoint must carry besides tensors (saved as trainer_state.json).

    Attributes:
        global_step: optimizer steps done.
        micro_batches: micro-batches consumed from the data stream (epoch * batches_per_epoch + index).
        epoch, batch_index: the same position as (epoch, batch within the epoch).
        losses: training loss of every optimizer step so far (see TrainingArguments.loss_normalization).
        log_history: the train_log.jsonl records so far.
        run_id: identifies the run; kept across resumes.
    """

    global_step: int = 0
    micro_batches: int = 0
    epoch: int = 0
    batch_index: int = 0
    losses: list[float] = field(default_factory=list)
    rows_per_micro_batch: int = 0  # global rows per micro-batch (per-device batch x data parallel)
    log_history: list[dict[str, Any]] = field(default_factory=list)
    run_id: str = ""  # the run that wrote the state (output_dir/run.json); `latest` resumes only its checkpoints


@dataclass
class TrainOutput:
    """What `train` returns: steps done, per-step losses, where the result is, the last log record."""

    global_step: int
    losses: list[float]
    output_dir: Path
    final_dir: Path
    metrics: dict[str, Any]
