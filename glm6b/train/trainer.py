"""Fine-tuning on one machine: full-parameter, LoRA (PEFT) and P-tuning v2, with checkpoints that resume exactly.

    trainer = Trainer(model=model, tokenizer=tok, args=TrainingArguments(output_dir="out", max_steps=100),
                      train_dataset=load_dataset("train.json", tok, DataConfig()), method="lora")
    trainer.train()

The loop reads top-down: `train` prepares the model for the method (freeze, LoRA wrap, gradient
checkpointing), builds AdamW over the trainable parameters only and the LR schedule, then runs
optimizer steps of `gradient_accumulation_steps` micro-batches each. The data is one stream of
micro-batches across epochs; epoch e visits the rows in the order `randperm(n, seed + e)`, so a
position (epoch, batch index) is all a checkpoint needs to continue the stream.

Output folder layout (`args.output_dir`):

    checkpoint-<step>/   every save_steps: weights (full: an HF folder; lora: the PEFT adapter;
                         ptuning: the THUDM prefix-encoder folder), optimizer.pt, scheduler.pt,
                         rng_state.pt, trainer_state.json. Written as checkpoint-<step>.tmp, then renamed.
    final/               at the end: full -> HF folder (config.json, model.safetensors, tokenizer) that
                         glm6b.load_model reads; lora -> adapter_config.json + adapter_model.safetensors
                         (+ tokenizer); ptuning -> pytorch_model.bin + config.json (THUDM layout).
    train_log.jsonl      one line per logging step: step, epoch, loss, lr, grad_norm, tokens_per_s, ...
    eval_log.jsonl       one line per evaluation: step, eval_loss, eval_tokens (+ bleu-4, rouge-1/2/l).
    tensorboard/         the same scalars (skipped with a warning if tensorboard is not installed).
    loss.png             the loss curve, written at the end.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ..checkpoint.hf import (CheckpointError, PREFIX_ENCODER, iter_checkpoint_tensors,
                         iter_file_tensors, load_model, load_ptuning_state, save_pretrained, save_ptuning_checkpoint)
from ..config import ChatGLMConfig
from ..io import atomic_path, atomic_write_text
from .data import IGNORE_INDEX, DataConfig, RowDataset, load_dataset, render_prompt
from ..inference.generation import GenerationConfig
from .lora import ADAPTER_WEIGHTS_NAME, LoraArguments, apply_lora, is_adapter_folder, load_adapter
from ..model import ChatGLMForConditionalGeneration
from ..tokenizer import load_tokenizer

Method = Literal["full", "lora", "ptuning"]
METHODS = ("full", "lora", "ptuning")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
LOG_NAME = "train_log.jsonl"
EVAL_LOG_NAME = "eval_log.jsonl"
STATE_NAME = "trainer_state.json"
FINAL_NAME = "final"


class TrainerError(ValueError):
    """A training setup that cannot work; the message names the setting."""


@dataclass
class ModelArguments:
    """Which model to train or run (the `model:` section of a recipe).

    Attributes:
        load_checkpoint: HF-layout model folder (THUDM/chatglm-6b files, or a previous full
            fine-tuning output). None builds a randomly initialised model from `preset`.
        preset: ChatGLMConfig preset name for random initialisation ("tiny", "small", "glm_6b", ...).
        tokenizer: tokenizer folder; None means load_checkpoint.
        dtype: parameter dtype: float32, bfloat16 or float16. None: float32 for full fine-tuning,
            bfloat16 for the frozen base of LoRA / P-tuning (their trainable weights stay float32).
        device: cpu, cuda, cuda:1, ...; None: cuda if available, else cpu.
        pre_seq_len: P-tuning v2 prefix length (needed for method ptuning).
        prefix_projection: P-tuning v2 MLP re-parameterisation of the prefix.
        ptuning_checkpoint: trained prefix encoder to load (THUDM P-tuning folder or file).
        adapter: trained LoRA adapter folder to load (PEFT format).
        quantize: "int8" or "int4": weight-only quantize the base at load (eval and predict only).
    """

    load_checkpoint: str | None = None
    preset: str | None = None
    tokenizer: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    device: str | None = None
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    ptuning_checkpoint: str | None = None
    adapter: str | None = None
    quantize: Literal["int8", "int4"] | None = None


@dataclass
class TrainingArguments:
    """How to train (the `trainer:` section of a recipe). Defaults follow HF's TrainingArguments.

    Attributes:
        output_dir: where checkpoints, logs and the final result go.
        num_train_epochs: passes over the data (used when max_steps is None).
        max_steps: optimizer steps to run; overrides num_train_epochs.
        per_device_train_batch_size: rows per micro-batch (alias: `batch_size`).
        per_device_eval_batch_size: rows per evaluation batch.
        gradient_accumulation_steps: micro-batches per optimizer step.
        learning_rate: peak learning rate.
        lr_scheduler_type: "linear" (decay to 0), "cosine" (to 0) or "constant", after warmup.
        warmup_steps: linear warmup steps; if 0, warmup_ratio * total steps.
        warmup_ratio: warmup as a fraction of the total steps.
        weight_decay: AdamW decoupled weight decay, on matrices only (not biases or LayerNorms).
        adam_beta1, adam_beta2, adam_epsilon: AdamW settings.
        max_grad_norm: clip the gradient norm to this (0 disables clipping; the norm is logged anyway).
        seed: seeds python, numpy and torch, and the shuffle order (seed + epoch).
        bf16: bfloat16 autocast (CPU or CUDA).
        fp16: float16 autocast with a gradient scaler (CUDA only).
        gradient_checkpointing: recompute each block in backward instead of storing its activations.
        logging_steps: write a train_log.jsonl line every this many steps.
        eval_steps: evaluate every this many steps (None: only when evaluate() is called).
        eval_generation_samples: evaluate() also generates (greedy, max_target_length new tokens) for
            the first N evaluation examples with an answer and scores BLEU-4 / ROUGE-1/2/L with
            glm6b.eval.evaluate.evaluate_generation (None or 0: the loss only).
        save_steps: write checkpoint-<step>/ every this many steps (None: no intermediate checkpoints).
        save_total_limit: keep only the last N checkpoints (None keeps all).
        resume_from_checkpoint: a checkpoint folder, or "latest" for the newest one in output_dir.
        shuffle: shuffle the training rows every epoch.
        dataloader_num_workers: worker processes for batching (0: in the training process).
        tensorboard: also log to output_dir/tensorboard.
        disable_tqdm: no progress bar.
    """

    output_dir: str = "output"
    num_train_epochs: float = 3.0
    max_steps: int | None = None
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 42
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    logging_steps: int = 10
    eval_steps: int | None = None
    eval_generation_samples: int | None = 64
    save_steps: int | None = 500
    save_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    shuffle: bool = True
    dataloader_num_workers: int = 0
    tensorboard: bool = True
    disable_tqdm: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise TrainerError(f"trainer: {message}")

        need(self.max_steps is None or self.max_steps > 0, f"max_steps={self.max_steps} must be positive")
        need(self.num_train_epochs > 0, f"num_train_epochs={self.num_train_epochs} must be positive")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps"):
            need(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be at least 1")
        for name in ("eval_steps", "save_steps", "save_total_limit"):
            need(getattr(self, name) is None or getattr(self, name) >= 1,
                 f"{name}={getattr(self, name)} must be at least 1 (or null)")
        need(self.lr_scheduler_type in ("linear", "cosine", "constant"),
             f"lr_scheduler_type={self.lr_scheduler_type!r}: expected linear, cosine or constant")
        need(0.0 <= self.warmup_ratio < 1.0, f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        need(self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0")
        need(not (self.bf16 and self.fp16), "bf16 and fp16 are exclusive")
        need(self.eval_generation_samples is None or self.eval_generation_samples >= 0,
             f"eval_generation_samples={self.eval_generation_samples} must be >= 0 (or null)")
        need(self.learning_rate >= 0, f"learning_rate={self.learning_rate} must be >= 0")

    @property
    def batch_size(self) -> int:
        """Alias of per_device_train_batch_size."""
        return self.per_device_train_batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self.per_device_train_batch_size = value


@dataclass
class TrainerState:
    """What a checkpoint must carry besides tensors (saved as trainer_state.json).

    Attributes:
        global_step: optimizer steps done.
        micro_batches: micro-batches consumed from the data stream (epoch * batches_per_epoch + index).
        epoch, batch_index: the same position as (epoch, batch within the epoch).
        losses: training loss of every optimizer step so far (mean over its micro-batches).
        log_history: the train_log.jsonl records so far.
    """

    global_step: int = 0
    micro_batches: int = 0
    epoch: int = 0
    batch_index: int = 0
    losses: list[float] = field(default_factory=list)
    rows_per_micro_batch: int = 0  # global rows per micro-batch (per-device batch x data parallel)
    log_history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TrainOutput:
    """What `train` returns: steps done, per-step losses, where the result is, the last log record."""

    global_step: int
    losses: list[float]
    output_dir: Path
    final_dir: Path
    metrics: dict[str, Any]


def set_seed(seed: int) -> None:
    """Seed python's random, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def unwrap_model(model: nn.Module) -> ChatGLMForConditionalGeneration:
    """The ChatGLM model under DDP and PEFT wrappers (LoRA layers are injected in place), or `model` itself."""
    from .distributed import unwrap_parallel

    model = unwrap_parallel(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The model's shifted cross entropy (spec 4.10), kept in float32.

    The model returns its loss cast to the activation dtype; under bf16 that rounds the logged loss
    to 3 significant digits, so the trainer computes the same mean itself and keeps float32.

    Args:
        logits: [B, T, V]; position t predicts labels[t + 1].
        labels: [B, T], -100 ignored.

    Returns:
        The scalar float32 loss.
    """
    shift_logits = logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                             labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)


def enable_input_require_grads(model: nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Make the input embeddings' output require grad (HF's `enable_input_require_grads`).

    With a frozen base, the hidden states entering the first checkpointed block would not require
    grad, and a checkpointed block whose inputs need no grad produces no gradients for the adapters
    or prefix inside it (reentrant checkpointing). The hook costs nothing else.

    Returns:
        The hook handle.
    """
    return unwrap_model(model).get_input_embeddings().register_forward_hook(
        lambda module, inputs, output: output.requires_grad_(True))


def _checkpoint_kind(path: Path) -> str:
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


def _lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))

    return factor


