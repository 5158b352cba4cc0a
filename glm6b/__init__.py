"""glm6b: run and fine-tune ChatGLM-6B in plain PyTorch.

Names are re-exported lazily (module __getattr__) so that `import glm6b` and `glm6b --help` stay
fast: torch and friends load on first use of a name that needs them.
"""

import importlib

# name -> module that defines it
_EXPORTS = {
    "ChatGLMConfig": "config",
    "ConfigError": "config",
    "ChatGLMForConditionalGeneration": "model",
    "KVCache": "model",
    "InputError": "model",
    "ChatGLMTokenizer": "tokenizer",
    "TokenizerError": "tokenizer",
    "load_tokenizer": "tokenizer",
    "load_model": "checkpoint",
    "save_pretrained": "checkpoint",
    "CheckpointError": "checkpoint",
    "generate": "generation",
    "GenerationConfig": "generation",
    "TextStreamer": "generation",
    "build_prompt": "chat",
    "process_response": "chat",
    "pipeline": "pipelines",
    "TextGenerationPipeline": "pipelines",
    "AutoModel": "auto",
    "AutoTokenizer": "auto",
    "ModelNotFoundError": "auto",
    "compute_metrics": "metrics",
    "evaluate_generation": "evaluate",
    "run_eval": "evaluate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'glm6b' has no attribute {name!r}")


def __dir__():
    return __all__
