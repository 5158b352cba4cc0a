"""Weight-only int8/int4 quantization in THUDM's layout (glm6b.quant, quantized folders, `glm6b quantize`).

THUDM's formula is written here again, independently, from spec formats.md §1, and the folders in
THUDM's layout are built here with it (torch.save of int8 tensors, as THUDM ships them).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import GOLDEN, golden_cases, golden_tensor
from safetensors.torch import load_file

from glm6b import load_model
from glm6b.checkpoint.hf import CheckpointError
from glm6b.cli import main
from glm6b.config import ConfigError
from glm6b.inference.generation import generate
from glm6b.quant import cpu_kernels
from glm6b.quant.linear import QUANTIZED_LINEARS, QuantizedEmbedding, QuantizedLinear, quantize_model
from glm6b.quant.thudm import dequantize, pack_int4, quantize_to_thudm, unpack_int4

LINEAR_SUFFIXES = tuple(f".{name}.weight" for name in QUANTIZED_LINEARS)
EMBEDDING = "transformer.word_embeddings.weight"


# ----------------------------------------------------------------------------------- THUDM's formula, again


def thudm_quantize(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """formats.md §1 on the float16 weight, in float16 arithmetic, as THUDM's quantization.py does."""
    w = weight.half()
    scale = (w.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)).half()
    q = torch.round(w / scale[:, None]).to(torch.int8)
    if bits == 4:
        q = ((q[:, 0::2] << 4) | (q[:, 1::2] & 0x0F)).to(torch.int8)
    return q, scale


def thudm_dequantize(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 4:
        high = weight >> 4
        low = (weight << 4) >> 4
        weight = torch.stack([high, low], dim=-1).reshape(weight.shape[0], -1)
    return weight.half() * scale[:, None]


def golden_state() -> dict[str, torch.Tensor]:
    return load_file(GOLDEN / "model.safetensors")


def thudm_folder(path: Path, bits: int, embeddings: bool = False) -> Path:
    """A folder in THUDM's chatglm-6b-int{bits}(-qe) layout made from the golden checkpoint."""
    path.mkdir(parents=True)
    state = {}
    for name, tensor in golden_state().items():
        if name.endswith(LINEAR_SUFFIXES) or (embeddings and name == EMBEDDING):
            state[name], state[name.removesuffix("weight") + "weight_scale"] = thudm_quantize(tensor, bits)
        else:
            state[name] = tensor.half()
    if embeddings:  # THUDM's int4-qe saves the tied lm_head as the quantized embedding table again
        state["lm_head.weight"], state["lm_head.weight_scale"] = state[EMBEDDING], state[EMBEDDING + "_scale"]
    torch.save(state, path / "pytorch_model.bin")
    config = json.loads((GOLDEN / "config.json").read_text())
    config["quantization_bit"] = bits
    if embeddings:
        config["quantization_embeddings"] = True
    (path / "config.json").write_text(json.dumps(config))
    for name in ("ice_text.model", "tokenizer_config.json"):
        shutil.copy(GOLDEN / name, path / name)
    return path


def dequantized_float_model(folder: Path, dtype: torch.dtype):
    """A float model holding THUDM's de-quantized weights of `folder` (its other tensors as stored)."""
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    config = json.loads((folder / "config.json").read_text())
    bits = config["quantization_bit"]
    for name in [n for n in state if n.endswith(".weight_scale")]:
        weight = name.removesuffix("_scale")
        state[weight] = thudm_dequantize(state[weight], state.pop(name), bits)
    model = load_model(GOLDEN, dtype=dtype)
    # lm_head.weight is tied to the embeddings (the file's own copy is ignored on load, as by the reference).
    model.load_state_dict({k: v.to(dtype) for k, v in state.items() if k != "lm_head.weight"}, strict=False)
    return model


def golden_batch() -> dict[str, torch.Tensor]:
    case = golden_cases()["forward_batch"]
    return {"input_ids": torch.tensor(case["input_ids"]), "attention_mask": golden_tensor(case["attention_mask"]),
            "position_ids": golden_tensor(case["position_ids"])}


def greedy_tokens(model) -> list[list[int]]:
    case = golden_cases()["generate_single_greedy"]
    return [generate(model, torch.tensor(item["input_ids"]).view(1, -1), max_new_tokens=case["max_new_tokens"],
                     do_sample=False)[0].tolist() for item in case["items"]]


# ----------------------------------------------------------------------------------- the layout


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_matches_thudms_formula_bit_for_bit(bits):
    for name, tensor in golden_state().items():
        if name.endswith(LINEAR_SUFFIXES) or name == EMBEDDING:
            ours_w, ours_s = quantize_to_thudm(tensor, bits)
            ref_w, ref_s = thudm_quantize(tensor, bits)
            assert torch.equal(ours_s, ref_s), name
            assert torch.equal(ours_w, ref_w), name
            assert torch.equal(dequantize(ours_w, ours_s, bits), thudm_dequantize(ref_w, ref_s, bits)), name


def test_int4_packing_high_nibble_first_and_round_trip():
    q = torch.tensor([[-7, 7, 0, -1, 3, -8]], dtype=torch.int8)
    packed = pack_int4(q)
    # (q0 << 4) | (q1 & 0xF): -7 -> 0x9 high, 7 -> 0x7 low = 0x97 (as int8: -105)
    assert packed.tolist() == [[0x97 - 256, 0x0F, 0x3 << 4 | 0x8]]
    assert torch.equal(unpack_int4(packed), q)
    values = torch.randint(-8, 8, (64, 128), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(values)), values)


