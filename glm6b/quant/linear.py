"""Weight-only int8/int4 layers in THUDM's layout, the stock PyTorch kernel each one uses per device,
and `quantize_model`, which swaps them into a built model from outside (the model code knows nothing
of quantization).

State dict: a `QuantizedLinear` / `QuantizedEmbedding` holds exactly THUDM's tensors under THUDM's
names, ``weight`` (int8 [out, in], or [out, in / 2] packed two per byte for 4 bits) and
``weight_scale`` (float16 [out]), plus the float ``bias``; so the HF module names
(``attention.query_key_value``, ...) and the files of chatglm-6b-int8/-int4/-int4-qe are unchanged.

Kernels: which one multiplies a layer is the table `KERNELS` below, (device, path, bits) -> the kernel
for each range of input rows. A layer's path is chosen when its kernel is built (at the first forward
for an input device and dtype, see `QuantizedLinear`), by `kernel_path`; the rows at each call.

* CPU, glm6b's own kernels (glm6b.quant.cpu_kernels; they read THUDM's bytes as they are, with no copy
  and nothing built at the first forward, and unpack each weight block once for all input rows):
  - ``glm6b_amx`` / ``glm6b_avx512``: bfloat16 inputs on an AVX512-BF16 CPU, with / without AMX tiles
    (with AMX a prefill's too: as fast as a bfloat16 weight's GEMM or faster). Exceptions, measured with
    benchmarks/quantize.py: with AMX, int8 below `cpu_kernels.AMX_MIN_ROWS` rows keeps the stock op, as
    fast for one row there (without AMX glm6b's int8 dot products beat it at 1-8 rows on weights in huge
    pages: 1.1-1.9x on a Zen 4); without AMX a long prefill (int8: `CPU_DEQUANTIZED_MIN_ROWS` rows or
    more, int4: `AVX512_INT4_BLOCKS_MIN_ROWS`) multiplies blocks de-quantized by the kernels with the bfloat16
    GEMM; int4 below that stays on the dot products, which run at that GEMM's rate.
  - ``glm6b_avx2``: float32 / bfloat16 / float16 inputs on a CPU with AVX2 + FMA but no AVX512-BF16
    (AMD Zen 2 / Zen 3, ...): float32 FMA dot products up to `AVX2_GEMM_MIN_ROWS` rows, then float32
    blocks de-quantized by the kernels and PyTorch's float32 GEMM (such a CPU has no faster product; its
    bfloat16 GEMM is several times slower). PyTorch's weight-only ops are 10-30x slower there.
  - ``glm6b_avx2_int16_activations``: int4 with bfloat16 / float16 inputs on that CPU: each input row
    converted to 16-bit integers per 64 columns (exact within 2^7 of a block's largest bfloat16 value)
    and exact integer products, 1.24-1.38x the float32 FMA products' speed; ``GLM6B_INT16_ACTIVATIONS=0``
    keeps those.
  - ``glm6b_avx2_int8_activations``: each input row quantized to int8 for integer products
    (vpmaddubsw), for any number of rows. Faster from two rows on, but it changes results, so it is opt-in: ``GLM6B_INT8_ACTIVATIONS=1`` when the layer's kernel is built (its quality
    is in benchmarks/quantize.py's quality table).

Otherwise (float32 / float16 input on an AVX-512 CPU, no kernels, ``GLM6B_CPU_KERNELS=0``):

* CPU, 8 bits: ``aten._weight_int8pack_mm`` on the stored int8 weight (no copy).
* CPU, 4 bits: ``aten._weight_int4pack_mm_for_cpu`` on the weight in the byte order of
  ``aten._convert_weight_to_int4pack_for_cpu`` (unsigned values q + 8, zero point 0); THUDM's one
  scale per row is repeated over groups of `CPU_INT4_GROUP` columns (the op takes groups of 32..256).
  Where that byte order is known (64-row blocks, checked against the op once per row count) it is
  computed from THUDM's bytes and written over them, so memory stays one int4 copy, and the state
  dict converts it back; elsewhere the op makes a separate copy.
* CPU, many rows at once (a prompt's prefill, `CPU_DEQUANTIZED_MIN_ROWS` or more): the stock ops above
  work row by row, so there the weight is de-quantized into the input dtype a block of
  `CPU_DEQUANTIZED_BLOCK_BYTES` of weight at a time (a scratch buffer that stays in the shared cache) and
  multiplied with the float GEMM: 1.5-3x faster than the stock ops for 100 rows (benchmarks/quantize.py,
  kernels table), though still 1.5-4x slower than a bfloat16 weight.
* CUDA: ``aten._weight_int8pack_mm`` (8 bits) and ``aten._weight_int4pack_mm`` (4 bits, bfloat16
  only), each checked once per layer against ``x @ dequantize(W).T``; a failing or missing op falls
  back to de-quantizing into the input dtype and ``F.linear``.
* Anything else: de-quantize (THUDM's formula) into the input dtype, then ``F.linear``.

`BF16DecodeLinear` is the float counterpart for decoding: an nn.Linear whose few-row bfloat16
products on the CPU run glm6b's dot-product kernel (the decode engine turns a bf16 model's linears into
it; the lm_head of an int4 / int8 model too).
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels
from .thudm import check_bits, dequantize, pack_int4, quantize_to_thudm, unpacked_weight

# The four Linear layers of every block that THUDM quantizes (spec 4.12); names kept as in HF.
QUANTIZED_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
# Columns per scale group for the CPU int4 kernel (it accepts 32, 64, 128, 256; any is exact for a
# row scale). Each group holds a (scale, zero) pair: 32 costs 25 % more bytes than the int4 weight,
# 256 about 3 % (90 MB for the 28 layers). benchmarks/quantize.py prints the speed of each: no group
# size was consistently faster on the CPUs measured, so the one with the fewest bytes is used.
CPU_INT4_GROUP = 256
# Rows of input from which the CPU int8/int4 layers multiply with blocks of de-quantized weight instead
# of the stock weight-only ops (which work a row at a time; measured: no gain at 32 rows, 1.5-3x at 100).
CPU_DEQUANTIZED_MIN_ROWS = 64
# Weight de-quantized at a time for the GEMM (1024 rows of 4096 bfloat16 columns, 256 of 16384). 1024 rows of
# 16384 columns (32 MiB) ran the 4h_to_h GEMM at 83 % of the bfloat16 weight's rate, 256 at 88-94 % (Zen 4).
CPU_DEQUANTIZED_BLOCK_BYTES = 8 * 2**20
# AVX-512 build without AMX, int4: the dot products (four input rows a pass against four weight rows) ran at
# the bfloat16 GEMM's rate from 8 to about 200 rows and 10-19 % faster than the de-quantized blocks at 64-128
# (a 100-token prefill; AMD Zen 4, 2 threads); from 256 rows on the blocks were as fast or faster.
AVX512_INT4_BLOCKS_MIN_ROWS = 256
# AVX2 build: input rows from which the float32 GEMM on de-quantized blocks beats the float32 dot products
# (benchmarks/quantize.py, kernels table: on a Zen 3 the dot products ran at the GEMM's rate up to about
# 64 rows), and the bytes of float32 weight de-quantized at a time (a block that stays in the shared cache
# while the GEMM reads it). With int8 activations the integer products beat the float32 GEMM at every row
# count measured (about 2.5x at 100 rows), so that path has no GEMM.
AVX2_GEMM_MIN_ROWS = 64
AVX2_DEQUANTIZED_BLOCK_BYTES = 4 * 2**20
CUDA_INT4_GROUP = 128
CUDA_INT4_INNER_K_TILES = 8
_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # input dtypes the CPU int8/int4 ops take
_CPU_INT4_BLOCK = 64  # rows per block in the CPU int4 kernel's layout (AVX-512 build)


# ----------------------------------------------------------------------------------- CPU int4 layout


def _cpu_int4_values(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """The unsigned values q + 8 as int32 [out, in], what the int4 pack ops take."""
    return unpacked_weight(weight, bits).to(torch.int32) + 8


def _blocked_to_thudm(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Invert the CPU kernel's blocked layout ([out/64, in, 32] bytes: low nibble row j, high nibble row
    j + 32 of each 64-row block) back to THUDM's packed int8 [out, in / 2]."""
    v = packed.view(torch.uint8).view(-1, in_features // 2, 2, _CPU_INT4_BLOCK // 2)
    even, odd = v[:, :, 0], v[:, :, 1]  # columns 2c and 2c + 1: [blocks, in/2, 32]
    top = ((even & 0x0F) << 4) | (odd & 0x0F)  # rows j: THUDM byte c = column 2c high, 2c + 1 low
    bottom = (even & 0xF0) | (odd >> 4)  # rows j + 32
    thudm = torch.stack((top, bottom), dim=1).transpose(-1, -2)  # [blocks, 2, 32, in/2]
    return (thudm.reshape(out_features, in_features // 2) ^ 0x88).view(torch.int8)  # back to signed nibbles


def _thudm_to_blocked(weight: torch.Tensor, out_features: int, in_features: int,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """THUDM's packed int8 [out, in / 2] straight to the CPU kernel's blocked layout (uint8, same shape),
    in uint8 arithmetic: what ``_convert_weight_to_int4pack_for_cpu`` returns, without int32 temporaries.
    Written into `out` when given (it must not share memory with `weight`)."""
    half = _CPU_INT4_BLOCK // 2
    u = (weight.view(torch.uint8) ^ 0x88).view(-1, 2, half, in_features // 2)  # nibbles q + 8; [blocks, 2, 32, in/2]
    # One byte transpose up front, so that the nibble arithmetic below runs over runs of 32 bytes.
    u = u.permute(0, 3, 1, 2).contiguous()  # [blocks, in/2, 2, 32]: byte c of rows j and j + 32
    top, bottom = u[:, :, 0], u[:, :, 1]  # byte c holds columns 2c (high nibble) and 2c + 1 (low)
    if out is None:
        out = torch.empty(weight.shape, dtype=torch.uint8, device=weight.device)
    blocked = out.view(-1, in_features // 2, 2, half)  # [blocks, in/2, column 2c / 2c + 1, 32]
    # Column 2c: low nibble row j, high nibble row j + 32; column 2c + 1 likewise.
    torch.bitwise_or(top >> 4, bottom & 0xF0, out=blocked[:, :, 0])
    torch.bitwise_or(top & 0x0F, bottom << 4, out=blocked[:, :, 1])
    return out.view(out_features, in_features // 2)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


def _return_freed_heap() -> None:
    """Give freed heap memory back to the OS (glibc's malloc_trim), after an int4 layout conversion: it frees
    a few MiB of temporaries between the layers' long-lived tensors, and without this the heap kept them,
    about 0.25 GB over the 28 layers, all counted in the process's resident memory."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _thudm_to_blocked_into(weight: torch.Tensor, out: torch.Tensor, in_features: int, rows_per_step: int = 1024) -> None:
    """Write `_thudm_to_blocked` of THUDM's packed [out, in / 2] weight into `out` (uint8, same shape; may be
    the weight's own bytes) a slice of rows at a time. 64-row blocks are independent and keep their byte
    range, so each slice is converted on its own: the temporaries stay a few MiB (whole-matrix ones
    fragmented the heap by about 1 GB over the 28 layers)."""
    for start in range(0, weight.shape[0], rows_per_step):
        end = min(start + rows_per_step, weight.shape[0])
        # The slice's bytes are read (into a transposed copy) before its range of `out` is written.
        _thudm_to_blocked(weight[start:end], end - start, in_features, out=out[start:end])
    _return_freed_heap()


_BLOCKED_LAYOUT_CHECKED: dict[int, bool] = {}


def _cpu_int4_layout_is_blocked(out_features: int) -> bool:
    """Whether this PyTorch build lays out int4pack copies of `out_features` rows in 64-row blocks
    (checked once per row count on a small matrix against the op itself, so the direct conversions
    both ways are used only where they are exact)."""
    if out_features % _CPU_INT4_BLOCK:
        return False
    if out_features not in _BLOCKED_LAYOUT_CHECKED:
        gen = torch.Generator().manual_seed(0)
        q = torch.randint(-7, 8, (out_features, 64), dtype=torch.int8, generator=gen)
        try:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32) + 8, 1)
            ok = (torch.equal(_thudm_to_blocked(pack_int4(q), out_features, 64), packed.view(torch.uint8))
                  and torch.equal(_blocked_to_thudm(packed, out_features, 64), pack_int4(q)))
        except (RuntimeError, ValueError):
            ok = False
        _BLOCKED_LAYOUT_CHECKED[out_features] = ok
    return _BLOCKED_LAYOUT_CHECKED[out_features]


_OP_CONVERSION_ROWS = 4096  # rows per conversion op call (bounds its int32 input: 64 MiB at 4096 columns)
_OP_CONVERSION_SPLITS: dict[int, bool] = {}


def _convert_with_op(weight: torch.Tensor, rows_per_call: int) -> torch.Tensor:
    """THUDM's packed weight to the CPU int4 kernel's layout with ``_convert_weight_to_int4pack_for_cpu``,
    `rows_per_call` rows (a multiple of 64) at a time."""
    op = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    if rows_per_call >= weight.shape[0]:
        return op(_cpu_int4_values(weight, 4), 1)
    out = None
    for start in range(0, weight.shape[0], rows_per_call):
        part = op(_cpu_int4_values(weight[start:start + rows_per_call], 4), 1)
        if out is None:
            out = torch.empty((weight.shape[0], *part.shape[1:]), dtype=part.dtype, device=part.device)
        out[start:start + part.shape[0]] = part
    return out


def _cpu_int4_pack_by_op(weight: torch.Tensor) -> torch.Tensor:
    """The op's layout for any row count: converted in slices of rows where this PyTorch build gives the
    same bytes as one call (checked once per row count on a small matrix), else in one call (its int32
    input is then 8x the int4 weight: 2 GiB for the 130528-row lm_head)."""
    out_features = weight.shape[0]
    if out_features not in _OP_CONVERSION_SPLITS:
        q = torch.randint(-7, 8, (out_features, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
        try:
            whole = _convert_with_op(pack_int4(q), out_features)
            _OP_CONVERSION_SPLITS[out_features] = torch.equal(_convert_with_op(pack_int4(q), _CPU_INT4_BLOCK), whole)
        except (RuntimeError, ValueError):
            _OP_CONVERSION_SPLITS[out_features] = False
    rows = _OP_CONVERSION_ROWS if _OP_CONVERSION_SPLITS[out_features] else out_features
    packed = _convert_with_op(weight, rows)
    _return_freed_heap()
    return packed


def _cpu_int4_group(in_features: int) -> int:
    """CPU_INT4_GROUP if it divides in_features, else the largest group size the op accepts that does (0: none)."""
    for group in (CPU_INT4_GROUP, 256, 128, 64, 32):
        if in_features % group == 0:
            return group
    return 0


def _scales_and_zeros(weight_scale: torch.Tensor, in_features: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    """[in / group, out, 2]: THUDM's row scale repeated for every group, zero point 0 (value = (u - 8) * scale)."""
    scale = weight_scale.to(dtype)[None, :].expand(in_features // group, -1)
    return torch.stack((scale, torch.zeros_like(scale)), dim=-1).contiguous()


def _apply_keeping_scale(module: nn.Module, fn, recurse: bool) -> None:
    """nn.Module._apply for a quantized layer: `.to(device)` moves everything, but a dtype cast
    (`.half()`, `.to(torch.bfloat16)`) leaves ``weight_scale`` in THUDM's float16."""
    scale = module.weight_scale.data  # the tensor itself: the parameter may be cast in place
    nn.Module._apply(module, fn, recurse)
    if module.weight_scale.dtype != scale.dtype:
        module.weight_scale.data = scale.to(module.weight_scale.device)


_scratch_buffers = threading.local()  # one per thread: two threads may run quantized layers at once


def _scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat buffer of at least `numel` elements, reused by every layer (fresh pages cost more than the work)."""
    buffers = _scratch_buffers.__dict__
    buffer = buffers.get(dtype)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buffer[:numel]


def _block_rows(block_bytes: int, in_features: int, dtype: torch.dtype) -> int:
    """Output rows per de-quantized block: about `block_bytes` of weight in `dtype`, a multiple of 64 (the
    CPU int4 layout's blocks)."""
    return max(64, block_bytes // (dtype.itemsize * in_features) // 64 * 64)


def _dequantized_blocks_mm(x2d: torch.Tensor, out_features: int, fill_block) -> torch.Tensor:
    """x2d @ W.T, with W de-quantized about `CPU_DEQUANTIZED_BLOCK_BYTES` at a time into a reused buffer by
    ``fill_block(start, end, block)`` (block: [end - start, in] in the input dtype)."""
    in_features = x2d.shape[1]
    out = torch.empty(x2d.shape[0], out_features, dtype=x2d.dtype)
    per_block = _block_rows(CPU_DEQUANTIZED_BLOCK_BYTES, in_features, x2d.dtype)
    for start in range(0, out_features, per_block):
        end = min(start + per_block, out_features)
        block = _scratch((end - start) * in_features, x2d.dtype).view(end - start, in_features)
        fill_block(start, end, block)
        out[:, start:end] = F.linear(x2d, block)
    return out


def _int8_dequantized_mm(x2d: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x2d @ (weight * scale).T for an int8 [out, in] weight, a block of output rows at a time."""
    def fill(start, end, block):
        block.copy_(weight[start:end]).mul_(scale[start:end, None])

    return _dequantized_blocks_mm(x2d, weight.shape[0], fill)


def _int4_blocked_dequantized_mm(x2d: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x2d @ ((q - 8) * scale).T for the CPU int4 kernel's blocked layout ([out/64, in, 32] bytes: low
    nibble row j, high nibble row j + 32 of each 64-row block; values q + 8), a few blocks at a time.
    Each block is de-quantized straight into [in, 64] (the GEMM's transposed-weight operand)."""
    in_features = x2d.shape[1]
    out_features = packed.numel() * 2 // in_features
    blocks = packed.view(-1, in_features, _CPU_INT4_BLOCK // 2)
    per_step = _block_rows(CPU_DEQUANTIZED_BLOCK_BYTES, in_features, x2d.dtype) // _CPU_INT4_BLOCK
    out = torch.empty(x2d.shape[0], out_features, dtype=x2d.dtype)
    half = _CPU_INT4_BLOCK // 2
    for first in range(0, blocks.shape[0], per_step):
        last = min(first + per_step, blocks.shape[0])
        rows = slice(first * _CPU_INT4_BLOCK, last * _CPU_INT4_BLOCK)
        # Flipping each nibble's top bit turns q + 8 into q's two's complement; int8 shifts sign-extend.
        signed = (blocks[first:last] ^ 0x88).view(torch.int8).transpose(0, 1)  # [in, n, 32]
        weight_t = _scratch(in_features * (last - first) * _CPU_INT4_BLOCK, x2d.dtype)
        weight_t = weight_t.view(in_features, last - first, _CPU_INT4_BLOCK)
        weight_t[:, :, :half].copy_((signed << 4) >> 4)  # low nibbles: rows j
        weight_t[:, :, half:].copy_(signed >> 4)  # high nibbles: rows j + 32
        weight_t.mul_(scale[rows].view(1, last - first, _CPU_INT4_BLOCK))
        out[:, rows] = x2d @ weight_t.view(in_features, -1)
    return out


def _float32_blocks_mm(x2d: torch.Tensor, out_features: int, fill_block) -> torch.Tensor:
    """x2d @ W.T with PyTorch's float32 GEMM, W written as float32 blocks of about `AVX2_DEQUANTIZED_BLOCK_BYTES`
    into a reused buffer by ``fill_block(start, end, block)`` (block: float32 [end - start, in]), in x2d's
    dtype. Each block's product is written as rows of the transposed result ([out, rows]), a contiguous
    slice, and transposed back once at the end."""
    x = x2d.float()
    in_features = x.shape[1]
    per_block = _block_rows(AVX2_DEQUANTIZED_BLOCK_BYTES, in_features, torch.float32)
    out_t = torch.empty(out_features, x.shape[0])
    for start in range(0, out_features, per_block):
        end = min(start + per_block, out_features)
        block = _scratch((end - start) * in_features, torch.float32).view(end - start, in_features)
        fill_block(start, end, block)
        torch.mm(block, x.t(), out=out_t[start:end])
    return out_t.t().contiguous().to(x2d.dtype)


def _float32_dequantized_mm(x2d: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """x2d @ (q * scale).T: blocks of float32 rows de-quantized by glm6b's AVX2 kernel and the float32 GEMM."""
    def fill(start, end, block):
        cpu_kernels.dequantize_rows(weight[start:end], scale[start:end], bits, block)

    return _float32_blocks_mm(x2d, weight.shape[0], fill)


def _bf16_weight_float32_mm(x2d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x2d @ weight.T for a bfloat16 weight with the float32 GEMM on float32 copies of its blocks: on a CPU
    without bfloat16 units (the AVX2 build) PyTorch's bfloat16 GEMM ran at about a quarter of the float32
    one, and a block's conversion is a shift per element, read once for all rows."""
    def fill(start, end, block):
        block.copy_(weight[start:end])

    return _float32_blocks_mm(x2d, weight.shape[0], fill)


# ------------------------------------------------------------------------- the kernel table
# Each kernel: (layer, x2d [rows, in] contiguous, the layer's built kernel tuple) -> x2d @ W.T [rows, out].
# The built tuple is (path, ...) with what the path needs, made once in QuantizedLinear._build_kernel.


def _avx512_dot(layer, x2d, kernel):  # AVX512-BF16 dot products (AMX off for this call)
    return cpu_kernels.quantized_matmul(x2d, layer.weight, layer.weight_scale, layer.bits, False)


def _amx_tiles(layer, x2d, kernel):  # AMX tiles (a prefill's rows too, see cpu_kernels.cpp)
    return cpu_kernels.quantized_matmul(x2d, layer.weight, layer.weight_scale, layer.bits, True)


def _avx512_bf16_blocks(layer, x2d, kernel):  # bfloat16 blocks de-quantized by the kernels, bfloat16 GEMM
    def fill(start, end, block):
        cpu_kernels.dequantize_rows(layer.weight[start:end], layer.weight_scale[start:end], layer.bits, block)

    return _dequantized_blocks_mm(x2d, layer.out_features, fill)


def _avx2_dot(layer, x2d, kernel):  # AVX2 float32 FMA dot products
    return cpu_kernels.quantized_matmul(x2d, layer.weight, layer.weight_scale, layer.bits)


def _avx2_int8_activations(layer, x2d, kernel):  # AVX2, int8 activations x THUDM's weights in integers
    return cpu_kernels.quantized_matmul_int8_activations(x2d, layer.weight, layer.weight_scale, layer.bits)


def _avx2_int16_activations(layer, x2d, kernel):  # AVX2, int4: bfloat16 / float16 rows as 16-bit integers
    return cpu_kernels.quantized_matmul_int16_activations(x2d, layer.weight, layer.weight_scale)


def _avx2_float32_blocks(layer, x2d, kernel):  # float32 blocks de-quantized by the AVX2 kernel, float32 GEMM
    return _float32_dequantized_mm(x2d, layer.weight, layer.weight_scale, layer.bits)


def _int8pack(layer, x2d, kernel):  # PyTorch's weight-only int8 op (CPU or CUDA); kernel[1]: the scale in x's dtype
    return torch.ops.aten._weight_int8pack_mm(x2d, layer.weight, kernel[1])


def _int8_blocks(layer, x2d, kernel):  # blocks de-quantized in x's dtype by PyTorch's ops, then the float GEMM
    return _int8_dequantized_mm(x2d, layer.weight, kernel[1])


def _int4pack(layer, x2d, kernel):  # PyTorch's CPU int4 op on its own byte order (kernel: packed, scales, group)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, kernel[1], kernel[3], kernel[2])


def _int4pack_blocks(layer, x2d, kernel):  # de-quantized blocks from that byte order (where it is known)
    if kernel[4] is None:
        return _int4pack(layer, x2d, kernel)
    return _int4_blocked_dequantized_mm(x2d, kernel[1], kernel[4])


def _int4pack_cuda(layer, x2d, kernel):
    return torch.ops.aten._weight_int4pack_mm(x2d, kernel[1], CUDA_INT4_GROUP, kernel[2])


def _dequantize(layer, x2d, kernel):  # THUDM's de-quantized weight in x's dtype, then F.linear
    return F.linear(x2d, layer.dequantized_weight().to(x2d.dtype))


# (device, path, bits) -> ((from this many input rows on, kernel), ...): a call takes the last entry whose row
# count it reaches. The paths, chosen per (device, input dtype) by `kernel_path`:
#   glm6b_amx       AVX512-BF16 + AMX, bfloat16 inputs (Intel Xeon 4th generation on)
#   glm6b_avx512    AVX512-BF16 without AMX, bfloat16 inputs (AMD Zen 4; GLM6B_AMX=0)
#   glm6b_avx2      AVX2 + FMA, no AVX512-BF16: float32 / bfloat16 / float16 inputs (AMD Zen 3; GLM6B_AVX512=0)
#   glm6b_avx2_int16_activations  the same for int4 and bfloat16 / float16 inputs: 16-bit integer activations
#   glm6b_avx2_int8_activations   the same with GLM6B_INT8_ACTIVATIONS=1 (opt-in: changes results)
#   int8pack / int4pack_cpu       PyTorch's weight-only ops (no glm6b kernels for this CPU or dtype)
#   int4pack_cuda / int8pack on CUDA, and dequantize (anything else)
KERNELS = {
    ("cpu", "glm6b_amx", 4): ((1, _avx512_dot), (cpu_kernels.AMX_MIN_ROWS, _amx_tiles)),
    ("cpu", "glm6b_amx", 8): ((1, _int8pack), (cpu_kernels.AMX_MIN_ROWS, _amx_tiles)),
    ("cpu", "glm6b_avx512", 4): ((1, _avx512_dot), (AVX512_INT4_BLOCKS_MIN_ROWS, _avx512_bf16_blocks)),
    ("cpu", "glm6b_avx512", 8): ((1, _avx512_dot), (CPU_DEQUANTIZED_MIN_ROWS, _avx512_bf16_blocks)),
    ("cpu", "glm6b_avx2", 4): ((1, _avx2_dot), (AVX2_GEMM_MIN_ROWS, _avx2_float32_blocks)),
    ("cpu", "glm6b_avx2", 8): ((1, _avx2_dot), (AVX2_GEMM_MIN_ROWS, _avx2_float32_blocks)),
    ("cpu", "glm6b_avx2_int16_activations", 4): ((1, _avx2_int16_activations), (AVX2_GEMM_MIN_ROWS, _avx2_float32_blocks)),
    ("cpu", "glm6b_avx2_int8_activations", 4): ((1, _avx2_int8_activations),),
    ("cpu", "glm6b_avx2_int8_activations", 8): ((1, _avx2_int8_activations),),
    ("cpu", "int4pack_cpu", 4): ((1, _int4pack), (CPU_DEQUANTIZED_MIN_ROWS, _int4pack_blocks)),
    ("cpu", "int8pack", 8): ((1, _int8pack), (CPU_DEQUANTIZED_MIN_ROWS, _int8_blocks)),
    ("cpu", "dequantize", 4): ((1, _dequantize),),
    ("cpu", "dequantize", 8): ((1, _dequantize),),
    ("cuda", "int4pack_cuda", 4): ((1, _int4pack_cuda),),
    ("cuda", "int8pack", 8): ((1, _int8pack),),
    ("cuda", "dequantize", 4): ((1, _dequantize),),
    ("cuda", "dequantize", 8): ((1, _dequantize),),
}


def kernel_for(device_type: str, path: str, bits: int, rows: int):
    """The kernel `KERNELS` gives for `rows` input rows (a device without entries de-quantizes)."""
    entries = KERNELS.get((device_type, path, bits), ((1, _dequantize),))
    chosen = entries[0][1]
    for min_rows, kernel in entries:
        if rows >= min_rows:
            chosen = kernel
    return chosen


def int8_activations_requested() -> bool:
    """Whether ``GLM6B_INT8_ACTIVATIONS=1`` asks for the int8-activation kernels (read when a layer's kernel is built)."""
    return os.environ.get("GLM6B_INT8_ACTIVATIONS", "0") == "1"


def int16_activations_allowed() -> bool:
    """Whether int4 layers on the AVX2 build take 16-bit integer activations for bfloat16 / float16 inputs
    (the default; ``GLM6B_INT16_ACTIVATIONS=0`` keeps the float32 FMA products, read when a layer's kernel
    is built)."""
    return os.environ.get("GLM6B_INT16_ACTIVATIONS", "1") != "0"


def kernel_path(device: torch.device, dtype: torch.dtype, bits: int, in_features: int) -> str:
    """The path of `KERNELS` a layer takes for inputs of `dtype` on `device` (before any stock-op layout check).

    Returns:
        "glm6b_amx", "glm6b_avx512", "glm6b_avx2", "glm6b_avx2_int16_activations",
        "glm6b_avx2_int8_activations" (glm6b's CPU kernels),
        "int8pack" / "int4pack_cpu" (PyTorch's ops, CPU or CUDA), or "dequantize".
    """
    if device.type == "cpu" and cpu_kernels.supports(bits, in_features, dtype):
        if cpu_kernels.isa() == "avx2":
            if int8_activations_requested():
                return "glm6b_avx2_int8_activations"
            if bits == 4 and dtype in cpu_kernels.INT16_ACTIVATION_DTYPES and int16_activations_allowed():
                return "glm6b_avx2_int16_activations"
            return "glm6b_avx2"
        return "glm6b_amx" if cpu_kernels.has_amx() else "glm6b_avx512"
    if device.type == "cpu" and dtype in _CPU_DTYPES:
        return "int8pack" if bits == 8 else "int4pack_cpu"
    if device.type == "cuda":
        return "int8pack" if bits == 8 else "int4pack_cuda"
    return "dequantize"


# ----------------------------------------------------------------------------------- modules


class QuantizedLinear(nn.Module):
    """``y = x @ dequantize(weight).T + bias`` with THUDM's int8/int4 weight and per-row float16 scale.

    The kernel-specific copy is built at the first forward for a (device, dtype) and rebuilt when the
    weight is replaced; `prepare` builds it ahead. Parameters never require gradients (weight-only
    quantization is for inference; a LoRA adapter can wrap the layer by its HF name).

    Args:
        in_features, out_features: as nn.Linear.
        bits: 4 or 8.
        bias: whether the layer has a bias (kept in float, `dtype`).
        dtype: the bias dtype. device: where the tensors go ("meta" to fill later).
    """

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool = True, dtype=None, device=None):
        super().__init__()
        check_bits(bits)
        if bits == 4 and in_features % 2:
            raise ValueError(f"4-bit quantization needs an even in_features, got {in_features}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        cols = in_features // 2 if bits == 4 else in_features
        self.weight = nn.Parameter(torch.empty(out_features, cols, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=torch.float16, device=device),
                                         requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)
        # False for an lm_head sharing its weight with a QuantizedEmbedding: its bytes must stay THUDM's.
        self.allow_in_place = True
        self._kernel: tuple | None = None
        self._kernel_key: tuple | None = None
        self._kernel_of: tuple = (None, None)  # the (weight, weight_scale) the kernel copy was built from
        # The parameter whose bytes were overwritten with the CPU int4 kernel layout (None: THUDM's bytes).
        self._in_place_of: nn.Parameter | None = None

    @property
    def _in_place(self) -> bool:
        return self._in_place_of is not None and self._in_place_of is self.weight

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int) -> "QuantizedLinear":
        """Quantize an nn.Linear with THUDM's formula (the bias is kept as it is)."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, bits, bias=linear.bias is not None,
                    dtype=w.dtype, device=w.device)
        if w.is_meta:
            return layer
        with torch.no_grad():
            q, scale = quantize_to_thudm(w.detach(), bits)
            layer.weight.data = q
            layer.weight_scale.data = scale
            if linear.bias is not None:
                layer.bias.data = linear.bias.detach().clone()
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"bias={self.bias is not None}")

    # ------------------------------------------------------------------ THUDM view

    def thudm_weight(self) -> torch.Tensor:
        """The weight in THUDM's layout (int8 [out, in] or packed [out, in / 2]), whatever kernel holds it."""
        if self._in_place:
            return _blocked_to_thudm(self.weight.detach(), self.out_features, self.in_features)
        return self.weight.detach()

    def dequantized_weight(self) -> torch.Tensor:
        """THUDM's de-quantized weight: float16 [out, in]."""
        return dequantize(self.thudm_weight(), self.weight_scale.detach(), self.bits)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._in_place:
            destination[prefix + "weight"] = self.thudm_weight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The incoming weight is in THUDM's layout: copy it over ours as such, rebuild kernels later.
        self._in_place_of = None
        self._kernel = self._kernel_key = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        in_place = self._in_place
        _apply_keeping_scale(self, fn, recurse)
        if in_place:  # the bytes moved with the weight (even if the parameter object was swapped)
            self.__dict__["_in_place_of"] = self.weight
        self._kernel = self._kernel_key = None  # rebuilt for the new device / dtype
        return self

    # ------------------------------------------------------------------ kernels

    def prepare(self, device: torch.device | str, dtype: torch.dtype) -> str:
        """Build the kernel copy for inputs of `dtype` on `device` now; returns the kernel's name."""
        self._ensure_kernel(torch.device(device), dtype)
        return self._kernel[0]

    def _ensure_kernel(self, device: torch.device, dtype: torch.dtype) -> None:
        # Identity checks only (no id()/hashing), so a compiled forward keeps one graph.
        if (self._kernel is not None and self._kernel_key == (device.type, dtype)
                and self._kernel_of[0] is self.weight and self._kernel_of[1] is self.weight_scale):
            return
        with torch.no_grad():
            self._kernel = self._build_kernel(device, dtype)
        self._kernel_key = (device.type, dtype)
        self._kernel_of = (self.weight, self.weight_scale)

    def _build_kernel(self, device: torch.device, dtype: torch.dtype) -> tuple:
        path = kernel_path(device, dtype, self.bits, self.in_features)
        cpu_int4 = (path == "int4pack_cpu" and _cpu_int4_group(self.in_features) and self.out_features % 16 == 0)
        # Only the stock CPU int4 op reads the in-place layout: for any other kernel (glm6b's, which reads
        # THUDM's bytes, or after a move to CUDA) give the weight back THUDM's byte order.
        if self._in_place and not cpu_int4:
            self.weight.copy_(self.thudm_weight())
            self.__dict__["_in_place_of"] = None
            _return_freed_heap()
        if path == "glm6b_amx":  # the int8 row scale in `dtype` for PyTorch's op at 1-2 rows
            return (path, self.weight_scale.to(dtype) if self.bits == 8 else None)
        if path.startswith("glm6b_"):
            return (path,)
        if path == "int4pack_cpu":
            return self._build_cpu_int4(dtype) if cpu_int4 else ("dequantize",)
        if path == "int8pack" and device.type == "cpu":
            return ("int8pack", self.weight_scale.to(dtype))
        if device.type == "cuda":
            kernel = self._build_cuda(dtype)
            if kernel is not None:
                return kernel
        return ("dequantize",)

    def _build_cpu_int4(self, dtype: torch.dtype) -> tuple:
        group = _cpu_int4_group(self.in_features)
        scales = _scales_and_zeros(self.weight_scale, self.in_features, group, dtype)
        # The last element is the row scale in `dtype` where the bytes are in the known 64-row blocked
        # layout, which the many-rows path (_int4_blocked_dequantized_mm) reads; None elsewhere.
        row_scale = self.weight_scale.to(dtype)
        if self._in_place:  # the weight already holds the kernel layout
            return ("int4pack_cpu", self.weight.view(torch.uint8), scales, group, row_scale)
        if _cpu_int4_layout_is_blocked(self.out_features):
            weight = self.weight.detach()
            if self.allow_in_place:
                _thudm_to_blocked_into(weight, weight.view(torch.uint8), self.in_features)
                self.__dict__["_in_place_of"] = self.weight  # a plain reference, not a second registered parameter
                return ("int4pack_cpu", self.weight.view(torch.uint8), scales, group, row_scale)
            packed = torch.empty(weight.shape, dtype=torch.uint8, device=weight.device)
            _thudm_to_blocked_into(weight, packed, self.in_features)
            return ("int4pack_cpu", packed, scales, group, row_scale)
        return ("int4pack_cpu", _cpu_int4_pack_by_op(self.weight.detach()), scales, group, None)

    def _build_cuda(self, dtype: torch.dtype) -> tuple | None:
        try:
            if self.bits == 8:
                kernel = ("int8pack", self.weight_scale.to(dtype))
            elif dtype == torch.bfloat16 and self.in_features % CUDA_INT4_GROUP == 0:
                unsigned = (self.weight.view(torch.uint8) ^ 0x88).contiguous()  # q + 8 in both nibbles
                packed = torch.ops.aten._convert_weight_to_int4pack(unsigned, CUDA_INT4_INNER_K_TILES)
                kernel = ("int4pack_cuda", packed,
                          _scales_and_zeros(self.weight_scale, self.in_features, CUDA_INT4_GROUP, dtype))
            else:
                return None
            probe = torch.randn(2, self.in_features, device=self.weight.device, dtype=dtype)
            got = self._run_kernel(kernel, probe).float()
            want = probe.float() @ self.dequantized_weight().float().T
            tol = 2e-2 if dtype != torch.float32 else 1e-4
            if not torch.allclose(got, want, rtol=tol, atol=tol * want.abs().max().item()):
                return None
            return kernel
        except (RuntimeError, NotImplementedError, AttributeError):
            return None

    def _run_kernel(self, kernel: tuple, x2d: torch.Tensor) -> torch.Tensor:
        return kernel_for(x2d.device.type, kernel[0], self.bits, x2d.shape[0])(self, x2d, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._ensure_kernel(x.device, x.dtype)
        shape = x.shape
        y = self._run_kernel(self._kernel, x.reshape(-1, shape[-1]).contiguous())
        y = y.view(*shape[:-1], self.out_features)
        return y + self.bias.to(y.dtype) if self.bias is not None else y


class QuantizedEmbedding(nn.Module):
    """An embedding table stored as THUDM's int-quantized rows (int4-qe): a lookup de-quantizes its rows.

    Args:
        num_embeddings, embedding_dim: as nn.Embedding.
        bits: 4 or 8.
        dtype: the dtype lookups return. device: where the tensors go ("meta" to fill later).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, dtype=None, device=None):
        super().__init__()
        check_bits(bits)
        self.num_embeddings, self.embedding_dim, self.bits = num_embeddings, embedding_dim, bits
        self.dtype = dtype or torch.get_default_dtype()
        cols = embedding_dim // 2 if bits == 4 else embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, cols, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(num_embeddings, dtype=torch.float16, device=device),
                                         requires_grad=False)

    @classmethod
    def from_float(cls, embedding: nn.Embedding, bits: int) -> "QuantizedEmbedding":
        """Quantize an nn.Embedding row by row with THUDM's formula; lookups return its dtype."""
        w = embedding.weight
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, bits, dtype=w.dtype, device=w.device)
        if not w.is_meta:
            with torch.no_grad():
                layer.weight.data, layer.weight_scale.data = quantize_to_thudm(w.detach(), bits)
        return layer

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, dtype={self.dtype}"

    def _apply(self, fn, recurse=True):
        _apply_keeping_scale(self, fn, recurse)
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype  # lookups follow a cast of the model
        return self

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = dequantize(self.weight[input_ids.reshape(-1)], self.weight_scale[input_ids.reshape(-1)], self.bits)
        return rows.to(self.dtype).view(*input_ids.shape, self.embedding_dim)


class BF16DecodeLinear(nn.Linear):
    """nn.Linear whose product, for a few bfloat16 rows on the CPU outside autograd (a decode step), is
    glm6b's dot-product kernel (`cpu_kernels.bf16_matmul`: up to `kernel_max_rows` rows, where it reads
    memory faster than F.linear, which bounds that step). On the AVX2 build, a prefill's many rows take
    PyTorch's float32 GEMM on float32 blocks of the weight (`float32_gemm_min_rows`: that CPU has no
    bfloat16 units, and F.linear's bfloat16 GEMM ran at about a quarter of the float32 one). Anything else
    is F.linear. Same parameters and state dict as nn.Linear; `use_bf16_decode_kernels` turns a model's
    linears into it in place."""

    kernel_max_rows = 0  # set by use_bf16_decode_kernels: cpu_kernels.bf16_max_rows() of this CPU
    # Set there too: input rows from which the product is the float32 GEMM on float32 blocks of the weight
    # (`_bf16_weight_float32_mm`; the AVX2 build, a prefill: AVX2_GEMM_MIN_ROWS), 0 for F.linear throughout.
    float32_gemm_min_rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        rows = x.numel() // x.shape[-1] if x.dim() else 0
        if (0 < rows and (rows <= self.kernel_max_rows or 0 < self.float32_gemm_min_rows <= rows)
                and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
                and x.device.type == "cpu" and not torch.is_grad_enabled() and type(weight.data) is torch.Tensor
                and type(x) is torch.Tensor and weight.is_contiguous() and self.in_features % cpu_kernels.K_MULTIPLE == 0):
            x2d = x.reshape(rows, self.in_features)
            y = (cpu_kernels.bf16_matmul(x2d, weight) if rows <= self.kernel_max_rows
                 else _bf16_weight_float32_mm(x2d.contiguous(), weight)).view(*x.shape[:-1], self.out_features)
            return y + self.bias if self.bias is not None else y
        return F.linear(x, weight, self.bias)


def use_bf16_decode_kernels(model: nn.Module) -> int:
    """Make the model's plain nn.Linear layers `BF16DecodeLinear` (in place; nothing else changes), where
    glm6b's CPU kernels run. Returns how many layers use it."""
    if not cpu_kernels.available():
        return 0
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.in_features % cpu_kernels.K_MULTIPLE == 0:
            module.__class__ = BF16DecodeLinear
        if type(module) is BF16DecodeLinear:
            module.kernel_max_rows = cpu_kernels.bf16_max_rows()  # an int on the module: a constant when compiled
            module.float32_gemm_min_rows = AVX2_GEMM_MIN_ROWS if cpu_kernels.isa() == "avx2" else 0
            count += 1
    return count


# ----------------------------------------------------------------------------------- swapping


def _replace(parent: nn.Module, dotted: str, new: nn.Module) -> None:
    owner_name, _, leaf = dotted.rpartition(".")
    setattr(parent.get_submodule(owner_name) if owner_name else parent, leaf, new)


def tie_quantized_lm_head(model: nn.Module) -> None:
    """Make a quantized lm_head share the quantized word embeddings' weight and scale (THUDM's int4-qe)."""
    embedding = model.transformer.word_embeddings
    head = model.lm_head
    if isinstance(embedding, QuantizedEmbedding) and isinstance(head, QuantizedLinear):
        head.allow_in_place = False
        head.weight = embedding.weight
        head.weight_scale = embedding.weight_scale
        head._kernel = head._kernel_key = None


def quantize_model(model: nn.Module, bits: int, embeddings: bool = False) -> nn.Module:
    """Swap the four Linear layers of every block for `QuantizedLinear` (in place), as THUDM does.

    Float weights are quantized with THUDM's formula layer by layer; a model on the meta device gets
    empty quantized layers to fill from a checkpoint. The model's config records the scheme
    (``quantization_bit``, ``quantization_embeddings``), so `save_pretrained` writes THUDM's layout.

    Args:
        model: a ChatGLMForConditionalGeneration (or subclass).
        bits: 4 or 8.
        embeddings: also quantize the word embeddings and the lm_head (tied to them, as THUDM's
            chatglm-6b-int4-qe; an untied lm_head is quantized on its own).

    Returns:
        The same model.
    """
    check_bits(bits)
    for block in model.transformer.layers:
        for name in QUANTIZED_LINEARS:
            layer = block.get_submodule(name)
            if isinstance(layer, nn.Linear):
                _replace(block, name, QuantizedLinear.from_float(layer, bits))
    if embeddings:
        tied = model.config.tie_word_embeddings
        float_embedding = model.transformer.word_embeddings
        if isinstance(float_embedding, nn.Embedding):
            model.transformer.word_embeddings = QuantizedEmbedding.from_float(float_embedding, bits)
        head = model.lm_head
        if isinstance(head, nn.Linear):
            if tied:
                embedding = model.transformer.word_embeddings
                model.lm_head = QuantizedLinear(embedding.embedding_dim, embedding.num_embeddings, bits, bias=False,
                                                dtype=embedding.dtype, device=embedding.weight.device)
            else:
                model.lm_head = QuantizedLinear.from_float(head, bits)
        if tied:
            tie_quantized_lm_head(model)
    config = model.config.replace(quantization_bit=bits, quantization_embeddings=bool(embeddings))
    model.config = config
    model.transformer.config = config
    return model


def prepare_kernels(model: nn.Module, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> dict[str, int]:
    """Build every quantized layer's kernel copy now rather than at its first forward.

    Args:
        model: a model with quantized layers.
        device, dtype: of the activations (default: the model's).

    Returns:
        How many layers use each kernel, e.g. {"int4pack_cpu": 112}.
    """
    device = torch.device(device) if device is not None else model.device
    dtype = dtype or model.dtype
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            kind = module.prepare(device, dtype)
            counts[kind] = counts.get(kind, 0) + 1
    return counts


__all__ = ["QuantizedLinear", "QuantizedEmbedding", "quantize_model", "prepare_kernels", "tie_quantized_lm_head",
           "QUANTIZED_LINEARS", "BF16DecodeLinear", "use_bf16_decode_kernels", "KERNELS", "kernel_for", "kernel_path"]
