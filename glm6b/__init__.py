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
    "StaticKVCache": "model",
    "InputError": "model",
    "ChatGLMTokenizer": "tokenizer",
    "TokenizerError": "tokenizer",
    "load_tokenizer": "tokenizer",
    "load_model": "api",
    "ChatGLM": "api",
    "save_pretrained": "checkpoint.hf",
    "CheckpointError": "checkpoint.hf",
    "generate": "inference.generation",
    "GenerationConfig": "inference.generation",
    "TextStreamer": "inference.generation",
    "DecodeEngine": "inference.engine",
    "build_prompt": "inference.chat",
    "process_response": "inference.chat",
    "pipeline": "inference.pipelines",
    "TextGenerationPipeline": "inference.pipelines",
    "AutoModel": "auto",
    "AutoTokenizer": "auto",
    "ModelNotFoundError": "auto",
    "compute_metrics": "eval.metrics",
    "evaluate_generation": "eval.evaluate",
    "run_eval": "eval.evaluate",
    "adgen_train_features": "train.data",
    "adgen_eval_features": "train.data",
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
