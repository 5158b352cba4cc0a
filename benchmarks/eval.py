"""Evaluation throughput: examples/s of batched greedy generation at batch sizes 1, 4 and 16.

Runs on a random-weight model small enough for a laptop CPU (the "tiny" preset widened a little, so
that a step is not all Python overhead) with the golden test tokenizer, over a synthetic ADGEN-style
dev set made here. It also checks that every batch size gives the same predictions as batch size 1.

    python benchmarks/eval.py                       # defaults below
    python benchmarks/eval.py --threads 1               # on a busy shared CPU
    python benchmarks/eval.py --examples 64 --max-new-tokens 64 --batch-sizes 1 8 32 --device cuda

The model's vocab_size is set to the tokenizer's size (1144), so no padding rows exist and every
random prompt runs for the full --max-new-tokens (a random model almost never produces <eop>).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from glm6b.config import ChatGLMConfig
from glm6b.eval.evaluate import generate_predictions
from glm6b.model import ChatGLMForConditionalGeneration
from glm6b.tokenizer import load_tokenizer

TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "golden"

# ADGEN "content" keys and values: prompts look like 类型#裙*颜色#黑色*风格#复古.
ATTRIBUTES = {
    "类型": ["裙", "上衣", "裤"],
    "颜色": ["黑色", "白色", "蓝色"],
    "风格": ["复古", "清新", "休闲", "简约"],
    "材质": ["雪纺", "棉", "牛仔"],
    "版型": ["宽松", "修身", "直筒"],
    "图案": ["碎花", "条纹", "纯色"],
}
PHRASES = ["这款连衣裙", "采用雪纺面料", "宽松的版型", "穿着舒适", "清新的风格", "很适合夏天", "黑色卫衣百搭又耐脏",
           "显瘦又显高"]


def synthetic_adgen(count: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """`count` (prompt, reference) pairs in the ADGEN style, of varied lengths."""
    rng = random.Random(seed)
    prompts, references = [], []
    for _ in range(count):
        keys = rng.sample(list(ATTRIBUTES), rng.randint(2, len(ATTRIBUTES)))
        prompts.append("*".join(f"{key}#{rng.choice(ATTRIBUTES[key])}" for key in keys))
        references.append("，".join(rng.sample(PHRASES, rng.randint(2, 5))) + "。")
    return prompts, references


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-source-length", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    tokenizer = load_tokenizer(TOKENIZER)
    config = ChatGLMConfig.from_name("tiny", vocab_size=len(tokenizer), hidden_size=args.hidden_size,
                                     num_layers=args.num_layers, num_attention_heads=args.hidden_size // 32,
                                     inner_hidden_size=4 * args.hidden_size)
    torch.manual_seed(0)
    model = ChatGLMForConditionalGeneration(config, dtype=torch.float32, device=args.device)
    model.init_weights(std=0.05)
    model.eval()
    prompts, _ = synthetic_adgen(args.examples)
    settings = dict(max_source_length=args.max_source_length, max_new_tokens=args.max_new_tokens, progress=False)
    generate_predictions(model, tokenizer, prompts[:4], batch_size=4, **settings)  # warm-up

    print(f"model: hidden {config.hidden_size}, {config.num_layers} layers, {model.num_parameters() / 1e6:.1f}M "
          f"parameters, {args.device}, {torch.get_num_threads()} threads; {args.examples} prompts, greedy, "
          f"{args.max_new_tokens} new tokens each")
    print(f"{'batch':>5}  {'seconds':>8}  {'examples/s':>10}  {'tokens/s':>9}  {'speed-up':>8}  same as batch 1")
    baseline, first_speed = None, None
    for batch_size in args.batch_sizes:
        start = time.perf_counter()
        predictions, stats = generate_predictions(model, tokenizer, prompts, batch_size=batch_size, **settings)
        seconds = time.perf_counter() - start
        speed = len(prompts) / seconds
        baseline = predictions if baseline is None else baseline
        first_speed = speed if first_speed is None else first_speed
        same = "yes" if predictions == baseline else "NO"
        print(f"{batch_size:>5}  {seconds:>8.2f}  {speed:>10.2f}  {stats['generated_tokens'] / seconds:>9.1f}  "
              f"{speed / first_speed:>7.1f}x  {same}")


if __name__ == "__main__":
    main()
