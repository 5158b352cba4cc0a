"""Generation speed of a model preset with random weights: prefill and decode tokens/s, ms/token, peak memory.

    python benchmarks/generate.py                                  # tiny preset, float32, CPU
    python benchmarks/generate.py --preset small
    python benchmarks/generate.py --preset glm_6b --device cuda    # the real 6.2B shape, bfloat16

The model is built on the meta device, materialised with `to_empty` (no second copy of the
weights) and filled by `init_weights()`; prompts are random token ids ending with [gMASK] <sop>, so
no checkpoint or tokenizer is needed. Timing follows glm6b.inference.generation.generate_steps exactly
(prefill with the KV cache, then one-token decode steps with the carried positions) but never
stops early on <eop>, so every run decodes the requested number of tokens. A warm-up run is
excluded; on CUDA the device is synchronised before each timer read. Peak RSS is the process's
peak so far (it includes the smaller batch sizes run before).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from glm6b.config import ChatGLMConfig
from glm6b.model import ChatGLMForConditionalGeneration, KVCache, build_mask_and_positions

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_model(preset: str, dtype: torch.dtype, device: torch.device) -> ChatGLMForConditionalGeneration:
    """A model of a named preset with random weights, allocated once on `device`."""
    config = ChatGLMConfig.from_name(preset)
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
def time_generation(model, input_ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) for greedy generation of `new_tokens` tokens."""
    config, device = model.config, input_ids.device
    batch, length = input_ids.shape
    sync(device)
    start = time.perf_counter()
    mask, positions = build_mask_and_positions(input_ids, config)
    cache = KVCache(config, batch, length + new_tokens, model.dtype, device)
    logits = model(input_ids, position_ids=positions, attention_mask=mask, kv_cache=cache,
                   last_token_only=True).logits[:, -1]
    next_tokens = logits.argmax(dim=-1)
    sync(device)
    prefilled = time.perf_counter()
    position = positions[:, :, -1:]
    step = torch.tensor([0, 1], device=device)[None, :, None]  # block position counts on
    for _ in range(new_tokens - 1):
        position = position + step
        logits = model(next_tokens[:, None], position_ids=position, kv_cache=cache).logits[:, -1]
        next_tokens = logits.argmax(dim=-1)
    sync(device)
    return prefilled - start, time.perf_counter() - prefilled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="ChatGLMConfig preset (tiny, small, glm_6b_4layers, glm_6b)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="default: bfloat16 for glm_6b or on CUDA, float32 otherwise")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per batch size (the median is shown)")
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
    model = build_model(args.preset, dtype, device)
    print(f"preset {args.preset}: {model.num_parameters() / 1e6:.1f}M parameters, {dtype}, {device}, "
          f"{torch.get_num_threads()} CPU threads; prompt {args.prompt_length} tokens, {args.new_tokens} new tokens, "
          f"median of {args.repeats} runs\n")

    header = "| batch | prefill tok/s | decode tok/s | ms/token (decode step) | peak RSS MiB |"
    if device.type == "cuda":
        header += " peak GPU MiB |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for batch in args.batch_sizes:
        input_ids = random_prompts(model.config, batch, args.prompt_length, device)
        time_generation(model, input_ids, min(args.new_tokens, 4))  # warm-up, not timed
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        runs = [time_generation(model, input_ids, args.new_tokens) for _ in range(args.repeats)]
        prefill = statistics.median(r[0] for r in runs)
        decode = statistics.median(r[1] for r in runs)
        steps = args.new_tokens - 1
        row = (f"| {batch} | {batch * args.prompt_length / prefill:,.0f} | {batch * steps / decode:,.1f} | "
               f"{1000 * decode / steps:.2f} | {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} |")
        if device.type == "cuda":
            row += f" {torch.cuda.max_memory_allocated(device) / 2**20:,.0f} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
