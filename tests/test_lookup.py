"""Tests of prompt lookup (glm6b.inference.lookup, DecodeEngine.verify, sampling.accept_proposals): the
proposer, the verification step, greedy equality on the golden cases (eager and compiled, single rows and
batches, forced long accepted runs and frequent rejections), the sampling distribution, chat, the
server's scheduler, the flags."""

from __future__ import annotations

import pytest
import torch

from glm6b.config import ChatGLMConfig, GenerationConfig
from glm6b.inference.chat import build_prompt, chat, stream_chat
from glm6b.inference.engine import DecodeEngine, lookup_tokens, verify_rows_budget
from glm6b.inference.generation import generate
from glm6b.inference.lookup import LookupStats, ProposalLength, propose_from_context
from glm6b.inference.sampling import accept_proposals, process_scores
from glm6b.model import ChatGLMForConditionalGeneration

from helpers import assert_close_rel, golden_cases, golden_tensor, run_scheduler

BATCH = golden_cases()["generate_batch_greedy"]
SINGLE = golden_cases()["generate_single_greedy"]
CHAT = golden_cases()["chat"]


# ----------------------------------------------------------------------------------- the proposer


def test_proposals_copy_after_the_longest_most_recent_match():
    context = [1, 2, 3, 9, 2, 3, 7, 8, 5, 2, 3]
    # "2 3" occurs twice before the end; the most recent occurrence is followed by 7 8 5.
    assert propose_from_context(context, 3, max_ngram=2) == [7, 8, 5]
    # The longest suffix first: "5 2 3" never occurred, "2 3" did.
    assert propose_from_context(context, 2, max_ngram=3) == [7, 8]
    # Only one token looked up: the last "3" before the end was followed by 7.
    assert propose_from_context(context, 1, max_ngram=1) == [7]
    assert propose_from_context([4, 5, 6], 3) == []  # 6 never occurred before
    assert propose_from_context([4], 3) == []
    assert propose_from_context(context, 0) == []


def test_a_repeating_pattern_is_proposed_as_far_as_asked():
    # The copy runs into the end of the context and goes on from what it proposed.
    assert propose_from_context([7, 1, 2, 1, 2], 5, max_ngram=2) == [1, 2, 1, 2, 1]
    assert propose_from_context(torch.tensor([3, 3]), 4) == [3, 3, 3, 3]


def test_the_proposer_follows_its_rule_on_random_contexts():
    """The one-pass proposer against the rule written out: for n from max_ngram down to 1, the most recent
    earlier occurrence of the last n tokens, and what followed it (copying on into the proposal)."""
    import random

    def by_the_rule(ids, max_tokens, max_ngram):
        for n in range(min(max_ngram, len(ids) - 1), 0, -1):
            for start in range(len(ids) - 1 - n, -1, -1):
                if ids[start:start + n] == ids[len(ids) - n:]:
                    copied = list(ids)
                    for i in range(max_tokens):
                        copied.append(copied[start + n + i])
                    return copied[len(ids):]
        return []

    rng = random.Random(0)
    for _ in range(3000):
        ids = [rng.randint(0, 3) for _ in range(rng.randint(0, 24))]  # few distinct tokens: many matches
        max_tokens, max_ngram = rng.randint(0, 6), rng.randint(1, 4)
        assert propose_from_context(ids, max_tokens, max_ngram) == by_the_rule(ids, max_tokens, max_ngram), ids


def test_a_row_waits_until_its_text_copies_then_probes_with_one_token():
    length = ProposalLength(4)
    for _ in range(100):  # a new row proposes nothing until a proposal would have matched a chosen token
        assert length.next() == 0
        length.stepped(False)
    length.stepped(True)
    assert length.next() == 1  # then one token
    length.verified(1, 1)  # kept: the whole length from now on
    assert (length.waiting, length.next()) == (False, 4)
    length.verified(4, 2)  # something kept: propose again at once
    assert length.next() == 4
    length.verified(4, 0)  # nothing kept: no proposals, however long the text does not copy
    for _ in range(1000):
        assert length.next() == 0
        length.stepped(False)
    length.stepped(True)  # the token chosen would have matched a proposal: the wait ends with a probe
    assert (length.waiting, length.next()) == (False, 1)
    length.stepped(False)  # a step taken while not waiting changes nothing
    assert length.next() == 1
    length.verified(1, 0)  # the probe failed: wait again
    assert length.next() == 0
    assert ProposalLength(0).next() == 0  # lookup off


