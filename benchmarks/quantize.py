"""Weight-only int8/int4: kernel speed, quality against bfloat16, load time and decode steps.

    python benchmarks/quantize.py                      # all three tables, 2 threads, 2-layer glm_6b shape
    python benchmarks/quantize.py --only kernels       # or quality, load, decode
    python benchmarks/quantize.py --layers 4 --threads 2

Tables:

1. kernels: one matrix [out x in] times a bfloat16 input of --rows rows (1, 8 and 100: decoding one
   row, a batch of 8, a prompt's prefill): ``F.linear`` on the
   bfloat16 weight against PyTorch's weight-only ops (``_weight_int8pack_mm``,
   ``_weight_int4pack_mm_for_cpu`` with each group size it accepts) and the `QuantizedLinear`
   module as the model runs it (with --lm-head also the 130528 x 4096 lm_head, module only), and for
   up to cpu_kernels.bf16_max_rows() rows glm6b's bfloat16 kernel (what BF16DecodeLinear runs in a bf16 decode
   step), where they build (AVX512-BF16 or AVX2), glm6b's own kernels (glm6b.quant.cpu_kernels). On the AVX2
   build, from linear.AVX2_GEMM_MIN_ROWS rows, also the bfloat16 weight multiplied as float32 blocks (what
   BF16DecodeLinear runs in a prefill there) and F.linear in float32 (the float32 GEMM: that CPU's roofline
   for a prefill), and the module with int8 activations (opt-in) and, for int4, with the float32 FMA
   products (GLM6B_INT16_ACTIVATIONS=0; its default there is 16-bit activations). The same module is also timed
   held to PyTorch's ops ("stock ops") and, on a CPU with AMX, to the kernels' path for CPUs without
   it ("glm6b no AMX"). Where the stock ops run, from glm6b.quant.linear.CPU_DEQUANTIZED_MIN_ROWS rows
   on the module multiplies blocks of de-quantized weight; its "row kernel" line is that module held
   to the stock op; on the AVX-512 build without AMX the int4 module's "bf16 blocks" line is the
   product it takes from linear.AVX512_INT4_BLOCKS_MIN_ROWS rows on. Median of --repeats calls after
   warm-up, the kernels of a row taking turns call by call; "GB/s" counts the bytes of the weight (and
   scales) read once per call.
2. quality: top-1 agreement with the bfloat16 model and the largest |logit difference| (also
   relative to the largest |logit|), for int8, int4 and each with the word embeddings and lm_head
   quantized (THUDM's int4-qe; "+ emb/lm_head"), and on the AVX2 build each again with int8 activations
   (GLM6B_INT8_ACTIVATIONS=1) and the int4 ones with the float32 FMA products instead of their default
   16-bit activations (GLM6B_INT16_ACTIVATIONS=0), on the golden checkpoint and inputs (tests/golden, cases.json
   forward_batch and generate_single_greedy prompts, real positions only) and on a random model of
   the glm_6b shape with --layers layers (width, heads and the 130528 vocabulary of the real one).
   The float32 row is the noise floor: bfloat16 against float32.
3. load: time to load the random glm_6b-shape model quantized by `glm6b quantize` (as bfloat16,
   whose float16 embeddings are converted, and as float16), against the time to read the folder's
   bytes into fresh memory (page cache warm), the float folder, and quantizing at load from it.
   "kernels built" is what `prepare_kernels` does before the first forward: nothing for glm6b's own
   CPU kernels, the conversion to PyTorch's int4 op's byte order where that op runs.
4. decode: milliseconds per greedy decode step (KV cache, batch 1, 32-token prompt) of that random
   model in bfloat16 and each quantized precision, timed in interleaved rounds; with few layers the
   lm_head is a large share.

Speed numbers move with the machine's load: compare rows of one run only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from glm6b import load_model  # noqa: E402
from glm6b.config import ChatGLMConfig  # noqa: E402
from glm6b.model import ChatGLMForConditionalGeneration, build_mask_and_positions  # noqa: E402
from glm6b.api import quantize_folder  # noqa: E402
from glm6b.quant.linear import QuantizedLinear, prepare_kernels  # noqa: E402
from glm6b.quant import cpu_kernels  # noqa: E402
from glm6b.quant import linear as quant_linear  # noqa: E402

GOLDEN = ROOT / "tests" / "golden"
SHAPES = [(4096, 4096), (16384, 4096), (4096, 16384)]  # [out, in]: dense, dense_h_to_4h, dense_4h_to_h
LM_HEAD = (130528, 4096)
SCHEMES = [("int8", dict(quantize="int8")), ("int8 + emb/lm_head", dict(quantize="int8", quantize_embeddings=True)),
           ("int4", dict(quantize="int4")), ("int4 + emb/lm_head", dict(quantize="int4", quantize_embeddings=True))]
# The AVX2 build's other products, each chosen by an environment variable while a layer's kernel is built:
# the opt-in int8 activations (all schemes), and the float32 FMA products that int4 layers take with
# bfloat16 inputs when 16-bit activations are switched off. Quality, kernel and decode rows.
AVX2_VARIANTS = {"int8 activations": {"GLM6B_INT8_ACTIVATIONS": "1"},
                 "float32 products": {"GLM6B_INT16_ACTIVATIONS": "0"}}


def avx2_variants_here() -> bool:
    return cpu_kernels.isa() == "avx2"


def variant_schemes() -> list[tuple[str, dict]]:
    """The AVX2 variants' rows (none elsewhere): every scheme with int8 activations, the int4 ones with the
    float32 products."""
    if not avx2_variants_here():
        return []
    return ([(f"{name}, int8 activations", kwargs) for name, kwargs in SCHEMES]
            + [(f"{name}, float32 products", kwargs) for name, kwargs in SCHEMES if kwargs["quantize"] == "int4"])


def prepare_for(name: str):
    """prepare_kernels, with the environment of the AVX2 variant `name` ends with (if any) while the kernels
    are built."""
    variant = next((env for suffix, env in AVX2_VARIANTS.items() if name.endswith(suffix)), {})

    def prepare(model, dtype=None) -> dict[str, int]:
        saved = {key: os.environ.get(key) for key in variant}
        os.environ.update(variant)
        try:
            return prepare_kernels(model, dtype=dtype)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key)
                else:
                    os.environ[key] = value

    return prepare


def interleaved_median_ms(fns, repeats: int) -> list[float]:
    """Median ms per call of each function, the functions taking turns call by call (so that a slow
    moment of a shared machine hits them all alike, not the one that happened to run then)."""
    for fn in fns:
        for _ in range(3):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) * 1e3 for spent in times]


# ----------------------------------------------------------------------------------- 1. kernels


@torch.inference_mode()
def kernel_table(repeats: int, lm_head: bool, row_counts: list[int]) -> None:
    print("\n## Kernels: one [out x in] matrix, bfloat16 input, CPU, "
          f"{torch.get_num_threads()} threads (median ms per call; GB/s of weight bytes)\n")
    print(f"| {'out x in':>11} | rows | {'kernel':<36} | {'ms':>8} | {'GB/s':>6} | vs bf16 |")
    print(f"|{'-' * 13}|------|{'-' * 38}|{'-' * 10}|{'-' * 8}|---------|")
    gen = torch.Generator().manual_seed(0)
    # The lm_head (130528 x 4096, tied to the embeddings) only through the module: its raw-op rows
    # would need several GB of temporaries.
    for out_f, in_f in SHAPES + ([LM_HEAD] if lm_head else []):
        stock = (out_f, in_f) != LM_HEAD
        w = torch.randn(out_f, in_f, generator=gen, dtype=torch.bfloat16) * 0.02
        if stock:
            q8 = torch.randint(-127, 128, (out_f, in_f), dtype=torch.int8, generator=gen)
            s8 = torch.rand(out_f, generator=gen).to(torch.bfloat16)
            u4 = torch.randint(0, 16, (out_f, in_f), dtype=torch.int32, generator=gen)
            p4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u4, 1)
            del u4
        linear = torch.nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16, device="meta")
        linear.weight = torch.nn.Parameter(w, requires_grad=False)
        modules = {bits: QuantizedLinear.from_float(linear, bits) for bits in (8, 4)}
        variants = {}  # the same weights held to PyTorch's ops, and to glm6b's kernels without AMX
        for bits, module in modules.items():
            if cpu_kernels.available():
                variants[f"int{bits}, stock ops"] = prepared_with(module, supports=lambda *a: False)
            if cpu_kernels.has_amx():
                variants[f"int{bits}, glm6b no AMX"] = prepared_with(module, has_amx=lambda: False)
            for variant in AVX2_VARIANTS if avx2_variants_here() else ():
                if variant == "float32 products" and bits != 4:
                    continue
                copy = prepared_with(module)
                copy._kernel = None
                prepare_for(variant)(copy, torch.bfloat16)
                variants[f"int{bits}, {variant}"] = copy
        for rows in row_counts:
            many = rows >= quant_linear.CPU_DEQUANTIZED_MIN_ROWS
            x = torch.randn(rows, in_f, generator=gen).to(torch.bfloat16)
            cases = [("F.linear bf16", lambda: F.linear(x, w), out_f * in_f * 2)]
            if cpu_kernels.available() and rows <= cpu_kernels.bf16_max_rows():  # what BF16DecodeLinear runs
                cases.append(("glm6b bf16_matmul", lambda: cpu_kernels.bf16_matmul(x, w), out_f * in_f * 2))
            if cpu_kernels.isa() == "avx2" and rows >= quant_linear.AVX2_GEMM_MIN_ROWS:
                # what BF16DecodeLinear runs in a prefill there, and the float32 GEMM itself (the roofline)
                cases.append(("bf16 weight, float32 blocks", lambda: quant_linear._bf16_weight_float32_mm(x, w),
                              out_f * in_f * 2))
                x32, w32 = x.float(), w.float()
                cases.append(("F.linear float32 (x, W float32)", lambda: F.linear(x32, w32), out_f * in_f * 4))
            if stock:
                cases.append(("_weight_int8pack_mm", lambda: torch.ops.aten._weight_int8pack_mm(x, q8, s8),
                              out_f * in_f + out_f * 2))
            for group in ((128,) if many else (32, 64, 128, 256)) if stock else ():
                sz = torch.rand(in_f // group, out_f, 2, generator=gen).to(torch.bfloat16)
                cases.append((f"_weight_int4pack_mm g{group}",
                              lambda sz=sz, group=group: torch.ops.aten._weight_int4pack_mm_for_cpu(x, p4, group, sz),
                              out_f * in_f // 2 + sz.numel() * 2))
            for bits, module in modules.items():
                module.prepare("cpu", torch.bfloat16)
                cases.append((f"QuantizedLinear int{bits} ({module._kernel[0]})", lambda m=module: m(x),
                              bytes_read(module)))
                if many and not module._kernel[0].startswith("glm6b_"):
                    cases.append((f"QuantizedLinear int{bits}, row kernel", lambda m=module: row_kernel_only(m, x),
                                  bytes_read(module)))
                if many and module._kernel[0] == "glm6b_avx512" and bits == 4:
                    # where the dot products run a prompt (below AVX512_INT4_BLOCKS_MIN_ROWS), the other way:
                    # de-quantized blocks + the bfloat16 GEMM
                    cases.append(("QuantizedLinear int4, bf16 blocks",
                                  lambda m=module: quant_linear._avx512_bf16_blocks(m, x, m._kernel),
                                  bytes_read(module)))
            for name, module in variants.items():
                cases.append((f"QuantizedLinear {name}", lambda m=module: m(x), bytes_read(module)))
            base = None
            for (name, _, nbytes), ms in zip(cases, interleaved_median_ms([fn for _, fn, _ in cases], repeats)):
                base = base or ms
                print(f"| {out_f:>5}x{in_f:<5} | {rows:>4} | {name:<36} | {ms:8.2f} | {nbytes / ms / 1e6:6.1f} | "
                      f"{base / ms:6.2f}x |")
        del w, modules, linear
        if stock:
            del q8, p4
        gc.collect()


def bytes_read(module: QuantizedLinear) -> int:
    """The weight bytes a call of the module reads: the quantized weight, plus whatever its kernel holds."""
    extra = sum(t.numel() * t.element_size() for t in module._kernel[1:] if isinstance(t, torch.Tensor))
    return module.out_features * module.in_features * module.bits // 8 + extra


def prepared_with(module: QuantizedLinear, **patches) -> QuantizedLinear:
    """A copy of `module` whose bfloat16 kernel was chosen with glm6b.quant.cpu_kernels' functions patched."""
    copy = QuantizedLinear(module.in_features, module.out_features, module.bits, bias=False, device="meta")
    copy.load_state_dict(module.state_dict(), assign=True)  # the same bytes ...
    copy.allow_in_place = False  # ... so the stock int4 op gets a copy in its own layout
    saved = {name: getattr(cpu_kernels, name) for name in patches}
    try:
        for name, value in patches.items():
            setattr(cpu_kernels, name, value)
        copy.prepare("cpu", torch.bfloat16)
    finally:
        for name, value in saved.items():
            setattr(cpu_kernels, name, value)
    return copy


