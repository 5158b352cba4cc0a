"""The `glm6b` command line: one subcommand per task, each a small add_<name>_command/cmd_<name> pair.

    glm6b chat --model glm_6b                      # interactive, streaming, keeps history
    glm6b generate --model PATH --prompt "你好"
    glm6b generate --model PATH --input prompts.jsonl --output out.jsonl --max-new-tokens 64 --greedy
    glm6b quantize --model PATH --quantize int4 --output PATH-int4   # THUDM's int4 layout (or quantize at load)
    glm6b serve --model PATH --port 8000              # OpenAI + THUDM api.py protocols and a web chat page

Adding a subcommand: write `add_<name>_command(subparsers)` (its arguments, and
`set_defaults(func=cmd_<name>)`) and `cmd_<name>(args) -> int`, then call the add function in
`build_parser`. Import torch and the model code inside cmd_<name>, so `glm6b --help` stays fast.
Errors a user can fix (missing model or file, bad input line, impossible option) are OSError or
ValueError: `main` prints them as one line on stderr and returns exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import inspect
import json
import os
import re
import signal
import sys
import threading
import time
import typing
from typing import Literal

from .config import DTYPE_NAMES
from .extras import MissingExtraError


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand.

    Returns:
        The parser; `parse_args` gives a namespace whose `func` runs the chosen subcommand.
    """
    parser = argparse.ArgumentParser(prog="glm6b", description="Run and fine-tune ChatGLM-6B in plain PyTorch.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_chat_command(subparsers)
    add_generate_command(subparsers)
    add_preprocess_command(subparsers)
    add_run_command(subparsers)
    add_merge_lora_command(subparsers)
    add_merge_checkpoint_command(subparsers)
    add_eval_command(subparsers)
    add_quantize_command(subparsers)
    add_quickstart_command(subparsers)
    add_convert_command(subparsers)
    add_serve_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line.

    Every expected failure (a bad file, field or flag, a corrupt checkpoint, a full disk, a missing
    device, Ctrl-C) ends as one line on stderr naming what was wrong and exit code 2 (130 for Ctrl-C,
    143 for SIGTERM), without a traceback; `GLM6B_DEBUG=1` shows the traceback instead. SIGTERM is
    turned into an exit that runs the cleanup code, so no temporary file is left behind.

    Args:
        argv: the arguments (without the program name); None reads sys.argv.

    Returns:
        The exit code: 0 on success, 2 on a usage or input error (printed as one line on stderr).
    """
    args = build_parser().parse_args(argv)
    previous = _install_sigterm_handler()
    try:
        return args.func(args) or 0
    except KeyboardInterrupt as e:  # training stops on Ctrl-C with a checkpoint and says where (e's message)
        if _debug():
            raise
        print(f"glm6b {args.command}: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        return 130
    except _Terminated:
        if _debug():
            raise
        print(f"glm6b {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except (OSError, ValueError, MissingExtraError) as e:
        if _debug():
            raise
        print(f"glm6b {args.command}: error: {error_line(e)}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _Terminated(SystemExit):
    """Raised by the SIGTERM handler: unwinds the stack (finally blocks, temporary-file cleanup)."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated(143)


def _install_sigterm_handler():
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


def _debug() -> bool:
    return os.environ.get("GLM6B_DEBUG", "") not in ("", "0")


def error_line(e: BaseException) -> str:
    """One line describing an expected failure: the file, field or flag, and what was expected.

    Args:
        e: an OSError or ValueError (the package's errors derive from ValueError).

    Returns:
        The message without newlines; OSErrors name their file and, for a full disk, what to do.
    """
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        where = f" while writing {e.filename}" if e.filename else ""
        text = f"no space left on the device{where}; free space or choose another output folder"
    elif isinstance(e, OSError) and e.strerror and e.filename:
        text = f"{e.filename}: {e.strerror}"
    elif isinstance(e, UnicodeError):
        text = f"text that is not valid UTF-8 ({e})"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


# ----------------------------------------------------------------------------------- shared arguments
#
# The flags of a settings dataclass of glm6b.config are derived from its fields: one flag per field
# (`--max-source-length` for max_source_length), its type and choices from the annotation, its help
# from the field's text in the class's "Attributes:" docs. Every command that loads a model takes the
# same model flags (all of LoadConfig); the commands that generate take the same sampling flags.

# Older spellings, still accepted (they are left out of --help's list of flags by sharing one entry).
MODEL_FLAGS = {"load_checkpoint": ("--model", "--load-checkpoint"), "config": ("--model-config", "--config")}
SAMPLING_FIELDS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "seed")
LOOKUP_FIELDS = ("prompt_lookup_num_tokens", "prompt_lookup_max_ngram", "prompt_lookup_corpus")
LOOKUP_FLAGS = {"prompt_lookup_num_tokens": ("--prompt-lookup", "--prompt-lookup-num-tokens")}
LOOKUP_METAVARS = {"prompt_lookup_max_ngram": "N", "prompt_lookup_corpus": "PATH"}
DATA_FIELDS = ("max_source_length", "max_target_length", "prompt_column", "response_column", "history_column",
               "source_prefix", "skip_bad")


