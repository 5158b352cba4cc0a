"""What users call: `load`, the one way every command, the server, evaluation and training load a model,
`load_model` (its shorthand for a path), and the model class with THUDM's conveniences (chat,
stream_chat, generate, save_pretrained).

    loaded = load(LoadConfig(load_checkpoint="glm_6b", quantize="int4"))   # model, tokenizer, name
    model = load_model("path/to/chatglm-6b", dtype=torch.bfloat16)

`load` takes a glm6b.config.LoadConfig, decides every default once (`resolve`: the model name ->
folder, the base of an adapter folder, the device, the dtype, the tokenizer folder), checks the
tokenizer against the model's config.json before any weight is read, and then reads the weights
(glm6b.checkpoint.hf), builds a random model of a preset, applies and merges a LoRA adapter, and
quantizes where asked.

The conveniences live here, not in `model/`, so the model's math never imports generation, chat or
checkpoint code (imports point down only; see tests/test_layering.py).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from .checkpoint import hf
from .checkpoint.adapters import check_adapter_folder, is_adapter_folder, load_adapter
from .checkpoint.mindspore import is_ckpt_file
from .checkpoint.names import adapter_base, resolve_model_path
from .checkpoint.quantized import check_quantized_output, save_quantized_folder
from .config import ChatGLMConfig, ConfigError, LoadConfig, check_compile, quantize_bits
from .inference.chat import chat, stream_chat
from .inference.generation import generate
from .model import ChatGLMForConditionalGeneration
from .quant.linear import quantize_model
from .tokenizer import ChatGLMTokenizer, check_tokenizer_matches, load_tokenizer


class ChatGLM(ChatGLMForConditionalGeneration):
    """ChatGLM-6B with the methods of THUDM's model class; its parameters and outputs are the math class's.

    Attributes:
        compile_default: what `chat`, `stream_chat` and `generate` pass as `compile` when the call
            does not (set by `load(LoadConfig(compile=...))`; see glm6b.inference.engine).
    """

    compile_default: bool | str = "auto"

    def chat(self, tokenizer, query: str, history=None, **kwargs):
        """Answer `query` given earlier (query, response) rounds; see `glm6b.inference.chat.chat`."""
        return chat(self, tokenizer, query, history, **{"compile": self.compile_default, **kwargs})

    def stream_chat(self, tokenizer, query: str, history=None, **kwargs):
        """Yield (partial response, history) as the answer grows; see `glm6b.inference.chat.stream_chat`."""
        return stream_chat(self, tokenizer, query, history, **{"compile": self.compile_default, **kwargs})

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Generate continuations with the KV cache; see `glm6b.inference.generation.generate`."""
        if kwargs.get("generation_config") is None:
            kwargs.setdefault("compile", self.compile_default)
        return generate(self, input_ids, **kwargs)

    def save_pretrained(self, directory, **kwargs) -> None:
        """Write an HF-format folder (config.json + safetensors); see `glm6b.checkpoint.hf.save_pretrained`."""
        hf.save_pretrained(self, directory, **kwargs)


class Loaded(NamedTuple):
    """What `load` returns: the model (a ChatGLM, or a PeftModel around one for a trainable adapter),
    its tokenizer (None for a preset without a tokenizer folder) and the name to report it under."""

    model: torch.nn.Module
    tokenizer: ChatGLMTokenizer | None
    name: str


@dataclass(frozen=True)
class ResolvedLoad:
    """A LoadConfig with every default decided (see `resolve`).

    Attributes:
        spec: the LoadConfig it came from.
        checkpoint: the model folder or `.ckpt` file to read; None builds a random `spec.preset` model.
        adapter: the LoRA adapter folder to apply, or None.
        tokenizer: the folder to load the tokenizer from, or None.
        config_file: the config.json to check the tokenizer against before the weights load, or None.
        device, dtype: where and in which dtype the parameters go.
        name: what the model is called (the folder's or the preset's name).
    """

    spec: LoadConfig
    checkpoint: Path | None
    adapter: Path | None
    tokenizer: Path | None
    config_file: Path | None
    device: torch.device
    dtype: torch.dtype
    name: str


