"""Read parameter groups from upstream files, model directories or checkpoints, and initialise the rest
(upstream.md §10). `load_groups` is the one way the package reads or makes parameter groups; `init_groups` its one
random initialisation; `load_file` reads one upstream file.

Each upstream file kind fills the parameter groups `models.groups` lists for it (its `file` column). Missing
parameters, unexpected keys and shape mismatches raise `WeightsError` naming the keys and the file.

Callers: the converter (`convert`: streams every tensor into the model directory, `--init-missing` groups too), the
trainer (`Trainer.load_params`: model dir, towers, `llama_proj_model`, `ckpt`, `ckpt_2` in upstream's order, the
rest initialised on the mesh), and `load_upstream` (every given file at once, for tests and scripts). The embedded
default model makes its own parameters (`vllama_jax.defaults`, whose docstring says why).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np

from ..config import ModelConfig
from ..errors import VllamaError
from ..models import abstract_for_groups, cast_to_config_dtypes, init_params
from ..models.groups import FILE_KINDS, groups_of_file, model_groups
from ..tree import flatten_params, top_group, unflatten_params
from .arrays import contiguous
from .imagebind_keys import imagebind_keymap
from .keymaps import (
    CHECKPOINT_BUFFERS,
    KeyMap,
    audio_branch_keymap,
    eva_vit_keymap,
    image_qformer_keymap,
    load_component,
    video_branch_keymap,
)
from .llama_keys import llama_gguf_keymap, llama_hf_keymap
from .model_dir import load_model_dir, model_dir_groups
from .readers import GGUFSource, TensorSource, WeightsError, open_weights

log = logging.getLogger(__name__)

#: `Source` kinds besides the upstream file kinds of `FILE_KINDS` (each read strictly: every group of its kind)
LLAMA_PROJ_MODEL = "llama_proj_model"  # MiniGPT-4's checkpoint: only `llama_proj` is read, non-strictly (VL stage 1)
CHECKPOINT = "ckpt"  # a Video-LLaMA checkpoint: each branch (VL, AL) whose keys it holds, strictly, as upstream
MODEL_DIR = "model_dir"  # a model directory (`model_dir`)
PARAMS = "params"  # parameters already in our layout ({params path: array} or nested), e.g. a training checkpoint's
SOURCE_KINDS = FILE_KINDS + (LLAMA_PROJ_MODEL, CHECKPOINT, MODEL_DIR, PARAMS)


class MissingGroupsError(VllamaError):
    """`load_groups` was told some groups must come from a source, and none gave them."""

    def __init__(self, groups: Iterable[str]):
        self.groups = list(groups)
        super().__init__(f"no source gives the parameter group(s) {', '.join(self.groups)}")


@dataclass(frozen=True)
class Source:
    """One place `load_groups` reads parameters from. `where`: a path (or an open `TensorSource`) for the file
    kinds and `ckpt`, a folder for `model_dir`, a mapping for `params`. `groups`: take only these from it (None:
    every wanted group it has). `name`: how messages and `on_source` name it (default: the kind)."""

    kind: str
    where: Any
    groups: tuple[str, ...] | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"unknown source kind {self.kind!r} (one of {', '.join(SOURCE_KINDS)})")

    @property
    def label(self) -> str:
        return self.name or self.kind


def _kind_groups(kind: str, config: ModelConfig) -> tuple[str, ...] | None:
    """The groups a source of `kind` can give (None: any; a model directory or in-memory params)."""
    if kind in FILE_KINDS:
        return groups_of_file(kind)
    if kind == LLAMA_PROJ_MODEL:
        return ("llama_proj",)
    if kind == CHECKPOINT:
        return groups_of_file("vl_ckpt") + (groups_of_file("al_ckpt") if config.equip_audio_branch else ())
    return None


def load_groups(
    config: ModelConfig,
    sources: Iterable[Source],
    groups: Iterable[str],
    *,
    seed: int = 0,
    required: Iterable[str] = (),
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    shardings: Mapping[str, Any] | None = None,
    on_tensor: Callable[[str, np.ndarray], None] | None = None,
    on_source: Callable[[str, tuple[str, ...]], None] | None = None,
) -> dict[str, Any]:
    """The parameter groups `groups` of the model `config`: read from `sources` in order, a later source's group
    replacing an earlier one's (upstream's load order: towers, `llama_proj_model`, `ckpt`, `ckpt_2`, upstream.md
    §10.5); the groups no source gives are initialised (`init_groups` with `seed`). Returns {group: nested tree}
    in the order of `groups`.

    required: groups that must come from a source; `MissingGroupsError` (raised before any initialisation) if not.
    shapes: flat {params path: shape} of at least every group the sources' kinds fill (default: traced from config).
    shardings: {group: tree of Sharding}: initialised groups are created on them and model-directory groups restored
      onto them. Groups read from files come back as host numpy arrays in the files' dtypes: the caller places them.
    on_tensor: streaming: every array, read or initialised, is handed to `on_tensor(params path, numpy array)` as it
      comes instead of being kept (a later source's tensor for the same path comes after); the result is then {}.
    on_source: called with (source label, the wanted groups it may give) before each source is read, and with
      ("init", groups) before the initialisation: progress and logging.
    """
    wanted = tuple(dict.fromkeys(groups))
    sources = list(sources)
    given: dict[str, dict[str, Any]] = {}  # group -> {params path: array}, from the latest source giving it
    have: set[str] = set()  # groups some source gave (kept in `given`, or streamed)
    file_shapes: dict[str, tuple[int, ...]] | None = dict(shapes) if shapes is not None else None

    def shapes_for_files() -> dict[str, tuple[int, ...]]:
        nonlocal file_shapes
        if file_shapes is None:
            needed = set(wanted).union(*(_kind_groups(s.kind, config) or () for s in sources))
            abstract, _ = abstract_for_groups(config, [g for g in model_groups(config) if g in needed])
            file_shapes = {p: tuple(v.shape) for p, v in flatten_params(abstract).items()}
        return file_shapes

    for src in sources:
        can = _kind_groups(src.kind, config)
        take = {g for g in wanted if (can is None or g in can) and (src.groups is None or g in src.groups)}
        if not take:
            continue
        if on_source is not None:
            on_source(src.label, tuple(g for g in wanted if g in take))
        this: dict[str, Any] = {}
        got: set[str] = set()

        def sink(path: str, array: Any) -> None:
            g = top_group(path)
            if g in take:
                got.add(g)
                if on_tensor is None:  # kept: a view of a file's pages (a transposed Linear weight) made whole
                    this[path] = contiguous(array) if isinstance(array, np.ndarray) else array
                else:
                    on_tensor(path, np.asarray(array))

        _read_source(src, config, take, shapes_for_files, shardings, sink)
        for g in got:
            given[g] = {p: v for p, v in this.items() if top_group(p) == g}
        have |= got
        if src.kind == CHECKPOINT and not got:
            log.warning("%s: %s holds none of the wanted groups (%s)", src.label, src.where, sorted(take))

    missing = [g for g in required if g in wanted and g not in have]
    if missing:
        raise MissingGroupsError(missing)
    fresh = [g for g in wanted if g not in have]
    made: dict[str, Any] = {}
    if fresh:
        if on_source is not None:
            on_source("init", tuple(fresh))
        made = init_groups(config, fresh, seed, shardings)
        if on_tensor is not None:
            for path, array in flatten_params(made).items():
                on_tensor(path, np.asarray(array))
    if on_tensor is not None:
        return {}
    return {g: made[g] if g in made else unflatten_params(given[g])[g] for g in wanted}


def _read_source(src: Source, config: ModelConfig, take: set[str],
                 shapes: Callable[[], Mapping[str, tuple[int, ...]]], shardings: Mapping[str, Any] | None,
                 sink: Callable[[str, Any], None]) -> None:
    """Hand every array of `src` (within the wanted groups `take`; `sink` filters) to `sink`."""
    if src.kind in FILE_KINDS:
        load_file(src.kind, src.where, config, shapes(), on_tensor=sink)
    elif src.kind == LLAMA_PROJ_MODEL:
        source = src.where if isinstance(src.where, TensorSource) else open_weights(src.where)
        expected = {p: s for p, s in shapes().items() if top_group(p) == "llama_proj"}
        load_component(source, video_branch_keymap(), expected, strict_unexpected=False, on_tensor=sink)
    elif src.kind == CHECKPOINT:
        source = src.where if isinstance(src.where, TensorSource) else open_weights(src.where)
        keys = source.keys()
        for kind, km in (("vl_ckpt", video_branch_keymap()), ("al_ckpt", audio_branch_keymap())):
            if kind == "al_ckpt" and not config.equip_audio_branch:
                continue
            # a branch is there when a key of it is (buffers such as the other branch's `position_ids` do not count:
            # the released AL checkpoint carries `video_Qformer.bert.embeddings.position_ids`)
            if set(groups_of_file(kind)) & take and any(km.claims_key(k) and not km.ignores_key(k) for k in keys):
                load_file(kind, source, config, shapes(), on_tensor=sink)
    elif src.kind == MODEL_DIR:
        present = set(model_dir_groups(src.where))
        wanted = [g for g in take if g in present]
        if wanted:
            on = None if shardings is None else {g: shardings[g] for g in wanted}
            for path, array in flatten_params(load_model_dir(src.where, groups=wanted, shardings=on).params).items():
                sink(path, array)
    else:  # PARAMS
        for path, array in flatten_params(src.where).items():
            sink(path, array)


def init_groups(config: ModelConfig, groups: Iterable[str], seed: int = 0,
                shardings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Upstream-style random init of some groups: the values `models.init_params(config, seed)` gives them. Under
    jit, XLA's dead-code elimination skips every other group's initialisers (the LLM is never made unless asked
    for); with `shardings` ({group: tree of Sharding}) the groups are created sharded."""
    groups = tuple(groups)
    if not groups:
        return {}
    kw = {} if shardings is None else {"out_shardings": {g: shardings[g] for g in groups}}
    return jax.jit(lambda: {g: init_params(config, seed)[g] for g in groups}, **kw)()


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
    groups = groups_of_file(kind)
    if kind == "imagebind" and not config.equip_audio_branch:
        raise WeightsError(source.path, "the config has no audio branch (equip_audio_branch: false)")
    if kind == "al_ckpt" and not config.equip_audio_branch:
        raise WeightsError(source.path, "an audio-branch checkpoint needs a config with equip_audio_branch: true")
    if shapes is None:
        abstract, _ = abstract_for_groups(config, groups)
        shapes = {p: tuple(v.shape) for p, v in flatten_params(abstract).items()}
    keymap = keymap_for(kind, config, source)
    expected = {p: s for p, s in shapes.items() if top_group(p) in groups}
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
    given = files.given()
    groups = [g for kind in given for g in groups_of_file(kind)]
    params = load_groups(config, [Source(kind, path) for kind, path in given.items()], groups, required=groups)
    if dtype is not None:
        return jax.tree.map(lambda a: a.astype(dtype), params)
    return cast_to_config_dtypes(params, config)
