"""MindSpore / MindFormers checkpoints: the .ckpt reader and writer against real MindSpore, the name map,
loading MindFormers files, conversion both ways, MindPet LoRA <-> PEFT, and clear errors.

Tests marked by the `ms` fixture need MindSpore (`pip install mindspore==2.10.0`, in the test extra);
they skip, saying so, only where no MindSpore wheel exists for the platform.
"""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
from helpers import GOLDEN, assert_close_rel, golden_cases, golden_tensor
from safetensors.torch import load_file

import glm6b
from glm6b.checkpoint import mindspore as msckpt
from glm6b.checkpoint.errors import CheckpointError
from glm6b.cli import main
from glm6b.convert import mindspore_to_hf

TOKENIZER_FILES = ("config.json", "ice_text.model", "tokenizer_config.json")


@pytest.fixture(scope="module")
def ms():
    try:
        import mindspore
    except ImportError:
        pytest.skip("MindSpore is not installed: no mindspore==2.10.0 wheel for this platform/Python")
    return mindspore


@pytest.fixture(scope="module")
def golden_state() -> dict[str, torch.Tensor]:
    return load_file(GOLDEN / "model.safetensors")


def _ms_tensor(ms, tensor: torch.Tensor):
    """A MindSpore tensor with the values and dtype of a torch tensor."""
    if tensor.dtype == torch.bfloat16:
        return ms.Tensor(tensor.float().numpy()).astype(ms.bfloat16)
    return ms.Tensor(tensor.numpy())


def _golden_logits(model) -> tuple[torch.Tensor, torch.Tensor]:
    case = golden_cases()["forward_single"]
    with torch.no_grad():
        return model(torch.tensor(case["input_ids"])).logits, golden_tensor(case["logits"])


def _model_folder(path, ckpt_name: str | None = None):
    """A folder with the golden config and tokenizer files (the .ckpt goes beside them)."""
    path.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(GOLDEN / name, path / name)
    return path / ckpt_name if ckpt_name else path


def _mindformers_params(ms, state: dict[str, torch.Tensor]) -> list[dict]:
    """The golden weights under MindFormers' names, float16, as convert_weight.py passes them to save_checkpoint."""
    return [{"name": msckpt.to_mindformers_name(name), "data": _ms_tensor(ms, t.half())} for name, t in state.items()]


# ----------------------------------------------------------------------------------- the name map


def test_name_map_round_trips_every_golden_tensor(golden_state):
    for name in golden_state:
        ms_name = msckpt.to_mindformers_name(name)
        assert ms_name is not None, name
        assert msckpt.to_hf_name(ms_name) == name
    assert msckpt.to_mindformers_name("transformer.word_embeddings.weight") == \
        "transformer.word_embeddings.embedding_table"
    assert msckpt.to_mindformers_name("transformer.layers.27.input_layernorm.bias") == \
        "transformer.layers.27.input_layernorm.beta"
    assert msckpt.to_mindformers_name("transformer.final_layernorm.weight") == "transformer.final_layernorm.gamma"
    assert msckpt.to_hf_name("adam_m.transformer.final_layernorm.gamma") is None
    assert msckpt.to_hf_name("transformer.layers.0.attention.query_key_value.mindpet_delta_lora_a") is None


def test_lora_names_map_between_mindpet_and_peft():
    mindpet = "transformer.layers.3.attention.query_key_value.mindpet_delta_lora_a"
    peft = "base_model.model.transformer.layers.3.attention.query_key_value.lora_A.weight"
    assert msckpt.mindpet_to_peft_name(mindpet) == peft
    assert msckpt.peft_to_mindpet_name(peft) == mindpet
    assert msckpt.mindpet_to_peft_name("transformer.layers.3.mlp.dense_4h_to_h.mindpet_delta_lora_B") == \
        "base_model.model.transformer.layers.3.mlp.dense_4h_to_h.lora_B.weight"
    assert msckpt.mindpet_to_peft_name("transformer.layers.3.attention.query_key_value.weight") is None


# ----------------------------------------------------------------------------------- format vs real MindSpore


