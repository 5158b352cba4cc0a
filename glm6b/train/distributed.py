"""Scale-out building blocks: process groups from torchrun, the ("dp", "tp") mesh, tensor parallelism,
FSDP2 / DDP, sharded (DCP) checkpoints and their merge into an HF folder, rank-0 helpers.

Launch (one machine; add torchrun's --nnodes/--rdzv-* flags for several):

    torchrun --nproc-per-node 4 -m glm6b run --config lora.yaml --mode finetune

with a `parallel:` recipe section named as MindFormers names it:

    parallel:
      data_parallel: 2      # model replicas; each sees its own slice of every global batch
      model_parallel: 2     # tensor parallel: whole heads / MLP columns per rank
      optimizer_shard: true # FSDP2: shard params, grads and AdamW state over the data-parallel ranks
      micro_batch_num: 1    # gradient accumulation (micro-batches per optimizer step)
      pipeline_stage: 1     # must be 1: pipeline parallelism is not supported

Everything is applied from outside the model (torchtitan's habit). `parallelize_model` runs the steps
in the order that composes: tensor parallel first (it turns weights into DTensors on the "tp" mesh),
then FSDP2 over the "dp" mesh (it shards those DTensors again, giving 2-D params), or DDP when the
optimizer state is not sharded. Activation checkpointing stays the model's own flag
(`model.gradient_checkpointing_enable()`); it wraps each block call, FSDP hooks included, and works
under all three.

On one process (no torchrun, or WORLD_SIZE=1) everything here is a no-op or runs locally: DCP
checkpoints are written and read without a process group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import ChatGLMConfig, ConfigError
from ..model import ChatGLMForConditionalGeneration, GLMBlock

# Files a DCP checkpoint folder holds besides DCP's own (.metadata, __<rank>_<n>.distcp).
CHECKPOINT_INFO_NAME = "glm6b_checkpoint.json"
CHECKPOINT_FORMAT = "glm6b-dcp"
MODEL_KEY = "model"
OPTIMIZER_KEY = "optimizer"
PEFT_PREFIX = "base_model.model."
TOKENIZER_FILES = ("ice_text.model", "tokenizer_config.json")


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


# ----------------------------------------------------------------------------------- process group


@dataclass(frozen=True)
class DistributedInfo:
    """Where this process sits: global rank, rank on its node, process count, and its device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise RuntimeError(f"environment variable {name} is not set: launch with torchrun "
                               f"(`torchrun --nproc-per-node N -m glm6b ...`)")
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(timeout_s: float | None = None) -> DistributedInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Backend: NCCL when CUDA is available (and the process is pinned to cuda:LOCAL_RANK), else gloo.
    Without torchrun (no WORLD_SIZE) or with WORLD_SIZE=1 nothing is initialised. Calling it again
    once initialised just returns the info.

    Args:
        timeout_s: collective timeout in seconds (None: PyTorch's default).

    Returns:
        DistributedInfo of this process.

    Raises:
        RuntimeError: WORLD_SIZE > 1 but RANK/LOCAL_RANK/MASTER_ADDR missing, or LOCAL_RANK beyond
            the visible GPUs.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    use_cuda = torch.cuda.is_available()
    if world_size <= 1 and not (dist.is_available() and dist.is_initialized()):
        return DistributedInfo(device=torch.device("cuda" if use_cuda else "cpu"))
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    device = torch.device("cpu")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible: "
                               f"use --nproc-per-node <= the GPUs per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise RuntimeError("MASTER_ADDR/MASTER_PORT are not set: launch with torchrun")
        kwargs: dict[str, Any] = {}
        if timeout_s is not None:
            kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
        if use_cuda:
            kwargs["device_id"] = device  # eager NCCL init: a bad setup fails here, not at the first collective
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size, **kwargs)
    return DistributedInfo(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size(),
                           device=device)


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Process count (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on global rank 0, and on a single process: the one that writes logs, plots and final outputs."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op on one process)."""
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (no-op if none); call it at the end of the run, also on errors."""
    if is_distributed():
        dist.destroy_process_group()


def build_mesh(parallel_config: ParallelConfig, device_type: str | None = None):
    """The [data_parallel, model_parallel] DeviceMesh with dims ("dp", "tp").

    Args:
        parallel_config: the layout (validated against the world size here).
        device_type: "cuda" or "cpu"; default cuda if available.

    Returns:
        The DeviceMesh, or None on a single process without a process group (nothing to parallelise).

    Raises:
        ConfigError: the layout does not match the process count.
    """
    parallel_config.validate(get_world_size())
    if not is_distributed():
        return None
    from torch.distributed.device_mesh import init_device_mesh

    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    return init_device_mesh(device_type, (parallel_config.data_parallel, parallel_config.model_parallel),
                            mesh_dim_names=("dp", "tp"))


def data_parallel_rank_and_size(mesh) -> tuple[int, int]:
    """(rank, size) along "dp": what DistributedSampler needs (tensor-parallel peers share the data)."""
    if mesh is None:
        return 0, 1
    return mesh.get_local_rank("dp"), mesh.size(mesh.mesh_dim_names.index("dp"))


def distributed_sampler(dataset, mesh, shuffle: bool = True, seed: int = 0, drop_last: bool = True):
    """A DistributedSampler over the data-parallel ranks (not the global ranks).

    Every rank must pass the same `seed`; call `sampler.set_epoch(epoch)` before each epoch so the
    order changes between epochs. drop_last=True gives every replica the same number of batches
    (an extra micro-batch on some ranks would hang the gradient all-reduce).
    """
    from torch.utils.data.distributed import DistributedSampler

    rank, size = data_parallel_rank_and_size(mesh)
    return DistributedSampler(dataset, num_replicas=size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)


def data_parallel_shard(indices, mesh) -> list[int]:
    """This data-parallel rank's contiguous share of one global batch's row indices.

    For a trainer that builds its own deterministic order of global batches (resumable by position)
    instead of using DistributedSampler: every rank builds the same global batch of
    per_device_batch_size * dp rows and keeps its slice. Rows beyond a multiple of dp are dropped,
    so every replica runs the same number of equal-sized micro-batches.

    Raises:
        ValueError: fewer rows than data-parallel ranks.
    """
    rank, size = data_parallel_rank_and_size(mesh)
    indices = list(indices)
    per_rank = len(indices) // size
    if per_rank == 0:
        raise ValueError(f"a global batch of {len(indices)} row(s) cannot be split over {size} data-parallel ranks")
    return indices[rank * per_rank:(rank + 1) * per_rank]


def rank_seed(seed: int, mesh) -> int:
    """The torch seed for this rank: seed + dp rank.

    Replicas get different dropout masks, but the tensor-parallel ranks of one replica must draw the
    *same* ones (LoRA dropout acts on the replicated input of a split layer; different masks would
    give each rank a different gradient for the replicated lora_A weight, and the ranks would drift).
    """
    return seed + data_parallel_rank_and_size(mesh)[0]


# ----------------------------------------------------------------------------------- rank-0 helpers


def rank_zero_only(fn: Callable) -> Callable:
    """Decorate a function that writes (logs, plots, final outputs) so it runs on rank 0 only (None elsewhere)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if is_main_process():
            return fn(*args, **kwargs)
        return None

    return wrapper


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. builds a data cache), the others after it, then all meet.

    Every rank must enter the block (it holds barriers).
    """
    if not is_main_process():
        barrier()
    try:
        yield
    finally:
        if is_main_process():
            barrier()


def all_reduce_mean(value: float | torch.Tensor, mesh=None) -> float:
    """Mean of a scalar over the data-parallel ranks (all ranks if mesh is None), e.g. for the logged loss."""
    tensor = torch.as_tensor(value, dtype=torch.float64).detach().clone()
    if not is_distributed():
        return float(tensor)
    group = mesh.get_group("dp") if mesh is not None else None
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    tensor = tensor.to(device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return float(tensor) / dist.get_world_size(group)


# ----------------------------------------------------------------------------------- tensor parallel


def _lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A") and hasattr(module, "lora_B")


def tensor_parallel_plan(block: nn.Module) -> dict[str, Any]:
    """parallelize_module plan for one GLMBlock (module paths relative to the block).

    query_key_value: its 3H output rows are laid out per head ([nh, 3d], q|k|v inside each head,
    spec 4.1), so a contiguous ColwiseParallel split of the rows into tp chunks gives rank r the
    heads [r * nh/tp, (r+1) * nh/tp) with their own q, k and v: no permutation is needed.
    dense then takes those heads' context columns (RowwiseParallel: input split on the last dim,
    output all-reduced). dense_h_to_4h / dense_4h_to_h are the same pair for the MLP (gelu is
    elementwise, so it runs on the local columns).

    A PEFT LoRA layer (base_layer + lora_A/lora_B) is split like its base: column-wise, lora_B is
    split the same way (its rows follow the base's output rows) and lora_A stays replicated;
    row-wise, lora_A is split by input columns and lora_B stays replicated.
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    styles = {
        "attention.query_key_value": "col",
        "attention.dense": "row",
        "mlp.dense_h_to_4h": "col",
        "mlp.dense_4h_to_h": "row",
    }
    plan: dict[str, Any] = {}
    for path, kind in styles.items():
        module = block.get_submodule(path)
        style = ColwiseParallel if kind == "col" else RowwiseParallel
        if _lora_layer(module):
            plan[f"{path}.base_layer"] = style()
            split = module.lora_B if kind == "col" else module.lora_A
            for adapter in split:
                plan[f"{path}.{'lora_B' if kind == 'col' else 'lora_A'}.{adapter}"] = style()
        elif isinstance(module, nn.Linear):
            plan[path] = style()
        else:
            raise TypeError(f"tensor parallel: {path} is a {type(module).__name__}; expected nn.Linear or a PEFT "
                            f"LoRA layer")
    return plan


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> nn.Module:
    """Split every GLMBlock's four projections over `tp_mesh` (in place; see `tensor_parallel_plan`).

    The word embeddings and the tied lm_head stay replicated on every tp rank (the simplest correct
    choice: the tie survives, and the logits and loss are whole on each rank; the cost is the
    [V, H] matrix and its gradient on every rank). LayerNorms stay replicated too: their inputs and
    output gradients are identical on all tp ranks, so their gradients agree without communication.

    Each attention module's `num_heads` is set to the local head count (the model's reshapes use -1,
    so they do not depend on it). Apply it to the PEFT-wrapped model if LoRA is used (LoRA first,
    then parallelism); P-tuning is not supported (the prefix is not split by head).

    Args:
        model: ChatGLMForConditionalGeneration or a PeftModel around one, on the mesh's device type.
        tp_mesh: the 1-D "tp" mesh (`mesh["tp"]`).

    Returns:
        The same model.
    """
    from torch.distributed.tensor.parallel import parallelize_module

    tp = tp_mesh.size()
    blocks = [m for m in model.modules() if isinstance(m, GLMBlock)]
    if not blocks:
        raise TypeError(f"tensor parallel: no GLMBlock in {type(model).__name__}")
    for block in blocks:
        heads = block.attention.num_heads
        if heads % tp:
            raise ConfigError(f"parallel.model_parallel = {tp} must divide num_attention_heads ({heads})")
        parallelize_module(block, tp_mesh, tensor_parallel_plan(block))
        block.attention.num_heads = heads // tp  # heads held by this rank
    return model


# ----------------------------------------------------------------------------------- FSDP2 / DDP


def _mixed_precision_policy(mixed_precision):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mixed_precision is None or isinstance(mixed_precision, MixedPrecisionPolicy):
        return mixed_precision or MixedPrecisionPolicy()
    dtype = mixed_precision
    if isinstance(dtype, str):
        dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                 "float16": torch.float16}.get(dtype)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"mixed_precision={mixed_precision!r}: expected None, 'bf16', torch.bfloat16 or a "
                         f"MixedPrecisionPolicy")
    # Compute in `dtype`, but reduce-scatter gradients in float32: summing many ranks' bf16
    # gradients would lose the low bits that AdamW's float32 master weights keep.
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def apply_fsdp(model: nn.Module, dp_mesh, mixed_precision=None, reshard_after_forward: bool = True) -> nn.Module:
    """Shard parameters, gradients and optimizer state over `dp_mesh` with FSDP2 (in place).

    Order (torchtitan's): each GLMBlock becomes its own FSDP unit first, then the root takes what
    is left (word embeddings = tied lm_head, final LayerNorm, a P-tuning prefix encoder). The tied
    embedding/lm_head must sit in one unit, which is why they stay with the root. Per-block units
    mean only one block's full parameters exist at a time (plus the prefetched next one).

    Works on a PEFT LoRA model (frozen base + float32 adapters in one unit: FSDP2 only needs the
    *trainable* parameters of a unit to share a dtype) and on P-tuning (frozen base). Call it after
    `apply_tensor_parallel` when both are used. Build the optimizer *after* this call: FSDP2
    replaces the parameters by sharded DTensors.

    Args:
        model: ChatGLMForConditionalGeneration or PeftModel, on the mesh's device type.
        dp_mesh: the 1-D "dp" mesh (`mesh["dp"]`).
        mixed_precision: None (compute in the parameters' dtype), "bf16"/torch.bfloat16 (bf16
            compute with float32 gradient reduction and float32 sharded master weights), or a
            MixedPrecisionPolicy.
        reshard_after_forward: free each block's gathered parameters after its forward (ZeRO-3;
            re-gathered in backward). False keeps them until backward (ZeRO-2: less communication,
            more memory).

    Returns:
        The same model (its class now also derives from FSDPModule).
    """
    from torch.distributed.fsdp import fully_shard

    policy = _mixed_precision_policy(mixed_precision)
    blocks = [m for m in model.modules() if isinstance(m, GLMBlock)]
    for i, block in enumerate(blocks):
        # The last block's parameters would be gathered again right away by backward (it runs
        # first), so keeping them saves one all-gather at the cost of one block of memory.
        last = i == len(blocks) - 1
        fully_shard(block, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward and not last)
    # The root last: it owns what no block claimed, and its hooks start the first all-gathers.
    fully_shard(model, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def apply_ddp(model: nn.Module, dp_mesh, device: torch.device | None = None) -> nn.Module:
    """Wrap the model in DistributedDataParallel over `dp_mesh` (full replicas, gradients all-reduced).

    DDP wraps: the returned module's `.module` is the model (see `unwrap_parallel`); its state-dict
    keys are handled by `save_sharded`/`load_sharded`. Not composable with tensor parallelism.

    Args:
        model: the model, already on `device`.
        dp_mesh: the 1-D "dp" mesh.
        device: this process's device (its CUDA index is passed to DDP); None uses the model's.

    Returns:
        The DDP wrapper.
    """
    from torch.nn.parallel import DistributedDataParallel

    device = device or next(model.parameters()).device
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, process_group=dp_mesh.get_group())


