"""The logical-axis rules table and mesh construction."""

from __future__ import annotations

import jax
import pytest
from jax.sharding import PartitionSpec as P

from vllama_jax.sharding import MeshSpecError, logical_to_mesh_spec, make_mesh, parse_mesh_spec


def test_parse_mesh_spec():
    assert parse_mesh_spec("data=2,fsdp=2,tensor=2") == {"data": 2, "fsdp": 2, "tensor": 2}
    assert parse_mesh_spec("tensor=4") == {"data": 1, "fsdp": 1, "tensor": 4}
    for bad in ("pipeline=2", "data=x", "data", "data=0"):
        with pytest.raises(MeshSpecError):
            parse_mesh_spec(bad)


def test_make_mesh_uses_all_devices():
    assert jax.device_count() == 8, "tests run with 8 simulated CPU devices (conftest)"
    m = make_mesh("data=2,fsdp=2,tensor=2")
    assert dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh("data=2,fsdp=-1").shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(MeshSpecError, match="needs 16 devices"):
        make_mesh("data=4,fsdp=4")


def test_rules_map_and_fall_back_to_replication():
    m = make_mesh("data=2,fsdp=2,tensor=2")
    assert logical_to_mesh_spec(("embed", "mlp"), (64, 128), m) == P("fsdp", "tensor")
    # batch takes (data, fsdp); fsdp is then not reused for the activation's embed dimension
    assert logical_to_mesh_spec(("batch", "length", "embed"), (4, 3, 64), m) == P(("data", "fsdp"))
    # 209 (the tiny EVA MLP width) is not divisible by tensor=2: replicated rather than an error
    assert logical_to_mesh_spec(("embed", "mlp"), (48, 209), m) == P("fsdp")
    # an axis is never used twice in one array
    assert logical_to_mesh_spec(("embed", "embed"), (64, 64), m) == P("fsdp")
