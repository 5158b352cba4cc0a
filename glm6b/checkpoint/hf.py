"""Loading and saving ChatGLM-6B checkpoints (HF THUDM/chatglm-6b layout) and P-tuning v2 prefixes.

Layouts read (in this order of preference, inside one model folder):

* ``model.safetensors.index.json`` + ``model-0000N-of-0000M.safetensors`` shards,
* a single ``model.safetensors``,
* ``pytorch_model.bin.index.json`` + ``pytorch_model-0000N-of-0000M.bin`` shards (the real HF repo:
  8 shards of float16 ``torch.save`` state dicts; a layer's tensors may span two shards),
* a single ``pytorch_model.bin``.

Loading builds the model on the meta device and fills it tensor by tensor, shard by shard: every
tensor is cast to the requested dtype and moved to the requested device on its own, so the peak
memory is the loaded model plus (at most) the shard being read, never a second full state dict.
``.bin`` shards are opened with ``torch.load(weights_only=True, mmap=True)``: no arbitrary Python
object is ever unpickled. The pages of a memory-mapped file that were read count in the process's
resident memory until the file is closed, so each tensor's pages are released once it is copied
(`_release_file_pages`): the peak stays near the loaded model itself.

A folder in THUDM's quantized layout (config.json ``quantization_bit`` 4 or 8, optionally
``quantization_embeddings``: chatglm-6b-int8, -int4, -int4-qe, or a `glm6b quantize` output) is built
with `glm6b.quant` layers swapped in on the meta device and filled from its int8 ``weight`` and float16
``weight_scale`` tensors as they are; ``load_model(..., quantize="int8"|"int4")`` on a float folder
quantizes each of those weights as it is read, so the float model is never held whole.

Deliberate differences from the reference loader (spec 4.11, Appendix A.7):

* A float32 checkpoint is *not* rounded to float16: tensors are cast straight to the requested dtype.
* The checkpoint's ``...rotary_emb.inv_freq`` buffers are ignored (the model recomputes them) and so
  is ``lm_head.weight`` when ``config.tie_word_embeddings`` is true (the default): the output
  projection is the word-embedding matrix, as with the reference's ``from_pretrained``.

Every file written here is written atomically (a temporary file in the same folder, renamed over the
target only once complete), so an interrupted save never leaves a half-written file under its name.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import mmap
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..config import ChatGLMConfig, quantize_bits
from ..io import atomic_write, atomic_write_text
from ..model import ChatGLMForConditionalGeneration, PrefixEncoder
from ..quant import cpu_kernels
from ..quant.linear import QuantizedEmbedding, QuantizedLinear, quantize_model, tie_quantized_lm_head
from ..quant.thudm import quantize_to_thudm
from . import mindspore, mindspore_shards
from .errors import CheckpointError

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
# Looked for in this order by find_weight_files.
WEIGHT_LAYOUTS = (SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME)
# Every file name a saved model's weights can have; save_pretrained removes stale ones.
_WEIGHT_FILE_RE = re.compile(
    r"^(model\.safetensors|model\.safetensors\.index\.json|model-\d{5}-of-\d{5}\.safetensors"
    r"|pytorch_model\.bin|pytorch_model\.bin\.index\.json|pytorch_model-\d{5}-of-\d{5}\.bin)$")
# What a saved model folder holds (weights, config, tokenizer, P-tuning and adapter files): the files
# merge commands may replace with --overwrite (see glm6b.safety.check_output_dir).
MODEL_FOLDER_FILES = (CONFIG_NAME, SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME,
                      "ice_text.model", "tokenizer_config.json", "adapter_config.json", "adapter_model.safetensors",
                      "README.md")
MODEL_FOLDER_PREFIXES = ("model-", "pytorch_model-")
PREFIX_ENCODER = "transformer.prefix_encoder."
_HF_FILES = "config.json, pytorch_model-*.bin or *.safetensors, ice_text.model, tokenizer_config.json"


def is_weight_file(name: str) -> bool:
    """Whether a file name is one of the weight-file names a saved model folder can hold."""
    return _WEIGHT_FILE_RE.match(name) is not None


# ----------------------------------------------------------------------------------- atomic writes


# ----------------------------------------------------------------------------------- finding files


def _check_model_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} not found")
    if not (folder / CONFIG_NAME).is_file():
        raise CheckpointError(f"{folder} has no config.json (expected the HF THUDM/chatglm-6b files: {_HF_FILES})")


def read_index(index_path: str | os.PathLike) -> dict[str, str]:
    """Read a sharded checkpoint's index file and return its weight_map {tensor name: shard file name}.

    Raises:
        CheckpointError: the file is not valid JSON, has no weight_map, or names a shard outside its folder.
    """
    index_path = Path(index_path)
    try:
        data = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index_path}: cannot read the index ({_short_reason(e)})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: expected a JSON object with a 'weight_map' of tensor name -> shard file")
    for shard in set(weight_map.values()):
        if Path(shard).name != shard or shard in (".", ".."):
            raise CheckpointError(f"{index_path}: shard name {shard!r} is not a plain file name in the same folder")
    return weight_map


def find_weight_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files of a model folder, in load order.

    Safetensors (an index, else a single file) are preferred over ``.bin`` (an index, else a single
    ``pytorch_model.bin``). With an index, the shards are its weight_map's files in order of first use.

    Raises:
        CheckpointError: folder missing, no config.json, no weights, or a shard listed in the index missing.
    """
    folder = Path(folder)
    _check_model_folder(folder)
    for name in WEIGHT_LAYOUTS:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        shards = list(dict.fromkeys(read_index(path).values()))
        if not shards:
            raise CheckpointError(f"{path}: the weight_map is empty")
        for shard in shards:
            if not (folder / shard).is_file():
                raise CheckpointError(f"shard {shard} listed in {path} is missing")
        return [folder / shard for shard in shards]
    raise CheckpointError(f"{folder} has no weights (looked for {', '.join(WEIGHT_LAYOUTS)}; expected the HF "
                          f"THUDM/chatglm-6b files: {_HF_FILES})")


