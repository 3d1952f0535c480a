"""LLaMA-family decoder (upstream.md §5.1) with a functional KV cache.

HF `LlamaForCausalLM` semantics: pre-norm decoder layers, RMSNorm with the variance in float32, `rotate_half`
RoPE (HF weight layout), grouped-query attention with the softmax in float32, SiLU-gated MLP, final norm, untied
or tied `lm_head`. Only the decoder is here: embedding lookup (`Llama.embed`) is a separate method because
Video-LLaMA splices media embeddings between text embeddings before the decoder runs.

Params tree (paths as in `vllama_jax.weights.llama_keys`):
    embed_tokens/embedding (V, D)   (+ embed_tokens/embedding_scale (V,) when int8: `models.quant`)
    layers_{i}/self_attn/{q_proj,k_proj,v_proj,o_proj}/kernel
    layers_{i}/mlp/{gate_proj,up_proj,down_proj}/kernel
    layers_{i}/{input_layernorm,post_attention_layernorm}/scale
    norm/scale
    lm_head/kernel (D, V)            (absent when tie_word_embeddings)
    every `kernel` may be int8 with a `kernel_scale` (out,) beside it (`models.quant`)
LoRA adapters (`models.lora`) are not in this tree: they come as the `adapters` argument (the `llama_lora` group).

KV cache (`init_cache`): a plain dict, so it can be donated to a jitted step and sharded with
`cache_logical_axes`:
    layers_{i}: {"k": (B, Hkv, S, Dh), "v": (B, Hkv, S, Dh)}   keys after RoPE / values, cache dtype; heads before
                slots, so the attention's dots read the cache as stored (slots last but one: XLA's batched matmul
                layout) instead of transposing the whole cache in every layer of every decode step
    valid:      (B, S) bool      which slots hold a real (non-padding) token
    index:      (B,) int32       next slot to write, per row
    next_pos:   (B,) int32       position id of the next real token, per row (= real tokens seen so far)

A call with `cache` writes its L new tokens at slots index[b] .. index[b]+L-1 of every row (padding included; the
padding slots are marked invalid and never attended), then attends over the cache: query j of row b sees slot s
iff valid[b, s] and s <= index[b] + j. Prefill (L > 1) and decode (L = 1) are the same call. Because padding slots
are simply masked, prompts of different lengths may be batched with left padding (HF `generate` style) or right
padding (the holes stay masked); position ids default to `next_pos + cumsum(attention_mask) - 1` so each row's
real tokens get consecutive positions either way. The caller sizes the cache: writing past `max_length` is not
checked inside jit (dynamic_update_slice would clamp the start and overwrite the last slots).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from .. import kernels
from ..config import LlamaConfig, LoraConfig
from .layers import (LAYERS_AXIS, ConfiguredModule, Dense, Dtype, Embed, RMSNorm, Rope, apply_rope, dense,
                     dot_product_attention, matmuls, round_to)
from ..tree import stack_layers
from .lora import add_adapter

Adapters = dict[str, Any]  # a `llama_lora` tree (`models.lora`), or the part of it for one layer / submodule

Cache = dict[str, Any]

CACHE_KV_AXES = ("batch", "kv_heads", "cache_length", "head_dim")
SLOT_AXIS = CACHE_KV_AXES.index("cache_length")


# ------------------------------------------------------------------------------------------------------------
# KV cache


def init_cache(config: LlamaConfig, batch: int, max_length: int, dtype: Dtype = jnp.float32) -> Cache:
    """An empty KV cache for `batch` rows of up to `max_length` tokens (prompt + generated, padding included)."""
    shape = (batch, config.num_kv_heads, max_length, config.head_dim_resolved)
    cache: Cache = {
        f"layers_{i}": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for i in range(config.num_layers)
    }
    cache["valid"] = jnp.zeros((batch, max_length), jnp.bool_)
    cache["index"] = jnp.zeros((batch,), jnp.int32)
    cache["next_pos"] = jnp.zeros((batch,), jnp.int32)
    return cache


def cache_logical_axes(config: LlamaConfig) -> Cache:
    """Logical axis names of every array of `init_cache(config, ...)`, same tree structure."""
    axes: Cache = {f"layers_{i}": {"k": CACHE_KV_AXES, "v": CACHE_KV_AXES} for i in range(config.num_layers)}
    axes["valid"] = ("batch", "cache_length")
    axes["index"] = ("batch",)
    axes["next_pos"] = ("batch",)
    return axes


def resize_cache(cache: Cache, length: int) -> Cache:
    """`cache` with `length` slots per row: cut at the end, or padded with empty (invalid) slots. Cutting is only
    right where no row uses the slots cut."""
    def fit(x: jax.Array, axis: int) -> jax.Array:
        if length <= x.shape[axis]:
            return jax.lax.slice_in_dim(x, 0, length, axis=axis)
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, length - x.shape[axis])
        return jnp.pad(x, pad)

    return {name: {kv: fit(a, SLOT_AXIS) for kv, a in v.items()} if isinstance(v, dict)
            else fit(v, 1) if name == "valid" else v for name, v in cache.items()}


_UNROLLED_ROWS = 16  # batches up to this size write one dynamic-update-slice per row; larger ones one vmapped write


def _write_rows(buf: jax.Array, new: jax.Array, index: jax.Array, axis: int = 1, slots_first: bool = False,
                rope: Rope | None = None) -> jax.Array:
    """buf[b, ..., index[b] : index[b] + L, ...] = new[b] along `axis` for every row b (per-row offsets), in place.
    new: (B, ..., L, ...) with buf's other sizes, or with `slots_first` (B, L, ...) (a projection's (B, L, Hkv, Dh)
    for a (B, Hkv, S, Dh) cache).

    XLA's CPU compiler does not write a 2-byte float cache in place: a bf16 / fp16 dynamic-update-slice became a
    float32 round trip of the whole buffer (widen, update, narrow), and the same update on the buffer's bits as
    uint16 a loop over every element. So on CPU with the FFI kernels a float cache is written by
    `kernels.write_rows` (the result aliases the donated buffer: only the new slots are written, read from the
    projection's layout), elsewhere a 2-byte float cache on its bits as unsigned integers (the lesser copy). Other
    caches take one dynamic-update-slice per row up to `_UNROLLED_ROWS` rows, which XLA writes in place (the
    vmapped form became a scatter with bounds selects over the whole cache); larger batches (an accelerator's) keep
    one vmapped write rather than a program that grows with the batch. 60 SmolLM2-135M caches, one slot written per
    step, ms at 192 / 1088 / 4096 slots: float32 0.14 at every length in place against 0.57 / 1.9 / 17 through its
    uint32 bits; bfloat16 0.12-0.15 through the kernel against 0.9 / 4.6 / 23 plain and 0.33 / 1.3 / 10 through its
    bits. A float32 prefill's transposition and per-row updates ran at 3-4 GB/s (SmolLM2-135M at batch 8: 33 ms of
    a 920 ms prefill). Differentiable (a loss over a cached prompt prefix trains through it).
    rope: `new` (B, L, H, Dh) slots first is rotated first (`layers.apply_rope` in its dtype); by the kernel on its
    way in where it writes a cache of that dtype."""
    dtype = jnp.dtype(buf.dtype)
    kernel = jnp.issubdtype(dtype, jnp.floating) and kernels.use_cpu_kernels()
    if rope is not None and not (kernel and slots_first and jnp.dtype(new.dtype) == dtype):
        new, rope = apply_rope(new, *rope), None
    new = new.astype(dtype)
    if kernel or (jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 2):
        return _write_float_rows(buf, new, index, rope, axis, slots_first)
    return _update_rows(buf, _slots_at(new, axis, slots_first), index, axis)


def _slots_at(new: jax.Array, axis: int, slots_first: bool) -> jax.Array:
    return jnp.moveaxis(new, 1, axis) if slots_first else new


def _update_rows(buf: jax.Array, new: jax.Array, index: jax.Array, axis: int) -> jax.Array:
    if buf.shape[0] > _UNROLLED_ROWS:
        def one(b_buf: jax.Array, b_new: jax.Array, i: jax.Array) -> jax.Array:
            start = tuple(i if d == axis - 1 else 0 for d in range(b_buf.ndim))
            return jax.lax.dynamic_update_slice(b_buf, b_new, start)

        return jax.vmap(one)(buf, new, index)
    for b in range(buf.shape[0]):
        start = (b,) + tuple(index[b] if d == axis else 0 for d in range(1, buf.ndim))
        buf = jax.lax.dynamic_update_slice(buf, new[b:b + 1], start)
    return buf


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def _write_float_rows(buf: jax.Array, new: jax.Array, index: jax.Array, rope: Rope | None, axis: int,
                      slots_first: bool) -> jax.Array:
    if kernels.use_cpu_kernels():
        return kernels.write_rows(buf, new, index, axis, slots_first, rope)
    new = _slots_at(new, axis, slots_first)  # (`_write_rows` passes a rotation to the kernel only)
    if jnp.dtype(buf.dtype).itemsize != 2:
        return _update_rows(buf, new, index, axis)
    out = _update_rows(jax.lax.bitcast_convert_type(buf, jnp.uint16), jax.lax.bitcast_convert_type(new, jnp.uint16),
                       index, axis)
    return jax.lax.bitcast_convert_type(out, buf.dtype)


@_write_float_rows.defjvp
def _write_float_rows_jvp(axis: int, slots_first: bool, primals: tuple, tangents: tuple
                          ) -> tuple[jax.Array, jax.Array]:
    # neither the kernel nor the integer bits carry a derivative: the tangents are written as floats (the same
    # linear update), rotated as the kernel rotates the rows
    buf, new, index, rope = primals
    d_buf, d_new, _, d_rope = tangents
    if rope is not None:
        _, d_new = jax.jvp(apply_rope, (new, *rope), (d_new, *d_rope))
    return (_write_float_rows(buf, new, index, rope, axis, slots_first),
            _update_rows(d_buf, _slots_at(d_new, axis, slots_first), index, axis))


# ------------------------------------------------------------------------------------------------------------
# RoPE (HF rotate_half convention)


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """1 / theta^(2k/Dh), computed in float64 and rounded once to float32 (what torch's fp32 pow gives)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    return (1.0 / (theta ** exponents)).astype(np.float32)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin of shape (B, L, Dh) in float32 for integer positions (B, L); computed on the fly, so any position
    (also beyond max_position_embeddings, as HF's dynamic cache growth allows) is fine."""
    inv_freq = jnp.asarray(rope_inv_freq(head_dim, theta))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # fp32 product, as HF's fp32 matmul with K=1
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


# ------------------------------------------------------------------------------------------------------------
# modules


class _Projections(ConfiguredModule):
    """Attention and MLP: bias-free projections, each with its LoRA adapter when `adapters` has one."""

    lora: LoraConfig = LoraConfig()

    def project(self, features: int, axes: tuple[str, str], name: str, x: jax.Array, adapters: Adapters | None,
                deterministic: bool) -> jax.Array:
        return self.project_many([(features, axes, name)], x, adapters, deterministic)[0]

    def project_many(self, specs: list[tuple[int, tuple[str, str], str]], x: jax.Array, adapters: Adapters | None,
                     deterministic: bool) -> list[jax.Array]:
        """Projections (features, axes, name) of the same x (q, k and v; gate and up), their products taken together
        (`layers.matmuls`: one kernel call in a CPU decode step)."""
        layers = [dense(f, axes, name, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
                  for f, axes, name in specs]
        weights = [layer.weights(x.shape[-1])[:2] for layer in layers]
        ys = matmuls(x, weights, dtype=self.dtype)
        return [add_adapter(self, name, y, x, adapters, self.lora, deterministic) for (_, _, name), y in zip(specs, ys)]


class LlamaAttention(_Projections):
    torch_arithmetic: bool = False  # see `Llama.torch_arithmetic`

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, bias: jax.Array,
                 layer_cache: dict[str, jax.Array] | None, index: jax.Array | None,
                 adapters: Adapters | None = None, deterministic: bool = True
                 ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        c = self.config
        h, hkv, dh = c.num_heads, c.num_kv_heads, c.head_dim_resolved
        b, l, _ = x.shape
        q, k, v = self.project_many([(h * dh, ("embed", "heads"), "q_proj"), (hkv * dh, ("embed", "kv_heads"), "k_proj"),
                                     (hkv * dh, ("embed", "kv_heads"), "v_proj")], x, adapters, deterministic)
        q, k, v = q.reshape(b, l, h, dh), k.reshape(b, l, hkv, dh), v.reshape(b, l, hkv, dh)
        new_cache = None
        if layer_cache is not None:
            # Keys are cached after RoPE, so old entries never need re-rotation. The write and the attention rotate
            # k and q themselves (inside the CPU kernels where those run).
            ck = _write_rows(layer_cache["k"], k, index, axis=SLOT_AXIS, slots_first=True,
                             rope=(cos, sin))  # (B, Hkv, S, Dh)
            cv = _write_rows(layer_cache["v"], v, index, axis=SLOT_AXIS, slots_first=True)
            new_cache = {"k": ck, "v": cv}
            out = dot_product_attention(q, ck.astype(self.dtype), cv.astype(self.dtype), bias,
                                        half_precision_scores=self.torch_arithmetic, kv_heads_first=True,
                                        rope=(cos, sin))
        else:
            out = dot_product_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, bias,
                                        half_precision_scores=self.torch_arithmetic)
        out = self.project(c.hidden_size, ("heads", "embed"), "o_proj", out.reshape(b, l, h * dh), adapters,
                           deterministic)
        return out, new_cache


class LlamaMLP(_Projections):
    @nn.compact
    def __call__(self, x: jax.Array, adapters: Adapters | None = None, deterministic: bool = True) -> jax.Array:
        c = self.config
        gate, up = self.project_many([(c.intermediate_size, ("embed", "mlp"), "gate_proj"),
                                      (c.intermediate_size, ("embed", "mlp"), "up_proj")], x, adapters, deterministic)
        # SiLU evaluated in float32 and rounded once, as torch's bf16/fp16 kernel (XLA would round its parts)
        act = jax.nn.silu(gate.astype(jnp.float32)).astype(gate.dtype)
        return self.project(c.hidden_size, ("mlp", "embed"), "down_proj", act * up, adapters, deterministic)


class LlamaDecoderLayer(ConfiguredModule):
    torch_arithmetic: bool = False  # see `Llama.torch_arithmetic`
    lora: LoraConfig = LoraConfig()

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, bias: jax.Array,
                 layer_cache: dict[str, jax.Array] | None = None, index: jax.Array | None = None,
                 adapters: Adapters | None = None, deterministic: bool = True
                 ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        c = self.config
        stream = x.dtype  # the residual stream's dtype (`Llama.torch_arithmetic`); only the norms' outputs are cast
        adapters = adapters or {}
        h = RMSNorm(c.rms_norm_eps, self.param_dtype, name="input_layernorm")(x)
        attn, new_cache = LlamaAttention(c, self.dtype, self.param_dtype, lora=self.lora,
                                         torch_arithmetic=self.torch_arithmetic, name="self_attn")(
            h.astype(self.dtype), cos, sin, bias, layer_cache, index, adapters.get("self_attn"), deterministic)
        x = self._residual(x + attn)
        h = RMSNorm(c.rms_norm_eps, self.param_dtype, name="post_attention_layernorm")(x)
        mlp = LlamaMLP(c, self.dtype, self.param_dtype, lora=self.lora, name="mlp")
        x = self._residual(x + mlp(h.astype(self.dtype), adapters.get("mlp"), deterministic))
        return x.astype(stream), new_cache

    def _residual(self, x: jax.Array) -> jax.Array:
        """With torch arithmetic, each residual sum rounded to its dtype where it is computed, as torch stores it:
        XLA may otherwise keep a bf16 sum in float32 inside a fusion (excess precision) and feed that to the norm."""
        return round_to(x, x.dtype) if self.torch_arithmetic else x


class _ScannedLayer(LlamaDecoderLayer):
    """One decoder layer as the body of `nn.scan` (`Llama.scan_layers`): the residual stream is the carry, the
    layer's LoRA adapters (stacked, or None) the scanned input, the rest the same for every layer; no cache."""

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, bias: jax.Array,  # type: ignore[override]
                 adapters: Adapters | None, deterministic: bool) -> tuple[jax.Array, None]:
        out, _ = super().__call__(x, cos, sin, bias, adapters=adapters, deterministic=deterministic)
        return out, None


#: the params key of the stacked layers (`Llama.scan_layers`; `tree.stack_layers(params, SCANNED_LAYERS, n)`)
SCANNED_LAYERS = "layers"


class Llama(ConfiguredModule):
    """The LLaMA decoder + LM head (`config`: a `LlamaConfig`). See the module docstring for the params tree and
    the cache layout.

    `remat=True` rematerialises each decoder layer in the backward pass (training memory).
    Per-layer outputs are sown into the "intermediates" collection (`layer{i}`, `final_norm`) when it is
    mutable: `apply(..., mutable=["intermediates"])`; they cost nothing otherwise.
    """

    remat: bool = False
    # True: upstream's PyTorch arithmetic (config `precision.llama_arithmetic: torch`): the residual stream runs in
    # the wider of the input embeddings' dtype and the compute dtype, as type promotion runs upstream's bf16 LLaMA
    # on a float32 prompt, and attention scores are rounded to the compute dtype as torch's half-precision matmul
    # rounds them. False: the stream in the compute dtype, scores in float32.
    torch_arithmetic: bool = False
    # scale and dropout of the LoRA adapters passed to `__call__` (`models.lora`); the adapters themselves are an
    # argument, not parameters of this module: they are a group of their own (`llama_lora`)
    lora: LoraConfig = LoraConfig()
    # True: the decoder layers run as one `nn.scan` over stacked parameters (``layers/...``, leading logical axis
    # LAYERS_AXIS; `tree.stack_layers` makes that view of a checkpoint's ``layers_{i}``): the layer is traced and
    # compiled once instead of num_layers times. Training only: no KV cache, no per-layer intermediates; LoRA
    # adapters come per layer as always and are stacked for the scan. With `remat`, each scanned layer is
    # rematerialised.
    scan_layers: bool = False

    def setup(self) -> None:
        c = self.config
        self.embed_tokens = Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype)
        if self.scan_layers:
            # `deterministic` (argument 6, counting self) is a Python bool: static under remat, broadcast by scan
            body = nn.remat(_ScannedLayer, prevent_cse=False, static_argnums=(6,)) if self.remat else _ScannedLayer
            scanned = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                              in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                              length=c.num_layers, metadata_params={nn.PARTITION_NAME: LAYERS_AXIS})
            self.layers = scanned(c, self.dtype, self.param_dtype, self.torch_arithmetic, self.lora)
        else:
            # `deterministic` (argument 8, counting self) is a Python bool: static under remat
            layer_cls = nn.remat(LlamaDecoderLayer, static_argnums=(8,)) if self.remat else LlamaDecoderLayer
            # A list attribute in setup names its modules layers_0, layers_1, ...
            self.layers = [layer_cls(c, self.dtype, self.param_dtype, self.torch_arithmetic, self.lora)
                           for _ in range(c.num_layers)]
        self.norm = RMSNorm(c.rms_norm_eps, self.param_dtype)
        if not c.tie_word_embeddings:
            # Dense directly: modules assigned in setup take the attribute name and may not pass `name=`.
            self.lm_head = Dense(c.vocab_size, ("embed", "vocab"), use_bias=False, dtype=self.dtype,
                                 param_dtype=self.param_dtype)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token ids (B, L) -> embeddings (B, L, D) in the compute dtype."""
        return self.embed_tokens(input_ids).astype(self.dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final-normed hidden states (..., D) -> float32 logits (..., V)."""
        if self.config.tie_word_embeddings:
            out = self.embed_tokens.attend(hidden.astype(self.dtype))
        else:
            out = self.lm_head(hidden.astype(self.dtype))
        return out.astype(jnp.float32)

    def __call__(
        self,
        inputs_embeds: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        cache: Cache | None = None,
        return_hidden: bool = False,
        logits_slice: slice | jax.Array | None = None,
        adapters: Adapters | None = None,
        deterministic: bool = True,
    ) -> tuple[jax.Array, Cache | None]:
        """Run the decoder.

        inputs_embeds (B, L, D); attention_mask (B, L) 1 = real token, 0 = padding (default all ones);
        position_ids (B, L) (default: arange(L) without a cache — HF forward semantics, also for right-padded
        training batches — and `next_pos + cumsum(mask) - 1` with a cache); cache from `init_cache` or a
        previous call.
        logits_slice: None (all positions), a Python `slice` of the length axis (e.g. `slice(-1, None)`), or an
        int array (B,) selecting one position per row (-> length 1). Applied before the LM head.
        adapters: a `llama_lora` tree (`models.lora`), scaled by `self.lora`; deterministic=False applies its
        dropout (the "dropout" rng).
        Returns (float32 logits (B, L', V) — or the final-normed hidden states (B, L', D) in the compute dtype
        when `return_hidden` — , the updated cache or None).
        """
        c = self.config
        b, l, _ = inputs_embeds.shape
        if self.scan_layers and cache is not None:
            raise ValueError("scanned LLaMA layers (scan_layers) run the training forward only: no KV cache")
        if self.is_initializing():
            # setup() submodules are created on first use; make `init` through __call__ create the table too.
            self.embed_tokens(jnp.zeros((1, 1), jnp.int32))
        stream = jnp.promote_types(inputs_embeds.dtype, self.dtype) if self.torch_arithmetic else self.dtype
        x = inputs_embeds.astype(stream)
        if attention_mask is None:
            mask = jnp.ones((b, l), jnp.bool_)
        else:
            mask = jnp.asarray(attention_mask).astype(jnp.bool_)

        if cache is None:
            index = None
            if position_ids is None:
                position_ids = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
            key_valid = mask  # (B, S=L)
            query_slot = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
        else:
            index = cache["index"]
            if position_ids is None:
                position_ids = cache["next_pos"][:, None] + jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1
            key_valid = _write_rows(cache["valid"], mask, index)
            query_slot = index[:, None] + jnp.arange(l, dtype=jnp.int32)[None, :]
        key_slot = jnp.arange(key_valid.shape[1], dtype=jnp.int32)
        # Causal + key padding, as one additive float32 mask with finfo.min (HF adds both then clamps to min).
        allowed = key_valid[:, None, :] & (key_slot[None, None, :] <= query_slot[:, :, None])
        bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)[:, None]  # (B, 1, L, S)

        # Once per forward for the CPU kernels, which rotate q and k where they run (`kernels.attention`,
        # `kernels.write_rows`). XLA fuses cos and sin into every rotation it runs itself, per head; an optimization
        # barrier here did not stop that on CPU (expanded before fusion), so there is none.
        cos, sin = rope_cos_sin(position_ids, c.head_dim_resolved, c.rope_theta)

        new_cache: Cache | None = None if cache is None else {}
        if self.scan_layers:
            # the adapters keep their per-layer layout (checkpoints, PEFT export); stacked here, a small copy per call
            stacked = None if adapters is None else stack_layers(adapters, SCANNED_LAYERS, c.num_layers)[SCANNED_LAYERS]
            x, _ = self.layers(x, cos, sin, bias, stacked, deterministic)
        for i, layer in enumerate(() if self.scan_layers else self.layers):
            layer_cache = None if cache is None else cache[f"layers_{i}"]
            layer_adapters = None if adapters is None else adapters.get(f"layers_{i}")
            x, updated = layer(x, cos, sin, bias, layer_cache, index, layer_adapters, deterministic)
            self.sow("intermediates", f"layer{i}", x)
            if new_cache is not None:
                new_cache[f"layers_{i}"] = updated
        if new_cache is not None:
            new_cache["valid"] = key_valid
            new_cache["index"] = cache["index"] + l
            new_cache["next_pos"] = cache["next_pos"] + jnp.sum(mask, axis=1, dtype=jnp.int32)

        h = self.norm(x)
        self.sow("intermediates", "final_norm", h)
        if logits_slice is not None:
            if isinstance(logits_slice, slice):
                h = h[:, logits_slice]
            else:
                rows = jnp.asarray(logits_slice, jnp.int32).reshape(b)
                h = jnp.take_along_axis(h, rows[:, None, None], axis=1)
        if return_hidden:
            return h.astype(self.dtype), new_cache
        return self.logits(h), new_cache
