"""Checkpoint loading and saving (glm6b.checkpoint.hf): layouts, dtypes, memory, errors, P-tuning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from glm6b.checkpoint.hf import (
    CheckpointError,
    find_weight_files,
    iter_checkpoint_tensors,
    load_model,
    load_ptuning_state,
    parse_size,
    save_pretrained,
    save_ptuning_checkpoint,
)
from glm6b.config import ChatGLMConfig, ConfigError
from glm6b.io import atomic_write, atomic_write_text
from glm6b.model import ChatGLMForConditionalGeneration

GOLDEN = Path(__file__).parent / "golden"
EMB = "transformer.word_embeddings.weight"
PREFIX = "transformer.prefix_encoder.embedding.weight"


# ----------------------------------------------------------------------------------- helpers


def golden_state() -> dict[str, torch.Tensor]:
    """Every tensor of the golden model.safetensors (float16, incl. inv_freq buffers and lm_head)."""
    return load_file(GOLDEN / "model.safetensors")


def golden_config() -> dict:
    return json.loads((GOLDEN / "config.json").read_text())


def params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


def assert_same_params(a, b) -> None:
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        assert pa[name].dtype == pb[name].dtype, name
        assert torch.equal(pa[name], pb[name]), name


def write_folder(folder: Path, state: dict[str, torch.Tensor] | None = None, config: dict | None = None) -> Path:
    """A model folder with config.json and (if state is given) a single model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config if config is not None else golden_config()))
    if state is not None:
        save_file(state, folder / "model.safetensors")
    return folder