class _NullLog:
    """What ranks other than 0 log: nothing."""

    eval_path = Path(os.devnull) / "none"

    def write(self, record: dict[str, Any], eval_record: bool = False) -> None:
        pass

    def close(self) -> None:
        pass


class _Log:
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
    import matplotlib

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


class Trainer:
    """Train, fine-tune, evaluate and run a ChatGLM-6B model on one machine.

    Args:
        task: "text_generation" (the only task).
        model: a ChatGLMForConditionalGeneration (or a PeftModel for LoRA). None builds it from
            `model_args` when training starts, or from the folder given to `finetune`.
        tokenizer: a ChatGLMTokenizer; None loads it with the model.
        args: TrainingArguments.
        train_dataset, eval_dataset: RowDatasets in "train" mode (teacher-forced rows), or paths of
            jsonl files / preprocessed folders (encoded with `data_config`).
        method: "full", "lora" or "ptuning".
        lora_config: LoraArguments (method lora).
        model_args: ModelArguments used when the trainer builds the model itself.
        data_config: DataConfig for datasets given as paths and for `predict` (max_source_length).
        generation_config: default settings for `predict` (greedy, max_target_length new tokens if None).
        callbacks: functions called as callback(trainer, record) after every optimizer step (and its
            checkpoint), record holding at least "step" and "loss".
        parallel_config: glm6b.train.distributed.ParallelConfig for runs under torchrun (data / tensor
            parallel, FSDP2); the default is one process.
    """

    def __init__(
        self,
        task: str = "text_generation",
        model: nn.Module | None = None,
        tokenizer=None,
        args: TrainingArguments | None = None,
        train_dataset: RowDataset | str | os.PathLike | None = None,
        eval_dataset: RowDataset | str | os.PathLike | None = None,
        method: Method = "full",
        lora_config: LoraArguments | None = None,
        model_args: ModelArguments | None = None,
        data_config: DataConfig | None = None,
        generation_config: GenerationConfig | None = None,
        callbacks: list[Callable[["Trainer", dict[str, Any]], None]] | None = None,
        parallel_config=None,
    ):
        if task != "text_generation":
            raise TrainerError(f"task={task!r}: only 'text_generation' is supported")
        if method not in METHODS:
            raise TrainerError(f"method={method!r}: expected one of {', '.join(METHODS)}")
        self.task = task
        self.model = model
        self.tokenizer = tokenizer
        self.args = args or TrainingArguments()
        self.method = method
        self.lora_config = lora_config or LoraArguments()
        self.model_args = model_args or ModelArguments()
        self.data_config = data_config or DataConfig()
        self.generation_config = generation_config
        self.callbacks = list(callbacks or [])
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.state = TrainerState()
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self._prepared = False
        self._hook = None
        from .distributed import ParallelConfig

        self.parallel_config = parallel_config or ParallelConfig()
        self._mesh = None

    # ------------------------------------------------------------------------------ model

    @property
    def device(self) -> torch.device:
        return unwrap_model(self.model).device

    def _resolve_dtype(self) -> str:
        if self.model_args.dtype is not None:
            return self.model_args.dtype
        return "float32" if self.method == "full" else "bfloat16"

    def _resolve_device(self) -> str:
        return self.model_args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    def _build_model(self) -> None:
        """Load (or randomly initialise) the model described by model_args, with its adapter if any."""
        margs = self.model_args
        dtype, device = self._resolve_dtype(), self._resolve_device()
        pre_seq_len = margs.pre_seq_len if self.method == "ptuning" or margs.ptuning_checkpoint else None
        if margs.load_checkpoint is not None:
            self.model = load_model(margs.load_checkpoint, dtype=dtype, device=device,
                                    ptuning_checkpoint=margs.ptuning_checkpoint, pre_seq_len=pre_seq_len,
                                    prefix_projection=margs.prefix_projection if pre_seq_len else None,
                                    quantize=margs.quantize)
        elif margs.preset is not None:
            config = ChatGLMConfig.from_name(margs.preset, pre_seq_len=pre_seq_len,
                                             prefix_projection=bool(pre_seq_len and margs.prefix_projection))
            model = ChatGLMForConditionalGeneration(config, dtype=getattr(torch, dtype), device="meta")
            model.to_empty(device=device)
            model.tie_weights()  # to_empty makes new tensors: tie them again
            model.init_weights()
            if config.pre_seq_len:
                model.transformer.prefix_encoder.float()
                if margs.ptuning_checkpoint:
                    load_ptuning_state(model, margs.ptuning_checkpoint)
            self.model = model
        else:
            raise TrainerError("no model: pass model=..., set model.load_checkpoint (a model folder) or "
                               "model.preset (random initialisation), or call finetune(checkpoint)")
        if margs.adapter is not None:
            self.model = load_adapter(self.model, margs.adapter, is_trainable=self.method == "lora")

    def ensure_model(self) -> None:
        """Build the model and load the tokenizer from model_args if they were not given."""
        if self.model is None:
            self._build_model()
        if self.tokenizer is None:
            source = self.model_args.tokenizer or self.model_args.load_checkpoint
            if source is None:
                raise TrainerError("no tokenizer: pass tokenizer=... or set model.tokenizer (a folder with "
                                   "ice_text.model)")
            self.tokenizer = load_tokenizer(source)

    def _prepare_for_training(self) -> None:
        """Freeze / wrap the model for the method, enable gradient checkpointing, set train mode."""
        if self._prepared:
            return
        self.ensure_model()
        base = unwrap_model(self.model)
        is_peft = base is not self.model
        if self.method == "full":
            if is_peft:
                raise TrainerError("method 'full' got a LoRA (PEFT) model; use method 'lora' or merge it first")
            if base.config.pre_seq_len:
                raise TrainerError("method 'full' got a model with a P-tuning prefix (pre_seq_len set); "
                                   "use method 'ptuning'")
            for p in base.parameters():
                p.requires_grad_(True)
        elif self.method == "ptuning":
            if not base.config.pre_seq_len:
                raise TrainerError("method 'ptuning' needs a model built with pre_seq_len (set model.pre_seq_len)")
            for name, p in base.named_parameters():
                p.requires_grad_(name.startswith(PREFIX_ENCODER))
            base.transformer.prefix_encoder.float()  # trained in float32 whatever the base dtype
        else:
            if base.config.pre_seq_len:
                raise TrainerError("method 'lora' got a model with a P-tuning prefix (pre_seq_len set)")
            if not is_peft:
                self.model = apply_lora(self.model, self.lora_config, self.model_args.load_checkpoint)
        if self.args.gradient_checkpointing:
            base.gradient_checkpointing_enable()
            if not base.get_input_embeddings().weight.requires_grad and self._hook is None:
                self._hook = enable_input_require_grads(base)
        self.model.train()
        self._prepared = True

    def _trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------ data

    def _dataset(self, dataset, mode: str = "train") -> RowDataset | None:
        if dataset is None or isinstance(dataset, RowDataset):
            return dataset
        self.ensure_model()
        return load_dataset(dataset, self.tokenizer, self.data_config, mode)

    def _micro_batches(self, dataset: RowDataset, start: int) -> Iterator[dict[str, torch.Tensor]]:
        """Yield batches forever, starting at micro-batch `start` of the stream (epoch after epoch)."""
        from .distributed import data_parallel_rank_and_size, data_parallel_shard

        dp = data_parallel_rank_and_size(self._mesh)[1]
        bs = self.args.per_device_train_batch_size * dp
        per_epoch = self._batches_per_epoch(len(dataset))
        epoch, index = divmod(start, per_epoch)
        while True:
            if self.args.shuffle:
                order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.args.seed + epoch))
            else:
                order = torch.arange(len(dataset))
            batches = [data_parallel_shard(order[i:i + bs].tolist(), self._mesh) for i in range(0, len(dataset), bs)
                       if len(order[i:i + bs]) >= dp][:per_epoch]
            # A private generator: creating the loader's iterator must not draw from the global RNG,
            # which dropout uses (a resumed run creates its loader at a different point).
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches[index:], collate_fn=dataset.collate,
                                                 num_workers=self.args.dataloader_num_workers,
                                                 generator=torch.Generator().manual_seed(self.args.seed + epoch))
            yield from loader
            epoch, index = epoch + 1, 0

    def _batches_per_epoch(self, rows: int) -> int:
        """Global micro-batches per epoch (a last batch with fewer rows than data-parallel ranks is dropped)."""
        from .distributed import data_parallel_rank_and_size

        dp = data_parallel_rank_and_size(self._mesh)[1]
        bs = self.args.per_device_train_batch_size * dp
        return rows // bs + (1 if rows % bs >= dp else 0)

    def _autocast(self):
        if not (self.args.bf16 or self.args.fp16) or (self._mesh is not None and self.parallel_config.optimizer_shard):
            # under FSDP2 its mixed-precision policy casts (see parallelize_model)
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.args.bf16 else torch.float16)

    # ------------------------------------------------------------------------------ train

    def finetune(self, checkpoint: str | os.PathLike, resume_from_checkpoint: str | None = None) -> TrainOutput:
        """Load weights from `checkpoint`, then `train`.

        `checkpoint` may be an HF model folder (the base weights, or a previous full fine-tuning
        output), a PEFT adapter folder (method lora: continues training that adapter; the base comes
        from model.load_checkpoint or the adapter's base_model_name_or_path) or a THUDM P-tuning
        folder (method ptuning: continues training that prefix; base from model.load_checkpoint).

        Args:
            checkpoint: the folder.
            resume_from_checkpoint: as in `train`.

        Returns:
            The TrainOutput of `train`.

        Raises:
            TrainerError, CheckpointError: unusable folder, or a folder that does not fit the method.
        """
        path = Path(checkpoint)
        if not path.is_dir():
            raise CheckpointError(f"fine-tuning checkpoint {path} is not a folder")
        kind = _checkpoint_kind(path)
        if kind != "full" and kind != self.method:
            raise TrainerError(f"{path} is a {kind} checkpoint but the method is {self.method!r}")
        margs = self.model_args
        if self.model is not None:
            base = unwrap_model(self.model)
            if kind == "full":
                _copy_weights(base, path)
            elif kind == "lora":
                self.model = load_adapter(base, path, is_trainable=True)
            else:
                load_ptuning_state(base, path)
            return self.train(resume_from_checkpoint)
        if kind != "full" and (margs.load_checkpoint is None or Path(margs.load_checkpoint) == path):
            # the base model: model.load_checkpoint, else what the adapter recorded
            margs.load_checkpoint = None
            if kind == "lora":
                config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
                margs.load_checkpoint = config.get("base_model_name_or_path")
            if not margs.load_checkpoint:
                raise TrainerError(f"{path} holds {kind} weights only: set model.load_checkpoint to the base model")
        if kind == "full":
            margs.load_checkpoint = str(path)
        elif kind == "lora":
            margs.adapter = str(path)
        else:
            margs.ptuning_checkpoint = str(path)
        self._build_model()
        return self.train(resume_from_checkpoint)

    def train(self, resume_from_checkpoint: str | os.PathLike | None = None) -> TrainOutput:
        """Run the training loop (see the module docstring for what it writes).

        Args:
            resume_from_checkpoint: a checkpoint-<step> folder or "latest"; None takes
                args.resume_from_checkpoint. Weights, optimizer, scheduler, RNG states and the data
                position are restored, so the run continues exactly as if never stopped.

        Returns:
            TrainOutput (global_step, per-step losses, output and final folders, last log record).
        """
        from . import distributed as D

        args = self.args
        pc = self.parallel_config
        info = D.init_distributed()  # no-op on one process; recipe.run also cleans up
        if pc.optimizer_shard and args.fp16:
            raise TrainerError("fp16 with parallel.optimizer_shard is not supported: use bf16 (FSDP2 mixed precision)")
        if info.world_size > 1 and self.model is None and self.model_args.device is None:
            self.model_args.device = str(info.device)
        set_seed(args.seed)  # identical on every rank: FSDP2 does not broadcast weights, TP needs equal lora_A
        if self.model is None:
            self.ensure_model()
        pc.validate(info.world_size, unwrap_model(self.model).config)
        self._prepare_for_training()
        self._mesh = D.build_mesh(pc)
        if self._mesh is not None:
            self.model = D.parallelize_model(self.model, self._mesh, pc,
                                             mixed_precision="bf16" if args.bf16 and pc.optimizer_shard else None,
                                             device=info.device)
            torch.manual_seed(D.rank_seed(args.seed, self._mesh))
        main = D.is_main_process()
        self.train_dataset = self._dataset(self.train_dataset)
        self.eval_dataset = self._dataset(self.eval_dataset)
        dataset = self.train_dataset
        if dataset is None or len(dataset) == 0:
            raise TrainerError("no training data: pass train_dataset (or set data.train_data)")
        if dataset.mode != "train":
            raise TrainerError("train_dataset holds evaluation rows; build it with mode='train'")
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)

        per_epoch = self._batches_per_epoch(len(dataset))
        total_steps = args.max_steps or math.ceil(args.num_train_epochs * per_epoch / args.gradient_accumulation_steps)
        warmup = args.warmup_steps or math.ceil(args.warmup_ratio * total_steps)
        self._build_optimizer(_lr_lambda(args.lr_scheduler_type, warmup, total_steps))

        resume = resume_from_checkpoint if resume_from_checkpoint is not None else args.resume_from_checkpoint
        self.state = TrainerState()
        if resume:
            self._load_checkpoint(self._find_checkpoint(resume))
        self.state.rows_per_micro_batch = args.per_device_train_batch_size * D.data_parallel_rank_and_size(self._mesh)[1]
        if main:
            atomic_write_text(output_dir / "training_args.json", json.dumps(
                {"method": self.method, "args": asdict(args), "lora": asdict(self.lora_config),
                 "model": asdict(self.model_args), "parallel": asdict(pc), "world_size": info.world_size},
                indent=2) + "\n")
        log = _Log(output_dir, args.tensorboard, self.state.global_step if resume else None) if main else _NullLog()
        trainable = [p for _, p in self._trainable()]
        pad_id = self.tokenizer.pad_token_id
        stream = self._micro_batches(dataset, self.state.micro_batches)
        self.model.train()

        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=self.state.global_step, desc=f"train ({self.method})", unit="step",
                   disable=args.disable_tqdm or not main, file=sys.stderr, dynamic_ncols=True)
        window_losses, window_tokens, window_start = [], 0, time.perf_counter()
        record: dict[str, Any] = {}
        try:
            while self.state.global_step < total_steps:
                step_loss, step_tokens = 0.0, 0
                accum = args.gradient_accumulation_steps
                for i in range(accum):
                    batch = next(stream)
                    input_ids = batch["input_ids"].to(self.device)
                    labels = batch["labels"].to(self.device)
                    with D.no_sync(self.model, enabled=i < accum - 1):
                        with self._autocast():
                            loss = causal_lm_loss(self.model(input_ids=input_ids).logits, labels)
                        scaled = loss / accum  # DDP / FSDP2 average over the data-parallel ranks
                        (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                    step_loss += loss.item() / args.gradient_accumulation_steps
                    step_tokens += int((input_ids != pad_id).sum())
                    self.state.micro_batches += 1
                    self.state.epoch, self.state.batch_index = divmod(self.state.micro_batches, per_epoch)
                if self.scaler:
                    self.scaler.unscale_(self.optimizer)
                max_norm = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else float("inf")
                grad_norm = float(D.clip_grad_norm_(trainable, max_norm))
                if self._mesh is not None:
                    step_loss = D.all_reduce_mean(step_loss, self._mesh)
                    step_tokens = round(D.all_reduce_mean(step_tokens, self._mesh)
                                        * D.data_parallel_rank_and_size(self._mesh)[1])
                lr = self.optimizer.param_groups[0]["lr"]
                if self.scaler:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.state.global_step += 1
                self.state.losses.append(step_loss)
                window_losses.append(step_loss)
                window_tokens += step_tokens
                step = self.state.global_step

                elapsed = max(time.perf_counter() - window_start, 1e-9)
                tokens_per_s = window_tokens / elapsed
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens_per_s:.0f}")
                record = {"step": step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm}
                if step % args.logging_steps == 0 or step == total_steps:
                    record = {"step": step, "epoch": round(self.state.micro_batches / per_epoch, 4),
                              "loss": sum(window_losses) / len(window_losses), "lr": lr, "grad_norm": grad_norm,
                              "tokens_per_s": tokens_per_s, "tokens": window_tokens}
                    log.write(record)
                    self.state.log_history.append(record)
                    window_losses, window_tokens, window_start = [], 0, time.perf_counter()
                if args.eval_steps and step % args.eval_steps == 0 and self.eval_dataset is not None:
                    log.write(self.evaluate(), eval_record=True)
                if args.save_steps and step % args.save_steps == 0:
                    self.save_checkpoint()
                for callback in self.callbacks:
                    callback(self, {**record, "step": step, "loss": step_loss})
        finally:
            bar.close()
            log.close()

        final_dir = output_dir / FINAL_NAME
        if self._mesh is not None:
            D.save_final_model(self.model, final_dir, tokenizer=self.tokenizer)  # collective; rank 0 writes
        else:
            self.save_model(final_dir)
        if main:
            eval_history = []
            if log.eval_path.is_file():
                eval_history = [json.loads(line) for line in log.eval_path.read_text().splitlines() if line.strip()]
            plot_losses(self.state.losses, output_dir / "loss.png", self.state.log_history, eval_history)
        return TrainOutput(self.state.global_step, list(self.state.losses), output_dir, final_dir, record)

    def _build_optimizer(self, lr_lambda: Callable[[int], float]) -> None:
        """AdamW over the trainable parameters only; weight decay on matrices, not on biases/LayerNorms."""
        args = self.args
        params = self._trainable()
        if not params:
            raise TrainerError(f"method {self.method!r}: the model has no trainable parameters")
        decay = [p for _, p in params if p.ndim >= 2]
        no_decay = [p for _, p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": args.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                           eps=args.adam_epsilon)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
        self.scaler = None
        if args.fp16:
            if self.device.type != "cuda":
                raise TrainerError("fp16 mixed precision needs CUDA; use bf16 on the CPU")
            self.scaler = torch.amp.GradScaler("cuda")

    # ------------------------------------------------------------------------------ checkpoints

    def save_model(self, directory: str | os.PathLike) -> Path:
        """Save the result of the method into `directory` (written as <directory>.tmp, then renamed).

        full -> HF folder with the tokenizer; lora -> PEFT adapter folder (+ tokenizer files);
        ptuning -> THUDM P-tuning folder (pytorch_model.bin with the prefix encoder + config.json).

        Returns:
            The folder.
        """
        directory = Path(directory)
        with _atomic_folder(directory) as tmp:
            self._save_weights(tmp)
            if self.method != "ptuning":
                self.tokenizer.save_pretrained(tmp)
        return directory

    def _save_weights(self, folder: Path) -> None:
        if self.method == "full":
            save_pretrained(self.model, folder)
        elif self.method == "lora":
            # save_embedding_layers="auto" would call model.config.__class__.from_pretrained to compare
            # vocabularies; ChatGLMConfig has no from_pretrained, and the embeddings are never adapted.
            self.model.save_pretrained(str(folder), save_embedding_layers=False)
        else:
            save_ptuning_checkpoint(unwrap_model(self.model), folder)

    def save_checkpoint(self) -> Path:
        """Write output_dir/checkpoint-<step>/ (weights, optimizer, scheduler, RNG, position); prune old ones."""
        from . import distributed as D

        output_dir = Path(self.args.output_dir)
        folder = output_dir / f"checkpoint-{self.state.global_step}"
        if D.get_world_size() > 1:
            # DCP: every rank writes its shard (atomic: <folder>.tmp renamed by rank 0); any world size resumes it
            rank = D.get_rank()
            D.save_sharded({"model": self.model, "optimizer": self.optimizer, "scheduler": _scheduler_state(self.scheduler),
                            "trainer_state": {**asdict(self.state), "method": self.method, "seed": self.args.seed,
                                              "global_batch": self._global_batch()},
                            f"rng_rank{rank}": _rng_state()},
                           folder, tokenizer=self.tokenizer, parallel_config=self.parallel_config)
            if self.args.save_total_limit and D.is_main_process():
                for old in _checkpoints(output_dir)[:-self.args.save_total_limit]:
                    shutil.rmtree(old)
            D.barrier()
            return folder
        with _atomic_folder(folder) as tmp:
            self._save_weights(tmp)
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            if self.scaler is not None:
                torch.save(self.scaler.state_dict(), tmp / "scaler.pt")
            torch.save(_rng_state(), tmp / "rng_state.pt")
            (tmp / STATE_NAME).write_text(json.dumps(
                {**asdict(self.state), "method": self.method, "seed": self.args.seed,
                 "per_device_train_batch_size": self.args.per_device_train_batch_size,
                 "gradient_accumulation_steps": self.args.gradient_accumulation_steps,
                 "dataset_rows": len(self.train_dataset)}, indent=2) + "\n")
        if self.args.save_total_limit:
            for old in _checkpoints(output_dir)[:-self.args.save_total_limit]:
                shutil.rmtree(old)
        return folder

    def _find_checkpoint(self, resume: str | os.PathLike) -> Path:
        if str(resume) in ("latest", "True", "true"):
            found = _checkpoints(Path(self.args.output_dir))
            if not found:
                raise CheckpointError(f"resume_from_checkpoint='latest': no checkpoint-<step> folder in "
                                      f"{self.args.output_dir}")
            return found[-1]
        from .distributed import is_sharded_checkpoint

        path = Path(resume)
        if not (path / STATE_NAME).is_file() and not is_sharded_checkpoint(path):
            raise CheckpointError(f"{path}: not a training checkpoint (no {STATE_NAME})")
        return path

    def _global_batch(self) -> int:
        from .distributed import data_parallel_rank_and_size

        return (self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
                * data_parallel_rank_and_size(self._mesh)[1])

    def _load_sharded_checkpoint(self, folder: Path) -> None:
        """Resume from a save_sharded checkpoint, with this run's world size (DCP reshards)."""
        from . import distributed as D

        rank = D.get_rank()
        keys = D.read_checkpoint_info(folder)["keys"]
        request: dict[str, Any] = {"model": self.model, "optimizer": self.optimizer, "scheduler": {},
                                   "trainer_state": {}}
        if f"rng_rank{rank}" in keys:
            request[f"rng_rank{rank}"] = {}
        else:
            warnings.warn(f"{folder} has no RNG state for rank {rank} (written with another world size): the "
                          f"resume is not exact where randomness (dropout) is used", stacklevel=3)
        D.load_sharded(request, folder)
        state = request["trainer_state"]
        if state["method"] != self.method:
            raise TrainerError(f"{folder} was written by a {state['method']!r} run; this run's method is "
                               f"{self.method!r}")
        if state.get("global_batch") != self._global_batch() or state.get("seed") != self.args.seed:
            warnings.warn(f"resuming {folder} with a global batch of {self._global_batch()} rows and seed "
                          f"{self.args.seed} (written with {state.get('global_batch')} and {state.get('seed')}): the "
                          f"run will not continue exactly", stacklevel=3)
        sched = dict(request["scheduler"])
        sched["lr_lambdas"] = [None] * len(self.optimizer.param_groups)
        self.scheduler.load_state_dict(sched)
        if f"rng_rank{rank}" in request:
            _set_rng_state(request[f"rng_rank{rank}"])
        self.state = TrainerState(**{k: state[k] for k in asdict(TrainerState()) if k in state})
        self._convert_position()

    def _convert_position(self) -> None:
        """Re-express the data position when the rows per global micro-batch changed (another dp / batch size)."""
        from .distributed import data_parallel_rank_and_size

        rows = self.args.per_device_train_batch_size * data_parallel_rank_and_size(self._mesh)[1]
        old = self.state.rows_per_micro_batch
        if old and old != rows:
            per_epoch = self._batches_per_epoch(len(self.train_dataset))
            index = self.state.batch_index * old // rows
            self.state.micro_batches = self.state.epoch * per_epoch + index
            self.state.batch_index = index
        self.state.rows_per_micro_batch = rows

    def _load_checkpoint(self, folder: Path) -> None:
        from .distributed import is_sharded_checkpoint

        if is_sharded_checkpoint(folder):
            self._load_sharded_checkpoint(folder)
            return
        state = json.loads((folder / STATE_NAME).read_text())
        if state["method"] != self.method:
            raise TrainerError(f"{folder} was written by a {state['method']!r} run; this run's method is "
                               f"{self.method!r}")
        for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "seed"):
            ours = self.args.seed if key == "seed" else getattr(self.args, key)
            if state[key] != ours:
                warnings.warn(f"resuming {folder} with {key}={ours} (it was written with {state[key]}): "
                              f"the run will not continue exactly", stacklevel=3)
        base = unwrap_model(self.model)
        if self.method == "full":
            _copy_weights(base, folder)
        elif self.method == "lora":
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            result = set_peft_model_state_dict(self.model, load_file(folder / ADAPTER_WEIGHTS_NAME))
            if getattr(result, "unexpected_keys", None):
                raise CheckpointError(f"{folder}: adapter tensors not in this model: {result.unexpected_keys[:5]}")
        else:
            load_ptuning_state(base, folder)
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=self.device,
                                                  weights_only=True))
        self.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        if self.scaler is not None and (folder / "scaler.pt").is_file():
            self.scaler.load_state_dict(torch.load(folder / "scaler.pt", weights_only=True))
        _set_rng_state(torch.load(folder / "rng_state.pt", weights_only=True))
        self.state = TrainerState(**{k: state[k] for k in asdict(TrainerState()) if k in state})

    # ------------------------------------------------------------------------------ evaluate / predict

    @torch.no_grad()
    def evaluate(self, eval_dataset: RowDataset | str | os.PathLike | None = None) -> dict[str, Any]:
        """Teacher-forced loss over an evaluation set of training-format rows, plus generation scores.

        When the rows come from a jsonl file with answers (a JsonlDataset: `.examples`) and
        args.eval_generation_samples is set, the first that many examples are also answered greedily
        and scored (BLEU-4, ROUGE-1/2/L) with glm6b.eval.evaluate.evaluate_generation.

        Args:
            eval_dataset: a "train"-mode RowDataset or a path; None takes the trainer's eval_dataset.

        Returns:
            {"step", "eval_loss" (mean over all target tokens), "eval_tokens", "eval_rows"} and, with
            generation metrics, "bleu-4", "rouge-1", "rouge-2", "rouge-l".
        """
        self.ensure_model()
        dataset = self._dataset(eval_dataset if eval_dataset is not None else self.eval_dataset)
        if dataset is None:
            raise TrainerError("no evaluation data: pass eval_dataset (or set data.eval_data)")
        if dataset.mode != "train":
            raise TrainerError("evaluate() computes the teacher-forced loss: build eval_dataset with mode='train' "
                               "(prompt + answer rows); generation metrics are in glm6b.eval.evaluate")
        was_training = self.model.training
        self.model.eval()
        total, tokens = 0.0, 0
        bs = self.args.per_device_eval_batch_size
        try:
            for start in range(0, len(dataset), bs):
                batch = dataset.collate([dataset[i] for i in range(start, min(start + bs, len(dataset)))])
                labels = batch["labels"].to(self.device)
                with self._autocast():
                    loss = causal_lm_loss(self.model(input_ids=batch["input_ids"].to(self.device)).logits, labels)
                n = int((labels[:, 1:] != IGNORE_INDEX).sum())
                total += loss.item() * n
                tokens += n
        finally:
            self.model.train(was_training)
        result = {"step": self.state.global_step, "eval_loss": total / max(tokens, 1), "eval_tokens": tokens,
                  "eval_rows": len(dataset)}
        result.update(self._generation_metrics(dataset))
        return result

    def _generation_metrics(self, dataset: RowDataset) -> dict[str, float]:
        """BLEU-4 / ROUGE-1/2/L of greedy answers for the first eval_generation_samples examples with an answer.

        Every rank runs it (with identical data and weights, greedy decoding takes the same number of
        steps everywhere, so FSDP / tensor-parallel collectives line up); rank 0 records the result.
        """
        from .distributed import unwrap_parallel
        from ..eval.evaluate import evaluate_generation
        from ..eval.metrics import METRIC_NAMES

        limit = self.args.eval_generation_samples
        examples = [ex for ex in getattr(dataset, "examples", None) or [] if getattr(ex, "answer", None)]
        if not limit or not examples:
            return {}
        examples = examples[:limit]
        dc = self.data_config
        _, scores = evaluate_generation(
            unwrap_parallel(self.model), self.tokenizer, [ex.prompt for ex in examples], [ex.answer for ex in examples],
            batch_size=self.args.per_device_eval_batch_size, max_new_tokens=dc.max_target_length,
            max_source_length=dc.max_source_length, max_target_length=dc.max_target_length, progress=False)
        return {name: scores[name] for name in METRIC_NAMES}

    def predict(self, input_data: str | list[str] | RowDataset, generation_config: GenerationConfig | None = None,
                batch_size: int | None = None, history: list | None = None) -> list[str]:
        """Generate an answer for each prompt (greedy unless the generation config samples).

        Prompts are rendered like the training data (data.source_prefix + chat template), encoded
        with max_source_length, left-padded in batches, and the new tokens decoded with
        skip_special_tokens (as the reference's predictions).

        Args:
            input_data: a prompt, a list of prompts, or a "eval"/"train"-mode dataset built from
                jsonl (its examples' prompts are used).
            generation_config: overrides the trainer's generation_config.
            batch_size: prompts per batch (default per_device_eval_batch_size).
            history: earlier (query, response) pairs applied to every prompt.

        Returns:
            One text per prompt, in order.
        """
        from ..eval.evaluate import generate_predictions

        self.ensure_model()
        if isinstance(input_data, str):
            prompts = [render_prompt(input_data, history, self.data_config.source_prefix)]
        elif isinstance(input_data, RowDataset):
            if not hasattr(input_data, "examples"):
                raise TrainerError("predict() needs the prompt texts: pass a jsonl-backed dataset or a list of prompts")
            prompts = [ex.prompt for ex in input_data.examples]
        else:
            prompts = [render_prompt(p, history, self.data_config.source_prefix) for p in input_data]
        config = generation_config or self.generation_config or GenerationConfig(
            max_length=None, max_new_tokens=self.data_config.max_target_length)
        new_tokens = config.max_new_tokens if config.max_new_tokens is not None else self.data_config.max_target_length
        predictions, _ = generate_predictions(
            self.model, self.tokenizer, prompts, batch_size=batch_size or self.args.per_device_eval_batch_size,
            max_source_length=self.data_config.max_source_length, max_new_tokens=new_tokens,
            generation_config=config, progress=not self.args.disable_tqdm)
        return predictions


# ----------------------------------------------------------------------------------- helpers


class _atomic_folder:
    """Write a folder as <name>.tmp, then rename it to <name> (replacing an older one)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.tmp = folder.with_name(folder.name + ".tmp")

    def __enter__(self) -> Path:
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.folder.exists():
            old = self.folder.with_name(self.folder.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.folder, old)
            os.replace(self.tmp, self.folder)
            shutil.rmtree(old)
        else:
            os.replace(self.tmp, self.folder)


def _checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-<step> folders of output_dir, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


@torch.no_grad()
def _copy_weights(model: ChatGLMForConditionalGeneration, folder: Path) -> None:
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
