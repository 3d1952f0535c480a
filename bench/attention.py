"""One layer's attention over a KV cache: the CPU kernel's one call against XLA's einsums, at the shapes of
SmolLM2-135M and LLaMA-2-7B.

    python bench/attention.py [--rounds 7] [--json PATH]

Each case is `models.layers.dot_product_attention` over a (B, Hkv, S, Dh) cache with a causal bias (the last Lq of
S slots are the query rows; a decode row sees half the cache), traced once with the kernel (`kernels.attention`:
scores, softmax and values in one call) and once with `kernels.cpu_kernels(False)` (XLA's einsums, the softmax
between them). The two run alternately in one process; prints the median ms of each and the ratio, with the load
average before and after (this shared machine is noisy: the ratios are the figures that count).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllama_jax import kernels  # noqa: E402
from vllama_jax.models import layers  # noqa: E402

# name: (batch, query rows, heads, KV heads, cache slots, head size, cache dtype)
CASES = {
    "SmolLM2-135M prefill, 128 tokens, batch 1": (1, 128, 9, 3, 192, 64, "float32"),
    "SmolLM2-135M prefill, 128 tokens, batch 8": (8, 128, 9, 3, 192, 64, "float32"),
    "SmolLM2-135M decode, batch 1": (1, 1, 9, 3, 192, 64, "float32"),
    "SmolLM2-135M decode, batch 8": (8, 1, 9, 3, 192, 64, "float32"),
    "LLaMA-2-7B bf16 decode, 704 slots": (1, 1, 32, 32, 704, 128, "bfloat16"),
    "LLaMA-2-7B bf16 prefill, 512 tokens, 704 slots": (1, 512, 32, 32, 704, 128, "bfloat16"),
}


def case_inputs(b: int, lq: int, h: int, hkv: int, s: int, d: int, dtype: str) -> tuple:
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((b, lq, h, d)), dtype)
    k, v = (jnp.asarray(rng.standard_normal((b, hkv, s, d)), dtype) for _ in range(2))
    rows = np.arange(lq) if lq > 1 else np.array([s // 2])
    allowed = np.arange(s)[None, :] <= rows[:, None]
    bias = np.broadcast_to(np.where(allowed, 0.0, np.finfo(np.float32).min), (b, 1, lq, s))
    return q, k, v, jnp.asarray(bias, jnp.float32)


def compiled(kernel: bool):
    def attend(q, k, v, bias):
        return layers.dot_product_attention(q, k, v, bias, kv_heads_first=True)

    jitted = jax.jit(attend)

    def run(*args):
        with kernels.cpu_kernels(None if kernel else False):
            return jitted(*args)
    return run


def time_once(fn, args: tuple, calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        out = fn(*args)
    out.block_until_ready()
    return (time.perf_counter() - t) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    if not kernels.use_cpu_kernels():
        raise SystemExit("bench/attention.py: needs the CPU kernel (one CPU device and a C++ compiler)")
    load0 = os.getloadavg()[0]
    results = {}
    for name, shape in CASES.items():
        args = case_inputs(*shape)
        fns = {"kernel": compiled(True), "xla": compiled(False)}
        for fn in fns.values():
            fn(*args).block_until_ready()
        probe = time_once(fns["xla"], args, 1)
        calls = max(1, min(200, int(0.05 / max(probe, 1e-6))))
        times = {k: [] for k in fns}
        for _ in range(a.rounds):
            for k, fn in fns.items():
                times[k].append(time_once(fn, args, calls))
        ms = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
        results[name] = {"kernel_ms": ms["kernel"], "xla_ms": ms["xla"], "speedup": ms["xla"] / ms["kernel"]}
        print(f"  {name}: kernel {ms['kernel']:.3f} ms, XLA {ms['xla']:.3f} ms ({ms['xla'] / ms['kernel']:.1f}x)")
    load1 = os.getloadavg()[0]
    print(f"median of {a.rounds} alternating rounds; load average {load0:.1f} before, {load1:.1f} after")
    if a.json:
        a.json.write_text(json.dumps({"cases": results, "load_average": [load0, load1]}, indent=1) + "\n")


if __name__ == "__main__":
    main()
