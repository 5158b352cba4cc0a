"""Model configuration: the fields of the HF ChatGLM-6B config.json, plus named presets."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration file or value that cannot be used; the message names the field."""


@dataclass
class ChatGLMConfig:
    """Architecture of a ChatGLM-6B (v1) model; one field per key of the HF `config.json`.

    The defaults are those of the *real* checkpoint's config.json (vocab 130528, bos 130004, ...),
    not the reference config class's defaults, which still describe the pre-2023-04 vocabulary of
    150528 ids (spec Appendix A.14).
    """

    vocab_size: int = 130528
    hidden_size: int = 4096
    num_layers: int = 28
    num_attention_heads: int = 32
    inner_hidden_size: int = 16384  # MLP width; set explicitly, not derived from hidden_size
    layernorm_epsilon: float = 1e-5
    max_sequence_length: int = 2048  # stored only; nothing in the model enforces it
    position_encoding_2d: bool = True
    bos_token_id: int = 130004  # <sop>
    eos_token_id: int = 130005  # <eop>
    mask_token_id: int = 130000  # [MASK]
    gmask_token_id: int = 130001  # [gMASK]
    pad_token_id: int = 3  # <pad>
    use_cache: bool = True
    quantization_bit: int = 0  # 4 or 8: THUDM's weight-only quantized layout (chatglm-6b-int4/-int8)
    quantization_embeddings: bool = False  # THUDM's int4-qe: word embeddings (and the tied lm_head) quantized too
    pre_seq_len: int | None = None  # P-tuning v2 prefix length
    prefix_projection: bool = False  # P-tuning v2 MLP re-parameterisation
    torch_dtype: str | None = "float16"  # informative only: the dtype the weights were saved in
    tie_word_embeddings: bool = True  # the reference ties lm_head to word_embeddings on load
    model_type: str = "chatglm"
    architectures: list[str] = field(default_factory=lambda: ["ChatGLMModel"])
    # Keys we keep only so that a config.json round-trips unchanged (auto_map, _name_or_path, ...).
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        """Raise ConfigError naming the first impossible value."""

        def need(ok: bool, key: str, expected: str) -> None:
            if not ok:
                raise ConfigError(f"config field '{key}' = {getattr(self, key)!r}: expected {expected}")

        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        # Types first, so that the value checks below never compare a string or a bool with a number.
        for key in _BOOL_FIELDS:
            need(isinstance(getattr(self, key), bool), key, "true or false (a JSON boolean, not a string)")
        for key in _INT_FIELDS:
            need(is_int(getattr(self, key)), key, "an integer")
        need(isinstance(self.layernorm_epsilon, (int, float)) and not isinstance(self.layernorm_epsilon, bool),
             "layernorm_epsilon", "a positive number")
        need(self.pre_seq_len is None or is_int(self.pre_seq_len), "pre_seq_len", "null or a positive integer")
        need(self.torch_dtype is None or isinstance(self.torch_dtype, str), "torch_dtype",
             "null or a dtype name such as \"float16\"")
        need(self.model_type == "chatglm", "model_type",
             "\"chatglm\" (a ChatGLM-6B config.json); other model families are not supported")
        need(isinstance(self.architectures, list) and all(isinstance(a, str) for a in self.architectures),
             "architectures", "a list of class names")
        for key in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "inner_hidden_size"):
            need(getattr(self, key) > 0, key, "a positive integer")
        need(self.hidden_size % self.num_attention_heads == 0, "hidden_size",
             f"a multiple of num_attention_heads ({self.num_attention_heads})")
        # 2D RoPE rotates each half of a head with pairs (i, i + d/4): d must be a multiple of 4.
        need(self.head_dim % 4 == 0, "hidden_size",
             f"hidden_size / num_attention_heads to be a multiple of 4 (head dim is {self.head_dim})")
        need(self.layernorm_epsilon > 0, "layernorm_epsilon", "a positive number")
        need(self.position_encoding_2d is True, "position_encoding_2d",
             "true: ChatGLM-6B uses 2D rotary positions (the reference's unused 1D variant is not implemented)")
        for key in ("bos_token_id", "eos_token_id", "mask_token_id", "gmask_token_id", "pad_token_id"):
            value = getattr(self, key)
            need(isinstance(value, int) and 0 <= value < self.vocab_size, key,
                 f"a token id in [0, vocab_size={self.vocab_size})")
        need(self.quantization_bit in (0, 4, 8) and not isinstance(self.quantization_bit, bool), "quantization_bit",
             "0 (float weights), 4 or 8 (THUDM's quantized layout)")
        need(isinstance(self.quantization_embeddings, bool), "quantization_embeddings", "true or false")
        need(not self.quantization_embeddings or self.quantization_bit != 0, "quantization_embeddings",
             "false when quantization_bit is 0")
        need(self.pre_seq_len is None or (isinstance(self.pre_seq_len, int) and self.pre_seq_len > 0),
             "pre_seq_len", "null or a positive integer")

    # ------------------------------------------------------------------ config.json I/O

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "ChatGLMConfig":
        """Build a config from a config.json dict; unknown keys are kept in `extra`."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        if "num_hidden_layers" in extra and "num_layers" not in data:
            raise ConfigError(f"{source}: has 'num_hidden_layers' but ChatGLM-6B uses 'num_layers'")
        try:
            return cls(**kwargs, extra=extra)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "ChatGLMConfig":
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object at the top level")
        return cls.from_dict(data, source=path)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ChatGLMConfig":
        """A named preset (see PRESETS), with optional field overrides."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        for key in ("pre_seq_len", "quantization_bit", "quantization_embeddings"):  # omitted when unused
            if not data[key]:
                data.pop(key)
        if not data["prefix_projection"] and "pre_seq_len" not in data:
            data.pop("prefix_projection")
        return {**self.extra, **data}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    def replace(self, **changes: Any) -> "ChatGLMConfig":
        return dataclasses.replace(self, **changes)


_BOOL_FIELDS = ("position_encoding_2d", "use_cache", "prefix_projection", "tie_word_embeddings")
_INT_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "inner_hidden_size",
               "max_sequence_length", "bos_token_id", "eos_token_id", "mask_token_id", "gmask_token_id",
               "pad_token_id", "quantization_bit")

# Named presets. `glm_6b` is the real THUDM/chatglm-6b shape (6.2B parameters); the small ones keep
# the real special-token layout scaled down so that tests and benchmarks run on a laptop CPU.
PRESETS: dict[str, dict[str, Any]] = {
    "glm_6b": {},
    # Same token ids as the golden test checkpoint (vocab of 1144 SentencePiece pieces, 1208 rows).
    "tiny": dict(vocab_size=1208, hidden_size=128, num_layers=3, num_attention_heads=4, inner_hidden_size=320,
                 max_sequence_length=512, bos_token_id=804, eos_token_id=805, mask_token_id=800,
                 gmask_token_id=801, pad_token_id=3),
    # A few hundred MB in float32: for loading and training benchmarks on CPU.
    "small": dict(vocab_size=130528, hidden_size=512, num_layers=6, num_attention_heads=8, inner_hidden_size=2048,
                  max_sequence_length=2048),
    # The 6B width with 4 layers: per-layer speed and memory of the real shape on modest hardware.
    "glm_6b_4layers": dict(num_layers=4),
}
