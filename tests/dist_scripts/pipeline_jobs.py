"""Pipeline-parallel jobs for tests/test_pipeline.py (run on every rank of a ProcessPool), and their one-process twin.

`train` runs the real Trainer on the golden checkpoint and an ADGEN-style file with a parallel layout
(one process when the layout is empty); `stage_forward_and_generate` builds a Pipeline directly and
compares its forward and generation with the whole model on rank 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from glm6b.config import DataConfig, GenerationConfig, LoadConfig, LoraConfig, ParallelConfig, TrainingConfig
from glm6b.train import parallel as D

GOLDEN = Path(__file__).parents[1] / "golden"
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query_key_value"])
PROMPTS = ["类型#裙*颜色#红色", "类型#裤", "类型#上衣*风格#复古*图案#条纹"]


def make_trainer(out_dir: str | Path, data_file: str, method: str = "full", layout: dict | None = None,
                 steps: int = 4, accumulation: int = 2, checkpointing: bool = False, save_steps: int | None = None,
                 resume: str | None = None, eval_steps: int | None = None, dynamic_padding: bool = False,
                 loss_normalization: str = "token", max_grad_norm: float = 1.0):
    """A Trainer of `steps` steps of `accumulation` micro-batches of 2 rows, in float32, LR 1e-3."""
    from glm6b.tokenizer import load_tokenizer
    from glm6b.train.trainer import Trainer

    return Trainer(
        model_args=LoadConfig(load_checkpoint=str(GOLDEN), dtype="float32"), tokenizer=load_tokenizer(GOLDEN),
        method=method, lora_config=LoraConfig(**LORA), train_dataset=data_file,
        eval_dataset=data_file if eval_steps else None,
        data_config=DataConfig(max_source_length=24, max_target_length=12, dynamic_padding=dynamic_padding),
        parallel_config=ParallelConfig(**(layout or {})),
        args=TrainingConfig(output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=2,
                            gradient_accumulation_steps=accumulation, gradient_checkpointing=checkpointing,
                            learning_rate=1e-3, warmup_steps=0, save_steps=save_steps, logging_steps=1,
                            eval_steps=eval_steps, eval_generation_samples=3, per_device_eval_batch_size=3,
                            resume_from_checkpoint=resume, loss_normalization=loss_normalization,
                            max_grad_norm=max_grad_norm, tensorboard=False, disable_tqdm=True))


def run_training(out_dir: str | Path, data_file: str, **kwargs) -> dict:
    """Train; return (on the main process) the losses, grad norms, eval records, predictions and final/'s path."""
    out_dir = Path(out_dir)
    trainer = make_trainer(out_dir, data_file, **kwargs)
    result = trainer.train()
    predictions = trainer.predict(PROMPTS) if kwargs.get("eval_steps") else None
    if not D.is_main_process():
        return {}
    log = [json.loads(line) for line in (out_dir / "train_log.jsonl").read_text().splitlines()]
    eval_path = out_dir / "eval_log.jsonl"
    return {"losses": result.losses, "grad_norms": [r["grad_norm"] for r in log],
            "eval": [json.loads(line) for line in eval_path.read_text().splitlines()] if eval_path.is_file() else [],
            "predictions": predictions, "final": str(result.final_dir)}


def train(info, out_dir: Path, **kwargs) -> dict:
    """The ProcessPool job: `run_training` into out_dir/run."""
    return run_training(out_dir / "run", **kwargs)


def forward_and_generate(info, out_dir: Path, stages: int) -> dict:
    """A Pipeline built from the golden model: the last stage's forward logits (handed to rank 0, which is
    stage 0, through a file) and the greedy generations (every stage has them), with the whole model's."""
    from glm6b.checkpoint.hf import load_model
    from glm6b.inference.generation import generate
    from glm6b.tokenizer import load_tokenizer
    from glm6b.train.pipeline import Pipeline

    tok = load_tokenizer(GOLDEN)
    batch = tok(PROMPTS, padding=True, return_tensors="pt")
    inputs = (batch["input_ids"], batch["attention_mask"], batch["position_ids"])
    config = GenerationConfig(max_new_tokens=6, do_sample=False)
    layout = ParallelConfig(pipeline_stage=stages, data_parallel=info.world_size // stages)
    pipeline = Pipeline(load_model(GOLDEN, dtype=torch.float32), D.build_mesh(layout), layout, micro_batches=stages,
                        rows=2, width=16, pad_id=tok.pad_token_id, device=torch.device("cpu"))
    logits = pipeline.forward(batch["input_ids"], batch["position_ids"], batch["attention_mask"])
    if pipeline.last and D.data_parallel_rank_and_size(pipeline.mesh)[0] == 0:
        torch.save(logits, out_dir / "logits.pt")
    sequences = pipeline.generate(None, *inputs, generation_config=config)
    D.barrier()
    if info.rank != 0:
        return {}
    whole = load_model(GOLDEN, dtype=torch.float32)
    expected = whole(batch["input_ids"], position_ids=batch["position_ids"],
                     attention_mask=batch["attention_mask"]).logits.detach()
    return {"logits": torch.load(out_dir / "logits.pt"), "expected_logits": expected, "sequences": sequences,
            "expected_sequences": generate(whole, *inputs, generation_config=config), "layers": pipeline.layer_ids}
