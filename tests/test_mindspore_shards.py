"""MindFormers' sharded checkpoints merged without MindSpore: strategy files, slices stitched back (model
parallel, optimizer sharding, uneven splits, pipeline stages), the golden model through a sharded set,
one-line errors; and against real MindSpore 2.10: strategy files built with its own protobuf classes,
merged by `mindspore.transform_checkpoints` / `merge_sliced_parameter` to the same tensors.

Tests that need MindSpore take the `ms` fixture and skip, saying so, where it is not installed.
"""

from __future__ import annotations

import glob
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from glm6b.checkpoint import mindspore as msckpt
from glm6b.checkpoint.errors import CheckpointError
from glm6b.checkpoint.mindspore_shards import ShardedCheckpoint, find_rank_files, is_sharded_folder, read_strategy

from helpers import GOLDEN, assert_close_rel, golden_cases, golden_tensor

TOKENIZER_FILES = ("config.json", "ice_text.model", "tokenizer_config.json")


@pytest.fixture(scope="module")
def ms():
    try:
        import mindspore
    except ImportError:
        pytest.skip("MindSpore is not installed: no mindspore==2.10.0 wheel for this platform/Python")
    return mindspore


# ----------------------------------------------------------------------------------- building sets


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative ints: ten bytes, as protobuf writes int32 -1
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _message(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _dims(values) -> bytes:
    return b"".join(_varint(1 << 3) + _varint(v) for v in values)


def strategy_bytes(layouts: dict[str, dict], stage: int = 0) -> bytes:
    """A ParallelStrategyMap, written by hand from node_strategy.proto (what the ms-free tests use).

    layouts: name -> {"dev": [...], "map": [...], "split": [...], "step": s, "size": n}.
    """
    strategys = _varint(1 << 3) + _varint(stage) + _message(2, _dims([1, 1]))
    out = _varint(1 << 3) + _varint(stage) + _message(2, _message(1, b"MatMul-op0") + _message(2, strategys))
    for name, spec in layouts.items():
        body = (_message(1, _dims(spec["dev"])) + _message(2, _dims(spec["map"]))
                + _message(3, _dims(spec.get("split", []))) + _message(4, _dims(spec.get("offset", [])))
                + _varint(5 << 3) + _varint(0) + _varint(6 << 3) + _varint(spec.get("step", 0))
                + _varint(7 << 3) + _varint(spec.get("size", 0)))
        out += _message(3, _message(1, name.encode()) + _message(2, body))
    return out


def mindspore_strategy_bytes(ms, layouts: dict[str, dict], stage: int = 0) -> bytes:
    """The same map built with the protobuf classes MindSpore ships."""
    from mindspore.train import node_strategy_pb2 as pb

    strategy_map = pb.ParallelStrategyMap()
    strategy_map.current_stage = stage
    item = strategy_map.parallel_strategy_item.add()
    item.node_name = "MatMul-op0"
    item.parallel_strategys.stage = stage
    item.parallel_strategys.parallel_strategy.add().dim.extend([1, 1])
    for name, spec in layouts.items():
        layout_item = strategy_map.parallel_layout_item.add()
        layout_item.param_name = name
        layout = layout_item.parallel_layouts
        layout.dev_matrix.add().dim.extend(spec["dev"])
        layout.tensor_map.add().dim.extend(spec["map"])
        layout.param_split_shape.add().dim.extend(spec.get("split", []))
        layout.indices_offset.add().dim.extend(spec.get("offset", []))
        layout.field = 0
        layout.opt_weight_shard_step = spec.get("step", 0)
        layout.opt_weight_shard_size = spec.get("size", 0)
    return strategy_map.SerializeToString()


def rank_slice(whole: np.ndarray, spec: dict, rank: int) -> np.ndarray:
    """A rank's slice of `whole` the way the strategy describes it (np.split per cut dim, then the
    optimizer-shard part of dim 0), written independently of glm6b's merge."""
    dev, tensor_map = spec["dev"], spec["map"]
    n = len(dev)
    coords = np.unravel_index(rank, dev)  # row-major, as MindSpore numbers ranks
    part = whole
    for j, k in enumerate(tensor_map):
        if k >= 0:
            part = np.split(part, dev[n - 1 - k], axis=j)[coords[n - 1 - k]]
    size = spec.get("size", 0)
    if spec.get("step", 0) and size:
        used = {n - 1 - k for k in tensor_map if k >= 0}
        if size == -1:
            size = int(np.prod(dev)) // int(np.prod([dev[n - 1 - k] for k in tensor_map if k >= 0] or [1]))
        index, left = 0, size
        digits = []
        for axis in reversed([i for i in range(n) if i not in used and dev[i] > 1]):
            if left == 1:
                break
            take = min(left, dev[axis])
            digits.insert(0, (coords[axis] % take, take))
            left //= take
        for digit, take in digits:
            index = index * take + digit
        part = np.split(part, size, axis=0)[index]
    return np.ascontiguousarray(part)


def write_set(folder, tensors: dict[str, np.ndarray], layouts: dict[str, dict],
              stages: dict[str, list[int]] | None = None, stage_devices: int | None = None,
              extra: dict[str, np.ndarray] | None = None, ms=None) -> None:
    """rank_<r>/net_rank_<r>-1_10.ckpt for every rank: each holds its slice of the tensors of its stage
    (whole ones for names without a layout), plus `extra` (optimizer-like entries) whole."""
    devices = stage_devices or int(np.prod(next(iter(layouts.values()))["dev"]))
    num_stages = 1 + max((s for ss in (stages or {}).values() for s in ss), default=0)
    for rank in range(devices * num_stages):
        stage, local = divmod(rank, devices)
        entries = []
        for name, whole in tensors.items():
            if stage not in (stages or {}).get(name, [0]):
                continue
            piece = rank_slice(whole, layouts[name], local) if name in layouts else whole
            entries.append((name, piece))
        entries += list((extra or {}).items())
        path = folder / f"rank_{rank}" / f"net_rank_{rank}-1_10.ckpt"
        path.parent.mkdir(parents=True, exist_ok=True)
        if ms is None:
            msckpt.save_ckpt(path, [(n, torch.from_numpy(v)) for n, v in entries])
        else:
            ms.save_checkpoint([{"name": n, "data": ms.Tensor(v)} for n, v in entries], str(path))


def merged(folder, strategy=None) -> dict[str, torch.Tensor]:
    with ShardedCheckpoint(folder, strategy) as sharded:
        return dict(sharded.iter_model_tensors())


# ----------------------------------------------------------------------------------- layouts on small tensors

SMALL_LAYOUTS = {
    "transformer.rows": {"dev": [2, 2], "map": [1, -1]},                  # dim 0 over the left device dim
    "transformer.cols": {"dev": [2, 2], "map": [-1, 0]},                  # dim 1 over the right one
    "transformer.both": {"dev": [2, 2], "map": [0, 1]},                   # both dims, crossed
    "transformer.opt": {"dev": [2, 2], "map": [0, -1], "step": 2, "size": 2},   # + optimizer shard over dim 0
    "transformer.opt_all": {"dev": [2, 2], "map": [-1, -1], "step": 1, "size": -1},
    "transformer.copy": {"dev": [2, 2], "map": [-1, -1]},
    "transformer.three": {"dev": [2, 2, 2], "map": [2, -1, 0]},           # a 3-D device matrix
    "transformer.three_opt": {"dev": [2, 2, 2], "map": [0, -1], "step": 2, "size": 4},   # opt over two dims
    "transformer.three_half": {"dev": [2, 2, 2], "map": [0, -1], "step": 2, "size": 2},  # over the right one
    "transformer.inner": {"dev": [4, 2], "map": [0, -1], "step": 2, "size": 2},          # inner half of a dim
}
EIGHT = ("transformer.three", "transformer.three_opt", "transformer.three_half", "transformer.inner")


def small_tensors() -> dict[str, np.ndarray]:
    shapes = {"transformer.rows": (8, 6), "transformer.cols": (4, 8), "transformer.both": (6, 4),
              "transformer.opt": (8, 3), "transformer.opt_all": (8, 2), "transformer.copy": (3, 5),
              "transformer.three": (4, 3, 6), "transformer.three_opt": (16, 3), "transformer.three_half": (8, 2),
              "transformer.inner": (8, 5)}
    return {n: np.arange(np.prod(s), dtype=np.float32).reshape(s) * (i + 1) for i, (n, s) in enumerate(shapes.items())}


def test_every_layout_kind_merges_back_to_the_whole_tensors(tmp_path):
    tensors, layouts = small_tensors(), dict(SMALL_LAYOUTS)
    eight = {n: layouts.pop(n) for n in EIGHT}
    write_set(tmp_path / "a", {n: tensors[n] for n in layouts} | {"transformer.whole": np.ones(3, np.float32)},
              layouts, extra={"adam_m.transformer.rows": np.zeros(1, np.float32), "global_step": np.array([10])})
    (tmp_path / "a" / "ckpt_strategy.ckpt").write_bytes(strategy_bytes(layouts))
    assert is_sharded_folder(tmp_path / "a") and not is_sharded_folder(tmp_path / "a" / "rank_0")
    with ShardedCheckpoint(tmp_path / "a") as sharded:
        assert sorted(sharded.other) == ["adam_m.transformer.rows", "global_step"]
        got = dict(sharded.iter_model_tensors())
    assert set(got) == {*layouts, "transformer.whole"}
    for name in layouts:
        assert torch.equal(got[name], torch.from_numpy(tensors[name])), name
    write_set(tmp_path / "b", {n: tensors[n] for n in eight}, eight)
    (tmp_path / "b" / "s.ckpt").write_bytes(strategy_bytes(eight))
    got = merged(tmp_path / "b")
    for name in eight:
        assert torch.equal(got[name], torch.from_numpy(tensors[name])), name


def test_uneven_dim0_split_follows_param_split_shape(tmp_path):
    whole = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    layout = {"transformer.vocab": {"dev": [2], "map": [0, -1], "split": [6, 4], "offset": [0, 6]}}
    for rank, rows in enumerate((slice(0, 6), slice(6, 10))):
        (tmp_path / f"rank_{rank}").mkdir()
        msckpt.save_ckpt(tmp_path / f"rank_{rank}" / "x.ckpt", [("transformer.vocab", torch.from_numpy(whole[rows]))])
    (tmp_path / "ckpt_strategy.ckpt").write_bytes(strategy_bytes(layout))
    assert torch.equal(merged(tmp_path)["transformer.vocab"], torch.from_numpy(whole))


def test_a_rank_with_several_checkpoints_gives_its_newest_step(tmp_path):
    for rank in range(2):
        folder = tmp_path / f"rank_{rank}"
        folder.mkdir()
        for step in (9, 10):
            msckpt.save_ckpt(folder / f"glm_rank_{rank}-1_{step}.ckpt", [("transformer.x", torch.tensor([step]))])
    assert [p.name for p in find_rank_files(tmp_path).values()] == ["glm_rank_0-1_10.ckpt", "glm_rank_1-1_10.ckpt"]
    (tmp_path / "rank_1" / "glm_rank_1-1_10.ckpt").unlink()
    with pytest.raises(CheckpointError, match="rank 1 has no checkpoint of epoch 1 step 10"):
        find_rank_files(tmp_path)


# ----------------------------------------------------------------------------------- errors: one line


def _error(folder, strategy=None) -> str:
    with pytest.raises(CheckpointError) as excinfo:
        merged(folder, strategy)
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_ranks_and_mismatched_strategies_are_one_line(tmp_path):
    tensors = small_tensors()
    layouts = {n: SMALL_LAYOUTS[n] for n in ("transformer.rows", "transformer.cols")}

    def fresh(name: str, strategy=layouts):
        folder = tmp_path / name
        write_set(folder, {n: tensors[n] for n in layouts}, layouts)
        (folder / "ckpt_strategy.ckpt").write_bytes(strategy_bytes(strategy))
        return folder

    folder = fresh("replica")  # every slice is on two ranks: a missing rank whose slices have a copy is no loss
    shutil.rmtree(folder / "rank_1")
    assert torch.equal(merged(folder)["transformer.cols"], torch.from_numpy(tensors["transformer.cols"]))
    shutil.rmtree(folder / "rank_3")
    assert "parameter transformer.cols: its slice on rank(s) 1, 3 is missing" in _error(folder)
    folder = fresh("gone")
    shutil.rmtree(folder / "rank_2")
    shutil.rmtree(folder / "rank_3")
    assert "parameter transformer.rows: its slice on rank(s) 2, 3 is missing" in _error(folder)

    folder = fresh("shape")
    msckpt.save_ckpt(next((folder / "rank_3").glob("*.ckpt")), [("transformer.rows", torch.zeros(4, 5)),
                                                                ("transformer.cols", torch.zeros(4, 4))])
    assert "parameter transformer.rows on rank 3 is [4, 5] Float32; the strategy (dev_matrix [2, 2], tensor_map " \
           "[1, -1]) gives it [4, 6] Float32 of a [8, 6] whole" in _error(folder)
    folder = fresh("dims", {**layouts, "transformer.rows": {"dev": [2, 2], "map": [1]}})
    assert "parameter transformer.rows on rank 0 has 2 dims, its tensor_map [1] has 1" in _error(folder)

    folder = fresh("extra")
    shutil.copytree(folder / "rank_3", folder / "rank_4")
    assert "rank_4/ is beyond the strategy's 4 devices (1 stage(s) of 4" in _error(folder)

    folder = fresh("lacking")
    msckpt.save_ckpt(next((folder / "rank_2").glob("*.ckpt")), [("transformer.rows", torch.zeros(4, 6))])
    assert "rank 2 has no parameter transformer.cols, which the strategy puts on every rank" in _error(folder)

    folder = fresh("nostrategy")
    (folder / "ckpt_strategy.ckpt").unlink()
    assert "needs its strategy file: pass it (glm6b convert --strategy FILE)" in _error(folder)
    assert "is a MindSpore checkpoint, not a strategy file" in _error(folder, next((folder / "rank_0").glob("*")))
    (folder / "broken.ckpt").write_bytes(strategy_bytes(layouts)[:-7])
    message = _error(folder, folder / "broken.ckpt")
    assert message.startswith(f"strategy file {folder / 'broken.ckpt'} is corrupt")
    two_maps = _message(1, _dims([2, 2])) + _message(2, _dims([1])) + _message(2, _dims([0]))
    (folder / "multi.ckpt").write_bytes(_message(3, _message(1, b"transformer.rows") + _message(2, two_maps)))
    assert "a tensor dim cut over several device dims" in _error(folder, folder / "multi.ckpt")


# ----------------------------------------------------------------------------------- the golden model


def mindformers_layout(name: str, shape: tuple[int, ...], opt: bool) -> dict:
    """A MindFormers-like layout for dp = 2, mp = 2 (dev_matrix [dp, mp]): column-parallel weights cut
    along their output dim, row-parallel ones along the input dim, the rest whole, every parameter
    also optimizer-sharded over dp where its dim 0 allows (`opt`)."""
    if name.endswith(("query_key_value.weight", "dense_h_to_4h.weight", "embedding_table", "lm_head.weight")):
        tensor_map = [0, -1]
    elif name.endswith(("query_key_value.bias", "dense_h_to_4h.bias")):
        tensor_map = [0]
    elif name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")):
        tensor_map = [-1, 0]
    else:
        tensor_map = [-1] * len(shape)
    layout = {"dev": [2, 2], "map": tensor_map}
    parts = 2 if tensor_map[0] == 0 else 1
    if opt and shape[0] % (parts * 2) == 0:
        layout.update(step=2, size=2)
    return layout


@pytest.fixture(scope="module")
def golden_mindformers() -> dict[str, np.ndarray]:
    """The golden weights under MindFormers' names, float16 (inv_freq buffers left out: not parameters)."""
    state = load_file(GOLDEN / "model.safetensors")
    return {msckpt.to_mindformers_name(n): t.numpy() for n, t in state.items() if "inv_freq" not in n}


def golden_folder(path):
    path.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(GOLDEN / name, path / name)
    return path


def _logits_of(model):
    case = golden_cases()["forward_single"]
    with torch.no_grad():
        return model(torch.tensor(case["input_ids"])).logits, golden_tensor(case["logits"])


def test_golden_model_through_a_sharded_set_gives_the_golden_logits(golden_mindformers, tmp_path):
    from glm6b.checkpoint.hf import load_model

    layouts = {n: mindformers_layout(n, t.shape, opt=True) for n, t in golden_mindformers.items()}
    folder = golden_folder(tmp_path / "checkpoint")
    adam = {f"adam_m.{n}": np.zeros(2, np.float32) for n in list(golden_mindformers)[:4]}
    write_set(folder, golden_mindformers, layouts, extra=adam | {"global_step": np.array([10], np.int32)})
    (folder / "ckpt_strategy.ckpt").write_bytes(strategy_bytes(layouts))
    got = merged(folder)
    assert set(got) == set(golden_mindformers)
    for name, whole in golden_mindformers.items():
        assert torch.equal(got[name], torch.from_numpy(whole)), name
    single = golden_folder(tmp_path / "single") / "glm_6b.ckpt"
    msckpt.save_ckpt(single, got.items())
    logits, golden = _logits_of(load_model(single, dtype=torch.float32))
    assert_close_rel(logits, golden, what="logits of the merged set")

    # a strategy of another layout fits the slices' shapes, but not the model's
    qkv = "transformer.layers.1.attention.query_key_value.weight"
    (folder / "ckpt_strategy.ckpt").write_bytes(strategy_bytes({**layouts, qkv: {"dev": [2, 2], "map": [-1, 0]}}))
    with ShardedCheckpoint(folder) as sharded, pytest.raises(CheckpointError) as excinfo:
        sharded.config()
    assert str(excinfo.value) == (f"{folder}: parameter {qkv} merges to [96, 256] by the strategy "
                                  f"{folder / 'ckpt_strategy.ckpt'} (rank 0 holds [96, 128]), but the model "
                                  f"(config.json) has [384, 128]: the strategy file is not this set's")


# ----------------------------------------------------------------------------------- against real MindSpore


def _transform(ms, folder, strategy, out) -> dict[str, torch.Tensor]:
    ms.transform_checkpoints(str(folder), str(out), "merged", str(strategy), None)
    (file,) = glob.glob(str(out / "rank_0" / "*.ckpt"))
    return dict(msckpt.iter_ckpt(file))


def test_strategy_files_parse_as_mindspore_writes_them(ms, tmp_path):
    layouts = {n: spec for n, spec in SMALL_LAYOUTS.items() if n not in EIGHT}  # one device count per file
    layouts["transformer.vocab"] = {"dev": [2, 2], "map": [1, -1], "split": [6, 4], "offset": [0, 6]}
    theirs = mindspore_strategy_bytes(ms, layouts, stage=0)
    assert theirs == strategy_bytes(layouts, stage=0)  # the hand-written test files are MindSpore's bytes
    (tmp_path / "s.ckpt").write_bytes(theirs)
    parsed = read_strategy(tmp_path / "s.ckpt")
    for name, spec in layouts.items():
        layout = parsed[name]
        assert (list(layout.dev_matrix), list(layout.tensor_map), list(layout.split_shape),
                list(layout.indices_offset), layout.opt_shard_step, layout.opt_shard_size, layout.stages) == \
               (spec["dev"], spec["map"], spec.get("split", []), spec.get("offset", []), spec.get("step", 0),
                spec.get("size", 0), (0,))


def test_merge_equals_mindsporess_transform_checkpoints(ms, tmp_path):
    tensors, layouts = small_tensors(), dict(SMALL_LAYOUTS)
    for group, names in (("four", [n for n in layouts if n not in EIGHT]), ("eight", list(EIGHT))):
        folder = tmp_path / group
        chosen = {n: layouts[n] for n in names}
        write_set(folder, {n: tensors[n] for n in names}, chosen, ms=ms)
        (folder / "ckpt_strategy.ckpt").write_bytes(mindspore_strategy_bytes(ms, chosen))
        theirs = _transform(ms, folder, folder / "ckpt_strategy.ckpt", tmp_path / f"{group}_out")
        ours = merged(folder)
        for name in names:
            assert torch.equal(ours[name], theirs[name]) and torch.equal(ours[name], torch.from_numpy(tensors[name]))


def test_uneven_merge_equals_merge_sliced_parameter(ms, tmp_path):
    from mindspore.train.serialization import build_searched_strategy

    whole = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    layout = {"transformer.vocab": {"dev": [2], "map": [0, -1], "split": [6, 4]}}
    (tmp_path / "s.ckpt").write_bytes(mindspore_strategy_bytes(ms, layout))
    pieces = [whole[:6], whole[6:]]
    for rank, piece in enumerate(pieces):
        (tmp_path / f"rank_{rank}").mkdir()
        ms.save_checkpoint([{"name": "transformer.vocab", "data": ms.Tensor(piece)}],
                           str(tmp_path / f"rank_{rank}" / "x.ckpt"))
    theirs = ms.merge_sliced_parameter([ms.Parameter(ms.Tensor(p), "transformer.vocab") for p in pieces],
                                       build_searched_strategy(str(tmp_path / "s.ckpt")))
    assert np.array_equal(merged(tmp_path, tmp_path / "s.ckpt")["transformer.vocab"].numpy(), theirs.asnumpy())


def test_golden_set_merges_to_mindsporess_tensors_and_the_golden_logits(ms, golden_mindformers, tmp_path):
    from glm6b.checkpoint.hf import load_model

    layouts = {n: mindformers_layout(n, t.shape, opt=True) for n, t in golden_mindformers.items()}
    folder = golden_folder(tmp_path / "checkpoint")
    adam = {f"adam_m.{n}": np.zeros(2, np.float32) for n in list(golden_mindformers)[:4]}
    write_set(folder, golden_mindformers, layouts, extra=adam, ms=ms)
    (folder / "ckpt_strategy.ckpt").write_bytes(mindspore_strategy_bytes(ms, layouts))
    theirs = _transform(ms, folder, folder / "ckpt_strategy.ckpt", tmp_path / "out")
    ours = merged(folder)
    assert set(ours) == set(golden_mindformers) and set(theirs) >= set(ours)
    worst = max((ours[n].float() - theirs[n].float()).abs().max().item() for n in ours)
    assert worst == 0.0 and all(ours[n].dtype == theirs[n].dtype == torch.float16 for n in ours)
    single = golden_folder(tmp_path / "single") / "glm_6b.ckpt"
    msckpt.save_ckpt(single, ours.items())
    logits, golden = _logits_of(load_model(single, dtype=torch.float32))
    assert_close_rel(logits, golden, what="logits of the merged set")


def test_pipeline_stages_merge_as_mindspore_merges_them(ms, golden_mindformers, tmp_path):
    """Two stages of two devices (mp = 2): layers 0-1 and the embeddings on stage 0, layer 2, the final
    LayerNorm, lm_head and (shared) the embeddings on stage 1; per-stage strategy files, and MindSpore's
    merge of them."""
    def stage_of(name):
        if ".layers.2." in name or "final_layernorm" in name or name.startswith("lm_head"):
            return [1]
        return [0, 1] if "word_embeddings" in name else [0]

    layouts = {n: {"dev": [2], "map": mindformers_layout(n, t.shape, opt=False)["map"]}  # map 0: the mp dim
               for n, t in golden_mindformers.items()}
    stages = {n: stage_of(n) for n in golden_mindformers}
    folder = golden_folder(tmp_path / "checkpoint")
    write_set(folder, golden_mindformers, layouts, stages=stages, stage_devices=2, ms=ms)
    per_stage = tmp_path / "strategy"
    per_stage.mkdir()
    for stage in (0, 1):
        chosen = {n: spec for n, spec in layouts.items() if stage in stages[n]}
        (per_stage / f"ckpt_strategy_rank_{2 * stage}.ckpt").write_bytes(mindspore_strategy_bytes(ms, chosen, stage))
    merged_file = tmp_path / "merged_strategy.ckpt"
    ms.merge_pipeline_strategys(str(per_stage), str(merged_file))
    theirs = _transform(ms, folder, merged_file, tmp_path / "out")
    from_folder = merged(folder)  # the strategy/ folder one level up is found (MindFormers' output layout)
    from_merged = merged(folder, merged_file)
    for name, whole in golden_mindformers.items():
        assert torch.equal(from_folder[name], theirs[name]) and torch.equal(from_merged[name], theirs[name]), name
        assert torch.equal(from_folder[name], torch.from_numpy(whole)), name


# ----------------------------------------------------------------------------------- loading and converting sets


@pytest.fixture(scope="module")
def golden_set(golden_mindformers, tmp_path_factory):
    """The golden weights as a dp 2 x mp 2 MindFormers set with optimizer sharding: output/checkpoint/rank_*/
    (with the tokenizer files) and output/strategy/ckpt_strategy.ckpt, as a MindFormers run leaves them."""
    output = tmp_path_factory.mktemp("output")
    layouts = {n: mindformers_layout(n, t.shape, opt=True) for n, t in golden_mindformers.items()}
    folder = golden_folder(output / "checkpoint")
    adam = {f"adam_v.{n}": np.zeros(3, np.float32) for n in list(golden_mindformers)[:3]}
    write_set(folder, golden_mindformers, layouts, extra=adam)
    (output / "strategy").mkdir()
    (output / "strategy" / "ckpt_strategy.ckpt").write_bytes(strategy_bytes(layouts))
    return folder


def test_convert_merges_a_set_into_an_hf_folder(golden_set, tmp_path, capsys):
    from glm6b.checkpoint.hf import load_model
    from glm6b.cli import main

    strategy = golden_set.parent / "strategy" / "ckpt_strategy.ckpt"
    assert main(["convert", "--input", str(golden_set), "--strategy", str(strategy), "--output",
                 str(tmp_path / "hf")]) == 0, capsys.readouterr().err
    state = load_file(tmp_path / "hf" / "model.safetensors")
    golden = load_file(GOLDEN / "model.safetensors")
    assert all(torch.equal(state[n], golden[n]) for n in state) and "lm_head.weight" not in state  # tied
    logits, expected = _logits_of(load_model(tmp_path / "hf", dtype=torch.float32))
    assert_close_rel(logits, expected, what="logits of the converted set")


def test_a_set_loads_wherever_a_ckpt_loads(golden_set, tmp_path, capsys):
    import glm6b
    from glm6b.checkpoint.names import resolve_model_path
    from glm6b.cli import main

    assert resolve_model_path(golden_set) == golden_set
    logits, expected = _logits_of(glm6b.load_model(golden_set, dtype=torch.float32))  # strategy/ found one level up
    assert_close_rel(logits, expected, what="logits of the set")
    for model in (golden_set, GOLDEN):
        assert main(["generate", "--model", str(model), "--prompt", "你好", "--max-new-tokens", "3", "--greedy",
                     "--dtype", "float32"]) == 0
    from_set, from_golden = capsys.readouterr().out.strip().splitlines()[-2:]
    assert from_set == from_golden
    data = tmp_path / "train.json"
    data.write_text('{"content": "类型#裤*颜色#黑色", "summary": "黑色裤子百搭。"}\n', encoding="utf-8")
    assert main(["run", "--config", "finetune", "--mode", "finetune", "--load-checkpoint", str(golden_set),
                 "--train-data", str(data), "--output-dir", str(tmp_path / "full"), "--max-steps", "1",
                 "--set", "model.dtype=float32",
                 "--set", "trainer.tensorboard=false", "--set", "trainer.disable_tqdm=true",
                 "--set", "trainer.save_steps=null", "--set", "trainer.gradient_accumulation_steps=1",
                 "--set", "trainer.bf16=false", "--set", "trainer.gradient_checkpointing=false"]) == 0
    assert (tmp_path / "full" / "final" / "config.json").is_file()


def test_a_missing_rank_is_one_line_from_the_command(golden_set, tmp_path, capsys):
    from glm6b.cli import main

    broken = tmp_path / "checkpoint"
    shutil.copytree(golden_set, broken)
    shutil.copytree(golden_set.parent / "strategy", tmp_path / "strategy")
    shutil.rmtree(broken / "rank_1")
    shutil.rmtree(broken / "rank_3")
    assert main(["convert", "--input", str(broken), "--output", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("glm6b convert: error: ")
    assert err.endswith("parameter lm_head.weight: its slice on rank(s) 1 is missing (no rank_1/ checkpoint)")
    assert not (tmp_path / "hf").exists()


def test_a_lora_set_converts_into_a_base_and_an_adapter(golden_mindformers, tmp_path, capsys):
    """MindPet LoRA tensors in a set (cut along their out dim for B, whole for A) become the PEFT adapter."""
    from glm6b.cli import main

    g = np.random.default_rng(0)
    lora = {}
    for layer in range(3):
        prefix = f"transformer.layers.{layer}.attention.query_key_value"
        lora[f"{prefix}.mindpet_delta_lora_a"] = g.standard_normal((4, 128)).astype(np.float16)
        lora[f"{prefix}.mindpet_delta_lora_b"] = g.standard_normal((384, 4)).astype(np.float16)
    tensors = golden_mindformers | lora
    layouts = {n: mindformers_layout(n, t.shape, opt=False) for n, t in golden_mindformers.items()}
    layouts |= {n: {"dev": [2, 2], "map": [0, -1]} for n in lora if n.endswith("_b")}
    folder = golden_folder(tmp_path / "checkpoint")
    write_set(folder, tensors, layouts)
    (folder / "ckpt_strategy.ckpt").write_bytes(strategy_bytes(layouts))
    assert main(["convert", "--input", str(folder), "--output", str(tmp_path / "base"), "--adapter-output",
                 str(tmp_path / "adapter"), "--lora-alpha", "32"]) == 0, capsys.readouterr().err
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for name, value in lora.items():
        peft_name = msckpt.mindpet_to_peft_name(name)
        assert torch.equal(adapter[peft_name], torch.from_numpy(value)), name
