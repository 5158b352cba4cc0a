"""The parallelisation plan: process groups from torchrun, the ("dp", "tp") mesh (("pp", "dp") with pipeline
stages), tensor parallelism, FSDP2 / DDP, gradient clipping over sharded gradients, rank-0 helpers.

Launch (one machine; add torchrun's --nnodes/--rdzv-* flags for several):

    torchrun --nproc-per-node 4 -m glm6b run --config lora.yaml --mode finetune

with a `parallel:` recipe section named as MindFormers names it:

    parallel:
      data_parallel: 2      # model replicas; each sees its own slice of every global batch
      model_parallel: 2     # tensor parallel: whole heads / MLP columns per rank
      optimizer_shard: true # FSDP2: shard params, grads and AdamW state over the data-parallel ranks
      micro_batch_num: 1    # gradient accumulation (micro-batches per optimizer step)
      pipeline_stage: 1     # pipeline stages (glm6b.train.pipeline); not with model_parallel

Everything is applied from outside the model (torchtitan's habit). `parallelize_model` runs the steps
in the order that composes: tensor parallel first (it turns weights into DTensors on the "tp" mesh),
then FSDP2 over the "dp" mesh (it shards those DTensors again, giving 2-D params), or DDP when the
optimizer state is not sharded. Activation checkpointing stays the model's own flag
(`model.gradient_checkpointing_enable()`); it wraps each block call, FSDP hooks included, and works
under all three.


On one process (no torchrun, or WORLD_SIZE=1) everything here is a no-op. Sharded checkpoints are in
glm6b.train.dcp, the final-folder writing and the merge in glm6b.train.export, pipeline parallelism
(which splits the model before the data parallelism here is applied to each stage) in
glm6b.train.pipeline.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import ConfigError, ParallelConfig
from ..model import ChatGLMForConditionalGeneration, GLMBlock

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
    """The DeviceMesh of the layout: [data_parallel, model_parallel] with dims ("dp", "tp"), or with
    pipeline stages [pipeline_stage, data_parallel] with dims ("pp", "dp").

    The stage dimension is the outer one: a stage's data-parallel ranks are neighbours (on one
    node), since their gradient reduction moves far more bytes than the activations a stage
    hands to the next.

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
    if parallel_config.pipeline_stage > 1:
        return init_device_mesh(device_type, (parallel_config.pipeline_stage, parallel_config.data_parallel),
                                mesh_dim_names=("pp", "dp"))
    return init_device_mesh(device_type, (parallel_config.data_parallel, parallel_config.model_parallel),
                            mesh_dim_names=("dp", "tp"))


def data_parallel_rank_and_size(mesh) -> tuple[int, int]:
    """(rank, size) along "dp": what DistributedSampler needs (tensor-parallel peers and the stages of one
    pipeline share the data)."""
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


def all_reduce_sum(value: float | int | torch.Tensor, mesh=None) -> float:
    """Sum of a scalar over the data-parallel ranks (all ranks if mesh is None; the value itself on one process).

    Summed in float64, so token counts stay exact.
    """
    tensor = torch.as_tensor(value, dtype=torch.float64).detach().clone()
    if not is_distributed():
        return float(tensor)
    group = mesh.get_group("dp") if mesh is not None else None
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    tensor = tensor.to(device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return float(tensor)


def all_reduce_mean(value: float | torch.Tensor, mesh=None) -> float:
    """Mean of a scalar over the data-parallel ranks (all ranks if mesh is None), e.g. for the logged loss."""
    if not is_distributed():
        return float(torch.as_tensor(value, dtype=torch.float64))
    group = mesh.get_group("dp") if mesh is not None else None
    return all_reduce_sum(value, mesh) / dist.get_world_size(group)


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


def _grad_groups(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Tensors grouped by (mesh, placements): DTensors of one group reduce together, plain tensors apart."""
    from torch.distributed.tensor import DTensor

    groups: dict[Any, list[torch.Tensor]] = {}
    for t in tensors:
        key = (id(t.device_mesh), t.placements) if isinstance(t, DTensor) else ("plain", t.device)
        groups.setdefault(key, []).append(t)
    return list(groups.values())


def grad_norm(parameters, norm_type: float = 2.0) -> torch.Tensor:
    """The total norm of the parameters' gradients, also over sharded (DTensor) and mixed gradients.

    A DTensor shard's norm is reduced over its mesh (one reduction per (mesh, placements) group);
    plain tensors (replicated parameters) are counted once. Returns a plain tensor, identical on
    every rank of the meshes involved (0 when no parameter has a gradient).
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norms = []
    for group in _grad_groups(grads):
        norm = torch.nn.utils.get_total_norm(group, norm_type=norm_type)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        norms.append(norm)
    device = norms[0].device
    return torch.nn.utils.get_total_norm([n.to(device) for n in norms], norm_type=norm_type)


def clip_grads_with_norm_(parameters, max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale the gradients by max_norm / total_norm where that is below 1 (DTensor and plain gradients)."""
    # torch's clip_grads_with_norm_ takes the parameters (it scales their .grad), grouped as their gradients
    with_grads = [p for p in parameters if p.grad is not None]
    by_grad = {id(p.grad): p for p in with_grads}
    for grads in _grad_groups([p.grad for p in with_grads]):
        torch.nn.utils.clip_grads_with_norm_([by_grad[id(g)] for g in grads], max_norm, total_norm)


def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ that also handles sharded (DTensor) and mixed gradients.

    Under FSDP2 / tensor parallelism a gradient may be a DTensor shard; its norm is reduced over its
    mesh (see `grad_norm`). Returns the total norm as a plain tensor (identical on every rank);
    max_norm=inf only measures it.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    parameters = list(parameters)
    if not any(p.grad is not None for p in parameters):
        return torch.tensor(0.0)
    total = grad_norm(parameters, norm_type)
    clip_grads_with_norm_(parameters, max_norm, total)
    return total


def unwrap_model(model: nn.Module) -> ChatGLMForConditionalGeneration:
    """The ChatGLM model under DDP and PEFT wrappers (LoRA layers are injected in place), or `model` itself."""
    model = unwrap_parallel(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model
