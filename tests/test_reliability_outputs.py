"""Outputs never destroy what the user did not ask to replace (docs/reliability.md, cases 1 and 3).

Each test reproduces a reported case through `glm6b.cli.main` on the golden model and checks that
the command is refused before any work, with one line naming the flag, and that every file that was
there before is still there, byte for byte.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import GOLDEN, one_error_line, run_cli, snapshot, write_adgen_sample

from glm6b.cli import main
from glm6b.safety import OutputError, check_output_dir, check_output_file

ROOT = Path(__file__).parent.parent


# ----------------------------------------------------------------------------------- the shared checks


def test_check_output_file(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text("x")
    with pytest.raises(OutputError, match="would overwrite the input"):
        check_output_file(source, inputs=[source])
    with pytest.raises(OutputError, match="would overwrite the input"):  # another spelling of the same file
        check_output_file(tmp_path / "." / "in.jsonl", inputs=[source])
    with pytest.raises(OutputError, match="is a folder; expected a file name"):
        check_output_file(tmp_path, inputs=[source])
    with pytest.raises(OutputError, match="does not exist"):
        check_output_file(tmp_path / "missing" / "out.jsonl")
    with pytest.raises(OutputError, match="pass --overwrite"):
        check_output_file(source, overwrite=False)
    with pytest.raises(OutputError, match=r"out.jsonl: the output needs about 1024.0 TiB but only .* is free"):
        check_output_file(tmp_path / "out.jsonl", needed_bytes=2**50)
    assert check_output_file(tmp_path / "out.jsonl", inputs=[source]) == tmp_path / "out.jsonl"


def test_check_output_dir(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(OutputError, match="is the input"):
        check_output_dir(model, inputs=[model], owned=["config.json"], overwrite=True)
    with pytest.raises(OutputError, match="contains the input"):
        check_output_dir(tmp_path, inputs=[model], overwrite=True)
    with pytest.raises(OutputError, match="lies inside the input"):
        check_output_dir(model / "merged", inputs=[model])
    previous = tmp_path / "previous"
    previous.mkdir()
    (previous / "config.json").write_text("{}")
    with pytest.raises(OutputError, match="pass --overwrite"):
        check_output_dir(previous, owned=["config.json"])
    check_output_dir(previous, owned=["config.json"], overwrite=True)
    (previous / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"does not write \(notes.txt\)"):
        check_output_dir(previous, owned=["config.json"], overwrite=True)
    check_output_dir(tmp_path / "new" / "deeper")


# ----------------------------------------------------------------------------------- case 1: merge-checkpoint


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A run folder as a torchrun LoRA run leaves it: a sharded checkpoint, logs, final/."""
    from glm6b.train import dcp as D
    from glm6b.train.lora import LoraArguments, apply_lora
    from glm6b import load_model

    run = tmp_path_factory.mktemp("run")
    model = apply_lora(load_model(GOLDEN, dtype=torch.float32), LoraArguments(r=2, lora_dropout=0.0))
    D.save_sharded({"model": model}, run / "checkpoint-2", tokenizer=GOLDEN)
    (run / "train_log.jsonl").write_text('{"step": 2, "loss": 1.0}\n')
    (run / "final").mkdir()
    (run / "final" / "adapter_config.json").write_text("{}")
    return run


@pytest.mark.parametrize("where", ["run folder", "input itself", "unrelated files"])
def test_merge_checkpoint_refuses_to_destroy(tmp_path, capsys, run_folder, where):
    checkpoint = run_folder / "checkpoint-2"
    if where == "run folder":
        output = run_folder
    elif where == "input itself":
        output = checkpoint
    else:
        output = tmp_path / "mine"
        output.mkdir()
        (output / "notes.txt").write_text("keep me")
    before, before_out = snapshot(run_folder), snapshot(output)
    code, err = run_cli(capsys, "merge-checkpoint", "--input", checkpoint, "--output", output,
                        "--base-model", GOLDEN, "--overwrite")
    assert code == 2
    assert f"--output {output}" in one_error_line(err)
    assert snapshot(run_folder) == before and snapshot(output) == before_out


def test_merge_checkpoint_replaces_only_its_own_output_with_overwrite(tmp_path, capsys, run_folder):
    output = tmp_path / "adapter"
    args = ["merge-checkpoint", "--input", run_folder / "checkpoint-2", "--output", output]
    assert run_cli(capsys, *args)[0] == 0
    assert (output / "adapter_model.safetensors").is_file()
    code, err = run_cli(capsys, *args)
    assert code == 2 and "pass --overwrite" in one_error_line(err)
    assert run_cli(capsys, *args, "--overwrite")[0] == 0
    assert not list(tmp_path.glob("*.tmp"))


