"""CPU kernels registered through XLA FFI: `wmatmul`, the weight-streaming matmul behind `models.layers.matmul`;
`attention` and `write_rows`, a prefill's or decode step's attention over the KV cache and its write into it.

XLA's CPU backend converts a whole bfloat16 or int8 dot operand to float32 before the dot (a full-size temporary,
written at ~1 GB/s), and runs a one-row f32 matvec on one core. `wmatmul.cc` reads float32, bfloat16, float16 or
int8 weights (per-output-channel scale) where they lie, accumulates in float32 and splits columns over XLA's own
intra-op thread pool. On CPUs with AVX-512 VNNI, int8 weights in batch-1 decode steps (and an int8 table with long
rows as the tied LM head) are multiplied as integers (`vpdpbusd`), x scaled to 16 bits per 256-deep block of each
row; the error this adds is bounded in `tests/test_quant.py` and far below the weights' own int8 rounding.
`attention` runs the scores, the softmax and the values' product over a (B, Hkv, S, Dh) cache as stored in one
call per layer, and `write_rows` writes a step's new keys and values into the cache in place; both rotate their rows
by RoPE on the way when given cos and sin (q as it is loaded, k as it is written). `row_argmax` and
`log_softmax_at` are a greedy step's pick and its log-probability, vectorised passes over each row
(`inference.sampling`).

The library is compiled from source at first use (`g++ -O3 -march=native`, needs no other files than jaxlib's FFI
headers) into `$VLLAMA_JAX_CACHE_DIR/../kernels` (default `~/.cache/vllama_jax/kernels`), keyed by the source, the
compiler flags and the jaxlib version. Without a compiler, or with `VLLAMA_JAX_CPU_KERNELS=0`, the models use XLA's
dot instead (same results up to summation order) and the reason is logged once.

The kernel's helper threads (tasks on XLA's intra-op pool) poll for the next call's work for 200 us after their
own before going back to the pool (`VLLAMA_JAX_KERNEL_LINGER_US`; 0 returns at once): a decode step makes hundreds
of short calls, and a helper woken for each one joined it 20-55 us late on a 2-core VM.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("wmatmul.cc")
TARGET = "vllama_wmatmul"
MANY_TARGET = "vllama_wmatmul_many"
WRITE_TARGET = "vllama_write_rows"
ATTENTION_TARGET = "vllama_attention"
INT8_BF16_TARGET = "vllama_int8_as_bf16"
ARGMAX_TARGET = "vllama_row_argmax"
LOG_SOFTMAX_AT_TARGET = "vllama_log_softmax_at"
ENV_SWITCH = "VLLAMA_JAX_CPU_KERNELS"
KERNEL_DIR_ENV = "VLLAMA_JAX_KERNEL_DIR"
DEFAULT_KERNEL_DIR = Path("~/.cache/vllama_jax/kernels")
CXXFLAGS = ("-O3", "-march=native", "-std=c++17", "-fPIC", "-shared")
# Ranges of rows `pack_int8_into` packs at once (a copy: a few threads reach the memory bandwidth).
PACK_THREADS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
# Up to this many rows of x the kernel streams the weights once (decode); must match SMALL_M in wmatmul.cc.
SMALL_M = 16


def _kernel_dir() -> Path:
    return Path(os.environ.get(KERNEL_DIR_ENV) or DEFAULT_KERNEL_DIR).expanduser()


def compiler() -> str | None:
    """The C++ compiler the kernel library is built with: $CXX, else g++ or c++ on PATH (None: none found)."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _build() -> Path:
    """The compiled library, built once per (source, flags, jaxlib) into the kernel folder."""
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join(CXXFLAGS).encode() + jaxlib.__version__.encode()).hexdigest()[:16]
    out = _kernel_dir() / f"wmatmul-{key}.so"
    if out.exists():
        return out
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++ / c++ / $CXX) on PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build into a temporary name and rename: concurrent first uses never load a half-written library.
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        cmd = [cxx, *CXXFLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(tmp_out)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
        os.replace(tmp_out, out)
    return out


@lru_cache(maxsize=None)
def _library() -> ctypes.CDLL:
    return ctypes.cdll.LoadLibrary(str(_build()))


@lru_cache(maxsize=None)
def wmatmul_available() -> bool:
    """Whether the CPU kernel is built and registered (built on the first call); False, with the reason logged,
    when disabled or when it cannot be built."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "off", "false", "no"):
        log.info("CPU matmul kernel disabled by %s; using XLA's dot", ENV_SWITCH)
        return False
    try:
        lib = _library()
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.VllamaWMatmul), platform="cpu")
        jax.ffi.register_ffi_target(MANY_TARGET, jax.ffi.pycapsule(lib.VllamaWMatmulMany), platform="cpu")
        jax.ffi.register_ffi_target(WRITE_TARGET, jax.ffi.pycapsule(lib.VllamaWriteRows), platform="cpu")
        jax.ffi.register_ffi_target(ATTENTION_TARGET, jax.ffi.pycapsule(lib.VllamaAttention), platform="cpu")
        jax.ffi.register_ffi_target(INT8_BF16_TARGET, jax.ffi.pycapsule(lib.VllamaInt8AsBf16), platform="cpu")
        jax.ffi.register_ffi_target(ARGMAX_TARGET, jax.ffi.pycapsule(lib.VllamaRowArgmax), platform="cpu")
        jax.ffi.register_ffi_target(LOG_SOFTMAX_AT_TARGET, jax.ffi.pycapsule(lib.VllamaLogSoftmaxAt), platform="cpu")
    except (OSError, RuntimeError, AttributeError) as e:
        log.warning("CPU matmul kernel unavailable (%s); using XLA's dot (bf16/int8 weights get float32 copies "
                    "on CPU)", e)
        return False
    return True


def vector_lanes() -> int:
    """Float32 lanes of the built kernel's vectors (16 with AVX-512, 8 with AVX2 / NEON pairs); 0 when the kernel
    is unavailable."""
    if not wmatmul_available():
        return 0
    return int(_library().VllamaWMatmulLanes())


@lru_cache(maxsize=None)
def cpu_vendor() -> str:
    """The CPU's vendor as the built kernel sees it: "intel", "amd", or "" (another CPU, or no kernel)."""
    if not wmatmul_available():
        return ""
    return {1: "intel", 2: "amd"}.get(int(_library().VllamaCpuVendor()), "")


@lru_cache(maxsize=None)
def amx_bf16() -> bool:
    """Whether the CPU multiplies bfloat16 matrices in AMX tiles (as the built kernel sees it)."""
    return wmatmul_available() and bool(_library().VllamaCpuAmxBf16())


_FORCED: contextvars.ContextVar[bool | None] = contextvars.ContextVar("vllama_cpu_kernels", default=None)


@contextlib.contextmanager
def cpu_kernels(enabled: bool | None) -> Iterator[None]:
    """Within the block, programs *traced* use the CPU kernel (True), XLA's dot (False) or the default rule
    (None: the kernel in a one-device CPU process, where no partitioning is needed). Read at trace time: an
    already-compiled jitted function keeps the choice it was traced with."""
    token = _FORCED.set(enabled)
    try:
        yield
    finally:
        _FORCED.reset(token)


def use_cpu_kernels() -> bool:
    """Whether a matmul traced now goes through `wmatmul`: the CPU backend, the kernel built, and either forced by
    `cpu_kernels(True)` or a one-device process (a mesh keeps XLA's dot, whose partitioning XLA knows)."""
    forced = _FORCED.get()
    if forced is False or jax.default_backend() != "cpu":
        return False
    if forced is None and jax.device_count() != 1:
        return False
    return wmatmul_available()


@lru_cache(maxsize=None)
def packed_int8_available() -> bool:
    """Whether the built kernel multiplies int8 weights in the packed layout (`pack_int8`; AVX-512 VNNI builds)."""
    return wmatmul_available() and bool(_library().VllamaWMatmulPackedInt8())


def packable(w: jax.Array) -> bool:
    """Whether `w` is an int8 (K, N) matrix `pack_int8` takes: K % 4 == 0 and N % 64 == 0 (the packed kernel's
    64-column steps)."""
    return (w.ndim == 2 and jnp.dtype(w.dtype) == jnp.dtype(jnp.int8) and w.shape[0] % 4 == 0
            and w.shape[1] % 64 == 0)


def is_packed(w: jax.Array) -> bool:
    """Whether `w` is an int8 matrix in the packed layout (K/4, N, 4) (`pack_int8`)."""
    return getattr(w, "ndim", 0) == 3 and jnp.dtype(w.dtype) == jnp.dtype(jnp.int8) and w.shape[-1] == 4


def pack_int8(w: jax.Array) -> jax.Array:
    """int8 W (K, N) -> (K/4, N, 4): the 4 rows of K of each column side by side, the operand layout of VNNI's
    byte dot product, so that a decode step reads it with plain loads (`wmatmul.cc`: 1.15-1.25x the (K, N) layout's
    bandwidth). Same values; `unpack_int8` inverts it."""
    k, n = w.shape
    return w.reshape(k // 4, 4, n).transpose(0, 2, 1)


def pack_int8_into(w: np.ndarray, out: np.ndarray) -> np.ndarray:
    """`pack_int8(w)` written into `out` by the kernel library, a few ranges of rows at once: w int8 (K, N) and out
    int8 (K/4, N, 4), both C-contiguous (`out`: e.g. huge-page memory from `runtime.HostArena.empty`). One pass over
    each, where XLA's transposition fills a buffer of its own. Needs the built kernel (`wmatmul_available()`) and
    N % 16 == 0; returns `out`."""
    k, n = w.shape
    if (w.dtype != np.int8 or out.dtype != np.int8 or out.shape != (k // 4, n, 4) or k % 4 or n % 16
            or not (w.flags.c_contiguous and out.flags.c_contiguous and out.flags.writeable)):
        raise ValueError(f"pack_int8_into: int8 ({k}, {n}) -> writable (K/4, N, 4) C-contiguous int8 with "
                         f"K % 4 == 0 and N % 16 == 0, got {w.dtype} {w.shape} -> {out.dtype} {out.shape}")
    fn = _library().VllamaPackInt8
    fn.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64)
    fn.restype = None
    groups = k // 4
    parts = max(1, min(PACK_THREADS, groups))
    bounds = [groups * i // parts for i in range(parts + 1)]
    src, dst = w.ctypes.data, out.ctypes.data
    # ctypes releases the GIL during the call: the ranges run in parallel
    with ThreadPoolExecutor(parts) as pool:
        list(pool.map(lambda i: fn(src, dst, n, bounds[i], bounds[i + 1]), range(parts)))
    return out


def unpack_int8(w: jax.Array) -> jax.Array:
    """The (K, N) matrix a packed (K/4, N, 4) weight holds (`pack_int8`'s inverse; a full copy)."""
    k4, n, _ = w.shape
    return w.transpose(0, 2, 1).reshape(4 * k4, n)


def wmatmul(x: jax.Array, w: jax.Array, scale: jax.Array | None = None, *, nk: bool = False) -> jax.Array:
    """x (M, K) @ W -> float32 (M, N), W (K, N) (`nk=False`) or (N, K) (`nk=True`), float32 / bfloat16 / float16 /
    int8, times `scale` (N,) per output column when given. Packed int8: x (M, K) and W (K/4, N, 4) (`pack_int8`; where
    `packed_int8_available()`). CPU only; call `wmatmul_available()` first."""
    n = w.shape[1] if is_packed(w) else w.shape[0] if nk else w.shape[1]
    s = jnp.zeros((0,), jnp.float32) if scale is None else scale.astype(jnp.float32)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32), vmap_method="sequential")
    return call(x.astype(jnp.float32), w, s, nk=nk)


def wmatmul_many(x: jax.Array, weights: list[tuple[jax.Array, jax.Array | None]]) -> list[jax.Array]:
    """[x (M, K) @ W_i * scale_i] for several (K, N_i) weights (f32 / bf16 / f16 / int8, packed int8 where
    `packed_int8_available()`) in one call, as `wmatmul` computes each: a decode step's products by the same x
    (M <= `SMALL_M`) streamed back to back in one dispatch. CPU only; call `wmatmul_available()` first."""
    operands = []
    for w, scale in weights:
        operands += [w, jnp.zeros((0,), jnp.float32) if scale is None else scale.astype(jnp.float32)]
    shapes = [jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32) for w, _ in weights]
    call = jax.ffi.ffi_call(MANY_TARGET, shapes, vmap_method="sequential")
    return list(call(x.astype(jnp.float32), *operands))