def field_docs(cls) -> dict[str, str]:
    """{field name: its text} from the "Attributes:" section of a dataclass's docstring."""
    docs: dict[str, str] = {}
    names: list[str] = []
    in_attributes = False
    for line in (inspect.getdoc(cls) or "").splitlines():
        if line.strip() == "Attributes:":
            in_attributes = True
            continue
        if not in_attributes:
            continue
        if line and not line.startswith(" "):  # the next section
            break
        entry = re.match(r"^    ([a-z_][a-z0-9_]*(?:, [a-z_][a-z0-9_]*)*): ?(.*)$", line)
        if entry:
            names = entry.group(1).split(", ")
            docs.update({name: entry.group(2) for name in names})
        elif line.strip() and names:
            for name in names:
                docs[name] += " " + line.strip()
    return docs


def _compile_value(text: str) -> bool | str:
    values = {"auto": "auto", "true": True, "false": False}
    if text.lower() not in values:
        raise argparse.ArgumentTypeError(f"expected auto, true or false, got {text!r}")
    return values[text.lower()]


def _number_or(choices: tuple[str, ...]):
    """An argparse type: a whole number >= 0 or one of `choices` (prompt_lookup_num_tokens: "auto" or K)."""
    def parse(text: str) -> int | str:
        if text.lower() in choices:
            return text.lower()
        try:
            value = int(text)
        except ValueError:
            value = -1
        if value < 0:
            raise argparse.ArgumentTypeError(f"expected {', '.join(choices)} or a number >= 0, got {text!r}")
        return value
    return parse


def add_config_arguments(parser, cls, names, flags: dict[str, tuple[str, ...]] | None = None,
                         defaults: dict | None = None, only_given: bool = False, required: tuple[str, ...] = (),
                         metavars: dict[str, str] | None = None) -> None:
    """Add one flag per field `names` of the dataclass `cls` (see the section comment above).

    Args:
        parser: an argparse parser or argument group.
        cls: the dataclass (torch-free: glm6b.config).
        names: the fields to add, in order.
        flags: field -> its flag spellings (default `--field-name`).
        defaults: field -> this command's default instead of the dataclass's.
        only_given: leave a flag that is not given out of the parsed namespace (for flags that
            override a recipe).
        required: the fields whose flag must be given.
        metavars: field -> the name its value goes by in --help (default: argparse's).
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    field_defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for name in names:
        kind, options = hints[name], [a for a in typing.get_args(hints[name]) if a is not type(None)]
        literal = [v for a in options if typing.get_origin(a) is Literal for v in typing.get_args(a)]
        literal += list(typing.get_args(kind)) if typing.get_origin(kind) is Literal else []
        kwargs: dict = {"dest": name, "help": docs[name].replace("%", "%%")}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif bool in options and literal:  # compile: true, false or auto
            kwargs.update(type=_compile_value, metavar="{auto,true,false}")
        elif int in options and literal:  # prompt_lookup_num_tokens: auto or a number
            kwargs.update(type=_number_or(tuple(literal)), metavar="{" + ",".join(literal) + ",K}")
        elif literal:
            kwargs["choices"] = literal
        elif int in options or kind is int:
            kwargs["type"] = int
        elif float in options or kind is float:
            kwargs["type"] = float
        default = (defaults or {}).get(name, field_defaults[name])
        kwargs["default"] = argparse.SUPPRESS if only_given else default
        if name in required:
            kwargs["required"] = True
        if name in (metavars or {}):
            kwargs["metavar"] = metavars[name]
        parser.add_argument(*(flags or {}).get(name, ("--" + name.replace("_", "-"),)), **kwargs)


def add_model_arguments(parser, required: bool = True, only_given: bool = False,
                        extra_flags: dict[str, tuple[str, ...]] | None = None, defaults: dict | None = None) -> None:
    """The model flags of every command that loads a model: every field of glm6b.config.LoadConfig."""
    from .config import LoadConfig

    group = parser.add_argument_group("model (glm6b.config.LoadConfig)")
    flags = {**MODEL_FLAGS, **(extra_flags or {})}
    add_config_arguments(group, LoadConfig, [f.name for f in dataclasses.fields(LoadConfig)], flags=flags,
                         defaults=defaults, only_given=only_given, required=("load_checkpoint",) if required else ())
    # `glm6b quantize`'s first spellings: --bits 4 for --quantize int4, --embeddings for --quantize-embeddings.
    group.add_argument("--bits", dest="quantize", type=lambda v: f"int{int(v)}", choices=("int8", "int4"),
                       default=argparse.SUPPRESS, help="older spelling of --quantize (4 = int4, 8 = int8)")
    group.add_argument("--embeddings", dest="quantize_embeddings", action="store_true", default=argparse.SUPPRESS,
                       help="older spelling of --quantize-embeddings")


def load_config(args: argparse.Namespace):
    """The glm6b.config.LoadConfig of the parsed model flags (checked: a bad value is one ConfigError line)."""
    from .config import LoadConfig

    return LoadConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(LoadConfig)})


def add_data_arguments(parser, names=DATA_FIELDS) -> None:
    """The data flags (glm6b.config.DataConfig fields); the seed's spellings (`--max_source_length`) work too."""
    from .config import DataConfig

    group = parser.add_argument_group("data (glm6b.config.DataConfig)")
    add_config_arguments(group, DataConfig, names,
                         flags={n: ("--" + n.replace("_", "-"), "--" + n) for n in names if "_" in n and n != "skip_bad"})


