"""EVA-CLIP ViT-g/14, the frozen image encoder of BLIP-2 (upstream.md §2).

Pre-LN blocks without layer scale or relative position bias; the attention has a query and a value bias but no
key bias (upstream stores one fused `qkv` weight and builds the bias as [q_bias, 0, v_bias]; the key map splits
it). No final norm: the model returns all tokens (CLS included) of the last built block, i.e. block 38 of the
40-block checkpoint. `ln_vision` (eps 1e-5) lives in the composition.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from .layers import (LAYERS_AXIS, ConfiguredModule, Dtype, LayerNorm, Mlp, dense, dot_product_attention, matmul,
                     merge_heads, split_heads, with_axes)

#: the params key of the stacked blocks (`EvaViT.scan_layers`; `tree.stack_layers(params, SCANNED_BLOCKS, depth)`)
SCANNED_BLOCKS = "blocks"


class EvaAttention(nn.Module):
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = split_heads(dense(d, ("embed", "heads"), "query", **kw)(x), self.num_heads)
        k = split_heads(dense(d, ("embed", "heads"), "key", use_bias=False, **kw)(x), self.num_heads)
        v = split_heads(dense(d, ("embed", "heads"), "value", **kw)(x), self.num_heads)
        out = merge_heads(dot_product_attention(q, k, v))
        return dense(d, ("heads", "embed"), "proj", **kw)(out)


class EvaBlock(ConfiguredModule):

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # the residual stream stays in float32 (upstream: fp32 + fp16 under autocast promotes to fp32)
        x = x + EvaAttention(c.num_heads, name="attn", **kw)(LayerNorm(c.layer_norm_eps, name="norm1")(x))
        x = x + Mlp(c.mlp_dim, name="mlp", **kw)(LayerNorm(c.layer_norm_eps, name="norm2")(x))
        return x


class _ScannedBlock(EvaBlock):
    """A block as the body of `nn.scan` (`EvaViT.scan_layers`): the tokens are the carry."""

    def __call__(self, x: jax.Array, _: None = None) -> tuple[jax.Array, None]:  # type: ignore[override]
        return super().__call__(x), None


class PatchEmbed(nn.Module):
    """The stride-`patch` convolution of the patch embedding; with fp16/bf16 weights as one matmul over flattened
    patches (through `matmul`, so the weights are never converted whole). Params as `nn.Conv`'s: `kernel` (p, p, 3, width) and
    `bias` (width,)."""

    patch: int
    width: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        p = self.patch
        n, h, w, ch = images.shape
        kernel = self.param("kernel", with_axes(nn.initializers.lecun_normal(), ("patch", "patch", "in_channels",
                                                                                  "embed")),
                            (p, p, ch, self.width), self.param_dtype)
        bias = self.param("bias", with_axes(nn.initializers.zeros, ("embed",)), (self.width,), self.param_dtype)
        if jnp.dtype(kernel.dtype) == jnp.float32:
            # float32 weights: the convolution itself, as nn.Conv computes it (the golden outputs' summation order)
            y = jax.lax.conv_general_dilated(images.astype(self.dtype), kernel.astype(self.dtype), (p, p), "VALID",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            return y + bias.astype(self.dtype)
        # (N, H/p, p, W/p, p, C) -> (N, H/p, W/p, p, p, C): each patch flattened in the kernel's (p, p, C) order
        x = images.astype(self.dtype).reshape(n, h // p, p, w // p, p, ch).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(n, h // p, w // p, p * p * ch)
        y = matmul(x, kernel.reshape(p * p * ch, self.width), dtype=jnp.float32)
        return (y.astype(self.dtype) + bias.astype(self.dtype))


class EvaViT(ConfiguredModule):
    """(N, H, W, 3) normalized images -> (N, 1 + (H/14)*(W/14), width) tokens; `config`: a `ViTConfig`."""

    remat: bool = False
    # True: the blocks run as one `nn.scan` over stacked parameters (``blocks/...``, leading logical axis
    # LAYERS_AXIS): traced and compiled once instead of `depth` times; no per-block intermediates
    scan_layers: bool = False

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        c = self.config
        n = images.shape[0]
        patches = PatchEmbed(c.patch_size, c.width, dtype=self.dtype, param_dtype=self.param_dtype,
                             name="patch_embed")(images)
        # row-major flatten of the patch grid (h outer, w inner), as upstream's flatten(2).transpose(1, 2)
        x = patches.reshape(n, -1, c.width).astype(jnp.float32)
        cls = self.param("cls_token", with_axes(nn.initializers.normal(0.02), (None, None, "embed")),
                         (1, 1, c.width), jnp.float32)
        pos = self.param("pos_embed", with_axes(nn.initializers.normal(0.02), (None, "positions", "embed")),
                         (1, c.num_patches + 1, c.width), jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, c.width)), x], axis=1) + pos
        if self.scan_layers:
            body = nn.remat(_ScannedBlock, prevent_cse=False) if self.remat else _ScannedBlock
            scanned = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True}, length=c.depth,
                              metadata_params={nn.PARTITION_NAME: LAYERS_AXIS})
            x, _ = scanned(c, dtype=self.dtype, param_dtype=self.param_dtype, name=SCANNED_BLOCKS)(x, None)
            return x
        block = nn.remat(EvaBlock) if self.remat else EvaBlock
        for i in range(c.depth):
            x = block(c, dtype=self.dtype, param_dtype=self.param_dtype, name=f"blocks_{i}")(x)
            self.sow("intermediates", f"block{i}", x)
        return x
