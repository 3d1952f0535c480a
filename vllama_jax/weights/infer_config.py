"""The model config of a conversion, read from the input files' shapes (`infer_config`).

Whatever the shapes decide is read from the files (LLaMA sizes from config.json or the GGUF metadata; ViT
width/patch/image size/MLP/depth; Q-Former sizes, cross-attention layout, query tokens, `max_frame_pos`, audio
positions; ImageBind tower sizes; whether the audio branch exists). The rest (head counts of the towers, eps values,
precision, template) comes from `--config`, else the defaults (the released sizes). A value of `--config` that
contradicts the files is an error naming both; `--set key=value` is applied last and silences such a check for its
key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..config import ConfigError, ModelConfig, apply_overrides, from_dict, load_model_config
from .detect import ORDER, ConvertError
from .imagebind_keys import imagebind_configs_from_weights
from .llama_keys import llama_config_from_gguf, llama_config_from_hf
from .readers import GGUFSource, TensorSource

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _short(path: str | Path) -> str:
    """`parent/name`: enough to recognise a file in a message without the whole path."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name



class _Evidence:
    """Values read from the files, each with where it was read; two files disagreeing is an error."""

    def __init__(self) -> None:
        self.values: dict[str, tuple[Any, str]] = {}

    def add(self, key: str, value: Any, where: str) -> None:
        if key in self.values and not _same(self.values[key][0], value):
            old, old_where = self.values[key]
            raise ConvertError(f"{key}: {old_where} says {old}, {where} says {value}")
        self.values.setdefault(key, (value, where))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    return a == b


def _get(d: Mapping[str, Any], key: str) -> Any:
    for part in key.split("."):
        d = d[part]
    return d


def _put(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for part in parts[:-1]:
        d = d[part]
    d[parts[-1]] = value


def _shape(src: TensorSource, key: str) -> tuple[int, ...]:
    if key not in src.keys():
        raise ConvertError(f"{src.path}: no tensor {key!r}; is it the right file?")
    return tuple(int(d) for d in src.shape(key))


def _layer_indices(keys: Iterable[str], prefix: str) -> list[int]:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in keys for m in [pat.match(k)] if m})


def _infer_qformer(src: TensorSource, upstream: str, section: str, ev: _Evidence, base_freq: int) -> None:
    where = f"{_short(src.path)} ({upstream})"
    keys = src.keys()
    p = f"{upstream}.bert.encoder.layer."
    layers = _layer_indices(keys, p)
    if not layers:
        raise ConvertError(f"{src.path}: no {upstream} layers found")
    n = layers[-1] + 1
    ev.add(f"{section}.num_layers", n, where)
    ev.add(f"{section}.hidden_size", _shape(src, f"{upstream}.bert.embeddings.LayerNorm.weight")[0], where)
    ev.add(f"{section}.intermediate_size", _shape(src, f"{p}0.intermediate_query.dense.weight")[0], where)
    cross = [i for i in layers if f"{p}{i}.crossattention.self.key.weight" in keys]
    if not cross or cross[0] != 0:
        raise ConvertError(f"{src.path}: {upstream} layer 0 has no cross-attention (unsupported layout)")
    ev.add(f"{section}.encoder_width", _shape(src, f"{p}0.crossattention.self.key.weight")[1], where)
    # cross-attention in layers i % f == 0; with only layer 0, every f >= n describes it (keep the config's)
    freq = (cross[1] - cross[0]) if len(cross) > 1 else (base_freq if base_freq >= n else n)
    if cross != list(range(0, n, freq)):
        raise ConvertError(f"{src.path}: {upstream} cross-attention layers {cross} are not every {freq}th layer")
    ev.add(f"{section}.cross_attention_freq", freq, where)


