"""What to generate and how tokens are chosen: GenerationConfig and the logits processing.

Logits processing follows transformers 4.27.1, which the reference uses: repetition penalty and the
invalid-score guard first, then temperature, top-k and top-p, then a multinomial draw.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import torch


@dataclass
class GenerationConfig:
    """How to generate. Defaults are those of transformers' `generate` for this model.

    Attributes:
        max_length: total length limit, prompt included (padding counts, as in transformers).
        max_new_tokens: limit on generated tokens; overrides max_length when set.
        do_sample: sample instead of taking the argmax.
        temperature, top_k, top_p: sampling warpers (top_k=0 and top_p=1.0 disable them).
        repetition_penalty: >1 discourages tokens already in the sequence (CTRL-style).
        num_return_sequences: samples per prompt.
        eos_token_id: stop token(s); None takes the model config's <eop>.
        pad_token_id: filler after a row stops; None takes the model config's <pad>.
        stop_strings: stop a row once its decoded text contains one of these (needs a tokenizer).
        seed: seeds a private generator for sampling; None uses torch's global RNG.
        allowed_vocab_size: never produce ids at or above this (the model's vocab has unused
            padding rows past the tokenizer's vocabulary, which cannot be decoded).
        num_beams: beam search with this many beams when > 1 (greedy, not sampled; see
            glm6b.inference.beam).
        length_penalty: beam hypotheses are ranked by sum of log-probabilities / length**length_penalty
            (length = prompt + generated tokens, as in transformers 4.27).
        early_stopping: beam search stops a prompt once num_beams hypotheses are finished (True),
            when no running beam can still beat the worst finished one by the usual estimate (False),
            or only when none can beat it at the maximum length ("never").
        compile: run the decode step compiled (True), eagerly (False), or "auto": compiled on CUDA
            and for CPU models of real size, eager for tiny ones (glm6b.inference.engine).
        prefill_chunk_size: prompt tokens per chunk when filling the KV cache.
    """

    max_length: int | None = 20
    max_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    num_return_sequences: int = 1
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    stop_strings: list[str] | None = None
    seed: int | None = None
    allowed_vocab_size: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    compile: bool | Literal["auto"] = "auto"
    prefill_chunk_size: int = 512

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"generation: {message}")

        need(self.max_new_tokens is None or self.max_new_tokens >= 1, "max_new_tokens must be >= 1")
        need(self.max_length is None or self.max_length >= 1, "max_length must be >= 1")
        need(self.temperature > 0, "temperature must be > 0 (use do_sample=False for greedy)")
        need(self.top_k >= 0, "top_k must be >= 0")
        need(0 < self.top_p <= 1, "top_p must be in (0, 1]")
        need(self.repetition_penalty > 0, "repetition_penalty must be > 0")
        need(self.num_return_sequences >= 1, "num_return_sequences must be >= 1")
        need(self.num_beams >= 1, "num_beams must be >= 1")
        need(self.num_beams == 1 or not self.do_sample,
             "num_beams > 1 is beam search, which does not sample: pass do_sample=False")
        need(self.num_beams == 1 or self.num_return_sequences <= self.num_beams,
             f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams ({self.num_beams})")
        need(self.num_beams > 1 or self.do_sample or self.num_return_sequences == 1,
             "num_return_sequences > 1 needs do_sample=True or num_beams > 1 (greedy decoding gives one answer)")
        need(self.early_stopping in (True, False, "never"), "early_stopping must be true, false or 'never'")
        need(self.compile in (True, False, "auto"), "compile must be true, false or 'auto'")
        need(self.prefill_chunk_size >= 1, "prefill_chunk_size must be >= 1")


def make_generation_config(base: GenerationConfig | None = None, **kwargs) -> GenerationConfig:
    """A GenerationConfig from keyword arguments; unknown names are an error that lists them."""
    known = {f.name for f in fields(GenerationConfig)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"unknown generation argument(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    config = GenerationConfig(**{**(vars(base) if base else {}), **kwargs})
    config.validate()
    return config


def new_token_budget(config: GenerationConfig, prompt_len: int) -> int:
    """How many tokens to generate at most: max_new_tokens, else max_length minus the prompt.

    Raises:
        ValueError: max_length leaves no room after the prompt.
    """
    if config.max_new_tokens is not None:
        return config.max_new_tokens
    new_tokens = (config.max_length or 20) - prompt_len
    if new_tokens < 1:
        raise ValueError(f"generation: the prompt has {prompt_len} tokens but max_length={config.max_length} "
                         f"counts the prompt too; raise max_length or pass max_new_tokens")
    return new_tokens


# ----------------------------------------------------------------------------------- logits processing


def apply_repetition_penalty(scores: torch.Tensor, sequences: torch.Tensor, penalty: float) -> torch.Tensor:
    seen = torch.gather(scores, 1, sequences)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores.scatter(1, sequences, seen)


def guard_invalid_scores(scores: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Rows with NaN or Inf scores are forced to end with eos.

    The reference instead zeroes every row of the batch and forces the hard-coded id 5 (spec 5.5),
    which corrupts healthy rows and keeps the broken one going.
    """
    bad = ~torch.isfinite(scores).all(dim=-1, keepdim=True)  # [B, 1]
    forced = torch.full_like(scores, float("-inf"))
    forced[:, eos_token_id] = 0.0
    return torch.where(bad, forced, scores)


def apply_top_k(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    top_k = min(top_k, scores.shape[-1])
    kth = torch.topk(scores, top_k).values[..., -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def apply_top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering as transformers does it: drop the low tail whose mass is <= 1 - top_p."""
    sorted_scores, sorted_idx = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False  # always keep the most likely token
    remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
    return scores.masked_fill(remove, float("-inf"))


def process_scores(scores: torch.Tensor, sequences: torch.Tensor, config: GenerationConfig,
                   eos_token_id: int) -> torch.Tensor:
    """Processors then (when sampling) warpers, in transformers 4.27.1's order."""
    # The guard looks at the model's own scores, before the -inf that filtering below introduces.
    scores = guard_invalid_scores(scores.float(), eos_token_id)
    if config.allowed_vocab_size is not None and config.allowed_vocab_size < scores.shape[-1]:
        scores[:, config.allowed_vocab_size:] = float("-inf")
    if config.repetition_penalty != 1.0:
        scores = apply_repetition_penalty(scores, sequences, config.repetition_penalty)
    if config.do_sample:
        if config.temperature != 1.0:
            scores = scores / config.temperature
        if config.top_k > 0:
            scores = apply_top_k(scores, config.top_k)
        if config.top_p < 1.0:
            scores = apply_top_p(scores, config.top_p)
    return scores


def choose_next_tokens(scores: torch.Tensor, do_sample: bool, generator: torch.Generator | None) -> torch.Tensor:
    if not do_sample:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
