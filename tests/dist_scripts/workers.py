"""Jobs that tests/test_distributed.py runs on every rank of a ProcessPool, and their single-process twins.

Every job has the signature `job(info, out_dir, **kwargs)` and returns (on rank 0) what the test
compares. The model is the "tiny" preset with weights from a fixed seed, so every rank and the
single-process reference start from the same numbers; the data are fixed global batches whose
rows all have the same number of target tokens, so the mean loss of a global batch equals the mean
of the per-rank (and per-micro-batch) means, as data-parallel training computes it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from glm6b.config import ChatGLMConfig, ParallelConfig
from glm6b.model import ChatGLMForConditionalGeneration
from glm6b.train import dcp as DCP
from glm6b.train import export
from glm6b.train import parallel as D

GOLDEN = Path(__file__).parents[1] / "golden"  # its tokenizer files are copied into saved folders
SEED = 0
ROWS = 4  # global batch
LENGTH = 16
CONTEXT = 6  # tokens before [gMASK] <sop>
LR = 1e-3
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query_key_value"])


# ----------------------------------------------------------------------------------- models and data


def tiny_model(pre_seq_len: int | None = None) -> ChatGLMForConditionalGeneration:
    config = ChatGLMConfig.from_name("tiny", pre_seq_len=pre_seq_len)
    model = ChatGLMForConditionalGeneration(config)
    model.init_weights(generator=torch.Generator().manual_seed(SEED))
    if pre_seq_len:
        model.transformer.prefix_dropout.p = 0.0  # deterministic, to compare runs
    return model


ALL_LINEAR = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


def lora_model(model=None, targets: list[str] | None = None):
    import peft

    # PEFT draws lora_A from the global RNG: every rank (and the reference) must start from the same
    # numbers, as the trainer's set_seed(seed) before apply_lora guarantees.
    torch.manual_seed(SEED)
    return peft.get_peft_model(model or tiny_model(),
                               peft.LoraConfig(**{**LORA, "target_modules": targets or LORA["target_modules"]}))


def global_batches(steps: int, rows: int = ROWS) -> list[dict[str, torch.Tensor]]:
    """`steps` batches of `rows` rows: CONTEXT tokens, [gMASK], <sop>, targets; labels on the targets only."""
    config = ChatGLMConfig.from_name("tiny")
    gen = torch.Generator().manual_seed(SEED + 1)
    batches = []
    for _ in range(steps):
        ids = torch.randint(10, 700, (rows, LENGTH), generator=gen)
        ids[:, CONTEXT] = config.gmask_token_id
        ids[:, CONTEXT + 1] = config.bos_token_id
        labels = ids.clone()
        labels[:, :CONTEXT + 1] = -100  # every row: LENGTH - CONTEXT - 1 target tokens
        batches.append({"input_ids": ids, "labels": labels})
    return batches


def train_steps(model, optimizer, batches, micro_batch_num: int = 1, mesh=None) -> list[float]:
    """The training loop the trainer runs: this rank's rows of each global batch, in micro-batches.

    Loss of a micro-batch / micro_batch_num is backpropagated (the data-parallel wrappers average
    gradients over the replicas); the logged loss is the mean over replicas (mesh None: one process,
    no collective at all, so rank 0 can run a reference while the other ranks wait).
    """
    losses = []
    for batch in batches:
        rows = D.data_parallel_shard(range(batch["input_ids"].shape[0]), mesh)  # this replica's rows
        local = {k: v[rows] for k, v in batch.items()}
        micro = len(rows) // micro_batch_num
        step_loss = 0.0
        for i in range(micro_batch_num):
            part = {k: v[i * micro:(i + 1) * micro] for k, v in local.items()}
            with D.no_sync(model, enabled=i < micro_batch_num - 1):
                loss = model(input_ids=part["input_ids"], labels=part["labels"]).loss
                (loss / micro_batch_num).backward()
            step_loss += loss.item() / micro_batch_num
        D.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1e9)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(D.all_reduce_mean(step_loss, mesh) if mesh is not None else step_loss)
    return losses


def full_tensors(named) -> dict[str, torch.Tensor]:
    """name -> full (unsharded) CPU copy; DTensors are gathered (collective: call on every rank)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, t in named:
        if t is None:
            continue
        t = t.full_tensor() if isinstance(t, DTensor) else t
        out[name] = t.detach().cpu().clone()
    return out


def trainable_params(model) -> dict[str, torch.Tensor]:
    return full_tensors((n, p) for n, p in model.named_parameters() if p.requires_grad)


