"""Training throughput and peak memory per fine-tuning method (full, LoRA, P-tuning), and one LoRA step at 6B.

    python benchmarks/train.py                                  # small preset, each method; 6B estimate
    python benchmarks/train.py --methods lora --preset small --steps 6 --batch-size 4 --seq-len 128
    python benchmarks/train.py --big glm_6b                     # measure the real 6B shape (~14 GB RAM on CPU)
    python benchmarks/train.py --big glm_6b_4layers             # measure 4 layers, scale to 28 (an estimate)
    python benchmarks/train.py --device cuda --big glm_6b       # on a GPU: max_memory_allocated
    python benchmarks/train.py --step-ratio --layers 2          # LoRA step / forward, glm_6b width, bf16
    python benchmarks/train.py --qlora int4                     # peak memory of a LoRA step on an int4 6B base
    python benchmarks/train.py --kernels                        # GFLOP/s of the backward's grad @ W, bf16

Every case runs the real Trainer path (glm6b.train.trainer: method setup, gradient checkpointing, AdamW over
the trainable parameters only) on random weights built on the meta device, then `to_empty` + init, in
a process of its own, so the peak memory reported is that case's alone: on CUDA
`torch.cuda.max_memory_allocated`, on CPU the process's peak RSS (ru_maxrss) minus its RSS before the
model was built (so imports do not count). Rows are random ids shaped like ADGEN rows
(prompt [gMASK] <sop> answer <eop>), seq-len tokens each; tokens/s excludes the first (warm-up) step.

The big case is one LoRA step (batch 1, seq 128, r 8 on query_key_value) with bf16 frozen weights and
gradient checkpointing: the "fits one 24 GB device" check. With --big glm_6b_4layers the 28-layer
number is extrapolated linearly from 4 layers: peak(4) + 24 * (bytes of one layer's bf16 weights).
Where PyTorch does not use oneDNN for bf16 matmuls (no AVX512-BF16/AMX), the backward pass's bf16
`grad @ W` products ran on its generic kernel (--kernels: ~0.03-0.25 GFLOP/s) and the full 6B step
took 7,986 s (peak 12.31 GiB); the Trainer now computes them in float32 slices there
(glm6b.train.frozen_linear). --step-ratio [--no-onednn] measures a LoRA step against a forward
pass; --qlora int4 the peak memory of a LoRA step on a quantized base. Pass --big none to skip the big case.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

GIB = 1024**3


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Tokenizer:
    """What the Trainer needs from a tokenizer when no text is involved: the config's special ids."""

    def __init__(self, config):
        self.name_or_path = None
        self.vocab_size = config.vocab_size
        for name in ("pad", "bos", "eos", "mask", "gmask"):
            setattr(self, f"{name}_token_id", getattr(config, f"{name}_token_id"))

    def save_pretrained(self, directory) -> None:
        pass


def child(case: dict) -> dict:
    """Run one case in this process and return its measurements."""
    import torch

    from glm6b.config import ChatGLMConfig, LoadConfig, TrainingConfig
    from glm6b.train.trainer import Trainer

    torch.manual_seed(0)
    device = torch.device(case["device"])
    config = ChatGLMConfig.from_name(case["preset"])

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    baseline = _rss_bytes()
    times: list[float] = []
    last = [time.perf_counter()]

    def clock(trainer, record):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    method = case["method"]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingConfig(output_dir=out, max_steps=case["steps"], per_device_train_batch_size=case["batch_size"],
                                 learning_rate=1e-4, save_steps=None, logging_steps=10**6, tensorboard=False,
                                 disable_tqdm=True, gradient_checkpointing=case["gradient_checkpointing"],
                                 bf16=case["bf16"])
        model_args = LoadConfig(preset=case["preset"], dtype=case["dtype"], device=str(device),
                                    pre_seq_len=case["pre_seq_len"] if method == "ptuning" else None)
        trainer = Trainer(model_args=model_args, tokenizer=_Tokenizer(config), args=args,
                          train_dataset=_random_rows(config, case["batch_size"] * case["steps"], case["seq_len"]), method=method,
                          callbacks=[clock])
        trainer._prepare_for_training()
        last[0] = time.perf_counter()
        trainer.train()
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in trainer.model.parameters())
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    steady = times[1:] or times
    tokens = case["batch_size"] * case["seq_len"]
    return {**case, "peak_bytes": peak, "trainable": trainable, "params": total,
            "step_s": sum(steady) / len(steady), "tokens_per_s": tokens / (sum(steady) / len(steady))}