def data_config(args: argparse.Namespace, names=DATA_FIELDS):
    """The glm6b.config.DataConfig of the parsed data flags."""
    from .config import DataConfig

    return DataConfig(**{name: getattr(args, name) for name in names})


def add_sampling_arguments(parser, do_sample: bool) -> None:
    """The sampling flags of the commands that generate (chat, generate, eval): GenerationConfig's fields
    with THUDM's chat settings as defaults (temperature 0.95, top_p 0.7); `do_sample` is this command's
    default, which `--do-sample` / `--greedy` turn on or off."""
    from .config import GenerationConfig

    group = parser.add_argument_group("sampling (glm6b.config.GenerationConfig)")
    add_config_arguments(group, GenerationConfig, SAMPLING_FIELDS,
                         defaults={"do_sample": do_sample, "temperature": 0.95, "top_p": 0.7})
    group.add_argument("--greedy", dest="do_sample", action="store_false", help="= --no-do-sample")
    add_lookup_arguments(parser)


def add_lookup_arguments(parser) -> None:
    """The prompt-lookup flags (GenerationConfig's prompt_lookup_* fields): --prompt-lookup K|auto,
    --prompt-lookup-max-ngram N and --prompt-lookup-corpus PATH; chat, generate, eval and serve take them."""
    from .config import GenerationConfig

    group = parser.add_argument_group("prompt lookup (glm6b.inference.lookup; docs/speculative.md)")
    add_config_arguments(group, GenerationConfig, LOOKUP_FIELDS, flags=LOOKUP_FLAGS, metavars=LOOKUP_METAVARS)


def sampling_options(args: argparse.Namespace) -> dict:
    """The GenerationConfig fields of the parsed sampling and prompt-lookup flags, and the model's compile setting
    (a --prompt-lookup-corpus that cannot be used fails here, before a model loads)."""
    check_lookup_corpus(args)
    return {**{name: getattr(args, name) for name in SAMPLING_FIELDS + LOOKUP_FIELDS}, "compile": args.compile}


def check_lookup_corpus(args: argparse.Namespace) -> None:
    """--prompt-lookup-corpus names a file and comes with --prompt-lookup (its lines are checked as it is read)."""
    path = args.prompt_lookup_corpus
    if path is None:
        return
    if not os.path.isfile(path):
        raise ValueError(f"--prompt-lookup-corpus {path}: no such file")
    if args.prompt_lookup_num_tokens in (None, 0):
        raise ValueError("--prompt-lookup-corpus is a source of prompt lookup's proposals: add --prompt-lookup K "
                         "(or auto)")


def _load(args: argparse.Namespace):
    """(model, tokenizer) of the model flags (glm6b.api.load: the tokenizer is checked before the weights load)."""
    from .api import load

    model, tokenizer, _ = load(load_config(args))
    return model, tokenizer


# ----------------------------------------------------------------------------------- chat


