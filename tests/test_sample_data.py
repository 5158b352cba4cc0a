"""Tests of the built-in default assets: the ADGEN-style generator, the tokenizer builder and the
shipped files under glm6b/assets/default (they must equal what scripts/make_default_assets.py makes)."""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

import pytest

from glm6b import sample_data
from glm6b.config import ChatGLMConfig
from glm6b.sample_data import (
    DEFAULT_ASSETS,
    DEFAULT_NUM_DEV,
    DEFAULT_NUM_TRAIN,
    make_adgen_examples,
    read_adgen_jsonl,
    write_adgen_jsonl,
)
from glm6b.tokenizer import load_tokenizer
from glm6b import tokenizer_builder as tb

GOLDEN = Path(__file__).parent / "golden"
PAIR_RE = re.compile(r"^[^#*\s]+#[^#*\s]+$")


@pytest.fixture(scope="module")
def default_tok():
    return load_tokenizer(DEFAULT_ASSETS)


@pytest.fixture(scope="module")
def shipped_train():
    return read_adgen_jsonl(DEFAULT_ASSETS / "adgen" / "train.json")


@pytest.fixture(scope="module")
def shipped_dev():
    return read_adgen_jsonl(DEFAULT_ASSETS / "adgen" / "dev.json")


# ----------------------------------------------------------------------------------------- generator


def test_generator_is_deterministic():
    a = make_adgen_examples(300, seed=7)
    assert a == make_adgen_examples(300, seed=7)
    assert a[:50] == make_adgen_examples(50, seed=7)  # prefix-stable
    assert a != make_adgen_examples(300, seed=8)
    assert make_adgen_examples(0, seed=7) == []
    with pytest.raises(ValueError):
        make_adgen_examples(-1)


def test_generator_format_and_mapping():
    examples = make_adgen_examples(500, seed=3)
    assert len({e["content"] for e in examples}) > 400  # varied
    for e in examples:
        assert set(e) == {"content", "summary"}
        pairs = e["content"].split("*")
        assert all(PAIR_RE.match(p) for p in pairs), e["content"]
        keys = [p.split("#")[0] for p in pairs]
        values = dict(p.split("#") for p in pairs)
        assert keys[0] == "类型" and values["类型"] in sample_data.TYPE_KEYS
        assert len(keys) == len(set(keys)) and 3 <= len(keys) <= 5
        allowed = sample_data.TYPE_KEYS[values["类型"]]
        assert keys[1:] == sorted(keys[1:], key=allowed.index)  # canonical order
        summary = e["summary"]
        assert 30 <= len(summary) <= 70 and summary.endswith("。")
        assert "\n" not in summary and "  " not in summary
        for key, value in values.items():
            assert value in sample_data.ATTRIBUTES[key]
            if key != "类型":
                # every attribute value and its own descriptor appear in the copy
                assert value in summary, (key, value, summary)
                if sample_data.ATTRIBUTES[key][value] != value:
                    assert sample_data.ATTRIBUTES[key][value] in summary, (key, value, summary)


def test_write_read_jsonl(tmp_path):
    examples = make_adgen_examples(20, seed=1)
    path = tmp_path / "sub" / "data.json"
    write_adgen_jsonl(path, examples)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 20
    assert all(list(json.loads(line)) == ["content", "summary"] for line in lines)
    assert "\\u" not in lines[0] and "类型#" in lines[0]  # ensure_ascii=False
    assert read_adgen_jsonl(path) == examples
    assert not [p for p in path.parent.iterdir() if p.name != "data.json"]  # no temp files left


def test_chat_texts():
    prompts = sample_data.chat_prompt_texts()
    assert "[Round 0]\n问：" in prompts and "答：" in prompts
    assert all(q and r for q, r in sample_data.chat_pairs())


# ------------------------------------------------------------------------------------ shipped files


def test_shipped_data_equals_regeneration(shipped_train, shipped_dev):
    assert len(shipped_train) == DEFAULT_NUM_TRAIN and len(shipped_dev) == DEFAULT_NUM_DEV
    train, dev = sample_data.default_splits()
    assert shipped_train == train
    assert shipped_dev == dev
    # byte-exact file format (one object per line, content then summary, UTF-8 unescaped)
    first = (DEFAULT_ASSETS / "adgen" / "train.json").read_text(encoding="utf-8").splitlines()[:3]
    assert first == [json.dumps(e, ensure_ascii=False) for e in train[:3]]


