"""Process-level JAX set-up shared by the library and every command: the persistent compilation cache,
simulated CPU devices, the host allocator setting that keeps streamed weights' memory bounded, and the huge-page
host memory that CPU weights are placed in. Defined once here; `vllama_jax.cli.common` applies them from flags.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

CACHE_DIR_ENV = "VLLAMA_JAX_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/vllama_jax/jax")
_OFF = ("", "0", "off", "none", "false")
# glibc mallopt parameter M_MMAP_THRESHOLD, and the value fixed by `return_freed_buffers_to_os`
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 1 << 20
_allocator_set = False
HUGE_PAGES_ENV = "VLLAMA_JAX_HUGE_PAGES"
HUGE_PAGE_BYTES = 2 << 20
_MADV_HUGEPAGE = 14  # linux/mman.h


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


class HostArena:
    """Host memory for the CPU arrays of one placement (a model's weights), carved from mappings aligned to 2 MiB
    and advised for transparent huge pages (`madvise(MADV_HUGEPAGE)`; Linux).

    Why: a decode step streams every weight once. XLA's own buffers come from malloc in 4 KiB pages, one TLB entry
    (in a virtual machine, a two-level page walk) per 4 KiB read; with 2 MiB pages the same stream runs faster (this
    project's 2-core KVM host: a chain of LLaMA-7B-sized bf16 products 1.07-1.12x, the 7B chat's decode +6%,
    little or nothing on SmolLM2's small matrices; README "Weights in huge pages"). Arrays of at least `min_bytes`
    are packed back to back (64-byte aligned) into chunks of `chunk_bytes`, so small matrices share huge pages too;
    an array of half a chunk or more gets a mapping of its own whose tail past the last whole huge page stays in
    4 KiB pages (no page is faulted in beyond the array). `jax.device_put` of such an aligned numpy array on a CPU
    device aliases it instead of copying, and each mapping lives as long as the last array in it.

    `enabled()` is False off Linux or with VLLAMA_JAX_HUGE_PAGES=0; then `place` returns None and callers place as
    before. With the system's transparent huge pages set to "never" the advice is ignored: plain aligned memory."""

    def __init__(self, chunk_bytes: int = 64 << 20, min_bytes: int = 64 << 10):
        self.chunk_bytes, self.min_bytes = int(chunk_bytes), int(min_bytes)
        self._chunk: np.ndarray | None = None
        self._used = 0
        self._lock = threading.Lock()  # `move` may run in several threads

    @staticmethod
    def enabled() -> bool:
        return sys.platform.startswith("linux") and os.environ.get(HUGE_PAGES_ENV, "1").strip().lower() not in _OFF

    def _map(self, nbytes: int, advise_all: bool) -> np.ndarray:
        """A fresh private anonymous mapping of at least `nbytes`, as a uint8 array starting on a 2 MiB boundary."""
        m = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        whole = np.frombuffer(m, np.uint8)
        start = -whole.ctypes.data % HUGE_PAGE_BYTES
        view = whole[start:start + nbytes]
        advised = nbytes if advise_all else nbytes - nbytes % HUGE_PAGE_BYTES
        if advised:
            _madvise(view.ctypes.data, advised, _MADV_HUGEPAGE)
        return view

    def empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """An uninitialized C-contiguous array in the arena."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if 2 * nbytes >= self.chunk_bytes:
            raw = self._map(nbytes, advise_all=False)
        else:
            with self._lock:
                if self._chunk is None or self._used + nbytes > self._chunk.size:
                    self._chunk, self._used = self._map(self.chunk_bytes, advise_all=True), 0
                raw = self._chunk[self._used:self._used + nbytes]
                self._used += -(-nbytes // 64) * 64
        return raw.view(dtype).reshape(shape)

    def build(self, shape: tuple[int, ...], dtype: Any, device: Any, write: Callable[[np.ndarray], Any]
              ) -> jax.Array | None:
        """An array of `shape` and `dtype` that `write(out)` fills in the arena, given to `device` (a CPU device)
        without a copy; None where the arena is not used (disabled, not a CPU device, under `min_bytes`): the caller
        then makes it as before."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if not (self.enabled() and getattr(device, "platform", None) == "cpu" and nbytes >= self.min_bytes):
            return None
        host = self.empty(shape, dtype)
        write(host)
        return jax.device_put(host, device)

    def place(self, x: np.ndarray, device: Any) -> jax.Array | None:
        """`x` copied into the arena and given to `device` without a further copy (`build`'s None where not used)."""
        return self.build(x.shape, x.dtype, device, lambda out: np.copyto(out, x, casting="no"))

    def move(self, x: jax.Array) -> jax.Array:
        """`x` (an array its caller owns and gives up) with every CPU shard copied into the arena, then deleted: one
        array's extra memory at a time. Returned as it is where the arena is not used (`place`)."""
        pieces = []
        for shard in x.addressable_shards:
            moved = self.place(np.asarray(shard.data), shard.device)
            if moved is None:
                return x
            pieces.append(moved)
        out = jax.make_array_from_single_device_arrays(x.shape, x.sharding, pieces)
        x.delete()
        return out


def _madvise(address: int, nbytes: int, advice: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        libc.madvise(address, nbytes, advice)  # advice only: a kernel without THP leaves 4 KiB pages
    except (OSError, AttributeError):
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


__all__ = ["CACHE_DIR_ENV", "DEFAULT_CACHE_DIR", "HUGE_PAGES_ENV", "HUGE_PAGE_BYTES", "HostArena",
           "enable_compilation_cache", "matmul_peak_flops", "simulate_cpu_devices", "use_compilation_cache"]