def _infer_from_file(kind: str, src: TensorSource, llama_path: Path | None, ev: _Evidence,
                     base: ModelConfig) -> dict[str, Any]:
    """Record in `ev` what `src` decides; returns extra facts (EVA block count)."""
    where = _short(src.path)
    facts: dict[str, Any] = {}
    if kind == "eva_vit":
        d, _, ph, pw = _shape(src, "patch_embed.proj.weight")
        ev.add("vit.width", d, where)
        ev.add("vit.patch_size", ph, where)
        npos = _shape(src, "pos_embed")[1] - 1
        grid = math.isqrt(npos)
        if grid * grid != npos or ph != pw:
            raise ConvertError(f"{src.path}: pos_embed has {npos} patch positions, not a square grid")
        ev.add("vit.image_size", grid * ph, where)
        ev.add("vit.mlp_dim", _shape(src, "blocks.0.mlp.fc1.weight")[0], where)
        facts["eva_blocks"] = len(_layer_indices(src.keys(), "blocks."))
    elif kind == "blip2":
        _infer_qformer(src, "Qformer", "qformer", ev, base.qformer.cross_attention_freq)
        tok = _shape(src, "query_tokens")
        ev.add("qformer.num_query_tokens", tok[1], where)
        ev.add("qformer.hidden_size", tok[2], where)
        ev.add("vit.width", _shape(src, "ln_vision.weight")[0], f"{where} (ln_vision)")
    elif kind == "vl_ckpt":
        _infer_qformer(src, "video_Qformer", "video_qformer", ev, base.video_qformer.cross_attention_freq)
        ev.add("video_qformer.num_query_tokens", _shape(src, "video_query_tokens")[1], where)
        ev.add("max_frame_pos", _shape(src, "video_frame_position_embedding.weight")[0], where)
        ev.add("llama.hidden_size", _shape(src, "llama_proj.weight")[0], f"{where} (llama_proj)")
    elif kind == "al_ckpt":
        _infer_qformer(src, "audio_Qformer", "audio_qformer", ev, base.audio_qformer.cross_attention_freq)
        ev.add("audio_qformer.num_query_tokens", _shape(src, "audio_query_tokens")[1], where)
        pos = _shape(src, "audio_position_embedding.weight")
        ev.add("num_audio_positions", pos[0], where)
        ev.add("imagebind_audio.out_dim", pos[1], f"{where} (audio_position_embedding)")
        ev.add("llama.hidden_size", _shape(src, "audio_llama_proj.weight")[0], f"{where} (audio_llama_proj)")
        ev.add("equip_audio_branch", True, where)
    elif kind == "imagebind":
        # head counts are not in the shapes: pass 1 (always valid) and take only the shape-given fields
        try:
            audio, vision = imagebind_configs_from_weights(src, 1, 1, audio=base.imagebind_audio,
                                                           vision=base.imagebind_vision)
        except ConfigError as e:
            raise ConvertError(f"{src.path}: impossible ImageBind shapes ({e})") from None
        for f in ("width", "kernel_size", "depth", "mlp_dim", "out_dim"):
            ev.add(f"imagebind_audio.{f}", getattr(audio, f), where)
        if vision is not None:
            for f in ("width", "kernel_time", "patch_size", "image_size", "depth", "mlp_dim", "out_dim"):
                ev.add(f"imagebind_vision.{f}", getattr(vision, f), where)
        ev.add("equip_audio_branch", True, where)
    elif kind == "llama":
        if isinstance(src, GGUFSource):
            lc, where = llama_config_from_gguf(src), _short(src.path)
        else:
            folder = llama_path if llama_path is not None and llama_path.is_dir() else Path(src.path).parent
            lc, where = llama_config_from_hf(folder), _short(Path(folder) / "config.json")
        for f in dataclasses.fields(lc):
            v = lc.head_dim_resolved if f.name == "head_dim" else getattr(lc, f.name)
            ev.add(f"llama.{f.name}", v, where)
    return facts


# (heads key, width key): head counts are invisible in the shapes; without --config they are the released
# models' and only valid for the released widths
_HEADS = (("vit.num_heads", "vit.width"), ("qformer.num_heads", "qformer.hidden_size"),
          ("video_qformer.num_heads", "video_qformer.hidden_size"),
          ("audio_qformer.num_heads", "audio_qformer.hidden_size"),
          ("imagebind_audio.num_heads", "imagebind_audio.width"),
          ("imagebind_vision.num_heads", "imagebind_vision.width"))


def _infer_template(llama_path: Path | None, source: TensorSource | None, others: Iterable[Path]) -> str | None:
    names = " ".join(p.name.lower() for p in ([llama_path] if llama_path else []) + list(others))
    if isinstance(source, GGUFSource):
        tpl = source.field("tokenizer.chat_template")
        if isinstance(tpl, str) and tpl:
            return "llama_2" if "[INST]" in tpl else "chatml"
    if re.search(r"llama.?2", names):
        return "llama_2"
    if "vicuna" in names:
        return "vicuna"
    if llama_path is not None and llama_path.is_dir():
        try:
            tpl = json.loads((llama_path / "tokenizer_config.json").read_text()).get("chat_template")
        except (OSError, ValueError, AttributeError):
            tpl = None
        if isinstance(tpl, str) and tpl:
            return "llama_2" if "[INST]" in tpl else "chatml"
    return None


