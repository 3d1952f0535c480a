"""A decode step's KV-cache traffic at LLaMA-2-7B's size: write one slot of each layer's K and V, attend over them.

    python bench/kv_write.py [--slots 704] [--dtype bfloat16] [--rounds 7] [--json PATH]

64 donated cache arrays (32 layers x K, V) of (1, 32, slots, 128); per step every array gets one new row at a
per-row index and is read once by one query row's attention over it (the array as both keys and values). Side by
side in one process, alternating: this project's write (`models.llama._write_rows`: a float cache through the
kernel's in-place `kernels.write_rows`) and attention (`models.layers.dot_product_attention` over the cache: one
`kernels.attention` call), against the plain JAX form (a vmapped dynamic-update-slice, XLA's attention) and against
the write this project used before (a dynamic-update-slice per row on the cache's bits as unsigned integers, which
XLA's CPU compiler turns into a loop over the whole cache) with today's attention. Prints ms per step and the
ratios, with the bytes the arrays hold (what one pass over them reads).
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
from vllama_jax.models import layers, llama  # noqa: E402


def plain_write(buf: jax.Array, new: jax.Array, index: jax.Array, axis: int) -> jax.Array:
    """What a straightforward JAX cache write looks like: a dynamic-update-slice per row, vmapped."""
    def one(b_buf, b_new, i):
        return jax.lax.dynamic_update_slice(b_buf, b_new.astype(b_buf.dtype),
                                            tuple(i if d == axis - 1 else 0 for d in range(b_buf.ndim)))
    return jax.vmap(one)(buf, new, index)


def bits_write(buf: jax.Array, new: jax.Array, index: jax.Array, axis: int) -> jax.Array:
    """The write through the cache's bits as unsigned integers of the same width, one dynamic-update-slice per row."""
    bits = {2: jnp.uint16, 4: jnp.uint32}[jnp.dtype(buf.dtype).itemsize]
    out = jax.lax.bitcast_convert_type(buf, bits)
    for b in range(buf.shape[0]):
        start = (b,) + tuple(index[b] if d == axis else 0 for d in range(1, buf.ndim))
        out = jax.lax.dynamic_update_slice(out, jax.lax.bitcast_convert_type(new[b:b + 1].astype(buf.dtype), bits),
                                           start)
    return jax.lax.bitcast_convert_type(out, buf.dtype)


def attend(q: jax.Array, cache: jax.Array) -> jax.Array:
    """One query row's attention over a cache (as keys and values); traced under `kernels.cpu_kernels(False)` it
    is XLA's."""
    return layers.dot_product_attention(q, cache, cache, None, kv_heads_first=True)


def step_fn(write, kernel: bool):
    def step(caches, q, new, index):
        out, acc = [], jnp.float32(0)
        for c in caches:
            c = write(c, new, index, 2)
            acc = acc + attend(q, c)[0, 0, 0, 0]
            out.append(c)
        return out, acc

    jitted = jax.jit(step, donate_argnums=(0,))

    def traced_with_kernel_choice(*args):
        with kernels.cpu_kernels(None if kernel else False):
            return jitted(*args)
    return traced_with_kernel_choice


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", type=int, default=704, help="cache slots (the real-size chat's: 704)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--arrays", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    if not kernels.use_cpu_kernels():
        raise SystemExit("bench/kv_write.py: needs the CPU kernel (one CPU device and a C++ compiler)")
    load0 = os.getloadavg()[0]
    dt, shape = jnp.dtype(a.dtype), (1, 32, a.slots, 128)
    variants = {"plain JAX (vmapped write, XLA's attention)": step_fn(plain_write, False),
                "write on the bits (before), this attention": step_fn(bits_write, True),
                "this project": step_fn(llama._write_rows, True)}
    q, new = jnp.ones((1, 1, 32, 128), jnp.float32), jnp.ones((1, 32, 1, 128), dt)
    state, times = {}, {k: [] for k in variants}
    for k, f in variants.items():
        state[k], acc = f([jnp.zeros(shape, dt) for _ in range(a.arrays)], q, new, jnp.array([0], jnp.int32))
        acc.block_until_ready()
    for r in range(a.rounds):
        for k, f in variants.items():
            t = time.perf_counter()
            for i in range(5):
                state[k], acc = f(state[k], q, new, jnp.array([1 + (5 * r + i) % (a.slots - 1)], jnp.int32))
            acc.block_until_ready()
            times[k].append((time.perf_counter() - t) / 5)
    mb = a.arrays * np.prod(shape) * dt.itemsize / 1e6
    ms = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
    base, bits, ours = (ms["plain JAX (vmapped write, XLA's attention)"],
                        ms["write on the bits (before), this attention"], ms["this project"])
    print(f"{a.arrays} {a.dtype} caches of {shape} ({mb:.0f} MB), one slot written and attended over per step; "
          f"load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after; median of {a.rounds} rounds x 5 steps")
    for k, v in ms.items():
        print(f"  {k}: {v:.1f} ms per step")
    print(f"  this project / plain: {base / ours:.2f}x faster; / the write on the bits: {bits / ours:.2f}x")
    if a.json:
        a.json.write_text(json.dumps({"slots": a.slots, "dtype": a.dtype, "cache_mb": mb, "ms_per_step": ms,
                                      "speedup": base / ours,
                                      "speedup_over_bits_write": bits / ours, "load_average": [load0, os.getloadavg()[0]]},
                                     indent=1) + "\n")


if __name__ == "__main__":
    main()
