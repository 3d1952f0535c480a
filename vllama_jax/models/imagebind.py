"""ImageBind-Huge audio and vision towers (upstream.md §4.2, 4.3), the audio encoder of Video-LLaMA.

Layouts (model-internal, channels-last):
  audio  fbank (N, num_mel_bins, target_length, 1)  -- upstream (N, 1, mel, time); see `fbank_to_channels_last`
  vision images (N, image_size, image_size, 3)       -- upstream (N, 3, H, W)

Both towers are pre-LN transformers built from `nn.MultiheadAttention` upstream. The audio attention has the
learned `bias_k`/`bias_v` slot: one extra key/value vector, already in projected space, appended *after* the
projections at the end of the key sequence (L queries attend to L + 1 keys). The vision tower has no such slot
but a LayerNorm before the first block. Each tower returns `(feature, embedding)`: `feature` is the LayerNormed
CLS token (upstream `modality_heads[:-1]`, the first value of Video-LLaMA's `get_audio_feature`), `embedding` is
the head projection, L2-normalised and (audio only) multiplied by the fixed logit scale 20 -- the value
Video-LLaMA feeds to the audio Q-Former.

Drop path: upstream runs the blocks sequence-first ((L, N, D)) and timm's `DropPath` draws one keep/drop
decision per entry of the *leading* axis, so ImageBind drops a residual branch per token position, shared by
all samples of the batch (not per sample). `DropPath` reproduces that by default (`per_sample=False`).
It is only active with `deterministic=False` and a "dropout" rng; the rate of block i is
`linspace(0, drop_path_rate, depth)[i]` (audio 0 -> 0.1, vision 0).

Intermediates (`mutable=["intermediates"]`): audio sows `preproc_tokens`, `block{i}`, `trunk_out`; vision sows
`preproc_tokens`, `block{i}`, `trunk_out` as well.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from ..config import ImageBindAudioConfig, ImageBindVisionConfig
from .layers import (ConfiguredModule, Dtype, LayerNorm, Mlp, dense, dot_product_attention, merge_heads, split_heads,
                     with_axes)


def fbank_to_channels_last(audio: jax.Array) -> jax.Array:
    """Upstream audio clips (..., 1, mel, time), e.g. (B, S, 1, 128, 204), -> (B*S, mel, time, 1).

    Leading axes are flattened sample-major (row b*S + s), as `encode_audioQformer` does.
    """
    if audio.ndim < 4 or audio.shape[-3] != 1:
        raise ValueError(f"expected audio clips of shape (..., 1, mel, time), got {tuple(audio.shape)}")
    mel, time = audio.shape[-2:]
    return jnp.moveaxis(audio.reshape(-1, 1, mel, time), 1, -1)


def images_to_channels_last(images: jax.Array) -> jax.Array:
    """Upstream images (..., 3, H, W) -> (N, H, W, 3), leading axes flattened."""
    if images.ndim < 4 or images.shape[-3] != 3:
        raise ValueError(f"expected images of shape (..., 3, H, W), got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    return jnp.moveaxis(images.reshape(-1, 3, h, w), 1, -1)


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Per-block drop-path rates, as upstream's `torch.linspace(0, rate, depth)` (in float32)."""
    return [float(r) for r in np.linspace(0.0, rate, depth, dtype=np.float32)]


class DropPath(nn.Module):
    """Stochastic depth on a residual branch `x` of shape (N, L, D).

    Kept entries are scaled by 1 / (1 - rate) so the expectation is unchanged (timm `scale_by_keep`).
    `per_sample=False` (default) draws one decision per token position shared across the batch -- what
    upstream's sequence-first DropPath does; `per_sample=True` draws one per sample (the usual timm semantics).
    """

    rate: float
    per_sample: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        keep_prob = 1.0 - self.rate
        if keep_prob <= 0.0:
            return jnp.zeros_like(x)
        shape = (x.shape[0], 1, 1) if self.per_sample else (1, x.shape[1], 1)
        keep = jax.random.bernoulli(self.make_rng("dropout"), keep_prob, shape)
        return jnp.where(keep, x / keep_prob, jnp.zeros_like(x)).astype(x.dtype)


