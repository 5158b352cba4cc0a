"""The training objective: ChatGLM-6B's shifted causal-LM cross entropy (spec 4.10) over target tokens.

One optimizer step's loss is the sum of the token losses of every micro-batch on every rank divided
by the number of target tokens in the whole step (`loss_normalization: token`, the default), so
the loss and its gradients do not depend on how the step's rows are split into micro-batches and
processes. `per_micro_batch` keeps the older definition (the mean of per-micro-batch means), which
changes with the batch size, the accumulation and the world size.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

from ..data.adgen import IGNORE_INDEX
from . import parallel as P

LossNormalization = Literal["token", "per_micro_batch"]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor,
                   reduction: Literal["mean", "sum"] = "mean") -> torch.Tensor:
    """The model's shifted cross entropy (spec 4.10), kept in float32.

    The model returns its loss cast to the activation dtype; under bf16 that rounds the logged loss
    to 3 significant digits, so the trainer computes the same quantity itself and keeps float32.

    Args:
        logits: [B, T, V]; position t predicts labels[t + 1].
        labels: [B, T], -100 ignored.
        reduction: "mean" over the target tokens, or their "sum".

    Returns:
        The scalar float32 loss.
    """
    shift_logits = logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                             labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
                                             reduction=reduction)


def count_target_tokens(labels: torch.Tensor) -> int:
    """How many tokens of `labels` [B, T] enter the shifted loss (positions 1.. that are not -100)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def forward_backward(trainer, stream: Iterator[dict[str, torch.Tensor]], trainable: list[nn.Parameter],
                     per_epoch: int) -> tuple[float, int, float]:
    """One optimizer step's micro-batches: forward, backward, gradient clipping.

    With loss_normalization "token", each micro-batch's summed token loss is divided by the
    target tokens of the whole step on every data-parallel rank (counted first, one all-reduce),
    times the data-parallel size that DDP / FSDP2 divide the gradients by again: the gradient
    is that of sum(token losses) / tokens, whatever the split.

    Args:
        trainer: the Trainer (model, args, mesh, optimizer, scaler, state, tokenizer).
        stream: the micro-batch stream; gradient_accumulation_steps micro-batches are taken from it.
        trainable: the parameters whose gradient norm is clipped.
        per_epoch: micro-batches per epoch (to keep the data position).

    Returns:
        (the step's loss, the step's non-pad input tokens on all ranks, the gradient norm before clipping).
    """
    args = trainer.args
    accum = args.gradient_accumulation_steps
    batches = [next(stream) for _ in range(accum)]
    dp = P.data_parallel_rank_and_size(trainer.mesh)[1]
    by_token = args.loss_normalization == "token"
    step_targets = P.all_reduce_sum(sum(count_target_tokens(b["labels"]) for b in batches), trainer.mesh)
    pad_id = trainer.tokenizer.pad_token_id
    step_loss, step_tokens = 0.0, 0
    for i, batch in enumerate(batches):
        input_ids = batch["input_ids"].to(trainer.device)
        labels = batch["labels"].to(trainer.device)
        with P.no_sync(trainer.model, enabled=i < accum - 1):
            with trainer.autocast():
                logits = trainer.model(input_ids=input_ids).logits
                if by_token:
                    loss = causal_lm_loss(logits, labels, reduction="sum")
                    scaled = loss * (dp / max(step_targets, 1))
                else:
                    loss = causal_lm_loss(logits, labels)
                    scaled = loss / accum  # DDP / FSDP2 average over the data-parallel ranks
            (trainer.scaler.scale(scaled) if trainer.scaler else scaled).backward()
        step_loss += loss.item() if by_token else loss.item() / accum
        step_tokens += int((input_ids != pad_id).sum())
        trainer.state.micro_batches += 1
        trainer.state.epoch, trainer.state.batch_index = divmod(trainer.state.micro_batches, per_epoch)
    if trainer.scaler:
        trainer.scaler.unscale_(trainer.optimizer)
    max_norm = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else float("inf")
    grad_norm = float(P.clip_grad_norm_(trainable, max_norm))
    step_tokens = round(P.all_reduce_sum(step_tokens, trainer.mesh))
    if by_token:
        step_loss = P.all_reduce_sum(step_loss, trainer.mesh) / max(step_targets, 1)
    else:
        step_loss = P.all_reduce_sum(step_loss, trainer.mesh) / dp
    return step_loss, step_tokens, grad_norm
