"""Tests of glm6b.inference.chat: the golden prompt, greedy chat and process_response cases; streaming, history
handling, the max_length rules and the NaN guard."""

from __future__ import annotations

import copy

import pytest
import torch

from glm6b.inference.chat import build_prompt, chat, process_response, stream_chat

from helpers import golden_cases

CHAT = golden_cases()["chat"]
NO_HISTORY = golden_cases()["chat_no_history"]


def _greedy_chat(model, tok, **kwargs):
    kwargs = {"max_length": CHAT["max_length"], "do_sample": False, **kwargs}
    return chat(model, tok, CHAT["query"], CHAT["history"], **kwargs)


# ----------------------------------------------------------------------------------- golden


def test_build_prompt_golden(tok):
    assert build_prompt(CHAT["query"], CHAT["history"]) == CHAT["prompt"]
    assert build_prompt(NO_HISTORY["query"], []) == NO_HISTORY["prompt"]
    assert build_prompt(NO_HISTORY["query"], None) == NO_HISTORY["prompt"]
    assert tok.encode(CHAT["prompt"]) == CHAT["prompt_ids"]
    assert tok.encode(NO_HISTORY["prompt"]) == NO_HISTORY["prompt_ids"]


def test_greedy_chat_golden(model, tok):
    response, history = _greedy_chat(model, tok)
    assert response == CHAT["response"]
    assert [list(pair) for pair in history] == CHAT["new_history"]
    assert all(isinstance(pair, tuple) for pair in history)


def test_greedy_generated_ids_golden(model, tok):
    prompt = torch.tensor([CHAT["prompt_ids"]])
    out = model.generate(prompt, max_length=CHAT["max_length"], allowed_vocab_size=len(tok))
    generated = out[0, prompt.shape[1]:].tolist()
    assert generated == CHAT["generated_ids"]
    assert tok.decode(generated) == CHAT["raw_decoded"]
    assert process_response(CHAT["raw_decoded"]) == CHAT["response"]


@pytest.mark.parametrize("case", golden_cases()["process_response"], ids=lambda c: c["in"][:16])
def test_process_response_golden(case):
    assert process_response(case["in"]) == case["out"]


def test_model_chat_methods(model, tok):
    """THUDM's `model.chat` / `model.stream_chat`, on the model glm6b's loaders return (glm6b.api.ChatGLM)."""
    response, history = model.chat(tok, CHAT["query"], history=CHAT["history"], max_length=CHAT["max_length"],
                                   do_sample=False)
    assert response == CHAT["response"]
    partials = list(model.stream_chat(tok, CHAT["query"], history=CHAT["history"], max_length=CHAT["max_length"],
                                      do_sample=False))
    assert partials[-1][0] == response
    reply, history = model.chat(tok, "你好", history=[], max_length=24, do_sample=False)
    assert history == [("你好", reply)]


# ----------------------------------------------------------------------------------- streaming


def test_stream_chat_partials(model, tok):
    partials = list(stream_chat(model, tok, CHAT["query"], CHAT["history"], max_length=CHAT["max_length"],
                                do_sample=False))
    generated = CHAT["generated_ids"]
    # One partial per generated token (none of the golden tokens is <eop>), each the cleaned-up
    # decode of the tokens so far, and the last is chat()'s response (the final token included).
    assert [p[0] for p in partials] == [process_response(tok.decode(generated[:i + 1])) for i in range(len(generated))]
    assert partials[-1][0] == _greedy_chat(model, tok)[0] == CHAT["response"]
    for partial, history in partials:
        assert history == [tuple(pair) for pair in CHAT["history"]] + [(CHAT["query"], partial)]


def _eos_on_call(model, call):
    """A hook that makes <eop> the most likely token at the `call`-th forward (from 1)."""
    calls = []

    def hook(module, inputs, output):
        calls.append(1)
        if len(calls) == call:
            output = output.clone()
            output[..., model.config.eos_token_id] = 1e4
        return output

    return hook


def test_stream_chat_ending_on_eos_matches_chat(model, tok):
    handle = model.lm_head.register_forward_hook(_eos_on_call(model, 3))
    try:
        response, _ = _greedy_chat(model, tok)
    finally:
        handle.remove()
    handle = model.lm_head.register_forward_hook(_eos_on_call(model, 3))
    try:
        partials = list(stream_chat(model, tok, CHAT["query"], CHAT["history"], max_length=CHAT["max_length"],
                                    do_sample=False))
    finally:
        handle.remove()
    # Two tokens, then <eop>: the <eop> step changes nothing and is not yielded again.
    assert response == process_response(tok.decode(CHAT["generated_ids"][:2]))
    assert [p[0] for p in partials] == [process_response(tok.decode(CHAT["generated_ids"][:i])) for i in (1, 2)]


