"""Weight-only int8 for the LLM (`--quantize int8`, `quantize="int8"`, `convert --dtype int8`).

Symmetric, per output channel: each LLaMA projection `kernel` (in, out) becomes int8 `kernel` plus float32
`kernel_scale` (out,) = max|column| / 127, and the token table `embed_tokens/embedding` (vocab, d) becomes int8
plus `embedding_scale` (vocab,) (per row: the output channel of the tied LM head, and the factor of a looked-up
row). Norm scales stay as they are. `models.layers.matmul` multiplies the scale in after the dot, so an int8 weight
is never converted whole. The scale leaves take the output axis's logical name (`heads`, `mlp`, `vocab`, ...), so
the sharding rules table places them with their columns. The vision/audio towers keep their precision.

Quantization runs on the host one leaf at a time (`quantize_leaf`): loading a float model as int8 never holds a
float32 copy of more than one leaf.

Where an inference engine runs on one CPU device with the FFI kernel (`kernels.packed_int8_available()`: AVX-512
VNNI), it keeps its int8 projection kernels in the kernel's packed layout (`kernel_layout`, `kernels.pack_int8`):
(K, N) -> (K/4, N, 4), the same values (a batch-1 product reads them ~1.2x faster; a LLaMA-7B-shaped decode step
runs ~1.08x faster). Everything that reads a
kernel goes through `models.layers.matmul` / `dequantize`, which take either layout.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import numpy as np

from .. import kernels
from ..errors import VllamaError
from ..runtime import HostArena
from ..tree import flatten_params, unflatten_params
from .groups import LLM_GROUP
from .layers import EMBEDDING_SCALE, KERNEL_SCALE

QUANTIZE_CHOICES = ("int8",)
MANIFEST_KEY = "quantization"  # manifest.json: {"quantization": {"llama": "int8"}} for an int8 model directory


class QuantizationError(VllamaError, ValueError):
    """An unknown quantization mode, or a leaf that cannot be quantized."""


#: float32 values a block of `quantize_leaf` holds (16 MB)
QUANTIZE_BLOCK_ELEMENTS = 1 << 22


def check_mode(mode: str | None) -> str | None:
    """`mode` if it is None or one of `QUANTIZE_CHOICES`, else a typed error."""
    if mode is not None and mode not in QUANTIZE_CHOICES:
        raise QuantizationError(f"unknown quantization {mode!r} (choices: {', '.join(QUANTIZE_CHOICES)})")
    return mode


def scale_name(path: str) -> str | None:
    """The flat path of the scale leaf that quantizing `path` (a flat "group/.../leaf" path) adds, or None when the
    leaf stays as it is: 2-D `kernel`s and the token table of the LLM group."""
    if not path.startswith(LLM_GROUP + "/"):
        return None
    head, _, leaf = path.rpartition("/")
    if leaf == "kernel":
        return f"{head}/{KERNEL_SCALE}"
    if leaf == "embedding" and head.endswith("embed_tokens"):
        return f"{head}/{EMBEDDING_SCALE}"
    return None


def _out_axis(path: str) -> int:
    """The output-channel axis of a quantizable leaf: columns of a (in, out) kernel, rows of the (vocab, d) table."""
    return 0 if path.endswith("/embedding") else 1


def quantize_leaf(w: Any, path: str) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weight, float32 scale per output channel) of one float leaf, computed on the host in float32, a block
    of rows at a time: besides the leaf and its int8 result, at most `QUANTIZE_BLOCK_ELEMENTS` float32 values are
    held (a whole-leaf float32 pass held three copies: 1.5 GB for LLaMA-2-7B's token table, the peak of a 7B
    load with quantization)."""
    w = np.asarray(w)
    if w.ndim != 2:
        raise QuantizationError(f"{path}: only 2-D weights are quantized, got shape {w.shape}")
    reduce = 1 - _out_axis(path)
    step = max(1, QUANTIZE_BLOCK_ELEMENTS // max(1, w.shape[1]))
    blocks = [slice(r, min(r + step, w.shape[0])) for r in range(0, w.shape[0], step)]
    if reduce == 0:
        amax = np.zeros(w.shape[1], np.float32)
        for b in blocks:
            np.maximum(amax, np.max(np.abs(w[b].astype(np.float32)), axis=0), out=amax)
    else:
        amax = np.concatenate([np.max(np.abs(w[b].astype(np.float32)), axis=1) for b in blocks])
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.empty(w.shape, np.int8)
    for b in blocks:
        x = w[b].astype(np.float32)
        x /= scale[None, :] if reduce == 0 else scale[b, None]
        np.rint(x, out=x)
        q[b] = np.clip(x, -127, 127, out=x)
    return q, scale


def quantize_flat(flat: Mapping[str, Any], mode: str | None = "int8",
                  put: Callable[[str, np.ndarray], Any] | None = None) -> dict[str, Any]:
    """Flat params -> flat params with every quantizable leaf (`scale_name`) replaced by its int8 weight and scale,
    leaf by leaf (`put(path, host_array)` places each result, e.g. onto its sharding, before the next leaf is
    read). Leaves already int8 are kept. mode None: `flat` unchanged."""
    if check_mode(mode) is None:
        return dict(flat)
    out: dict[str, Any] = {}
    for path, w in flat.items():
        s = scale_name(path)
        if s is None or np.dtype(w.dtype) == np.int8 or s in flat:
            out[path] = w
            continue
        q, scale = quantize_leaf(jax.device_get(w), path)
        out[path] = put(path, q) if put else q
        out[s] = put(s, scale) if put else scale
    return out


def quantize_params(params: Mapping[str, Any], mode: str | None = "int8") -> dict[str, Any]:
    """A params tree (the whole model: {group: tree}, only the LLM group is touched) with the LLM's projection
    kernels and token table in int8 + float32 per-channel scales; host (numpy) arrays for the quantized leaves."""
    return unflatten_params(quantize_flat(flatten_params(params), mode))


def quantized_specs(flat: Mapping[str, Any], mode: str | None = "int8") -> dict[str, Any]:
    """Flat abstract params (ShapeDtypeStruct) -> the abstract params of their int8 form (same order; each scale
    right after its weight)."""
    if check_mode(mode) is None:
        return dict(flat)
    out: dict[str, Any] = {}
    for path, x in flat.items():
        s = scale_name(path)
        if s is None:
            out[path] = x
            continue
        out[path] = jax.ShapeDtypeStruct(tuple(x.shape), np.int8)
        out[s] = jax.ShapeDtypeStruct((x.shape[_out_axis(path)],), np.float32)
    return out


def axes_with_scales(axes: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """Logical axes of a float params tree extended to `params` (any tree of the same model, possibly with
    scale leaves): each scale takes the output axis of its weight."""
    flat_axes = flatten_params(axes)  # axes tuples are leaves: only Mappings are descended into
    out = dict(flat_axes)
    for path in flatten_params(params):
        if path in out:
            continue
        weight = weight_of(path)
        if weight is None or weight not in flat_axes:
            continue
        names = flat_axes[weight]
        out[path] = (names[_out_axis(weight)],) if names is not None else None
    return unflatten_params(out)


def weight_of(scale_path: str) -> str | None:
    """The flat path of the weight a scale leaf belongs to; None for any other leaf."""
    head, _, leaf = scale_path.rpartition("/")
    if leaf == KERNEL_SCALE:
        return f"{head}/kernel"
    if leaf == EMBEDDING_SCALE:
        return f"{head}/embedding"
    return None


def is_quantized(params: Mapping[str, Any]) -> bool:
    """Whether a params tree holds int8 weights with scales."""
    return any(weight_of(p) is not None for p in flatten_params(params))


def kernel_layout(params: Mapping[str, Any], *, release: Callable[[Any], bool] = lambda w: False,
                  arena: HostArena | None = None) -> dict[str, Any]:
    """The decoder's params (one device, the CPU kernel in use) with every int8 projection `kernel` the packed
    kernel takes (`kernels.packable`) in its packed layout, leaf by leaf; unchanged where the kernel is not in use
    or has no packed path. `release(w)`: whether the replaced array may be deleted at once (it belongs to the
    caller, who gives it up), which bounds the extra memory to one leaf. The packed arrays are written into the
    huge-page memory of `arena` (a fresh one if not given) by the kernel library (`kernels.pack_int8_into`: one pass,
    where XLA's transposition fills a 4 KiB-paged buffer of its own); XLA packs those the arena does not take."""
    if not (kernels.use_cpu_kernels() and kernels.packed_int8_available()):
        return dict(params)
    arena = arena or HostArena()
    out: dict[str, Any] = {}
    for path, w in flatten_params(params).items():
        if path.rpartition("/")[2] == "kernel" and kernels.packable(w):
            packed = _pack_into(w, arena)
            packed = _pack(w) if packed is None else packed
            if isinstance(w, jax.Array) and release(w):
                w.delete()
            w = packed
        out[path] = w
    return unflatten_params(out)


def _pack_into(w: Any, arena: HostArena) -> jax.Array | None:
    """`w` packed straight into the arena, on its one CPU device; None where the arena is not used there."""
    devices = list(w.devices()) if isinstance(w, jax.Array) else [jax.devices("cpu")[0]]
    if len(devices) != 1:
        return None
    k, n = w.shape
    return arena.build((k // 4, n, 4), np.int8, devices[0],
                       lambda out: kernels.pack_int8_into(np.ascontiguousarray(w), out))


_pack = jax.jit(kernels.pack_int8)


def resident_bytes(params: Any) -> int:
    """Bytes of every leaf (what the weights occupy in memory)."""
    return int(sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(params)))


__all__ = ["MANIFEST_KEY", "QUANTIZE_CHOICES", "QuantizationError", "axes_with_scales", "check_mode",
           "is_quantized", "kernel_layout", "quantize_flat", "quantize_leaf", "quantize_params", "quantized_specs",
           "resident_bytes", "scale_name", "weight_of"]
