"""glm6b's AVX2 CPU kernels (glm6b/quant/csrc/cpu_kernels_avx2.cpp) against float64 references, and the
kernel table of glm6b.quant.linear that picks them.

They run where the CPU has AVX2 + FMA + F16C but no AVX512-BF16 (AMD Zen 2 / Zen 3, ...), and on a CPU with
AVX512-BF16 when GLM6B_AVX512=0. Every path is checked: the dot products for 1 to 9 rows and beyond (each
row count a different tile shape, passes of 4 rows), the float32 blocks a prefill multiplies with the
GEMM (several blocks and a partial one), int4 / int8 / bfloat16 weights, float32 / bfloat16 / float16
activations, odd row counts, in_features from 64 to 4096, and the opt-in int8 activations.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glm6b.quant import cpu_kernels, linear
from glm6b.quant.linear import QuantizedLinear, kernel_for
from glm6b.quant.thudm import quantize_to_thudm, unpacked_weight
from helpers import GOLDEN, golden_cases

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    cpu_kernels.isa() != "avx2",
    reason=f"glm6b's AVX2 kernels run where AVX512-BF16 does not (this CPU: {cpu_kernels.isa()}; "
           "GLM6B_AVX512=0 picks them on an AVX-512 one)")

SHAPES = [(256, 256), (200, 128), (64, 4096), (577, 1088), (7, 64)]  # [out, in]: odd row counts, K % 128 == 64
ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 17)
# Half a step of the output dtype (the result is rounded to it once), relative.
ROUNDING = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def thudm_weight(bits: int, out_features: int, in_features: int, seed: int = 0):
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.05
    q, scale = quantize_to_thudm(w, bits)
    exact = unpacked_weight(q, bits).double() * scale.double()[:, None]
    return q, scale, exact


def assert_close_to_float64(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> None:
    """Within the output's rounding plus float32 summation error (2^-20 of the sum of |products|) of x @ W.T."""
    want = x.double() @ weight.T
    bound = ROUNDING[dtype] * want.abs() + 2.0**-20 * (x.double().abs() @ weight.abs().T) + 1e-30
    assert got.dtype == dtype and got.shape == want.shape
    error = (got.double() - want).abs()
    assert (error <= bound).all(), (error / bound).max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("out_features, in_features", SHAPES)
def test_dot_products_equal_x_times_dequantized_weight(bits, dtype, out_features, in_features):
    q, scale, exact = thudm_weight(bits, out_features, in_features)
    generator = torch.Generator().manual_seed(1)
    for rows in ROWS:
        x = torch.randn(rows, in_features, generator=generator).to(dtype)
        assert_close_to_float64(cpu_kernels.quantized_matmul(x, q, scale, bits), x, exact, dtype)


@pytest.mark.parametrize("out_features, in_features", [(300, 256), (198, 128), (64, 4096)])
def test_bfloat16_weight_dot_products(out_features, in_features):
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    for rows in (1, 2, 3, 4, 5, 8, 9):
        x = torch.randn(rows, in_features).to(torch.bfloat16)
        assert_close_to_float64(cpu_kernels.bf16_matmul(x, weight), x, weight.double(), torch.bfloat16)


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantize_rows_is_q_times_scale_in_float32(bits):
    q, scale, _ = thudm_weight(bits, 96, 192)
    out = torch.empty(96, 192)
    cpu_kernels.dequantize_rows(q, scale, bits, out)
    assert torch.equal(out, unpacked_weight(q, bits).float() * scale.float()[:, None])


