"""The quickstart end to end, in a reduced form: the scores must improve and every output must exist."""

import json

import pytest

from glm6b.cli import main


@pytest.mark.slow
def test_quickstart_improves_scores_and_writes_outputs(tmp_path, capsys):
    out = tmp_path / "qs"
    code = main(["quickstart", "--method", "lora", "--pretrain-steps", "120", "--steps", "80", "--eval-examples", "16",
                 "--output-dir", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "bleu-4" in printed and "A two-round chat" in printed

    summary = json.loads((out / "lora" / "summary.json").read_text(encoding="utf-8"))
    before, after = summary["before"], summary["after"]
    assert after["bleu-4"] > before["bleu-4"]
    assert after["rouge-l"] > before["rouge-l"]
    assert len(summary["chat"]) == 2 and all(answer for _, answer in summary["chat"])
    for path in ["base/config.json", "base/model.safetensors", "base/ice_text.model", "lora/train_log.jsonl",
                 "lora/loss.png", "lora/final/adapter_config.json", "lora/final/adapter_model.safetensors"]:
        assert (out / path).is_file(), path
    log = [json.loads(line) for line in (out / "lora" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 80 and log[-1]["loss"] < log[0]["loss"]