def add_chat_command(subparsers) -> None:
    """`glm6b chat`: an interactive conversation in the terminal."""
    parser = subparsers.add_parser(
        "chat", help="talk to the model in the terminal (streaming, keeps history)",
        description="Interactive chat. Type a message and press Enter; 'clear' forgets the history, "
                    "'exit' (or end of input) quits. When the conversation outgrows --max-length the "
                    "oldest rounds are left out of the prompt.")
    add_model_arguments(parser)
    parser.add_argument("--max-length", type=int, default=2048, help="limit on prompt + answer tokens (default 2048)")
    add_sampling_arguments(parser, do_sample=True)
    parser.set_defaults(func=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    """Run the chat loop: stream each answer, then report its speed on stderr."""
    from .inference.chat import stream_chat
    from .inference.text import stable_length
    from .tokenizer import check_text

    options = sampling_options(args)
    model, tokenizer = _load(args)
    history: list[tuple[str, str]] = []
    if hasattr(sys.stdin, "reconfigure"):  # a line that is not UTF-8 is refused by the tokenizer, not fatal
        sys.stdin.reconfigure(errors="surrogateescape")
    print("ChatGLM-6B: type a message; 'clear' resets the history, 'exit' quits.")
    while True:
        try:
            query = input("\nUser: ").strip()
        except EOFError:
            print()
            return 0
        if query == "exit":
            return 0
        if query == "clear":
            history = []
            print("(history cleared)")
            continue
        if not query:
            continue
        print("ChatGLM-6B: ", end="", flush=True)
        start, printed, tokens, response = time.perf_counter(), "", 0, ""
        try:
            check_text(query, "the message")
            for response, new_history in stream_chat(model, tokenizer, query, history, max_length=args.max_length,
                                                     drop_oldest=True, **options):
                tokens += 1  # one partial per generated token
                printed = _print_delta(printed, response[:stable_length(response, chat=True)])
        except ValueError as e:  # e.g. the message alone is longer than --max-length, or not UTF-8
            print(f"\nerror: {error_line(e)} (the conversation so far is kept)", file=sys.stderr)
            continue
        if _print_delta(printed, response) != response:  # the end rewrote printed text (rare): show it whole
            print("\n" + response, end="")
        print(flush=True)
        history = new_history
        seconds = time.perf_counter() - start
        print(f"[{tokens} tokens in {seconds:.2f} s, {tokens / seconds:.1f} tokens/s]", file=sys.stderr, flush=True)


def _print_delta(printed: str, text: str) -> str:
    """Print what `text` adds to `printed` (if it extends it); return what is now printed."""
    if len(text) > len(printed) and text.startswith(printed):
        print(text[len(printed):], end="", flush=True)
        return text
    return printed


# ----------------------------------------------------------------------------------- generate


def add_generate_command(subparsers) -> None:
    """`glm6b generate`: continue one prompt, or every prompt of a JSONL file."""
    parser = subparsers.add_parser(
        "generate", help="continue a prompt (--prompt) or every prompt of a JSONL file (--input/--output)",
        description="Generate continuations (no chat template). --input lines are JSON objects with a "
                    "prompt field, or JSON strings; --output gets one {\"prompt\": ..., \"response\": ...} "
                    "line per prompt, written atomically when all are done.")
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt; the continuation is printed")
    source.add_argument("--input", metavar="JSONL", help="file of prompts, one per line")
    parser.add_argument("--output", metavar="JSONL", help="where to write the responses (needed with --input)")
    parser.add_argument("--prompt-field", default="prompt", help="field holding the prompt (default 'prompt')")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="limit on generated tokens (default 256)")
    add_sampling_arguments(parser, do_sample=True)
    parser.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate for --prompt (printed) or for each line of --input (written to --output)."""
    if args.input is not None and args.output is None:
        raise ValueError("--input needs --output FILE")
    if args.prompt is not None and args.output is not None:
        raise ValueError("--output goes with --input; with --prompt the continuation is printed")
    if args.output is not None:  # before the model loads: an output that cannot be written fails now
        from .safety import check_output_file

        check_output_file(args.output, inputs=[args.input, args.load_checkpoint])
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.input, args.prompt_field)

    from tqdm import tqdm

    from .inference.pipelines import OUTPUT_KEY, TextGenerationPipeline
    from .io import atomic_path

    options = sampling_options(args)
    model, tokenizer = _load(args)
    pipe = TextGenerationPipeline(model, tokenizer, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                  **options)
    if args.prompt is not None:
        print(pipe(args.prompt)[0][OUTPUT_KEY][0])
        return 0
    with atomic_path(args.output) as tmp, open(tmp, "w", encoding="utf-8") as out, \
            tqdm(total=len(prompts), unit="prompt", file=sys.stderr) as progress:
        for start in range(0, len(prompts), args.batch_size):
            chunk = prompts[start:start + args.batch_size]
            for prompt, result in zip(chunk, pipe(chunk)):
                out.write(json.dumps({"prompt": prompt, "response": result[OUTPUT_KEY][0]}, ensure_ascii=False) + "\n")
            progress.update(len(chunk))
    print(f"wrote {len(prompts)} responses to {args.output}", file=sys.stderr)
    return 0


def read_prompts(path: str, field: str = "prompt") -> list[str]:
    """The prompts of a JSONL file (blank lines skipped).

    Args:
        path: the file; each line a JSON object with a string `field`, or a JSON string.
        field: the object field holding the prompt.

    Returns:
        The prompts in file order.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a malformed line (the message gives file and line number), or no prompts at all.
    """
    prompts = []
    with open(path, encoding="utf-8") as f:
        try:
            lines = f.readlines()
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
        if isinstance(item, dict):
            if field not in item:
                raise ValueError(f"{path}:{number}: no {field!r} field (fields: {', '.join(map(str, item)) or 'none'})")
            item = item[field]
        if not isinstance(item, str):
            raise ValueError(f"{path}:{number}: expected a JSON object with a string {field!r} field, or a JSON "
                             f"string; got {json.dumps(item, ensure_ascii=False)[:60]}")
        prompts.append(item)
    if not prompts:
        raise ValueError(f"{path}: no prompts found")
    return prompts


# ----------------------------------------------------------------------------------- preprocess


def add_preprocess_command(subparsers) -> None:
    """`glm6b preprocess`: encode a prompt/response jsonl file once into memory-mappable arrays."""
    parser = subparsers.add_parser(
        "preprocess", help="encode ADGEN-style jsonl into input_ids/labels/offsets .npy files + meta.json",
        description="Build training (--mode train) or evaluation (--mode eval) rows exactly as the ADGEN recipe "
                    "does and write them to DIR (input_ids.npy, labels.npy, offsets.npy, meta.json). Pass DIR as "
                    "data.train_data / data.eval_data of a recipe; its lengths and columns must match. "
                    "--format mindrecord writes the MindRecord file MindFormers' adgen_dataset.py writes "
                    "(--output FILE.mindrecord, with FILE.mindrecord.db), which MindFormers and glm6b read.")
    parser.add_argument("--tokenizer", required=True, metavar="PATH", help="tokenizer folder (ice_text.model)")
    parser.add_argument("--input", "--input_file", dest="input", required=True, metavar="JSONL",
                        help="one JSON object per line")
    parser.add_argument("--output", "--output_file", dest="output", required=True, metavar="PATH",
                        help="folder to write (--format mindrecord: the file)")
    parser.add_argument("--format", choices=("npy", "mindrecord"), default="npy",
                        help="npy: glm6b's folder (default); mindrecord: MindFormers' ADGEN MindRecord file")
    parser.add_argument("--mode", choices=("train", "eval"), default="train", help="row layout (default train)")
    add_data_arguments(parser)
    parser.set_defaults(func=cmd_preprocess)


def cmd_preprocess(args: argparse.Namespace) -> int:
    """Encode --input into --output and report the counts."""
    from .data.preprocess import preprocess, preprocess_mindrecord
    from .tokenizer import load_tokenizer

    if args.format == "mindrecord":
        from .safety import check_output_file

        check_output_file(args.output, inputs=[args.input], flag="--output")
        meta = preprocess_mindrecord(load_tokenizer(args.tokenizer), args.input, args.output, data_config(args),
                                     mode=args.mode, skip_bad=args.skip_bad)
        counts = meta["counts"]
        for line in meta["bad_lines"]:
            print(f"skipped: {line}", file=sys.stderr)
        print(f"wrote {counts['rows']} rows (MindFormers' {args.mode} layout) to {args.output} and {args.output}.db; "
              f"skipped {counts['skipped_empty']} with an empty prompt or answer and {counts['skipped_bad']} malformed")
        return 0
    meta = preprocess(load_tokenizer(args.tokenizer), args.input, args.output, data_config(args), mode=args.mode,
                      skip_bad=args.skip_bad)
    counts = meta["counts"]
    for line in meta["bad_lines"]:
        print(f"skipped: {line}", file=sys.stderr)
    print(f"wrote {counts['rows']} rows ({counts['tokens']} tokens, mode {args.mode}) to {args.output}; skipped "
          f"{counts['skipped_empty']} with an empty prompt or answer and {counts['skipped_bad']} malformed")
    return 0


# ----------------------------------------------------------------------------------- run


def add_run_command(subparsers) -> None:
    """`glm6b run`: train, fine-tune, evaluate or predict from a YAML recipe."""
    parser = subparsers.add_parser(
        "run", help="train / finetune / eval / predict from a YAML recipe (finetune, lora, infer, lora_infer, or a file)",
        description="Run a recipe. Keys are the fields of glm6b.train.recipe's section dataclasses; --set "
                    "section.key=value (value parsed as YAML) and the short flags override the file.")
    parser.add_argument("--config", dest="recipe", required=True, metavar="YAML",
                        help="the recipe: a shipped one by name (finetune, lora, infer, lora_infer) or a YAML file")
    parser.add_argument("--mode", required=True, choices=("train", "finetune", "eval", "predict"),
                        help="train (from load_checkpoint or a random preset), finetune (load_checkpoint required), "
                             "eval (generate answers for eval_data and score them: BLEU-4, ROUGE-1/2/L), "
                             "predict (answers for --prompt or eval_data)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one recipe key (repeatable)")
    parser.add_argument("--train-data", "--train_dataset_dir", dest="train_data", metavar="PATH",
                        help="= --set data.train_data (jsonl, preprocessed folder or .mindrecord)")
    parser.add_argument("--eval-data", "--eval_dataset_dir", dest="eval_data", metavar="PATH",
                        help="= --set data.eval_data (jsonl, preprocessed folder or .mindrecord)")
    parser.add_argument("--output-dir", dest="output_dir", metavar="DIR", help="= --set trainer.output_dir")
    parser.add_argument("--max-steps", dest="max_steps", type=int, help="= --set trainer.max_steps")
    parser.add_argument("--batch-size", dest="batch_size", type=int, help="= --set trainer.per_device_train_batch_size")
    parser.add_argument("--learning-rate", dest="learning_rate", type=float, help="= --set trainer.learning_rate")
    parser.add_argument("--prompt", action="append", default=None, help="predict mode: a prompt (repeatable)")
    # The model flags set the recipe's model section (`--model PATH` = --set model.load_checkpoint=PATH).
    add_model_arguments(parser, required=False, only_given=True, extra_flags={"config": ("--model-config",)})
    parser.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    """Load the recipe with its overrides, run it, print the summary as JSON."""
    from .config import LoadConfig
    from .train.recipe import SHORT_FLAGS, load_recipe, run

    flags = {path: getattr(args, name) for name, path in SHORT_FLAGS.items()}
    flags.update({f"model.{f.name}": getattr(args, f.name) for f in dataclasses.fields(LoadConfig)
                  if hasattr(args, f.name)})  # only the model flags given
    recipe = load_recipe(args.recipe, args.overrides, flags)
    summary = run(recipe, args.mode, prompts=args.prompt)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 prints the summary
        print(json.dumps(summary, ensure_ascii=False))
    return 0


# ----------------------------------------------------------------------------------- merge-lora


def add_merge_lora_command(subparsers) -> None:
    """`glm6b merge-lora`: fold a LoRA adapter into its base model."""
    parser = subparsers.add_parser(
        "merge-lora", help="merge a LoRA adapter into its base model and save a full HF folder",
        description="Load --model (also spelled --base), apply the PEFT --adapter, merge it (W + B A alpha/r) in "
                    "--dtype (default float32: exact) and write a full model folder (config.json, weights, "
                    "tokenizer) that glm6b.load_model reads.")
    add_model_arguments(parser, extra_flags={"load_checkpoint": ("--model", "--load-checkpoint", "--base")}, defaults={"dtype": "float32"})
    parser.add_argument("--output", required=True, metavar="DIR", help="folder to write")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a model folder an earlier merge wrote to --output "
                             "(other files are never deleted)")
    parser.set_defaults(func=cmd_merge_lora)


def cmd_merge_lora(args: argparse.Namespace) -> int:
    """Merge and save."""
    from .train.lora import merge_lora

    if args.adapter is None:
        raise ValueError("merge-lora needs --adapter DIR (the PEFT LoRA adapter folder to merge)")
    folder = merge_lora(load_config(args), args.output, overwrite=args.overwrite)
    print(f"wrote the merged model to {folder}")
    return 0


# ----------------------------------------------------------------------------------- merge-checkpoint


def add_merge_checkpoint_command(subparsers) -> None:
    """`glm6b merge-checkpoint`: turn a sharded (DCP) training checkpoint into a normal folder."""
    parser = subparsers.add_parser(
        "merge-checkpoint", help="merge a sharded (multi-process) checkpoint into an HF / adapter folder",
        description="Read a checkpoint-<step> folder written by a torchrun run (torch.distributed.checkpoint "
                    "shards) in one process and write: full -> HF folder for glm6b.load_model; LoRA -> the PEFT "
                    "adapter folder, or with --base-model the merged HF folder; P-tuning -> the THUDM folder, or "
                    "with --base-model an HF folder with the prefix encoder.")
    parser.add_argument("--input", required=True, metavar="DIR", help="sharded checkpoint folder")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="folder to write: new or empty (not the run folder or the checkpoint itself)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a folder an earlier merge wrote to --output (other files are never deleted)")
    parser.add_argument("--base-model", dest="base_model", metavar="DIR", default=None,
                        help="base HF model folder (for checkpoints that hold only the trained tensors)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="dtype of the written weights (default: as stored)")
    parser.set_defaults(func=cmd_merge_checkpoint)


def cmd_merge_checkpoint(args: argparse.Namespace) -> int:
    """Merge and save."""
    from .train.export import merge_checkpoint

    folder = merge_checkpoint(args.input, args.output, base_model_path=args.base_model, dtype=args.dtype,
                              overwrite=args.overwrite)
    print(f"wrote {folder}")
    return 0


# ----------------------------------------------------------------------------------- eval


def add_eval_command(subparsers) -> None:
    """`glm6b eval`: generate answers for an ADGEN-format file and score them (BLEU-4, ROUGE-1/2/L)."""
    parser = subparsers.add_parser(
        "eval", help="generate for an ADGEN-format jsonl file and score BLEU-4 / ROUGE-1/2/L",
        description="Batched generation (greedy unless --do-sample) over --data (one {\"content\": ..., "
                    "\"summary\": ...} object per line), scored as the ChatGLM-6B ADGEN recipe scores it; a LoRA "
                    "--adapter is merged unless --no-merge-adapter. Writes DIR/predictions.jsonl and "
                    "DIR/metrics.json. --mode predict only generates (no summaries needed; metrics.json then "
                    "holds counts, timing and settings but no scores).")
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, metavar="FILE",
                        help="jsonl file of examples, or a MindFormers ADGEN .mindrecord file")
    parser.add_argument("--output-dir", required=True, metavar="DIR", help="where to write the results")
    parser.add_argument("--mode", choices=("eval", "predict"), default="eval", help="score, or only generate")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per batch (default 16)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="limit on generated tokens (default: --max-target-length)")
    add_data_arguments(parser)
    add_sampling_arguments(parser, do_sample=False)  # greedy: scores that do not change from run to run
    parser.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    """Run the evaluation; the results table goes to stdout, progress to stderr."""
    from .eval.evaluate import run_eval

    run_eval(load_config(args), args.data, args.output_dir, mode=args.mode, batch_size=args.batch_size,
             max_new_tokens=args.max_new_tokens, data_config=data_config(args), **sampling_options(args))
    print(f"wrote {args.output_dir}/predictions.jsonl and metrics.json", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------- quantize


def add_quantize_command(subparsers) -> None:
    """`glm6b quantize`: write a model folder in THUDM's int8/int4 layout."""
    parser = subparsers.add_parser(
        "quantize", help="write a weight-only int8/int4 copy of a model folder (THUDM's chatglm-6b-int4/-int8 layout)",
        description="Quantize the four Linear layers of every block per output row (THUDM's formula; with "
                    "--quantize-embeddings also the word embeddings and lm_head) and write config.json with "
                    "quantization_bit, pytorch_model.bin with int8 weight + float16 weight_scale per layer, and the "
                    "input's tokenizer files. The folder loads directly (glm6b.load_model, --model) and with "
                    "THUDM's own code.")
    add_model_arguments(parser)  # --quantize int4|int8 says how (the first releases' --bits 4|8 works too)
    parser.add_argument("--output", required=True, metavar="DIR", help="folder to write")
    parser.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    """Quantize and save."""
    from .api import quantize_folder

    if args.quantize is None:
        raise ValueError("quantize needs --quantize int4 or --quantize int8")
    print(f"wrote {quantize_folder(load_config(args), args.output)}")
    return 0


