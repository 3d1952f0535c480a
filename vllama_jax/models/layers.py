"""Layers shared by every tower: **the** matmul of every weight (`matmul`: float32, bf16/fp16 and int8 + scale),
dense/embedding/norm with logical axes, attention, activations.

Every parameter is created through `nn.with_logical_partitioning`, so `jax.eval_shape(model.init, ...)` yields the
logical axis names that `vllama_jax.sharding` maps onto the mesh. Parameter names follow the upstream module
names (`query`, `key`, `value`, `fc1`, ...) so a user can find a checkpoint key in the params tree.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from .. import kernels

Dtype = Any
Initializer = Callable[..., jax.Array]



def gelu(x: jax.Array) -> jax.Array:
    """The exact erf GELU of upstream's BERT/ViT/ImageBind (not the tanh approximation), evaluated in float32 and
    rounded once to x's dtype, as torch's fp16/bf16 kernel (XLA would round each of its parts)."""
    return jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(x.dtype)


def round_to(x: jax.Array, dtype: Dtype) -> jax.Array:
    """x (any float dtype, kept) rounded to the precision of `dtype`, as a PyTorch tensor of that dtype stores it.
    `lax.reduce_precision`, not an astype round trip, which XLA may drop as excess precision inside a fusion."""
    fmt = jnp.finfo(dtype)
    return jax.lax.reduce_precision(x, exponent_bits=fmt.nexp, mantissa_bits=fmt.nmant)


DTYPES: dict[str, Dtype] = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
    "float64": jnp.float64,
}


def as_dtype(name: str | Dtype) -> Dtype:
    if isinstance(name, str):
        return DTYPES[name]
    return name


def normal_init(stddev: float = 0.02) -> Initializer:
    return nn.initializers.normal(stddev)


#: the leading logical axis of scanned (stacked) layer parameters (`Llama.scan_layers`, `EvaViT.scan_layers`)
LAYERS_AXIS = "layers"


def with_axes(init: Initializer, axes: tuple[str | None, ...]) -> Initializer:
    return nn.with_logical_partitioning(init, axes)


# Names of the per-output-channel float32 scales that sit beside int8 weights (written by `models.quant`): a
# `kernel` (in, out) int8 has `kernel_scale` (out,), an `embedding` (vocab, d) int8 has `embedding_scale` (vocab,).
KERNEL_SCALE = "kernel_scale"
EMBEDDING_SCALE = "embedding_scale"
LOW_PRECISION_FLOATS = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


#: row counts at which float32 weights go through the FFI kernel too, by the kernel's vector width
#: (`kernels.vector_lanes`); XLA's dot elsewhere. SmolLM2-135M's 30 layers' projections alone (ms, XLA's dot vs the
#: kernel). AVX2 (8 lanes, 2-core EPYC): 1 row 29 vs 46, 4 rows 96 vs 53, 8 rows 104 vs 63, 32 rows 158 vs 106,
#: 128 rows 296 vs 325; a whole batched decode step (two runs each): 4 rows 82-84 vs 120-126, 16 rows 230-235 vs
#: 221-222, 32 rows 307-364 vs 282-307. AVX-512 (16 lanes, 2-core EPYC, 2026-12-05), every matmul of a decode step
#: incl. the LM head: 2 rows 16.5 vs 14.9, 4 rows 17.9 vs 18.2, 8 rows 19.8 vs 23.3; `bench/generate.py` decode at
#: batch 8: 298 tok/s with XLA's dot, 229 with the kernel (batch 4: 169 vs 176). One row on AVX-512, 2026-12-06
#: (after the kernel's 8-row passes with L2 prefetch): SmolLM2's batch-1 decode, both engines in one process, 6
#: rounds alternating, twice: median 59.9 vs 56.2 and 56.2 vs 52.3 tok/s (kernel vs XLA). So: XLA's one-row matvec
#: and the kernel at 2-8 rows on AVX2, the kernel at 1-4 rows on AVX-512, XLA's dot above. On a 2-core Intel Xeon
#: (AVX-512 and AMX, 2026-12-06), the same jaxlib ran each few-row dot (a YNNPACK fusion) on one thread, two at most
#: at a time: whole decode, one process each, twice: batch 8 130 / 129 tok/s with XLA's dot, 183 / 179 with the
#: kernel; batch 16 220 vs 250. So the vector width's rule, or a rule for (width, vendor) where one was measured.
#: There, 2026-12-07, after the kernel's prefill products moved to converted slivers (`wmatmul.cc` `gemm`), the
#: kernel at every row count (GFLOP/s, XLA's dot vs the kernel, one process each): 24 x 576 x 1536 145 vs 193,
#: 64 x 4096 x 4096 198 vs 235, 128 x 4096 x 11008 215 vs 254, 1024 x 576 x 576 295 vs 370, 1024 x 1536 x 576
#: 278 vs 354, 257 x 1408 x 6144 287-322 vs 310-328, 2056 x 1408 x 1408 300-314 vs 310-324; SmolLM2-135M's prefill,
#: both programs in one process, 7 rounds alternating: batch 1 (128 rows) 964 vs 1087 tok/s, batch 8 (1024 rows)
#: 1201 vs 1240. `hi` None: no upper bound.
F32_KERNEL_ROWS = {8: (2, 8), 16: (1, 4), (16, "intel"): (1, None)}


#: from this many rows on, bf16 weights computed in bf16 take XLA's dot on a CPU with AMX-BF16
#: (`kernels.amx_bf16`): its YNNPACK dot multiplies bf16 by bf16 in the tiles, accumulating in float32, with no
#: float32 copy of the weight (0.5 MB of temporaries for a 128-row product with a 4096 x 11008 weight). LLaMA-7B's
#: MLP shape, 2-core Intel Xeon, 2026-12-06 (GFLOP/s, XLA vs the kernel): 16 rows 107 vs 146, 24 147 vs 149,
#: 32 185 vs 158, 64 332 vs 192, 128 442 vs 230, 512 862 vs 257. Elsewhere bf16 stays on the kernel (XLA's CPU dot
#: converted the whole weight to float32 first: a 26 GB temporary for LLaMA-2-7B).
BF16_XLA_MIN_ROWS = 32


#: from this many rows on, int8 weights of a bf16-compute model take XLA's dot in AMX tiles as well (on such a CPU),
#: each matrix converted to bf16 just before its product (`kernels.int8_as_bf16`: exact, at memory speed, one
#: converted matrix alive at a time), the per-channel scale applied after. Eight LLaMA-7B 4096 x 4096 int8
#: projections in a chain, 2-core Intel Xeon, 2026-12-07 (GFLOP/s, converted + XLA's dot vs the kernel): 32 rows
#: 144-164 vs 186, 64 310 vs 211-219, 128 517-551 vs 230-236, 300 606-618 vs 248-259 (temporaries 38 MB at 300).
INT8_AMX_MIN_ROWS = 64


def _use_cpu_kernel(weight_dtype: Any, rows: int, dtype: Any) -> bool:
    """The FFI kernel where `kernels.use_cpu_kernels()` allows it (CPU, one device by default): for bf16/fp16/int8
    weights at any row count (XLA would convert the whole operand first; the kernel's converted slivers serve
    prefill, its streaming path decode) but bf16 products of `BF16_XLA_MIN_ROWS` rows or more on AMX, and for
    float32 weights computed in float32 at the row counts `F32_KERNEL_ROWS` gives for the kernel's vector width and
    the CPU's vendor."""
    wdt = jnp.dtype(weight_dtype)
    if wdt == jnp.dtype(jnp.float32):
        if jnp.dtype(dtype) != wdt or not kernels.use_cpu_kernels():
            return False
        lanes = kernels.vector_lanes()
        lo, hi = F32_KERNEL_ROWS.get((lanes, kernels.cpu_vendor())) or F32_KERNEL_ROWS.get(lanes, (2, 8))
        return lo <= rows and (hi is None or rows <= hi)
    if wdt not in LOW_PRECISION_FLOATS and wdt != jnp.dtype(jnp.int8):
        return False
    if (wdt == jnp.dtype(jnp.bfloat16) and jnp.dtype(dtype) == wdt and rows >= BF16_XLA_MIN_ROWS
            and kernels.amx_bf16()):
        return False
    return kernels.use_cpu_kernels()


