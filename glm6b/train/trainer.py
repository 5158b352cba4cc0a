"""Fine-tuning on one machine: full-parameter, LoRA (PEFT) and P-tuning v2, with checkpoints that resume exactly.

    trainer = Trainer(model=model, tokenizer=tok, args=TrainingConfig(output_dir="out", max_steps=100),
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

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint.adapters import load_adapter
from ..checkpoint.hf import CheckpointError, load_ptuning_state
from ..config import DataConfig, GenerationConfig, LoadConfig, LoraConfig, ParallelConfig, TrainerError, TrainingConfig
from ..data.adgen import RowDataset
from ..data.preprocess import load_dataset
from ..extras import import_extra
from ..io import atomic_write_text
from ..safety import check_writable
from ..tokenizer import check_tokenizer_matches, load_tokenizer
from . import evaluation
from . import parallel as P
from . import state as checkpoints
from .args import METHODS, Method, TrainerState, TrainOutput
from .build import build_model, lr_lambda, prepare_model, set_seed
from .export import save_final_model
from .logs import EVAL_LOG_NAME, NullLog, TrainLog, plot_losses
from .loss import forward_backward
from .parallel import unwrap_model
from .pipeline import Pipeline

FINAL_NAME = "final"


def _empty_data_message(dataset) -> str:
    """Why a training dataset has no rows, naming its file and what was skipped."""
    stats = getattr(dataset, "stats", None)
    where = getattr(dataset, "path", None) or getattr(dataset, "folder", None) or "train_dataset"
    if stats is None:
        return f"{where}: no training rows"
    return (f"{where}: no training rows: {stats.lines} non-blank line(s) read, {stats.skipped_empty} with an empty "
            f"prompt or answer, {stats.skipped_bad} malformed line(s) skipped (check data.prompt_column / "
            f"data.response_column and the file's contents)")


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C / SIGTERM after saving a checkpoint; the message says where."""


