"""Two `torchrun` launches on this machine as two nodes (c10d rendezvous on 127.0.0.1, one process each): FSDP2
over the two trains with the losses of one process, and the checkpoint the two wrote resumes in one process.

On two real machines the command is the same with the first machine's address as the endpoint (the
launches meet there; the output folder must be on a filesystem both machines see, since every rank
writes its own shard of each checkpoint):

    # on each machine, --node-rank 0 on the first and 1 on the second
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint node0.example:29500 --rdzv-id adgen-full \\
        -m glm6b run --config finetune --mode finetune --load-checkpoint path/to/chatglm-6b \\
        --train-data AdvertiseGen/train.json --output-dir /shared/output/full \\
        --set parallel.data_parallel=16 --set parallel.optimizer_shard=true
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch.distributed as dist
from helpers import GOLDEN, kill_torchrun, write_adgen_sample


def loopback_tcp() -> bool:
    """Whether this machine can listen on 127.0.0.1 (the rendezvous endpoint of the two launches)."""
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
        return True
    except OSError:
        return False


pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not loopback_tcp(), reason="no TCP on 127.0.0.1 for the c10d rendezvous of the two nodes"),
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="torch.distributed with the gloo backend is not available"),
    pytest.mark.skipif(find_spec("torch.distributed.run") is None, reason="torchrun (torch.distributed.run) is missing"),
]
ROOT = Path(__file__).parent.parent
LAUNCH_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_args(train_file: Path, out: Path, *sets: str, steps: int = 4) -> list[str]:
    """`glm6b run` on the golden checkpoint: full fine-tuning, float32, 2 rows per micro-batch."""
    args = ["run", "--config", "finetune", "--mode", "finetune", "--load-checkpoint", str(GOLDEN), "--train-data",
            str(train_file), "--output-dir", str(out), "--max-steps", str(steps), "--batch-size", "2",
            "--learning-rate", "1e-3"]
    for item in ("trainer.logging_steps=1", "trainer.warmup_steps=0", "trainer.save_steps=2", "trainer.bf16=false",
                 "model.dtype=float32", "data.max_source_length=24", "trainer.tensorboard=false",
                 "trainer.disable_tqdm=true", "trainer.gradient_checkpointing=false", *sets):
        args += ["--set", item]
    return args


def node_command(node_rank: int, port: int, rdzv_id: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node_rank),
            "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--rdzv-id", rdzv_id, "--local-addr", "127.0.0.1", "-m", "glm6b", *args]


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def assert_same(ours: list[float], ref: list[float]) -> None:
    assert len(ours) == len(ref) and all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(ours, ref)), (ours, ref)


def test_two_nodes_train_like_one_process_and_resume_on_one(tmp_path):
    from glm6b.cli import main
    from glm6b.train.dcp import read_checkpoint_info

    train_file = write_adgen_sample(tmp_path / "train.json")
    two = tmp_path / "two-nodes"
    args = run_args(train_file, two, "parallel.data_parallel=2", "parallel.optimizer_shard=true",
                    "trainer.gradient_accumulation_steps=1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    port, rdzv_id = free_port(), uuid.uuid4().hex[:12]
    nodes = [subprocess.Popen(node_command(rank, port, rdzv_id, args), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=LAUNCH_TIMEOUT_S))
    finally:
        for node in nodes:  # only the launches this test started, with their workers
            if node.poll() is None:
                kill_torchrun(node)
    for rank, (node, (_, err)) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank}:\n{err[-3000:]}"
    assert sum(out.count('"world_size": 2') for out, _ in outputs) == 1  # one summary, from global rank 0

    info = read_checkpoint_info(two / "checkpoint-2")
    assert (info["world_size"], info["parallel"]["optimizer_shard"]) == (2, True)
    assert sorted(p.name for p in (two / "checkpoint-2").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]

    # One process with the same global batch: 2 micro-batches of 2 rows per step.
    one = tmp_path / "one"
    assert main(run_args(train_file, one, "trainer.gradient_accumulation_steps=2")) == 0
    assert_same(losses(two), losses(one))

    # The checkpoint the two nodes wrote at step 2, resumed in one process: steps 3 and 4 as uninterrupted.
    resumed = tmp_path / "resumed"
    assert main(run_args(train_file, resumed, "trainer.gradient_accumulation_steps=2",
                         f"trainer.resume_from_checkpoint={two / 'checkpoint-2'}")) == 0
    assert_same(losses(resumed), losses(two)[2:])