# ----------------------------------------------------------------------------------- kernels


def random_layer(bits: int, out_features: int, in_features: int, bias: bool = True) -> QuantizedLinear:
    gen = torch.Generator().manual_seed(out_features * 7 + in_features + bits)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=gen) * 0.05)
        if bias:
            linear.bias.copy_(torch.randn(out_features, generator=gen) * 0.1)
    return QuantizedLinear.from_float(linear, bits)


def exact_reference(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """x @ (q * scale).T + bias in float64: what the kernels compute up to their own rounding."""
    from glm6b.quant.thudm import unpacked_weight

    w = unpacked_weight(layer.thudm_weight(), layer.bits).double() * layer.weight_scale.double()[:, None]
    y = x.double() @ w.T
    return y + layer.bias.double() if layer.bias is not None else y


@pytest.mark.parametrize("bits, kernel", [(8, "int8pack"), (4, "int4pack_cpu")])
@pytest.mark.parametrize("shape", [(128, 256), (384, 128), (128, 320), (48, 64)])
def test_cpu_kernel_equals_x_times_dequantized_weight(bits, kernel, shape, monkeypatch):
    """PyTorch's weight-only ops (what runs where glm6b's kernels do not)."""
    monkeypatch.setattr(cpu_kernels, "supports", lambda *args: False)
    layer = random_layer(bits, *shape)
    x = torch.randn(3, 5, shape[1], generator=torch.Generator().manual_seed(1))
    want = exact_reference(layer, x)
    assert layer.prepare("cpu", torch.float32) == kernel
    got = layer(x)
    assert got.shape == (3, 5, shape[0]) and got.dtype == torch.float32
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
    for dtype, rel in ((torch.bfloat16, 2e-2), (torch.float16, 3e-3)):
        got = layer(x.to(dtype))
        assert got.dtype == dtype
        assert (got.double() - want).abs().max() <= rel * want.abs().max(), dtype


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype, rel", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_many_rows_multiply_dequantized_blocks(bits, dtype, rel, monkeypatch):
    """A prefill-sized input takes the de-quantized-blocks path, over several blocks and a partial last one,
    and gives x @ dequantize(W).T like the row kernel."""
    from glm6b.quant import cpu_kernels, linear

    monkeypatch.setattr(cpu_kernels, "supports", lambda *args: False)  # PyTorch's ops (glm6b's own: below)
    monkeypatch.setattr(linear, "CPU_DEQUANTIZED_BLOCK_BYTES", 128 * 256 * dtype.itemsize)  # 320 rows: 128, 128, 64
    layer = random_layer(bits, 320, 256)
    kernel = layer.prepare("cpu", dtype)
    if bits == 4 and layer._kernel[4] is None:
        pytest.skip("this PyTorch build does not use the 64-row blocked int4 layout (row kernel only)")
    name = "_int8_dequantized_mm" if bits == 8 else "_int4_blocked_dequantized_mm"
    calls = []
    blocked_mm = getattr(linear, name)
    monkeypatch.setattr(linear, name, lambda *a: calls.append(a[0].shape) or blocked_mm(*a))
    x = torch.randn(2, linear.CPU_DEQUANTIZED_MIN_ROWS // 2 + 3, 256, generator=torch.Generator().manual_seed(2))
    x = x.to(dtype)
    want = exact_reference(layer, x)
    got = layer(x)
    assert calls == [(x.shape[0] * x.shape[1], 256)] and kernel in ("int8pack", "int4pack_cpu")
    assert got.shape == want.shape and got.dtype == dtype
    assert (got.double() - want).abs().max() <= rel * want.abs().max()
    by_row = torch.cat([layer(x[:, i:i + 1]) for i in range(x.shape[1])], dim=1)  # the row kernel
    assert len(calls) == 1
    assert (got.double() - by_row.double()).abs().max() <= 2 * rel * want.abs().max()


needs_cpu_kernels = pytest.mark.skipif(not cpu_kernels.available(),
                                       reason="glm6b's CPU kernels need a C++ compiler and an AVX512-BF16 or AVX2 CPU")
needs_avx512 = pytest.mark.skipif(cpu_kernels.isa() != "avx512bf16",
                                  reason=f"glm6b's AVX-512 kernels need an AVX512-BF16 CPU (this one: {cpu_kernels.isa()})")
needs_avx2 = pytest.mark.skipif(cpu_kernels.isa() != "avx2",
                                reason=f"glm6b's AVX2 kernels run where AVX512-BF16 does not (this CPU: "
                                       f"{cpu_kernels.isa()}; GLM6B_AVX512=0 picks them on an AVX-512 one)")


@needs_avx512
@pytest.mark.parametrize("amx", [True, False], ids=["amx", "avx512"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("out_features, in_features", [(256, 256), (200, 128), (64, 4096), (576, 1088), (75, 4160)])
def test_glm6b_cpu_kernels_equal_x_times_dequantized_weight(bits, out_features, in_features, amx, monkeypatch):
    """Every row count and shape the kernels split differently gives x @ (q * scale).T up to bfloat16
    rounding: int4, one row: weight lines as bfloat16 136 + q with the offsets taken off per line (rows
    one at a time up to 4096 columns, eight side by side beyond, the rest one at a time; rows of 64
    columns past a line: 1088, 4160); int8 and 2 rows on: dot products on table-unpacked chunks; AMX up to 48
    rows: groups of 64 weight rows, input blocks of up to 16; from 49 rows: input blocks of 16 padded to
    pairs, groups of up to 256 weight rows, slices of 1024 columns (576 x 1088: two groups of 256 and one
    of 64, a slice of 1024 columns and one of 64); weight rows past the groups of 64 by dot products.
    Activations of one sign as well as of both: the int4 one-row kernel's offsets (136 x the activations)
    then add up instead of cancelling, the hardest case for its float32 sums."""
    if amx and not cpu_kernels.has_amx():
        pytest.skip("this CPU (or OS) has no AMX tiles")
    layer = random_layer(bits, out_features, in_features)
    generator = torch.Generator().manual_seed(5)
    for rows, positive in [(1, False), (1, True), (2, False), (2, True), (3, False), (8, False), (16, False),
                           (17, False), (33, False), (48, False), (49, False), (64, False), (100, False)]:
        x = torch.randn(rows, in_features, generator=generator)
        x = (x.abs() + 1 if positive else x).to(torch.bfloat16)
        want = exact_reference(layer, x) - layer.bias.double()
        got = cpu_kernels.quantized_matmul(x, layer.weight, layer.weight_scale, bits, amx)
        assert got.shape == want.shape and got.dtype == torch.bfloat16
        # float32 sums rounded once to bfloat16: within half a bfloat16 step of each value, plus the sums' error
        error = (got.double() - want).abs()
        assert (error <= want.abs() * 2 ** -8 + 1e-4 * want.abs().max()).all(), (rows, error.max().item())


@needs_avx512
@pytest.mark.parametrize("bits", [4, 8])
def test_glm6b_cpu_dequantize_rounds_q_times_scale_once(bits):
    from glm6b.quant.thudm import unpacked_weight

    layer = random_layer(bits, 96, 192)
    out = torch.empty(96, 192, dtype=torch.bfloat16)
    cpu_kernels.dequantize_rows(layer.weight, layer.weight_scale, bits, out)
    want = (unpacked_weight(layer.weight, bits).float() * layer.weight_scale.float()[:, None]).to(torch.bfloat16)
    assert torch.equal(out, want)


@needs_avx512
@pytest.mark.parametrize("amx", [True, False], ids=["amx", "avx512"])
@pytest.mark.parametrize("bits", [4, 8])
def test_bfloat16_layers_use_glm6b_kernels_on_thudms_bytes(bits, amx, monkeypatch):
    """bfloat16 inputs run on THUDM's bytes as they are (nothing converted, the state dict untouched) for
    one row, a few (decoding) and a prefill, which without AMX multiplies de-quantized blocks (int8 from
    CPU_DEQUANTIZED_MIN_ROWS rows, int4 from AVX512_INT4_BLOCKS_MIN_ROWS: below, its dot products)."""
    from glm6b.quant import linear

    if amx and not cpu_kernels.has_amx():
        pytest.skip("this CPU (or OS) has no AMX tiles")
    if not amx:
        monkeypatch.setattr(cpu_kernels, "has_amx", lambda: False)
    monkeypatch.setattr(linear, "CPU_DEQUANTIZED_BLOCK_BYTES", 128 * 256 * 2)  # 320 rows: blocks of 128, 128, 64
    layer = random_layer(bits, 320, 256)
    thudm = layer.weight.detach().clone()
    layer.prepare("cpu", torch.float32)  # the stock int4 op may rewrite the bytes in place ...
    assert layer.prepare("cpu", torch.bfloat16) == ("glm6b_amx" if amx else "glm6b_avx512")
    assert torch.equal(layer.weight.detach(), thudm) and not layer._in_place  # ... which are given back
    blocks_from = linear.AVX512_INT4_BLOCKS_MIN_ROWS if bits == 4 else linear.CPU_DEQUANTIZED_MIN_ROWS
    for rows in (1, 5, linear.CPU_DEQUANTIZED_MIN_ROWS + 6, linear.AVX512_INT4_BLOCKS_MIN_ROWS + 6):
        if not amx:
            kernel = linear.kernel_for("cpu", "glm6b_avx512", bits, 2 * rows).__name__
            assert kernel == ("_avx512_bf16_blocks" if 2 * rows >= blocks_from else "_avx512_dot"), rows
        x = torch.randn(2, rows, 256, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
        want = exact_reference(layer, x)
        got = layer(x)
        assert got.shape == want.shape and got.dtype == torch.bfloat16
        assert (got.double() - want).abs().max() <= 1e-2 * want.abs().max(), rows
    assert torch.equal(layer.state_dict()["weight"], thudm)


@needs_cpu_kernels
@pytest.mark.parametrize("out_features, in_features", [(256, 256), (198, 128), (70, 4096), (75, 8192)])
def test_glm6b_bf16_matmul_equals_x_times_weight(out_features, in_features):
    generator = torch.Generator().manual_seed(6)
    weight = torch.randn(out_features, in_features, generator=generator).to(torch.bfloat16)
    for rows in (1, 2, 3, 4, 5, 8, 9):
        x = torch.randn(rows, in_features, generator=generator).to(torch.bfloat16)
        want = x.double() @ weight.double().T
        got = cpu_kernels.bf16_matmul(x, weight)
        assert got.shape == want.shape and got.dtype == torch.bfloat16
        error = (got.double() - want).abs()
        assert (error <= want.abs() * 2 ** -8 + 1e-4 * want.abs().max()).all(), (rows, error.max().item())


@needs_cpu_kernels
def test_bf16_decode_linear_uses_the_kernel_only_for_a_few_rows_without_autograd(monkeypatch):
    from glm6b.quant.linear import BF16DecodeLinear, use_bf16_decode_kernels

    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(64, 32, bias=False),
                                torch.nn.Linear(50, 8)).to(torch.bfloat16)  # 50 inputs: not a multiple of 64
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_bf16_decode_kernels(model) == 2
    assert [type(m) for m in model] == [BF16DecodeLinear, BF16DecodeLinear, torch.nn.Linear]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    calls = []
    kernel = cpu_kernels.bf16_matmul
    monkeypatch.setattr(cpu_kernels, "bf16_matmul", lambda x, w: calls.append(tuple(x.shape)) or kernel(x, w))
    layer = model[0]
    x = torch.randn(1, 2, 128).to(torch.bfloat16)
    want = torch.nn.functional.linear(x.double(), layer.weight.double(), layer.bias.double())
    with torch.no_grad():
        got = layer(x)
    assert calls == [(2, 128)] and got.shape == (1, 2, 64)
    assert (got.double() - want).abs().max() <= 1e-2 * want.abs().max()
    with torch.no_grad():
        assert layer.kernel_max_rows == cpu_kernels.bf16_max_rows() > 0
        layer(torch.randn(layer.kernel_max_rows + 1, 128).to(torch.bfloat16))  # more rows: F.linear
    x.requires_grad_(True)
    layer(x).sum().backward()  # autograd: F.linear, and gradients flow
    assert calls == [(2, 128)] and x.grad is not None and layer.weight.grad is not None


@needs_cpu_kernels
def test_cpu_kernel_build_is_cached_and_a_broken_compiler_falls_back(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("GLM6B_KERNEL_CACHE", str(tmp_path / "cache"))
    built = cpu_kernels._build(cpu_kernels._compiler())
    assert built.parent == tmp_path / "cache" and built.suffix == ".so"
    assert [p.name for p in built.parent.iterdir()] == [built.name]  # no temporary left behind
    mtime = built.stat().st_mtime_ns
    assert cpu_kernels._build(cpu_kernels._compiler()) == built and built.stat().st_mtime_ns == mtime
    # A compiler that fails: one warning naming the source, and PyTorch's ops are used.
    monkeypatch.setenv("CXX", "false")
    monkeypatch.setenv("GLM6B_KERNEL_CACHE", str(tmp_path / "other"))
    with caplog.at_level("WARNING"):
        assert cpu_kernels._library.__wrapped__() is None
    assert "cpu_kernels.cpp" in caplog.text and "PyTorch's ops are used instead" in caplog.text
    assert not list((tmp_path / "other").iterdir())


def test_fallback_dequantizes_into_the_input_dtype():
    layer = random_layer(4, 64, 62)  # 62 columns: no group size of the int4 op divides it
    x = torch.randn(2, 62, dtype=torch.float64)
    assert layer.prepare("cpu", torch.float64) == "dequantize"
    want = x @ layer.dequantized_weight().double().T + layer.bias.double()
    assert torch.allclose(layer(x), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(192, 256), (64, 4096)])
def test_direct_int4_layout_conversion_equals_the_op(shape):
    from glm6b.quant.linear import _blocked_to_thudm, _cpu_int4_layout_is_blocked, _thudm_to_blocked

    if not _cpu_int4_layout_is_blocked(shape[0]):
        pytest.skip("this PyTorch build does not use the 64-row blocked int4 layout (the op's copy is used)")
    q = torch.randint(-8, 8, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(3))
    by_op = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32) + 8, 1)
    assert torch.equal(_thudm_to_blocked(pack_int4(q), *shape), by_op.view(torch.uint8))
    assert torch.equal(_blocked_to_thudm(by_op, *shape), pack_int4(q))


@pytest.mark.parametrize("rows", [3 * 64 + 32, 48])
def test_op_conversion_in_slices_equals_one_call(monkeypatch, rows):
    """Row counts off the 64-row blocks (the 130528-row lm_head of int4-qe) are converted by the op a slice of
    rows at a time, which bounds its int32 input, with the bytes of one call."""
    from glm6b.quant import linear

    monkeypatch.setattr(linear, "_OP_CONVERSION_ROWS", 64)
    q = torch.randint(-8, 8, (rows, 256), dtype=torch.int8, generator=torch.Generator().manual_seed(4))
    one_call = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32) + 8, 1)
    assert torch.equal(linear._cpu_int4_pack_by_op(pack_int4(q)), one_call)
    assert linear._OP_CONVERSION_SPLITS[rows]  # it was converted in slices (the check found them equal)