class StopRequest:
    """While active, the first Ctrl-C (SIGINT) or SIGTERM only sets `requested`: the loop finishes its
    step, saves a checkpoint and stops. The previous handlers are back in place at once, so a second
    signal stops immediately (temporary files are still removed by their writers' cleanup).

    Args:
        enabled: install the handlers (only on one process, in the main thread; under torchrun the
            ranks could not agree on the step to stop at).
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self._restore()
        name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        print(f"\n{name}: saving a checkpoint after this step, then stopping (press Ctrl-C again to stop now)",
              file=sys.stderr, flush=True)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        if self.enabled:
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()


@dataclass
class _Run:
    """What the loop and the finish of one `train` call share (made by Trainer._setup)."""

    output_dir: Path
    dataset: RowDataset
    per_epoch: int  # global micro-batches per epoch
    total_steps: int
    world_size: int
    resumed: bool
    # Chosen once for the layout: one optimizer step's micro-batches (glm6b.train.loss.forward_backward, or
    # Pipeline.forward_backward through the stages), and the writer of final/ (collective under torchrun).
    forward_backward: Callable[..., tuple[float, int, float]]
    save_final: Callable[[Path], Any]


class _LogWindow:
    """The losses and tokens of the steps since the last log line."""

    def __init__(self):
        self.losses: list[float] = []
        self.tokens = 0
        self.start = time.perf_counter()

    def add(self, loss: float, tokens: int) -> None:
        self.losses.append(loss)
        self.tokens += tokens

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)


class Trainer:
    """Train, fine-tune, evaluate and run a ChatGLM-6B model on one machine.

    Args:
        task: "text_generation" (the only task).
        model: a ChatGLMForConditionalGeneration (or a PeftModel for LoRA). None builds it from
            `model_args` when training starts, or from the folder given to `finetune`.
        tokenizer: a ChatGLMTokenizer; None loads it with the model.
        args: TrainingConfig.
        train_dataset, eval_dataset: RowDatasets in "train" mode (teacher-forced rows), or paths of
            jsonl files / preprocessed folders (encoded with `data_config`).
        method: "full", "lora" or "ptuning".
        lora_config: LoraConfig (method lora).
        model_args: LoadConfig used when the trainer builds the model itself.
        data_config: DataConfig for datasets given as paths and for `predict` (max_source_length).
        generation_config: default settings for `predict` (greedy, max_target_length new tokens if None).
        callbacks: functions called as callback(trainer, record) after every optimizer step (and its
            checkpoint), record holding at least "step" and "loss".
        parallel_config: glm6b.config.ParallelConfig for runs under torchrun (data / tensor /
            pipeline parallel, FSDP2; see docs/parallelism.md); the default is one process.
    """

    def __init__(
        self,
        task: str = "text_generation",
        model: nn.Module | None = None,
        tokenizer=None,
        args: TrainingConfig | None = None,
        train_dataset: RowDataset | str | os.PathLike | None = None,
        eval_dataset: RowDataset | str | os.PathLike | None = None,
        method: Method = "full",
        lora_config: LoraConfig | None = None,
        model_args: LoadConfig | None = None,
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
        self.args = args or TrainingConfig()
        self.method = method
        self.lora_config = lora_config or LoraConfig()
        self.model_args = model_args or LoadConfig()
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
        self.parallel_config = parallel_config or ParallelConfig()
        self.mesh = None
        # With parallel.pipeline_stage > 1: this process's stage (glm6b.train.pipeline), made by _setup;
        # self.model is then the stage's part of the model.
        self.pipeline = None
        # Extra JSON files written into output_dir beside training_args.json once training starts
        # (glm6b run adds recipe.json), so a refused or failed start never leaves them behind.
        self.records: dict[str, Any] = {}

    # ------------------------------------------------------------------------------ model

    @property
    def device(self) -> torch.device:
        if self.pipeline is not None:  # a stage's part of the model may lack the final LayerNorm it is read from
            return self.pipeline.device
        return unwrap_model(self.model).device

    def _build_model(self, for_training: bool) -> None:
        """Load (or randomly initialise) the model described by model_args, with its adapter if any (and its
        tokenizer, unless one was given): a LoRA adapter stays a trainable layer to train it further, and
        is merged as model_args.merge_adapter says for evaluate / predict."""
        self.model, tokenizer = build_model(self.model_args, self.method,
                                            trainable_adapter=for_training and self.method == "lora")
        self.tokenizer = self.tokenizer or tokenizer

    def ensure_model(self, for_training: bool = False) -> None:
        """Build the model and load the tokenizer from model_args if they were not given."""
        if self.model is None:
            self._build_model(for_training)
        if self.tokenizer is None:
            source = self.model_args.tokenizer or self.model_args.load_checkpoint
            if source is None:
                raise TrainerError("no tokenizer: pass tokenizer=... or set model.tokenizer (a folder with "
                                   "ice_text.model)")
            self.tokenizer = load_tokenizer(source)
        check_tokenizer_matches(self.tokenizer, unwrap_model(self.model).config,
                                self.model_args.load_checkpoint or self.model_args.preset)

    def _prepare_for_training(self) -> None:
        """Freeze / wrap the model for the method, enable gradient checkpointing, set train mode."""
        if self._prepared:
            return
        self.ensure_model(for_training=True)
        self.model = prepare_model(self.model, self.method, self.lora_config, self.args.gradient_checkpointing,
                                   self.model_args.load_checkpoint)
        self._prepared = True

    def _trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------ data

    def resolve_dataset(self, dataset, mode: str = "train") -> RowDataset | None:
        """`dataset` itself if it is a RowDataset (or None), else the rows of that jsonl file or folder."""
        if dataset is None or isinstance(dataset, RowDataset):
            return dataset
        self.ensure_model()
        return load_dataset(dataset, self.tokenizer, self.data_config, mode)

    def _micro_batches(self, dataset: RowDataset, start: int) -> Iterator[dict[str, torch.Tensor]]:
        """Yield batches forever, starting at micro-batch `start` of the stream (epoch after epoch)."""
        dp = P.data_parallel_rank_and_size(self.mesh)[1]
        bs = self.args.per_device_train_batch_size * dp
        per_epoch = self.batches_per_epoch(len(dataset))
        epoch, index = divmod(start, per_epoch)
        while True:
            if self.args.shuffle:
                order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.args.seed + epoch))
            else:
                order = torch.arange(len(dataset))
            batches = [P.data_parallel_shard(order[i:i + bs].tolist(), self.mesh) for i in range(0, len(dataset), bs)
                       if len(order[i:i + bs]) >= dp][:per_epoch]
            # A private generator: creating the loader's iterator must not draw from the global RNG,
            # which dropout uses (a resumed run creates its loader at a different point).
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches[index:], collate_fn=dataset.collate,
                                                 num_workers=self.args.dataloader_num_workers,
                                                 generator=torch.Generator().manual_seed(self.args.seed + epoch))
            yield from loader
            epoch, index = epoch + 1, 0

    def batches_per_epoch(self, rows: int) -> int:
        """Global micro-batches per epoch (a last batch with fewer rows than data-parallel ranks is dropped)."""
        dp = P.data_parallel_rank_and_size(self.mesh)[1]
        bs = self.args.per_device_train_batch_size * dp
        return rows // bs + (1 if rows % bs >= dp else 0)

    def autocast(self, generation: bool = False):
        """The bf16 / fp16 autocast context of args (a no-op without them).

        Under FSDP2 training forwards run without it (the mixed-precision policy casts the weights);
        generation uses it there too, so the float32 KV cache and the bf16 queries meet in one dtype.
        """
        if not (self.args.bf16 or self.args.fp16):
            return nullcontext()
        if self.mesh is not None and self.parallel_config.optimizer_shard and not generation:
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
        # Seed before anything random is built here (a fresh prefix encoder, LoRA's A matrices), as
        # `train` does for the models it builds: same seed, same run.
        set_seed(self.args.seed)
        kind = checkpoints.checkpoint_kind(path)
        if kind != "full" and kind != self.method:
            raise TrainerError(f"{path} is a {kind} checkpoint but the method is {self.method!r}")
        margs = self.model_args
        if self.model is not None:
            base = unwrap_model(self.model)
            if kind == "full":
                checkpoints.copy_weights(base, path)
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
        self._build_model(for_training=True)
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
        run = self._setup(resume_from_checkpoint)
        record = self._loop(run)
        return self._finish(run, record)

    def _setup(self, resume_from_checkpoint) -> "_Run":
        """Everything before the first step: processes, model, parallelism, data, run folder, optimizer, resume."""
        args, pc = self.args, self.parallel_config
        import_extra("matplotlib", "train", "training (it draws loss.png)")  # fail before any work, not at the end
        if self.method == "lora":
            import_extra("peft", "train", "LoRA")
        info = P.init_distributed()  # no-op on one process; recipe.run also cleans up
        if pc.optimizer_shard and args.fp16:
            raise TrainerError("fp16 with parallel.optimizer_shard is not supported: use bf16 (FSDP2 mixed precision)")
        if pc.pipeline_stage > 1 and args.fp16:
            raise TrainerError("fp16 with parallel.pipeline_stage > 1 is not supported (the schedule runs the "
                               "backward, without the gradient scaler): use bf16")
        if info.world_size > 1 and self.model is None and self.model_args.device is None:
            # A pipeline stage is cut from the model built on the CPU; only its part moves to the device.
            self.model_args.device = "cpu" if pc.pipeline_stage > 1 else str(info.device)
        set_seed(args.seed)  # identical on every rank: FSDP2 does not broadcast weights, TP needs equal lora_A
        self.ensure_model(for_training=True)
        pc.validate(info.world_size, unwrap_model(self.model).config)
        self._prepare_for_training()
        dataset = self._training_rows()
        self.mesh = P.build_mesh(pc)
        mixed_precision = "bf16" if args.bf16 and pc.optimizer_shard else None
        if pc.pipeline_stage > 1:
            width = dataset.config.max_source_length + dataset.config.max_target_length
            self.pipeline = Pipeline(self.model, self.mesh, pc, args.gradient_accumulation_steps,
                                     args.per_device_train_batch_size, width, self.tokenizer.pad_token_id,
                                     info.device, mixed_precision=mixed_precision)
            self.model = self.pipeline.model
        elif self.mesh is not None:
            self.model = P.parallelize_model(self.model, self.mesh, pc, mixed_precision=mixed_precision,
                                             device=info.device)
        if self.mesh is not None:
            torch.manual_seed(P.rank_seed(args.seed, self.mesh))
        output_dir = Path(args.output_dir)
        resume = resume_from_checkpoint if resume_from_checkpoint is not None else args.resume_from_checkpoint
        if P.is_main_process():
            checkpoints.prepare_run_folder(output_dir, resume, args.overwrite_output_dir)
        P.barrier()
        output_dir.mkdir(parents=True, exist_ok=True)

        per_epoch = self.batches_per_epoch(len(dataset))
        total_steps = args.max_steps or math.ceil(args.num_train_epochs * per_epoch / args.gradient_accumulation_steps)
        schedule = lr_lambda(args.lr_scheduler_type, args.warmup_steps or math.ceil(args.warmup_ratio * total_steps),
                             total_steps)
        self._build_optimizer(schedule)
        if P.is_main_process():  # room for one checkpoint and final/, before the first step
            check_writable(output_dir, "trainer.output_dir", needed_bytes=checkpoints.estimate_checkpoint_bytes(self))
        resumed = self._resume(resume, schedule)
        self._write_run_files(output_dir, info.world_size, resumed)
        if self.pipeline is not None:
            step_fn, save_final = self.pipeline.forward_backward, self._save_final_pipeline
        elif self.mesh is not None:
            step_fn, save_final = forward_backward, self._save_final_sharded
        else:
            step_fn, save_final = forward_backward, self.save_model
        return _Run(output_dir, dataset, per_epoch, total_steps, info.world_size, resumed=bool(resume),
                    forward_backward=step_fn, save_final=save_final)

    def _training_rows(self) -> RowDataset:
        self.train_dataset = self.resolve_dataset(self.train_dataset)
        self.eval_dataset = self.resolve_dataset(self.eval_dataset)
        dataset = self.train_dataset
        if dataset is None:
            raise TrainerError("no training data: pass train_dataset (or set data.train_data)")
        if len(dataset) == 0:
            raise TrainerError(_empty_data_message(dataset))
        if dataset.mode != "train":
            raise TrainerError("train_dataset holds evaluation rows; build it with mode='train'")
        return dataset

    def _resume(self, resume, schedule) -> dict[str, Any]:
        """A fresh state, or the one of the checkpoint to resume (what changed is reported and recorded)."""
        self.state = TrainerState()
        resumed: dict[str, Any] = {}
        if resume:
            folder, changes = checkpoints.load_resume_checkpoint(self, resume)
            checkpoints.apply_schedule(self, schedule)
            resumed = {"resumed_from": str(folder), "resumed_at_step": self.state.global_step,
                       "changed_on_resume": changes}
            if changes and P.is_main_process():
                print(f"resuming {folder} at step {self.state.global_step} with changed settings, applied from "
                      f"here on: " + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changes.items()),
                      file=sys.stderr)
        if not self.state.run_id:
            self.state.run_id = uuid.uuid4().hex
        self.state.rows_per_micro_batch = (self.args.per_device_train_batch_size
                                           * P.data_parallel_rank_and_size(self.mesh)[1])
        return resumed

    def _write_run_files(self, output_dir: Path, world_size: int, resumed: dict[str, Any]) -> None:
        """run.json, training_args.json and the records (recipe.json) in output_dir (rank 0)."""
        if not P.is_main_process():
            return
        checkpoints.write_run_id(output_dir, self.state.run_id)
        atomic_write_text(output_dir / "training_args.json", json.dumps(
            {"method": self.method, "args": asdict(self.args), "lora": asdict(self.lora_config),
             "model": asdict(self.model_args), "parallel": asdict(self.parallel_config), "world_size": world_size,
             "run_id": self.state.run_id, **resumed},
            indent=2) + "\n")
        for name, data in self.records.items():
            atomic_write_text(output_dir / name, json.dumps(data, indent=2, ensure_ascii=False) + "\n")

    def _loop(self, run: "_Run") -> dict[str, Any]:
        """The optimizer steps: log, evaluate and save as the arguments say; a first Ctrl-C / SIGTERM saves a
        checkpoint after the step and stops (TrainingInterrupted). Returns the last log record."""
        args, main = self.args, P.is_main_process()
        log = TrainLog(run.output_dir, args.tensorboard, self.state.global_step if run.resumed else None) \
            if main else NullLog()
        trainable = [p for _, p in self._trainable()]
        stream = self._micro_batches(run.dataset, self.state.micro_batches)
        self.model.train()

        from tqdm import tqdm

        window = _LogWindow()
        record: dict[str, Any] = {}
        with tqdm(total=run.total_steps, initial=self.state.global_step, desc=f"train ({self.method})", unit="step",
                  disable=args.disable_tqdm or not main, file=sys.stderr, dynamic_ncols=True) as bar, \
                contextlib.closing(log), StopRequest(enabled=run.world_size == 1) as stop:
            while self.state.global_step < run.total_steps:
                step_loss, step_tokens, grad_norm = run.forward_backward(self, stream, trainable, run.per_epoch)
                lr = self.optimizer.param_groups[0]["lr"]
                self._optimizer_step()
                self.state.global_step += 1
                self.state.losses.append(step_loss)
                step = self.state.global_step
                window.add(step_loss, step_tokens)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{window.tokens_per_s:.0f}")
                record = {"step": step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm}
                if step % args.logging_steps == 0 or step == run.total_steps:
                    record = {"step": step, "epoch": round(self.state.micro_batches / run.per_epoch, 4),
                              "loss": window.mean_loss, "lr": lr, "grad_norm": grad_norm,
                              "tokens_per_s": window.tokens_per_s, "tokens": window.tokens}
                    log.write(record)
                    self.state.log_history.append(record)
                    window = _LogWindow()
                if args.eval_steps and step % args.eval_steps == 0 and self.eval_dataset is not None:
                    log.write(self.evaluate(), eval_record=True)
                saved = bool(args.save_steps and step % args.save_steps == 0)
                if saved:
                    self.save_checkpoint()
                for callback in self.callbacks:
                    callback(self, {**record, "step": step, "loss": step_loss})
                if stop.requested:
                    folder = run.output_dir / f"checkpoint-{step}" if saved else self.save_checkpoint()
                    raise TrainingInterrupted(
                        f"stopped at step {step} of {run.total_steps}; checkpoint saved in {folder}; continue with "
                        f"--set trainer.resume_from_checkpoint=latest (same output_dir)")
        return record

    def _optimizer_step(self) -> None:
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _finish(self, run: "_Run", record: dict[str, Any]) -> TrainOutput:
        """final/ (every rank takes part in a sharded save; rank 0 writes) and the loss curve."""
        final_dir = run.output_dir / FINAL_NAME
        run.save_final(final_dir)
        if P.is_main_process():
            eval_path = run.output_dir / EVAL_LOG_NAME
            eval_history = [json.loads(line) for line in eval_path.read_text().splitlines() if line.strip()] \
                if eval_path.is_file() else []
            plot_losses(self.state.losses, run.output_dir / "loss.png", self.state.log_history, eval_history)
        return TrainOutput(self.state.global_step, list(self.state.losses), run.output_dir, final_dir, record)

    def _save_final_sharded(self, directory: Path) -> Path:
        """final/ from the ranks' shards (data / tensor parallel, FSDP2): collective; rank 0 writes."""
        return save_final_model(self.model, directory, tokenizer=self.tokenizer)

    def _save_final_pipeline(self, directory: Path) -> Path:
        """final/ from the pipeline stages' parts: collective; rank 0 writes."""
        return self.pipeline.save_final_model(directory, tokenizer=self.tokenizer)

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
        """Save the result of the method into `directory` (see glm6b.train.state.save_model)."""
        return checkpoints.save_model(self, directory)

    def save_checkpoint(self) -> Path:
        """Write output_dir/checkpoint-<step>/ (weights, optimizer, scheduler, RNG, position); prune old ones."""
        return checkpoints.save_checkpoint(self)

    # ------------------------------------------------------------------------------ evaluate / predict

    def evaluate(self, eval_dataset: RowDataset | str | os.PathLike | None = None) -> dict[str, Any]:
        """Teacher-forced loss plus generation scores (see glm6b.train.evaluation.evaluate)."""
        return evaluation.evaluate(self, eval_dataset)

    def predict(self, input_data: str | list[str] | RowDataset, generation_config: GenerationConfig | None = None,
                batch_size: int | None = None, history: list | None = None) -> list[str]:
        """Generate an answer for each prompt (see glm6b.train.evaluation.predict)."""
        return evaluation.predict(self, input_data, generation_config, batch_size, history)
