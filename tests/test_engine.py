"""Tests of glm6b.inference.engine and the static KV cache: golden greedy through prefill + decode steps
(eager, chunked, compiled), rows joining and leaving a running batch, defaults."""

from __future__ import annotations

import pytest
import torch

from glm6b.inference.engine import DecodeEngine, prompt_inputs, should_compile
from glm6b.inference.generation import generate
from glm6b.model import StaticKVCache

from helpers import assert_close_rel, golden_cases, golden_tensor

BATCH = golden_cases()["generate_batch_greedy"]


def _greedy(engine, input_ids, attention_mask, position_ids, steps):
    """Greedy tokens [R, steps] and the logits of every step [steps, R, V] through the engine."""
    logits = engine.prefill(input_ids, attention_mask, position_ids)
    tokens, scores = [], []
    for step in range(steps):
        scores.append(logits.float())
        tokens.append(logits.argmax(-1))
        if step < steps - 1:
            logits = engine.decode(tokens[-1])
    return torch.stack(tokens, dim=1), torch.stack(scores)


@pytest.mark.parametrize("chunk", [512, 4], ids=["one-pass", "chunked"])
def test_golden_batch_greedy_through_the_engine(model, tok, chunk):
    batch = tok(BATCH["texts"], padding=True, return_tensors="pt")
    n = BATCH["max_new_tokens"]
    engine = DecodeEngine(model, 3, batch["input_ids"].shape[1] + n, compile=False, prefill_chunk_size=chunk)
    tokens, scores = _greedy(engine, batch["input_ids"], batch["attention_mask"], batch["position_ids"], n)
    assert torch.cat([batch["input_ids"], tokens], dim=1).tolist() == BATCH["sequences"]
    assert_close_rel(scores, golden_tensor(BATCH["step_scores"]), what="step scores")


@torch.inference_mode()
def test_chunked_prefill_fills_the_same_cache(model, tok):
    """Chunks of 3 tokens (with left padding inside the first chunk) give the cache and logits of one pass."""
    batch = tok(["你好", "Write a short poem about the ocean."], padding=True, return_tensors="pt")
    args = (batch["input_ids"], batch["attention_mask"], batch["position_ids"])
    one, chunked = (DecodeEngine(model, 2, 64, compile=False, prefill_chunk_size=c) for c in (512, 3))
    assert_close_rel(chunked.prefill(*args), one.prefill(*args), what="prefill logits")
    real = ~batch["attention_mask"][:, 0, -1, :]  # [B, T] what the last token sees: the real tokens
    width = batch["input_ids"].shape[1]
    # Keys of real tokens (padding keys are never attended to) and the recorded state agree.
    keys_one = one.cache.keys[:, :, :, :width].permute(1, 3, 0, 2, 4)[real]
    keys_chunked = chunked.cache.keys[:, :, :, :width].permute(1, 3, 0, 2, 4)[real]
    assert_close_rel(keys_chunked, keys_one, what="cached keys")
    assert torch.equal(chunked.cache.lengths, torch.full((2,), width))
    assert torch.equal(chunked.cache.visible, one.cache.visible)
    assert torch.equal(chunked.positions, one.positions)


@torch.inference_mode()
def test_rows_join_and_leave_a_running_batch(model, tok):
    """Continuous batching: a prompt prefilled into a free row while another row is mid-decode, and a
    row freed and refilled, each produce exactly the tokens of generating that prompt alone."""
    texts = ["你好", "Write a short poem about the ocean.", "北京是中国的首都"]
    steps = 8
    alone = {t: generate(model, torch.tensor([tok.encode(t)]), max_new_tokens=steps, compile=False)[0, -steps:]
             for t in texts}

    def prompt(text):
        ids = torch.tensor([tok.encode(text)])
        return (ids, *prompt_inputs(model, ids))

    engine = DecodeEngine(model, 2, 64, compile=False)
    streams = {0: [engine.prefill(*prompt(texts[0]), rows=0).argmax(-1)], 1: []}
    feed = torch.full((2,), model.config.pad_token_id)  # row 1 is idle: it decodes pads nobody reads
    for step in range(steps - 1):
        if step == 3:  # row 1 joins while row 0 is at its fourth token
            streams[1].append(engine.prefill(*prompt(texts[1]), rows=1).argmax(-1))
        feed[0] = streams[0][-1][0]
        if streams[1]:
            feed[1] = streams[1][-1][0]
        logits = engine.decode(feed)
        streams[0].append(logits[0:1].argmax(-1))
        if step >= 3:
            streams[1].append(logits[1:2].argmax(-1))
    assert torch.cat(streams[0]).tolist() == alone[texts[0]].tolist()
    assert torch.cat(streams[1]).tolist() == alone[texts[1]][:len(streams[1])].tolist()

    # Row 0 leaves; a third prompt takes its place while row 1 goes on.
    engine.reset_rows(0)
    assert engine.cache.lengths[0].item() == 0 and not engine.cache.visible[0].any()
    streams[0] = [engine.prefill(*prompt(texts[2]), rows=0).argmax(-1)]
    while len(streams[0]) < steps:
        logits = engine.decode(torch.cat([streams[0][-1], streams[1][-1]]))
        streams[0].append(logits[0:1].argmax(-1))
        streams[1].append(logits[1:2].argmax(-1))
    assert torch.cat(streams[0]).tolist() == alone[texts[2]].tolist()


