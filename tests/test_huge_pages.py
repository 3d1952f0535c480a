"""CPU weights placed in huge-page host memory (`runtime.HostArena`; README "Weights in huge pages"): where a
placement and the decode engine (its packed int8 kernels; with `huge_pages` its donated weights) put their arrays, that
XLA aliases that memory without a copy, that the kernel backs it with 2 MiB pages where transparent huge pages are
on, and that it all goes back to the OS with the arrays."""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from tests.helpers import TINY_CONFIG
from vllama_jax import kernels
from vllama_jax.config import load_model_config
from vllama_jax.inference.generate import Generator
from vllama_jax.models import init_params, place_params
from vllama_jax.models.groups import LLM_GROUP
from vllama_jax.models.quant import kernel_layout, quantize_params
from vllama_jax.runtime import HUGE_PAGE_BYTES, HUGE_PAGES_ENV, HostArena
from vllama_jax.sharding import make_mesh, put
from vllama_jax.tree import flatten_params
from vllama_jax.weights.model_dir import load_model_dir, save_model_dir

def _mapping_of(address: int) -> dict[str, Any]:
    """The /proc/self/smaps entry of the mapping holding `address`: start, end, AnonHugePages (bytes) and whether
    it is advised for huge pages (VmFlags "hg": the arena's mappings are, XLA's malloc'd buffers are not)."""
    entry: dict[str, Any] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            entry = {"start": start, "end": end} if start <= address < end else None
        elif entry is not None and head == "AnonHugePages:":
            entry["huge"] = int(line.split()[1]) * 1024
        elif entry is not None and head == "VmFlags:":
            entry["advised"] = "hg" in line.split()[1:]
            return entry
    raise AssertionError(f"no mapping holds {address:#x}")


def _in_arena(x: jax.Array) -> bool:
    """Every shard in a mapping advised for huge pages that starts on a 2 MiB boundary: the arena's (numpy advises
    its own large buffers too, from 4 KiB boundaries; XLA's buffers are not advised)."""
    maps = [_mapping_of(s.data.unsafe_buffer_pointer()) for s in x.addressable_shards]
    return all(m["advised"] and m["start"] % HUGE_PAGE_BYTES == 0 for m in maps)


def _mid_config():
    """The tiny test model widened so that its matrices pass the arena's 64 KiB minimum."""
    cfg = load_model_config(TINY_CONFIG)
    return dataclasses.replace(cfg, llama=dataclasses.replace(cfg.llama, hidden_size=256, intermediate_size=512))


def _thp_on() -> bool:
    p = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return p.exists() and "[never]" not in p.read_text()


def _pointer(x: jax.Array) -> int:
    return x.addressable_shards[0].data.unsafe_buffer_pointer()


