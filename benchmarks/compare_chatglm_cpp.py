"""Side-by-side CPU speed of glm6b, chatglm.cpp and fastllm on the same random ChatGLM-6B-shaped weights.

    # once: chatglm.cpp 0.4.2 built from source for this CPU, in its own venv
    python3 -m venv .venv-chatglm-cpp
    .venv-chatglm-cpp/bin/pip install setuptools wheel cmake torch==2.13.0 sentencepiece tabulate tqdm \
        transformers==4.33.3
    .venv-chatglm-cpp/bin/pip download --no-deps --no-build-isolation --no-binary chatglm-cpp chatglm-cpp==0.4.2
    tar xzf chatglm_cpp-0.4.2.tar.gz
    # its setup.py runs `cmake --build . -j`, and when the `ninja` Python package is importable it
    # appends that ninja as CMAKE_MAKE_PROGRAM after CMAKE_ARGS (so it wins); without that package
    # and with CMAKE_GENERATOR=Ninja, a wrapper `ninja-j2` (exec ninja -j2 "$@") limits the jobs.
    # ggml 0.4.2 has no GGML_NATIVE option (its GGML_AVX512* options are MSVC-only): on Linux it adds
    # -mavx -mavx2 -mfma -mf16c -msse3 from /proc/cpuinfo, and CFLAGS=-march=native adds the rest
    # (AVX-512, VNNI, BF16 here).
    CMAKE_GENERATOR=Ninja CFLAGS=-march=native CXXFLAGS=-march=native \
    CMAKE_ARGS="-DCMAKE_POLICY_VERSION_MINIMUM=3.5 -DCMAKE_MAKE_PROGRAM=$PWD/ninja-j2 \
                -DCMAKE_EXPORT_COMPILE_COMMANDS=ON" \
        nice -n 10 .venv-chatglm-cpp/bin/pip install -v --no-build-isolation --no-deps ./chatglm_cpp-0.4.2
    # then store the flags the build really used next to the venv (shown as "build" in the results)
    python benchmarks/compare_chatglm_cpp.py --record-build ./chatglm_cpp-0.4.2/build \
        --cpp-python .venv-chatglm-cpp/bin/python

    # once: fastllm (PyPI's ftllm wheel; it ships a CPU-only library next to its CUDA one and loads the CPU
    # one where CUDA's runtime is missing) in its own venv, without its CUDA / server dependencies
    python3 -m venv .venv-fastllm
    .venv-fastllm/bin/pip install --no-deps ftllm==1.9.0
    .venv-fastllm/bin/pip install torch==2.13.0 transformers sentencepiece safetensors numpy pillow jinja2 \
        pydantic shortuuid

    # the comparison (run with the glm6b environment's python)
    python benchmarks/compare_chatglm_cpp.py --layers 2                    # quick end-to-end check
    python benchmarks/compare_chatglm_cpp.py --json runs/compare_cpp/result.json   # full 28-layer shape

What it does:

1. Makes a random-weight model of the glm_6b shape (`--layers N` keeps the width; default 28) and
   saves it as a THUDM-layout folder: float16 safetensors, config.json, ice_text.model and
   tokenizer_config.json (`<work-dir>/hf-L<N>`). Where glm6b can write quantized folders
   (glm6b.api.quantize_folder) it also writes `hf-L<N>-int4`, `-int4-qe`, `-int8` and
   `-int8-qe` from it (the -qe ones with the word embeddings and the tied lm_head quantized too, as
   THUDM's chatglm-6b-int4-qe and as chatglm.cpp's q4_0/q8_0 store them: the equal-bits pairs).
2. Converts that folder with chatglm.cpp's own converter code (chatglm_cpp.convert.ChatGLMConverter:
   its config/tokenizer/weight dumping and its q4_0/q8_0 quantizers) to q4_0, q8_0 and f16, in a
   subprocess of the chatglm.cpp environment (`--cpp-python`, default $CHATGLM_CPP_PYTHON). Its
   command-line entry (`python -m chatglm_cpp.convert`) loads the model through transformers'
   remote code, which these folders do not ship; the converter is handed instead a model object
   whose config is the folder's config.json and whose state_dict() reads the safetensors lazily
   as float32 (what AutoModel.from_pretrained gives it), and the folder's ice_text.model.
   Converted files are cached in `--work-dir`.
   It also converts it with fastllm's own converter (ftllm.torch2flm.tofile) to its int4, int8 and
   float16 formats (`--fastllm-python`, default $FASTLLM_PYTHON, "none" to leave fastllm out), handed a
   model object the same way (config, lazy state dict, which modules are Linear / Embedding), with
   eos_token_id -1 so that greedy decoding never stops early. fastllm quantizes every Linear, the lm_head
   included, and keeps the embedding table in float32 (a step reads one of its rows).
3. Times each engine in its own subprocess (so peak RSS, VmHWM, is that engine's alone),
   alternating the engines, `--rounds` times: the same 100-token prompt (random ordinary ids
   then [gMASK] <sop>), the same thread count, greedy decoding of `--new-tokens` tokens that never
   stops early (every engine is driven token by token, so <eop> cannot end a run). A short warm-up
   generation in the same process comes first and is not timed. Prefill = the prompt's forward
   plus choosing the first token; decode = the remaining new_tokens - 1 one-token steps.
   - chatglm.cpp: `Pipeline(path).model.generate_next_token(ids, None, gen_config, n_past, n_ctx)`,
     the loop chatglm.cpp's own generate runs, minus its <eop> check. chatglm.cpp 0.4.2 has no
     thread setting: it uses all hardware threads up to 4 (half of them above 4); with
     `--threads` below the machine's count its process is pinned to that many cores. Its load
     time is the Pipeline constructor's: it maps the file, and pages come in on first use.
   - fastllm: `ftllm.llm.model(path)`, `set_cpu_threads(threads)`, then its C API's
     launch_response_llm_model (greedy: top_k 1) and one fetch_response_llm_model per token (fastllm
     generates in a thread of its own; a fetch returns each token as it is made).
   - glm6b: `glm6b.load_model(folder, dtype=torch.bfloat16)` of those folders, then the decode
     engine (glm6b.inference.engine.DecodeEngine) where it exists, else the model's forward with
     a KVCache (as benchmarks/generate.py). Also batch 1 vs batch 8 decode tokens/s for int4, and
     the load time of the folder next to the time to read its weight files once (read first), and
     again into fresh memory of each file's size (page cache then warm): the floor for any loader
     that copies the bytes into memory of its own.
   A glm6b precision it cannot load yet (no `quantize=`) is reported as n/a (null in the JSON).
   `--int8-activations` also times glm6b with GLM6B_INT8_ACTIVATIONS=1 (the "glm6b a8" column: the
   opt-in int8-activation kernels of the AVX2 build, which change results).
4. The machine's limits, measured in each glm6b process right before its timed run (each the best of a
   few tries, as other work on a shared machine only ever slows one down): the memory read rate (the
   sum of a 1 GiB float32 tensor) and the float32 and bfloat16 GEMM rates of a [prompt, 4096] x [4096,
   16384] product. From them: glm6b's read floor per token (the bytes a decode step reads, every weight
   once, / the read rate) and its share of the decode time, the prefill roofline (the faster GEMM's
   rate / the prefill's 2 x 201M x layers flops per token; on a CPU without bfloat16 units that is the
   float32 GEMM) and the batch decode roofline (memory, or the kernels' products at the GEMM's rate:
   bfloat16 on the AVX-512 build, float32 on the AVX2 one).
   The CPU (vendor, model, AVX2 / AVX-512 / AVX512-BF16 / AMX) and glm6b's kernel build are printed.

Output: a markdown table; `--json FILE` writes
    {"threads", "layers", "cpu", "build", "fastllm", "limits", "rows": [{"glm6b", "chatglm_cpp", "fastllm",
     "decode_ms_per_token", "prefill_tokens_per_s", "peak_rss_gb", "load_s", "read_bytes_s", "read_fresh_s",
     "step_bytes", "limits", "glm6b_floor_ms_per_token", ...}], "batch": [...]}
with each measurement as {"glm6b": value, "chatglm_cpp": value, "fastllm": value} (medians over rounds;
peak RSS is the maximum). The machine's speed drifts between runs: compare numbers within one run only.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Only the standard library at module level: the same file runs as a worker under the chatglm.cpp
# environment's python, which does not have glm6b.

ROOT = Path(__file__).resolve().parents[1]
# chatglm.cpp's converter stores every 2-D tensor in the chosen type, the word embeddings (= the tied
# lm_head) too; glm6b's int4/int8 keep those in bfloat16 (THUDM's chatglm-6b-int4/-int8), its
# "-qe" rows quantize them as well (THUDM's chatglm-6b-int4-qe): those are the equal-bits pairs.
PAIRS = [("int4", "q4_0"), ("int4-qe", "q4_0"), ("int8", "q8_0"), ("int8-qe", "q8_0"), ("bf16", "f16")]
# glm6b precision -> fastllm's converter type (torch2flm.tofile's dtype) of the same bits. fastllm quantizes
# every nn.Linear (the lm_head too) and keeps the embedding table in float32, of which a step reads one row.
FASTLLM_TYPES = {"int4": "int4", "int4-qe": "int4", "int8": "int8", "int8-qe": "int8", "bf16": "float16"}
# Multiply-adds per token of a prefill (the 4 matrices of each block; attention's are small at 100 tokens
# and the lm_head runs for the last token only), per layer of the glm_6b shape.
LAYER_MATMUL_PARAMS = 4096 * (3 * 4096) + 4096 * 4096 + 2 * 4096 * 16384
# glm6b name -> (bits, quantize the embeddings / lm_head too), None for float
GLM6B_QUANTIZE = {"int4": (4, False), "int4-qe": (4, True), "int8": (8, False), "int8-qe": (8, True), "bf16": None}
RESULT_MARK = "@@RESULT "
BUILD_INFO_NAME = "chatglm_cpp_build.json"  # next to the chatglm.cpp venv (its sys.prefix)
# glm_6b's special ids (glm6b.config defaults, the real THUDM/chatglm-6b values)
GMASK_ID, SOP_ID, MASK_ID = 130001, 130004, 130000


# ------------------------------------------------------------------------------------------ helpers

def peak_rss_gb() -> float:
    """This process's peak resident set size (VmHWM), in GB (1e9 bytes)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def pin_threads(threads: int) -> None:
    """Restrict this process to `threads` cores when that is fewer than it has."""
    cores = sorted(os.sched_getaffinity(0))
    if threads < len(cores):
        os.sched_setaffinity(0, cores[:threads])


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and (p.suffix == ".safetensors" or (p.suffix == ".bin" and "model" in p.name)))