def test_auto_is_off_for_tiny_models_and_settings_are_checked(model):
    assert verify_rows_budget(model) == 1
    assert lookup_tokens("auto", model, 1) == 0
    assert lookup_tokens(None, model, 1) == lookup_tokens(0, model, 1) == 0
    assert lookup_tokens(5, model, 8) == 5
    assert GenerationConfig().prompt_lookup_num_tokens is None  # off by default (docs/speculative.md)
    for bad in (-1, "yes", 2.5):
        with pytest.raises(ValueError, match="prompt_lookup_num_tokens"):
            GenerationConfig(prompt_lookup_num_tokens=bad).validate()
    with pytest.raises(ValueError, match="prompt_lookup_max_ngram"):
        GenerationConfig(prompt_lookup_max_ngram=0).validate()


def test_auto_turns_lookup_on_only_where_the_kernels_verify_several_rows_for_one(monkeypatch):
    """"auto" for a model of real size: on (k = 3 for one row, 1 for two, none for more) with bfloat16
    activations on glm6b's kernels with AMX; off without AMX, without the kernels, and in float32."""
    from glm6b.inference import engine

    monkeypatch.setattr(engine, "weight_bytes", lambda model: engine.COMPILE_ON_CPU_FROM_BYTES)
    config = ChatGLMConfig.from_name("tiny")
    bf16, fp32 = (ChatGLMForConditionalGeneration(config, dtype=dtype) for dtype in (torch.bfloat16, torch.float32))
    for available, amx, model, expected in ((True, True, bf16, [3, 1, 0]), (True, False, bf16, [0, 0, 0]),
                                            (False, False, bf16, [0, 0, 0]), (True, True, fp32, [0, 0, 0])):
        monkeypatch.setattr(engine.cpu_kernels, "available", lambda available=available: available)
        monkeypatch.setattr(engine.cpu_kernels, "has_amx", lambda amx=amx: amx)
        assert [lookup_tokens("auto", model, rows) for rows in (1, 2, 3)] == expected, (available, amx, model.dtype)
        assert lookup_tokens(2, model, 3) == 2  # a number of tokens is always taken as it is
        budget = engine.verify_rows_budget(model)  # what the scheduler keeps and passes each step
        assert [lookup_tokens("auto", model, rows, budget) for rows in (1, 2, 3)] == expected
    # A budget passed in is taken as it is (the model's own is 1 here: float32 without AMX).
    assert [lookup_tokens("auto", fp32, rows, 4) for rows in (1, 2, 3)] == [3, 1, 0]


# ----------------------------------------------------------------------------------- the engine's verification


@torch.inference_mode()
def test_verification_gives_the_logits_of_decode_steps(model, tok):
    """Rows fed 4, 2 and 1 tokens, keeping 3, 2 and 1 of them, then fed again from where each stands: every
    position's logits are those of the ordinary decode step after the same tokens, and the cache ends as
    the decode steps leave it."""
    batch = tok(BATCH["texts"], padding=True, return_tensors="pt")
    args = (batch["input_ids"], batch["attention_mask"], batch["position_ids"])
    length = batch["input_ids"].shape[1] + 12
    plain, verifying = (DecodeEngine(model, 3, length, compile=False) for _ in range(2))
    tokens = [plain.prefill(*args).argmax(-1)]
    verifying.prefill(*args)
    reference = []
    for _ in range(8):
        reference.append(plain.decode(tokens[-1]))
        tokens.append(reference[-1].argmax(-1))
    tokens = torch.stack(tokens, dim=1)  # [3, 9]
    start = [0, 0, 0]
    for counts, kept in (([4, 2, 1], [3, 2, 1]), ([3, 3, 2], [3, 1, 2])):
        width = max(counts)
        feed = torch.full((3, width), model.config.pad_token_id)
        for r in range(3):
            feed[r, :counts[r]] = tokens[r, start[r]:start[r] + counts[r]]
        logits = verifying.verify(feed, torch.tensor(counts))
        assert logits.shape == (3, width, model.config.vocab_size)
        for r in range(3):
            for j in range(counts[r]):
                assert_close_rel(logits[r, j], reference[start[r] + j][r], what=f"row {r} position {start[r] + j}")
        verifying.accept(torch.tensor(kept))
        start = [s + k for s, k in zip(start, kept)]
    assert verifying.cache.lengths.tolist() == [batch["input_ids"].shape[1] + s for s in start]
    after_prompt = plain.positions[:, 1] - 8  # the plain engine has gone 8 steps
    assert verifying.positions[:, 1].tolist() == (after_prompt + torch.tensor(start)).tolist()
    # An ordinary step from there (row 1 is at its fourth token) is the plain engine's.
    row = 1
    verifying.reset_rows(0)
    verifying.reset_rows(2)
    step = verifying.decode(torch.tensor([3, int(tokens[row, start[row]]), 3]))
    assert_close_rel(step[row], reference[start[row]][row], what="decode after verifications")


