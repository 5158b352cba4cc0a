"""Tests of beam search (glm6b.inference.beam): against an exhaustive search on a tiny-vocabulary model,
the stopping rules, batching, and the settings passed through generate/chat."""

from __future__ import annotations

import pytest
import torch

from glm6b.config import ChatGLMConfig
from glm6b.inference.beam import BeamHypotheses
from glm6b.inference.chat import process_response
from glm6b.inference.generation import generate
from glm6b.model import ChatGLMForConditionalGeneration

# Ids 0 and 1 are ordinary tokens; the specials fill the rest of a 6-token vocabulary.
TINY_VOCAB = dict(vocab_size=6, hidden_size=16, num_layers=2, num_attention_heads=2, inner_hidden_size=32,
                  mask_token_id=2, gmask_token_id=3, bos_token_id=4, eos_token_id=5, pad_token_id=0)


@pytest.fixture(scope="module")
def small_vocab_model():
    model = ChatGLMForConditionalGeneration(ChatGLMConfig(**TINY_VOCAB))
    model.init_weights(std=0.6, generator=torch.Generator().manual_seed(3))
    return model.eval()


@torch.inference_mode()
def exhaustive_best(model, prompt: list[int], new_tokens: int, length_penalty: float, count: int):
    """The `count` best finished sequences by enumeration: every continuation up to `new_tokens`
    tokens, ended by eos (scored without the eos in its length) or by the length limit, each scored
    sum of log-probabilities / (prompt + generated) ** length_penalty; full forwards, no cache."""
    eos, vocab = model.config.eos_token_id, model.config.vocab_size

    def logprobs(tokens):
        return torch.log_softmax(model(torch.tensor([prompt + tokens])).logits[0, -1].float(), -1).tolist()

    finished = []
    frontier = [([], 0.0)]
    for step in range(new_tokens):
        grown = []
        for tokens, total in frontier:
            lp = logprobs(tokens)
            for token in range(vocab):
                if token == eos:
                    finished.append((tokens, (total + lp[token]) / (len(prompt) + len(tokens)) ** length_penalty))
                else:
                    grown.append((tokens + [token], total + lp[token]))
        frontier = grown
    finished += [(t, s / (len(prompt) + new_tokens) ** length_penalty) for t, s in frontier]
    return sorted(finished, key=lambda item: -item[1])[:count]


def generated(row: list[int], prompt_len: int, eos: int) -> list[int]:
    tokens = row[prompt_len:]
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
def test_beam_search_with_enough_beams_is_exhaustive(small_vocab_model, length_penalty):
    """With a beam per live candidate and early_stopping="never", nothing is pruned: the returned
    sequences and scores must be the exhaustive search's best, in order."""
    model = small_vocab_model
    prompt = [0, 1, 1, 3, 4]  # ... [gMASK] <sop>
    new_tokens, count = 3, 4
    # 5 non-eos continuations per step: 25 live beams at the last step, 150 candidates, all of which
    # must rank within the first num_beams for an eos among them to count.
    out = generate(model, torch.tensor([prompt]), max_new_tokens=new_tokens, num_beams=150,
                   num_return_sequences=count, length_penalty=length_penalty, early_stopping="never",
                   output_scores=True)
    expected = exhaustive_best(model, prompt, new_tokens, length_penalty, count)
    got = [generated(row, len(prompt), model.config.eos_token_id) for row in out.sequences.tolist()]
    assert got == [tokens for tokens, _ in expected]
    assert torch.allclose(out.scores[0], torch.tensor([score for _, score in expected]), rtol=1e-5, atol=1e-6)


def test_narrow_beams_match_the_exhaustive_best_here(small_vocab_model):
    """On this model a 4-beam search already finds the exhaustive best (a sanity check of pruning)."""
    model = small_vocab_model
    prompt = [1, 0, 3, 4]
    out = generate(model, torch.tensor([prompt]), max_new_tokens=3, num_beams=4, early_stopping="never")
    best = exhaustive_best(model, prompt, 3, 1.0, 1)[0][0]
    assert generated(out[0].tolist(), len(prompt), model.config.eos_token_id) == best


def test_output_layout_eos_then_padding(small_vocab_model):
    model = small_vocab_model
    prompt = torch.tensor([[0, 1, 1, 3, 4]])
    out = generate(model, prompt, max_new_tokens=3, num_beams=150, num_return_sequences=6, early_stopping="never")
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    assert out.shape[1] <= prompt.shape[1] + 3
    for row in out.tolist():
        assert row[:5] == prompt[0].tolist()
        tail = row[5:]
        if eos in tail:  # a hypothesis shorter than the limit ends with one eos, then pads
            assert set(tail[tail.index(eos) + 1:]) <= {pad}


