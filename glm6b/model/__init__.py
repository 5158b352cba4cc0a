"""The ChatGLM-6B network: the math (model.py), the prefix-LM mask rule (masks.py) and KV caches (cache.py)."""

from .cache import KVCache, PrefixPast, StaticKVCache
from .masks import InputError, build_mask_and_positions, prompt_inputs
from .model import (GLU, CausalLMOutput, ChatGLMForConditionalGeneration, ChatGLMModel, GLMBlock, PrefixEncoder,
                    SelfAttention, apply_rotary, attention, gelu, rotary_cos_sin, rotary_inv_freq, rotate_half)

__all__ = ["CausalLMOutput", "ChatGLMForConditionalGeneration", "ChatGLMModel", "GLMBlock", "GLU", "InputError",
           "KVCache", "PrefixEncoder", "PrefixPast", "SelfAttention", "StaticKVCache", "apply_rotary", "attention",
           "build_mask_and_positions", "gelu", "prompt_inputs", "rotary_cos_sin", "rotary_inv_freq", "rotate_half"]