def int8_activation_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The int8-activation product written out: per-row scale max|x| / 127, x rounded to nearest (even) in
    float32, integer sums, then float32(sum) * x scale * weight scale."""
    xf = x.float()
    amax = xf.abs().amax(dim=1)
    inverse = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    xq = torch.round(xf * inverse[:, None]).to(torch.int64)
    totals = xq @ unpacked_weight(q, bits).to(torch.int64).T  # exact
    return (totals.float() * (amax / 127.0)[:, None]) * scale.float()[None, :]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("out_features, in_features", SHAPES)
def test_int8_activations_equal_their_integer_definition(bits, dtype, out_features, in_features):
    q, scale, exact = thudm_weight(bits, out_features, in_features)
    generator = torch.Generator().manual_seed(3)
    for rows in ROWS:
        x = torch.randn(rows, in_features, generator=generator).to(dtype)
        got = cpu_kernels.quantized_matmul_int8_activations(x, q, scale, bits)
        want = int8_activation_reference(x, q, scale, bits)
        assert got.dtype == dtype
        assert (got.double() - want.double()).abs().max() <= 4 * ROUNDING[dtype] * want.abs().max() + 1e-6
        # and about x @ W.T: within the activations' 8-bit rounding
        full = x.double() @ exact.T
        assert (got.double() - full).abs().max() <= 0.03 * full.abs().max()


EXACT_BINADES = {torch.bfloat16: 7, torch.float16: 4}


def int16_activations(x: torch.Tensor) -> torch.Tensor:
    """The 16-bit activations written out (float64): each block of 64 columns rounded to nearest (even) in
    steps of 2^(e - 15), where the block's largest magnitude is f * 2^e with f in [0.5, 1)."""
    blocks = x.double().reshape(x.shape[0], -1, 64)
    largest = blocks.abs().amax(dim=2, keepdim=True)
    step = torch.where(largest > 0, torch.ldexp(torch.ones_like(largest), torch.frexp(largest).exponent - 15),
                       torch.ones_like(largest))
    return (torch.round(blocks / step) * step).reshape(x.shape)


