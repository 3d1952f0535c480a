"""LLaMA from GGUF: q/k un-permutation, configs from metadata, a synthetic file, errors, and the real
SmolLM2-135M-Instruct (Q4_1) against transformers' own GGUF loader."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import SMOLLM2_LOGIT_ATOL, random_hf_llama
from vllama_jax.models.llama import Llama, init_cache
from vllama_jax.weights.llama_keys import llama_config_from_gguf, load_llama
from vllama_jax.weights.readers import GGUFSource, WeightsError, open_weights, unpermute_qk


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's HF->GGUF converter does to q/k rows: each head's rotate_half halves are interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llamacpp_permutation():
    rng = np.random.default_rng(0)
    for heads, dh, cols in ((4, 8, 5), (1, 16, 3), (3, 64, 2)):
        w = rng.standard_normal((heads * dh, cols)).astype(np.float32)
        p = _llamacpp_permute(w, heads)
        assert not np.array_equal(p, w)
        np.testing.assert_array_equal(unpermute_qk(p, heads), w)


# ------------------------------------------------------------------------------------------------------------
# synthetic GGUF written from a random transformers model


def _hf_random_llama(*, heads=4, kv=2, theta=50000.0, tie=False, seed=0):
    return random_hf_llama(seed=seed, vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=heads, num_key_value_heads=kv, rope_theta=theta, rms_norm_eps=1e-5,
                           tie_word_embeddings=tie, max_position_embeddings=512)


def _write_gguf(model, path: Path, arch: str = "llama") -> Path:
    """A llama.cpp-style GGUF (F32 tensors, q/k rows permuted) of a transformers LLaMA."""
    import gguf

    c = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        for hf, g in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if g == "attn_q":
                t = _llamacpp_permute(t, c.num_attention_heads)
            elif g == "attn_k":
                t = _llamacpp_permute(t, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{g}.weight", np.ascontiguousarray(t))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("tie", [False, True])
def test_synthetic_gguf_matches_transformers(tmp_path, tie):
    import torch

    hf = _hf_random_llama(tie=tie, heads=8 if tie else 4, kv=2, theta=50000.0 if tie else 3000.0)
    path = _write_gguf(hf, tmp_path / "tiny.gguf")
    cfg, params = load_llama(path)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.tie_word_embeddings) == (hf.config.num_attention_heads, 2, tie)
    assert cfg.rope_theta == hf.config.rope_parameters["rope_theta"] and cfg.vocab_size == 200
    ids = np.random.default_rng(1).integers(0, 200, size=(2, 9))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    m = Llama(cfg)
    ours = jax.jit(lambda p, i: m.apply({"params": p}, m.apply({"params": p}, i, method=Llama.embed))[0])(
        params, jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=1e-4)


def test_gguf_source_metadata_and_raw_layout(tmp_path):
    hf = _hf_random_llama()
    path = _write_gguf(hf, tmp_path / "tiny.gguf")
    src = GGUFSource(path)
    assert src.metadata["general.architecture"] == "llama"
    assert src.metadata["llama.attention.head_count_kv"] == 2
    assert src.array_length("tokenizer.ggml.tokens") == 200
    assert src.shape("blk.0.attn_k.weight") == (32, 64) and src.tensor_type("blk.0.attn_k.weight") == "F32"
    want = hf.state_dict()["model.layers.1.self_attn.k_proj.weight"].numpy()
    np.testing.assert_array_equal(src.get("blk.1.attn_k.weight"), want)  # un-permuted: HF layout
    raw = GGUFSource(path, raw=True).get("blk.1.attn_k.weight")
    np.testing.assert_array_equal(raw, _llamacpp_permute(want, 2))


def test_error_garbage_gguf(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(WeightsError, match="garbage.gguf"):
        load_llama(bad)
    magic_only = tmp_path / "magic.gguf"
    magic_only.write_bytes(b"GGUF" + np.random.default_rng(1).bytes(100))
    with pytest.raises(WeightsError, match="magic.gguf"):
        open_weights(magic_only)


def test_error_truncated_gguf(tmp_path):
    path = _write_gguf(_hf_random_llama(), tmp_path / "full.gguf")
    data = path.read_bytes()
    for frac in (0.01, 0.5, 0.99):
        cut = tmp_path / f"cut{int(frac * 100)}.gguf"
        cut.write_bytes(data[: int(len(data) * frac)])
        with pytest.raises(WeightsError, match=cut.name):
            load_llama(cut)


def test_error_gguf_other_architecture(tmp_path):
    path = _write_gguf(_hf_random_llama(), tmp_path / "other.gguf", arch="gpt2")
    with pytest.raises(WeightsError, match=r"other.gguf.*architecture 'gpt2'"):
        llama_config_from_gguf(path)


# ------------------------------------------------------------------------------------------------------------
# real weights: SmolLM2-135M-Instruct, Q4_1 (embeddings Q8_0), tied embeddings, GQA 9/3, rope_theta 1e5


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(smollm2_path, smollm2_hf):
    import torch

    hf, tok = smollm2_hf
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France? Answer in one word."}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="np")
    ids = np.asarray(enc["input_ids"] if hasattr(enc, "keys") else enc)
    assert tok.decode(ids[0]).startswith("<|im_start|>system")
    cfg, params = load_llama(smollm2_path)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.tie_word_embeddings) == (30, 9, 3, True)
    assert cfg.rope_theta == 100000.0 and "lm_head" not in params
    m = Llama(cfg)
    embed = jax.jit(lambda p, i: m.apply({"params": p}, i, method=Llama.embed))
    step = jax.jit(lambda p, e, c: m.apply({"params": p}, e, cache=c))

    # full prompt through the cache (prefill) == transformers' full forward
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    new = 6
    logits, cache = step(params, embed(params, jnp.asarray(ids)), init_cache(cfg, 1, ids.shape[1] + new))
    logits = np.asarray(logits)
    err = float(np.abs(logits - ref).max())
    print(f"SmolLM2 prefill logits: max |diff| vs transformers {err:.2e} (logit range {ref.max() - ref.min():.1f})")
    assert err < SMOLLM2_LOGIT_ATOL, f"prefill logits max |diff| {err:.2e} >= {SMOLLM2_LOGIT_ATOL}"

    # greedy continuation with the KV cache == transformers' greedy generate
    with torch.no_grad():
        gen = hf.generate(torch.tensor(ids), max_new_tokens=new, do_sample=False, output_scores=True,
                          return_dict_in_generate=True, pad_token_id=tok.eos_token_id)
    want_ids = gen.sequences[0, ids.shape[1]:].numpy()
    got_ids = []
    for t in range(new):
        err = float(np.abs(logits[0, -1] - gen.scores[t][0].numpy()).max())
        assert err < SMOLLM2_LOGIT_ATOL, f"decode step {t}: logits max |diff| {err:.2e} >= {SMOLLM2_LOGIT_ATOL}"
        got_ids.append(int(logits[0, -1].argmax()))
        logits, cache = step(params, embed(params, jnp.array([[got_ids[-1]]])), cache)
        logits = np.asarray(logits)
    np.testing.assert_array_equal(got_ids, want_ids)
