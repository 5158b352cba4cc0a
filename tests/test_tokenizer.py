"""Tests of glm6b.tokenizer against the golden reference cases (exact equality) and its own contract."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from glm6b.tokenizer import ChatGLMTokenizer, TokenizerError, load_tokenizer

GOLDEN = Path(__file__).parent / "golden"
CASES = json.loads((GOLDEN / "cases.json").read_text(encoding="utf-8"))


def _tensor(value):
    """Golden tensor values are either inline lists or names in tensors.safetensors."""
    if isinstance(value, str):
        from safetensors.torch import load_file

        return load_file(str(GOLDEN / "tensors.safetensors"))[value].tolist()
    return value


def _ids(item):
    return item.get("text", str(item.get("ids")))[:40]


# ---------------------------------------------------------------------------------------------- golden


def test_facts(tok):
    facts = CASES["tokenizer_facts"]
    for piece, expected in facts["piece_ids"].items():
        assert tok.convert_tokens_to_ids(piece) == expected, piece
        assert tok.convert_ids_to_tokens(expected) == piece
    for name in ("bos", "eos", "pad", "unk", "mask", "gmask", "end"):
        assert getattr(tok, f"{name}_token_id") == facts[f"{name}_token_id"], name
    assert tok.all_special_ids == facts["all_special_ids"]
    assert tok.vocab_size == len(tok) == facts["tokenizer_vocab_size"] == facts["sp_pieces"]
    assert tok.num_image_tokens == facts["num_image_tokens"]
    assert tok.padding_side == facts["padding_side"]
    assert tok.model_input_names == ["input_ids", "attention_mask", "position_ids"]
    vocab = tok.get_vocab()
    assert len(vocab) == tok.vocab_size and vocab["<sop>"] == facts["bos_token_id"]


@pytest.mark.parametrize("item", CASES["tokenizer_encode"], ids=_ids)
def test_encode(tok, item):
    assert tok.tokenize(item["text"]) == item["tokens"]
    assert tok.encode(item["text"]) == item["ids"]
    assert tok.encode(item["text"], add_special_tokens=False) == item["ids_no_special"]
    assert tok.convert_tokens_to_ids(item["tokens"]) == item["ids_no_special"]
    assert tok.decode(item["ids"]) == item["decoded"]
    assert tok.decode(item["ids"], skip_special_tokens=True) == item["decoded_skip_special"]
    assert tok.decode(item["ids"], clean_up_tokenization_spaces=False) == item["decoded_no_cleanup"]


@pytest.mark.parametrize("item", CASES["tokenizer_decode"], ids=lambda it: str(it["ids"])[:40] + str(it["kwargs"]))
def test_decode(tok, item):
    assert tok.decode(item["ids"], **item["kwargs"]) == item["text"]


def test_pair(tok):
    case = CASES["tokenizer_pair"]
    assert tok.encode(case["text"], case["text_pair"]) == case["ids"]
    assert tok(case["text"], case["text_pair"])["input_ids"] == case["ids"]


def test_truncation(tok):
    case = CASES["tokenizer_truncation"]
    out = tok(case["text"], max_length=case["max_length"], truncation=case["truncation"])
    assert out["input_ids"] == case["ids"]
    assert tok.encode(case["text"], max_length=case["max_length"], truncation=True) == case["ids"]


def test_call_single(tok):
    case = CASES["tokenizer_call_single"]
    out = tok(case["text"])
    assert sorted(out) == sorted(case["keys"])
    assert out["input_ids"] == case["input_ids"]


def test_batch_padding(tok):
    case = CASES["tokenizer_batch"]
    out = tok(case["texts"], padding=True)
    assert sorted(out) == sorted(case["keys"])
    assert out["input_ids"] == _tensor(case["input_ids"])
    assert out["attention_mask"] == _tensor(case["attention_mask"])
    assert out["position_ids"] == _tensor(case["position_ids"])


def test_batch_padding_tensors(tok):
    case = CASES["tokenizer_batch"]
    out = tok(case["texts"], padding=True, return_tensors="pt")
    batch, length = len(case["texts"]), len(_tensor(case["input_ids"])[0])
    assert out.input_ids.dtype == torch.int64 and out.input_ids.shape == (batch, length)
    assert out.attention_mask.dtype == torch.bool and out.attention_mask.shape == (batch, 1, length, length)
    assert out.position_ids.dtype == torch.int64 and out.position_ids.shape == (batch, 2, length)
    assert out.attention_mask.tolist() == _tensor(case["attention_mask"])
    assert out.position_ids.tolist() == _tensor(case["position_ids"])
    assert out.to("cpu") is out
    arrays = tok(case["texts"], padding=True, return_tensors="np")
    assert arrays["attention_mask"].dtype == np.bool_ and arrays["input_ids"].dtype == np.int64
    single = tok(case["texts"][0], return_tensors="pt")
    assert single["input_ids"].shape == (1, len(tok.encode(case["texts"][0])))


def test_batch_no_padding(tok):
    case = CASES["tokenizer_batch_no_padding"]
    out = tok(case["texts"])
    assert sorted(out) == sorted(case["keys"])
    assert out["input_ids"] == case["input_ids"]
    with pytest.raises(TokenizerError, match="different lengths"):
        tok(case["texts"], return_tensors="pt")


def test_eval_adgen_preprocess(tok):
    case = CASES["eval_adgen_preprocess"]
    inputs = tok(case["inputs"], max_length=case["max_source_length"], truncation=True, padding=True)
    assert inputs["input_ids"] == _tensor(case["input_ids"])
    assert inputs["attention_mask"] == _tensor(case["attention_mask"])
    assert inputs["position_ids"] == _tensor(case["position_ids"])
    labels = tok(text_target=case["targets"], max_length=case["max_target_length"], truncation=True)["input_ids"]
    labels = [[(-100 if i == tok.pad_token_id else i) for i in row] for row in labels]
    assert labels == _tensor(case["labels"])
    both = tok(case["inputs"], text_target=case["targets"], max_length=case["max_target_length"], truncation=True)
    assert both["labels"] == tok(text_target=case["targets"], max_length=case["max_target_length"], truncation=True)["input_ids"]


# ---------------------------------------------------------------------------------------------- behaviour


def test_mask_positions_prefer_mask(tok):
    out = tok(["a [MASK] b", "a b"], padding=True)
    ids = out["input_ids"][0]
    mask_at = ids.index(tok.mask_token_id)
    sop_at = ids.index(tok.bos_token_id)
    assert out["position_ids"][0][0][sop_at:] == [mask_at] * (len(ids) - sop_at)
    row = out["input_ids"][1]
    pad = row.count(tok.pad_token_id)
    assert pad == len(ids) - len(tok.encode("a b"))
    assert out["position_ids"][1][0][:pad] == [0] * pad
    assert all(out["attention_mask"][1][0][r][c] for r in range(len(row)) for c in range(pad))


def test_pad_to_multiple_and_max_length(tok):
    out = tok(["你好"], padding=True, pad_to_multiple_of=8)
    assert len(out["input_ids"][0]) == 8 and out["input_ids"][0][:3] == [tok.pad_token_id] * 3
    out = tok("你好", padding="max_length", max_length=7, return_tensors="pt")
    assert out["input_ids"].shape == (1, 7) and out["attention_mask"].shape == (1, 1, 7, 7)
    with pytest.raises(TokenizerError, match="padding length"):
        tok("Hello world", padding="max_length", max_length=3, truncation=False)


def test_pair_truncation_longest_first(tok):
    a, b = tok.encode("aaaaaaaaaa", add_special_tokens=False), tok.encode("你好", add_special_tokens=False)
    ids = tok.encode("aaaaaaaaaa", "你好", max_length=9, truncation=True)
    assert len(ids) == 9
    assert ids == a[:3] + [tok.gmask_token_id, tok.bos_token_id] + b + [tok.eos_token_id]


def test_decode_tensor_and_batch(tok):
    ids = tok.encode("Hello world")
    assert tok.decode(torch.tensor(ids)) == tok.decode(ids) == "Hello world"
    assert tok.decode(np.array(ids)) == "Hello world"
    assert tok.batch_decode(torch.tensor([ids, ids])) == ["Hello world"] * 2


def test_blank_preprocessing(tok):
    assert tok.tokenize(" " * 81 + "x") == ["▁", "<|blank_80|>", "▁", "x"]
    assert tok.tokenize(" " * 200) == ["▁", "<|blank_80|>", "<|blank_80|>", "<|blank_40|>"]


def test_save_pretrained_round_trip(tok, tmp_path):
    paths = tok.save_pretrained(tmp_path / "saved")
    config = json.loads(Path(paths[0]).read_text())
    real = json.loads((GOLDEN / "tokenizer_config.json").read_text())
    assert sorted(config) == sorted(real)
    assert config["auto_map"] == real["auto_map"] and config["tokenizer_class"] == "ChatGLMTokenizer"
    assert (tmp_path / "saved" / "ice_text.model").read_bytes() == (GOLDEN / "ice_text.model").read_bytes()
    assert not [p for p in (tmp_path / "saved").iterdir() if p.name.endswith(".tmp")]
    again = ChatGLMTokenizer.from_pretrained(tmp_path / "saved")
    for item in CASES["tokenizer_encode"]:
        assert again.encode(item["text"]) == item["ids"]


def test_image_token_shift(tmp_path):
    shifted = ChatGLMTokenizer(GOLDEN / "ice_text.model", num_image_tokens=2)
    plain = load_tokenizer(GOLDEN)
    assert shifted.vocab_size == len(shifted) == plain.vocab_size + 2
    text = "Hello <sop> world\n你好  👋"
    assert shifted.encode(text) == [i + 2 for i in plain.encode(text)]
    assert shifted.decode(shifted.encode(text)) == plain.decode(plain.encode(text))
    assert shifted.convert_tokens_to_ids("<image_1>") == 1
    assert shifted.convert_ids_to_tokens(1) == "<image_1>"
    assert shifted.bos_token_id == plain.bos_token_id + 2
    assert shifted.all_special_ids == [i + 2 for i in plain.all_special_ids]
    assert shifted.decode([1]) == shifted.decode(torch.tensor(1)) == "<image_1>"
    shifted.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["num_image_tokens"] == 2
    assert load_tokenizer(tmp_path).encode(text) == shifted.encode(text)


# ---------------------------------------------------------------------------------------------- errors


def test_error_missing_folder(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "nope")


def test_error_no_model_file(tmp_path):
    shutil.copy(GOLDEN / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    with pytest.raises(TokenizerError, match="ice_text.model") as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_error_corrupt_model(tmp_path):
    (tmp_path / "ice_text.model").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(TokenizerError, match="not a SentencePiece model") as info:
        load_tokenizer(tmp_path)
    assert "ice_text.model" in str(info.value)


def test_error_bad_config(tmp_path):
    shutil.copy(GOLDEN / "ice_text.model", tmp_path / "ice_text.model")
    (tmp_path / "tokenizer_config.json").write_text('{\n  "bos_token": "<sop>",\n  oops\n}')
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json.*not valid JSON.*line 3"):
        load_tokenizer(tmp_path)


def test_config_optional(tmp_path):
    shutil.copy(GOLDEN / "ice_text.model", tmp_path / "ice_text.model")
    assert load_tokenizer(tmp_path).encode("你好") == [5, 53, 162, 801, 804]


def test_error_decode_out_of_range(tok):
    with pytest.raises(TokenizerError, match=r"token id 1150 is outside .*\[0, 1144\)"):
        tok.decode([5, 1150])
    with pytest.raises(TokenizerError, match="-100"):
        tok.decode([-100])