def _random_rows(config, n: int, length: int):
    """A training RowDataset of n random ADGEN-shaped rows of `length` tokens: half prompt, half answer."""
    import torch

    from glm6b.config import DataConfig
    from glm6b.data.adgen import RowDataset

    class Rows(RowDataset):
        def __init__(self):
            self.mode, self.config = "train", DataConfig(max_source_length=length // 2,
                                                         max_target_length=length - length // 2)
            self.special_ids = {"pad": config.pad_token_id, "bos": config.bos_token_id,
                                "mask": config.mask_token_id, "gmask": config.gmask_token_id}
            g = torch.Generator().manual_seed(0)
            prompt, answer = length // 2 - 1, length - length // 2 - 2
            self.rows = []
            for _ in range(n):
                ids = torch.randint(10, min(20000, config.mask_token_id), (prompt + answer,), generator=g).tolist()
                input_ids = ids[:prompt] + [config.gmask_token_id, config.bos_token_id] + ids[prompt:] + \
                    [config.eos_token_id]
                labels = [-100] * (prompt + 1) + input_ids[prompt + 1:]
                self.rows.append({"input_ids": torch.tensor(input_ids).numpy(), "labels": torch.tensor(labels).numpy()})

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return self.rows[i]

    return Rows()


def _timed_lora_trainer(model, config, rows, case: dict, out: str, **args):
    """A LoRA Trainer (gradient checkpointing, no saving or logging) whose callback appends each step's
    seconds to `times`; set `last[0] = time.perf_counter()` right before `trainer.train()`.

    Returns:
        (trainer, times, last).
    """
    from glm6b.config import TrainingConfig
    from glm6b.train.trainer import Trainer

    times: list[float] = []
    last = [0.0]

    def clock(trainer, record):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    trainer = Trainer(model=model, tokenizer=_Tokenizer(config), method="lora", callbacks=[clock], train_dataset=rows,
                      args=TrainingConfig(output_dir=out, max_steps=case["steps"],
                                             per_device_train_batch_size=case["batch_size"], learning_rate=1e-4,
                                             save_steps=None, logging_steps=10**6, tensorboard=False,
                                             disable_tqdm=True, gradient_checkpointing=True, **args))
    return trainer, times, last


def step_ratio_child(case: dict) -> dict:
    """Time one forward pass and one LoRA step (forward + backward with gradient checkpointing + AdamW on the
    adapters) of the same batch, on a glm_6b-width model with case["layers"] layers and a bf16 frozen base."""
    import tempfile

    import torch

    from glm6b.config import ChatGLMConfig
    from glm6b.model import ChatGLMForConditionalGeneration

    torch.manual_seed(0)
    torch.backends.mkldnn.enabled = case["onednn"]
    config = ChatGLMConfig.from_name("glm_6b").replace(num_layers=case["layers"])
    model = ChatGLMForConditionalGeneration(config, dtype=torch.bfloat16, device="meta")
    model.to_empty(device="cpu")
    model.tie_weights()
    model.init_weights()
    rows = _random_rows(config, case["batch_size"], case["seq_len"])
    batch = rows.collate([rows[i] for i in range(len(rows))])
    with tempfile.TemporaryDirectory() as out:
        trainer, times, last = _timed_lora_trainer(model, config, rows, case, out, shuffle=False)
        trainer._prepare_for_training()
        if not case["fast_frozen_backward"]:
            for module in trainer.model.modules():
                module.__dict__.pop("forward", None)  # back to the class's forward: PyTorch's own backward
        forward = []
        with torch.no_grad():
            for _ in range(case["steps"]):
                start = time.perf_counter()
                trainer.model(input_ids=batch["input_ids"])
                forward.append(time.perf_counter() - start)
        last[0] = time.perf_counter()
        trainer.train()
    # The fastest of the repeats (after a warm-up one): on a shared machine the least disturbed run is the
    # closest to the cost itself.
    return {**case, "forward_s": min(forward[1:] or forward), "step_s": min(times[1:] or times)}


def qlora_child(case: dict) -> dict:
    """Peak memory and time of LoRA steps on a quantized glm_6b-shape base (random int weights), batch 1 x 128,
    gradient checkpointing: built on the meta device and quantized there, so no float copy of the blocks exists."""
    import tempfile

    import torch

    from glm6b.config import ChatGLMConfig
    from glm6b.model import ChatGLMForConditionalGeneration
    from glm6b.quant.linear import QuantizedLinear, quantize_model

    torch.manual_seed(0)
    baseline = _rss_bytes()
    config = ChatGLMConfig.from_name("glm_6b").replace(num_layers=case["layers"])
    model = ChatGLMForConditionalGeneration(config, dtype=torch.bfloat16, device="meta")
    quantize_model(model, case["bits"])  # empty int8/int4 layers on meta
    model.to_empty(device="cpu")
    model.tie_weights()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, QuantizedLinear):
                module.weight.random_(-128, 128)  # any byte is a valid int8 value or pair of int4 values
                module.weight_scale.fill_(0.02 / (127 if case["bits"] == 8 else 7))
                module.bias.zero_()
            elif isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
        model.transformer.word_embeddings.weight.normal_(std=0.02)
    rows = _random_rows(config, case["batch_size"] * case["steps"], case["seq_len"])
    with tempfile.TemporaryDirectory() as out:
        trainer, times, last = _timed_lora_trainer(model, config, rows, case, out)
        last[0] = time.perf_counter()
        trainer.train()
        losses = list(trainer.state.losses)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    return {**case, "peak_bytes": peak, "step_s": min(times), "losses": losses}