def row_kernel_only(module: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """The module's product held to the first (row) kernel of its path in glm6b.quant.linear.KERNELS,
    whatever the number of rows."""
    return quant_linear.kernel_for("cpu", module._kernel[0], module.bits, 1)(module, x, module._kernel)


# ----------------------------------------------------------------------------------- 2. quality


def agreement(logits: torch.Tensor, reference: torch.Tensor, real: torch.Tensor) -> tuple[float, float, float]:
    """(top-1 agreement, max |diff|, max |diff| / max |reference|) over the real positions."""
    a, b = logits.float()[real], reference.float()[real]
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    diff = (a - b).abs().max().item()
    return top1, diff, diff / b.abs().max().item()


@torch.inference_mode()
def golden_logits(model) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    cases = json.loads((GOLDEN / "cases.json").read_text(encoding="utf-8"))
    tensors = load_file(GOLDEN / "tensors.safetensors")
    case = cases["forward_batch"]
    logits = model(torch.tensor(case["input_ids"]), attention_mask=tensors[case["attention_mask"]],
                   position_ids=tensors[case["position_ids"]]).logits
    real = ~tensors[case["is_pad"]].bool()
    outs, masks = [logits.reshape(-1, logits.shape[-1])], [real.reshape(-1)]
    for item in cases["generate_single_greedy"]["items"]:
        ids = torch.tensor(item["input_ids"]).view(1, -1)
        out = model(ids).logits
        outs.append(out.reshape(-1, out.shape[-1]))
        masks.append(torch.ones(ids.numel(), dtype=torch.bool))
    return torch.cat(outs), torch.cat(masks)


@torch.inference_mode()
def random_logits(model, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    c = model.config
    gen = torch.Generator().manual_seed(1)
    body = torch.randint(6, c.mask_token_id, (2, seq_len - 2), generator=gen)
    ids = torch.cat([body, torch.tensor([[c.gmask_token_id, c.bos_token_id]] * 2)], dim=1)
    mask, positions = build_mask_and_positions(ids, c)
    logits = model(ids, attention_mask=mask, position_ids=positions).logits
    return logits.reshape(-1, logits.shape[-1]), torch.ones(ids.numel(), dtype=torch.bool)


def quality_rows(folder: Path, run, label: str) -> None:
    reference, real = run(load_model(folder, dtype=torch.bfloat16))
    gc.collect()
    rows = [("float32", dict(dtype=torch.float32))] + [(n, dict(dtype=torch.bfloat16, **kw)) for n, kw in SCHEMES]
    rows += [(n, dict(dtype=torch.bfloat16, **kw)) for n, kw in variant_schemes()]
    for name, kwargs in rows:
        model = load_model(folder, **kwargs)
        kernels = prepare_for(name)(model, dtype=torch.bfloat16) if "quantize" in kwargs else {}
        logits, _ = run(model)
        del model
        gc.collect()
        top1, diff, rel = agreement(logits, reference, real)
        used = ", ".join(f"{k} x{v}" for k, v in kernels.items()) or "-"
        print(f"| {label:<24} | {name:<36} | {int(real.sum()):>6} | {top1 * 100:6.2f} % | {diff:9.4f} | "
              f"{rel * 100:6.2f} % | {used} |")


def quality_table(random_folder: Path, layers: int, seq_len: int) -> None:
    print("\n## Quality against the bfloat16 model (activations bfloat16; float32 row = noise floor)\n")
    print(f"| {'model / inputs':<24} | {'precision':<36} | tokens | top-1 agr | max |diff| | rel max  | kernels |")
    print(f"|{'-' * 26}|{'-' * 38}|--------|-----------|-----------|----------|---------|")
    quality_rows(GOLDEN, golden_logits, "golden / cases.json")
    quality_rows(random_folder, lambda m: random_logits(m, seq_len),
                 f"glm_6b x{layers} layers / rand")


# ----------------------------------------------------------------------------------- 3. load


def read_bytes_seconds(folder: Path, fresh: bool) -> float:
    """Seconds to read every file of `folder`: into one reused 16 MB buffer (the page-cache copy
    alone), or each file into newly allocated memory (what any loader pays: the pages are touched
    for the first time)."""
    start = time.perf_counter()
    for path in folder.iterdir():
        with open(path, "rb", buffering=0) as f:
            if fresh:  # uninitialised memory, as a loader allocates its tensors
                buffer = torch.empty(path.stat().st_size, dtype=torch.uint8)
                view, done = memoryview(buffer.numpy()), 0
                while done < len(view):  # one read() returns at most about 2 GB
                    done += f.readinto(view[done:])
                del buffer, view
            else:
                buffer = bytearray(1 << 24)
                while f.readinto(buffer):
                    pass
    return time.perf_counter() - start


def load_table(float_folder: Path, work: Path) -> None:
    print("\n## Load time of the random glm_6b-shape model (page cache warm; median of 3)\n")
    print("read: the folder's bytes into a reused buffer / into fresh memory (the floor for any loader).\n")
    print("| folder | loaded as | bytes | read s | read fresh s | load s | load / read fresh | kernels built s |")
    print("|--------|-----------|-------|--------|--------------|--------|-------------------|-----------------|")

    def row(label: str, folder: Path, kwargs: dict, kernels: bool) -> None:
        size = sum(p.stat().st_size for p in folder.iterdir())
        read_s = statistics.median(read_bytes_seconds(folder, fresh=False) for _ in range(3))
        fresh_s = statistics.median(read_bytes_seconds(folder, fresh=True) for _ in range(3))
        loads, prep = [], []
        for _ in range(3 if kernels else 1):
            start = time.perf_counter()
            model = load_model(folder, **kwargs)
            loads.append(time.perf_counter() - start)
            if kernels:
                start = time.perf_counter()
                prepare_kernels(model)
                prep.append(time.perf_counter() - start)
            del model
            gc.collect()
        load_s = statistics.median(loads)
        dtype = str(kwargs["dtype"]).removeprefix("torch.")
        print(f"| {label} | {dtype} | {size / 1e9:.2f} GB | {read_s:.2f} | {fresh_s:.2f} | {load_s:.2f} | "
              f"{load_s / fresh_s:.2f}x | {f'{statistics.median(prep):.2f}' if prep else '-'} |")

    row("bf16 (float)", float_folder, dict(dtype=torch.bfloat16), kernels=False)
    for bits in (8, 4):
        folder = work / f"int{bits}"
        quantize_folder(float_folder, folder, f"int{bits}")
        for dtype in (torch.bfloat16, torch.float16):
            row(f"int{bits} (glm6b quantize)", folder, dict(dtype=dtype), kernels=dtype == torch.bfloat16)
    row("bf16, quantize='int4' at load", float_folder, dict(dtype=torch.bfloat16, quantize="int4"), kernels=False)


# ----------------------------------------------------------------------------------- 4. decode


@torch.inference_mode()
def decode_table(folder: Path, layers: int, steps: int, rounds: int = 5) -> None:
    """All precisions are held at once and timed in turns, round after round, so that a change in the
    machine's load hits them alike; each round times `steps` decode steps of every model."""
    from glm6b.config import GenerationConfig
    from glm6b.inference.generation import generate_steps

    print(f"\n## Decode step of the random glm_6b-shape model ({layers} of 28 layers), batch 1, bfloat16 "
          f"activations (median over {rounds} interleaved rounds of {steps} steps)\n")
    print("| precision | ms per decode step | vs bf16 | kernels |")
    print("|-----------|--------------------|---------|---------|")
    models = {}
    schemes = [("bf16", {})] + SCHEMES + variant_schemes()
    for name, kwargs in schemes:
        model = load_model(folder, dtype=torch.bfloat16, **kwargs)
        models[name] = (model, prepare_for(name)(model) if kwargs else {})
    c = next(iter(models.values()))[0].config
    prompt = torch.cat([torch.randint(6, c.mask_token_id, (1, 30), generator=torch.Generator().manual_seed(2)),
                        torch.tensor([[c.gmask_token_id, c.bos_token_id]])], dim=1)
    config = GenerationConfig(max_new_tokens=steps + 1, eos_token_id=-1)  # -1: never stops early
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds + 1):  # the first round is a warm-up
        for name, (model, _) in models.items():
            stamps = [time.perf_counter()]
            for _ in generate_steps(model, prompt, config=config):
                stamps.append(time.perf_counter())
            times[name].append(statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:])))  # after prefill
    base = None
    for name, (_, kernels) in models.items():
        ms = statistics.median(times[name][1:]) * 1e3
        base = base or ms
        used = ", ".join(f"{k} x{v}" for k, v in kernels.items()) or "-"
        print(f"| {name} | {ms:.1f} | {base / ms:.2f}x | {used} |")


