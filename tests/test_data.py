"""ADGEN data pipeline: golden rows, malformed lines, offline cache == online, history rendering, batching."""

import json

import numpy as np
import pytest
import torch
from helpers import GOLDEN, golden_cases

from glm6b.config import DataConfig, DataError
from glm6b.data.adgen import JsonlDataset, adgen_eval_features, adgen_train_features
from glm6b.data.preprocess import EncodedDataset, load_dataset, preprocess, read_meta


@pytest.fixture(scope="module")
def adgen():
    return golden_cases()["train_adgen"]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


@pytest.fixture
def sample_file(tmp_path, adgen):
    rows = [{"content": ex["prompt"], "summary": ex["answer"]} for ex in adgen["examples"]]
    rows += [{"content": "类型#裤*颜色#黑色", "summary": "黑色裤子百搭。"}, {"content": "", "summary": "x"},
             {"content": "类型#裙" * 20, "summary": "很长的裙子" * 10}]
    return write_jsonl(tmp_path / "train.json", rows)


def test_train_features_match_golden(tok, adgen):
    for i, ex in enumerate(adgen["examples"]):
        row = adgen_train_features(tok, ex["prompt"], ex["answer"], adgen["max_source_length"],
                                   adgen["max_target_length"])
        assert row["input_ids"] == adgen["input_ids"][i]
        assert row["labels"] == adgen["labels"][i]


def test_eval_features_and_batch_match_golden(tok):
    case = golden_cases()["eval_adgen_preprocess"]
    config = DataConfig(max_source_length=case["max_source_length"], max_target_length=case["max_target_length"])
    rows = []
    for i, (prompt, answer) in enumerate(zip(case["inputs"], case["targets"])):
        row = adgen_eval_features(tok, prompt, answer, config.max_source_length, config.max_target_length)
        padded = case["input_ids"][i]
        assert row["input_ids"] == padded[len(padded) - len(row["input_ids"]):]
        assert all(t == tok.pad_token_id for t in padded[:len(padded) - len(row["input_ids"])])
        assert row["labels"] == case["labels"][i]
        rows.append({k: np.asarray(v) for k, v in row.items()})
    dataset = JsonlDataset.__new__(JsonlDataset)  # only the batching rule is under test
    dataset.mode, dataset.config = "eval", config
    dataset.special_ids = {"pad": tok.pad_token_id, "bos": tok.bos_token_id, "mask": tok.mask_token_id,
                           "gmask": tok.gmask_token_id}
    batch = dataset.collate(rows)
    assert batch["input_ids"].tolist() == case["input_ids"]
    assert torch.equal(batch["attention_mask"], torch.tensor(case["attention_mask"]))
    assert batch["position_ids"].tolist() == case["position_ids"]


@pytest.mark.parametrize("line, problem", [
    ("{not json", "not valid JSON"),
    ('["a", "b"]', "expected a JSON object, got list"),
    ('{"content": "类型#裙"}', "missing field 'summary'"),
    ('{"content": "类型#裙", "summary": 3}', "field 'summary' must be a string, got int"),
])
def test_malformed_line_names_file_and_line(tmp_path, tok, line, problem):
    path = write_jsonl(tmp_path / "bad.json", ['{"content": "a", "summary": "b"}', "", line])
    with pytest.raises(DataError) as e:
        JsonlDataset(path, tok, DataConfig())
    assert "bad.json, line 3" in str(e.value) and problem in str(e.value)


def test_skip_bad_counts_and_skips(tmp_path, tok):
    path = write_jsonl(tmp_path / "mixed.json", [
        '{"content": "a", "summary": "b"}', "{oops", "[1]", '{"content": "a"}', '{"content": "", "summary": "b"}',
        '{"content": "c", "summary": "d"}'])
    dataset = JsonlDataset(path, tok, DataConfig(), skip_bad=True)
    assert len(dataset) == 2
    assert (dataset.stats.lines, dataset.stats.skipped_bad, dataset.stats.skipped_empty) == (6, 3, 1)
    assert dataset.stats.bad_lines[0].endswith("mixed.json, line 2: not valid JSON (Expecting property name "
                                               "enclosed in double quotes at column 2)")
    meta = preprocess(tok, path, tmp_path / "cache", DataConfig(skip_bad=True))
    assert meta["counts"] == {"lines": 6, "rows": 2, "skipped_empty": 1, "skipped_bad": 3, "tokens": meta["counts"]["tokens"]}


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_offline_and_online_give_identical_batches(tmp_path, tok, sample_file, mode):
    config = DataConfig(max_source_length=24, max_target_length=20)
    meta = preprocess(tok, sample_file, tmp_path / mode, config, mode=mode)
    assert meta["counts"]["rows"] == 4 and meta["counts"]["skipped_empty"] == 1
    assert meta["tokenizer"]["sha256"] == read_meta(tmp_path / mode)["tokenizer"]["sha256"]
    offline = load_dataset(tmp_path / mode, tok, config, mode)
    online = load_dataset(sample_file, tok, config, mode)
    assert isinstance(offline, EncodedDataset) and isinstance(online, JsonlDataset)
    assert isinstance(offline.input_ids, np.memmap) and offline.input_ids.dtype == np.int32
    assert len(offline) == len(online) == 4
    for rows in ([0, 1], [2, 3], [3, 0, 1]):
        a = offline.collate([offline[i] for i in rows])
        b = online.collate([online[i] for i in rows])
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    if mode == "train":  # fixed-length rows as in the recipe, truncated as it says
        batch = online.collate([online[i] for i in range(4)])
        assert batch["input_ids"].shape == (4, 44)
        assert (batch["labels"] != -100).sum(dim=1).max() <= 20  # <sop> + 18 answer ids + <eop>