def resolve(spec: LoadConfig, default_dtype: torch.dtype | str | None = None) -> ResolvedLoad:
    """Decide every default of `spec` once: the checkpoint (a model name's folder, the base of an
    adapter folder), the adapter, the tokenizer folder, the device and the dtype.

    Args:
        spec: what to load.
        default_dtype: the dtype when spec.dtype is None (training: float32 for full fine-tuning,
            bfloat16 under an adapter or prefix); None: glm6b.checkpoint.hf.default_dtype's rule
            (bfloat16 on CUDA, float32 on the CPU, bfloat16 for a quantized model where glm6b's CPU
            kernels run).

    Returns:
        The ResolvedLoad.

    Raises:
        ModelNotFoundError: no such folder or model name.
        ConfigError / CheckpointError: neither a checkpoint nor a preset, or an unusable adapter.
        ValueError: a device this machine does not have.
    """
    adapter = Path(spec.adapter) if spec.adapter is not None else None
    if spec.load_checkpoint is not None:
        checkpoint = resolve_model_path(spec.load_checkpoint)
        if is_adapter_folder(checkpoint):  # a LoRA adapter folder (glm_6b_lora): its base, with the adapter
            if adapter is not None:
                raise ConfigError(f"model {spec.load_checkpoint} is a LoRA adapter folder and an adapter "
                                  f"{adapter} is given too; pass the base model and one adapter")
            checkpoint, adapter = adapter_base(checkpoint), checkpoint
        name = checkpoint.stem if checkpoint.is_file() else checkpoint.name
    elif spec.preset is not None:
        checkpoint, name = None, spec.preset
    else:
        raise ConfigError("no model: set model.load_checkpoint (a model folder or name, --model) or model.preset "
                          "(a randomly initialised model)")
    if adapter is not None:
        check_adapter_folder(adapter)
    folder = None if checkpoint is None else checkpoint.parent if checkpoint.is_file() else checkpoint
    tokenizer = Path(spec.tokenizer) if spec.tokenizer is not None else folder
    config_file = Path(spec.config) if spec.config is not None else None
    if config_file is None and folder is not None and (folder / hf.CONFIG_NAME).is_file():
        config_file = folder / hf.CONFIG_NAME
    device = hf.check_device(spec.device if spec.device is not None else hf.default_device())
    dtype = spec.dtype or default_dtype
    if dtype is None:
        quantized = bool(spec.quantize) or (config_file is not None and checkpoint is not None
                                            and ChatGLMConfig.from_json_file(config_file).quantization_bit > 0)
        dtype = hf.default_dtype(device, quantized)
    return ResolvedLoad(spec, checkpoint, adapter, tokenizer, config_file, device, hf.as_dtype(dtype), name)


def load(spec: LoadConfig | str | os.PathLike, *, default_dtype: torch.dtype | str | None = None,
         trainable_adapter: bool = False, with_tokenizer: bool = True) -> Loaded:
    """Load the model (and its tokenizer) that `spec` describes: the one loading path of glm6b.

    Steps: `resolve` the spec; load the tokenizer and check it against the model's config.json; read the
    weights (or build a random preset model); apply the LoRA adapter (merged for inference, kept apart
    and trainable with `trainable_adapter`); quantize (after a merge, the merged float weights).

    Args:
        spec: a LoadConfig, or a model folder / `.ckpt` file / model name.
        default_dtype: see `resolve`.
        trainable_adapter: keep the adapter a trainable PEFT layer (continuing its training); the
            result is then the PeftModel.
        with_tokenizer: load the tokenizer too.

    Returns:
        Loaded(model, tokenizer, name): the model in eval mode (`compile_default` from spec.compile).

    Raises:
        ModelNotFoundError, CheckpointError, ConfigError, TokenizerError: unusable files or settings
            (each a one-line message naming the file or field).
    """
    if not isinstance(spec, LoadConfig):
        spec = LoadConfig(load_checkpoint=os.fspath(spec))
    resolved = resolve(spec, default_dtype)
    tokenizer = None
    if with_tokenizer and resolved.tokenizer is not None:
        tokenizer = load_tokenizer(resolved.tokenizer)
        if resolved.config_file is not None:  # before minutes of loading weights
            check_tokenizer_matches(tokenizer, ChatGLMConfig.from_json_file(resolved.config_file),
                                    spec.load_checkpoint or spec.preset)
    merge = resolved.adapter is not None and spec.merge_adapter and not trainable_adapter
    model = _read_model(resolved, quantize=None if merge else spec.quantize)
    if resolved.adapter is not None:
        model = load_adapter(model, resolved.adapter, is_trainable=trainable_adapter)
        if merge:
            model = model.merge_and_unload()
            if spec.quantize:  # merging into quantized weights is impossible: quantize the merged ones
                quantize_model(model, quantize_bits(spec.quantize), embeddings=spec.quantize_embeddings)
    if tokenizer is not None and resolved.config_file is None:
        check_tokenizer_matches(tokenizer, model.config, spec.load_checkpoint or spec.preset)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.compile_default = spec.compile
    return Loaded(model.eval(), tokenizer, resolved.name)