def write_hf_bin_shards(state: dict[str, torch.Tensor], folder: Path, num_shards: int) -> dict[str, str]:
    """The real THUDM layout: pytorch_model-0000N-of-0000M.bin (torch.save state dicts) + index.

    Keys are split into `num_shards` contiguous runs in checkpoint order, so layers span two shards.
    """
    write_folder(folder)
    names = list(state)
    per = -(-len(names) // num_shards)
    weight_map = {}
    for i in range(num_shards):
        file = f"pytorch_model-{i + 1:05d}-of-{num_shards:05d}.bin"
        chunk = {n: state[n].clone() for n in names[i * per:(i + 1) * per]}
        torch.save(chunk, folder / file)
        weight_map.update({n: file for n in chunk})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return weight_map


def layer_split_across_files(weight_map: dict[str, str]) -> bool:
    files_per_layer: dict[str, set[str]] = {}
    for name, file in weight_map.items():
        if name.startswith("transformer.layers."):
            files_per_layer.setdefault(name.split(".")[2], set()).add(file)
    return any(len(files) > 1 for files in files_per_layer.values())


def random_model(config: ChatGLMConfig, seed: int = 0, dtype=torch.float32) -> ChatGLMForConditionalGeneration:
    torch.manual_seed(seed)
    model = ChatGLMForConditionalGeneration(config, dtype=dtype)
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    return model.eval()


@pytest.fixture(scope="module")
def golden_model():
    return load_model(GOLDEN, dtype=torch.float32)


# ----------------------------------------------------------------------------------- golden / layouts


def test_golden_loads_float32_with_tied_lm_head(golden_model):
    model = golden_model
    state = golden_state()
    assert model.dtype == torch.float32
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    assert not model.training
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    # The embeddings (and so the output projection) are the file's word embeddings, not its lm_head.
    assert torch.equal(model.transformer.word_embeddings.weight, state[EMB].float())
    assert not torch.equal(state["lm_head.weight"], state[EMB])
    # Every other stored tensor (but the ignored inv_freq buffers) is loaded exactly.
    loaded = params(model)
    for name, tensor in state.items():
        if name.endswith("inv_freq") or name == "lm_head.weight":
            continue
        assert torch.equal(loaded[name], tensor.float()), name
    assert set(loaded) == {n for n in state if not n.endswith("inv_freq") and n != "lm_head.weight"}


def test_golden_forward_matches_reference_logits(golden_model):
    cases = json.loads((GOLDEN / "cases.json").read_text())
    golden = load_file(GOLDEN / "tensors.safetensors")
    case = cases["forward_single"]
    with torch.no_grad():
        logits = golden_model(torch.tensor(case["input_ids"])).logits
    expected = golden[case["logits"]]
    assert (logits - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_real_bin_layout_with_layers_split_across_shards(tmp_path, golden_model):
    weight_map = write_hf_bin_shards(golden_state(), tmp_path / "bin", num_shards=4)
    assert layer_split_across_files(weight_map)
    assert [p.name for p in find_weight_files(tmp_path / "bin")] == [
        f"pytorch_model-{i:05d}-of-00004.bin" for i in range(1, 5)]
    assert_same_params(load_model(tmp_path / "bin"), golden_model)


def test_single_pytorch_model_bin(tmp_path, golden_model):
    folder = write_folder(tmp_path / "single")
    torch.save(golden_state(), folder / "pytorch_model.bin")
    assert_same_params(load_model(folder), golden_model)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_sharded_save_round_trip(tmp_path, golden_model, safe):
    half = load_model(GOLDEN, dtype=torch.float16)
    save_pretrained(half, tmp_path / "m", max_shard_size="200KB", safe_serialization=safe)
    files = sorted(os.listdir(tmp_path / "m"))
    ext = "safetensors" if safe else "bin"
    index_name = "model.safetensors.index.json" if safe else "pytorch_model.bin.index.json"
    shards = [f for f in files if f.endswith(ext)]
    assert len(shards) >= 3 and index_name in files and "config.json" in files
    prefix = "model" if safe else "pytorch_model"
    assert shards == [f"{prefix}-{i:05d}-of-{len(shards):05d}.{ext}" for i in range(1, len(shards) + 1)]
    index = json.loads((tmp_path / "m" / index_name).read_text())
    assert layer_split_across_files(index["weight_map"])
    assert "lm_head.weight" not in index["weight_map"]  # tied: stored once, as the embeddings
    assert not any("inv_freq" in n for n in index["weight_map"])  # no buffers
    assert index["metadata"]["total_size"] == sum(p.numel() * 2 for p in golden_model.parameters())
    assert json.loads((tmp_path / "m" / "config.json").read_text())["torch_dtype"] == "float16"
    loaded = load_model(tmp_path / "m", dtype=torch.float32)
    assert_same_params(loaded, golden_model)
    assert loaded.lm_head.weight is loaded.transformer.word_embeddings.weight
    names = [name for name, _ in iter_checkpoint_tensors(tmp_path / "m")]
    assert sorted(names) == sorted(index["weight_map"])


def test_single_file_save_round_trip_and_stale_files_removed(tmp_path, golden_model):
    folder = tmp_path / "m"
    save_pretrained(golden_model, folder, max_shard_size="100KB", safe_serialization=False)
    save_pretrained(golden_model, folder, max_shard_size="100KB")
    save_pretrained(golden_model, folder)  # one file: the shards and indexes of earlier saves must go
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    assert_same_params(load_model(folder), golden_model)
    config = json.loads((folder / "config.json").read_text())
    assert config["torch_dtype"] == "float32"
    assert config["auto_map"] == golden_config()["auto_map"]  # unknown keys round-trip


def test_save_calls_tokenizer_save_pretrained(tmp_path, golden_model):
    calls = []

    class FakeTokenizer:
        def save_pretrained(self, directory):
            calls.append(Path(directory))

    save_pretrained(golden_model, tmp_path / "m", tokenizer=FakeTokenizer())
    assert calls == [tmp_path / "m"]


# ----------------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, "bfloat16", "float16"])
def test_load_in_half_dtypes(dtype):
    model = load_model(GOLDEN, dtype=dtype)
    want = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    assert {p.dtype for p in model.parameters()} == {want}
    assert torch.equal(model.transformer.word_embeddings.weight.float(), golden_state()[EMB].to(want).float())


def test_float32_checkpoint_is_not_rounded_to_float16(tmp_path):
    model = random_model(ChatGLMConfig.from_name("tiny"), seed=1)
    emb = model.transformer.word_embeddings.weight
    assert not torch.equal(emb, emb.half().float())  # the values really need float32
    save_pretrained(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m", dtype=torch.float32)
    assert_same_params(loaded, model)
    half = load_model(tmp_path / "m", dtype=torch.float16)  # cast per tensor when asked
    assert torch.equal(half.transformer.word_embeddings.weight, emb.half())


def test_untied_lm_head_is_loaded_from_the_checkpoint(tmp_path):
    config = {**golden_config(), "tie_word_embeddings": False}
    folder = write_folder(tmp_path / "m", golden_state(), config)
    model = load_model(folder)
    assert model.lm_head.weight is not model.transformer.word_embeddings.weight
    assert torch.equal(model.lm_head.weight, golden_state()["lm_head.weight"].float())
    save_pretrained(model, tmp_path / "saved")
    assert_same_params(load_model(tmp_path / "saved"), model)
    state = golden_state()
    del state["lm_head.weight"]
    write_folder(tmp_path / "nohead", state, config)
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) missing.*lm_head\.weight"):
        load_model(tmp_path / "nohead")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_on_cuda_defaults_to_half_precision(golden_model):
    model = load_model(GOLDEN, device="cuda")
    want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert model.dtype == want and model.device.type == "cuda"
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    exact = load_model(GOLDEN, device="cuda", dtype=torch.float32)
    for name, p in params(golden_model).items():
        assert torch.equal(params(exact)[name].cpu(), p), name


# ----------------------------------------------------------------------------------- peak memory

# Peak RSS of the process's own memory (VmHWM, reset through /proc/self/clear_refs before each load).
# ru_maxrss is no good here: Linux carries the forking parent's (pytest's) high-water mark over into
# the child across exec, and it cannot be reset between two loads.
_MEASURE = textwrap.dedent("""
    import ctypes, gc, json, re, sys, torch
    from glm6b.checkpoint.hf import load_model
    from glm6b.config import ChatGLMConfig
    from glm6b.model import ChatGLMForConditionalGeneration

    def status(key):
        return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

    ChatGLMForConditionalGeneration(ChatGLMConfig.from_name("tiny"), device="meta")  # lazy imports first
    libc = ctypes.CDLL(None)
    results = {}
    for folder in sys.argv[1:]:
        gc.collect()
        libc.malloc_trim(0)  # give the previous model's freed heap back, so it is not reused unseen
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = status("VmRSS")
        model = load_model(folder, dtype=torch.float32)
        peak = status("VmHWM")
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        results[folder] = {"growth": peak - before, "size": size}
        del model
    print(json.dumps(results))
""")


@pytest.mark.slow
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_peak_memory_of_loading_stays_near_the_model_size(tmp_path):
    # ~334 MB in float32, no tensor dominating (like the real model, whose shards are ~1/8 of it).
    config = ChatGLMConfig(vocab_size=16384, hidden_size=768, num_layers=10, num_attention_heads=12,
                           inner_hidden_size=3072, bos_token_id=804, eos_token_id=805, mask_token_id=800,
                           gmask_token_id=801, pad_token_id=3)
    model = ChatGLMForConditionalGeneration(config, device="meta").to_empty(device="cpu")
    model.tie_weights()
    model.init_weights(generator=torch.Generator().manual_seed(2))
    save_pretrained(model, tmp_path / "fp32_safetensors", max_shard_size="40MB")
    save_pretrained(model.half(), tmp_path / "fp16_bin", max_shard_size="40MB", safe_serialization=False)
    del model
    folders = [str(tmp_path / "fp16_bin"), str(tmp_path / "fp32_safetensors")]
    out = subprocess.run([sys.executable, "-c", _MEASURE, *folders], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout.strip().splitlines()[-1])
    ratios = {Path(k).name: round(v["growth"] / v["size"], 3) for k, v in results.items()}
    print("peak RSS growth / model size:", ratios)
    assert all(v["size"] > 300e6 for v in results.values())
    assert all(ratio < 1.5 for ratio in ratios.values()), ratios


# ----------------------------------------------------------------------------------- bad inputs


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match=r"model folder .*nowhere not found"):
        load_model(tmp_path / "nowhere")


def test_folder_without_config(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(CheckpointError, match=r"has no config\.json \(expected the HF THUDM/chatglm-6b files"):
        load_model(tmp_path / "m")


def test_folder_without_weights(tmp_path):
    write_folder(tmp_path / "m")
    with pytest.raises(CheckpointError, match=r"has no weights \(looked for model\.safetensors\.index\.json, "
                                              r"model\.safetensors, pytorch_model\.bin\.index\.json"):
        load_model(tmp_path / "m")


def test_shard_listed_in_index_but_absent(tmp_path):
    write_hf_bin_shards(golden_state(), tmp_path / "m", num_shards=3)
    os.remove(tmp_path / "m" / "pytorch_model-00002-of-00003.bin")
    with pytest.raises(CheckpointError, match=r"shard pytorch_model-00002-of-00003\.bin listed in "
                                              r".*pytorch_model\.bin\.index\.json is missing"):
        load_model(tmp_path / "m")


def test_index_that_is_not_json(tmp_path):
    write_folder(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: cannot read the index"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_truncated_shard(tmp_path, golden_model, fmt):
    save_pretrained(golden_model, tmp_path / "m", max_shard_size="300KB", safe_serialization=fmt == "safetensors")
    shard = sorted((tmp_path / "m").glob(f"*-00002-of-*.{fmt}"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{shard.name} is truncated or corrupt: "):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.safetensors"])
def test_corrupt_file(tmp_path, name):
    folder = write_folder(tmp_path / "m")
    (folder / name).write_bytes(bytes(range(256)) * 40)  # garbage
    with pytest.raises(CheckpointError, match=rf"{name} is truncated or corrupt: "):
        load_model(folder)


class NotATensor:
    pass


def test_bin_with_python_objects_is_refused(tmp_path):
    folder = write_folder(tmp_path / "m")
    torch.save({EMB: NotATensor()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"holds Python objects other than tensors; refusing to unpickle"):
        load_model(folder)


def test_bin_that_is_not_a_state_dict(tmp_path):
    folder = write_folder(tmp_path / "m")
    torch.save([torch.zeros(2)], folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"expected a state dict"):
        load_model(folder)


def test_missing_tensor_is_named(tmp_path):
    state = golden_state()
    del state["transformer.layers.1.mlp.dense_h_to_4h.bias"]
    folder = write_folder(tmp_path / "m", state)
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) missing from the checkpoint: "
                                              r"transformer\.layers\.1\.mlp\.dense_h_to_4h\.bias"):
        load_model(folder)


def test_many_missing_tensors_are_counted(tmp_path):
    state = {k: v for k, v in golden_state().items() if not k.startswith("transformer.layers.2.")}
    folder = write_folder(tmp_path / "m", state)
    with pytest.raises(CheckpointError, match=r"12 tensor\(s\) missing .*\(and 7 more\)"):
        load_model(folder)


def test_unexpected_tensor(tmp_path, golden_model):
    state = golden_state()
    state["transformer.layers.0.attention.extra.weight"] = torch.zeros(3)
    folder = write_folder(tmp_path / "m", state)
    with pytest.raises(CheckpointError,
                       match=r"1 unexpected tensor\(s\).*transformer\.layers\.0\.attention\.extra\.weight"):
        load_model(folder)
    assert_same_params(load_model(folder, strict=False), golden_model)


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    config = {**golden_config(), "inner_hidden_size": 256}
    folder = write_folder(tmp_path / "m", golden_state(), config)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor "
                                              r"transformer\.layers\.0\.mlp\.dense_4h_to_h\.weight has shape \[128, 320\], "
                                              r"expected \[128, 256\] from config\.json"):
        load_model(folder)


@pytest.mark.parametrize("change, field", [
    ({"num_attention_heads": 5}, "hidden_size"),
    ({"vocab_size": -1}, "vocab_size"),
    ({"layernorm_epsilon": 0}, "layernorm_epsilon"),
    ({"bos_token_id": 5000}, "bos_token_id"),
])
def test_impossible_config_value(tmp_path, change, field):
    folder = write_folder(tmp_path / "m", golden_state(), {**golden_config(), **change})
    with pytest.raises(ConfigError, match=rf"config\.json.*'{field}'"):
        load_model(folder)


def test_config_that_is_not_json(tmp_path):
    folder = write_folder(tmp_path / "m", golden_state())
    (folder / "config.json").write_text("{")
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        load_model(folder)


def test_quantized_tensor_is_refused(tmp_path):
    state = golden_state()
    state["transformer.layers.0.attention.dense.weight"] = torch.zeros(128, 128, dtype=torch.int8)
    folder = write_folder(tmp_path / "m", state)
    with pytest.raises(CheckpointError, match=r"dense\.weight is torch\.int8, expected floating point"):
        load_model(folder)


# ----------------------------------------------------------------------------------- atomic writes / misc


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "file.txt"
    atomic_write_text(target, "old")

    def fail(tmp):
        Path(tmp).write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["file.txt"]
    atomic_write_text(target, "new ✓")
    assert target.read_text(encoding="utf-8") == "new ✓" and os.listdir(tmp_path) == ["file.txt"]


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("200KB") == 200_000
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size(1234) == 1234
    with pytest.raises(ValueError, match="cannot read size"):
        parse_size("lots")


# ----------------------------------------------------------------------------------- P-tuning


def golden_prefix() -> torch.Tensor:
    return load_file(GOLDEN / "prefix_encoder.safetensors")[PREFIX]


def test_ptuning_file(golden_model):
    model = load_model(GOLDEN, dtype=torch.float32, ptuning_checkpoint=GOLDEN / "prefix_encoder.safetensors",
                       pre_seq_len=4, prefix_projection=False)
    weight = model.transformer.prefix_encoder.embedding.weight
    assert weight.dtype == torch.float32 and weight.requires_grad
    assert torch.equal(weight, golden_prefix())
    assert not model.transformer.word_embeddings.weight.requires_grad  # base frozen, as the reference
    base = {k: v for k, v in params(model).items() if not k.startswith("transformer.prefix_encoder.")}
    assert all(torch.equal(v, params(golden_model)[k]) for k, v in base.items())


def test_ptuning_golden_logits():
    cases = json.loads((GOLDEN / "cases.json").read_text())
    golden = load_file(GOLDEN / "tensors.safetensors")
    model = load_model(GOLDEN, ptuning_checkpoint=GOLDEN / "prefix_encoder.safetensors", pre_seq_len=4)
    case = cases["ptuning"]["single"]
    with torch.no_grad():
        logits = model(torch.tensor(case["input_ids"])).logits
    expected = golden[case["logits"]]
    assert (logits - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_ptuning_in_half_precision_keeps_prefix_encoder_float32():
    model = load_model(GOLDEN, dtype=torch.float16, ptuning_checkpoint=GOLDEN / "prefix_encoder.safetensors",
                       pre_seq_len=4)
    assert model.transformer.prefix_encoder.embedding.weight.dtype == torch.float32
    assert model.transformer.word_embeddings.weight.dtype == torch.float16


def test_ptuning_folder_round_trip(tmp_path):
    model = load_model(GOLDEN, ptuning_checkpoint=GOLDEN / "prefix_encoder.safetensors", pre_seq_len=4)
    save_ptuning_checkpoint(model, tmp_path / "pt")
    assert sorted(os.listdir(tmp_path / "pt")) == ["config.json", "pytorch_model.bin"]
    stored = torch.load(tmp_path / "pt" / "pytorch_model.bin", weights_only=True)
    assert list(stored) == [PREFIX]  # the THUDM layout: only the trainable prefix encoder
    config = json.loads((tmp_path / "pt" / "config.json").read_text())
    assert config["pre_seq_len"] == 4 and config["prefix_projection"] is False
    loaded = load_model(GOLDEN, ptuning_checkpoint=tmp_path / "pt")  # pre_seq_len from its config.json
    assert loaded.config.pre_seq_len == 4
    assert torch.equal(loaded.transformer.prefix_encoder.embedding.weight, golden_prefix())


def test_ptuning_keys_without_prefix_and_load_ptuning_state(tmp_path):
    torch.save({"embedding.weight": golden_prefix() * 2}, tmp_path / "bare.bin")
    model = load_model(GOLDEN, ptuning_checkpoint=tmp_path / "bare.bin", pre_seq_len=4)
    weight = model.transformer.prefix_encoder.embedding.weight
    assert torch.equal(weight, golden_prefix() * 2)
    load_ptuning_state(model, GOLDEN / "prefix_encoder.safetensors")
    assert model.transformer.prefix_encoder.embedding.weight is weight  # in place: optimisers keep working
    assert torch.equal(weight, golden_prefix())


def test_projected_prefix_encoder_round_trip(tmp_path, golden_model):
    model = load_model(GOLDEN, pre_seq_len=3, prefix_projection=True)  # fresh prefix encoder to train
    names = sorted(n for n in params(model) if n.startswith("transformer.prefix_encoder."))
    assert names == [f"transformer.prefix_encoder.{n}" for n in
                     ("embedding.weight", "trans.0.bias", "trans.0.weight", "trans.2.bias", "trans.2.weight")]
    save_ptuning_checkpoint(model, tmp_path / "pt")
    loaded = load_model(GOLDEN, ptuning_checkpoint=tmp_path / "pt")
    assert loaded.config.prefix_projection is True
    assert_same_params(loaded, model)
    # A full save of a P-tuning model carries the prefix encoder and its settings in config.json.
    save_pretrained(model, tmp_path / "full", max_shard_size="300KB")
    assert_same_params(load_model(tmp_path / "full"), model)


def test_ptuning_file_overrides_prefix_weights_of_a_full_save(tmp_path):
    model = load_model(GOLDEN, ptuning_checkpoint=GOLDEN / "prefix_encoder.safetensors", pre_seq_len=4)
    save_pretrained(model, tmp_path / "full")
    assert torch.equal(load_model(tmp_path / "full").transformer.prefix_encoder.embedding.weight, golden_prefix())
    torch.save({PREFIX: golden_prefix() * 3}, tmp_path / "other.bin")
    loaded = load_model(tmp_path / "full", ptuning_checkpoint=tmp_path / "other.bin")  # pre_seq_len from config
    assert torch.equal(loaded.transformer.prefix_encoder.embedding.weight, golden_prefix() * 3)


def test_ptuning_without_pre_seq_len(tmp_path):
    with pytest.raises(CheckpointError, match=r"prefix_encoder\.safetensors: pre_seq_len is unknown"):
        load_model(GOLDEN, ptuning_checkpoint=GOLDEN / "prefix_encoder.safetensors")


def test_ptuning_shape_mismatch():
    with pytest.raises(CheckpointError, match=r"tensor transformer\.prefix_encoder\.embedding\.weight has shape "
                                              r"\[4, 768\], expected \[5, 768\] from pre_seq_len=5"):
        load_model(GOLDEN, ptuning_checkpoint=GOLDEN / "prefix_encoder.safetensors", pre_seq_len=5)


def test_ptuning_projection_mismatch_is_reported():
    with pytest.raises(CheckpointError, match=r"embedding\.weight has shape \[4, 768\], expected \[4, 128\] "
                                              r"from pre_seq_len=4, prefix_projection=True"):
        load_model(GOLDEN, ptuning_checkpoint=GOLDEN / "prefix_encoder.safetensors", pre_seq_len=4,
                   prefix_projection=True)


def test_ptuning_checkpoint_not_found(tmp_path):
    with pytest.raises(CheckpointError, match=r"P-tuning checkpoint .*absent not found"):
        load_model(GOLDEN, ptuning_checkpoint=tmp_path / "absent", pre_seq_len=4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"folder .*empty has no pytorch_model\.bin or model\.safetensors"):
        load_model(GOLDEN, ptuning_checkpoint=tmp_path / "empty", pre_seq_len=4)


def test_prefix_weights_in_a_model_without_pre_seq_len(tmp_path):
    state = {**golden_state(), PREFIX: golden_prefix()}
    folder = write_folder(tmp_path / "m", state)
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*pass pre_seq_len"):
        load_model(folder)


def test_load_ptuning_state_needs_a_prefix_encoder(golden_model):
    with pytest.raises(CheckpointError, match=r"the model has no prefix encoder"):
        load_ptuning_state(golden_model, GOLDEN / "prefix_encoder.safetensors")


def _mapped_rss_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    real, total, inside = os.path.realpath(path), 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                inside = len(fields) == 6 and fields[5] == real
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


def test_fresh_copies_own_their_memory_and_cast():
    """Loaded tensors are copies (in huge pages from 4 MiB on), never views of the file's tensors."""
    from glm6b.checkpoint.hf import _fresh_copy

    for source in (torch.arange(100, dtype=torch.float16), torch.randn(3 << 20, dtype=torch.float16)):  # 200 B, 6 MiB
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            copy = _fresh_copy(source, torch.device("cpu"), dtype)
            assert copy.dtype == dtype and copy.shape == source.shape
            assert copy.untyped_storage().data_ptr() != source.untyped_storage().data_ptr()
            assert torch.equal(copy, source.to(dtype))


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs /proc/self/smaps (Linux)")
@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_loading_releases_the_mapped_file_pages_it_copied(tmp_path, suffix):
    """A copied tensor's pages of the memory-mapped checkpoint leave the process's resident memory (so the
    load's peak is the model, not the model plus a shard), and its values stay readable from the file."""
    from glm6b.checkpoint.hf import _file_mapping_ranges, _release_file_pages, iter_file_tensors

    data = torch.arange(4 << 20, dtype=torch.float32)  # 16 MiB
    path = tmp_path / f"weights{suffix}"
    if suffix == ".bin":
        torch.save({"w": data}, path)
    else:
        save_file({"w": data}, path)
    tensors = iter_file_tensors(path)
    name, mapped = next(tensors)
    assert torch.equal(mapped, data)  # every page read: resident
    ranges = _file_mapping_ranges(path)
    before = _mapped_rss_kib(path)
    _release_file_pages(mapped, ranges)
    after = _mapped_rss_kib(path)
    assert ranges and before >= 16000 and after < 100, (before, after)
    assert torch.equal(mapped, data)  # read again from the file
    _release_file_pages(data, ranges)  # not a view of the file: left alone
    assert torch.equal(data, torch.arange(4 << 20, dtype=torch.float32))
    tensors.close()
