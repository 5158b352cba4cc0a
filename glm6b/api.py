"""What users call: `load_model` and the model class with THUDM's conveniences (chat, stream_chat,
generate, save_pretrained).

The conveniences live here, not in `model/`, so the model's math never imports generation, chat or
checkpoint code (imports point down only; see tests/test_layering.py).
"""

from __future__ import annotations

import os

import torch

from .checkpoint import hf
from .inference.chat import chat, stream_chat
from .inference.engine import default_device
from .inference.generation import generate
from .model import ChatGLMForConditionalGeneration


class ChatGLM(ChatGLMForConditionalGeneration):
    """ChatGLM-6B with the methods of THUDM's model class; its parameters and outputs are the math class's.

    Attributes:
        compile_default: the decode step's compile setting when a call leaves `compile` at "auto"
            (set by `load_model(compile=...)`; see glm6b.inference.engine).
    """

    compile_default: bool | str = "auto"

    def chat(self, tokenizer, query: str, history=None, **kwargs):
        """Answer `query` given earlier (query, response) rounds; see `glm6b.inference.chat.chat`."""
        return chat(self, tokenizer, query, history, **kwargs)

    def stream_chat(self, tokenizer, query: str, history=None, **kwargs):
        """Yield (partial response, history) after every new token; see `glm6b.inference.chat.stream_chat`."""
        return stream_chat(self, tokenizer, query, history, **kwargs)

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Generate continuations with the KV cache; see `glm6b.inference.generation.generate`."""
        return generate(self, input_ids, **kwargs)

    def save_pretrained(self, directory, **kwargs) -> None:
        """Write an HF-format folder (config.json + safetensors); see `glm6b.checkpoint.hf.save_pretrained`."""
        hf.save_pretrained(self, directory, **kwargs)


def load_model(path: str | os.PathLike, device=None, compile: bool | str = "auto", **kwargs) -> ChatGLM:
    """Load a ChatGLM-6B checkpoint as a `ChatGLM` (chat/generate/save_pretrained included).

    Args:
        path: the model folder, or a MindSpore / MindFormers `.ckpt` file (config.json beside it,
            else `config=...`, else the built-in `glm_6b` preset; see glm6b.checkpoint.mindspore).
        device: where the parameters go; None means CUDA when available (bfloat16 there unless a
            dtype is given), else the CPU (float32).
        compile: the decode step's default for this model: True, False or "auto" (compiled on
            CUDA and for large models on the CPU; see glm6b.inference.engine).
        **kwargs: see `glm6b.checkpoint.hf.load_model` (dtype, quantize, config, ptuning_checkpoint, ...).

    Returns:
        The model in eval mode.
    """
    if compile not in (True, False, "auto"):
        raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
    model = hf.load_model(path, model_class=ChatGLM, device=default_device() if device is None else device,
                          **kwargs)
    model.compile_default = compile
    return model
