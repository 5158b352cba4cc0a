"""`torchrun -m glm6b run` with a parallel section: 2 gloo processes equal one process, DCP resume, merge."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from helpers import GOLDEN, kill_torchrun, write_adgen_sample

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

pytestmark = pytest.mark.distributed
torch.set_num_threads(1)
ROOT = Path(__file__).parent.parent
CONFIGS = ROOT / "glm6b" / "configs"


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return write_adgen_sample(tmp_path_factory.mktemp("data") / "train.json")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def argv(config: str, train_file, out, *sets: str, steps: int = 3, batch: int = 2) -> list[str]:
    args = ["run", "--config", str(CONFIGS / config), "--mode", "finetune", "--load-checkpoint", str(GOLDEN),
            "--train-data", str(train_file), "--output-dir", str(out), "--max-steps", str(steps),
            "--batch-size", str(batch), "--learning-rate", "1e-3"]
    for item in ("trainer.logging_steps=1", "trainer.warmup_steps=0", "trainer.save_steps=null",
                 "data.max_source_length=24", "trainer.bf16=false", "trainer.gradient_accumulation_steps=1", "lora.lora_dropout=0.0", "model.dtype=float32",
                 "trainer.tensorboard=false", "trainer.disable_tqdm=true", "trainer.gradient_checkpointing=false",
                 *sets):
        args += ["--set", item]
    return args


def torchrun_command(args: list[str], nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
            str(_free_port()), "-m", "glm6b", *args]


def worker_env() -> dict[str, str]:
    """The workers import this checkout (PYTHONPATH) and run one thread each."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def torchrun(args: list[str], nproc: int = 2, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_command(args, nproc), env=worker_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def single(args: list[str]) -> int:
    from glm6b.cli import main

    return main(args)


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def assert_same(ours: list[float], ref: list[float]) -> None:
    assert len(ours) == len(ref) and all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(ours, ref)), (ours, ref)


@pytest.mark.parametrize("config,method_sets", [
    ("lora.yaml", ()),
    ("finetune.yaml", ("parallel.optimizer_shard=true",)),
])
def test_data_parallel_matches_single_process(tmp_path, train_file, config, method_sets):
    # 2 ranks x 2 rows = one process with 2 micro-batches of 2 rows (same global batch, same mean of means)
    proc = torchrun(argv(config, train_file, tmp_path / "dp2", "parallel.data_parallel=2", *method_sets))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"mode": "finetune"') == 1  # rank 0 alone prints
    assert single(argv(config, train_file, tmp_path / "one", "trainer.gradient_accumulation_steps=2")) == 0
    assert_same(losses(tmp_path / "dp2"), losses(tmp_path / "one"))
    final = tmp_path / "dp2" / "final"
    assert (final / ("adapter_config.json" if config == "lora.yaml" else "config.json")).is_file()


@pytest.fixture(scope="module")
def varied_file(tmp_path_factory):
    """32 ADGEN-style rows with answers of different lengths."""
    from glm6b.sample_data import make_adgen_examples, write_adgen_jsonl

    path = tmp_path_factory.mktemp("varied") / "train.json"
    write_adgen_jsonl(path, make_adgen_examples(32, seed=3))
    return path


