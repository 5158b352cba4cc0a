"""THUDM's weight-only quantization layout (HF THUDM/chatglm-6b-int8, -int4, -int4-qe): quantize,
pack, unpack and de-quantize, as pure tensor functions.

The layout (spec formats.md §1): one float16 scale per output row,
``scale = fp16(max|w_row| / (2^(bits-1) - 1))``, ``q = round(w / scale)`` stored as int8; for 4 bits
two signed values share a byte, the first in the high nibble. De-quantization is ``fp16(q) * scale``
computed in float16, which is what THUDM's CPU and CUDA extraction kernels return.
"""

from __future__ import annotations

import torch

QUANTIZED_BITS = (4, 8)
_ROWS_PER_CHUNK = 4096


def check_bits(bits: int, where: str = "bits") -> int:
    """Return `bits` if it is 4 or 8, else raise ValueError naming `where`."""
    if bits not in QUANTIZED_BITS or isinstance(bits, bool):
        raise ValueError(f"{where} = {bits!r}: expected 4 or 8")
    return bits


def quantize_weight(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float matrix per output row with THUDM's formula.

    THUDM quantizes the float16 model, in float16 arithmetic: the weight is first rounded to float16,
    ``scale = fp16(max|w| / qmax)`` and ``q = round(fp16(w / scale))`` (PyTorch computes a float16
    division in float32 and rounds it, on the CPU as on CUDA). A row of zeros gets scale 0 and q 0
    (THUDM would divide 0 by 0).

    Args:
        weight: [out, in] float tensor.
        bits: 4 or 8.

    Returns:
        (q, scale): q int8 [out, in] with values in [-(2^(bits-1) - 1), 2^(bits-1) - 1] (unpacked),
        scale float16 [out].
    """
    check_bits(bits)
    qmax = 2 ** (bits - 1) - 1
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.float16, device=weight.device)
    for start in range(0, weight.shape[0], _ROWS_PER_CHUNK):  # float32 temporaries for a few rows at a time
        rows = slice(start, start + _ROWS_PER_CHUNK)
        w = weight[rows].half()
        scale[rows] = (w.abs().amax(dim=-1).float() / qmax).half()
        divisor = torch.where(scale[rows] == 0, 1.0, scale[rows]).half()
        q[rows] = torch.round(w / divisor[:, None]).clamp_(-qmax, qmax).to(torch.int8)  # float16 division
    return q, scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack signed 4-bit values (int8 [out, in], in even) two per byte, the first in the high nibble.

    Returns:
        int8 [out, in / 2] with ``byte[j] = (q[2j] << 4) | (q[2j + 1] & 0x0F)``.
    """
    if q.shape[-1] % 2:
        raise ValueError(f"4-bit packing needs an even number of columns, got shape {list(q.shape)}")
    high, low = q[..., 0::2], q[..., 1::2]
    return ((high << 4) | (low & 0x0F)).to(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: int8 [out, in / 2] -> int8 [out, in] (signed values in [-8, 7])."""
    high = packed >> 4  # arithmetic shift: sign-extends
    low = (packed << 4) >> 4
    return torch.stack((high, low), dim=-1).flatten(-2)


def unpacked_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """The int8 values of a stored THUDM `weight` (unpacked for 4 bits): int8 [out, in]."""
    return unpack_int4(weight) if bits == 4 else weight


def dequantize(weight: torch.Tensor, weight_scale: torch.Tensor, bits: int) -> torch.Tensor:
    """THUDM's de-quantization: ``fp16(q) * scale[row]`` in float16 (bit-exact with its kernels).

    Args:
        weight: the stored int8 tensor, [out, in] (8 bits) or packed [out, in / 2] (4 bits).
        weight_scale: float16 [out].
        bits: 4 or 8.

    Returns:
        float16 [out, in].
    """
    check_bits(bits)
    return unpacked_weight(weight, bits).half() * weight_scale.half()[:, None]


def quantize_to_thudm(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A float [out, in] matrix as THUDM stores it: (weight int8 [out, in] or [out, in/2], weight_scale fp16 [out])."""
    q, scale = quantize_weight(weight, bits)
    return (pack_int4(q) if bits == 4 else q), scale
