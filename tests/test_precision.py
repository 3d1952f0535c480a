"""Reduced-precision compute as a config choice per tower (upstream: ViT fp16, LLaMA bf16)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import TINY_CONFIG, tiny_files
from vllama_jax.config import apply_overrides, load_model_config
from vllama_jax.models import build_model
from vllama_jax.weights.load import load_upstream


@pytest.mark.slow
def test_fp16_vit_and_bf16_llama_track_float32(tiny_dir, tiny_inputs, tiny_outputs):
    files = tiny_files(tiny_dir)
    inputs, out = tiny_inputs, tiny_outputs
    frames = inputs["video"].transpose(0, 2, 3, 4, 1)
    cfg = apply_overrides(load_model_config(TINY_CONFIG), [
        "precision.vit=float16", "precision.vit_params=float16",
        "precision.llama=bfloat16", "precision.llama_params=bfloat16"]).validate()
    params = load_upstream(cfg, files)
    # storage dtypes follow upstream: ViT Linear/Conv in fp16, its LayerNorms and position table in fp32
    vit = params["visual_encoder"]
    assert vit["blocks_0"]["attn"]["query"]["kernel"].dtype == np.float16
    assert vit["pos_embed"].dtype == np.float32 and vit["blocks_0"]["norm1"]["scale"].dtype == np.float32
    assert params["llama"]["layers_0"]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
    assert params["video_qformer"]["layer_0"]["output_query"]["kernel"].dtype == np.float32
    model = build_model(cfg)
    emb = jax.jit(lambda p, f: model.apply({"params": p}, f, method=model.encode_video))(params, frames)
    ref = out["video.inputs_llama"]
    assert np.isfinite(np.asarray(emb)).all()
    assert np.abs(np.asarray(emb, np.float32) - ref).max() < 0.02 * np.abs(ref).max()
    res = jax.jit(lambda p: model.apply({"params": p}, frames, inputs["stage2_vicuna.input_ids"],
                                        inputs["stage2_vicuna.labels"], inputs["stage2_vicuna.attention_mask"], 512,
                                        method=model.instruction_loss)["loss"])(params)
    assert abs(float(res) - float(out["stage2_vicuna.loss"])) < 0.05