def test_int4_kernel_layout_in_place_keeps_thudm_state_dict():
    layer = random_layer(4, 128, 256)
    thudm = layer.weight.detach().clone()
    layer.prepare("cpu", torch.float32)
    if layer._in_place:  # the kernel's copy was written over the weight's bytes: one int4 copy in memory
        assert not torch.equal(layer.weight.detach(), thudm)
        assert layer._kernel[1].untyped_storage().data_ptr() == layer.weight.untyped_storage().data_ptr()
    assert torch.equal(layer.thudm_weight(), thudm)
    assert torch.equal(layer.state_dict()["weight"], thudm)
    x = torch.randn(2, 256)
    before = layer(x)
    # Loading THUDM bytes back (in-place layout or not) gives the same layer.
    fresh = QuantizedLinear(256, 128, 4)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), before)
    layer.load_state_dict(layer.state_dict())
    assert torch.equal(layer.thudm_weight(), thudm)
    assert torch.equal(layer(x), before)
    # Another kernel (here: float64 inputs, de-quantized) gets THUDM's bytes back in the weight itself.
    layer.prepare("cpu", torch.float32)
    assert layer.prepare("cpu", torch.float64) == "dequantize"
    assert not layer._in_place and torch.equal(layer.weight.detach(), thudm)
    # (the de-quantized path rounds q * scale to float16 as THUDM does; the int4 kernel does not)
    assert (layer(x.double()) - before.double()).abs().max() <= 2e-3 * before.abs().max()


