"""Training runs never mix, resume honestly, reproduce, and fail in one line (docs/reliability.md,
cases 2, 4, 5, 6 and 8).

Runs are `glm6b run` (through `glm6b.cli.main`) or the Trainer on the golden model, a few steps each.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import GOLDEN, one_error_line, run_cli, snapshot, write_adgen_sample

from glm6b.cli import main
from glm6b.train.state import list_checkpoints

ROOT = Path(__file__).parent.parent
CONFIGS = ROOT / "glm6b" / "configs"


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return write_adgen_sample(tmp_path_factory.mktemp("data") / "train.json")


def run_args(train_file, out, *sets: str, steps: int = 3, lr: str = "1e-3") -> list[str]:
    args = ["run", "--config", str(CONFIGS / "finetune.yaml"), "--mode", "finetune", "--load-checkpoint", str(GOLDEN),
            "--train-data", str(train_file), "--output-dir", str(out), "--max-steps", str(steps),
            "--batch-size", "1", "--learning-rate", lr]
    for item in ("trainer.logging_steps=1", "trainer.warmup_steps=0", "trainer.save_steps=1",
                 "data.max_source_length=24",
                 "trainer.bf16=false", "trainer.gradient_accumulation_steps=1", "model.dtype=float32",
                 "trainer.tensorboard=false", "trainer.disable_tqdm=true", "trainer.gradient_checkpointing=false",
                 "lora.lora_dropout=0.0", *sets):
        args += ["--set", item]
    return args


def log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------- case 2: run folders


def test_run_into_a_finished_run_is_refused(tmp_path, capsys, train_file):
    out = tmp_path / "out"
    assert run_cli(capsys, *run_args(train_file, out, steps=2))[0] == 0
    before = snapshot(out)
    code, err = run_cli(capsys, *run_args(train_file, out, steps=3))
    line = one_error_line(err)
    assert code == 2 and "already holds a finished run" in line and "resume_from_checkpoint=latest" in line
    assert "overwrite_output_dir" in line and snapshot(out) == before
    # With overwrite: the old run's checkpoints go, a file of the user's stays.
    (out / "notes.txt").write_text("mine")
    assert run_cli(capsys, *run_args(train_file, out, "trainer.overwrite_output_dir=true", steps=3))[0] == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert [r["step"] for r in log(out)] == [1, 2, 3] and (out / "notes.txt").read_text() == "mine"


def test_latest_resumes_only_a_checkpoint_of_the_same_run(tmp_path, capsys, train_file):
    other = tmp_path / "other"
    assert run_cli(capsys, *run_args(train_file, other, steps=5, lr="0.5"))[0] == 0
    out = tmp_path / "out"
    assert run_cli(capsys, *run_args(train_file, out, steps=2))[0] == 0
    shutil.copytree(other / "checkpoint-5", out / "checkpoint-5")  # a foreign, newer checkpoint
    with pytest.warns(UserWarning, match="ignoring checkpoint-5"):
        code, err = run_cli(capsys, *run_args(train_file, out, "trainer.resume_from_checkpoint=latest", steps=4))
    assert code == 0, err
    assert [r["step"] for r in log(out)] == [1, 2, 3, 4]
    assert json.loads((out / "training_args.json").read_text())["resumed_from"] == str(out / "checkpoint-2")


def test_failed_run_leaves_no_folder(tmp_path, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text('{"content": "", "summary": "x"}\n{"content": "y", "summary": ""}\n', encoding="utf-8")
    out = tmp_path / "out"
    code, err = run_cli(capsys, *run_args(empty, out))
    line = one_error_line(err)
    # case 8: the message names the file and what was filtered, not "pass train_dataset"
    assert code == 2 and f"{empty}: no training rows" in line and "2 with an empty prompt or answer" in line
    assert not out.exists()


# ----------------------------------------------------------------------------------- case 4: honest resume


def test_changed_learning_rate_and_longer_max_steps_apply_from_the_resume(tmp_path, capsys, train_file):
    out = tmp_path / "out"
    assert run_cli(capsys, *run_args(train_file, out, steps=2))[0] == 0  # linear decay: lr 1e-3, 5e-4
    assert [r["lr"] for r in log(out)] == [1e-3, 5e-4]
    code, err = run_cli(capsys, *run_args(train_file, out, "trainer.resume_from_checkpoint=latest", steps=4, lr="2e-3"))
    assert code == 0, err
    lrs = [r["lr"] for r in log(out)]
    # step 3 runs at this run's schedule at step 2 of 4 (2e-3 * 2/4), not at lr 0 or the old 1e-3 schedule
    assert lrs[2] == pytest.approx(2e-3 * 2 / 4) and lrs[3] == pytest.approx(2e-3 * 1 / 4)
    recorded = json.loads((out / "training_args.json").read_text())
    assert recorded["args"]["learning_rate"] == 2e-3 and recorded["resumed_at_step"] == 2
    assert recorded["changed_on_resume"] == {"learning_rate": [1e-3, 2e-3], "max_steps": [2, 4]}
    assert "learning_rate 0.001 -> 0.002" in err


@pytest.mark.parametrize("change,message", [
    ("trainer.gradient_accumulation_steps=2", "gradient_accumulation_steps = 2 but the checkpoint was written with 1"),
    ("trainer.seed=7", "seed = 7 but the checkpoint was written with 42"),
])
def test_changing_a_setting_the_checkpoint_fixes_is_refused(tmp_path, capsys, train_file, change, message):
    out = tmp_path / "out"
    assert run_cli(capsys, *run_args(train_file, out, steps=2))[0] == 0
    before = snapshot(out)
    code, err = run_cli(capsys, *run_args(train_file, out, "trainer.resume_from_checkpoint=latest", change, steps=3))
    assert code == 2 and message in one_error_line(err)
    assert snapshot(out) == before


def test_changing_the_data_file_is_refused(tmp_path, capsys, train_file):
    out = tmp_path / "out"
    assert run_cli(capsys, *run_args(train_file, out, steps=2))[0] == 0
    other = write_adgen_sample(tmp_path / "other.json")
    code, err = run_cli(capsys, *run_args(other, out, "trainer.resume_from_checkpoint=latest", steps=3))
    assert code == 2 and "trained on" in one_error_line(err) and str(train_file) in err


# ----------------------------------------------------------------------------------- case 5: reproducible


METHODS = [
    pytest.param("full", (), id="full"),
    pytest.param("lora", (), id="lora"),
    pytest.param("ptuning", ("model.pre_seq_len=4",), id="ptuning"),
    pytest.param("ptuning", ("model.pre_seq_len=4", "model.prefix_projection=true"), id="ptuning-projection"),
]


@pytest.mark.parametrize("method,sets", METHODS)
def test_finetune_is_deterministic_and_ctrl_c_resume_equals_a_straight_run(tmp_path, capsys, train_file,
                                                                           monkeypatch, method, sets):
    """Same seed, same losses (P-tuning used to draw its fresh prefix encoder before seeding), and a run
    stopped by Ctrl-C after step 2 (checkpoint saved) and resumed equals an uninterrupted run."""
    import glm6b.train.loss as L
    import glm6b.train.trainer as T

    sets = (f"method={method}", "trainer.save_steps=null", *sets)
    first, second = tmp_path / "first", tmp_path / "second"
    assert run_cli(capsys, *run_args(train_file, first, *sets, steps=4))[0] == 0
    assert run_cli(capsys, *run_args(train_file, second, *sets, steps=4))[0] == 0
    reference = [r["loss"] for r in log(first)]
    assert [r["loss"] for r in log(second)] == reference

    real_step = T.StopRequest.__enter__

    def ctrl_c_after_step_2(self):  # the first Ctrl-C arrives during step 2
        real_step(self)
        original = L.causal_lm_loss
        calls = {"n": 0}

        def loss(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                os.kill(os.getpid(), signal.SIGINT)
            return original(*args, **kwargs)

        monkeypatch.setattr(L, "causal_lm_loss", loss)  # the step's loss is computed in glm6b.train.loss
        return self

    monkeypatch.setattr(T.StopRequest, "__enter__", ctrl_c_after_step_2)
    stopped = tmp_path / "stopped"
    code, err = run_cli(capsys, *run_args(train_file, stopped, *sets, steps=4))
    assert code == 130 and "stopped at step 2 of 4; checkpoint saved in" in err and "Traceback" not in err
    assert [p.name for p in stopped.glob("checkpoint-*")] == ["checkpoint-2"]
    monkeypatch.setattr(T.StopRequest, "__enter__", real_step)
    monkeypatch.setattr(L, "causal_lm_loss", L.causal_lm_loss)
    assert run_cli(capsys, *run_args(train_file, stopped, *sets, "trainer.resume_from_checkpoint=latest", steps=4))[0] == 0
    assert [r["loss"] for r in log(stopped)] == reference


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("method,sets", METHODS)
def test_crash_between_checkpoints_then_resume_equals_a_straight_run(tmp_path, capsys, train_file, monkeypatch,
                                                                      method, sets):
    """A run that dies in step 3 (checkpoint-2 saved, step 3's random draws made) and is resumed from
    `latest` gives the uninterrupted run's losses: weights, optimizer, RNG and data position restored."""
    import glm6b.train.loss as L  # the step's loss is computed there

    sets = (f"method={method}", "trainer.save_steps=2", "lora.lora_dropout=0.1", *sets)
    straight = tmp_path / "straight"
    assert run_cli(capsys, *run_args(train_file, straight, *sets, steps=4))[0] == 0
    original, calls = L.causal_lm_loss, {"n": 0}

    def crash_in_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Crash
        return original(*args, **kwargs)

    monkeypatch.setattr(L, "causal_lm_loss", crash_in_step_3)
    crashed = tmp_path / "crashed"
    with pytest.raises(Crash):
        main([str(a) for a in run_args(train_file, crashed, *sets, steps=4)])
    assert [p.name for p in crashed.glob("checkpoint-*")] == ["checkpoint-2"]
    monkeypatch.setattr(L, "causal_lm_loss", original)
    assert run_cli(capsys, *run_args(train_file, crashed, *sets, "trainer.resume_from_checkpoint=latest", steps=4))[0] == 0
    assert [r["loss"] for r in log(crashed)] == [r["loss"] for r in log(straight)]


@pytest.mark.parametrize("method,sets", [METHODS[0], METHODS[3]])
def test_train_mode_from_a_preset_is_deterministic(tmp_path, capsys, train_file, method, sets):
    """`--mode train` builds a random model from model.preset: the seed fixes it too."""
    sets = (f"method={method}", "trainer.save_steps=null", "model.preset=tiny", f"model.tokenizer={GOLDEN}", *sets)
    losses = []
    for name in ("first", "second"):
        args = run_args(train_file, tmp_path / name, *sets, steps=2)
        args[args.index("finetune")] = "train"
        at = args.index("--load-checkpoint")
        del args[at:at + 2]
        assert run_cli(capsys, *args)[0] == 0
        losses.append([r["loss"] for r in log(tmp_path / name)])
    assert losses[0] == losses[1]


# ----------------------------------------------------------------------------------- case 6: faults


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, capsys, train_file):
    constant = "trainer.lr_scheduler_type=constant"  # the same lr whatever max_steps
    straight = tmp_path / "straight"
    assert run_cli(capsys, *run_args(train_file, straight, constant, steps=4))[0] == 0
    out = tmp_path / "out"
    assert run_cli(capsys, *run_args(train_file, out, constant, steps=3))[0] == 0
    (out / "checkpoint-3" / "optimizer.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.warns(UserWarning, match="optimizer.pt is truncated or corrupt.*falling back to checkpoint-2"):
        code, err = run_cli(capsys, *run_args(train_file, out, constant, "trainer.resume_from_checkpoint=latest", steps=4))
    assert code == 0, err
    assert [r["loss"] for r in log(out)][2:] == [r["loss"] for r in log(straight)][2:]
    # Named explicitly, a corrupt checkpoint is one line naming the file (the resume rewrote checkpoint-3).
    (out / "checkpoint-3" / "optimizer.pt").write_bytes(b"PK\x03\x04 truncated")
    code, err = run_cli(capsys, *run_args(train_file, out, f"trainer.resume_from_checkpoint={out / 'checkpoint-3'}",
                                     steps=5))
    assert code == 2 and "optimizer.pt is truncated or corrupt" in one_error_line(err)


def test_disk_full_while_saving_a_checkpoint_is_one_line(tmp_path, capsys, train_file, monkeypatch):
    import glm6b.train.state as S

    def full(obj, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(S.torch, "save", full)
    out = tmp_path / "out"
    code, err = run_cli(capsys, *run_args(train_file, out, steps=2))
    assert code == 2 and "no space left on the device while writing" in one_error_line(err)
    assert not out.exists() or not list(out.glob("checkpoint-*"))


# ----------------------------------------------------------------------------------- case 8: recipe values


@pytest.mark.parametrize("sets,flags,message", [
    (("lora.r=0",), (), "r=0 must be a positive integer"),
    (("lora.lora_dropout=1.5",), (), "lora_dropout=1.5 must be in [0, 1)"),
    (("trainer.max_grad_norm=-1",), (), "max_grad_norm=-1.0 must be >= 0 (0 disables clipping)"),
    (("trainer.max_steps=abc",), ("--max-steps", "3"), "'trainer.max_steps' = 'abc': expected int | null"),
    (("model.device=cuda:7",), (), "device 'cuda:7'"),
    (("model.pre_seq_len=0",), (), "model.pre_seq_len = 0: expected a positive integer"),
    (("model.preset=huge",), (), "model.preset = 'huge': expected one of"),
    (("data.skip_bad=false",), ("--train-data", str(GOLDEN / "cases.json")), "line 1: not valid JSON"),
])
def test_recipe_values_are_checked_before_the_model_loads(tmp_path, capsys, train_file, monkeypatch, sets, flags,
                                                          message):
    import glm6b.checkpoint.hf as hf

    monkeypatch.setattr(hf, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    args = ["run", "--config", str(CONFIGS / "lora.yaml"), "--mode", "finetune", "--load-checkpoint", str(GOLDEN),
            "--train-data", str(train_file), "--output-dir", str(tmp_path / "out"), *flags]
    for item in sets:
        args += ["--set", item]
    code, err = run_cli(capsys, *args)
    assert code == 2 and message in one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_empty_recipe_is_refused(tmp_path, capsys, train_file):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    code, err = run_cli(capsys, *["run", "--config", empty, "--mode", "finetune", "--load-checkpoint", GOLDEN,
                             "--train-data", train_file, "--output-dir", tmp_path / "out"])
    assert code == 2 and f"{empty}: the recipe is empty" in one_error_line(err)


def test_quickstart_steps_zero_is_refused(tmp_path, capsys):
    code, err = run_cli(capsys, *["quickstart", "--steps", "0", "--output-dir", tmp_path / "qs"])
    assert code == 2 and "--steps 0: expected a positive integer" in one_error_line(err)
    assert not (tmp_path / "qs").exists()


# ----------------------------------------------------------------------------------- case 9: quickstart base/


def test_incomplete_quickstart_base_is_rebuilt(tmp_path, capsys):
    from glm6b.quickstart import QuickstartSettings, build_base_model
    from glm6b.sample_data import DEFAULT_ASSETS
    from glm6b.tokenizer import load_tokenizer

    base = tmp_path / "qs" / "base"
    base.mkdir(parents=True)
    shutil.copyfile(DEFAULT_ASSETS / "config.json", base / "config.json")  # what a kill used to leave
    settings = QuickstartSettings(output_dir=str(tmp_path / "qs"), pretrain_steps=1, batch_size=2)
    assert build_base_model(settings, load_tokenizer(DEFAULT_ASSETS)) == base
    assert "is incomplete" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "ice_text.model", "tokenizer_config.json"} <= \
        {p.name for p in base.iterdir()}
    assert not list(base.parent.glob("*.tmp"))
    build_base_model(settings, load_tokenizer(DEFAULT_ASSETS))
    assert "Reusing" in capsys.readouterr().out


# ----------------------------------------------------------------------------------- kills at random points


@pytest.mark.slow
def test_run_killed_at_random_points_ends_with_the_weights_of_a_straight_run(tmp_path, train_file):
    """`glm6b run` SIGKILLed at random moments (while training, saving a checkpoint or final/), then
    restarted (resuming its latest checkpoint when there is one), ends with the uninterrupted run's weights."""
    steps = 8
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def start(out, *sets):
        return subprocess.Popen([sys.executable, "-m", "glm6b", *run_args(train_file, out, *sets, steps=steps)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    # The straight run also times a whole run, so the kills land inside one on a fast or a slow machine.
    began = time.monotonic()
    straight = tmp_path / "straight"
    proc = start(straight)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    whole_run = time.monotonic() - began
    expected = load_file(straight / "final" / "model.safetensors")

    out = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    for attempt in range(12):
        # Resume only from a finished checkpoint-<step>/ (a kill while saving leaves checkpoint-<step>.tmp,
        # which "latest" rightly refuses to resume from).
        resume = ("trainer.resume_from_checkpoint=latest",) if list_checkpoints(out) else ()
        proc = start(out, *resume)
        if kills < 4:
            time.sleep(rng.uniform(0.2, 0.9) * whole_run)
            if proc.poll() is None:
                proc.kill()
                kills += 1
        _, err = proc.communicate(timeout=300)
        if proc.returncode == 0 and kills == 0:  # finished before the first kill: start over
            shutil.rmtree(out)
            continue
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert proc.returncode == 0 and kills >= 1
    final = load_file(out / "final" / "model.safetensors")
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert [r["step"] for r in log(out)][-1] == steps


def test_too_little_free_space_is_refused_before_training(tmp_path, capsys, train_file, monkeypatch):
    import collections

    import glm6b.safety as safety

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(safety.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    out = tmp_path / "out"
    code, err = run_cli(capsys, *run_args(train_file, out))
    line = one_error_line(err)
    assert code == 2 and f"trainer.output_dir {out}: the output needs about" in line and "1000 B is free" in line
    assert not out.exists()


def test_resume_into_another_runs_folder_is_refused_and_pruning_spares_it(tmp_path, capsys, train_file):
    first, second = tmp_path / "first", tmp_path / "second"
    assert run_cli(capsys, *run_args(train_file, first, steps=2))[0] == 0
    assert run_cli(capsys, *run_args(train_file, second, steps=2))[0] == 0
    before = snapshot(second)
    code, err = run_cli(capsys, *run_args(train_file, second, f"trainer.resume_from_checkpoint={first / 'checkpoint-2'}",
                                     steps=3))
    assert code == 2 and "holds another run than the checkpoint" in one_error_line(err)
    assert snapshot(second) == before
    # save_total_limit prunes only the run's own checkpoints, never a foreign one lying in its folder
    shutil.copytree(first / "checkpoint-1", second / "checkpoint-0")
    with pytest.warns(UserWarning, match="ignoring checkpoint-0"):
        assert run_cli(capsys, *run_args(train_file, second, "trainer.resume_from_checkpoint=latest",
                                    "trainer.save_total_limit=1", steps=4))[0] == 0
    assert sorted(p.name for p in second.glob("checkpoint-*")) == ["checkpoint-0", "checkpoint-4"]
