"""Weight-only int8/int4: kernel speed, quality against bfloat16, and load time of a quantized folder.

    python benchmarks/quantize.py                      # all three tables, 2 threads, 2-layer glm_6b shape
    python benchmarks/quantize.py --only kernels       # or quality, or load
    python benchmarks/quantize.py --layers 4 --threads 2

Tables:

1. kernels: one matrix [out x in] times a bfloat16 input of 1 and 8 rows: ``F.linear`` on the
   bfloat16 weight against the stock ops glm6b.quant uses (``_weight_int8pack_mm``,
   ``_weight_int4pack_mm_for_cpu`` with each group size it accepts) and the `QuantizedLinear`
   module as the model runs it. Median of --repeats calls after warm-up; "GB/s" counts the bytes
   of the weight (and scales) read once per call.
2. quality: top-1 agreement with the bfloat16 model and the largest |logit difference| (also
   relative to the largest |logit|), for int8, int4 and int4 with the word embeddings and lm_head
   quantized (THUDM's int4-qe), on the golden checkpoint and inputs (tests/golden, cases.json
   forward_batch and generate_single_greedy prompts, real positions only) and on a random model of
   the glm_6b shape with --layers layers (width, heads and the 130528 vocabulary of the real one).
   The float32 row is the noise floor: bfloat16 against float32.
3. load: time to load the random glm_6b-shape model quantized by `glm6b quantize`, against the time
   to read the folder's bytes (page cache warm for both), and quantizing at load from the float folder.

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
from glm6b.quant.folder import quantize_folder  # noqa: E402
from glm6b.quant.linear import QuantizedLinear, prepare_kernels  # noqa: E402

GOLDEN = ROOT / "tests" / "golden"
SHAPES = [(4096, 4096), (16384, 4096), (4096, 16384)]  # [out, in]: dense, dense_h_to_4h, dense_4h_to_h
SCHEMES = [("int8", dict(quantize="int8")), ("int4", dict(quantize="int4")),
           ("int4 + emb/lm_head", dict(quantize="int4", quantize_embeddings=True))]


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


# ----------------------------------------------------------------------------------- 1. kernels


@torch.inference_mode()
def kernel_table(repeats: int) -> None:
    print("\n## Kernels: one [out x in] matrix, bfloat16 input, CPU, "
          f"{torch.get_num_threads()} threads (median ms per call; GB/s of weight bytes)\n")
    print(f"| {'out x in':>11} | rows | {'kernel':<36} | {'ms':>8} | {'GB/s':>6} | vs bf16 |")
    print(f"|{'-' * 13}|------|{'-' * 38}|{'-' * 10}|{'-' * 8}|---------|")
    gen = torch.Generator().manual_seed(0)
    for out_f, in_f in SHAPES:
        w = torch.randn(out_f, in_f, generator=gen, dtype=torch.float32).to(torch.bfloat16) * 0.02
        q8 = torch.randint(-127, 128, (out_f, in_f), dtype=torch.int8, generator=gen)
        s8 = torch.rand(out_f, generator=gen).to(torch.bfloat16)
        u4 = torch.randint(0, 16, (out_f, in_f), dtype=torch.int32, generator=gen)
        p4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u4, 1)
        del u4
        linear = torch.nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16)
        with torch.no_grad():
            linear.weight.copy_(w)
        modules = {bits: QuantizedLinear.from_float(linear, bits) for bits in (8, 4)}
        for rows in (1, 8):
            x = torch.randn(rows, in_f, generator=gen).to(torch.bfloat16)
            cases = [("F.linear bf16", lambda: F.linear(x, w), out_f * in_f * 2),
                     ("_weight_int8pack_mm", lambda: torch.ops.aten._weight_int8pack_mm(x, q8, s8),
                      out_f * in_f + out_f * 2)]
            for group in (32, 64, 128, 256):
                sz = torch.rand(in_f // group, out_f, 2, generator=gen).to(torch.bfloat16)
                cases.append((f"_weight_int4pack_mm g{group}",
                              lambda sz=sz, group=group: torch.ops.aten._weight_int4pack_mm_for_cpu(x, p4, group, sz),
                              out_f * in_f // 2 + sz.numel() * 2))
            for bits, module in modules.items():
                module.prepare("cpu", torch.bfloat16)
                extra = sum(t.numel() * t.element_size() for t in module._kernel[1:] if isinstance(t, torch.Tensor))
                cases.append((f"QuantizedLinear int{bits} ({module._kernel[0]})", lambda m=module: m(x),
                              out_f * in_f * bits // 8 + extra))
            base = None
            for name, fn, nbytes in cases:
                ms = median_ms(fn, repeats)
                base = base or ms
                print(f"| {out_f:>5}x{in_f:<5} | {rows:>4} | {name:<36} | {ms:8.2f} | {nbytes / ms / 1e6:6.1f} | "
                      f"{base / ms:6.2f}x |")
        del w, q8, p4, modules, linear
        gc.collect()


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
    for name, kwargs in rows:
        model = load_model(folder, **kwargs)
        kernels = prepare_kernels(model, dtype=torch.bfloat16) if "quantize" in kwargs else {}
        logits, _ = run(model)
        del model
        gc.collect()
        top1, diff, rel = agreement(logits, reference, real)
        used = ", ".join(f"{k} x{v}" for k, v in kernels.items()) or "-"
        print(f"| {label:<24} | {name:<20} | {int(real.sum()):>6} | {top1 * 100:6.2f} % | {diff:9.4f} | "
              f"{rel * 100:6.2f} % | {used} |")


def quality_table(random_folder: Path, layers: int, seq_len: int) -> None:
    print("\n## Quality against the bfloat16 model (activations bfloat16; float32 row = noise floor)\n")
    print(f"| {'model / inputs':<24} | {'precision':<20} | tokens | top-1 agr | max |diff| | rel max  | kernels |")
    print(f"|{'-' * 26}|{'-' * 22}|--------|-----------|-----------|----------|---------|")
    quality_rows(GOLDEN, golden_logits, "golden / cases.json")
    quality_rows(random_folder, lambda m: random_logits(m, seq_len),
                 f"glm_6b x{layers} layers / rand")


# ----------------------------------------------------------------------------------- 3. load


def read_bytes_seconds(folder: Path) -> float:
    start = time.perf_counter()
    for path in folder.iterdir():
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    return time.perf_counter() - start


def load_table(float_folder: Path, work: Path) -> None:
    print("\n## Load time of the random glm_6b-shape model (page cache warm; median of 3)\n")
    print("| folder | bytes | read bytes s | load s | load / read | kernels built s |")
    print("|--------|-------|--------------|--------|-------------|-----------------|")
    for bits in (8, 4):
        folder = work / f"int{bits}"
        quantize_folder(float_folder, folder, bits)
        size = sum(p.stat().st_size for p in folder.iterdir())
        read_s = statistics.median(read_bytes_seconds(folder) for _ in range(3))
        loads, prep = [], []
        for _ in range(3):
            start = time.perf_counter()
            model = load_model(folder, dtype=torch.bfloat16)
            loads.append(time.perf_counter() - start)
            start = time.perf_counter()
            prepare_kernels(model)
            prep.append(time.perf_counter() - start)
            del model
            gc.collect()
        load_s = statistics.median(loads)
        print(f"| int{bits} (glm6b quantize) | {size / 1e9:.2f} GB | {read_s:.2f} | {load_s:.2f} | "
              f"{load_s / read_s:.2f}x | {statistics.median(prep):.2f} |")
    size = sum(p.stat().st_size for p in float_folder.iterdir())
    read_s = statistics.median(read_bytes_seconds(float_folder) for _ in range(3))
    start = time.perf_counter()
    model = load_model(float_folder, dtype=torch.bfloat16, quantize="int4")
    load_s = time.perf_counter() - start
    del model
    print(f"| bf16 folder, quantize='int4' at load | {size / 1e9:.2f} GB | {read_s:.2f} | {load_s:.2f} | "
          f"{load_s / read_s:.2f}x | - |")


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
    parser.add_argument("--only", choices=("kernels", "quality", "load"), default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2, help="layers of the random glm_6b-shape model")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per row of the random model's input")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per kernel")
    parser.add_argument("--workdir", default=None, help="where the random model folders go (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    if args.only in (None, "kernels"):
        kernel_table(args.repeats)
    if args.only in ("quality", "load", None):
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            work = Path(tmp)
            write_random_model(work / "bf16", args.layers)
            gc.collect()
            if args.only in (None, "quality"):
                quality_table(work / "bf16", args.layers, args.seq_len)
            if args.only in (None, "load"):
                load_table(work / "bf16", work)


if __name__ == "__main__":
    main()