def read_bytes_seconds(paths: list[Path], fresh: bool = False) -> tuple[float, int]:
    """Time to read the files once, start to end: into one reused 16 MiB buffer (like `cat files >
    /dev/null`), or with `fresh` each file into new memory of its size, which a loader has to fill too
    (its first write to every page is a page fault)."""
    total = 0
    start = time.perf_counter()
    reused = None if fresh else memoryview(bytearray(16 << 20))
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if not fresh:
                while n := f.readinto(reused):
                    total += n
            elif size:  # (an empty file has nothing to read, and mmap refuses size 0)
                # new anonymous memory (not zero-filled up front, as a bytearray would be), in huge pages
                # where the kernel offers them, as glm6b's loader asks for
                fresh_memory = mmap.mmap(-1, size)
                if hasattr(mmap, "MADV_HUGEPAGE"):
                    fresh_memory.madvise(mmap.MADV_HUGEPAGE)
                view = memoryview(fresh_memory)
                while view and (n := f.readinto(view)):
                    total += n
                    view = view[n:]
                view.release()
                fresh_memory.close()
    return time.perf_counter() - start, total


def make_prompt(length: int, seed: int, rows: int = 1) -> list[list[int]]:
    """`rows` prompts of `length` ids: random ordinary tokens, then [gMASK] <sop>."""
    rng = random.Random(seed)
    return [[rng.randrange(6, MASK_ID) for _ in range(length - 2)] + [GMASK_ID, SOP_ID] for _ in range(rows)]


