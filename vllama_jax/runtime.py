"""Process-level JAX set-up shared by the library and every command: the persistent compilation cache,
simulated CPU devices, and the host allocator setting that keeps streamed weights' memory bounded. Defined once
here; `vllama_jax.cli.common` applies them from flags.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from pathlib import Path

import jax

CACHE_DIR_ENV = "VLLAMA_JAX_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/vllama_jax/jax")
_OFF = ("", "0", "off", "none", "false")
# glibc mallopt parameter M_MMAP_THRESHOLD, and the value fixed by `return_freed_buffers_to_os`
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 1 << 20
_allocator_set = False


def return_freed_buffers_to_os() -> None:
    """Make freed host buffers of 1 MiB and more go back to the OS at once (glibc only; elsewhere a no-op).

    glibc raises its mmap threshold to the size of every large buffer freed (up to 32 MiB); buffers below it then
    come from heap arenas, whose freed space stays in the resident set. Restoring or converting weights frees a
    stream of 1-32 MiB buffers (TensorStore chunks, read buffers) across many threads, so the resident set grew
    with the model instead of the in-flight bytes (a 450 MB restore: 0.62 GB above the start, 0.55 GB with this).
    Fixing the threshold at 1 MiB keeps such buffers mmapped, unmapped when freed. Process-wide, idempotent."""
    global _allocator_set
    if _allocator_set or not sys.platform.startswith("linux"):
        return
    _allocator_set = True
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): nothing to tune
        pass


def enable_compilation_cache(path: str | os.PathLike | None = None, min_compile_time_secs: float = 0.0
                             ) -> Path | None:
    """Turn on JAX's persistent compilation cache so compiled programs (encoders, prefill/decode, the train step)
    survive the process; a restarted run loads them instead of compiling again.

    path: the cache folder; default `$VLLAMA_JAX_CACHE_DIR`, else `~/.cache/vllama_jax/jax`. Setting the env var
    to "", "0" or "off" disables it (returns None). Entries are written for every compilation that takes at least
    `min_compile_time_secs` (default 0: all of them; JAX's own default of 1 s would skip most small programs).
    """
    if path is None:
        env = os.environ.get(CACHE_DIR_ENV)
        if env is not None and env.strip().lower() in _OFF:
            return None
        path = env or DEFAULT_CACHE_DIR
    folder = Path(path).expanduser().resolve()
    if jax.config.jax_compilation_cache_dir == str(folder):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no size floor
    try:  # JAX probes the cache once per process: re-probe if something compiled before it was configured
        from jax._src import compilation_cache  # private module, hence guarded

        compilation_cache.reset_cache()
    except (ImportError, AttributeError):
        pass
    return folder


def use_compilation_cache(setting: bool | str | os.PathLike | None) -> Path | None:
    """The `compilation_cache=` argument of the chat API, the generator and the trainer: True = the default cache
    unless a JAX cache folder is already configured; a path = that folder; False/None/"" = leave JAX alone."""
    if setting is True:
        current = jax.config.jax_compilation_cache_dir
        return Path(current) if current else enable_compilation_cache()
    if setting:
        return enable_compilation_cache(setting)
    return None


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """Measured FLOP/s of one device on an n x n float32 matmul, best of `repeats` (a stand-in peak for MFU where
    the hardware publishes none, e.g. a virtual CPU; benchmarks report against it)."""
    x = jax.numpy.ones((n, n), jax.numpy.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


def simulate_cpu_devices(n: int) -> None:
    """Run on `n` simulated CPU devices (dry runs of a pod mesh, sharding tests on one machine). Takes effect only
    before JAX starts its backend: the command line applies it before anything computes."""
    if n < 1:
        raise ValueError(f"the number of simulated devices must be >= 1, got {n}")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    os.environ["JAX_PLATFORMS"] = "cpu"
    jax.config.update("jax_platforms", "cpu")


__all__ = ["CACHE_DIR_ENV", "DEFAULT_CACHE_DIR", "enable_compilation_cache", "matmul_peak_flops", "simulate_cpu_devices",
           "use_compilation_cache"]