def test_quantized_layers_keep_the_hf_names(model):
    quantized = load_model(GOLDEN, dtype=torch.float32, quantize="int4")
    for block in quantized.transformer.layers:
        for name in QUANTIZED_LINEARS:
            assert isinstance(block.get_submodule(name), QuantizedLinear)
    names = set(quantized.state_dict())
    for name in model.state_dict():
        if name.endswith(LINEAR_SUFFIXES):
            assert name in names and name + "_scale" in names
        elif name != "lm_head.weight":
            assert name in names
    quantized_params = [p for m in quantized.modules() if isinstance(m, QuantizedLinear) for p in m.parameters()]
    assert quantized_params and not any(p.requires_grad for p in quantized_params)


def test_casting_a_quantized_model_keeps_the_float16_scales(tmp_path):
    folder = thudm_folder(tmp_path / "q", 4, embeddings=True)
    model = load_model(folder, dtype=torch.float32)
    batch = golden_batch()
    with torch.no_grad():
        want = load_model(folder, dtype=torch.bfloat16)(**batch).logits
        model(**batch)  # kernels built for float32 first
        model.to(torch.bfloat16)
        got = model(**batch).logits
    assert got.dtype == torch.bfloat16 and model.transformer.word_embeddings.dtype == torch.bfloat16
    for module in model.modules():
        if isinstance(module, (QuantizedLinear, QuantizedEmbedding)):
            assert module.weight.dtype == torch.int8 and module.weight_scale.dtype == torch.float16
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------------- THUDM folders


