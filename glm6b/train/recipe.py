"""Recipes: YAML files whose sections are dataclasses, a strict loader, and `run` for `glm6b run`.

A recipe (glm6b/configs/finetune.yaml, lora.yaml, infer.yaml, lora_infer.yaml: `--config lora` finds
them by name) has a top-level `method` and one mapping per section; every key is exactly a field
name of that section's dataclass:

    method      full | lora | ptuning
    model:      glm6b.config.LoadConfig
    data:       glm6b.config.DataConfig
    trainer:    glm6b.config.TrainingConfig
    lora:       glm6b.config.LoraConfig
    generation: glm6b.config.GenerationConfig
    parallel:   glm6b.config.ParallelConfig (data_parallel, model_parallel, pipeline_stage,
                micro_batch_num, optimizer_shard, pipeline_schedule); checked against the process
                count by `run`

An unknown key, a duplicated key or a value of the wrong type is a RecipeError naming the file, the
line and the key. Overrides (`--set trainer.learning_rate=1e-4`, values parsed as YAML) go through
the same checks and are named in the error instead of a line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..config import DataConfig, GenerationConfig, LoadConfig, LoraConfig, ParallelConfig, TrainingConfig

# The four recipes shipped inside the package (`--config lora` finds glm6b/configs/lora.yaml).
PACKAGED_RECIPES = Path(__file__).resolve().parent.parent / "configs"
Mode = Literal["train", "finetune", "eval", "predict"]
MODES = ("train", "finetune", "eval", "predict")


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file and line (or the override) and the key."""


@dataclass
class Recipe:
    """A whole recipe: the method and one dataclass per section."""

    method: Literal["full", "lora", "ptuning"] = "full"
    model: LoadConfig = field(default_factory=LoadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainingConfig = field(default_factory=TrainingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


SECTIONS: dict[str, type] = {
    "model": LoadConfig,
    "data": DataConfig,
    "trainer": TrainingConfig,
    "lora": LoraConfig,
    "generation": GenerationConfig,
    "parallel": ParallelConfig,
}
# Accepted spellings that map to a field (one name per concept elsewhere; these are user conveniences).
ALIASES = {("trainer", "batch_size"): "per_device_train_batch_size",
           # MindFormers' names (run_mindformer.py --train_dataset_dir / --eval_dataset_dir)
           ("data", "train_dataset_dir"): "train_data", ("data", "eval_dataset_dir"): "eval_data"}
# `glm6b run`'s short flags -> section.key (the model section takes every model flag: glm6b.cli).
SHORT_FLAGS = {
    "train_data": "data.train_data",
    "eval_data": "data.eval_data",
    "output_dir": "trainer.output_dir",
    "max_steps": "trainer.max_steps",
    "batch_size": "trainer.per_device_train_batch_size",
    "learning_rate": "trainer.learning_rate",
}


# ----------------------------------------------------------------------------------- type checks


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any) -> Any:
    """`value` as type `tp`, or raise TypeError. Ints are accepted for floats, and so are strings
    such as "1e-4" (YAML 1.1 reads an exponent without a dot as a string)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
    elif origin is Literal:
        if any(value == option and type(value) is type(option) for option in typing.get_args(tp)):
            return value
    elif origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option)
            except TypeError:
                pass
    elif origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(tp)
            return [_coerce(v, item) for v in value]
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise TypeError(_type_name(tp))


# ----------------------------------------------------------------------------------- loading


@dataclass
class _Entry:
    value: Any
    where: str  # "file, line n" or "--set ..."


def _where(path: str, node: yaml.Node) -> str:
    return f"{path}, line {node.start_mark.line + 1}"


def _read_yaml(path: Path) -> dict[str, Any]:
    """{"method": _Entry, section: {key: _Entry}} with node positions, duplicates and shape checked."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the recipe ({e.strerror})") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    tree: dict[str, Any] = {}
    if root is None or isinstance(root, yaml.MappingNode) and not root.value:
        raise RecipeError(f"{path}: the recipe is empty; expected at least 'method: full | lora | ptuning' and the "
                          f"sections to set ({', '.join(SECTIONS)}), e.g. glm6b/configs/lora.yaml")
    if not isinstance(root, yaml.MappingNode):
        raise RecipeError(f"{_where(str(path), root)}: a recipe is a mapping of sections "
                          f"(method, {', '.join(SECTIONS)})")
    constructor = yaml.SafeLoader("")
    for key_node, value_node in root.value:
        key = constructor.construct_object(key_node, deep=True)
        where = _where(str(path), key_node)
        if key in tree:
            raise RecipeError(f"{where}: key {key!r} appears twice")
        if key == "method":
            tree[key] = _Entry(constructor.construct_object(value_node, deep=True), where)
            continue
        if key not in SECTIONS:
            raise RecipeError(f"{where}: unknown key {key!r}; known: method, {', '.join(SECTIONS)}")
        if isinstance(value_node, yaml.ScalarNode) and value_node.tag.endswith(":null"):
            tree[key] = {}
            continue
        if not isinstance(value_node, yaml.MappingNode):
            raise RecipeError(f"{where}: section {key!r} must be a mapping of key: value")
        section: dict[str, _Entry] = {}
        for field_node, field_value in value_node.value:
            name = constructor.construct_object(field_node, deep=True)
            field_where = _where(str(path), field_node)
            if name in section:
                raise RecipeError(f"{field_where}: key '{key}.{name}' appears twice")
            section[name] = _Entry(constructor.construct_object(field_value, deep=True), field_where)
        tree[key] = section
    return tree


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _build_section(name: str, entries: dict[str, _Entry]) -> Any:
    cls = SECTIONS[name]
    known = _fields(cls)
    kwargs = {}
    for key, entry in entries.items():
        target = ALIASES.get((name, key), key)
        if target not in known:
            raise RecipeError(f"{entry.where}: unknown key '{name}.{key}'; known keys of '{name}': "
                              f"{', '.join(known)}")
        try:
            kwargs[target] = _coerce(entry.value, known[target])
        except TypeError as e:
            raise RecipeError(f"{entry.where}: '{name}.{key}' = {entry.value!r}: expected {e}") from None
    try:
        section = cls(**kwargs)
        if name == "parallel":  # values only here; the process count is checked by run
            section.validate(section.world_size)
        elif hasattr(section, "validate"):  # GenerationConfig checks its values in validate()
            section.validate()
        return section
    except (ValueError, TypeError) as e:
        # point at the key the message names (the dataclasses name the field they reject)
        named = [entry.where for key, entry in entries.items() if re.search(rf"\b{re.escape(key)}\b", str(e))]
        raise RecipeError(f"{named[0] if named else name}: section '{name}': {e}") from None


