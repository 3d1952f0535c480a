"""Where a training run computes: multi-host initialisation and the device mesh of the step."""

from __future__ import annotations

import math
from typing import Any

import jax

from ..sharding import make_mesh, parse_mesh_spec
from .config import DistributedConfig


def init_distributed(d: DistributedConfig) -> None:
    """`jax.distributed.initialize` for multi-host runs (before any computation). CPU processes exchange
    collectives through gloo."""
    if jax.distributed.is_initialized():
        return
    if d.num_processes > 1 or d.coordinator or d.auto:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if d.auto:
            jax.distributed.initialize()
        else:
            jax.distributed.initialize(d.coordinator, num_processes=d.num_processes, process_id=d.process_id)


def build_mesh(spec: str, devices: list[Any] | None = None) -> Any:
    """`make_mesh` over all devices, or over the first N when a fully specified spec asks for fewer (one process
    only: e.g. "data=1" trains on one device of a multi-device host)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = parse_mesh_spec(spec) if spec else None
    if sizes and -1 not in sizes.values() and jax.process_count() == 1:
        n = math.prod(sizes.values())
        if n < len(devices):
            return make_mesh(spec, devices[:n])
    return make_mesh(spec or None, devices)