@pytest.mark.parametrize("bits, embeddings", [(8, False), (4, False), (4, True)], ids=["int8", "int4", "int4-qe"])
def test_thudm_folder_loads_and_matches_a_float_model_of_its_dequantized_weights(tmp_path, bits, embeddings):
    folder = thudm_folder(tmp_path / "q", bits, embeddings)
    stored = torch.load(folder / "pytorch_model.bin", weights_only=True)
    quantized = load_model(folder, dtype=torch.float32)
    assert quantized.config.quantization_bit == bits
    assert quantized.config.quantization_embeddings == embeddings
    for name, module in quantized.named_modules():
        if isinstance(module, (QuantizedLinear, QuantizedEmbedding)) and name != "lm_head":
            weight = module.thudm_weight() if isinstance(module, QuantizedLinear) else module.weight
            assert torch.equal(weight, stored[name + ".weight"]), name
            assert torch.equal(module.weight_scale, stored[name + ".weight_scale"]), name
    assert isinstance(quantized.transformer.word_embeddings, QuantizedEmbedding) == embeddings
    if embeddings:  # the tied lm_head is the quantized embedding table
        assert quantized.lm_head.weight is quantized.transformer.word_embeddings.weight
        assert quantized.lm_head.weight_scale is quantized.transformer.word_embeddings.weight_scale

    reference = dequantized_float_model(folder, torch.float32)
    batch = golden_batch()
    with torch.no_grad():
        ours = quantized(**batch).logits
        want = reference(**batch).logits
    # The kernels multiply by q * scale in float32; THUDM rounds that product to float16 first.
    assert (ours - want).abs().max() <= 2e-3 * want.abs().max()
    assert greedy_tokens(quantized) == greedy_tokens(reference)

    bf16 = load_model(folder, dtype=torch.bfloat16)
    with torch.no_grad():
        ours = bf16(**batch).logits.float()
        want = dequantized_float_model(folder, torch.bfloat16)(**batch).logits.float()
    assert (ours - want).abs().max() <= 5e-2 * want.abs().max()
    if cpu_kernels.available():  # bfloat16 where glm6b's kernels build: every quantized product ran them
        assert all(m._kernel[0].startswith("glm6b_") for m in bf16.modules() if isinstance(m, QuantizedLinear))
    if cpu_kernels.isa() == "avx2":  # and float32 there too
        assert all(m._kernel[0] == "glm6b_avx2" for m in quantized.modules() if isinstance(m, QuantizedLinear))


