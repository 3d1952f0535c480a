"""Model construction helpers: the module, its abstract params tree, logical axes and random init."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from ..config import ModelConfig


def build_model(config: ModelConfig, *, remat_vit: bool = False, remat_llama: bool = False):
    from .video_llama import VideoLLaMA

    return VideoLLaMA(config, remat_vit=remat_vit, remat_llama=remat_llama)


def dummy_inputs(config: ModelConfig, batch: int = 1, frames: int = 1) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    v, a = config.vit, config.imagebind_audio
    f = jnp.zeros((batch, frames, v.image_size, v.image_size, 3), jnp.float32)
    c = jnp.zeros((batch, 1, 1, a.num_mel_bins, a.target_length), jnp.float32) if config.equip_audio_branch else None
    ids = jnp.zeros((batch, 4), jnp.int32)
    return f, c, ids


def _init_fn(config: ModelConfig):
    model = build_model(config)
    f, c, ids = dummy_inputs(config)

    def init(rng: jax.Array) -> Any:
        return model.init(rng, f, c, ids, method=model.init_all)["params"]

    return init


def abstract_params(config: ModelConfig) -> tuple[Any, Any]:
    """(tree of ShapeDtypeStruct, tree of logical-axis tuples) of the whole model, without allocating it."""
    from ..sharding import logical_axes_of

    boxed = jax.eval_shape(_init_fn(config), jax.random.PRNGKey(0))
    return nn.unbox(boxed), logical_axes_of(boxed)


def init_params(config: ModelConfig, seed: int = 0) -> Any:
    """Random parameters with the upstream initialisers (for tests and training from scratch)."""
    return nn.unbox(jax.jit(_init_fn(config))(jax.random.PRNGKey(seed)))


def cast_to_config_dtypes(params: Any, config: ModelConfig) -> Any:
    """Cast every leaf present in `params` to the parameter dtype the config gives it (e.g. the ViT's Linear/Conv
    weights to float16 and LLaMA to bfloat16 as upstream, LayerNorms and position tables staying float32)."""
    from ..weights.keymaps import flatten_params, unflatten_params

    abstract, _ = abstract_params(config)
    want = {k: v.dtype for k, v in flatten_params(abstract).items()}
    flat = flatten_params(params)
    return unflatten_params({k: (v.astype(want[k]) if k in want and v.dtype != want[k] else v) for k, v in flat.items()})


def param_count(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