def logged(out: Path, key: str) -> list[float]:
    return [json.loads(line)[key] for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("layout", [
    ("parallel.data_parallel=2",),  # DDP
    ("parallel.data_parallel=2", "parallel.optimizer_shard=true"),  # FSDP2
    ("parallel.model_parallel=2",),  # tensor parallel (both ranks see the same rows)
])
def test_token_normalised_loss_is_the_same_for_any_split_of_the_rows(tmp_path, varied_file, layout):
    # 32 rows per step: 2 processes x 2 rows x 8 micro-batches (TP: 1 replica x 4 rows x 8) against one
    # process x 4 rows x 8; the step-2 loss and the gradient norms check the gradients too.
    tp = "parallel.model_parallel=2" in layout
    proc = torchrun(argv("finetune.yaml", varied_file, tmp_path / "dist", *layout, "trainer.gradient_accumulation_steps=8",
                         "trainer.max_grad_norm=0", steps=2, batch=4 if tp else 2), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert single(argv("finetune.yaml", varied_file, tmp_path / "one", "trainer.gradient_accumulation_steps=8",
                       "trainer.max_grad_norm=0", steps=2, batch=4)) == 0
    for key in ("loss", "grad_norm"):
        assert_same(logged(tmp_path / "dist", key), logged(tmp_path / "one", key))


def test_sharded_checkpoint_resumes_on_one_process_and_merges(tmp_path, train_file):
    from glm6b import load_model
    from glm6b.train.dcp import is_sharded_checkpoint

    out = tmp_path / "dp2"
    proc = torchrun(argv("lora.yaml", train_file, out, "parallel.data_parallel=2", "trainer.save_steps=2", steps=4))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert is_sharded_checkpoint(out / "checkpoint-2")
    uninterrupted = losses(out)
    resumed = tmp_path / "resumed"
    assert single(argv("lora.yaml", train_file, resumed, "trainer.gradient_accumulation_steps=2",
                       f"trainer.resume_from_checkpoint={out / 'checkpoint-2'}", steps=4)) == 0
    assert_same(losses(resumed), uninterrupted[2:])

    from glm6b.cli import main

    merged = tmp_path / "merged"
    assert main(["merge-checkpoint", "--input", str(out / "checkpoint-4"), "--output", str(merged),
                 "--base-model", str(GOLDEN)]) == 0
    model = load_model(merged, dtype=torch.float32)
    assert model.config.num_layers > 0


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finding torchrun's workers needs Linux's /proc")
def test_pipeline_run_killed_resumes_on_one_process(tmp_path, varied_file):
    """`glm6b run` on 2 pipeline stages (full fine-tuning, 1F1B over micro_batch_num 2), SIGKILLed once
    checkpoint-2 exists, continued in the same folder by one process: train_log.jsonl holds the losses and
    gradient norms of an uninterrupted one-process run (steps 1-2 from the stages, 3-4 from the resume), and
    merge-checkpoint turns the stages' checkpoint into an HF folder with one tied embedding matrix."""
    from glm6b import load_model
    from glm6b.cli import main
    from glm6b.train.dcp import read_checkpoint_info

    # A constant LR: the killed run is long (it must still be running when killed), the resumed one ends at 4.
    # Every checkpoint is kept: the kill may land some steps after checkpoint-2 appeared.
    common = ("trainer.lr_scheduler_type=constant", "trainer.save_steps=2", "trainer.save_total_limit=null")
    out = tmp_path / "pp"
    cmd = torchrun_command(argv("finetune.yaml", varied_file, out, *common, "parallel.pipeline_stage=2",
                                "parallel.micro_batch_num=2", steps=1000))
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(cmd, env=worker_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 240
            while proc.poll() is None and not (out / "checkpoint-2").is_dir() and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            kill_torchrun(proc)  # the workers, then torchrun: a crash, as the trainer sees it
    stderr = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}, not killed:\n{stderr[-3000:]}"
    checkpoint = out / "checkpoint-2"
    assert checkpoint.is_dir(), stderr[-3000:]
    assert read_checkpoint_info(checkpoint)["parallel"]["pipeline_stage"] == 2

    merged = tmp_path / "merged"
    assert main(["merge-checkpoint", "--input", str(checkpoint), "--output", str(merged)]) == 0
    model = load_model(merged, dtype=torch.float32)
    assert model.lm_head.weight is model.transformer.word_embeddings.weight

    assert single(argv("finetune.yaml", varied_file, out, *common, "trainer.gradient_accumulation_steps=2",
                       f"trainer.resume_from_checkpoint={checkpoint}", steps=4)) == 0
    assert single(argv("finetune.yaml", varied_file, tmp_path / "one", *common,
                       "trainer.gradient_accumulation_steps=2", steps=4)) == 0
    assert logged(out, "step") == [1, 2, 3, 4]
    for key in ("loss", "grad_norm"):  # the token-normalised loss of rows of different lengths, and its gradients
        assert_same(logged(out, key), logged(tmp_path / "one", key))


@pytest.mark.parametrize("sets,message", [
    (("parallel.data_parallel=3",), "must equal the number of processes, which is 2"),
    (("parallel.pipeline_stage=2",), "parallel.pipeline_schedule = 1f1b needs at least parallel.pipeline_stage (2) "
                                     "micro-batches per step, got 1"),
    (("parallel.data_parallel=2", "parallel.micro_batch_num=2", "trainer.gradient_accumulation_steps=3"), "disagree"),
])
def test_invalid_parallel_config_fails_before_work(tmp_path, train_file, sets, message):
    proc = torchrun(argv("lora.yaml", train_file, tmp_path / "bad", *sets), timeout=60)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "bad").exists()