# ----------------------------------------------------------------------------------- reading tensors


def _short_reason(exc: BaseException) -> str:
    """The informative part of an exception message, on one short line."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[0] if lines else type(exc).__name__
    if "PytorchStreamReader" in line or "This is an internal miniz error" in line:
        line = line.split(". ")[0]
    return line if len(line) <= 200 else line[:197] + "..."


def _corrupt(path: Path, exc: BaseException) -> CheckpointError:
    reason = _short_reason(exc)
    if "Unsupported global" in reason:
        return CheckpointError(f"{path} holds Python objects other than tensors; refusing to unpickle them "
                               f"(weights_only=True): {reason}")
    return CheckpointError(f"{path} is truncated or corrupt: {reason}")


def _iter_bin_file(path: Path, skip: Callable[[str], bool]) -> Iterator[tuple[str, torch.Tensor]]:
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    try:
        # Zip-format files (every torch.save since 1.6) are memory-mapped: tensors are read lazily
        # and skipped ones are never touched. Legacy files are read whole.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as e:  # noqa: BLE001 - any failure to read is reported with the file name
        raise _corrupt(path, e) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict (tensor name -> tensor), found {type(state).__name__}")
    names = list(state)
    for name in names:
        tensor = state.pop(name)
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: expected a state dict of tensors, found {name!r}: {type(tensor).__name__}")
        if not skip(name):
            yield name, tensor
        del tensor


def _iter_safetensors_file(path: Path, skip: Callable[[str], bool]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # noqa: BLE001
        raise _corrupt(path, e) from None
    with handle:
        for name in handle.keys():
            if skip(name):
                continue
            try:
                tensor = handle.get_tensor(name)
            except Exception as e:  # noqa: BLE001
                raise _corrupt(path, e) from None
            yield name, tensor
            del tensor


def iter_file_tensors(path: str | os.PathLike,
                      skip: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from one ``.safetensors`` or ``.bin`` file, on the CPU.

    Tensors may be memory-mapped views of the file: copy what you keep. The file is closed when the
    iteration ends.

    Args:
        path: the file.
        skip: names for which this returns True are not read at all.

    Raises:
        CheckpointError: the file is truncated or corrupt, or holds something other than tensors.
    """
    path = Path(path)
    skip = skip or (lambda name: False)
    if mindspore.is_ckpt_file(path):  # MindFormers names, training entries left out
        return mindspore.iter_model_tensors(path, skip)
    if path.suffix == ".safetensors":
        return _iter_safetensors_file(path, skip)
    return _iter_bin_file(path, skip)


