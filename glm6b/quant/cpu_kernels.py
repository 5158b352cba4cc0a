"""glm6b's own CPU kernels for THUDM's int4/int8 layers (csrc/cpu_kernels.cpp, csrc/cpu_kernels_avx2.cpp).

Why not only PyTorch's: ``aten._weight_int4pack_mm_for_cpu`` unpacks the weight again for every input
row, so a decode step of 8 rows costs about 4x one row (benchmarks/quantize.py, kernels table), and it
needs the weight in its own byte order (built at the first forward). These kernels read THUDM's bytes as
they are and unpack each weight block once for all rows. Two builds, chosen by what the CPU has (`isa()`):

* ``"avx512bf16"`` (cpu_kernels.cpp; Intel Xeon Cooper Lake on, AMD Zen 4 on): bfloat16 activations,
  AVX512-BF16 dot products, float32 sums. With AMX (Intel Xeon 4th generation on), weight blocks are
  unpacked into 16 x 32 bfloat16 tiles and multiplied with tile instructions: 8 or 16 rows then cost
  about what one row does. For more rows (a prefill) a slice of 256 weight rows is unpacked once into a
  buffer that stays in cache and multiplied with every input row from there: 100 to 1024 rows run about
  as fast as PyTorch's GEMM on a bfloat16 weight, or faster. The same dot products also multiply a
  bfloat16 weight by a few rows (``glm6b::bf16_matmul``; one row reads the weight in memory order):
  about 1.3-1.9x the memory bandwidth of F.linear there, which is what a bfloat16 decode step is bound
  by (glm6b.quant.linear.BF16DecodeLinear).
* ``"avx2"`` (cpu_kernels_avx2.cpp; AVX2 + FMA + F16C without AVX512-BF16: AMD Zen 2 / Zen 3, Intel
  before Cooper Lake): float32, bfloat16 or float16 activations, float32 FMA arithmetic. A few rows
  (decoding): each weight group is unpacked to float32 in registers once for all rows. Many rows (a
  prefill): `dequantize_rows` writes float32 blocks of q * scale for PyTorch's float32 GEMM (a CPU
  without bfloat16 units has no faster product). ``glm6b::bf16_matmul`` reads a bfloat16 weight the
  same way (the bfloat16 lm_head of int4 / int8). ``glm6b::quantized_matmul_int16_activations``: int4
  weights times bfloat16 / float16 rows converted to 16-bit integers per 64 columns (exact integer
  products, about half the instructions of the float32 ones; what int4 layers decode with there).
  ``glm6b::quantized_matmul_int8_activations``
  quantizes the activations per row to int8 and multiplies in integers (vpmaddubsw): opt-in, as it
  changes results (glm6b.quant.linear, ``GLM6B_INT8_ACTIVATIONS=1``).

Both sources are compiled on first use into one library with the system C++ compiler for the CPU it
runs on (``-O3 -march=native -fopenmp``; OpenMP is the runtime PyTorch already loaded) into
``$GLM6B_KERNEL_CACHE`` (default ``~/.cache/glm6b/kernels``), named by a hash of the sources, the
compiler and the CPU, so a changed file or machine builds anew; each file builds its kernels only
where the CPU has its instructions. Where there is no compiler, neither instruction set, or
``GLM6B_CPU_KERNELS=0``, `available()` is False and glm6b.quant.linear uses PyTorch's ops.
``GLM6B_AMX=0`` keeps the AVX-512 kernels but not their AMX path, ``GLM6B_AVX512=0`` takes the AVX2
kernels on a CPU that has both (to compare, and to test the AVX2 path there).

The entry points are PyTorch custom ops (``glm6b::quantized_matmul``, ``glm6b::bf16_matmul``,
``glm6b::dequantize_rows``, ``glm6b::quantized_matmul_int16_activations``,
``glm6b::quantized_matmul_int8_activations``), so a compiled decode step
keeps them as single calls instead of breaking its graph.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = (Path(__file__).with_name("csrc") / "cpu_kernels.cpp", Path(__file__).with_name("csrc") / "cpu_kernels_avx2.cpp")
COMPILE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
K_MULTIPLE = 64  # the kernels take in_features that are a multiple of this
# Input rows from which the AMX path (where the CPU has it) is used: for one or two rows the AVX512-BF16
# dot products were faster when the kernels were tuned (they unpack a chunk with fewer instructions).
AMX_MIN_ROWS = 3

_build_lock = threading.Lock()


def _cpu_description() -> str:
    """What the build depends on besides the source: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(lines[:2])


