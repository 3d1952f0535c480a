"""Loaders given the wrong file, a truncated file or a pickle that is not plain weights fail clearly."""

from __future__ import annotations

import contextlib
import pickle
import random
from pathlib import Path

import pytest
import torch

from tests.fuzz.targets import evil_opcodes, mutate_pickle, pth_legacy_seeds, pth_zip_seeds, run_weights
from vllama_jax.config import load_model_config
from vllama_jax.weights.load import load_file
from vllama_jax.weights.readers import WeightsError, open_weights

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_test.yaml"


@pytest.fixture(scope="module")
def cfg():
    return load_model_config(TINY)


def test_wrong_file_for_the_vit(tiny_dir, cfg):
    with pytest.raises(WeightsError) as e:
        load_file("eva_vit", tiny_dir / "imagebind.pth", cfg)
    assert "imagebind.pth" in str(e.value) and "none of the EVA ViT" in str(e.value)


def test_wrong_checkpoint_kind(tiny_dir, cfg):
    with pytest.raises(WeightsError, match="none of the video branch"):
        load_file("vl_ckpt", tiny_dir / "al_ckpt.pth", cfg)
    with pytest.raises(WeightsError, match="none of the BLIP-2"):
        load_file("blip2", tiny_dir / "eva_vit.pth", cfg)


def test_truncated_file(tiny_dir, tmp_path, cfg):
    data = (tiny_dir / "eva_vit.pth").read_bytes()
    bad = tmp_path / "eva_vit.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError) as e:
        load_file("eva_vit", bad, cfg)
    assert str(bad) in str(e.value)


def test_empty_and_missing_files(tmp_path, cfg):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(WeightsError, match="empty"):
        open_weights(empty)
    with pytest.raises(WeightsError, match="not found"):
        open_weights(tmp_path / "nope.pth")


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_that_is_not_plain_weights(tmp_path, capsys):
    p = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(2)}, "payload": _Evil()}, p)
    with pytest.raises(WeightsError, match="not a plain weights file"):
        open_weights(p)
    assert "this must never run" not in capsys.readouterr().out
    raw = tmp_path / "raw.pth"
    raw.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(WeightsError):
        open_weights(raw)


def test_mutated_pickles_never_run_code(tmp_path):
    """60 real .pth files (zip and legacy), each with a call to os.system / exec / eval / subprocess / open / ...
    injected at a random place of its pickle: every one is refused with a WeightsError or read as plain
    tensors, and none runs its call (which would create a canary file). The payloads are live: plain pickle
    runs one."""
    seeds = pth_zip_seeds(tmp_path) + pth_legacy_seeds(tmp_path)
    refused = 0
    for i in range(60):
        rng = random.Random(f"evil:{i}")
        seed = seeds[i % len(seeds)]
        canary = tmp_path / f"case{i}.pwned"
        label, data = mutate_pickle(rng, seed.read_bytes(), canary, evil=True)
        path = tmp_path / f"case{i}.pth"
        path.write_bytes(data)
        try:
            run_weights(path)
        except WeightsError as e:
            assert str(path) in str(e)
            refused += 1
        assert not canary.exists(), f"{seed.name} {label}: the file ran code"
    assert refused >= 50  # the rest: a call torch allows (OrderedDict, _rebuild_tensor_v2) or one never reached

    live = tmp_path / "live.pwned"
    payload = b""
    for k in range(100):  # the first payload calling os.system / posix.system
        payload = evil_opcodes(random.Random(k), live)
        if b"system" in payload:
            break
    with contextlib.suppress(pickle.UnpicklingError):  # a payload that pops its result leaves STOP nothing
        pickle.loads(b"\x80\x02" + payload + b".")
    assert live.exists()


def test_shape_mismatch_names_key_and_file(tiny_dir, tmp_path, cfg):
    sd = torch.load(tiny_dir / "eva_vit.pth", weights_only=True)
    sd["pos_embed"] = torch.zeros(1, 5, 48)
    p = tmp_path / "eva_vit.pth"
    torch.save(sd, p)
    with pytest.raises(WeightsError) as e:
        load_file("eva_vit", p, cfg)
    assert "pos_embed" in str(e.value) and str(p) in str(e.value)


def test_missing_keys_are_named(tiny_dir, tmp_path, cfg):
    sd = torch.load(tiny_dir / "eva_vit.pth", weights_only=True)
    del sd["blocks.1.mlp.fc2.bias"]
    p = tmp_path / "eva_vit.pth"
    torch.save(sd, p)
    with pytest.raises(WeightsError, match=r"missing parameters visual_encoder/blocks_1/mlp/fc2/bias"):
        load_file("eva_vit", p, cfg)


def test_unexpected_keys_are_named(tiny_dir, tmp_path, cfg):
    sd = torch.load(tiny_dir / "vl_ckpt.pth", weights_only=True)["model"]
    sd["video_Qformer.bert.encoder.layer.0.attention.self.extra.weight"] = torch.zeros(2)
    sd["something_else.weight"] = torch.zeros(2)
    p = tmp_path / "vl.pth"
    torch.save({"model": sd}, p)
    with pytest.raises(WeightsError, match="unexpected keys"):
        load_file("vl_ckpt", p, cfg)
