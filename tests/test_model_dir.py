"""The model-directory format: save/load round trip, partial and dtype-cast restores, a plain Orbax restore of
params/, atomic writes, and a clear `ModelDirError` for missing, partial or corrupt directories."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.helpers import TINY_CONFIG, tiny_files
from vllama_jax.config import load_model_config
from vllama_jax.weights import model_dir as md
from vllama_jax.tree import flatten_params
from vllama_jax.weights.load import load_upstream
from vllama_jax.weights.model_dir import ModelDirError, load_model_dir, model_dir_groups, save_model_dir


@pytest.fixture(scope="module")
def tiny(tiny_dir, tiny_tok):
    cfg = load_model_config(TINY_CONFIG)
    params = load_upstream(cfg, tiny_files(tiny_dir, "blip2", "llama", "vl_ckpt"))
    return cfg, params, tiny_tok


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    cfg, params, tok = tiny
    out = tmp_path_factory.mktemp("md") / "model"
    save_model_dir(out, cfg, params, tokenizer=tok, manifest_extra={"origin": "test"})
    return out


def test_layout_and_manifest(saved, tiny):
    cfg, params, _ = tiny
    assert sorted(p.name for p in saved.iterdir()) == ["config.yaml", "manifest.json", "params", "tokenizer"]
    m = json.loads((saved / "manifest.json").read_text())
    assert m["format"] == md.FORMAT and m["format_version"] == md.FORMAT_VERSION and m["origin"] == "test"
    assert set(m["groups"]) == set(params) == set(model_dir_groups(saved))
    assert m["groups"]["llama"] == {"dtype": "float32", "params": 147_776, "bytes": 4 * 147_776, "tensors": 21}
    assert load_model_config(saved / "config.yaml") == cfg
    # params/ is an ordinary Orbax checkpoint
    raw = ocp.PyTreeCheckpointer().restore(saved / "params")
    for k, v in flatten_params(params).items():
        np.testing.assert_array_equal(flatten_params(raw)[k], v)


def test_large_arrays_stream_chunk_by_chunk_from_views(tmp_path):
    """The conversion hands the writer views (a Linear weight transposed, a mapped file's pages): each large
    array goes out one stored chunk at a time, made contiguous and cast per chunk, uncompressed; a plain Orbax
    restore gives the values back."""
    rng = np.random.default_rng(0)
    torch_layout = rng.standard_normal((96, 40)).astype(np.float32)  # (out, in): the kernel is its transpose
    table = rng.standard_normal((70, 24)).astype(np.float32)
    arrays = {"a/kernel": torch_layout.T, "a/table": table, "a/strided": table[::2, 1:17], "b/bias": table[0]}
    f32 = np.dtype(np.float32)
    specs = {"a/kernel": md.LeafSpec((40, 96), f32), "a/table": md.LeafSpec((70, 24), np.dtype(ml_dtypes.bfloat16)),
             "a/strided": md.LeafSpec((35, 16), f32), "b/bias": md.LeafSpec((24,), f32)}
    pieces: dict[str, list[int]] = {}
    md.write_params(tmp_path / "params", specs, lambda write: [write(p, a) for p, a in arrays.items()],
                    chunk_bytes=1024, write_buffer_bytes=4096,
                    on_written=lambda path, n: pieces.setdefault(path, []).append(n))
    raw = flatten_params(ocp.PyTreeCheckpointer().restore(tmp_path / "params"))
    for path, a in arrays.items():
        np.testing.assert_array_equal(raw[path], np.asarray(a).astype(specs[path].dtype))
    assert len(pieces["a/kernel"]) > 3 and sum(pieces["a/kernel"]) == 40 * 96 * 4  # written in chunks
    assert pieces["b/bias"] == [24 * 4]  # a small array in one piece
    ones = np.ones((128, 128), np.float32)  # zstd (Orbax's default) stores it in a few hundred bytes
    md.write_params(tmp_path / "ones", {"ones": md.LeafSpec(ones.shape, f32)}, lambda write: write("ones", ones))
    assert sum(f.stat().st_size for f in (tmp_path / "ones").rglob("*") if f.is_file()) > ones.nbytes  # uncompressed


@pytest.mark.slow
def test_round_trip_groups_exclude_dtype(saved, tiny):
    cfg, params, _ = tiny
    m = load_model_dir(saved)
    assert m.config == cfg and m.tokenizer.encode("hello") == tiny[2].encode("hello")
    assert set(m.groups) == set(params)
    leaf = m.params["llama"]["norm"]["scale"]
    assert isinstance(leaf, jax.Array) and leaf.sharding.device_set == {jax.devices()[0]}
    for k, v in flatten_params(params).items():
        np.testing.assert_array_equal(np.asarray(flatten_params(m.params)[k]), v)
    assert load_model_dir(saved, groups=["llama", "llama_proj"]).groups == ("llama", "llama_proj")
    assert "qformer" not in load_model_dir(saved, exclude=("qformer", "query_tokens")).groups
    bf = load_model_dir(saved, groups=["llama_proj"], dtype="bfloat16")
    assert bf.params["llama_proj"]["kernel"].dtype == jax.numpy.bfloat16
    with pytest.raises(ModelDirError, match="no parameter group.*audio_encoder.*it has:"):
        load_model_dir(saved, groups=["audio_encoder"])


@pytest.mark.slow
def test_sharded_params_save_and_restore(saved, tiny, tmp_path):
    """Arrays spread over a mesh are gathered leaf by leaf on save and re-sharded on load."""
    from vllama_jax.sharding import make_mesh

    cfg, params, _ = tiny
    mesh = make_mesh("fsdp=4,tensor=2")
    sharded = load_model_dir(saved, mesh=mesh, groups=["llama", "llama_proj"])
    kernel = sharded.params["llama"]["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert len(kernel.sharding.device_set) == 8 and kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    save_model_dir(tmp_path / "again", cfg, sharded.params)
    again = load_model_dir(tmp_path / "again", mesh=mesh)
    for k, v in flatten_params(again.params).items():
        np.testing.assert_array_equal(np.asarray(v), flatten_params(params)[k])
        assert v.sharding == flatten_params(sharded.params)[k].sharding


def test_relative_paths(saved, tiny, tmp_path, monkeypatch):
    cfg, params, _ = tiny
    monkeypatch.chdir(saved.parent)
    assert load_model_dir(saved.name, groups=["llama_proj"]).groups == ("llama_proj",)
    monkeypatch.chdir(tmp_path)
    save_model_dir("rel", cfg, {"llama_proj": params["llama_proj"]})
    assert load_model_dir("rel").groups == ("llama_proj",)


def test_refuses_to_overwrite_and_replaces_with_force(saved, tiny, tmp_path):
    cfg, params, _ = tiny
    with pytest.raises(ModelDirError, match="already exists"):
        save_model_dir(saved, cfg, params)
    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    save_model_dir(copy, cfg, {"llama": params["llama"]}, force=True)
    assert model_dir_groups(copy) == ("llama",)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(ModelDirError, match="not a vllama-jax model directory"):
        save_model_dir(other, cfg, params, force=True)
    assert (other / "notes.txt").exists()


def test_failed_save_leaves_nothing(tiny, tmp_path, monkeypatch):
    cfg, params, _ = tiny

    def boom(store, array):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(md, "_write_leaf", boom)
    with pytest.raises(OSError, match="No space left"):
        save_model_dir(tmp_path / "m", cfg, params)
    assert list(tmp_path.iterdir()) == []


def _copy(saved: Path, tmp_path: Path) -> Path:
    d = tmp_path / "m"
    shutil.copytree(saved, d)
    return d


@pytest.mark.parametrize("damage,match", [
    ("missing", "model directory not found"),
    ("manifest", "no manifest.json"),
    ("manifest_json", "corrupt manifest"),
    ("version", "format version 99 is not supported"),
    ("config", "bad config.yaml"),
    ("params", "params: missing"),
    ("metadata", "incomplete Orbax checkpoint"),
    ("data", "corrupt Orbax checkpoint|cannot read the parameters"),
    ("shape", r"has shape \(.*\) but config.yaml implies"),
])
def test_broken_directories_raise_model_dir_error(saved, tmp_path, damage, match):
    d = _copy(saved, tmp_path)
    if damage == "missing":
        shutil.rmtree(d)
    elif damage == "manifest":
        (d / "manifest.json").unlink()
    elif damage == "manifest_json":
        (d / "manifest.json").write_text("{not json")
    elif damage == "version":
        m = json.loads((d / "manifest.json").read_text())
        (d / "manifest.json").write_text(json.dumps({**m, "format_version": 99}))
    elif damage == "config":
        (d / "config.yaml").write_text("llama: {hidden_size: -1}\n")
    elif damage == "params":
        shutil.rmtree(d / "params")
    elif damage == "metadata":
        (d / "params" / "_METADATA").unlink()
    elif damage == "data":
        for f in (d / "params").rglob("*"):
            if f.is_file() and f.parent.name == "d":
                f.write_bytes(f.read_bytes()[:10])
    elif damage == "shape":
        (d / "config.yaml").write_text((d / "config.yaml").read_text().replace("hidden_size: 64", "hidden_size: 32"))
    with pytest.raises(ModelDirError, match=match) as e:
        load_model_dir(d)
    assert str(d) in str(e.value)