def test_the_whole_verification_step_is_one_graph_for_every_width_and_position(model, tok):
    """CUDA compiles verify_step whole: traced by dynamo on the CPU it is one graph without breaks, which
    the widths of later steps reuse once the width has become symbolic (one recompile, not one per k)."""
    from torch._dynamo.utils import counters

    from glm6b.inference.engine import accept_step, verify_step

    graphs = []

    def count_graphs(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    counters.clear()
    traced = torch.compile(verify_step, backend=count_graphs, fullgraph=True, dynamic=None)
    batch = tok(BATCH["texts"], padding=True, return_tensors="pt")
    engines = [DecodeEngine(model, 3, batch["input_ids"].shape[1] + 40, compile=False) for _ in range(2)]
    with torch.inference_mode():
        tokens = [e.prefill(batch["input_ids"], batch["attention_mask"], batch["position_ids"]) for e in engines][0]
        tokens = tokens.argmax(-1)
        for width in (2, 3, 5, 8, 4, 9):
            feed = torch.cat([tokens[:, None], torch.randint(6, 700, (3, width - 1))], dim=1)
            counts = torch.tensor([width, 1, width - 1])
            eager = engines[0].verify(feed, counts)
            compiled = traced(model, engines[1].cache, feed, counts.clone(), engines[1].positions)
            for row, count in enumerate(counts.tolist()):  # the fed tokens (padding sees other slots here)
                assert_close_rel(compiled[row, :count], eager[row, :count], what=f"traced verification, width {width}")
            kept = torch.tensor([2, 1, 1])
            engines[0].accept(kept)
            accept_step(engines[1].cache, engines[1].positions, kept)
            tokens = eager[:, 0].argmax(-1)
    torch._dynamo.reset()
    assert len(graphs) == 2, dict(counters["stats"])  # width 2 static, then width symbolic


# ----------------------------------------------------------------------------------- greedy: the same tokens


@pytest.mark.parametrize("k", [1, 3, 8])
def test_golden_batch_greedy_with_lookup(model, tok, k):
    batch = tok(BATCH["texts"], padding=True, return_tensors="pt")
    stats = LookupStats()
    out = generate(model, **batch, max_new_tokens=BATCH["max_new_tokens"], output_scores=True,
                   prompt_lookup_num_tokens=k, stats=stats)
    assert out.sequences.tolist() == BATCH["sequences"]
    assert_close_rel(torch.stack(out.scores), golden_tensor(BATCH["step_scores"]), what="step scores")
    # Some kept (a row proposes once its text copies: on these answers every proposal is then right; the
    # prompts built below are rejected too).
    assert stats.accepted > 0 and stats.verify_steps > 0
    assert stats.tokens == 3 * BATCH["max_new_tokens"]


@pytest.mark.parametrize("item", SINGLE["items"], ids=lambda item: item["text"][:12])
def test_golden_single_greedy_with_lookup(model, item):
    stats = LookupStats()
    out = generate(model, torch.tensor(item["input_ids"]), max_new_tokens=SINGLE["max_new_tokens"],
                   prompt_lookup_num_tokens=4, stats=stats)
    assert out.tolist() == item["sequences"]
    assert stats.steps + 1 <= SINGLE["max_new_tokens"]


def test_golden_single_greedy_takes_fewer_steps_on_a_repeating_answer(model):
    item = SINGLE["items"][0]  # "你好": the answer ends in 546 1125 546 1125 ...
    stats = LookupStats()
    out = generate(model, torch.tensor(item["input_ids"]), max_new_tokens=SINGLE["max_new_tokens"],
                   prompt_lookup_num_tokens=4, stats=stats)
    assert out.tolist() == item["sequences"]
    assert stats.tokens_per_step >= 1.5 and max(stats.widths) == 5  # whole proposals of 4 were kept


def test_golden_chat_and_ptuning_greedy_with_lookup(model, tok):
    response, _ = chat(model, tok, CHAT["query"], CHAT["history"], max_length=CHAT["max_length"], do_sample=False,
                       prompt_lookup_num_tokens=4)
    assert response == CHAT["response"]
    from glm6b import load_model
    from helpers import GOLDEN

    prefixed = load_model(GOLDEN, dtype=torch.float32, device="cpu",
                          ptuning_checkpoint=GOLDEN / "prefix_encoder.safetensors", pre_seq_len=4,
                          prefix_projection=False)
    case = golden_cases()["ptuning"]["generate_batch_greedy"]
    forward = golden_cases()["forward_batch"]
    out = generate(prefixed, torch.tensor(forward["input_ids"]), golden_tensor(forward["attention_mask"]),
                   golden_tensor(forward["position_ids"]), max_new_tokens=case["max_new_tokens"],
                   prompt_lookup_num_tokens=3)
    assert out.tolist() == case["sequences"]


def _plain_and_lookup(model, ids, k=4, **kwargs):
    stats = LookupStats()
    plain = generate(model, ids, prompt_lookup_num_tokens=0, **kwargs)
    looked_up = generate(model, ids, prompt_lookup_num_tokens=k, stats=stats, **kwargs)
    return plain, looked_up, stats


def test_prompts_built_for_long_accepted_runs_and_for_frequent_rejections(model, tok):
    """Prompts holding the tokens of a repeating answer (long runs kept), and prompts whose n-grams are followed
    by other tokens than in the answer or copy it only in part (proposals found and rejected), single and then
    all together."""
    looping = SINGLE["items"][0]["input_ids"][0]  # "你好": the answer ends in 546 1125 546 1125 ...
    item = SINGLE["items"][1]
    answer = item["sequences"][0][len(item["input_ids"][0]):]
    body, tail = item["input_ids"][0][:-2], item["input_ids"][0][-2:]  # tail: [gMASK] <sop>
    prompts = [looping,
               body + [546, 1125] * 3 + tail,
               body + answer + body + tail,
               body + [t for a in answer for t in (a, 5)] + tail,  # every answer token followed by "▁"
               body + answer[::-1] + tail,
               # the answer with every third / fifth token replaced by "▁": copies that break off
               body + [5 if i % 3 == 2 else a for i, a in enumerate(answer)] + tail,
               body + [5 if i % 5 == 4 else a for i, a in enumerate(answer)] + tail]
    totals = LookupStats()
    for prompt in prompts:
        plain, looked_up, stats = _plain_and_lookup(model, torch.tensor([prompt]), max_new_tokens=24)
        assert torch.equal(plain, looked_up), prompt
        totals.proposed += stats.proposed
        totals.accepted += stats.accepted
        totals.widths[5] = totals.widths.get(5, 0) + stats.widths.get(5, 0)
    assert totals.accepted >= 16 and totals.proposed - totals.accepted >= 16
    # The prompts together, left-padded: each row keeps its own number of tokens at every step.
    width = max(map(len, prompts))
    ids = torch.tensor([[3] * (width - len(p)) + p for p in prompts])
    padding = (ids != 3).long()
    plain, looked_up, stats = _plain_and_lookup(model, ids, k=6, attention_mask=padding, max_new_tokens=24)
    assert torch.equal(plain, looked_up)
    assert stats.accepted > 0 and stats.proposed > stats.accepted


def test_proposals_that_would_always_fail_cost_no_verification(model, tok, monkeypatch):
    """A proposer whose guesses are always wrong (a token no answer contains): no row ever leaves its wait,
    so generate and the server's scheduler run ordinary steps only, with the golden tokens."""
    from glm6b.inference import generation, scheduler
    from glm6b.inference.scheduler import Scheduler

    seen = {t for row in BATCH["sequences"] for t in row}
    seen |= {t for item in SINGLE["items"] for t in item["sequences"][0]}
    wrong = next(t for t in range(10, 1000) if t not in seen)

    def always_wrong(context, max_tokens, *args, **kwargs):
        return [wrong] * max_tokens

    monkeypatch.setattr(generation, "propose", always_wrong)
    monkeypatch.setattr(scheduler, "propose", always_wrong)
    verified = []
    monkeypatch.setattr(DecodeEngine, "verify", lambda self, *args, **kwargs: verified.append(1))

    batch = tok(BATCH["texts"], padding=True, return_tensors="pt")
    stats = LookupStats()
    out = generate(model, **batch, max_new_tokens=BATCH["max_new_tokens"], prompt_lookup_num_tokens=4, stats=stats)
    assert out.tolist() == BATCH["sequences"]
    assert (stats.verify_steps, stats.proposed, stats.steps) == (0, 0, BATCH["max_new_tokens"] - 1)
    served = Scheduler(model, tok, max_batch=2, prompt_lookup=4)
    jobs = [_request(tok, q, h, max_new_tokens=10, do_sample=False) for q, h in CHATS[:3]]
    run_scheduler(served, {0: [jobs[0][0], jobs[1][0]], 3: [jobs[2][0]]})
    for (query, history), (_, events) in zip(CHATS, jobs):
        assert events[-1].full_text == chat(model, tok, query, history, do_sample=False, max_new_tokens=10)[0]
    assert not verified


def _copying_model():
    """A tiny random model that continues by repeating its input token (final LayerNorm weight 1 with the
    sqrt(56) residual): prompt lookup's proposals are mostly right for it."""
    config = ChatGLMConfig.from_name("tiny")
    model = ChatGLMForConditionalGeneration(config).eval()
    model.init_weights(generator=torch.Generator().manual_seed(0))
    return model


def test_a_model_whose_proposals_are_mostly_right(tok):
    model = _copying_model()
    config = model.config
    ids = torch.tensor([[20, 21, 22, 20, 21, 22, config.gmask_token_id, config.bos_token_id],
                        [30, 31, 30, 31, 30, 31, config.gmask_token_id, config.bos_token_id]])
    plain, looked_up, stats = _plain_and_lookup(model, ids, k=8, max_new_tokens=40)
    assert torch.equal(plain, looked_up)
    assert stats.acceptance_rate > 0.9 and stats.tokens_per_step > 4


def test_stops_and_penalties_see_the_same_tokens(model, tok):
    """<eop> inside a run of kept proposals, stop strings, the repetition penalty (with proposals in its
    history) and the vocabulary limit give the tokens of ordinary decoding."""
    item = SINGLE["items"][0]
    ids = torch.tensor(item["input_ids"])
    answer = item["sequences"][0][ids.shape[1]:]
    for options in ({"eos_token_id": answer[10]},  # the 11th token, inside the repeating run
                    {"eos_token_id": [answer[3], 7]},
                    {"repetition_penalty": 1.3},
                    {"repetition_penalty": 0.7, "allowed_vocab_size": 1100},
                    {"max_new_tokens": 7}):
        options = {"max_new_tokens": 20, **options}
        plain, looked_up, _ = _plain_and_lookup(model, ids, **options)
        assert torch.equal(plain, looked_up), options
    text = tok.decode(answer)
    stop = text[len(text) // 2:len(text) // 2 + 2]
    plain, looked_up, _ = _plain_and_lookup(model, ids, max_new_tokens=20, stop_strings=[stop], tokenizer=tok)
    assert torch.equal(plain, looked_up) and plain.shape[1] < ids.shape[1] + 20


def test_beam_search_ignores_lookup(model, tok):
    ids = torch.tensor(SINGLE["items"][1]["input_ids"])
    beams = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2)
    assert torch.equal(generate(model, ids, **beams, prompt_lookup_num_tokens=4),
                       generate(model, ids, **beams, prompt_lookup_num_tokens=0))


@pytest.mark.slow
def test_compiled_greedy_with_lookup_is_golden_without_a_graph_per_k(model, tok):
    """Compiled (the CPU's per-layer graph), a batch and a single row: golden tokens for every k, with the
    one-token graph plus the verification's, which becomes symbolic in its width after one recompile (and
    in the batch size after the next), not a graph per k or position. (No reset at the end: the compiled
    scheduler test below reuses these graphs.)"""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    batch = tok(BATCH["texts"], padding=True, return_tensors="pt")
    for k in (1, 5, 8, 3):
        out = generate(model, **batch, max_new_tokens=BATCH["max_new_tokens"], compile=True, prompt_lookup_num_tokens=k)
        assert out.tolist() == BATCH["sequences"], k
    item = SINGLE["items"][0]
    out = generate(model, torch.tensor(item["input_ids"]), max_new_tokens=SINGLE["max_new_tokens"], compile=True,
                   prompt_lookup_num_tokens=4)
    assert out.tolist() == item["sequences"]
    # the one-token step (then with a symbolic batch size); the verification at its first width, then symbolic
    # (then with a symbolic batch size)
    assert counters["stats"]["unique_graphs"] <= 5, dict(counters["stats"])


# ----------------------------------------------------------------------------------- sampling: the same distribution
#
# The rule is checked twice with Pearson's chi-square test. The draws are seeded, so each test gives the
# same result on every run; the threshold says how unlucky a choice of seeds may be: a correct rule fails
# for a fraction ALPHA = 1e-4 of seeds. A wrong rule fails by far: the planted mistakes below (drawing from
# p with the proposal left in after a rejection, or keeping every proposal) give p-values below 1e-30
# with these sample sizes, and so does any rule whose output distribution is off by a few percent in a
# common cell. Cells expected to hold fewer than 5 draws are pooled, so the chi-square approximation holds.

ALPHA = 1e-4


def _chi_square_p_value(counts: dict, probabilities: dict, draws: int) -> float:
    """Pearson's test of observed counts against probabilities (cells expected below 5 pooled)."""
    observed, expected, pooled_o, pooled_e = [], [], 0.0, 0.0
    for cell, p in probabilities.items():
        if p * draws >= 5:
            observed.append(counts.get(cell, 0))
            expected.append(p * draws)
        else:
            pooled_o += counts.get(cell, 0)
            pooled_e += p * draws
    pooled_o += sum(c for cell, c in counts.items() if cell not in probabilities)  # impossible outcomes
    if pooled_e > 0 or pooled_o > 0:
        observed.append(pooled_o)
        expected.append(max(pooled_e, 1e-12))
    statistic = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    df = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


def test_accepting_a_proposal_with_its_probability_leaves_the_distribution_as_it_was():
    """accept_proposals on fixed scores (p0 at the row's newest token, p1 after the proposal): the first token
    follows p0 and, after a kept proposal, the next one follows p1, for proposals that are likely, unlikely
    and impossible (20,000 draws each)."""
    settings = GenerationConfig(do_sample=True, top_k=0)
    p0 = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05, 0.0])
    p1 = torch.tensor([0.1, 0.3, 0.0, 0.4, 0.2, 0.0])
    scores = torch.stack([p0, p1]).log()
    draws = 20_000
    for first_proposal in (0, 3, 5):  # p0 of 0.5, 0.1 and 0
        generator = torch.Generator().manual_seed(first_proposal)
        firsts, seconds = {}, {}
        for _ in range(draws):
            tokens = accept_proposals(scores, [first_proposal], settings, generator)
            firsts[tokens[0]] = firsts.get(tokens[0], 0) + 1
            if tokens[0] == first_proposal and len(tokens) > 1:
                seconds[tokens[1]] = seconds.get(tokens[1], 0) + 1
        assert _chi_square_p_value(firsts, dict(enumerate(p0.tolist())), draws) > ALPHA
        if seconds:
            kept = sum(seconds.values())
            assert _chi_square_p_value(seconds, dict(enumerate(p1.tolist())), kept) > ALPHA
    greedy = GenerationConfig(do_sample=False)
    assert accept_proposals(scores, [0], greedy, None) == [0, 3]  # the argmax is kept, then p1's argmax
    assert accept_proposals(scores, [1], greedy, None) == [0]


