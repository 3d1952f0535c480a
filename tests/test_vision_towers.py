"""EVA ViT and the image Q-Former: parity with the upstream fixtures and with transformers' BLIP-2 models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import assert_close, shapes_of
from vllama_jax.config import QFormerConfig, ViTConfig
from vllama_jax.models.eva_vit import EvaViT
from vllama_jax.models.layers import LayerNorm
from vllama_jax.models.qformer import QFormer
from vllama_jax.tree import unflatten_params
from vllama_jax.weights.keymaps import eva_vit_keymap, image_qformer_keymap, load_component, qformer_keymap
from vllama_jax.weights.readers import DictSource, open_weights

TINY_VIT = ViTConfig(image_size=56, patch_size=14, width=48, depth=2, num_heads=4, mlp_dim=209)
TINY_QF = QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, cross_attention_freq=2,
                        encoder_width=48, num_query_tokens=8)


def test_eva_vit_matches_upstream_fixture(tiny_dir, tiny_inputs, tiny_outputs):
    inputs, out = tiny_inputs, tiny_outputs
    frames = inputs["video"].transpose(0, 2, 3, 4, 1).reshape(-1, 56, 56, 3)  # (b t) h w c, sample-major
    model = EvaViT(TINY_VIT)
    flat = load_component(open_weights(tiny_dir / "eva_vit.pth"), eva_vit_keymap(2),
                          shapes_of(model, frames, prefix="visual_encoder/"))
    params = unflatten_params(flat)["visual_encoder"]
    y, state = model.apply({"params": params}, frames, mutable=["intermediates"])
    assert_close(y, out["vit.out"], name="vit.out")
    for i in range(2):
        assert_close(state["intermediates"][f"block{i}"][0], out[f"vit.block{i}"], name=f"block{i}")


def test_image_qformer_and_ln_vision_match_upstream_fixture(tiny_dir, tiny_outputs):
    out = tiny_outputs
    qf = QFormer(TINY_QF)
    mem, queries = out["vit.ln_vision"], out["image_qformer.query_embeds_in"]
    shapes = shapes_of(qf, queries, mem, prefix="qformer/")
    shapes |= {"query_tokens": (1, 8, 32), "ln_vision/scale": (48,), "ln_vision/bias": (48,)}
    params = unflatten_params(load_component(open_weights(tiny_dir / "blip2_qformer.pth"), image_qformer_keymap(),
                                             shapes))
    ln = LayerNorm(1e-5).apply({"params": params["ln_vision"]}, out["vit.out"])
    assert_close(ln, out["vit.ln_vision"], name="ln_vision")
    np.testing.assert_array_equal(np.broadcast_to(params["query_tokens"], queries.shape), queries)
    y, state = qf.apply({"params": params["qformer"]}, queries, mem, mutable=["intermediates"])
    assert_close(y, out["image_qformer.out"], name="image_qformer.out")
    for i in range(2):
        assert_close(state["intermediates"][f"layer{i}"][0], out[f"image_qformer.layer{i}"], name=f"layer{i}")


def _hf_vision_to_upstream(sd: dict) -> dict:
    """transformers' Blip2VisionModel names -> eva_vit_g.pth names (+ ln_vision)."""
    out = {}
    for k, v in sd.items():
        v = v.detach().numpy()
        k2 = (k.replace("embeddings.class_embedding", "cls_token")
               .replace("embeddings.position_embedding", "pos_embed")
               .replace("embeddings.patch_embedding", "patch_embed.proj")
               .replace("encoder.layers.", "blocks.").replace(".self_attn.projection", ".attn.proj")
               .replace(".layer_norm1", ".norm1").replace(".layer_norm2", ".norm2")
               .replace("post_layernorm", "ln_vision"))
        if k2.endswith("self_attn.qkv.weight"):
            out[k2.replace("self_attn", "attn")] = v
        elif k2.endswith("self_attn.qkv.bias"):
            d = v.shape[0] // 3
            out[k2.replace("self_attn.qkv.bias", "attn.q_bias")] = v[:d]
            out[k2.replace("self_attn.qkv.bias", "attn.v_bias")] = v[2 * d:]
        else:
            out[k2] = v
    return out