def dequantize(w: jax.Array, scale: jax.Array | None, transposed: bool = False) -> jax.Array:
    """The float32 weight a (possibly int8 + scale) kernel stands for. Materialises it: for gradients and tests,
    never on the forward path. A packed int8 kernel (`kernels.pack_int8`) gives its (K, N) matrix."""
    w = (kernels.unpack_int8(w) if kernels.is_packed(w) else w).astype(jnp.float32)
    if scale is None:
        return w
    return w * (scale[:, None] if transposed else scale[None, :])


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _kernel_matmul(x: jax.Array, w: jax.Array, scale: jax.Array | None, transposed: bool) -> jax.Array:
    return kernels.wmatmul(x, w, scale, nk=transposed)


def _kernel_matmul_fwd(x, w, scale, transposed):
    return _kernel_matmul(x, w, scale, transposed), (x, w, scale)


def _kernel_matmul_bwd(transposed, res, g):
    # The FFI call has no derivative of its own; the backward pass (training) uses XLA.
    x, w, scale = res
    wf = dequantize(w, scale, transposed)
    dx = g @ (wf if transposed else wf.T)
    if jnp.issubdtype(w.dtype, jnp.integer):
        dw = np.zeros(w.shape, jax.dtypes.float0)
    else:
        raw = g.T @ x if transposed else x.T @ g
        dw = (raw * (scale[:, None] if transposed else scale[None, :]) if scale is not None else raw).astype(w.dtype)
    ds = None if scale is None else jnp.sum(g * (x @ (dequantize(w, None).T if transposed
                                                       else dequantize(w, None))), axis=0)
    return dx.astype(x.dtype), dw, ds


