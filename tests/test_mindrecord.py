"""MindRecord files without MindSpore: glm6b's reader and writer against each other and against real
MindSpore 2.10 (FileWriter / FileReader / MindDataset), MindFormers' ADGEN layout in both modes, and
one-line errors for corrupt, truncated and unsupported files.

Tests that need MindSpore take the `ms` fixture and skip, saying so, where it is not installed.
"""

from __future__ import annotations

import json
import pickle
import sqlite3
import struct

import numpy as np
import pytest

from glm6b.data import mindrecord as mr
from glm6b.data.adgen_mindrecord import (AdgenMindRecord, SpecialIds, eval_columns, train_columns, train_schema,
                                         write_adgen_mindrecord)
from glm6b.config import DataConfig
from glm6b.data.adgen import encode_example, iter_examples

from helpers import golden_cases, write_adgen_sample

SMALL = {"header_size": mr.MIN_HEADER_SIZE, "page_size": mr.MIN_PAGE_SIZE}  # many pages from few rows
PROBE_SCHEMA = {"ids": {"type": "int32", "shape": [-1]}, "grid": {"type": "int64", "shape": [2, 3]},
                "text": {"type": "string"}, "count": {"type": "int32"}, "big": {"type": "int64"},
                "blob": {"type": "bytes"}}


@pytest.fixture(scope="module")
def ms():
    try:
        import mindspore
    except ImportError:
        pytest.skip("MindSpore is not installed: no mindspore==2.10.0 wheel for this platform/Python")
    return mindspore