def cache_dir() -> Path:
    return Path(os.environ.get("GLM6B_KERNEL_CACHE") or Path.home() / ".cache" / "glm6b" / "kernels")


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _build(compiler: str) -> Path:
    """Compile the source into the cache (to a temporary name, then renamed: a parallel build or a kill
    leaves no half-written library) and return the library's path."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([*(source.read_text() for source in SOURCES), compiler, version,
                                    " ".join(COMPILE_FLAGS), _cpu_description()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"cpu_kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".so.tmp", dir=target.parent)
    os.close(fd)
    try:
        sources = [str(source) for source in SOURCES]
        result = subprocess.run([compiler, *COMPILE_FLAGS, *sources, "-o", tmp], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {' '.join(sources)}:\n{result.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("GLM6B_CPU_KERNELS", "1") == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        log.info("no C++ compiler found: CPU int4/int8 layers use PyTorch's ops")
        return None
    try:
        with _build_lock:
            path = _build(compiler)
        library = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        log.warning("glm6b's CPU kernels could not be built (%s); PyTorch's ops are used instead", error)
        return None
    if not library.glm6b_cpu_kernels_available() and not library.glm6b_avx2_available():
        log.info("this CPU has neither AVX512-BF16 nor AVX2 + FMA + F16C: CPU int4/int8 layers use PyTorch's ops")
        return None
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    library.glm6b_matmul.argtypes = [i32, ptr, i64, i64, ptr, ptr, i64, ptr, i32, i32]
    library.glm6b_matmul.restype = i32
    library.glm6b_dequantize.argtypes = [i32, ptr, ptr, i64, i64, ptr, i32]
    library.glm6b_dequantize.restype = i32
    library.glm6b_cpu_kernels_amx.restype = i32
    for name in ("glm6b_avx2_matmul", "glm6b_avx2_matmul_q8"):
        getattr(library, name).argtypes = [i32, i32, ptr, i64, i64, ptr, ptr, i64, ptr, i32]
        getattr(library, name).restype = i32
    library.glm6b_avx2_dequantize.argtypes = [i32, ptr, ptr, i64, i64, ptr, i32]
    library.glm6b_avx2_dequantize.restype = i32
    library.glm6b_avx2_matmul_x16.argtypes = [i32, ptr, i64, i64, ptr, ptr, i64, ptr, i32]
    library.glm6b_avx2_matmul_x16.restype = i32
    return library


@functools.cache
def isa() -> str | None:
    """Which build of the kernels runs here: "avx512bf16", "avx2", or None (PyTorch's ops; compiles the
    kernels on the first call). ``GLM6B_AVX512=0`` picks "avx2" on a CPU that has both."""
    library = _library()
    if library is None:
        return None
    if library.glm6b_cpu_kernels_available() and os.environ.get("GLM6B_AVX512", "1") != "0":
        return "avx512bf16"
    return "avx2" if library.glm6b_avx2_available() else None


def available() -> bool:
    """Whether the kernels are built and usable on this CPU (compiles them on the first call)."""
    return isa() is not None


@functools.cache
def has_amx() -> bool:
    """Whether the kernels use Intel AMX tiles here (compiled in, and granted by the OS)."""
    library = _library()
    return (isa() == "avx512bf16" and os.environ.get("GLM6B_AMX", "1") != "0"
            and bool(library.glm6b_cpu_kernels_amx()))


# Activation dtypes each build takes (the AVX2 one converts them to float32 once per call).
ACTIVATION_DTYPES = {"avx512bf16": (torch.bfloat16,), "avx2": (torch.float32, torch.bfloat16, torch.float16)}
_AVX2_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def supports(bits: int, in_features: int, dtype: torch.dtype) -> bool:
    """Whether a layer of this shape with inputs of `dtype` can use the kernels."""
    return (bits in (4, 8) and in_features % K_MULTIPLE == 0 and available()
            and dtype in ACTIVATION_DTYPES[isa()])


def _loaded_library() -> ctypes.CDLL:
    library = _library()
    if library is None:
        raise RuntimeError("glm6b's CPU kernels are not available here (see glm6b.quant.cpu_kernels)")
    return library


def _check_rows(x: torch.Tensor) -> None:
    dtypes = ACTIVATION_DTYPES[isa()]
    if x.dtype not in dtypes or x.dim() != 2 or x.device.type != "cpu":
        names = " / ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"x must be a CPU {names} [rows, in] tensor, got {x.dtype} {list(x.shape)} on {x.device}")


def _check(weight: torch.Tensor, weight_scale: torch.Tensor, bits: int, in_features: int) -> None:
    expected_cols = in_features // 2 if bits == 4 else in_features
    if weight.dtype != torch.int8 or weight.dim() != 2 or weight.shape[1] != expected_cols or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous int8 [out, {expected_cols}] tensor for {bits} bits and "
                         f"{in_features} inputs, got {weight.dtype} {list(weight.shape)}")
    if weight_scale.dtype != torch.float16 or weight_scale.shape != weight.shape[:1] or not weight_scale.is_contiguous():
        raise ValueError(f"weight_scale must be a contiguous float16 [{weight.shape[0]}] tensor, "
                         f"got {weight_scale.dtype} {list(weight_scale.shape)}")
    if in_features % K_MULTIPLE:
        raise ValueError(f"in_features must be a multiple of {K_MULTIPLE}, got {in_features}")


def _check_status(status: int, kernel: str, arguments: str) -> None:
    """Raise for a kernel's status: -2 it could not allocate its activation buffers, other nonzero values
    it refused the arguments."""
    if status == -2:
        raise MemoryError(f"{kernel}: out of memory for its activation buffers ({arguments})")
    if status != 0:
        raise RuntimeError(f"{kernel} refused {arguments}")


def _checked_output(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                    bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x made contiguous and the empty [rows, out] result in x's dtype, once x, weight and scale are checked."""
    _check_rows(x)
    _check(weight, weight_scale, bits, x.shape[1])
    x = x.contiguous()
    return x, torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype)


