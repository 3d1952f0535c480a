"""Parameter-tree helpers shared by every package (bottom level: imports nothing from vllama_jax).

A params tree is a plain nested dict; its flat form maps ``"group/sub/leaf"`` paths to leaves. Checkpoint key maps,
the model directory, the optimizer's masks and the trainer all speak the flat form.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
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