def optimizer_state(model, optimizer) -> dict:
    """{param name: {state key: full tensor}} keyed like DCP, gathered (collective)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer)
    return {name: full_tensors(state.items()) for name, state in osd["state"].items()}


def make_optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.01)


# ----------------------------------------------------------------------------------- single-process references


def build(kind: str, targets: list[str] | None = None):
    if kind == "lora":
        return lora_model(targets=targets)
    return tiny_model(pre_seq_len=4 if kind == "ptuning" else None)


def reference_training(kind: str = "full", steps: int = 3, targets: list[str] | None = None) -> dict:
    """Losses and final trainable parameters of a one-process run on the whole global batches."""
    model = build(kind, targets)
    model.train()
    optimizer = make_optimizer(model)
    losses = train_steps(model, optimizer, global_batches(steps))
    return {"losses": losses, "params": trainable_params(model)}


def reference_forward_backward(lora: bool = False, targets: list[str] | None = None) -> dict:
    model = lora_model(targets=targets) if lora else tiny_model()
    batch = global_batches(1)[0]
    out = model(input_ids=batch["input_ids"], labels=batch["labels"])
    out.loss.backward()
    return {"logits": out.logits.detach(), "loss": out.loss.item(),
            "grads": full_tensors((n, p.grad) for n, p in model.named_parameters() if p.requires_grad)}


# ----------------------------------------------------------------------------------- jobs


def _mesh(**layout):
    config = ParallelConfig(**layout)
    return config, D.build_mesh(config)


def tensor_parallel(info, out_dir: Path, lora: bool = False, steps: int = 3, checkpointing: bool = False,
                    targets: list[str] | None = None, final_to: str | None = None) -> dict:
    """tp=2: forward/backward of one global batch (logits, loss, gathered grads), then `steps` AdamW steps.

    Rank 0 also computes the one-process references (so that peft is imported by the workers only).
    """
    references = None
    if info.rank == 0:
        references = {"forward_backward": reference_forward_backward(lora, targets),
                      "training": reference_training("lora" if lora else "full", steps, targets)}
    config, mesh = _mesh(model_parallel=info.world_size)
    model = lora_model(targets=targets) if lora else tiny_model()
    if checkpointing:
        (model.get_base_model() if lora else model).gradient_checkpointing_enable()
        model.train()
    model = D.parallelize_model(model, mesh, config)
    block = next(m for m in model.modules() if type(m).__name__ == "GLMBlock")
    qkv = block.attention.query_key_value
    qkv_weight = (qkv.base_layer if lora else qkv).weight
    qkv_local = qkv_weight.to_local().detach().clone()  # before training changes it
    batch = global_batches(1)[0]
    out = model(input_ids=batch["input_ids"], labels=batch["labels"])
    out.loss.backward()
    grads = full_tensors((n, p.grad) for n, p in model.named_parameters() if p.requires_grad)
    model.zero_grad()
    optimizer = make_optimizer(model)
    losses = train_steps(model, optimizer, global_batches(steps), mesh=mesh)
    if final_to is not None:
        export.save_final_model(model, final_to)
    return {"logits": out.logits.detach(), "loss": out.loss.item(), "grads": grads,
            "local_heads": block.attention.num_heads, "qkv_local_shape": tuple(qkv_weight.to_local().shape),
            "qkv_local_weight": qkv_local,
            "losses": losses, "params": trainable_params(model), "references": references}


def data_parallel(info, out_dir: Path, kind: str = "full", shard: bool = True, micro_batch_num: int = 1,
                  checkpointing: bool = False, steps: int = 3, model_parallel: int = 1,
                  save_to: str | None = None, mixed_precision: str | None = None,
                  final_to: str | None = None) -> dict:
    """dp = world / model_parallel replicas (FSDP2 if shard else DDP); `steps` AdamW steps; optional DCP save."""
    dp = info.world_size // model_parallel
    config, mesh = _mesh(data_parallel=dp, model_parallel=model_parallel, optimizer_shard=shard,
                         micro_batch_num=micro_batch_num)
    model = build(kind)
    if checkpointing:
        (model.get_base_model() if kind == "lora" else model).gradient_checkpointing_enable()
    model.train()
    model = D.parallelize_model(model, mesh, config, mixed_precision=mixed_precision)
    optimizer = make_optimizer(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # saved with the checkpoint
    losses = train_steps(model, optimizer, global_batches(steps), micro_batch_num, mesh)
    result = {"losses": losses, "params": trainable_params(D.unwrap_parallel(model)),
              "wrapper": type(model).__name__}
    if save_to is not None:
        scheduler.step()
        DCP.save_sharded({"model": model, "optimizer": optimizer, "scheduler": scheduler,
                        "trainer": {"global_step": steps, "seed": 42}, f"rank{info.rank}": {"rank": info.rank}},
                       save_to, tokenizer=GOLDEN, parallel_config=config)
        result["optimizer"] = optimizer_state(model, optimizer)
        result["scheduler"] = scheduler.state_dict()
        result["shards"] = sorted(p.name for p in Path(save_to).glob("*.distcp"))
    if final_to is not None:
        export.save_final_model(model, final_to, tokenizer=GOLDEN)
    return result


def load_checkpoint(info, out_dir: Path, directory: str, model_parallel: int = 1, shard: bool = False) -> dict:
    """Build a full-fine-tuning model + AdamW in a layout, load a sharded checkpoint, return full tensors."""
    dp = info.world_size // model_parallel
    config, mesh = _mesh(data_parallel=dp, model_parallel=model_parallel, optimizer_shard=shard)
    model = ChatGLMForConditionalGeneration(ChatGLMConfig.from_name("tiny"))  # weights come from the checkpoint
    model = D.parallelize_model(model, mesh, config)
    optimizer = make_optimizer(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "trainer": {}}
    DCP.load_sharded(state, directory)
    return {"params": trainable_params(D.unwrap_parallel(model)), "optimizer": optimizer_state(model, optimizer),
            "scheduler": scheduler.state_dict(), "trainer": state["trainer"]}


def lora_reference_and_merge(info, out_dir: Path, checkpoint: str, base_dir: str, merged_dir: str,
                             adapter_dir: str, final_dir: str) -> dict:
    """On rank 0 only (peft lives in the workers, not in the test process): the one-process LoRA run,
    and merge_checkpoint of the distributed run's DCP checkpoint, with and without the base model."""
    if info.rank != 0:
        return None
    from glm6b.checkpoint.adapters import load_adapter
    from glm6b.checkpoint.hf import load_model, save_pretrained

    reference = reference_training("lora")
    save_pretrained(tiny_model(), base_dir)
    export.merge_checkpoint(checkpoint, merged_dir, base_model_path=base_dir)
    export.merge_checkpoint(checkpoint, adapter_dir)
    merged = load_model(merged_dir)
    adapter_model = load_adapter(load_model(base_dir), adapter_dir)
    lora = {n: p.detach().clone() for n, p in adapter_model.named_parameters() if "lora_" in n}
    final_model = load_adapter(load_model(base_dir), final_dir)  # save_final_model's adapter folder
    final = {n: p.detach().clone() for n, p in final_model.named_parameters() if "lora_" in n}
    # The same merge done by PEFT itself from the reference model's adapter: what merged_dir should hold.
    expected = lora_model()
    expected.load_state_dict({n: p for n, p in reference["params"].items()}, strict=False)
    expected_merged = {n: p.detach().clone() for n, p in expected.merge_and_unload().named_parameters()}
    return {"reference": reference, "merged": {n: p.detach().clone() for n, p in merged.named_parameters()},
            "expected_merged": expected_merged, "adapter": lora, "final": final,
            "adapter_files": sorted(p.name for p in Path(adapter_dir).iterdir())}


