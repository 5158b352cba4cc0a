"""The continuous-batching scheduler, driven step by step on the golden model (no threads, no HTTP)."""

import pytest

from glm6b.inference.chat import build_prompt
from glm6b.inference.scheduler import QueueFullError, Request, SamplingParams, Scheduler, _Row

from helpers import run_scheduler

CHATS = [("你好", []), ("hello world, how are you", [("a", "b")]), ("写一首诗", []), ("x" * 40, []),
         ("今天天气", [("你好", "我很好")]), ("abc", [])]


class Recorder:
    """Collects a request's events."""

    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)

    @property
    def final(self):
        assert self.events and self.events[-1].finish_reason is not None, "the request has not finished"
        return self.events[-1]

    @property
    def streamed(self) -> str:
        return "".join(e.text for e in self.events)


def make_request(tok, query, history, **params):
    recorder = Recorder()
    params.setdefault("max_new_tokens", 16)
    request = Request(tok.encode(build_prompt(query, history)), SamplingParams(**params), recorder)
    return request, recorder


def test_greedy_rows_joining_at_different_steps_equal_chat(model, tok):
    # 6 requests on 3 rows: some join a running batch, some wait in the queue for a row to free up.
    scheduler = Scheduler(model, tok, max_batch=3, max_queue=8)
    jobs = [make_request(tok, q, h, max_new_tokens=10 + 3 * i, do_sample=False) for i, (q, h) in enumerate(CHATS)]
    run_scheduler(scheduler, {0: [jobs[0][0]], 2: [jobs[1][0], jobs[2][0]], 5: [j[0] for j in jobs[3:]]})
    for (query, history), (request, recorder) in zip(CHATS, jobs):
        expected, _ = model.chat(tok, query, history, do_sample=False, max_new_tokens=request.params.max_new_tokens)
        assert recorder.final.full_text == expected, query
        assert recorder.streamed == expected, query
        assert recorder.final.finish_reason in ("stop", "length")
        assert recorder.final.prompt_tokens == len(request.prompt_ids)
    assert scheduler.batch_size == 0 and scheduler.queue_length == 0


def test_rows_filled_to_the_context_length_stay_exact(model, tok):
    # Every request uses its row to the last slot of a short context while others come and go.
    scheduler = Scheduler(model, tok, max_batch=2, context_length=48)
    jobs = [make_request(tok, q, h, max_new_tokens=48 - len(tok.encode(build_prompt(q, h))), do_sample=False)
            for q, h in CHATS[:4]]
    run_scheduler(scheduler, {0: [jobs[0][0]], 7: [jobs[1][0]], 20: [jobs[2][0]], 21: [jobs[3][0]]})
    for (query, history), (request, recorder) in zip(CHATS, jobs):
        expected, _ = model.chat(tok, query, history, do_sample=False, max_new_tokens=request.params.max_new_tokens)
        assert recorder.final.full_text == expected, query


def test_idle_rows_are_skipped_in_steps(model, tok, monkeypatch):
    # New requests take the lowest free row; a step runs rows up to the highest in use only.
    import glm6b.inference.engine as engine_module

    counts = []
    real_step = engine_module.decode_step
    monkeypatch.setattr(engine_module, "decode_step",
                        lambda model, cache, tokens, positions: (counts.append(cache.batch_size),
                                                                 real_step(model, cache, tokens, positions))[1])
    scheduler = Scheduler(model, tok, max_batch=4, compile=False)
    request, recorder = make_request(tok, "你好", [], max_new_tokens=6, do_sample=False)
    run_scheduler(scheduler, {0: [request]})
    assert set(counts) == {1}
    assert recorder.final.full_text == model.chat(tok, "你好", [], do_sample=False, max_new_tokens=6)[0]