def parallelize_model(model: nn.Module, mesh, parallel_config: ParallelConfig, mixed_precision=None,
                      device: torch.device | None = None) -> nn.Module:
    """Apply the layout of `parallel_config`: tensor parallel, then FSDP2 (optimizer_shard) or DDP.

    Call it after the model is on its device, LoRA-wrapped/frozen for the method and (optionally)
    `gradient_checkpointing_enable()`d, and before building the optimizer.

    Args:
        model: ChatGLMForConditionalGeneration or PeftModel.
        mesh: from `build_mesh` (None: single process, nothing done).
        parallel_config: the layout.
        mixed_precision: FSDP2 only, see `apply_fsdp`.
        device: for DDP.

    Returns:
        The module to train (a DDP wrapper under DDP, else `model` itself).
    """
    if mesh is None:
        return model
    if parallel_config.model_parallel > 1:
        apply_tensor_parallel(model, mesh["tp"])
    if parallel_config.optimizer_shard:
        return apply_fsdp(model, mesh["dp"], mixed_precision=mixed_precision)
    if parallel_config.data_parallel > 1:
        return apply_ddp(model, mesh["dp"], device=device)
    return model


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The module under a DDP wrapper (FSDP2 and tensor parallelism do not wrap): e.g. the PeftModel."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def no_sync(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Skip DDP's gradient all-reduce inside the block (for all micro-batches but the last).

    Under FSDP2 this does nothing: gradients are reduce-scattered every micro-batch, which keeps
    them sharded (skipping it would hold full unsharded gradients between micro-batches).
    """
    from torch.nn.parallel import DistributedDataParallel

    if enabled and isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        yield


def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ that also handles sharded (DTensor) and mixed gradients.

    Under FSDP2 / tensor parallelism a gradient may be a DTensor shard; its norm is reduced over its
    mesh. Gradients are grouped by (mesh, placements) so each group costs one reduction; plain
    tensors (replicated parameters) are counted once. Returns the total norm as a plain tensor
    (identical on every rank); max_norm=inf only measures it.
    """
    from torch.distributed.tensor import DTensor

    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    groups: dict[Any, list[torch.Tensor]] = {}
    for g in grads:
        key = (id(g.device_mesh), g.placements) if isinstance(g, DTensor) else ("plain", g.device)
        groups.setdefault(key, []).append(g)
    norms = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm(group, norm_type=norm_type)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        norms.append(norm)
    device = norms[0].device
    total = torch.nn.utils.get_total_norm([n.to(device) for n in norms], norm_type=norm_type)
    for group in groups.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


