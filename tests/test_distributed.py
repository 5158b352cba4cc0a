"""glm6b.train.parallel, .dcp and .export on CPU with gloo: TP / FSDP2 / DDP equal one process, DCP checkpoints reshard and merge.

The multi-process tests share one pool of 2 spawned processes (torchrun's environment, gloo) and
send it one job per test (see tests/dist_scripts/harness.py); the jobs are in
tests/dist_scripts/workers.py. Everything is float32 on the "tiny" preset with seeded weights.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # helpers and dist_scripts (the spawned processes inherit it)

import torch.distributed as dist  # noqa: E402
from helpers import GOLDEN, assert_close_rel  # noqa: E402

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available in this PyTorch build",
                allow_module_level=True)

from dist_scripts import workers  # noqa: E402
from dist_scripts.harness import ProcessPool  # noqa: E402

from glm6b.checkpoint.hf import CheckpointError, load_model  # noqa: E402
from glm6b.config import (  # noqa: E402
    ChatGLMConfig,
    ConfigError,
    ParallelConfig,  # noqa: E402
)
from glm6b.train import dcp as DCP  # noqa: E402
from glm6b.train import export  # noqa: E402
from glm6b.train import parallel as D  # noqa: E402

JOB_TIMEOUT_S = 90  # the first job of a pool also imports torch.distributed's parallel modules

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def pool():
    with ProcessPool(2) as p:
        yield p


def assert_same_tensors(ours: dict, ref: dict, rel: float = 1e-5, what: str = "") -> None:
    assert sorted(ours) == sorted(ref), f"{what}: names differ: {sorted(set(ours) ^ set(ref))[:5]}"
    for name in ref:
        assert_close_rel(ours[name], ref[name], rel=rel, what=f"{what} {name}")


def assert_same_params(ours: dict, ref: dict, what: str = "after 3 AdamW steps:") -> None:
    """Parameters after training: equal up to float32 noise, plus 1% of one step's update.

    AdamW divides each gradient by its running RMS, so a coordinate whose gradient is ~0 (below the
    eps of 1e-8) turns float32 summation-order noise into an update difference of up to
    lr * noise / eps: a tiny fraction of lr, but more than 1e-5 of the weights.
    """
    assert sorted(ours) == sorted(ref), f"{what}: names differ: {sorted(set(ours) ^ set(ref))[:5]}"
    for name in ref:
        err = (ours[name] - ref[name]).abs().max().item()
        bound = 1e-5 * ref[name].abs().max().item() + 0.01 * workers.LR
        assert err <= bound, f"{what} {name}: max abs error {err:.3g} > {bound:.3g}"


def assert_same_losses(ours: list[float], ref: list[float], rel: float = 1e-5) -> None:
    assert len(ours) == len(ref)
    for step, (a, b) in enumerate(zip(ours, ref), start=1):
        assert abs(a - b) <= rel * abs(b), f"step {step}: loss {a!r} != one-process {b!r}"


# ----------------------------------------------------------------------------------- no processes


@pytest.mark.parametrize("layout, world, model_changes, message", [
    (dict(data_parallel=2), 4, {}, "must equal the number of processes, which is 4"),
    (dict(data_parallel=2, model_parallel=2, optimizer_shard=True), 2, {}, "= 4 must equal"),
    (dict(model_parallel=3), 3, {}, "must divide num_attention_heads (4)"),
    (dict(model_parallel=4), 4, dict(inner_hidden_size=322), "must divide inner_hidden_size (322)"),
    (dict(pipeline_stage=2, model_parallel=2), 4, {}, "parallel.pipeline_stage = 2 with parallel.model_parallel = 2 "
                                                      "is not supported"),
    (dict(data_parallel=0), 0, {}, "parallel.data_parallel = 0: expected an integer >= 1"),
    (dict(micro_batch_num=0), 1, {}, "parallel.micro_batch_num = 0"),
    (dict(model_parallel=-1), 1, {}, "parallel.model_parallel = -1"),
    (dict(data_parallel=1.5), 1, {}, "parallel.data_parallel = 1.5"),
    (dict(optimizer_shard="yes"), 1, {}, "parallel.optimizer_shard = 'yes'"),
    (dict(data_parallel=2, model_parallel=2), 4, {}, "needs parallel.optimizer_shard: true"),
    (dict(model_parallel=2), 2, dict(pre_seq_len=4), "P-tuning"),
])
def test_invalid_parallel_config_is_a_clear_error(layout, world, model_changes, message):
    config = ParallelConfig(**layout)
    with pytest.raises(ConfigError) as excinfo:
        config.validate(world, ChatGLMConfig.from_name("tiny", **model_changes))
    assert message in str(excinfo.value)


def test_valid_parallel_configs():
    tiny = ChatGLMConfig.from_name("tiny")
    ParallelConfig().validate(1, tiny)
    ParallelConfig(data_parallel=8, optimizer_shard=True, micro_batch_num=4).validate(8, tiny)
    ParallelConfig(data_parallel=2, model_parallel=4, optimizer_shard=True).validate(8, tiny)
    ParallelConfig(data_parallel=4).validate(4, tiny.replace(pre_seq_len=8))
    assert ParallelConfig.from_dict({"data_parallel": 2, "optimizer_shard": True}).world_size == 2
    with pytest.raises(ConfigError, match="unknown key.*expert_parallel"):
        ParallelConfig.from_dict({"expert_parallel": 2})


def test_qkv_row_chunks_hold_whole_heads():
    """The fused qkv rows are per head (row = h*3d + j*d + k), so ColwiseParallel's contiguous row
    chunk r is exactly heads [r*nh/tp, (r+1)*nh/tp) with their q, k and v: no permutation needed."""
    config = ChatGLMConfig.from_name("tiny")
    nh, d, h = config.num_attention_heads, config.head_dim, config.hidden_size
    weight = workers.tiny_model().transformer.layers[0].attention.query_key_value.weight.detach()
    per_head = weight.view(nh, 3, d, h)  # [head, q|k|v, d, H]
    for tp in (2, 4):
        for rank, chunk in enumerate(weight.chunk(tp, dim=0)):
            heads = range(rank * nh // tp, (rank + 1) * nh // tp)
            assert torch.equal(chunk.view(nh // tp, 3, d, h), per_head[heads.start:heads.stop])
            for local, head in enumerate(heads):
                for j in range(3):  # q, k, v of that head: rows h*3d + j*d + k of the full matrix
                    rows = weight[head * 3 * d + j * d: head * 3 * d + (j + 1) * d]
                    assert torch.equal(chunk[local * 3 * d + j * d: local * 3 * d + (j + 1) * d], rows)


def test_clip_grad_norm_scales_the_gradients():
    """The norm is measured and the gradients are scaled to max_norm (torch's clip_grads_with_norm_ takes the
    parameters, not their gradients)."""
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))
    a.grad, b.grad = torch.full((3,), 3.0), torch.full((4,), 4.0)
    norm = D.clip_grad_norm_([a, b], max_norm=1.0)
    assert norm.item() == pytest.approx((3 * 9 + 4 * 16) ** 0.5)
    assert D.grad_norm([a, b]).item() == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(a.grad, torch.full((3,), 3.0) / norm)
    D.clip_grad_norm_([a, b], max_norm=float("inf"))  # measures only
    assert D.grad_norm([a, b]).item() == pytest.approx(1.0, rel=1e-5)


def test_single_process_is_a_no_op(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = D.init_distributed()
    assert (info.rank, info.world_size, D.get_world_size(), D.is_main_process()) == (0, 1, 1, True)
    D.barrier()
    config = ParallelConfig()
    mesh = D.build_mesh(config)
    assert mesh is None
    model = workers.tiny_model()
    assert D.parallelize_model(model, mesh, config) is model
    assert D.data_parallel_rank_and_size(mesh) == (0, 1)
    assert D.all_reduce_mean(torch.tensor(2.5)) == 2.5
    assert D.rank_zero_only(lambda: 7)() == 7
    assert D.data_parallel_shard(range(5), mesh) == [0, 1, 2, 3, 4]
    with pytest.raises(ConfigError, match="must equal the number of processes, which is 1"):
        D.build_mesh(ParallelConfig(data_parallel=2))


# ----------------------------------------------------------------------------------- 2 processes


def test_tensor_parallel_matches_single_process(pool, tmp_path):
    result = pool.run("dist_scripts.workers.tensor_parallel", tmp_path / "job", timeout_s=JOB_TIMEOUT_S,
                      final_to=str(tmp_path / "final"))
    ref, ref_training = result["references"]["forward_backward"], result["references"]["training"]
    config = ChatGLMConfig.from_name("tiny")
    assert result["local_heads"] == config.num_attention_heads // 2
    assert result["qkv_local_shape"] == (3 * config.hidden_size // 2, config.hidden_size)
    full_qkv = workers.tiny_model().transformer.layers[0].attention.query_key_value.weight.detach()
    assert torch.equal(result["qkv_local_weight"], full_qkv.chunk(2, dim=0)[0])  # rank 0 = heads 0, 1
    assert_close_rel(result["logits"], ref["logits"], what="logits")
    assert abs(result["loss"] - ref["loss"]) <= 1e-5 * ref["loss"]
    assert_same_tensors(result["grads"], ref["grads"], what="grad")
    assert_same_losses(result["losses"], ref_training["losses"])
    assert_same_params(result["params"], ref_training["params"])
    reloaded = load_model(tmp_path / "final")  # save_final_model gathered the split weights
    assert_same_tensors({n: p.detach() for n, p in reloaded.named_parameters()}, result["params"], rel=0,
                        what="final folder:")


def test_fsdp_full_finetune_matches_single_process(pool, tmp_path):
    """FSDP2 over 2 ranks, 2 micro-batches per step, activation checkpointing on: same losses as one process."""
    final = tmp_path / "final"
    result = pool.run("dist_scripts.workers.data_parallel", tmp_path / "job", timeout_s=JOB_TIMEOUT_S, kind="full",
                      shard=True, micro_batch_num=2, checkpointing=True, final_to=str(final))
    reference = workers.reference_training("full")
    assert result["wrapper"].startswith("FSDP")
    assert_same_losses(result["losses"], reference["losses"])
    assert_same_params(result["params"], reference["params"])
    # save_final_model: rank 0 writes the HF folder from the gathered shards.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "job"]
    reloaded = load_model(final)
    assert_same_tensors({n: p.detach() for n, p in reloaded.named_parameters()}, result["params"], rel=0,
                        what="final folder:")
    assert (final / "ice_text.model").is_file()


def test_ddp_matches_single_process(pool, tmp_path):
    """DDP (data_parallel without optimizer_shard), 2 micro-batches (no_sync on the first); its
    checkpoint (keys without DDP's `module.` prefix) loads into a plain model."""
    checkpoint = tmp_path / "ddp"
    result = pool.run("dist_scripts.workers.data_parallel", tmp_path / "job", timeout_s=JOB_TIMEOUT_S, kind="full",
                      shard=False, micro_batch_num=2, save_to=str(checkpoint))
    reference = workers.reference_training("full")
    assert result["wrapper"] == "DistributedDataParallel"
    assert_same_losses(result["losses"], reference["losses"])
    assert_same_params(result["params"], reference["params"])
    model = workers.tiny_model()
    optimizer = workers.make_optimizer(model)
    DCP.load_sharded({"model": model, "optimizer": optimizer}, checkpoint)
    assert_same_tensors(workers.trainable_params(model), result["params"], rel=0, what="DDP -> 1 process:")


def test_fsdp_ptuning_matches_single_process(pool, tmp_path):
    """P-tuning: frozen base, float32 prefix encoder in the root FSDP unit."""
    final = tmp_path / "final"
    result = pool.run("dist_scripts.workers.data_parallel", tmp_path / "job", timeout_s=JOB_TIMEOUT_S,
                      kind="ptuning", shard=True, final_to=str(final))
    reference = workers.reference_training("ptuning")
    assert all(name.startswith("transformer.prefix_encoder.") for name in result["params"])
    assert_same_losses(result["losses"], reference["losses"])
    assert_same_params(result["params"], reference["params"])
    saved = torch.load(final / "pytorch_model.bin", weights_only=True)  # the THUDM P-tuning folder
    assert_same_tensors(saved, result["params"], rel=0, what="final P-tuning folder:")
    assert ChatGLMConfig.from_json_file(final / "config.json").pre_seq_len == 4


def test_sharded_checkpoint_reshards_and_merges(pool, tmp_path):
    """Saved by FSDP2 on 2 ranks -> loaded by 1 process; saved by 1 process -> loaded by TP on 2 ranks;
    merge_checkpoint -> an HF folder that load_model reads, equal to the trained parameters."""
    two_rank_dir = tmp_path / "fsdp2-step1"
    saved = pool.run("dist_scripts.workers.data_parallel", tmp_path / "job1", timeout_s=JOB_TIMEOUT_S,
                     kind="full", shard=True, steps=1, save_to=str(two_rank_dir))
    assert saved["shards"] == ["__0_0.distcp", "__1_0.distcp"]
    assert not two_rank_dir.with_name("fsdp2-step1.tmp").exists()
    info = DCP.read_checkpoint_info(two_rank_dir)
    assert (info["kind"], info["trainable_only"], info["world_size"]) == ("full", False, 2)
    assert info["parallel"]["optimizer_shard"] is True
    assert info["keys"] == ["model", "optimizer", "rank0", "rank1", "scheduler", "trainer"]
    for name in ("config.json", "ice_text.model", "tokenizer_config.json", ".metadata"):
        assert (two_rank_dir / name).is_file(), name

    # 2 ranks (FSDP) -> 1 process.
    model = workers.tiny_model()
    model.transformer.layers[0].mlp.dense_h_to_4h.weight.data.zero_()  # must be overwritten
    optimizer = workers.make_optimizer(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "trainer": {}}
    DCP.load_sharded(state, two_rank_dir)
    assert state["trainer"] == {"global_step": 1, "seed": 42}
    assert DCP.load_sharded({"model": model, "rank1": None}, two_rank_dir)["rank1"] == {"rank": 1}  # rank 1's own
    assert scheduler.state_dict()["last_epoch"] == saved["scheduler"]["last_epoch"] == 1
    assert_same_tensors(workers.trainable_params(model), saved["params"], rel=0, what="1-process load:")
    loaded_optimizer = workers.optimizer_state(model, optimizer)
    for name, st in saved["optimizer"].items():
        assert_same_tensors(loaded_optimizer[name], st, rel=0, what=f"optimizer state {name}:")

    # merge -> HF folder.
    merged = export.merge_checkpoint(two_rank_dir, tmp_path / "merged")
    assert sorted(p.name for p in merged.iterdir()) == ["config.json", "ice_text.model", "model.safetensors",
                                                       "tokenizer_config.json"]
    reloaded = load_model(merged)
    assert_same_tensors({n: p.detach() for n, p in reloaded.named_parameters()}, saved["params"], rel=0,
                        what="merged:")

    # 1 process -> 2 ranks in another layout (tensor parallel).
    optimizer.step()  # a state the 2-rank run never had
    one_dir = tmp_path / "single"
    DCP.save_sharded({"model": model, "optimizer": optimizer, "scheduler": scheduler, "trainer": {"global_step": 2}},
                   one_dir)
    assert [p.name for p in one_dir.glob("*.distcp")] == ["__0_0.distcp"]
    loaded = pool.run("dist_scripts.workers.load_checkpoint", tmp_path / "job2", timeout_s=JOB_TIMEOUT_S,
                      directory=str(one_dir), model_parallel=2)
    assert loaded["trainer"] == {"global_step": 2}
    assert_same_tensors(loaded["params"], workers.trainable_params(model), rel=0, what="TP load:")
    expected_optimizer = workers.optimizer_state(model, optimizer)
    for name, st in expected_optimizer.items():
        assert_same_tensors(loaded["optimizer"][name], st, rel=0, what=f"TP optimizer state {name}:")


def test_fsdp_lora_matches_single_process_and_merges(pool, tmp_path):
    """LoRA (PEFT) under FSDP2: same losses as one process; its DCP checkpoint (adapter only) merges
    into the base, or becomes a PEFT adapter folder."""
    checkpoint = tmp_path / "lora-dcp"
    result = pool.run("dist_scripts.workers.data_parallel", tmp_path / "job1", timeout_s=JOB_TIMEOUT_S,
                      kind="lora", shard=True, checkpointing=True, save_to=str(checkpoint),
                      final_to=str(tmp_path / "final"))
    info = DCP.read_checkpoint_info(checkpoint)
    assert (info["kind"], info["trainable_only"]) == ("lora", True)
    assert (checkpoint / "adapter_config.json").is_file()
    stored = DCP.load_full_model_state(checkpoint)
    assert stored and all(".lora_" in name for name in stored)  # no frozen base, no tied lm_head
    merge = pool.run("dist_scripts.workers.lora_reference_and_merge", tmp_path / "job2", timeout_s=JOB_TIMEOUT_S,
                     checkpoint=str(checkpoint), base_dir=str(tmp_path / "base"),
                     merged_dir=str(tmp_path / "merged"), adapter_dir=str(tmp_path / "adapter"),
                     final_dir=str(tmp_path / "final"))
    reference = merge["reference"]
    assert all("lora_" in name for name in result["params"])
    assert_same_losses(result["losses"], reference["losses"])
    assert_same_params(result["params"], reference["params"])
    assert_same_tensors(merge["adapter"], result["params"], rel=0, what="adapter folder:")
    assert_same_tensors(merge["final"], result["params"], rel=0, what="save_final_model adapter folder:")
    assert_same_tensors(merge["merged"], merge["expected_merged"], what="merged model:")
    assert {"adapter_config.json", "adapter_model.safetensors", "ice_text.model"} <= set(merge["adapter_files"])


def test_tensor_parallel_lora_matches_single_process(pool, tmp_path):
    """LoRA on all four split projections (column-split: lora_B split like the base rows; row-split:
    lora_A split like the base columns), activation checkpointing on."""
    result = pool.run("dist_scripts.workers.tensor_parallel", tmp_path, timeout_s=JOB_TIMEOUT_S, lora=True,
                      checkpointing=True, targets=workers.ALL_LINEAR)
    assert any(".dense_4h_to_h.lora_A." in name for name in result["grads"])
    ref, ref_training = result["references"]["forward_backward"], result["references"]["training"]
    assert_close_rel(result["logits"], ref["logits"], what="logits")
    assert_same_tensors(result["grads"], ref["grads"], what="grad")
    assert_same_losses(result["losses"], ref_training["losses"])
    assert_same_params(result["params"], ref_training["params"])


def test_fsdp_bf16_mixed_precision_trains(pool, tmp_path):
    """bf16 compute with float32 reduction and master weights: close to the float32 run, not equal."""
    result = pool.run("dist_scripts.workers.data_parallel", tmp_path, timeout_s=JOB_TIMEOUT_S, kind="full",
                      shard=True, steps=2, mixed_precision="bf16")
    reference = workers.reference_training("full", steps=2)
    assert all(p.dtype == torch.float32 for p in result["params"].values())  # sharded master weights
    for ours, ref in zip(result["losses"], reference["losses"]):
        assert abs(ours - ref) <= 2e-2 * ref


@pytest.mark.slow
@pytest.mark.skipif((os.cpu_count() or 1) < 4, reason="4 processes need 4 CPU cores (oversubscribed, the test "
                                                      "takes ~45 s instead of ~15 s)")
def test_fsdp_with_tensor_parallel_2d(tmp_path):
    """data_parallel=2 x model_parallel=2 on 4 processes (FSDP2 over TP DTensors): same losses as one
    process; its checkpoint of 2-D shards loads into one process."""
    checkpoint = tmp_path / "2d"
    with ProcessPool(4) as pool4:
        result = pool4.run("dist_scripts.workers.data_parallel", tmp_path / "job", timeout_s=120, kind="full",
                           shard=True, model_parallel=2, micro_batch_num=1, save_to=str(checkpoint))
    reference = workers.reference_training("full")
    assert_same_losses(result["losses"], reference["losses"])
    assert_same_params(result["params"], reference["params"])
    model = workers.tiny_model()
    DCP.load_sharded({"model": model}, checkpoint)
    assert_same_tensors(workers.trainable_params(model), result["params"], rel=0, what="2-D -> 1 process:")


# ----------------------------------------------------------------------------------- checkpoint errors


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16"])
@pytest.mark.parametrize("layout,method", [
    (dict(data_parallel=2), "lora"),  # DDP
    (dict(data_parallel=2, optimizer_shard=True), "full"),  # FSDP2 (bf16: the mixed-precision policy)
    (dict(model_parallel=2), "lora"),  # tensor parallel
], ids=["ddp", "fsdp2", "tp"])
def test_generation_during_training(pool, tmp_path, layout, method, bf16):
    """eval_steps with BLEU/ROUGE and predict() on the parallelized model, in float32 and under bf16."""
    from helpers import write_adgen_sample

    data = write_adgen_sample(tmp_path / "train.json")
    result = pool.run("dist_scripts.workers.trainer_with_generation", tmp_path / "job", timeout_s=2 * JOB_TIMEOUT_S,
                      data_file=str(data), layout=layout, method=method, bf16=bf16)
    assert [r["step"] for r in result["eval"]] == [1, 2]
    for record in result["eval"]:
        assert {"eval_loss", "bleu-4", "rouge-1", "rouge-2", "rouge-l"} <= record.keys()
        assert record["eval_loss"] == record["eval_loss"] and record["eval_loss"] > 0  # finite, not NaN
    assert len(result["predictions"]) == 2 and all(isinstance(t, str) for t in result["predictions"])


def test_sharded_checkpoint_errors(tmp_path):
    model = workers.tiny_model()
    with pytest.raises(CheckpointError, match="expected a sharded \\(DCP\\) checkpoint"):
        DCP.load_sharded({"model": model}, GOLDEN)
    with pytest.raises(CheckpointError, match="does not exist"):
        export.merge_checkpoint(tmp_path / "nothing", tmp_path / "out")
    directory = DCP.save_sharded({"model": model}, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="has no optimizer"):
        DCP.load_sharded({"model": model, "optimizer": workers.make_optimizer(model)}, directory)
    with pytest.raises(CheckpointError, match="is a full checkpoint; the model to load it into is ptuning"):
        DCP.load_sharded({"model": workers.tiny_model(pre_seq_len=4)}, directory)
    other = ChatGLMConfig.from_name("tiny", inner_hidden_size=256)
    with pytest.raises(CheckpointError, match="cannot load the sharded checkpoint into this model"):
        DCP.load_sharded({"model": type(model)(other)}, directory)
    # A second save replaces the folder atomically and leaves no .tmp / .old behind.
    DCP.save_sharded({"model": model, "step": 3}, directory)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert json.loads((directory / DCP.CHECKPOINT_INFO_NAME).read_text())["keys"] == ["model", "step"]


def test_ptuning_checkpoint_merges(tmp_path):
    """A P-tuning DCP checkpoint holds only the prefix encoder: without a base it becomes the THUDM
    P-tuning folder, with one a full HF folder (config.json carries pre_seq_len)."""
    from glm6b.checkpoint.hf import save_pretrained

    base_dir = tmp_path / "base"
    save_pretrained(workers.tiny_model(), base_dir)
    model = workers.tiny_model(pre_seq_len=4)
    with torch.no_grad():
        model.transformer.prefix_encoder.embedding.weight.add_(1.0)  # "trained"
    directory = DCP.save_sharded({"model": model}, tmp_path / "ckpt", tokenizer=GOLDEN)
    info = DCP.read_checkpoint_info(directory)
    assert (info["kind"], info["trainable_only"]) == ("ptuning", True)
    prefix = model.transformer.prefix_encoder.embedding.weight.detach()

    folder = export.merge_checkpoint(directory, tmp_path / "ptuning")
    assert {"pytorch_model.bin", "config.json", "ice_text.model"} <= {p.name for p in folder.iterdir()}
    loaded = load_model(base_dir, ptuning_checkpoint=folder)
    assert torch.equal(loaded.transformer.prefix_encoder.embedding.weight, prefix)

    full = export.merge_checkpoint(directory, tmp_path / "full", base_model_path=base_dir, dtype="bfloat16")
    loaded = load_model(full, dtype=torch.float32)
    assert loaded.config.pre_seq_len == 4
    assert torch.equal(loaded.transformer.prefix_encoder.embedding.weight, prefix.bfloat16().float())
    expected = workers.tiny_model().transformer.layers[1].mlp.dense_4h_to_h.weight.bfloat16().float()
    assert torch.equal(loaded.transformer.layers[1].mlp.dense_4h_to_h.weight, expected)

    full_only = DCP.save_sharded({"model": workers.tiny_model()}, tmp_path / "trainable", trainable_only=True)
    with pytest.raises(CheckpointError, match="pass base_model_path"):
        export.merge_checkpoint(full_only, tmp_path / "nope")
    assert not (tmp_path / "nope").exists() and not (tmp_path / "nope.tmp").exists()
