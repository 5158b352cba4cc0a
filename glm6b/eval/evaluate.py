"""Generation-based evaluation on ADGEN-style data: batched predictions, BLEU-4 / ROUGE, result files.

What the reference recipe does (ptuning/main.py, spec §7.2-§7.3) and what we keep:

* prompts are encoded as its evaluation side does, `tokenizer(prompts, max_length=max_source_length,
  truncation=True, padding=True)`: left-padded, with the tokenizer's prefix-LM mask and 2D positions;
* predictions are the tokens after the input, decoded with skip_special_tokens=True (and clean-up);
* references are the answers as the reference scores them: encoded with `max_length=max_target_length,
  truncation=True` and decoded back. The tokenizer normalises text (NFKC: "，" -> ","), so scoring the
  raw answer instead would not give comparable numbers;
* scores come from `glm6b.eval.metrics.compute_metrics` (jieba + rouge_chinese + nltk, spec §7.3).

Where we differ, on purpose:

* decoding is greedy by default (the reference samples with top_p 0.7 / temperature 0.95, so its
  scores change from run to run); sampling is one option away;
* the length limit is `max_new_tokens = max_target_length` per example. The reference's
  `max_length = max_source_length + max_target_length + 1` counts the *padded batch* input, so how
  much it lets an example generate depends on the other prompts of its batch;
* prompts are sorted by length (longest first) before batching, so little compute goes to padding,
  and outputs are put back in input order; greedy results do not depend on the batch size;
* predictions and references are stripped of surrounding whitespace before scoring (the reference
  strips them only in its predictions file), so the scores can be recomputed from predictions.jsonl;
* an empty prediction scores 0 instead of aborting the evaluation (see glm6b.eval.metrics).

`evaluate_generation` works on a model object and lists of strings (what a trainer has at hand);
`run_eval` is the command-line task: load a checkpoint (and a LoRA adapter), read a jsonl file, write
predictions.jsonl and metrics.json.

A MindFormers ADGEN MindRecord file (adgen_dataset.py's eval mode holds only token ids) is read by
decoding each row's prompt ids and label ids back to text with the model's tokenizer (without
clean-up, so a prompt encodes back to the ids stored), then scored like a jsonl file: the prompt is
generated from, the decoded labels are the reference.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import torch

from ..api import load, resolve
from ..config import DataConfig, DataError, GenerationConfig, LoadConfig, make_generation_config
from ..data.adgen import ReadStats, iter_examples
from ..data.mindrecord import is_mindrecord
from ..data.preprocess import MindRecordDataset
from ..inference.generation import generate
from ..io import atomic_write_text
from ..safety import OutputError, check_output_file
from ..tokenizer import load_tokenizer
from .metrics import METRIC_NAMES, compute_metrics

logger = logging.getLogger(__name__)
PREDICTIONS_NAME = "predictions.jsonl"
METRICS_NAME = "metrics.json"


def unwrap_peft(model):
    """The model a PEFT wrapper holds (its LoRA layers are injected in place), or `model` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def generate_predictions(
    model,
    tokenizer,
    prompts: list[str],
    batch_size: int = 16,
    max_source_length: int = 64,
    max_new_tokens: int = 64,
    generation_config: GenerationConfig | None = None,
    progress: bool = True,
    generate_fn: Callable | None = None,
    **generation_kwargs,
) -> tuple[list[str], dict]:
    """Generate an answer for every prompt, in left-padded batches of similar length.

    Args:
        model: a ChatGLMForConditionalGeneration, or a PEFT model wrapping one (LoRA, not merged).
        tokenizer: its ChatGLMTokenizer.
        prompts: prompt texts (already rendered: source prefix / chat template applied).
        batch_size: prompts per generate call.
        max_source_length: prompt budget in tokens, [gMASK] <sop> included (longer prompts keep
            their head).
        max_new_tokens: limit on generated tokens per prompt.
        generation_config: base settings; greedy when not given.
        progress: show a tqdm progress bar (on stderr).
        generate_fn: called instead of glm6b.inference.generation.generate, with its arguments (model,
            input_ids, attention_mask, position_ids, generation_config=, tokenizer=): e.g. a pipeline's.
        **generation_kwargs: GenerationConfig fields overriding `generation_config` (do_sample,
            temperature, top_p, top_k, repetition_penalty, seed, ...).

    Returns:
        (predictions, stats): one stripped text per prompt, in input order; stats holds "count",
        "seconds" (generation wall time), "generated_tokens" (up to and including <eop>),
        "examples_per_second" and "tokens_per_second".

    Raises:
        ValueError: batch_size < 1, or an invalid generation setting.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be at least 1")
    config = make_generation_config(generation_config, max_new_tokens=max_new_tokens,
                                    allowed_vocab_size=len(tokenizer), **generation_kwargs)
    if config.num_return_sequences != 1:
        raise ValueError("evaluation takes one answer per prompt: num_return_sequences must be 1")
    model = unwrap_peft(model)
    eos_ids = config.eos_token_id if config.eos_token_id is not None else model.config.eos_token_id
    eos_ids = torch.tensor([eos_ids] if isinstance(eos_ids, int) else list(eos_ids))

    # Longest first: batches hold prompts of similar length, and an out-of-memory shows at once.
    lengths = [len(tokenizer.encode(p, truncation=True, max_length=max_source_length)) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    predictions: list[str | None] = [None] * len(prompts)
    generated_tokens = 0
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with tqdm(total=len(prompts), desc="generate", unit="ex", disable=not progress, file=sys.stderr) as bar:
            for first in range(0, len(order), batch_size):
                rows = order[first:first + batch_size]
                inputs = tokenizer([prompts[i] for i in rows], max_length=max_source_length, truncation=True,
                                   padding=True, return_tensors="pt")
                sequences = (generate_fn or generate)(model, inputs["input_ids"], inputs["attention_mask"],
                                                      inputs["position_ids"], generation_config=config,
                                                      tokenizer=tokenizer)
                new_tokens = sequences[:, inputs["input_ids"].shape[1]:].cpu()
                for row, tokens in zip(rows, new_tokens):
                    predictions[row] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
                    generated_tokens += _count_until_eos(tokens, eos_ids)
                bar.update(len(rows))
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    stats = {
        "count": len(prompts),
        "seconds": seconds,
        "generated_tokens": generated_tokens,
        "examples_per_second": len(prompts) / seconds if seconds > 0 else 0.0,
        "tokens_per_second": generated_tokens / seconds if seconds > 0 else 0.0,
    }
    return predictions, stats


def _count_until_eos(tokens: torch.Tensor, eos_ids: torch.Tensor) -> int:
    hits = torch.isin(tokens, eos_ids).nonzero()
    return int(hits[0, 0]) + 1 if len(hits) else len(tokens)


def reference_texts(tokenizer, answers: list[str], max_target_length: int | None) -> list[str]:
    """The answers as the reference recipe scores them: encoded (truncated) and decoded back, stripped.

    Args:
        tokenizer: the ChatGLMTokenizer.
        answers: raw target texts.
        max_target_length: label budget in tokens, [gMASK] <sop> included (the answer keeps
            max_target_length - 2 tokens); None keeps whole answers.

    Returns:
        One text per answer.
    """
    texts = []
    for answer in answers:
        ids = tokenizer.encode(answer, truncation=max_target_length is not None, max_length=max_target_length)
        texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return texts


def evaluate_generation(
    model,
    tokenizer,
    prompts: list[str],
    references: list[str] | None = None,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    max_source_length: int = 64,
    max_target_length: int = 64,
    generation_config: GenerationConfig | None = None,
    progress: bool = True,
    generate_fn: Callable | None = None,
    **generation_kwargs,
) -> tuple[list[str], dict | None]:
    """Generate answers for `prompts` and score them against `references` (BLEU-4, ROUGE-1/2/L).

    Callable from a training loop: it takes the model object, restores its train/eval mode and
    accepts a PEFT-wrapped model.

    Args:
        model: a ChatGLMForConditionalGeneration, or a PEFT model wrapping one.
        tokenizer: its ChatGLMTokenizer.
        prompts: rendered prompt texts.
        references: target texts, one per prompt; None only generates (metrics is then None).
        batch_size: prompts per generate call.
        max_new_tokens: limit on generated tokens; None means max_target_length.
        max_source_length: prompt budget in tokens (see `generate_predictions`).
        max_target_length: reference budget in tokens (see `reference_texts`); also the default
            max_new_tokens.
        generation_config: base generation settings; greedy when not given.
        progress: show a progress bar.
        generate_fn: see `generate_predictions`.
        **generation_kwargs: GenerationConfig fields (do_sample, temperature, top_p, seed, ...).

    Returns:
        (predictions, metrics): predictions in input order; metrics as `compute_metrics` returns
        them (means and "per_example"), or None without references.

    Raises:
        ValueError: references and prompts differ in number, or a bad setting.
    """
    if references is not None and len(references) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(references)} references; they must pair up one to one")
    predictions, _ = generate_predictions(
        model, tokenizer, prompts, batch_size=batch_size, max_source_length=max_source_length,
        max_new_tokens=max_new_tokens if max_new_tokens is not None else max_target_length,
        generation_config=generation_config, progress=progress, generate_fn=generate_fn, **generation_kwargs)
    if references is None:
        return predictions, None
    return predictions, compute_metrics(predictions, reference_texts(tokenizer, references, max_target_length))


def read_eval_examples(data_path: str | os.PathLike, data_config: DataConfig, mode: str,
                       tokenizer=None) -> tuple[list, ReadStats]:
    """The examples of an ADGEN-format jsonl file (see `glm6b.data.adgen.iter_examples`), or of a MindFormers
    ADGEN MindRecord file (train or eval mode: token ids, decoded back to the prompt and answer texts).

    Args:
        data_path: the jsonl or MindRecord file.
        data_config: column names (and prefix / history settings) of a jsonl file; the prompt budget.
        mode: "eval" needs both columns; "predict" only the prompt column.
        tokenizer: the ChatGLMTokenizer; needed for a MindRecord file.

    Returns:
        (examples, stats): glm6b.data.adgen.Example items in file order, and the reading counts.

    Raises:
        DataError: unreadable file, malformed line, or no usable line.
        MindRecordError: a MindRecord file that is not MindFormers' ADGEN layout.
    """
    if is_mindrecord(data_path):
        if tokenizer is None:
            raise ValueError(f"{data_path}: a MindRecord file holds token ids; reading its examples needs the "
                             f"tokenizer")
        dataset = MindRecordDataset(data_path, tokenizer, data_config)
        examples = dataset.examples
        if not examples:
            raise DataError(f"{data_path}: no rows")
        longer = sum(len(tokenizer.encode(ex.prompt)) > data_config.max_source_length for ex in examples)
        if longer:  # MindFormers cuts eval prompts by characters; glm6b keeps max_source_length tokens
            logger.warning("%s: %d of %d prompts are longer than max_source_length = %d tokens and lose their tail "
                           "(the card's eval file was written with 256)", data_path, longer, len(examples),
                           data_config.max_source_length)
        return examples, ReadStats(lines=len(examples), rows=len(examples))
    read_config = data_config
    if mode == "predict":
        # iter_examples checks (and skips empty) prompt and answer fields; point both at the prompt.
        read_config = DataConfig(**{**asdict(data_config), "response_column": data_config.prompt_column})
    stats = ReadStats()
    examples = list(iter_examples(data_path, read_config, stats))
    if not examples:
        raise DataError(f"{data_path}: no usable examples ({stats.lines} lines, {stats.skipped_empty} with an "
                        f"empty {data_config.prompt_column!r} or {data_config.response_column!r})")
    return examples, stats


def run_eval(
    model: LoadConfig | str | os.PathLike,
    data_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    mode: Literal["eval", "predict"] = "eval",
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    max_source_length: int = 64,
    max_target_length: int = 64,
    prompt_column: str = "content",
    response_column: str = "summary",
    progress: bool = True,
    skip_bad: bool = False,
    data_config: DataConfig | None = None,
    generation_config: GenerationConfig | None = None,
    **generation_kwargs,
) -> dict:
    """Evaluate (or just run) a checkpoint on an ADGEN-format jsonl file and write the results.

    Writes, each atomically, into `output_dir`:

    * predictions.jsonl: one object per example, in file order: "prompt", "prediction", and in eval
      mode "reference" (the text scored against, see `reference_texts`) and the example's
      "bleu-4", "rouge-1", "rouge-2", "rouge-l";
    * metrics.json: in eval mode the four mean scores; always "mode", "count", "skipped_empty",
      "timing" and "settings". Predict mode writes it too, without scores, so a run folder always
      says what was run and an older metrics.json there cannot be mistaken for this run's.

    Args:
        model: what to load (glm6b.config.LoadConfig: the folder or name, a LoRA adapter, dtype, device,
            quantization, compile), or a model folder / name.
        data_path: jsonl file, one {prompt_column: ..., response_column: ...} object per line, or a
            MindFormers ADGEN MindRecord file (see the module docstring).
        output_dir: created if needed.
        mode: "eval" (generate and score) or "predict" (generate only; no references needed).
        batch_size: prompts per generate call.
        max_new_tokens: limit on generated tokens; None means max_target_length.
        max_source_length: prompt budget in tokens, [gMASK] <sop> included.
        max_target_length: reference budget in tokens (answers are truncated to it for scoring).
        prompt_column, response_column: jsonl fields (ADGEN: "content", "summary").
        progress: show a progress bar and print the results table.
        skip_bad: skip (and count) malformed lines instead of stopping at the first one (ignored
            when data_config is given: its own skip_bad applies).
        data_config: the training run's data settings (source_prefix, history_column, columns,
            lengths); when given, it replaces max_source_length, max_target_length, prompt_column and
            response_column, so the prompts are exactly those the model was trained on.
        generation_config: base generation settings (greedy when not given); with compile "auto" the
            decode step compiles as model.compile says.
        **generation_kwargs: GenerationConfig fields overriding it (do_sample, temperature, top_p, top_k,
            seed, ...).

    Returns:
        The dict written to metrics.json.

    Raises:
        DataError: unreadable data or a malformed line (the message names file and line).
        CheckpointError, ConfigError, ModelNotFoundError: unusable model or adapter.
        ValueError: a bad setting (mode, batch size, generation option).
    """
    if mode not in ("eval", "predict"):
        raise ValueError(f"mode={mode!r}: expected 'eval' or 'predict'")
    if data_config is None:
        data_config = DataConfig(max_source_length=max_source_length, max_target_length=max_target_length,
                                 prompt_column=prompt_column, response_column=response_column, skip_bad=skip_bad)
    if max_new_tokens is None:
        max_new_tokens = data_config.max_target_length
    # Check cheap things (outputs, data, options) before the expensive model load.
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise OutputError(f"--output-dir {output_dir} is a file; expected a folder")
    if Path(output_dir).is_dir():  # e.g. the data file itself named predictions.jsonl in that folder
        for name in ("predictions.jsonl", "metrics.json"):
            check_output_file(Path(output_dir) / name, inputs=[data_path], flag="--output-dir")
    spec = model if isinstance(model, LoadConfig) else LoadConfig(load_checkpoint=os.fspath(model))
    # A MindRecord file holds token ids: decoded with the model's tokenizer, still before the weights load.
    tokenizer = load_tokenizer(resolve(spec).tokenizer) if is_mindrecord(data_path) else None
    examples, stats = read_eval_examples(data_path, data_config, mode, tokenizer)
    generation = make_generation_config(generation_config, **{**generation_kwargs, "max_new_tokens": max_new_tokens})
    if generation.compile == "auto":
        generation.compile = spec.compile

    model, tokenizer, _ = load(spec)
    generation = make_generation_config(generation, allowed_vocab_size=len(tokenizer))
    prompts = [ex.prompt for ex in examples]
    predictions, timing = generate_predictions(model, tokenizer, prompts, batch_size=batch_size,
                                               max_source_length=data_config.max_source_length,
                                               generation_config=generation,
                                               max_new_tokens=max_new_tokens, progress=progress)

    records = [{"prompt": p, "prediction": pred} for p, pred in zip(prompts, predictions)]
    summary: dict = {}
    if mode == "eval":
        references = reference_texts(tokenizer, [ex.answer for ex in examples], data_config.max_target_length)
        scores = compute_metrics(predictions, references)
        for record, reference, example_scores in zip(records, references, scores["per_example"]):
            record["reference"] = reference
            record.update(example_scores)
        summary.update({name: scores[name] for name in METRIC_NAMES})
    summary.update({
        "mode": mode,
        "count": len(examples),
        "skipped_empty": stats.skipped_empty,
        "timing": timing,
        "settings": {
            "model": spec.load_checkpoint,
            "adapter": spec.adapter,
            "data": str(data_path),
            "batch_size": batch_size,
            "max_source_length": data_config.max_source_length,
            "max_target_length": data_config.max_target_length,
            "max_new_tokens": max_new_tokens,
            "prompt_column": data_config.prompt_column,
            "response_column": data_config.response_column,
            "history_column": data_config.history_column,
            "source_prefix": data_config.source_prefix,
            "dtype": str(unwrap_peft(model).dtype).removeprefix("torch."),
            "device": str(unwrap_peft(model).device),
            "quantization_bit": unwrap_peft(model).config.quantization_bit,
            "generation": {k: v for k, v in asdict(generation).items() if k != "max_length"},
        },
    })

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    atomic_write_text(output_dir / PREDICTIONS_NAME, lines)
    atomic_write_text(output_dir / METRICS_NAME, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    if progress:
        print(format_table(summary))
    return summary


def format_table(summary: dict) -> str:
    """A small text table of a metrics.json dict: the scores (eval mode), count and speed."""
    rows = [(name, f"{summary[name]:.4f}") for name in METRIC_NAMES if name in summary]
    timing = summary["timing"]
    rows += [
        ("examples", str(summary["count"])),
        ("seconds", f"{timing['seconds']:.2f}"),
        ("examples/s", f"{timing['examples_per_second']:.2f}"),
        ("tokens/s", f"{timing['tokens_per_second']:.1f}"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value:>10}" for name, value in rows)