def test_quantize_at_load_equals_the_thudm_folder(tmp_path):
    folder = thudm_folder(tmp_path / "q", 4, embeddings=True)
    from_folder = load_model(folder, dtype=torch.float32)
    at_load = load_model(GOLDEN, dtype=torch.float32, quantize="int4", quantize_embeddings=True)
    assert at_load.config.quantization_bit == 4
    state_a, state_b = from_folder.state_dict(), at_load.state_dict()
    assert set(state_a) == set(state_b)
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name].to(state_a[name].dtype)), name


def test_quantize_model_on_a_built_model(model):
    quantized = load_model(GOLDEN, dtype=torch.float32)
    quantize_model(quantized, 8)
    assert quantized.config.quantization_bit == 8
    at_load = load_model(GOLDEN, dtype=torch.float32, quantize="int8")
    batch = golden_batch()
    with torch.no_grad():
        assert torch.equal(quantized(**batch).logits, at_load(**batch).logits)
    assert model.config.quantization_bit == 0  # the shared fixture's config is untouched


def test_glm6b_quantize_round_trips(tmp_path, capsys):
    out = tmp_path / "int4"
    assert main(["quantize", "--model", str(GOLDEN), "--bits", "4", "--output", str(out)]) == 0
    assert (out / "pytorch_model.bin").is_file() and not list(out.glob("*.safetensors.index.json"))
    for name in ("ice_text.model", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (GOLDEN / name).read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_bit"] == 4 and "quantization_embeddings" not in config
    stored = torch.load(out / "pytorch_model.bin", weights_only=True)
    for name, tensor in golden_state().items():
        if name.endswith(LINEAR_SUFFIXES):
            ref_w, ref_s = thudm_quantize(tensor, 4)
            assert stored[name].dtype == torch.int8 and torch.equal(stored[name], ref_w), name
            assert stored[name + "_scale"].dtype == torch.float16 and torch.equal(stored[name + "_scale"], ref_s)
        elif name != "lm_head.weight" and not name.endswith("inv_freq"):  # tied / recomputed: not saved
            assert torch.equal(stored[name], tensor.half()), name
    loaded = load_model(out, dtype=torch.float32)
    loaded(torch.tensor([[5, 6, 801, 804]]))  # the kernels' in-memory layout must not leak into a save
    loaded.save_pretrained(tmp_path / "again", safe_serialization=False)
    again = torch.load(tmp_path / "again" / "pytorch_model.bin", weights_only=True)
    assert set(again) == set(stored)
    assert all(torch.equal(again[name], stored[name]) for name in stored if name.endswith(LINEAR_SUFFIXES))


def test_cli_quantize_flag_loads_quantized(capsys):
    from glm6b.inference.pipelines import OUTPUT_KEY, TextGenerationPipeline
    from glm6b.tokenizer import load_tokenizer

    args = ["generate", "--model", str(GOLDEN), "--prompt", "你好", "--max-new-tokens", "6", "--greedy"]
    assert main(args + ["--quantize", "int4"]) == 0
    printed = capsys.readouterr().out
    pipe = TextGenerationPipeline(load_model(GOLDEN, quantize="int4"), load_tokenizer(GOLDEN), max_new_tokens=6,
                                  do_sample=False)
    assert printed == pipe("你好")[0][OUTPUT_KEY][0] + "\n"
    assert main(args + ["--quantize-embeddings"]) == 2  # needs --quantize
    assert "quantize_embeddings needs model.quantize" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["eval", "predict"])
