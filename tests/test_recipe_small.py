"""The small things of the fine-tuning pass: exports, missing extras, shipped recipes, README and --help
texts, save_pretrained's index, and the model's refusal of unknown arguments and right padding."""

import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
from helpers import GOLDEN, golden_cases, write_adgen_sample

from glm6b.checkpoint.hf import load_model

ROOT = Path(__file__).parent.parent


def test_adgen_feature_functions_are_exported():
    import glm6b
    from glm6b.data import adgen

    assert glm6b.adgen_train_features is adgen.adgen_train_features
    assert glm6b.adgen_eval_features is adgen.adgen_eval_features
    assert {"adgen_train_features", "adgen_eval_features"} <= set(dir(glm6b))


# ----------------------------------------------------------------------------------- missing extras


def test_training_without_matplotlib_fails_first_with_the_pip_command(tmp_path, monkeypatch):
    from glm6b.config import TrainingConfig
    from glm6b.extras import MissingExtraError
    from glm6b.tokenizer import load_tokenizer
    from glm6b.train.trainer import Trainer

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    trainer = Trainer(model=load_model(GOLDEN, dtype=torch.float32), tokenizer=load_tokenizer(GOLDEN),
                      train_dataset=str(write_adgen_sample(tmp_path / "train.json")),
                      args=TrainingConfig(output_dir=str(tmp_path / "out"), max_steps=1, tensorboard=False,
                                             disable_tqdm=True))
    with pytest.raises(MissingExtraError) as excinfo:
        trainer.train()
    message = str(excinfo.value)
    assert "\n" not in message and message.endswith('pip install "glm6b[train]"') and "'matplotlib'" in message
    assert not (tmp_path / "out").exists()  # nothing was done before the check


def test_quickstart_without_the_train_extra_is_one_line(tmp_path, monkeypatch, capsys):
    from glm6b.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["quickstart", "--output-dir", str(tmp_path / "qs")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install "glm6b[train]"' in err and "Traceback" not in err
    assert not (tmp_path / "qs").exists()


def test_scoring_without_the_eval_extra_names_it(monkeypatch):
    from glm6b.eval import metrics
    from glm6b.extras import MissingExtraError

    monkeypatch.setattr(metrics, "_scorers", None)
    monkeypatch.setitem(sys.modules, "rouge_chinese", None)
    with pytest.raises(MissingExtraError, match=re.escape('pip install "glm6b[eval]"')):
        metrics.compute_metrics(["好"], ["好"])


# ----------------------------------------------------------------------------------- recipes and texts


def test_recipes_ship_inside_the_package_and_load_by_name(tmp_path):
    import glm6b
    from glm6b.train.recipe import RecipeError, load_recipe, recipe_path

    for name in ("finetune", "lora", "infer", "lora_infer"):
        assert recipe_path(name) == Path(glm6b.__file__).parent / "configs" / f"{name}.yaml"
        assert recipe_path(name + ".yaml") == recipe_path(name)
    assert load_recipe("lora").method == "lora" and load_recipe("finetune").method == "full"
    own = tmp_path / "lora"  # a file of that name in the working folder wins
    own.write_text("method: ptuning\n", encoding="utf-8")
    assert load_recipe(own).method == "ptuning"
    with pytest.raises(RecipeError, match="not a recipe shipped with glm6b .*lora_infer"):
        load_recipe("lorra")
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert '"configs/*.yaml"' in pyproject  # installed with the package, not only in a checkout


def test_run_by_recipe_name(tmp_path, capsys):
    from glm6b.cli import main

    data = write_adgen_sample(tmp_path / "train.json")
    assert main(["run", "--config", "lora", "--mode", "finetune", "--load-checkpoint", str(GOLDEN), "--train-data",
                 str(data), "--output-dir", str(tmp_path / "out"), "--max-steps", "1", "--batch-size", "2",
                 "--set", "trainer.disable_tqdm=true", "--set", "trainer.tensorboard=false",
                 "--set", "data.max_source_length=24"]) == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "final" / "adapter_config.json").is_file()


def test_readme_ptuning_command_uses_a_bf16_base():
    from glm6b.train.recipe import load_recipe

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = [line for line in readme.split("# P-tuning v2", 1)[1].splitlines()[1:] if not line.startswith("#")]
    command = []
    for line in lines:  # the command: its first line and the continuation lines after it
        command.append(line.rstrip("\\").strip())
        if not line.endswith("\\"):
            break
    argv = shlex.split(" ".join(command))
    assert argv[:2] == ["glm6b", "run"]
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    recipe = load_recipe(argv[argv.index("--config") + 1], overrides)
    assert recipe.method == "ptuning" and recipe.model.dtype == "bfloat16"


def test_run_help_describes_eval_mode():
    from glm6b.cli import build_parser

    parser = build_parser()
    run = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "run")[1]
    text = " ".join(run.format_help().split())
    assert "teacher-forced" not in text and "BLEU-4" in text and "ROUGE" in text


# ----------------------------------------------------------------------------------- model folder and inputs


def test_save_pretrained_never_leaves_an_index_pointing_at_old_shards(tmp_path, monkeypatch):
    from glm6b.checkpoint import hf

    model = load_model(GOLDEN, dtype=torch.float32)
    hf.save_pretrained(model, tmp_path, max_shard_size="200KB")
    index = tmp_path / hf.SAFE_WEIGHTS_INDEX_NAME
    assert index.is_file()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    calls = []

    def fail_on_second_shard(path, shard, safe):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return original(path, shard, safe)

    original = hf._write_shard
    monkeypatch.setattr(hf, "_write_shard", fail_on_second_shard)
    with pytest.raises(OSError):
        hf.save_pretrained(model, tmp_path, max_shard_size="200KB")
    # Shard 1 is new and shard 2 old: an index still present would load that mixture as a model.
    assert not index.exists()


def test_forward_refuses_unknown_keyword_arguments():
    from glm6b.model import InputError

    model = load_model(GOLDEN, dtype=torch.float32)
    ids = torch.tensor(golden_cases()["train_adgen"]["input_ids"])
    for name in ("past_key_values", "use_cache", "attention_msk"):
        with pytest.raises(InputError, match=f"unknown keyword argument.*{name}"):
            model(input_ids=ids, **{name: None})


def test_right_padded_attention_mask_is_refused():
    from glm6b.model import InputError
    from glm6b.tokenizer import load_tokenizer

    tok = load_tokenizer(GOLDEN)
    model = load_model(GOLDEN, dtype=torch.float32)
    rows = [tok.encode("类型#裙*颜色#红色"), tok.encode("类型#裤")]
    length = max(map(len, rows))
    left = torch.tensor([[tok.pad_token_id] * (length - len(r)) + r for r in rows])
    left_mask = (left != tok.pad_token_id).long()
    model(input_ids=left, attention_mask=left_mask)  # the supported layout
    right = torch.tensor([r + [tok.pad_token_id] * (length - len(r)) for r in rows])
    with pytest.raises(InputError, match="row 1 has padding after real tokens"):
        model(input_ids=right, attention_mask=(right != tok.pad_token_id).long())
