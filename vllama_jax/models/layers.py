"""Layers shared by every tower: dense/norm with logical axes, attention, activations.

Every parameter is created through `nn.with_logical_partitioning`, so `jax.eval_shape(model.init, ...)` yields the
logical axis names that `vllama_jax.sharding` maps onto the mesh. Parameter names follow the upstream module
names (`query`, `key`, `value`, `fc1`, ...) so a user can find a checkpoint key in the params tree.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

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


def with_axes(init: Initializer, axes: tuple[str | None, ...]) -> Initializer:
    return nn.with_logical_partitioning(init, axes)


def dense(features: int, axes: tuple[str | None, str | None], name: str | None = None, *, use_bias: bool = True,
          dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
          kernel_init: Initializer = normal_init(0.02)) -> nn.Dense:
    """`nn.Dense` (params `kernel` (in, out) and `bias` (out,) under `name`) with logical axes.

    Matmul precision follows `jax_default_matmul_precision` (set it to "highest" on GPU/TPU for fp32 parity).
    """
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=with_axes(kernel_init, axes),
        bias_init=with_axes(nn.initializers.zeros, (axes[1],)),
        name=name,
    )


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
) -> jax.Array:
    """Softmax attention with the scores and softmax in float32.

    q: (B, Lq, H, Dh); k, v: (B, Lk, Hkv, Dh) with H a multiple of Hkv (grouped-query attention);
    bias: additive, broadcastable to (B, H, Lq, Lk). Returns (B, Lq, H, Dh) in q's dtype.
    half_precision_scores: round the scores to q's dtype after the matmul and again after dividing by sqrt(Dh),
    as PyTorch's `matmul(q, k^T) / sqrt(Dh)` does on bf16/fp16 tensors (upstream's LLaMA); the bias and the softmax
    are float32 either way.
    """
    b, lq, h, dh = q.shape
    hkv = k.shape[2]
    if scale is None:
        scale = dh ** -0.5
    group = h // hkv
    qg = q.reshape(b, lq, hkv, group, dh)
    scores = jnp.einsum(
        "bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32
    )
    if half_precision_scores:
        scores = round_to(round_to(scores.astype(jnp.float32), q.dtype) / (1.0 / scale), q.dtype)
    else:
        scores = scores.astype(jnp.float32) * scale
    if bias is not None:
        bias = jnp.asarray(bias, jnp.float32)
        # (B|1, H|1, Lq, Lk) -> grouped layout (B|1, Hkv|1, group|1, Lq, Lk)
        bb, bh = bias.shape[0], bias.shape[1]
        bias = bias.reshape(bb, hkv if bh == h else 1, group if bh == h else 1, bias.shape[2], bias.shape[3])
        scores = scores + bias
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout_rate > 0.0 and not deterministic:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum(
        "bkgqs,bskd->bqkgd", probs.astype(v.dtype), v
    )
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