SAMPLING = dict(do_sample=True, temperature=1.0, top_k=4, top_p=0.95, repetition_penalty=1.1)


def _exact_first_tokens(model, prompt: list[int], tokens: int) -> dict[tuple[int, ...], float]:
    """The probability of every sequence of the first `tokens` tokens under ordinary sampling: products of the
    processed distributions, one forward per prefix (the prompt extended by the prefix is the same context)."""
    probabilities = {(): 1.0}
    for _ in range(tokens):
        extended = {}
        for prefix, p in probabilities.items():
            out = generate(model, torch.tensor([prompt + list(prefix)]), max_new_tokens=1, output_scores=True,
                           prompt_lookup_num_tokens=0, **SAMPLING)
            next_p = out.scores[0][0].softmax(-1)
            for token in next_p.nonzero().flatten().tolist():
                extended[prefix + (token,)] = p * float(next_p[token])
        probabilities = extended
    return probabilities


def _sampled_first_tokens(model, prompt: list[int], tokens: int, draws: int, k: int,
                          **options) -> tuple[dict, LookupStats]:
    counts, stats = {}, LookupStats()
    rows = 500
    for seed in range(draws // rows):
        out = generate(model, torch.tensor([prompt]), max_new_tokens=tokens, num_return_sequences=rows, seed=seed,
                       prompt_lookup_num_tokens=k, stats=stats, **SAMPLING, **options)
        for row in out[:, len(prompt):].tolist():
            counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    return counts, stats


@pytest.mark.slow
@pytest.mark.parametrize("corpus", [False, True], ids=["context", "corpus"])
def test_sampling_with_lookup_draws_the_first_tokens_as_ordinary_sampling_does(monkeypatch, corpus):
    """The first four tokens of 4,000 seeded draws (temperature, top-k, top-p and the repetition penalty
    all on) against their exact distribution, on a tiny model whose proposals are kept about 60 % of the
    time (so both acceptances and rejections happen); ordinary sampling passes the same test, and a
    planted mistake in the rule fails it by far. Four tokens: a row proposes only once a token it chose
    matched what it would have proposed (here the second token at the earliest), then one token. With a
    corpus (glm6b.inference.lookup.CorpusIndex) of answers the model samples, which proposes where the
    context has a shorter match or none."""
    from glm6b.inference import generation
    from glm6b.inference.lookup import CorpusIndex

    model = _copying_model()
    config = model.config
    prompt = [20, 21, 22, 20, 21, config.gmask_token_id, config.bos_token_id]
    options = {}
    if corpus:
        sampled = generate(model, torch.tensor([prompt]), max_new_tokens=6, num_return_sequences=40, seed=99,
                           **SAMPLING)[:, len(prompt) - 1:]  # <sop> and 6 sampled tokens
        index = CorpusIndex(sampled.tolist())
        monkeypatch.setattr(generation, "corpus_index", lambda path, tokenizer, max_ngram: index)
        options = {"prompt_lookup_corpus": "sampled answers", "tokenizer": object()}
    exact = _exact_first_tokens(model, prompt, 4)
    assert abs(sum(exact.values()) - 1) < 1e-4
    draws = 4000
    counts, stats = _sampled_first_tokens(model, prompt, 4, draws, k=2, **options)
    assert 0.3 < stats.acceptance_rate < 0.9 and stats.proposed > 1000
    if corpus:  # the corpus proposed where the context alone would not have
        assert stats.proposed > _sampled_first_tokens(model, prompt, 4, draws, k=2)[1].proposed
    assert _chi_square_p_value(counts, exact, draws) > ALPHA
    plain, _ = _sampled_first_tokens(model, prompt, 4, draws, k=0)
    assert _chi_square_p_value(plain, exact, draws) > ALPHA

    from glm6b.inference import sampling

    def keep_proposal_in_residual(scores, proposals, settings, generator):  # a wrong rule: x stays in p
        kept = []
        for j, token in enumerate(proposals):
            if torch.rand((), generator=generator) >= scores[j].softmax(-1)[token]:
                return kept + sampling.choose_tokens(scores[j:j + 1], [settings], [generator]).tolist()
            kept.append(token)
        return kept + sampling.choose_tokens(scores[-1:], [settings], [generator]).tolist()

    monkeypatch.setattr(sampling, "accept_proposals", keep_proposal_in_residual)  # what accept_verified calls
    wrong, _ = _sampled_first_tokens(model, prompt, 4, draws, k=2, **options)
    assert _chi_square_p_value(wrong, exact, draws) < 1e-30


def test_seeded_sampling_with_lookup_repeats_and_rows_are_independent(model, tok):
    batch = tok(BATCH["texts"], padding=True, return_tensors="pt")
    kwargs = dict(max_new_tokens=16, do_sample=True, temperature=0.7, top_p=0.9, prompt_lookup_num_tokens=4)
    a = generate(model, **batch, seed=5, **kwargs)
    b = generate(model, **batch, seed=5, **kwargs)
    assert torch.equal(a, b)
    penalised = dict(kwargs, repetition_penalty=1.2)
    assert generate(model, **batch, seed=5, **penalised).shape == a.shape


# ----------------------------------------------------------------------------------- chat and streaming


def test_stream_chat_with_lookup_yields_each_token_and_ends_with_chat(model, tok):
    kwargs = dict(max_length=CHAT["max_length"], do_sample=False, prompt_lookup_num_tokens=4)
    partials = [p for p, _ in stream_chat(model, tok, CHAT["query"], CHAT["history"], **kwargs)]
    assert len(partials) == len(CHAT["generated_ids"])  # one partial per token, several per model step
    assert partials[-1] == CHAT["response"]
    stable = [p for p, _ in stream_chat(model, tok, CHAT["query"], CHAT["history"], stable_only=True, **kwargs)]
    assert stable[-1] == CHAT["response"]
    assert all(later.startswith(earlier) for earlier, later in zip(stable, stable[1:]))


# ----------------------------------------------------------------------------------- the server's scheduler

CHATS = [("你好", []), ("hello world, how are you", [("a", "b")]), ("写一首诗", []), ("x" * 40, []),
         ("今天天气", [("你好", "我很好")]), ("546 1125 546 1125", [])]


def _request(tok, query, history, **params):
    from glm6b.inference.scheduler import Request, SamplingParams

    events = []
    return Request(tok.encode(build_prompt(query, history)), SamplingParams(**params), events.append), events


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"])
def test_scheduler_with_lookup_gives_chat_answers_to_rows_joining_mid_batch(model, tok, monkeypatch, compile):
    """Greedy requests on 3 rows joining at different steps (some wait for a row): each answer, streamed or
    whole, is chat()'s; some steps verify rows with and without proposals together; a row's accepted
    tokens come in one event; the token counts stay right."""
    from glm6b.inference.scheduler import Scheduler

    def serve_all(prompt_lookup, compile):
        scheduler = Scheduler(model, tok, max_batch=3, max_queue=8, prompt_lookup=prompt_lookup, compile=compile)
        jobs = [_request(tok, q, h, max_new_tokens=12 + 3 * i, do_sample=False) for i, (q, h) in enumerate(CHATS)]
        run_scheduler(scheduler, {0: [jobs[0][0]], 2: [jobs[1][0], jobs[2][0]], 5: [j[0] for j in jobs[3:]]})
        assert scheduler.batch_size == 0 and scheduler.queue_length == 0
        return scheduler, [events for _, events in jobs]

    fed = []
    real_verify = DecodeEngine.verify
    monkeypatch.setattr(DecodeEngine, "verify",
                        lambda self, tokens, counts, **kw: (fed.append(counts.tolist()),
                                                            real_verify(self, tokens, counts, **kw))[1])
    plain, plain_events = serve_all(0, compile=False)
    assert not fed
    looked_up, lookup_events = serve_all(4, compile)
    several = False
    for (query, history), plain_job, job in zip(CHATS, plain_events, lookup_events):
        expected, _ = chat(model, tok, query, history, do_sample=False, max_new_tokens=plain_job[-1].completion_tokens)
        assert job[-1].full_text == plain_job[-1].full_text == expected, query
        assert "".join(e.text for e in job) == expected, query
        assert (job[-1].completion_tokens, job[-1].finish_reason) == (plain_job[-1].completion_tokens,
                                                                      plain_job[-1].finish_reason)
        tokens = [e.completion_tokens for e in job]
        assert tokens == sorted(tokens)
        several |= any(b - a > 1 for a, b in zip(tokens, tokens[1:]))  # several tokens in one event
    assert several
    assert any(1 in counts and max(counts) > 1 for counts in fed)  # rows with and without proposals in one step
    assert looked_up.generated_tokens_total == plain.generated_tokens_total
    assert looked_up.steps_total < plain.steps_total


def test_scheduler_with_lookup_fills_rows_to_the_context_length(model, tok):
    from glm6b.inference.scheduler import Scheduler

    scheduler = Scheduler(model, tok, max_batch=2, context_length=48, prompt_lookup=6)
    jobs = [_request(tok, q, h, max_new_tokens=48 - len(tok.encode(build_prompt(q, h))), do_sample=False)
            for q, h in CHATS[:4]]
    run_scheduler(scheduler, {0: [jobs[0][0]], 7: [jobs[1][0]], 20: [jobs[2][0]], 21: [jobs[3][0]]})
    for (query, history), (request, events) in zip(CHATS, jobs):
        expected, _ = chat(model, tok, query, history, do_sample=False, max_new_tokens=request.params.max_new_tokens)
        assert events[-1].full_text == expected, query


def test_scheduler_seeded_sampling_with_lookup_is_the_same_alone_and_batched(model, tok):
    from glm6b.inference.scheduler import Scheduler

    def sample(others: bool) -> str:
        scheduler = Scheduler(model, tok, max_batch=4, prompt_lookup=3)
        request, events = _request(tok, "你好", [], max_new_tokens=24, temperature=1.0, top_p=0.9, seed=1234,
                                   repetition_penalty=1.05)
        schedule = {0: [request]}
        if others:
            schedule = {0: [_request(tok, "abc", [], max_new_tokens=16, temperature=0.5)[0]], 1: [request],
                        3: [_request(tok, "546 1125 546", [], max_new_tokens=16, do_sample=False)[0]]}
        run_scheduler(scheduler, schedule)
        return events[-1].full_text

    assert sample(others=True) == sample(others=False)


# ----------------------------------------------------------------------------------- flags


def test_the_prompt_lookup_flags():
    from glm6b.cli import build_parser, sampling_options

    for command in (["chat"], ["generate", "--prompt", "x"], ["eval", "--data", "d", "--output-dir", "o"]):
        args = build_parser().parse_args([command[0], "--model", "m", *command[1:], "--prompt-lookup", "4",
                                          "--prompt-lookup-max-ngram", "2"])
        options = sampling_options(args)
        assert (options["prompt_lookup_num_tokens"], options["prompt_lookup_max_ngram"]) == (4, 2)
        default = sampling_options(build_parser().parse_args([command[0], "--model", "m", *command[1:]]))
        assert default["prompt_lookup_num_tokens"] is None  # off unless asked for
    assert build_parser().parse_args(["serve", "--model", "m"]).prompt_lookup_num_tokens is None
    serve = build_parser().parse_args(["serve", "--model", "m", "--prompt-lookup", "auto"])
    assert serve.prompt_lookup_num_tokens == "auto"
    assert build_parser().parse_args(["serve", "--model", "m", "--prompt-lookup", "0"]).prompt_lookup_num_tokens == 0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["chat", "--model", "m", "--prompt-lookup", "-2"])


