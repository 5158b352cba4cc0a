"""Shared test helpers: the golden reference outputs and how to compare against them."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file

GOLDEN = Path(__file__).parent / "golden"


@functools.lru_cache(maxsize=None)
def golden_cases() -> dict:
    return json.loads((GOLDEN / "cases.json").read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=None)
def golden_tensors() -> dict[str, torch.Tensor]:
    return load_file(GOLDEN / "tensors.safetensors")


def golden_tensor(name: str) -> torch.Tensor:
    return golden_tensors()[name]


def write_adgen_sample(path: Path) -> Path:
    """A tiny ADGEN jsonl training file: the two golden train_adgen examples plus two more."""
    rows = [{"content": ex["prompt"], "summary": ex["answer"]} for ex in golden_cases()["train_adgen"]["examples"]]
    rows += [{"content": "类型#裤*颜色#黑色", "summary": "黑色裤子百搭。"},
             {"content": "类型#上衣*风格#复古", "summary": "复古上衣很好看。"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def assert_close_rel(ours: torch.Tensor, golden: torch.Tensor, rel: float = 1e-5, what: str = "") -> None:
    """The golden README's rule: max|ours - golden| <= rel * max|golden| over the whole tensor."""
    assert ours.shape == golden.shape, f"{what}: shape {tuple(ours.shape)} != golden {tuple(golden.shape)}"
    err = (ours.float() - golden.float()).abs().max().item()
    scale = golden.float().abs().max().item()
    assert err <= rel * scale, f"{what}: max abs error {err:.3g} > {rel} * {scale:.3g}"


def run_cli(capsys, *argv) -> tuple[int, str]:
    """Run the glm6b command in-process: (exit code, what it wrote to stderr)."""
    from glm6b.cli import main

    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    """The one `error:` line of a failed command, which must come without a traceback."""
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes, to check that nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def kill_torchrun(proc: subprocess.Popen) -> None:
    """SIGKILL a `torchrun` launch this test started and its workers, then reap it.

    torchrun starts each worker in a session of its own, so killing torchrun alone would leave them
    running: the workers (found by parent id in Linux's /proc) go first, as in a crash of the machine.
    """
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # after "pid (name)": state, ppid, ...
        except (OSError, IndexError, ValueError):  # the process ended meanwhile
            continue
        if ppid == proc.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(stat.parent.name), signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def run_scheduler(scheduler, schedule: dict) -> None:
    """Step a glm6b.inference.scheduler.Scheduler until all is done; schedule: {step number: [requests to
    submit before that step]}."""
    step = 0
    while True:
        for request in schedule.get(step, []):
            scheduler.submit(request)
        worked = scheduler.step()
        step += 1
        if not worked and step > max(schedule, default=0):
            return
