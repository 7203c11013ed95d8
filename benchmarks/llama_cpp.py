"""llama.cpp's quantizations as peer rows: Q4_K_M and IQ4_XS with an
importance matrix from the same calibration text, and Q4_K_M without, each
quantized by llama.cpp's own tools from an F32 GGUF of the same reference,
and measured on llama.cpp's own logits over the same held-out token ids as
every other row of benchmarks/weights.py.

    python benchmarks/llama_cpp.py                     # SmolLM2, tokens of weights.py --anchor-bits 4 --n-eval 8
    python benchmarks/llama_cpp.py --model gemma3 --n-eval 4
    python benchmarks/weights.py --add-from results/llama-cpp-SmolLM2-135M-Instruct.json   # into the weights table

llama.cpp comes from PyPI's llama-cpp-python sdist (it vendors llama.cpp):
downloaded once with pip, llama-quantize and llama-imatrix built with cmake
into ~/.cache/optiq/llama.cpp (about 20 min on 2 cores), and its Python
bindings loaded over that build (LLAMA_CPP_LIB_PATH), so one build serves
both (they need `diskcache`). The F32 GGUF comes from llama.cpp's
convert_hf_to_gguf.py (needs torch), run on the reference folder every
other row loads.

The JSON keeps mlx-lm's round-to-nearest 4-bit g64 on the same tokens
(`rtn_check`): `weights.py --add-from` joins the rows to its table and PNG
only when that reproduces its own uniform row.
"""

import argparse
import ctypes
import importlib.util
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from common import RESULTS, WIKITEXT, gemma3_model  # also puts the repo on sys.path
from optiq.blas import ensure_fast_blas