def probe_rows(n: int = 40) -> list[dict]:
    """Rows with every supported type, values at every compressed width, long strings (raw pages fill)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        width = [1 << 6, 1 << 14, 1 << 30][i % 3]
        rows.append({"ids": rng.integers(-width, width, size=200 + 37 * i).astype(np.int32),
                     "grid": (np.arange(6).reshape(2, 3) - 3) * (10 ** (i % 12)),
                     "text": f"行 {i} " + "字" * (i * 40), "count": -i * 1000, "big": (1 << 40) + i,
                     "blob": (b"\x00" + bytes(range(1, i + 1))) * 2 + b"."})  # MindDataset drops trailing NULs
    return rows


def assert_same_rows(ours: list[dict], theirs: list[dict]) -> None:
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert set(a) == set(b), i
        for name in a:
            if isinstance(a[name], np.ndarray):
                assert a[name].dtype == np.asarray(b[name]).dtype and np.array_equal(a[name], b[name]), (i, name)
            else:
                assert a[name] == b[name], (i, name)


def write_glm6b(path, rows, schema=PROBE_SCHEMA, **options):
    with mr.MindRecordWriter(path, schema, "probe", **options) as writer:
        for row in rows:
            writer.write(row)
    return path


def write_mindspore(ms, path, rows, schema=PROBE_SCHEMA, shards=1, desc="probe", small=True):
    from mindspore.mindrecord import FileWriter

    writer = FileWriter(str(path), shards, overwrite=True)
    if small:
        writer.set_header_size(mr.MIN_HEADER_SIZE)
        writer.set_page_size(mr.MIN_PAGE_SIZE)
    writer.add_schema(schema, desc)
    for row in rows:  # one row per call: FileWriter splits a call's rows over the shards
        writer.write_raw_data([row])
    writer.commit()
    return path


def index_rows(db) -> list[tuple]:
    with sqlite3.connect(db) as connection:
        return list(connection.execute("SELECT * FROM INDEXES ORDER BY ROW_ID"))


def used_bytes(path) -> tuple[dict, list[bytes]]:
    """A shard's header and each page's used bytes (FileWriter leaves junk in the padding after them)."""
    data = path.read_bytes()
    header = json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])
    start = lambda p: header["header_size"] + p["page_id"] * header["page_size"]
    return header, [data[start(p):start(p) + p["page_size"]] for p in header["page"] or []]


# ----------------------------------------------------------------------------------- the format itself


@pytest.mark.parametrize("values", [[], [0], [-128, 127, -129, 128, -32768, 32767, -32769, 32768],
                                    [-(1 << 31), (1 << 31) - 1, -(1 << 63), (1 << 63) - 1, 5],
                                    list(range(-300, 300, 7))], ids=["empty", "zero", "16", "64", "mixed"])
def test_int_arrays_round_trip_through_the_compressed_form(values):
    array = np.array(values, dtype=np.int64)
    encoded = mr.encode_ints(array)
    assert int.from_bytes(encoded[:4], "big") == len(values)
    assert np.array_equal(mr.decode_ints(memoryview(encoded), np.dtype("<i8")), array)
    if not len(values) or max(abs(v) for v in values) < 1 << 31:
        assert np.array_equal(mr.decode_ints(memoryview(encoded), np.dtype("<i4")), array)


def test_glm6b_files_read_back_row_for_row_in_shard_order(tmp_path):
    rows = probe_rows()
    single = write_glm6b(tmp_path / "one.mindrecord", rows, **SMALL)
    header, pages = used_bytes(single)
    assert len(pages) > 5 and {p["page_type"] for p in header["page"]} == {"BLOB_DATA", "RAW_DATA"}
    with mr.MindRecordReader(single) as reader:
        assert_same_rows(list(reader), rows)
        assert reader[-1]["text"] == rows[-1]["text"] and reader.desc == "probe"
        again = pickle.loads(pickle.dumps(reader))  # DataLoader workers get a reader that reopens the files
        assert_same_rows([again[3]], [rows[3]])
        again.close()
    write_glm6b(tmp_path / "set.mindrecord", rows, num_shards=3, **SMALL)
    assert mr.is_mindrecord(tmp_path / "set.mindrecord") and mr.is_mindrecord(tmp_path / "set.mindrecord1")
    by_shard = [rows[i] for shard in range(3) for i in range(shard, len(rows), 3)]
    for name in ("set.mindrecord", "set.mindrecord0", "set.mindrecord2"):  # any shard, or the base name
        with mr.MindRecordReader(tmp_path / name, columns=["text", "ids"]) as reader:
            assert reader.files == [tmp_path / f"set.mindrecord{i}" for i in range(3)]
            assert_same_rows(list(reader), [{"text": r["text"], "ids": r["ids"]} for r in by_shard])


def test_writer_refuses_rows_that_do_not_fit_the_schema(tmp_path):
    good = probe_rows(1)[0]
    cases = [({k: v for k, v in good.items() if k != "text"}, "missing ['text']"),
             ({**good, "ids": np.array([1 << 40])}, "outside the int32 range"),
             ({**good, "grid": np.arange(5)}, "5 values do not fit its shape [2, 3]"),
             ({**good, "count": "7"}, "expected an int32"),
             ({**good, "blob": "text"}, "expected bytes")]
    for row, message in cases:
        with pytest.raises(mr.MindRecordError, match=message.replace("[", r"\[").replace("]", r"\]")):
            with mr.MindRecordWriter(tmp_path / "x.mindrecord", PROBE_SCHEMA, **SMALL) as writer:
                writer.write(row)
        assert not list(tmp_path.iterdir())  # nothing left behind, not even temporaries
    with pytest.raises(mr.MindRecordError, match="float32"):
        mr.MindRecordWriter(tmp_path / "x.mindrecord", {"f": {"type": "float32", "shape": [-1]}})


# ----------------------------------------------------------------------------------- errors: one line


def _error(path, **kwargs) -> str:
    with pytest.raises(mr.MindRecordError) as excinfo:
        with mr.MindRecordReader(path, **kwargs) as reader:
            list(reader)
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_truncated_corrupt_and_foreign_files_are_one_line_naming_the_file(tmp_path):
    rows = probe_rows(12)
    path = write_glm6b(tmp_path / "good.mindrecord", rows, **SMALL)
    data = path.read_bytes()
    header, _ = used_bytes(path)

    cut = tmp_path / "cut.mindrecord"
    cut.write_bytes(data[:len(data) - 100])
    assert f"{cut} is truncated: page" in _error(cut)

    first_blob = header["header_size"]  # page 0 is a blob page; its first row's length comes first
    bad = bytearray(data)
    bad[first_blob:first_blob + 8] = struct.pack("<Q", 1 << 40)
    (tmp_path / "len.mindrecord").write_bytes(bytes(bad))
    assert "is corrupt: a row of blob page 0 claims" in _error(tmp_path / "len.mindrecord")

    bad = bytearray(data)  # the first column's length of row 0, inside its blob
    bad[first_blob + 8:first_blob + 16] = struct.pack(">Q", 1000)
    (tmp_path / "col.mindrecord").write_bytes(bytes(bad))
    assert "is corrupt: row 0" in _error(tmp_path / "col.mindrecord")

    bad = bytearray(data)
    bad[40:50] = b"@@@@@@@@@@"
    (tmp_path / "json.mindrecord").write_bytes(bytes(bad))
    assert "header is not valid JSON" in _error(tmp_path / "json.mindrecord")

    (tmp_path / "notes.txt").write_text('{"content": "x", "summary": "y"}\n')
    assert not mr.is_mindrecord(tmp_path / "notes.txt")
    assert "is not a MindRecord file" in _error(tmp_path / "notes.txt")
    assert f"MindRecord file {tmp_path / 'nothing'} not found" in _error(tmp_path / "nothing")

    write_glm6b(tmp_path / "set.mindrecord", rows, num_shards=2, **SMALL)
    (tmp_path / "set.mindrecord1").unlink()
    assert f"missing: {tmp_path / 'set.mindrecord1'}" in _error(tmp_path / "set.mindrecord0")

    floats = tmp_path / "floats.mindrecord"
    header["schema"][0]["schema"]["count"]["type"] = "float32"
    text = json.dumps(header, separators=(",", ":")).encode()
    floats.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + len(text):])
    assert _error(floats) == (f"{floats}: column 'count' has type float32, which glm6b does not read "
                              f"(it reads int32, int64, string, bytes)")
    assert_same_rows(list(mr.MindRecordReader(floats, columns=["ids"])), [{"ids": r["ids"]} for r in rows])
    assert "no column 'nope'" in _error(path, columns=["nope"])


# ----------------------------------------------------------------------------------- against real MindSpore


def test_files_mindspore_writes_are_read_row_for_row(ms, tmp_path):
    from mindspore.mindrecord import FileReader

    rows = probe_rows()
    path = write_mindspore(ms, tmp_path / "ms.mindrecord", rows, shards=3)
    theirs = list(FileReader(str(tmp_path / "ms.mindrecord0")).get_next())
    with mr.MindRecordReader(tmp_path / "ms.mindrecord1") as reader:
        assert len(reader) == len(rows)
        assert_same_rows(list(reader), theirs)
        for shard_file, shard in zip(reader.files, reader._shards):  # where rows are = MindSpore's own index
            header = shard.header
            located = [(i, *(int(x) for x in shard.spans.blob[i]), *(int(x) for x in shard.spans.raw[i]))
                       for i in range(len(shard.spans.blob))]
            expected = []
            for row, raw_page, raw_start, raw_end, _, blob_page, blob_start, blob_end, *_ in index_rows(
                    f"{shard_file}.db"):
                page = lambda p: header["header_size"] + p * header["page_size"]
                expected.append((row, page(blob_page) + blob_start + 8, page(blob_page) + blob_end,
                                 page(raw_page) + raw_start + 8, page(raw_page) + raw_end))
            assert located == expected
    assert path.name == "ms.mindrecord"


def test_glm6b_writes_the_bytes_and_index_mindspore_writes(ms, tmp_path):
    from mindspore.mindrecord import FileReader
    import mindspore.dataset as ds

    rows = probe_rows()
    ours = write_glm6b(tmp_path / "ours.mindrecord", rows, **SMALL)
    theirs = write_mindspore(ms, tmp_path / "theirs.mindrecord", rows)
    (our_header, our_pages), (their_header, their_pages) = used_bytes(ours), used_bytes(theirs)
    their_header["shard_addresses"] = our_header["shard_addresses"]
    assert our_header == their_header and our_pages == their_pages
    assert ours.stat().st_size == theirs.stat().st_size
    assert index_rows(f"{ours}.db") == index_rows(f"{theirs}.db")

    write_glm6b(tmp_path / "set.mindrecord", rows, num_shards=3, **SMALL)
    by_shard = [rows[i] for shard in range(3) for i in range(shard, len(rows), 3)]
    assert_same_rows(list(FileReader(str(tmp_path / "set.mindrecord2")).get_next()), by_shard)
    dataset = ds.MindDataset(str(tmp_path / "set.mindrecord0"), shuffle=False)
    read = [{k: (v.item() if k in ("text", "count", "big") else v) for k, v in row.items()}
            for row in dataset.create_dict_iterator(output_numpy=True, num_epochs=1)]
    for row in read:
        row["blob"] = row["blob"].item()  # MindDataset gives bytes as a 1-element array
    assert_same_rows(read, by_shard)


# ----------------------------------------------------------------------------------- MindFormers' ADGEN files


def mindformers_columns(tok, prompt: str, answer: str, mode: str, source: int, target: int) -> dict:
    """One row as adgen_dataset.py builds it, written out from spec formats.md §7 (independently of glm6b's code)."""
    pad, sop, gmask = tok.pad_token_id, tok.bos_token_id, tok.gmask_token_id
    if mode == "eval":
        ids = tok.encode(prompt[:source - 2], add_special_tokens=True)
        return {"input_ids": np.array(ids + [pad] * (source - len(ids)), np.int32),
                "labels": np.array(tok.encode(answer[:target - 2], add_special_tokens=True), np.int32)}
    length = source + target
    a = tok.encode(prompt, add_special_tokens=False)[:source - 1]
    b = tok.encode(answer, add_special_tokens=False)[:target - 2]
    ids = tok.build_inputs_with_special_tokens(a, b)
    c = ids.index(sop)
    label = [-100] * c + ids[c + 1:]
    ids = ids + [pad] * (length - len(ids))
    label = [-100 if t == pad else t for t in label + [pad] * (length - len(label))]
    first = np.arange(length)
    first[c:] = ids.index(gmask)
    second = np.concatenate([np.zeros(c, np.int64), np.arange(1, length - c + 1)])
    attend = np.tril(np.ones((length, length)))
    attend[:, :c] = 1
    return {"input_ids": np.array(ids, np.int32), "labels": np.array(label, np.int32),
            "position_ids": np.stack([first, second]).astype(np.int32),
            "attention_mask": np.logical_not(attend)[None].astype(np.int32)}


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """The ADGEN sample rows (the golden train_adgen examples and two more) as rendered prompt/answer pairs."""
    path = write_adgen_sample(tmp_path_factory.mktemp("adgen") / "train.json")
    return path, [(ex.prompt, ex.answer) for ex in iter_examples(path, DataConfig())]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_adgen_columns_are_adgen_datasets(tok, examples, mode):
    _, pairs = examples
    build = train_columns if mode == "train" else eval_columns
    for prompt, answer in pairs:
        ours = build(tok, prompt, answer, 16, 12)
        theirs = mindformers_columns(tok, prompt, answer, mode, 16, 12)
        assert_same_rows([ours], [theirs])


def test_train_rows_read_back_as_glm6b_rows_of_the_same_examples(tok, examples, tmp_path):
    _, pairs = examples
    config = DataConfig(max_source_length=16, max_target_length=12)
    path = tmp_path / "train.mindrecord"
    assert write_adgen_mindrecord(path, pairs, tok, "train", 16, 12, **SMALL) == len(pairs)
    rows = AdgenMindRecord(path, SpecialIds.of(tok))
    assert rows.mode == "train" and rows.seq_length == 28 and len(rows) == len(pairs)
    for i, (prompt, answer) in enumerate(pairs):
        input_ids, labels = rows.row(i)
        assert (input_ids.tolist(), labels.tolist()) == encode_example(tok, prompt, answer, config, "train")
        prompt_ids, answer_ids = rows.texts_ids(i)
        assert tok.decode(prompt_ids) == tok.decode(tok.encode(prompt, add_special_tokens=False)[:15])
        assert answer_ids.tolist() == tok.encode(answer, add_special_tokens=False)[:10]


def test_golden_adgen_loss_from_a_mindformers_file_is_the_reference_loss(tok, model, tmp_path):
    """The golden rows (THUDM's recipe) and the same examples through a MindFormers file give one loss."""
    import torch
    from glm6b.train.loss import causal_lm_loss

    case = golden_cases()["train_adgen"]
    source, target = case["max_source_length"], case["max_target_length"]
    path = tmp_path / "golden.mindrecord"
    write_adgen_mindrecord(path, [(ex["prompt"], ex["answer"]) for ex in case["examples"]], tok, "train", source,
                           target, **SMALL)
    rows = AdgenMindRecord(path, SpecialIds.of(tok))
    width = source + target
    input_ids = torch.full((len(rows), width), tok.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    for i in range(len(rows)):
        ids, row_labels = rows.row(i)
        input_ids[i, :len(ids)], labels[i, :len(ids)] = torch.from_numpy(ids), torch.from_numpy(row_labels)
    assert input_ids.tolist() == case["input_ids"] and labels.tolist() == case["labels"]
    with torch.no_grad():
        loss = causal_lm_loss(model(input_ids=input_ids).logits, labels).item()
    assert abs(loss - case["loss"]) <= 1e-5 * abs(case["loss"])


def test_eval_rows_read_back_with_their_texts(tok, examples, tmp_path):
    _, pairs = examples
    path = tmp_path / "eval.mindrecord"
    write_adgen_mindrecord(path, pairs, tok, "eval", 16, 12, **SMALL)
    rows = AdgenMindRecord(path, SpecialIds.of(tok))
    assert rows.mode == "eval"
    for i, (prompt, answer) in enumerate(pairs):
        input_ids, labels = rows.row(i)
        assert input_ids.tolist() == tok.encode(prompt[:14]) and labels.tolist() == tok.encode(answer[:10])
        prompt_ids, answer_ids = rows.texts_ids(i)
        assert tok.decode(prompt_ids, clean_up_tokenization_spaces=False) == tok.decode(tok.encode(prompt[:14])[:-2])
        assert answer_ids.tolist() == tok.encode(answer[:10], add_special_tokens=False)


def test_rows_that_are_not_adgen_datasets_are_one_line(tok, examples, tmp_path):
    _, pairs = examples
    good = train_columns(tok, *pairs[0], 16, 12)

    def message(row, schema=train_schema(28)):
        path = tmp_path / "bad.mindrecord"
        with mr.MindRecordWriter(path, schema, **SMALL) as writer:
            writer.write(row)
        with pytest.raises(mr.MindRecordError) as excinfo:
            AdgenMindRecord(path, SpecialIds.of(tok)).row(0)
        assert "\n" not in str(excinfo.value)
        return str(excinfo.value)

    unshifted = good["input_ids"].copy()
    unshifted[:5] = -100
    assert "row 0, column 'labels': label[5] = " in message({**good, "labels": unshifted})
    mask = good["attention_mask"].copy()
    mask[0, 0, -1] = 0  # the first row may not see the last column
    assert "row 0, column 'attention_mask': not the prefix-LM mask" in message({**good, "attention_mask": mask})
    positions = good["position_ids"].copy()
    positions[1, -1] = 0
    assert "row 0, column 'position_ids'" in message({**good, "position_ids": positions})
    no_sop = np.where(good["input_ids"] == tok.bos_token_id, 7, good["input_ids"])
    assert "needs a [gMASK] and a <sop>" in message({**good, "input_ids": no_sop})
    with mr.MindRecordWriter(tmp_path / "other.mindrecord", {"tokens": {"type": "int32", "shape": [-1]}}) as writer:
        writer.write({"tokens": np.arange(3)})
    with pytest.raises(mr.MindRecordError, match="expected an int32 array column 'input_ids'"):
        AdgenMindRecord(tmp_path / "other.mindrecord", SpecialIds.of(tok))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_adgen_files_mindspore_writes_read_as_glm6bs_and_back(ms, tok, examples, tmp_path, mode):
    """A file written by FileWriter with MindFormers' schema (default header and page sizes) gives the rows
    glm6b's own file gives, and MindDataset reads glm6b's file with the values of FileWriter's."""
    import mindspore.dataset as ds

    _, pairs = examples
    schema = train_schema(28) if mode == "train" else {"input_ids": {"type": "int32", "shape": [-1]},
                                                       "labels": {"type": "int32", "shape": [-1]}}
    rows = [mindformers_columns(tok, prompt, answer, mode, 16, 12) for prompt, answer in pairs]
    theirs = write_mindspore(ms, tmp_path / f"{mode}_0604_28.mindrecord", rows, schema, desc="lm-schema",
                             small=False)
    ours = tmp_path / f"ours_{mode}.mindrecord"
    write_adgen_mindrecord(ours, pairs, tok, mode, 16, 12)
    (our_header, our_pages), (their_header, their_pages) = used_bytes(ours), used_bytes(theirs)
    their_header["shard_addresses"] = our_header["shard_addresses"]
    assert our_header == their_header and our_pages == their_pages
    special = SpecialIds.of(tok)
    a, b = AdgenMindRecord(theirs, special), AdgenMindRecord(ours, special)
    for i in range(len(pairs)):
        assert all(np.array_equal(x, y) for x, y in zip(a.row(i), b.row(i)))
    read = lambda path: list(ds.MindDataset(str(path), shuffle=False).create_dict_iterator(output_numpy=True,
                                                                                            num_epochs=1))
    assert_same_rows(read(ours), rows)


# ----------------------------------------------------------------------------------- training on MindRecord files

TRAIN_CONFIG = DataConfig(max_source_length=24, max_target_length=16)


@pytest.fixture(scope="module")
def train_jsonl(tmp_path_factory):
    """16 lines of the bundled ADGEN sample."""
    from glm6b.sample_data import DEFAULT_ASSETS

    lines = (DEFAULT_ASSETS / "adgen" / "train.json").read_text(encoding="utf-8").splitlines()[:16]
    path = tmp_path_factory.mktemp("train") / "train.json"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def train_losses(output_dir, data, tok) -> list[float]:
    import torch
    from glm6b.checkpoint.hf import load_model
    from glm6b.config import TrainingConfig
    from glm6b.train.trainer import Trainer

    from helpers import GOLDEN

    trainer = Trainer(model=load_model(GOLDEN, dtype=torch.float32), tokenizer=tok, data_config=TRAIN_CONFIG,
                      train_dataset=str(data),
                      args=TrainingConfig(output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=4,
                                             save_steps=None, tensorboard=False, disable_tqdm=True))
    return trainer.train().losses


@pytest.fixture(scope="module")
def jsonl_losses(train_jsonl, tok, tmp_path_factory):
    return train_losses(tmp_path_factory.mktemp("jsonl_run"), train_jsonl, tok)


@pytest.mark.parametrize("writer", ["glm6b", "mindspore"])
def test_training_on_a_mindrecord_file_has_the_losses_of_the_jsonl_run(tok, train_jsonl, jsonl_losses, tmp_path,
                                                                       writer, request):
    pairs = [(ex.prompt, ex.answer) for ex in iter_examples(train_jsonl, TRAIN_CONFIG)]
    path = tmp_path / "train.mindrecord"
    source, target = TRAIN_CONFIG.max_source_length, TRAIN_CONFIG.max_target_length
    if writer == "glm6b":
        write_adgen_mindrecord(path, pairs, tok, "train", source, target, **SMALL)
    else:
        rows = [mindformers_columns(tok, prompt, answer, "train", source, target) for prompt, answer in pairs]
        write_mindspore(request.getfixturevalue("ms"), path, rows, train_schema(source + target), desc="lm-schema")
    losses = train_losses(tmp_path / "run", path, tok)
    assert len(losses) == 3 and losses == jsonl_losses


def test_eval_mode_files_are_refused_for_training_and_recipes_take_mindformers_names(tok, examples, tmp_path):
    from glm6b.config import DataError
    from glm6b.data.preprocess import load_dataset
    from glm6b.train.recipe import load_recipe

    path = tmp_path / "eval.mindrecord"
    write_adgen_mindrecord(path, examples[1], tok, "eval", 16, 12, **SMALL)
    with pytest.raises(DataError, match="holds MindFormers eval-mode rows but 'train' rows are needed here"):
        load_dataset(path, tok, DataConfig(), "train")
    assert load_dataset(path, tok, DataConfig(), "eval")[0]["input_ids"].tolist() == tok.encode(examples[1][0][0][:14])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: lora\ndata:\n  train_dataset_dir: train_0604_128.mindrecord\n"
                      "  eval_dataset_dir: eval_0604_256.mindrecord\n", encoding="utf-8")
    data = load_recipe(recipe).data
    assert (data.train_data, data.eval_data) == ("train_0604_128.mindrecord", "eval_0604_256.mindrecord")


# ----------------------------------------------------------------------------------- evaluating MindRecord files


def test_eval_of_a_mindrecord_file_scores_its_prompts_and_answers(tok, examples, tmp_path, capsys):
    """`glm6b eval` on an eval-mode file generates from the stored prompts and scores against the stored
    answers: the same predictions and scores as a jsonl file of those (character-cut) texts."""
    from glm6b.cli import main
    from helpers import GOLDEN

    _, pairs = examples
    path = tmp_path / "eval.mindrecord"
    write_adgen_mindrecord(path, pairs, tok, "eval", 16, 12, **SMALL)
    jsonl = tmp_path / "cut.json"
    jsonl.write_text("".join(json.dumps({"content": p[:14], "summary": a[:10]}, ensure_ascii=False) + "\n"
                             for p, a in pairs), encoding="utf-8")
    results = {}
    for name, data in (("mindrecord", path), ("jsonl", jsonl)):
        out = tmp_path / name
        assert main(["eval", "--model", str(GOLDEN), "--data", str(data), "--output-dir", str(out),
                     "--max-source-length", "16", "--max-target-length", "12", "--max-new-tokens", "4",
                     "--batch-size", "2", "--dtype", "float32"]) == 0, capsys.readouterr().err
        metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
        records = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
        results[name] = ({k: metrics[k] for k in ("bleu-4", "rouge-1", "rouge-2", "rouge-l", "count")}, records)
    assert results["mindrecord"] == results["jsonl"] and results["jsonl"][0]["count"] == len(pairs)


def test_run_predicts_and_evaluates_mindrecord_files(tok, examples, tmp_path, capsys):
    from glm6b.cli import main
    from helpers import GOLDEN

    _, pairs = examples
    path = tmp_path / "train.mindrecord"  # a train-mode file gives its prompts and answers too
    write_adgen_mindrecord(path, pairs, tok, "train", 16, 12, **SMALL)
    shared = ["--config", "infer", "--load-checkpoint", str(GOLDEN), "--eval-data", str(path), "--set",
              "generation.max_new_tokens=3", "--set", "data.max_source_length=16", "--set", "model.dtype=float32",
              "--set", "trainer.disable_tqdm=true"]
    assert main(["run", "--mode", "eval", "--output-dir", str(tmp_path / "eval"), *shared]) == 0
    records = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    prompts = [tok.decode(tok.encode(p, add_special_tokens=False)[:15], clean_up_tokenization_spaces=False)
               for p, _ in pairs]
    assert [r["prompt"] for r in records] == prompts
    eval_file = tmp_path / "eval.mindrecord"
    write_adgen_mindrecord(eval_file, pairs, tok, "eval", 16, 12, **SMALL)
    shared[shared.index(str(path))] = str(eval_file)
    assert main(["run", "--mode", "predict", "--output-dir", str(tmp_path / "predict"), *shared]) == 0
    records = [json.loads(line) for line in (tmp_path / "predict" / "predictions.jsonl").read_text().splitlines()]
    assert [r["labels"] for r in records] == [a[:10] for _, a in pairs] and len(records) == len(pairs)
    capsys.readouterr()


# ----------------------------------------------------------------------------------- the card's commands


@pytest.fixture(scope="module")
def card_files(train_jsonl, tmp_path_factory):
    """`glm6b preprocess --format mindrecord` in both modes, as the card runs adgen_dataset.py."""
    from glm6b.cli import main
    from helpers import GOLDEN

    folder = tmp_path_factory.mktemp("card")
    files = {}
    for mode, name in (("train", "train_0604_40.mindrecord"), ("eval", "eval_0604_40.mindrecord")):
        files[mode] = folder / name
        assert main(["preprocess", "--format", "mindrecord", "--tokenizer", str(GOLDEN), "--input_file",
                     str(train_jsonl), "--output_file", str(files[mode]), "--max_source_length", "24",
                     "--max_target_length", "16", "--mode", mode]) == 0
        assert (folder / f"{name}.db").is_file()
    return files


def test_preprocess_writes_adgen_datasets_files(tok, train_jsonl, card_files):
    pairs = [(ex.prompt, ex.answer) for ex in iter_examples(train_jsonl, TRAIN_CONFIG)]
    for mode, path in card_files.items():
        with mr.MindRecordReader(path) as reader:
            assert reader.desc == "lm-schema" and len(reader) == len(pairs)
            assert_same_rows(list(reader), [mindformers_columns(tok, p, a, mode, 24, 16) for p, a in pairs])


def test_minddataset_reads_preprocess_files_as_filewriters(ms, tok, train_jsonl, card_files):
    import mindspore.dataset as ds

    pairs = [(ex.prompt, ex.answer) for ex in iter_examples(train_jsonl, TRAIN_CONFIG)]
    for mode, path in card_files.items():
        read = list(ds.MindDataset(str(path), shuffle=False).create_dict_iterator(output_numpy=True, num_epochs=1))
        assert_same_rows(read, [mindformers_columns(tok, p, a, mode, 24, 16) for p, a in pairs])


def test_run_and_eval_take_the_card_files(card_files, train_jsonl, tmp_path, capsys):
    """`glm6b run` trains on the train file with the losses of the jsonl run (the card's lengths), evaluates
    the loss on it, and `glm6b eval` scores the eval file."""
    from glm6b.cli import main
    from helpers import GOLDEN

    shared = ["--config", "finetune", "--mode", "finetune", "--load-checkpoint", str(GOLDEN), "--max-steps", "3",
              "--batch-size", "4", "--set", "model.dtype=float32", "--set", "trainer.tensorboard=false",
              "--set", "trainer.disable_tqdm=true", "--set", "trainer.save_steps=null", "--set", "trainer.eval_steps=3",
              "--set", "trainer.gradient_accumulation_steps=1", "--set", "trainer.bf16=false",
              "--set", "trainer.gradient_checkpointing=false", "--set", "trainer.eval_generation_samples=2",
              "--set", "data.max_source_length=24", "--set", "data.max_target_length=16"]
    summaries = {}
    for name, data in (("jsonl", train_jsonl), ("mindrecord", card_files["train"])):
        capsys.readouterr()
        assert main(["run", "--train_dataset_dir", str(data), "--eval-data", str(data), "--output-dir",
                     str(tmp_path / name), *shared]) == 0, capsys.readouterr().err
        summaries[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        evals = [json.loads(line) for line in (tmp_path / name / "eval_log.jsonl").read_text().splitlines()]
        summaries[name].update({k: evals[-1][k] for k in ("eval_loss", "eval_tokens", "bleu-4", "rouge-l")})
    assert summaries["mindrecord"]["final_loss"] == summaries["jsonl"]["final_loss"]
    assert {k: summaries["mindrecord"][k] for k in ("eval_loss", "eval_tokens", "bleu-4", "rouge-l")} == \
        {k: summaries["jsonl"][k] for k in ("eval_loss", "eval_tokens", "bleu-4", "rouge-l")}
    assert main(["eval", "--model", str(GOLDEN), "--data", str(card_files["eval"]), "--output-dir",
                 str(tmp_path / "eval"), "--max-source-length", "24", "--max-target-length", "16",
                 "--max-new-tokens", "2"]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["count"] == 16