def run_worker(python: str, kind: str, spec: dict, log: Path | None = None, cwd: Path | None = None,
               env: dict | None = None) -> dict:
    """Run this file as `--worker kind` under `python` (with `env` added to the environment); return the JSON
    it reports (or an error)."""
    cmd = [python, str(Path(__file__).resolve()), "--worker", kind, "--spec", json.dumps(spec)]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                         env={**os.environ, **(env or {})})
    if log is not None:
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd[:4])} ...\n{out.stdout}{out.stderr}\n")
    for line in reversed(out.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = (out.stderr or out.stdout).strip().splitlines()[-5:]
    return {"status": "error", "reason": f"{kind} worker exited {out.returncode}: " + " | ".join(tail)}


def report(result: dict) -> None:
    print(RESULT_MARK + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------- glm6b-side workers

def _import_glm6b():
    sys.path.insert(0, str(ROOT))  # the checkout this script belongs to
    import torch
    import glm6b
    return torch, glm6b


def worker_prepare(spec: dict) -> dict:
    """Write the random-weight float16 folder (and glm6b-quantized copies where glm6b can)."""
    torch, glm6b = _import_glm6b()
    from glm6b.config import ChatGLMConfig
    from glm6b.model import ChatGLMForConditionalGeneration

    folder = Path(spec["folder"])
    result = {"status": "ok", "folder": str(folder), "quantized": {}}
    stamp = folder / ".complete.json"
    if not stamp.exists():
        config = ChatGLMConfig.from_name("glm_6b", num_layers=spec["layers"])
        model = ChatGLMForConditionalGeneration(config, dtype=torch.float16, device="meta")
        model.to_empty(device="cpu")
        model.tie_weights()  # to_empty gives the tied lm_head its own storage; share it again
        model.init_weights(generator=torch.Generator().manual_seed(spec["seed"]))
        if folder.exists():
            shutil.rmtree(folder)
        glm6b.save_pretrained(model.eval(), folder)  # float16 safetensors (+ index when sharded)
        del model
        for name in ("ice_text.model", "tokenizer_config.json"):
            shutil.copyfile(Path(spec["tokenizer_dir"]) / name, folder / name)
        stamp.write_text(json.dumps({"layers": spec["layers"], "seed": spec["seed"]}) + "\n")
    try:
        from glm6b.api import quantize_folder
    except ImportError:
        return result  # no quantized folders: the glm6b worker quantizes at load (or reports n/a)
    for name in spec["quantized"]:
        bits, embeddings = GLM6B_QUANTIZE[name]
        out = Path(f"{folder}-{name}")
        out_stamp = out / ".complete.json"
        if not out_stamp.exists():
            if out.exists():
                shutil.rmtree(out)
            quantize_folder(folder, out, f"int{bits}", embeddings=embeddings)
            out_stamp.write_text(json.dumps({"bits": bits, "embeddings": embeddings, "source": folder.name}) + "\n")
        result["quantized"][name] = str(out)
    return result


def glm6b_time_generation(model, input_ids, new_tokens: int, capacity: int) -> tuple[float, float, str]:
    """(prefill s, decode s, how) of greedy decoding of `new_tokens` tokens that never stops early.

    Prefill = the prompt's forward and the first token's argmax; decode = new_tokens - 1 steps.
    Uses the decode engine when glm6b has one, else the model's forward with a KVCache. The cache
    holds `capacity` tokens per row, the same for warm-up and timed runs (a compiled decode step is
    specialised to the cache's size).
    """
    import torch
    from glm6b.model import build_mask_and_positions

    batch, length = input_ids.shape
    try:
        from glm6b.inference.engine import DecodeEngine
    except ImportError:
        DecodeEngine = None
    with torch.inference_mode():
        if DecodeEngine is not None:
            engine = DecodeEngine(model, batch_size=batch, max_length=capacity)
            start = time.perf_counter()
            mask, positions = build_mask_and_positions(input_ids, model.config)
            next_tokens = engine.prefill(input_ids, mask, positions).argmax(dim=-1)
            prefilled = time.perf_counter()
            for _ in range(new_tokens - 1):
                next_tokens = engine.decode(next_tokens).argmax(dim=-1)
            how = "DecodeEngine" + (" (compiled)" if engine.compiled else "")
        else:
            from glm6b.model import KVCache
            start = time.perf_counter()
            mask, positions = build_mask_and_positions(input_ids, model.config)
            cache = KVCache(model.config, batch, capacity, model.dtype, input_ids.device)
            logits = model(input_ids, position_ids=positions, attention_mask=mask, kv_cache=cache,
                           last_token_only=True).logits[:, -1]
            next_tokens = logits.argmax(dim=-1)
            prefilled = time.perf_counter()
            position = positions[:, :, -1:]
            step = torch.tensor([0, 1])[None, :, None]  # the block position counts on
            for _ in range(new_tokens - 1):
                position = position + step
                logits = model(next_tokens[:, None], position_ids=position, kv_cache=cache).logits[:, -1]
                next_tokens = logits.argmax(dim=-1)
            how = "forward + KVCache"
        int(next_tokens[0])  # the last token is chosen
    return prefilled - start, time.perf_counter() - prefilled, how


def worker_glm6b(spec: dict) -> dict:
    """Load one glm6b folder/precision and time prefill, decode (and batch decode)."""
    torch, glm6b = _import_glm6b()
    pin_threads(spec["threads"])
    torch.set_num_threads(spec["threads"])
    folder = Path(spec["folder"])
    read_s, nbytes = read_bytes_seconds(weight_files(folder))
    read_fresh_s, _ = read_bytes_seconds(weight_files(folder), fresh=True)  # the page cache is warm now
    kwargs = {"dtype": torch.bfloat16}
    if spec["quantize"]:
        bits, embeddings = spec["quantize"]
        kwargs.update(quantize=f"int{bits}", quantize_embeddings=embeddings)
    start = time.perf_counter()
    try:
        model = glm6b.load_model(folder, **kwargs)
    except TypeError as exc:
        if "quantize" in str(exc):
            return {"status": "n/a", "reason": f"glm6b.load_model has no quantize= ({exc})"}
        raise
    load_s = time.perf_counter() - start
    prompt = torch.tensor(spec["prompt"])
    capacity = prompt.shape[1] + spec["new_tokens"]
    glm6b_time_generation(model, prompt, spec["warmup_tokens"], capacity)  # warm-up (and compile), not timed
    limits = measure_limits(torch, prompt.shape[1])  # in this process, right before the timed run
    prefill_s, decode_s, how = glm6b_time_generation(model, prompt, spec["new_tokens"], capacity)
    steps = spec["new_tokens"] - 1
    from glm6b.inference.engine import weight_bytes
    from glm6b.quant import cpu_kernels
    kernels = sorted({m._kernel[0] for m in model.modules() if getattr(m, "_kernel", None)})
    result = {"status": "ok", "how": how, "load_s": load_s, "read_bytes_s": read_s, "read_fresh_s": read_fresh_s,
              "weight_bytes": nbytes, "step_bytes": weight_bytes(model), "kernels": kernels,
              "kernel_isa": cpu_kernels.isa(), "limits": limits,
              "prefill_tokens_per_s": prompt.shape[1] / prefill_s, "decode_ms_per_token": 1000 * decode_s / steps,
              "peak_rss_gb": peak_rss_gb(), "threads": torch.get_num_threads(), "batch": []}
    for batch in spec.get("batch_sizes") or []:
        ids = torch.tensor(make_prompt(prompt.shape[1], spec["seed"] + batch, batch))
        glm6b_time_generation(model, ids, spec["warmup_tokens"], capacity)
        _, decode_s, _ = glm6b_time_generation(model, ids, spec["new_tokens"], capacity)
        result["batch"].append({"batch": batch, "decode_tokens_per_s": batch * steps / decode_s})
    return result


# ----------------------------------------------------------------------- chatglm.cpp-side workers

def worker_convert(spec: dict) -> dict:
    """Convert a float16 THUDM-layout folder with chatglm.cpp's converter code (no remote code)."""
    from collections.abc import Mapping
    from types import SimpleNamespace

    import sentencepiece
    import torch
    from chatglm_cpp import convert as cc

    folder, output = Path(spec["folder"]), Path(spec["output"])
    config = json.loads((folder / "config.json").read_text())
    config = SimpleNamespace(**{"pre_seq_len": None, "quantization_bit": None, **config})

    files = weight_files(folder)
    locations: dict[str, Path] = {}
    handles: dict[Path, object] = {}
    for path in files:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            handles[path] = safe_open(str(path), framework="pt")
            names = handles[path].keys()
        else:
            handles[path] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            names = handles[path].keys()
        locations.update({name: path for name in names})

    class LazyStateDict(Mapping):
        """Tensors read on access, as float32 (what AutoModel.from_pretrained would hold)."""

        def _name(self, name):
            if name == "lm_head.weight" and name not in locations:  # tied to the word embeddings
                return "transformer.word_embeddings.weight"
            return name

        def __getitem__(self, name):
            name = self._name(name)
            handle = handles[locations[name]]
            tensor = handle.get_tensor(name) if hasattr(handle, "get_tensor") else handle[name]
            return tensor.float()

        def __contains__(self, name):
            return self._name(name) in locations

        def __iter__(self):
            return iter(locations)

        def __len__(self):
            return len(locations)

    class Model:
        def __init__(self):
            self.config = config

        def state_dict(self):
            return LazyStateDict()

    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "ice_text.model"))
    tokenizer = SimpleNamespace(sp_tokenizer=SimpleNamespace(text_tokenizer=SimpleNamespace(sp=sp)))
    tmp = output.with_name(output.name + ".tmp")
    start = time.perf_counter()
    with open(tmp, "wb") as f:
        cc.ChatGLMConverter.convert(f, Model(), tokenizer, cc.GGMLType[spec["type"].upper()])
    os.replace(tmp, output)
    return {"status": "ok", "output": str(output), "convert_s": time.perf_counter() - start,
            "bytes": output.stat().st_size}


