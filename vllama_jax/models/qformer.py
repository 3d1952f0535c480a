"""BLIP-2 Q-Former as Video-LLaMA uses it: queries only, no text (upstream.md §3).

Post-LN BERT layers: self-attention over the queries, cross-attention to the encoder memory in layers with
`i % cross_attention_freq == 0` (image Q-Former: every second layer; video and audio Q-Formers: every layer),
then the query-specific feed-forward (`intermediate_query` / `output_query`). The query tokens first go through
the embeddings LayerNorm (+ dropout). Every upstream mask is all-ones, so no masks are applied. Dropout (0.1) is
active only when `deterministic=False` (the trained video/audio Q-Formers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from .layers import ConfiguredModule, LayerNorm, dense, dot_product_attention, gelu, merge_heads, split_heads


class QFormerAttention(ConfiguredModule):
    """BERT attention + output sub-layer: LN(h + Dropout(Dense(Attn(h, memory))))."""

    @nn.compact
    def __call__(self, h: jax.Array, memory: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        kv_in = h if memory is None else memory
        # cross-attention keys/values come from the encoder width (1408 / 768 / 1024), hence "embed" -> "heads"
        q = split_heads(dense(c.hidden_size, ("embed", "heads"), "query", **kw)(h), c.num_heads)
        k = split_heads(dense(c.hidden_size, ("embed", "heads"), "key", **kw)(kv_in), c.num_heads)
        v = split_heads(dense(c.hidden_size, ("embed", "heads"), "value", **kw)(kv_in), c.num_heads)
        rng = None if deterministic or c.dropout == 0.0 else self.make_rng("dropout")
        ctx = merge_heads(dot_product_attention(q, k, v, dropout_rng=rng, dropout_rate=c.dropout,
                                                deterministic=deterministic))
        out = dense(c.hidden_size, ("heads", "embed"), "output", **kw)(ctx)
        out = nn.Dropout(c.dropout)(out, deterministic=deterministic)
        return LayerNorm(c.layer_norm_eps, name="output_layernorm", out_dtype=jnp.float32)(h + out)


class QFormerLayer(ConfiguredModule):
    has_cross_attention: bool = False

    @nn.compact
    def __call__(self, h: jax.Array, memory: jax.Array, deterministic: bool = True) -> jax.Array:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = QFormerAttention(c, name="attention", **kw)(h, None, deterministic)
        if self.has_cross_attention:
            h = QFormerAttention(c, name="crossattention", **kw)(h, memory, deterministic)
        ff = gelu(dense(c.intermediate_size, ("embed", "mlp"), "intermediate_query", **kw)(h))
        ff = dense(c.hidden_size, ("mlp", "embed"), "output_query", **kw)(ff)
        ff = nn.Dropout(c.dropout)(ff, deterministic=deterministic)
        return LayerNorm(c.layer_norm_eps, name="output_query_layernorm", out_dtype=jnp.float32)(h + ff)


class QFormer(ConfiguredModule):
    """queries (B, Q, hidden) cross-attending to memory (B, M, encoder_width) -> (B, Q, hidden); `config`: a
    `QFormerConfig`."""

    @nn.compact
    def __call__(self, queries: jax.Array, memory: jax.Array, deterministic: bool = True) -> jax.Array:
        c = self.config
        h = LayerNorm(c.layer_norm_eps, name="embeddings_layernorm", out_dtype=jnp.float32)(queries)
        h = nn.Dropout(c.dropout)(h, deterministic=deterministic)
        for i in range(c.num_layers):
            h = QFormerLayer(c, self.dtype, self.param_dtype, has_cross_attention=c.has_cross_attention(i),
                             name=f"layer_{i}")(h, memory, deterministic)
            self.sow("intermediates", f"layer{i}", h)
        return h