class ImageBindAttention(nn.Module):
    """`nn.MultiheadAttention(bias=True, add_bias_kv=...)` on batch-first tokens.

    Upstream's packed `in_proj_weight` rows [q; k; v] are the `query`/`key`/`value` kernels here. With
    `add_bias_kv` the learned `bias_k`/`bias_v` (1, 1, D) are concatenated after the projected keys/values.
    """

    num_heads: int
    add_bias_kv: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, _, d = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = dense(d, ("embed", "heads"), "query", **kw)(x)
        k = dense(d, ("embed", "heads"), "key", **kw)(x)
        v = dense(d, ("embed", "heads"), "value", **kw)(x)
        if self.add_bias_kv:
            # torch initialises these with xavier_normal_; they live in the projected (head) space
            init = with_axes(nn.initializers.normal(d ** -0.5), (None, None, "heads"))
            bias_k = self.param("bias_k", init, (1, 1, d), self.param_dtype)
            bias_v = self.param("bias_v", init, (1, 1, d), self.param_dtype)
            k = jnp.concatenate([k, jnp.broadcast_to(bias_k.astype(k.dtype), (n, 1, d))], axis=1)
            v = jnp.concatenate([v, jnp.broadcast_to(bias_v.astype(v.dtype), (n, 1, d))], axis=1)
        # softmax(q k^T / sqrt(head_dim)) v; scores and softmax in float32, no mask (upstream attn_mask=None)
        out = dot_product_attention(split_heads(q, self.num_heads), split_heads(k, self.num_heads),
                                    split_heads(v, self.num_heads))
        return dense(d, ("heads", "embed"), "out_proj", **kw)(merge_heads(out))


class ImageBindBlock(nn.Module):
    """Pre-LN block: x + DropPath(attn(norm_1(x))); x + DropPath(mlp(norm_2(x))) (upstream `BlockWithMasking`)."""

    num_heads: int
    mlp_dim: int
    layer_norm_eps: float
    add_bias_kv: bool
    drop_path: float = 0.0
    drop_path_per_sample: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        drop = DropPath(self.drop_path, self.drop_path_per_sample)
        # the residual stream stays in float32 (upstream ImageBind is fp32; under fp16 autocast fp32 + fp16 -> fp32)
        h = LayerNorm(self.layer_norm_eps, param_dtype=self.param_dtype, name="norm_1")(x)
        x = x + drop(ImageBindAttention(self.num_heads, self.add_bias_kv, name="attn", **kw)(h), deterministic)
        h = LayerNorm(self.layer_norm_eps, param_dtype=self.param_dtype, name="norm_2")(x)
        x = x + drop(Mlp(self.mlp_dim, name="mlp", **kw)(h), deterministic)
        return x


def _l2_normalize(x: jax.Array) -> jax.Array:
    """`F.normalize(x, dim=-1)`: x / max(||x||, 1e-12), in float32."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, 1e-12)


def _run_trunk(module: nn.Module, x: jax.Array, *, num_heads: int, mlp_dim: int, layer_norm_eps: float,
               add_bias_kv: bool, rates: list[float], per_sample: bool, remat: bool,
               deterministic: bool) -> jax.Array:
    """The blocks of a tower, created inside `module`'s compact scope as `blocks_{i}`; sows `block{i}`."""
    block_cls = nn.remat(ImageBindBlock, static_argnums=(2,)) if remat else ImageBindBlock
    for i, rate in enumerate(rates):
        x = block_cls(num_heads, mlp_dim, layer_norm_eps, add_bias_kv, rate, per_sample,
                      dtype=module.dtype, param_dtype=module.param_dtype, name=f"blocks_{i}")(x, deterministic)
        module.sow("intermediates", f"block{i}", x)
    return x


def _head(module: nn.Module, x: jax.Array, out_dim: int, eps: float) -> tuple[jax.Array, jax.Array]:
    """head LayerNorm -> CLS (token 0) -> Linear(width -> out_dim, no bias) -> L2 normalise."""
    feature = LayerNorm(eps, param_dtype=module.param_dtype, name="head_norm")(x)[:, 0].astype(jnp.float32)
    proj = dense(out_dim, ("embed", None), "head", use_bias=False, dtype=module.dtype,
                 param_dtype=module.param_dtype)(feature)
    return feature, _l2_normalize(proj)


