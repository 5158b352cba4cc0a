"""Building the model a Trainer trains: load or randomly initialise it (optionally quantized), then prepare it
for the method (freeze, LoRA wrap, float32 prefix encoder, gradient checkpointing, frozen-linear backward);
the seeds and the learning-rate schedule."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..api import load
from ..checkpoint.hf import PREFIX_ENCODER
from ..config import LoadConfig, LoraConfig, TrainerError
from .args import Method
from .frozen_linear import onednn_bf16_matmul_available, use_fast_frozen_backward
from .lora import apply_lora
from .parallel import unwrap_model


def set_seed(seed: int) -> None:
    """Seed python's random, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def enable_input_require_grads(model: nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Make the input embeddings' output require grad (HF's `enable_input_require_grads`).

    With a frozen base, the hidden states entering the first checkpointed block would not require
    grad, and a checkpointed block whose inputs need no grad produces no gradients for the adapters
    or prefix inside it (reentrant checkpointing). The hook costs nothing else.

    Returns:
        The hook handle.
    """
    return unwrap_model(model).get_input_embeddings().register_forward_hook(
        lambda module, inputs, output: output.requires_grad_(True))


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """The LR factor per step: linear warmup over `warmup` steps, then constant, linear or cosine decay to 0."""
    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))

    return factor


def build_model(model_args: LoadConfig, method: Method, trainable_adapter: bool = False) -> tuple[nn.Module, Any]:
    """Load (or randomly initialise) the model that model_args describes, quantized and with its adapter if asked
    (glm6b.api.load).

    Args:
        model_args: the `model:` section.
        method: "full", "lora" or "ptuning": decides the default dtype (float32 for full fine-tuning, a
            bfloat16 frozen base otherwise) and whether a prefix is built.
        trainable_adapter: keep model_args.adapter a trainable PEFT layer (to train it further); otherwise
            it is merged as model_args.merge_adapter says.

    Returns:
        (model, tokenizer): the model (a PeftModel when training a LoRA adapter further) and the tokenizer
        of its folder or model_args.tokenizer (None for a preset without one).

    Raises:
        ConfigError: neither load_checkpoint nor preset.
    """
    pre_seq_len = model_args.pre_seq_len if method == "ptuning" or model_args.ptuning_checkpoint else None
    spec = dataclasses.replace(model_args, pre_seq_len=pre_seq_len)
    model, tokenizer, _ = load(spec, default_dtype="float32" if method == "full" else "bfloat16",
                               trainable_adapter=trainable_adapter)
    return model, tokenizer


def prepare_model(model: nn.Module, method: Method, lora_config: LoraConfig, gradient_checkpointing: bool,
                  base_name: str | None = None) -> nn.Module:
    """Freeze / wrap `model` for the method, enable gradient checkpointing, set train mode.

    Full: every parameter trains. P-tuning: only the prefix encoder (in float32). LoRA: fresh
    adapters unless the model already is a PeftModel. With a frozen base, the frozen linears get
    the float32 backward of glm6b.train.frozen_linear (always for quantized layers; for bf16 ones on
    CPUs without oneDNN bf16 matmuls, where PyTorch's own runs at ~0.1 GFLOP/s).

    Args:
        model: the model (plain or PeftModel).
        method: "full", "lora" or "ptuning".
        lora_config: the adapters' settings (method lora).
        gradient_checkpointing: recompute blocks in backward.
        base_name: recorded as the adapter's base_model_name_or_path.

    Returns:
        The model to train (the PeftModel for LoRA).

    Raises:
        TrainerError: a model that does not fit the method.
    """
    base = unwrap_model(model)
    is_peft = base is not model
    if method == "full":
        if is_peft:
            raise TrainerError("method 'full' got a LoRA (PEFT) model; use method 'lora' or merge it first")
        if base.config.pre_seq_len:
            raise TrainerError("method 'full' got a model with a P-tuning prefix (pre_seq_len set); "
                               "use method 'ptuning'")
        for p in base.parameters():
            p.requires_grad_(True)
    elif method == "ptuning":
        if not base.config.pre_seq_len:
            raise TrainerError("method 'ptuning' needs a model built with pre_seq_len (set model.pre_seq_len)")
        for name, p in base.named_parameters():
            p.requires_grad_(name.startswith(PREFIX_ENCODER))
        base.transformer.prefix_encoder.float()  # trained in float32 whatever the base dtype
    else:
        if base.config.pre_seq_len:
            raise TrainerError("method 'lora' got a model with a P-tuning prefix (pre_seq_len set)")
        if not is_peft:
            model = apply_lora(model, lora_config, base_name)
    if gradient_checkpointing:
        base.gradient_checkpointing_enable()
        if not base.get_input_embeddings().weight.requires_grad:
            enable_input_require_grads(base)
    if method != "full":  # quantized layers need it; float ones on CPUs without oneDNN bf16 (~0.1 GFLOP/s)
        use_fast_frozen_backward(model, float_linears=base.device.type == "cpu"
                                 and not onednn_bf16_matmul_available())
    model.train()
    return model