@pytest.mark.parametrize("size,width,depth,heads,mlp,patch", [(42, 40, 3, 4, 72, 14), (28, 24, 2, 2, 50, 7)])
def test_eva_vit_matches_transformers_blip2_vision(size, width, depth, heads, mlp, patch):
    from transformers import Blip2VisionConfig, Blip2VisionModel

    torch.manual_seed(0)
    hf_cfg = Blip2VisionConfig(hidden_size=width, intermediate_size=mlp, num_hidden_layers=depth,
                               num_attention_heads=heads, image_size=size, patch_size=patch, layer_norm_eps=1e-6)
    hf = Blip2VisionModel(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
        # EVA has no key bias: zero the middle third of HF's fused qkv bias
        for layer in hf.encoder.layers:
            if getattr(layer.self_attn, "qkv", None) is not None and layer.self_attn.qkv.bias is not None:
                layer.self_attn.qkv.bias[width:2 * width] = 0
    sd = _hf_vision_to_upstream(hf.state_dict())
    cfg = ViTConfig(image_size=size, patch_size=patch, width=width, depth=depth, num_heads=heads, mlp_dim=mlp)
    model = EvaViT(cfg)
    images = np.random.default_rng(1).normal(size=(3, size, size, 3)).astype(np.float32)
    src = DictSource({k: v for k, v in sd.items() if not k.startswith("ln_vision")})
    params = unflatten_params(load_component(src, eva_vit_keymap(depth), shapes_of(model, images,
                                                                                  prefix="visual_encoder/")))
    ours = model.apply({"params": params["visual_encoder"]}, images)
    ours = LayerNorm(1e-6).apply({"params": {"scale": sd["ln_vision.weight"], "bias": sd["ln_vision.bias"]}}, ours)
    with torch.no_grad():
        ref = hf(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
    assert_close(ours, ref, name="Blip2VisionModel")


@pytest.mark.parametrize("hidden,layers,heads,inter,freq,enc,nq", [(24, 3, 4, 40, 2, 40, 5), (32, 2, 2, 48, 1, 16, 3)])
def test_qformer_matches_transformers_blip2_qformer(hidden, layers, heads, inter, freq, enc, nq):
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    torch.manual_seed(0)
    hf_cfg = Blip2QFormerConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                intermediate_size=inter, cross_attention_frequency=freq, encoder_hidden_size=enc)
    hf = Blip2QFormerModel(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(1.0 if "LayerNorm.weight" in name or name == "layernorm.weight" else 0.0, 0.2)
    sd = {}
    for k, v in hf.state_dict().items():
        k2 = k.replace(".attention.attention.", ".attention.self.").replace(".crossattention.attention.",
                                                                             ".crossattention.self.")
        k2 = k2.replace("layernorm.", "embeddings.LayerNorm.") if k2.startswith("layernorm.") else k2
        sd["Qformer.bert." + k2] = v.numpy()
    cfg = QFormerConfig(hidden_size=hidden, num_layers=layers, num_heads=heads, intermediate_size=inter,
                        cross_attention_freq=freq, encoder_width=enc, num_query_tokens=nq)
    rng = np.random.default_rng(2)
    queries = rng.normal(size=(2, nq, hidden)).astype(np.float32)
    memory = rng.normal(size=(2, 7, enc)).astype(np.float32)
    model = QFormer(cfg)
    params = unflatten_params(load_component(DictSource(sd), qformer_keymap("Qformer", "qformer"),
                                             shapes_of(model, queries, memory, prefix="qformer/")))
    ours = model.apply({"params": params["qformer"]}, queries, memory)
    with torch.no_grad():
        ref = hf(query_embeds=torch.from_numpy(queries), encoder_hidden_states=torch.from_numpy(memory))
    assert_close(ours, ref.last_hidden_state.numpy(), name="Blip2QFormerModel")
