"""The CPU matmul kernel (`vllama_jax.kernels.wmatmul`) against XLA's dot, in the same run.

For each number of rows M of x (1 and 8: decode steps; 128 and 512: prefills and the ViT's frames) and each stored
weight dtype (float32, bfloat16, float16, int8 with per-column scales, as (K, N) and in the packed layout of
`kernels.pack_int8`), one (M, K) @ (K, N) product, timed after a
warm-up: GFLOP/s, and the weight bytes read per second (what bounds a decode step). Beside it XLA's own dot with
float32 weights (what the models use without the kernel) and, for the low-precision dtypes, XLA's dot on the same
stored weights (it converts the whole operand to float32 first: the copy the kernel exists to avoid). The copy
bandwidth of the machine is measured in the same run (`bench/generate.py`'s `copy_bandwidth`), so the decode rows
read as a fraction of it.

    python bench/matmul_kernel.py [--k 4096] [--n 16384] [--rows 1 8 128 512] [--repeats 3] [--json PATH]

The weight matrix (K x N, 256 MB in float32 at the defaults) is larger than the caches, so decode rows measure
memory, not cache, bandwidth. Each figure is the best of --repeats timings (this machine is shared).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vllama_jax import kernels  # noqa: E402
from vllama_jax.models.quant import quantize_leaf  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from generate import copy_bandwidth  # noqa: E402

DTYPES = ("float32", "bfloat16", "float16", "int8", "int8-packed")


def best_seconds(fn: Callable[[], Any], min_seconds: float, repeats: int) -> float:
    """The best of `repeats` mean times of fn over at least `min_seconds` each (fn already warm)."""
    best = float("inf")
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            jax.block_until_ready(fn())
            n += 1
            if time.perf_counter() - t0 >= min_seconds:
                break
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def stored(w32: np.ndarray, dtype: str) -> tuple[jax.Array, jax.Array | None]:
    """The weights as stored in `dtype` and their scale (int8: `quantize_leaf`'s per-column scales, as a Dense
    kernel of the LLM is quantized at load; None otherwise)."""
    if not dtype.startswith("int8"):
        return jnp.asarray(w32, dtype), None
    q, scale = quantize_leaf(w32, "llama/layers_0/mlp/up_proj/kernel")
    q = jnp.asarray(q)
    return (kernels.pack_int8(q) if dtype == "int8-packed" else q), jnp.asarray(scale)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 128, 512])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--min-seconds", type=float, default=0.5, help="per timing")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    if not kernels.wmatmul_available():
        sys.exit("error: the CPU kernel is not available here (see the log line above)")
    load_before = os.getloadavg()
    bw = max(copy_bandwidth())  # (numpy, jax) copy: the faster one, as bench/realsize.py
    rng = np.random.default_rng(0)
    w32 = (rng.standard_normal((args.k, args.n)) * 0.02).astype(np.float32)
    weights = {d: stored(w32, d) for d in DTYPES}
    kernel = jax.jit(lambda x, w, s: kernels.wmatmul(x, w, s))
    def xla_product(x, w, s):
        w = (kernels.unpack_int8(w) if kernels.is_packed(w) else w).astype(jnp.float32)
        return x @ (w if s is None else w * s)

    xla = jax.jit(xla_product)
    rows: dict[str, Any] = {}
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s; x (M, {args.k}) @ W ({args.k}, {args.n}); best of {args.repeats}; "
          f"load average {load_before[0]:.2f}")
    print(f"{'M':>5} {'weights':>9} | {'kernel GFLOP/s':>14} {'kernel GB/s':>11} | {'XLA GFLOP/s':>11} "
          f"{'XLA GB/s':>8} | kernel / XLA f32")
    for m in args.rows:
        x = jnp.asarray(rng.standard_normal((m, args.k)), jnp.float32)
        flops = 2 * m * args.k * args.n
        w, s = weights["float32"]
        xla(x, w, s).block_until_ready()
        xla_f32 = best_seconds(lambda: xla(x, w, s), args.min_seconds, args.repeats)
        for d in DTYPES:
            w, s = weights[d]
            kernel(x, w, s).block_until_ready()
            tk = best_seconds(lambda: kernel(x, w, s), args.min_seconds, args.repeats)
            if d == "float32":
                tx = xla_f32
            else:
                xla(x, w, s).block_until_ready()
                tx = best_seconds(lambda: xla(x, w, s), args.min_seconds, args.repeats)
            r = {"kernel_gflop_s": flops / tk / 1e9, "kernel_weight_gb_s": w.nbytes / tk / 1e9,
                 "xla_gflop_s": flops / tx / 1e9, "xla_weight_gb_s": w.nbytes / tx / 1e9,
                 "kernel_over_xla_f32": xla_f32 / tk, "weight_bytes": int(w.nbytes)}
            if m <= kernels.SMALL_M:
                r["kernel_of_copy_bandwidth"] = r["kernel_weight_gb_s"] * 1e9 / bw
            rows[f"m{m}_{d}"] = r
            print(f"{m:>5} {d:>9} | {r['kernel_gflop_s']:>14.1f} {r['kernel_weight_gb_s']:>11.1f} | "
                  f"{r['xla_gflop_s']:>11.1f} {r['xla_weight_gb_s']:>8.1f} | {r['kernel_over_xla_f32']:.2f}x",
                  flush=True)
    load_after = os.getloadavg()
    print(f"load average after: {load_after[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
            "copy_gb_s": bw / 1e9, "k": args.k, "n": args.n,
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in load_after], "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
