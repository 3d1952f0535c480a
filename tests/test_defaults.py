"""The embedded default model: CPU-sized config, numpy tower init, the SmolLM2 params cache, the notice."""
from __future__ import annotations

import numpy as np
import pytest

from vllama_jax import defaults
from vllama_jax.config import LlamaConfig
from vllama_jax.tree import flatten_params

SMALL_LLM = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4,
                        num_kv_heads=2, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def config():
    return defaults.embedded_config(SMALL_LLM)


def test_config_is_cpu_sized_chatml(config):
    assert config.template == "chatml" and config.llama == SMALL_LLM
    assert config.vit.image_size == 224 and config.vit.width <= 256 and config.vit.depth <= 4
    assert config.video_qformer.num_query_tokens == 32 and config.audio_qformer.num_query_tokens == 8
    assert config.equip_audio_branch


def test_tower_init_is_deterministic_and_complete(config):
    a = flatten_params(defaults.init_tower_params(config, seed=0, proj_rms=0.5))
    b = flatten_params(defaults.init_tower_params(config, seed=0, proj_rms=0.5))
    c = flatten_params(defaults.init_tower_params(config, seed=1, proj_rms=0.5))
    shapes = defaults.tower_shapes(config)
    assert set(a) == set(shapes) and not any(k.startswith("llama/") for k in a)
    assert all(a[k].shape == shapes[k] and a[k].dtype == np.float32 for k in a)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["video_query_tokens"], c["video_query_tokens"])
    assert all(np.all(v == 1) for k, v in a.items() if k.endswith("/scale"))  # LayerNorm scales
    assert all(np.all(v == 0) for k, v in a.items() if k.endswith("/bias"))
    assert abs(a["video_frame_position_embedding/embedding"].std() - 1.0) < 0.1  # upstream N(0, 1)
    assert abs(a["query_tokens"].std() - 0.02) < 0.005
    # projections into the LLM: unit-variance inputs come out with the requested RMS
    k = a["llama_proj/kernel"]
    assert abs(k.std() * np.sqrt(k.shape[0]) - 0.5) < 0.05


def test_llm_cache_round_trip(tmp_path, monkeypatch):
    calls = []

    def fake_load_llama(path):
        calls.append(path)
        return SMALL_LLM, {"embed_tokens": {"embedding": np.arange(12, dtype=np.float32).reshape(3, 4)}}

    monkeypatch.setattr("vllama_jax.defaults.load_llama", fake_load_llama)
    monkeypatch.setenv(defaults.CACHE_ENV, str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    first = defaults.load_smollm2(gguf)
    second = defaults.load_smollm2(gguf)
    assert len(calls) == 1  # the second load came from the cache
    assert second[0] == SMALL_LLM
    np.testing.assert_array_equal(second[1]["embed_tokens"]["embedding"], first[1]["embed_tokens"]["embedding"])
    cached = list((tmp_path / "cache").glob("smollm2-*.npz"))
    assert len(cached) == 1
    cached[0].write_bytes(b"damaged")  # a broken cache file is rebuilt, not an error
    defaults.load_smollm2(gguf)
    assert len(calls) == 2
    monkeypatch.setenv(defaults.CACHE_ENV, "off")
    defaults.load_smollm2(gguf)
    assert len(calls) == 3


def test_notice_says_untrained():
    assert "UNTRAINED" in defaults.EMBEDDED_NOTICE and "--model" in defaults.EMBEDDED_NOTICE


@pytest.mark.slow
def test_embedded_model(smollm2_path):
    m = defaults.embedded_model()
    assert defaults.is_embedded(m) and m.manifest["notice"] == defaults.EMBEDDED_NOTICE
    assert m.config.llama.hidden_size == 576 and m.config.llama.num_layers == 30
    assert m.tokenizer.chat_template and m.config.template == "chatml"
    shapes = defaults.tower_shapes(m.config)
    flat = flatten_params(m.params)
    assert all(flat[k].shape == s for k, s in shapes.items())
    assert "llama/embed_tokens/embedding" in flat