_kernel_matmul.defvjp(_kernel_matmul_fwd, _kernel_matmul_bwd)


def matmul(x: jax.Array, kernel: jax.Array, scale: jax.Array | None = None, *, transposed: bool = False,
           dtype: Dtype = jnp.float32) -> jax.Array:
    """**The** matmul of every weight: x (..., K) @ kernel -> (..., N) in `dtype`.

    kernel: (K, N), or (N, K) with `transposed` (an embedding table as the tied LM head); float32, bfloat16,
    float16, or int8 with `scale` (N,) per output channel, also in the CPU kernel's packed layout (K/4, N, 4)
    (`kernels.pack_int8`, `models.quant.kernel_layout`). Low-precision weights are never converted whole: on a
    one-device CPU program the FFI kernel (`vllama_jax.kernels`) reads them as stored; elsewhere XLA's dot takes
    them as they are and accumulates in float32 (`preferred_element_type`; int8 is converted inside the dot's
    fusion on accelerators). On a CPU with AMX-BF16, a bf16-compute product of many rows takes XLA's dot in the
    tiles: bf16 weights as they are (`BF16_XLA_MIN_ROWS`), int8 ones converted one matrix at a time
    (`INT8_AMX_MIN_ROWS`). Float32 weights with a lower compute dtype are cast to it first, as `nn.Dense` does.
    """
    k = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    rows = x2.shape[0]
    wdt = jnp.dtype(kernel.dtype)
    use_kernel = _use_cpu_kernel(wdt, rows, dtype)
    if kernels.is_packed(kernel) and not (use_kernel and kernels.packed_int8_available()):
        kernel = kernels.unpack_int8(kernel)  # traced where the kernel is off (a full int8 copy)
    if (jnp.issubdtype(wdt, jnp.integer) and jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16)
            and rows >= INT8_AMX_MIN_ROWS and use_kernel and kernels.amx_bf16()):
        # ordered after x exists (stop_gradient: the conversion has no derivative, and needs none)
        w16 = kernels.int8_as_bf16(kernel, jax.lax.stop_gradient(x2))
        dims = (((1,), (1 if transposed else 0,)), ((), ()))  # a packed kernel is a (K, N) matrix
        y = jax.lax.dot_general(x2.astype(jnp.bfloat16), w16, dims, preferred_element_type=jnp.float32)
        if scale is not None:
            y = y * scale.astype(jnp.float32)
    elif use_kernel:
        y = _kernel_matmul(x2.astype(jnp.float32), kernel, scale, transposed)
    else:
        if wdt in LOW_PRECISION_FLOATS:
            xc, w = x2.astype(wdt), kernel
        elif jnp.issubdtype(wdt, jnp.integer):
            w = kernel.astype(dtype)
            xc = x2.astype(dtype)
        else:
            xc, w = x2.astype(dtype), kernel.astype(dtype)
        pad = 0
        if rows == 1 and wdt in LOW_PRECISION_FLOATS and jax.default_backend() == "cpu":
            # XLA CPU runs a one-row bf16/fp16 dot by converting the weight to float32 (a full copy); two rows
            # take its native path.
            pad = 1
            xc = jnp.pad(xc, ((0, 1), (0, 0)))
        dims = (((1,), (1 if transposed else 0,)), ((), ()))
        y = jax.lax.dot_general(xc, w, dims, preferred_element_type=jnp.float32)
        if pad:
            y = y[:rows]
        if scale is not None:
            y = y * scale.astype(jnp.float32)
    return y.reshape(*lead, y.shape[-1]).astype(dtype)


