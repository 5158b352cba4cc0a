"""Where a batch-1 decode step's time goes on this CPU: the glm_6b shape's linears through glm6b's kernels,
the lm_head, and the machine's read rate they are bound by.

    python benchmarks/profile_decode_cpu.py --threads 2 [--layers 28]

Per token a decode step runs, per layer, the four quantized linears (query_key_value 12288 x 4096, dense
4096 x 4096, dense_h_to_4h 16384 x 4096, dense_4h_to_h 4096 x 16384), then the lm_head (130528 x 4096:
bfloat16 for int4 / int8, quantized for -qe). This times each of them alone with random THUDM-layout
weights (two copies of every shape, taken in turns, so each call reads its weight from memory and not
from the cache), the same kernels with a weight that fits the last-level cache (what unpacking and the
dot products cost when memory is not the limit), and the memory read rate (the sum of a 1 GiB float32
tensor). What a whole step takes beyond the sum of these (attention, norms, rotary, the KV cache and
the Python / compiled-graph code between layers) is measured by the last part: whole decode steps of
glm_6b-shape models with a few layers (`--step-layers`, random int4 weights, decoded through DecodeEngine
as generate() runs it, compiled where "auto" compiles), under torch.profiler with the compiled graphs'
own kernels recorded, split into the linears, the lm_head, attention, the other compiled kernels, the
compiled graph's wrapper code, Dynamo's guard checks and the rest (wall time minus all of these: the
Python between layers, eager ops); two layer counts give each part's cost per layer, which is
extrapolated to `--layers`. With a cache of `--cache-slots` slots (a chat's max_length, 2048), the same
steps are also timed covering every slot of the cache, as the engine's steps did before they covered only
the slots in use (alternating, so that both see the same machine).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# The weights below in transparent huge pages, as glm6b's loader puts a checkpoint's (a PyTorch switch,
# read at the first CPU allocation): with 4 KiB pages the int4 / int8 linears read 5-25 % slower.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.compare_chatglm_cpp import memory_read_rate  # noqa: E402
from glm6b.quant import cpu_kernels  # noqa: E402
from glm6b.quant import linear as quant_linear  # noqa: E402

LAYER_SHAPES = [(12288, 4096), (4096, 4096), (16384, 4096), (4096, 16384)]  # [out, in]
LM_HEAD = (130528, 4096)


def int8pack(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """PyTorch's weight-only int8 product with THUDM's weight and row scales (int8 only)."""
    return torch.ops.aten._weight_int8pack_mm(x, weight, scale.to(x.dtype))


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def thudm_weight(out_f: int, in_f: int, bits: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random bytes in THUDM's layout (int8 [out, in] or packed int4 [out, in / 2]) and float16 row scales."""
    g = torch.Generator().manual_seed(seed)
    cols = in_f // 2 if bits == 4 else in_f
    weight = torch.randint(-128, 128, (out_f, cols), generator=g, dtype=torch.int8)
    return weight, (torch.rand(out_f, generator=g) * 0.01 + 0.001).half()


