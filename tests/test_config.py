"""Typed configs: presets load, unknown keys and impossible values name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllama_jax.config import ConfigError, ModelConfig, apply_overrides, load_model_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MODEL_PRESETS = sorted(p for p in CONFIGS.glob("*.yaml") if p.name.startswith(("vl_", "al_")) or p.name == "tiny_test.yaml")


@pytest.mark.parametrize("path", MODEL_PRESETS, ids=lambda p: p.name)
def test_presets_load_and_validate(path):
    cfg = load_model_config(path)
    assert cfg.equip_audio_branch == (not path.name.startswith("vl_"))


def test_released_7b_shapes():
    cfg = load_model_config(CONFIGS / "al_llama2_7b_chat.yaml")
    assert (cfg.vit.width, cfg.vit.depth, cfg.vit.mlp_dim) == (1408, 39, 6144)
    assert cfg.qformer.num_layers == 12 and cfg.qformer.cross_attention_freq == 2
    assert cfg.video_qformer.encoder_width == 768 and cfg.audio_qformer.encoder_width == 1024
    assert cfg.llama.hidden_size == 4096 and cfg.template == "llama_2"


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("llama: {hidden_sise: 64}\n")
    with pytest.raises(ConfigError, match=r"llama\.hidden_sise: unknown key"):
        load_model_config(p)


@pytest.mark.parametrize("text,key", [
    ("vit: {width: 50, num_heads: 16}", "vit.width"),
    ("llama: {num_heads: 32, num_kv_heads: 5}", "llama.num_heads"),
    ("template: alpaca", "template"),
    ("precision: {llama: int8}", "precision.llama"),
    ("video_qformer: {encoder_width: 100}", "video_qformer.encoder_width"),
    ("qformer: {dropout: 1.5}", "qformer.dropout"),
    ("vit: {depth: -1}", "vit.depth"),
    ("vit: {depth: many}", "vit.depth"),
])
def test_impossible_values_are_named(tmp_path, text, key):
    p = tmp_path / "c.yaml"
    p.write_text(text + "\n")
    with pytest.raises(ConfigError) as e:
        load_model_config(p)
    assert key in str(e.value) and str(p) in str(e.value)


def test_overrides():
    cfg = apply_overrides(ModelConfig(), ["llama.num_layers=2", "template=vicuna"])
    assert cfg.llama.num_layers == 2 and cfg.template == "vicuna"
    with pytest.raises(ConfigError, match="llama.nope"):
        apply_overrides(ModelConfig(), ["llama.nope=1"])


def test_not_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("vit: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_model_config(p)