@torch.library.custom_op("glm6b::quantized_matmul", mutates_args=())
def quantized_matmul(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bits: int,
                     amx: bool = True) -> torch.Tensor:
    """``x @ (q * weight_scale).T`` for THUDM's int8 [out, in] / int4 [out, in / 2] weight, in x's dtype.

    x: [rows, in] on the CPU, in a multiple of 64: bfloat16 (AVX-512 build), or float32 / bfloat16 /
    float16 (AVX2 build). Float32 sums; the row scale is applied to the sum and the result rounded to
    x's dtype once. AVX-512 build: from `AMX_MIN_ROWS` rows on, AMX tiles where `has_amx()` (and `amx`);
    otherwise AVX512-BF16 dot products. AVX2 build: FMA dot products (`amx` is ignored).
    """
    library = _loaded_library()
    x, out = _checked_output(x, weight, weight_scale, bits)
    in_features = x.shape[1]
    if x.shape[0] == 0:
        return out
    if isa() == "avx2":
        status = library.glm6b_avx2_matmul(bits, _AVX2_DTYPE_CODES[x.dtype], x.data_ptr(), x.shape[0], in_features,
                                           weight.data_ptr(), weight_scale.data_ptr(), weight.shape[0],
                                           out.data_ptr(), torch.get_num_threads())
    else:
        status = library.glm6b_matmul(bits, x.data_ptr(), x.shape[0], in_features, weight.data_ptr(),
                                      weight_scale.data_ptr(), weight.shape[0], out.data_ptr(),
                                      torch.get_num_threads(), int(amx and has_amx() and x.shape[0] >= AMX_MIN_ROWS))
    _check_status(status, "glm6b_matmul", f"x {list(x.shape)}, weight {list(weight.shape)}, bits {bits}")
    return out