def iter_checkpoint_tensors(folder: str | os.PathLike,
                            skip: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor of a model folder, shard by shard (see `find_weight_files`).

    Each shard is closed (and its memory released) before the next is opened, as long as the caller
    does not keep the yielded tensors themselves (they may be views of the memory-mapped shard).
    """
    for path in find_weight_files(folder):
        with contextlib.closing(iter_file_tensors(path, skip)) as tensors:
            yield from tensors


# ----------------------------------------------------------------------------------- loading


def check_device(device: torch.device | str | None) -> torch.device:
    """The torch.device for `device` (None: cpu), checked to exist in this PyTorch build and machine.

    Args:
        device: "cpu", "cuda", "cuda:1", "mps", a torch.device, or None.

    Returns:
        The device.

    Raises:
        ValueError: an unknown device name, a CUDA device on a build or machine without CUDA (or
            with fewer GPUs), an MPS device where MPS is unavailable.
    """
    try:
        resolved = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r}: expected cpu, cuda, cuda:N or mps") from None
    if resolved.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise ValueError(f"device {str(device)!r}: this PyTorch build ({torch.__version__}) has no CUDA "
                             f"support; use --device cpu or install a CUDA build of PyTorch")
        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError(f"device {str(device)!r}: no CUDA GPU is visible (CUDA_VISIBLE_DEVICES, driver); "
                             f"use --device cpu")
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {str(device)!r}: only {count} CUDA GPU(s) are visible "
                             f"(cuda:0 to cuda:{count - 1})")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r}: MPS is not available on this machine; use --device cpu")
    return resolved


def default_device() -> torch.device:
    """Where a model goes when no device is asked for: CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device, quantized: bool = False) -> torch.dtype:
    """The parameter dtype when none is asked for: bfloat16 on CUDA (float16 where it has no bfloat16);
    on the CPU float32, or bfloat16 for a quantized model where glm6b's CPU kernels run (their fast
    path, and half the embeddings' memory)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if quantized and cpu_kernels.available():
        return torch.bfloat16
    return torch.float32


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A floating-point torch.dtype from a dtype or its name ("bfloat16", "torch.float16", ...).

    Raises:
        ValueError: an unknown name or a dtype that is not floating point.
    """
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {name!r}; use float32, float16 or bfloat16")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point type, got {dtype}")
    return dtype


def _ignored_name(name: str, config: ChatGLMConfig) -> bool:
    """Checkpoint tensors dropped on load: the rotary buffers and the (tied) lm_head."""
    if name.endswith(".rotary_emb.inv_freq"):
        return True
    # A tied lm_head is the embeddings: its weight (and, in THUDM's int4-qe, weight_scale) are copies.
    return config.tie_word_embeddings and name in ("lm_head.weight", "lm_head.weight_scale")


def _expected_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the model needs from a checkpoint: parameters and persistent buffers (tied lm_head excluded)."""
    expected = dict(model.named_parameters(remove_duplicate=False))
    if model.config.tie_word_embeddings:  # lm_head.weight (and a quantized head's weight_scale) are the embeddings'
        for name in [name for name in expected if name.startswith("lm_head.")]:
            expected.pop(name)
    for module_name, module in model.named_modules():
        for leaf, buf in module.named_buffers(recurse=False):
            if buf is not None and leaf not in module._non_persistent_buffers_set:
                expected[f"{module_name}.{leaf}" if module_name else leaf] = buf
    return expected


def _shape(t) -> str:
    return "[" + ", ".join(str(s) for s in t) + "]"


def _name_list(names: list[str]) -> str:
    shown = ", ".join(names[:5])
    return shown + (f" (and {len(names) - 5} more)" if len(names) > 5 else "")


@torch.no_grad()
def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put `value` (already of the right dtype/device, owning its memory) under `name`.

    A meta (not yet loaded) parameter is replaced by a new Parameter with the same requires_grad;
    a materialised one is copied into in place, so optimisers holding it keep working.
    """
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        old = module._parameters[leaf]
        if old.is_meta:
            module._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
        else:
            old.copy_(value)
    else:
        old = module._buffers[leaf]
        if old.is_meta:
            module._buffers[leaf] = value
        else:
            old.copy_(value)


def _file_mapping_ranges(path: Path) -> list[tuple[int, int]]:
    """The address ranges where this process maps `path` (from /proc/self/maps; none where there is none)."""
    real = os.path.realpath(path)
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n") == real:
                    start, end = fields[0].split("-")
                    ranges.append((int(start, 16), int(end, 16)))
    except OSError:
        return []
    return ranges


