"""Side-by-side CPU speed of glm6b and chatglm.cpp on the same random ChatGLM-6B-shaped weights.

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
3. Times each engine in its own subprocess (so peak RSS, VmHWM, is that engine's alone),
   alternating the engines, `--rounds` times: the same 100-token prompt (random ordinary ids
   then [gMASK] <sop>), the same thread count, greedy decoding of `--new-tokens` tokens that never
   stops early (both sides are driven token by token, so <eop> cannot end a run). A short warm-up
   generation in the same process comes first and is not timed. Prefill = the prompt's forward
   plus choosing the first token; decode = the remaining new_tokens - 1 one-token steps.
   - chatglm.cpp: `Pipeline(path).model.generate_next_token(ids, None, gen_config, n_past, n_ctx)`,
     the loop chatglm.cpp's own generate runs, minus its <eop> check. chatglm.cpp 0.4.2 has no
     thread setting: it uses all hardware threads up to 4 (half of them above 4); with
     `--threads` below the machine's count its process is pinned to that many cores. Its load
     time is the Pipeline constructor's: it maps the file, and pages come in on first use.
   - glm6b: `glm6b.load_model(folder, dtype=torch.bfloat16)` of those folders, then the decode
     engine (glm6b.inference.engine.DecodeEngine) where it exists, else the model's forward with
     a KVCache (as benchmarks/generate.py). Also batch 1 vs batch 8 decode tokens/s for int4, and
     the load time of the folder next to the time to read its weight files once (read first), and
     again into fresh memory of each file's size (page cache then warm): the floor for any loader
     that copies the bytes into memory of its own.
   A glm6b precision it cannot load yet (no `quantize=`) is reported as n/a (null in the JSON).

Output: a markdown table; `--json FILE` writes
    {"threads", "layers", "build", "rows": [{"glm6b", "chatglm_cpp", "decode_ms_per_token",
     "prefill_tokens_per_s", "peak_rss_gb", "load_s", "read_bytes_s", "read_fresh_s", ...}], "batch": [...]}
with each measurement as {"glm6b": value, "chatglm_cpp": value} (medians over rounds; peak RSS
is the maximum). The machine's speed drifts between runs: compare numbers within one run only.
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


def run_worker(python: str, kind: str, spec: dict, log: Path | None = None, cwd: Path | None = None) -> dict:
    """Run this file as `--worker kind` under `python`; return the JSON it reports (or an error)."""
    cmd = [python, str(Path(__file__).resolve()), "--worker", kind, "--spec", json.dumps(spec)]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
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
    prefill_s, decode_s, how = glm6b_time_generation(model, prompt, spec["new_tokens"], capacity)
    steps = spec["new_tokens"] - 1
    result = {"status": "ok", "how": how, "load_s": load_s, "read_bytes_s": read_s, "read_fresh_s": read_fresh_s,
              "weight_bytes": nbytes,
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


WORKERS = {"prepare": worker_prepare, "glm6b": worker_glm6b, "convert": worker_convert, "cpp": worker_cpp,
           "cppinfo": worker_cppinfo}


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

    print(f"chatglm.cpp environment: {args.cpp_python}", flush=True)
    build = run_worker(args.cpp_python, "cppinfo", {}, log)
    if build.get("status") != "ok":
        raise SystemExit(f"chatglm.cpp is not usable: {build.get('reason')}")
    build.pop("status")

    print(f"preparing the random {args.layers}-layer glm_6b-shaped folder in {work} ...", flush=True)
    folder = work / f"hf-L{args.layers}"
    prep = run_worker(glm_python, "prepare", {"folder": str(folder), "layers": args.layers, "seed": args.seed,
                                              "quantized": [name for name, _ in pairs if GLM6B_QUANTIZE[name]],
                                              "tokenizer_dir": str(args.tokenizer_dir or default_tokenizer_dir())},
                      log)
    if prep.get("status") != "ok":
        raise SystemExit(f"preparing the folder failed: {prep.get('reason')}")

    cpp_files = {}
    for cpp_type in dict.fromkeys(cpp_type for _, cpp_type in pairs):
        target = work / f"cpp-L{args.layers}-{cpp_type}.bin"
        if not target.exists():
            print(f"converting with chatglm.cpp's converter to {cpp_type} ...", flush=True)
            res = run_worker(args.cpp_python, "convert", {"folder": str(folder), "output": str(target),
                                                          "type": cpp_type}, log)
            if res.get("status") != "ok":
                raise SystemExit(f"conversion to {cpp_type} failed: {res.get('reason')}")
            print(f"  {res['bytes'] / 1e9:.2f} GB in {res['convert_s']:.0f} s", flush=True)
        cpp_files[cpp_type] = target

    prompt = make_prompt(args.prompt_length, args.seed)
    common = {"threads": args.threads, "prompt": prompt, "new_tokens": args.new_tokens,
              "warmup_tokens": min(args.warmup_tokens, args.new_tokens), "seed": args.seed}
    measured = {pair: {"glm6b": [], "chatglm_cpp": []} for pair in pairs}
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
                    ("chatglm_cpp", args.cpp_python, "cpp", {**common, "model": str(cpp_files[cpp_type])})]
            if rnd % 2:
                jobs.reverse()
            for engine, python, kind, spec in jobs:
                label = glm_name if engine == "glm6b" else cpp_type
                print(f"round {rnd + 1}/{args.rounds}: {engine} {label} ...", flush=True)
                res = run_worker(python, kind, spec, log)
                if res.get("status") != "ok":
                    print(f"  {res.get('status')}: {res.get('reason')}", flush=True)
                else:
                    print(f"  prefill {res['prefill_tokens_per_s']:.1f} tok/s, decode "
                          f"{res['decode_ms_per_token']:.1f} ms/token, peak RSS {res['peak_rss_gb']:.2f} GB, "
                          f"load {res['load_s']:.1f} s (reading the bytes: {res['read_bytes_s']:.1f} s"
                          + (f", into fresh memory {res['read_fresh_s']:.1f} s)" if "read_fresh_s" in res else ")")
                          + (f" [{res['how']}]" if "how" in res else ""), flush=True)
                    if res.get("batch"):
                        batch_results = res["batch"]
                measured[(glm_name, cpp_type)][engine].append(res)

    rows = []
    for (glm_name, cpp_type), by_engine in measured.items():
        row = {"glm6b": glm_name, "chatglm_cpp": cpp_type}
        for key, combine in (("decode_ms_per_token", median_or_none), ("prefill_tokens_per_s", median_or_none),
                             ("peak_rss_gb", max_or_none), ("load_s", median_or_none),
                             ("read_bytes_s", median_or_none), ("read_fresh_s", median_or_none)):
            row[key] = {engine: combine([r.get(key) for r in results if r.get("status") == "ok"])
                        for engine, results in by_engine.items()}
        notes = [f"{engine}: {r.get('reason')}" for engine, results in by_engine.items() for r in results
                 if r.get("status") != "ok"]
        hows = {r["how"] for r in by_engine["glm6b"] if "how" in r}
        if hows:
            row["glm6b_path"] = ", ".join(sorted(hows))
        if notes:
            row["notes"] = sorted(set(notes))
        rows.append(row)
    batch = [{"precision": "int4", "batch": b["batch"], "decode_tokens_per_s": b["decode_tokens_per_s"]}
             for b in batch_results]
    result = {"threads": args.threads, "layers": args.layers, "build": build, "rows": rows, "batch": batch}

    print(f"\nglm6b vs chatglm.cpp {build.get('chatglm_cpp')}: glm_6b shape, {args.layers} layers, random weights; "
          f"{args.threads} threads (chatglm.cpp uses {build.get('threads_used')}); prompt {args.prompt_length} "
          f"tokens, {args.new_tokens} new tokens greedy; {args.rounds} round(s)")
    recorded = build.get("recorded_build")
    if isinstance(recorded, dict):
        print(f"chatglm.cpp build: ggml.c compiled with `{recorded.get('ggml_c_compile', '?')}`")
    else:
        print(f"chatglm.cpp build: {recorded}")
    print(f"ggml reports: {build.get('ggml_cpu_has')}\n")
    print("| glm6b | chatglm.cpp | decode ms/token glm6b | decode ms/token chatglm.cpp | prefill tok/s glm6b | "
          "prefill tok/s chatglm.cpp | peak RSS GB glm6b | peak RSS GB chatglm.cpp | "
          "glm6b load s / read s / read fresh s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        d, p, m, ld, rd, rf = (row.get(k, {}) for k in ("decode_ms_per_token", "prefill_tokens_per_s", "peak_rss_gb",
                                                         "load_s", "read_bytes_s", "read_fresh_s"))
        print(f"| {row['glm6b']} | {row['chatglm_cpp']} | {fmt(d['glm6b'])} | {fmt(d['chatglm_cpp'])} | "
              f"{fmt(p['glm6b'])} | {fmt(p['chatglm_cpp'])} | {fmt(m['glm6b'], 2)} | {fmt(m['chatglm_cpp'], 2)} | "
              f"{fmt(ld['glm6b'], 2)} / {fmt(rd['glm6b'], 2)} / {fmt(rf.get('glm6b'), 2)} |")
    if batch:
        print("\n| glm6b int4 batch | decode tokens/s |\n|---|---|")
        for b in batch:
            print(f"| {b['batch']} | {b['decode_tokens_per_s']:,.2f} |")
    for row in rows:
        for note in row.get("notes", []):
            print(f"note ({row['glm6b']}/{row['chatglm_cpp']}): {note}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
