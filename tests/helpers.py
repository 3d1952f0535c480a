"""Small helpers shared by tests (not a test module)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import linen as nn

from vllama_jax.weights.keymaps import flatten_params


def shapes_of(module: nn.Module, *args, prefix: str = "", **kw) -> dict[str, tuple[int, ...]]:
    """Flat {prefix + path: shape} of a module's params, without allocating them."""
    boxed = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, **kw))["params"]
    return {prefix + k: tuple(v.shape) for k, v in flatten_params(nn.unbox(boxed)).items()}


def assert_close(actual, expected, atol=1e-4, rtol=1e-4, name=""):
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    assert a.shape == e.shape, f"{name}: shape {a.shape} != {e.shape}"
    np.testing.assert_allclose(a, e, atol=atol, rtol=rtol, err_msg=name)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}