@quantized_matmul.register_fake
def _(x, weight, weight_scale, bits, amx=True):
    return x.new_empty(x.shape[0], weight.shape[0])


# Input rows up to which `bf16_matmul` beats F.linear on a bfloat16 weight (memory-bound dot products;
# `benchmarks/quantize.py --only kernels --rows 3 4`: 1.3-1.9x F.linear's speed). Taken four input rows at a
# time against four weight rows they still took 0.8-0.9x F.linear's time at 5-8 rows, about its time at 16
# (a glm_6b layer's linears and the lm_head, AMD Zen 4; AVX-512 build).
BF16_MAX_ROWS = 8
# The same for the AVX2 build, where PyTorch's bfloat16 F.linear has no bfloat16 units to run on and was
# slower than the float32 dot products up to this many rows (benchmarks/quantize.py, kernels table).
AVX2_BF16_MAX_ROWS = 8


def bf16_max_rows() -> int:
    """Input rows up to which `bf16_matmul` is the faster product here (0 without the kernels)."""
    return {"avx512bf16": BF16_MAX_ROWS, "avx2": AVX2_BF16_MAX_ROWS}.get(isa(), 0)


@torch.library.custom_op("glm6b::bf16_matmul", mutates_args=())
def bf16_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for a bfloat16 [out, in] weight and a few bfloat16 rows x [rows, in] on the CPU
    (in a multiple of 64): float32 sums, rounded to bfloat16 once."""
    library = _loaded_library()
    if x.dtype != torch.bfloat16 or x.dim() != 2 or x.device.type != "cpu":
        raise ValueError(f"x must be a CPU bfloat16 [rows, in] tensor, got {x.dtype} {list(x.shape)} on {x.device}")
    if (weight.dtype != torch.bfloat16 or weight.dim() != 2 or weight.shape[1] != x.shape[1]
            or not weight.is_contiguous() or x.shape[1] % K_MULTIPLE):
        raise ValueError(f"weight must be a contiguous bfloat16 [out, {x.shape[1]}] tensor (in a multiple of "
                         f"{K_MULTIPLE}), got {weight.dtype} {list(weight.shape)}")
    x = x.contiguous()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.bfloat16)
    if x.shape[0] == 0:
        return out
    if isa() == "avx2":
        status = library.glm6b_avx2_matmul(16, _AVX2_DTYPE_CODES[torch.bfloat16], x.data_ptr(), x.shape[0],
                                           x.shape[1], weight.data_ptr(), None, weight.shape[0], out.data_ptr(),
                                           torch.get_num_threads())
    else:
        status = library.glm6b_matmul(16, x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), None,
                                      weight.shape[0], out.data_ptr(), torch.get_num_threads(), 0)
    _check_status(status, "glm6b_matmul", f"x {list(x.shape)}, bfloat16 weight {list(weight.shape)}")
    return out


@bf16_matmul.register_fake
def _(x, weight):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("glm6b::dequantize_rows", mutates_args=("out",))
def dequantize_rows(weight: torch.Tensor, weight_scale: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """Write q * weight_scale of THUDM's int8/int4 rows into `out` ([rows, in], contiguous): bfloat16 (AVX-512
    build, rounded once) or float32 (AVX2 build)."""
    library = _loaded_library()
    in_features = out.shape[1]
    _check(weight, weight_scale, bits, in_features)
    dtype = torch.float32 if isa() == "avx2" else torch.bfloat16
    if out.dtype != dtype or out.shape[0] != weight.shape[0] or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} [{weight.shape[0]}, {in_features}] tensor, "
                         f"got {out.dtype} {list(out.shape)}")
    dequantize = library.glm6b_avx2_dequantize if isa() == "avx2" else library.glm6b_dequantize
    status = dequantize(bits, weight.data_ptr(), weight_scale.data_ptr(), weight.shape[0], in_features,
                        out.data_ptr(), torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"glm6b_dequantize refused weight {list(weight.shape)}, bits {bits}")


@torch.library.custom_op("glm6b::quantized_matmul_int8_activations", mutates_args=())
def quantized_matmul_int8_activations(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                                      bits: int) -> torch.Tensor:
    """`quantized_matmul` with x first quantized per row to int8 (scale max|x| / 127, round to nearest) and
    integer products (AVX2 build only): faster for several rows, but not x @ W.T exactly (opt-in, see
    glm6b.quant.linear). x: float32 / bfloat16 / float16 [rows, in] on the CPU; the result in x's dtype."""
    library = _loaded_library()
    if isa() != "avx2":
        raise RuntimeError("int8 activations are a kernel of the AVX2 build only (GLM6B_AVX512=0 picks it)")
    x, out = _checked_output(x, weight, weight_scale, bits)
    in_features = x.shape[1]
    if x.shape[0] == 0:
        return out
    status = library.glm6b_avx2_matmul_q8(bits, _AVX2_DTYPE_CODES[x.dtype], x.data_ptr(), x.shape[0], in_features,
                                          weight.data_ptr(), weight_scale.data_ptr(), weight.shape[0],
                                          out.data_ptr(), torch.get_num_threads())
    _check_status(status, "glm6b_avx2_matmul_q8", f"x {list(x.shape)}, weight {list(weight.shape)}, bits {bits}")
    return out