def cpp_runtime_info() -> dict:
    """What the chatglm.cpp extension reports about itself (ggml's CPU feature flags) and its threads."""
    import ctypes

    import chatglm_cpp
    from chatglm_cpp import _C

    info = {"chatglm_cpp": chatglm_cpp.__version__, "extension": _C.__file__}
    try:
        lib = ctypes.CDLL(_C.__file__)
        features = {}
        for name in ("avx", "avx_vnni", "avx2", "avx512", "avx512_vbmi", "avx512_vnni", "avx512_bf16", "fma",
                     "f16c", "sse3", "ssse3", "blas"):
            fn = getattr(lib, f"ggml_cpu_has_{name}", None)
            if fn is not None:
                features[name] = bool(fn())
        info["ggml_cpu_has"] = features
    except OSError as exc:
        info["ggml_cpu_has"] = f"unavailable: {exc}"
    n = os.cpu_count() or 4  # chatglm.cpp: std::thread::hardware_concurrency(), all up to 4, else half
    info["threads_used"] = n if n <= 4 else n // 2
    recorded = Path(sys.prefix) / BUILD_INFO_NAME
    if recorded.exists():
        info["recorded_build"] = json.loads(recorded.read_text())
    else:
        info["recorded_build"] = f"missing: {recorded} (see --record-build)"
    return info


def worker_cppinfo(spec: dict) -> dict:
    return {"status": "ok", **cpp_runtime_info()}


def worker_cpp(spec: dict) -> dict:
    """Load one chatglm.cpp model file and time prefill and decode, token by token."""
    pin_threads(spec["threads"])
    import chatglm_cpp

    path = Path(spec["model"])
    prompt = spec["prompt"][0]
    read_s, nbytes = read_bytes_seconds([path])
    start = time.perf_counter()
    # the KV cache sized for this run, as glm6b's
    pipeline = chatglm_cpp.Pipeline(str(path), max_length=len(prompt) + spec["new_tokens"])
    load_s = time.perf_counter() - start
    model = pipeline.model
    gen_config = chatglm_cpp._C.GenerationConfig(max_length=model.config.max_length, do_sample=False)

    def generate(ids: list[int], new_tokens: int) -> tuple[float, float]:
        # chatglm.cpp's own generate loop (chatglm.cpp: BaseModelForCausalLM::generate), never stopping at <eop>
        ids = list(ids)
        n_ctx = len(ids)
        start = time.perf_counter()
        token = model.generate_next_token(ids, None, gen_config, 0, n_ctx)
        prefilled = time.perf_counter()
        for _ in range(new_tokens - 1):
            n_past = model.count_tokens(ids, None)
            ids.append(token)
            token = model.generate_next_token(ids, None, gen_config, n_past, n_ctx)
        return prefilled - start, time.perf_counter() - prefilled

    generate(prompt, spec["warmup_tokens"])  # warm-up, not timed
    prefill_s, decode_s = generate(prompt, spec["new_tokens"])
    return {"status": "ok", "load_s": load_s, "read_bytes_s": read_s, "weight_bytes": nbytes,
            "prefill_tokens_per_s": len(prompt) / prefill_s,
            "decode_ms_per_token": 1000 * decode_s / (spec["new_tokens"] - 1),
            "peak_rss_gb": peak_rss_gb(), "threads": cpp_runtime_info()["threads_used"]}


# ---------------------------------------------------------------------------- fastllm-side workers

