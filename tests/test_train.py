"""Fine-tuning on the golden checkpoint: full, LoRA, P-tuning, exact resume, the `glm6b run` recipe path."""

import json
from pathlib import Path

import pytest
import torch
from helpers import GOLDEN, assert_close_rel, golden_cases, write_adgen_sample

from glm6b.checkpoint.hf import load_model
from glm6b.config import DataConfig, TrainingConfig
from glm6b.data.adgen import JsonlDataset
from glm6b.tokenizer import load_tokenizer
from glm6b.train.recipe import RecipeError, load_recipe
from glm6b.train.trainer import Trainer

CONFIGS = Path(__file__).parent.parent / "glm6b" / "configs"
DATA = DataConfig(max_source_length=24, max_target_length=20)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(GOLDEN)


@pytest.fixture(scope="module")
def sample_file(tmp_path_factory):
    """The two golden ADGEN examples plus two more: a tiny training set."""
    return write_adgen_sample(tmp_path_factory.mktemp("data") / "train.json")


@pytest.fixture(scope="module")
def golden_pair(tok, sample_file):
    """A dataset of the two golden rows (one batch of 2 = the golden train_adgen batch)."""
    dataset = JsonlDataset(sample_file, tok, DATA)
    dataset.examples = dataset.examples[:2]
    return dataset


@pytest.fixture(scope="module")
def probe():
    return torch.tensor(golden_cases()["train_adgen"]["input_ids"])


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, logging_steps=1,
                save_steps=None, tensorboard=False, disable_tqdm=True, learning_rate=1e-2)
    return TrainingConfig(**{**base, **kw})


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def test_full_finetuning_lowers_loss_and_saves_a_loadable_folder(tmp_path, tok, golden_pair, probe):
    model = load_model(GOLDEN, dtype=torch.float32)
    trainer = Trainer(model=model, tokenizer=tok, args=args(tmp_path, learning_rate=1e-3), train_dataset=golden_pair,
                      method="full")
    out = trainer.train()
    golden_loss = golden_cases()["train_adgen"]["loss"]
    assert abs(out.losses[0] - golden_loss) <= 1e-5 * golden_loss  # step 1 sees the reference batch
    assert out.losses[-1] < out.losses[0] - 0.5
    reloaded = load_model(out.final_dir, dtype=torch.float32)
    assert torch.equal(logits(reloaded, probe), logits(model, probe))
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= log[0].keys()
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert trainer.evaluate(golden_pair)["eval_loss"] < out.losses[0]
    assert all(isinstance(text, str) for text in trainer.predict(["类型#裙", "类型#上衣"]))


def test_lora_trains_only_adapters_round_trips_and_merges(tmp_path, tok, golden_pair, probe):
    from peft import PeftModel

    from glm6b.cli import main

    model = load_model(GOLDEN, dtype=torch.float32)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = Trainer(model=model, tokenizer=tok, args=args(tmp_path), train_dataset=golden_pair, method="lora")
    out = trainer.train()
    assert out.losses[-1] < out.losses[0] - 0.3
    peft_model = trainer.model
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.dtype == torch.float32
        else:
            assert not p.requires_grad
            assert torch.equal(p, before[name.removeprefix("base_model.model.").replace(".base_layer", "")]), name
    assert any(("lora_B" in n) and p.abs().sum() > 0 for n, p in peft_model.named_parameters())

    adapter = out.final_dir
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    trained = logits(peft_model, probe)
    loaded = PeftModel.from_pretrained(load_model(GOLDEN, dtype=torch.float32), str(adapter))
    assert torch.equal(logits(loaded, probe), trained)

    merged_dir = tmp_path / "merged"
    assert main(["merge-lora", "--base", str(GOLDEN), "--adapter", str(adapter), "--output", str(merged_dir)]) == 0
    merged = load_model(merged_dir, dtype=torch.float32)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert_close_rel(logits(merged, probe), trained, what="merged vs base+adapter")
    assert not torch.allclose(logits(merged, probe), logits(load_model(GOLDEN, dtype=torch.float32), probe))


def test_lora_memory_layout_on_a_bf16_base(tmp_path, tok, golden_pair):
    """What lets LoRA of the 6B fit one 24 GB device: the frozen base stays bf16 (no fp32 copy), no
    gradients for it, and AdamW state exists only for the float32 adapters."""
    from glm6b.config import LoadConfig

    trainer = Trainer(model_args=LoadConfig(load_checkpoint=str(GOLDEN)), tokenizer=tok,
                      args=args(tmp_path, max_steps=2, gradient_checkpointing=True), train_dataset=golden_pair,
                      method="lora")
    out = trainer.train()
    assert all(torch.isfinite(torch.tensor(out.losses)))
    params = dict(trainer.model.named_parameters())
    adapters = {n for n in params if "lora_" in n}
    assert adapters and all(params[n].dtype == torch.float32 and params[n].requires_grad for n in adapters)
    for name in params.keys() - adapters:
        assert params[name].dtype == torch.bfloat16 and not params[name].requires_grad, name
        assert params[name].grad is None, name
    fp32_bytes = sum(t.numel() * t.element_size() for t in trainer.model.state_dict().values()
                     if t.dtype == torch.float32)
    assert fp32_bytes == sum(params[n].numel() * 4 for n in adapters)  # no float32 copy of any frozen tensor
    with_state = {id(p) for p, state in trainer.optimizer.state.items() if state}
    assert with_state == {id(params[n]) for n in adapters}
    assert trainer.model.base_model.model.transformer.gradient_checkpointing