# ----------------------------------------------------------------------------------- DCP checkpoints


def _model_parts(model: nn.Module) -> tuple[nn.Module, ChatGLMForConditionalGeneration, Any]:
    """(unwrapped module, the ChatGLM model, PEFT config or None)."""
    module = unwrap_parallel(model)
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    if not isinstance(base, ChatGLMForConditionalGeneration):
        raise TypeError(f"expected a ChatGLMForConditionalGeneration (or a PeftModel / DDP around one), "
                        f"got {type(base).__name__}")
    peft_config = None
    if hasattr(module, "peft_config"):
        peft_config = module.peft_config[getattr(module, "active_adapter", "default")]
    return module, base, peft_config


def _state_dict_options(trainable_only: bool, full: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # strict=False when only trainable tensors are stored: the frozen base is then not in the
    # checkpoint by design (DCP itself still fails on any requested key it cannot find).
    return StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only, full_state_dict=full)


def _tied_keys(model: nn.Module) -> tuple[str, str] | None:
    """(lm_head key, word-embedding key) when lm_head is tied to the embeddings (as state-dict keys)."""
    module, base, peft_config = _model_parts(model)
    if not base.config.tie_word_embeddings:
        return None
    prefix = PEFT_PREFIX if peft_config is not None else ""
    return prefix + "lm_head.weight", prefix + "transformer.word_embeddings.weight"