def _fastllm():
    """fastllm's Python package (ftllm), quietly: it prints which of its libraries it loaded."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()) as printed:
        from ftllm import llm
    return llm, printed.getvalue().strip()


def worker_fastllminfo(spec: dict) -> dict:
    import importlib.metadata

    _, printed = _fastllm()
    return {"status": "ok", "ftllm": importlib.metadata.version("ftllm"), "loaded": printed.replace("\n", "; ")}


def worker_fastllm_convert(spec: dict) -> dict:
    """Convert a float16 THUDM-layout folder with fastllm's own converter (ftllm.torch2flm.tofile) to int4 /
    int8 / float16. tofile takes a transformers model: it is handed one whose config is the folder's
    config.json, whose state_dict() reads the safetensors lazily as float32 (lm_head.weight: the tied word
    embeddings, as the HF model has it) and whose named_modules() tell the Linear / Embedding layers, which
    is all tofile reads. eos_token_id is set to -1, so a greedy run never stops at <eop> (as the others)."""
    from collections.abc import Mapping
    from types import SimpleNamespace

    import torch
    from safetensors import safe_open

    _fastllm()
    from ftllm import torch2flm

    folder, output = Path(spec["folder"]), Path(spec["output"])
    config = SimpleNamespace(**json.loads((folder / "config.json").read_text()))
    handles = {path: safe_open(str(path), framework="pt") for path in weight_files(folder)}
    locations = {name: path for path, handle in handles.items() for name in handle.keys()}
    names = [n for n in locations if not n.endswith("inv_freq")] + (["lm_head.weight"] if "lm_head.weight" not in locations else [])

    class LazyStateDict(Mapping):
        def __getitem__(self, name):
            source = "transformer.word_embeddings.weight" if name not in locations else name
            return handles[locations[source]].get_tensor(source).float()

        def __iter__(self):
            return iter(names)

        def __len__(self):
            return len(names)

    hidden, inner, vocab = config.hidden_size, config.inner_hidden_size, config.vocab_size
    shapes = {"query_key_value": (3 * hidden, hidden), "dense": (hidden, hidden), "dense_h_to_4h": (inner, hidden),
              "dense_4h_to_h": (hidden, inner)}

    class Model:
        generation_config = None

        def __init__(self):
            self.config = config

        def cpu(self):
            return self

        def state_dict(self):
            return LazyStateDict()

        def named_modules(self):
            yield "transformer.word_embeddings", torch.nn.Embedding(vocab, hidden, device="meta")
            for i in range(config.num_layers):
                for module, leaf in (("attention", "query_key_value"), ("attention", "dense"),
                                     ("mlp", "dense_h_to_4h"), ("mlp", "dense_4h_to_h")):
                    out_f, in_f = shapes[leaf]
                    yield f"transformer.layers.{i}.{module}.{leaf}", torch.nn.Linear(in_f, out_f, device="meta")
            yield "lm_head", torch.nn.Linear(hidden, vocab, bias=False, device="meta")

    tmp = output.with_name(output.name + ".tmp")
    start = time.perf_counter()
    torch2flm.tofile(str(tmp), Model(), None, dtype=spec["type"], eos_id=-1)
    os.replace(tmp, output)
    return {"status": "ok", "output": str(output), "convert_s": time.perf_counter() - start,
            "bytes": output.stat().st_size}


def worker_fastllm(spec: dict) -> dict:
    """Load one fastllm model file and time prefill and decode, token by token (greedy, top_k 1)."""
    import ctypes

    pin_threads(spec["threads"])  # the same cores as the other engines
    llm, _ = _fastllm()
    # fastllm's pool of compute threads, set before the model is made (a later change slowed it down); its
    # own command line takes the cores less 2 (1 here), as the thread that runs the model also computes.
    threads = spec.get("fastllm_threads") or spec["threads"]
    llm.set_cpu_threads(threads)
    path = Path(spec["model"])
    prompt = spec["prompt"][0]
    read_s, nbytes = read_bytes_seconds([path])
    start = time.perf_counter()
    model = llm.model(str(path))
    load_s = time.perf_counter() - start
    lib = llm.fastllm_lib

    def generate(ids: list[int], new_tokens: int) -> tuple[float, float, int]:
        # fastllm generates in its own thread; each fetch returns the next token once it is there
        start = time.perf_counter()
        handle = lib.launch_response_llm_model(model.model, len(ids), (ctypes.c_int * len(ids))(*ids),
                                               ctypes.c_int(len(ids) + new_tokens), ctypes.c_int(0),
                                               ctypes.c_bool(False), ctypes.c_float(1.0), ctypes.c_int(1),
                                               ctypes.c_float(1.0), ctypes.c_float(1.0), ctypes.c_bool(False),
                                               0, None)
        got = 0
        prefilled = None
        while got < new_tokens:
            # wait for the token asleep: fetch_response_llm_model waits by spinning on a lock, a third busy
            # thread on the cores fastllm's two compute on (measured: 3-5x slower decoding on 2 cores)
            while not lib.can_fetch_response_llm_model(model.model, handle):
                time.sleep(0.0002)
            if lib.fetch_response_llm_model(model.model, handle) < 0:
                break
            got += 1
            if prefilled is None:
                prefilled = time.perf_counter()
        done = time.perf_counter()
        if prefilled is None:  # no token came back: the caller reports it
            return 0.0, 0.0, got
        return prefilled - start, done - prefilled, got

    generate(prompt, spec["warmup_tokens"])  # warm-up, not timed
    prefill_s, decode_s, got = generate(prompt, spec["new_tokens"])
    if got < 2:
        return {"status": "error", "reason": f"fastllm returned {got} token(s) for {spec['new_tokens']}"}
    return {"status": "ok", "load_s": load_s, "read_bytes_s": read_s, "weight_bytes": nbytes,
            "prefill_tokens_per_s": len(prompt) / prefill_s, "decode_ms_per_token": 1000 * decode_s / (got - 1),
            "tokens": got, "peak_rss_gb": peak_rss_gb(), "threads": threads}


# ------------------------------------------------------------------------------ the machine's limits

def cpu_info() -> dict:
    """The CPU this runs on: vendor, model, and the instruction sets the kernels care about (from /proc/cpuinfo)."""
    info = {"vendor": "?", "model": platform_processor(), "cores": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    info.update(vendor=fields.get("vendor_id", "?"), model=fields.get("model name", "?"),
                avx2="avx2" in flags and "fma" in flags, avx512="avx512f" in flags,
                avx512_bf16="avx512_bf16" in flags, avx512_vnni="avx512_vnni" in flags,
                amx="amx_tile" in flags and "amx_bf16" in flags)
    return info


def platform_processor() -> str:
    import platform

    return platform.processor() or platform.machine()


def describe_cpu(info: dict) -> str:
    def yes(key):
        return "yes" if info.get(key) else "no"

    return (f"{info['vendor']} {info['model']}, {info['cores']} CPUs; AVX2+FMA {yes('avx2')}, AVX-512 {yes('avx512')}, "
            f"AVX512-BF16 {yes('avx512_bf16')}, AVX512-VNNI {yes('avx512_vnni')}, AMX {yes('amx')}")


def best_seconds(fn, repeats: int) -> float:
    """The fastest of `repeats` calls after one untimed call: on a shared machine other work only ever makes
    a try slower."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def memory_read_rate(torch, repeats: int = 5) -> float:
    """Bytes per second torch's threads read from memory: the sum of a 1 GiB float32 tensor, which reads
    each byte once and computes next to nothing (benchmarks/profile_decode_cpu.py uses it too)."""
    big = torch.ones(2**28)
    return big.numel() * 4 / best_seconds(big.sum, repeats)


def measure_limits(torch, rows: int) -> dict:
    """What the machine can do right now with torch's threads: the memory read rate (`memory_read_rate`)
    and the float32 and bfloat16 GEMM rates of a prefill-shaped product ([rows, 4096] x [4096, 16384]),
    each the best of a few tries."""
    read_rate = memory_read_rate(torch)
    rates = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a = torch.randn(rows, 4096).to(dtype)
        w = torch.randn(16384, 4096).to(dtype)
        rates[name] = 2 * rows * 4096 * 16384 / best_seconds(lambda: torch.nn.functional.linear(a, w), 3)
    return {"read_bytes_per_s": read_rate, "gemm_flops_per_s": rates}


WORKERS = {"prepare": worker_prepare, "glm6b": worker_glm6b, "convert": worker_convert, "cpp": worker_cpp,
           "cppinfo": worker_cppinfo, "fastllminfo": worker_fastllminfo, "fastllm_convert": worker_fastllm_convert,
           "fastllm": worker_fastllm}


# ------------------------------------------------------------------------------- build recording