def _read_model(resolved: ResolvedLoad, quantize: str | None) -> ChatGLM:
    """The model's weights: read from the checkpoint, or a random model of the preset."""
    spec = resolved.spec
    if resolved.checkpoint is not None:
        return hf.load_model(resolved.checkpoint, dtype=resolved.dtype, device=resolved.device,
                             ptuning_checkpoint=spec.ptuning_checkpoint, pre_seq_len=spec.pre_seq_len,
                             prefix_projection=spec.prefix_projection if spec.pre_seq_len else None,
                             quantize=quantize, quantize_embeddings=spec.quantize_embeddings and bool(quantize),
                             config=spec.config if is_ckpt_file(resolved.checkpoint) else None, model_class=ChatGLM)
    config = ChatGLMConfig.from_name(spec.preset, pre_seq_len=spec.pre_seq_len,
                                     prefix_projection=bool(spec.pre_seq_len and spec.prefix_projection))
    model = ChatGLM(config, dtype=resolved.dtype, device="meta")
    model.to_empty(device=resolved.device)
    model.tie_weights()  # to_empty makes new tensors: tie them again
    model.init_weights()
    if config.pre_seq_len:
        model.transformer.prefix_encoder.float()  # trained in float32, as the reference recipe does
        if spec.ptuning_checkpoint:
            hf.load_ptuning_state(model, spec.ptuning_checkpoint)
    if quantize:
        quantize_model(model, quantize_bits(quantize), embeddings=spec.quantize_embeddings)
    return model.eval()


def load_model(path: str | os.PathLike, device=None, compile: bool | str = "auto", **kwargs) -> ChatGLM:
    """Load a ChatGLM-6B checkpoint as a `ChatGLM` (chat/generate/save_pretrained included): `load` for a path.

    Args:
        path: the model folder (or a model name), or a MindSpore / MindFormers `.ckpt` file
            (config.json beside it, else `config=...`, else the built-in `glm_6b` preset; see
            glm6b.checkpoint.mindspore).
        device: where the parameters go; None means CUDA when available (bfloat16 there unless a
            dtype is given), else the CPU (float32).
        compile: the decode step's default for this model: True, False or "auto" (compiled on
            CUDA and for large models on the CPU; see glm6b.inference.engine).
        **kwargs: other LoadConfig fields (dtype, quantize, quantize_embeddings, adapter, config,
            ptuning_checkpoint, pre_seq_len, prefix_projection); dtype may be a torch.dtype.

    Returns:
        The model in eval mode.
    """
    check_compile(compile)
    dtype = kwargs.pop("dtype", None)
    if isinstance(kwargs.get("config"), (str, os.PathLike)):
        kwargs["config"] = os.fspath(kwargs["config"])
    names = {f.name for f in dataclasses.fields(LoadConfig)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise TypeError(f"load_model() got unexpected argument(s) {', '.join(unknown)}")
    spec = LoadConfig(load_checkpoint=os.fspath(path), device=None if device is None else str(device),
                      compile=compile, **kwargs)
    return load(spec, default_dtype=dtype, with_tokenizer=False).model


def quantize_folder(model: LoadConfig | str | os.PathLike, output: str | os.PathLike, quantize: str | None = None,
                    embeddings: bool = False, max_shard_size: int | str = "2GB") -> Path:
    """Load a float model quantized (THUDM's per-row int8 / int4) and write it as a folder in THUDM's
    quantized layout (`glm6b quantize`; see glm6b.checkpoint.quantized.save_quantized_folder).

    Each float weight is quantized as it is read, so the float model is never held whole (with a LoRA
    adapter, the merged float weights are quantized).

    Args:
        model: what to load (a LoadConfig with quantize set, or a float model folder / name).
        output: the folder to write.
        quantize: "int8" or "int4"; None takes model.quantize.
        embeddings: also quantize the word embeddings and the tied lm_head (THUDM's int4-qe).
        max_shard_size: bytes per weight file (an int or e.g. "2GB").

    Returns:
        The output folder.

    Raises:
        CheckpointError: the input is unusable, already quantized, or is the output.
        OutputError: the output holds other files.
    """
    spec = model if isinstance(model, LoadConfig) else LoadConfig(load_checkpoint=os.fspath(model))
    if quantize is not None or embeddings:
        spec = dataclasses.replace(spec, quantize=quantize or spec.quantize,
                                   quantize_embeddings=embeddings or spec.quantize_embeddings)
    if not spec.quantize:
        raise ConfigError("quantize: say how many bits (--quantize int4 or int8)")
    resolved = resolve(spec, default_dtype="float16")
    source = resolved.checkpoint.parent if resolved.checkpoint and resolved.checkpoint.is_file() \
        else resolved.checkpoint
    if resolved.config_file is not None and ChatGLMConfig.from_json_file(resolved.config_file).quantization_bit:
        raise hf.CheckpointError(f"{resolved.config_file}: the weights are already quantized (quantization_bit); "
                                 f"quantize the float model")
    check_quantized_output(source, output)
    quantized = load(spec, default_dtype="float16", with_tokenizer=False).model
    return save_quantized_folder(quantized, output, source, max_shard_size=max_shard_size)
