"""The backward pass through frozen bf16/fp16 linears on CPUs where PyTorch has no fast bf16 matmul.

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
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_ELEMENTS = 1 << 24  # float32 values of one weight slice (64 MB)
LOW_PRECISION = (torch.bfloat16, torch.float16)


def onednn_bf16_matmul_available() -> bool:
    """True when this PyTorch runs bf16 matmuls on the CPU with oneDNN (the fast path)."""
    return (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def frozen_grad_input(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad @ weight for grad [..., out] and weight [out, in], accumulated in float32 over weight slices.

    Args:
        grad: the output gradient.
        weight: the linear's weight.

    Returns:
        The input gradient [..., in] in grad's dtype.
    """
    flat = grad.reshape(-1, grad.shape[-1])
    out = torch.zeros(flat.shape[0], weight.shape[1], dtype=torch.float32, device=grad.device)
    rows = max(1, CHUNK_ELEMENTS // weight.shape[1])
    for start in range(0, weight.shape[0], rows):
        end = min(start + rows, weight.shape[0])
        out.addmm_(flat[:, start:end].float(), weight[start:end].float())
    return out.to(grad.dtype).reshape(*grad.shape[:-1], weight.shape[1])


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


def _frozen_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    frozen = not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)
    if frozen and torch.is_grad_enabled() and x.requires_grad and self.weight.dtype in LOW_PRECISION \
            and self.weight.device.type == "cpu":
        return FrozenLinearFunction.apply(x, self.weight, self.bias)
    return F.linear(x, self.weight, self.bias)


def use_fast_frozen_backward(model: nn.Module) -> int:
    """Route every nn.Linear of `model` through FrozenLinearFunction while its weight is frozen and bf16/fp16 on CPU.

    The check happens at each call, so unfreezing a weight (or moving the model to a GPU) restores
    the ordinary path. PEFT's LoRA layers keep their own forward; their frozen `base_layer` is an
    nn.Linear and is routed.

    Args:
        model: the model (plain or PEFT-wrapped), before training.

    Returns:
        The number of linears routed.
    """
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.forward = types.MethodType(_frozen_forward, module)
            count += 1
    return count