def activation_blocks(rows: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """Activations with what the 16-bit blocks must handle: an outlier 300x the rest in one block, a block of
    zeros, a block 2^-40 the size of the rest, values of every binade in between."""
    x = torch.randn(rows, in_features, generator=generator) * torch.exp2(torch.randint(-6, 3, (rows, in_features),
                                                                                      generator=generator).float())
    x[:, 3] = 300.0
    if in_features >= 192:
        x[:, 64:128] = 0.0
        x[:, 128:192] *= 2.0**-40
    return x


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("out_features, in_features", SHAPES)
def test_int16_activations_equal_their_definition(dtype, out_features, in_features):
    """int4 x 16-bit activations: the blocks' products are exact integers, so the result is the written-out
    16-bit activations times the weight within float32 summation and the output's rounding; and it is
    x @ W.T within the activations' rounding (2^-15 of each block's largest) -- bfloat16 values within 2^7 of
    their block's largest convert exactly (float16 ones within 2^4)."""
    q, scale, exact = thudm_weight(4, out_features, in_features)
    generator = torch.Generator().manual_seed(6)
    for rows in ROWS:
        x = activation_blocks(rows, in_features, generator).to(dtype)
        got = cpu_kernels.quantized_matmul_int16_activations(x, q, scale)
        assert got.dtype == dtype and got.shape == (rows, out_features)
        xq = int16_activations(x)
        want = xq @ exact.T
        bound = ROUNDING[dtype] * want.abs() + 2.0**-20 * (xq.abs() @ exact.abs().T) + 1e-30
        assert ((got.double() - want).abs() <= bound).all(), rows
        # 15 bits of magnitude hold the 8 significant bits of a bfloat16 over 7 binades, a float16's 11 over 4
        blocks_largest = x.double().abs().reshape(rows, -1, 64).amax(2).repeat_interleave(64, 1)
        within = x.double().abs() * 2.0**EXACT_BINADES[dtype] >= blocks_largest
        assert within.sum() >= rows and torch.equal(xq[within], x.double()[within])
        assert ((xq - x.double()).abs() <= blocks_largest * 2.0**-15).all()


def test_int16_activations_refuse_float32():
    q, scale, exact = thudm_weight(4, 64, 256)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        cpu_kernels.quantized_matmul_int16_activations(torch.randn(2, 256), q, scale)


@pytest.mark.parametrize("planted", [["inf"], ["nan"], ["-inf", "nan"]], ids=["inf", "nan", "inf-and-nan"])
def test_int16_activations_carry_inf_and_nan(planted):
    """A row holding inf or NaN (each on its own too: NaN is no larger than any number) sends the call to the
    float32 products, which carry them as x @ w.T does."""
    q, scale, exact = thudm_weight(4, 64, 256)
    x = torch.randn(3, 256).bfloat16()
    for row, value in enumerate(planted, start=1):
        x[row, 7 + 64 * row] = float(value)
    got = cpu_kernels.quantized_matmul_int16_activations(x, q, scale)
    float32_products = cpu_kernels.quantized_matmul(x, q, scale, 4)  # what every row then takes
    assert torch.equal(got.nan_to_num(), float32_products.nan_to_num())
    for row, value in enumerate(planted, start=1):
        assert torch.isnan(got[row]).all() if value == "nan" else not torch.isfinite(got[row]).all()
    assert torch.isfinite(got[0]).all()


def random_layer(bits: int, out_features: int, in_features: int) -> QuantizedLinear:
    linear_layer = torch.nn.Linear(in_features, out_features)
    with torch.no_grad():
        linear_layer.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(4))
        linear_layer.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(5))
    return QuantizedLinear.from_float(linear_layer, bits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("bits", [4, 8])
def test_layers_take_the_avx2_table_rows_on_thudms_bytes(bits, dtype, monkeypatch):
    """Decode-sized inputs take the dot products, prefill-sized ones the float32 blocks (here 256 KiB of
    float32: blocks of 64 rows, 320 = 64 x 5), every one x @ (q * scale).T + bias, THUDM's bytes untouched."""
    monkeypatch.setattr(linear, "AVX2_DEQUANTIZED_BLOCK_BYTES", 64 * 256 * 4)
    layer = random_layer(bits, 320, 256)
    thudm = layer.weight.detach().clone()
    # int4 with bfloat16 / float16 inputs: 16-bit integer activations; otherwise the float32 FMA products
    int16 = bits == 4 and dtype != torch.float32
    path, dot = ("glm6b_avx2_int16_activations", "_avx2_int16_activations") if int16 else ("glm6b_avx2", "_avx2_dot")
    assert layer.prepare("cpu", dtype) == path
    exact = unpacked_weight(layer.weight, bits).double() * layer.weight_scale.double()[:, None]
    blocks = []
    dequantize_rows = cpu_kernels.dequantize_rows
    monkeypatch.setattr(cpu_kernels, "dequantize_rows", lambda w, *a: blocks.append(w.shape[0]) or dequantize_rows(w, *a))
    for rows, kernel in ((1, dot), (5, dot), (linear.AVX2_GEMM_MIN_ROWS - 1, dot),
                         (linear.AVX2_GEMM_MIN_ROWS, "_avx2_float32_blocks"), (130, "_avx2_float32_blocks")):
        assert kernel_for("cpu", path, bits, rows).__name__ == kernel
        blocks.clear()
        x = torch.randn(1, rows, 256).to(dtype)
        got = layer(x)
        product = x.double() @ exact.T
        want = product + layer.bias.double()
        # rounded: the product, the bias in x's dtype, their sum (and the 16-bit activations: 2^-15 of a block's
        # largest value each)
        largest = x.double().abs().reshape(1, rows, -1, 64).amax(3).repeat_interleave(64, 2)
        activations = 2.0**-15 * largest @ exact.abs().T if kernel == dot and int16 else 0.0
        bound = (ROUNDING[dtype] * (product.abs() + layer.bias.double().abs() + want.abs())
                 + 2.0**-20 * (x.double().abs() @ exact.abs().T) + activations)
        assert got.dtype == dtype and ((got.double() - want).abs() <= 1.01 * bound).all(), rows
        assert blocks == ([64] * 5 if kernel == "_avx2_float32_blocks" else [])
    assert torch.equal(layer.state_dict()["weight"], thudm) and not layer._in_place


@pytest.mark.parametrize("bits", [4, 8])
def test_int8_activations_are_opt_in(bits, monkeypatch):
    layer = random_layer(bits, 128, 256)
    x = torch.randn(3, 256)
    assert layer.prepare("cpu", torch.float32) == "glm6b_avx2"
    exact_result = layer(x)
    monkeypatch.setenv("GLM6B_INT8_ACTIVATIONS", "1")
    assert layer.prepare("cpu", torch.float32) == "glm6b_avx2"  # read when the kernel is built: not yet rebuilt
    layer._kernel = None
    assert layer.prepare("cpu", torch.float32) == "glm6b_avx2_int8_activations"
    assert kernel_for("cpu", layer._kernel[0], bits, 3).__name__ == "_avx2_int8_activations"
    assert kernel_for("cpu", layer._kernel[0], bits, 1000).__name__ == "_avx2_int8_activations"
    got = layer(x)
    want = int8_activation_reference(x, layer.weight, layer.weight_scale, bits) + layer.bias
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert not torch.equal(got, exact_result)  # it changes results: hence opt-in


def test_int16_activations_switch_off_to_the_float32_products(monkeypatch):
    layer = random_layer(4, 128, 256)
    x = torch.randn(2, 256).bfloat16()
    assert layer.prepare("cpu", torch.bfloat16) == "glm6b_avx2_int16_activations"
    monkeypatch.setenv("GLM6B_INT16_ACTIVATIONS", "0")
    layer._kernel = None
    assert layer.prepare("cpu", torch.bfloat16) == "glm6b_avx2"
    want = cpu_kernels.quantized_matmul(x, layer.weight, layer.weight_scale, 4) + layer.bias.to(x.dtype)
    assert torch.equal(layer(x), want)


@pytest.mark.parametrize("embeddings", [False, True], ids=["int4", "int4-qe"])
def test_int16_activations_follow_the_float32_model_as_far_as_the_float32_products_do(embeddings, monkeypatch):
    """The golden checkpoint quantized to int4, decoded in bfloat16 with 16-bit activations and with the float32
    products, against the same int4 weights in float32 (exact arithmetic but for float32 sums): the greedy answers
    to the golden prompts agree with the float32 model's at least as far with 16-bit activations (this tiny
    random model's logits are near ties, so bfloat16 activations alone move some answers), and the logits'
    largest difference from it stays within 10 % of the float32 products'."""
    from glm6b import generate, load_model

    cases = golden_cases()
    case, batch = cases["generate_single_greedy"], torch.tensor(cases["forward_batch"]["input_ids"])

    def logits_and_answers(model):
        with torch.no_grad():
            return model(batch).logits.float(), [
                generate(model, torch.tensor(item["input_ids"]).view(1, -1), do_sample=False,
                         max_new_tokens=case["max_new_tokens"])[0].tolist() for item in case["items"]]

    reference_logits, reference = logits_and_answers(
        load_model(GOLDEN, dtype=torch.float32, quantize="int4", quantize_embeddings=embeddings))
    results = {}
    for allowed, path in (("1", "glm6b_avx2_int16_activations"), ("0", "glm6b_avx2")):
        monkeypatch.setenv("GLM6B_INT16_ACTIVATIONS", allowed)
        model = load_model(GOLDEN, dtype=torch.bfloat16, quantize="int4", quantize_embeddings=embeddings)
        logits, answers = logits_and_answers(model)
        assert {m._kernel[0] for m in model.modules() if isinstance(m, QuantizedLinear)} == {path}
        agreeing = [next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
                    for ours, theirs in zip(answers, reference)]
        results[allowed] = (logits - reference_logits).abs().max().item(), agreeing
    assert all(int16 >= float32 for int16, float32 in zip(results["1"][1], results["0"][1])), results
    assert results["1"][0] <= 1.1 * results["0"][0], results


def test_switches_pick_the_stock_ops_or_the_avx2_kernels():
    """GLM6B_CPU_KERNELS=0: PyTorch's ops; GLM6B_AVX512=0: the AVX2 build even where AVX-512 is there;
    GLM6B_AMX=0: no AMX tiles."""
    code = ("import torch; from glm6b.quant import cpu_kernels; from glm6b.quant.linear import QuantizedLinear;"
            "layer = QuantizedLinear.from_float(torch.nn.Linear(128, 64), 8);"
            "print(cpu_kernels.isa(), layer.prepare('cpu', torch.float32), layer.prepare('cpu', torch.bfloat16))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    off = subprocess.run([sys.executable, "-c", code], env={**env, "GLM6B_CPU_KERNELS": "0"}, capture_output=True,
                         text=True, check=True).stdout.split()
    assert off == ["None", "int8pack", "int8pack"]
    avx2 = subprocess.run([sys.executable, "-c", code], env={**env, "GLM6B_AVX512": "0"}, capture_output=True,
                          text=True, check=True).stdout.split()
    assert avx2 == ["avx2", "glm6b_avx2", "glm6b_avx2"]
    # GLM6B_AMX=0 (with this process's environment, so the AVX2 build): no AMX tiles, the same table rows
    no_amx = subprocess.run([sys.executable, "-c", code + ";print(cpu_kernels.has_amx())"],
                            env={**env, "GLM6B_AMX": "0"}, capture_output=True, text=True, check=True).stdout.split()
    assert no_amx == ["avx2", "glm6b_avx2", "glm6b_avx2", "False"]


def test_bfloat16_linears_multiply_a_prefill_with_float32_blocks(monkeypatch):
    """BF16DecodeLinear on the AVX2 build: up to bf16_max_rows rows the dot products, from AVX2_GEMM_MIN_ROWS the
    float32 GEMM on float32 copies of the weight's blocks (here 64 rows of 256 columns a block, 5 blocks and a
    part), F.linear in between; every one x @ W.T + b within bfloat16 rounding."""
    from glm6b.quant.linear import BF16DecodeLinear, use_bf16_decode_kernels

    monkeypatch.setattr(linear, "AVX2_DEQUANTIZED_BLOCK_BYTES", 64 * 256 * 4)
    model = torch.nn.Sequential(torch.nn.Linear(256, 330)).to(torch.bfloat16)
    assert use_bf16_decode_kernels(model) == 1
    layer = model[0]
    assert type(layer) is BF16DecodeLinear and layer.float32_gemm_min_rows == linear.AVX2_GEMM_MIN_ROWS
    used = []
    for name in ("_bf16_weight_float32_mm", "_float32_blocks_mm"):
        original = getattr(linear, name)
        monkeypatch.setattr(linear, name, lambda *a, _o=original, _n=name: used.append(_n) or _o(*a))
    dot = cpu_kernels.bf16_matmul
    monkeypatch.setattr(cpu_kernels, "bf16_matmul", lambda *a: used.append("dot") or dot(*a))
    weight, bias = layer.weight.double(), layer.bias.double()
    for rows, path in ((1, ["dot"]), (layer.kernel_max_rows, ["dot"]), (layer.kernel_max_rows + 1, []),
                       (linear.AVX2_GEMM_MIN_ROWS, ["_bf16_weight_float32_mm", "_float32_blocks_mm"]),
                       (130, ["_bf16_weight_float32_mm", "_float32_blocks_mm"])):
        used.clear()
        x = torch.randn(1, rows, 256, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
        with torch.no_grad():
            got = layer(x)
        product = x.double() @ weight.T
        want = product + bias
        bound = 2.0**-8 * (product.abs() + bias.abs() + want.abs()) + 2.0**-20 * (x.double().abs() @ weight.abs().T)
        assert used == path and got.dtype == torch.bfloat16 and got.shape == (1, rows, 330), rows
        assert ((got.double() - want).abs() <= 1.01 * bound).all(), rows
