"""Tests of glm6b.inference.generation: golden greedy sequences and step scores, cache vs recomputation, sampling,
batching, stop conditions and the text streamer."""

from __future__ import annotations

import pytest
import torch

from glm6b.inference.generation import TextStreamer, generate, generate_steps, make_generation_config

from helpers import assert_close_rel, golden_cases, golden_tensor

BATCH = golden_cases()["generate_batch_greedy"]
SINGLE = golden_cases()["generate_single_greedy"]


def _batch(tok, texts):
    return tok(texts, padding=True, return_tensors="pt")


# ----------------------------------------------------------------------------------- golden


def test_golden_batch_greedy_sequences_and_scores(model, tok):
    batch = _batch(tok, BATCH["texts"])
    assert batch["input_ids"].tolist() == BATCH["input_ids"]
    out = model.generate(**batch, max_new_tokens=BATCH["max_new_tokens"], do_sample=False, output_scores=True)
    assert out.sequences.tolist() == BATCH["sequences"]
    scores = torch.stack(out.scores)  # [N, B, V]
    assert_close_rel(scores, golden_tensor(BATCH["step_scores"]), what="step scores")


def test_golden_batch_with_golden_forward_tensors(model):
    """The golden forward_batch mask/positions, where they describe the same prompts, give the same result."""
    forward = golden_cases()["forward_batch"]
    if forward.get("input_ids") != BATCH["input_ids"]:
        pytest.skip("forward_batch holds other prompts than generate_batch_greedy")
    ids = torch.tensor(BATCH["input_ids"])
    out = generate(model, ids, golden_tensor(forward["attention_mask"]), golden_tensor(forward["position_ids"]),
                   max_new_tokens=BATCH["max_new_tokens"])
    assert out.tolist() == BATCH["sequences"]


@pytest.mark.parametrize("item", SINGLE["items"], ids=lambda item: item["text"][:20])
def test_golden_single_greedy(model, item):
    out = model.generate(torch.tensor(item["input_ids"]), max_new_tokens=SINGLE["max_new_tokens"], do_sample=False)
    assert out.tolist() == item["sequences"]


def test_allowed_vocab_size_keeps_golden_greedy_and_bans_padding_rows(model, tok):
    """Restricting to the tokenizer's vocabulary must not trip the NaN/Inf guard (golden ids are all < len(tok))."""
    item = SINGLE["items"][0]
    out = model.generate(torch.tensor(item["input_ids"]), max_new_tokens=SINGLE["max_new_tokens"],
                         allowed_vocab_size=len(tok))
    assert out.tolist() == item["sequences"]
    torch.manual_seed(0)
    sampled = model.generate(torch.tensor(item["input_ids"]), max_new_tokens=30, do_sample=True, top_k=0,
                             temperature=50.0, allowed_vocab_size=len(tok), num_return_sequences=4)
    assert int(sampled.max()) < len(tok)


# ----------------------------------------------------------------------------------- cache


@torch.inference_mode()
def test_cached_decoding_equals_full_recomputation(model, tok):
    """Every step's cached logits equal a full forward over prompt + generated tokens, with the mask and
    positions grown the way the reference carries them (spec 4.8), for a left-padded batch."""
    batch = _batch(tok, ["你好", "Write a short poem about the ocean.", "a"])
    steps = 6
    out = model.generate(**batch, max_new_tokens=steps, output_scores=True)
    ids, mask, positions = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    prompt_len = ids.shape[1]
    for step in range(steps):
        full = model(out.sequences[:, :prompt_len + step], position_ids=positions, attention_mask=mask)
        assert_close_rel(full.logits[:, -1], out.scores[step], what=f"step {step}")
        # Grow like the reference: a new hidden key column, then a new row = last row with itself visible.
        mask = torch.cat([mask, torch.ones_like(mask[..., :1])], dim=-1)
        new_row = mask[:, :, -1:].clone()
        new_row[..., -1] = False
        mask = torch.cat([mask, new_row], dim=2)
        positions = torch.cat([positions, positions[:, :, -1:] + torch.tensor([0, 1])[None, :, None]], dim=2)


