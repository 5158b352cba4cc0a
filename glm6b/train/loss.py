"""The training objective: ChatGLM-6B's shifted causal-LM cross entropy (spec 4.10) over target tokens.

One optimizer step's loss is the sum of the token losses of every micro-batch on every rank divided
by the number of target tokens in the whole step (`loss_normalization: token`, the default), so
the loss and its gradients do not depend on how the step's rows are split into micro-batches and
processes. `per_micro_batch` keeps the older definition (the mean of per-micro-batch means), which
changes with the batch size, the accumulation and the world size.
"""

from __future__ import annotations

from typing import Literal

import torch

from .data import IGNORE_INDEX

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
