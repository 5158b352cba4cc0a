"""Generation speed through the decode engine: prefill and decode tokens/s, weight GB/s, compile times.

    python benchmarks/generate.py                                        # tiny preset, float32, CPU
    python benchmarks/generate.py --preset small --dtype bfloat16
    python benchmarks/generate.py --preset glm_6b --layers 2 --dtype bfloat16 --batch-sizes 1
    python benchmarks/generate.py --preset glm_6b --device cuda          # the real 6.2B shape, bfloat16
    python benchmarks/generate.py --preset glm_6b --layers 4 --batch-sizes 1 --quantize int4  # int4 weights

The model is built on the meta device, materialised with `to_empty` and filled by `init_weights()`;
prompts are random ids ending with [gMASK] <sop>, so no checkpoint or tokenizer is needed. Each
mode (eager, compiled) runs the engine exactly as `generate` does (chunked prefill into the static
cache, then one-token decode steps) but never stops early on <eop>. Printed:

* compile times of the decode step: cold (a fresh inductor cache directory) and warm (after
  torch._dynamo.reset(), the same graph compiled again from the on-disk caches, as a second
  process would);
* per batch size and mode: prefill tokens/s, decode tokens/s, ms per decode step, and the decode
  step's weight traffic (bytes of all parameters read once per step / step time, GB/s);
* the prefill's share of the machine's GEMM throughput measured in the same run: a [C, H] x [H, 4H]
  matmul in the model dtype (C = prefill chunk), timed right before each timed prefill (so that a
  change in the machine's load hits both), against the prefill's matmul FLOPs per second; the
  median of the per-run ratios is shown;
* `--matrix`: one 16384 x 4096 matrix times a vector, plain F.linear vs compiled with inductor
  freezing (prepacked weights), in GB/s; the bf16 decode step itself runs its one-row products on
  glm6b's kernel (glm6b.quant.linear.BF16DecodeLinear), eager or compiled.

Warm-up runs are excluded; on CUDA the device is synchronised before each timer read.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

# A fresh inductor cache directory, so that the first compile below is really cold.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="glm6b-inductor-"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from glm6b.config import ChatGLMConfig  # noqa: E402
from glm6b.inference.engine import DecodeEngine, prompt_inputs, weight_bytes  # noqa: E402
from glm6b.model import ChatGLMForConditionalGeneration  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_model(preset: str, dtype: torch.dtype, device: torch.device, layers: int | None = None):
    """A model of a named preset (optionally with fewer layers) with random weights on `device`."""
    config = ChatGLMConfig.from_name(preset, **({"num_layers": layers} if layers else {}))
    model = ChatGLMForConditionalGeneration(config, dtype=dtype, device="meta")
    model.to_empty(device=device)
    model.tie_weights()  # to_empty gives the tied lm_head its own storage; share it again
    model.init_weights(generator=torch.Generator(device=device).manual_seed(0))
    return model.eval()


def random_prompts(config: ChatGLMConfig, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """[batch, length] ids: random ordinary tokens, then [gMASK] <sop>."""
    body = torch.randint(6, config.mask_token_id, (batch, length - 2), device=device)
    tail = torch.tensor([config.gmask_token_id, config.bos_token_id], device=device).expand(batch, 2)
    return torch.cat([body, tail], dim=1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_generation(engine: DecodeEngine, input_ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) for greedy generation of `new_tokens` tokens."""
    device = input_ids.device
    mask, positions = prompt_inputs(engine.model, input_ids)
    sync(device)
    start = time.perf_counter()
    next_tokens = engine.prefill(input_ids, mask, positions).argmax(dim=-1)
    sync(device)
    prefilled = time.perf_counter()
    for _ in range(new_tokens - 1):
        next_tokens = engine.decode(next_tokens).argmax(dim=-1)
    sync(device)
    return prefilled - start, time.perf_counter() - prefilled


@torch.inference_mode()
def compile_times(model, input_ids: torch.Tensor, slots: int) -> tuple[float, float]:
    """(cold, warm) seconds of the first compiled decode call, each minus one warm step's time."""
    times = []
    for _ in range(2):
        torch._dynamo.reset()
        engine = DecodeEngine(model, input_ids.shape[0], slots, compile=True)
        tokens = engine.prefill(input_ids, *prompt_inputs(model, input_ids)).argmax(dim=-1)
        sync(input_ids.device)
        start = time.perf_counter()
        tokens = engine.decode(tokens).argmax(dim=-1)
        sync(input_ids.device)
        first = time.perf_counter() - start
        start = time.perf_counter()
        engine.decode(tokens)
        sync(input_ids.device)
        times.append(first - (time.perf_counter() - start))
    return times[0], times[1]


@torch.inference_mode()
def gemm_flops_per_second(a: torch.Tensor, w: torch.Tensor, repeats: int = 3) -> float:
    """Throughput of F.linear(a, w) (the MLP's first product at prefill-chunk size), FLOP/s."""
    sync(a.device)
    start = time.perf_counter()
    for _ in range(repeats):
        F.linear(a, w)
    sync(a.device)
    return 2 * a.shape[0] * a.shape[1] * w.shape[0] * repeats / (time.perf_counter() - start)


def prefill_flops(config: ChatGLMConfig, batch: int, length: int) -> float:
    """Matmul FLOPs of a prefill: the four linears of every layer per token, attention scores and
    values over the prompt, and the LM head for the last token only."""
    h, inner, layers = config.hidden_size, config.inner_hidden_size, config.num_layers
    linears = 2 * (h * 3 * h + h * h + 2 * h * inner)
    attention = 2 * 2 * length * h  # q k^T and p v, per token
    return batch * (layers * length * (linears + attention) + 2 * h * config.vocab_size)


