"""Sharded training checkpoints with torch.distributed.checkpoint (DCP): every rank writes its own shard,
any process count and layout reads them back (DCP reshards); one process can read the full tensors.

A folder written by `save_sharded` holds DCP's files (.metadata, __<rank>_<n>.distcp) plus
config.json, the tokenizer files, adapter_config.json (LoRA) and glm6b_checkpoint.json (kind,
trainable_only, world size, layout, saved keys), so glm6b.train.export.merge_checkpoint needs
nothing else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint.hf import CheckpointError
from ..config import ParallelConfig
from ..io import commit_folder, staging_folder
from ..model import ChatGLMForConditionalGeneration
from .parallel import barrier, get_world_size, is_main_process, unwrap_parallel

# Files a DCP checkpoint folder holds besides DCP's own (.metadata, __<rank>_<n>.distcp).
CHECKPOINT_INFO_NAME = "glm6b_checkpoint.json"
CHECKPOINT_FORMAT = "glm6b-dcp"
MODEL_KEY = "model"
OPTIMIZER_KEY = "optimizer"
PEFT_PREFIX = "base_model.model."
TOKENIZER_FILES = ("ice_text.model", "tokenizer_config.json")


# ----------------------------------------------------------------------------------- DCP checkpoints


def model_parts(model: nn.Module) -> tuple[nn.Module, ChatGLMForConditionalGeneration, Any]:
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


def _state_dict_options(trainable_only: bool, full: bool = False, flat_optimizer: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # strict=False when only trainable tensors are stored: the frozen base is then not in the
    # checkpoint by design (DCP itself still fails on any requested key it cannot find).
    # flat_optimizer: the optimizer state keyed per parameter ("state.<name>.exp_avg",
    # "param_groups.<name>.lr"): pipeline stages hold different parameters, and a nested
    # param_groups list of names would differ from stage to stage.
    return StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only, full_state_dict=full,
                            flatten_optimizer_state_dict=flat_optimizer)


def tied_keys(model: nn.Module) -> tuple[str, str] | None:
    """(lm_head key, word-embedding key) when lm_head is tied to the embeddings (as state-dict keys)."""
    module, base, peft_config = model_parts(model)
    if not base.config.tie_word_embeddings:
        return None
    prefix = PEFT_PREFIX if peft_config is not None else ""
    return prefix + "lm_head.weight", prefix + "transformer.word_embeddings.weight"


def holds_lm_head_copy(model: nn.Module) -> bool:
    """True for the last stage of a pipeline: it holds the tied lm_head as its own copy, without the
    word embeddings (glm6b.train.pipeline keeps both copies equal; checkpoints store stage 0's)."""
    _, base, _ = model_parts(model)
    return (base.config.tie_word_embeddings and base.lm_head is not None
            and base.transformer.word_embeddings is None)


def _rename_parameter(payload: dict[str, Any], old: str, new: str) -> None:
    """Move parameter `old`'s model and optimizer entries (flat or nested optimizer state) to the name `new`."""
    model_sd = payload[MODEL_KEY]
    if old in model_sd:
        model_sd[new] = model_sd.pop(old)
    optim_sd = payload.get(OPTIMIZER_KEY)
    if optim_sd is None:
        return
    if "state" in optim_sd and "param_groups" in optim_sd:  # nested (checkpoints of version 1)
        if old in optim_sd["state"]:
            optim_sd["state"][new] = optim_sd["state"].pop(old)
        for group in optim_sd["param_groups"]:
            group["params"] = [new if name == old else name for name in group["params"]]
        return
    for key in list(optim_sd):
        for section in ("state.", "param_groups."):
            if key.startswith(f"{section}{old}."):
                optim_sd[f"{section}{new}{key[len(section) + len(old):]}"] = optim_sd.pop(key)


def _drop_parameter(payload: dict[str, Any], name: str) -> None:
    """Remove parameter `name`'s model and (flat) optimizer entries."""
    payload[MODEL_KEY].pop(name, None)
    optim_sd = payload.get(OPTIMIZER_KEY)
    for key in list(optim_sd or {}):
        if key.startswith((f"state.{name}.", f"param_groups.{name}.")):
            optim_sd.pop(key)


def _train_state_dicts(model: nn.Module, optimizer, trainable_only: bool, flat_optimizer: bool = True,
                       lm_head_copy_as_embedding: bool = False) -> dict[str, Any]:
    """{"model": ..., "optimizer": ...} as DCP stores them (FQN keys, DTensor shards where sharded).

    The tied lm_head is left out (it is the word-embedding matrix: storing it twice costs V x H
    values), and with trainable_only so is every frozen tensor (get_state_dict's
    ignore_frozen_params keeps the tied alias of a frozen embedding, hence the explicit filter).
    A pipeline's last stage holds the lm_head as a copy of the embeddings: it is left out too when
    saving (stage 0 saves the matrix), and with lm_head_copy_as_embedding (loading) it is asked for
    under the embedding's name, with its optimizer state.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    options = _state_dict_options(trainable_only, flat_optimizer=flat_optimizer)
    if optimizer is None:
        model_sd, optim_sd = get_model_state_dict(model, options=options), None
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    if trainable_only:
        trainable = {name for name, p in unwrap_parallel(model).named_parameters() if p.requires_grad}
        model_sd = {k: v for k, v in model_sd.items() if k in trainable}
    payload = {MODEL_KEY: model_sd}
    if optim_sd is not None:
        payload[OPTIMIZER_KEY] = optim_sd
    tied = tied_keys(model)
    if tied and holds_lm_head_copy(model):
        if lm_head_copy_as_embedding:
            _rename_parameter(payload, *tied)
        else:
            _drop_parameter(payload, tied[0])
    elif tied:
        model_sd.pop(tied[0], None)
    return payload


def method_of(base: ChatGLMForConditionalGeneration, peft_config) -> str:
    """What a model trains: "lora" (a PEFT config), "ptuning" (a prefix) or "full"."""
    if peft_config is not None:
        return "lora"
    return "ptuning" if base.config.pre_seq_len else "full"


def copy_tokenizer(tokenizer, folder: Path) -> None:
    """Write the tokenizer files into `folder`: a tokenizer object saves itself, a folder's files are copied."""
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
    module, base, peft_config = model_parts(model)
    adapter_name = getattr(module, "active_adapter", "default") if peft_config is not None else None
    if trainable_only is None:
        trainable_only = any(not p.requires_grad for p in model.parameters())
    payload = _train_state_dicts(model, state.get(OPTIMIZER_KEY), trainable_only)
    for key, value in state.items():
        if key not in (MODEL_KEY, OPTIMIZER_KEY):
            payload[key] = value  # DCP calls state_dict() on objects that have one (Stateful)

    if is_main_process():
        staging_folder(directory)
    barrier()
    with _quiet_single_process():
        dcp.save(payload, checkpoint_id=str(tmp))
    if is_main_process():
        info = {"format": CHECKPOINT_FORMAT, "version": 2, "optimizer_state": "flat",
                "kind": method_of(base, peft_config),
                "trainable_only": trainable_only, "world_size": get_world_size(), "adapter_name": adapter_name,
                "parallel": dataclasses.asdict(parallel_config) if parallel_config else None,
                "keys": _saved_keys(tmp)}
        dtype_name = str(base.transformer.word_embeddings.weight.dtype).removeprefix("torch.")  # rank 0: stage 0
        (tmp / "config.json").write_text(base.config.replace(torch_dtype=dtype_name).to_json_string(),
                                         encoding="utf-8")
        if peft_config is not None:
            peft_config.save_pretrained(str(tmp))
        copy_tokenizer(tokenizer, tmp)
        (tmp / CHECKPOINT_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    barrier()  # every shard is on disk before the folder gets its final name
    if is_main_process():
        commit_folder(tmp, directory)
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
    directory = Path(directory)
    if not is_sharded_checkpoint(directory):
        what = "does not exist" if not directory.exists() else f"has no {CHECKPOINT_INFO_NAME} and .metadata"
        raise CheckpointError(f"{directory} {what}: expected a sharded (DCP) checkpoint written by "
                              f"glm6b.train.dcp.save_sharded")
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

    directory = Path(directory)
    info = read_checkpoint_info(directory)
    model = state[MODEL_KEY]
    _, base, peft_config = model_parts(model)
    kind = method_of(base, peft_config)
    if kind != info["kind"]:
        raise CheckpointError(f"{directory} is a {info['kind']} checkpoint; the model to load it into is {kind}")
    missing = [k for k in state if k not in info["keys"]]
    if missing:
        raise CheckpointError(f"{directory} has no {', '.join(missing)} (it holds {', '.join(info['keys'])})")
    trainable_only = info["trainable_only"]
    flat = info.get("optimizer_state") == "flat"  # version 1 stored it nested
    optimizer = state.get(OPTIMIZER_KEY)
    lm_head_copy = holds_lm_head_copy(model)
    payload = _train_state_dicts(model, optimizer, trainable_only, flat_optimizer=flat,
                                 lm_head_copy_as_embedding=lm_head_copy)
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
    tied = tied_keys(model)
    if tied and lm_head_copy:
        _rename_parameter(payload, tied[1], tied[0])  # the stage's copy takes the embeddings' values
    elif tied and tied[1] in payload[MODEL_KEY]:
        payload[MODEL_KEY][tied[0]] = payload[MODEL_KEY][tied[1]]  # the same tensor, for a strict load
    with _without_empty_param_groups(optimizer if flat else None):
        set_state_dict(model, optimizer if optimizer is not None else [],
                       model_state_dict=payload[MODEL_KEY], optim_state_dict=payload.get(OPTIMIZER_KEY, {}),
                       options=_state_dict_options(trainable_only, flat_optimizer=flat))
    if plain:
        # Plain values are read whole by every rank (they were the same on every rank when saved),
        # whatever the caller's placeholder holds: {} gets the saved dict back.
        state.update(_read_entries(directory, set(plain)))
    return state


@contextlib.contextmanager
def _without_empty_param_groups(optimizer) -> Iterator[None]:
    """Hide the optimizer's parameter groups that hold no parameter (LoRA's group of biases and LayerNorms)
    while a flat optimizer state loads: it is keyed by parameter, so such a group has no entry, and
    torch's unflattening fails on it. The groups keep their settings and are put back in place."""
    empty = [(i, group) for i, group in enumerate(optimizer.param_groups) if not group["params"]] \
        if optimizer is not None else []
    for i, _ in reversed(empty):
        del optimizer.param_groups[i]
    try:
        yield
    finally:
        for i, group in empty:
            optimizer.param_groups.insert(i, group)


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
    """Top-level entries of a DCP checkpoint, rebuilt whole from its metadata by this process alone.

    The state dict to fill is built from the checkpoint's own metadata (full tensor shapes and
    dtypes; plain values as placeholders, nested as they were saved), then `dcp.load` fills it
    with no_dist=True: no collective, so one rank may call it alone (e.g. a merge at the end of a
    distributed run).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(directory))
    loaded: dict[str, Any] = {}
    try:
        metadata = reader.read_metadata()
        for flat, item in metadata.state_dict_metadata.items():
            path = (metadata.planner_data or {}).get(flat, (flat,))
            if path[0] not in keys:
                continue
            leaf = (torch.empty(item.size, dtype=item.properties.dtype) if isinstance(item, TensorStorageMetadata)
                    else None)  # a plain value: replaced by the saved one
            _place(loaded, path, leaf)
        with _quiet_single_process():
            dcp.load(loaded, storage_reader=reader, no_dist=True)
    except (Exception, dcp.CheckpointException) as e:  # noqa: BLE001 - CheckpointException is a BaseException
        raise CheckpointError(f"{directory}: a shard is missing, truncated or corrupt ({_dcp_reason(e)})") from None
    return loaded


def _place(tree: dict[str, Any], path: tuple, leaf: Any) -> None:
    """Put `leaf` at `path` in `tree`, creating dicts for string keys and lists for integer indices."""
    node: Any = tree
    for part, child in zip(path[:-1], path[1:]):
        empty: Any = [] if isinstance(child, int) else {}
        if isinstance(node, list):
            node.extend([None] * (part + 1 - len(node)))
            if node[part] is None:
                node[part] = empty
            node = node[part]
        else:
            node = node.setdefault(part, empty)
    if isinstance(node, list):
        node.extend([None] * (path[-1] + 1 - len(node)))
    node[path[-1]] = leaf


def load_full_model_state(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model tensors of a sharded checkpoint as one full state dict, read by this process alone.

    Only the "model" entries are read (not the optimizer state). No process group is used, so it
    can run in a plain `python` process, or on one rank of a distributed job.
    """
    read_checkpoint_info(directory)
    return _read_entries(directory, {MODEL_KEY})[MODEL_KEY]

