"""Bad inputs give one line naming the file, field or flag (docs/reliability.md, cases 6, 7 and 8).

Each test reproduces a reported case through `glm6b.cli.main` (or the function the CLI calls) on the
golden model and checks for exit code 2, a single error line and no traceback.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from helpers import GOLDEN, one_error_line, run_cli, write_adgen_sample

from glm6b.cli import main
from glm6b.config import ChatGLMConfig, ConfigError

ROOT = Path(__file__).parent.parent
DEFAULT_ASSETS = ROOT / "glm6b" / "assets" / "default"


def golden_copy(tmp_path: Path, **config_changes) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(GOLDEN, folder, ignore=shutil.ignore_patterns("cases.json", "tensors.safetensors", "*.md"))
    if config_changes:
        config = json.loads((folder / "config.json").read_text())
        config.update(config_changes)
        (folder / "config.json").write_text(json.dumps(config))
    return folder


# ----------------------------------------------------------------------------------- case 8: config fields


@pytest.mark.parametrize("field,value,expected", [
    ("layernorm_epsilon", "abc", "expected a positive number"),
    ("num_layers", True, "expected an integer"),
    ("use_cache", "false", "expected true or false"),
    ("position_encoding_2d", 1, "expected true or false"),
    ("model_type", "llama", "expected \"chatglm\""),
    ("torch_dtype", 16, "expected null or a dtype name"),
    ("bos_token_id", 804.0, "expected an integer"),
])
def test_config_fields_are_type_checked(tmp_path, capsys, field, value, expected):
    folder = golden_copy(tmp_path, **{field: value})
    with pytest.raises(ConfigError, match=f"config field '{field}' = .*: {expected}"):
        ChatGLMConfig.from_json_file(folder / "config.json")
    code, err = run_cli(capsys, "generate", "--model", folder, "--prompt", "你好", "--max-new-tokens", "1")
    line = one_error_line(err)
    assert code == 2 and str(folder / "config.json") in line and f"'{field}'" in line


def test_presets_still_valid():
    for name in ("glm_6b", "tiny", "small", "glm_6b_4layers"):
        ChatGLMConfig.from_name(name)


# ----------------------------------------------------------------------------------- case 7: tokenizer <-> model


def test_tokenizer_of_another_model_is_refused(tmp_path, capsys):
    """The default tokenizer (1344 ids, <sop> = 1004) in the golden model's folder (vocab 1208, <sop> = 804)
    used to give IndexError or silent nonsense."""
    folder = golden_copy(tmp_path)
    for name in ("ice_text.model", "tokenizer_config.json"):
        shutil.copyfile(DEFAULT_ASSETS / name, folder / name)
    code, err = run_cli(capsys, "generate", "--model", folder, "--prompt", "你好", "--max-new-tokens", "1")
    line = one_error_line(err)
    assert code == 2 and "do not belong together" in line and "vocab_size is 1208" in line
    data = write_adgen_sample(tmp_path / "dev.json")
    code, err = run_cli(capsys, "eval", "--model", folder, "--data", data, "--output-dir", tmp_path / "eval")
    assert code == 2 and "do not belong together" in one_error_line(err)


def test_special_token_ids_are_compared(tok):
    from glm6b.tokenizer import TokenizerError, check_tokenizer_matches

    config = ChatGLMConfig.from_json_file(GOLDEN / "config.json")
    check_tokenizer_matches(tok, config)
    with pytest.raises(TokenizerError, match="bos token id is 804, the model's config.json has bos_token_id = 805"):
        check_tokenizer_matches(tok, config.replace(bos_token_id=805, eos_token_id=806))


def test_pipeline_checks_the_pair(model):
    from glm6b.inference.pipelines import TextGenerationPipeline
    from glm6b.tokenizer import TokenizerError, load_tokenizer

    with pytest.raises(TokenizerError, match="do not belong together"):
        TextGenerationPipeline(model, load_tokenizer(DEFAULT_ASSETS))


# ----------------------------------------------------------------------------------- case 6: device, text


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_one_line(capsys):
    code, err = run_cli(capsys, "generate", "--model", GOLDEN, "--prompt", "你好", "--device", "cuda")
    line = one_error_line(err)
    assert code == 2 and "device 'cuda'" in line and "--device cpu" in line


def test_unknown_device_is_one_line(capsys):
    code, err = run_cli(capsys, "generate", "--model", GOLDEN, "--prompt", "你好", "--device", "gpu0")
    assert code == 2 and "device 'gpu0': expected cpu, cuda, cuda:N or mps" in one_error_line(err)


def test_lone_surrogate_prompt_is_one_line(capsys):
    code, err = run_cli(capsys, "generate", "--model", GOLDEN, "--prompt", "ab\udcffc", "--max-new-tokens", "1")
    assert code == 2 and "not valid UTF-8" in one_error_line(err) and "byte 0xff at character 2" in err


def test_non_utf8_line_does_not_end_chat(capsys, monkeypatch):
    """A line of Latin-1 bytes on stdin used to kill `glm6b chat` (and its history) with UnicodeDecodeError."""
    stdin = io.TextIOWrapper(io.BytesIO("你好\n".encode() + b"caf\xe9\n" + "还在吗\nexit\n".encode()),
                             encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    code = main(["chat", "--model", str(GOLDEN), "--greedy", "--max-length", "24"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "byte 0xe9 at character 3" in out.err and "the conversation so far is kept" in out.err
    assert out.out.count("ChatGLM-6B: ") == 4  # banner + three answers started; the session went on
    assert "Traceback" not in out.err


# ----------------------------------------------------------------------------------- case 8: messages


def test_eval_bad_line_names_a_flag_it_has(tmp_path, capsys):
    data = write_adgen_sample(tmp_path / "dev.json")
    with open(data, "a", encoding="utf-8") as f:
        f.write("{not json\n")
    code, err = run_cli(capsys, "eval", "--model", GOLDEN, "--data", data, "--output-dir", tmp_path / "eval",
                        "--max-new-tokens", "1")
    line = one_error_line(err)
    assert code == 2 and "line 5" in line and "--skip-bad" in line
    code, err = run_cli(capsys, "eval", "--model", GOLDEN, "--data", data, "--output-dir", tmp_path / "eval",
                        "--max-new-tokens", "1", "--skip-bad")
    assert code == 0, err
    assert len((tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()) == 4