def test_merge_checkpoint_wrong_base_is_one_line(tmp_path, capsys, run_folder):
    """A LoRA checkpoint merged onto a base of another shape: one line naming the tensor, not PEFT's traceback."""
    from glm6b.checkpoint.hf import save_pretrained
    from glm6b.config import ChatGLMConfig
    from glm6b.model import ChatGLMForConditionalGeneration

    other = tmp_path / "other"
    config = ChatGLMConfig.from_json_file(GOLDEN / "config.json").replace(hidden_size=64, inner_hidden_size=96)
    save_pretrained(ChatGLMForConditionalGeneration(config), other)
    code, err = run_cli(capsys, "merge-checkpoint", "--input", run_folder / "checkpoint-2",
                        "--output", tmp_path / "merged", "--base-model", other)
    assert code == 2 and "do not fit the base model" in one_error_line(err)
    assert not (tmp_path / "merged").exists()


# ----------------------------------------------------------------------------------- case 3 / 6: merge-lora


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from glm6b import load_model
    from glm6b.train.lora import LoraArguments, apply_lora

    folder = tmp_path_factory.mktemp("adapter")
    apply_lora(load_model(GOLDEN, dtype=torch.float32), LoraArguments(r=2)).save_pretrained(str(folder))
    return folder


def test_merge_lora_refuses_output_equal_to_base(tmp_path, capsys, adapter):
    base = tmp_path / "base"
    base.mkdir()
    for name in ("config.json", "model.safetensors", "ice_text.model", "tokenizer_config.json"):
        (base / name).write_bytes((GOLDEN / name).read_bytes())
    before = snapshot(base)
    for extra in ([], ["--overwrite"]):
        code, err = run_cli(capsys, "merge-lora", "--base", base, "--adapter", adapter, "--output", base, *extra)
        assert code == 2 and f"--output {base} is the input" in one_error_line(err)
    assert snapshot(base) == before


def test_merge_lora_refuses_a_folder_with_other_files(tmp_path, capsys, adapter):
    output = tmp_path / "out"
    output.mkdir()
    (output / "data.jsonl").write_text("precious")
    code, err = run_cli(capsys, "merge-lora", "--base", GOLDEN, "--adapter", adapter, "--output", output, "--overwrite")
    assert code == 2 and "does not write (data.jsonl)" in one_error_line(err)
    assert (output / "data.jsonl").read_text() == "precious"


@pytest.mark.parametrize("damage", ["corrupt weights", "wrong shape", "bad config"])
def test_corrupt_or_wrong_adapter_is_one_line(tmp_path, capsys, adapter, damage):
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in adapter.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    if damage == "corrupt weights":
        (bad / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 8)
    elif damage == "wrong shape":
        from safetensors.torch import load_file, save_file

        tensors = load_file(bad / "adapter_model.safetensors")
        save_file({k: torch.zeros(v.shape[0] + 1, v.shape[1]) for k, v in tensors.items()},
                  str(bad / "adapter_model.safetensors"))
    else:
        (bad / "adapter_config.json").write_text('{"r": 0, "peft_type": "LORA"')
    code, err = run_cli(capsys, "merge-lora", "--base", GOLDEN, "--adapter", bad, "--output", tmp_path / "merged")
    line = one_error_line(err)
    assert code == 2 and str(bad) in line
    assert not (tmp_path / "merged").exists() or not any((tmp_path / "merged").iterdir())
    data = write_adgen_sample(tmp_path / "dev.json")
    code, err = run_cli(capsys, "eval", "--model", GOLDEN, "--adapter", bad, "--data", data,
                        "--output-dir", tmp_path / "eval")
    assert code == 2 and str(bad) in one_error_line(err)


def test_debug_env_shows_the_traceback(tmp_path, adapter, monkeypatch):
    monkeypatch.setenv("GLM6B_DEBUG", "1")
    with pytest.raises(OutputError):
        main(["merge-lora", "--base", str(GOLDEN), "--adapter", str(adapter), "--output", str(GOLDEN)])


# ----------------------------------------------------------------------------------- case 3: generate


@pytest.fixture()
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "你好"}\n{"prompt": "晚上睡不着"}\n', encoding="utf-8")
    return path


def test_generate_refuses_output_equal_to_input(capsys, prompts):
    before = prompts.read_bytes()
    code, err = run_cli(capsys, "generate", "--model", GOLDEN, "--input", prompts, "--output", prompts)
    assert code == 2 and "would overwrite the input" in one_error_line(err)
    assert prompts.read_bytes() == before


def test_generate_refuses_a_directory_output_before_loading(tmp_path, capsys, prompts, monkeypatch):
    import glm6b.cli as cli

    def no_load(args):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(cli, "_load", no_load)
    code, err = run_cli(capsys, "generate", "--model", GOLDEN, "--input", prompts, "--output", tmp_path)
    assert code == 2 and "is a folder" in one_error_line(err)