def int8_as_bf16(w: jax.Array, after: jax.Array) -> jax.Array:
    """int8 W (K, N), or packed (K/4, N, 4) (`pack_int8`), as the bfloat16 (K, N) matrix it holds (exact), on the
    pool at memory speed: the operand of XLA's dot in AMX tiles for a bf16-compute prefill (`models.layers.matmul`).
    `after` (not read) orders the conversion after that array exists, so that a program converts one matrix at a
    time where its product needs it (without it XLA ran every conversion first, all of them alive at once). CPU
    only; call `wmatmul_available()` first."""
    k = 4 * w.shape[0] if is_packed(w) else w.shape[0]
    call = jax.ffi.ffi_call(INT8_BF16_TARGET, jax.ShapeDtypeStruct((k, w.shape[1]), jnp.bfloat16),
                            vmap_method="sequential")
    return call(w, after)


def row_argmax(x: jax.Array) -> jax.Array:
    """(B, V) -> (B,) int32: `jnp.argmax(x, axis=-1)` (the first largest value; a NaN counts as the largest) in one
    vectorised pass per row, rows over the pool (XLA's CPU argmax is a scalar variadic reduction: 0.65 ms over
    (8, 49152) logits). CPU only; call `wmatmul_available()` first."""
    call = jax.ffi.ffi_call(ARGMAX_TARGET, jax.ShapeDtypeStruct(x.shape[:1], jnp.int32), vmap_method="sequential")
    return call(x.astype(jnp.float32))