@torch.inference_mode()
def test_a_full_row_stays_in_range(model, tok):
    ids = torch.tensor([tok.encode("你好")])
    engine = DecodeEngine(model, 1, ids.shape[1] + 1, compile=False)
    slots = engine.max_length
    logits = engine.prefill(ids, *prompt_inputs(model, ids))
    for _ in range(slots - ids.shape[1] + 2):  # past the last slot
        logits = engine.decode(logits.argmax(-1))
    assert engine.cache.lengths.item() == slots
    assert torch.isfinite(logits).all()


def test_a_cpu_step_covers_the_slots_in_use_with_the_logits_of_every_slot(model, tok, monkeypatch):
    """In a cache far longer than the rows fill (a chat's max_length), a CPU step covers the filled slots and
    its own, rounded up to SLOT_ROUNDING, and gives the logits of a step over every slot."""
    from glm6b.inference import engine as engine_module

    assert [engine_module.slots_for(n, 300) for n in (1, 64, 65, 290)] == [64, 64, 128, 300]
    covered = []
    real_rows = StaticKVCache.rows
    monkeypatch.setattr(StaticKVCache, "rows", lambda self, rows, slots=None: (covered.append(slots),
                                                                                real_rows(self, rows, slots))[1])
    batch = tok(BATCH["texts"], padding=True, return_tensors="pt")
    engines = [DecodeEngine(model, 3, 300, compile=False) for _ in range(2)]
    with torch.inference_mode():
        logits = [e.prefill(batch["input_ids"], batch["attention_mask"], batch["position_ids"]) for e in engines]
        prompt = batch["input_ids"].shape[1]
        for step in range(BATCH["max_new_tokens"]):
            tokens = logits[0].argmax(-1)
            covered.clear()
            logits = [engines[0].decode(tokens), engines[1].decode(tokens, slots=300)]
            assert covered == [engine_module.slots_for(prompt + step + 1, 300), 300]
            assert_close_rel(logits[0], logits[1], what=f"step {step} over the slots in use")
    assert prompt + BATCH["max_new_tokens"] < 128 <= 300


def test_static_cache_slots_are_per_row(model):
    cache = StaticKVCache(model.config, 3, 16, torch.float32, "cpu")
    cache.lengths.copy_(torch.tensor([2, 5, 16]))
    assert cache.next_slots().tolist() == [2, 5, 15]
    mask = cache.decode_mask()[:, 0, 0]  # True = masked; nothing is visible yet but the new token
    assert (~mask).nonzero().tolist() == [[0, 2], [1, 5], [2, 15]]
    cache.advance()
    assert cache.lengths.tolist() == [3, 6, 16]
    assert cache.visible.nonzero().tolist() == [[0, 2], [1, 5], [2, 15]]
    cache.reset_rows(1)
    assert cache.lengths.tolist() == [3, 0, 16] and not cache.visible[1].any()


def test_compile_setting(model):
    assert should_compile(model, "auto") is False  # a tiny model on the CPU runs eagerly
    assert should_compile(model, True) is True
    with pytest.raises(ValueError, match="compile"):
        should_compile(model, "yes")
    with pytest.raises(ValueError, match="compile"):
        generate(model, torch.tensor([[5, 801, 804]]), max_new_tokens=2, compile="yes")