@jax.custom_vjp
def _kernel_matmuls(x: jax.Array, weights: tuple[tuple[jax.Array, jax.Array | None], ...]) -> tuple[jax.Array, ...]:
    return tuple(kernels.wmatmul_many(x, list(weights)))


def _kernel_matmuls_fwd(x, weights):
    return _kernel_matmuls(x, weights), (x, weights)


def _kernel_matmuls_bwd(res, gs):
    # each product's backward pass as `_kernel_matmul`'s, x's cotangents summed
    x, weights = res
    parts = [_kernel_matmul_bwd(False, (x, w, scale), g) for (w, scale), g in zip(weights, gs)]
    return sum(dx for dx, _, _ in parts), tuple((dw, ds) for _, dw, ds in parts)


_kernel_matmuls.defvjp(_kernel_matmuls_fwd, _kernel_matmuls_bwd)


def matmuls(x: jax.Array, weights: list[tuple[jax.Array, jax.Array | None]], *, dtype: Dtype = jnp.float32
            ) -> list[jax.Array]:
    """`matmul` of the same x by several (K, N_i) weights (kernel, scale), as it computes each. Where every product
    is a decode step's streamed one (a one-device CPU, at most `kernels.SMALL_M` rows, weights the kernel takes),
    they are one kernel call (`kernels.wmatmul_many`): the threads stream q, k and v (or gate and up) back to back
    instead of meeting after each (SmolLM2-135M's decode step at batch 8, A/B in one process: 213.6 -> 223.5 tok/s;
    batch 1 within noise)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    rows = x2.shape[0]
    if not (len(weights) > 1 and rows <= kernels.SMALL_M
            and all(_use_cpu_kernel(w.dtype, rows, dtype) for w, _ in weights)
            and all(kernels.packed_int8_available() or not kernels.is_packed(w) for w, _ in weights)):
        return [matmul(x, w, scale, dtype=dtype) for w, scale in weights]
    ys = _kernel_matmuls(x2.astype(jnp.float32), tuple(weights))
    return [y.reshape(*x.shape[:-1], y.shape[-1]).astype(dtype) for y in ys]


class Dense(nn.Module):
    """A linear layer over `matmul`: params `kernel` (in, out) (+ `kernel_scale` (out,) when int8, see
    `models.quant`) and `bias` (out,), with logical axes `axes` (the scale takes the output axis)."""

    features: int
    axes: tuple[str | None, str | None]
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = normal_init(0.02)

    @nn.compact
    def weights(self, in_features: int) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
        """(kernel, its int8 scale or None, bias or None), created at init: for a product taken with others of the
        same x (`matmuls`)."""
        kernel = self.get_variable("params", "kernel")
        if kernel is None or not kernels.is_packed(kernel):  # flax's shape check knows only the (in, out) layout
            kernel = self.param("kernel", with_axes(self.kernel_init, self.axes), (in_features, self.features),
                                self.param_dtype)
        scale = self.get_variable("params", KERNEL_SCALE)
        bias = None
        if self.use_bias:
            bias = self.param("bias", with_axes(nn.initializers.zeros, (self.axes[1],)), (self.features,),
                              self.param_dtype)
        return kernel, scale, bias

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, scale, bias = self.weights(x.shape[-1])
        # computed in self.dtype (a float32 kernel under a bf16 compute dtype is cast, as nn.Dense does)
        y = matmul(x, kernel, scale, dtype=self.dtype)
        if bias is not None:  # in the compute dtype, as nn.Dense adds it
            y = y.astype(self.dtype) + bias.astype(self.dtype)
        return y


class Embed(nn.Module):
    """A token table `embedding` (num, features) (+ `embedding_scale` (num,) when int8) with logical axes
    ("vocab", "embed"): lookup, and `attend` (the tied LM head: x @ table.T through `matmul`)."""

    num_embeddings: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    embedding_init: Initializer = normal_init(0.02)

    def setup(self) -> None:
        self.embedding = self.param("embedding", with_axes(self.embedding_init, ("vocab", "embed")),
                                    (self.num_embeddings, self.features), self.param_dtype)
        self.scale = self.get_variable("params", EMBEDDING_SCALE)

    def __call__(self, ids: jax.Array) -> jax.Array:
        rows = jnp.take(self.embedding, ids, axis=0)
        if self.scale is not None:
            rows = rows.astype(jnp.float32) * jnp.take(self.scale, ids, axis=0)[..., None]
        return rows.astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        return matmul(x, self.embedding, self.scale, transposed=True, dtype=self.dtype)


def dense(features: int, axes: tuple[str | None, str | None], name: str | None = None, *, use_bias: bool = True,
          dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
          kernel_init: Initializer = normal_init(0.02)) -> Dense:
    """`Dense` (params `kernel` (in, out) and `bias` (out,) under `name`) with logical axes.

    Matmul precision follows `jax_default_matmul_precision` (set it to "highest" on GPU/TPU for fp32 parity).
    """
    return Dense(features, axes, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init,
                 name=name)


class ConfiguredModule(nn.Module):
    """The fields of every module built from a config section: ``config`` (a ``ViTConfig``, ``QFormerConfig``,
    ``ImageBind*Config`` or ``LlamaConfig``), the compute dtype and the parameter dtype."""

    config: Any
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 (as upstream's fp16-safe LayerNorm), returned in the input dtype."""

    epsilon: float = 1e-6
    param_dtype: Dtype = jnp.float32
    out_dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", with_axes(nn.initializers.ones, ("norm",)), (d,), self.param_dtype)
        bias = self.param("bias", with_axes(nn.initializers.zeros, ("norm",)), (d,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.out_dtype or x.dtype)


class RMSNorm(nn.Module):
    """LLaMA RMSNorm: variance in float32, cast to the weight dtype, times the weight (HF semantics)."""

    epsilon: float = 1e-6
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        weight = self.param("scale", with_axes(nn.initializers.ones, ("norm",)), (d,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return weight * y.astype(weight.dtype)


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """(B, L, H*Dh) -> (B, L, H, Dh); head h owns features [h*Dh, (h+1)*Dh) as in every upstream model."""
    b, l, d = x.shape
    return x.reshape(b, l, num_heads, d // num_heads)


def merge_heads(x: jax.Array) -> jax.Array:
    b, l, h, d = x.shape
    return x.reshape(b, l, h * d)


#: RoPE's (cos, sin), each float32 (B, L, Dh) (`models.llama.rope_cos_sin`)
Rope = tuple[jax.Array, jax.Array]


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """RoPE in HF's rotate-half convention: x (B, L, H, Dh); cos/sin (B, L, Dh) cast to x's dtype first (as HF
    does)."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + _rotate_half(x) * sin


@partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _kernel_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None, rope: Rope | None,
                      scale: float, rounding: Any) -> jax.Array:
    return kernels.attention(q, k, v, bias, scale, rounding, rope)


def _kernel_attention_fwd(q, k, v, bias, rope, scale, rounding):
    return _kernel_attention(q, k, v, bias, rope, scale, rounding), (q, k, v, bias, rope)


def _kernel_attention_bwd(scale, rounding, res, g):
    # The FFI call has no derivative of its own; the backward pass (a training loss over a cached prompt prefix)
    # differentiates the same attention as XLA computes it.
    with kernels.cpu_kernels(False):
        _, vjp = jax.vjp(lambda *a: dot_product_attention(*a[:4], rope=a[4], scale=scale,
                                                          half_precision_scores=rounding is not None,
                                                          kv_heads_first=True).astype(jnp.float32), *res)
    return vjp(g)


_kernel_attention.defvjp(_kernel_attention_fwd, _kernel_attention_bwd)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array | None = None,
    *,
    scale: float | None = None,
    dropout_rng: jax.Array | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = True,
    half_precision_scores: bool = False,
    kv_heads_first: bool = False,
    rope: Rope | None = None,
) -> jax.Array:
    """Softmax attention with the scores and softmax in float32.

    q: (B, Lq, H, Dh); k, v: (B, Lk, Hkv, Dh) with H a multiple of Hkv (grouped-query attention);
    bias: additive, broadcastable to (B, H, Lq, Lk). Returns (B, Lq, H, Dh) in q's dtype.
    half_precision_scores: round the scores to q's dtype after the matmul and again after dividing by sqrt(Dh),
    as PyTorch's `matmul(q, k^T) / sqrt(Dh)` does on bf16/fp16 tensors (upstream's LLaMA); the bias and the softmax
    are float32 either way.
    kv_heads_first: k and v are (B, Hkv, Lk, Dh) (the KV cache's layout, `models.llama.init_cache`). On a
    one-device CPU with the FFI kernels this runs as one `kernels.attention` call (head sizes it takes, no dropout):
    q and the output stay in their (B, L, H, Dh) layout, the cache is read as stored (XLA's dot converted a whole
    bf16 cache to float32 for every one-row product), masked keys at the ends of each row are skipped (a causal
    prefill reads half the keys), and the softmax runs between the two products on a row held in L1. SmolLM2-135M's
    128-token prefill: q's transposition, the scores, the softmax's reductions and division and the output's
    transposition took 24 ms of ~160 as XLA programs. The backward pass (a loss over a cached prompt prefix) is
    XLA's.
    rope: q is rotated first (`apply_rope`); in the kernel, as its rows are loaded (XLA's CPU compiler recomputed
    cos and sin inside every rotation's fusion, per head: SmolLM2-135M's batch-8 prefill, ~0.9 ms of each layer's
    ~30 for q).
    """
    b, lq, h, dh = q.shape
    hkv = k.shape[1] if kv_heads_first else k.shape[2]
    if scale is None:
        scale = dh ** -0.5
    if (kv_heads_first and (deterministic or dropout_rate == 0.0) and kernels.use_cpu_kernels()
            and jnp.dtype(v.dtype) == jnp.dtype(k.dtype) and kernels.attention_fits(dh, k.dtype)):
        # over a KV cache on a one-device CPU: one kernel call per layer (`kernels.attention`)
        rounding = jnp.dtype(q.dtype) if half_precision_scores and jnp.dtype(q.dtype) in LOW_PRECISION_FLOATS else None
        return _kernel_attention(q, k, v, bias, rope, float(scale), rounding).astype(q.dtype)
    if rope is not None:
        q = apply_rope(q, *rope)
    group = h // hkv
    if kv_heads_first:
        # the queries of a KV head (lq x group) are the rows of one matmul per (row, KV head): at decode (lq = 1)
        # a size-1 query axis between the batch axes made XLA's CPU dots 1.7x slower
        qr = q.reshape(b, lq, hkv, group, dh).transpose(0, 2, 1, 3, 4).reshape(b, hkv, lq * group, dh)
        scores = jnp.einsum("bkrd,bksd->bkrs", qr, k, preferred_element_type=jnp.float32)
    else:
        qg = q.reshape(b, lq, hkv, group, dh)
        scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32)
    if half_precision_scores:
        scores = round_to(round_to(scores.astype(jnp.float32), q.dtype) / (1.0 / scale), q.dtype)
    else:
        scores = scores.astype(jnp.float32) * scale
    if bias is not None:
        bias = jnp.asarray(bias, jnp.float32)
        # (B|1, H|1, Lq, Lk) -> the scores' grouped layout
        bb, bh = bias.shape[0], bias.shape[1]
        bk, bg = (hkv, group) if bh == h else (1, 1)
        bias = bias.reshape(bb, bk, bg, bias.shape[2], bias.shape[3])  # (B|1, Hkv|1, group|1, Lq, Lk)
        if kv_heads_first:
            bias = jnp.broadcast_to(bias.transpose(0, 1, 3, 2, 4), (bb, bk, lq, group, bias.shape[4]))
            bias = bias.reshape(bb, bk, lq * group, bias.shape[4])
        scores = scores + bias
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout_rate > 0.0 and not deterministic:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    if kv_heads_first:
        out = jnp.einsum("bkrs,bksd->bkrd", probs.astype(v.dtype), v)
        out = out.reshape(b, hkv, lq, group, dh).transpose(0, 2, 1, 3, 4)
    else:
        out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(v.dtype), v)
    return out.reshape(b, lq, h, dh).astype(q.dtype)


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2 (EVA ViT and ImageBind blocks)."""

    hidden: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        h = dense(self.hidden, ("embed", "mlp"), "fc1", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        h = gelu(h)
        return dense(d, ("mlp", "embed"), "fc2", dtype=self.dtype, param_dtype=self.param_dtype)(h)
