"""Inference by model name, as MindFormers and transformers offer it: `AutoModel` / `AutoTokenizer`
(`from_pretrained("glm_6b")`) and `pipeline("text_generation", model="glm_6b_chat")`.

A name is a folder under $GLM6B_HOME (default ~/.cache/glm6b) holding the files of the HF repo
THUDM/chatglm-6b; nothing is ever downloaded (see glm6b.checkpoint.names for the names and their
fall-backs). A LoRA adapter folder (`glm_6b_lora`) loads merged into its base. Every model is loaded by
glm6b.api.load.
"""

from __future__ import annotations

import os

from .api import ChatGLM, load
from .checkpoint.adapters import is_adapter_folder
from .checkpoint.names import MODEL_NAMES, ModelNotFoundError, adapter_base, models_home, resolve_model_path
from .config import LoadConfig
from .inference.pipelines import OUTPUT_KEY, TextGenerationPipeline
from .tokenizer import VOCAB_NAME, ChatGLMTokenizer, load_tokenizer

__all__ = ["AutoModel", "AutoTokenizer", "MODEL_NAMES", "ModelNotFoundError", "OUTPUT_KEY", "models_home",
           "pipeline", "resolve_model_path"]

SUPPORTED_TASKS = ("text_generation",)


class AutoModel:
    """Load a ChatGLM-6B model by name or folder (`AutoModel.from_pretrained("glm_6b")`)."""

    @staticmethod
    def from_pretrained(name_or_path: str | os.PathLike, dtype=None, device=None, **kwargs) -> ChatGLM:
        """Load the model from a folder or a named folder under GLM6B_HOME (glm6b.api.load).

        Args:
            name_or_path: folder path or model name (see glm6b.checkpoint.names.resolve_model_path).
            dtype: parameter dtype (None: bfloat16 on CUDA; on the CPU float32, or bfloat16 for a
                quantized model where glm6b's kernels run).
            device: where to put the parameters (default: CUDA when available, else the CPU).
            **kwargs: other glm6b.config.LoadConfig fields (quantize, adapter, ptuning_checkpoint,
                pre_seq_len, compile, ...).

        Returns:
            A `glm6b.ChatGLM` (chat, stream_chat, generate) in eval mode.

        Raises:
            ModelNotFoundError: no such folder or name. CheckpointError/ConfigError: unusable files.
        """
        spec = LoadConfig(load_checkpoint=os.fspath(name_or_path), device=None if device is None else str(device),
                          **kwargs)
        return load(spec, default_dtype=dtype, with_tokenizer=False).model


class AutoTokenizer:
    """Load the tokenizer of a named model or a folder (`AutoTokenizer.from_pretrained("glm_6b")`)."""

    @staticmethod
    def from_pretrained(name_or_path: str | os.PathLike) -> ChatGLMTokenizer:
        """Load `ice_text.model` (and `tokenizer_config.json`) from a folder or a named model.

        Args:
            name_or_path: folder path or model name (see glm6b.checkpoint.names.resolve_model_path).

        Returns:
            A ChatGLMTokenizer.

        Raises:
            ModelNotFoundError: no such folder or name. TokenizerError: unusable tokenizer files.
        """
        path = resolve_model_path(name_or_path)
        if is_adapter_folder(path) and not (path / VOCAB_NAME).is_file():
            path = adapter_base(path)
        return load_tokenizer(path)


def pipeline(task: str, model=None, tokenizer=None, batch_size: int = 8, dtype=None, device=None,
             **gen) -> TextGenerationPipeline:
    """Build a pipeline for a task.

    Args:
        task: "text_generation" (also accepted: "text-generation").
        model: a model object, a folder path, or a model name ("glm_6b", "glm_6b_chat"; looked up
            under $GLM6B_HOME). None means "glm_6b".
        tokenizer: a tokenizer object, folder path or name; None loads it from the model's folder
            (required when `model` is an object).
        batch_size: prompts per generate call.
        dtype, device: used when the model is loaded from a folder or name.
        **gen: default generation options (see TextGenerationPipeline).

    Returns:
        The pipeline.

    Raises:
        ValueError: unknown task, or a model object without a tokenizer.
        ModelNotFoundError: a model name/folder that does not exist locally.
    """
    if task.replace("-", "_") not in SUPPORTED_TASKS:
        raise ValueError(f"unknown pipeline task {task!r}; supported: {', '.join(SUPPORTED_TASKS)} "
                         f"(also spelled 'text-generation')")
    if model is None:
        model = "glm_6b"
    if isinstance(model, (str, os.PathLike)):
        if tokenizer is None:
            tokenizer = model
        model = AutoModel.from_pretrained(model, dtype=dtype, device=device)
    elif tokenizer is None:
        raise ValueError("pipeline: pass tokenizer=... along with a model object (or pass a model folder or name)")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    return TextGenerationPipeline(model, tokenizer, batch_size=batch_size, **gen)
