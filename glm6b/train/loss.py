"""The training objective: ChatGLM-6B's shifted causal-LM cross entropy (spec 4.10) over target tokens."""

from __future__ import annotations

import torch

from .data import IGNORE_INDEX


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The model's shifted cross entropy (spec 4.10), kept in float32.

    The model returns its loss cast to the activation dtype; under bf16 that rounds the logged loss
    to 3 significant digits, so the trainer computes the same mean itself and keeps float32.

    Args:
        logits: [B, T, V]; position t predicts labels[t + 1].
        labels: [B, T], -100 ignored.

    Returns:
        The scalar float32 loss.
    """
    shift_logits = logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                             labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
