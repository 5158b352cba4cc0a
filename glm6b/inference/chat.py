"""Multi-turn chat: the reference's prompt template with history, chat() and stream_chat(), response clean-up.

Behaviour follows spec §5.2-5.4 (the THUDM `ChatGLMForConditionalGeneration.chat`/`stream_chat`),
with these deliberate differences:
  * stream_chat also yields after the last generated token, so its last partial always equals
    chat()'s response (the reference drops the last token when it stops on max_length);
  * a prompt that does not fit max_length is an error naming its length (or, with
    drop_oldest=True, the oldest rounds are left out of the prompt until it fits);
  * the model's padding vocabulary rows (no text) are never generated;
  * a NaN/Inf step ends the answer with <eop> (generation.py's guard) instead of forcing id 5;
  * the caller's history list is never modified.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .generation import generate, generate_steps, make_generation_config
from .text import process_response, stable_length

History = list[tuple[str, str]]


def build_prompt(query: str, history: Sequence[Sequence[str]] | None = None) -> str:
    """The chat prompt of spec §5.2.

    Args:
        query: the new user message.
        history: earlier (query, response) pairs, oldest first.

    Returns:
        The bare query when history is empty; otherwise one "[Round i]\\n问：...\\n答：...\\n" block per
        earlier round (numbered from 0) followed by "[Round n]\\n问：{query}\\n答：".
    """
    if not history:
        return query
    prompt = ""
    for i, (old_query, response) in enumerate(history):
        prompt += f"[Round {i}]\n问：{old_query}\n答：{response}\n"
    return prompt + f"[Round {len(history)}]\n问：{query}\n答："


def chat(model, tokenizer, query: str, history: Sequence[Sequence[str]] | None = None, max_length: int = 2048,
         do_sample: bool = True, top_p: float = 0.7, temperature: float = 0.95, drop_oldest: bool = False,
         **gen) -> tuple[str, History]:
    """Answer one user message, given the conversation so far.

    Args:
        model: a ChatGLMForConditionalGeneration.
        tokenizer: its ChatGLMTokenizer.
        query: the user message.
        history: earlier (query, response) pairs (tuples or lists), oldest first; not modified.
        max_length: limit on prompt + answer tokens.
        do_sample, top_p, temperature: sampling settings (the reference's chat defaults; top_k 50).
        drop_oldest: when the prompt does not fit, leave the oldest rounds out of it (they stay
            in the returned history) instead of raising.
        **gen: other GenerationConfig fields (top_k, repetition_penalty, max_new_tokens, seed, num_beams,
            length_penalty, early_stopping, compile, ...). Beam search needs do_sample=False.

    Returns:
        (response, new_history): the cleaned-up answer and a new list history + [(query, response)].

    Raises:
        ValueError: the prompt leaves no room for an answer within max_length (the message gives
            its length), or a malformed history.
    """
    history, input_ids, config = _prepare(model, tokenizer, query, history, max_length, do_sample, top_p,
                                          temperature, drop_oldest, gen)
    ids = _generate_ids(model, tokenizer, input_ids, config)
    response = _decode_response(tokenizer, ids)
    return response, history + [(query, response)]


def stream_chat(model, tokenizer, query: str, history: Sequence[Sequence[str]] | None = None, max_length: int = 2048,
                do_sample: bool = True, top_p: float = 0.7, temperature: float = 0.95, drop_oldest: bool = False,
                stable_only: bool = False, **gen) -> Iterator[tuple[str, History]]:
    """Like `chat`, yielding the answer so far after every generated token.

    Each partial is the decode of all tokens generated so far, cleaned up by process_response (so
    a later partial can differ from an earlier one in its last characters, not only extend it),
    unless `stable_only`: then only the part later tokens cannot change is yielded (glm6b.inference.text.
    stable_length), whenever it grows, so each partial extends the one before; the last partial is the
    whole answer either way, and equals what `chat` returns for the same inputs and random state.

    Args:
        model, tokenizer, query, history, max_length, do_sample, top_p, temperature, drop_oldest,
            **gen: as for `chat`.
        stable_only: yield growing stable prefixes only (what a terminal or a web page prints).

    Yields:
        (partial_response, history + [(query, partial_response)]), at least once.

    Raises:
        ValueError: as for `chat` (raised on the first `next()`).
    """
    history, input_ids, config = _prepare(model, tokenizer, query, history, max_length, do_sample, top_p,
                                          temperature, drop_oldest, gen)
    if config.num_beams > 1:  # beam search settles the answer only at the end
        response = _decode_response(tokenizer, _generate_ids(model, tokenizer, input_ids, config))
        yield response, history + [(query, response)]
        return
    stop_ids = _stop_ids(model.config, config)
    ids: list[int] = []
    response = None
    sent = ""  # with stable_only: the partial yielded last
    for next_tokens, _, _ in generate_steps(model, input_ids, config=config, tokenizer=tokenizer):
        token = int(next_tokens[0])
        ids.append(token)
        previous, response = response, _decode_response(tokenizer, ids)
        if not stable_only:
            if token in stop_ids and response == previous:
                continue  # <eop> decodes to nothing: the last partial already is the answer
            yield response, history + [(query, response)]
        elif len(stable := response[:stable_length(response, config.stop_strings or (), chat=True)]) > len(sent):
            sent = stable
            yield sent, history + [(query, sent)]
    if stable_only and response != sent:  # what was held back at the end (at least one token was generated)
        yield response, history + [(query, response)]


# ----------------------------------------------------------------------------------- helpers


def _as_history(history: Sequence[Sequence[str]] | None) -> History:
    """A new list of (query, response) tuples; accepts tuples or lists."""
    pairs = []
    for i, item in enumerate(history or []):
        if not isinstance(item, (list, tuple)) or len(item) != 2 or not all(isinstance(s, str) for s in item):
            raise ValueError(f"history[{i}] must be a (query, response) pair of strings, got {item!r}")
        pairs.append((item[0], item[1]))
    return pairs


def _prepare(model, tokenizer, query, history, max_length, do_sample, top_p, temperature, drop_oldest, gen):
    """Check the inputs, fit the prompt into max_length and build the generation config."""
    if not isinstance(query, str):
        raise ValueError(f"query must be a string, got {type(query).__name__}")
    if "num_return_sequences" in gen and gen["num_return_sequences"] != 1:
        raise ValueError("chat produces one answer: num_return_sequences must be 1")
    history = _as_history(history)
    prompt_ids = _fit_prompt(tokenizer, query, history, max_length, drop_oldest)
    # max_length bounds prompt + answer; a max_new_tokens can only shorten the answer further.
    new_tokens = max_length - len(prompt_ids)
    if gen.get("max_new_tokens") is not None:
        new_tokens = min(new_tokens, gen["max_new_tokens"])
    gen = {**gen, "max_new_tokens": new_tokens, "max_length": max_length}
    gen.setdefault("allowed_vocab_size", len(tokenizer))
    config = make_generation_config(do_sample=do_sample, top_p=top_p, temperature=temperature, **gen)
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=model.device)
    return history, input_ids, config


def _fit_prompt(tokenizer, query: str, history: History, max_length: int, drop_oldest: bool) -> list[int]:
    """Prompt ids that leave room for at least one new token, dropping oldest rounds if allowed."""
    ids = tokenizer.encode(build_prompt(query, history))
    if len(ids) < max_length:
        return ids
    if not drop_oldest:
        raise ValueError(
            f"the chat prompt has {len(ids)} tokens ({len(history)} earlier rounds), which leaves no room for an "
            f"answer within max_length={max_length}: raise max_length, shorten the history, or pass "
            f"drop_oldest=True to leave the oldest rounds out of the prompt")
    for start in range(1, len(history) + 1):
        ids = tokenizer.encode(build_prompt(query, history[start:]))
        if len(ids) < max_length:
            return ids
    raise ValueError(
        f"the query alone is {len(ids)} tokens, which leaves no room for an answer within max_length={max_length}: "
        f"raise max_length or shorten the query")


def _generate_ids(model, tokenizer, input_ids, config) -> list[int]:
    """The answer's token ids, up to and including the first stop token."""
    if config.num_beams == 1:
        return [int(t[0]) for t, _, _ in generate_steps(model, input_ids, config=config, tokenizer=tokenizer)]
    ids = generate(model, input_ids, generation_config=config, tokenizer=tokenizer)[0, input_ids.shape[1]:].tolist()
    stops = [i for i, token in enumerate(ids) if token in _stop_ids(model.config, config)]
    return ids[:stops[0] + 1] if stops else ids


def _stop_ids(model_config, config) -> set[int]:
    eos = config.eos_token_id if config.eos_token_id is not None else model_config.eos_token_id
    pad = config.pad_token_id if config.pad_token_id is not None else model_config.pad_token_id
    return {*([eos] if isinstance(eos, int) else eos), pad}


def _decode_response(tokenizer, ids: list[int]) -> str:
    return process_response(tokenizer.decode(ids))