def resolve_config_arg(config: str | Path) -> Path:
    """A config file path, or a preset name from configs/ (with or without .yaml)."""
    p = Path(config).expanduser()
    if p.is_file():
        return p
    for cand in (REPO_CONFIGS / f"{config}", REPO_CONFIGS / f"{config}.yaml"):
        if cand.is_file():
            return cand
    presets = sorted(q.stem for q in REPO_CONFIGS.glob("*.yaml")) if REPO_CONFIGS.is_dir() else []
    raise ConvertError(f"{config}: no such config file or preset (presets: {', '.join(presets) or 'none'})")


def load_base_config(config: str | Path | ModelConfig | None) -> tuple[ModelConfig | None, str]:
    """`--config` as (the ModelConfig or None, how messages name it); `config` is a ModelConfig, a config file or a
    preset name."""
    if config is None or isinstance(config, ModelConfig):
        return config, "--config"
    cpath = resolve_config_arg(config)
    try:
        return load_model_config(cpath), f"--config {cpath.name}"
    except ConfigError as e:
        raise ConvertError(str(e)) from None


def infer_config(
    sources: Mapping[str, TensorSource],
    *,
    llama_path: Path | None = None,
    config: ModelConfig | None = None,
    config_label: str = "--config",
    overrides: Sequence[str] = (),
    name: str = "converted",
    notes: list[str] | None = None,
) -> ModelConfig:
    """The model config: shape-decided values from `sources`, the rest from `config` (else defaults), then
    `overrides`. A `config` value contradicting the files raises ConvertError naming both (unless overridden)."""
    notes = notes if notes is not None else []
    given = config is not None
    base = config if given else ModelConfig()
    set_keys = {o.split("=", 1)[0].strip() for o in overrides}
    ev = _Evidence()
    facts: dict[str, Any] = {}
    for kind in ORDER:
        if kind in sources:
            facts.update(_infer_from_file(kind, sources[kind], llama_path, ev, base))

    data = dataclasses.asdict(base)
    for key, (value, where) in ev.values.items():
        current = base.llama.head_dim_resolved if key == "llama.head_dim" else _get(data, key)
        if given and key not in set_keys and not _same(current, value):
            raise ConvertError(f"{key}: {config_label} says {current}, {where} says {value} "
                               f"(fix the config or pass --set {key}=...)")
        _put(data, key, value)
    if "llama.head_dim" in ev.values:  # store 0 ("hidden / heads") when that is what it is
        lc = data["llama"]
        if lc["head_dim"] * lc["num_heads"] == lc["hidden_size"]:
            lc["head_dim"] = 0

    if "eva_blocks" in facts:
        blocks = facts["eva_blocks"]
        if given:
            if base.vit.depth > blocks and "vit.depth" not in set_keys:
                raise ConvertError(f"vit.depth: {config_label} says {base.vit.depth}, "
                                   f"{_short(sources['eva_vit'].path)} has only {blocks} blocks")
        else:
            # upstream builds EVA-g with depth 39 and drops the file's 40th block; other files: all blocks
            data["vit"]["depth"] = blocks - 1 if (blocks == 40 and data["vit"]["width"] == 1408) else blocks
            if data["vit"]["depth"] != blocks:
                notes.append(f"vit.depth {data['vit']['depth']}: the EVA-g file's last block is unused, as upstream")

    if not given:
        data["name"] = name
        data["equip_audio_branch"] = "imagebind" in sources or "al_ckpt" in sources
        defaults = dataclasses.asdict(ModelConfig())
        for heads_key, width_key in _HEADS:
            if width_key in ev.values and heads_key not in set_keys:
                width, where = ev.values[width_key]
                if width != _get(defaults, width_key):
                    raise ConvertError(
                        f"{heads_key}: not visible in the weights ({where} has {width_key.split('.')[-1]} {width}, "
                        f"not the released {_get(defaults, width_key)}); give --config with the model's sizes or "
                        f"--set {heads_key}=N")
        tpl = _infer_template(llama_path, sources.get("llama"),
                              [Path(s.path) for k, s in sources.items() if k in ("vl_ckpt", "al_ckpt")])
        if tpl is None:
            notes.append(f"template: could not tell from the file names, using {data['template']} "
                         "(--set template=vicuna|llama_2|chatml to change)")
        else:
            data["template"] = tpl
    try:
        cfg = from_dict(ModelConfig, data)
        cfg = apply_overrides(cfg, list(overrides))
        return cfg.validate()
    except ConfigError as e:
        raise ConvertError(f"config: {e}") from None