SDIST = "llama-cpp-python==0.3.36"
TARGETS = ("llama-quantize", "llama-imatrix")
ROWS = (  # label, llama.cpp type, with the importance matrix
    ("Q4_K_M + imatrix", "Q4_K_M", True),
    ("IQ4_XS + imatrix", "IQ4_XS", True),
    ("Q4_K_M", "Q4_K_M", False),
)


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: SmolLM2; 'gemma3' for Gemma-3-270M; or a path/repo id")
    p.add_argument("--n-calibration", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--n-eval", type=int, default=8)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--llama-cpp", default=None, metavar="DIR", help="a built llama.cpp tree (default: build one from the sdist)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default=None)
    return p.parse_args()


def run(cmd, **kw):
    """A tool's run, its output kept for the error if it fails."""
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if done.returncode:
        raise SystemExit(f"{Path(str(cmd[0])).name} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return done


def build_llama_cpp(cache: Path) -> Path:
    """The vendored llama.cpp of the sdist, its tools and shared libraries built."""
    root = cache / SDIST.replace("==", "-")
    tree = root / "vendor" / "llama.cpp"
    if all((tree / "build" / "bin" / t).exists() for t in TARGETS):
        return tree
    if not tree.exists():
        cache.mkdir(parents=True, exist_ok=True)
        run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", SDIST, "-d", cache])
        with tarfile.open(next(cache.glob("llama_cpp_python-*.tar.gz"))) as tar:
            tar.extractall(cache, filter="data")
        next(cache.glob("llama_cpp_python-*/")).rename(root)
    print(f"building llama.cpp in {tree} (once; about 20 min on 2 cores)", flush=True)
    run(["cmake", "-S", tree, "-B", tree / "build", "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON",
         "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
         "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_NATIVE=ON"])
    run(["cmake", "--build", tree / "build", "-j", str(os.cpu_count()), "--target", *TARGETS])
    return tree


def f32_gguf(tree: Path, reference: Path, out: Path) -> Path:
    """llama.cpp's own conversion of the reference folder, unquantized."""
    if not out.exists():
        env = os.environ | {"PYTHONPATH": str(tree / "gguf-py")}
        run([sys.executable, tree / "convert_hf_to_gguf.py", reference, "--outtype", "f32", "--outfile", out], env=env)
    return out


def tool_env(tree: Path) -> dict:
    """The built tools find their shared libraries wherever the tree was moved."""
    return os.environ | {"LD_LIBRARY_PATH": str(tree / "build" / "bin")}


def importance_matrix(tree: Path, f32: Path, text: Path, out: Path, ctx: int, chunks: int, threads: int) -> Path:
    run([tree / "build" / "bin" / "llama-imatrix", "-m", f32, "-f", text, "-o", out, "-c", ctx, "--chunks", chunks,
         "-t", threads, "--no-ppl"], env=tool_env(tree))
    return out


def quantize(tree: Path, f32: Path, out: Path, qtype: str, imatrix: Path | None, threads: int) -> Path:
    extra = ["--imatrix", imatrix] if imatrix else []
    run([tree / "build" / "bin" / "llama-quantize", *extra, f32, out, qtype, threads], env=tool_env(tree))
    return out


def gguf_bpw(path: Path) -> float:
    """Effective bits per weight as mlx-lm counts them: every stored bit over every parameter."""
    import gguf

    tensors = gguf.GGUFReader(str(path)).tensors
    return sum(int(t.n_bytes) * 8 for t in tensors) / sum(int(t.n_elements) for t in tensors)


def gguf_types(path: Path) -> dict:
    """How many tensors of each llama.cpp type (K-quants fall back where rows are not a multiple of 256)."""
    import gguf

    counts = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def llama_cpp_logits(tree: Path, path: Path, ctx: int, threads: int):
    """model(batch) -> logits from llama.cpp itself, one sequence at a time, every position's logits."""
    import mlx.core as mx
    import numpy as np

    lib = tree / "build" / "bin"
    os.environ["LLAMA_CPP_LIB_PATH"] = str(lib)
    for name in ("libggml-base.so", "libggml-cpu.so", "libggml.so"):  # by soname, wherever the tree was moved
        ctypes.CDLL(str(lib / name), mode=ctypes.RTLD_GLOBAL)
    sys.path.insert(0, str(tree.parents[1]))  # the sdist's llama_cpp package, over this build's libllama
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True, n_threads=threads, verbose=False)

    def model(batch):
        out = []
        for ids in np.array(batch).tolist():
            llm.reset()
            llm.eval(ids)
            out.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
        return mx.array(np.stack(out))

    return model


def main():
    ensure_fast_blas()
    args = parse()
    if not WIKITEXT.exists():
        raise SystemExit(f"needs {WIKITEXT} (../shared/data)")
    # convert_hf_to_gguf.py imports torch; the llama_cpp bindings import diskcache
    if missing := [m for m in ("torch", "diskcache") if importlib.util.find_spec(m) is None]:
        raise SystemExit(f"benchmarks/llama_cpp.py needs {' and '.join(missing)}: pip install {' '.join(missing)}")
    import mlx_lm_peers
    import weights

    from optiq.calibration import tokens_from_texts, wikitext_split
    from optiq.cpu import adapt_for_cpu
    from optiq.evaluate import quality, reference_batches
    from optiq.source import cache_dir, load_reference, resolve_model

    tree = Path(args.llama_cpp) if args.llama_cpp else build_llama_cpp(cache_dir() / "llama.cpp")
    if missing := [t for t in TARGETS if not (tree / "build" / "bin" / t).exists()]:
        raise SystemExit(f"{tree} has no built {', '.join(missing)} (build/bin)")
    name = args.model or "SmolLM2-135M-Instruct"
    reference = resolve_model(gemma3_model() if args.model == "gemma3" else args.model)
    loaded = load_reference(reference)
    cal_text, eval_text = wikitext_split(WIKITEXT.read_text())
    cal = tokens_from_texts([cal_text], loaded.tokenizer, args.n_calibration, args.seq_len)
    ev = tokens_from_texts([eval_text], loaded.tokenizer, args.n_eval, args.eval_seq_len)
    refs = reference_batches(loaded.model, ev, batch_size=4)
    # mlx-lm's round-to-nearest on these tokens: weights.py --add-from checks it against its own uniform row
    rtn = weights.row("mlx-lm RTN 4-bit g64", 4.5, quality(adapt_for_cpu(mlx_lm_peers.rtn_model(loaded.path, cal)), ev, refs, batch_size=4), 0.0)
    work = cache_dir() / "llama.cpp" / "models" / Path(name).name
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    t0 = time.time()
    f32 = f32_gguf(tree, Path(loaded.path), work / "f32.gguf")
    # the reference through llama.cpp: near zero unless conversion or runtime differ from MLX's
    reference_check = weights.row("llama.cpp F32 (the reference)", gguf_bpw(f32),
                                  quality(llama_cpp_logits(tree, f32, args.eval_seq_len, args.threads), ev, refs, batch_size=4),
                                  time.time() - t0)
    print(reference_check, flush=True)
    text = work / "calibration.txt"  # the calibration windows every other row uses, as text for llama.cpp to tokenize
    text.write_text("\n".join(loaded.tokenizer.decode(list(w)) for w in cal))
    t0 = time.time()
    imatrix = importance_matrix(tree, f32, text, work / "imatrix.gguf", args.seq_len, args.n_calibration, args.threads)
    t_imatrix = time.time() - t0
    for label, qtype, with_imatrix in ROWS:
        t0 = time.time()
        path = quantize(tree, f32, work / f"{label.replace(' + ', '-').replace(' ', '_')}.gguf", qtype,
                        imatrix if with_imatrix else None, args.threads)
        seconds = time.time() - t0 + (t_imatrix if with_imatrix else 0.0)
        measured = quality(llama_cpp_logits(tree, path, args.eval_seq_len, args.threads), ev, refs, batch_size=4)
        rows.append(weights.row(f"llama.cpp {label}", gguf_bpw(path), measured, seconds, {"tensor_types": gguf_types(path)}))
        print(rows[-1], flush=True)
    print(weights.markdown(rows))
    out = Path(args.out) if args.out else RESULTS / f"llama-cpp-{Path(name).name}.json"
    result = {"model": name, "llama_cpp": SDIST, "calibration_tokens": int(cal.size), "eval_tokens": int(ev.size),
              "rtn_check": rtn, "reference_check": reference_check, "rows": rows, "argv": sys.argv[1:]}
    weights.write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