def test_preprocessed_folder_must_match_settings(tmp_path, tok, sample_file):
    preprocess(tok, sample_file, tmp_path / "cache", DataConfig(max_source_length=24, max_target_length=20))
    with pytest.raises(DataError, match="max_source_length=24 but this run asks for 64"):
        load_dataset(tmp_path / "cache", tok, DataConfig(max_target_length=20), "train")
    with pytest.raises(DataError, match="holds 'train' rows"):
        load_dataset(tmp_path / "cache", tok, DataConfig(max_source_length=24, max_target_length=20), "eval")


def test_dynamic_padding_gives_the_same_loss(tok, sample_file):
    from glm6b.checkpoint.hf import load_model

    model = load_model(GOLDEN, dtype=torch.float32)
    fixed = JsonlDataset(sample_file, tok, DataConfig(max_source_length=24, max_target_length=20))
    dynamic = JsonlDataset(sample_file, tok, DataConfig(max_source_length=24, max_target_length=20,
                                                        dynamic_padding=True))
    a = fixed.collate([fixed[i] for i in (0, 2)])
    b = dynamic.collate([dynamic[i] for i in (0, 2)])
    assert b["input_ids"].shape[1] < a["input_ids"].shape[1] == 44
    with torch.no_grad():
        loss_a = model(a["input_ids"], labels=a["labels"]).loss
        loss_b = model(b["input_ids"], labels=b["labels"]).loss
    assert abs(loss_a.item() - loss_b.item()) <= 1e-6 * abs(loss_a.item())
    golden = golden_cases()["train_adgen"]  # the golden pair, fixed padding: the reference loss
    batch = fixed.collate([fixed[0], fixed[1]])
    assert batch["input_ids"].tolist() == golden["input_ids"]
    with torch.no_grad():
        loss = model(batch["input_ids"], labels=batch["labels"]).loss.item()
    assert abs(loss - golden["loss"]) <= 1e-5 * golden["loss"]


def test_history_column_renders_the_chat_template(tmp_path, tok):
    path = write_jsonl(tmp_path / "chat.json", [
        {"prompt": "晚上睡不着怎么办", "response": "试试早点休息。", "history": [["你好", "你好！"], ["在吗", "在的"]]},
        {"prompt": "你好", "response": "你好！", "history": []},
        {"prompt": "你好", "response": "你好！"},
    ])
    config = DataConfig(prompt_column="prompt", response_column="response", history_column="history",
                        source_prefix="助手：")
    dataset = JsonlDataset(path, tok, config)
    assert dataset.examples[0].prompt == (
        "助手：[Round 0]\n问：你好\n答：你好！\n[Round 1]\n问：在吗\n答：在的\n[Round 2]\n问：晚上睡不着怎么办\n答：")
    assert dataset.examples[1].prompt == dataset.examples[2].prompt == "助手：你好"
    row = dataset[0]
    expected = adgen_train_features(tok, dataset.examples[0].prompt, "试试早点休息。", 64, 64)
    assert row["input_ids"].tolist() == [t for t in expected["input_ids"] if t != tok.pad_token_id]
    bad = write_jsonl(tmp_path / "bad_history.json", [{"prompt": "a", "response": "b", "history": [["only one"]]}])
    with pytest.raises(DataError, match=r"bad_history.json, line 1: field 'history'\[0\] must be a \[query, response\]"):
        JsonlDataset(bad, tok, config)


def test_preprocess_command(tmp_path, sample_file, capsys):
    from glm6b.cli import main

    out = tmp_path / "enc"
    assert main(["preprocess", "--tokenizer", str(GOLDEN), "--input", str(sample_file), "--output", str(out),
                 "--max_source_length", "24", "--max-target-length", "20", "--mode", "eval"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["mode"] == "eval" and meta["data"]["max_source_length"] == 24 and meta["counts"]["rows"] == 4
    assert "4 rows" in capsys.readouterr().out
    bad = write_jsonl(tmp_path / "bad.json", ['{"content": "a", "summary": "b"}', "nope"])
    assert main(["preprocess", "--tokenizer", str(GOLDEN), "--input", str(bad), "--output", str(out)]) == 2
    assert "bad.json, line 2" in capsys.readouterr().err
    assert main(["preprocess", "--tokenizer", str(GOLDEN), "--input", str(bad), "--output", str(out),
                 "--skip-bad"]) == 0
    assert "1 malformed" in capsys.readouterr().out
