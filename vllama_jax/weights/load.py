"""Load the upstream files into the params pytree (upstream.md §10).

Each upstream file kind fills the parameter groups `models.groups` lists for it (its `file` column).

Missing parameters, unexpected keys and shape mismatches raise `WeightsError` naming the keys and the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from ..config import ModelConfig
from ..models import abstract_params, cast_to_config_dtypes
from ..models.groups import FILE_KINDS, groups_of_file
from ..tree import flatten_params, unflatten_params
from .keymaps import (
    CHECKPOINT_BUFFERS,
    KeyMap,
    audio_branch_keymap,
    eva_vit_keymap,
    image_qformer_keymap,
    load_component,
    video_branch_keymap,
)
from .imagebind_keys import imagebind_keymap
from .llama_keys import llama_gguf_keymap, llama_hf_keymap
from .readers import GGUFSource, TensorSource, WeightsError, open_weights


@dataclass
class UpstreamFiles:
    """Paths of the upstream files; any may be None (that part is then not loaded)."""

    eva_vit: Path | str | None = None
    blip2: Path | str | None = None
    imagebind: Path | str | None = None
    llama: Path | str | None = None
    vl_ckpt: Path | str | None = None
    al_ckpt: Path | str | None = None

    def given(self) -> dict[str, Path]:
        return {k: Path(getattr(self, k)) for k in FILE_KINDS if getattr(self, k) is not None}


def keymap_for(kind: str, config: ModelConfig, source: TensorSource | None = None) -> KeyMap:
    if kind == "eva_vit":
        return eva_vit_keymap(config.vit.depth)
    if kind == "blip2":
        return image_qformer_keymap()
    if kind == "vl_ckpt":
        return video_branch_keymap()
    if kind == "al_ckpt":
        return audio_branch_keymap()
    if kind == "imagebind":
        return imagebind_keymap(config.imagebind_audio, config.imagebind_vision, with_vision=True)
    if kind == "llama":
        km = llama_gguf_keymap(config.llama) if isinstance(source, GGUFSource) else llama_hf_keymap(config.llama)
        return km.with_prefix("", "llama")
    raise ValueError(f"unknown file kind {kind!r}")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    tree, _ = abstract_params(config)
    return {k: tuple(v.shape) for k, v in flatten_params(tree).items()}


def _in_groups(path: str, groups: Iterable[str]) -> bool:
    top = path.split("/", 1)[0]
    return top in groups


def load_file(
    kind: str,
    path: Path | str | TensorSource,
    config: ModelConfig,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    *,
    dtype: Any = None,
    on_tensor: Callable[[str, np.ndarray], None] | None = None,
) -> dict[str, np.ndarray]:
    """Load one upstream file of `kind` into flat {params path: array} (or stream it to `on_tensor`)."""
    if kind not in FILE_KINDS:
        raise ValueError(f"unknown file kind {kind!r} (one of {', '.join(FILE_KINDS)})")
    source = path if isinstance(path, TensorSource) else open_weights(path)
    shapes = shapes if shapes is not None else expected_shapes(config)
    groups = groups_of_file(kind)
    if kind == "imagebind" and not config.equip_audio_branch:
        raise WeightsError(source.path, "the config has no audio branch (equip_audio_branch: false)")
    if kind == "al_ckpt" and not config.equip_audio_branch:
        raise WeightsError(source.path, "an audio-branch checkpoint needs a config with equip_audio_branch: true")
    keymap = keymap_for(kind, config, source)
    expected = {p: s for p, s in shapes.items() if _in_groups(p, groups)}
    out = load_component(source, keymap, expected, dtype=dtype, on_tensor=on_tensor)
    if kind in ("vl_ckpt", "al_ckpt"):
        _check_checkpoint_keys(source, config)
    return out


def _check_checkpoint_keys(source: TensorSource, config: ModelConfig) -> None:
    """A Video-LLaMA checkpoint may hold the VL and AL branches and buffers; anything else is unexpected."""
    maps = [video_branch_keymap()] + ([audio_branch_keymap()] if config.equip_audio_branch else [])
    unknown = [
        k for k in source.keys()
        if not any(m.claims_key(k) for m in maps) and not any(re.match(b, k) for b in CHECKPOINT_BUFFERS)
    ]
    if unknown:
        shown = ", ".join(sorted(unknown)[:8]) + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else "")
        raise WeightsError(source.path, f"unexpected keys for a Video-LLaMA checkpoint: {shown}")


def load_upstream(
    config: ModelConfig,
    files: UpstreamFiles,
    *,
    dtype: Any = None,
) -> dict[str, Any]:
    """Load every given file; returns the nested params tree of the parts that were given.

    Leaves take the parameter dtypes of `config.precision` unless `dtype` forces one for all.
    """
    shapes = expected_shapes(config)
    flat: dict[str, np.ndarray] = {}
    for kind, path in files.given().items():
        flat.update(load_file(kind, path, config, shapes, dtype=dtype))
    params = unflatten_params(flat)
    return params if dtype is not None else cast_to_config_dtypes(params, config)
