"""The float32 backward of frozen bf16 linears (the CPU path without oneDNN bf16 matmuls)."""

import torch
from helpers import GOLDEN, golden_cases
from torch import nn

from glm6b.checkpoint.hf import load_model
from glm6b.config import LoraConfig
from glm6b.train.frozen_linear import FrozenLinearFunction, frozen_grad_input, use_fast_frozen_backward
from glm6b.train.lora import apply_lora
from glm6b.train.loss import causal_lm_loss


def test_frozen_grad_input_is_the_float32_product_in_chunks(monkeypatch):
    import glm6b.train.frozen_linear as frozen_linear

    monkeypatch.setattr(frozen_linear, "CHUNK_ELEMENTS", 7 * 16)  # 7 weight rows per slice: several slices
    torch.manual_seed(0)
    grad = torch.randn(2, 5, 30).bfloat16()
    weight = torch.randn(30, 16).bfloat16()
    exact = (grad.double() @ weight.double()).float()
    ours = frozen_grad_input(grad, weight)
    assert ours.dtype == torch.bfloat16 and ours.shape == (2, 5, 16)
    assert torch.allclose(ours.float(), exact, rtol=2 ** -8, atol=1e-6)  # one bf16 rounding of the exact value


def test_function_matches_autograd_of_linear():
    torch.manual_seed(0)
    x = torch.randn(3, 8, dtype=torch.bfloat16, requires_grad=True)
    weight, bias = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(4, dtype=torch.bfloat16)
    y = FrozenLinearFunction.apply(x, weight, bias)
    assert torch.equal(y, nn.functional.linear(x, weight, bias))
    y.float().square().sum().backward()
    ours = x.grad.clone()
    x.grad = None
    x32 = x.detach().float().requires_grad_(True)
    nn.functional.linear(x32, weight.float(), bias.float()).square().sum().backward()
    assert torch.allclose(ours.float(), x32.grad, rtol=2e-2, atol=1e-2)


def test_lora_gradients_on_a_bf16_base_match_the_float32_model():
    """Routed through the float32 backward, the adapters' gradients on a bf16 base equal (within bf16
    rounding of the activations) those of the same model in float32, and those of PyTorch's own bf16 path."""
    ids = torch.tensor(golden_cases()["train_adgen"]["input_ids"])
    labels = torch.tensor(golden_cases()["train_adgen"]["labels"])

    def adapter_grads(dtype, fast):
        torch.manual_seed(0)
        model = apply_lora(load_model(GOLDEN, dtype=dtype), LoraConfig(r=4, lora_dropout=0.0))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(p, std=0.02)  # non-zero B: gradients reach lora_A and the input
        routed = use_fast_frozen_backward(model) if fast else 0
        causal_lm_loss(model(input_ids=ids).logits, labels).backward()
        return routed, {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}

    routed, fast = adapter_grads(torch.bfloat16, True)
    assert routed >= 3 * 4 + 1  # every frozen projection of the golden model's blocks and the lm_head
    _, stock = adapter_grads(torch.bfloat16, False)
    _, reference = adapter_grads(torch.float32, False)
    for name, grad in reference.items():
        scale = grad.abs().max()
        # bf16 activations alone move these gradients by ~5% of their scale; the float32 backward of the
        # frozen products adds nothing to that, and stays within 2% of PyTorch's own bf16 backward.
        stock_error = (stock[name] - grad).abs().max()
        assert (fast[name] - grad).abs().max() <= 1.1 * stock_error + 1e-3 * scale, name
        assert (fast[name] - stock[name]).abs().max() <= 0.02 * scale, name
