"""One set of flags: every command that loads a model takes the same model flags (derived from LoadConfig), the
generating commands the same sampling flags (GenerationConfig), and every command loads through the one
loader with one device default."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from helpers import GOLDEN, write_adgen_sample

from glm6b.cli import build_parser, field_docs, main
from glm6b.config import GenerationConfig, LoadConfig

LOADING_COMMANDS = ("chat", "generate", "eval", "serve", "run", "quantize", "merge-lora")
GENERATING_COMMANDS = ("chat", "generate", "eval")
MODEL_FLAGS = {"--model", "--load-checkpoint", "--preset", "--tokenizer", "--model-config", "--dtype", "--device",
               "--quantize", "--quantize-embeddings", "--adapter", "--merge-adapter", "--pre-seq-len",
               "--prefix-projection", "--ptuning-checkpoint", "--compile",
               "--bits", "--embeddings"}  # the first releases' spellings of --quantize / --quantize-embeddings
SAMPLING_FLAGS = {"--do-sample", "--greedy", "--temperature", "--top-k", "--top-p", "--repetition-penalty", "--seed"}
LOOKUP_FLAGS = {"--prompt-lookup", "--prompt-lookup-num-tokens", "--prompt-lookup-max-ngram", "--prompt-lookup-corpus"}


def subcommands() -> dict:
    parser = build_parser()
    return parser._subparsers._group_actions[0].choices


def option_strings(parser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


def test_every_load_config_field_has_a_flag_with_its_doc_as_help():
    docs = field_docs(LoadConfig)
    assert set(docs) == {f.name for f in dataclasses.fields(LoadConfig)}
    chat = subcommands()["chat"]
    helps = {}
    for action in chat._actions:  # the first flag of a field (an older spelling may share its dest)
        helps.setdefault(action.dest, action.help)
    for name, doc in docs.items():
        assert helps[name] == doc.replace("%", "%%"), name


@pytest.mark.parametrize("command", LOADING_COMMANDS)
def test_every_loading_command_takes_the_same_model_flags(command):
    flags = option_strings(subcommands()[command])
    assert MODEL_FLAGS <= flags, f"glm6b {command} lacks {sorted(MODEL_FLAGS - flags)}"


@pytest.mark.parametrize("command", GENERATING_COMMANDS)
def test_every_generating_command_takes_the_same_sampling_flags(command):
    flags = option_strings(subcommands()[command])
    assert SAMPLING_FLAGS <= flags, f"glm6b {command} lacks {sorted(SAMPLING_FLAGS - flags)}"


@pytest.mark.parametrize("command", (*GENERATING_COMMANDS, "serve"))
def test_every_decoding_command_takes_the_prompt_lookup_flags(command):
    flags = option_strings(subcommands()[command])
    assert LOOKUP_FLAGS <= flags, f"glm6b {command} lacks {sorted(LOOKUP_FLAGS - flags)}"


def test_flags_parse_to_the_dataclass_values():
    args = build_parser().parse_args(["eval", "--model", "m", "--data", "d", "--output-dir", "o", "--bits", "4",
                                      "--embeddings", "--compile", "false", "--no-merge-adapter", "--do-sample",
                                      "--top-k", "5", "--max_source_length", "32"])
    assert (args.quantize, args.quantize_embeddings, args.compile, args.merge_adapter) == ("int4", True, False, False)
    assert (args.do_sample, args.top_k, args.max_source_length) == (True, 5, 32)
    assert build_parser().parse_args(["chat", "--model", "m", "--greedy"]).do_sample is False
    assert build_parser().parse_args(["chat", "--model", "m"]).do_sample is True  # THUDM's chat samples
    assert build_parser().parse_args(["eval", "--model", "m", "--data", "d", "--output-dir", "o"]).do_sample is False
    # run: only the model flags given override the recipe
    run = build_parser().parse_args(["run", "--config", "lora", "--mode", "eval", "--model", "m", "--quantize", "int8"])
    assert (run.load_checkpoint, run.quantize) == ("m", "int8") and not hasattr(run, "dtype")


def test_sampling_flag_defaults_are_valid_generation_settings():
    args = build_parser().parse_args(["generate", "--model", "m", "--prompt", "x"])
    GenerationConfig(**{name: getattr(args, name) for name in ("do_sample", "temperature", "top_k", "top_p",
                                                                 "repetition_penalty", "seed")}).validate()


def test_help_imports_no_torch():
    code = ("import sys\nfrom glm6b.cli import main\ntry:\n    main(['eval', '--help'])\nexcept SystemExit:\n    pass\n"
            "sys.exit(3 if 'torch' in sys.modules else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, "glm6b eval --help imported torch"
    assert "--quantize-embeddings" in result.stdout


class _Loaded(Exception):
    """Raised by the patched reader: the command got as far as reading the weights."""


@pytest.fixture
def fake_cuda(monkeypatch):
    """A machine that reports one CUDA GPU with bfloat16; reading weights records where they would go."""
    import glm6b.checkpoint.hf as hf

    seen = {}
    real_check = hf.check_device

    def check_device(device):
        if device is not None and torch.device(device).type == "cuda":
            return torch.device(device)
        return real_check(device)

    def read(path, dtype=None, device=None, **kwargs):
        seen.update(device=torch.device(device), dtype=dtype)
        raise _Loaded

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(hf, "check_device", check_device)
    monkeypatch.setattr(hf, "load_model", read)
    return seen


def _command_line(command: str, tmp_path) -> list[str]:
    data = write_adgen_sample(tmp_path / "data.json")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    return {
        "chat": ["chat", "--model", str(GOLDEN)],
        "generate": ["generate", "--model", str(GOLDEN), "--prompt", "你好"],
        "eval": ["eval", "--model", str(GOLDEN), "--data", str(data), "--output-dir", str(tmp_path / "eval")],
        "serve": ["serve", "--model", str(GOLDEN)],
        "run": ["run", "--config", "infer", "--mode", "eval", "--load-checkpoint", str(GOLDEN), "--eval-data", str(data),
                "--output-dir", str(tmp_path / "run")],
        "quantize": ["quantize", "--model", str(GOLDEN), "--quantize", "int4", "--output", str(tmp_path / "int4")],
        "merge-lora": ["merge-lora", "--model", str(GOLDEN), "--adapter", str(adapter), "--output", str(tmp_path / "m")],
    }[command]


@pytest.mark.parametrize("command", ["chat", "generate", "eval", "serve", "run"])
def test_inference_commands_default_to_cuda_in_bfloat16(fake_cuda, tmp_path, command, monkeypatch):
    if command == "serve":
        pytest.importorskip("fastapi", reason="the serve extra is not installed")
    monkeypatch.setenv("GLM6B_DEBUG", "1")  # let the sentinel through instead of one error line
    with pytest.raises(_Loaded):
        main(_command_line(command, tmp_path))
    assert fake_cuda == {"device": torch.device("cuda"), "dtype": torch.bfloat16}


@pytest.mark.parametrize("command", ["quantize", "merge-lora"])
def test_writing_commands_default_to_cuda_too(fake_cuda, tmp_path, command, monkeypatch):
    monkeypatch.setenv("GLM6B_DEBUG", "1")
    with pytest.raises(_Loaded):
        main(_command_line(command, tmp_path))
    # the dtype of what they write: float16 (THUDM's quantized layout), float32 (an exact merge)
    assert fake_cuda == {"device": torch.device("cuda"),
                         "dtype": torch.float16 if command == "quantize" else torch.float32}


def test_device_flag_overrides_the_default(fake_cuda, tmp_path, monkeypatch):
    monkeypatch.setenv("GLM6B_DEBUG", "1")
    with pytest.raises(_Loaded):
        main(_command_line("eval", tmp_path) + ["--device", "cpu", "--quantize", "int8"])
    assert fake_cuda["device"] == torch.device("cpu")