@quantized_matmul_int8_activations.register_fake
def _(x, weight, weight_scale, bits):
    return x.new_empty(x.shape[0], weight.shape[0])


# Activation dtypes `quantized_matmul_int16_activations` takes: their values convert to 16-bit integers
# exactly within a factor of 2^7 of a row's largest (float32 ones would lose bits everywhere).
INT16_ACTIVATION_DTYPES = (torch.bfloat16, torch.float16)


@torch.library.custom_op("glm6b::quantized_matmul_int16_activations", mutates_args=())
def quantized_matmul_int16_activations(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """`quantized_matmul` for an int4 weight (AVX2 build) with each row of x converted to 16-bit integers,
    64 columns a block, each block at the power-of-two scale that puts its largest magnitude in [2^14, 2^15),
    and integer products (exact; see csrc/cpu_kernels_avx2.cpp). Every bfloat16 value within a factor of 2^7
    of its block's largest converts exactly, the smaller ones move by at most 2^-15 of it. x: bfloat16 / float16 [rows, in] on
    the CPU; the result in x's dtype. A row holding inf or NaN takes the float32 products."""
    library = _loaded_library()
    if isa() != "avx2":
        raise RuntimeError("16-bit activations are a kernel of the AVX2 build only (GLM6B_AVX512=0 picks it)")
    if x.dtype not in INT16_ACTIVATION_DTYPES:
        raise ValueError(f"x must be bfloat16 or float16 for 16-bit activations, got {x.dtype}")
    x, out = _checked_output(x, weight, weight_scale, 4)
    in_features = x.shape[1]
    if x.shape[0] == 0:
        return out
    status = library.glm6b_avx2_matmul_x16(_AVX2_DTYPE_CODES[x.dtype], x.data_ptr(), x.shape[0], in_features,
                                           weight.data_ptr(), weight_scale.data_ptr(), weight.shape[0],
                                           out.data_ptr(), torch.get_num_threads())
    _check_status(status, "glm6b_avx2_matmul_x16", f"x {list(x.shape)}, weight {list(weight.shape)}")
    return out


@quantized_matmul_int16_activations.register_fake
def _(x, weight, weight_scale):
    return x.new_empty(x.shape[0], weight.shape[0])


__all__ = ["available", "isa", "has_amx", "supports", "AMX_MIN_ROWS", "BF16_MAX_ROWS", "AVX2_BF16_MAX_ROWS",
           "ACTIVATION_DTYPES", "bf16_max_rows", "bf16_matmul", "quantized_matmul", "dequantize_rows",
           "quantized_matmul_int8_activations", "quantized_matmul_int16_activations", "INT16_ACTIVATION_DTYPES",
           "cache_dir", "K_MULTIPLE"]