def _release_file_pages(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> None:
    """Drop a copied tensor's pages from this process's memory when it is a view of a memory-mapped file.

    Only whole pages inside one of `ranges` (the file's own mappings) are released: those are clean
    file pages, read again from the file if anything touches them later, so no data can be lost.
    """
    if not ranges or tensor.device.type != "cpu":
        return
    page = mmap.PAGESIZE
    first = tensor.data_ptr()
    start = -(-first // page) * page
    end = (first + tensor.numel() * tensor.element_size()) // page * page
    if end > start and any(low <= start and end <= high for low, high in ranges):
        _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)


_HUGE_PAGE = 2 << 20


def _fresh_copy(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` copied into new memory of `dtype` on `device`. On the CPU, the 2 MiB-aligned part of a large
    copy is first marked for transparent huge pages (madvise MADV_HUGEPAGE, where the kernel offers it):
    writing fresh memory costs a page fault per page, and with 2 MiB pages the int4 / int8 loads took
    about two thirds of the time (benchmarks/quantize.py, load table)."""
    if device.type != "cpu" or tensor.numel() * dtype.itemsize < 2 * _HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return tensor.to(device=device, dtype=dtype, copy=True)
    out = torch.empty(tensor.shape, dtype=dtype, device=device)
    first = out.data_ptr()
    start = -(-first // _HUGE_PAGE) * _HUGE_PAGE
    end = (first + out.numel() * out.element_size()) // _HUGE_PAGE * _HUGE_PAGE
    if end > start:  # a hint only: where the kernel says no, the copy takes ordinary pages
        _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_HUGEPAGE)
    return out.copy_(tensor)


@functools.cache
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc


def _load_file_into(model: nn.Module, path: Path, expected: dict[str, torch.Tensor], loaded: set[str],
                    unexpected: list[str], device: torch.device, origin: str,
                    rename: Callable[[str], str] = lambda name: name,
                    skip: Callable[[str], bool] = lambda name: False,
                    convert: Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]] | None = None,
                    open_tensors: Callable[..., Iterator[tuple[str, torch.Tensor]]] | None = None) -> None:
    """Copy the tensors of one file into `model`: check name and shape, cast and move each on its own.

    `convert` may turn one file tensor into several (quantizing a float weight at load); `open_tensors`
    (default `iter_file_tensors`) gives the (name, tensor) pairs of `path`.
    """
    mapped = None  # the file's memory mappings, looked up once it is open
    with contextlib.closing((open_tensors or iter_file_tensors)(path, skip)) as file_tensors:
        for raw_name, file_tensor in file_tensors:
            if mapped is None:
                mapped = _file_mapping_ranges(path) if hasattr(mmap, "MADV_DONTNEED") else []
            renamed = rename(raw_name)
            for name, tensor in convert(renamed, file_tensor) if convert is not None else [(renamed, file_tensor)]:
                _load_tensor_into(model, path, raw_name, name, tensor, expected, loaded, unexpected, device, origin)
            _release_file_pages(file_tensor, mapped)
            del file_tensor


def _load_tensor_into(model: nn.Module, path: Path, raw_name: str, name: str, tensor: torch.Tensor,
                      expected: dict[str, torch.Tensor], loaded: set[str], unexpected: list[str],
                      device: torch.device, origin: str) -> None:
    """Check one tensor of `path` against the model's `expected` one and copy it in (see `_load_file_into`)."""
    target = expected.get(name)
    if target is None:
        unexpected.append(raw_name)
        return
    if tuple(tensor.shape) != tuple(target.shape):
        raise CheckpointError(f"{path}: tensor {raw_name} has shape {_shape(tensor.shape)}, "
                              f"expected {_shape(target.shape)} from {origin}")
    if target.is_floating_point() and not tensor.is_floating_point():
        raise CheckpointError(f"{path}: tensor {raw_name} is {tensor.dtype}, expected floating point "
                              f"(a quantized tensor, but {origin} has no quantization_bit)")
    if not target.is_floating_point() and tensor.dtype != target.dtype:
        raise CheckpointError(f"{path}: tensor {raw_name} is {tensor.dtype}, expected {target.dtype} "
                              f"({origin} sets quantization_bit: THUDM's quantized layout)")
    if name in loaded:
        raise CheckpointError(f"{path}: tensor {raw_name} was already loaded from another file")
    # A copy: the parameter owns its memory, never a view of the (memory-mapped) file.
    _set_tensor(model, name, _fresh_copy(tensor, device, target.dtype))
    loaded.add(name)


def _resolve_ptuning_path(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """The weights file of a P-tuning checkpoint (file or folder) and its folder's config.json (or {})."""
    path = Path(path)
    if path.is_file():
        return path, {}
    if not path.is_dir():
        raise CheckpointError(f"P-tuning checkpoint {path} not found")
    for name in (WEIGHTS_NAME, SAFE_WEIGHTS_NAME):
        if (path / name).is_file():
            weights = path / name
            break
    else:
        raise CheckpointError(f"P-tuning checkpoint folder {path} has no {WEIGHTS_NAME} or {SAFE_WEIGHTS_NAME}")
    config: dict[str, Any] = {}
    if (path / CONFIG_NAME).is_file():
        try:
            config = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path / CONFIG_NAME}: cannot read ({_short_reason(e)})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{path / CONFIG_NAME}: expected a JSON object")
    return weights, config


def _prefix_name(name: str) -> str:
    """Accept P-tuning keys with or without the `transformer.prefix_encoder.` prefix."""
    return name if name.startswith(PREFIX_ENCODER) else PREFIX_ENCODER + name


def _load_prefix_encoder(model: nn.Module, weights: Path, device: torch.device, strict: bool) -> None:
    config = model.config
    expected = {k: v for k, v in _expected_tensors(model).items() if k.startswith(PREFIX_ENCODER)}
    loaded: set[str] = set()
    unexpected: list[str] = []
    origin = f"pre_seq_len={config.pre_seq_len}, prefix_projection={config.prefix_projection}"
    _load_file_into(model, weights, expected, loaded, unexpected, device, origin, rename=_prefix_name)
    missing = sorted(set(expected) - loaded)
    if missing:
        raise CheckpointError(f"{weights}: {len(missing)} prefix-encoder tensor(s) missing for {origin}: "
                              f"{_name_list(missing)}")
    if unexpected and strict:
        raise CheckpointError(f"{weights}: {len(unexpected)} unexpected tensor(s) in the P-tuning checkpoint "
                              f"({origin}): {_name_list(unexpected)}")


def _setup_quantization(model: nn.Module, folder: Path, quantize, quantize_embeddings: bool):
    """Swap in quantized layers (on meta) for a quantized folder or a `quantize=` request.

    Returns the per-tensor `convert` for `_load_file_into` that quantizes float weights as they are
    read, or None when the folder already holds THUDM's int8 tensors (or nothing is quantized).
    """
    config = model.config
    want = quantize_bits(quantize)
    if config.quantization_bit:
        if want and want != config.quantization_bit:
            raise CheckpointError(f"{folder / CONFIG_NAME}: the weights are quantized to {config.quantization_bit} "
                                  f"bits (quantization_bit); cannot load them as int{want} (quantize the float "
                                  f"weights instead)")
        quantize_model(model, config.quantization_bit, embeddings=config.quantization_embeddings)
        return None
    if not want:
        if quantize_embeddings:
            raise ValueError("quantize_embeddings=True needs quantize='int8' or 'int4'")
        return None
    quantize_model(model, want, embeddings=quantize_embeddings)
    targets = {f"{name}.weight" for name, module in model.named_modules()
               if isinstance(module, (QuantizedLinear, QuantizedEmbedding))}

    def convert(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if name not in targets or not tensor.is_floating_point() or tensor.dim() != 2:
            return [(name, tensor)]
        weight, scale = quantize_to_thudm(tensor, want)
        return [(name, weight), (name.removesuffix("weight") + "weight_scale", scale)]

    return convert


def load_model(
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    ptuning_checkpoint: str | os.PathLike | None = None,
    pre_seq_len: int | None = None,
    prefix_projection: bool | None = None,
    strict: bool = True,
    model_class: type[ChatGLMForConditionalGeneration] = ChatGLMForConditionalGeneration,
    quantize: str | int | None = None,
    quantize_embeddings: bool = False,
    config: ChatGLMConfig | str | os.PathLike | None = None,
    strategy: str | os.PathLike | None = None,
) -> ChatGLMForConditionalGeneration:
    """Read a ChatGLM-6B model from a HF-layout folder, a MindSpore `.ckpt` file or a folder holding a
    MindFormers sharded set (`rank_<r>/` and a strategy file, merged while loading: see
    glm6b.checkpoint.mindspore_shards); the module docstring lists the layouts. This is the reader under
    glm6b.api.load, which the commands, the server, evaluation and training use.

    The model is built on the meta device and filled shard by shard; each tensor is cast to `dtype`
    and moved to `device` on its own, so peak memory stays near the loaded model's size plus one shard.

    Args:
        path: the model folder (config.json and the weights).
        dtype: parameter dtype (torch.dtype or "float32"/"float16"/"bfloat16"). None means float32 on
            the CPU (bfloat16 for a quantized model where glm6b's CPU kernels run: see
            glm6b.quant.cpu_kernels), and bfloat16 (float16 where bfloat16 is unsupported) on CUDA. Tensors are cast
            per tensor: a float32 checkpoint loaded as float32 is exact (the reference rounds it to
            float16). The P-tuning prefix encoder always stays float32, as in the reference recipe.
        device: where the parameters go (default: the CPU; glm6b.api.load, which every command
            uses, defaults to CUDA when available).
        ptuning_checkpoint: P-tuning v2 weights: a ``.bin``/``.safetensors`` file or a folder with
            ``pytorch_model.bin`` (preferred, the THUDM layout) or ``model.safetensors`` and
            optionally a config.json giving pre_seq_len/prefix_projection. Keys may carry the
            ``transformer.prefix_encoder.`` prefix or not.
        pre_seq_len, prefix_projection: P-tuning settings; default to the P-tuning folder's
            config.json, then to the model's config.json. Passing pre_seq_len without a
            ptuning_checkpoint, for a checkpoint without prefix-encoder weights, gives a freshly
            initialised prefix encoder (PyTorch defaults, as the reference) to train.
        strict: raise on checkpoint tensors the model does not have (besides the ignored rotary
            buffers and tied lm_head). Missing tensors always raise.
        model_class: the class to build (`glm6b.api.ChatGLM` adds chat/generate to the math class).
        quantize: "int8" or "int4" (or 8, 4): weight-only quantize the four Linear layers of every
            block with THUDM's formula while loading a float folder, tensor by tensor (see
            `glm6b.quant`). A folder in THUDM's quantized layout (config.json ``quantization_bit``:
            chatglm-6b-int8, -int4, -int4-qe or a `glm6b quantize` output) loads quantized without
            it; asking for another bit width than the folder's is an error.
        quantize_embeddings: with `quantize`, also quantize the word embeddings and the tied lm_head
            (THUDM's int4-qe scheme).
        config: for a MindSpore `.ckpt` path or a sharded set only (see
            `glm6b.checkpoint.mindspore.ckpt_config`): the config (or config.json path) to use instead
            of the config.json beside the file (in the set's folder) or, without one, the built-in
            `glm_6b` preset.
        strategy: for a sharded set: its strategy file (or folder of per-stage files); default: the
            one `glm6b.checkpoint.mindspore_shards.find_strategy` finds beside `rank_*/`.

    Returns:
        The model in eval mode, lm_head tied to the word embeddings when config.tie_word_embeddings.

    Raises:
        CheckpointError: missing folder/files, corrupt shards, missing/unexpected tensors, shape mismatches.
        ConfigError: an unreadable or impossible config.json (the message names the file and field).
    """
    folder = Path(path)
    files, config, rename, open_tensors = _read_source(folder, config, strict, strategy)
    device = check_device(device)
    quantized = bool(config.quantization_bit or quantize_bits(quantize))
    dtype = default_dtype(device, quantized) if dtype is None else as_dtype(dtype)
    config, ptuning_weights = _with_ptuning_settings(config, ptuning_checkpoint, pre_seq_len, prefix_projection)

    model = model_class(config, dtype=dtype, device="meta")
    convert = _setup_quantization(model, folder, quantize, quantize_embeddings)
    expected = _expected_tensors(model)
    if ptuning_weights is not None:  # the prefix encoder comes from the P-tuning file, not the base
        expected = {k: v for k, v in expected.items() if not k.startswith(PREFIX_ENCODER)}
    fresh_prefix = pre_seq_len is not None and ptuning_checkpoint is None
    _fill_from_files(model, files, expected, device, rename, convert, open_tensors, strict, fresh_prefix,
                     skip_prefix=ptuning_weights is not None,
                     where=str(files[0]) if len(files) == 1 else f"{folder} ({len(files)} shards)")
    if ptuning_weights is not None:
        _load_prefix_encoder(model, ptuning_weights, device, strict)

    model.tie_weights()
    tie_quantized_lm_head(model)
    still_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise CheckpointError(f"{folder}: {len(still_meta)} tensor(s) were not loaded: {_name_list(still_meta)}")
    return model.eval()


def _read_source(path: Path, config, strict: bool, strategy) -> tuple[list[Path], ChatGLMConfig, Callable[[str], str],
                                                                    Callable[..., Iterator] | None]:
    """(weight files, config, tensor-name map, tensor opener or None for iter_file_tensors) of a model folder,
    a MindSpore `.ckpt` file or a MindFormers sharded set (one "file": the set's folder)."""
    if mindspore.is_ckpt_file(path):  # MindFormers names, mapped to HF ones
        return [path], mindspore.ckpt_config(path, config, strict), mindspore.to_hf_name_or_same, None
    if is_sharded_set(path):  # rank_<r>/ folders, stitched parameter by parameter while loading
        with mindspore_shards.ShardedCheckpoint(path, strategy) as shards:
            config = shards.config(config, strict)

        def open_tensors(folder: Path, skip: Callable[[str], bool]) -> Iterator[tuple[str, torch.Tensor]]:
            with mindspore_shards.ShardedCheckpoint(folder, strategy) as shards:
                yield from shards.iter_model_tensors(skip)

        return [path], config, mindspore.to_hf_name_or_same, open_tensors
    return find_weight_files(path), ChatGLMConfig.from_json_file(path / CONFIG_NAME), lambda name: name, None


def is_sharded_set(folder: str | os.PathLike) -> bool:
    """True for a folder holding a MindFormers sharded set (`rank_<r>/`) and no HF weights."""
    folder = Path(folder)
    return not any((folder / name).is_file() for name in WEIGHT_LAYOUTS) and mindspore_shards.is_sharded_folder(folder)


def _with_ptuning_settings(config: ChatGLMConfig, ptuning_checkpoint, pre_seq_len: int | None,
                           prefix_projection: bool | None) -> tuple[ChatGLMConfig, Path | None]:
    """The config with the P-tuning settings asked for (or those of the P-tuning folder), and the
    P-tuning weights file (None without a ptuning_checkpoint)."""
    weights = None
    if ptuning_checkpoint is not None:
        weights, ptuning_config = _resolve_ptuning_path(ptuning_checkpoint)
        if pre_seq_len is None:
            pre_seq_len = ptuning_config.get("pre_seq_len", config.pre_seq_len)
        if prefix_projection is None:
            prefix_projection = ptuning_config.get("prefix_projection")
        if pre_seq_len is None:
            raise CheckpointError(f"P-tuning checkpoint {ptuning_checkpoint}: pre_seq_len is unknown (pass "
                                  f"pre_seq_len=..., or put it in the P-tuning folder's config.json)")
    changes: dict[str, Any] = {}
    if pre_seq_len is not None:
        changes["pre_seq_len"] = pre_seq_len
    if prefix_projection is not None:
        changes["prefix_projection"] = bool(prefix_projection)
    return (config.replace(**changes) if changes else config), weights


def _fill_from_files(model: nn.Module, files: list[Path], expected: dict[str, torch.Tensor], device: torch.device,
                     rename, convert, open_tensors, strict: bool, fresh_prefix: bool, skip_prefix: bool,
                     where: str) -> None:
    """Copy every expected tensor from `files` into `model`; a missing tensor (or, with strict, an
    unexpected one) is an error. With `fresh_prefix`, a prefix encoder the files lack is made anew
    (PyTorch's initialisation, to train); with `skip_prefix`, the files' prefix weights are not read."""
    config = model.config
    loaded: set[str] = set()
    unexpected: list[str] = []

    def skip(name: str) -> bool:
        return _ignored_name(name, config) or (skip_prefix and name.startswith(PREFIX_ENCODER))

    for file in files:
        _load_file_into(model, file, expected, loaded, unexpected, device, "config.json", rename=rename,
                        skip=skip, convert=convert, open_tensors=open_tensors)
    missing = [name for name in expected if name not in loaded]
    prefix_names = [name for name in expected if name.startswith(PREFIX_ENCODER)]
    if fresh_prefix and prefix_names and set(prefix_names) <= set(missing):
        model.transformer.prefix_encoder = PrefixEncoder(config, device=device)
        missing = [name for name in missing if not name.startswith(PREFIX_ENCODER)]
    if missing:
        raise CheckpointError(f"{where}: {len(missing)} tensor(s) missing from the checkpoint: {_name_list(missing)}")
    if unexpected and strict:
        hint = ""
        if any(name.startswith(PREFIX_ENCODER) for name in unexpected):
            hint = " (prefix-encoder weights: pass pre_seq_len to load them)"
        raise CheckpointError(f"{where}: {len(unexpected)} unexpected tensor(s) not in the model built from "
                              f"config.json: {_name_list(unexpected)}{hint}")


def load_ptuning_state(model: ChatGLMForConditionalGeneration, path: str | os.PathLike,
                       strict: bool = True) -> None:
    """Load P-tuning v2 prefix-encoder weights into a model built with pre_seq_len set (in place).

    Args:
        model: the model; its prefix encoder's parameters are overwritten (kept as the same objects).
        path: a ``.bin``/``.safetensors`` file or a P-tuning folder (see `load_model`).
        strict: raise on tensors other than the prefix encoder's.

    Raises:
        CheckpointError: the model has no prefix encoder, or the file is unusable or does not match.
    """
    if not model.config.pre_seq_len:
        raise CheckpointError(f"cannot load P-tuning weights {path}: the model has no prefix encoder "
                              f"(build it with config.pre_seq_len set, or use load_model(..., ptuning_checkpoint=...))")
    weights, _ = _resolve_ptuning_path(path)
    _load_prefix_encoder(model, weights, model.transformer.prefix_encoder.embedding.weight.device, strict)


# ----------------------------------------------------------------------------------- saving

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def estimate_model_bytes(config: ChatGLMConfig, dtype: torch.dtype | str | None = torch.float32) -> int:
    """Bytes the weights of a model with `config` take when saved in `dtype` (the tied lm_head once).

    Args:
        config: the architecture.
        dtype: the saved dtype (a torch.dtype or its name; None: float32).

    Returns:
        The size of the weight files, without the (small) config and tokenizer files.
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."))
    element = torch.empty((), dtype=dtype or torch.float32).element_size()
    model = ChatGLMForConditionalGeneration(config, device="meta")
    return sum(t.numel() for t in _tensors_to_save(model).values()) * element


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "2GB" (10^9), "200KB", "1.5GiB" (2^30)."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
        if not match:
            raise ValueError(f"cannot read size {size!r}; use bytes or e.g. '2GB', '500MB', '1GiB'")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "b").lower()])
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


def _tensors_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters to store (no buffers; the tied lm_head only once, as the word embeddings).

    Quantized layers are stored in THUDM's layout, whatever layout their kernel keeps in memory.
    """
    tensors = {}
    for name, param in model.named_parameters():  # remove_duplicate: a tied lm_head.weight is skipped
        if model.config.tie_word_embeddings and name.startswith("lm_head."):
            continue
        tensors[name] = param.detach()
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear) and f"{name}.weight" in tensors:
            tensors[f"{name}.weight"] = module.thudm_weight()
    return tensors


def _plain_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor owning exactly its bytes (torch.save would store a view's whole storage)."""
    tensor = tensor.to("cpu").contiguous()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor


def _plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], safe: bool) -> None:
    if safe:
        from safetensors.torch import save_file

        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    else:
        atomic_write(path, lambda tmp: torch.save(tensors, tmp))


def _model_config_json(model: nn.Module) -> str:
    dtype_name = str(model.transformer.final_layernorm.weight.dtype).removeprefix("torch.")
    return model.config.replace(torch_dtype=dtype_name).to_json_string()


def save_pretrained(model: ChatGLMForConditionalGeneration, directory: str | os.PathLike, tokenizer=None,
                    max_shard_size: int | str = "2GB", safe_serialization: bool = True) -> None:
    """Save a model (and optionally its tokenizer) as a HF-layout folder that `load_model` reads back.

    Writes config.json (torch_dtype set to the model's dtype) and the parameters in their own
    dtypes: ``model.safetensors``, or when they exceed `max_shard_size`, shards
    ``model-0000N-of-0000M.safetensors`` plus ``model.safetensors.index.json``. With
    safe_serialization=False the same as ``pytorch_model.bin`` / ``pytorch_model-0000N-of-0000M.bin``
    + ``pytorch_model.bin.index.json`` (torch.save of plain tensor dicts, the THUDM layout). Buffers
    and the tied lm_head are not written. Every file is written atomically; weight files of another
    layout or shard count left in `directory` by an earlier save are removed afterwards so they
    cannot shadow the new ones.

    Args:
        model: the model to save.
        directory: created if needed.
        tokenizer: if given, its ``save_pretrained(directory)`` is called.
        max_shard_size: bytes per shard (an int or e.g. "2GB", "200KB"); a single larger tensor
            gets a shard of its own.
        safe_serialization: safetensors (default) or torch.save ``.bin`` files.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for index in (SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME):  # an old index would point at shards being replaced
        (directory / index).unlink(missing_ok=True)
    max_bytes = parse_size(max_shard_size)
    tensors = _tensors_to_save(model)
    shards = _plan_shards(tensors, max_bytes)
    if safe_serialization:
        single, index_name, pattern = SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, "model-{:05d}-of-{:05d}.safetensors"
    else:
        single, index_name, pattern = WEIGHTS_NAME, WEIGHTS_INDEX_NAME, "pytorch_model-{:05d}-of-{:05d}.bin"

    atomic_write_text(directory / CONFIG_NAME, _model_config_json(model))
    written = []
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        file_name = single if len(shards) == 1 else pattern.format(i, len(shards))
        shard = {name: _plain_cpu(tensors[name]) for name in names}
        _write_shard(directory / file_name, shard, safe_serialization)
        del shard
        written.append(file_name)
        weight_map.update({name: file_name for name in names})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write_text(directory / index_name, json.dumps(index, indent=2) + "\n")
        written.append(index_name)
    for stale in directory.iterdir():
        if _WEIGHT_FILE_RE.match(stale.name) and stale.name not in written and stale.is_file():
            stale.unlink()
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def save_ptuning_checkpoint(model: ChatGLMForConditionalGeneration, directory: str | os.PathLike) -> None:
    """Save only the P-tuning prefix encoder, in the THUDM P-tuning layout.

    Writes ``pytorch_model.bin`` holding the ``transformer.prefix_encoder.*`` parameters (torch.save
    of a plain tensor dict) and the model's config.json (which carries pre_seq_len and
    prefix_projection). Load it with ``load_model(base, ptuning_checkpoint=directory)`` or
    `load_ptuning_state`.

    Raises:
        CheckpointError: the model has no prefix encoder (config.pre_seq_len unset).
    """
    if not model.config.pre_seq_len:
        raise CheckpointError(f"cannot save a P-tuning checkpoint to {directory}: the model has no prefix "
                              f"encoder (config.pre_seq_len is not set)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: _plain_cpu(param.detach()) for name, param in model.named_parameters()
             if name.startswith(PREFIX_ENCODER)}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: torch.save(state, tmp))
    atomic_write_text(directory / CONFIG_NAME, _model_config_json(model))