def _train_state_dicts(model: nn.Module, optimizer, trainable_only: bool) -> dict[str, Any]:
    """{"model": ..., "optimizer": ...} as DCP stores them (FQN keys, DTensor shards where sharded).

    The tied lm_head is left out (it is the word-embedding matrix: storing it twice costs V x H
    values), and with trainable_only so is every frozen tensor (get_state_dict's
    ignore_frozen_params keeps the tied alias of a frozen embedding, hence the explicit filter).
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    options = _state_dict_options(trainable_only)
    if optimizer is None:
        model_sd, optim_sd = get_model_state_dict(model, options=options), None
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    tied = _tied_keys(model)
    if tied:
        model_sd.pop(tied[0], None)
    if trainable_only:
        trainable = {name for name, p in unwrap_parallel(model).named_parameters() if p.requires_grad}
        model_sd = {k: v for k, v in model_sd.items() if k in trainable}
    payload = {MODEL_KEY: model_sd}
    if optim_sd is not None:
        payload[OPTIMIZER_KEY] = optim_sd
    return payload


def _checkpoint_kind(base: ChatGLMForConditionalGeneration, peft_config) -> str:
    if peft_config is not None:
        return "lora"
    return "ptuning" if base.config.pre_seq_len else "full"


def _copy_tokenizer(tokenizer, folder: Path) -> None:
    if tokenizer is None:
        return
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)
        return
    source = Path(tokenizer)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)


def save_sharded(state: dict[str, Any], directory: str | os.PathLike, *, tokenizer=None,
                 parallel_config: ParallelConfig | None = None, trainable_only: bool | None = None) -> Path:
    """Write a training checkpoint with torch.distributed.checkpoint: every rank writes its own shard.

    Collective: every rank calls it with the same directory. The folder is written as
    `<directory>.tmp` and renamed to `<directory>` by rank 0 once every rank has finished (an older
    `<directory>` is replaced), so a crash mid-save never leaves a folder under the final name.
    Besides DCP's files it holds config.json, the tokenizer files, adapter_config.json (LoRA) and
    glm6b_checkpoint.json, so `merge_checkpoint` needs nothing else. It loads back with any process
    count and layout (DCP reshards): `load_sharded`.

    Args:
        state: {"model": the model (DDP/FSDP/TP/PEFT-wrapped or plain; required),
            "optimizer": its optimizer (optional), any other key: an object with
            state_dict()/load_state_dict() (LR scheduler, ...) or a plain value (ints, floats,
            strings, tensors, lists and dicts of them) that is the same on every rank, or one that
            only its rank saves under a key of its own (e.g. f"rng_rank{rank}": per-rank RNG
            states; a resume with another world size must check `read_checkpoint_info(d)["keys"]`
            before asking for it)}.
        directory: the checkpoint folder (on a filesystem every rank sees).
        tokenizer: a tokenizer (its save_pretrained is called) or a folder to copy ice_text.model and
            tokenizer_config.json from.
        parallel_config: recorded in glm6b_checkpoint.json (informative).
        trainable_only: store only parameters with requires_grad (and their optimizer state). None:
            automatically when some parameters are frozen (LoRA, P-tuning): their base weights then
            come from the base model, as for the adapter folders.

    Returns:
        The final folder.
    """
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    model = state[MODEL_KEY]
    module, base, peft_config = _model_parts(model)
    adapter_name = getattr(module, "active_adapter", "default") if peft_config is not None else None
    if trainable_only is None:
        trainable_only = any(not p.requires_grad for p in model.parameters())
    payload = _train_state_dicts(model, state.get(OPTIMIZER_KEY), trainable_only)
    for key, value in state.items():
        if key not in (MODEL_KEY, OPTIMIZER_KEY):
            payload[key] = value  # DCP calls state_dict() on objects that have one (Stateful)

    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed save
        tmp.mkdir(parents=True)
    barrier()
    with _quiet_single_process():
        dcp.save(payload, checkpoint_id=str(tmp))
    if is_main_process():
        info = {"format": CHECKPOINT_FORMAT, "version": 1, "kind": _checkpoint_kind(base, peft_config),
                "trainable_only": trainable_only, "world_size": get_world_size(), "adapter_name": adapter_name,
                "parallel": dataclasses.asdict(parallel_config) if parallel_config else None,
                "keys": _saved_keys(tmp)}
        dtype_name = str(base.transformer.word_embeddings.weight.dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(base.config.replace(torch_dtype=dtype_name).to_json_string(),
                                         encoding="utf-8")
        if peft_config is not None:
            peft_config.save_pretrained(str(tmp))
        _copy_tokenizer(tokenizer, tmp)
        (tmp / CHECKPOINT_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    barrier()  # every shard is on disk before the folder gets its final name
    if is_main_process():
        if directory.exists():
            old = directory.with_name(directory.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old)
        else:
            os.replace(tmp, directory)
    barrier()  # nobody reads or prunes the folder before it exists under its name
    return directory


def _saved_keys(directory: Path) -> list[str]:
    """Top-level keys of a DCP checkpoint, from every rank's plan (a rank may save keys of its own)."""
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(directory)).read_metadata()
    return sorted({path[0] for path in (metadata.planner_data or {}).values()} or metadata.state_dict_metadata)


