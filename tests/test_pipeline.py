"""Pipeline parallelism (glm6b.train.pipeline) on CPU with gloo: 2 stages train with the losses and weights of
one process (full and LoRA, 1F1B and GPipe, gradient checkpointing, token-normalised loss, eval and generation
during training), their DCP checkpoints resume on another layout, and 2 stages x 2 replicas (4 processes,
where the machine has the cores) do the same with DDP and FSDP2.

The 2-process jobs share one pool of spawned processes (tests/dist_scripts/harness.py); the jobs are in
tests/dist_scripts/pipeline_jobs.py and the one-process references run here, in the test process.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # helpers and dist_scripts (the spawned processes inherit it)

import torch.distributed as dist

from glm6b.config import ChatGLMConfig, ConfigError, ParallelConfig
from glm6b.model import ChatGLMForConditionalGeneration
from glm6b.train.pipeline import split_model, stage_layers

JOB_TIMEOUT_S = 180
LR = 1e-3
# 4 processes on fewer cores run, but oversubscribed (minutes instead of seconds): opt in with this variable.
FOUR_PROCESSES = (os.cpu_count() or 1) >= 4 or os.environ.get("GLM6B_TEST_4_PROCESSES") == "1"
FOUR_PROCESSES_REASON = ("4 processes need 4 CPU cores (set GLM6B_TEST_4_PROCESSES=1 to run them oversubscribed)")
needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")


# ----------------------------------------------------------------------------------- no processes


@pytest.mark.parametrize("layers, stages, counts", [
    (3, 2, [2, 1]), (3, 3, [1, 1, 1]), (28, 4, [7, 7, 7, 7]), (28, 3, [9, 10, 9]), (28, 5, [5, 6, 6, 6, 5]), (5, 2, [3, 2]),
    (4, 1, [4]),
])
def test_stage_layers_are_consecutive_and_even(layers, stages, counts):
    ranges = stage_layers(layers, stages)
    assert [len(r) for r in ranges] == counts
    assert [i for r in ranges for i in r] == list(range(layers))


def test_stage_layers_refuses_more_stages_than_blocks():
    with pytest.raises(ConfigError, match="parallel.pipeline_stage = 4 must be between 1 and num_layers \\(3\\)"):
        stage_layers(3, 4)


def test_split_model_keeps_the_hf_names():
    """Each stage keeps its blocks under their own index; together the stages hold every parameter once,
    except the tied embedding matrix, which stage 0 (word_embeddings) and the last stage (lm_head) both hold."""
    def tiny():
        model = ChatGLMForConditionalGeneration(ChatGLMConfig.from_name("tiny"))
        model.init_weights(generator=torch.Generator().manual_seed(0))
        return model

    whole = dict(tiny().named_parameters())
    first, last = (dict(split_model(tiny(), stage, 2).named_parameters()) for stage in (0, 1))
    assert "transformer.word_embeddings.weight" in first and "lm_head.weight" not in first
    assert "lm_head.weight" in last and "transformer.final_layernorm.weight" in last
    assert "transformer.word_embeddings.weight" not in last
    assert {n.split(".")[2] for n in first if ".layers." in n} == {"0", "1"}
    assert {n.split(".")[2] for n in last if ".layers." in n} == {"2"}
    assert set(first) | set(last) - {"lm_head.weight"} == set(whole)
    for name, p in {**first, **last}.items():
        source = whole["transformer.word_embeddings.weight" if name == "lm_head.weight" else name]
        assert torch.equal(p, source), name


@pytest.mark.parametrize("layout, world, model_changes, message", [
    (dict(pipeline_stage=2), 1, {}, "* parallel.pipeline_stage (2) = 2 must equal the number of processes, which is 1"),
    (dict(pipeline_stage=2, model_parallel=2), 4, {},
     "parallel.pipeline_stage = 2 with parallel.model_parallel = 2 is not supported"),
    (dict(pipeline_stage=4), 4, {}, "parallel.pipeline_stage = 4 must not exceed num_layers (3)"),
    (dict(pipeline_stage=2), 2, dict(pre_seq_len=4), "parallel.pipeline_stage = 2 with P-tuning"),
    (dict(pipeline_stage=3, micro_batch_num=2), 3, {},
     "parallel.pipeline_schedule = 1f1b needs at least parallel.pipeline_stage (3) micro-batches per step, got 2"),
    (dict(pipeline_stage=2, pipeline_schedule="zb"), 2, {}, "parallel.pipeline_schedule = 'zb': expected 1f1b or gpipe"),
])
def test_invalid_pipeline_layouts_are_clear_errors(layout, world, model_changes, message):
    with pytest.raises(ConfigError) as excinfo:
        ParallelConfig(**layout).validate(world, ChatGLMConfig.from_name("tiny", **model_changes))
    assert message in str(excinfo.value)


def test_valid_pipeline_layouts():
    tiny = ChatGLMConfig.from_name("tiny")
    ParallelConfig(pipeline_stage=2).validate(2, tiny)
    ParallelConfig(pipeline_stage=3, micro_batch_num=3).validate(3, tiny)
    ParallelConfig(pipeline_stage=2, data_parallel=2, optimizer_shard=True).validate(4, tiny)
    ParallelConfig(pipeline_stage=3, micro_batch_num=2, pipeline_schedule="gpipe").validate(3, tiny)
    assert ParallelConfig(pipeline_stage=2, data_parallel=4).world_size == 8


# ----------------------------------------------------------------------------------- 2 processes


@pytest.fixture(scope="module")
def pool():
    from dist_scripts.harness import ProcessPool

    with ProcessPool(2) as p:
        yield p


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """15 ADGEN-style rows with answers of different lengths: the last micro-batch of an epoch has one row."""
    from glm6b.sample_data import make_adgen_examples, write_adgen_jsonl

    path = tmp_path_factory.mktemp("pipeline-data") / "train.json"
    write_adgen_jsonl(path, make_adgen_examples(15, seed=3))
    return str(path)


@pytest.fixture(scope="module")
def even_file(tmp_path_factory):
    """16 rows: a whole number of micro-batches per epoch for 1 and 2 replicas alike (a data-parallel split
    drops the rows of a last micro-batch beyond a multiple of the replicas; one process would train on them)."""
    from glm6b.sample_data import make_adgen_examples, write_adgen_jsonl

    path = tmp_path_factory.mktemp("pipeline-even") / "train.json"
    write_adgen_jsonl(path, make_adgen_examples(16, seed=3))
    return str(path)


def reference(tmp_path: Path, data_file: str, **kwargs) -> dict:
    """The same training on one process (here, in the test process)."""
    from dist_scripts.pipeline_jobs import run_training

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        assert name not in os.environ, f"{name} is set: the reference would not run on one process"
    return run_training(tmp_path / "one", data_file, **kwargs)


def assert_same_losses(ours: list[float], ref: list[float], rel: float = 1e-5) -> None:
    assert len(ours) == len(ref), (ours, ref)
    for step, (a, b) in enumerate(zip(ours, ref), start=1):
        assert abs(a - b) <= rel * abs(b), f"step {step}: {a!r} != one-process {b!r}"


def assert_same_weights(folder: str, ref_folder: str, steps: int = 4) -> None:
    """final/ tensors as one process's: all but a few elements of each equal up to float32 noise (1e-5 of the
    tensor's largest value plus 1 % of one step's update), and every element within AdamW's reach.

    AdamW moves an element by about lr a step whatever its gradient's size, so summation-order noise in a
    near-zero gradient can flip its sign and move that element up to 2 lr a step the other way (one bias
    element of 48 was 1.09e-5 off on an AMD Zen 4); a wrong or missing update moves most of the tensor."""
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if (Path(folder) / "adapter_config.json").is_file() else "model.safetensors"
    ours, ref = load_file(Path(folder) / name), load_file(Path(ref_folder) / name)
    assert sorted(ours) == sorted(ref)
    for key in ref:
        diff = (ours[key] - ref[key]).abs().flatten()
        tight = 1e-5 * ref[key].abs().max().item() + 0.01 * LR
        off = int((diff > tight).sum())
        assert off <= max(1, diff.numel() // 1000), \
            f"{key}: {off} of {diff.numel()} elements differ by more than {tight:.3g} (largest {diff.max():.3g})"
        assert diff.max().item() <= 2 * steps * LR, f"{key}: max abs error {diff.max():.3g}"


@needs_gloo
@pytest.mark.distributed
@pytest.mark.parametrize("method, options", [
    ("full", dict()),  # 1F1B
    ("lora", dict(checkpointing=True, layout=dict(pipeline_stage=2, pipeline_schedule="gpipe"), dynamic_padding=True)),
    ("full", dict(loss_normalization="per_micro_batch", max_grad_norm=0.0)),
], ids=["full-1f1b", "lora-gpipe-checkpointing", "full-per-micro-batch"])
def test_two_stages_train_like_one_process(pool, tmp_path, data_file, method, options):
    """4 steps of 2 micro-batches x 2 rows (the 8th micro-batch has 1 row, padded with an ignored copy): the
    same losses, gradient norms and final/ weights as one process."""
    options = {"layout": dict(pipeline_stage=2), **options}
    layout = options.pop("layout")
    result = pool.run("dist_scripts.pipeline_jobs.train", tmp_path / "pp", timeout_s=JOB_TIMEOUT_S,
                      data_file=data_file, method=method, layout=layout, **options)
    ref = reference(tmp_path, data_file, method=method, **options)
    assert_same_losses(result["losses"], ref["losses"])
    if options.get("max_grad_norm", 1.0) == 0.0:
        assert_same_losses(result["grad_norms"], ref["grad_norms"])
    assert_same_weights(result["final"], ref["final"])


@needs_gloo
@pytest.mark.distributed
def test_eval_and_generation_during_training_through_the_pipeline(pool, tmp_path, data_file):
    """eval_steps: the teacher-forced eval loss and the BLEU/ROUGE of greedy answers, then predict(): as one process."""
    options = dict(method="lora", steps=2, eval_steps=1)
    result = pool.run("dist_scripts.pipeline_jobs.train", tmp_path / "pp", timeout_s=JOB_TIMEOUT_S,
                      data_file=data_file, layout=dict(pipeline_stage=2), **options)
    ref = reference(tmp_path, data_file, **options)
    assert [r["step"] for r in result["eval"]] == [1, 2]
    for ours, theirs in zip(result["eval"], ref["eval"]):
        assert abs(ours["eval_loss"] - theirs["eval_loss"]) <= 1e-5 * theirs["eval_loss"]
        assert ours["eval_tokens"] == theirs["eval_tokens"]
        for metric in ("bleu-4", "rouge-1", "rouge-2", "rouge-l"):
            assert ours[metric] == pytest.approx(theirs[metric], abs=1e-6), metric
    assert result["predictions"] == ref["predictions"]


@needs_gloo
@pytest.mark.distributed
def test_forward_and_generation_through_the_stages(pool, tmp_path):
    result = pool.run("dist_scripts.pipeline_jobs.forward_and_generate", tmp_path, timeout_s=JOB_TIMEOUT_S,
                      stages=2)
    assert result["layers"] == [0, 1]  # rank 0 is stage 0
    from helpers import assert_close_rel

    assert_close_rel(result["logits"], result["expected_logits"], what="last stage's logits")
    assert torch.equal(result["sequences"], result["expected_sequences"])


@needs_gloo
@pytest.mark.distributed
@pytest.mark.parametrize("method", ["full", "lora"])
def test_pipeline_checkpoint_resumes_on_one_process_and_merges(pool, tmp_path, data_file, method):
    """Written by 2 stages at step 2 of 4, resumed on one process: the losses of the uninterrupted run;
    merge-checkpoint turns the last one into the folder final/ holds (an HF folder with one tied matrix, or
    the LoRA adapter)."""
    from safetensors.torch import load_file

    from glm6b import load_model
    from glm6b.train.dcp import read_checkpoint_info
    from glm6b.train.export import merge_checkpoint

    result = pool.run("dist_scripts.pipeline_jobs.train", tmp_path / "pp", timeout_s=JOB_TIMEOUT_S,
                      data_file=data_file, method=method, layout=dict(pipeline_stage=2), save_steps=2)
    checkpoint = tmp_path / "pp" / "run" / "checkpoint-2"
    info = read_checkpoint_info(checkpoint)
    assert (info["world_size"], info["parallel"]["pipeline_stage"], info["optimizer_state"]) == (2, 2, "flat")
    resumed = reference(tmp_path, data_file, method=method, resume=str(checkpoint))
    assert len(resumed["grad_norms"]) == 2  # steps 3 and 4 ran; the losses of 1 and 2 come with the checkpoint
    assert_same_losses(resumed["losses"], result["losses"])

    merged = merge_checkpoint(tmp_path / "pp" / "run" / "checkpoint-4", tmp_path / "merged")
    if method == "lora":
        ours, final = (load_file(Path(d) / "adapter_model.safetensors") for d in (merged, result["final"]))
        assert sorted(ours) == sorted(final) and all(torch.equal(ours[k], final[k]) for k in final)
        return
    model = load_model(merged, dtype=torch.float32)
    final = load_model(result["final"], dtype=torch.float32)
    for (name, p), (_, q) in zip(model.named_parameters(), final.named_parameters()):
        assert torch.equal(p, q), name
    assert model.lm_head.weight is model.transformer.word_embeddings.weight  # one tensor, tied


@needs_gloo
@pytest.mark.distributed
def test_data_parallel_checkpoint_resumes_on_two_stages(pool, tmp_path, even_file):
    """Written by DDP over 2 processes, resumed by 2 pipeline stages (the last stage's lm_head copy and its
    AdamW state come from the embedding matrix): the losses of the uninterrupted run."""
    ddp = pool.run("dist_scripts.pipeline_jobs.train", tmp_path / "ddp", timeout_s=JOB_TIMEOUT_S,
                   data_file=even_file, layout=dict(data_parallel=2), accumulation=1, save_steps=2)
    resumed = pool.run("dist_scripts.pipeline_jobs.train", tmp_path / "pp", timeout_s=JOB_TIMEOUT_S,
                       data_file=even_file, layout=dict(pipeline_stage=2),
                       resume=str(tmp_path / "ddp" / "run" / "checkpoint-2"))
    assert len(resumed["grad_norms"]) == 2
    assert_same_losses(resumed["losses"], ddp["losses"])


# ----------------------------------------------------------------------------------- 4 processes


@needs_gloo
@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.skipif(not FOUR_PROCESSES, reason=FOUR_PROCESSES_REASON)
@pytest.mark.parametrize("shard", [False, True], ids=["replicas", "fsdp2"])
def test_two_stages_times_two_replicas(tmp_path, even_file, shard):
    """pipeline_stage=2 x data_parallel=2 (gradients averaged over the replicas, or FSDP2 with optimizer_shard) on
    4 processes: the losses, eval losses and final/ weights of one process with the same global batch; a
    checkpoint of it resumes on one process."""
    from dist_scripts.harness import ProcessPool

    layout = dict(pipeline_stage=2, data_parallel=2, optimizer_shard=shard)
    with ProcessPool(4) as pool4:
        result = pool4.run("dist_scripts.pipeline_jobs.train", tmp_path / "pp", timeout_s=4 * JOB_TIMEOUT_S,
                           data_file=even_file, layout=layout, accumulation=2, save_steps=2, eval_steps=2)
    ref = reference(tmp_path, even_file, accumulation=4, eval_steps=2)  # 2 replicas x 2 micro-batches x 2 rows
    assert_same_losses(result["losses"], ref["losses"])
    assert_same_losses([r["eval_loss"] for r in result["eval"]], [r["eval_loss"] for r in ref["eval"]])
    assert result["predictions"] == ref["predictions"]
    assert_same_weights(result["final"], ref["final"])
    resumed = reference(tmp_path / "resumed", even_file, accumulation=4,
                        resume=str(tmp_path / "pp" / "run" / "checkpoint-2"))
    assert len(resumed["grad_norms"]) == 2
    assert_same_losses(resumed["losses"], ref["losses"])