def layer_linears(make_weight, multiply, weight_bytes, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """(seconds, bytes read) of one layer's four linears (LAYER_SHAPES) at one row: each shape timed with two
    copies of its weight, `make_weight(out, in, seed)`, taken in turns so that every call reads its weight from
    memory and not from the cache; `multiply(x[:, :in], weight)` runs the product."""
    total_s = total_b = 0.0
    for out_f, in_f in LAYER_SHAPES:
        copies = [make_weight(out_f, in_f, seed) for seed in (0, 1)]
        turn = [0]

        def call(copies=copies, turn=turn, in_f=in_f):
            turn[0] += 1
            multiply(x[:, :in_f], copies[turn[0] % 2])

        total_s += median_seconds(call, repeats)
        total_b += weight_bytes(copies[0])
        del copies
    return total_s, total_b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--step-layers", type=int, nargs=2, default=[2, 6], metavar=("FEW", "MORE"),
                        help="layer counts of the two models whose whole decode steps are profiled (0 0: skip)")
    parser.add_argument("--only-step", action="store_true", help="profile the whole decode steps only")
    parser.add_argument("--cache-slots", type=int, default=2048,
                        help="slots of the cache in the slots-in-use comparison (0: skip it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not cpu_kernels.available():
        raise SystemExit("glm6b's CPU kernels are not available here")
    x = torch.randn(1, 16384).to(torch.bfloat16)

    read = memory_read_rate(torch)
    print(f"kernels: {cpu_kernels.isa()}, {args.threads} threads; memory read {read / 1e9:.1f} GB/s\n")
    if args.only_step:
        step_table(args)
        return
    print("| part of one decode token (batch 1, bfloat16 activations) | ms | GB read | GB/s | % of read rate |")
    print("|---|---:|---:|---:|---:|")

    def row(name: str, seconds: float, nbytes: float) -> None:
        print(f"| {name} | {1000 * seconds:.1f} | {nbytes / 1e9:.3f} | {nbytes / seconds / 1e9:.1f} | "
              f"{100 * nbytes / seconds / read:.0f} % |", flush=True)

    # glm6b's kernel (what decoding runs without AMX, glm6b.quant.linear.KERNELS: on the AVX2 build int4 takes
    # 16-bit activations), there also the float32 products int4 took before them and the opt-in
    # int8-activation kernel, which unpacks less, and for int8 on the AVX-512 build PyTorch's weight-only op,
    # which decoding ran there before glm6b's int8 dot products beat it.
    kernels = [("", decode_kernel)]
    if cpu_kernels.isa() == "avx2":
        kernels.append((", float32 products (GLM6B_INT16_ACTIVATIONS=0)", cpu_kernels.quantized_matmul))
        kernels.append((", int8 activations (opt-in)", cpu_kernels.quantized_matmul_int8_activations))
    if cpu_kernels.isa() == "avx512bf16":
        kernels.append((", PyTorch's _weight_int8pack_mm", int8pack))
    for bits in (4, 8):
        for label, kernel in kernels:
            if (kernel is int8pack and bits != 8) or ("float32 products" in label and bits != 4):
                continue
            total_s, total_b = layer_linears(
                lambda out_f, in_f, seed, bits=bits: thudm_weight(out_f, in_f, bits, seed),
                lambda xs, weight, bits=bits, kernel=kernel: kernel(xs, *weight, bits),
                lambda weight: weight[0].numel() + 2 * weight[0].shape[0], x, args.repeats)
            row(f"int{bits}{label}: the 4 linears x {args.layers} layers", total_s * args.layers,
                total_b * args.layers)
            # The same kernel with a 16 MiB weight, which stays in the last-level cache (32 MiB on a Zen 3 / Zen 4):
            # unpack + scale + dot products (and the call's overhead) without waiting for memory.
            w, s = thudm_weight(4096 if bits == 8 else 8192, 4096, bits, 2)
            seconds = median_seconds(lambda w=w, s=s, bits=bits, kernel=kernel: kernel(x[:, :4096], w, s, bits),
                                     args.repeats * 5)
            row(f"int{bits}{label}: same kernel, 16 MiB weight in cache (no memory wait)", seconds,
                w.numel() + 2 * w.shape[0])

    # A bfloat16 model's linears (glm6b.quant.linear.BF16DecodeLinear decodes them with glm6b's bf16 dot products).
    def bf16_weight(out_f: int, in_f: int, seed: int) -> torch.Tensor:
        return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)

    total_s, total_b = layer_linears(bf16_weight, cpu_kernels.bf16_matmul, lambda weight: weight.numel() * 2, x,
                                     args.repeats)
    row(f"bfloat16 (bf16 models), glm6b bf16 dot products: the 4 linears x {args.layers} layers",
        total_s * args.layers, total_b * args.layers)
    weight = torch.randn(*LM_HEAD).to(torch.bfloat16)
    seconds = median_seconds(lambda weight=weight: cpu_kernels.bf16_matmul(x[:, :4096], weight), max(5, args.repeats // 2))
    row("lm_head bfloat16 (int4 / int8), glm6b bf16 dot products", seconds, weight.numel() * 2)
    del weight
    for bits in (4, 8):
        w, s = thudm_weight(*LM_HEAD, bits, 3)
        seconds = median_seconds(lambda w=w, s=s, bits=bits: decode_kernel(x[:, :4096], w, s, bits),
                                 max(5, args.repeats // 2))
        row(f"lm_head int{bits} (int{bits}-qe)", seconds, w.numel() + 2 * w.shape[0])
        if bits == 8 and cpu_kernels.isa() == "avx512bf16":
            seconds = median_seconds(lambda w=w, s=s: int8pack(x[:, :4096], w, s, 8), max(5, args.repeats // 2))
            row("lm_head int8 (int8-qe), PyTorch's _weight_int8pack_mm", seconds,
                w.numel() + 2 * w.shape[0])
        del w, s
    if min(args.step_layers) > 0:
        step_table(args)


def decode_kernel(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The product a decode step's quantized linear runs here for bfloat16 rows (glm6b.quant.linear.KERNELS)."""
    if quant_linear.kernel_path(x.device, x.dtype, bits, x.shape[1]) == "glm6b_avx2_int16_activations":
        return cpu_kernels.quantized_matmul_int16_activations(x, weight, scale)
    return cpu_kernels.quantized_matmul(x, weight, scale, bits)


# The parts of a profiled decode step, by the profiler's event names (self time: an event's own time, not its
# children's). The compiled graph's kernels are named graph_<n>_cpp_fused_<the ops they fuse>.
STEP_PARTS = [
    ("linears (glm6b::quantized_matmul*)", lambda name: name.startswith("glm6b::quantized_matmul")),
    ("lm_head (glm6b::bf16_matmul)", lambda name: name == "glm6b::bf16_matmul"),
    ("attention (compiled kernels with the softmax)", lambda name: "cpp_fused" in name and "softmax" in name),
    ("other compiled kernels (norms, rotary, GELU, residuals, cache writes)", lambda name: "cpp_fused" in name),
    ("compiled graph's wrapper code", lambda name: name.startswith("## Call CompiledFxGraph")),
    ("Dynamo's guard checks", lambda name: name == "TorchDynamo Cache Lookup"),
]


def int4_model_and_prompt(layers: int):
    """A glm_6b-shape int4 model of `layers` layers (random weights) and a 100-token prompt's (ids, mask, positions)."""
    from benchmarks.speculative import build_model
    from glm6b.model import build_mask_and_positions

    model = build_model("int4", layers)
    config = model.config
    ids = torch.randint(6, 20000, (1, 98), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([ids, torch.tensor([[config.gmask_token_id, config.bos_token_id]])], dim=1)
    return model, (ids, *build_mask_and_positions(ids, config, torch.ones_like(ids)))


@torch.inference_mode()
def profile_steps(layers: int, steps: int) -> tuple[float, dict[str, float]]:
    """(median seconds of an unprofiled decode step, {part: seconds per step}) for a glm_6b-shape int4 model of
    `layers` layers after a 100-token prompt; "the rest" is the profiled steps' wall time minus their parts."""
    import torch._inductor.config as inductor_config
    from torch.profiler import ProfilerActivity, profile

    from glm6b.inference.engine import DecodeEngine

    inductor_config.cpp.enable_kernel_profile = True  # the compiled kernels as profiler events of their own
    model, prompt = int4_model_and_prompt(layers)
    engine = DecodeEngine(model, 1, prompt[0].shape[1] + 3 * steps + 8)
    token = engine.prefill(*prompt).argmax(-1)
    for _ in range(3):  # compiles
        token = engine.decode(token).argmax(-1)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        token = engine.decode(token).argmax(-1)
        times.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            token = engine.decode(token).argmax(-1)
        profiled = (time.perf_counter() - start) / steps
    parts = dict.fromkeys([name for name, _ in STEP_PARTS], 0.0)
    for event in prof.key_averages():
        for name, matches in STEP_PARTS:
            if matches(event.key):
                parts[name] += event.self_cpu_time_total / 1e6 / steps
                break
    # The rest from the same profiled steps (the machine's memory speed moves within minutes here).
    parts["the rest (Python between layers, eager ops)"] = profiled - sum(parts.values())
    parts["whole step, profiled"] = profiled
    del model, engine
    torch._dynamo.reset()
    return sorted(times)[len(times) // 2], parts


def step_table(args) -> None:
    few, more = args.step_layers
    (step_few, parts_few), (step_more, parts_more) = (profile_steps(n, args.repeats) for n in (few, more))
    rest = "the rest (Python between layers, eager ops)"
    print(f"\nA whole int4 decode step (batch 1, 100-token prompt, random weights), profiled with {few} and {more} "
          f"glm_6b layers. Per layer: the {more}-layer model's time / {more} for the parts that run once per layer "
          f"(the lm_head runs once per step), the difference / {more - few} for the rest; at {args.layers} layers: "
          f"those per-layer costs x {args.layers} plus the lm_head and the rest's constant part\n")
    print(f"| part of a decode step | ms, {few} layers | ms, {more} layers | ms per layer | ms at {args.layers} layers |")
    print("|---|---:|---:|---:|---:|")
    total = 0.0
    for name, _ in STEP_PARTS:
        a, b = parts_few[name], parts_more[name]
        if name.startswith("lm_head"):
            per_layer, at_layers = None, (a + b) / 2
        else:
            per_layer = b / more
            at_layers = per_layer * args.layers
        total += at_layers
        per = "" if per_layer is None else f"{1000 * per_layer:.3f}"
        print(f"| {name} | {1000 * a:.2f} | {1000 * b:.2f} | {per} | {1000 * at_layers:.1f} |")
    a, b = parts_few[rest], parts_more[rest]
    per_layer = (b - a) / (more - few)
    at_layers = a + per_layer * (args.layers - few)
    total += at_layers
    print(f"| {rest} | {1000 * a:.2f} | {1000 * b:.2f} | {1000 * per_layer:.3f} | {1000 * at_layers:.1f} |")
    print(f"| whole step, profiled | {1000 * parts_few['whole step, profiled']:.2f} | "
          f"{1000 * parts_more['whole step, profiled']:.2f} | | {1000 * total:.1f} |")
    print(f"| whole step, not profiled (median) | {1000 * step_few:.2f} | {1000 * step_more:.2f} | | |", flush=True)
    if args.cache_slots:
        slots_table(args, more)


@torch.inference_mode()
def slots_table(args, layers: int) -> None:
    """Decode steps after a 100-token prompt in a cache of `args.cache_slots` slots, covering the slots in use
    (the engine's default on the CPU) or every slot (explicitly), in turns; per layer and at `args.layers`."""
    from glm6b.inference.engine import DecodeEngine

    model, prompt = int4_model_and_prompt(layers)
    engines = {name: DecodeEngine(model, 1, args.cache_slots) for name in ("in use", "all")}
    covered = {"in use": None, "all": args.cache_slots}
    tokens = {name: engine.prefill(*prompt).argmax(-1) for name, engine in engines.items()}
    times = {name: [] for name in engines}
    for step in range(3 + 2 * args.repeats):
        for name, engine in engines.items():
            start = time.perf_counter()
            tokens[name] = engine.decode(tokens[name], slots=covered[name]).argmax(-1)
            if step >= 3:  # the first ones compile
                times[name].append(time.perf_counter() - start)
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    per_layer = (median["all"] - median["in use"]) / layers
    print(f"\nThe same steps ({layers} layers) in a cache of {args.cache_slots} slots per row, 100-{100 + 3 + 2 * args.repeats} "
          f"filled, alternating: every slot covered (the engine's steps before) against the slots in use\n")
    print(f"| steps cover | ms a step, {layers} layers | saved per layer ms | saved at {args.layers} layers ms |")
    print("|---|---:|---:|---:|")
    print(f"| all {args.cache_slots} slots | {1000 * median['all']:.1f} | | |")
    print(f"| the slots in use | {1000 * median['in use']:.1f} | {1000 * per_layer:.3f} | {1000 * per_layer * args.layers:.1f} |",
          flush=True)
    del model, engines
    torch._dynamo.reset()


if __name__ == "__main__":
    main()
