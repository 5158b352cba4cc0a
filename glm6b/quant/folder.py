"""Offline quantization of a model folder into THUDM's quantized layout (`glm6b quantize`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..checkpoint import hf
from ..io import atomic_write
from ..safety import check_output_dir


def quantize_folder(model: str | os.PathLike, output: str | os.PathLike, bits: int, embeddings: bool = False,
                    max_shard_size: int | str = "2GB") -> Path:
    """Write a float model folder quantized in THUDM's layout, loadable as it is.

    The output is what THUDM publishes as chatglm-6b-int8 / -int4 (-int4-qe with `embeddings`):
    config.json with ``quantization_bit`` (and ``quantization_embeddings``), ``pytorch_model.bin``
    (or shards plus their index) holding int8 ``weight`` and float16 ``weight_scale`` per quantized
    layer and float16 for everything else, and the input's other files (``ice_text.model``,
    ``tokenizer_config.json``, ...) copied unchanged. The float model is never held in memory:
    each layer is quantized as it is read.

    Args:
        model: the float model folder (HF THUDM/chatglm-6b layout).
        output: the folder to write (created; weight files of an earlier save are replaced).
        bits: 4 or 8.
        embeddings: also quantize the word embeddings and the tied lm_head (THUDM's int4-qe).
        max_shard_size: bytes per weight file (an int or e.g. "2GB").

    Returns:
        The output folder.

    Raises:
        CheckpointError: the input is unusable, or already quantized.
    """
    source, output = Path(model), Path(output)
    if output.exists() and source.resolve() == output.resolve():
        raise hf.CheckpointError(f"output {output} is the input folder; write the quantized model elsewhere")
    # Before the model loads: the output may hold an earlier quantization of this model, nothing else.
    copied = {path.name for path in source.iterdir() if path.is_file()} if source.is_dir() else set()
    check_output_dir(output, inputs=[source], overwrite=True, owned=set(hf.MODEL_FOLDER_FILES) | copied,
                     owned_prefixes=hf.MODEL_FOLDER_PREFIXES)
    quantized = hf.load_model(source, dtype=torch.float16, quantize=f"int{bits}", quantize_embeddings=embeddings)
    hf.save_pretrained(quantized, output, max_shard_size=max_shard_size, safe_serialization=False)
    skip = {hf.CONFIG_NAME, hf.WEIGHTS_INDEX_NAME, hf.SAFE_WEIGHTS_INDEX_NAME}
    for path in sorted(source.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.name in skip or hf.is_weight_file(path.name):
            continue
        atomic_write(output / path.name, lambda tmp, path=path: shutil.copyfile(path, tmp))
    return output