def trainer_with_generation(info, out_dir: Path, data_file: str, layout: dict, method: str, bf16: bool) -> dict:
    """The real Trainer under a layout: 2 steps with an evaluation that generates (BLEU/ROUGE) after each,
    then predict(); returns the eval records and the predictions."""
    import json

    from glm6b.config import DataConfig, LoadConfig, LoraConfig, TrainingConfig
    from glm6b.tokenizer import load_tokenizer
    from glm6b.train.trainer import Trainer

    output = Path(out_dir) / "run"
    trainer = Trainer(
        model_args=LoadConfig(load_checkpoint=str(GOLDEN), dtype="float32"), tokenizer=load_tokenizer(GOLDEN),
        method=method, lora_config=LoraConfig(**LORA), data_config=DataConfig(max_source_length=24, max_target_length=8),
        train_dataset=data_file, eval_dataset=data_file, parallel_config=ParallelConfig(**layout),
        args=TrainingConfig(output_dir=str(output), max_steps=2, per_device_train_batch_size=1, eval_steps=1,
                               eval_generation_samples=2, per_device_eval_batch_size=2, bf16=bf16, save_steps=None,
                               logging_steps=1, tensorboard=False, disable_tqdm=True, learning_rate=LR))
    trainer.train()
    predictions = trainer.predict(["类型#裙*颜色#红色", "类型#裤"])
    if not D.is_main_process():
        return {}
    records = [json.loads(line) for line in (output / "eval_log.jsonl").read_text().splitlines()]
    return {"eval": records, "predictions": predictions}
