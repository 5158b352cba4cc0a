"""What training writes for people: train_log.jsonl, eval_log.jsonl, TensorBoard scalars and loss.png."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

from ..extras import import_extra
from ..io import atomic_path, atomic_write_text

LOG_NAME = "train_log.jsonl"
EVAL_LOG_NAME = "eval_log.jsonl"


class NullLog:
    """What ranks other than 0 log: nothing."""

    eval_path = Path(os.devnull) / "none"

    def write(self, record: dict[str, Any], eval_record: bool = False) -> None:
        pass

    def close(self) -> None:
        pass


class TrainLog:
    """train_log.jsonl (append + flush), eval_log.jsonl and TensorBoard scalars."""

    def __init__(self, output_dir: Path, tensorboard: bool, resume_step: int | None):
        self.path = output_dir / LOG_NAME
        self.eval_path = output_dir / EVAL_LOG_NAME
        if resume_step is not None:  # drop what a killed run logged after the checkpoint it resumes
            for path in (self.path, self.eval_path):
                if path.is_file():
                    kept = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                            if _logged_step(line) <= resume_step]
                    atomic_write_text(path, "".join(kept))
        else:
            for path in (self.path, self.eval_path):
                path.unlink(missing_ok=True)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError as e:
                warnings.warn(f"TensorBoard logging skipped ({e}); install tensorboard to get it", stacklevel=3)

    def write(self, record: dict[str, Any], eval_record: bool = False) -> None:
        with open(self.eval_path if eval_record else self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self.writer is not None:
            prefix = "eval" if eval_record else "train"
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.writer.add_scalar(f"{prefix}/{key}", value, record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _logged_step(line: str) -> float:
    """The step of a log line; a line cut short by a kill counts as after every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def plot_losses(losses: list[float], path: str | os.PathLike, log_history: list[dict[str, Any]] | None = None,
                eval_history: list[dict[str, Any]] | None = None) -> None:
    """Write the loss curve as a PNG (matplotlib, Agg backend), atomically.

    Args:
        losses: the loss of each optimizer step (step i + 1).
        path: the PNG file.
        log_history: logged records ("step", "loss"), drawn as the smoothed curve.
        eval_history: evaluation records ("step", "eval_loss").
    """
    matplotlib = import_extra("matplotlib", "train", "the loss plot (loss.png)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = list(range(1, len(losses) + 1))
    ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="step loss")
    if log_history:
        ax.plot([r["step"] for r in log_history], [r["loss"] for r in log_history], color="tab:blue",
                linewidth=2, label="logged loss (mean since last log)")
    if eval_history:
        ax.plot([r["step"] for r in eval_history], [r["eval_loss"] for r in eval_history], "o-",
                color="tab:orange", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            fig.savefig(f, format="png")
    plt.close(fig)
