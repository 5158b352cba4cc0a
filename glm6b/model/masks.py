"""The prefix-LM rule: which tokens a ChatGLM-6B token sees, and its 2D position ids (spec 4.7)."""

from __future__ import annotations

import torch

from ..config import ChatGLMConfig


class InputError(ValueError):
    """Model inputs that cannot be used (missing special tokens, bad shapes); the message says why."""


# ----------------------------------------------------------------------------------- masks/positions


def build_mask_and_positions(
    input_ids: torch.Tensor, config: ChatGLMConfig, padding_mask: torch.Tensor | None = None,
    tokenizer_rule: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix-LM attention mask and 2D position ids derived from the token ids (spec 4.7).

    Per row, c = index of the first <sop>. The mask lets every token see the context 0..c-1 and
    the tokens before it (True = masked). Position row 0 counts 0..T-1 with positions from c on
    set to the index of the mask token ([gMASK] preferred over [MASK], as the model does); row 1
    is 0 over the context and 1, 2, ... from <sop> on.

    Args:
        input_ids: [B, T] token ids.
        config: gives the special ids.
        padding_mask: optional [B, T] with 1/True at real tokens and 0/False at left padding.
            Pads are then hidden from every token and positions count from the first real token,
            exactly as the tokenizer builds them for a left-padded batch.
        tokenizer_rule: the tokenizer's variant of the rule (spec §3.4), which the tokenizer and the
            training data use: [MASK] is preferred over [gMASK], a row without <sop> is all
            context, and a row without either mask token keeps positions 0, 1, ...; nothing is
            refused. (config then only needs bos/mask/gmask_token_id.)

    Returns:
        attention_mask [B, 1, T, T] bool and position_ids [B, 2, T] int64.

    Raises:
        InputError: (model rule) a row without <sop>, or without [MASK]/[gMASK] (the reference fails deep
            inside with an unrelated message; prompts must end with [gMASK] <sop>).
    """
    batch, length = input_ids.shape
    device = input_ids.device
    t = torch.arange(length, device=device)
    pad = torch.zeros(batch, dtype=torch.long, device=device)
    if padding_mask is not None:
        steps = padding_mask.to(torch.long).diff(dim=1)
        if (steps < 0).any():  # a pad after a real token: right padding would shift every position
            raise InputError(f"attention_mask row {int((steps < 0).any(dim=1).nonzero()[0])} has padding after real "
                             f"tokens: ChatGLM-6B batches are left-padded (the tokenizer pads on the left)")
        pad = length - padding_mask.to(torch.long).sum(dim=1)
    real = t[None, :] >= pad[:, None]  # [B, T]

    def first_index(token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        hits = (input_ids == token_id) & real
        return hits.any(dim=1), hits.to(torch.long).argmax(dim=1)  # argmax finds the first hit

    has_bos, c = first_index(config.bos_token_id)
    has_gmask, gmask_pos = first_index(config.gmask_token_id)
    has_mask, mask_pos = first_index(config.mask_token_id)
    if tokenizer_rule:  # no <sop>: all context; [MASK] before [gMASK]; neither: positions stay 0, 1, ...
        c = torch.where(has_bos, c, length)
        mask_pos = torch.where(has_mask, mask_pos, torch.where(has_gmask, gmask_pos, -1))
        return _masks_and_positions(t, c, mask_pos, pad, real)
    for row in (~has_bos).nonzero().flatten().tolist():
        raise InputError(
            f"input row {row} has no <sop> token (id {config.bos_token_id}): ChatGLM-6B prompts end with "
            f"[gMASK] <sop>; encode text with tokenizer.encode(text) or tokenizer(texts) which add them")
    for row in (~(has_gmask | has_mask)).nonzero().flatten().tolist():
        raise InputError(
            f"input row {row} has no [gMASK] (id {config.gmask_token_id}) or [MASK] (id {config.mask_token_id}) "
            f"token: ChatGLM-6B prompts end with [gMASK] <sop>; encode text with tokenizer.encode(text)")
    mask_pos = torch.where(has_gmask, gmask_pos, mask_pos)  # the model prefers [gMASK]
    return _masks_and_positions(t, c, mask_pos, pad, real)


def prompt_inputs(input_ids: torch.Tensor, config: ChatGLMConfig, attention_mask: torch.Tensor | None = None,
                  position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A prompt's prefix-LM mask [B, 1, T, T] and positions [B, 2, T]: the given ones, or those derived from
    the ids (`build_mask_and_positions`, model rule). The one place a prompt's inputs are completed, for the
    model's forward and for the decode engine's prefill.

    Args:
        input_ids: [B, T] prompts.
        config: gives the special ids.
        attention_mask: the tokenizer's [B, 1, T, T] bool mask, a [B, T] 0/1 padding mask (1 = real
            token), or None.
        position_ids: the tokenizer's [B, 2, T], or None.

    Raises:
        InputError: a mask or positions must be derived and a row lacks <sop> or [gMASK]/[MASK].
    """
    padding_mask = None
    if attention_mask is not None and attention_mask.dim() == 2:
        padding_mask, attention_mask = attention_mask, None
    if attention_mask is None or position_ids is None:
        built_mask, built_positions = build_mask_and_positions(input_ids, config, padding_mask)
        attention_mask = built_mask if attention_mask is None else attention_mask
        position_ids = built_positions if position_ids is None else position_ids
    return attention_mask, position_ids


def _masks_and_positions(t, c, mask_pos, pad, real) -> tuple[torch.Tensor, torch.Tensor]:
    # Query i sees key j when both are real tokens and j is in the context (j < c) or j <= i.
    i, j = t[:, None], t[None, :]
    visible = (j <= i)[None] | (j[None] < c[:, None, None])  # [B, T, T]
    visible &= real[:, :, None] & real[:, None, :]
    masks = ~visible[:, None]  # [B, 1, T, T], True = masked

    in_block = t[None, :] >= c[:, None]  # from <sop> on
    absolute = torch.where(in_block & (mask_pos[:, None] >= 0), mask_pos[:, None], t[None, :]) - pad[:, None]
    block = torch.where(in_block, t[None, :] - c[:, None] + 1, 0)
    positions = torch.stack([absolute, block], dim=1).masked_fill(~real[:, None, :], 0)  # [B, 2, T]
    return masks, positions