def test_a_placed_array_is_the_arenas_memory_in_huge_pages():
    arena = HostArena()
    x = np.random.default_rng(0).standard_normal((1024, 1536)).astype(np.float32)  # 6 MiB: a fresh chunk's start
    y = arena.place(x, jax.devices()[0])
    np.testing.assert_array_equal(np.asarray(y), x)
    assert _pointer(y) % HUGE_PAGE_BYTES == 0 and _in_arena(y)  # XLA took the arena's buffer: no copy of its own
    if _thp_on():
        m = _mapping_of(_pointer(y))
        # the pages it fills are huge ones (3 x 2 MiB); the rest of the chunk is untouched
        assert m["huge"] == x.nbytes - x.nbytes % HUGE_PAGE_BYTES
    # small arrays share a chunk, back to back on 64-byte boundaries
    arena = HostArena(min_bytes=1)
    a = arena.place(np.ones((256, 256), np.float32), jax.devices()[0])
    b = arena.place(np.full((300, 7), 2, np.int8), jax.devices()[0])
    c = arena.place(np.ones((256, 256), np.float32), jax.devices()[0])
    assert _pointer(b) == _pointer(a) + 256 * 256 * 4
    assert _pointer(c) == _pointer(b) + -(-300 * 7 // 64) * 64
    np.testing.assert_array_equal(np.asarray(b), np.full((300, 7), 2, np.int8))
    # below min_bytes (64 KiB by default): the caller places as before
    assert HostArena().place(np.ones(16, np.float32), jax.devices()[0]) is None


def test_the_arena_is_off_with_its_switch(monkeypatch):
    monkeypatch.setenv(HUGE_PAGES_ENV, "0")
    assert not HostArena.enabled()
    assert HostArena().place(np.ones((512, 512), np.float32), jax.devices()[0]) is None
    y = put(np.ones((512, 512), np.float32), SingleDeviceSharding(jax.devices()[0]), HostArena())
    assert float(y.sum()) == 512 * 512 and not _in_arena(y)


def test_the_memory_goes_back_with_the_arrays():
    arena = HostArena()
    y = arena.place(np.ones((2048, 1024), np.float32), jax.devices()[0])
    start = _mapping_of(_pointer(y))["start"]
    del y, arena
    gc.collect()
    maps = Path("/proc/self/maps").read_text()
    assert f"{start:x}-" not in maps


def test_put_places_every_shard_in_the_arena():
    mesh = make_mesh("data=1,fsdp=2,tensor=4")
    x = np.arange(512 * 256, dtype=np.float32).reshape(512, 256)
    arena = HostArena()
    for spec in (PartitionSpec("fsdp", "tensor"), PartitionSpec(None, "tensor"), PartitionSpec()):
        y = put(x, NamedSharding(mesh, spec), arena)
        np.testing.assert_array_equal(np.asarray(y), x)
        assert y.sharding == NamedSharding(mesh, spec)
        assert _in_arena(y)  # every shard


def test_move_deletes_the_source_and_keeps_the_layout():
    mesh = make_mesh("data=1,fsdp=2,tensor=4")
    x = jax.device_put(np.arange(512 * 512, dtype=np.float32).reshape(512, 512),
                       NamedSharding(mesh, PartitionSpec("fsdp", "tensor")))
    assert not _in_arena(x)
    y = HostArena().move(x)
    assert x.is_deleted() and _in_arena(y)
    assert y.sharding == x.sharding
    np.testing.assert_array_equal(np.asarray(y), np.arange(512 * 512, dtype=np.float32).reshape(512, 512))
    # what a jitted program makes of it is plain XLA memory again; the arena's arrays stay unchanged
    z = jax.jit(lambda a: a * 2)(y)
    np.testing.assert_array_equal(np.asarray(z), 2 * np.asarray(y))
    assert not _in_arena(z)


def test_where_weights_are_placed_they_land_in_the_arena(tmp_path):
    """`place_params` puts host leaves of at least the arena's minimum there (free: placing copies anyway); a model
    directory restores into XLA's buffers, and the decode engine given them with `huge_pages` and `donate_params`
    (the chat's `--huge-pages`) moves them; without it they stay."""
    cfg = _mid_config()
    host = jax.tree.map(np.asarray, init_params(cfg, 0))[LLM_GROUP]
    minimum = HostArena().min_bytes
    big = lambda tree: [x for x in jax.tree.leaves(tree) if x.nbytes >= minimum]  # noqa: E731
    small = lambda tree: [x for x in jax.tree.leaves(tree) if x.nbytes < minimum]  # noqa: E731

    placed = place_params(cfg, {LLM_GROUP: host})[LLM_GROUP]
    assert len(big(placed)) > 8 and all(_in_arena(x) for x in big(placed))
    assert not any(_in_arena(x) for x in small(placed))

    out = save_model_dir(tmp_path / "m", cfg, {LLM_GROUP: host})
    with kernels.cpu_kernels(True):
        for huge_pages in (False, True):
            loaded = load_model_dir(out).params[LLM_GROUP]
            assert not any(_in_arena(x) for x in big(loaded))
            engine = Generator(cfg.llama, loaded, compilation_cache=False, donate_params=True, huge_pages=huge_pages)
            assert all(_in_arena(x) == huge_pages for x in big(engine.params))
            assert all(x.is_deleted() == huge_pages for x in big(loaded))
            for a, b in zip(jax.tree.leaves(engine.params), jax.tree.leaves(host)):
                np.testing.assert_array_equal(np.asarray(a), b)
        # the caller's arrays (not donated) are left where they are
        loaded = load_model_dir(out).params[LLM_GROUP]
        engine = Generator(cfg.llama, loaded, compilation_cache=False, huge_pages=True)
        assert not any(_in_arena(x) or x.is_deleted() for x in big(engine.params))


@pytest.mark.skipif(not kernels.packed_int8_available(), reason="the CPU kernel's packed int8 path (AVX-512 VNNI)")
def test_the_engines_packed_int8_kernels_land_in_the_arena():
    cfg = _mid_config()
    host = jax.tree.map(np.asarray, init_params(cfg, 1))[LLM_GROUP]
    q = quantize_params({LLM_GROUP: host})[LLM_GROUP]
    expected = {p: np.asarray(kernels.pack_int8(x)) for p, x in flatten_params(q).items() if p.endswith("/kernel")}
    q = jax.tree.map(lambda x: jax.device_put(x, jax.devices()[0]), q)  # XLA's buffers, as a caller may give them
    with kernels.cpu_kernels(True):
        packed = kernel_layout(q, release=lambda w: True, arena=HostArena())
        # the engine packs into the arena with or without huge_pages (the packed kernels are its own copies)
        engine = Generator(cfg.llama, quantize_params({LLM_GROUP: host})[LLM_GROUP], compilation_cache=False)
    for tree in (packed, engine.params):
        three_d = {p: x for p, x in flatten_params(tree).items() if x.ndim == 3}
        assert len(three_d) == 7 * cfg.llama.num_layers + 1  # and the untied LM head
        assert all(_in_arena(x) for x in three_d.values() if x.nbytes >= HostArena().min_bytes)
        for p, x in three_d.items():  # written by the kernel library: pack_int8's layout
            np.testing.assert_array_equal(np.asarray(x), expected[p])
    # the packing replaced each kernel, one at a time: the given int8 kernels are gone
    assert all(x.is_deleted() for p, x in flatten_params(q).items() if p.endswith("/kernel"))