@torch.inference_mode()
def matrix_check(dtype: torch.dtype, repeats: int) -> None:
    """One 16384 x 4096 weight times a vector: F.linear vs compiled with inductor freezing, GB/s."""
    from torch._inductor import config as inductor_config

    linear = torch.nn.Linear(4096, 16384, bias=False, dtype=dtype).eval()
    x = torch.randn(1, 4096, dtype=dtype)
    with inductor_config.patch(freezing=True):
        frozen = torch.compile(linear, fullgraph=True, dynamic=False)
        frozen(x)

    def gbps(fn) -> float:
        for _ in range(3):
            fn(x)
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(10):
                fn(x)
            runs.append((time.perf_counter() - start) / 10)
        return linear.weight.numel() * linear.weight.element_size() / statistics.median(runs) / 1e9

    plain = gbps(lambda v: F.linear(v, linear.weight))
    packed = gbps(frozen)
    print(f"\none 16384x4096 {dtype} matrix x vector: F.linear {plain:.1f} GB/s, "
          f"compiled with freezing (prepacked) {packed:.1f} GB/s\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="ChatGLMConfig preset (tiny, small, glm_6b_4layers, glm_6b)")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's number of layers")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="default: bfloat16 for glm_6b or on CUDA, float32 otherwise")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--modes", nargs="+", choices=("eager", "compiled"), default=["eager", "compiled"])
    parser.add_argument("--prefill-chunk-size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row (the median is shown)")
    parser.add_argument("--matrix", action="store_true", help="also time one 16384x4096 matrix (see above)")
    parser.add_argument("--quantize", choices=("int8", "int4"), default=None,
                        help="weight-only quantize the blocks' linear layers (glm6b.quant, THUDM's layout)")
    args = parser.parse_args()
    if args.new_tokens < 2 or args.prompt_length < 3:
        parser.error("--new-tokens must be >= 2 and --prompt-length >= 3")

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.dtype is None:
        dtype = torch.bfloat16 if args.preset == "glm_6b" or device.type == "cuda" else torch.float32
    else:
        dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    model = build_model(args.preset, dtype, device, args.layers)
    if args.quantize:
        from glm6b.quant.linear import prepare_kernels, quantize_model

        quantize_model(model, 4 if args.quantize == "int4" else 8)
        prepare_kernels(model)  # whatever a kernel builds at its first forward, done before anything is timed
    config = model.config
    model_bytes = weight_bytes(model)
    slots = args.prompt_length + args.new_tokens
    print(f"preset {args.preset} ({config.num_layers} layers, hidden {config.hidden_size}): "
          f"{model.num_parameters() / 1e6:.1f}M parameters ({model_bytes / 1e9:.2f} GB), {dtype}"
          f"{' weights ' + args.quantize if args.quantize else ''}, {device}, "
          f"{torch.get_num_threads()} CPU threads; prompt {args.prompt_length} tokens, {args.new_tokens} new tokens, "
          f"prefill chunk {args.prefill_chunk_size}, median of {args.repeats} runs")

    if args.matrix:
        matrix_check(dtype, args.repeats)
    if "compiled" in args.modes:
        ids = random_prompts(config, args.batch_sizes[0], args.prompt_length, device)
        cold, warm = compile_times(model, ids, slots)
        print(f"decode step compile (batch {args.batch_sizes[0]}): cold {cold:.1f} s, warm {warm:.1f} s\n")

    chunk = min(args.prefill_chunk_size, args.prompt_length)
    gemm_a = torch.randn(chunk, config.hidden_size, dtype=dtype, device=device)
    gemm_w = torch.randn(config.inner_hidden_size, config.hidden_size, dtype=dtype, device=device)
    gemm_flops_per_second(gemm_a, gemm_w, repeats=1)  # warm-up
    header = ("| batch | mode | prefill tok/s | GEMM GFLOP/s | prefill / GEMM | decode tok/s | ms/step | weights GB/s |")
    print(f"GEMM: [{chunk}, {config.hidden_size}] x [{config.hidden_size}, {config.inner_hidden_size}] in {dtype}\n")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for batch in args.batch_sizes:
        input_ids = random_prompts(config, batch, args.prompt_length, device)
        for mode in args.modes:
            engine = DecodeEngine(model, batch, slots, compile=mode == "compiled",
                                  prefill_chunk_size=args.prefill_chunk_size)
            time_generation(engine, input_ids, min(args.new_tokens, 4))  # warm-up (and compile), not timed
            gemms, runs = [], []
            for _ in range(args.repeats):
                gemms.append(gemm_flops_per_second(gemm_a, gemm_w))
                runs.append(time_generation(engine, input_ids, args.new_tokens))
            prefill = statistics.median(r[0] for r in runs)
            decode = statistics.median(r[1] for r in runs)
            flops = prefill_flops(config, batch, args.prompt_length)
            share = statistics.median(flops / r[0] / g for r, g in zip(runs, gemms))
            steps = args.new_tokens - 1
            print(f"| {batch} | {mode} | {batch * args.prompt_length / prefill:,.0f} | "
                  f"{statistics.median(gemms) / 1e9:,.1f} | {100 * share:.0f} % | {batch * steps / decode:,.1f} | "
                  f"{1000 * decode / steps:.2f} | {model_bytes / (decode / steps) / 1e9:.1f} |", flush=True)


if __name__ == "__main__":
    main()