# ----------------------------------------------------------------------------------- sampling


def _prompt(tok, text="你好"):
    return torch.tensor([tok.encode(text)])


def test_sampling_with_top_k_1_equals_greedy(model, tok):
    batch = _batch(tok, BATCH["texts"])
    greedy = model.generate(**batch, max_new_tokens=10)
    torch.manual_seed(123)
    sampled = model.generate(**batch, max_new_tokens=10, do_sample=True, top_k=1)
    assert torch.equal(sampled, greedy)


def test_manual_seed_makes_sampling_repeatable(model, tok):
    ids = _prompt(tok)
    kwargs = dict(max_new_tokens=16, do_sample=True, temperature=1.5, top_k=0)
    torch.manual_seed(0)
    a = model.generate(ids, **kwargs)
    torch.manual_seed(0)
    b = model.generate(ids, **kwargs)
    torch.manual_seed(1)
    c = model.generate(ids, **kwargs)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_seed_argument_ignores_global_rng(model, tok):
    ids = _prompt(tok)
    kwargs = dict(max_new_tokens=16, do_sample=True, temperature=1.5, top_k=0)
    torch.manual_seed(1)
    a = model.generate(ids, seed=7, **kwargs)
    torch.manual_seed(2)
    b = model.generate(ids, seed=7, **kwargs)
    c = model.generate(ids, seed=8, **kwargs)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_top_p_and_top_k_limit_the_candidates(model, tok):
    ids = _prompt(tok)
    greedy = model.generate(ids, max_new_tokens=1)
    # top_p tiny keeps only the most likely token, whatever the temperature.
    sampled = model.generate(ids, max_new_tokens=1, do_sample=True, top_p=1e-6, temperature=5.0, seed=0)
    assert torch.equal(sampled, greedy)


def test_repetition_penalty_changes_a_repeating_greedy_output(model, tok):
    item = SINGLE["items"][0]  # greedy repeats 546 1125 546 1125 ...
    out = model.generate(torch.tensor(item["input_ids"]), max_new_tokens=20, repetition_penalty=5.0)
    assert out.tolist() != item["sequences"]


# ----------------------------------------------------------------------------------- batching and limits


def test_batch_equals_single_generations(model, tok):
    texts = ["你好", "Write a short poem about the ocean.", "a", "北京是中国的首都"]
    n = 12
    batch = _batch(tok, texts)
    out = model.generate(**batch, max_new_tokens=n)
    width = batch["input_ids"].shape[1]
    for i, text in enumerate(texts):
        single = model.generate(_prompt(tok, text), max_new_tokens=n)
        assert out[i, width:].tolist() == single[0, -n:].tolist(), text


