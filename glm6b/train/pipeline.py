"""Pipeline parallelism on torch.distributed.pipelining: the blocks split into consecutive stages, one process
per stage (per data-parallel replica), a 1F1B or GPipe schedule over each optimizer step's micro-batches.

A model becomes a pipeline from outside, in `Pipeline.__init__` (model.py stays math only):

1. The whole model is built as for one process (loaded, LoRA-wrapped, gradient checkpointing on).
2. `split_model` keeps this stage's part, in place. Stage s keeps the blocks `stage_layers(...)[s]`;
   the ModuleList of blocks becomes a ModuleDict keyed by each block's index, so every parameter
   keeps its HF name (`transformer.layers.17.attention.query_key_value.weight`) and DCP checkpoints,
   PEFT target modules and the final/ export see the names they see on one process. Stage 0 keeps
   the word embeddings, the last stage the final LayerNorm and the lm_head.
3. `StageModule` runs that part. The prefix-LM mask and the 2D positions are rebuilt on every stage
   from the token ids, which every stage of a pipeline receives (the data loader gives all stages of
   a replica the same rows): only the hidden states [B, T, H] travel between stages.
4. Data parallelism over the "dp" dimension of the ("pp", "dp") mesh, per stage: FSDP2 with
   optimizer_shard (glm6b.train.parallel.apply_fsdp on the stage module); without it the replicas
   average their gradients after the step (`_average_replica_grads`: DDP's result, bucketed).
5. A PipelineStage on the "pp" process group and a Schedule1F1B / ScheduleGPipe over the step's
   micro-batches run the forward and backward passes (`Pipeline.forward_backward`, the pipeline's
   counterpart of glm6b.train.loss.forward_backward).

The tied word embedding / lm_head (ChatGLM-6B's lm_head is the embedding matrix): stage 0 and the
last stage each hold a copy. After the schedule's backward their gradients are summed between the two
stages (one all-reduce per data-parallel rank), and the gradient norm counts the matrix once, so both
copies take the same AdamW step and stay equal: one parameter in effect. Checkpoints and final/ store
it once, as `transformer.word_embeddings.weight` (glm6b.train.dcp).

The loss is the trainer's: with `loss_normalization: token` the schedule's loss function scales each
micro-batch's summed token loss by the data-parallel size over the step's target tokens (counted over
all micro-batches and replicas before the step), so the gradients and the logged loss equal one
process's. Every micro-batch of a run has the same shape (a schedule sizes its buffers once): rows are
padded to per_device_train_batch_size with copies whose labels are all ignored, and columns to
max_source_length + max_target_length; neither changes the loss or the gradients.

Evaluation runs forward only, stage by stage (`Pipeline.forward`); generation too (`Pipeline.generate`:
each stage keeps a KV cache of its own blocks, the last stage chooses the tokens and sends them to
every stage).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ChatGLMConfig, ConfigError, GenerationConfig, ParallelConfig, TrainerError, make_generation_config
from ..data.adgen import IGNORE_INDEX
from ..inference.sampling import choose_tokens, new_token_budget, process_scores, row_generators
from ..model import KVCache, prompt_inputs
from . import parallel as P
from .loss import causal_lm_loss, count_target_tokens

# What a stage may send to the next: the index into this tuple goes first, so the receiver can allocate.
_ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def stage_layers(num_layers: int, stages: int) -> list[range]:
    """The blocks of each stage: consecutive and as even as possible.

    The blocks left over from an even split go to the inner stages first (the first and the last
    stage also hold the [V, H] embedding matrix), then to the first stage, then to the last.

    Raises:
        ConfigError: more stages than blocks.
    """
    if not 1 <= stages <= num_layers:
        raise ConfigError(f"parallel.pipeline_stage = {stages} must be between 1 and num_layers ({num_layers})")
    counts = [num_layers // stages] * stages
    for stage in [*range(1, stages - 1), 0, stages - 1][:num_layers % stages]:
        counts[stage] += 1
    starts = [sum(counts[:s]) for s in range(stages)]
    return [range(start, start + count) for start, count in zip(starts, counts)]


def split_model(model: nn.Module, stage: int, stages: int) -> nn.Module:
    """Keep only stage `stage`'s part of the model, in place, with the parameter names unchanged.

    Args:
        model: ChatGLMForConditionalGeneration or a PeftModel around one (not yet DDP / FSDP-wrapped).
        stage, stages: this stage's index and the stage count.

    Returns:
        `model` (its blocks a ModuleDict of this stage's blocks by index; `word_embeddings` None after
        stage 0; `final_layernorm` and `lm_head` None before the last stage).
    """
    base = P.unwrap_model(model)
    transformer = base.transformer
    keep = stage_layers(len(transformer.layers), stages)[stage]
    transformer.layers = nn.ModuleDict({str(i): transformer.layers[i] for i in keep})
    if stage > 0:
        transformer.word_embeddings = None  # the last stage's lm_head keeps the tied matrix as its own copy
    if stage < stages - 1:
        transformer.final_layernorm = None
        base.lm_head = None
    return model


class StageModule(nn.Module):
    """One stage's part of the model as a module: what PipelineStage runs and DDP / FSDP2 wrap.

    Args:
        model: the model after `split_model` (a ChatGLMForConditionalGeneration or a PeftModel).
        first, last: whether this stage holds the word embeddings / the final LayerNorm and lm_head.
    """

    def __init__(self, model: nn.Module, first: bool, last: bool):
        super().__init__()
        self.model = model
        self.first, self.last = first, last

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                kv_cache=None, last_token_only: bool = False) -> torch.Tensor:
        """This stage's blocks, as ChatGLMForConditionalGeneration.forward runs them.

        Args:
            x: stage 0: the token ids [B, T]; later stages: the previous stage's hidden states [B, T, H].
            input_ids: the token ids, which later stages derive the mask and positions from (stage 0
                reads them from x).
            position_ids, attention_mask: given ones instead ([B, 2, T], [B, 1, T, S] bool): a decoding step.
            kv_cache: a `StageKVCache` (generation), or None.
            last_token_only: the last stage computes the logits of the last position only.

        Returns:
            The hidden states [B, T, H], or on the last stage the logits [B, T, V].
        """
        base = P.unwrap_model(self.model)
        transformer = base.transformer
        if attention_mask is None or position_ids is None:
            attention_mask, position_ids = prompt_inputs(x if self.first else input_ids, base.config,
                                                         attention_mask, position_ids)
        if self.first:
            x = transformer.word_embeddings(x)  # [B, T, H]
        cos, sin = transformer.rotary(position_ids, x.dtype)
        for layer in transformer.layers.values():
            if transformer.gradient_checkpointing and transformer.training and kv_cache is None:
                x = checkpoint(layer, x, cos, sin, attention_mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attention_mask, kv_cache)
        if not self.last:
            return x
        x = transformer.final_layernorm(x)
        return base.lm_head(x[:, -1:] if last_token_only else x)


class StageKVCache:
    """The keys and values of one stage's blocks (glm6b.model.KVCache holds every layer of the model).

    The blocks call `update(layer_id, k, v)` with their global index; block i is stored in slot i
    minus the stage's first index.
    """

    def __init__(self, config: ChatGLMConfig, layer_ids: list[int], batch_size: int, max_length: int,
                 dtype: torch.dtype, device: torch.device):
        self.slots = {layer: slot for slot, layer in enumerate(layer_ids)}
        self.cache = KVCache(config.replace(num_layers=len(layer_ids)), batch_size, max_length, dtype, device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        return self.cache.update(self.slots[layer], k, v)

    def advance(self, tokens: int) -> None:
        """Count `tokens` more filled slots (after every stage's blocks have stored them)."""
        self.cache.length += tokens


class _ScaledLoss:
    """The schedule's loss function: one micro-batch's shifted cross entropy ("sum" or "mean") times `scale`,
    both set before each step."""

    def __init__(self):
        self.reduction = "sum"
        self.scale = 1.0

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss(logits, labels, reduction=self.reduction) * self.scale


class Pipeline:
    """This process's pipeline stage: the split model, its schedule, and the steps run through it.

    Built by the Trainer when parallel.pipeline_stage > 1, from the model prepared for the method
    (see the module docstring for the steps).

    Args:
        model: the model prepared for training (PeftModel for LoRA), on the CPU or its device.
        mesh: the ("pp", "dp") DeviceMesh (glm6b.train.parallel.build_mesh).
        parallel_config: the layout.
        micro_batches: micro-batches per optimizer step (trainer.gradient_accumulation_steps).
        rows, width: the shape of every training micro-batch [rows, width].
        pad_id: the pad token, for micro-batches narrower than `width`.
        device: this process's device; the stage is moved there.
        mixed_precision: FSDP2's policy (see glm6b.train.parallel.apply_fsdp).

    Attributes:
        model: the split model: what the optimizer trains and checkpoints save.
        module: the stage module as it runs (FSDP2 applied with optimizer_shard).
        stage_index, num_stages, first, last, device.

    Raises:
        ConfigError: a 1f1b schedule with fewer micro-batches than stages.
    """

    def __init__(self, model: nn.Module, mesh, parallel_config: ParallelConfig, micro_batches: int, rows: int,
                 width: int, pad_id: int, device: torch.device, mixed_precision=None):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        stages = parallel_config.pipeline_stage
        if parallel_config.pipeline_schedule == "1f1b" and micro_batches < stages:
            raise ConfigError(parallel_config.schedule_error(micro_batches))
        self.mesh, self.device = mesh, device
        self.stage_index, self.num_stages = mesh.get_local_rank("pp"), stages
        self.first, self.last = self.stage_index == 0, self.stage_index == stages - 1
        self.rows, self.width, self.pad_id = rows, width, pad_id
        self.pp_group = mesh.get_group("pp")
        self.model = split_model(model, self.stage_index, stages).to(device)
        base = P.unwrap_model(self.model)
        self.layer_ids = [int(name) for name in base.transformer.layers]
        self.module = StageModule(self.model, self.first, self.last)
        if parallel_config.optimizer_shard:
            self.module = P.apply_fsdp(self.module, mesh["dp"], mixed_precision=mixed_precision)
        # Replicas without optimizer_shard average their gradients after the schedule's backward, as
        # DDP would at the last micro-batch: torch's DDP wrapper does not survive the schedule's first
        # step (its shape-inference forward arms the reducer, which then counts every gradient twice).
        self.replica_group = mesh.get_group("dp") if parallel_config.data_parallel > 1 and \
            not parallel_config.optimizer_shard else None
        self.loss = _ScaledLoss()
        schedule = Schedule1F1B if parallel_config.pipeline_schedule == "1f1b" else ScheduleGPipe
        # scale_grads=False: the loss function already divides by the step's targets (or micro-batches).
        self.schedule = schedule(PipelineStage(self.module, self.stage_index, stages, device, group=self.pp_group),
                                 micro_batches, loss_fn=self.loss, scale_grads=False)
        # Fetched after parallelize_model: FSDP2 replaces the parameters by DTensors.
        self.tied_weight, self.tied_group = None, None
        if base.config.tie_word_embeddings:
            self.tied_weight = base.transformer.word_embeddings.weight if self.first else \
                base.lm_head.weight if self.last else None
            self.tied_group = self._tied_group(mesh)

    def _tied_group(self, mesh):
        """The process group of the first and last stage of this rank's replica (None on the other stages).

        Every rank creates every such group (torch.distributed requires it), one per data-parallel rank.
        """
        grid = mesh.mesh  # [pp, dp] global ranks
        groups = [dist.new_group([int(grid[0, j]), int(grid[-1, j])]) for j in range(grid.shape[1])]
        return groups[mesh.get_local_rank("dp")] if self.first or self.last else None

    # ------------------------------------------------------------------------------ training

    def forward_backward(self, trainer, stream: Iterator[dict[str, torch.Tensor]], trainable: list[nn.Parameter],
                         per_epoch: int) -> tuple[float, int, float]:
        """One optimizer step's micro-batches through the schedule: forward, backward, tied gradients, clipping.

        The same contract as glm6b.train.loss.forward_backward: every stage takes the same
        gradient_accumulation_steps micro-batches from its stream.

        Returns:
            (the step's loss, the step's non-pad input tokens on all replicas, the gradient norm before
            clipping), the same on every rank.
        """
        args = trainer.args
        accum = args.gradient_accumulation_steps
        batches = [next(stream) for _ in range(accum)]
        dp = P.data_parallel_rank_and_size(trainer.mesh)[1]
        step_targets = P.all_reduce_sum(sum(count_target_tokens(b["labels"]) for b in batches), trainer.mesh)
        step_tokens = sum(int((b["input_ids"] != self.pad_id).sum()) for b in batches)
        if args.loss_normalization == "token":
            # times dp: DDP / FSDP2 average the replicas' gradients (see loss.forward_backward)
            self.loss.reduction, self.loss.scale = "sum", dp / max(step_targets, 1)
        else:
            self.loss.reduction, self.loss.scale = "mean", 1.0 / accum
        batches = [self._fixed_shape(b) for b in batches]
        input_ids = torch.cat([b["input_ids"] for b in batches]).to(self.device)
        labels = torch.cat([b["labels"] for b in batches]).to(self.device) if self.last else None
        losses: list[torch.Tensor] = []
        inputs, kwargs = ((input_ids,), {}) if self.first else ((), {"input_ids": input_ids})
        with trainer.autocast():
            self.schedule.step(*inputs, target=labels, losses=losses if self.last else None, return_outputs=False,
                               **kwargs)
        trainer.state.micro_batches += accum
        trainer.state.epoch, trainer.state.batch_index = divmod(trainer.state.micro_batches, per_epoch)
        self._average_replica_grads()
        self._sum_tied_grads()
        max_norm = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else float("inf")
        grad_norm = self._clip_grad_norm(trainable, max_norm)
        # Each scaled micro-batch loss is its share of the step's loss times dp (token) or of the
        # replica's mean of means (per_micro_batch): the sum over replicas / dp is the step's loss.
        replica_loss = self._pipeline_sum(sum(loss.item() for loss in losses))
        step_loss = P.all_reduce_sum(replica_loss, trainer.mesh) / dp
        return step_loss, round(P.all_reduce_sum(step_tokens, trainer.mesh)), grad_norm

    def _fixed_shape(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The micro-batch padded to [rows, width]: pad columns, and copies of row 0 with every label ignored."""
        input_ids, labels = batch["input_ids"], batch["labels"]
        rows, width = input_ids.shape
        if rows > self.rows or width > self.width:
            raise TrainerError(f"a training micro-batch of {rows} x {width} tokens does not fit the pipeline's "
                               f"{self.rows} x {self.width} (per_device_train_batch_size x max_source_length + "
                               f"max_target_length): under pipeline parallelism every micro-batch has one shape")
        input_ids = F.pad(input_ids, (0, self.width - width), value=self.pad_id)
        labels = F.pad(labels, (0, self.width - width), value=IGNORE_INDEX)
        extra = self.rows - rows
        input_ids = torch.cat([input_ids, input_ids[:1].expand(extra, -1)])
        labels = torch.cat([labels, torch.full((extra, self.width), IGNORE_INDEX, dtype=labels.dtype)])
        return {"input_ids": input_ids, "labels": labels}

    @torch.no_grad()
    def _average_replica_grads(self, bucket_numel: int = 1 << 24) -> None:
        """The mean of this stage's gradients over the data-parallel replicas (without optimizer_shard).

        Gradients are flattened into buckets of up to bucket_numel values of one dtype, one all-reduce each.
        """
        if self.replica_group is None:
            return
        replicas = dist.get_world_size(self.replica_group)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        buckets: list[list[torch.Tensor]] = []
        for grad in grads:
            last = buckets[-1] if buckets else None
            if last is None or last[0].dtype != grad.dtype or sum(g.numel() for g in last) + grad.numel() > bucket_numel:
                buckets.append([grad])
            else:
                last.append(grad)
        for bucket in buckets:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat, group=self.replica_group)
            flat /= replicas
            for grad, part in zip(bucket, flat.split([g.numel() for g in bucket])):
                grad.copy_(part.view_as(grad))

    @torch.no_grad()
    def _sum_tied_grads(self) -> None:
        """Sum the gradients of the two copies of the tied embedding / lm_head (first and last stage)."""
        if self.tied_group is None or self.tied_weight is None or self.tied_weight.grad is None:
            return  # a frozen matrix (LoRA) has no gradient on either stage
        grad = self.tied_weight.grad
        local = grad.to_local() if hasattr(grad, "to_local") else grad  # an FSDP2 shard: the same shard on both
        dist.all_reduce(local, group=self.tied_group)

    def _clip_grad_norm(self, trainable: list[nn.Parameter], max_norm: float) -> float:
        """Clip by the norm of all stages' gradients together, the tied matrix counted once."""
        counted = [p for p in trainable if not (self.last and not self.first and p is self.tied_weight)]
        squared = P.grad_norm(counted).double().to(self.device) ** 2
        dist.all_reduce(squared, group=self.pp_group)
        total = squared.sqrt().float()
        if max_norm != float("inf"):
            P.clip_grads_with_norm_(trainable, max_norm, total)
        return float(total)

    def _pipeline_sum(self, value: float) -> float:
        """The sum of a scalar over the stages of this replica."""
        tensor = torch.tensor(value, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, group=self.pp_group)
        return float(tensor)

    # ------------------------------------------------------------------------------ forward only

    def _send(self, x: torch.Tensor) -> None:
        header = torch.tensor([_ACTIVATION_DTYPES.index(x.dtype)], device=self.device)
        dist.send(header, group=self.pp_group, group_dst=self.stage_index + 1)
        dist.send(x.contiguous(), group=self.pp_group, group_dst=self.stage_index + 1)

    def _recv(self, shape: tuple[int, ...]) -> torch.Tensor:
        header = torch.empty(1, dtype=torch.long, device=self.device)
        dist.recv(header, group=self.pp_group, group_src=self.stage_index - 1)
        x = torch.empty(shape, dtype=_ACTIVATION_DTYPES[int(header)], device=self.device)
        dist.recv(x, group=self.pp_group, group_src=self.stage_index - 1)
        return x

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, kv_cache: StageKVCache | None = None,
                last_token_only: bool = False) -> torch.Tensor | None:
        """The model's forward through every stage in turn (no schedule: evaluation and generation).

        Collective over the pipeline: every stage calls it with the same ids (and positions / mask).

        Returns:
            The logits [B, T, V] ([B, 1, V] with last_token_only) on the last stage, None elsewhere.
        """
        input_ids = input_ids.to(self.device)
        batch, length = input_ids.shape
        hidden = P.unwrap_model(self.model).config.hidden_size
        x = input_ids if self.first else self._recv((batch, length, hidden))
        out = self.module(x, input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                          kv_cache=kv_cache, last_token_only=last_token_only)
        if self.last:
            return out
        self._send(out)
        return None

    @torch.no_grad()
    def loss_sums(self, trainer, dataset) -> tuple[float, int]:
        """Teacher-forced evaluation through the pipeline: (sum of the token losses, target tokens) of `dataset`.

        Every rank of the pipeline runs every batch; the last stage computes the loss and the sum is
        shared with the other stages.
        """
        total, tokens = 0.0, 0
        bs = trainer.args.per_device_eval_batch_size
        for start in range(0, len(dataset), bs):
            batch = dataset.collate([dataset[i] for i in range(start, min(start + bs, len(dataset)))])
            with trainer.autocast():
                logits = self.forward(batch["input_ids"])
            if self.last:
                total += causal_lm_loss(logits, batch["labels"].to(self.device), reduction="sum").item()
            tokens += count_target_tokens(batch["labels"])
        return self._pipeline_sum(total), tokens

    @torch.no_grad()
    def generate(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, generation_config: GenerationConfig | None = None,
                 tokenizer=None) -> torch.Tensor:
        """glm6b.inference.generation.generate through the pipeline (greedy or sampled, one answer per prompt).

        The prompt is prefilled stage by stage into each stage's KV cache of its own blocks; then every
        step feeds one token per row. The last stage chooses the tokens (glm6b.inference.sampling) and
        sends them to the other stages, so every stage stops at the same step. A new token sees what the
        last prompt token saw and every generated token; its absolute position stays at the mask token and
        its block position counts on (spec 4.8). Collective over the pipeline.

        Args:
            model: unused (the signature of generate, for glm6b.eval.evaluate's generate_fn).
            input_ids, attention_mask, position_ids: as for generate (the tokenizer's left-padded batch).
            generation_config: the settings (num_beams and num_return_sequences must be 1).
            tokenizer: for stop_strings.

        Returns:
            [B, T + N] token ids, prompt included, finished rows filled with pad (on every stage).
        """
        config = make_generation_config(generation_config)
        if config.num_beams > 1 or config.num_return_sequences > 1:
            raise ValueError("generation under pipeline parallelism: num_beams and num_return_sequences must be 1")
        base = P.unwrap_model(self.model)
        mcfg = base.config
        input_ids = input_ids.to(self.device)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        mask, positions = prompt_inputs(input_ids, mcfg, None if attention_mask is None else attention_mask.to(
            self.device), None if position_ids is None else position_ids.to(self.device))
        batch, prompt_len = input_ids.shape
        new_tokens = new_token_budget(config, prompt_len)
        eos_ids = config.eos_token_id if config.eos_token_id is not None else mcfg.eos_token_id
        eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
        pad_id = config.pad_token_id if config.pad_token_id is not None else mcfg.pad_token_id
        first_block = base.transformer.layers[str(self.layer_ids[0])]
        cache = StageKVCache(mcfg, self.layer_ids, batch, prompt_len + new_tokens,
                             first_block.input_layernorm.weight.dtype, self.device)
        logits = self.forward(input_ids, positions, mask, cache, last_token_only=True)
        cache.advance(prompt_len)
        visible = ~mask[:, :, -1:, :]  # [B, 1, 1, T]: what the last prompt token saw
        next_position = positions[:, :, -1] + torch.tensor([0, 1], device=self.device)  # [B, 2]
        settings, generators = [config] * batch, row_generators(config.seed, batch)
        eos = torch.tensor(eos_ids, device=self.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        sequences = input_ids
        for step in range(new_tokens):
            tokens = torch.empty(batch, dtype=torch.long, device=self.device)
            if self.last:
                scores = process_scores(logits[:, -1], settings, sequences, eos_ids[0])
                tokens = choose_tokens(scores, settings, generators).to(self.device)
            dist.broadcast(tokens, group=self.pp_group, group_src=self.num_stages - 1)
            tokens = torch.where(finished, torch.full_like(tokens, pad_id), tokens)
            sequences = torch.cat([sequences, tokens[:, None]], dim=1)
            finished = finished | torch.isin(tokens, eos)
            if config.stop_strings:
                for row in (~finished).nonzero().flatten().tolist():
                    text = tokenizer.decode(sequences[row, prompt_len:].tolist())
                    finished[row] = any(s in text for s in config.stop_strings)
            if bool(finished.all()) or step == new_tokens - 1:
                break
            visible = torch.cat([visible, torch.ones_like(visible[..., :1])], dim=-1)
            logits = self.forward(tokens[:, None], next_position[:, :, None], ~visible, cache)
            cache.advance(1)
            next_position[:, 1] += 1
        return sequences

    # ------------------------------------------------------------------------------ final/

    def save_final_model(self, directory: str | Path, tokenizer=None) -> Path:
        """Write final/ as one process writes it (HF folder, or the LoRA adapter folder).

        Collective: every stage writes its tensors into a sharded checkpoint beside `directory`; rank 0
        reads them back whole, writes `directory` (glm6b.train.export.write_final_folder) and removes
        the sharded copy.
        """
        from .dcp import load_full_model_state, save_sharded
        from .export import write_final_folder

        directory = Path(directory)
        shards = directory.with_name(directory.name + ".stages")
        save_sharded({"model": self.model}, shards, tokenizer=tokenizer)
        if P.is_main_process():
            write_final_folder(self.model, load_full_model_state(shards), directory, tokenizer=tokenizer)
            shutil.rmtree(shards)
        P.barrier()
        return directory
