"""Device mesh and THE logical-axis rules table.

Every parameter is created with logical axis names (see `models/layers.py`); this module is the one place that
maps those names to the physical mesh axes (data, fsdp, tensor). Changing a parallelism strategy means editing
`LOGICAL_AXIS_RULES`, not the models.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .errors import VllamaError
from .runtime import HostArena

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of mesh axes, or None = replicated).
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("frames", None),
    ("queries", None),
    ("cache_length", None),
    # parameters: FSDP shards the model width, tensor parallelism the head / hidden / vocab dimensions
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("patch", None),
    ("in_channels", None),
    ("positions", None),
    ("tokens", None),
    ("lora_rank", None),  # LoRA adapters' rank dimension (`models.lora.RANK_AXIS`): small, replicated
    ("layers", None),  # the stacked axis of scanned layers (`models.layers.LAYERS_AXIS`): each device holds all
)


class MeshSpecError(VllamaError, ValueError):
    """A mesh specification string that cannot be built on the available devices."""


def parse_mesh_spec(spec: str | Mapping[str, int] | None) -> dict[str, int]:
    """Parse "data=2,fsdp=2,tensor=2" into {"data": 2, "fsdp": 2, "tensor": 2}; missing axes are 1.

    One axis may be -1 (take the remaining devices).
    """
    sizes = {a: 1 for a in MESH_AXES}
    if spec is None or spec == "":
        return sizes
    items: Iterable[tuple[str, int]]
    if isinstance(spec, Mapping):
        items = spec.items()
    else:
        parsed = []
        for part in str(spec).split(","):
            part = part.strip()
            if not part:
                continue
            if "=" not in part:
                raise MeshSpecError(f"mesh spec {spec!r}: expected axis=size, got {part!r}")
            name, value = part.split("=", 1)
            try:
                parsed.append((name.strip(), int(value)))
            except ValueError as e:
                raise MeshSpecError(f"mesh spec {spec!r}: size of {name.strip()!r} is not an integer") from e
        items = parsed
    for name, value in items:
        if name not in MESH_AXES:
            raise MeshSpecError(f"mesh spec {spec!r}: unknown axis {name!r} (axes are {', '.join(MESH_AXES)})")
        if value == 0 or value < -1:
            raise MeshSpecError(f"mesh spec {spec!r}: axis {name!r} has impossible size {value}")
        sizes[name] = value
    return sizes


def make_mesh(spec: str | Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build a (data, fsdp, tensor) mesh. With no spec, all devices go to `fsdp`."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    sizes = parse_mesh_spec(spec) if spec else {"data": 1, "fsdp": n, "tensor": 1}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise MeshSpecError(f"mesh spec {spec!r}: only one axis may be -1")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if n % fixed:
            raise MeshSpecError(f"mesh spec {spec!r}: {n} devices are not divisible by {fixed}")
        sizes[free[0]] = n // fixed
    total = math.prod(sizes.values())
    if total != n:
        raise MeshSpecError(
            f"mesh spec {spec!r} needs {total} devices but {n} are available "
            f"({', '.join(f'{a}={s}' for a, s in sizes.items())})"
        )
    grid = np.asarray(devices, dtype=object).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def logical_to_mesh_spec(
    logical: Sequence[str | None] | None,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES,
) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec.

    Given `shape` and `mesh`, a dimension that the mesh axes do not divide evenly is replicated instead (tiny test
    models have widths such as 209 that no mesh divides); each mesh axis is used at most once per array.
    """
    if logical is None:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    out: list[Any] = []
    for dim, name in enumerate(logical):
        target = table.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        axes = (target,) if isinstance(target, str) else tuple(target)
        axes = tuple(a for a in axes if a not in used)
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            if shape is not None and axes and shape[dim] % math.prod(mesh.shape[a] for a in axes):
                axes = ()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def logical_axes_of(boxed_tree: Any) -> Any:
    """Tree of logical-axis tuples from a tree of `nn.LogicallyPartitioned` boxes (e.g. from `jax.eval_shape(init)`)."""

    def axes(x: Any) -> Any:
        if isinstance(x, nn.LogicallyPartitioned):
            return tuple(x.names)
        return None

    return jax.tree_util.tree_map(axes, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def tree_shardings(abstract_params: Any, logical_axes: Any, mesh: Mesh) -> Any:
    """NamedSharding for every leaf of `abstract_params` (arrays or ShapeDtypeStructs) from its logical axes."""

    def one(x: Any, names: Any) -> NamedSharding:
        return NamedSharding(mesh, logical_to_mesh_spec(names, tuple(x.shape), mesh))

    return _map_with_axes(one, abstract_params, logical_axes)


def _map_with_axes(fn: Any, values: Any, axes: Any) -> Any:
    """tree_map over `values`, pairing each leaf with the axes tuple at the same path (None if absent)."""
    flat_axes = {
        jax.tree_util.keystr(p): a
        for p, a in jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: x is None or isinstance(x, tuple))[0]
    }
    return jax.tree_util.tree_map_with_path(lambda p, v: fn(v, flat_axes.get(jax.tree_util.keystr(p))), values)


def batch_sharding(mesh: Mesh, ndim: int, shape: Sequence[int] | None = None) -> NamedSharding:
    """Sharding of an input array whose leading dimension is the batch."""
    return NamedSharding(mesh, logical_to_mesh_spec(("batch",) + (None,) * (ndim - 1), shape, mesh))


def put(x: Any, sharding: jax.sharding.Sharding, arena: HostArena | None = None) -> jax.Array:
    """One leaf onto its sharding. Host arrays go through `make_array_from_callback`: each process supplies only
    the shards its own devices hold, so the same call places parameters on one device, a mesh or a multi-host pod.
    With an `arena`, host shards bound for CPU devices are copied into its huge-page memory (the copy a placement
    makes anyway) and aliased there by XLA (`runtime.HostArena`)."""
    if isinstance(x, jax.Array):
        return jax.device_put(x, sharding)
    x = np.asarray(x)
    if arena is None or not arena.enabled():
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
    shards = sharding.addressable_devices_indices_map(x.shape)
    pieces = []
    for device, idx in shards.items():
        piece = np.asarray(x[idx])
        placed = arena.place(piece, device)
        pieces.append(placed if placed is not None else jax.device_put(piece, device))
    return jax.make_array_from_single_device_arrays(x.shape, sharding, pieces)


def shard_params(params: Any, logical_axes: Any, mesh: Mesh) -> Any:
    """Place a params tree onto `mesh` according to the rules table (host leaves through one `HostArena`)."""
    arena = HostArena()
    return jax.tree_util.tree_map(lambda x, s: put(x, s, arena), params, tree_shardings(params, logical_axes, mesh))