def test_num_return_sequences_shape(model, tok):
    batch = _batch(tok, ["你好", "Write a short poem"])
    out = model.generate(**batch, max_new_tokens=5, do_sample=True, num_return_sequences=3, seed=0)
    width = batch["input_ids"].shape[1]
    assert out.shape == (6, width + 5)
    for row in range(6):  # rows are grouped per prompt
        assert torch.equal(out[row, :width], batch["input_ids"][row // 3])
    with pytest.raises(ValueError, match="num_return_sequences"):
        model.generate(**batch, max_new_tokens=5, num_return_sequences=2)


def test_max_length_counts_the_prompt(model, tok):
    ids = _prompt(tok)  # 5 tokens
    assert model.generate(ids, max_length=9).shape == (1, 9)
    with pytest.raises(ValueError, match="max_length"):
        model.generate(ids, max_length=5)
    assert model.generate(ids, max_length=5, max_new_tokens=2).shape == (1, 7)  # max_new_tokens wins


def test_unknown_generation_argument_is_an_error(model, tok):
    with pytest.raises(TypeError, match="top_kk"):
        model.generate(_prompt(tok), top_kk=3)
    with pytest.raises(ValueError, match="temperature"):
        make_generation_config(temperature=0)


def test_eos_ends_a_row_and_pads_it(model, tok):
    item = SINGLE["items"][0]
    ids = torch.tensor(item["input_ids"])
    stop_token = item["sequences"][0][len(item["input_ids"][0]) + 2]  # the third generated token
    out = model.generate(ids, max_new_tokens=20, eos_token_id=stop_token)
    assert out[0, -1].item() == stop_token and out.shape[1] == ids.shape[1] + 3


def test_stop_strings_stop_a_row(model, tok):
    texts = ["你好", "Write a short poem about the ocean."]
    batch = _batch(tok, texts)
    width = batch["input_ids"].shape[1]
    full = model.generate(**batch, max_new_tokens=12)
    rows = [full[r, width:].tolist() for r in range(2)]
    stop = tok.decode(rows[0][:4])[-1]
    assert stop not in tok.decode(rows[0][:3])

    def stop_length(ids):  # tokens up to the one whose text completes the stop string
        return next((k for k in range(1, len(ids) + 1) if stop in tok.decode(ids[:k])), len(ids))

    out = model.generate(**batch, max_new_tokens=12, stop_strings=[stop], tokenizer=tok)
    lengths = [stop_length(ids) for ids in rows]
    assert lengths[0] == 4
    assert out.shape[1] == width + max(lengths)
    for r, ids in enumerate(rows):
        generated = out[r, width:].tolist()
        assert generated[:lengths[r]] == ids[:lengths[r]]
        assert set(generated[lengths[r]:]) <= {model.config.pad_token_id}  # finished rows are padded
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(**batch, max_new_tokens=3, stop_strings=["x"])


def test_nan_logits_end_only_the_broken_row(model, tok):
    batch = _batch(tok, ["你好", "Write a short poem"])
    width = batch["input_ids"].shape[1]
    healthy = model.generate(**batch, max_new_tokens=6)

    def poison_row1(module, inputs, output):
        output = output.clone()
        output[1] = float("nan")
        return output

    handle = model.lm_head.register_forward_hook(poison_row1)
    try:
        out = model.generate(**batch, max_new_tokens=6)
    finally:
        handle.remove()
    assert out[0].tolist() == healthy[0].tolist()
    assert out[1, width].item() == model.config.eos_token_id
    assert set(out[1, width + 1:].tolist()) <= {model.config.pad_token_id}


def test_generate_steps_streams_one_column_per_step(model, tok):
    batch = _batch(tok, ["你好", "a"])
    config = make_generation_config(max_new_tokens=5)
    steps = list(generate_steps(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"], config))
    out = model.generate(**batch, max_new_tokens=5)
    assert torch.equal(torch.stack([s[0] for s in steps], dim=1), out[:, -5:])


# ----------------------------------------------------------------------------------- streamer


def _stream(tok, ids):
    streamer = TextStreamer(tok)
    deltas = [streamer.push(i) for i in ids]
    deltas.append(streamer.flush())
    return deltas


@pytest.mark.parametrize("row", range(len(BATCH["texts"])))
def test_streamer_deltas_concatenate_to_the_golden_text(tok, row):
    generated = BATCH["sequences"][row][len(BATCH["input_ids"][row]):]
    assert "".join(_stream(tok, generated)) == tok.decode(generated)


@pytest.mark.parametrize("text", ["你好👋！我是人工智能助手 ChatGLM-6B😀🎉", "it 's , ok . don 't", "a\n\tb   c 中文,测试!"])
def test_streamer_byte_fallback_and_cleanup(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    deltas = _stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids)
    assert all("\ufffd" not in d for d in deltas)  # incomplete UTF-8 is held back, never shown
