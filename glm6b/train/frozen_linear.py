"""The backward pass through frozen linears: bf16/fp16 ones on CPUs where PyTorch has no fast bf16
matmul, and the int8/int4 ones of glm6b.quant (whose kernels have no backward), for LoRA and
P-tuning on a frozen (or quantized: QLoRA-style) base.

LoRA and P-tuning train a few float32 parameters around a frozen bf16 base. The backward pass then
needs only `grad_input = grad_output @ W` of every frozen linear (W is [out, in], not transposed),
never a weight gradient. On a CPU where PyTorch's oneDNN bf16 matmul is used (AVX512-BF16 / AMX,
`onednn_bf16_matmul_available()`), that product is as fast as the forward one. Without it, PyTorch
falls back to its generic bf16 GEMM, whose non-transposed case runs at about 0.1 GFLOP/s
(benchmarks/train.py --step-ratio --no-onednn): one LoRA step of the 6B shape took over two hours.

`use_fast_frozen_backward(model)` routes those linears through `FrozenLinearFunction`, whose
backward computes grad_input in float32 (a float32 GEMM runs at full speed everywhere), in chunks
of the output dimension so the float32 copy of a weight never exceeds `CHUNK_ELEMENTS` values
(the 130k-row lm_head included). The result is rounded to the gradient's dtype once, so it is at
least as exact as the bf16 product. It is applied from outside the model, like parallelism.

A quantized linear (`glm6b.quant.linear.QuantizedLinear`) runs its int8/int4 kernel forward; its
backward is grad_output @ dequantize(W) the same way, de-quantizing one slice of rows at a time, so
no float copy of the whole weight ever exists.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.linear import QuantizedLinear
from ..quant.thudm import dequantize

CHUNK_ELEMENTS = 1 << 24  # float32 values of one weight slice (64 MB)
LOW_PRECISION = (torch.bfloat16, torch.float16)


def onednn_bf16_matmul_available() -> bool:
    """True when this PyTorch runs bf16 matmuls on the CPU with oneDNN (the fast path)."""
    return (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def frozen_grad_input(grad: torch.Tensor, weight: torch.Tensor, rows_of=None) -> torch.Tensor:
    """grad @ W for grad [..., out] and W [out, in], accumulated in float32 over slices of W's rows.

    Args:
        grad: the output gradient.
        weight: W itself, or (with rows_of) any tensor whose first dimension is W's rows.
        rows_of: rows_of(start, end) -> W[start:end] as a float tensor (e.g. de-quantized); None
            slices `weight`.

    Returns:
        The input gradient [..., in] in grad's dtype.
    """
    if rows_of is None:
        rows_of = lambda start, end: weight[start:end]  # noqa: E731
    flat = grad.reshape(-1, grad.shape[-1])
    out_rows = grad.shape[-1]
    in_features = rows_of(0, 1).shape[1]
    step = max(1, CHUNK_ELEMENTS // in_features)  # rows per slice: CHUNK_ELEMENTS float32 values of W
    out = torch.zeros(flat.shape[0], in_features, dtype=torch.float32, device=grad.device)
    for start in range(0, out_rows, step):
        end = min(start + step, out_rows)
        out.addmm_(flat[:, start:end].float(), rows_of(start, end).float())
    return out.to(grad.dtype).reshape(*grad.shape[:-1], in_features)


class FrozenLinearFunction(torch.autograd.Function):
    """y = x @ W.T + b for a weight and bias that get no gradient; backward: `frozen_grad_input`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)  # a reference, not a copy; x is not needed (no weight gradient)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        grad_input = frozen_grad_input(grad, weight) if ctx.needs_input_grad[0] else None
        return grad_input, None, None


class FrozenQuantizedLinearFunction(torch.autograd.Function):
    """A QuantizedLinear's own forward; backward: grad @ dequantize(W), one slice of rows at a time."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: QuantizedLinear) -> torch.Tensor:
        ctx.module = module
        return QuantizedLinear.forward(module, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        module = ctx.module
        weight, scale = module.thudm_weight(), module.weight_scale.detach()
        grad_input = frozen_grad_input(grad, weight, rows_of=lambda start, end: dequantize(
            weight[start:end], scale[start:end], module.bits))
        return grad_input, None


def _quantized_forward(self: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return FrozenQuantizedLinearFunction.apply(x, self)
    return QuantizedLinear.forward(self, x)


def _frozen_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    frozen = not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)
    if frozen and torch.is_grad_enabled() and x.requires_grad and self.weight.dtype in LOW_PRECISION \
            and self.weight.device.type == "cpu":
        return FrozenLinearFunction.apply(x, self.weight, self.bias)
    return F.linear(x, self.weight, self.bias)


def use_fast_frozen_backward(model: nn.Module, float_linears: bool = True) -> int:
    """Give the frozen linears of `model` the float32 backward of this module.

    Every QuantizedLinear is routed through FrozenQuantizedLinearFunction (its kernels have no
    backward). With float_linears, every nn.Linear is routed through FrozenLinearFunction while its
    weight is frozen and bf16/fp16 on CPU; the check happens at each call, so unfreezing a weight
    (or moving the model to a GPU) restores the ordinary path. PEFT's LoRA layers keep their own
    forward; their frozen `base_layer` is what gets routed.

    Args:
        model: the model (plain or PEFT-wrapped), before training.
        float_linears: also route the float nn.Linear layers (for CPUs without oneDNN bf16 matmuls).

    Returns:
        The number of linears routed.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.forward = types.MethodType(_quantized_forward, module)
            count += 1
        elif float_linears and type(module) is nn.Linear:
            module.forward = types.MethodType(_frozen_forward, module)
            count += 1
    return count