# ----------------------------------------------------------------------------------- quickstart


def add_quickstart_command(subparsers) -> None:
    p = subparsers.add_parser(
        "quickstart", help="the whole loop on the built-in default model and data (no downloads, minutes on a CPU)",
        description="Pre-train the small built-in model briefly, score it (BLEU-4/ROUGE) on the ADGEN-format dev "
                    "split, fine-tune it, score it again, and show generations and a chat.")
    from .config import QuickstartConfig

    add_config_arguments(p, QuickstartConfig, [f.name for f in dataclasses.fields(QuickstartConfig)])
    p.set_defaults(func=cmd_quickstart)


def cmd_quickstart(args) -> int:
    from .config import QuickstartConfig
    from .quickstart import run_quickstart

    run_quickstart(QuickstartConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(QuickstartConfig)}))
    return 0


# ----------------------------------------------------------------------------------- convert


def add_convert_command(subparsers) -> None:
    """`glm6b convert`: MindFormers .ckpt <-> HF folder (and MindPet LoRA <-> PEFT adapter)."""
    parser = subparsers.add_parser(
        "convert", help="convert between MindFormers .ckpt files and HF folders (LoRA: PEFT adapters)",
        description="--to hf (the default for a .ckpt input): write an HF folder (safetensors, config.json, "
                    "tokenizer files) from a MindFormers checkpoint, skipping optimizer state; a glm_6b_lora "
                    "checkpoint also gives a PEFT adapter (--adapter-output). --to mindspore (the default for a "
                    "folder): write the .ckpt MindFormers' convert_weight.py would (float16, MindFormers names), "
                    "with --adapter's LoRA under MindPet names. The seed's --pt_ckpt_path/--ms_ckpt_path work too.")
    parser.add_argument("--input", metavar="PATH",
                        help="a .ckpt file, a folder holding a MindFormers sharded set (rank_*/), or an HF folder")
    parser.add_argument("--strategy", metavar="FILE",
                        help="--to hf of a sharded set: its strategy file (ckpt_strategy.ckpt; a folder of per-stage "
                             "files for pipeline sets); default: ckpt_strategy.ckpt beside rank_*/")
    parser.add_argument("--output", metavar="PATH", help="the HF folder or .ckpt file to write")
    parser.add_argument("--pt_ckpt_path", metavar="PATH", help="(seed) the HF side: input of --to mindspore, "
                                                                "output of --to hf")
    parser.add_argument("--ms_ckpt_path", metavar="PATH", help="(seed) the MindSpore side: output of --to mindspore, "
                                                                "input of --to hf")
    parser.add_argument("--to", choices=("hf", "mindspore"), default=None,
                        help="target format (default: hf for a .ckpt input, mindspore otherwise)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                        help="dtype of the written weights (default: as stored for --to hf, float16 for --to mindspore)")
    parser.add_argument("--adapter-output", dest="adapter_output", metavar="DIR",
                        help="--to hf of a LoRA checkpoint: the PEFT adapter folder to write")
    parser.add_argument("--adapter", metavar="DIR", help="--to mindspore: a PEFT LoRA adapter to include (MindPet names)")
    parser.add_argument("--lora-rank", dest="lora_rank", type=int, default=None,
                        help="LoRA rank (default: read from the tensors)")
    parser.add_argument("--lora-alpha", dest="lora_alpha", type=float, default=None,
                        help="LoRA alpha (MindPet does not store it; MindFormers' glm_6b_lora recipe uses 32)")
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: the .ckpt's folder)")
    parser.add_argument("--config", metavar="JSON", help="config.json (default: beside the .ckpt, else the glm_6b preset)")
    parser.add_argument("--crc", action="store_true", help="--to mindspore: append the CRC32 trailer (MindSpore >= 2.3)")
    parser.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    """Work out the direction and paths, then convert."""
    to = args.to
    if args.input is None and args.output is None and (args.pt_ckpt_path or args.ms_ckpt_path):
        if to is None:  # the seed's convert_weight.py goes HF -> MindSpore; convert_reversed.py the other way
            reversed_ = args.ms_ckpt_path and os.path.isfile(args.ms_ckpt_path) and not (
                args.pt_ckpt_path and os.path.exists(args.pt_ckpt_path))
            to = "hf" if reversed_ else "mindspore"
        args.input, args.output = ((args.ms_ckpt_path, args.pt_ckpt_path) if to == "hf"
                                   else (args.pt_ckpt_path, args.ms_ckpt_path or "ms_glm_6b.ckpt"))
    if args.input is None or args.output is None:
        raise ValueError("convert needs --input and --output (or the seed's --pt_ckpt_path and --ms_ckpt_path)")
    from .checkpoint.hf import is_sharded_set
    from .convert import hf_to_mindspore, mindspore_to_hf

    if to is None:
        to = "hf" if args.input.endswith(".ckpt") or args.strategy or is_sharded_set(args.input) else "mindspore"

    if to == "hf":
        if args.adapter is not None:
            raise ValueError("--adapter goes with --to mindspore; for --to hf use --adapter-output")
        out = mindspore_to_hf(args.input, args.output, adapter_output=args.adapter_output, lora_rank=args.lora_rank,
                              lora_alpha=args.lora_alpha, dtype=args.dtype, config=args.config,
                              tokenizer=args.tokenizer, strategy=args.strategy)
        print(f"wrote {out}" + (f" and the adapter {args.adapter_output}" if args.adapter_output else ""))
        return 0
    if args.adapter_output is not None or args.strategy is not None:
        raise ValueError("--adapter-output and --strategy go with --to hf; for --to mindspore use --adapter")
    if not args.output.endswith(".ckpt"):
        raise ValueError(f"--output {args.output}: a MindSpore checkpoint file name ends with .ckpt")
    out = hf_to_mindspore(args.input, args.output, dtype=args.dtype or "float16", adapter=args.adapter,
                          crc_check=args.crc)
    print(f"wrote {out}")
    if args.adapter is not None:
        print("MindPet does not store the LoRA scale: set lora_rank and lora_alpha in the MindFormers pet_config "
              "to the adapter's r and lora_alpha", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------- serve

SERVE_MODULES = ("fastapi", "uvicorn", "sse_starlette", "prometheus_client")


def add_serve_command(subparsers) -> None:
    """`glm6b serve`: the HTTP server (OpenAI API, THUDM api.py protocol, web chat page, metrics)."""
    p = subparsers.add_parser(
        "serve", help="serve the model over HTTP: OpenAI API, THUDM api.py protocol, web chat page",
        description="Serve a model with continuous batching: POST /v1/chat/completions, /v1/completions, "
                    "GET /v1/models (OpenAI API), POST / (THUDM api.py), GET / (web chat page), GET /health, "
                    "GET /metrics. A LoRA --adapter is merged in (a --quantize model is quantized after the "
                    "merge). Needs the serve extra: pip install 'glm6b[serve]'.")
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on the API "
                                                   "(default: $GLM6B_API_KEY; none when unset)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a batch row; more are refused with 429 (default 64)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="most tokens one request may generate (default: the model's context length)")
    add_lookup_arguments(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    """Check the serve extra is installed, then load the model and serve until interrupted."""
    import importlib.util

    missing = [m for m in SERVE_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"the server needs the serve extra ({', '.join(missing)} missing): "
                         f"pip install 'glm6b[serve]'")
    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                             ("--max-tokens", args.max_tokens, 1), ("--port", args.port, 0)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    spec = load_config(args)  # a bad model flag fails here, before the server's imports
    check_lookup_corpus(args)
    from .serve.app import serve

    serve(spec, host=args.host, port=args.port, api_key=args.api_key or os.environ.get("GLM6B_API_KEY") or None,
          max_batch=args.max_batch, max_queue=args.max_queue, max_tokens=args.max_tokens,
          prompt_lookup=args.prompt_lookup_num_tokens, prompt_lookup_max_ngram=args.prompt_lookup_max_ngram,
          prompt_lookup_corpus=args.prompt_lookup_corpus)
    return 0
