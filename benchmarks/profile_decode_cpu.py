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
the Python / compiled-graph code between layers) is the step time of benchmarks/compare_chatglm_cpp.py
minus that sum.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not cpu_kernels.available():
        raise SystemExit("glm6b's CPU kernels are not available here")
    x = torch.randn(1, 16384).to(torch.bfloat16)

    read = memory_read_rate(torch)
    print(f"kernels: {cpu_kernels.isa()}, {args.threads} threads; memory read {read / 1e9:.1f} GB/s\n")
    print("| part of one decode token (batch 1, bfloat16 activations) | ms | GB read | GB/s | % of read rate |")
    print("|---|---:|---:|---:|---:|")

    def row(name: str, seconds: float, nbytes: float) -> None:
        print(f"| {name} | {1000 * seconds:.1f} | {nbytes / 1e9:.3f} | {nbytes / seconds / 1e9:.1f} | "
              f"{100 * nbytes / seconds / read:.0f} % |", flush=True)

    # glm6b's kernel (what decoding runs without AMX, glm6b.quant.linear.KERNELS), the opt-in
    # int8-activation one (AVX2 build), which unpacks less, and for int8 on the AVX-512 build PyTorch's
    # weight-only op, which decoding ran there before glm6b's int8 dot products beat it.
    kernels = [("", cpu_kernels.quantized_matmul)]
    if cpu_kernels.isa() == "avx2":
        kernels.append((", int8 activations (opt-in)", cpu_kernels.quantized_matmul_int8_activations))
    if cpu_kernels.isa() == "avx512bf16":
        kernels.append((", PyTorch's _weight_int8pack_mm", int8pack))
    for bits in (4, 8):
        for label, kernel in kernels:
            if kernel is int8pack and bits != 8:
                continue
            total_s = total_b = 0.0
            for out_f, in_f in LAYER_SHAPES:
                copies = [thudm_weight(out_f, in_f, bits, seed) for seed in (0, 1)]
                turn = [0]

                def call(copies=copies, turn=turn, in_f=in_f, bits=bits, kernel=kernel):
                    w, s = copies[turn[0] % 2]
                    turn[0] += 1
                    kernel(x[:, :in_f], w, s, bits)

                seconds = median_seconds(call, args.repeats)
                nbytes = copies[0][0].numel() + 2 * out_f
                total_s += seconds
                total_b += nbytes
                del copies
            row(f"int{bits}{label}: the 4 linears x {args.layers} layers", total_s * args.layers,
                total_b * args.layers)
            # The same kernel with a 16 MiB weight, which stays in the last-level cache (32 MiB on a Zen 3 / Zen 4):
            # unpack + scale + dot products (and the call's overhead) without waiting for memory.
            w, s = thudm_weight(4096 if bits == 8 else 8192, 4096, bits, 2)
            seconds = median_seconds(lambda w=w, s=s, bits=bits, kernel=kernel: kernel(x[:, :4096], w, s, bits),
                                     args.repeats * 5)
            row(f"int{bits}{label}: same kernel, 16 MiB weight in cache (no memory wait)", seconds,
                w.numel() + 2 * w.shape[0])

    weight = torch.randn(*LM_HEAD).to(torch.bfloat16)
    seconds = median_seconds(lambda weight=weight: cpu_kernels.bf16_matmul(x[:, :4096], weight), max(5, args.repeats // 2))
    row("lm_head bfloat16 (int4 / int8), glm6b bf16 dot products", seconds, weight.numel() * 2)
    del weight
    for bits in (4, 8):
        w, s = thudm_weight(*LM_HEAD, bits, 3)
        seconds = median_seconds(lambda w=w, s=s, bits=bits: cpu_kernels.quantized_matmul(x[:, :4096], w, s, bits),
                                 max(5, args.repeats // 2))
        row(f"lm_head int{bits} (int{bits}-qe)", seconds, w.numel() + 2 * w.shape[0])
        if bits == 8 and cpu_kernels.isa() == "avx512bf16":
            seconds = median_seconds(lambda w=w, s=s: int8pack(x[:, :4096], w, s, 8), max(5, args.repeats // 2))
            row("lm_head int8 (int8-qe), PyTorch's _weight_int8pack_mm", seconds,
                w.numel() + 2 * w.shape[0])
        del w, s


if __name__ == "__main__":
    main()
