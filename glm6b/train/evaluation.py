"""Evaluation hooks of the Trainer: teacher-forced loss over an evaluation set, BLEU-4 / ROUGE of greedy
answers, and `predict` (prompts rendered exactly like the training data)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..config import GenerationConfig, TrainerError
from ..data.adgen import RowDataset, render_prompt
from ..eval.evaluate import evaluate_generation, generate_predictions
from ..eval.metrics import METRIC_NAMES
from ..model import GLMBlock
from .loss import causal_lm_loss, count_target_tokens
from .parallel import unwrap_model, unwrap_parallel


@torch.no_grad()
def evaluate(trainer, eval_dataset: RowDataset | str | os.PathLike | None = None) -> dict[str, Any]:
    """Teacher-forced loss over an evaluation set of training-format rows, plus generation scores.

    When the rows come from a jsonl file with answers (a JsonlDataset: `.examples`) and
    args.eval_generation_samples is set, the first that many examples are also answered greedily
    and scored (BLEU-4, ROUGE-1/2/L) with glm6b.eval.evaluate.evaluate_generation.

    Args:
        eval_dataset: a "train"-mode RowDataset or a path; None takes the trainer's eval_dataset.

    Returns:
        {"step", "eval_loss" (the sum of the token losses divided by the target tokens: the training
        loss's definition), "eval_tokens", "eval_rows"} and, with
        generation metrics, "bleu-4", "rouge-1", "rouge-2", "rouge-l".
    """
    trainer.ensure_model()
    dataset = trainer.resolve_dataset(eval_dataset if eval_dataset is not None else trainer.eval_dataset)
    if dataset is None:
        raise TrainerError("no evaluation data: pass eval_dataset (or set data.eval_data)")
    if dataset.mode != "train":
        raise TrainerError("evaluate() computes the teacher-forced loss: build eval_dataset with mode='train' "
                           "(prompt + answer rows); generation metrics are in glm6b.eval.evaluate")
    was_training = trainer.model.training
    trainer.model.eval()
    try:
        # under pipeline parallelism the batches run stage by stage (glm6b.train.pipeline)
        loss_sums = trainer.pipeline.loss_sums if trainer.pipeline is not None else _loss_sums
        total, tokens = loss_sums(trainer, dataset)
    finally:
        trainer.model.train(was_training)
    result = {"step": trainer.state.global_step, "eval_loss": total / max(tokens, 1), "eval_tokens": tokens,
              "eval_rows": len(dataset)}
    result.update(generation_metrics(trainer, dataset))
    return result


def _loss_sums(trainer, dataset: RowDataset) -> tuple[float, int]:
    """(sum of the token losses, target tokens) of `dataset` on the whole model (see Pipeline.loss_sums)."""
    total, tokens = 0.0, 0
    bs = trainer.args.per_device_eval_batch_size
    for start in range(0, len(dataset), bs):
        batch = dataset.collate([dataset[i] for i in range(start, min(start + bs, len(dataset)))])
        labels = batch["labels"].to(trainer.device)
        with trainer.autocast():
            logits = trainer.model(input_ids=batch["input_ids"].to(trainer.device)).logits
            total += causal_lm_loss(logits, labels, reduction="sum").item()
        tokens += count_target_tokens(labels)
    return total, tokens


def _generate_fn(trainer):
    """What generates under the trainer's layout: None (the model's own generate), or the pipeline's."""
    return trainer.pipeline.generate if trainer.pipeline is not None else None


def generation_metrics(trainer, dataset: RowDataset) -> dict[str, float]:
    """BLEU-4 / ROUGE-1/2/L of greedy answers for the first eval_generation_samples examples with an answer.

    Every rank runs it (with identical data and weights, greedy decoding takes the same number of
    steps everywhere, so FSDP / tensor-parallel collectives line up); rank 0 records the result.
    Under the bf16 policy it runs in bf16 autocast: with FSDP2 the queries are then bf16 like the
    gathered weights, while the KV cache takes the float32 dtype of the sharded master weights;
    autocast casts attention's inputs to one dtype. Under tensor parallelism the KV cache is sized
    for this rank's heads (`local_heads_config`). Under pipeline parallelism every stage runs it
    too: the tokens pass through the stages (Pipeline.generate).
    """
    limit = trainer.args.eval_generation_samples
    examples = [ex for ex in getattr(dataset, "examples", None) or [] if getattr(ex, "answer", None)]
    if not limit or not examples:
        return {}
    examples = examples[:limit]
    dc = trainer.data_config
    with trainer.autocast(generation=True), local_heads_config(trainer.model):
        _, scores = evaluate_generation(
            unwrap_parallel(trainer.model), trainer.tokenizer, [ex.prompt for ex in examples],
            [ex.answer for ex in examples], batch_size=trainer.args.per_device_eval_batch_size,
            max_new_tokens=dc.max_target_length, max_source_length=dc.max_source_length,
            max_target_length=dc.max_target_length, progress=False, generate_fn=_generate_fn(trainer))
    return {name: scores[name] for name in METRIC_NAMES}


def predict(trainer, input_data: str | list[str] | RowDataset, generation_config: GenerationConfig | None = None,
            batch_size: int | None = None, history: list | None = None) -> list[str]:
    """Generate an answer for each prompt (greedy unless the generation config samples).

    Prompts are rendered like the training data (data.source_prefix + chat template), encoded
    with max_source_length, left-padded in batches, and the new tokens decoded with
    skip_special_tokens (as the reference's predictions).

    Args:
        input_data: a prompt, a list of prompts, or a "eval"/"train"-mode dataset built from
            jsonl (its examples' prompts are used).
        generation_config: overrides the trainer's generation_config.
        batch_size: prompts per batch (default per_device_eval_batch_size).
        history: earlier (query, response) pairs applied to every prompt.

    Returns:
        One text per prompt, in order.
    """
    trainer.ensure_model()
    if isinstance(input_data, str):
        prompts = [render_prompt(input_data, history, trainer.data_config.source_prefix)]
    elif isinstance(input_data, RowDataset):
        if not hasattr(input_data, "examples"):
            raise TrainerError("predict() needs the prompt texts: pass a jsonl-backed dataset or a list of prompts")
        prompts = [ex.prompt for ex in input_data.examples]
    else:
        prompts = [render_prompt(p, history, trainer.data_config.source_prefix) for p in input_data]
    config = generation_config or trainer.generation_config or GenerationConfig(
        max_length=None, max_new_tokens=trainer.data_config.max_target_length)
    new_tokens = config.max_new_tokens if config.max_new_tokens is not None else trainer.data_config.max_target_length
    with trainer.autocast(generation=True), local_heads_config(trainer.model):
        predictions, _ = generate_predictions(
            unwrap_parallel(trainer.model), trainer.tokenizer, prompts,
            batch_size=batch_size or trainer.args.per_device_eval_batch_size,
            max_source_length=trainer.data_config.max_source_length, max_new_tokens=new_tokens,
            generation_config=config, progress=not trainer.args.disable_tqdm, generate_fn=_generate_fn(trainer))
    return predictions


@contextlib.contextmanager
def local_heads_config(model: nn.Module) -> Iterator[None]:
    """Inside the block, `model.config` gives this rank's attention heads (tensor parallelism).

    Each tensor-parallel rank holds num_attention_heads / tp heads, and generation sizes its KV
    cache from `model.config` ([layers, batch, heads, length, head_dim]). The ChatGLM model's own
    `config` attribute is swapped for one with the local head count and the same head_dim; the
    blocks keep the original config object, and nothing else is changed. A no-op without tensor
    parallelism.
    """
    base = unwrap_model(model)
    blocks = [m for m in base.modules() if isinstance(m, GLMBlock)]
    config = base.config
    local = blocks[0].attention.num_heads if blocks else config.num_attention_heads
    if local == config.num_attention_heads:
        yield
        return
    base.config = config.replace(num_attention_heads=local, hidden_size=local * config.head_dim)
    try:
        yield
    finally:
        base.config = config
