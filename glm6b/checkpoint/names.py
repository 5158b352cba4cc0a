"""Model names -> local checkpoints: `glm_6b` / `glm_6b_chat` / `glm_6b_lora` / `glm_6b_lora_chat`, a folder
or a `.ckpt` file.

Nothing is ever downloaded. A name is looked up as `$GLM6B_HOME/<name>` (default
`~/.cache/glm6b/<name>`); put the files of the HF repo THUDM/chatglm-6b there. `glm_6b_chat` names
the KV-cache inference use of the same weights (our generation always uses the cache), so it falls
back to the `glm_6b` folder when it has no folder of its own.

`glm_6b_lora` (MindFormers' name for ChatGLM-6B with LoRA) is a base + adapter pair: a PEFT adapter
folder in `$GLM6B_HOME/glm_6b_lora` over the base model in `$GLM6B_HOME/glm_6b` (what `glm6b convert
--input glm_6b_lora.ckpt --output $GLM6B_HOME/glm_6b --adapter-output $GLM6B_HOME/glm_6b_lora`
writes); `adapter_base` finds the base of such a folder. `glm_6b_lora_chat` falls back to it like
glm_6b_chat. A path to a MindSpore / MindFormers `.ckpt` file names that file, and so does a folder
holding one instead of HF weights (`$GLM6B_HOME/glm_6b/glm_6b.ckpt`, as MindFormers downloads it,
with ice_text.model beside it), and a folder holding a MindFormers sharded set (`rank_<r>/` and its
strategy file, merged while loading: glm6b.checkpoint.mindspore_shards).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .hf import WEIGHT_LAYOUTS, is_sharded_set

MODEL_NAMES = ("glm_6b", "glm_6b_chat", "glm_6b_lora", "glm_6b_lora_chat")
# A name whose own folder is missing is looked up under these names next.
_FALLBACKS = {"glm_6b": ("glm_6b",), "glm_6b_chat": ("glm_6b_chat", "glm_6b"),
              "glm_6b_lora": ("glm_6b_lora",), "glm_6b_lora_chat": ("glm_6b_lora_chat", "glm_6b_lora")}
_ADAPTER_CONFIG = "adapter_config.json"
_HF_FILES = "config.json, pytorch_model-*.bin (+ pytorch_model.bin.index.json), ice_text.model, tokenizer_config.json"


class ModelNotFoundError(FileNotFoundError):
    """No local checkpoint for a model name or path; the message says where to put the files."""


def models_home() -> Path:
    """The folder holding named models: $GLM6B_HOME, or ~/.cache/glm6b."""
    home = os.environ.get("GLM6B_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "glm6b"


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """The local folder for a model name (see MODEL_NAMES), an existing folder or a `.ckpt` file path.

    Args:
        name_or_path: a folder path, a MindSpore `.ckpt` file, or one of MODEL_NAMES (looked up
            under `models_home()`).

    Returns:
        The folder (or the `.ckpt` file).

    Raises:
        ModelNotFoundError: the path does not exist and is not a known name, or the named model's
            folder is missing; the message says which files to put where.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _ckpt_in(path)
    if path.suffix == ".ckpt" and path.is_file():
        return path
    name = os.fspath(name_or_path)
    if name in _FALLBACKS:
        home = models_home()
        for candidate in _FALLBACKS[name]:
            if (home / candidate).is_dir():
                return _ckpt_in(home / candidate)
        raise ModelNotFoundError(
            f"model {name!r} not found: expected a folder {home / name}"
            + (f" (or {home / 'glm_6b'})" if name != "glm_6b" else "")
            + f" holding the files of the HF repo THUDM/chatglm-6b ({_HF_FILES}); nothing is downloaded. "
            f"Set GLM6B_HOME to use another folder than {home}")
    raise ModelNotFoundError(
        f"model {name!r} not found: it is neither an existing folder nor a known model name "
        f"({', '.join(MODEL_NAMES)}, looked up under GLM6B_HOME={models_home()}); a model folder holds the "
        f"files of the HF repo THUDM/chatglm-6b ({_HF_FILES})")


def _ckpt_in(folder: Path) -> Path:
    """A folder without HF weights but with a MindSpore checkpoint (MindFormers' download folder holds
    glm_6b.ckpt beside ice_text.model) means that file: `<folder name>.ckpt`, else its only `.ckpt`."""
    if any((folder / name).is_file() for name in (*WEIGHT_LAYOUTS, _ADAPTER_CONFIG)) or is_sharded_set(folder):
        return folder  # a MindFormers sharded set (rank_*/) loads as the folder, its strategy .ckpt beside it
    ckpts = sorted(folder.glob("*.ckpt"))
    if (folder / f"{folder.name}.ckpt").is_file():
        return folder / f"{folder.name}.ckpt"
    return ckpts[0] if len(ckpts) == 1 else folder


def adapter_base(adapter: Path) -> Path:
    """The base model of an adapter folder: its recorded base_model_name_or_path if that is a local
    checkpoint, else the named `glm_6b` model.

    Raises:
        ModelNotFoundError: neither exists.
    """
    try:
        recorded = json.loads((adapter / _ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded and (Path(recorded).is_dir() or Path(recorded).suffix == ".ckpt" and Path(recorded).is_file()):
        return Path(recorded)
    return resolve_model_path("glm_6b")
