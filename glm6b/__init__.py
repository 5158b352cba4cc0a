"""glm6b: run and fine-tune ChatGLM-6B in plain PyTorch.

Names are re-exported lazily (module __getattr__) so that `import glm6b` and `glm6b --help` stay
fast: torch and friends load on first use of a name that needs them.
"""

import importlib

# name -> module that defines it
_EXPORTS = {
    "ChatGLMConfig": "config",
    "ConfigError": "config",
    "LoadConfig": "config",
    "GenerationConfig": "config",
    "DataConfig": "config",
    "LoraConfig": "config",
    "TrainingConfig": "config",
    "ParallelConfig": "config",
    "ChatGLMForConditionalGeneration": "model",
    "KVCache": "model",
    "StaticKVCache": "model",
    "InputError": "model",
    "ChatGLMTokenizer": "tokenizer",
    "TokenizerError": "tokenizer",
    "load_tokenizer": "tokenizer",
    "load": "api",
    "load_model": "api",
    "quantize_folder": "api",
    "ChatGLM": "api",
    "save_pretrained": "checkpoint.hf",
    "CheckpointError": "checkpoint.hf",
    "generate": "inference.generation",
    "TextStreamer": "inference.text",
    "DecodeEngine": "inference.engine",
    "build_prompt": "inference.chat",
    "process_response": "inference.text",
    "TextGenerationPipeline": "inference.pipelines",
    "pipeline": "auto",
    "AutoModel": "auto",
    "AutoTokenizer": "auto",
    "ModelNotFoundError": "checkpoint.names",
    "compute_metrics": "eval.metrics",
    "evaluate_generation": "eval.evaluate",
    "run_eval": "eval.evaluate",
    "adgen_train_features": "data.adgen",
    "adgen_eval_features": "data.adgen",
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