def record_build(build_dir: Path, cpp_python: str) -> Path:
    """Store the flags of a chatglm.cpp build (its CMake build folder) next to the venv that has it."""
    candidates = list(build_dir.rglob("CMakeCache.txt"))
    if not candidates:
        raise SystemExit(f"no CMakeCache.txt under {build_dir}")
    cache_dir = candidates[0].parent
    cache = {}
    for line in candidates[0].read_text().splitlines():
        if line and not line.startswith(("#", "//")) and "=" in line and ":" in line.split("=", 1)[0]:
            key, value = line.split("=", 1)
            cache[key.split(":")[0]] = value
    wanted = ("CMAKE_BUILD_TYPE", "CMAKE_C_COMPILER", "CMAKE_CXX_COMPILER", "CMAKE_C_FLAGS", "CMAKE_CXX_FLAGS",
              "CMAKE_C_FLAGS_RELEASE", "CMAKE_CXX_FLAGS_RELEASE", "CMAKE_GENERATOR", "CMAKE_MAKE_PROGRAM",
              "CMAKE_POLICY_VERSION_MINIMUM", "GGML_AVX", "GGML_AVX2", "GGML_AVX512", "GGML_FMA", "GGML_F16C",
              "GGML_OPENBLAS", "GGML_CUDA")
    info = {"build_dir": str(cache_dir), "cmake_cache": {k: cache[k] for k in wanted if k in cache}}
    commands = cache_dir / "compile_commands.json"
    if commands.exists():
        for entry in json.loads(commands.read_text()):
            for key, suffix in (("ggml_c", "/ggml.c"), ("chatglm_cpp", "/chatglm.cpp")):
                if entry["file"].endswith(suffix) and key + "_compile" not in info:
                    command = entry.get("command") or " ".join(entry.get("arguments", []))
                    info[key + "_compile"] = " ".join(
                        a for a in command.split() if a.startswith(("-m", "-O", "-f", "-std", "-g", "-D")))
    prefix = subprocess.run([cpp_python, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True,
                            check=True).stdout.strip()
    path = Path(prefix) / BUILD_INFO_NAME
    path.write_text(json.dumps(info, indent=2) + "\n")
    return path


# ------------------------------------------------------------------------------------------- main

def fmt(value, digits=1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def median_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def max_or_none(values):
    values = [v for v in values if v is not None]
    return max(values) if values else None


def default_tokenizer_dir() -> Path:
    golden = ROOT / "tests" / "golden"  # a tokenizer with the real ice_text.model's special layout
    return golden if (golden / "ice_text.model").exists() else ROOT / "glm6b" / "assets" / "default"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--layers", type=int, default=28, help="layers of the glm_6b shape (width kept)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="measurements per engine and precision (median)")
    parser.add_argument("--prompt-length", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--warmup-tokens", type=int, default=4, help="untimed warm-up generation per process")
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 8],
                        help="glm6b int4 decode tokens/s at these batch sizes (none: skip)")
    parser.add_argument("--pairs", default=",".join(name for name, _ in PAIRS),
                        help=f"which rows: any of {','.join(name for name, _ in PAIRS)}")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/compare_cpp"))
    parser.add_argument("--cpp-python", default=os.environ.get("CHATGLM_CPP_PYTHON", ".venv-chatglm-cpp/bin/python"),
                        help="python of the environment with chatglm_cpp (default $CHATGLM_CPP_PYTHON)")
    parser.add_argument("--fastllm-python", default=os.environ.get("FASTLLM_PYTHON", ".venv-fastllm/bin/python"),
                        help="python of the environment with fastllm's ftllm (default $FASTLLM_PYTHON; "
                             "'none' leaves fastllm out)")
    parser.add_argument("--fastllm-threads", type=int, nargs="+", default=None,
                        help="fastllm's compute threads (set_cpu_threads), one process each, the fastest counted "
                             "(default: --threads); its process is pinned to --threads cores as the others")
    parser.add_argument("--prepare-only", action="store_true",
                        help="only write the folders and convert the files of --pairs (no timing; the machine's "
                             "load does not matter for it)")
    parser.add_argument("--discard-converted", action="store_true",
                        help="delete each chatglm.cpp / fastllm file after the last pair that uses it (disk)")
    parser.add_argument("--int8-activations", action="store_true",
                        help="also time glm6b with its opt-in int8-activation kernels (GLM6B_INT8_ACTIVATIONS=1, "
                             "AVX2 build): the 'glm6b a8' column")
    parser.add_argument("--tokenizer-dir", type=Path, default=None,
                        help="folder with ice_text.model + tokenizer_config.json (default: tests/golden, "
                             "else glm6b's built-in one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--record-build", type=Path, default=None, metavar="BUILD_DIR",
                        help="only store the build flags of chatglm.cpp's CMake build folder next to its venv")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        report(WORKERS[args.worker](json.loads(args.spec)))
        return
    if args.record_build:
        print(f"wrote {record_build(args.record_build, args.cpp_python)}")
        return
    if args.new_tokens < 2 or args.prompt_length < 3:
        parser.error("--new-tokens must be >= 2 and --prompt-length >= 3")
    wanted = [p.strip() for p in args.pairs.split(",") if p.strip()]
    pairs = [pair for pair in PAIRS if pair[0] in wanted]
    if not pairs:
        parser.error(f"--pairs: none of {wanted} is one of {', '.join(name for name, _ in PAIRS)}")

    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "workers.log"
    glm_python = sys.executable
    cpu = cpu_info()
    print(f"CPU: {describe_cpu(cpu)}", flush=True)

    print(f"chatglm.cpp environment: {args.cpp_python}", flush=True)
    build = run_worker(args.cpp_python, "cppinfo", {}, log)
    if build.get("status") != "ok":
        raise SystemExit(f"chatglm.cpp is not usable: {build.get('reason')}")
    build.pop("status")
    fastllm = {"status": "skipped", "reason": "--fastllm-python none"}
    if args.fastllm_python != "none":
        print(f"fastllm environment: {args.fastllm_python}", flush=True)
        fastllm = (run_worker(args.fastllm_python, "fastllminfo", {}, log) if Path(args.fastllm_python).exists()
                   else {"status": "error", "reason": f"{args.fastllm_python} does not exist (see the docstring)"})
    if fastllm.get("status") != "ok":
        print(f"  fastllm left out: {fastllm.get('reason')}", flush=True)

    print(f"preparing the random {args.layers}-layer glm_6b-shaped folder in {work} ...", flush=True)
    folder = work / f"hf-L{args.layers}"
    prep = run_worker(glm_python, "prepare", {"folder": str(folder), "layers": args.layers, "seed": args.seed,
                                              "quantized": [name for name, _ in pairs if GLM6B_QUANTIZE[name]],
                                              "tokenizer_dir": str(args.tokenizer_dir or default_tokenizer_dir())},
                      log)
    if prep.get("status") != "ok":
        raise SystemExit(f"preparing the folder failed: {prep.get('reason')}")

    def cpp_file(cpp_type: str) -> Path:
        """chatglm.cpp's file of `cpp_type`, converted by its converter on first use (cached in the work dir)."""
        target = work / f"cpp-L{args.layers}-{cpp_type}.bin"
        if not target.exists():
            print(f"converting with chatglm.cpp's converter to {cpp_type} ...", flush=True)
            res = run_worker(args.cpp_python, "convert", {"folder": str(folder), "output": str(target),
                                                          "type": cpp_type}, log)
            if res.get("status") != "ok":
                raise SystemExit(f"conversion to {cpp_type} failed: {res.get('reason')}")
            print(f"  {res['bytes'] / 1e9:.2f} GB in {res['convert_s']:.0f} s", flush=True)
        return target

    fastllm_failed = {}  # fastllm type -> the error of its conversion (that row's fastllm result)

    def fastllm_file(ft_type: str) -> Path | dict | None:
        """fastllm's file of `ft_type` (its converter, on first use), its conversion's error, or None (no fastllm)."""
        if fastllm.get("status") != "ok":
            return None
        if ft_type in fastllm_failed:
            return fastllm_failed[ft_type]
        target = work / f"fastllm-L{args.layers}-{ft_type}.flm"
        if not target.exists():
            print(f"converting with fastllm's converter to {ft_type} ...", flush=True)
            res = run_worker(args.fastllm_python, "fastllm_convert", {"folder": str(folder), "output": str(target),
                                                                       "type": ft_type}, log)
            if res.get("status") != "ok":
                print(f"  failed: {res.get('reason')}", flush=True)
                fastllm_failed[ft_type] = res
                return res
            print(f"  {res['bytes'] / 1e9:.2f} GB in {res['convert_s']:.0f} s", flush=True)
        return target

    # The converted files each pair uses, and the last pair that does: with --discard-converted a file is
    # deleted after that pair's last round (the 28-layer files of all pairs take about 50 GB).
    last_use = {}
    for index, (glm_name, cpp_type) in enumerate(pairs):
        last_use[("cpp", cpp_type)] = index
        last_use[("fastllm", FASTLLM_TYPES[glm_name])] = index

    if args.prepare_only:  # the folders and converted files of the chosen pairs, for a later timed run
        for glm_name, cpp_type in pairs:
            cpp_file(cpp_type)
            fastllm_file(FASTLLM_TYPES[glm_name])
        print(f"prepared {', '.join(name for name, _ in pairs)} in {work}")
        return
    fastllm_threads = args.fastllm_threads or [args.threads]
    prompt = make_prompt(args.prompt_length, args.seed)
    common = {"threads": args.threads, "prompt": prompt, "new_tokens": args.new_tokens,
              "warmup_tokens": min(args.warmup_tokens, args.new_tokens), "seed": args.seed}
    engines = ("glm6b",) + (("glm6b_a8",) if args.int8_activations else ()) + ("chatglm_cpp", "fastllm")
    measured = {pair: {engine: [] for engine in engines} for pair in pairs}
    batch_results = []
    for rnd in range(args.rounds):
        for glm_name, cpp_type in pairs:
            quantize = GLM6B_QUANTIZE[glm_name]
            if quantize and glm_name in prep["quantized"]:  # a glm6b-quantized folder
                glm_spec = {"folder": prep["quantized"][glm_name], "quantize": None}
            else:  # the float16 folder, quantized at load
                glm_spec = {"folder": str(folder), "quantize": quantize}
            batch_sizes = args.batch_sizes if glm_name == "int4" and rnd == 0 else []
            jobs = [("glm6b", glm_python, "glm6b", {**common, **glm_spec, "batch_sizes": batch_sizes}),
                    ("chatglm_cpp", args.cpp_python, "cpp", {**common, "model": str(cpp_file(cpp_type))})]
            if args.int8_activations:
                jobs.insert(1, ("glm6b_a8", glm_python, "glm6b", {**common, **glm_spec, "batch_sizes": batch_sizes}))
            ft_file = fastllm_file(FASTLLM_TYPES[glm_name])
            if isinstance(ft_file, Path):
                for ft_threads in fastllm_threads:
                    jobs.append(("fastllm", args.fastllm_python, "fastllm",
                                 {**common, "model": str(ft_file), "fastllm_threads": ft_threads}))
            elif ft_file is not None and rnd == 0:  # its conversion failed: that is the row's fastllm result
                measured[(glm_name, cpp_type)]["fastllm"].append(ft_file)
            if rnd % 2:
                jobs.reverse()
            fastllm_runs = []  # this round's fastllm runs, one per --fastllm-threads: the fastest one counts
            for engine, python, kind, spec in jobs:
                label = {"glm6b": glm_name, "glm6b_a8": glm_name, "chatglm_cpp": cpp_type,
                         "fastllm": FASTLLM_TYPES[glm_name]}[engine]
                print(f"round {rnd + 1}/{args.rounds}: {engine} {label} ...", flush=True)
                env = {"GLM6B_INT8_ACTIVATIONS": "1" if engine == "glm6b_a8" else "0"} if kind == "glm6b" else None
                res = run_worker(python, kind, spec, log, env=env)
                if res.get("status") != "ok":
                    print(f"  {res.get('status')}: {res.get('reason')}", flush=True)
                else:
                    print(f"  prefill {res['prefill_tokens_per_s']:.1f} tok/s, decode "
                          f"{res['decode_ms_per_token']:.1f} ms/token, peak RSS {res['peak_rss_gb']:.2f} GB, "
                          f"load {res['load_s']:.1f} s (reading the bytes: {res['read_bytes_s']:.1f} s"
                          + (f", into fresh memory {res['read_fresh_s']:.1f} s)" if "read_fresh_s" in res else ")")
                          + (f" [{res['how']}; {', '.join(res['kernels'])}]" if "how" in res else ""), flush=True)
                    for b in res.get("batch") or []:
                        batch_results.append({"engine": engine, **b})
                if engine == "fastllm":
                    fastllm_runs.append(res)
                else:
                    measured[(glm_name, cpp_type)][engine].append(res)
            if fastllm_runs:
                ok = [r for r in fastllm_runs if r.get("status") == "ok"]
                measured[(glm_name, cpp_type)]["fastllm"].append(
                    min(ok, key=lambda r: r["decode_ms_per_token"]) if ok else fastllm_runs[0])
            if args.discard_converted and rnd == args.rounds - 1:
                index = pairs.index((glm_name, cpp_type))
                for (kind, type_name), last in last_use.items():
                    path = work / (f"cpp-L{args.layers}-{type_name}.bin" if kind == "cpp"
                                   else f"fastllm-L{args.layers}-{type_name}.flm")
                    if last == index and path.exists():
                        path.unlink()
                        print(f"  deleted {path.name} (--discard-converted)", flush=True)
    # The limits each glm6b process measured right before its timed run: per row, and over the run.
    limits = [r["limits"] for by_engine in measured.values() for r in by_engine["glm6b"] if r.get("limits")]

    def limits_of(results):
        found = [r["limits"] for r in results if r.get("limits")]
        read = median_or_none([lim["read_bytes_per_s"] for lim in found])
        gemms = {d: median_or_none([lim["gemm_flops_per_s"][d] for lim in found]) for d in ("float32", "bfloat16")}
        return read, gemms

    read_rate, gemm = limits_of([{"limits": lim} for lim in limits])
    prefill_flops = 2 * LAYER_MATMUL_PARAMS * args.layers  # per prompt token

    def roofline_of(gemms):
        best = max((v for v in gemms.values() if v), default=None)
        return best / prefill_flops if best else None

    roofline = roofline_of(gemm)

    rows = []
    for (glm_name, cpp_type), by_engine in measured.items():
        row = {"glm6b": glm_name, "chatglm_cpp": cpp_type, "fastllm": FASTLLM_TYPES[glm_name]}
        for key, combine in (("decode_ms_per_token", median_or_none), ("prefill_tokens_per_s", median_or_none),
                             ("peak_rss_gb", max_or_none), ("load_s", median_or_none),
                             ("read_bytes_s", median_or_none), ("read_fresh_s", median_or_none),
                             ("step_bytes", median_or_none)):
            row[key] = {engine: combine([r.get(key) for r in results if r.get("status") == "ok"])
                        for engine, results in by_engine.items()}
        step_bytes = row["step_bytes"]["glm6b"]
        row_read, row_gemm = limits_of(by_engine["glm6b"])
        row["limits"] = {"read_bytes_per_s": row_read, "gemm_flops_per_s": row_gemm,
                         "prefill_roofline_tokens_per_s": roofline_of(row_gemm)}
        row["glm6b_floor_ms_per_token"] = 1000 * step_bytes / row_read if step_bytes and row_read else None
        notes = [f"{engine}: {r.get('reason')}" for engine, results in by_engine.items() for r in results
                 if r.get("status") != "ok"]
        hows = {r["how"] for r in by_engine["glm6b"] if "how" in r}
        if hows:
            row["glm6b_path"] = ", ".join(sorted(hows))
        kernels = {k for r in by_engine["glm6b"] for k in r.get("kernels", [])}
        if kernels:
            row["glm6b_kernels"] = sorted(kernels)
        ft_threads = sorted({r["threads"] for r in by_engine.get("fastllm", []) if r.get("status") == "ok"})
        if ft_threads:
            row["fastllm_threads"] = ft_threads
        if notes:
            row["notes"] = sorted(set(notes))
        rows.append(row)
    batch = [{"engine": b["engine"], "precision": "int4", "batch": b["batch"],
              "decode_tokens_per_s": b["decode_tokens_per_s"]} for b in batch_results]
    result = {"threads": args.threads, "layers": args.layers, "cpu": cpu, "build": build,
              "fastllm": {**fastllm, "threads_tried": fastllm_threads},
              "limits": {"read_bytes_per_s": read_rate, "gemm_flops_per_s": gemm,
                         "prefill_roofline_tokens_per_s": roofline, "prefill_flops_per_token": prefill_flops,
                         "measured": limits},
              "rows": rows, "batch": batch}

    print(f"\nglm6b vs chatglm.cpp {build.get('chatglm_cpp')} vs fastllm {fastllm.get('ftllm', '(not run)')}: glm_6b "
          f"shape, {args.layers} layers, random weights; {args.threads} threads (chatglm.cpp uses "
          f"{build.get('threads_used')}); prompt {args.prompt_length} tokens, {args.new_tokens} new tokens greedy; "
          f"{args.rounds} round(s)")
    isa = next((r.get("kernel_isa") for by_engine in measured.values() for r in by_engine["glm6b"] if "kernel_isa" in r), "?")
    print(f"CPU: {describe_cpu(cpu)}; glm6b kernels: {isa}"
          + ("; glm6b a8 = glm6b with GLM6B_INT8_ACTIVATIONS=1" if args.int8_activations else ""))
    recorded = build.get("recorded_build")
    if isinstance(recorded, dict):
        print(f"chatglm.cpp build: ggml.c compiled with `{recorded.get('ggml_c_compile', '?')}`")
    else:
        print(f"chatglm.cpp build: {recorded}")
    print(f"ggml reports: {build.get('ggml_cpu_has')}")
    if fastllm.get("status") == "ok":
        used = {row["fastllm"]: row.get("fastllm_threads") for row in rows}
        print(f"fastllm: {fastllm.get('loaded')}; compute threads tried {fastllm_threads}, the fastest decode counted "
              f"(used: {', '.join(f'{k} {v}' for k, v in used.items())})")
    print(f"limits (each glm6b process, before its timed run; best of a few tries, median over rows): memory read {fmt(read_rate and read_rate / 1e9)} GB/s; GEMM "
          f"[{args.prompt_length}, 4096] x [4096, 16384] float32 {fmt(gemm['float32'] and gemm['float32'] / 1e9)}, "
          f"bfloat16 {fmt(gemm['bfloat16'] and gemm['bfloat16'] / 1e9)} GFLOP/s; prefill roofline "
          f"{fmt(roofline)} tokens/s (the faster GEMM, {prefill_flops / 1e9:.1f} GFLOP a token)\n")

    peer_engines = ("chatglm_cpp", "fastllm")

    def triple(values, digits=1):
        return " / ".join(fmt(values.get(engine), digits) for engine in engines)

    def ratio(values, higher_is_better):
        """glm6b's speed over each peer's (and glm6b a8's, after a ';'), > 1: glm6b faster."""
        def over(engine):
            ours, theirs = values.get(engine), [values.get(e) for e in peer_engines]
            return " / ".join("n/a" if not (ours and t) else f"{(ours / t if higher_is_better else t / ours):.2f}x"
                              for t in theirs)

        return over("glm6b") + ("; a8: " + over("glm6b_a8") if "glm6b_a8" in engines else "")

    names = " / ".join({"glm6b": "glm6b", "glm6b_a8": "glm6b a8", "chatglm_cpp": "chatglm.cpp",
                        "fastllm": "fastllm"}[e] for e in engines)
    peers = " / ".join("chatglm.cpp" if e == "chatglm_cpp" else "fastllm" for e in engines if e in peer_engines)
    print(f"| {names} | decode ms/token | glm6b vs {peers} | glm6b read floor ms (share) | prefill tok/s | "
          f"glm6b vs {peers} | glm6b prefill roofline tok/s (share) | peak RSS GB | glm6b load s / read s / read fresh s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        d, p, m = row["decode_ms_per_token"], row["prefill_tokens_per_s"], row["peak_rss_gb"]
        floor = row["glm6b_floor_ms_per_token"]
        floor_share = f"{floor:,.1f} ({100 * floor / d['glm6b']:.0f} %)" if floor and d.get("glm6b") else "n/a"
        row_roof = row["limits"]["prefill_roofline_tokens_per_s"]
        roof_share = f"{row_roof:,.1f} ({100 * p['glm6b'] / row_roof:.0f} %)" if row_roof and p.get("glm6b") else "n/a"
        ld, rd, rf = row["load_s"], row["read_bytes_s"], row["read_fresh_s"]
        label = " / ".join({"glm6b_a8": row["glm6b"], "chatglm_cpp": row["chatglm_cpp"]}.get(e, row.get(e, row["glm6b"]))
                           for e in engines)
        print(f"| {label} | {triple(d)} | {ratio(d, False)} | "
              f"{floor_share} | {triple(p)} | {ratio(p, True)} | {roof_share} | {triple(m, 2)} | "
              f"{fmt(ld.get('glm6b'), 2)} / {fmt(rd.get('glm6b'), 2)} / {fmt(rf.get('glm6b'), 2)} |")
    if batch:
        int4 = next((r for r in rows if r["glm6b"] == "int4"), None)
        int4_bytes = int4["step_bytes"]["glm6b"] if int4 else None
        int4_read, int4_gemm = (int4["limits"]["read_bytes_per_s"], int4["limits"]["gemm_flops_per_s"]) if int4 else (None, {})
        # glm6b's decode kernels multiply in bfloat16 on the AVX-512 build (vdpbf16ps / AMX) and in float32 elsewhere
        unit = "bfloat16" if isa == "avx512bf16" else "float32"
        print(f"\n| glm6b int4, batch | decode tokens/s | vs batch 1 | roofline tokens/s: min(memory, {unit} products at "
              "the GEMM's rate) |")
        print("|---|---|---|---|")
        for b in batch:
            base = next((c["decode_tokens_per_s"] for c in batch if c["batch"] == 1 and c["engine"] == b["engine"]), None)
            # a step reads the weights once (memory) and does 2 flops per weight per row (compute)
            memory = int4_read / int4_bytes * b["batch"] if int4_read and int4_bytes else None
            per_token = 2 * (LAYER_MATMUL_PARAMS * args.layers + 130528 * 4096)
            compute = int4_gemm.get(unit) / per_token if int4_gemm.get(unit) else None
            bound = min(v for v in (memory, compute) if v) if (memory or compute) else None
            label = ("glm6b a8, " if b["engine"] == "glm6b_a8" else "") + str(b["batch"])
            print(f"| {label} | {b['decode_tokens_per_s']:,.2f} | "
                  + (f"{b['decode_tokens_per_s'] / base:.2f}x" if base else "n/a")
                  + f" | {fmt(bound, 2)} (memory {fmt(memory, 2)}, compute {fmt(compute, 2)}) |")
    for row in rows:
        for note in row.get("notes", []):
            print(f"note ({row['glm6b']}/{row['chatglm_cpp']}/{row['fastllm']}): {note}")
    if fastllm.get("status") != "ok":
        print(f"note: fastllm not run: {fastllm.get('reason')}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")

if __name__ == "__main__":
    main()