def test_stream_chat_with_a_text_eos_token(model, tok):
    eos = CHAT["generated_ids"][2]  # an end token that has text: its step is yielded too
    response, _ = _greedy_chat(model, tok, eos_token_id=eos)
    partials = list(stream_chat(model, tok, CHAT["query"], CHAT["history"], max_length=CHAT["max_length"],
                                do_sample=False, eos_token_id=eos))
    assert response == process_response(tok.decode(CHAT["generated_ids"][:3]))
    assert partials[-1][0] == response


def test_sampled_chat_is_repeatable_with_manual_seed(model, tok):
    torch.manual_seed(3)
    a, _ = chat(model, tok, "你好", max_length=40)
    torch.manual_seed(3)
    b = list(stream_chat(model, tok, "你好", max_length=40))[-1][0]
    assert a == b


# ----------------------------------------------------------------------------------- history


def test_history_is_never_mutated(model, tok):
    history = [list(pair) for pair in CHAT["history"]]  # lists of lists are accepted too
    before = copy.deepcopy(history)
    _, new_history = _greedy_chat(model, tok, max_length=CHAT["max_length"])
    for _ in stream_chat(model, tok, CHAT["query"], history, max_length=CHAT["max_length"], do_sample=False):
        pass
    _, _ = chat(model, tok, CHAT["query"], history, max_length=CHAT["max_length"], do_sample=False)
    assert history == before
    assert new_history is not history and len(new_history) == len(history) + 1


def test_bad_history_is_an_error(model, tok):
    with pytest.raises(ValueError, match="history"):
        chat(model, tok, "你好", [("only one",)], max_length=40)
    with pytest.raises(ValueError, match="history"):
        chat(model, tok, "你好", ["not a pair"], max_length=40)


# ----------------------------------------------------------------------------------- max_length


def test_prompt_that_does_not_fit_is_a_clear_error(model, tok):
    prompt_len = len(CHAT["prompt_ids"])
    with pytest.raises(ValueError, match=rf"{prompt_len} tokens.*drop_oldest=True"):
        chat(model, tok, CHAT["query"], CHAT["history"], max_length=prompt_len, do_sample=False)
    with pytest.raises(ValueError, match="drop_oldest=True"):
        next(stream_chat(model, tok, CHAT["query"], CHAT["history"], max_length=prompt_len, do_sample=False))
    # One free slot is enough for an answer of one token.
    response, _ = chat(model, tok, CHAT["query"], CHAT["history"], max_length=prompt_len + 1, do_sample=False)
    assert response == process_response(tok.decode(CHAT["generated_ids"][:1]))


def test_drop_oldest_leaves_out_the_oldest_rounds(model, tok):
    history = CHAT["history"]
    shorter = len(tok.encode(build_prompt(CHAT["query"], history[1:])))
    max_length = shorter + 4  # the full prompt does not fit, the last round does
    assert len(CHAT["prompt_ids"]) >= max_length
    expected, _ = chat(model, tok, CHAT["query"], history[1:], max_length=max_length, do_sample=False)
    response, new_history = chat(model, tok, CHAT["query"], history, max_length=max_length, do_sample=False,
                                 drop_oldest=True)
    assert response == expected
    assert new_history == [tuple(pair) for pair in history] + [(CHAT["query"], response)]  # history kept whole
    partials = list(stream_chat(model, tok, CHAT["query"], history, max_length=max_length, do_sample=False,
                                drop_oldest=True))
    assert partials[-1][0] == response
    bare = len(tok.encode(CHAT["query"]))
    with pytest.raises(ValueError, match=f"query alone is {bare} tokens"):
        chat(model, tok, CHAT["query"], history, max_length=bare, do_sample=False, drop_oldest=True)


def test_max_new_tokens_shortens_the_answer(model, tok):
    response, _ = _greedy_chat(model, tok, max_new_tokens=3)
    assert response == process_response(tok.decode(CHAT["generated_ids"][:3]))


# ----------------------------------------------------------------------------------- NaN guard


def test_nan_logits_end_the_answer(model, tok):
    handle = model.lm_head.register_forward_hook(lambda module, inputs, output: torch.full_like(output, float("nan")))
    try:
        response, history = chat(model, tok, "你好", [("a", "b")], max_length=40)
        partials = list(stream_chat(model, tok, "你好", max_length=40))
    finally:
        handle.remove()
    assert response == ""
    assert history == [("a", "b"), ("你好", "")]
    assert partials == [("", [("你好", "")])]