def test_run_and_eval_commands_take_quantize(tmp_path, mode, capsys):
    configs = Path(__file__).parent.parent / "glm6b" / "configs"
    data = tmp_path / "dev.json"
    rows = [{"content": ex["prompt"], "summary": ex["answer"]} for ex in golden_cases()["train_adgen"]["examples"]]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    argv = ["run", "--config", str(configs / "infer.yaml"), "--mode", mode, "--load-checkpoint", str(GOLDEN),
            "--eval-data", str(data), "--output-dir", str(tmp_path / "run"), "--quantize", "int8",
            "--set", "generation.max_new_tokens=3", "--set", "data.max_source_length=24",
            "--set", "data.max_target_length=8", "--set", "trainer.disable_tqdm=true", "--set", "model.dtype=float32"]
    assert main(argv) == 0, capsys.readouterr().err
    assert len((tmp_path / "run" / "predictions.jsonl").read_text().splitlines()) == len(rows)
    if mode == "eval":
        assert json.loads((tmp_path / "run" / "metrics.json").read_text())["settings"]["quantization_bit"] == 8
        assert main(["eval", "--model", str(GOLDEN), "--data", str(data), "--output-dir", str(tmp_path / "ev"),
                     "--quantize", "int4", "--max-new-tokens", "3", "--max-source-length", "24"]) == 0
        assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["settings"]["quantization_bit"] == 4
    else:
        train = ["run", "--config", str(configs / "finetune.yaml"), "--mode", "finetune", "--load-checkpoint",
                 str(GOLDEN), "--train-data", str(data), "--output-dir", str(tmp_path / "ft"), "--quantize", "int4"]
        assert main(train) == 2  # LoRA and P-tuning train on a quantized base; full fine-tuning cannot
        assert "model.quantize = 'int4' with method full" in capsys.readouterr().err
        from glm6b.config import LoadConfig, TrainingConfig
        from glm6b.train.trainer import Trainer

        trainer = Trainer(model_args=LoadConfig(load_checkpoint=str(GOLDEN), dtype="float32", quantize="int8"),
                          args=TrainingConfig(output_dir=str(tmp_path / "t"), tensorboard=False, disable_tqdm=True))
        trainer.ensure_model()
        assert isinstance(trainer.model.transformer.layers[0].attention.query_key_value, QuantizedLinear)


