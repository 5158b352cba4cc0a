"""The whole loop on the built-in default, in minutes on a laptop CPU, with nothing downloaded.

    glm6b quickstart [--method lora|full|ptuning] [--steps N] [--output-dir DIR]

1. Build the default model: a small ChatGLM-architecture config (glm6b/assets/default/config.json)
   with the default tokenizer (same special pieces and text rules as ice_text.model).
2. Pre-train it briefly from random weights on generic data (ad copy written from the garment type
   alone, plus a few chat rounds), so that it writes fluent copy but does not yet know how the
   other attributes shape it: that mapping is what fine-tuning must add (and what LoRA adapts).
   The base is kept in DIR/base and reused by later runs.
3. Evaluate it (BLEU-4, ROUGE-1/2/L, greedy) on the ADGEN-format dev split.
4. Fine-tune it on the ADGEN-format train split with the chosen method (progress bar, logs,
   DIR/<method>/loss.png), evaluate again, and print both scores side by side.
5. Show a few generations and a two-round chat, and write DIR/<method>/summary.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .api import load
from .checkpoint.hf import MODEL_FOLDER_FILES, MODEL_FOLDER_PREFIXES, find_weight_files, save_pretrained
from .config import ChatGLMConfig, DataConfig, LoadConfig, LoraConfig, QuickstartConfig, TrainingConfig
from .config import QuickstartSettings  # noqa: F401 - QuickstartConfig's first name, still imported from here
from .eval.evaluate import evaluate_generation
from .extras import import_extra
from .io import atomic_folder, atomic_write_text
from .model import ChatGLMForConditionalGeneration
from .safety import check_output_dir
from .sample_data import DEFAULT_ASSETS, chat_pairs, read_adgen_jsonl
from .tokenizer import load_tokenizer
from .train.trainer import Trainer

METRICS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")


# Per-method learning rate and default step count, tuned on the default model.
METHOD_DEFAULTS = {
    "full": dict(learning_rate=2e-3, steps=120),
    "lora": dict(learning_rate=5e-3, steps=150),
    "ptuning": dict(learning_rate=2e-2, steps=150),
}
DATA = DataConfig(max_source_length=32, max_target_length=40, dynamic_padding=True)
PRETRAIN_PROMPT_KEYS = 1  # pre-training prompts keep only the first attribute (the garment type)
CHAT_REPEATS = 100  # copies of the generic chat rounds in the pre-training data (about a third of it)


def _training_args(settings: QuickstartConfig, output_dir: Path, steps: int, learning_rate: float,
                   tensorboard: bool) -> TrainingConfig:
    return TrainingConfig(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=settings.batch_size,
                             learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=max(steps // 20, 1),
                             weight_decay=0.0, seed=settings.seed, logging_steps=10, save_steps=None,
                             tensorboard=tensorboard, overwrite_output_dir=True)  # quickstart's own folders


def write_pretraining_data(path: Path, train_examples: list[dict[str, str]]) -> None:
    """Generic pre-training rows in the ADGEN format: copy from the garment type alone, and chats."""
    lines = []
    for example in train_examples:
        short_prompt = "*".join(example["content"].split("*")[:PRETRAIN_PROMPT_KEYS])
        lines.append({"content": short_prompt, "summary": example["summary"], "history": []})
    pairs = chat_pairs()
    for repeat in range(CHAT_REPEATS):  # the chat rounds are few: repeat them so they are learnt
        for i, (query, response) in enumerate(pairs):
            history = [list(pairs[(i + repeat) % len(pairs)])] if repeat % 2 else []
            lines.append({"content": query, "summary": response, "history": history})
    atomic_write_text(path, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))


def build_base_model(settings: QuickstartConfig, tokenizer) -> Path:
    """The pre-trained default base model as an HF folder (made once, then reused)."""
    base_dir = Path(settings.output_dir) / "base"
    problem = _incomplete_model_folder(base_dir)
    if problem is None:
        print(f"Reusing the pre-trained base model in {base_dir}")
        return base_dir
    if base_dir.exists():  # left by an interrupted earlier version: rebuild it, but never over foreign files
        check_output_dir(base_dir, overwrite=True, owned=MODEL_FOLDER_FILES, owned_prefixes=MODEL_FOLDER_PREFIXES)
        print(f"{base_dir} is incomplete ({problem}); building it again")
    config = ChatGLMConfig.from_json_file(DEFAULT_ASSETS / "config.json")
    torch.manual_seed(settings.seed)
    model = ChatGLMForConditionalGeneration(config)
    model.init_weights(std=0.02)
    work = Path(settings.output_dir) / "pretrain"
    work.mkdir(parents=True, exist_ok=True)
    data_path = work / "pretrain.json"
    write_pretraining_data(data_path, read_adgen_jsonl(DEFAULT_ASSETS / "adgen" / "train.json"))
    print(f"Pre-training the default model ({model.num_parameters() / 1e6:.1f}M parameters) from random weights "
          f"for {settings.pretrain_steps} steps on generic copy and chat")
    data = DataConfig(**{**vars(DATA), "history_column": "history"})
    trainer = Trainer(model=model, tokenizer=tokenizer, method="full", data_config=data, train_dataset=str(data_path),
                      args=_training_args(settings, work, settings.pretrain_steps, 3e-3, tensorboard=False))
    trainer.train()
    with atomic_folder(base_dir) as tmp:  # a kill while saving leaves no half-written base/
        save_pretrained(model, tmp, tokenizer=tokenizer)
    return base_dir


def _incomplete_model_folder(folder: Path) -> str | None:
    """None if `folder` is a complete model folder (config, weights, tokenizer), else what is wrong."""
    if not folder.is_dir():
        return "missing"
    try:
        find_weight_files(folder)
        ChatGLMConfig.from_json_file(folder / "config.json")
    except ValueError as e:
        return str(e)
    missing = [name for name in ("ice_text.model", "tokenizer_config.json") if not (folder / name).is_file()]
    return f"no {', '.join(missing)}" if missing else None


def _load(base_dir: Path, method: str, quantize: str | None = None) -> ChatGLMForConditionalGeneration:
    spec = LoadConfig(load_checkpoint=str(base_dir), dtype="float32", device="cpu", quantize=quantize,
                      pre_seq_len=16 if method == "ptuning" else None)
    return load(spec, with_tokenizer=False).model


def _score(model, tokenizer, dev: list[dict[str, str]]) -> tuple[list[str], dict]:
    predictions, metrics = evaluate_generation(
        model, tokenizer, [ex["content"] for ex in dev], [ex["summary"] for ex in dev], batch_size=16,
        max_source_length=DATA.max_source_length, max_target_length=DATA.max_target_length)
    return predictions, metrics


def run_quickstart(settings: QuickstartConfig) -> dict:
    """Run the quickstart and return its summary (also written to DIR/<method>/summary.json).

    Args:
        settings: QuickstartConfig.

    Returns:
        {"method", "before": metrics, "after": metrics, "samples", "chat", "seconds", "output_dir"}.
    """
    start = time.perf_counter()
    defaults = METHOD_DEFAULTS[settings.method]
    steps = settings.steps if settings.steps is not None else defaults["steps"]
    for module, extra in (("matplotlib", "train"), ("peft", "train"), ("jieba", "eval"), ("rouge_chinese", "eval")):
        import_extra(module, extra, "glm6b quickstart")  # before minutes of work, not after them
    tokenizer = load_tokenizer(DEFAULT_ASSETS)
    base_dir = build_base_model(settings, tokenizer)
    dev = read_adgen_jsonl(DEFAULT_ASSETS / "adgen" / "dev.json")[: settings.eval_examples]

    if settings.quantize and settings.method == "full":
        raise ValueError("--quantize needs --method lora or ptuning: a quantized base is not trained itself")
    model = _load(base_dir, settings.method, settings.quantize)
    print(f"Scoring the base model on {len(dev)} dev examples")
    _, before = _score(model, tokenizer, dev)

    run_dir = Path(settings.output_dir) / settings.method
    print(f"Fine-tuning ({settings.method}) for {steps} steps")
    trainer = Trainer(model=model, tokenizer=tokenizer, method=settings.method, data_config=DATA,
                      train_dataset=str(DEFAULT_ASSETS / "adgen" / "train.json"),
                      lora_config=LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0),
                      args=_training_args(settings, run_dir, steps, defaults["learning_rate"], tensorboard=True))
    result = trainer.train()
    tuned = trainer.model

    print(f"Scoring the fine-tuned model on {len(dev)} dev examples")
    predictions, after = _score(tuned, tokenizer, dev)
    print(f"\n{'metric':<8}  {'before':>8}  {'after':>8}")
    for name in METRICS:
        print(f"{name:<8}  {before[name]:>8.2f}  {after[name]:>8.2f}")

    print("\nSample generations (dev split):")
    samples = []
    for example, prediction in list(zip(dev, predictions))[:3]:
        samples.append({"prompt": example["content"], "reference": example["summary"], "prediction": prediction})
        print(f"  prompt:     {example['content']}\n  reference:  {example['summary']}\n  prediction: {prediction}\n")

    print("A two-round chat:")
    history: list = []
    for query in ("你好", "这条裙子怎么搭配"):
        response, history = tuned.chat(tokenizer, query, history, max_length=256, do_sample=False)
        print(f"  user:  {query}\n  model: {response}")

    summary = {"method": settings.method, "steps": steps, "before": {k: before[k] for k in METRICS},
               "after": {k: after[k] for k in METRICS}, "samples": samples,
               "chat": [list(pair) for pair in history], "seconds": round(time.perf_counter() - start, 1),
               "output_dir": str(run_dir), "final": str(result.final_dir), "quantize": settings.quantize,
               "losses": [round(x, 4) for x in result.losses]}
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, ensure_ascii=False, indent=2) + "\n")
    print(f"\nDone in {summary['seconds']:.0f} s. Loss curve: {run_dir / 'loss.png'}; training log: "
          f"{run_dir / 'train_log.jsonl'}; fine-tuned weights: {result.final_dir}; summary: {run_dir / 'summary.json'}")
    return summary