def kernel_table(threads: int) -> None:
    """GFLOP/s of the products a LoRA step's backward needs (grad @ W, W frozen [out, in]), bf16 on this CPU,
    with and without oneDNN, against the float32 path of glm6b.train.frozen_linear."""
    import torch

    from glm6b.train.frozen_linear import frozen_grad_input

    torch.set_num_threads(threads)
    tokens, hidden, out = 128, 4096, 4096
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16)
    weight = torch.randn(out, hidden, dtype=torch.bfloat16)
    grad = torch.randn(tokens, out, dtype=torch.bfloat16)
    flops = 2 * tokens * hidden * out
    cases = [("forward x @ W.T (F.linear)", lambda: torch.nn.functional.linear(x, weight)),
             ("backward grad @ W (PyTorch bf16)", lambda: grad @ weight),
             ("backward grad @ W (float32 slices)", lambda: frozen_grad_input(grad, weight))]
    print(f"{'product':<38}  {'oneDNN':>6}  {'ms':>9}  {'GFLOP/s':>8}")
    for onednn in (True, False):
        torch.backends.mkldnn.enabled = onednn
        for name, fn in cases:
            fn()
            start, runs = time.perf_counter(), 0
            while runs < 2 or time.perf_counter() - start < 1.0:
                fn()
                runs += 1
            seconds = (time.perf_counter() - start) / runs
            print(f"{name:<38}  {str(onednn):>6}  {seconds * 1e3:9.1f}  {flops / seconds / 1e9:8.2f}", flush=True)
    torch.backends.mkldnn.enabled = True


