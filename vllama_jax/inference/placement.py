"""Parameters placed once. Whoever loads or makes parameters places them (`weights.load_model_dir` restores into
their shardings, `defaults.embedded_model` calls `models.place_params`); the chat and the generation engine take
them as they are. `placed` is their one entry check: a tree that already lives where it should is returned
untouched (no trace, no copy); anything else (host arrays from a test or `load_llama`, arrays on another mesh)
goes through `models.place_params`, once. `placed` takes Flax's axis-metadata boxes (what `Module.init` returns) off
first: every consumer of placed params reads plain arrays.
"""

from __future__ import annotations

from typing import Any

import jax
from flax.core import meta
from jax.sharding import Mesh, NamedSharding

from ..config import LlamaConfig, ModelConfig
from ..models import place_params
from ..models.groups import LLM_GROUP


def is_placed(params: Any, mesh: Mesh | None) -> bool:
    """Whether every leaf is a jax Array where `place_params(..., mesh)` would put it: on `mesh` (its layout is
    trusted: checking the exact specs would mean tracing the model), or on the default device when `mesh` is
    None."""
    leaves = jax.tree_util.tree_leaves(params)
    if mesh is None:
        home = {jax.devices()[0]}
        return all(isinstance(x, jax.Array) and x.sharding.device_set == home for x in leaves)
    return all(isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
               for x in leaves)


def placed(config: ModelConfig, params: dict[str, Any], mesh: Mesh | None) -> dict[str, Any]:
    """`params` (any subset of the groups) on `mesh` / the default device: as given when already there,
    otherwise through `models.place_params`."""
    params = meta.unbox(params)
    return params if is_placed(params, mesh) else place_params(config, params, mesh)


def placed_llm(config: LlamaConfig, params: Any, mesh: Mesh | None) -> Any:
    """`placed` for the decoder's params alone (the LLM group of a Video-LLaMA around `config`), already unboxed (its
    one caller, the decode engine, unboxes before it quantizes)."""
    if is_placed(params, mesh):
        return params
    return place_params(ModelConfig(llama=config), {LLM_GROUP: params}, mesh)[LLM_GROUP]


__all__ = ["is_placed", "placed", "placed_llm"]