def _every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=g)
    return {
        "f32": x, "f16": x.half(), "bf16": x.bfloat16(), "f64": x.double(),
        "i8": (x * 50).to(torch.int8), "u8": (x * 50).abs().to(torch.uint8), "i16": (x * 1e3).to(torch.int16),
        "i32": (x * 1e6).to(torch.int32), "i64": (x * 1e12).to(torch.int64), "b": x > 0,
        "u16": (x * 1e3).abs().to(torch.int32).to(torch.uint16),
        "scalar_f32": torch.tensor(0.25), "scalar_i32": torch.tensor(7, dtype=torch.int32),
    }


def test_reads_every_dtype_mindspore_writes(ms, tmp_path):
    tensors = _every_dtype()
    path = tmp_path / "all.ckpt"
    ms.save_checkpoint([{"name": k, "data": _ms_tensor(ms, v)} for k, v in tensors.items()], str(path),
                       append_dict={"epoch_num": 3, "note": "héllo wörld 你好", "lr": 0.5})
    read = dict(msckpt.iter_ckpt(path))
    assert list(read) == [*tensors, "epoch_num", "note", "lr"]
    for name, tensor in tensors.items():
        assert read[name].dtype == tensor.dtype, name
        assert read[name].shape == tensor.shape, name
        assert torch.equal(read[name], tensor), name
    assert read["note"] == "héllo wörld 你好"
    assert read["epoch_num"].dtype == torch.int64 and read["epoch_num"].item() == 3
    assert read["lr"].shape == () and read["lr"].item() == 0.5


@pytest.mark.parametrize("crc", [False, True])
def test_writer_bytes_equal_mindspore_save_checkpoint(ms, tmp_path, crc):
    tensors = _every_dtype()
    ours, theirs = tmp_path / "ours.ckpt", tmp_path / "theirs.ckpt"
    msckpt.save_ckpt(ours, [*tensors.items(), ("epoch_num", 3), ("note", "héllo 你好")], crc_check=crc)
    ms.save_checkpoint([{"name": k, "data": _ms_tensor(ms, v)} for k, v in tensors.items()], str(theirs),
                       append_dict={"epoch_num": 3, "note": "héllo 你好"}, crc_check=crc)
    assert ours.read_bytes() == theirs.read_bytes()
    loaded = ms.load_checkpoint(str(ours), crc_check=crc)
    assert torch.equal(torch.from_numpy(loaded["i64"].asnumpy()), tensors["i64"])
    assert loaded["note"] == "héllo 你好"


def test_chunked_tensors_round_trip_both_ways(ms, tmp_path, monkeypatch):
    from mindspore.train import serialization

    big = torch.arange(3000, dtype=torch.float32).reshape(1000, 3)  # 12000 bytes: many 1 KiB chunks
    # MindSpore -> glm6b: its slice size (in KiB) lowered to 1 KiB
    monkeypatch.setattr(serialization, "SLICE_SIZE", 1)
    theirs = tmp_path / "theirs.ckpt"
    ms.save_checkpoint([{"name": "big", "data": _ms_tensor(ms, big)}, {"name": "small", "data": ms.Tensor([1.0])}],
                       str(theirs))
    entries = msckpt.scan_ckpt(theirs)
    assert entries[0].chunks > 1 and entries[0].nbytes == big.numel() * 4
    read = dict(msckpt.iter_ckpt(theirs))
    assert torch.equal(read["big"], big) and read["small"].tolist() == [1.0]
    # glm6b -> MindSpore: the writer's chunk size lowered the same way; the bytes are MindSpore's
    ours = tmp_path / "ours.ckpt"
    msckpt.save_ckpt(ours, [("big", big), ("small", torch.tensor([1.0]))], chunk_bytes=1024)
    assert msckpt.scan_ckpt(ours)[0].chunks == entries[0].chunks
    assert ours.read_bytes() == theirs.read_bytes()
    assert np.array_equal(ms.load_checkpoint(str(ours))["big"].asnumpy(), big.numpy())