class ImageBindAudio(ConfiguredModule):
    """ImageBind audio tower: fbank (N, mel, time, 1) -> (feature (N, width), embedding (N, out_dim)).

    `embedding` = logit_scale * l2normalize(head(feature)), the value Video-LLaMA uses (norm 20). `config`: an
    `ImageBindAudioConfig`.
    """

    remat: bool = False
    drop_path_per_sample: bool = False  # False = upstream behaviour (see module docstring)

    @nn.compact
    def __call__(self, fbank: jax.Array, deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        c = self.config
        want = (c.num_mel_bins, c.target_length, 1)
        if fbank.ndim != 4 or tuple(fbank.shape[1:]) != want:
            raise ValueError(f"ImageBindAudio expects fbank of shape (N, {want[0]}, {want[1]}, 1) (channels-last; "
                             f"use fbank_to_channels_last for upstream (N, 1, mel, time)), got {tuple(fbank.shape)}")
        n = fbank.shape[0]
        gh, gw = c.grid
        # stem: Conv2d(1 -> width, k, stride s, no bias); row-major grid flatten = mel-major (index h * gw + w)
        tokens = nn.Conv(
            c.width, (c.kernel_size, c.kernel_size), strides=(c.stride, c.stride), padding="VALID", use_bias=False,
            dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=with_axes(nn.initializers.lecun_normal(), ("patch", "patch", "in_channels", "embed")),
            name="stem",
        )(fbank.astype(self.dtype))
        tokens = tokens.reshape(n, gh * gw, c.width).astype(jnp.float32)
        # the stem LayerNorm (eps 1e-5) acts on the patch tokens before CLS is prepended
        tokens = LayerNorm(c.stem_norm_eps, param_dtype=self.param_dtype, out_dtype=jnp.float32,
                           name="stem_norm")(tokens)
        cls = self.param("cls_token", with_axes(nn.initializers.normal(0.02), (None, None, "embed")),
                         (1, 1, c.width), self.param_dtype)
        pos = self.param("pos_embed", with_axes(nn.initializers.normal(0.02), (None, "positions", "embed")),
                         (1, 1 + gh * gw, c.width), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(jnp.float32), (n, 1, c.width)), tokens], axis=1)
        x = x + pos.astype(jnp.float32)
        self.sow("intermediates", "preproc_tokens", x)
        # no LayerNorm before the audio trunk (upstream pre_transformer_layer = Identity)
        x = _run_trunk(self, x, num_heads=c.num_heads, mlp_dim=c.mlp_dim, layer_norm_eps=c.layer_norm_eps,
                       add_bias_kv=True, rates=drop_path_rates(c.drop_path_rate, c.depth),
                       per_sample=self.drop_path_per_sample, remat=self.remat, deterministic=deterministic)
        self.sow("intermediates", "trunk_out", x)
        feature, embedding = _head(self, x, c.out_dim, c.layer_norm_eps)
        # upstream: clip(exp(log_logit_scale), max=100) * x with the fixed buffer log_logit_scale = ln(20)
        return feature, embedding * min(c.logit_scale, 100.0)


