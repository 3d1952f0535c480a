"""What placing CPU weights in huge pages (`runtime.HostArena`) buys: the same arrays in XLA's own buffers (4 KiB
pages) and in the arena (2 MiB pages), side by side in one process.

    python bench/huge_pages.py [--rounds 4] [--layers 24] [--no-decode] [--json PATH]

1. Memory: a jitted sum reading 512 MiB (the read a decode step does) on both kinds of pages, and for reference the
   donated `a + 1` over 512 MiB that `bench/generate.py`'s bandwidth bound uses (XLA's pages only: XLA writes its
   outputs into its own buffers, and a donated arena buffer is not reused), with the share of each array the kernel
   backs with huge pages.
2. A chain of `--layers` LLaMA-2-7B MLP-sized products (4096 x 11008, one row of x, the CPU kernel `kernels.wmatmul`)
   in bf16 and in int8: GB/s of weights streamed.
3. SmolLM2-135M decode at batch 1 (float32, bf16, int8) and batch 8 (float32): two engines on the same weights,
   one built with VLLAMA_JAX_HUGE_PAGES=0 (XLA's buffers, as before the arena) and one with the arena, timed in
   alternating rounds (`bench/generate.py`'s measure: `generate` with 33 vs 1 new tokens).

Prints the median of the rounds for each and the ratio, with the load average before and after (this shared
machine is noisy: the ratios are the figures that count) and the transparent-huge-page setting of the system.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate import bench_ours, best_of, find_smollm2  # noqa: E402
from vllama_jax import kernels  # noqa: E402
from vllama_jax.inference.generate import Generator  # noqa: E402
from vllama_jax.runtime import HUGE_PAGES_ENV, HostArena  # noqa: E402
from vllama_jax.weights.llama_keys import load_llama  # noqa: E402

MiB = 1 << 20


def _in_arena(x: np.ndarray) -> jax.Array:
    y = HostArena().place(x, jax.devices()[0])
    if y is None:
        raise SystemExit(f"the arena is off here ({HUGE_PAGES_ENV}={os.environ.get(HUGE_PAGES_ENV)!r} or not Linux)")
    return y


def huge_fraction(x: jax.Array) -> float:
    """The fraction of the mapping holding `x` that the kernel backs with huge pages (AnonHugePages / size in
    /proc/self/smaps): whether the advice took."""
    address, entry = x.unsafe_buffer_pointer(), None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(v, 16) for v in head.split("-"))
            entry = (start, end) if start <= address < end else None
        elif entry is not None and head == "AnonHugePages:":
            return int(line.split()[1]) * 1024 / (entry[1] - entry[0])
    return float("nan")


def memory(nbytes: int, repeats: int) -> dict[str, float]:
    """GB/s of a jitted read on XLA's pages and on the arena's; of a donated copy on XLA's."""
    host = np.full(nbytes // 4, 0.5, np.float32)
    total = jax.jit(jnp.sum)
    step = jax.jit(lambda a: a + 1.0, donate_argnums=0)
    out = {}
    for kind, make in (("xla", lambda: jnp.asarray(host)), ("arena", lambda: _in_arena(host))):
        x = make()
        out[f"read_{kind}_gb_s"] = nbytes / best_of(lambda: total(x).block_until_ready(), repeats) / 1e9
        out[f"huge_fraction_{kind}"] = huge_fraction(x)
    box = [jnp.asarray(host)]

    def copy() -> None:
        box[0] = step(box[0])  # the output reuses the donated input's buffer
        box[0].block_until_ready()

    out["copy_xla_gb_s"] = 2 * nbytes / best_of(copy, repeats) / 1e9
    return out


def chain(layers: int, repeats: int) -> dict[str, float]:
    """GB/s of `layers` (4096, 11008) weights streamed by one row of x, bf16 and int8, both kinds of pages."""
    k, n = 4096, 11008
    base = np.random.default_rng(0).standard_normal((k, n), np.float32) * 0.02
    scale = jnp.full((n,), 1.0 / 3000, jnp.float32)
    x = jnp.ones((1, k), jnp.float32)
    out = {}
    for dtype in ("bfloat16", "int8"):
        w = (base * 3000).astype(np.int8) if dtype == "int8" else base.astype(ml_dtypes.bfloat16)
        s = scale if dtype == "int8" else None
        f = jax.jit(lambda x, ws, s=s: sum(kernels.wmatmul(x, w, s) for w in ws))
        for kind, make in (("xla", jnp.asarray), ("arena", _in_arena)):
            ws = [make(w) for _ in range(layers)]
            seconds = best_of(lambda ws=ws: f(x, ws).block_until_ready(), repeats)
            out[f"{dtype}_{kind}_gb_s"] = layers * w.nbytes / seconds / 1e9
            ws.clear()  # one set of weights alive at a time
    return out


def decode(rounds: int) -> dict[str, dict[str, float]]:
    """SmolLM2-135M decode tok/s, engines without and with the arena, in alternating rounds (medians)."""
    cfg, params = load_llama(find_smollm2())
    bf16 = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16) if np.ndim(x) == 2 else x, params)
    cases = {"float32 batch 1": (params, None, 1), "bf16 batch 1": (bf16, None, 1),
             "int8 batch 1": (params, "int8", 1), "float32 batch 8": (params, None, 8)}
    out = {}
    for name, (p, quantize, batch) in cases.items():
        engines = {}
        for kind, switch in (("xla", "0"), ("arena", "1")):
            os.environ[HUGE_PAGES_ENV] = switch
            engines[kind] = Generator(cfg, p, quantize=quantize, compilation_cache=False)
        os.environ[HUGE_PAGES_ENV] = "1"
        ids = np.random.default_rng(batch).integers(100, 20000, size=(batch, 128))
        tok_s: dict[str, list[float]] = {"xla": [], "arena": []}
        for r in range(rounds):
            for kind in ("xla", "arena") if r % 2 == 0 else ("arena", "xla"):
                tok_s[kind].append(bench_ours(engines[kind], ids, 32, 2)[1])
        out[name] = {f"{kind}_tok_s": float(np.median(v)) for kind, v in tok_s.items()}
        out[name]["rounds_xla"], out[name]["rounds_arena"] = tok_s["xla"], tok_s["arena"]
        del engines
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4, help="alternating decode rounds per case")
    ap.add_argument("--repeats", type=int, default=5, help="repeats of each memory / chain timing (best kept)")
    ap.add_argument("--layers", type=int, default=24, help="weights in the 7B-sized chain (90 MB each in bf16)")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    if not HostArena.enabled():
        raise SystemExit(f"the arena is off here ({HUGE_PAGES_ENV}=0 or not Linux): nothing to compare")
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    setting = thp.read_text().strip() if thp.exists() else "n/a"
    kernels.wmatmul_available()
    load0 = os.getloadavg()[0]
    res: dict[str, Any] = {"transparent_hugepage": setting, "memory": memory(512 * MiB, a.repeats),
                           "chain_7b": chain(a.layers, a.repeats)}
    if not a.no_decode:
        res["decode"] = decode(a.rounds)
    load1 = os.getloadavg()[0]
    res["load_average"] = [load0, load1]

    m, c = res["memory"], res["chain_7b"]
    print(f"# bench/huge_pages.py  transparent_hugepage: {setting}")
    print(f"512 MiB read:  XLA's pages {m['read_xla_gb_s']:.1f} GB/s, arena {m['read_arena_gb_s']:.1f} GB/s "
          f"({m['read_arena_gb_s'] / m['read_xla_gb_s']:.2f}x; in huge pages: XLA's {m['huge_fraction_xla']:.0%}, "
          f"the arena's {m['huge_fraction_arena']:.0%})")
    print(f"512 MiB copy (read + write, the bound of bench/generate.py): {m['copy_xla_gb_s']:.1f} GB/s")
    for dtype in ("bfloat16", "int8"):
        xla, arena = c[f"{dtype}_xla_gb_s"], c[f"{dtype}_arena_gb_s"]
        print(f"{a.layers} x (4096, 11008) {dtype} weights, one row: XLA's pages {xla:.1f} GB/s, arena {arena:.1f} "
              f"GB/s ({arena / xla:.2f}x)")
    for name, d in res.get("decode", {}).items():
        print(f"SmolLM2-135M {name} decode: XLA's pages {d['xla_tok_s']:.1f} tok/s, arena {d['arena_tok_s']:.1f} "
              f"tok/s ({d['arena_tok_s'] / d['xla_tok_s']:.2f}x; medians of {a.rounds} alternating rounds)")
    print(f"load average {load0:.1f} before, {load1:.1f} after")
    if a.json:
        a.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