def test_encrypted_file_is_refused_clearly(ms, tmp_path):
    path = tmp_path / "enc.ckpt"
    ms.save_checkpoint([{"name": "a", "data": ms.Tensor(np.ones((4, 4), np.float32))}], str(path),
                       enc_key=b"0123456789abcdef")
    with pytest.raises(CheckpointError, match="encrypted MindSpore checkpoint .*decrypt it with MindSpore"):
        list(msckpt.iter_ckpt(path))


def test_crc_trailer_is_checked(ms, tmp_path):
    path = tmp_path / "crc.ckpt"
    ms.save_checkpoint([{"name": "a", "data": ms.Tensor(np.arange(64, dtype=np.float32))}], str(path),
                       crc_check=True)
    assert torch.equal(dict(msckpt.iter_ckpt(path))["a"], torch.arange(64, dtype=torch.float32))
    data = bytearray(path.read_bytes())
    data[60] ^= 0x01  # inside the tensor data: still parses, but the CRC no longer matches
    path.chmod(0o600)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="CRC32"):
        list(msckpt.iter_ckpt(path))


# ----------------------------------------------------------------------------------- errors (no MindSpore)


@pytest.fixture()
def small_ckpt(tmp_path):
    path = tmp_path / "small.ckpt"
    msckpt.save_ckpt(path, [("a", torch.arange(300, dtype=torch.float32)), ("b", torch.ones(2, 2))], crc_check=True)
    return path


def test_truncated_file_names_the_problem(small_ckpt, tmp_path):
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(small_ckpt.read_bytes()[:700])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt is truncated: the record at byte 0"):
        list(msckpt.iter_ckpt(cut))


def test_corrupt_and_foreign_files_give_clear_errors(tmp_path):
    bad = tmp_path / "bad.ckpt"
    msckpt.save_ckpt(bad, [("a", torch.ones(3))])
    size = bad.stat().st_size
    bad.write_bytes(bad.read_bytes() + b"\x55 not a record")
    with pytest.raises(CheckpointError, match=f"bad.ckpt is corrupt at byte {size}: expected a checkpoint record"):
        list(msckpt.iter_ckpt(bad))
    torch_file = tmp_path / "torch.ckpt"
    torch.save({"a": torch.ones(2)}, torch_file)
    with pytest.raises(CheckpointError, match="not a MindSpore checkpoint"):
        list(msckpt.iter_ckpt(torch_file))
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        list(msckpt.iter_ckpt(empty))
    with pytest.raises(CheckpointError, match="not found"):
        list(msckpt.iter_ckpt(tmp_path / "missing.ckpt"))
    encrypted = tmp_path / "enc.ckpt"  # the 4-byte magic MindSpore 2.10 puts before AES-GCM data
    encrypted.write_bytes(b"\xd8\x5e\x3a\x7f" + bytes(60))
    with pytest.raises(CheckpointError, match="encrypted"):
        list(msckpt.iter_ckpt(encrypted))


def test_flipped_data_byte_fails_the_crc(small_ckpt, tmp_path):
    data = bytearray(small_ckpt.read_bytes())
    data[100] ^= 0x10
    flipped = tmp_path / "flipped.ckpt"
    flipped.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="CRC32"):
        list(msckpt.iter_ckpt(flipped))


