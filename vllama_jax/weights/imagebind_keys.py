"""`imagebind_huge.pth` (upstream.md §4.4) <-> `ImageBindEncoder` params (`vllama_jax.models.imagebind`).

The file holds all six ImageBind modalities; only audio (and vision, used to train the audio branch) are built.
The key map *claims* every ImageBind key and explicitly *ignores* the text/depth/thermal/IMU towers and the
buffers (`log_logit_scale`, the text causal `mask`), so an unknown key in an ImageBind file is an error and a
file with none of the expected keys (EVA ViT, LLaMA, ...) is reported as the wrong file.

Upstream keys have no prefix in `imagebind_huge.pth` and `audio_encoder.` inside the Video-LLaMA model:
`imagebind_keymap(...).with_prefix("audio_encoder.", "")`. Params paths are `audio_encoder/{audio,vision}/...`.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Mapping

import jax
from flax import linen as nn

from ..config import ImageBindAudioConfig, ImageBindVisionConfig
from ..models.imagebind import ImageBindEncoder, imagebind_dummy_inputs
from .keymaps import KeyMap, Rule, load_component, rule
from ..tree import flatten_params, unflatten_params
from .readers import TensorSource, WeightsError, open_weights

PARAMS_ROOT = "audio_encoder"
OTHER_MODALITIES = ("text", "depth", "thermal", "imu")


def _block_rules(src: str, dst: str, add_bias_kv: bool) -> list[Rule]:
    """One `BlockWithMasking` (`modality_trunks.<m>.blocks.{i}`) -> `ImageBindBlock` (`blocks_{i}`)."""
    s, d = src + "blocks.{i}.", dst + "blocks_{i}/"
    qkv = tuple(f"{d}attn/{n}" for n in ("query", "key", "value"))
    rules = [
        rule(s + "attn.in_proj_weight", tuple(p + "/kernel" for p in qkv), "split3_linear"),
        rule(s + "attn.in_proj_bias", tuple(p + "/bias" for p in qkv), "split3"),
        rule(s + "attn.out_proj.weight", d + "attn/out_proj/kernel", "linear"),
        rule(s + "attn.out_proj.bias", d + "attn/out_proj/bias"),
    ]
    if add_bias_kv:
        rules += [rule(s + "attn.bias_k", d + "attn/bias_k"), rule(s + "attn.bias_v", d + "attn/bias_v")]
    for norm in ("norm_1", "norm_2"):
        rules += [rule(f"{s}{norm}.weight", f"{d}{norm}/scale"), rule(f"{s}{norm}.bias", f"{d}{norm}/bias")]
    for fc in ("fc1", "fc2"):
        rules += [rule(f"{s}mlp.{fc}.weight", f"{d}mlp/{fc}/kernel", "linear"),
                  rule(f"{s}mlp.{fc}.bias", f"{d}mlp/{fc}/bias")]
    return rules


def _head_rules(m: str, dst: str) -> list[Rule]:
    # modality_heads.<m> = Sequential(LayerNorm, SelectElement(0), Linear(no bias))
    return [
        rule(f"modality_heads.{m}.0.weight", dst + "head_norm/scale"),
        rule(f"modality_heads.{m}.0.bias", dst + "head_norm/bias"),
        rule(f"modality_heads.{m}.2.weight", dst + "head/kernel", "linear"),
    ]


def _tower_rules(m: str, stem: list[tuple[str, str, str]], pre_blocks: list[tuple[str, str, str]],
                 add_bias_kv: bool) -> list[Rule]:
    """One modality tower: its preprocessor (cls token, `stem` rules, positions), trunk (`pre_blocks` rules, the
    blocks) and head. Rules are (upstream key under the preprocessor / trunk, params path under the tower, transform)."""
    pre, trunk, dst = f"modality_preprocessors.{m}.", f"modality_trunks.{m}.", f"{PARAMS_ROOT}/{m}/"
    return ([rule(pre + "cls_token", dst + "cls_token")]
            + [rule(pre + s, dst + d, t) for s, d, t in stem]
            + [rule(pre + "pos_embedding_helper.pos_embed", dst + "pos_embed")]
            + [rule(trunk + s, dst + d, t) for s, d, t in pre_blocks]
            + _block_rules(trunk, dst, add_bias_kv) + _head_rules(m, dst))


def _audio_rules() -> list[Rule]:
    # the audio stem is called `rgbt_stem` upstream; a plain Conv2d without bias, then its LayerNorm
    stem = [("rgbt_stem.proj.weight", "stem/kernel", "conv2d"),
            ("rgbt_stem.norm_layer.weight", "stem_norm/scale", "none"),
            ("rgbt_stem.norm_layer.bias", "stem_norm/bias", "none")]
    return _tower_rules("audio", stem, [], add_bias_kv=True)


def _vision_rules() -> list[Rule]:
    # rgbt_stem.proj = Sequential(PadIm2Video, Conv3d): index 1 is the convolution
    stem = [("rgbt_stem.proj.1.weight", "stem/kernel", "conv3d")]
    # pre_transformer_layer = Sequential(LayerNorm, rearrange)
    pre_blocks = [("pre_transformer_layer.0.weight", "pre_transformer_layernorm/scale", "none"),
                  ("pre_transformer_layer.0.bias", "pre_transformer_layernorm/bias", "none")]
    return _tower_rules("vision", stem, pre_blocks, add_bias_kv=False)


def imagebind_keymap(audio_config: ImageBindAudioConfig | None = None,
                     vision_config: ImageBindVisionConfig | None = None, with_vision: bool = True) -> KeyMap:
    """Key map of `imagebind_huge.pth` onto `audio_encoder/audio/...` (+ `audio_encoder/vision/...`).

    The configs are accepted for symmetry with the other loaders; sizes are checked by `load_component` against
    the model's expected shapes. Blocks beyond a tower's configured depth are reported as unexpected keys.
    """
    del audio_config, vision_config  # layer counts come from the expected shapes
    rules = _audio_rules() + (_vision_rules() if with_vision else [])
    others = "|".join(OTHER_MODALITIES + (() if with_vision else ("vision",)))
    return KeyMap(
        "ImageBind",
        tuple(rules),
        claims=(r"^modality_(preprocessors|trunks|heads|postprocessors)\.",),
        ignore=(
            rf"^modality_(preprocessors|trunks|heads|postprocessors)\.({others})\.",
            # fixed logit-scale buffers (ln 20 for audio; vision has no scale); the scale comes from the config
            r"^modality_postprocessors\.\w+\.\d+\.log_logit_scale$",
        ),
    )


def imagebind_param_shapes(audio_config: ImageBindAudioConfig, vision_config: ImageBindVisionConfig | None = None,
                           with_vision: bool = True) -> dict[str, tuple[int, ...]]:
    """Flat {"audio_encoder/...": shape} of an `ImageBindEncoder` (computed abstractly, nothing allocated)."""
    vision_config = vision_config or ImageBindVisionConfig()
    model = ImageBindEncoder(audio_config, vision_config, with_vision)
    fbank, images = imagebind_dummy_inputs(audio_config, vision_config if with_vision else None)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), fbank, images))
    params = flatten_params(nn.unbox(abstract["params"]), PARAMS_ROOT + "/")
    return {k: tuple(v.shape) for k, v in params.items()}


def load_imagebind(
    source: TensorSource | str | Path,
    audio_config: ImageBindAudioConfig,
    vision_config: ImageBindVisionConfig | None = None,
    *,
    with_vision: bool = True,
    src_prefix: str = "",
    dtype: Any = None,
) -> dict[str, Any]:
    """Read ImageBind weights into the nested params of `ImageBindEncoder` ({"audio": ..., "vision": ...}).

    With `src_prefix == ""` (a standalone `imagebind_huge.pth`) every key of the file must be claimed by the key
    map, i.e. be an ImageBind key; with a prefix (a whole Video-LLaMA state dict) keys outside it are skipped.
    """
    if not isinstance(source, TensorSource):
        source = open_weights(source)
    keymap = imagebind_keymap(audio_config, vision_config, with_vision)
    if src_prefix:
        keymap = keymap.with_prefix(src_prefix, "")
    expected = imagebind_param_shapes(audio_config, vision_config, with_vision)
    flat = load_component(source, keymap, expected, dtype=dtype)
    if not src_prefix:
        foreign = sorted(k for k in source.keys() if not keymap.claims_key(k))
        if foreign:
            more = f" (+{len(foreign) - 8} more)" if len(foreign) > 8 else ""
            raise WeightsError(source.path, f"{keymap.name}: keys that are not ImageBind keys: "
                                            f"{', '.join(foreign[:8])}{more}")
    return unflatten_params(flat)[PARAMS_ROOT]


def imagebind_configs_from_weights(
    source: TensorSource,
    audio_num_heads: int,
    vision_num_heads: int | None = None,
    *,
    audio: ImageBindAudioConfig | None = None,
    vision: ImageBindVisionConfig | None = None,
    src_prefix: str = "",
) -> tuple[ImageBindAudioConfig, ImageBindVisionConfig | None]:
    """Tower sizes read from the tensor shapes (width, depth, mlp_dim, out_dim, kernels, vision image size).

    Head counts are not visible in the shapes and must be given; everything else (strides, eps, drop path,
    logit scale, audio mel/time sizes) is taken from `audio` / `vision` (defaults: ImageBind-Huge). The vision
    config is None when the file has no vision tower or `vision_num_heads` is None.
    """
    keys = set(source.keys())
    p = src_prefix

    def shape(key: str) -> tuple[int, ...]:
        if p + key not in keys:
            raise WeightsError(source.path, f"no {p + key!r}: not an ImageBind file?")
        return tuple(source.shape(p + key))

    def depth(trunk: str) -> int:
        pat = re.compile(re.escape(f"{p}modality_trunks.{trunk}.blocks.") + r"(\d+)\.")
        return len({int(m.group(1)) for k in keys for m in [pat.match(k)] if m})

    audio = audio or ImageBindAudioConfig()
    stem = shape("modality_preprocessors.audio.rgbt_stem.proj.weight")  # (D, 1, k, k)
    audio = dataclasses.replace(
        audio, width=stem[0], kernel_size=stem[2], depth=depth("audio"), num_heads=audio_num_heads,
        mlp_dim=shape("modality_trunks.audio.blocks.0.mlp.fc1.weight")[0],
        out_dim=shape("modality_heads.audio.2.weight")[0],
    )
    audio.validate()
    if vision_num_heads is None or f"{p}modality_preprocessors.vision.cls_token" not in keys:
        return audio, None
    vision = vision or ImageBindVisionConfig()
    vstem = shape("modality_preprocessors.vision.rgbt_stem.proj.1.weight")  # (D, 3, kt, p, p)
    num_pos = shape("modality_preprocessors.vision.pos_embedding_helper.pos_embed")[1]
    grid = int(round((num_pos - 1) ** 0.5))
    vision = dataclasses.replace(
        vision, width=vstem[0], kernel_time=vstem[2], patch_size=vstem[3], image_size=grid * vstem[3],
        depth=depth("vision"), num_heads=vision_num_heads,
        mlp_dim=shape("modality_trunks.vision.blocks.0.mlp.fc1.weight")[0],
        out_dim=shape("modality_heads.vision.2.weight")[0],
    )
    vision.validate()
    return audio, vision


def export_imagebind(params: Mapping[str, Any], with_vision: bool = True) -> dict[str, Any]:
    """Inverse of `load_imagebind`: `ImageBindEncoder` params -> upstream state dict (numpy arrays, no buffers)."""
    keymap = imagebind_keymap(with_vision=with_vision)
    return keymap.inverse(flatten_params({PARAMS_ROOT: dict(params)}))
