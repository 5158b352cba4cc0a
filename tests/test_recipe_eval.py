"""Evaluation inside training: Trainer.evaluate's generation scores, and `glm6b run --mode eval` (BLEU/ROUGE)."""

import json
from pathlib import Path

import pytest
import torch
from helpers import GOLDEN, golden_cases

from glm6b.checkpoint.hf import load_model
from glm6b.config import DataConfig, TrainingConfig
from glm6b.data.adgen import JsonlDataset
from glm6b.tokenizer import load_tokenizer
from glm6b.train.trainer import Trainer

CONFIGS = Path(__file__).parent.parent / "glm6b" / "configs"
METRICS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def adgen_file(tmp_path_factory):
    rows = [{"content": ex["prompt"], "summary": ex["answer"]} for ex in golden_cases()["train_adgen"]["examples"]]
    rows.append({"content": "类型#裤*颜色#黑色", "summary": "黑色裤子百搭。"})
    path = tmp_path_factory.mktemp("eval") / "dev.json"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_evaluate_returns_loss_and_generation_scores(tmp_path, adgen_file):
    tok = load_tokenizer(GOLDEN)
    data = DataConfig(max_source_length=24, max_target_length=8)
    dataset = JsonlDataset(adgen_file, tok, data)
    trainer = Trainer(model=load_model(GOLDEN, dtype=torch.float32), tokenizer=tok, data_config=data,
                      args=TrainingConfig(output_dir=str(tmp_path), eval_generation_samples=2, disable_tqdm=True,
                                             tensorboard=False))
    result = trainer.evaluate(dataset)
    assert {"eval_loss", "eval_tokens", *METRICS} <= result.keys()
    assert all(0.0 <= result[m] <= 100.0 for m in METRICS)
    trainer.args.eval_generation_samples = 0
    assert not set(METRICS) & trainer.evaluate(dataset).keys()


def test_eval_steps_record_carries_the_scores(tmp_path, adgen_file):
    tok = load_tokenizer(GOLDEN)
    data = DataConfig(max_source_length=24, max_target_length=8)
    trainer = Trainer(model=load_model(GOLDEN, dtype=torch.float32), tokenizer=tok, data_config=data,
                      train_dataset=JsonlDataset(adgen_file, tok, data), eval_dataset=JsonlDataset(adgen_file, tok, data),
                      args=TrainingConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                                             eval_steps=2, eval_generation_samples=2, save_steps=None,
                                             tensorboard=False, disable_tqdm=True, logging_steps=1))
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "eval_log.jsonl").read_text().splitlines()]
    assert len(records) == 1 and {"step", "eval_loss", *METRICS} <= records[0].keys()


@pytest.mark.parametrize("config", ["infer.yaml", "lora_infer.yaml"])
def test_run_eval_mode_writes_predictions_and_metrics(tmp_path, adgen_file, config, capsys):
    from glm6b.cli import main

    argv = ["run", "--config", str(CONFIGS / config), "--mode", "eval", "--load-checkpoint", str(GOLDEN),
            "--eval-data", str(adgen_file), "--output-dir", str(tmp_path), "--set", "generation.max_new_tokens=4",
            "--set", "data.max_source_length=24", "--set", "data.max_target_length=8",
            "--set", "trainer.disable_tqdm=true", "--set", "model.dtype=float32"]
    if config == "lora_infer.yaml":
        from glm6b.config import LoraConfig
        from glm6b.train.lora import apply_lora

        model = apply_lora(load_model(GOLDEN, dtype=torch.float32), LoraConfig(r=2), str(GOLDEN))
        model.save_pretrained(str(tmp_path / "adapter"), save_embedding_layers=False)
        argv += ["--set", f"model.adapter={tmp_path / 'adapter'}"]
    assert main(argv) == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(METRICS) <= metrics.keys() and metrics["count"] == 3
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 3 and "prediction" in json.loads(lines[0])
    if config == "lora_infer.yaml":
        assert metrics["settings"]["adapter"] == str(tmp_path / "adapter")


def test_run_eval_mode_uses_the_recipe_sampling_settings(tmp_path, adgen_file, capsys):
    from glm6b.cli import main

    argv = ["run", "--config", str(CONFIGS / "infer.yaml"), "--mode", "eval", "--load-checkpoint", str(GOLDEN),
            "--eval-data", str(adgen_file), "--output-dir", str(tmp_path), "--set", "generation.max_new_tokens=4",
            "--set", "data.max_source_length=24", "--set", "data.max_target_length=8",
            "--set", "trainer.disable_tqdm=true", "--set", "model.dtype=float32",
            "--set", "generation.do_sample=true", "--set", "generation.temperature=0.5",
            "--set", "generation.top_k=3", "--set", "generation.seed=7",
            "--set", "generation.repetition_penalty=1.2"]
    assert main(argv) == 0, capsys.readouterr().err
    used = json.loads((tmp_path / "metrics.json").read_text())["settings"]["generation"]
    assert used["do_sample"] is True and used["temperature"] == 0.5 and used["top_k"] == 3
    assert used["seed"] == 7 and used["repetition_penalty"] == 1.2


def test_run_eval_mode_scores_the_prompt_the_model_was_trained_on(tmp_path, capsys):
    """Train a LoRA adapter with a source prefix and a history column, then `run --mode eval` it with the
    same recipe: the prompts it generates from carry the prefix and the history, as in training."""
    from glm6b.cli import main
    from glm6b.data.adgen import render_prompt

    rows = [{"content": "类型#裤*颜色#黑色", "summary": "黑色裤子百搭。", "history": [["你好", "你好！"]]},
            {"content": "类型#上衣*风格#复古", "summary": "复古上衣很好看。", "history": []}]
    data_file = tmp_path / "chat.json"
    data_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    shared = ["--config", str(CONFIGS / "lora.yaml"), "--load-checkpoint", str(GOLDEN),
              "--set", "data.source_prefix=广告：", "--set", "data.history_column=history",
              "--set", "data.max_source_length=40", "--set", "data.max_target_length=8",
              "--set", "trainer.disable_tqdm=true", "--set", "model.dtype=float32", "--set", "trainer.tensorboard=false"]
    assert main(["run", "--mode", "finetune", "--train-data", str(data_file), "--output-dir", str(tmp_path / "train"),
                 "--max-steps", "2", "--batch-size", "2", "--set", "trainer.save_steps=null", *shared]) == 0
    adapter = tmp_path / "train" / "final"
    assert main(["run", "--mode", "eval", "--eval-data", str(data_file), "--output-dir", str(tmp_path / "eval"),
                 "--set", f"model.adapter={adapter}", "--set", "generation.max_new_tokens=4", *shared]) == 0, \
        capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == [render_prompt(r["content"], r["history"], "广告：") for r in rows]
    assert records[0]["prompt"].startswith("广告：[Round 0]")
    settings = json.loads((tmp_path / "eval" / "metrics.json").read_text())["settings"]
    assert settings["source_prefix"] == "广告：" and settings["history_column"] == "history"
