"""Generation-based evaluation on the golden checkpoint: batching, result files, predict mode, CLI, LoRA."""

import json

import pytest
import torch
from helpers import GOLDEN, golden_cases

from glm6b.checkpoint.hf import load_model, save_pretrained
from glm6b.config import LoadConfig
from glm6b.eval.evaluate import evaluate_generation, generate_predictions, reference_texts, run_eval
from glm6b.eval.metrics import METRIC_NAMES, compute_metrics
from glm6b.inference.generation import generate
from glm6b.tokenizer import load_tokenizer

MAX_NEW = 8
SETTINGS = dict(max_source_length=32, max_target_length=24, max_new_tokens=MAX_NEW, progress=False)


def _rows() -> list[dict]:
    rows = [{"content": e["prompt"], "summary": e["answer"]} for e in golden_cases()["train_adgen"]["examples"]]
    rows += [
        {"content": "类型#裙*颜色#黑色*风格#复古", "summary": "这款黑色连衣裙，复古的风格很百搭。"},
        {"content": "类型#上衣*材质#棉*衣样式#衬衫", "summary": "这款衬衫采用棉质面料，穿着舒适。"},
        {"content": "你好", "summary": "你好，很高兴认识你。"},
        {"content": "类型#裤*版型#宽松*风格#休闲", "summary": ""},  # empty answer: skipped, as the reference does
        # longer than max_source_length: the prompt keeps its head
        {"content": "类型#裙*版型#宽松*材质#雪纺*风格#清新*图案#碎花*裙长#连衣裙*裙领型#圆领*风格#复古",
         "summary": "宽松的版型，休闲又舒适。"},
    ]
    return rows


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "dev.json"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _rows()), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(GOLDEN)


@pytest.fixture(scope="module")
def runs(data_file, tmp_path_factory):
    """run_eval at batch sizes 1 and 4: {batch_size: (output_dir, returned summary)}."""
    out = {}
    for batch_size in (1, 4):
        output_dir = tmp_path_factory.mktemp(f"eval_bs{batch_size}")
        out[batch_size] = output_dir, run_eval(GOLDEN, data_file, output_dir, batch_size=batch_size, **SETTINGS)
    return out


def _read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_batch_size_does_not_change_results(runs):
    (dir1, summary1), (dir4, summary4) = runs[1], runs[4]
    assert _read_jsonl(dir1 / "predictions.jsonl") == _read_jsonl(dir4 / "predictions.jsonl")
    for name in METRIC_NAMES:
        assert summary1[name] == summary4[name]
    predictions = [r["prediction"] for r in _read_jsonl(dir1 / "predictions.jsonl")]
    assert any(predictions), "every prediction is empty: generation ended at once"


def test_result_files(runs, tokenizer):
    output_dir, summary = runs[4]
    rows = [r for r in _rows() if r["summary"]]
    records = _read_jsonl(output_dir / "predictions.jsonl")
    assert [r["prompt"] for r in records] == [r["content"] for r in rows]  # file order, not batch order
    for record in records:
        assert set(record) == {"prompt", "reference", "prediction", *METRIC_NAMES}
        assert record["prediction"] == record["prediction"].strip()
    # References are the answers as the reference recipe scores them: tokenizer round trip, truncated.
    assert [r["reference"] for r in records] == reference_texts(tokenizer, [r["summary"] for r in rows], 24)
    assert records[2]["reference"] == "这款黑色连衣裙,复古的风格很百搭。"  # NFKC: "，" -> ","
    # The per-example and mean scores are compute_metrics of the written texts.
    expected = compute_metrics([r["prediction"] for r in records], [r["reference"] for r in records])
    assert [{k: r[k] for k in METRIC_NAMES} for r in records] == expected["per_example"]
    metrics = json.loads((output_dir / "metrics.json").read_text(encoding="utf-8"))
    assert metrics == json.loads(json.dumps(summary))
    for name in METRIC_NAMES:
        assert metrics[name] == expected[name]
    assert metrics["mode"] == "eval" and metrics["count"] == 6 and metrics["skipped_empty"] == 1
    assert metrics["settings"]["batch_size"] == 4 and metrics["settings"]["max_new_tokens"] == MAX_NEW
    assert metrics["settings"]["generation"]["do_sample"] is False
    assert metrics["settings"]["generation"]["allowed_vocab_size"] == len(tokenizer)
    assert set(metrics["timing"]) == {"count", "seconds", "generated_tokens", "examples_per_second",
                                      "tokens_per_second"}
    assert not [p for p in output_dir.iterdir() if p.name.endswith(".tmp")]