def test_seeded_sampling_is_the_same_alone_and_batched(model, tok):
    def sample(others: bool) -> str:
        scheduler = Scheduler(model, tok, max_batch=4)
        request, recorder = make_request(tok, "你好", [], max_new_tokens=24, temperature=1.0, top_p=0.9, seed=1234)
        schedule = {0: [request]}
        if others:  # unseeded neighbours with other settings, joining before and after
            schedule = {0: [make_request(tok, "abc", [], temperature=0.5)[0]], 1: [request],
                        3: [make_request(tok, "写一首诗", [], do_sample=False)[0]]}
        run_scheduler(scheduler, schedule)
        return recorder.final.full_text

    alone = sample(others=False)
    assert sample(others=True) == alone
    other_seed = Scheduler(model, tok)
    request, recorder = make_request(tok, "你好", [], max_new_tokens=24, temperature=1.0, top_p=0.9, seed=99)
    run_scheduler(other_seed, {0: [request]})
    assert recorder.final.full_text != alone  # the seed matters (24 tokens drawn from ~1000)


def test_stop_string_cuts_the_answer(model, tok):
    scheduler = Scheduler(model, tok)
    request, recorder = make_request(tok, "写一首诗", [], max_new_tokens=30, do_sample=False)
    run_scheduler(scheduler, {0: [request]})
    full = recorder.final.full_text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert len(stop) == 2 and full.find(stop) > 0
    request, recorder = make_request(tok, "写一首诗", [], max_new_tokens=30, do_sample=False, stop=["@@@", stop])
    run_scheduler(scheduler, {0: [request]})
    assert recorder.final.finish_reason == "stop"
    assert recorder.final.full_text == full[:full.find(stop)]
    assert recorder.streamed == recorder.final.full_text  # nothing of the stop string was streamed


def test_streaming_never_splits_a_utf8_character(tok):
    # "龘" is three byte tokens in this vocabulary; the first two decode to U+FFFD and must be held back.
    ids = tok.encode("龘", add_special_tokens=False)
    assert len(ids) >= 3
    for chat in (True, False):
        request = Request([1], SamplingParams(max_new_tokens=10), lambda e: None, chat=chat)
        row = _Row(request, tok, 0)
        deltas = [row.push(i, eos_id=-1) for i in ids]
        assert all("\ufffd" not in d for d in deltas)
        assert "".join(deltas).strip() == "龘"
        assert deltas[-1].strip() == "龘"


@pytest.mark.parametrize("chat", [True, False])
def test_incremental_decoding_equals_decoding_everything(tok, chat):
    # Long answers are decoded in two parts (a fixed head and the last tokens): the text must be the
    # same as decoding all tokens at every step, on real text and on random tokens.
    import random

    texts = ["这款连衣裙采用棉质面料，穿着舒适透气。 I'm fine, don't worry. It's 1 + 1 = 2 ,ok .\n\tspaced  out",
             "春眠不觉晓 , 处处闻啼鸟 . ' quoted ' words n't ?"]
    rng = random.Random(0)
    sequences = [tok.encode(t * 3, add_special_tokens=False) for t in texts]
    sequences += [[rng.randrange(5, len(tok)) for _ in range(120)] for _ in range(20)]
    for ids in sequences:
        request = Request([1], SamplingParams(max_new_tokens=len(ids)), lambda e: None, chat=chat)
        row = _Row(request, tok, 0)
        streamed = ""
        for token in ids:
            streamed += row.push(token, eos_id=-1)
            assert row.text() == row.text(exact=True)
        assert row.start > 0  # the head was used
        assert streamed == row.final_text == row.text(exact=True)


def test_chat_text_holds_back_what_process_response_may_change(tok):
    request = Request([1], SamplingParams(max_new_tokens=10), lambda e: None, chat=True)
    row = _Row(request, tok, 0)
    sent = [row.push(i, eos_id=-1) for i in tok.encode("你好,世界", add_special_tokens=False)]
    # "好," may still become "好，" or stay: the comma is released only with the next character.
    assert "".join(sent) == "你好，世界"[:len("".join(sent))]
    assert "".join(sent).startswith("你好，")


