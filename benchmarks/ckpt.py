"""Reading a MindSpore .ckpt: peak memory and time of glm6b's streaming reader vs mindspore.load_checkpoint.

Writes a synthetic float16 checkpoint (one tensor larger than MindSpore's 512 MiB chunk, several
smaller ones), then reads it in a fresh process per reader and reports the process's peak resident
memory (VmHWM, mapped file pages included) above its resident memory just before reading (Linux only). glm6b's reader keeps nothing (each
tensor is dropped as a model loader drops it after copying); mindspore.load_checkpoint returns the
whole dict, as it always does.

    python benchmarks/ckpt.py                 # 1.6 GB file in /tmp
    python benchmarks/ckpt.py --gib 3 --dir /data --skip-mindspore
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _write(path: Path, gib: float) -> None:
    from glm6b.checkpoint.mindspore import save_ckpt

    big_rows = 96 * 1024  # 96Ki x 4096 float16 = 768 MiB: two chunks
    rest = max(0, int(gib * 2**30) - big_rows * 4096 * 2)
    small = 100 * 2**20  # 100 MiB tensors

    def entries():
        yield "transformer.word_embeddings.embedding_table", torch.ones(big_rows, 4096, dtype=torch.float16)
        for i in range(rest // small):
            yield f"transformer.layers.{i}.mlp.dense_h_to_4h.weight", torch.ones(small // 2, dtype=torch.float16)

    save_ckpt(path, entries())


def _status_mib(field: str) -> float:
    """A /proc/self/status memory field (VmRSS, VmHWM) in MiB; VmHWM starts afresh in a new process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _measure(reader: str, path: str) -> dict:
    """Run in a child process: baseline RSS, read, peak RSS."""
    if reader == "mindspore":
        import mindspore  # imported before the baseline: its own size is not the reader's

        def read():
            return len(mindspore.load_checkpoint(path))
    else:
        from glm6b.checkpoint.mindspore import iter_ckpt

        def read():
            count = 0
            for _, tensor in iter_ckpt(path):
                count += 1
                del tensor
            return count

    base = _status_mib("VmRSS")
    start = time.perf_counter()
    count = read()
    seconds = time.perf_counter() - start
    return {"entries": count, "seconds": seconds, "peak_above_baseline_mib": _status_mib("VmHWM") - base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.6, help="file size in GiB (at least 0.75)")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to write the file")
    parser.add_argument("--skip-mindspore", action="store_true", help="only glm6b's reader")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_measure(*args.child)))
        return
    path = Path(args.dir) / "bench_glm6b.ckpt"
    _write(path, args.gib)
    size_mib = path.stat().st_size / 2**20
    rows = []
    try:
        for reader in ["glm6b"] + ([] if args.skip_mindspore else ["mindspore"]):
            out = subprocess.run([sys.executable, __file__, "--child", reader, str(path)], capture_output=True,
                                 text=True, env={**os.environ, "GLOG_v": "3"})
            if out.returncode != 0:
                rows.append((reader, "failed: " + (out.stderr.strip().splitlines() or ["?"])[-1][:60], "", ""))
                continue
            result = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((reader, str(result["entries"]), f"{result['peak_above_baseline_mib']:.0f}",
                         f"{result['seconds']:.2f}"))
    finally:
        path.unlink(missing_ok=True)
    print(f"file: {size_mib:.0f} MiB float16, largest tensor 768 MiB (2 chunks)")
    print(f"| {'reader':<10} | {'entries':>7} | {'peak RSS above baseline (MiB)':>29} | {'seconds':>7} |")
    print(f"|{'-' * 12}|{'-' * 9}|{'-' * 31}|{'-' * 9}|")
    for reader, entries, peak, seconds in rows:
        print(f"| {reader:<10} | {entries:>7} | {peak:>29} | {seconds:>7} |")


if __name__ == "__main__":
    main()