# ----------------------------------------------------------------------------------- main


def write_random_model(folder: Path, layers: int) -> None:
    """A random model of the glm_6b shape with `layers` layers, saved as bfloat16 safetensors."""
    config = ChatGLMConfig.from_name("glm_6b", num_layers=layers)
    model = ChatGLMForConditionalGeneration(config, dtype=torch.bfloat16, device="meta")
    model.to_empty(device="cpu")
    model.tie_weights()
    model.init_weights(generator=torch.Generator().manual_seed(0))
    model.eval()
    from glm6b.checkpoint.hf import save_pretrained

    save_pretrained(model, folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=("kernels", "quality", "load", "decode"), default=None)
    parser.add_argument("--steps", type=int, default=8, help="decode: timed steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2, help="layers of the random glm_6b-shape model")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per row of the random model's input")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per kernel")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 100], help="kernels: input rows")
    parser.add_argument("--lm-head", dest="lm_head", action="store_true",
                        help="kernels: also the 130528 x 4096 lm_head (needs about 3 GB more memory)")
    parser.add_argument("--workdir", default=None, help="where the random model folders go (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; glm6b CPU kernels: "
          f"{cpu_kernels.isa()}")
    if args.only in (None, "kernels"):
        kernel_table(args.repeats, args.lm_head, args.rows)
    if args.only in ("quality", "load", "decode", None):
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            work = Path(tmp)
            write_random_model(work / "bf16", args.layers)
            gc.collect()
            if args.only in (None, "quality"):
                quality_table(work / "bf16", args.layers, args.seq_len)
            if args.only in (None, "load"):
                load_table(work / "bf16", work)
            if args.only in (None, "decode"):
                decode_table(work / "bf16", args.layers, args.steps)


if __name__ == "__main__":
    main()
