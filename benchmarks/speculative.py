"""Prompt lookup (speculative decoding from the prompt): what a verification costs, what lookup saves.

    python benchmarks/speculative.py --layers 2 --threads 2                    # all five parts, a table each
    python benchmarks/speculative.py --only cost --precisions int4 --batch-sizes 1
    python benchmarks/speculative.py --only e2e --quickstart runs/quickstart   # after `glm6b quickstart`
    python benchmarks/speculative.py --json speculative.json                   # the numbers as JSON too
    python benchmarks/speculative.py --only expected --from-json a.json b.json  # price earlier runs' tables
    python benchmarks/speculative.py --only e2e references expected --from-json a.json --corpus none  # no corpus rows

1. cost: a verification step of k + 1 tokens per row (DecodeEngine.verify) against an ordinary
   one-token step (DecodeEngine.decode), k = 1..8, on the glm_6b shape with `--layers` layers and
   random weights (built on the meta device as in benchmarks/generate.py), per precision (float32,
   bfloat16, and int8 / int4 weights with the activations glm6b.load uses for them on this CPU:
   bfloat16 where glm6b's CPU kernels run, float32 elsewhere) and batch size, through the decode
   step as generate() runs it (compiled where "auto" compiles). The two are timed alternately and
   the median of the per-pair ratios is shown, so a change in the machine's load hits both. With a
   few layers the lm_head (the 130528-row word embeddings) is a large part of a step, so the lm_head
   is also timed alone and the ratio is extrapolated to the 28 layers of the real model:
       c28(T) = (28 / L * layers(T) + head(T)) / (28 / L * layers(1) + head(1)),
   layers(T) = step(T) - head(T) measured with L layers.
2. e2e: greedy ADGEN dev generation with a model whose answers copy from the prompt: the quickstart's
   LoRA fine-tune of the built-in default model (`glm6b quickstart` writes DIR/base and
   DIR/lora/final; the base alone is shown too). With and without lookup: whether the outputs are
   identical, the acceptance rate, tokens per model step, and the decode tokens/s of each (the
   prefill, timed on its own, is left out), alternating per prompt, median of `--rounds` rounds.
   The "+corpus" rows propose from the fine-tuning answers too (`--corpus`, by default the quickstart's
   train split: glm6b.inference.lookup.CorpusIndex, indexed before the timing starts).
   2b. copying: the same on the glm_6b shape with `--layers` layers and random weights, which
   continue by repeating their input token, so that proposals are right: the measured product of
   acceptance and verification cost at that shape.
   2c. references: the dev set's reference answers run through the proposer as if a model wrote
   them (teacher-forced, with the same switch-off): how much of ADGEN's text lookup can copy, per
   tokenizer (the quickstart's, whose pieces are whole phrases, and the golden test one, which
   splits Chinese text into characters and bytes); "+corpus": with the `--corpus` index as well.
3. expected: the speed-up lookup would give at glm_6b size for the acceptance measured in 2, priced
   with the verification costs of 1 (a computation, not a measurement):
       speed-up = (N - 1) / sum over model steps s of c28(T_s)
   for N tokens per answer (the first comes from the prefill; an ordinary step costs c28(1) = 1),
   and the same for a run where every proposal is rejected (the adaptive proposal length of
   glm6b.inference.lookup.ProposalLength, simulated), which is the slowest lookup can be, and for
   c(T) = 1 (a verification as cheap as a step: the most lookup can give for that acceptance). Each
   run is also priced at an assumed c(T) = `--assumed-cost` (1.2: what glm6b's AMX kernels measured
   for 8 int4 rows against one, docs/benchmarks.md), for a CPU the run did not have.

The CPU's model and flags are printed first (which of glm6b's CPU kernel builds runs depends on them:
AVX-512 with AVX512-BF16 and AMX, AVX-512 without AMX, AVX2, or none and PyTorch's weight-only ops), so that
a run on another machine, or after new kernels land, can be compared.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from glm6b.checkpoint.hf import default_dtype
from glm6b.config import ChatGLMConfig
from glm6b.inference.engine import DecodeEngine, prompt_inputs, should_compile, verify_rows_budget
from glm6b.inference.lookup import CorpusIndex, LookupStats, ProposalLength, corpus_index, propose
from glm6b.model import ChatGLMForConditionalGeneration
from glm6b.quant import cpu_kernels

# precision -> (activation dtype, weight bits): int8 / int4 run with the activations glm6b.load gives them on
# this CPU (bfloat16 where glm6b's CPU kernels run, float32 elsewhere: glm6b.checkpoint.hf.default_dtype).
QUANTIZED_DTYPE = default_dtype(torch.device("cpu"), quantized=True)
PRECISIONS = {"float32": (torch.float32, None), "bfloat16": (torch.bfloat16, None),
              "int8": (QUANTIZED_DTYPE, 8), "int4": (QUANTIZED_DTYPE, 4)}
REAL_LAYERS = 28  # glm_6b
KS = range(1, 9)


def cpu_summary() -> dict:
    """The CPU's model name, its vector/matrix flags that matter here, and whether glm6b's kernels run."""
    model, flags = platform.processor(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    except OSError:
        pass
    wanted = [f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c")]
    return {"cpu": model, "flags": wanted, "glm6b_cpu_kernels": cpu_kernels.available(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def build_model(precision: str, layers: int):
    """The glm_6b shape with `layers` layers and random weights, in a precision of PRECISIONS."""
    dtype, bits = PRECISIONS[precision]
    config = ChatGLMConfig.from_name("glm_6b", num_layers=layers)
    model = ChatGLMForConditionalGeneration(config, dtype=dtype, device="meta")
    model.to_empty(device="cpu")
    model.tie_weights()
    model.init_weights(generator=torch.Generator().manual_seed(0))
    if bits:
        from glm6b.quant.linear import prepare_kernels, quantize_model

        quantize_model(model, bits)
        prepare_kernels(model)
    return model.eval()


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------- 1. cost


@torch.inference_mode()
def verify_costs(model, batch: int, prompt_length: int, repeats: int, compile: bool | str, ks=KS) -> dict:
    """Median ratios verify(T) / decode and head(T) / head(1) for T = k + 1, k in `ks`, plus the raw times."""
    config = model.config
    body = torch.randint(6, config.mask_token_id, (batch, prompt_length - 2))
    ids = torch.cat([body, torch.tensor([config.gmask_token_id, config.bos_token_id]).expand(batch, 2)], dim=1)
    engine = DecodeEngine(model, batch, prompt_length + 16 + 2 * repeats * len(ks), compile=compile)
    tokens = engine.prefill(ids, *prompt_inputs(model, ids)).argmax(-1)
    feeds = {k: torch.cat([tokens[:, None], torch.randint(6, 20000, (batch, k))], dim=1) for k in ks}
    counts = {k: torch.full((batch,), k + 1) for k in ks}
    hidden = torch.randn(batch * (max(ks) + 1), config.hidden_size, dtype=model.dtype)
    for k in (0, *ks, 0):  # warm-up (and compiles: one graph for T = 1, then T static, then T symbolic)
        engine.decode(tokens) if k == 0 else engine.verify(feeds[k], counts[k])
    step_ratio = {k: [] for k in ks}
    head_ratio = {k: [] for k in ks}
    decode_ms, head_ms = [], []
    for _ in range(repeats):
        for k in ks:
            before = _timed(lambda: engine.decode(tokens))
            verify = _timed(lambda k=k: engine.verify(feeds[k], counts[k]))
            after = _timed(lambda: engine.decode(tokens))
            step_ratio[k].append(verify / ((before + after) / 2))
            decode_ms.append(1000 * (before + after) / 2)
            one = _timed(lambda: model.lm_head(hidden[:batch]))
            many = _timed(lambda k=k: model.lm_head(hidden[:batch * (k + 1)]))
            head_ratio[k].append(many / one)
            head_ms.append(1000 * one)
    decode, head = statistics.median(decode_ms), statistics.median(head_ms)
    layers_share = max(decode - head, 0.0)  # everything but the lm_head, for this model's layers
    scale = REAL_LAYERS / config.num_layers
    measured = {k: statistics.median(v) for k, v in step_ratio.items()}
    heads = {k: statistics.median(v) for k, v in head_ratio.items()}
    extrapolated = {}
    for k in ks:
        layers_k = measured[k] * decode - heads[k] * head
        extrapolated[k] = (scale * layers_k + heads[k] * head) / (scale * layers_share + head)
    return {"decode_ms": decode, "head_ms": head, "measured": measured, "head": heads, "c28": extrapolated,
            "compiled": engine.compiled}


def cost_tables(args) -> dict:
    results = {}
    for precision in args.precisions:
        model = build_model(precision, args.layers)
        for batch in args.batch_sizes:
            row = verify_costs(model, batch, args.prompt_length, args.repeats, args.compile, args.ks)
            row["rows_budget"] = verify_rows_budget(model)
            results[f"{precision}/b{batch}"] = row
            name = precision if PRECISIONS[precision][1] is None else f"{precision} ({str(model.dtype)[6:]})"
            print(f"| {name} | {batch} | {row['decode_ms']:.0f} | "
                  + " | ".join(f"{row['measured'][k]:.2f} ({row['c28'][k]:.2f})" for k in args.ks) + " |", flush=True)
        del model
        gc.collect()
        torch._dynamo.reset()  # each model's graphs afresh: all of them share GLMBlock.decode's recompile limit
    return results


# ----------------------------------------------------------------------------------- 2. e2e


def read_prompts(path: Path, count: int) -> list[str]:
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [line["content"] for line in lines[:count]]


@torch.inference_mode()
def end_to_end(model, inputs: list[tuple[torch.Tensor, ...]], k: int, rounds: int, corpus: str | None = None,
               tokenizer=None, **options) -> dict:
    """Greedy generation of every input alone, without and with lookup (alternating per input), `rounds`
    times: outputs identical?, lookup's statistics, and the decode tokens/s of both (median over rounds).
    With `corpus` (a file, indexed for `tokenizer` beforehand) lookup proposes from it too."""
    from glm6b.inference.generation import generate

    lookup_options = {"prompt_lookup_num_tokens": k, "prompt_lookup_corpus": corpus, "tokenizer": tokenizer}

    identical, ratios, rates = 0, [], []
    for round_ in range(rounds):
        plain_s = lookup_s = prefill_s = 0.0
        stats = LookupStats()
        for args in inputs:
            prefill_s += _timed(lambda args=args: generate(model, *args, **{**options, "max_new_tokens": 1}))
            start = time.perf_counter()
            plain = generate(model, *args, **options, prompt_lookup_num_tokens=0)
            plain_s += time.perf_counter() - start
            start = time.perf_counter()
            looked_up = generate(model, *args, **options, **lookup_options, stats=stats)
            lookup_s += time.perf_counter() - start
            identical += round_ == 0 and torch.equal(plain, looked_up)
        decode_tokens = stats.tokens - len(inputs)  # each answer's first token comes from the prefill
        rate = (decode_tokens / max(plain_s - prefill_s, 1e-9), decode_tokens / max(lookup_s - prefill_s, 1e-9))
        rates.append(rate)
        ratios.append(rate[1] / rate[0])
    middle = sorted(range(rounds), key=lambda i: ratios[i])[rounds // 2]
    return {"k": k, "prompts": len(inputs), "identical": identical, "tokens": stats.tokens,
            "acceptance": stats.acceptance_rate, "tokens_per_step": stats.tokens_per_step,
            "widths": dict(sorted(stats.widths.items())), "plain_tokens_per_s": rates[middle][0],
            "lookup_tokens_per_s": rates[middle][1], "ratio": ratios[middle], "ratios": ratios,
            "verify_steps": stats.verify_steps, "steps": stats.steps}


def _e2e_row(name: str, row: dict) -> None:
    print(f"| {name} | {row['k']} | {row['identical']}/{row['prompts']} | {100 * row['acceptance']:.0f} % | "
          f"{row['tokens_per_step']:.2f} | {row['plain_tokens_per_s']:.1f} | {row['lookup_tokens_per_s']:.1f} | "
          f"{row['ratio']:.2f}x |", flush=True)


def e2e_tables(args) -> dict:
    from glm6b.api import load
    from glm6b.config import LoadConfig

    folder = Path(args.quickstart)
    models = {"lora": LoadConfig(load_checkpoint=str(folder / "base"), adapter=str(folder / "lora" / "final")),
              "base": LoadConfig(load_checkpoint=str(folder / "base"))}
    prompts = read_prompts(Path(args.data), args.examples)
    results = {}
    for name in args.e2e_models:
        model, tokenizer, _ = load(models[name])
        inputs = []
        for prompt in prompts:
            batch = tokenizer([prompt], max_length=args.max_source_length, truncation=True, padding=True,
                              return_tensors="pt")
            inputs.append((batch["input_ids"], batch["attention_mask"], batch["position_ids"]))
        if args.corpus:
            corpus_index(args.corpus, tokenizer)  # indexed once, before any timing (generate reuses it)
        for k in args.e2e_k:
            for corpus in (None, args.corpus) if args.corpus else (None,):
                row = end_to_end(model, inputs, k, args.rounds, corpus=corpus, tokenizer=tokenizer,
                                 max_new_tokens=args.max_new_tokens, do_sample=False, allowed_vocab_size=len(tokenizer))
                label = f"{name}+corpus" if corpus else name
                results[f"{label}/k{k}"] = row
                _e2e_row(label, row)
    return results


def copying_tables(args) -> dict:
    """e2e on the glm_6b shape (`--layers` layers, random weights): such a model continues by repeating its
    input token, so proposals are right: the measured product of acceptance and verification cost."""
    results = {}
    config = ChatGLMConfig.from_name("glm_6b", num_layers=args.layers)
    generator = torch.Generator().manual_seed(1)
    body = torch.randint(6, config.mask_token_id, (1, args.prompt_length - 2), generator=generator)
    ids = torch.cat([body, torch.tensor([[config.gmask_token_id, config.bos_token_id]])], dim=1)
    for precision in args.copying_precisions:
        model = build_model(precision, args.layers)
        inputs = [(ids, *prompt_inputs(model, ids))]
        for k in args.e2e_k:
            row = end_to_end(model, inputs, k, args.rounds, max_new_tokens=args.copying_tokens, do_sample=False,
                             compile=args.compile)
            results[f"{precision}/k{k}"] = row
            _e2e_row(f"glm_6b x{args.layers} {precision}", row)
        del model
        gc.collect()
        torch._dynamo.reset()  # each model's graphs afresh: all of them share GLMBlock.decode's recompile limit
    return results


def teacher_forced(tokenizer, lines: list[dict], k: int, corpus: CorpusIndex | None) -> LookupStats:
    """Lookup's statistics if the model wrote each line's reference answer exactly: the answers run through the
    proposer (glm6b.inference.lookup.propose, with `corpus` or without) and the switch-off as in generation."""
    eop = tokenizer.convert_tokens_to_ids("<eop>")
    stats = LookupStats()
    for line in lines:
        context = tokenizer.encode(line["content"])
        answer = tokenizer.encode(line["summary"], add_special_tokens=False) + [eop]
        length, made = ProposalLength(k), 1  # the first token comes from the prefill (the wait's first check)
        length.stepped(propose(context, 1, corpus=corpus)[:1] == answer[:1])
        context.append(answer[0])
        while made < len(answer):
            proposal = propose(context, min(length.next(), len(answer) - made - 1), corpus=corpus)
            accepted = 0
            while accepted < len(proposal) and proposal[accepted] == answer[made + accepted]:
                accepted += 1
            if proposal:
                length.verified(len(proposal), accepted)
                stats.proposed += len(proposal)
                stats.accepted += accepted
            elif length.waiting:
                length.stepped(propose(context, 1, corpus=corpus)[:1] == [answer[made]])
            stats.count_step(len(proposal) + 1)
            context.extend(answer[made:made + accepted + 1])
            made += accepted + 1
        stats.tokens += len(answer)
    return stats


def reference_tables(args) -> dict:
    """How far lookup would go if the model wrote the dev references exactly (teacher-forced through the
    same proposer and switch-off as generation): tokens per step, per tokenizer, without and with the corpus."""
    from glm6b.tokenizer import load_tokenizer

    lines = [json.loads(line) for line in Path(args.data).read_text(encoding="utf-8").splitlines() if line.strip()]
    results = {}
    for folder in args.reference_tokenizers:
        tokenizer = load_tokenizer(folder)
        corpora = {"": None}
        if args.corpus:
            corpora["+corpus"] = corpus_index(args.corpus, tokenizer)
        for k in args.e2e_k:
            for suffix, corpus in corpora.items():
                stats = teacher_forced(tokenizer, lines, k, corpus)
                name = f"{Path(folder).name}{suffix}/k{k}"
                results[name] = {"k": k, "prompts": len(lines), "tokens": stats.tokens,
                                 "acceptance": stats.acceptance_rate, "tokens_per_step": stats.tokens_per_step,
                                 "widths": dict(sorted(stats.widths.items())),
                                 "mean_answer_tokens": stats.tokens / len(lines)}
                print(f"| {folder}{suffix} ({len(tokenizer)} pieces) | {k} | {stats.tokens / len(lines):.1f} | "
                      f"{100 * stats.acceptance_rate:.0f} % | {stats.tokens_per_step:.2f} |", flush=True)
    return results


# ----------------------------------------------------------------------------------- 3. expected


def priced_speedup(widths: dict[int, int], tokens: int, answers: int, cost: dict[int, float]) -> float:
    """(N - 1) / sum of step costs: the decode speed-up of a run of `widths` steps at costs c(T) (c(1) = 1)."""
    spent = sum(count * (1.0 if width == 1 else cost[width - 1]) for width, count in widths.items())
    return (tokens - answers) / spent


def all_rejected_widths(k: int, tokens: int) -> dict[int, int]:
    """The steps of one answer of `tokens` tokens where every proposal is rejected (ProposalLength's waits)."""
    length, widths, made = ProposalLength(k), {}, 1
    while made < tokens:
        proposed = min(length.next(), tokens - made - 1)
        widths[proposed + 1] = widths.get(proposed + 1, 0) + 1
        if proposed:
            length.verified(proposed, 0)
        else:
            length.stepped(False)
        made += 1
    return widths


def expected_tables(costs: dict, e2e: dict, answer_tokens: int, assumed_cost: float) -> dict:
    """Every run of `e2e` priced with every batch-1 cost table (see priced_speedup), and with one assumed
    cost c(T) = `assumed_cost` for every T > 1 (a CPU whose kernels verify up to 9 rows for about one
    row's time, such as glm6b's AMX kernels: not measured in this run)."""
    tables = {table.split("/")[0]: {int(width): c for width, c in cost["c28"].items()}
              for table, cost in costs.items() if table.endswith("/b1")}
    tables[f"assumed c = {assumed_cost}"] = dict.fromkeys(KS, assumed_cost)
    results = {}
    for run, row in e2e.items():
        widths = {int(w): c for w, c in row["widths"].items()}
        # The same run where a verification costs one step: the most lookup can give for this acceptance.
        free = priced_speedup(widths, row["tokens"], row["prompts"], dict.fromkeys(KS, 1.0))
        for name, cost in tables.items():
            if any(width - 1 not in cost for width in widths if width > 1):
                continue  # a cost table without this run's proposal lengths
            speedup = priced_speedup(widths, row["tokens"], row["prompts"], cost)
            worst = priced_speedup(all_rejected_widths(row["k"], answer_tokens), answer_tokens, 1, cost)
            results[f"{run}@{name}"] = {"speedup": speedup, "all_rejected": worst, "free_verification": free}
            print(f"| {run} | {name} | {speedup:.2f}x | {worst:.2f}x | {free:.2f}x |", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = ("cost", "e2e", "copying", "references", "expected")
    parser.add_argument("--only", choices=parts, nargs="+", default=list(parts))
    parser.add_argument("--layers", type=int, default=2, help="glm_6b layers in the cost part (28: the real model)")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--ks", type=int, nargs="+", default=list(KS), help="proposal lengths k in the cost part")
    parser.add_argument("--prompt-length", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5, help="timed pairs per k (the median ratio is shown)")
    parser.add_argument("--compile", default="auto", choices=("auto", "true", "false"),
                        help="the decode step's compilation (auto: as generate() runs it)")
    parser.add_argument("--quickstart", default="runs/quickstart", help="`glm6b quickstart`'s output folder")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parent.parent / "glm6b/assets/default/adgen/dev.json"))
    parser.add_argument("--corpus", default=str(Path(__file__).resolve().parent.parent / "glm6b/assets/default/adgen"
                                                  / "train.json"),
                        help="answers prompt lookup also proposes from in the '+corpus' rows of e2e and references "
                             "(default: the quickstart's train split; 'none': no such rows)")
    parser.add_argument("--examples", type=int, default=40, help="dev prompts generated in the e2e part")
    parser.add_argument("--e2e-models", nargs="+", choices=("lora", "base"), default=["lora", "base"])
    parser.add_argument("--e2e-k", type=int, nargs="+", default=[4], help="prompt_lookup_num_tokens in the e2e part")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="e2e rounds (the median tokens/s ratio is shown)")
    parser.add_argument("--copying-precisions", nargs="+", choices=PRECISIONS, default=["float32", "int4"])
    parser.add_argument("--copying-tokens", type=int, default=24, help="new tokens in the glm_6b-shape e2e part")
    parser.add_argument("--reference-tokenizers", nargs="+",
                        default=None,
                        help="tokenizer folders for the references part (default: the quickstart's, QUICKSTART/base; "
                             "and the golden test one, "
                             "which splits Chinese text into characters and bytes as a large vocabulary does rare words)")
    parser.add_argument("--max-source-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--e2e-threads", type=int, default=1,
                        help="threads for the quickstart model (tiny: one thread is its fastest, as in the tests)")
    parser.add_argument("--assumed-cost", type=float, default=1.2,
                        help="'expected' also prices every run at this verification cost (in one-token steps)")
    parser.add_argument("--json", default=None, help="also write every number to this file")
    parser.add_argument("--from-json", nargs="+", default=[],
                        help="earlier --json files whose tables 'expected' prices too (e.g. one process per precision)")
    args = parser.parse_args()
    args.compile = {"auto": "auto", "true": True, "false": False}[args.compile]
    args.corpus = None if args.corpus == "none" else args.corpus
    if args.reference_tokenizers is None:
        args.reference_tokenizers = [str(Path(args.quickstart) / "base"),
                                     str(Path(__file__).resolve().parent.parent / "tests/golden")]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    summary = cpu_summary()
    print(f"CPU: {summary['cpu']}; flags {' '.join(summary['flags'])}; glm6b CPU kernels: "
          f"{'yes' if summary['glm6b_cpu_kernels'] else 'no (PyTorch weight-only ops)'}; {summary['threads']} threads; "
          f"torch {summary['torch']}; {time.strftime('%Y-%m-%d')}\n", flush=True)
    out = {"machine": summary, "args": {k: v for k, v in vars(args).items() if k != "json"}}
    costs = {}
    e2e = {}
    for path in args.from_json:  # the tables of earlier runs (e.g. one process per precision)
        earlier = json.loads(Path(path).read_text(encoding="utf-8"))
        costs.update(earlier.get("cost", {}))
        e2e.update(earlier.get("e2e", {}))
        e2e.update({f"glm_6b {name}": row for name, row in earlier.get("copying", {}).items()})
        e2e.update({f"references {name}": row for name, row in earlier.get("references", {}).items()})
    if "cost" in args.only:
        shape = ChatGLMForConditionalGeneration(ChatGLMConfig.from_name("glm_6b", num_layers=args.layers),
                                                dtype=torch.bfloat16, device="meta")
        compiled = should_compile(shape, args.compile)
        print(f"1. verification of k + 1 tokens per row / one-token step: measured with {args.layers} glm_6b layers "
              f"(in brackets: extrapolated to {REAL_LAYERS} layers), {'compiled' if compiled else 'eager'} step, "
              f"median of {args.repeats} pairs\n")
        print("| precision | batch | step ms | " + " | ".join(f"k={k}" for k in args.ks) + " |")
        print("|---|---:|---:|" + "---:|" * len(args.ks))
        costs.update(cost_tables(args))
        out["cost"] = costs
        print()
    if "e2e" in args.only:
        print(f"2. greedy ADGEN dev generation ({args.examples} prompts one at a time, up to {args.max_new_tokens} new "
              f"tokens) on {args.quickstart}, without / with prompt lookup; decode tokens/s on {args.e2e_threads} "
              f"thread(s), median of {args.rounds} rounds\n")
        print("| model | k | identical | accepted | tokens/step | plain tok/s | lookup tok/s | ratio |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        torch.set_num_threads(args.e2e_threads)
        out["e2e"] = e2e_tables(args)
        torch.set_num_threads(args.threads)
        e2e.update(out["e2e"])
        print()
    if "copying" in args.only:
        print(f"2b. greedy generation on the glm_6b shape ({args.layers} layers, random weights: it repeats its input, so "
              f"proposals are right), {args.copying_tokens} new tokens, one prompt of {args.prompt_length}\n")
        print("| model | k | identical | accepted | tokens/step | plain tok/s | lookup tok/s | ratio |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        copying = copying_tables(args)
        out["copying"] = copying
        e2e = {**e2e, **{f"glm_6b {name}": row for name, row in copying.items()}}
        print()
    if "references" in args.only:
        print(f"2c. the dev references written by a perfect model ({args.data}): how often lookup proposes their "
              f"next tokens, per tokenizer\n")
        print("| tokenizer | k | answer tokens | accepted | tokens/step |")
        print("|---|---:|---:|---:|---:|")
        references = reference_tables(args)
        out["references"] = references
        e2e = {**e2e, **{f"references {name}": row for name, row in references.items()}}
        print()
    if "expected" in args.only and e2e:
        print(f"3. expected decode speed-up at glm_6b size ({REAL_LAYERS} layers, batch 1): the acceptance of 2 priced "
              f"with the verification costs of 1; 'all rejected': every proposal fails ({args.max_new_tokens}-token "
              f"answers)\n")
        print("| run | verification costs | expected speed-up | all rejected | if verifying cost one step |")
        print("|---|---|---:|---:|---:|")
        out["expected"] = expected_tables(costs, e2e, args.max_new_tokens, args.assumed_cost)
        print()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
