"""The parameter groups of Video-LLaMA: the one table of what each top-level group is, where it comes from and
what trains it. Every other package (conversion, loading, training, chat, the embedded default) derives its lists
from here.

A group is a top-level key of the params tree, named as the upstream attribute (upstream.md §1.8, §10):

| group | upstream file | stored-dtype tower | branch | trained when this upstream flag is False |
|---|---|---|---|---|
| visual_encoder | eva_vit | vit | video | (frozen) |
| qformer, query_tokens, ln_vision | blip2 | qformer | video | (frozen) |
| video_qformer, video_query_tokens, video_frame_position_embedding | vl_ckpt | trainable | video | frozen_video_qformer |
| llama_proj | vl_ckpt | trainable | video | frozen_llama_proj |
| audio_encoder | imagebind | imagebind | audio | (frozen) |
| audio_qformer, audio_query_tokens, audio_position_embedding, audio_llama_proj | al_ckpt | trainable | audio | frozen_audio_qformer |
| llama | llama | llama | both | (frozen) |
| llama_lora | (none: initialised) | trainable | both | lora (trained when configured: `lora.rank` > 0) |

Audio groups exist only in a config with ``equip_audio_branch``, ``llama_lora`` (the LLM's LoRA adapters,
`models.lora`) only in one with ``lora.rank > 0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from ..config import ModelConfig


@dataclass(frozen=True)
class Group:
    name: str
    file: str  # upstream file kind that holds it (see FILE_KINDS); "" for none (always initialised)
    tower: str  # which stored-dtype choice applies to it (see TOWERS)
    branch: str  # "video", "audio" or "llm" (read by both branches)
    # the training switch that trains it: an upstream freeze flag (trains it when False) or LORA_SWITCH (trains it
    # when configured); None: always frozen
    trained_by: str | None = None
    projection: bool = False  # its output enters the LLM's embedding space directly


#: upstream file kinds, in the order the conversion reads them is decided by the converter
FILE_KINDS = ("eva_vit", "blip2", "imagebind", "llama", "vl_ckpt", "al_ckpt")
#: stored-dtype choices (`--dtype-<tower>` of the converter)
TOWERS = ("vit", "qformer", "imagebind", "llama", "trainable")
#: the upstream freeze flags of the training configs
FREEZE_FLAGS = ("frozen_video_qformer", "frozen_llama_proj", "frozen_audio_qformer")
#: the training config section that trains the LoRA adapters when configured (`lora.rank` > 0)
LORA_SWITCH = "lora"
#: the LLM's LoRA adapters (`models.lora`)
LORA_GROUP = "llama_lora"

TABLE: tuple[Group, ...] = (
    Group("visual_encoder", "eva_vit", "vit", "video"),
    Group("qformer", "blip2", "qformer", "video"),
    Group("query_tokens", "blip2", "qformer", "video"),
    Group("ln_vision", "blip2", "qformer", "video"),
    Group("video_qformer", "vl_ckpt", "trainable", "video", "frozen_video_qformer"),
    Group("video_query_tokens", "vl_ckpt", "trainable", "video", "frozen_video_qformer"),
    Group("video_frame_position_embedding", "vl_ckpt", "trainable", "video", "frozen_video_qformer"),
    Group("llama_proj", "vl_ckpt", "trainable", "video", "frozen_llama_proj", projection=True),
    Group("audio_encoder", "imagebind", "imagebind", "audio"),
    Group("audio_qformer", "al_ckpt", "trainable", "audio", "frozen_audio_qformer"),
    Group("audio_query_tokens", "al_ckpt", "trainable", "audio", "frozen_audio_qformer"),
    Group("audio_position_embedding", "al_ckpt", "trainable", "audio", "frozen_audio_qformer"),
    Group("audio_llama_proj", "al_ckpt", "trainable", "audio", "frozen_audio_qformer", projection=True),
    Group("llama", "llama", "llama", "llm"),
    Group(LORA_GROUP, "", "trainable", "llm", LORA_SWITCH),
)
BY_NAME: Mapping[str, Group] = {g.name: g for g in TABLE}

LLM_GROUP = "llama"
#: groups whose outputs enter the LLM directly
PROJECTIONS = tuple(g.name for g in TABLE if g.projection)
#: frozen groups (towers and the LLM): never trained by any stage
FROZEN_TOWERS = tuple(g.name for g in TABLE if g.trained_by is None)


def groups_of_file(kind: str) -> tuple[str, ...]:
    """The groups one upstream file kind fills (e.g. "blip2" -> qformer, query_tokens, ln_vision)."""
    if kind not in FILE_KINDS:
        raise ValueError(f"unknown file kind {kind!r} (one of {', '.join(FILE_KINDS)})")
    return tuple(g.name for g in TABLE if g.file == kind)


def branch_groups(branch: str, *, towers: bool = True) -> tuple[str, ...]:
    """Every group of a branch ("video", "audio" or "llm"); ``towers=False``: only its trainable groups."""
    return tuple(g.name for g in TABLE if g.branch == branch and (towers or g.trained_by is not None))


def branch_towers(branch: str) -> tuple[str, ...]:
    """The frozen groups the training forward of `branch` reads: its towers and the LLM. (The audio branch trains
    on ImageBind's vision tower, which lives in ``audio_encoder``.)"""
    return tuple(g.name for g in TABLE if g.trained_by is None and g.branch in (branch, "llm"))


def trained_groups(frozen: Mapping[str, bool], lora: bool = False) -> tuple[str, ...]:
    """The groups a stage trains, from its upstream freeze flags ({"frozen_video_qformer": False, ...}; a missing
    flag counts as frozen) and whether it configures LoRA adapters."""
    return tuple(g.name for g in TABLE if g.trained_by is not None
                 and (lora if g.trained_by == LORA_SWITCH else not frozen.get(g.trained_by, True)))


def model_groups(config: ModelConfig) -> tuple[str, ...]:
    """Every top-level group of the model `config` describes, in table order (without tracing it)."""
    return tuple(g.name for g in TABLE if (config.equip_audio_branch or g.branch != "audio")
                 and (config.lora.enabled or g.name != LORA_GROUP))


__all__ = ["BY_NAME", "FILE_KINDS", "FREEZE_FLAGS", "FROZEN_TOWERS", "Group", "LLM_GROUP", "LORA_GROUP",
           "LORA_SWITCH", "PROJECTIONS", "TABLE", "TOWERS", "branch_groups", "branch_towers", "groups_of_file", "model_groups", "trained_groups"]