def test_generate_disk_full_is_one_line_and_leaves_no_temporary(tmp_path, capsys, prompts, monkeypatch):
    import glm6b.io as io

    real_replace = os.replace

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(io.os, "replace", full_disk)
    out = tmp_path / "out.jsonl"
    code, err = run_cli(capsys, "generate", "--model", GOLDEN, "--input", prompts, "--output", out,
                        "--greedy", "--max-new-tokens", "2")
    monkeypatch.setattr(io.os, "replace", real_replace)
    assert code == 2 and "no space left on the device" in one_error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]


def test_sigterm_during_generate_leaves_no_temporary(tmp_path, prompts):
    """A `generate` stopped with SIGTERM mid-run removes its hidden temporary file."""
    many = tmp_path / "many.jsonl"
    many.write_text("".join(json.dumps({"prompt": f"第{i}个问题"}, ensure_ascii=False) + "\n" for i in range(400)),
                    encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "glm6b", "generate", "--model", str(GOLDEN), "--input", str(many),
                             "--output", str(tmp_path / "out.jsonl"), "--batch-size", "1", "--max-new-tokens", "8"],
                            env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.jsonl.*.tmp")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert "terminated" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many.jsonl", "prompts.jsonl"]


# ----------------------------------------------------------------------------------- case 6: faults while merging


def test_corrupt_dcp_shard_is_one_line(tmp_path, capsys, run_folder):
    broken = tmp_path / "checkpoint-2"
    shutil.copytree(run_folder / "checkpoint-2", broken)
    shard = next(broken.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    code, err = run_cli(capsys, "merge-checkpoint", "--input", broken, "--output", tmp_path / "merged")
    assert code == 2 and str(broken) in one_error_line(err)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged.tmp").exists()


@pytest.mark.parametrize("command", ["merge-lora", "merge-checkpoint"])
def test_disk_full_while_merging_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch, run_folder, adapter,
                                                               command):
    import glm6b.checkpoint.hf as hf

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "model.safetensors")

    monkeypatch.setattr(hf, "_write_shard", full)
    out = tmp_path / "merged"
    if command == "merge-lora":
        args = ["merge-lora", "--base", GOLDEN, "--adapter", adapter, "--output", out]
    else:
        args = ["merge-checkpoint", "--input", run_folder / "checkpoint-2", "--output", out, "--base-model", GOLDEN]
    code, err = run_cli(capsys, *args)
    assert code == 2 and "no space left on the device while writing model.safetensors" in one_error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_temporaries_of_killed_processes_are_removed_by_the_next_write(tmp_path):
    """SIGKILL runs no cleanup: the next write of the same file removes what the dead process left,
    and keeps what a live process is writing."""
    from glm6b.io import atomic_write_text

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.jsonl.{dead.pid}-0123456789ab.tmp"
    live = tmp_path / f".out.jsonl.{os.getpid()}-0123456789ab.tmp"
    other = tmp_path / f".other.jsonl.{dead.pid}-0123456789ab.tmp"
    for path in (stale, live, other):
        path.write_text("partial")
    atomic_write_text(tmp_path / "out.jsonl", "done\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "out.jsonl"])


def test_quantize_refuses_a_folder_with_other_files_or_holding_its_input(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, err = run_cli(capsys, "quantize", "--model", GOLDEN, "--output", mine, "--bits", "8")
    assert code == 2 and "does not write (notes.txt)" in one_error_line(err)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    code, err = run_cli(capsys, "quantize", "--model", GOLDEN, "--output", GOLDEN.parent, "--bits", "8")
    assert code == 2 and "contains the input" in one_error_line(err)


def test_atomic_folder_never_deletes_a_users_folder_under_its_temporary_names(tmp_path):
    """`<folder>.tmp` / `<folder>.old` of glm6b's own are cleared; a user's folder with such a name is refused."""
    from glm6b.io import atomic_folder

    target = tmp_path / "final"
    for name in ("final.tmp", "final.old"):
        users = tmp_path / name
        users.mkdir()
        (users / "notes.txt").write_text("mine")
        with pytest.raises(FileExistsError, match=name):
            with atomic_folder(target) as tmp:
                (tmp / "a.txt").write_text("1")
            with atomic_folder(target) as tmp:  # replacing needs <folder>.old
                (tmp / "a.txt").write_text("2")
        assert (users / "notes.txt").read_text() == "mine"
        shutil.rmtree(users)
    # glm6b's own leftovers (an interrupted write) are cleared, and no marker stays in the result
    from glm6b.io import staging_folder

    (staging_folder(target) / "half-written.bin").write_bytes(b"x")
    with atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"] and (target / "a.txt").read_text() == "3"
