"""Model configuration: the fields of the HF ChatGLM-6B config.json, plus named presets."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal


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


# =================================================================================== run settings
#
# The settings a user writes (a recipe section, the flags of a command) are dataclasses named
# `<What>Config`, all here, with no import of torch, so that `glm6b --help` and reading a recipe stay
# fast. Each field is documented in its class's "Attributes:" section; the command line takes those
# texts as the flags' help (glm6b.cli). The names of the first releases stay as aliases for one release
# (ModelArguments, LoraArguments, TrainingArguments, QuickstartSettings).

DTYPE_NAMES = ("float32", "bfloat16", "float16")
QUANTIZE_NAMES = ("int8", "int4")
COMPILE_CHOICES = (True, False, "auto")


class DataError(ConfigError):
    """Unusable data or data settings: the message names the file, the line (or field) and what is wrong."""


class TrainerError(ConfigError):
    """A training setup that cannot work; the message names the setting."""


def quantize_bits(quantize: str | int | None) -> int:
    """The bit width of a quantize setting: None / "none" -> 0, "int8" / 8 -> 8, "int4" / 4 -> 4.

    Raises:
        ValueError: anything else.
    """
    names = {None: 0, "none": 0, "int8": 8, "int4": 4, 8: 8, 4: 4}
    key = quantize.lower() if isinstance(quantize, str) else quantize
    if isinstance(quantize, bool) or key not in names:
        raise ValueError(f"quantize = {quantize!r}: expected None, 'int8' or 'int4'")
    return names[key]


def check_compile(value: Any) -> None:
    """Raise ValueError unless `value` is a compile setting: True, False or "auto"."""
    if not any(value is choice or value == choice and type(value) is type(choice) for choice in COMPILE_CHOICES):
        raise ValueError(f"compile must be True, False or 'auto', got {value!r}")


@dataclass
class LoadConfig:
    """Which model to load and how: the `model:` section of a recipe and the model flags of every command
    that loads one. `glm6b.api.load(LoadConfig(...))` resolves it once and loads it.

    Attributes:
        load_checkpoint: model folder (the HF THUDM/chatglm-6b files), MindSpore .ckpt file, or model
            name (glm_6b, glm_6b_chat, glm_6b_lora: looked up under $GLM6B_HOME, default ~/.cache/glm6b).
        preset: without load_checkpoint: a randomly initialised model of this preset (tiny, small,
            glm_6b, ...), for training from scratch.
        tokenizer: tokenizer folder (default: the model's folder, or the folder of a .ckpt file).
        config: config.json for a MindSpore .ckpt model (default: beside it, else the glm_6b preset).
        dtype: parameter dtype: float32, bfloat16 or float16 (default: bfloat16 on CUDA; on the CPU
            float32, or bfloat16 for a quantized model where glm6b's CPU kernels run; training:
            float32 for full fine-tuning, bfloat16 for the frozen base of LoRA and P-tuning).
        device: cpu, cuda, cuda:1, ... (default: CUDA when available, else the CPU).
        quantize: int8 or int4: weight-only quantize the block Linear layers while loading (THUDM's
            per-row scheme); a folder already quantized (quantization_bit in config.json) loads
            quantized without it.
        quantize_embeddings: with quantize: also the word embeddings and the tied lm_head (THUDM's int4-qe).
        adapter: a PEFT LoRA adapter folder to apply.
        merge_adapter: fold the adapter into the weights for inference (a quantized model is quantized
            after the merge); false keeps it a separate PEFT layer (training always does).
        pre_seq_len: P-tuning v2 prefix length (needed for method ptuning).
        prefix_projection: P-tuning v2 MLP re-parameterisation of the prefix.
        ptuning_checkpoint: trained P-tuning v2 prefix encoder (THUDM P-tuning folder or file).
        compile: compile the decode step: true, false or auto (compiled on CUDA and for CPU models of
            real size).
    """

    load_checkpoint: str | None = None
    preset: str | None = None
    tokenizer: str | None = None
    config: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    device: str | None = None
    quantize: Literal["int8", "int4"] | None = None
    quantize_embeddings: bool = False
    adapter: str | None = None
    merge_adapter: bool = True
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    ptuning_checkpoint: str | None = None
    compile: bool | Literal["auto"] = "auto"

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"model.preset = {self.preset!r}: expected one of {', '.join(sorted(PRESETS))}")
        if self.pre_seq_len is not None and (isinstance(self.pre_seq_len, bool)
                                             or not isinstance(self.pre_seq_len, int) or self.pre_seq_len < 1):
            raise ConfigError(f"model.pre_seq_len = {self.pre_seq_len!r}: expected a positive integer (or null)")
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise ConfigError(f"model.dtype = {self.dtype!r}: expected one of {', '.join(DTYPE_NAMES)}")
        try:
            quantize_bits(self.quantize)
        except ValueError as e:
            raise ConfigError(f"model.{e}") from None
        if self.quantize_embeddings and self.quantize is None:
            raise ConfigError("model.quantize_embeddings needs model.quantize (int8 or int4)")
        try:
            check_compile(self.compile)
        except ValueError as e:
            raise ConfigError(f"model.{e}") from None


ModelArguments = LoadConfig


# The longest run of a row's last tokens that prompt lookup looks up (glm6b.inference.lookup).
PROMPT_LOOKUP_MAX_NGRAM = 3


@dataclass
class GenerationConfig:
    """How to generate. Defaults are those of transformers' `generate` for this model.

    Attributes:
        max_length: total length limit, prompt included (padding counts, as in transformers).
        max_new_tokens: limit on generated tokens; overrides max_length when set.
        do_sample: sample instead of taking the most likely token (greedy).
        temperature: sampling temperature (logits are divided by it).
        top_k: sample from the k most likely tokens only (0 disables it).
        top_p: nucleus sampling: sample from the most likely tokens whose probability adds up to
            top_p (1.0 disables it).
        repetition_penalty: >1 discourages tokens already in the sequence (CTRL-style; 1.0 is off).
        num_return_sequences: samples per prompt.
        eos_token_id: stop token(s); None takes the model config's <eop>.
        pad_token_id: filler after a row stops; None takes the model config's <pad>.
        stop_strings: stop a row once its decoded text contains one of these (needs a tokenizer).
        seed: seed for sampling (a private generator per row); None draws from torch's global RNG.
        allowed_vocab_size: never produce ids at or above this (the model's vocab has unused
            padding rows past the tokenizer's vocabulary, which cannot be decoded).
        num_beams: beam search with this many beams when > 1 (greedy, not sampled; see
            glm6b.inference.beam).
        length_penalty: beam hypotheses are ranked by sum of log-probabilities / length**length_penalty
            (length = prompt + generated tokens, as in transformers 4.27).
        early_stopping: beam search stops a prompt once num_beams hypotheses are finished (True),
            when no running beam can still beat the worst finished one by the usual estimate (False),
            or only when none can beat it at the maximum length ("never").
        compile: run the decode step compiled (True), eagerly (False), or "auto": compiled on CUDA
            and for CPU models of real size, eager for tiny ones (glm6b.inference.engine).
        prefill_chunk_size: prompt tokens per chunk when filling the KV cache.
        prompt_lookup_num_tokens: prompt-lookup decoding (transformers' name for it): each step proposes
            up to this many next tokens, copied from what followed the row's last tokens earlier in its
            own prompt or answer, and checks them all in one forward, so an answer that copies from its
            input takes fewer steps; the tokens are those of greedy decoding, and sampled ones follow
            the same distribution. 0 or None (the default): off. "auto": on where checking several tokens
            costs about one step (glm6b.inference.engine.lookup_tokens). Off by default because no
            measured case gains where it never loses (docs/speculative.md). Beam search ignores it.
        prompt_lookup_max_ngram: the longest run of a row's last tokens that prompt lookup looks up
            (then shorter ones, down to one token).
        prompt_lookup_corpus: a file of answers that prompt lookup also proposes from, where the row's own
            text has nothing (or less) to copy: the most frequent continuation of the row's last tokens in
            it (glm6b.inference.lookup.CorpusIndex; needs prompt_lookup_num_tokens and the tokenizer). A
            .json / .jsonl file of ADGEN lines (the "summary" field), or a text file of one answer per line;
            indexed once per file and tokenizer. In a recipe, "train" is its data.train_data.
    """

    max_length: int | None = 20
    max_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    num_return_sequences: int = 1
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    stop_strings: list[str] | None = None
    seed: int | None = None
    allowed_vocab_size: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    compile: bool | Literal["auto"] = "auto"
    prefill_chunk_size: int = 512
    prompt_lookup_num_tokens: int | Literal["auto"] | None = None
    prompt_lookup_max_ngram: int = PROMPT_LOOKUP_MAX_NGRAM
    prompt_lookup_corpus: str | None = None

    def validate(self) -> None:
        """Raise ValueError ("generation: ...") naming the first impossible setting."""
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"generation: {message}")

        need(self.max_new_tokens is None or self.max_new_tokens >= 1, "max_new_tokens must be >= 1")
        need(self.max_length is None or self.max_length >= 1, "max_length must be >= 1")
        need(self.temperature > 0, "temperature must be > 0 (use do_sample=False for greedy)")
        need(self.top_k >= 0, "top_k must be >= 0")
        need(0 < self.top_p <= 1, "top_p must be in (0, 1]")
        need(self.repetition_penalty > 0, "repetition_penalty must be > 0")
        need(self.num_return_sequences >= 1, "num_return_sequences must be >= 1")
        need(self.num_beams >= 1, "num_beams must be >= 1")
        need(self.num_beams == 1 or not self.do_sample,
             "num_beams > 1 is beam search, which does not sample: pass do_sample=False")
        need(self.num_beams == 1 or self.num_return_sequences <= self.num_beams,
             f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams ({self.num_beams})")
        need(self.num_beams > 1 or self.do_sample or self.num_return_sequences == 1,
             "num_return_sequences > 1 needs do_sample=True or num_beams > 1 (greedy decoding gives one answer)")
        need(self.early_stopping in (True, False, "never"), "early_stopping must be true, false or 'never'")
        try:
            check_compile(self.compile)
        except ValueError as e:
            raise ValueError(f"generation: {e}") from None
        need(self.prefill_chunk_size >= 1, "prefill_chunk_size must be >= 1")
        lookup = self.prompt_lookup_num_tokens
        need(lookup is None or lookup == "auto" or type(lookup) is int and lookup >= 0,
             f"prompt_lookup_num_tokens must be a number of tokens >= 0, None or 'auto', got {lookup!r}")
        need(self.prompt_lookup_max_ngram >= 1, "prompt_lookup_max_ngram must be >= 1")
        corpus = self.prompt_lookup_corpus
        need(corpus is None or isinstance(corpus, str) and corpus != "",
             f"prompt_lookup_corpus must be a file path or None, got {corpus!r}")
        # That a corpus comes with prompt_lookup_num_tokens is checked where it is used (generate, the
        # scheduler), not here: a recipe override checks its one key alone.


def make_generation_config(base: GenerationConfig | None = None, **kwargs) -> GenerationConfig:
    """A checked GenerationConfig from `base` and keyword overrides; unknown names are an error that lists them.

    Raises:
        TypeError: an unknown field name.
        ValueError: an impossible setting.
    """
    known = {f.name for f in dataclasses.fields(GenerationConfig)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"unknown generation argument(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    config = GenerationConfig(**{**(vars(base) if base else {}), **kwargs})
    config.validate()
    return config


@dataclass
class DataConfig:
    """Where the data is and how rows are built (the `data:` section of a recipe).

    Attributes:
        train_data: jsonl file, or a folder written by `glm6b preprocess`.
        eval_data: jsonl file or preprocessed folder for evaluation (teacher-forced loss).
        max_source_length: prompt budget in tokens (the prompt keeps max_source_length - 1 ids in
            training rows, - 2 in evaluation rows).
        max_target_length: answer budget (the answer keeps max_target_length - 2 ids).
        prompt_column: field holding the prompt (ADGEN: "content").
        response_column: field holding the answer (ADGEN: "summary").
        history_column: optional field with earlier [query, response] pairs (chat template).
        source_prefix: text put in front of every prompt.
        ignore_pad_token_for_loss: labels equal to the pad id become -100 (the recipe's default).
        dynamic_padding: pad training batches to their longest row instead of max_source_length +
            max_target_length. Right padding sits after <eop> in the causal part, so the loss is the
            same; it only saves compute.
        skip_bad: skip (and count) malformed lines instead of stopping at the first one.
    """

    train_data: str | None = None
    eval_data: str | None = None
    max_source_length: int = 64
    max_target_length: int = 64
    prompt_column: str = "content"
    response_column: str = "summary"
    history_column: str | None = None
    source_prefix: str = ""
    ignore_pad_token_for_loss: bool = True
    dynamic_padding: bool = False
    skip_bad: bool = False

    def __post_init__(self) -> None:
        if self.max_source_length < 3:
            raise DataError(f"max_source_length={self.max_source_length}: must be at least 3 "
                            f"(one prompt token plus [gMASK] <sop>)")
        if self.max_target_length < 3:
            raise DataError(f"max_target_length={self.max_target_length}: must be at least 3 "
                            f"(one answer token plus <sop> and <eop>)")


@dataclass
class LoraConfig:
    """LoRA settings (the `lora:` section of a recipe; the MindFormers ADGEN values by default).

    Attributes:
        r: rank of the update B @ A.
        lora_alpha: scaling numerator (the update is scaled by lora_alpha / r).
        lora_dropout: dropout on the LoRA branch's input.
        target_modules: module names to adapt (the fused attention projection).
    """

    r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: ["query_key_value"])

    def __post_init__(self) -> None:
        # Checked here, when the recipe is read, not by PEFT after the model has loaded.
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"lora: {message}")

        need(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r >= 1,
             f"r={self.r!r} must be a positive integer (the rank of the update)")
        need(isinstance(self.lora_alpha, (int, float)) and not isinstance(self.lora_alpha, bool)
             and self.lora_alpha > 0, f"lora_alpha={self.lora_alpha!r} must be a positive number")
        need(isinstance(self.lora_dropout, (int, float)) and not isinstance(self.lora_dropout, bool)
             and 0.0 <= self.lora_dropout < 1.0, f"lora_dropout={self.lora_dropout!r} must be in [0, 1)")
        need(isinstance(self.target_modules, list) and len(self.target_modules) > 0
             and all(isinstance(m, str) and m for m in self.target_modules),
             f"target_modules={self.target_modules!r} must be a non-empty list of module names")


LoraArguments = LoraConfig


@dataclass
class TrainingConfig:
    """How to train (the `trainer:` section of a recipe). Defaults follow HF's TrainingArguments.

    Attributes:
        output_dir: where checkpoints, logs and the final result go.
        num_train_epochs: passes over the data (used when max_steps is None).
        max_steps: optimizer steps to run; overrides num_train_epochs.
        per_device_train_batch_size: rows per micro-batch (alias: `batch_size`).
        per_device_eval_batch_size: rows per evaluation batch.
        gradient_accumulation_steps: micro-batches per optimizer step.
        loss_normalization: "token" (default): a step's loss is the sum of the token losses of all
            its micro-batches on all ranks divided by the step's target tokens, so it does not depend
            on the batch size, the accumulation or the process count; "per_micro_batch": the mean of
            per-micro-batch means (the older definition, for matching published curves).
        learning_rate: peak learning rate.
        lr_scheduler_type: "linear" (decay to 0), "cosine" (to 0) or "constant", after warmup.
        warmup_steps: linear warmup steps; if 0, warmup_ratio * total steps.
        warmup_ratio: warmup as a fraction of the total steps.
        weight_decay: AdamW decoupled weight decay, on matrices only (not biases or LayerNorms).
        adam_beta1, adam_beta2, adam_epsilon: AdamW settings.
        max_grad_norm: clip the gradient norm to this (0 disables clipping; the norm is logged anyway).
        seed: seeds python, numpy and torch, and the shuffle order (seed + epoch).
        bf16: bfloat16 autocast (CPU or CUDA).
        fp16: float16 autocast with a gradient scaler (CUDA only).
        gradient_checkpointing: recompute each block in backward instead of storing its activations.
        logging_steps: write a train_log.jsonl line every this many steps.
        eval_steps: evaluate every this many steps (None: only when evaluate() is called).
        eval_generation_samples: evaluate() also generates (greedy, max_target_length new tokens) for
            the first N evaluation examples with an answer and scores BLEU-4 / ROUGE-1/2/L with
            glm6b.eval.evaluate.evaluate_generation (None or 0: the loss only).
        save_steps: write checkpoint-<step>/ every this many steps (None: no intermediate checkpoints).
        save_total_limit: keep only the last N checkpoints (None keeps all).
        resume_from_checkpoint: a checkpoint folder, or "latest" for the newest one of this run in
            output_dir (a corrupt one falls back to the one before). The batch size, accumulation,
            seed, shuffle and data must be those of the checkpoint; a changed learning rate, schedule,
            max_steps or AdamW setting applies from the restored step on (and is logged).
        overwrite_output_dir: start a new run in an output_dir that holds one (its checkpoints, logs
            and final/ are deleted; other files are kept). Without it (or a resume) that is refused.
        shuffle: shuffle the training rows every epoch.
        dataloader_num_workers: worker processes for batching (0: in the training process).
        tensorboard: also log to output_dir/tensorboard.
        disable_tqdm: no progress bar.
    """

    output_dir: str = "output"
    num_train_epochs: float = 3.0
    max_steps: int | None = None
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    loss_normalization: Literal["token", "per_micro_batch"] = "token"
    learning_rate: float = 5e-5
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 42
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    logging_steps: int = 10
    eval_steps: int | None = None
    eval_generation_samples: int | None = 64
    save_steps: int | None = 500
    save_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    overwrite_output_dir: bool = False
    shuffle: bool = True
    dataloader_num_workers: int = 0
    tensorboard: bool = True
    disable_tqdm: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise TrainerError(f"trainer: {message}")

        need(self.max_steps is None or self.max_steps > 0, f"max_steps={self.max_steps} must be positive")
        need(self.num_train_epochs > 0, f"num_train_epochs={self.num_train_epochs} must be positive")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps"):
            need(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be at least 1")
        for name in ("eval_steps", "save_steps", "save_total_limit"):
            need(getattr(self, name) is None or getattr(self, name) >= 1,
                 f"{name}={getattr(self, name)} must be at least 1 (or null)")
        need(self.lr_scheduler_type in ("linear", "cosine", "constant"),
             f"lr_scheduler_type={self.lr_scheduler_type!r}: expected linear, cosine or constant")
        need(0.0 <= self.warmup_ratio < 1.0, f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        need(self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0")
        need(self.loss_normalization in ("token", "per_micro_batch"),
             f"loss_normalization={self.loss_normalization!r}: expected token or per_micro_batch")
        need(not (self.bf16 and self.fp16), "bf16 and fp16 are exclusive")
        need(self.eval_generation_samples is None or self.eval_generation_samples >= 0,
             f"eval_generation_samples={self.eval_generation_samples} must be >= 0 (or null)")
        need(self.learning_rate >= 0, f"learning_rate={self.learning_rate} must be >= 0")
        need(self.max_grad_norm >= 0, f"max_grad_norm={self.max_grad_norm} must be >= 0 (0 disables clipping)")
        need(0.0 <= self.adam_beta1 < 1.0 and 0.0 <= self.adam_beta2 < 1.0,
             f"adam_beta1={self.adam_beta1}, adam_beta2={self.adam_beta2} must be in [0, 1)")
        need(self.adam_epsilon > 0, f"adam_epsilon={self.adam_epsilon} must be positive")
        need(self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0")
        need(self.dataloader_num_workers >= 0, f"dataloader_num_workers={self.dataloader_num_workers} must be >= 0")

    @property
    def batch_size(self) -> int:
        """Alias of per_device_train_batch_size."""
        return self.per_device_train_batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self.per_device_train_batch_size = value


TrainingArguments = TrainingConfig


@dataclass
class ParallelConfig:
    """How to spread training over processes (the `parallel:` section of a recipe; MindFormers names).

    The process count must be data_parallel * model_parallel * pipeline_stage. Without pipeline
    parallelism the ranks are laid out as a [data_parallel, model_parallel] grid, so the
    model_parallel ranks of one replica are neighbours (on one node when model_parallel <= GPUs per
    node: tensor-parallel traffic stays on NVLink). With pipeline_stage > 1 the grid is
    [pipeline_stage, data_parallel]: the data-parallel ranks of one stage are neighbours (their
    gradient reduction is the heavy traffic), and a stage hands its activations to the same
    data-parallel rank of the next stage, which may sit on another node.

    Attributes:
        data_parallel: model replicas; the global batch is split over them.
        model_parallel: tensor-parallel degree: query_key_value / dense_h_to_4h are split by output
            rows (whole heads, MLP columns), dense / dense_4h_to_h by input columns. Must divide
            num_attention_heads and inner_hidden_size.
        pipeline_stage: pipeline-parallel degree: the blocks are split into this many consecutive
            stages, one process each (per replica); stage 0 also holds the word embeddings, the
            last stage the final LayerNorm and the lm_head (tied to the embeddings: both stages
            keep a copy, their gradients are summed). At most num_layers; not with model_parallel
            or P-tuning.
        pipeline_schedule: with pipeline_stage > 1, the order of the micro-batches' forward and
            backward passes: "1f1b" (one forward, one backward in the steady state: at most
            pipeline_stage micro-batches' activations alive; needs micro_batch_num >=
            pipeline_stage) or "gpipe" (all forwards, then all backwards: every micro-batch's
            activations alive at once).
        micro_batch_num: micro-batches per optimizer step (gradient accumulation); with
            pipeline_stage > 1 also the micro-batches the schedule pipelines.
        optimizer_shard: shard parameters, gradients and optimizer state over the data-parallel
            ranks with FSDP2 (ZeRO-3). Without it, data parallelism is DDP (full replicas).
    """

    data_parallel: int = 1
    model_parallel: int = 1
    pipeline_stage: int = 1
    micro_batch_num: int = 1
    optimizer_shard: bool = False
    pipeline_schedule: Literal["1f1b", "gpipe"] = "1f1b"

    @property
    def world_size(self) -> int:
        """The number of processes this layout needs."""
        return self.data_parallel * self.model_parallel * self.pipeline_stage

    def validate(self, world_size: int, model_config: ChatGLMConfig | None = None) -> None:
        """Raise ConfigError, naming the `parallel.<field>`, for a layout that cannot run.

        Call it before loading anything, on every rank (all ranks raise the same error).

        Args:
            world_size: the number of processes (torchrun's WORLD_SIZE; 1 without torchrun).
            model_config: the model's architecture, to check what model_parallel must divide and
                how many stages its blocks allow.

        Raises:
            ConfigError: a value below 1 or of the wrong type, a process count that is not
                data_parallel * model_parallel * pipeline_stage, heads or MLP width not divisible
                by model_parallel, P-tuning with model_parallel > 1 or pipeline_stage > 1,
                pipeline_stage with model_parallel, more stages than blocks, a 1f1b schedule with
                fewer micro-batches than stages, or data_parallel and model_parallel both > 1
                without optimizer_shard.
        """
        for key in ("data_parallel", "model_parallel", "pipeline_stage", "micro_batch_num"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"parallel.{key} = {value!r}: expected an integer >= 1")
        if not isinstance(self.optimizer_shard, bool):
            raise ConfigError(f"parallel.optimizer_shard = {self.optimizer_shard!r}: expected true or false")
        if self.pipeline_schedule not in ("1f1b", "gpipe"):
            raise ConfigError(f"parallel.pipeline_schedule = {self.pipeline_schedule!r}: expected 1f1b or gpipe")
        pp, tp = self.pipeline_stage, self.model_parallel
        if pp > 1 and tp > 1:
            raise ConfigError(f"parallel.pipeline_stage = {pp} with parallel.model_parallel = {tp} is not supported: "
                              f"use pipeline_stage with data_parallel (DDP or optimizer_shard), or model_parallel "
                              f"without pipeline_stage")
        if pp > 1 and self.pipeline_schedule == "1f1b" and 1 < self.micro_batch_num < pp:
            raise ConfigError(self.schedule_error(self.micro_batch_num))
        if world_size != self.world_size:
            raise ConfigError(
                f"parallel.data_parallel ({self.data_parallel}) * parallel.model_parallel ({self.model_parallel}) "
                f"* parallel.pipeline_stage ({pp}) = {self.world_size} must equal the number of processes, which "
                f"is {world_size} (launch with e.g. `torchrun --nproc-per-node {self.world_size} -m glm6b ...`, or "
                f"change the parallel section)")
        if tp > 1 and self.data_parallel > 1 and not self.optimizer_shard:
            raise ConfigError(
                f"parallel.data_parallel = {self.data_parallel} with parallel.model_parallel = {tp} needs "
                f"parallel.optimizer_shard: true (FSDP2 composes with tensor parallelism; DDP does not)")
        if model_config is not None and pp > 1:
            if pp > model_config.num_layers:
                raise ConfigError(f"parallel.pipeline_stage = {pp} must not exceed num_layers "
                                  f"({model_config.num_layers}): every stage holds at least one block")
            if model_config.pre_seq_len:
                raise ConfigError(
                    f"parallel.pipeline_stage = {pp} with P-tuning (pre_seq_len = {model_config.pre_seq_len}) is "
                    f"not supported: the prefix encoder feeds every block of every stage; use data_parallel "
                    f"(P-tuning trains only the small prefix encoder)")
        if model_config is not None and tp > 1:
            if model_config.num_attention_heads % tp:
                raise ConfigError(
                    f"parallel.model_parallel = {tp} must divide num_attention_heads "
                    f"({model_config.num_attention_heads}): each rank holds whole attention heads")
            if model_config.inner_hidden_size % tp:
                raise ConfigError(
                    f"parallel.model_parallel = {tp} must divide inner_hidden_size "
                    f"({model_config.inner_hidden_size}): each rank holds an equal slice of the MLP")
            if model_config.pre_seq_len:
                raise ConfigError(
                    f"parallel.model_parallel = {tp} with P-tuning (pre_seq_len = {model_config.pre_seq_len}) is "
                    f"not supported: the prefix keys/values are not split by head; use data_parallel "
                    f"(P-tuning trains only the small prefix encoder)")

    def schedule_error(self, micro_batches: int) -> str:
        """The message for a 1f1b schedule with fewer micro-batches per step than stages."""
        return (f"parallel.pipeline_schedule = 1f1b needs at least parallel.pipeline_stage ({self.pipeline_stage}) "
                f"micro-batches per step, got {micro_batches}: set parallel.micro_batch_num (or "
                f"trainer.gradient_accumulation_steps) >= {self.pipeline_stage}, or parallel.pipeline_schedule: gpipe")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, source: str = "parallel") -> "ParallelConfig":
        """Build from a recipe's `parallel:` mapping; unknown keys are an error naming them.

        Raises:
            ConfigError: not a mapping, or an unknown key.
        """
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(cls))}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; expected {', '.join(sorted(known))}")
        return cls(**data)


@dataclass
class QuickstartConfig:
    """Knobs of the quickstart; the defaults finish in a few minutes on 2 CPU cores.

    Attributes:
        method: fine-tuning method: "lora", "full" or "ptuning".
        steps: fine-tuning optimizer steps (None: the method's default).
        pretrain_steps: steps of the generic pre-training of a fresh base.
        output_dir: where everything is written.
        eval_examples: dev examples scored before and after.
        batch_size: training rows per step.
        seed: for weights, data order and sampling.
        quantize: "int8" or "int4": fine-tune (lora, ptuning) on the base quantized at load (QLoRA-style).
    """

    method: Literal["lora", "full", "ptuning"] = "lora"
    steps: int | None = None
    pretrain_steps: int = 200
    output_dir: str = "runs/quickstart"
    eval_examples: int = 48
    batch_size: int = 16
    seed: int = 0
    quantize: Literal["int8", "int4"] | None = None

    def __post_init__(self) -> None:
        if self.method not in ("lora", "full", "ptuning"):
            raise ValueError(f"--method {self.method!r}: expected one of lora, full, ptuning")
        for flag, value in (("--steps", self.steps), ("--pretrain-steps", self.pretrain_steps),
                            ("--eval-examples", self.eval_examples), ("--batch-size", self.batch_size)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{flag} {value}: expected a positive integer")


QuickstartSettings = QuickstartConfig
