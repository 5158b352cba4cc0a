"""Writing a quantized model as a folder in THUDM's quantized layout (what `glm6b quantize` writes)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from torch import nn

from ..io import atomic_write
from ..safety import check_output_dir
from . import hf


def check_quantized_output(source: str | os.PathLike | None, output: str | os.PathLike) -> None:
    """Refuse an output folder that is the source folder or holds files a quantized folder does not write
    (checked before the model loads).

    Raises:
        CheckpointError: the output is the source folder.
        OutputError: the output holds other files, or contains the source.
    """
    output = Path(output)
    source = Path(source) if source is not None else None
    if source is not None and output.exists() and source.resolve() == output.resolve():
        raise hf.CheckpointError(f"output {output} is the input folder; write the quantized model elsewhere")
    # The output may hold an earlier quantization of this model, nothing else.
    copied = {path.name for path in source.iterdir() if path.is_file()} if source is not None and source.is_dir() \
        else set()
    check_output_dir(output, inputs=[source] if source is not None else [], overwrite=True,
                     owned=set(hf.MODEL_FOLDER_FILES) | copied, owned_prefixes=hf.MODEL_FOLDER_PREFIXES)


def save_quantized_folder(model: nn.Module, output: str | os.PathLike, source: str | os.PathLike | None = None,
                          max_shard_size: int | str = "2GB") -> Path:
    """Write a quantized model in THUDM's layout, loadable as it is (by glm6b and by THUDM's own code).

    The output is what THUDM publishes as chatglm-6b-int8 / -int4 (-int4-qe with quantized
    embeddings): config.json with ``quantization_bit`` (and ``quantization_embeddings``),
    ``pytorch_model.bin`` (or shards plus their index) holding int8 ``weight`` and float16
    ``weight_scale`` per quantized layer and the model's dtype for everything else, and the source
    folder's other files (``ice_text.model``, ``tokenizer_config.json``, ...) copied unchanged.

    Args:
        model: a model whose layers glm6b.quant quantized (config.quantization_bit set).
        output: the folder to write (created; weight files of an earlier save are replaced).
        source: the folder the model was read from, whose other files are copied.
        max_shard_size: bytes per weight file (an int or e.g. "2GB").

    Returns:
        The output folder.
    """
    output = Path(output)
    hf.save_pretrained(model, output, max_shard_size=max_shard_size, safe_serialization=False)
    if source is None or not Path(source).is_dir():
        return output
    skip = {hf.CONFIG_NAME, hf.WEIGHTS_INDEX_NAME, hf.SAFE_WEIGHTS_INDEX_NAME}
    for path in sorted(Path(source).iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.name in skip or hf.is_weight_file(path.name):
            continue
        atomic_write(output / path.name, lambda tmp, path=path: shutil.copyfile(path, tmp))
    return output
