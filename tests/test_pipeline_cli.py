"""Tests of the text-generation pipeline, model names (AutoModel/AutoTokenizer, GLM6B_HOME) and the glm6b CLI."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import GOLDEN

from glm6b.auto import AutoModel, AutoTokenizer, pipeline
from glm6b.checkpoint.names import ModelNotFoundError, models_home, resolve_model_path
from glm6b.cli import main, read_prompts
from glm6b.inference.chat import chat
from glm6b.inference.pipelines import TextGenerationPipeline

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["你好", "Write a short poem about the ocean.", "a", "北京是中国的首都"]


def _greedy_texts(model, tok, prompts, n):
    """Reference continuation texts: model.generate one prompt at a time."""
    texts = []
    for prompt in prompts:
        ids = torch.tensor([tok.encode(prompt)])
        out = model.generate(ids, max_new_tokens=n, allowed_vocab_size=len(tok))
        texts.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return texts


# ----------------------------------------------------------------------------------- pipeline


def test_pipeline_single_prompt(model, tok):
    pipe = pipeline("text_generation", model=model, tokenizer=tok, max_new_tokens=8, do_sample=False)
    out = pipe("你好")
    assert isinstance(out, list) and len(out) == 1
    assert list(out[0]) == ["text_generation_text"]
    ids = tok("你好", padding=True, return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=8, do_sample=False)[0, ids["input_ids"].shape[1]:]
    assert out[0]["text_generation_text"] == [tok.decode(generated, skip_special_tokens=True).strip()]


def test_pipeline_list_in_batches_equals_single_prompts(model, tok):
    pipe = pipeline("text-generation", model=model, tokenizer=tok, max_new_tokens=8, do_sample=False, batch_size=3)
    out = pipe(PROMPTS)
    assert [o["text_generation_text"] for o in out] == [[t] for t in _greedy_texts(model, tok, PROMPTS, 8)]
    assert pipe(PROMPTS, batch_size=1) == out


def test_pipeline_num_return_sequences_and_overrides(model, tok):
    pipe = TextGenerationPipeline(model, tok, max_new_tokens=4)
    out = pipe(["你好", "a"], do_sample=True, num_return_sequences=3, seed=0)
    assert len(out) == 2 and all(len(o["text_generation_text"]) == 3 for o in out)
    assert all(isinstance(t, str) for o in out for t in o["text_generation_text"])


def test_pipeline_errors(model, tok):
    with pytest.raises(ValueError, match="text_generation"):
        pipeline("summarization", model=model, tokenizer=tok)
    with pytest.raises(ValueError, match="tokenizer"):
        pipeline("text_generation", model=model)
    with pytest.raises(TypeError, match="top_kk"):
        pipeline("text_generation", model=model, tokenizer=tok, top_kk=2)
    with pytest.raises(ValueError, match="string"):
        pipeline("text_generation", model=model, tokenizer=tok, max_new_tokens=2)([1, 2])


def test_pipeline_from_a_folder(model, tok):
    pipe = pipeline("text_generation", model=str(GOLDEN), max_new_tokens=6, do_sample=False)
    assert pipe("a")[0]["text_generation_text"] == _greedy_texts(model, tok, ["a"], 6)


# ----------------------------------------------------------------------------------- names


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("GLM6B_HOME", str(tmp_path))
    return tmp_path


def test_names_resolve_under_glm6b_home(home, model):
    (home / "glm_6b").symlink_to(GOLDEN, target_is_directory=True)
    assert resolve_model_path("glm_6b") == home / "glm_6b"
    assert resolve_model_path("glm_6b_chat") == home / "glm_6b"  # falls back to glm_6b
    loaded = AutoModel.from_pretrained("glm_6b_chat")
    assert torch.equal(loaded.transformer.word_embeddings.weight, model.transformer.word_embeddings.weight)
    assert len(AutoTokenizer.from_pretrained("glm_6b")) == 1144
    (home / "glm_6b_chat").symlink_to(GOLDEN, target_is_directory=True)
    assert resolve_model_path("glm_6b_chat") == home / "glm_6b_chat"  # its own folder wins
    assert resolve_model_path(GOLDEN) == GOLDEN  # a folder path is used as it is


def test_missing_name_is_a_clear_error(home):
    with pytest.raises(ModelNotFoundError) as info:
        AutoModel.from_pretrained("glm_6b_chat")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for part in (str(home / "glm_6b_chat"), "GLM6B_HOME", "THUDM/chatglm-6b", "config.json", "ice_text.model",
                 "tokenizer_config.json", "pytorch_model"):
        assert part in message
    with pytest.raises(ModelNotFoundError, match="neither an existing folder nor a known model name"):
        AutoTokenizer.from_pretrained(str(home / "no_such_folder"))


def test_default_home(monkeypatch, tmp_path):
    monkeypatch.delenv("GLM6B_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert models_home() == tmp_path / ".cache" / "glm6b"


# ----------------------------------------------------------------------------------- CLI


def _write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_cli_generate_jsonl(tmp_path, model, tok, capsys):
    source = _write_jsonl(tmp_path / "prompts.jsonl",
                          [json.dumps({"prompt": p, "id": i}, ensure_ascii=False) for i, p in enumerate(PROMPTS[:3])]
                          + ["", json.dumps(PROMPTS[3], ensure_ascii=False)])
    target = tmp_path / "out.jsonl"
    code = main(["generate", "--model", str(GOLDEN), "--input", str(source), "--output", str(target),
                 "--max-new-tokens", "6", "--greedy", "--batch-size", "3"])
    assert code == 0
    rows = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [r["response"] for r in rows] == _greedy_texts(model, tok, PROMPTS, 6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "prompts.jsonl"]  # no temp file left
    assert "wrote 4 responses" in capsys.readouterr().err


def test_cli_generate_prompt(model, tok, capsys):
    assert main(["generate", "--model", str(GOLDEN), "--prompt", "你好", "--max-new-tokens", "5", "--greedy"]) == 0
    assert capsys.readouterr().out == _greedy_texts(model, tok, ["你好"], 5)[0] + "\n"


def test_cli_generate_prompt_field(tmp_path):
    source = _write_jsonl(tmp_path / "in.jsonl", ['{"content": "你好"}'])
    assert read_prompts(str(source), "content") == ["你好"]
    assert main(["generate", "--model", str(GOLDEN), "--input", str(source), "--output", str(tmp_path / "o.jsonl"),
                 "--prompt-field", "content", "--max-new-tokens", "2", "--greedy"]) == 0


@pytest.mark.parametrize("line, message", [
    ("{bad json", "not valid JSON"),
    ('{"text": "x"}', "no 'prompt' field"),
    ('{"prompt": 3}', "expected a JSON object with a string 'prompt' field"),
])
def test_cli_malformed_jsonl(tmp_path, capsys, line, message):
    source = _write_jsonl(tmp_path / "in.jsonl", ['{"prompt": "ok"}', line])
    target = tmp_path / "out.jsonl"
    code = main(["generate", "--model", str(GOLDEN), "--input", str(source), "--output", str(target)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{source}:2:" in err and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not target.exists()


def test_cli_missing_model_and_input(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GLM6B_HOME", str(tmp_path))
    assert main(["generate", "--model", "glm_6b", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "GLM6B_HOME" in err and len(err.strip().splitlines()) == 1
    assert main(["generate", "--model", str(GOLDEN), "--input", str(tmp_path / "none.jsonl"),
                 "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "none.jsonl" in capsys.readouterr().err
    assert main(["generate", "--model", str(GOLDEN), "--input", str(tmp_path / "none.jsonl")]) == 2
    assert "--output" in capsys.readouterr().err


def test_cli_chat_through_stdin(model, tok, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("你好\nclear\n你好\nexit\n"))
    assert main(["chat", "--model", str(GOLDEN), "--greedy", "--max-length", "32"]) == 0
    out, err = capsys.readouterr()
    answer, _ = chat(model, tok, "你好", [], max_length=32, do_sample=False)
    assert out.count("ChatGLM-6B: " + answer + "\n") == 2  # the streamed deltas add up to the answer, twice
    assert "history cleared" in out
    assert err.count("tokens/s") == 2


def test_cli_chat_keeps_history_and_ends_on_eof(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("你好\n北京\n"))
    assert main(["chat", "--model", str(GOLDEN), "--greedy", "--max-length", "48"]) == 0
    assert capsys.readouterr().err.count("tokens/s") == 2


def test_cli_help_and_usage(capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "--help"])
    assert info.value.code == 0 and "--max-new-tokens" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


def test_cli_subprocess(tmp_path, model, tok):
    source = _write_jsonl(tmp_path / "prompts.jsonl", ['{"prompt": "你好"}', '{"prompt": "a"}'])
    target = tmp_path / "out.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "glm6b", "generate", "--model", str(GOLDEN), "--input", str(source),
                             "--output", str(target), "--max-new-tokens", "4", "--greedy"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    assert [r["response"] for r in rows] == _greedy_texts(model, tok, ["你好", "a"], 4)
    # The CLI module itself imports no torch, so `glm6b --help` stays fast.
    probe = subprocess.run([sys.executable, "-c", "import sys, glm6b.cli; print('torch' in sys.modules)"],
                           capture_output=True, text=True, env=env, timeout=60)
    assert probe.stdout.strip() == "False"