def _check_entry(section: str, key: str, entry: _Entry) -> None:
    """Check one override's key and type (and the section's value checks with only that key set)."""
    _build_section(section, {key: entry})


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` (or `method=value`) -> (section, key, value parsed with yaml.safe_load).

    Raises:
        RecipeError: not of that form.
    """
    path = text.split("=", 1)[0].strip()
    if "=" not in text or ("." not in path and path != "method"):
        raise RecipeError(f"--set {text}: expected section.key=value (or method=...), e.g. "
                          f"trainer.learning_rate=1e-4")
    raw = text.split("=", 1)[1]
    section, key = path.split(".", 1) if path != "method" else ("method", "")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise RecipeError(f"--set {text}: the value is not valid YAML ({e})") from None
    return section.strip(), key.strip(), value


def recipe_path(name_or_path: str | os.PathLike) -> Path:
    """The YAML file a --config value names: an existing file, else a recipe shipped with glm6b.

    Args:
        name_or_path: a path, or "finetune", "lora", "infer", "lora_infer" (".yaml" optional).

    Returns:
        The file's path.

    Raises:
        RecipeError: neither a file nor a shipped recipe.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = PACKAGED_RECIPES / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in PACKAGED_RECIPES.glob("*.yaml")))
    raise RecipeError(f"--config {name_or_path}: no such file, and not a recipe shipped with glm6b ({names})")


def load_recipe(path: str | os.PathLike | None, overrides: list[str] | None = None,
                flags: dict[str, Any] | None = None) -> Recipe:
    """Read a recipe file, apply overrides, and build the section dataclasses with strict checks.

    Args:
        path: the YAML file, or the name of a recipe shipped with glm6b ("finetune", "lora",
            "infer", "lora_infer"; see `recipe_path`). None: all defaults.
        overrides: "section.key=value" strings (values parsed as YAML), applied in order.
        flags: command-line flags {"section.key": value} applied after the overrides, each named in an
            error as `--flag value`; None values are ignored.

    Returns:
        The Recipe.

    Raises:
        RecipeError: unreadable file, unknown or duplicated key, wrong type, unsupported value.
    """
    tree = _read_yaml(recipe_path(path)) if path is not None else {}
    for name in SECTIONS:  # the file's own values are checked even where an override replaces them
        _build_section(name, tree.get(name, {}))
    changes = [(f"--set {text}", *parse_override(text)) for text in overrides or []]
    for path, value in (flags or {}).items():
        if value is not None:
            section, key = path.split(".")
            changes.append((f"--{key.replace('_', '-')} {value}", section, key, value))
    for where, section, key, value in changes:
        if section == "method":
            tree["method"] = _Entry(value, where)
            continue
        if section not in SECTIONS:
            raise RecipeError(f"{where}: unknown section {section!r}; known: method, {', '.join(SECTIONS)}")
        _check_entry(section, key, _Entry(value, where))  # now: a later flag may replace this value
        tree.setdefault(section, {})
        tree[section] = {k: e for k, e in tree[section].items() if ALIASES.get((section, k), k) !=
                         ALIASES.get((section, key), key)}
        tree[section][key] = _Entry(value, where)
    method = Recipe.method
    if "method" in tree:
        entry = tree["method"]
        try:
            method = _coerce(entry.value, Literal["full", "lora", "ptuning"])
        except TypeError:
            raise RecipeError(f"{entry.where}: method = {entry.value!r}: expected 'full', 'lora' or 'ptuning'") from None
    sections = {name: _build_section(name, tree.get(name, {})) for name in SECTIONS}
    return Recipe(method=method, **sections)


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain data (what `run` records in output_dir/recipe.json)."""
    return dataclasses.asdict(recipe)


# ----------------------------------------------------------------------------------- running


def _model_config(recipe: Recipe):
    """The architecture to check the parallel layout against (config.json or the preset), or None."""
    from ..config import ChatGLMConfig

    try:
        if recipe.model.load_checkpoint and (Path(recipe.model.load_checkpoint) / "config.json").is_file():
            return ChatGLMConfig.from_json_file(Path(recipe.model.load_checkpoint) / "config.json")
        if recipe.model.preset:
            return ChatGLMConfig.from_name(recipe.model.preset)
    except (OSError, ValueError):
        return None
    return None


def check_recipe(recipe: Recipe, mode: Mode, prompts: list[str] | None = None) -> None:
    """Everything about a recipe that can be checked before a process group starts or a model loads: what
    the mode needs, settings that contradict each other, the parallel layout against the process count,
    the device, the output folder, and (training) every line of the training data.

    Raises:
        RecipeError, ConfigError, DataError, OutputError: the first problem, in one line.
    """
    from ..checkpoint.hf import check_device
    from ..data.adgen import ReadStats, iter_examples
    from ..data.mindrecord import MindRecordReader, is_mindrecord
    from ..safety import check_writable
    from . import parallel as D

    if mode not in MODES:
        raise RecipeError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
    data, model, args, pc = recipe.data, recipe.model, recipe.trainer, recipe.parallel
    if mode in ("train", "finetune") and data.train_data is None:
        raise RecipeError("data.train_data is not set (use --train-data FILE)")
    if mode in ("finetune", "eval") and model.load_checkpoint is None and not (mode == "eval" and model.ptuning_checkpoint):
        raise RecipeError(f"{mode} needs model.load_checkpoint (use --load-checkpoint PATH)")
    if mode == "eval" and data.eval_data is None:
        raise RecipeError("data.eval_data is not set (use --eval-data FILE)")
    if mode == "predict" and not prompts and data.eval_data is None:
        raise RecipeError("predict needs prompts (--prompt TEXT) or data.eval_data (--eval-data FILE)")
    if mode not in ("train", "finetune"):
        lookup_corpus(recipe)
        return
    if model.quantize is not None and recipe.method == "full":
        raise RecipeError(f"model.quantize = {model.quantize!r} with method full: a quantized base cannot "
                          f"be trained itself; use method lora (QLoRA-style) or ptuning on it")
    pc.validate(D.get_world_size() if D.is_distributed() else int(os.environ.get("WORLD_SIZE", "1")),
                _model_config(recipe))  # before any process group or model: every rank fails alike
    if pc.micro_batch_num > 1 and args.gradient_accumulation_steps not in (1, pc.micro_batch_num):
        raise RecipeError(f"parallel.micro_batch_num = {pc.micro_batch_num} and "
                          f"trainer.gradient_accumulation_steps = {args.gradient_accumulation_steps} disagree "
                          f"(they are the same setting: set one of them)")
    if pc.optimizer_shard and args.fp16:
        raise RecipeError("trainer.fp16 with parallel.optimizer_shard is not supported: use trainer.bf16 "
                          "(FSDP2 mixed precision)")
    if pc.pipeline_stage > 1:
        if args.fp16:
            raise RecipeError("trainer.fp16 with parallel.pipeline_stage > 1 is not supported: use trainer.bf16")
        micro_batches = pc.micro_batch_num if pc.micro_batch_num > 1 else args.gradient_accumulation_steps
        if pc.pipeline_schedule == "1f1b" and micro_batches < pc.pipeline_stage:
            raise RecipeError(pc.schedule_error(micro_batches))
    for name, path in (("data.train_data", data.train_data), ("data.eval_data", data.eval_data)):
        if path is not None and not Path(path).exists() and not is_mindrecord(path):
            raise RecipeError(f"{name} = {path}: no such file or folder")
    check_device(model.device)
    check_writable(Path(args.output_dir), "trainer.output_dir")
    if is_mindrecord(data.train_data):  # its header and pages checked before the model loads
        MindRecordReader(data.train_data).close()
    elif Path(data.train_data).is_file():  # every line checked (and rows counted) before the model loads
        stats = ReadStats()
        if not any(True for _ in iter_examples(data.train_data, data, stats)):
            raise RecipeError(f"data.train_data = {data.train_data}: no training rows: {stats.lines} non-blank "
                              f"line(s) read, {stats.skipped_empty} with an empty prompt or answer, "
                              f"{stats.skipped_bad} malformed line(s) skipped (check data.prompt_column / "
                              f"data.response_column and the file's contents)")


def lookup_corpus(recipe: Recipe) -> str | None:
    """The file generation.prompt_lookup_corpus names: "train" is the recipe's own data.train_data (ADGEN jsonl:
    prompt lookup then proposes from the answers the model was fine-tuned on), anything else a path as given.

    Raises:
        RecipeError: no such file, or "train" where data.train_data is not a jsonl file whose answers are in the
            corpus reader's field (DataConfig's default response column, "summary").
    """
    from ..data.mindrecord import is_mindrecord

    corpus, data = recipe.generation.prompt_lookup_corpus, recipe.data
    if corpus is None:
        return None
    if recipe.generation.prompt_lookup_num_tokens in (None, 0):
        raise RecipeError("generation.prompt_lookup_corpus is a source of prompt lookup's proposals: it needs "
                          "generation.prompt_lookup_num_tokens (a number of tokens or auto)")
    if corpus != "train":
        if not Path(corpus).is_file():
            raise RecipeError(f"generation.prompt_lookup_corpus = {corpus}: no such file (\"train\": data.train_data)")
        return corpus
    if data.train_data is None:
        raise RecipeError("generation.prompt_lookup_corpus = train names data.train_data, which is not set "
                          "(use --train-data FILE)")
    path = Path(data.train_data)
    if is_mindrecord(path) or path.is_dir():
        raise RecipeError(f"generation.prompt_lookup_corpus = train: data.train_data = {path} holds encoded rows, "
                          f"not answers; set generation.prompt_lookup_corpus to the jsonl file they were made from")
    if not path.is_file():
        raise RecipeError(f"generation.prompt_lookup_corpus = train: data.train_data = {path}: no such file")
    if path.suffix not in (".json", ".jsonl"):
        raise RecipeError(f"generation.prompt_lookup_corpus = train: data.train_data = {path} is read as JSON lines "
                          f"only when named .json or .jsonl; rename it or name the file in prompt_lookup_corpus")
    if data.response_column != DataConfig.response_column:
        raise RecipeError(f"generation.prompt_lookup_corpus = train reads each line's {DataConfig.response_column!r} "
                          f"field, but data.response_column = {data.response_column!r}: write the answers to a text "
                          f"file, one per line, and name it in generation.prompt_lookup_corpus")
    return str(path)


def run(recipe: Recipe, mode: Mode, prompts: list[str] | None = None) -> dict[str, Any]:
    """Run a recipe: train, finetune, eval (generation scores, as `glm6b eval`) or predict.

    * train: model from model.load_checkpoint (or a random model.preset), then train on data.train_data.
    * finetune: model.load_checkpoint is required (an HF folder, or a LoRA / P-tuning output to
      continue); see Trainer.finetune.
    * eval: BLEU-4 / ROUGE-1/2/L of the answers generated for data.eval_data, as `glm6b eval` scores
      them (a LoRA model.adapter is applied): trainer.output_dir/predictions.jsonl and metrics.json.
      With model.ptuning_checkpoint: the trainer's evaluate() (teacher-forced loss + the same scores).
    * predict: answers for `prompts`, or for the prompts of data.eval_data; written to
      trainer.output_dir/predictions.jsonl.

    Args:
        recipe: the loaded recipe.
        mode: one of train, finetune, eval, predict.
        prompts: texts for predict mode.

    Returns:
        A summary dict (printed as JSON by the command line).

    Raises:
        RecipeError: a setting the mode needs is missing (see `check_recipe`).
    """
    check_recipe(recipe, mode, prompts)
    if mode in ("train", "finetune"):
        return _train(recipe, mode)
    recipe.generation.prompt_lookup_corpus = lookup_corpus(recipe)
    if mode == "eval":
        return {"mode": mode, **_evaluate(recipe)}
    return _predict(recipe, prompts)


def _trainer(recipe: Recipe, **kwargs):
    from .trainer import Trainer

    return Trainer(model_args=recipe.model, args=recipe.trainer, train_dataset=recipe.data.train_data,
                   eval_dataset=recipe.data.eval_data, method=recipe.method, lora_config=recipe.lora,
                   data_config=recipe.data, generation_config=recipe.generation, **kwargs)


def _train(recipe: Recipe, mode: Mode) -> dict[str, Any]:
    """Train or fine-tune under torchrun or in one process; a failed run that left nothing to resume
    leaves no folder that looks like a run."""
    from . import parallel as D
    from .state import prepare_run_folder, remove_unfinished_run

    args, pc = recipe.trainer, recipe.parallel
    if pc.micro_batch_num > 1:  # MindFormers' name for gradient accumulation
        args.gradient_accumulation_steps = pc.micro_batch_num
    output_dir = Path(args.output_dir)
    existed = output_dir.exists()
    info = D.init_distributed()
    try:
        if D.is_main_process():  # before anything is written: never mix two runs in one folder
            prepare_run_folder(output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
        if info.world_size > 1 and recipe.model.device is None:
            # Each rank on its own device; a pipeline stage is cut from the model built on the CPU, and only
            # its part moves to the device (the whole model need not fit one).
            recipe.model.device = "cpu" if pc.pipeline_stage > 1 else str(info.device)
        trainer = _trainer(recipe, parallel_config=pc)
        trainer.records["recipe.json"] = recipe_to_dict(recipe)  # written when training starts
        out = trainer.train() if mode == "train" else trainer.finetune(recipe.model.load_checkpoint)
    except BaseException:
        if D.is_main_process():
            remove_unfinished_run(output_dir, existed)
        raise
    finally:
        D.cleanup()
    return {"mode": mode, "method": recipe.method, "steps": out.global_step, "world_size": info.world_size,
            "final_loss": out.losses[-1] if out.losses else None, "output": str(out.final_dir)}


def _evaluate(recipe: Recipe) -> dict[str, Any]:
    """Eval mode: glm6b.eval.evaluate.run_eval on data.eval_data (P-tuning models: Trainer.evaluate)."""
    from ..eval.evaluate import run_eval

    if recipe.model.ptuning_checkpoint is not None:
        return _trainer(recipe).evaluate()
    gen = recipe.generation
    summary = run_eval(recipe.model, recipe.data.eval_data, recipe.trainer.output_dir, mode="eval",
                       batch_size=recipe.trainer.per_device_eval_batch_size, max_new_tokens=gen.max_new_tokens,
                       data_config=recipe.data, progress=not recipe.trainer.disable_tqdm, generation_config=gen)
    output_dir = Path(recipe.trainer.output_dir)
    return {**{k: v for k, v in summary.items() if k not in ("timing", "settings")},
            "output": str(output_dir / "predictions.jsonl"), "metrics": str(output_dir / "metrics.json")}


def _predict(recipe: Recipe, prompts: list[str] | None) -> dict[str, Any]:
    """Predict mode: the trainer's predict() for the prompts, or for those of data.eval_data."""
    from ..data.adgen import JsonlDataset
    from ..data.mindrecord import is_mindrecord
    from ..data.preprocess import MindRecordDataset
    from ..io import atomic_write_text

    trainer = _trainer(recipe)
    if prompts:
        texts = trainer.predict(prompts)
        records = [{"prompt": p, "predict": t} for p, t in zip(prompts, texts)]
    else:
        trainer.ensure_model()
        data = recipe.data
        dataset = MindRecordDataset(data.eval_data, trainer.tokenizer, data) if is_mindrecord(data.eval_data) \
            else JsonlDataset(data.eval_data, trainer.tokenizer, data, mode="eval")
        texts = trainer.predict(dataset)
        records = [{"prompt": ex.prompt, "labels": ex.answer, "predict": t} for ex, t in zip(dataset.examples, texts)]
    output_dir = Path(recipe.trainer.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "predictions.jsonl",
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    for record in records[:5]:
        print(json.dumps(record, ensure_ascii=False), file=sys.stderr)
    return {"mode": "predict", "count": len(records), "output": str(output_dir / "predictions.jsonl")}
