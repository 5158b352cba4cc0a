"""The settings dataclasses of training (the `model:`, `trainer:` and `parallel:` recipe sections) and the
trainer's plain records; importable without torch or torch.distributed, so reading a recipe stays cheap."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import PRESETS, ChatGLMConfig, ConfigError


Method = Literal["full", "lora", "ptuning"]
METHODS = ("full", "lora", "ptuning")


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
        quantize: "int8" or "int4": weight-only quantize the base at load (glm6b.quant). LoRA and
            P-tuning then train on top of the quantized layers (QLoRA-style: the adapter is an
            ordinary PEFT adapter that also loads on the float base); eval and predict use it too.
            A THUDM-layout quantized folder (config.json quantization_bit) loads quantized anyway.
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

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"model.preset = {self.preset!r}: expected one of {', '.join(sorted(PRESETS))}")
        if self.pre_seq_len is not None and (isinstance(self.pre_seq_len, bool)
                                             or not isinstance(self.pre_seq_len, int) or self.pre_seq_len < 1):
            raise ConfigError(f"model.pre_seq_len = {self.pre_seq_len!r}: expected a positive integer (or null)")


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
        loss_normalization: "token" (default): a step's loss is the sum of the token losses of all
            its micro-batches on all ranks divided by the step's target tokens, so it does not depend
            on the batch size, the accumulation or the process count; "per_micro_batch": the mean of
            per-micro-batch means (the older definition, for matching published curves).
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
        resume_from_checkpoint: a checkpoint folder, or "latest" for the newest one of this run in
            output_dir (a corrupt one falls back to the one before). The batch size, accumulation,
            seed, shuffle and data must be those of the checkpoint; a changed learning rate, schedule,
            max_steps or AdamW setting applies from the restored step on (and is logged).
        overwrite_output_dir: start a new run in an output_dir that holds one (its checkpoints, logs
            and final/ are deleted; other files are kept). Without it (or a resume) that is refused.
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
    loss_normalization: Literal["token", "per_micro_batch"] = "token"
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
    overwrite_output_dir: bool = False
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
        need(self.loss_normalization in ("token", "per_micro_batch"),
             f"loss_normalization={self.loss_normalization!r}: expected token or per_micro_batch")
        need(not (self.bf16 and self.fp16), "bf16 and fp16 are exclusive")
        need(self.eval_generation_samples is None or self.eval_generation_samples >= 0,
             f"eval_generation_samples={self.eval_generation_samples} must be >= 0 (or null)")
        need(self.learning_rate >= 0, f"learning_rate={self.learning_rate} must be >= 0")
        need(self.max_grad_norm >= 0, f"max_grad_norm={self.max_grad_norm} must be >= 0 (0 disables clipping)")
        need(0.0 <= self.adam_beta1 < 1.0 and 0.0 <= self.adam_beta2 < 1.0,
             f"adam_beta1={self.adam_beta1}, adam_beta2={self.adam_beta2} must be in [0, 1)")
        need(self.adam_epsilon > 0, f"adam_epsilon={self.adam_epsilon} must be positive")
        need(self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0")
        need(self.dataloader_num_workers >= 0, f"dataloader_num_workers={self.dataloader_num_workers} must be >= 0")

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



# ----------------------------------------------------------------------------------- config


@dataclass
class ParallelConfig:
    """How to spread training over processes (the `parallel:` section of a recipe; MindFormers names).

    The process count must be data_parallel * model_parallel; ranks are laid out as a
    [data_parallel, model_parallel] grid, so the model_parallel ranks of one replica are neighbours
    (on one node when model_parallel <= GPUs per node: tensor-parallel traffic stays on NVLink).

    Attributes:
        data_parallel: model replicas; the global batch is split over them.
        model_parallel: tensor-parallel degree: query_key_value / dense_h_to_4h are split by output
            rows (whole heads, MLP columns), dense / dense_4h_to_h by input columns. Must divide
            num_attention_heads and inner_hidden_size.
        pipeline_stage: must be 1 (pipeline parallelism is not supported).
        micro_batch_num: micro-batches per optimizer step (gradient accumulation).
        optimizer_shard: shard parameters, gradients and optimizer state over the data-parallel
            ranks with FSDP2 (ZeRO-3). Without it, data parallelism is DDP (full replicas).
    """

    data_parallel: int = 1
    model_parallel: int = 1
    pipeline_stage: int = 1
    micro_batch_num: int = 1
    optimizer_shard: bool = False

    @property
    def world_size(self) -> int:
        """The number of processes this layout needs."""
        return self.data_parallel * self.model_parallel

    def validate(self, world_size: int, model_config: ChatGLMConfig | None = None) -> None:
        """Raise ConfigError, naming the `parallel.<field>`, for a layout that cannot run.

        Call it before loading anything, on every rank (all ranks raise the same error).

        Args:
            world_size: the number of processes (torchrun's WORLD_SIZE; 1 without torchrun).
            model_config: the model's architecture, to check what model_parallel must divide.

        Raises:
            ConfigError: a value below 1 or of the wrong type, pipeline_stage > 1, a process count
                that is not data_parallel * model_parallel, heads or MLP width not divisible by
                model_parallel, P-tuning with model_parallel > 1, or data_parallel and
                model_parallel both > 1 without optimizer_shard.
        """
        for key in ("data_parallel", "model_parallel", "pipeline_stage", "micro_batch_num"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"parallel.{key} = {value!r}: expected an integer >= 1")
        if not isinstance(self.optimizer_shard, bool):
            raise ConfigError(f"parallel.optimizer_shard = {self.optimizer_shard!r}: expected true or false")
        if self.pipeline_stage > 1:
            raise ConfigError(f"parallel.pipeline_stage = {self.pipeline_stage}: pipeline parallelism is not "
                              f"supported; set it to 1 and use model_parallel (tensor parallel) and "
                              f"data_parallel with optimizer_shard (FSDP2) instead")
        if world_size != self.world_size:
            raise ConfigError(
                f"parallel.data_parallel ({self.data_parallel}) * parallel.model_parallel ({self.model_parallel}) "
                f"= {self.world_size} must equal the number of processes, which is {world_size} "
                f"(launch with e.g. `torchrun --nproc-per-node {self.world_size} -m glm6b ...`, or change the "
                f"parallel section)")
        tp = self.model_parallel
        if tp > 1 and self.data_parallel > 1 and not self.optimizer_shard:
            raise ConfigError(
                f"parallel.data_parallel = {self.data_parallel} with parallel.model_parallel = {tp} needs "
                f"parallel.optimizer_shard: true (FSDP2 composes with tensor parallelism; DDP does not)")
        if model_config is not None and tp > 1:
            if model_config.num_attention_heads % tp:
                raise ConfigError(
                    f"parallel.model_parallel = {tp} must divide num_attention_heads "
                    f"({model_config.num_attention_heads}): each rank holds whole attention heads")
            if model_config.inner_hidden_size % tp:
                raise ConfigError(
                    f"parallel.model_parallel = {tp} must divide inner_hidden_size "
                    f"({model_config.inner_hidden_size}): each rank holds an equal slice of the MLP")
            if model_config.pre_seq_len:
                raise ConfigError(
                    f"parallel.model_parallel = {tp} with P-tuning (pre_seq_len = {model_config.pre_seq_len}) is "
                    f"not supported: the prefix keys/values are not split by head; use data_parallel "
                    f"(P-tuning trains only the small prefix encoder)")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, source: str = "parallel") -> "ParallelConfig":
        """Build from a recipe's `parallel:` mapping; unknown keys are an error naming them.

        Raises:
            ConfigError: not a mapping, or an unknown key.
        """
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(cls))}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; expected {', '.join(sorted(known))}")
        return cls(**data)