def test_writer_round_trips_large_chunked_tensor_without_mindspore(tmp_path):
    big = torch.randn(257, 129)
    path = tmp_path / "big.ckpt"
    msckpt.save_ckpt(path, [("big", big), ("s", "text")], chunk_bytes=4096)
    assert msckpt.scan_ckpt(path)[0].chunks == -(-big.numel() * 4 // 4096)
    read = dict(msckpt.iter_ckpt(path))
    assert torch.equal(read["big"], big) and read["s"] == "text"


# ----------------------------------------------------------------------------------- loading MindFormers files


def test_mindspore_written_mindformers_checkpoint_reproduces_golden_logits(ms, golden_state, tmp_path, caplog):
    path = _model_folder(tmp_path / "m", "glm_6b.ckpt")
    params = _mindformers_params(ms, golden_state)
    optimizer = [{"name": f"adam_m.{p['name']}", "data": ms.Tensor(np.zeros(p["data"].shape, np.float32))}
                 for p in params[:3]]
    ms.save_checkpoint(params + optimizer, str(path), append_dict={"global_step": 10, "learning_rate": 1e-4})
    with caplog.at_level(logging.WARNING, logger="glm6b.checkpoint.mindspore"):
        model = glm6b.load_model(path, dtype=torch.float32)
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 1 and "skipped 5 optimizer-state / training entries" in skipped[0]
    ours, golden = _golden_logits(model)
    assert_close_rel(ours, golden, what="logits from a MindSpore-written .ckpt")
    # the same through AutoModel / AutoTokenizer and the pipeline, with the files beside the .ckpt
    from glm6b.auto import AutoModel, AutoTokenizer

    assert_close_rel(_golden_logits(AutoModel.from_pretrained(str(path), dtype=torch.float32))[0], golden)
    tok = AutoTokenizer.from_pretrained(str(path))
    assert tok.encode(golden_cases()["tokenizer_encode"][1]["text"]) == golden_cases()["tokenizer_encode"][1]["ids"]


def test_ckpt_without_config_uses_given_config_and_names_mismatched_tensor(golden_state, tmp_path):
    path = tmp_path / "alone" / "glm_6b.ckpt"
    path.parent.mkdir()
    entries = [(msckpt.to_mindformers_name(n), t) for n, t in golden_state.items()]
    msckpt.save_ckpt(path, entries)
    model = glm6b.load_model(path, dtype=torch.float32, config=GOLDEN / "config.json")
    assert_close_rel(*_golden_logits(model))
    # no config.json beside it and none given: the glm_6b preset, which the tiny tensors do not fit
    with pytest.raises(CheckpointError, match=r"glm_6b\.ckpt: tensor \S+ has shape \[.*\], expected \["):
        glm6b.load_model(path, dtype=torch.float32)
    # a tensor of the wrong shape is named
    wrong = [(n, t[:, :100] if n.endswith("dense_4h_to_h.weight") else t) for n, t in entries]  # not a shard
    msckpt.save_ckpt(path, wrong)
    with pytest.raises(CheckpointError,
                       match=r"transformer\.layers\.\d\.mlp\.dense_4h_to_h\.weight has shape \[128, 100\]"):
        glm6b.load_model(path, dtype=torch.float32, config=GOLDEN / "config.json")


def test_model_parallel_shard_is_explained(golden_state, tmp_path):
    path = _model_folder(tmp_path / "rank_0", "mindformers_rank_0-1_1.ckpt")
    # model parallel 2: query_key_value split by rows (the embedding table is whole here)
    entries = [(msckpt.to_mindformers_name(n), t[: t.shape[0] // 2] if "query_key_value" in n else t)
               for n, t in golden_state.items()]
    msckpt.save_ckpt(path, entries)
    with pytest.raises(CheckpointError, match=r"one rank's shard of a model-parallel MindFormers run "
                                              r"\(transformer\.layers\.\d\.attention\.query_key_value\.\w+ is \[192"):
        glm6b.load_model(path)


def test_entry_whose_data_does_not_fit_its_dims(tmp_path):
    path = tmp_path / "dims.ckpt"
    msckpt.save_ckpt(path, [("a", torch.ones(4))])
    header = b"\x08\x04\x12\x07Float32"
    data = path.read_bytes()
    assert data.count(header) == 1
    path.write_bytes(data.replace(header, b"\x08\x05\x12\x07Float32"))  # dims [5] over 4 floats
    with pytest.raises(CheckpointError, match="entry a has 16 bytes, expected 20 for shape \\[5\\] Float32"):
        list(msckpt.iter_ckpt(path))


# ----------------------------------------------------------------------------------- conversion


def test_glm6b_written_ckpt_loads_in_mindspore_with_mindformers_names_and_dtypes(ms, golden_state, tmp_path):
    out = tmp_path / "ms_glm_6b.ckpt"
    assert main(["convert", "--input", str(GOLDEN), "--output", str(out), "--to", "mindspore"]) == 0
    loaded = ms.load_checkpoint(str(out))
    expected = {msckpt.to_mindformers_name(n) for n in golden_state}
    assert set(loaded) == expected
    for name, tensor in golden_state.items():
        param = loaded[msckpt.to_mindformers_name(name)]
        assert str(param.dtype) == "Float16", name  # convert_weight.py: model.half()
        assert np.array_equal(param.asnumpy(), tensor.numpy()), name


def test_glm6b_folder_without_buffers_gets_lm_head_and_inv_freq(ms, tmp_path):
    model = glm6b.load_model(GOLDEN, dtype=torch.float32)
    folder = tmp_path / "saved"
    model.save_pretrained(folder)  # glm6b folders hold neither the tied lm_head nor the rotary buffers
    out = tmp_path / "ms.ckpt"
    # the seed's flag names: convert_weight.py --pt_ckpt_path <hf model> --ms_ckpt_path <out>
    assert main(["convert", "--pt_ckpt_path", str(folder / "config.json"), "--ms_ckpt_path", str(out),
                 "--dtype", "float32"]) == 0
    loaded = ms.load_checkpoint(str(out))
    embedding = loaded["transformer.word_embeddings.embedding_table"].asnumpy()
    assert str(loaded["transformer.word_embeddings.embedding_table"].dtype) == "Float32"
    assert str(loaded["transformer.layers.0.input_layernorm.gamma"].dtype) == "Float16"  # as convert_weight.py
    assert str(loaded["transformer.layers.0.post_attention_layernorm.gamma"].dtype) == "Float32"
    assert np.array_equal(loaded["lm_head.weight"].asnumpy(), embedding)
    inv_freq = loaded["transformer.layers.2.attention.rotary_emb.inv_freq"].asnumpy()
    assert np.array_equal(inv_freq, np.array(golden_cases()["model_facts"]["inv_freq_layer0"], np.float32))


def test_convert_to_hf_folder_and_back(golden_state, tmp_path):
    path = _model_folder(tmp_path / "m", "glm_6b.ckpt")
    msckpt.save_ckpt(path, [(msckpt.to_mindformers_name(n), t) for n, t in golden_state.items()]
                     + [("adam_v.transformer.final_layernorm.gamma", torch.zeros(128)), ("global_step", 3)])
    hf_dir = tmp_path / "hf"
    assert main(["convert", "--input", str(path), "--output", str(hf_dir)]) == 0
    assert {"config.json", "ice_text.model", "tokenizer_config.json", "model.safetensors"} <= \
        {p.name for p in hf_dir.iterdir()}
    assert load_file(hf_dir / "model.safetensors")["transformer.layers.0.mlp.dense_h_to_4h.weight"].dtype == \
        torch.float16  # the stored dtype is kept
    assert_close_rel(*_golden_logits(glm6b.load_model(hf_dir, dtype=torch.float32)))
    back = tmp_path / "back.ckpt"
    # the seed's reverse direction: convert_reversed.py --ms_ckpt_path <in> --pt_ckpt_path <out>
    assert main(["convert", "--input", str(hf_dir), "--output", str(back)]) == 0
    for name, tensor in msckpt.iter_ckpt(back):
        hf_name = msckpt.to_hf_name(name)
        if hf_name in golden_state and hf_name != "lm_head.weight":  # glm6b folders store lm_head tied
            assert torch.equal(tensor, golden_state[hf_name]), name


def test_seed_reverse_flags_convert_ckpt_to_hf(golden_state, tmp_path):
    path = _model_folder(tmp_path / "m", "glm_6b.ckpt")
    msckpt.save_ckpt(path, [(msckpt.to_mindformers_name(n), t) for n, t in golden_state.items()])
    out = tmp_path / "pt"
    assert main(["convert", "--ms_ckpt_path", str(path), "--pt_ckpt_path", str(out)]) == 0
    assert_close_rel(*_golden_logits(glm6b.load_model(out, dtype=torch.float32)))


# ----------------------------------------------------------------------------------- MindPet LoRA


def _lora_tensors(state, rank=4, modules=("attention.query_key_value", "mlp.dense_4h_to_h")):
    g = torch.Generator().manual_seed(1)
    lora = {}
    for i in range(glm6b.ChatGLMConfig.from_json_file(GOLDEN / "config.json").num_layers):
        for module in modules:
            weight = state[f"transformer.layers.{i}.{module}.weight"]
            out_features, in_features = weight.shape
            prefix = f"transformer.layers.{i}.{module}"
            lora[f"{prefix}.mindpet_delta_lora_a"] = torch.randn(rank, in_features, generator=g) * 0.1
            lora[f"{prefix}.mindpet_delta_lora_b"] = torch.randn(out_features, rank, generator=g) * 0.1
    return lora


def _merged_model(state, lora, alpha, rank):
    """The golden model with W + (alpha / r) B @ A put into its weights by hand."""
    model = glm6b.load_model(GOLDEN, dtype=torch.float32)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, a in lora.items():
            if name.endswith("_a"):
                module = name[: -len(".mindpet_delta_lora_a")]
                b = lora[module + ".mindpet_delta_lora_b"]
                params[module + ".weight"] += (alpha / rank) * (b @ a)
    return model


def test_mindpet_lora_checkpoint_becomes_base_and_peft_adapter(ms, golden_state, tmp_path, monkeypatch):
    rank, alpha = 4, 32
    lora = _lora_tensors(golden_state, rank)
    path = _model_folder(tmp_path / "m", "glm_6b_lora.ckpt")
    params = _mindformers_params(ms, golden_state) + [{"name": n, "data": _ms_tensor(ms, t)} for n, t in lora.items()]
    ms.save_checkpoint(params, str(path))
    with pytest.raises(CheckpointError, match="MindPet LoRA tensors.*glm6b convert"):
        glm6b.load_model(path)
    with pytest.raises(CheckpointError, match="--lora-alpha"):
        mindspore_to_hf(path, tmp_path / "x", adapter_output=tmp_path / "y")
    home = tmp_path / "home"
    base, adapter = home / "glm_6b", home / "glm_6b_lora"
    # the rank is read from the tensors
    assert main(["convert", "--input", str(path), "--output", str(base), "--adapter-output", str(adapter),
                 "--lora-alpha", str(alpha), "--dtype", "float32"]) == 0
    expected, _ = _golden_logits(_merged_model(golden_state, lora, alpha, rank))

    from glm6b.checkpoint.adapters import load_adapter

    with_adapter = load_adapter(glm6b.load_model(base, dtype=torch.float32), adapter)
    assert_close_rel(_golden_logits(with_adapter)[0], expected, what="base + PEFT adapter vs merged by hand")
    # the named pair under GLM6B_HOME
    monkeypatch.setenv("GLM6B_HOME", str(home))
    from glm6b.auto import AutoModel, AutoTokenizer

    for name in ("glm_6b_lora", "glm_6b_lora_chat"):
        assert_close_rel(_golden_logits(AutoModel.from_pretrained(name, dtype=torch.float32))[0], expected, what=name)
    assert len(AutoTokenizer.from_pretrained("glm_6b_lora")) == len(glm6b.load_tokenizer(GOLDEN))
    # merge-lora takes the adapter too
    merged = tmp_path / "merged"
    assert main(["merge-lora", "--base", str(base), "--adapter", str(adapter), "--output", str(merged)]) == 0
    assert_close_rel(_golden_logits(glm6b.load_model(merged, dtype=torch.float32))[0], expected, what="merge-lora")

    # and back: base + adapter -> one glm_6b_lora .ckpt with MindPet names, which MindSpore loads
    back = tmp_path / "back_lora.ckpt"
    assert main(["convert", "--input", str(base), "--adapter", str(adapter), "--output", str(back),
                 "--to", "mindspore", "--dtype", "float32"]) == 0
    loaded = ms.load_checkpoint(str(back))
    for name, tensor in lora.items():
        assert np.allclose(loaded[name].asnumpy(), tensor.numpy(), rtol=0, atol=1e-7), name
    assert "transformer.layers.0.attention.query_key_value.weight" in loaded


def test_lora_rank_mismatch_is_refused(golden_state, tmp_path):
    lora = _lora_tensors(golden_state, rank=4, modules=("attention.query_key_value",))
    path = _model_folder(tmp_path / "m", "glm_6b_lora.ckpt")
    msckpt.save_ckpt(path, [(msckpt.to_mindformers_name(n), t) for n, t in golden_state.items()] + list(lora.items()))
    with pytest.raises(CheckpointError, match="--lora-rank 8 does not match .* rank 4"):
        mindspore_to_hf(path, tmp_path / "b", adapter_output=tmp_path / "a", lora_rank=8, lora_alpha=32)
    with pytest.raises(CheckpointError, match="--adapter-output"):
        mindspore_to_hf(path, tmp_path / "b")


# ----------------------------------------------------------------------------------- --model x.ckpt everywhere


def test_generate_cli_and_pipeline_take_a_ckpt(golden_state, tmp_path, capsys):
    alone = tmp_path / "alone" / "glm_6b.ckpt"  # no config or tokenizer beside it: --config / --tokenizer
    alone.parent.mkdir()
    msckpt.save_ckpt(alone, [(msckpt.to_mindformers_name(n), t) for n, t in golden_state.items()])
    prompt = "你好"
    common = ["--prompt", prompt, "--greedy", "--max-new-tokens", "4", "--dtype", "float32"]
    assert main(["generate", "--model", str(GOLDEN), *common]) == 0
    expected = capsys.readouterr().out
    assert main(["generate", "--model", str(alone), "--tokenizer", str(GOLDEN), "--config",
                 str(GOLDEN / "config.json"), *common]) == 0
    assert capsys.readouterr().out == expected
    beside = _model_folder(tmp_path / "beside", "glm_6b.ckpt")
    shutil.copy(alone, beside)
    pipe = glm6b.pipeline("text_generation", model=str(beside), dtype=torch.float32, max_new_tokens=4, do_sample=False)
    assert pipe(prompt)[0]["text_generation_text"][0] == expected.strip()


def test_named_model_folder_holding_a_ckpt(golden_state, tmp_path, monkeypatch):
    # MindFormers' download layout: glm_6b.ckpt beside ice_text.model (config.json here too: the tiny shape)
    ckpt = _model_folder(tmp_path / "glm_6b", "glm_6b.ckpt")
    msckpt.save_ckpt(ckpt, [(msckpt.to_mindformers_name(n), t) for n, t in golden_state.items()])
    monkeypatch.setenv("GLM6B_HOME", str(tmp_path))
    from glm6b.auto import AutoModel, AutoTokenizer
    from glm6b.checkpoint.names import resolve_model_path

    assert resolve_model_path("glm_6b_chat") == ckpt
    assert resolve_model_path(tmp_path / "glm_6b") == ckpt
    assert_close_rel(*_golden_logits(AutoModel.from_pretrained("glm_6b_chat", dtype=torch.float32)))
    assert len(AutoTokenizer.from_pretrained("glm_6b")) == len(glm6b.load_tokenizer(GOLDEN))


def test_recipe_load_checkpoint_takes_a_ckpt(golden_state, tmp_path, capsys):
    ckpt = _model_folder(tmp_path / "m", "glm_6b.ckpt")
    msckpt.save_ckpt(ckpt, [(msckpt.to_mindformers_name(n), t) for n, t in golden_state.items()])
    outputs = []
    for model in (GOLDEN, ckpt):
        out = tmp_path / f"out-{len(outputs)}"
        assert main(["run", "--config", "infer", "--mode", "predict",
                     "--load-checkpoint", str(model), "--prompt", "你好", "--output-dir", str(out),
                     "--set", "model.dtype=float32", "--set", "model.device=cpu",
                     "--set", "generation.max_new_tokens=4"]) == 0
        outputs.append((out / "predictions.jsonl").read_text(encoding="utf-8"))
    assert outputs[0] == outputs[1] and "你好" in outputs[0]
