"""A pool of N local processes joined by gloo, set up the way torchrun sets up its workers.

Starting a process that imports torch takes several seconds, so the tests start one pool per
process count and send it one job per test:

    with ProcessPool(2) as pool:
        result = pool.run("dist_scripts.workers.fsdp_train", out_dir, timeout_s=60, steps=3)

Each process gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on
a free port) and calls `glm6b.train.parallel.init_distributed()`. A job runs `target(info, out_dir,
**kwargs)` on every rank; rank 0's return value is saved with torch.save and returned by `run`. If
a rank fails, or the job exceeds its timeout, every process of the pool is killed (a rank may be
stuck in a collective) and the error is raised with the failing rank's traceback; the next `run`
starts a fresh pool.
"""

from __future__ import annotations

import importlib
import os
import queue
import socket
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

RESULT_NAME = "rank0_result.pt"
START_TIMEOUT_S = 180  # importing torch in N fresh processes on a slow disk


def free_port() -> int:
    """A TCP port nobody listens on right now (bind to port 0, read it back, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, jobs, replies) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # N processes share few cores
    from glm6b.train import parallel

    try:
        info = parallel.init_distributed(timeout_s=60)
    except BaseException:  # noqa: BLE001 - reported to the parent
        replies.put((rank, "error", traceback.format_exc()))
        return
    replies.put((rank, "ready", None))
    try:
        while True:
            job = jobs.get()
            if job is None:
                break
            target, out_dir, kwargs = job
            try:
                module_name, fn_name = target.rsplit(".", 1)
                fn = getattr(importlib.import_module(module_name), fn_name)
                result = fn(info, Path(out_dir), **kwargs)
                if rank == 0:
                    torch.save(result, Path(out_dir) / RESULT_NAME)
                replies.put((rank, "ok", None))
            except BaseException:  # noqa: BLE001
                replies.put((rank, "error", traceback.format_exc()))
    finally:
        parallel.cleanup()


class ProcessPool:
    """N spawned processes in one gloo process group, running jobs on request (see the module docstring)."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.ctx = None

    def _start(self) -> None:
        spawn = mp.get_context("spawn")
        self.jobs = [spawn.Queue() for _ in range(self.world_size)]
        self.replies = spawn.Queue()
        port = free_port()
        self.processes = [spawn.Process(target=_worker, args=(rank, self.world_size, port, self.jobs[rank],
                                                                self.replies), daemon=True)
                          for rank in range(self.world_size)]
        for p in self.processes:
            p.start()
        self.ctx = True
        self._collect("ready", time.monotonic() + START_TIMEOUT_S, "start")

    def _collect(self, expected: str, deadline: float, what: str) -> None:
        pending = set(range(self.world_size))
        errors = []
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.close(kill=True)
                raise TimeoutError(f"{what}: rank(s) {sorted(pending)} of {self.world_size} did not finish in time")
            try:
                rank, status, detail = self.replies.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r in pending if not self.processes[r].is_alive()]
                if dead:
                    self.close(kill=True)
                    raise RuntimeError(f"{what}: rank(s) {dead} exited unexpectedly")
                continue
            pending.discard(rank)
            if status == "error":
                errors.append(f"--- rank {rank} ---\n{detail}")
                break  # the other ranks may be stuck in a collective waiting for this one
        if errors:
            self.close(kill=True)
            raise RuntimeError(f"{what} failed:\n" + "\n".join(errors))

    def run(self, target: str, out_dir: str | os.PathLike, timeout_s: float = 60, **kwargs):
        """Run `target` ("module.function") on every rank; return rank 0's result."""
        if self.ctx is None:
            self._start()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / RESULT_NAME).unlink(missing_ok=True)
        for q in self.jobs:
            q.put((target, str(out_dir), kwargs))
        self._collect("ok", time.monotonic() + timeout_s, target)
        return torch.load(out_dir / RESULT_NAME, weights_only=False)

    def close(self, kill: bool = False) -> None:
        """Stop the processes (politely, unless kill); only the processes this pool started."""
        if self.ctx is None:
            return
        if not kill:
            for q in self.jobs:
                q.put(None)
            deadline = time.monotonic() + 3  # a clean exit; past this, killing loses nothing
            for p in self.processes:
                p.join(max(0.0, deadline - time.monotonic()))
        for p in self.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
        for q in [*self.jobs, self.replies]:
            q.close()
            q.cancel_join_thread()
        self.ctx = None

    def __enter__(self) -> "ProcessPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
