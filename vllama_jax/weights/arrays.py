"""Host-array kernels of the conversion: a 2-D transpose and a dtype cast, each one pass over memory.

numpy copies a transposed view element by element without cache blocking: 35-135 MB/s for LLaMA-sized fp16 / fp32
matrices on this project's 2-core CPU, the slowest step of a conversion (every Linear weight is transposed into
the Flax layout). torch's copy kernel (blocked, vectorised) does the same at 260-450 MB/s into a preallocated
array, and casts fp16/bf16/fp32 at memory speed. It is used when torch is already imported (reading `.pth` files
imports it): importing it only for this would add ~0.25 GB of libraries to a safetensors-only conversion's resident
set. Otherwise a row-blocked numpy copy (2-3x the naive one) is used.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import ml_dtypes
import numpy as np

_BF16 = np.dtype(ml_dtypes.bfloat16)
# rows per block of the numpy fallback: a block of the source and its transposed image stay in cache
_BLOCK_ROWS = 256
_torch: Any = None


def _get_torch() -> Any:
    """torch if this process has imported it, else None (see the module docstring)."""
    if _torch is not None:  # tests force a choice
        return _torch
    return sys.modules.get("torch")


def _as_torch(torch: Any, a: np.ndarray) -> Any:
    """A torch view of `a` (no copy); bfloat16 through its int16 bits, which numpy-backed torch cannot take."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only inputs (mapped files): torch warns, and only reads them here
        if a.dtype == _BF16:
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)


def _torch_ok(*dtypes: np.dtype) -> bool:
    return all(d in (np.dtype(np.float32), np.dtype(np.float16), _BF16) for d in dtypes)


def transpose(a: np.ndarray) -> np.ndarray:
    """`np.ascontiguousarray(a.T)` of a 2-D array, fast."""
    if a.ndim != 2 or a.size < (1 << 16):
        return np.ascontiguousarray(a.T)
    out = np.empty(a.shape[::-1], a.dtype)
    torch = _get_torch()
    if torch and _torch_ok(a.dtype):
        _as_torch(torch, out).copy_(_as_torch(torch, a).t())
        return out
    for i in range(0, a.shape[0], _BLOCK_ROWS):
        out[:, i:i + _BLOCK_ROWS] = a[i:i + _BLOCK_ROWS].T
    return out


def contiguous(a: np.ndarray) -> np.ndarray:
    """`np.ascontiguousarray(a)`, fast for 2-D views in another order (a transposed view, a block of one): the
    streaming conversion hands Linear weights over as such views and copies them one chunk at a time."""
    if a.flags.c_contiguous:
        return a
    if a.ndim == 2:
        return transpose(a.T)
    return np.ascontiguousarray(a)


def cast(a: np.ndarray, dtype: Any) -> np.ndarray:
    """`a` as a C-contiguous array of `dtype` (`a` itself when it already is one)."""
    dt = np.dtype(dtype)
    a = contiguous(a)
    if a.dtype == dt:
        return a
    torch = _get_torch()
    if torch and a.size >= (1 << 16) and _torch_ok(a.dtype, dt):
        out = np.empty(a.shape, dt)
        _as_torch(torch, out).copy_(_as_torch(torch, a))
        return out
    return a.astype(dt)