def test_ptuning_trains_only_the_prefix_encoder(tmp_path, tok, golden_pair, probe):
    model = load_model(GOLDEN, dtype=torch.float32, pre_seq_len=4)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = Trainer(model=model, tokenizer=tok, args=args(tmp_path, learning_rate=0.1, max_steps=5),
                      train_dataset=golden_pair, method="ptuning")
    out = trainer.train()
    assert out.losses[-1] < out.losses[0]
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == name.startswith("transformer.prefix_encoder."), name
    assert sorted(p.name for p in out.final_dir.iterdir()) == ["config.json", "pytorch_model.bin"]
    reloaded = load_model(GOLDEN, dtype=torch.float32, ptuning_checkpoint=out.final_dir)
    assert reloaded.config.pre_seq_len == 4
    assert torch.equal(logits(reloaded, probe), logits(model, probe))


class Killed(RuntimeError):
    pass


@pytest.mark.parametrize("method", ["lora", "full", "ptuning"])
def test_kill_and_resume_gives_the_same_losses(tmp_path, tok, sample_file, method):
    # Batches of 1 with accumulation 3 over 4 shuffled rows, so the 4 steps cross epochs and the
    # checkpoint (step 2, micro-batch 6) sits inside epoch 1; LoRA and P-tuning dropout draw random numbers.
    dataset = JsonlDataset(sample_file, tok, DATA)
    common = dict(max_steps=4, per_device_train_batch_size=1, gradient_accumulation_steps=3, save_steps=2,
                  learning_rate=1e-3 if method == "full" else 1e-2)

    def run(out_dir, callbacks=(), resume=None):
        torch.manual_seed(0)  # a fresh prefix encoder is drawn at load time
        model = load_model(GOLDEN, dtype=torch.float32, pre_seq_len=4 if method == "ptuning" else None)
        trainer = Trainer(model=model, tokenizer=tok, train_dataset=dataset, args=args(out_dir, **common),
                          method=method, callbacks=list(callbacks))
        return trainer.train(resume_from_checkpoint=resume)

    reference = run(tmp_path / "straight").losses

    def kill(trainer, record):
        if record["step"] == 3:  # after checkpoint-2 was written and one more step ran
            raise Killed

    with pytest.raises(Killed):
        run(tmp_path / "killed", [kill])
    checkpoint = tmp_path / "killed" / "checkpoint-2"
    weights = {"lora": {"adapter_config.json", "adapter_model.safetensors"},
               "full": {"config.json", "model.safetensors"}, "ptuning": {"config.json", "pytorch_model.bin"}}
    assert {p.name for p in checkpoint.iterdir()} >= weights[method] | {"optimizer.pt", "rng_state.pt",
                                                                        "scheduler.pt", "trainer_state.json"}
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert (state["global_step"], state["epoch"], state["batch_index"]) == (2, 1, 2)
    assert not list((tmp_path / "killed").glob("*.tmp"))
    resumed = run(tmp_path / "killed", resume="latest").losses
    assert resumed == reference
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_run_lora_recipe_end_to_end(tmp_path, sample_file, capsys):
    from glm6b.cli import main

    out = tmp_path / "out"
    code = main(["run", "--config", str(CONFIGS / "lora.yaml"), "--mode", "finetune", "--load-checkpoint", str(GOLDEN),
                 "--train-data", str(sample_file), "--output-dir", str(out), "--max-steps", "4", "--batch-size", "2",
                 "--learning-rate", "1e-2", "--set", "trainer.logging_steps=2", "--set", "trainer.warmup_steps=0",
                 "--set", "trainer.save_steps=2", "--set", "data.max_source_length=24"])
    assert code == 0, capsys.readouterr().err
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4]
    assert all({"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= r.keys() for r in log)
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "final" / "adapter_config.json").is_file() and (out / "final" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert any((out / "tensorboard").iterdir())
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["method"] == "lora" and recipe["data"]["max_source_length"] == 24

    code = main(["run", "--config", str(CONFIGS / "lora_infer.yaml"), "--mode", "predict", "--load-checkpoint",
                 str(GOLDEN), "--set", f"model.adapter={out / 'final'}", "--output-dir", str(tmp_path / "pred"),
                 "--prompt", "类型#裙", "--set", "generation.max_new_tokens=4"])
    assert code == 0, capsys.readouterr().err
    assert len((tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()) == 1


def test_recipe_errors_name_file_line_and_key(tmp_path, capsys):
    from glm6b.cli import main

    for name in ("finetune", "lora", "infer", "lora_infer"):
        load_recipe(CONFIGS / f"{name}.yaml")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: lora\ntrainer:\n  max_steps: 3\n  learing_rate: 0.1\n")
    with pytest.raises(RecipeError, match=r"r\.yaml, line 4: unknown key 'trainer\.learing_rate'"):
        load_recipe(recipe)
    recipe.write_text("method: lora\nmodle:\n  dtype: float32\n")
    with pytest.raises(RecipeError, match=r"r\.yaml, line 2: unknown key 'modle'"):
        load_recipe(recipe)
    recipe.write_text("trainer:\n  max_steps: many\n")
    with pytest.raises(RecipeError, match=r"line 2: 'trainer\.max_steps' = 'many': expected int \| null"):
        load_recipe(recipe)
    recipe.write_text("parallel:\n  data_parallel: yes\n")
    with pytest.raises(RecipeError, match=r"line 2: 'parallel\.data_parallel' = True: expected int"):
        load_recipe(recipe)
    recipe.write_text("parallel:\n  data_parallel: 8\n")
    assert load_recipe(recipe).parallel.data_parallel == 8  # checked against the process count by run
    with pytest.raises(RecipeError, match=r"--set lora\.rank=4: unknown key 'lora\.rank'"):
        load_recipe(CONFIGS / "lora.yaml", ["lora.rank=4"])
    overridden = load_recipe(CONFIGS / "lora.yaml", ["trainer.learning_rate=1e-4", "trainer.batch_size=2"],
                             {"trainer.max_steps": 5})
    assert (overridden.trainer.learning_rate, overridden.trainer.batch_size, overridden.trainer.max_steps) == (1e-4, 2, 5)
    assert main(["run", "--config", str(recipe), "--mode", "train", "--train-data", "x.json"]) == 2
    assert "must equal the number of processes, which is 1" in capsys.readouterr().err


@pytest.fixture(scope="module")
def varied_rows(tok, tmp_path_factory):
    """32 ADGEN-style rows whose answers have different token counts."""
    from glm6b.sample_data import make_adgen_examples, write_adgen_jsonl

    path = tmp_path_factory.mktemp("varied") / "train.json"
    write_adgen_jsonl(path, make_adgen_examples(32, seed=3))
    dataset = JsonlDataset(path, tok, DataConfig(max_source_length=24, max_target_length=40))
    targets = {int((torch.as_tensor(dataset[i]["labels"]) != -100).sum()) for i in range(len(dataset))}
    assert len(targets) > 3  # the split matters only when rows differ in target length
    return dataset


def _step_gradients(tmp_path, tok, dataset, batch, accum, normalization):
    """Losses of 2 steps over the same 32 rows, and the gradients each optimizer step applied."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    grads = []

    def keep(optimizer, *_):
        grads.append([p.grad.detach().clone() for group in optimizer.param_groups for p in group["params"]])

    handle = register_optimizer_step_pre_hook(keep)
    try:
        trainer = Trainer(model=load_model(GOLDEN, dtype=torch.float32), tokenizer=tok, method="full",
                          train_dataset=dataset,
                          args=args(tmp_path, max_steps=2, per_device_train_batch_size=batch,
                                    gradient_accumulation_steps=accum, loss_normalization=normalization,
                                    learning_rate=1e-3, max_grad_norm=0.0))
        out = trainer.train()
    finally:
        handle.remove()
    return out.losses, grads


def test_token_normalised_loss_does_not_depend_on_the_micro_batch_split(tmp_path, tok, varied_rows):
    losses_4x8, grads_4x8 = _step_gradients(tmp_path / "a", tok, varied_rows, 4, 8, "token")
    losses_2x16, grads_2x16 = _step_gradients(tmp_path / "b", tok, varied_rows, 2, 16, "token")
    assert all(abs(a - b) <= 2e-6 * abs(b) for a, b in zip(losses_4x8, losses_2x16)), (losses_4x8, losses_2x16)
    for step_a, step_b in zip(grads_4x8, grads_2x16):
        for a, b in zip(step_a, step_b):
            assert_close_rel(a, b, rel=1e-4, what="gradient")
    # The same loss as one micro-batch holding all 32 rows, which is what it claims to be.
    whole, _ = _step_gradients(tmp_path / "c", tok, varied_rows, 32, 1, "token")
    assert abs(whole[0] - losses_4x8[0]) <= 2e-6 * whole[0]
    # The older definition (a mean of micro-batch means) does depend on the split.
    old_4x8, _ = _step_gradients(tmp_path / "d", tok, varied_rows, 4, 8, "per_micro_batch")
    old_2x16, _ = _step_gradients(tmp_path / "e", tok, varied_rows, 2, 16, "per_micro_batch")
    assert abs(old_4x8[0] - old_2x16[0]) > 1e-5 * old_4x8[0]


def test_loss_normalization_is_checked():
    with pytest.raises(ValueError, match="loss_normalization='mean'"):
        TrainingConfig(loss_normalization="mean")
