"""Load test of `glm6b serve`: N concurrent streaming clients, continuous batching vs one request at a time.

    python benchmarks/serve.py                                   # built-in default shape, random weights, CPU
    python benchmarks/serve.py --clients 32 --requests 96 --max-tokens 64
    python benchmarks/serve.py --model PATH                      # an existing model folder

A model folder with random weights is written to a temporary folder (the built-in default model's
config and tokenizer, `glm6b/assets/default`), unless --model is given. Then, for each server
setting, `glm6b serve` is started on 127.0.0.1 in a subprocess and `--clients` asyncio clients (the
official `openai` package, streamed chat completions with usage) send `--requests` requests in all,
each asking for exactly --max-tokens tokens of sampled text (a random-weight model almost never
samples <eop>; the table counts the tokens the server reports). Two settings are measured on the
same load: continuous batching (`--max-batch` = clients) and one request at a time
(`--max-batch 1`, the others wait in the queue). Time to first token is measured by the client,
from sending the request to the first streamed text, so it includes time spent waiting in the queue.
A warm-up request is sent to each server first and not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ["你好", "写一首关于秋天的诗", "What is the capital of France?", "介绍一下你自己", "1 + 1 = ?",
             "请用三句话介绍上海", "Tell me a story about a cat.", "推荐几本好书"]


def write_random_model(folder: Path) -> Path:
    """The built-in default model's shape with random weights, saved as an HF folder with its tokenizer."""
    import torch

    from glm6b.api import ChatGLM
    from glm6b.checkpoint.hf import save_pretrained
    from glm6b.config import ChatGLMConfig
    from glm6b.tokenizer import load_tokenizer

    default = ROOT / "glm6b" / "assets" / "default"
    config = ChatGLMConfig.from_json_file(default / "config.json")
    model = ChatGLM(config, dtype=torch.float32)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    save_pretrained(model, folder, tokenizer=load_tokenizer(default))
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`glm6b serve` in a subprocess on 127.0.0.1, stopped on exit."""

    def __init__(self, model: str, max_batch: int, max_queue: int, threads: int | None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "glm6b", "serve", "--model", model, "--port", str(self.port),
             "--max-batch", str(max_batch), "--max-queue", str(max_queue)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def __enter__(self):
        import httpx

        deadline = time.monotonic() + 180
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"glm6b serve exited: {self.process.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("glm6b serve did not become healthy within 180 s")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)

    def __exit__(self, *exc):
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def one_request(client, question: str, max_tokens: int, timeout: float) -> tuple[float | None, int, str | None]:
    """(time to first text, completion tokens, error) of one streamed chat completion."""
    start = time.perf_counter()
    first, tokens = None, 0
    try:
        stream = await asyncio.wait_for(client.chat.completions.create(
            model="glm6b", messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
            temperature=1.0, top_p=1.0, stream=True, stream_options={"include_usage": True}), timeout)
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return first, tokens, None
    except Exception as e:  # counted as an error in the table
        return first, tokens, f"{type(e).__name__}: {e}"


async def run_load(url: str, clients: int, requests: int, max_tokens: int, timeout: float) -> dict:
    """`clients` workers share `requests` requests; returns the table row."""
    import openai

    client = openai.AsyncOpenAI(api_key="unused", base_url=url + "/v1", max_retries=0, timeout=timeout)
    await one_request(client, QUESTIONS[0], 4, timeout)  # warm-up, not counted
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    results = []

    async def worker():
        while not queue.empty():
            i = queue.get_nowait()
            results.append(await one_request(client, QUESTIONS[i % len(QUESTIONS)], max_tokens, timeout))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - start
    await client.close()
    ttft = sorted(r[0] for r in results if r[0] is not None)
    errors = [r[2] for r in results if r[2] is not None]
    return {"requests": len(results), "wall": wall, "req_s": len(results) / wall,
            "tok_s": sum(r[1] for r in results) / wall, "tokens": sum(r[1] for r in results),
            "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99), "errors": len(errors),
            "first_error": errors[0] if errors else ""}


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1] if p < 100 else values[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: random weights, default shape)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent streaming clients")
    parser.add_argument("--requests", type=int, default=96, help="requests in all")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens asked per request")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the server (OMP_NUM_THREADS)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before a request counts as failed")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(write_random_model(Path(tmp) / "model"))
        rows = []
        for name, batch in (("continuous batching", args.clients), ("one at a time", 1)):
            with ServerProcess(model, max_batch=batch, max_queue=args.requests, threads=args.threads) as server:
                rows.append((name, batch, asyncio.run(run_load(server.url, args.clients, args.requests,
                                                               args.max_tokens, args.timeout))))

    print(f"\n{args.clients} concurrent streaming clients, {args.requests} requests of {args.max_tokens} tokens, "
          f"model {args.model or 'random weights, built-in default shape'}, {os.cpu_count()} CPUs\n")
    print("| server | max-batch | requests | errors | requests/s | tokens/s | TTFT p50 (s) | TTFT p99 (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, batch, r in rows:
        print(f"| {name} | {batch} | {r['requests']} | {r['errors']} | {r['req_s']:.2f} | {r['tok_s']:.1f} | "
              f"{r['ttft_p50']:.2f} | {r['ttft_p99']:.2f} |")
    speedup = rows[0][2]["tok_s"] / rows[1][2]["tok_s"] if rows[1][2]["tok_s"] else float("inf")
    print(f"\ntokens/s with continuous batching: {speedup:.1f}x the one-at-a-time server's")
    for name, _, r in rows:
        if r["errors"]:
            print(f"{name}: first error: {r['first_error']}")


if __name__ == "__main__":
    main()