def bicubic_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of torch `F.interpolate(mode="bicubic", align_corners=False)` along one axis.

    Torch's cubic convolution uses A = -0.75 and clamps out-of-range taps to the edge, without antialiasing
    (`jax.image.resize` uses A = -0.5 and antialiases when shrinking, so it cannot be used here).
    """
    a = -0.75

    def near(t: float) -> float:  # |t| <= 1
        return ((a + 2) * t - (a + 3)) * t * t + 1

    def far(t: float) -> float:  # 1 < |t| < 2
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a

    m = np.zeros((n_out, n_in), np.float64)
    for o in range(n_out):
        src = (o + 0.5) * n_in / n_out - 0.5
        i0 = int(np.floor(src))
        t = src - i0
        for k, w in enumerate((far(t + 1), near(t), near(1 - t), far(2 - t))):
            m[o, min(max(i0 - 1 + k, 0), n_in - 1)] += w
    return m


def _resize_patch_pos_embed(pos: jax.Array, grid_in: int, grid_out: int) -> jax.Array:
    """Upstream `interpolate_pos_encoding_2d`: the square (grid_in, grid_in) table of patch positions resized
    bicubically to (grid_out, grid_out). pos: (1, grid_in**2, D) -> (1, grid_out**2, D)."""
    if grid_in == grid_out:
        return pos
    m = jnp.asarray(bicubic_resize_matrix(grid_in, grid_out), jnp.float32)
    table = pos.astype(jnp.float32).reshape(grid_in, grid_in, -1)
    out = jnp.einsum("oi,pj,ijd->opd", m, m, table, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(1, grid_out * grid_out, -1)


class ImageBindVision(ConfiguredModule):
    """ImageBind vision tower: images (N, H, W, 3) -> (feature (N, width), embedding (N, out_dim), unit norm).

    The params are sized for `config.image_size`; another square size that the patch divides is accepted and
    the patch position table is resized bicubically, as upstream does (e.g. 56x56 frames of a small test model).
    `config`: an `ImageBindVisionConfig`.
    """

    remat: bool = False

    @nn.compact
    def __call__(self, images: jax.Array, deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        c = self.config
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2] \
                or images.shape[1] % c.patch_size:
            raise ValueError(f"ImageBindVision expects square images (N, H, H, 3) (channels-last) with H a multiple "
                             f"of {c.patch_size} (params are for H = {c.image_size}), got {tuple(images.shape)}")
        n, size = images.shape[0], images.shape[1]
        # an image is a video of kernel_time identical frames (upstream PadIm2Video(repeat, ntimes=2)), so the
        # Conv3d with kernel = stride = (2, p, p) sees exactly one temporal step
        video = jnp.broadcast_to(images[:, None], (n, c.kernel_time) + images.shape[1:]).astype(self.dtype)
        tokens = nn.Conv(
            c.width, (c.kernel_time, c.patch_size, c.patch_size),
            strides=(c.kernel_time, c.patch_size, c.patch_size), padding="VALID", use_bias=False,
            dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=with_axes(nn.initializers.lecun_normal(), ("patch", "patch", "patch", "in_channels", "embed")),
            name="stem",
        )(video)
        g_param, g = c.image_size // c.patch_size, size // c.patch_size
        tokens = tokens.reshape(n, g * g, c.width).astype(jnp.float32)  # (t, h, w) row-major, t = 1
        cls = self.param("cls_token", with_axes(nn.initializers.normal(0.02), (None, None, "embed")),
                         (1, 1, c.width), self.param_dtype)
        pos = self.param("pos_embed", with_axes(nn.initializers.normal(0.02), (None, "positions", "embed")),
                         (1, 1 + g_param * g_param, c.width), self.param_dtype).astype(jnp.float32)
        pos = jnp.concatenate([pos[:, :1], _resize_patch_pos_embed(pos[:, 1:], g_param, g)], axis=1)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(jnp.float32), (n, 1, c.width)), tokens], axis=1) + pos
        self.sow("intermediates", "preproc_tokens", x)
        x = LayerNorm(c.layer_norm_eps, param_dtype=self.param_dtype, out_dtype=jnp.float32,
                      name="pre_transformer_layernorm")(x)
        # drop path 0 for vision upstream: the blocks are deterministic whatever `deterministic` says
        x = _run_trunk(self, x, num_heads=c.num_heads, mlp_dim=c.mlp_dim, layer_norm_eps=c.layer_norm_eps,
                       add_bias_kv=False, rates=[0.0] * c.depth, per_sample=False, remat=self.remat,
                       deterministic=deterministic)
        self.sow("intermediates", "trunk_out", x)
        return _head(self, x, c.out_dim, c.layer_norm_eps)


class ImageBindEncoder(nn.Module):
    """Video-LLaMA's `audio_encoder`: the ImageBind audio tower and (optionally) the vision tower.

    Params: {"audio": ImageBindAudio params, "vision": ImageBindVision params (only with_vision)}.
    `__call__(fbank, images=None)` runs the towers it has inputs for and is meant for `init` (which creates the
    vision params even without images); `encode_audio` / `encode_vision` run one tower.
    """

    audio_config: ImageBindAudioConfig
    vision_config: ImageBindVisionConfig | None = None
    with_vision: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    def setup(self) -> None:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat)
        self.audio = ImageBindAudio(self.audio_config, **kw)
        if self.with_vision:
            self.vision = ImageBindVision(self.vision_config or ImageBindVisionConfig(), **kw)

    def encode_audio(self, fbank: jax.Array, deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        """fbank (N, mel, time, 1) -> (feature (N, width), embedding (N, out_dim), norm logit_scale)."""
        return self.audio(fbank, deterministic)

    def encode_vision(self, images: jax.Array, deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        """images (N, H, W, 3) -> (feature (N, width), embedding (N, out_dim), unit norm)."""
        if not self.with_vision:
            raise ValueError("ImageBindEncoder was built with with_vision=False")
        return self.vision(images, deterministic)

    def __call__(self, fbank: jax.Array, images: jax.Array | None = None,
                 deterministic: bool = True) -> dict[str, tuple[jax.Array, jax.Array]]:
        out = {"audio": self.encode_audio(fbank, deterministic)}
        if self.with_vision and images is None and self.is_initializing():
            # `init(key, fbank)` must still create the vision params
            _, images = imagebind_dummy_inputs(self.audio_config, self.vision_config or ImageBindVisionConfig(),
                                               fbank.shape[0])
        if self.with_vision and images is not None:
            out["vision"] = self.encode_vision(images, deterministic)
        return out


def imagebind_dummy_inputs(audio_config: ImageBindAudioConfig, vision_config: ImageBindVisionConfig | None = None,
                           batch: int = 1) -> tuple[jax.Array, jax.Array | None]:
    """Zero inputs of the right shapes for `ImageBindEncoder.init` (fbank, images or None)."""
    fbank = jnp.zeros((batch, audio_config.num_mel_bins, audio_config.target_length, 1), jnp.float32)
    images = None
    if vision_config is not None:
        images = jnp.zeros((batch, vision_config.image_size, vision_config.image_size, 3), jnp.float32)
    return fbank, images
