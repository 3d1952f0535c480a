"""Typed, validated model configs.

A config is a tree of frozen dataclasses. It is read from YAML/JSON (`load_config`), can be overridden with
`key.sub=value` strings (`apply_overrides`), and every unknown key or impossible value raises `ConfigError`
naming the dotted key. Presets for the released models live in `configs/`.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from .errors import VllamaError

DTYPE_NAMES = ("float32", "bfloat16", "float16")
TEMPLATES = ("vicuna", "llama_2", "chatml")


class ConfigError(VllamaError, ValueError):
    """An unknown key or an impossible value in a config; the message names the dotted key."""


# ----------------------------------------------------------------------------------------------------------------
# validation helpers (the model config's and the training config's): every message names the dotted key


def require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def require_positive(obj: Any, prefix: str, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        require(isinstance(v, int) and v > 0, f"{prefix}{n}", f"must be a positive integer, got {v!r}")


def require_at_least(obj: Any, prefix: str, bound: float, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        require(v >= bound, f"{prefix}{n}", f"must be >= {bound}, got {v}")


def require_divides(obj: Any, prefix: str, num: str, den: str) -> None:
    a, b = getattr(obj, num), getattr(obj, den)
    require(a % b == 0, f"{prefix}{num}", f"{a} is not divisible by {den}={b}")


@dataclass(frozen=True)
class ViTConfig:
    """EVA-CLIP ViT-g/14 (upstream.md §2.1). depth 39: the checkpoint's block 39 is not built."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1408
    depth: int = 39
    num_heads: int = 16
    mlp_dim: int = 6144
    layer_norm_eps: float = 1e-6
    ln_vision_eps: float = 1e-5  # `ln_vision` uses the PyTorch default, not the blocks' 1e-6

    def validate(self, p: str = "vit.") -> None:
        require_positive(self, p, "image_size", "patch_size", "width", "depth", "num_heads", "mlp_dim")
        require_divides(self, p, "width", "num_heads")
        require_divides(self, p, "image_size", "patch_size")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class QFormerConfig:
    """BERT-style Q-Former used query-only (upstream.md §3). Cross-attention in layers with i % cross_attention_freq == 0."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_freq: int = 2
    encoder_width: int = 1408
    num_query_tokens: int = 32
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1  # hidden and attention-probability dropout (active only when trained)

    def validate(self, p: str) -> None:
        require_positive(self, p, "hidden_size", "num_layers", "num_heads", "intermediate_size",
                         "cross_attention_freq", "encoder_width", "num_query_tokens")
        require_divides(self, p, "hidden_size", "num_heads")
        require(0.0 <= self.dropout < 1.0, f"{p}dropout", f"must be in [0, 1), got {self.dropout}")

    def has_cross_attention(self, layer: int) -> bool:
        return layer % self.cross_attention_freq == 0


@dataclass(frozen=True)
class ImageBindAudioConfig:
    """ImageBind-Huge audio tower (upstream.md §4.2)."""

    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    out_dim: int = 1024
    kernel_size: int = 16
    stride: int = 10
    num_mel_bins: int = 128
    target_length: int = 204
    drop_path_rate: float = 0.1
    logit_scale: float = 20.0
    stem_norm_eps: float = 1e-5
    layer_norm_eps: float = 1e-6

    def validate(self, p: str = "imagebind_audio.") -> None:
        require_positive(self, p, "width", "depth", "num_heads", "mlp_dim", "out_dim", "kernel_size", "stride",
                         "num_mel_bins", "target_length")
        require_divides(self, p, "width", "num_heads")
        require(self.num_mel_bins >= self.kernel_size, f"{p}num_mel_bins", "smaller than the stem kernel")

    @property
    def grid(self) -> tuple[int, int]:
        return ((self.num_mel_bins - self.kernel_size) // self.stride + 1,
                (self.target_length - self.kernel_size) // self.stride + 1)


@dataclass(frozen=True)
class ImageBindVisionConfig:
    """ImageBind-Huge vision tower (upstream.md §4.3), used only to train the audio branch."""

    image_size: int = 224
    patch_size: int = 14
    kernel_time: int = 2
    width: int = 1280
    depth: int = 32
    num_heads: int = 16
    mlp_dim: int = 5120
    out_dim: int = 1024
    layer_norm_eps: float = 1e-6

    def validate(self, p: str = "imagebind_vision.") -> None:
        require_positive(self, p, "image_size", "patch_size", "kernel_time", "width", "depth", "num_heads",
                         "mlp_dim", "out_dim")
        require_divides(self, p, "width", "num_heads")
        require_divides(self, p, "image_size", "patch_size")


@dataclass(frozen=True)
class LlamaConfig:
    """LLaMA-family decoder (upstream.md §5.1), HF semantics; grouped-query attention when num_kv_heads < num_heads."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 0  # 0: hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0

    def validate(self, p: str = "llama.") -> None:
        require_positive(self, p, "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                         "num_kv_heads", "max_position_embeddings")
        require_divides(self, p, "num_heads", "num_kv_heads")
        require_at_least(self, p, 0, "head_dim")
        if self.head_dim == 0:
            require_divides(self, p, "hidden_size", "num_heads")
        require(self.head_dim_resolved % 2 == 0, f"{p}head_dim", "RoPE needs an even head dimension")
        require(self.rope_theta > 0, f"{p}rope_theta", f"must be positive, got {self.rope_theta}")
        require(self.rms_norm_eps > 0, f"{p}rms_norm_eps", f"must be positive, got {self.rms_norm_eps}")

    @property
    def head_dim_resolved(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


LLAMA_ARITHMETIC = ("jax", "torch")


@dataclass(frozen=True)
class PrecisionConfig:
    """Compute and parameter dtypes per tower, and LLaMA's arithmetic. float32 by default (CPU); `named(mode)` gives
    the modes of `PRECISION_MODES` ("upstream", "bf16", "fp32"), which a config may name instead of listing the
    fields (`precision: upstream`).

    llama_arithmetic: "jax" keeps LLaMA's residual stream in the compute dtype (`llama`) and its attention scores
    in float32; "torch" is upstream's PyTorch arithmetic (upstream.md §1.6): the stream in the wider of the input
    embeddings' dtype and the compute dtype, as type promotion gives (the chat prompt, bf16 text + fp16 media
    concatenated as float32, runs a float32 stream; decode steps from bf16 token embeddings a bf16 one), and the
    scores rounded to the compute dtype after the matmul and after the scaling, as torch's bf16 matmul rounds
    them."""

    vit: str = "float32"
    qformer: str = "float32"
    imagebind: str = "float32"
    llama: str = "float32"
    vit_params: str = "float32"
    llama_params: str = "float32"
    trainable_params: str = "float32"
    llama_arithmetic: str = "jax"

    def validate(self, p: str = "precision.") -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "llama_arithmetic":
                require(v in LLAMA_ARITHMETIC, f"{p}{f.name}",
                        f"unknown value {v!r} (one of {', '.join(LLAMA_ARITHMETIC)})")
            else:
                require(v in DTYPE_NAMES, f"{p}{f.name}", f"unknown dtype {v!r} (one of {', '.join(DTYPE_NAMES)})")

    @classmethod
    def named(cls, mode: str) -> "PrecisionConfig":
        """The precision of a named mode (`PRECISION_MODES`); ConfigError for an unknown name."""
        if mode not in PRECISION_MODES:
            raise ConfigError(f"precision: unknown mode {mode!r} (one of {', '.join(PRECISION_MODES)}, or a mapping "
                              "of per-tower dtypes)")
        return cls(**PRECISION_MODES[mode])

    @property
    def mode(self) -> str:
        """The name of the mode this precision equals, or "custom"."""
        return next((m for m in PRECISION_MODES if PrecisionConfig.named(m) == self), "custom")


# The named precision modes (README "Precision"). Trainable parameters stay float32 in all three: they are small
# and training keeps fp32 master weights.
#   upstream: what the released weights ran with upstream (upstream.md §1.6): the ViT's Linear/Conv weights and
#     compute in fp16, the Q-Formers, ImageBind and projections computing in fp16 (their weights fp32, as under
#     fp16 autocast), LLaMA weights and matmuls in bf16 with the prompt's float32 residual stream (PyTorch's
#     arithmetic: `llama_arithmetic: torch`).
#   bf16: bf16 weights and compute everywhere (the fastest; differs from upstream by bf16 rounding of the stream).
#   fp32: float32 everywhere (matches the fp32 goldens; twice the memory of bf16).
PRECISION_MODES: dict[str, dict[str, str]] = {
    "upstream": dict(vit="float16", vit_params="float16", qformer="float16", imagebind="float16",
                     llama="bfloat16", llama_params="bfloat16", llama_arithmetic="torch"),
    "bf16": dict(vit="bfloat16", vit_params="bfloat16", qformer="bfloat16", imagebind="bfloat16",
                 llama="bfloat16", llama_params="bfloat16"),
    "fp32": {},
}


@dataclass(frozen=True)
class ModelConfig:
    """The whole Video-LLaMA model: towers, branch sizes, the LLM and its prompt template."""

    name: str = "video-llama"
    vit: ViTConfig = field(default_factory=ViTConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    video_qformer: QFormerConfig = field(
        default_factory=lambda: QFormerConfig(num_layers=2, cross_attention_freq=1, encoder_width=768)
    )
    max_frame_pos: int = 32
    equip_audio_branch: bool = True
    imagebind_audio: ImageBindAudioConfig = field(default_factory=ImageBindAudioConfig)
    imagebind_vision: ImageBindVisionConfig = field(default_factory=ImageBindVisionConfig)
    audio_qformer: QFormerConfig = field(
        default_factory=lambda: QFormerConfig(num_layers=2, cross_attention_freq=1, encoder_width=1024,
                                              num_query_tokens=8)
    )
    num_audio_positions: int = 8  # hard-coded upstream: at most 8 two-second clips
    llama: LlamaConfig = field(default_factory=LlamaConfig)
    template: str = "llama_2"
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)

    def validate(self) -> "ModelConfig":
        self.vit.validate("vit.")
        self.qformer.validate("qformer.")
        self.video_qformer.validate("video_qformer.")
        self.audio_qformer.validate("audio_qformer.")
        self.imagebind_audio.validate("imagebind_audio.")
        self.imagebind_vision.validate("imagebind_vision.")
        self.llama.validate("llama.")
        self.precision.validate("precision.")
        require_positive(self, "", "max_frame_pos", "num_audio_positions")
        require(self.template in TEMPLATES, "template",
                f"unknown template {self.template!r} (one of {', '.join(TEMPLATES)})")
        require(self.qformer.encoder_width == self.vit.width, "qformer.encoder_width",
                f"{self.qformer.encoder_width} must equal vit.width={self.vit.width}")
        require(self.video_qformer.encoder_width == self.qformer.hidden_size, "video_qformer.encoder_width",
                f"{self.video_qformer.encoder_width} must equal qformer.hidden_size={self.qformer.hidden_size}")
        if self.equip_audio_branch:
            require(self.audio_qformer.encoder_width == self.imagebind_audio.out_dim, "audio_qformer.encoder_width",
                    f"{self.audio_qformer.encoder_width} must equal imagebind_audio.out_dim="
                    f"{self.imagebind_audio.out_dim}")
            require(self.imagebind_vision.out_dim == self.imagebind_audio.out_dim, "imagebind_vision.out_dim",
                    f"{self.imagebind_vision.out_dim} must equal imagebind_audio.out_dim="
                    f"{self.imagebind_audio.out_dim}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# dict / YAML <-> dataclass


def from_dict(cls: type, data: Mapping[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise ConfigError naming the key. Fields
    typed `tuple[X, ...]` take a list, `dict[str, X]` a mapping; an empty YAML section (None) reads as the
    defaults."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or '<root>'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{prefix}{key}: unknown key (known: {', '.join(sorted(fields))})")
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, str) and hasattr(tp, "named"):  # a named preset, e.g. `precision: upstream`
            try:
                return tp.named(value)
            except ConfigError as e:
                raise ConfigError(f"{key}: {str(e).split(': ', 1)[1]}") from None
        return from_dict(tp, value, key + ".")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if value is None:
            return ()
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected a boolean, got {value!r}")
    if tp in (int, float):
        if isinstance(value, str):
            try:
                return tp(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if tp is float:
                return float(value)
            if isinstance(value, int) or value.is_integer():
                return int(value)
        raise ConfigError(f"{key}: expected {'an integer' if tp is int else 'a number'}, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------------------------
# `key=value` overrides (the model config's `apply_overrides`, the training config's `--set`)


def override_dict(data: dict[str, Any], overrides: Sequence[str] | None,
                  open_keys: Mapping[str, Callable[[], Any] | None] | None = None) -> dict[str, Any]:
    """Apply `a.b.c=value` strings (values parsed as YAML scalars) to a nested config dict, in place. Keys must
    exist, except directly below the dotted paths of `open_keys`, where new entries may be added: a new leaf as
    given, a new inner entry from the path's factory (`None`: no inner entries)."""
    open_keys = open_keys or {}
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        parts = key.strip().split(".")
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            factory = open_keys.get(".".join(parts[:i]))
            if part not in node and factory is not None:
                node[part] = factory()
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: unknown key")
            node = node[part]
        if parts[-1] not in node and ".".join(parts[:-1]) not in open_keys:
            raise ConfigError(f"{key.strip()}: unknown key")
        node[parts[-1]] = value
    return data


def apply_overrides(cfg: Any, overrides: Sequence[str] | None) -> Any:
    """Apply `a.b.c=value` strings (values parsed as YAML scalars) to a dataclass config."""
    if not overrides:
        return cfg
    return from_dict(type(cfg), override_dict(dataclasses.asdict(cfg), overrides))


def _parse_error(e: BaseException) -> str:
    """One line for a YAML/JSON parse error (PyYAML's messages span several lines with a quoted snippet)."""
    mark = getattr(e, "problem_mark", None)
    if isinstance(e, yaml.MarkedYAMLError) and mark is not None:
        return f"{e.problem or e.context} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(e).split()) or type(e).__name__


def load_config_dict(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError, RecursionError) as e:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {_parse_error(e)}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_model_config(path: str | Path, overrides: list[str] | None = None) -> ModelConfig:
    """Read a model config file (YAML or JSON); a top-level `model:` section is accepted too."""
    data = load_config_dict(path)
    if "model" in data and isinstance(data["model"], dict) and set(data) <= {"model"}:
        data = data["model"]
    try:
        cfg = from_dict(ModelConfig, data)
        return apply_overrides(cfg, overrides).validate()
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def config_to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