def test_hypotheses_keep_the_best_and_stop_by_the_rule():
    hyps = BeamHypotheses(num_beams=2, length_penalty=1.0, early_stopping=False, max_length=10)
    hyps.add([1] * 4, -4.0)  # score -1.0
    assert not hyps.is_done(-0.1, 5)  # fewer than num_beams hypotheses
    hyps.add([1] * 5, -10.0)  # score -2.0
    hyps.add([1] * 2, -3.0)  # score -1.5: replaces -2.0
    assert sorted(s for s, _ in hyps.beams) == [-1.5, -1.0] and hyps.worst_score == -1.5
    hyps.add([1] * 2, -8.0)  # -4.0: not better than the worst, dropped
    assert len(hyps) == 2
    # False: can a running beam with sum -8 at length 5 (-1.6) beat the worst (-1.5)? No: done.
    assert hyps.is_done(-8.0, 5)
    assert not hyps.is_done(-7.0, 5)  # -1.4 > -1.5
    # "never" divides by the maximum length: -8 / 10 = -0.8 could still win.
    never = BeamHypotheses(2, 1.0, "never", max_length=10)
    never.beams, never.worst_score = list(hyps.beams), hyps.worst_score
    assert not never.is_done(-8.0, 5)
    assert never.is_done(-16.0, 5)
    early = BeamHypotheses(2, 1.0, True, max_length=10)
    early.beams, early.worst_score = list(hyps.beams), hyps.worst_score
    assert early.is_done(0.0, 5)


def test_early_stopping_true_stops_sooner(model, tok):
    ids = torch.tensor([tok.encode("你好")])
    kwargs = dict(max_new_tokens=30, num_beams=3, eos_token_id=[model.config.eos_token_id, 546])
    early = generate(model, ids, early_stopping=True, **kwargs)
    late = generate(model, ids, early_stopping="never", **kwargs)
    assert early.shape[1] <= late.shape[1]


def test_batch_equals_single_without_length_penalty(model, tok):
    """With length_penalty=0 the score does not see the padding, so a left-padded batch gives each
    prompt's own result (with a penalty, transformers counts padding in the length, as we do)."""
    texts = ["你好", "Write a short poem about the ocean."]
    batch = tok(texts, padding=True, return_tensors="pt")
    kwargs = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, length_penalty=0.0)
    out = generate(model, **batch, **kwargs)
    width = batch["input_ids"].shape[1]
    for i, text in enumerate(texts):
        ids = torch.tensor([tok.encode(text)])
        single = generate(model, ids, **kwargs)
        for j in range(2):
            assert out[2 * i + j, width:width + single.shape[1] - ids.shape[1]].tolist() == \
                single[j, ids.shape[1]:].tolist()


def test_one_beam_is_greedy(model, tok):
    ids = torch.tensor([tok.encode("你好")])
    assert torch.equal(generate(model, ids, max_new_tokens=6, num_beams=1), generate(model, ids, max_new_tokens=6))


def test_invalid_beam_settings(model, tok):
    ids = torch.tensor([tok.encode("你好")])
    with pytest.raises(ValueError, match="num_return_sequences"):
        generate(model, ids, num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="do_sample"):
        generate(model, ids, num_beams=2, do_sample=True)
    with pytest.raises(ValueError, match="early_stopping"):
        generate(model, ids, num_beams=2, early_stopping="sometimes")


def test_chat_passes_beam_settings(model, tok):
    response, history = model.chat(tok, "你好", max_length=64, do_sample=False, num_beams=3, length_penalty=0.5)
    prompt_ids = torch.tensor([tok.encode("你好")])
    ids = generate(model, prompt_ids, max_length=64, num_beams=3, length_penalty=0.5,
                   allowed_vocab_size=len(tok))[0, prompt_ids.shape[1]:].tolist()
    eos = model.config.eos_token_id
    ids = ids[:ids.index(eos) + 1] if eos in ids else ids
    assert response == process_response(tok.decode(ids))
    assert history == [("你好", response)]
    assert list(model.stream_chat(tok, "你好", max_length=64, do_sample=False, num_beams=3,
                                  length_penalty=0.5))[-1][0] == response


def test_eval_passes_beam_settings(model, tok):
    from glm6b.eval.evaluate import generate_predictions

    prompts = ["你好", "北京是中国的首都"]
    predictions, _ = generate_predictions(model, tok, prompts, batch_size=2, max_new_tokens=6, progress=False,
                                          num_beams=3, length_penalty=0.0)
    for prompt, prediction in zip(prompts, predictions):
        ids = torch.tensor([tok.encode(prompt)])
        out = generate(model, ids, max_new_tokens=6, num_beams=3, length_penalty=0.0, allowed_vocab_size=len(tok))
        assert prediction == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