def test_shipped_sizes():
    sizes = {p.name: p.stat().st_size for p in DEFAULT_ASSETS.rglob("*") if p.is_file()}
    assert set(sizes) == {"ice_text.model", "tokenizer_config.json", "config.json", "train.json", "dev.json"}
    assert sum(sizes.values()) < 3_000_000


def test_tokenizer_config_keys():
    ours = json.loads((DEFAULT_ASSETS / "tokenizer_config.json").read_text(encoding="utf-8"))
    golden = json.loads((GOLDEN / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert list(ours) == list(golden)
    assert ours["num_image_tokens"] == 0
    assert {k: v for k, v in ours.items() if k != "name_or_path"} == {
        k: v for k, v in golden.items() if k != "name_or_path"}


def test_model_config_matches_tokenizer(default_tok):
    data = json.loads((DEFAULT_ASSETS / "config.json").read_text(encoding="utf-8"))
    golden = json.loads((GOLDEN / "config.json").read_text(encoding="utf-8"))
    assert set(data) == set(golden)
    config = ChatGLMConfig.from_json_file(DEFAULT_ASSETS / "config.json")
    assert config.vocab_size % 64 == 0 and config.vocab_size - 64 < default_tok.vocab_size <= config.vocab_size
    assert config.bos_token_id == default_tok.bos_token_id == default_tok.convert_tokens_to_ids("<sop>")
    assert config.eos_token_id == default_tok.eos_token_id == default_tok.convert_tokens_to_ids("<eop>")
    assert config.mask_token_id == default_tok.mask_token_id == default_tok.convert_tokens_to_ids("[MASK]")
    assert config.gmask_token_id == default_tok.gmask_token_id == default_tok.convert_tokens_to_ids("[gMASK]")
    assert config.pad_token_id == default_tok.pad_token_id == 3
    assert (config.hidden_size, config.num_layers, config.num_attention_heads, config.inner_hidden_size) == (
        256, 4, 4, 1024)
    assert data == tb.model_config(tb.DEFAULT_VOCAB_SIZE, name_or_path="glm6b-default")


def test_default_tokenizer_layout(default_tok):
    tok = default_tok
    n = tok.vocab_size - tb.NUM_APPENDED
    assert tok.vocab_size == tb.DEFAULT_VOCAB_SIZE + tb.NUM_APPENDED
    pieces = tok.convert_ids_to_tokens(list(range(tok.vocab_size)))
    assert pieces[:6] == ["<unk>", "<s>", "</s>", "<pad>", "<n>", "\u2581"]
    assert pieces[n:n + 8] == ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
    assert pieces[n + 8] == "<|tab|>"
    assert pieces[n + 9:n + 88] == [f"<|blank_{k}|>" for k in range(2, 81)]
    assert pieces[n + 88:] == [f"<0x{b:02X}>" for b in range(256)]
    assert tok.convert_tokens_to_ids("<|blank_4|>") == n + 7 + 4
    assert tok.end_token_id == 2 and tok.unk_token_id == 0
    assert tb.check_tokenizer(tok, num_trained=tb.DEFAULT_VOCAB_SIZE) == []


def test_default_tokenizer_proto_types():
    from sentencepiece import sentencepiece_model_pb2 as pb

    SP = pb.ModelProto.SentencePiece
    ours, golden = pb.ModelProto(), pb.ModelProto()
    ours.ParseFromString((DEFAULT_ASSETS / "ice_text.model").read_bytes())
    golden.ParseFromString((GOLDEN / "ice_text.model").read_bytes())

    def layout(proto):
        n = len(proto.pieces) - tb.NUM_APPENDED
        head = [(p.piece, p.type) for p in proto.pieces[:6]]
        tail = [(p.piece, p.type, p.score) for p in proto.pieces[n:]]
        middle = {p.type for p in proto.pieces[6:n]}
        return head, tail, middle

    assert layout(ours) == layout(golden)
    assert layout(ours)[2] == {SP.NORMAL}
    assert ours.trainer_spec.byte_fallback and ours.trainer_spec.model_type == pb.TrainerSpec.UNIGRAM
    assert ours.normalizer_spec.name == golden.normalizer_spec.name == "nmt_nfkc"
    assert ours.normalizer_spec.add_dummy_prefix and ours.normalizer_spec.remove_extra_whitespaces


def test_default_tokenizer_round_trips(default_tok, shipped_dev):
    tok = default_tok
    unk = tok.unk_token_id
    for e in shipped_dev:
        for text in (e["content"], e["summary"]):
            ids = tok.encode(text, add_special_tokens=False)
            assert unk not in ids
            assert not any(tok.vocab_size - 256 <= i for i in ids), text  # no byte fallback needed
            assert tok.decode(ids) == unicodedata.normalize("NFKC", text)
    # chat prompts
    for text in sample_data.chat_prompt_texts()[:10] + sample_data.chat_texts():
        ids = tok.encode(text)
        assert ids[-2:] == [tok.gmask_token_id, tok.bos_token_id]
        assert tok.decode(ids, clean_up_tokenization_spaces=False) == unicodedata.normalize("NFKC", text).strip(" ")
    assert tok.encode("\n", add_special_tokens=False)[-1] == 4
    assert tok.decode(tok.encode("a\tb    c")) == "a\tb    c"
    emoji = "夏天的裙子👗很好看🌸"
    assert tok.decode(tok.encode(emoji)) == emoji


def test_default_lengths_fit_a_short_sequence(default_tok, shipped_train):
    tok = default_tok
    longest = max(len(tok.encode(e["content"], add_special_tokens=False)) for e in shipped_train[:1000])
    longest_answer = max(len(tok.encode(e["summary"], add_special_tokens=False)) for e in shipped_train[:1000])
    assert longest + 2 + longest_answer + 1 <= 72


# ---------------------------------------------------------------------------------------- builder


def test_retraining_reproduces_shipped_tokenizer(tmp_path):
    """Training is fast (about a second) and deterministic: regenerate and compare the pieces."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    train, _ = sample_data.default_splits()
    path = tb.train_ice_text_model(sample_data.tokenizer_training_texts(train), tmp_path / "ice_text.model",
                                   vocab_size=tb.DEFAULT_VOCAB_SIZE)
    assert [p.name for p in tmp_path.iterdir()] == ["ice_text.model"]  # atomic write: no temp left
    ours, shipped = pb.ModelProto(), pb.ModelProto()
    ours.ParseFromString(path.read_bytes())
    shipped.ParseFromString((DEFAULT_ASSETS / "ice_text.model").read_bytes())
    assert [(p.piece, p.type) for p in ours.pieces] == [(p.piece, p.type) for p in shipped.pieces]
    assert [p.score for p in ours.pieces] == pytest.approx([p.score for p in shipped.pieces], abs=1e-4)


def test_builder_small_corpus_and_errors(tmp_path):
    texts = ["你好，世界\n第二行", "hello world", "类型#裙*颜色#白色"] * 20
    path = tb.train_ice_text_model(texts, tmp_path / "tok" / "ice_text.model", vocab_size=30)
    tok = load_tokenizer(path.parent)  # no tokenizer_config.json: defaults apply
    assert tok.vocab_size == 30 + tb.NUM_APPENDED
    assert tb.check_tokenizer(tok, texts[:3]) == []
    assert tok.decode(tok.encode("你好，世界\n第二行")) == "你好,世界\n第二行"
    with pytest.raises(tb.TokenizerBuildError, match="too high"):
        tb.train_ice_text_model(texts, tmp_path / "big.model", vocab_size=5000)
    with pytest.raises(tb.TokenizerBuildError):
        tb.train_ice_text_model(["", "  "], tmp_path / "empty.model")
    assert not (tmp_path / "big.model").exists() and not (tmp_path / "empty.model").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_build_default_assets_small(tmp_path):
    paths = sample_data.build_default_assets(tmp_path, seed=5, num_train=300, num_dev=10, vocab_size=600)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in paths.values()) == [
        "adgen/dev.json", "adgen/train.json", "config.json", "ice_text.model", "tokenizer_config.json"]
    tok = load_tokenizer(tmp_path)
    config = ChatGLMConfig.from_json_file(tmp_path / "config.json")
    assert config.vocab_size == 960 and config.gmask_token_id == tok.gmask_token_id == 601
    assert read_adgen_jsonl(paths["dev"]) == make_adgen_examples(310, seed=5)[300:]