# ----------------------------------------------------------------------------------- errors


def test_quantized_config_errors(tmp_path):
    folder = thudm_folder(tmp_path / "q", 4)
    with pytest.raises(CheckpointError, match=r"config\.json: the weights are quantized to 4 bits.*int8"):
        load_model(folder, quantize="int8")
    with pytest.raises(ValueError, match=r"quantize = 'int3': expected None, 'int8' or 'int4'"):
        load_model(GOLDEN, quantize="int3")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_bit": 2}))
    with pytest.raises(ConfigError, match=r"'quantization_bit' = 2: expected 0 \(float weights\), 4 or 8"):
        load_model(folder)
    # A float folder whose config.json claims int8: the float tensors are refused, not cast.
    float_folder = tmp_path / "f"
    shutil.copytree(GOLDEN, float_folder)
    config = json.loads((float_folder / "config.json").read_text())
    (float_folder / "config.json").write_text(json.dumps({**config, "quantization_bit": 8}))
    expected = r"dense\.weight is torch\.float16, expected torch\.int8 \(config\.json sets quantization_bit"
    with pytest.raises(CheckpointError, match=expected):
        load_model(float_folder)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [8, 4])
def test_cuda_kernel_equals_x_times_dequantized_weight(bits):
    layer = random_layer(bits, 256, 512).cuda()
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    want = exact_reference(layer, x)
    got = layer(x)
    assert layer._kernel[0] in ("int8pack", "int4pack_cuda", "dequantize")
    assert (got.double() - want).abs().max() <= 2e-2 * want.abs().max()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_linear_traces_as_one_graph(bits, dtype):
    """A compiled decode step (fullgraph) can hold quantized layers once their kernels are built (glm6b's
    own CPU kernels, for bfloat16, are custom ops)."""
    layer = random_layer(bits, 128, 256)
    x = torch.randn(4, 256).to(dtype)
    want = layer(x)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), want)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 4])
def test_compiled_decode_of_a_quantized_model_equals_eager(bits):
    """The engine's compiled CPU step (inductor, one graph of a layer's step for every layer) on int8 /
    int4 layers in bfloat16: at 1, 2 and 3 rows (each product path decoding takes) its greedy tokens
    equal the eager step's, and the 5 layers share their graphs."""
    from torch._dynamo.utils import counters

    from glm6b.config import ChatGLMConfig
    from glm6b.inference.generation import generate
    from glm6b.model import ChatGLMForConditionalGeneration

    torch.manual_seed(0)
    model = ChatGLMForConditionalGeneration(ChatGLMConfig.from_name("tiny", num_layers=5), dtype=torch.bfloat16).eval()
    model.init_weights()
    model = quantize_model(model, bits)
    torch._dynamo.reset()
    counters.clear()
    prompts = torch.tensor([[5, 6, 7, 801, 804], [9, 6, 7, 801, 804], [8, 10, 7, 801, 804]])
    for rows in (1, 2, 3):
        eager = generate(model, prompts[:rows], max_new_tokens=6, compile=False)
        assert torch.equal(generate(model, prompts[:rows], max_new_tokens=6, compile=True), eager), rows
    assert 1 <= counters["stats"]["unique_graphs"] <= 3
    torch._dynamo.reset()
