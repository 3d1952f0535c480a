"""What the model is: the module, its parameter groups (``groups``), its abstract params tree and logical axes,
random init, per-tower dtypes, and placement onto devices.

Placement happens once, where parameters enter the program (loading a model directory, building the embedded
default, initialising for training); everything downstream (chat, generation, training) takes placed trees.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import Mesh, SingleDeviceSharding

from ..config import ModelConfig, PrecisionConfig
from ..runtime import HostArena
from ..sharding import logical_axes_of, make_mesh, put, tree_shardings
from ..tree import flatten_params, param_count, stack_layers, unflatten_params, unstack_layers
from . import groups
from .groups import LLM_GROUP, model_groups
from .eva_vit import SCANNED_BLOCKS
from .llama import SCANNED_LAYERS
from .quant import axes_with_scales
from .video_llama import VideoLLaMA


def build_model(config: ModelConfig, *, remat_vit: bool = False, remat_llama: bool = False,
                scan_layers: bool = False) -> VideoLLaMA:
    """``scan_layers``: the LLaMA layers and the ViT blocks each as one scan over stacked parameters (their
    params view: `scanned_view` of the usual tree)."""
    return VideoLLaMA(config, remat_vit=remat_vit, remat_llama=remat_llama, scan_layers=scan_layers)


#: the groups `build_model(..., scan_layers=True)` holds stacked: group -> (its key of the stacked layers, the count)
SCANNED_GROUPS: dict[str, tuple[str, Any]] = {
    LLM_GROUP: (SCANNED_LAYERS, lambda c: c.llama.num_layers),
    "visual_encoder": (SCANNED_BLOCKS, lambda c: c.vit.depth),
}


def scanned_view(params: Mapping[str, Any], config: ModelConfig) -> dict[str, Any]:
    """The params (any subset of the groups, the checkpoints' per-layer layout) as a model with ``scan_layers``
    reads them: the numbered layers of the `SCANNED_GROUPS` stacked (`tree.stack_layers`)."""
    out = dict(params)
    for group, (key, count) in SCANNED_GROUPS.items():
        if group in out:
            out[group] = stack_layers(out[group], key, count(config))
    return out


def unscanned_view(params: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `scanned_view`: the checkpoints' per-layer layout."""
    out = dict(params)
    for group, (key, _) in SCANNED_GROUPS.items():
        if group in out and key in out[group]:
            out[group] = unstack_layers(out[group], key)
    return out


def dummy_inputs(config: ModelConfig, batch: int = 1, frames: int = 1) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    v, a = config.vit, config.imagebind_audio
    f = jnp.zeros((batch, frames, v.image_size, v.image_size, 3), jnp.float32)
    c = jnp.zeros((batch, 1, 1, a.num_mel_bins, a.target_length), jnp.float32) if config.equip_audio_branch else None
    ids = jnp.zeros((batch, 4), jnp.int32)
    return f, c, ids


def _init_fn(config: ModelConfig, scan_layers: bool = False):
    model = build_model(config, scan_layers=scan_layers)
    f, c, ids = dummy_inputs(config)

    def init(rng: jax.Array) -> Any:
        return model.init(rng, f, c, ids, method=model.init_all)["params"]

    return init


def abstract_params(config: ModelConfig, scan_layers: bool = False) -> tuple[Any, Any]:
    """(tree of ShapeDtypeStruct, tree of logical-axis tuples) of the whole model, without allocating it
    (``scan_layers``: with the LLaMA layers and ViT blocks stacked, as `build_model(..., scan_layers=True)` reads
    them)."""
    boxed = jax.eval_shape(_init_fn(config, scan_layers), jax.random.PRNGKey(0))
    return nn.unbox(boxed), logical_axes_of(boxed)


def abstract_for_groups(config: ModelConfig, names: Iterable[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`abstract_params(config)` restricted to the groups `names`. A request for the LLM alone traces only the LLM:
    tracing the vision/audio towers of a default-size config costs seconds."""
    names = list(names)
    if set(names) <= {LLM_GROUP}:
        model = build_model(config)
        ids = dummy_inputs(config)[2]
        boxed = jax.eval_shape(lambda r: model.init(r, ids, method=lambda m, i: m.llm(m.embed_tokens(i))[0]),
                               jax.random.PRNGKey(0))["params"]
        abstract, axes = nn.unbox(boxed), logical_axes_of(boxed)
    else:
        abstract, axes = abstract_params(config)
    return {g: abstract[g] for g in names if g in abstract}, {g: axes[g] for g in names if g in axes}


def init_params(config: ModelConfig, seed: int = 0) -> Any:
    """Random parameters with the upstream initialisers (for tests and training from scratch)."""
    return nn.unbox(jax.jit(_init_fn(config))(jax.random.PRNGKey(seed)))


def cast_to_config_dtypes(params: Any, config: ModelConfig) -> Any:
    """Cast every leaf present in `params` to the parameter dtype the config gives it (e.g. the ViT's Linear/Conv
    weights to float16 and LLaMA to bfloat16 as upstream, LayerNorms and position tables staying float32)."""
    abstract, _ = abstract_for_groups(config, params)
    want = {k: v.dtype for k, v in flatten_params(abstract).items()}
    flat = flatten_params(params)
    # int8 weights (and their scales, absent from the float tree) stay as they are: see `models.quant`
    return unflatten_params({k: (v.astype(want[k]) if k in want and v.dtype != want[k]
                                 and not jnp.issubdtype(v.dtype, jnp.integer) else v) for k, v in flat.items()})


def set_precision(config: ModelConfig, params: Any, mode: str) -> tuple[ModelConfig, Any]:
    """`config` with the named precision `mode` ("upstream", "bf16", "fp32": `config.PRECISION_MODES`) and `params`
    (any subset of the groups, host or device arrays) cast to its parameter dtypes."""
    config = dataclasses.replace(config, precision=PrecisionConfig.named(mode)).validate()
    return config, cast_to_config_dtypes(params, config)


def param_shardings(config: ModelConfig, params: Any, mesh: Mesh | str | None) -> dict[str, Any]:
    """The sharding of every leaf of `params` (any subset of the groups): by the logical-axis rules on a mesh, or
    the default device when `mesh` is None."""
    if mesh is None:
        dev = SingleDeviceSharding(jax.devices()[0])
        return jax.tree_util.tree_map(lambda _: dev, params)
    mesh = make_mesh(mesh) if isinstance(mesh, str) else mesh
    _, axes = abstract_for_groups(config, params)
    axes = axes_with_scales({g: axes[g] for g in params}, params)  # int8 scales shard with their columns
    return tree_shardings(params, axes, mesh)


def place_params(config: ModelConfig, params: dict[str, Any], mesh: Mesh | str | None = None) -> dict[str, Any]:
    """Put a params tree (any subset of the groups; host or device arrays) onto `mesh` (a Mesh or a spec string
    such as "data=1,fsdp=2,tensor=4") by the rules table, or onto the default device. The one placement step:
    callers place once, where the parameters are loaded or made. Host leaves bound for CPU devices go into one
    huge-page `HostArena` (the copy placing makes anyway; a decode step then streams them faster)."""
    arena = HostArena()
    return jax.tree.map(lambda x, s: put(x, s, arena), params, param_shardings(config, params, mesh))


__all__ = ["LLM_GROUP", "SCANNED_GROUPS", "abstract_for_groups", "abstract_params", "build_model",
           "cast_to_config_dtypes", "dummy_inputs", "groups", "init_params", "model_groups", "param_count",
           "param_shardings", "place_params", "scanned_view", "set_precision", "unscanned_view"]