def log_softmax_at(x: jax.Array, index: jax.Array) -> jax.Array:
    """(B, V), (B,) -> (B,) float32: `jax.nn.log_softmax(x)[b, index[b]]` (the same formula, the sum of the
    exponentials in another order; NaN where a row holds a NaN), two passes per row and no (B, V) result. CPU only;
    call `wmatmul_available()` first."""
    call = jax.ffi.ffi_call(LOG_SOFTMAX_AT_TARGET, jax.ShapeDtypeStruct(x.shape[:1], jnp.float32),
                            vmap_method="sequential")
    return call(x.astype(jnp.float32), index.astype(jnp.int32))


def write_rows(buf: jax.Array, rows: jax.Array, index: jax.Array, axis: int, slots_first: bool = False,
               rope: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """buf with rows[b] written at slots index[b] .. index[b] + L - 1 of `axis` for every row b (buf (B, ..., S, ...),
    rows (B, ..., L, ...) with buf's other sizes and dtype, or with `slots_first` (B, L, ...) with the other sizes
    in buf's order; starts clamped as `lax.dynamic_update_slice` clamps them), in place: the result aliases buf, so
    a donated KV cache is never copied (`models.llama._write_rows`). rope: (cos, sin) float32 (B, L, Q), Q the size
    after the slot axis (slots first; a float cache): each row rotated on its way in (`models.layers.apply_rope`,
    cos and sin rounded to the cache's dtype first, the result rounded once). CPU only; call `wmatmul_available()`
    first. No derivative of its own."""
    call = jax.ffi.ffi_call(WRITE_TARGET, jax.ShapeDtypeStruct(buf.shape, buf.dtype), input_output_aliases={0: 0},
                            vmap_method="sequential")
    cos, sin = _rope_operands(rope, buf.dtype)
    return call(buf, rows.astype(buf.dtype), index.astype(jnp.int32), cos, sin, axis=int(axis),
                slots_first=bool(slots_first))


def _rope_operands(rope: tuple[jax.Array, jax.Array] | None, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """cos and sin as the kernels take them: rounded to the rotated rows' dtype (as `apply_rope` casts them), in
    float32; empty for no rotation."""
    if rope is None:
        return jnp.zeros((0, 0, 0), jnp.float32), jnp.zeros((0, 0, 0), jnp.float32)
    return tuple(jnp.asarray(t).astype(dtype).astype(jnp.float32) for t in rope)


def _rounding(dtype: Any) -> int:
    """The kernels' `Rounding` code of a dtype: 1 bfloat16, 2 float16, 0 none."""
    return {jnp.dtype(jnp.bfloat16): 1, jnp.dtype(jnp.float16): 2}.get(jnp.dtype(dtype), 0)


#: the largest head size `attention` takes (its rows of q live in registers; `ATTEND_MAX_D` in wmatmul.cc)
ATTENTION_MAX_HEAD_DIM = 256


def attention_fits(head_dim: int, cache_dtype: Any) -> bool:
    """Whether `attention` takes heads of `head_dim` over a cache of `cache_dtype` in this build: a multiple of the
    vector lanes up to `ATTENTION_MAX_HEAD_DIM`, a float32 / bfloat16 / float16 cache."""
    lanes = vector_lanes()
    return (lanes > 0 and head_dim % lanes == 0 and 0 < head_dim <= ATTENTION_MAX_HEAD_DIM
            and jnp.dtype(cache_dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None, scale: float,
              round_scores: Any = None, rope: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """softmax(q k^T * scale + bias) v over a KV cache in one call: q (B, Lq, H, Dh), k and v (B, Hkv, S, Dh) as the
    cache stores them (float32 / bfloat16 / float16; H a multiple of Hkv: grouped-query attention), bias float32
    broadcastable to (B, H, Lq, S) or None -> float32 (B, Lq, H, Dh). Scores and softmax in float32; the
    probabilities are rounded to v's dtype before the values' product (as `probs.astype(v.dtype)` does).
    round_scores: bfloat16 / float16 rounds the scores as upstream's half-precision matmul does (after the product,
    and again after the division by 1 / scale: `models.layers.dot_product_attention`'s `half_precision_scores`).
    rope: (cos, sin) float32 (B, Lq, Dh) rotates q's rows as they are loaded (`models.layers.apply_rope` in q's
    dtype: cos and sin rounded to it first, the result rounded once).
    Keys whose bias is float32's lowest (or -inf) are skipped at the ends of each row (their probability is 0 beside
    any allowed key). CPU only; call `wmatmul_available()` and `attention_fits` first. No derivative of its own."""
    lq, s = q.shape[1], k.shape[2]
    if bias is None:
        bias = jnp.zeros((0, 0, 0, 0), jnp.float32)
    else:
        bias = jnp.asarray(bias, jnp.float32)
        bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
        bias = jnp.broadcast_to(bias, (bias.shape[0], bias.shape[1], lq, s))  # (B|1, H|1, Lq, S)
    mode = 0 if round_scores is None else _rounding(round_scores)
    cos, sin = _rope_operands(rope, q.dtype)
    call = jax.ffi.ffi_call(ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential")
    return call(q.astype(jnp.float32), k, v, bias, cos, sin, scale=np.float32(scale), inv_scale=np.float32(1.0 / scale),
                round_scores=np.int64(mode), round_q=np.int64(_rounding(q.dtype)))


__all__ = ["ATTENTION_MAX_HEAD_DIM", "SMALL_M", "attention", "attention_fits", "cpu_kernels", "int8_as_bf16",
           "is_packed", "log_softmax_at", "pack_int8", "packable", "packed_int8_available", "row_argmax",
           "unpack_int8", "use_cpu_kernels", "vector_lanes", "wmatmul", "wmatmul_available", "wmatmul_many",
           "write_rows"]