def run_case(case: dict) -> dict:
    """Run `case` in a fresh process (so its peak memory is its own)."""
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(case)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def layer_weight_bytes(preset: str, bytes_per_value: int = 2) -> int:
    """Bytes of one GLM block's weights (bf16 by default)."""
    from glm6b.config import ChatGLMConfig

    c = ChatGLMConfig.from_name(preset)
    h, f = c.hidden_size, c.inner_hidden_size
    values = 3 * h * h + 3 * h + h * h + h + h * f + f + f * h + h + 4 * h
    return values * bytes_per_value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--methods", nargs="+", default=["full", "lora", "ptuning"], choices=["full", "lora", "ptuning"])
    parser.add_argument("--preset", default="small", help="model preset for the per-method table (default small)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per method (default 4)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--pre-seq-len", type=int, default=16, help="P-tuning prefix length (default 16)")
    parser.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    parser.add_argument("--step-ratio", action="store_true",
                        help="only time a LoRA step against a forward pass of the same batch (bf16, glm_6b width)")
    parser.add_argument("--layers", type=int, default=2, help="layers of the --step-ratio model (default 2)")
    parser.add_argument("--kernels", action="store_true",
                        help="only time the backward's grad @ W products (bf16, with and without oneDNN)")
    parser.add_argument("--threads", type=int, default=2, help="threads for --kernels (default 2)")
    parser.add_argument("--qlora", choices=("int8", "int4"),
                        help="only measure LoRA steps on a quantized glm_6b-shape base (28 layers unless --layers)")
    parser.add_argument("--no-onednn", action="store_true",
                        help="disable PyTorch's oneDNN matmuls, as on a CPU without AVX512-BF16/AMX (--step-ratio)")
    parser.add_argument("--no-fast-frozen-backward", action="store_true",
                        help="keep PyTorch's own bf16 backward of the frozen linears (--step-ratio)")
    parser.add_argument("--big", default="glm_6b_4layers",
                        help="preset of the single LoRA step: glm_6b (measured), glm_6b_4layers (scaled to 28 "
                             "layers), or none")
    args = parser.parse_args()
    if args.child:
        case = json.loads(args.child)
        kind = case.get("kind")
        print(json.dumps(step_ratio_child(case) if kind == "step_ratio" else qlora_child(case) if kind == "qlora"
                         else child(case)))
        return
    if args.kernels:
        kernel_table(args.threads)
        return
    if args.qlora:
        case = dict(kind="qlora", bits=4 if args.qlora == "int4" else 8, layers=args.layers if args.layers != 2 else 28,
                    batch_size=1, seq_len=args.seq_len, steps=1)
        r = run_case(case)
        print(f"QLoRA ({args.qlora} base, r=8 on query_key_value, gradient checkpointing, batch 1 x {r['seq_len']}), "
              f"glm_6b shape with {r['layers']} layers on cpu: peak {r['peak_bytes'] / GIB:.2f} GiB "
              f"({r['peak_bytes'] / 1e9:.2f} GB) of resident memory above the baseline; step {r['step_s']:.1f} s")
        return
    if args.step_ratio:
        case = dict(kind="step_ratio", layers=args.layers, batch_size=1, seq_len=args.seq_len, steps=3,
                    onednn=not args.no_onednn, fast_frozen_backward=not args.no_fast_frozen_backward)
        r = run_case(case)
        print(f"{'layers':>6}  {'batch':>9}  {'oneDNN':>6}  {'fast frozen bwd':>15}  {'forward s':>9}  "
              f"{'LoRA step s':>11}  {'step/forward':>12}")
        print(f"{r['layers']:>6}  {'1 x ' + str(r['seq_len']):>9}  {str(r['onednn']):>6}  "
              f"{str(r['fast_frozen_backward']):>15}  {r['forward_s']:>9.2f}  {r['step_s']:>11.2f}  "
              f"{r['step_s'] / r['forward_s']:>12.2f}")
        print(f"step/forward: {r['step_s'] / r['forward_s']:.2f}")
        return

    rows = []
    for method in args.methods:
        case = dict(method=method, preset=args.preset, device=args.device, steps=args.steps,
                    batch_size=args.batch_size, seq_len=args.seq_len, pre_seq_len=args.pre_seq_len,
                    dtype="float32", bf16=False, gradient_checkpointing=False)
        rows.append(run_case(case))
        r = rows[-1]
        print(f"{r['method']:>8}  {r['preset']:>14}  batch {r['batch_size']} x {r['seq_len']}  "
              f"trainable {r['trainable'] / 1e6:8.2f}M / {r['params'] / 1e6:8.2f}M  "
              f"{r['tokens_per_s']:8.0f} tokens/s  peak {r['peak_bytes'] / GIB:6.2f} GiB", flush=True)

    if args.big != "none":
        case = dict(method="lora", preset=args.big, device=args.device, steps=1, batch_size=1, seq_len=128,
                    pre_seq_len=None, dtype="bfloat16", bf16=False, gradient_checkpointing=True)
        r = run_case(case)
        from glm6b.config import ChatGLMConfig

        layers = ChatGLMConfig.from_name(args.big).num_layers
        peak = r["peak_bytes"]
        note = "measured"
        if layers != 28:
            peak += (28 - layers) * layer_weight_bytes(args.big)
            note = f"estimate: {layers}-layer peak {r['peak_bytes'] / GIB:.2f} GiB + {28 - layers} x one layer's bf16 weights"
        print(f"LoRA step, glm_6b shape (bf16 frozen base, r=8, gradient checkpointing, batch 1 x 128) on "
              f"{args.device}: peak {peak / GIB:.2f} GiB ({peak / 1e9:.2f} GB) [{note}]; "
              f"step {r['step_s']:.1f} s, trainable {r['trainable'] / 1e6:.2f}M", flush=True)


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
