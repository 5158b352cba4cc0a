"""Beam search with transformers 4.27's semantics (BeamSearchScorer and BeamHypotheses), on the decode engine.

Each prompt keeps `num_beams` running beams (rows of the engine's cache). At every step the
processed log-probabilities of each beam plus its running score give num_beams * V candidates per
prompt; the best 2 * num_beams are walked in order: a candidate ending in eos becomes a finished
hypothesis (only if it ranks among the first num_beams), any other fills the next free beam, until
num_beams beams are filled. A hypothesis is scored sum_logprobs / length ** length_penalty, where
length counts the prompt (padding included) and not the eos. A prompt is done when it has num_beams
hypotheses and `early_stopping` says no running beam can improve on them:

    True     as soon as num_beams hypotheses are finished;
    False    when the worst finished score >= best running sum / current length ** length_penalty;
    "never"  when the worst finished score >= best running sum / max length ** length_penalty (for
             length_penalty > 0: an upper bound, so the search is exhaustive within its beams).

At the length limit every running beam becomes a hypothesis; the best num_return_sequences
hypotheses per prompt are returned, best first, padded to the longest (+ one eos after a
hypothesis shorter than the limit), as transformers does.
"""

from __future__ import annotations

import torch

from ..config import GenerationConfig
from .engine import DecodeEngine, prompt_inputs
from .sampling import new_token_budget, process_scores


class BeamHypotheses:
    """The finished hypotheses of one prompt: the best `num_beams`, with their scores.

    Args:
        num_beams: how many hypotheses to keep.
        length_penalty: exponent of the length in the score.
        early_stopping: True, False or "never" (see the module docstring).
        max_length: the total length limit (prompt + new tokens), for "never".
    """

    def __init__(self, num_beams: int, length_penalty: float, early_stopping: bool | str, max_length: int):
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.max_length = max_length
        self.beams: list[tuple[float, list[int]]] = []
        self.worst_score = 1e9

    def __len__(self) -> int:
        return len(self.beams)

    def add(self, tokens: list[int], sum_logprobs: float) -> None:
        """Offer a hypothesis (prompt + generated tokens, without the eos)."""
        score = sum_logprobs / (len(tokens) ** self.length_penalty)
        if len(self) < self.num_beams or score > self.worst_score:
            self.beams.append((score, tokens))
            if len(self) > self.num_beams:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float, cur_len: int) -> bool:
        """Whether no running beam (best running sum `best_sum_logprobs`) can still enter the list."""
        if len(self) < self.num_beams:
            return False
        if self.early_stopping is True:
            return True
        length = cur_len
        if self.early_stopping == "never" and self.length_penalty > 0:
            length = self.max_length
        return self.worst_score >= best_sum_logprobs / length ** self.length_penalty


@torch.inference_mode()
def beam_search(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None, config: GenerationConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search over a batch of prompts.

    Args:
        model: a ChatGLMForConditionalGeneration.
        input_ids: [B, T] prompts (left-padded for a batch).
        attention_mask, position_ids: as for `glm6b.inference.generation.generate`.
        config: num_beams > 1; length_penalty, early_stopping, num_return_sequences, the length
            limit, eos/pad ids and the logits processors (repetition_penalty, allowed_vocab_size)
            are used; sampling settings are not.

    Returns:
        (sequences [B * num_return_sequences, T + N'] with N' <= the new-token limit, scores
        [B * num_return_sequences] float32: each returned hypothesis's length-penalised score).
    """
    config.validate()
    device = model.device
    input_ids = input_ids.to(device)
    mcfg = model.config
    eos_ids = config.eos_token_id if config.eos_token_id is not None else mcfg.eos_token_id
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
    pad_id = config.pad_token_id if config.pad_token_id is not None else mcfg.pad_token_id
    batch, prompt_len = input_ids.shape
    new_tokens = new_token_budget(config, prompt_len)
    max_length = prompt_len + new_tokens
    beams = config.num_beams

    mask, positions = prompt_inputs(model, input_ids, attention_mask, position_ids)
    engine = DecodeEngine(model, batch * beams, max_length, compile=config.compile,
                          prefill_chunk_size=config.prefill_chunk_size)
    logits = engine.prefill(input_ids, mask, positions)
    rows = torch.arange(batch, device=device).repeat_interleave(beams)
    engine.reorder_rows(rows)
    logits, sequences = logits[rows], input_ids[rows]  # [B * nb, V], [B * nb, T]

    hypotheses = [BeamHypotheses(beams, config.length_penalty, config.early_stopping, max_length)
                  for _ in range(batch)]
    done = [False] * batch
    # Only the first beam of a prompt starts live, so the first step does not pick one token nb times.
    beam_scores = torch.zeros(batch, beams, device=device)
    beam_scores[:, 1:] = -1e9
    beam_scores = beam_scores.view(-1)
    identity = torch.arange(batch * beams, device=device)
    for step in range(new_tokens):
        cur_len = sequences.shape[1]
        scores = torch.log_softmax(logits.float(), dim=-1)
        scores = process_scores(scores, [config] * len(sequences), sequences, eos_ids[0]) + beam_scores[:, None]
        vocab = scores.shape[-1]
        top_scores, top_ids = torch.topk(scores.view(batch, beams * vocab), 2 * beams, dim=1)
        top_scores_list, top_ids_list = top_scores.tolist(), top_ids.tolist()

        next_scores = torch.zeros(batch, beams)
        next_tokens = torch.full((batch, beams), pad_id, dtype=torch.long)
        next_rows = identity.view(batch, beams).cpu().clone()
        for b in range(batch):
            if done[b]:
                continue
            filled = 0
            for rank, (score, flat) in enumerate(zip(top_scores_list[b], top_ids_list[b])):
                beam, token = divmod(flat, vocab)
                row = b * beams + beam
                if token in eos_ids:
                    if rank < beams:  # an eos below the first num_beams candidates is ignored
                        hypotheses[b].add(sequences[row].tolist(), score)
                else:
                    next_scores[b, filled], next_tokens[b, filled], next_rows[b, filled] = score, token, row
                    filled += 1
                if filled == beams:
                    break
            done[b] = hypotheses[b].is_done(max(top_scores_list[b]), cur_len)

        beam_scores = next_scores.view(-1).to(device)
        next_tokens = next_tokens.view(-1).to(device)
        next_rows = next_rows.view(-1).to(device)
        sequences = torch.cat([sequences[next_rows], next_tokens[:, None]], dim=1)
        if all(done) or step == new_tokens - 1:
            break
        if not torch.equal(next_rows, identity):
            engine.reorder_rows(next_rows)
        logits = engine.decode(next_tokens)

    # Running beams of unfinished prompts become hypotheses too.
    final_scores = beam_scores.tolist()
    for b in range(batch):
        if not done[b]:
            for beam in range(beams):
                row = b * beams + beam
                hypotheses[b].add(sequences[row].tolist(), final_scores[row])
    best: list[list[int]] = []
    best_scores: list[float] = []
    for hyp in hypotheses:
        ranked = sorted(hyp.beams, key=lambda item: item[0])
        for _ in range(config.num_return_sequences):
            score, tokens = ranked.pop()
            best.append(tokens)
            best_scores.append(score)
    width = min(max(len(t) for t in best) + 1, max_length)
    out = torch.full((len(best), width), pad_id, dtype=torch.long)
    for i, tokens in enumerate(best):
        out[i, :len(tokens)] = torch.tensor(tokens)
        if len(tokens) < width:
            out[i, len(tokens)] = eos_ids[0]
    return out.to(device), torch.tensor(best_scores)