def test_eval_predictions_with_lookup_are_the_same(model, tok):
    from glm6b.eval.evaluate import generate_predictions

    prompts = ["类型#裙*材质#雪纺", "你好", "Write a short poem about the ocean.", "546 1125"]
    plain, _ = generate_predictions(model, tok, prompts, batch_size=2, max_new_tokens=12, progress=False,
                                    prompt_lookup_num_tokens=0)
    looked_up, _ = generate_predictions(model, tok, prompts, batch_size=2, max_new_tokens=12, progress=False,
                                        prompt_lookup_num_tokens=4)
    assert looked_up == plain


def test_a_recipe_takes_the_lookup_settings(tmp_path):
    from glm6b.train.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("method: lora\ngeneration:\n  prompt_lookup_num_tokens: 4\n  prompt_lookup_max_ngram: 2\n")
    recipe = load_recipe(path)
    assert (recipe.generation.prompt_lookup_num_tokens, recipe.generation.prompt_lookup_max_ngram) == (4, 2)
    path.write_text("method: lora\ngeneration:\n  prompt_lookup_num_tokens: -1\n")
    with pytest.raises(Exception, match="prompt_lookup_num_tokens"):
        load_recipe(path)


def test_process_scores_takes_one_history_per_verified_position(model):
    """The repetition penalty of position j sees the row's tokens and the first j proposals."""
    logits = torch.randn(3, 10)
    settings = [GenerationConfig(repetition_penalty=2.0)] * 3
    history = [torch.tensor([1, 2]), torch.tensor([1, 2, 7]), torch.tensor([1, 2, 7, 8])]
    scores = process_scores(logits, settings, history, 9)
    for row, seen in enumerate(history):
        expected = process_scores(logits[row:row + 1], settings[:1], seen[None], 9)
        assert torch.equal(scores[row:row + 1], expected)