def test_predictions_equal_single_prompt_generate(runs, model, tokenizer):
    output_dir, _ = runs[4]
    records = _read_jsonl(output_dir / "predictions.jsonl")
    for record in records[:3]:
        ids = tokenizer(record["prompt"], max_length=32, truncation=True, return_tensors="pt")["input_ids"]
        out = generate(model, ids, max_new_tokens=MAX_NEW, allowed_vocab_size=len(tokenizer))
        assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == record["prediction"]


def test_evaluate_generation_api(runs, model, tokenizer):
    rows = [r for r in _rows() if r["summary"]][:4]
    prompts, answers = [r["content"] for r in rows], [r["summary"] for r in rows]
    model.train()
    predictions, metrics = evaluate_generation(model, tokenizer, prompts, answers, batch_size=3,
                                               max_source_length=32, max_target_length=24,
                                               max_new_tokens=MAX_NEW, progress=False)
    assert model.training  # the caller's mode is restored
    model.eval()
    records = _read_jsonl(runs[1][0] / "predictions.jsonl")[:4]
    assert predictions == [r["prediction"] for r in records]
    assert metrics["per_example"] == [{k: r[k] for k in METRIC_NAMES} for r in records]
    only, none = evaluate_generation(model, tokenizer, prompts[:2], batch_size=2, max_new_tokens=MAX_NEW,
                                     max_source_length=32, progress=False)
    assert only == predictions[:2] and none is None
    with pytest.raises(ValueError, match="2 prompts but 1 references"):
        evaluate_generation(model, tokenizer, prompts[:2], answers[:1], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        generate_predictions(model, tokenizer, prompts, batch_size=0, progress=False)


def test_reference_texts_truncate_like_the_reference(tokenizer):
    answer = "这款衬衫采用棉质面料，穿着舒适。"
    ids = tokenizer.encode(answer, add_special_tokens=False)
    assert reference_texts(tokenizer, [answer], 6) == [tokenizer.decode(ids[:4]).strip()]
    assert reference_texts(tokenizer, [answer], None) == [tokenizer.decode(ids)]


def test_predict_mode(tmp_path):
    data = tmp_path / "test.json"
    data.write_text(json.dumps({"content": "你好"}, ensure_ascii=False) + "\n"
                    + json.dumps({"content": "类型#裙*颜色#黑色*风格#复古", "summary": "x"}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    summary = run_eval(GOLDEN, data, tmp_path / "out", mode="predict", batch_size=2, **SETTINGS)
    records = _read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert [set(r) for r in records] == [{"prompt", "prediction"}] * 2
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics == json.loads(json.dumps(summary))
    assert metrics["mode"] == "predict" and metrics["count"] == 2
    assert not set(METRIC_NAMES) & set(metrics)


def test_bad_inputs(tmp_path, data_file):
    from glm6b.checkpoint.hf import CheckpointError
    from glm6b.config import DataError

    with pytest.raises(DataError, match="cannot read"):
        run_eval(GOLDEN, tmp_path / "missing.json", tmp_path / "out", **SETTINGS)
    bad = tmp_path / "bad.json"
    bad.write_text('{"content": "你好", "summary": "好"}\n{"content": \n', encoding="utf-8")
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        run_eval(GOLDEN, bad, tmp_path / "out", **SETTINGS)
    no_answer = tmp_path / "no_answer.json"
    no_answer.write_text('{"content": "你好"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 1: missing field 'summary'"):
        run_eval(GOLDEN, no_answer, tmp_path / "out", **SETTINGS)  # eval mode needs the answers
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        run_eval(LoadConfig(load_checkpoint=str(GOLDEN), adapter=str(tmp_path)), data_file, tmp_path / "out", **SETTINGS)
    with pytest.raises(ValueError, match="mode="):
        run_eval(GOLDEN, data_file, tmp_path / "out", mode="train", **SETTINGS)
    assert not (tmp_path / "out").exists()  # nothing written when the run fails up front


@pytest.fixture(scope="module")
def lora_folders(tmp_path_factory):
    """(adapter folder, merged-model folder) for a random LoRA on query_key_value."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    peft_model = get_peft_model(load_model(GOLDEN, dtype=torch.float32),
                                LoraConfig(target_modules=["query_key_value"], r=4, init_lora_weights=False))
    peft_model.save_pretrained(root / "adapter")
    merged = peft_model.merge_and_unload()
    save_pretrained(merged, root / "merged", tokenizer=load_tokenizer(GOLDEN))
    return root / "adapter", root / "merged"


@pytest.mark.parametrize("merge", [True, False], ids=["merged-at-load", "separate-layer"])
def test_lora_adapter_equals_merged_model(lora_folders, runs, tmp_path, merge):
    adapter, merged = lora_folders
    data = tmp_path / "dev.json"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _rows()[:4]), encoding="utf-8")
    spec = LoadConfig(load_checkpoint=str(GOLDEN), adapter=str(adapter), merge_adapter=merge)
    with_adapter = run_eval(spec, data, tmp_path / "adapter", batch_size=4, **SETTINGS)
    with_merged = run_eval(merged, data, tmp_path / "merged", batch_size=4, **SETTINGS)
    adapter_predictions = [r["prediction"] for r in _read_jsonl(tmp_path / "adapter" / "predictions.jsonl")]
    merged_predictions = [r["prediction"] for r in _read_jsonl(tmp_path / "merged" / "predictions.jsonl")]
    base_predictions = [r["prediction"] for r in _read_jsonl(runs[4][0] / "predictions.jsonl")][:4]
    assert adapter_predictions == merged_predictions
    assert adapter_predictions != base_predictions  # the adapter was applied
    assert {k: with_adapter[k] for k in METRIC_NAMES} == {k: with_merged[k] for k in METRIC_NAMES}
    assert with_adapter["settings"]["adapter"] == str(adapter)


# ----------------------------------------------------------------------------------- the CLI


def test_cli_eval(data_file, runs, tmp_path, capsys):
    from glm6b.cli import main

    code = main(["eval", "--model", str(GOLDEN), "--data", str(data_file), "--output-dir", str(tmp_path / "cli"),
                 "--batch-size", "4", "--max-new-tokens", str(MAX_NEW), "--max-source-length", "32",
                 "--max-target-length", "24"])
    assert code == 0
    assert _read_jsonl(tmp_path / "cli" / "predictions.jsonl") == _read_jsonl(runs[4][0] / "predictions.jsonl")
    metrics = json.loads((tmp_path / "cli" / "metrics.json").read_text(encoding="utf-8"))
    assert {k: metrics[k] for k in METRIC_NAMES} == {k: runs[4][1][k] for k in METRIC_NAMES}
    assert "rouge-1" in capsys.readouterr().out  # the results table


def test_cli_predict_with_adapter(lora_folders, data_file, tmp_path):
    from glm6b.cli import main

    adapter, merged = lora_folders
    code = main(["eval", "--model", str(GOLDEN), "--adapter", str(adapter), "--data", str(data_file),
                 "--output-dir", str(tmp_path / "out"), "--mode", "predict", "--max-new-tokens", "4",
                 "--max-source-length", "32"])
    assert code == 0
    records = _read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert len(records) == 7 and set(records[0]) == {"prompt", "prediction"}  # the empty summary is no reason to skip


@pytest.mark.parametrize("problem", ["missing data", "bad line", "missing model", "missing adapter"])
def test_cli_errors_are_one_line(problem, data_file, tmp_path, capsys):
    from glm6b.cli import main

    data, model, extra = str(data_file), str(GOLDEN), []
    if problem == "missing data":
        data = str(tmp_path / "nope.json")
    elif problem == "bad line":
        (tmp_path / "bad.json").write_text('{"content": "你好", "summary": "好"}\nnot json\n', encoding="utf-8")
        data = str(tmp_path / "bad.json")
    elif problem == "missing model":
        model = str(tmp_path / "no_model")
    else:
        extra = ["--adapter", str(tmp_path / "no_adapter")]
    code = main(["eval", "--model", model, "--data", data, "--output-dir", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "error" in err