def is_sharded_checkpoint(directory: str | os.PathLike) -> bool:
    """True for a folder written by `save_sharded`."""
    return (Path(directory) / CHECKPOINT_INFO_NAME).is_file() and (Path(directory) / ".metadata").is_file()


def read_checkpoint_info(directory: str | os.PathLike) -> dict[str, Any]:
    """glm6b_checkpoint.json of a sharded checkpoint: kind, trainable_only, world_size, parallel, keys.

    Raises:
        CheckpointError: not a folder written by `save_sharded`.
    """
    from ..checkpoint.hf import CheckpointError

    directory = Path(directory)
    if not is_sharded_checkpoint(directory):
        what = "does not exist" if not directory.exists() else f"has no {CHECKPOINT_INFO_NAME} and .metadata"
        raise CheckpointError(f"{directory} {what}: expected a sharded (DCP) checkpoint written by "
                              f"glm6b.train.distributed.save_sharded")
    try:
        info = json.loads((directory / CHECKPOINT_INFO_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{directory / CHECKPOINT_INFO_NAME}: cannot read ({e})") from None
    if info.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{directory / CHECKPOINT_INFO_NAME}: format {info.get('format')!r}, expected "
                              f"{CHECKPOINT_FORMAT!r}")
    return info


def load_sharded(state: dict[str, Any], directory: str | os.PathLike) -> dict[str, Any]:
    """Load a `save_sharded` checkpoint into `state`, in place, with any process count or layout.

    Collective: every rank calls it. Build and parallelize the model (and its optimizer) exactly as
    for training first; DCP reads the pieces each rank's shards need, whatever layout wrote them.

    Args:
        state: the same keys as given to `save_sharded` (a subset is fine): the model and
            optimizer are loaded in place, Stateful objects through load_state_dict, and plain
            values are replaced in the dict by the saved ones.
        directory: the checkpoint folder.

    Returns:
        `state`.

    Raises:
        CheckpointError: not a sharded checkpoint, a key missing from it, or a LoRA/full mismatch.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from ..checkpoint.hf import CheckpointError

    directory = Path(directory)
    info = read_checkpoint_info(directory)
    model = state[MODEL_KEY]
    _, base, peft_config = _model_parts(model)
    kind = _checkpoint_kind(base, peft_config)
    if kind != info["kind"]:
        raise CheckpointError(f"{directory} is a {info['kind']} checkpoint; the model to load it into is {kind}")
    missing = [k for k in state if k not in info["keys"]]
    if missing:
        raise CheckpointError(f"{directory} has no {', '.join(missing)} (it holds {', '.join(info['keys'])})")
    trainable_only = info["trainable_only"]
    optimizer = state.get(OPTIMIZER_KEY)
    payload = _train_state_dicts(model, optimizer, trainable_only)
    plain = []
    for key, value in state.items():
        if key in (MODEL_KEY, OPTIMIZER_KEY):
            continue
        if hasattr(value, "state_dict") and hasattr(value, "load_state_dict"):
            payload[key] = value  # Stateful: dcp.load fills its state_dict() and calls load_state_dict
        else:
            plain.append(key)
    try:
        with _quiet_single_process():
            dcp.load(payload, checkpoint_id=str(directory))
    except (Exception, dcp.CheckpointException) as e:  # noqa: BLE001 - CheckpointException is a BaseException
        raise CheckpointError(f"{directory}: cannot load the sharded checkpoint into this model: "
                              f"{_dcp_reason(e)}") from e
    tied = _tied_keys(model)
    if tied and tied[1] in payload[MODEL_KEY]:
        payload[MODEL_KEY][tied[0]] = payload[MODEL_KEY][tied[1]]  # the same tensor, for a strict load
    set_state_dict(model, optimizer if optimizer is not None else [],
                   model_state_dict=payload[MODEL_KEY], optim_state_dict=payload.get(OPTIMIZER_KEY, {}),
                   options=_state_dict_options(trainable_only))
    if plain:
        # Plain values are read whole by every rank (they were the same on every rank when saved),
        # whatever the caller's placeholder holds: {} gets the saved dict back.
        state.update(_read_entries(directory, set(plain)))
    return state


def _dcp_reason(exc: BaseException) -> str:
    """One line from a DCP failure: the first failing rank's own error, not DCP's wrapper text."""
    failures = getattr(exc, "failures", None)
    if failures:
        rank, cause = sorted(failures.items())[0]
        exc = cause[0] if isinstance(cause, tuple) else cause  # (exception, traceback frames) per rank
        text = f"{type(exc).__name__}: {exc}" + (f" (rank {rank})" if len(failures) < get_world_size() else "")
    else:
        text = f"{type(exc).__name__}: {exc}"
    line = " ".join(text.split())
    return line if len(line) <= 500 else line[:497] + "..."


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """Hide DCP's warning that no process group exists: one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (load|save) in a single process.*")
        yield


def _read_entries(directory: str | os.PathLike, keys: set[str]) -> dict[str, Any]:
    """Top-level entries of a DCP checkpoint, rebuilt whole from its metadata by this process alone."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    loaded: dict[str, Any] = {}
    # What format_utils.dcp_to_torch_save does, restricted to `keys`: the planner rebuilds the state
    # dict from the checkpoint's own metadata (full shapes). The private _load_state_dict fills
    # `loaded` itself (dcp.load would fill a copy). no_dist: no collective, so one rank may call it
    # alone (e.g. a merge at the end of a distributed run).
    _load_state_dict(loaded, storage_reader=dcp.FileSystemReader(str(directory)),
                     planner=_EmptyStateDictLoadPlanner(keys=keys), no_dist=True)
    return loaded


def load_full_model_state(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model tensors of a sharded checkpoint as one full state dict, read by this process alone.

    Only the "model" entries are read (not the optimizer state). No process group is used, so it
    can run in a plain `python` process, or on one rank of a distributed job.
    """
    read_checkpoint_info(directory)
    return _read_entries(directory, {MODEL_KEY})[MODEL_KEY]


def _strip_peft_prefix(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


@torch.no_grad()
def _base_model_from_state(config: ChatGLMConfig, tensors: dict[str, torch.Tensor], directory: Path):
    """Build the ChatGLM model from a full state dict (keys without any PEFT prefix); fail on any mismatch."""
    from ..checkpoint.hf import CheckpointError

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
      adapter_model.safetensors, + tokenizer files) for `glm6b.train.lora.load_adapter` /
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
    from ..checkpoint.hf import MODEL_FOLDER_FILES, MODEL_FOLDER_PREFIXES, CheckpointError, estimate_model_bytes
    from ..safety import check_output_dir, folder_bytes

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
    tmp = output_dir.with_name(output_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        writer(tmp, dtype)
        _copy_tokenizer(input_dir, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if output_dir.exists():
        shutil.rmtree(output_dir)
    os.replace(tmp, output_dir)
    return output_dir


def _merged_model(kind: str, tensors: dict[str, torch.Tensor], config: ChatGLMConfig, input_dir: Path,
                  base_model_path) -> ChatGLMForConditionalGeneration:
    """The full model: base weights (the checkpoint's own, or base_model_path's) + the trained tensors."""
    from ..checkpoint.hf import CheckpointError, load_model

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
    import peft

    from ..checkpoint.hf import CheckpointError, load_model

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
    from ..checkpoint.hf import save_pretrained

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
    from ..checkpoint.hf import PREFIX_ENCODER

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

    module, base, peft_config = _model_parts(model)
    kind = _checkpoint_kind(base, peft_config)
    trainable_only = kind != "full"
    # full_state_dict + cpu_offload: the full tensors land on rank 0's CPU only (the others get {}).
    tensors = get_model_state_dict(model, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only))
    directory = Path(directory)
    if is_main_process():
        tied = _tied_keys(model)
        if tied:
            tensors.pop(tied[0], None)
        if trainable_only:
            trainable = {name for name, p in module.named_parameters() if p.requires_grad}
            tensors = {k: v for k, v in tensors.items() if k in trainable}
        tmp = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if kind == "full":
            _write_model_folder(_base_model_from_state(base.config, dict(tensors), directory), tmp, None)
        elif kind == "lora":
            _write_adapter_weights(tensors, getattr(module, "active_adapter", "default"), tmp, None)
            peft_config.save_pretrained(str(tmp))
        else:
            _write_ptuning_folder(tensors, base.config, tmp, None)
        _copy_tokenizer(tokenizer, tmp)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    barrier()
    return directory


__all__ = [
    "ParallelConfig", "DistributedInfo", "init_distributed", "is_distributed", "get_rank", "get_world_size",
    "is_main_process", "barrier", "cleanup", "build_mesh", "data_parallel_rank_and_size", "distributed_sampler",
    "data_parallel_shard",
    "rank_seed", "rank_zero_only", "main_process_first", "all_reduce_mean", "tensor_parallel_plan",
    "apply_tensor_parallel", "apply_fsdp", "apply_ddp", "parallelize_model", "unwrap_parallel", "no_sync",
    "clip_grad_norm_", "save_sharded", "load_sharded", "is_sharded_checkpoint", "read_checkpoint_info",
    "load_full_model_state", "merge_checkpoint", "save_final_model",
]