def test_decode_step_is_one_graph_for_every_position(model, tok):
    """Traced by dynamo (no inductor, so it is quick): the whole step is one graph without breaks
    (fullgraph: no data-dependent Python branch, no .item()), reused at every position, and it
    computes what the eager step computes."""
    from glm6b.inference.engine import decode_step

    graphs = []

    def count_graphs(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    traced = torch.compile(decode_step, backend=count_graphs, fullgraph=True, dynamic=False)
    batch = tok(BATCH["texts"], padding=True, return_tensors="pt")
    n = BATCH["max_new_tokens"]
    engines = [DecodeEngine(model, 3, batch["input_ids"].shape[1] + n, compile=False) for _ in range(2)]
    with torch.inference_mode():
        logits = [e.prefill(batch["input_ids"], batch["attention_mask"], batch["position_ids"]) for e in engines]
        for _ in range(n - 1):
            tokens = logits[0].argmax(-1)
            logits = [engines[0].decode(tokens), traced(model, engines[1].cache, tokens.clone(), engines[1].positions)]
            assert_close_rel(logits[1], logits[0], what="traced step")
    torch._dynamo.reset()
    assert len(graphs) == 1


@pytest.mark.slow
def test_compiled_step_golden_and_no_recompiles(model, tok):
    """The compiled decode step gives the golden greedy tokens and scores, with one graph for all
    positions (a recompile per position would show up as more unique graphs)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    batch = tok(BATCH["texts"], padding=True, return_tensors="pt")
    n = BATCH["max_new_tokens"]
    engine = DecodeEngine(model, 3, batch["input_ids"].shape[1] + n, compile=True)
    assert engine.compiled
    tokens, scores = _greedy(engine, batch["input_ids"], batch["attention_mask"], batch["position_ids"], n)
    assert torch.cat([batch["input_ids"], tokens], dim=1).tolist() == BATCH["sequences"]
    assert_close_rel(scores, golden_tensor(BATCH["step_scores"]), what="compiled step scores")
    assert counters["stats"]["unique_graphs"] == 1
    # generate() with compile=True reuses the graph (same rows and slot bucket): still one graph.
    out = generate(model, **batch, max_new_tokens=n, compile=True)
    assert out.tolist() == BATCH["sequences"]
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("graph", ["per-layer", "whole-step"])
def test_compiled_step_writes_the_cache_in_place(model, tok, graph):
    """The compiled step writes each row's new keys/values into the cache without copying the cache:
    no buffer in inductor's code is as large as a layer's keys (a copy of the cache per layer and
    step would make a step's time grow with the cache's length, not the tokens in it). Both graphs:
    the CPU's per-layer one and CUDA's whole step (compiled here on the CPU)."""
    import math
    import re

    from torch._inductor.utils import run_and_get_code

    from glm6b.inference.engine import _compiled, decode_step

    torch._dynamo.reset()
    batch = tok(BATCH["texts"], padding=True, return_tensors="pt")
    engine = DecodeEngine(model, 3, 256, compile=True)
    reference = DecodeEngine(model, 3, 256, compile=False)
    tokens = [e.prefill(batch["input_ids"], batch["attention_mask"], batch["position_ids"]).argmax(-1)
              for e in (engine, reference)][0]
    if graph == "per-layer":
        logits, codes = run_and_get_code(engine.decode, tokens)
    else:
        with torch.inference_mode():
            logits, codes = run_and_get_code(_compiled(decode_step), model, engine.cache, tokens.clone(), engine.positions)
    torch._dynamo.reset()
    shapes = [tuple(int(n) for n in re.findall(r"\d+", match))
              for code in codes for match in re.findall(r"empty_strided_cpu\(\(([\d, ]*)\)", code)]
    assert shapes, "no buffers found in inductor's code (has its format changed?)"
    layer_keys = engine.cache.keys[0]
    assert max(math.prod(shape) for shape in shapes) < layer_keys.numel(), shapes
    # ... and the writes land in the engine's cache: the step and the next one are the eager ones'.
    assert_close_rel(logits, reference.decode(tokens), what="compiled step")
    for layer in range(model.config.num_layers):
        assert_close_rel(engine.cache.keys[layer], reference.cache.keys[layer], what="keys")
    next_tokens = logits.argmax(-1)
    assert_close_rel(engine.decode(next_tokens), reference.decode(next_tokens), what="next step")


@pytest.mark.cuda
def test_cuda_compiled_equals_eager_bf16(tok):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from glm6b import load_model
    from helpers import GOLDEN

    model = load_model(GOLDEN, dtype=torch.bfloat16, device="cuda")
    batch = tok(BATCH["texts"], padding=True, return_tensors="pt").to("cuda")
    eager = generate(model, **batch, max_new_tokens=8, compile=False)
    compiled = generate(model, **batch, max_new_tokens=8, compile=True)
    assert torch.equal(eager, compiled)


@pytest.mark.slow
def test_compiled_step_serves_any_rows_and_slots_without_recompiling_each(model, tok):
    """Engines of many batch sizes and lengths, and steps over some rows and slots only (as a server
    runs them), share the compiled CPU step: a second shape makes its sizes symbolic and later ones
    reuse that graph (one graph per exact shape would hit torch's recompile limit, 8, and fail),
    and every step equals the eager one."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    texts = BATCH["texts"]
    shapes = [(1, 5), (1, 13), (1, 40), (2, 5), (3, 20), (3, 50), (2, 80), (1, 110), (3, 130), (2, 180)]
    for rows, extra_slots in shapes:
        batch = tok(texts[:rows], padding=True, return_tensors="pt")
        length = batch["input_ids"].shape[1] + extra_slots
        engines = [DecodeEngine(model, rows, length, compile=c) for c in (True, False)]
        assert engines[0].compiled and engines[0].max_length == length
        tokens = [e.prefill(batch["input_ids"], batch["attention_mask"], batch["position_ids"]).argmax(-1)
                  for e in engines][1]
        for _ in range(2):
            logits = [e.decode(tokens) for e in engines]
            assert_close_rel(logits[0], logits[1], what=f"compiled step, {rows} rows, {length} slots")
            tokens = logits[1].argmax(-1)
        # The first row alone over its first slots (the other rows and slots are left as they are).
        used = batch["input_ids"].shape[1] + 3
        logits = [e.decode(tokens[:1], rows=1, slots=used) for e in engines]
        assert_close_rel(logits[0], logits[1], what=f"compiled step over 1 row, {used} slots")
        for layer in range(model.config.num_layers):
            assert_close_rel(engines[0].cache.keys[layer], engines[1].cache.keys[layer], what="keys")
    assert counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])
    torch._dynamo.reset()


