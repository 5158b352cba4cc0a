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
from .inference.generation import generate
from .model import ChatGLMForConditionalGeneration


class ChatGLM(ChatGLMForConditionalGeneration):
    """ChatGLM-6B with the methods of THUDM's model class; its parameters and outputs are the math class's."""

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


def load_model(path: str | os.PathLike, **kwargs) -> ChatGLM:
    """Load a ChatGLM-6B checkpoint as a `ChatGLM` (chat/generate/save_pretrained included).

    Args:
        path: the model folder, or a MindSpore / MindFormers `.ckpt` file (config.json beside it,
            else `config=...`, else the built-in `glm_6b` preset; see glm6b.checkpoint.mindspore).
        **kwargs: see `glm6b.checkpoint.hf.load_model` (dtype, device, config, ptuning_checkpoint, ...).

    Returns:
        The model in eval mode.
    """
    return hf.load_model(path, model_class=ChatGLM, **kwargs)
