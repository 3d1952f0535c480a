"""Parameter-tree helpers shared by every package (bottom level: imports nothing from vllama_jax).

A params tree is a plain nested dict; its flat form maps ``"group/sub/leaf"`` paths to leaves. Checkpoint key maps,
the model directory, the optimizer's masks and the trainer all speak the flat form.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a/b/c": leaf} (depth-first, insertion order kept)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        p = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_params(v, p + "/"))
        else:
            out[p] = v
    return out


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"a/b/c": leaf} -> nested dict (inverse of `flatten_params`)."""
    tree: dict[str, Any] = {}
    for path, v in flat.items():
        node = tree
        parts = path.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return tree


def top_group(path: str) -> str:
    """The top-level group of a flat path ("llama/layers_0/..." -> "llama")."""
    return path.split("/", 1)[0]


def param_count(tree: Any) -> int:
    """Number of scalars in every leaf that has a shape (arrays, ShapeDtypeStructs)."""
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def stack_layers(params: Mapping[str, Any], prefix: str, num: int) -> dict[str, Any]:
    """A scanned module's view of a tree of numbered layers: ``{prefix}_{i}`` (i < ``num``, the layout of
    checkpoints and model directories) -> ``prefix`` whose leaves have a leading axis of length ``num``; other
    entries unchanged."""
    per_layer = [params[f"{prefix}_{i}"] for i in range(num)]
    out = {k: v for k, v in params.items() if not _is_layer(k, prefix)}
    out[prefix] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
    return out


def unstack_layers(params: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The inverse of `stack_layers`: ``prefix`` (stacked) -> ``{prefix}_{i}``."""
    stacked = params[prefix]
    n = jax.tree.leaves(stacked)[0].shape[0]
    out = {k: v for k, v in params.items() if k != prefix}
    out.update({f"{prefix}_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)})
    return out


def _is_layer(key: str, prefix: str) -> bool:
    head, _, num = key.rpartition("_")
    return head == prefix and num.isdigit()