def test_cancel_frees_the_row_and_the_queue(model, tok):
    scheduler = Scheduler(model, tok, max_batch=1, max_queue=1)
    running, running_rec = make_request(tok, "你好", [], max_new_tokens=200, do_sample=False)
    waiting, waiting_rec = make_request(tok, "abc", [], max_new_tokens=5, do_sample=False)
    scheduler.submit(running)
    scheduler.step()
    scheduler.submit(waiting)
    with pytest.raises(QueueFullError):
        scheduler.submit(make_request(tok, "x", [])[0])
    scheduler.step()
    assert scheduler.batch_size == 1 and scheduler.queue_length == 1
    scheduler.cancel(running)
    scheduler.step()  # the cancelled row leaves and the waiting request takes its place at once
    assert running_rec.final.finish_reason == "cancelled"
    assert running_rec.final.completion_tokens < 200
    assert scheduler.cancelled_total == 1
    assert scheduler.batch_size == 1 and scheduler.queue_length == 0
    run_scheduler(scheduler, {})
    assert waiting_rec.final.finish_reason in ("stop", "length")


def test_warm_up_leaves_the_scheduler_empty_and_exact(model, tok):
    scheduler = Scheduler(model, tok, max_batch=2)
    scheduler.warm_up()
    assert scheduler.batch_size == 0 and scheduler.generated_tokens_total == 0
    request, recorder = make_request(tok, "你好", [], max_new_tokens=10, do_sample=False)
    run_scheduler(scheduler, {0: [request]})
    assert recorder.final.full_text == model.chat(tok, "你好", [], do_sample=False, max_new_tokens=10)[0]


def test_bad_requests_are_refused_at_submit(model, tok):
    scheduler = Scheduler(model, tok, context_length=32)
    with pytest.raises(ValueError, match="context length 32"):
        scheduler.submit(make_request(tok, "x" * 40, [], max_new_tokens=4)[0])
    with pytest.raises(ValueError, match="top_p"):
        scheduler.submit(make_request(tok, "x", [], top_p=0.0)[0])
    with pytest.raises(ValueError, match="temperature"):
        scheduler.submit(make_request(tok, "x", [], temperature=0.0)[0])


def test_a_failing_step_ends_its_requests_not_the_loop(model, tok, monkeypatch):
    scheduler = Scheduler(model, tok)
    request, recorder = make_request(tok, "你好", [], do_sample=False)
    scheduler.submit(request)
    monkeypatch.setattr(scheduler, "_prefill", lambda requests: (_ for _ in ()).throw(RuntimeError("boom")))
    scheduler.step()
    assert recorder.final.finish_reason == "error" and "boom" in recorder.final.error
    monkeypatch.undo()
    request, recorder = make_request(tok, "你好", [], do_sample=False)
    run_scheduler(scheduler, {0: [request]})
    assert recorder.final.finish_reason in ("stop", "length")


@pytest.mark.parametrize("top_k,top_p", [(1, 1.0), (50, 1e-6)])
def test_sampling_with_a_single_candidate_is_greedy(model, tok, top_k, top_p):
    scheduler = Scheduler(model, tok)
    greedy, greedy_rec = make_request(tok, "写一首诗", [], max_new_tokens=12, do_sample=False)
    sampled, sampled_rec = make_request(tok, "写一首诗", [], max_new_tokens=12, temperature=1.3, top_k=top_k,
                                        top_p=top_p)
    run_scheduler(scheduler, {0: [greedy, sampled]})
    assert sampled_rec.final.full_text == greedy_rec.final.full_text



@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.slow),
                                    pytest.param("cuda", marks=pytest.mark.cuda)])
def test_compiled_steps_equal_chat(tok, device):
    """With the engine's step compiled (on the CPU one graph for every layer, on CUDA the whole step),
    steps over the rows and slots in use, rows joining mid-batch: each answer still equals chat()."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from glm6b import load_model
    from helpers import GOLDEN

    torch._dynamo.reset()
    model = load_model(GOLDEN, dtype=torch.float32, device=device)
    scheduler = Scheduler(model, tok, max_batch=3, compile=True)
    assert scheduler.engine.compiled
    jobs = [make_request(tok, q, h, max_new_tokens=12, do_sample=False) for q, h in CHATS[:4]]
    run_scheduler(scheduler, {0: [jobs[0][0]], 2: [jobs[1][0], jobs[2][0]], 4: [jobs[3][0]]})
    for (query, history), (request, recorder) in zip(CHATS, jobs):
        expected, _ = model.chat(tok, query, history, do_sample=False, max_new_tokens=12, compile=True)
        assert recorder.final.full_text == expected, query