def test_compile_setting_by_size():
    """"auto" compiles a CPU model's step from COMPILE_ON_CPU_FROM_BYTES of weights on (4 glm_6b layers,
    built on the meta device: nothing is allocated), not a tiny one's."""
    from glm6b.config import ChatGLMConfig
    from glm6b.inference.engine import COMPILE_ON_CPU_FROM_BYTES, weight_bytes
    from glm6b.model import ChatGLMForConditionalGeneration

    big = ChatGLMForConditionalGeneration(ChatGLMConfig.from_name("glm_6b_4layers"), dtype=torch.bfloat16,
                                          device="meta")
    assert weight_bytes(big) >= COMPILE_ON_CPU_FROM_BYTES
    assert big.device.type == "meta" and should_compile(big, "auto") is True
    assert should_compile(big, False) is False
    tiny = ChatGLMForConditionalGeneration(ChatGLMConfig.from_name("tiny"))
    assert weight_bytes(tiny) < COMPILE_ON_CPU_FROM_BYTES and should_compile(tiny, "auto") is False


def test_ptuning_prefix_survives_chunks_and_row_resets():
    """The P-tuning prefix sits in the first slots of every row: golden greedy through chunked
    prefill, and again after the rows were reset and refilled."""
    from glm6b import load_model
    from helpers import GOLDEN

    model = load_model(GOLDEN, dtype=torch.float32, device="cpu", ptuning_checkpoint=GOLDEN / "prefix_encoder.safetensors",
                       pre_seq_len=4, prefix_projection=False)
    case = golden_cases()["ptuning"]["generate_batch_greedy"]
    forward = golden_cases()["forward_batch"]
    ids = torch.tensor(forward["input_ids"])
    mask, positions = golden_tensor(forward["attention_mask"]), golden_tensor(forward["position_ids"])
    n = case["max_new_tokens"]
    engine = DecodeEngine(model, ids.shape[0], ids.shape[1] + n, compile=False, prefill_chunk_size=3)
    assert engine.cache.prefix_length == 4
    for _ in range(2):
        tokens, _ = _greedy(engine, ids, mask, positions, n)
        assert torch.cat([ids, tokens], dim=1).tolist() == case["sequences"]
        engine.reset_rows()
        assert engine.cache.lengths.tolist() == [4] * ids.shape[0]
