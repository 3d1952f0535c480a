"""LLaMA decoder: parity with transformers, the tiny_vl fixture, the KV cache, loaders and their errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from tests.helpers import random_hf_llama
from vllama_jax import kernels
from vllama_jax.config import LlamaConfig
from vllama_jax.models.layers import apply_rope
from vllama_jax.models.llama import Llama, _write_rows, cache_logical_axes, init_cache, rope_cos_sin
from vllama_jax.tree import flatten_params
from vllama_jax.weights.llama_keys import (
    llama_config_from_hf,
    llama_config_from_hf_dict,
    llama_param_shapes,
    load_llama,
    load_llama_params,
)
from vllama_jax.weights.readers import DictSource, WeightsError, open_weights

ATOL = 1e-4


# ------------------------------------------------------------------------------------------------------------
# helpers


def _hf_model(*, hidden=64, layers=2, heads=4, kv=4, inter=96, vocab=300, head_dim=None, theta=10000.0,
              eps=1e-5, tie=False, seed=0):
    """A transformers LlamaForCausalLM with every parameter random and non-trivial (norm gains 1 + 0.1 N)."""
    return random_hf_llama(
        seed=seed, vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, rope_theta=theta, rms_norm_eps=eps,
        tie_word_embeddings=tie, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def _hf_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask))
    return out.logits.float().numpy()


def _save(model, folder: Path, fmt: str) -> Path:
    """Write `model` as a HF folder: safetensors single/sharded, or a PyTorch .bin (single or sharded index)."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        model.save_pretrained(folder)
    elif fmt == "safetensors_sharded":
        model.save_pretrained(folder, max_shard_size="40KB")
        assert len(list(folder.glob("model-*.safetensors"))) > 2
    elif fmt == "bin_sharded":
        # transformers 5 writes only safetensors; write the .bin layout (Vicuna folders) by hand.
        model.config.save_pretrained(folder)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}  # tied: lm_head.weight is included
        names = sorted(sd)
        parts = [names[: len(names) // 2], names[len(names) // 2:]]
        weight_map = {}
        for j, part in enumerate(parts):
            fname = f"pytorch_model-{j + 1:05d}-of-00002.bin"
            torch.save({k: sd[k].clone() for k in part}, folder / fname)
            weight_map.update({k: fname for k in part})
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        raise ValueError(fmt)
    return folder


def _forward(cfg: LlamaConfig, params, ids, mask=None, **kw):
    m = Llama(cfg)

    @jax.jit
    def run(p, ids, mask):
        emb = m.apply({"params": p}, ids, method=Llama.embed)
        return m.apply({"params": p}, emb, mask, **kw)[0]

    return np.asarray(run(params, jnp.asarray(ids), None if mask is None else jnp.asarray(mask)))


# ------------------------------------------------------------------------------------------------------------
# parity with transformers on random weights

CASES = {
    # name: (model kwargs, file format)
    "mha_untied_theta5000": (dict(theta=5000.0, eps=1e-6), "safetensors"),
    "gqa_tied_sharded": (dict(heads=8, kv=2, layers=3, tie=True, theta=500000.0, inter=80, vocab=301),
                         "safetensors_sharded"),
    "mqa_headdim_bin": (dict(hidden=48, heads=4, kv=1, head_dim=16, theta=1e6, inter=72, vocab=257, seed=3),
                        "bin_sharded"),
    "gqa_tied_bin": (dict(heads=4, kv=2, tie=True, theta=20000.0, seed=5), "bin_sharded"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_transformers(case, tmp_path):
    kwargs, fmt = CASES[case]
    hf = _hf_model(**kwargs)
    folder = _save(hf, tmp_path / case, fmt)
    cfg, params = load_llama(folder)
    assert cfg.num_kv_heads == kwargs.get("kv", 4) and cfg.tie_word_embeddings == kwargs.get("tie", False)
    assert cfg.rope_theta == kwargs["theta"]
    assert ("lm_head" in params) != cfg.tie_word_embeddings

    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, size=(3, 11))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0  # right padding (training batches)
    mask[2, :3] = 0  # left padding
    ref = _hf_logits(hf, ids, mask)
    ours = _forward(cfg, params, ids, mask)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    # padded query rows are garbage in both implementations; every real token must match
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], ref[valid], atol=ATOL, rtol=ATOL)


def test_param_tree_matches_loader_shapes():
    for tie in (False, True):
        cfg = LlamaConfig(vocab_size=40, hidden_size=24, intermediate_size=40, num_layers=2, num_heads=6,
                          num_kv_heads=2, head_dim=8, tie_word_embeddings=tie)
        boxed = jax.eval_shape(Llama(cfg).init, jax.random.key(0), jnp.zeros((1, 3, 24)))["params"]
        flat = flatten_params(nn_unbox_shapes(boxed))
        assert flat == llama_param_shapes(cfg)
        # every parameter carries logical axes, one name per dimension
        leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: hasattr(x, "names"))
        assert all(hasattr(x, "names") and len(x.names) == len(x.value.shape) for x in leaves)
    emb_names = boxed["embed_tokens"]["embedding"].names
    assert tuple(emb_names) == ("vocab", "embed")


def nn_unbox_shapes(tree):
    return jax.tree_util.tree_map(lambda x: tuple(x.value.shape), tree, is_leaf=lambda x: hasattr(x, "names"))


# ------------------------------------------------------------------------------------------------------------
# tiny_vl fixture (outputs of the upstream transformers-4.28 LLaMA)


@pytest.fixture(scope="module")
def fixture_llama(tiny_dir, tiny_llama, tmp_path_factory):
    """The fixture LLaMA loaded from the safetensors index and from the .bin index (must be identical)."""
    src = tiny_dir / "llama"
    cfg, params = tiny_llama  # load_llama(src): safetensors preferred when both exist
    bin_dir = tmp_path_factory.mktemp("llama_bin")
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            (bin_dir / f.name).symlink_to(f)
    cfg_bin, params_bin = load_llama(bin_dir)
    assert cfg_bin == cfg
    flat, flat_bin = flatten_params(params), flatten_params(params_bin)
    assert flat.keys() == flat_bin.keys()
    for k in flat:
        np.testing.assert_array_equal(flat[k], flat_bin[k])
    return cfg, params


@pytest.mark.parametrize("tag", ["chat_vicuna", "chat_llama2"])
def test_fixture_forward(fixture_llama, tiny_outputs, tag):
    cfg, params = fixture_llama
    o = tiny_outputs
    x = jnp.asarray(o[f"{tag}.context_embeds"])
    (logits, cache), state = Llama(cfg).apply({"params": params}, x, mutable=["intermediates"])
    assert cache is None
    inter = state["intermediates"]
    np.testing.assert_allclose(np.asarray(logits), o[f"{tag}.logits"], atol=ATOL, rtol=ATOL)
    for i in range(cfg.num_layers):
        np.testing.assert_allclose(np.asarray(inter[f"layer{i}"][0]), o[f"{tag}.llama.layer{i}"], atol=ATOL, rtol=ATOL)
    np.testing.assert_allclose(np.asarray(inter["final_norm"][0]), o[f"{tag}.llama.final_norm"], atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("tag", ["chat_vicuna", "chat_llama2"])
def test_fixture_greedy_decode_with_cache(fixture_llama, tiny_outputs, tag):
    """transformers-4.28 `generate(inputs_embeds=..., do_sample=False)`: prefill the context at positions 0..L-1,
    then feed each greedy token back through the KV cache."""
    cfg, params = fixture_llama
    o = tiny_outputs
    x = jnp.asarray(o[f"{tag}.context_embeds"])
    want_steps, want_ids = o[f"{tag}.step_logits"], o[f"{tag}.generated_full"][0, 1:]
    m = Llama(cfg)
    step = jax.jit(lambda p, e, c: m.apply({"params": p}, e, cache=c, logits_slice=slice(-1, None)))
    embed = jax.jit(lambda p, t: m.apply({"params": p}, t, method=Llama.embed))
    logits, cache = step(params, x, init_cache(cfg, 1, x.shape[1] + len(want_ids)))
    got_steps, got_ids = [], []
    for _ in range(len(want_ids)):
        got_steps.append(np.asarray(logits[0, -1]))
        tok = int(jnp.argmax(logits[0, -1]))
        got_ids.append(tok)
        logits, cache = step(params, embed(params, jnp.array([[tok]])), cache)
    np.testing.assert_allclose(np.stack(got_steps), want_steps, atol=ATOL, rtol=ATOL)
    np.testing.assert_array_equal(got_ids, want_ids)
    assert int(cache["index"][0]) == x.shape[1] + len(want_ids)


def test_video_llama_checkpoint_prefix(tiny_dir, fixture_llama):
    """LLaMA keys inside a Video-LLaMA state dict (`llama_model.` prefix, inv_freq buffers, other towers)."""
    cfg, params = fixture_llama
    src = open_weights(tiny_dir / "llama")
    tensors = {"llama_model." + k: src.get(k) for k in src.keys()}
    tensors["llama_proj.weight"] = np.zeros((64, 32), np.float32)  # another component's key: not claimed
    loaded = load_llama_params(DictSource(tensors), cfg, src_prefix="llama_model.")
    for k, v in flatten_params(params).items():
        np.testing.assert_array_equal(flatten_params(loaded)[k], v)


# ------------------------------------------------------------------------------------------------------------
# KV cache


@pytest.fixture(scope="module")
def small():
    """A small GQA model (6 query heads, 2 kv heads, rope_theta 300) with jitted entry points:
    full(x) -> logits without a cache; step(cache, x, mask) -> (logits, cache)."""
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_layers=2, num_heads=6, num_kv_heads=2,
                      rms_norm_eps=1e-6, rope_theta=300.0, max_position_embeddings=64)
    m = Llama(cfg)
    params = nn.meta.unbox(jax.jit(m.init)(jax.random.key(1), jnp.zeros((1, 4, 48)))["params"])
    # the default init is close to the identity map; scale the projections up so every layer matters
    params = jax.tree_util.tree_map(lambda p: p * 8.0 if p.ndim == 2 else p, params)
    full = jax.jit(lambda x: m.apply({"params": params}, x)[0])
    step = jax.jit(lambda c, x, mask: m.apply({"params": params}, x, mask, cache=c))
    return SimpleNamespace(cfg=cfg, m=m, params=params, full=lambda x: np.asarray(full(x)), step=step)


def test_cache_prefill_then_decode_equals_full_forward(small):
    cfg = small.cfg
    x = jax.random.normal(jax.random.key(2), (2, 10, cfg.hidden_size))
    full = small.full(x)
    # donation: the cache is a plain pytree that a jitted step may consume
    step = jax.jit(lambda c, e: small.m.apply({"params": small.params}, e, cache=c), donate_argnums=0)
    out, cache = step(init_cache(cfg, 2, 16), x[:, :6])
    got = [np.asarray(out)]
    for t in range(6, 10):
        out, cache = step(cache, x[:, t:t + 1])
        got.append(np.asarray(out))
    np.testing.assert_allclose(np.concatenate(got, axis=1), full, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache["index"]), [10, 10])
    np.testing.assert_array_equal(np.asarray(cache["next_pos"]), [10, 10])


@pytest.mark.parametrize("padding", ["left", "right"])
def test_cache_batch_of_prompts_with_different_lengths(small, padding):
    """Two prompts (5 and 8 tokens) padded into one batch, prefilled together, then 4 decode steps; each row must
    equal the full forward of its own unpadded sequence (causal: position t of the full forward = step t)."""
    cfg = small.cfg
    lengths, new = (5, 8), 4
    seqs = [jax.random.normal(jax.random.key(10 + i), (1, n + new, cfg.hidden_size)) for i, n in enumerate(lengths)]
    refs = [small.full(s)[0] for s in seqs]
    L = max(lengths)
    x = np.zeros((2, L, cfg.hidden_size), np.float32)
    mask = np.zeros((2, L), np.int32)
    for b, n in enumerate(lengths):
        lo = L - n if padding == "left" else 0
        x[b, lo:lo + n] = np.asarray(seqs[b][0, :n])
        mask[b, lo:lo + n] = 1
    out, cache = small.step(init_cache(cfg, 2, L + new), jnp.asarray(x), jnp.asarray(mask))
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(np.asarray(out[b])[mask[b] == 1], refs[b][:n], atol=1e-5, rtol=1e-5)
    for t in range(new):
        e = jnp.concatenate([s[:, n + t:n + t + 1] for s, n in zip(seqs, lengths)], axis=0)
        out, cache = small.step(cache, e, jnp.ones((2, 1), jnp.int32))
        for b, n in enumerate(lengths):
            np.testing.assert_allclose(np.asarray(out[b, 0]), refs[b][n + t], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache["next_pos"]), [n + new for n in lengths])


def test_cache_rows_at_different_offsets(small):
    """Rows prefilled separately (no padding) and merged along the batch: each decode step writes at its row's own
    slot (per-row `index`)."""
    cfg = small.cfg
    n, new = 3, 3
    seqs = [jax.random.normal(jax.random.key(20 + i), (1, 7 + new, cfg.hidden_size)) for i in range(2)]
    one = jnp.ones((1, 7), jnp.int32)
    _, c0 = small.step(init_cache(cfg, 1, 12), seqs[0][:, :7], one.at[:, n:].set(0))  # row 0: 3 real + 4 pads
    _, c1 = small.step(init_cache(cfg, 1, 12), seqs[1][:, :7], one)  # row 1: 7 real tokens
    c0 = dict(c0, index=c0["index"] - (7 - n))  # row 0 resumes right after its 3 real tokens
    cache = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), c0, c1)
    np.testing.assert_array_equal(np.asarray(cache["index"]), [n, 7])
    refs = [small.full(seqs[0][:, :n + new])[0, n:], small.full(seqs[1])[0, 7:]]
    for t in range(new):
        e = jnp.concatenate([seqs[0][:, n + t:n + t + 1], seqs[1][:, 7 + t:7 + t + 1]])
        out, cache = small.step(cache, e, jnp.ones((2, 1), jnp.int32))
        for b in range(2):
            np.testing.assert_allclose(np.asarray(out[b, 0]), refs[b][t], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache["index"]), [n + new, 7 + new])


def test_cache_logical_axes_match_cache_tree():
    cfg = LlamaConfig(vocab_size=10, hidden_size=16, intermediate_size=16, num_layers=3, num_heads=4, num_kv_heads=2)
    cache = init_cache(cfg, 2, 8, jnp.bfloat16)
    axes = cache_logical_axes(cfg)
    is_axes = lambda x: isinstance(x, tuple)  # noqa: E731
    assert jax.tree_util.tree_structure(axes, is_leaf=is_axes) == jax.tree_util.tree_structure(cache)
    for a, names in zip(jax.tree_util.tree_leaves(cache), jax.tree_util.tree_leaves(axes, is_leaf=is_axes)):
        assert a.ndim == len(names)
    assert cache["layers_0"]["k"].shape == (2, 2, 8, 4) and cache["layers_0"]["k"].dtype == jnp.bfloat16


def test_logits_slice_and_return_hidden(small):
    cfg, m, params = small.cfg, small.m, small.params
    x = jax.random.normal(jax.random.key(3), (2, 6, cfg.hidden_size))
    full = small.full(x)
    last, _ = m.apply({"params": params}, x, logits_slice=slice(-1, None))
    # a slice changes the head's matmul shape and so its summation order: equal up to float32 rounding (1.4e-6
    # seen on logits of size ~1)
    np.testing.assert_allclose(np.asarray(last), full[:, -1:], atol=1e-5)
    rows, _ = m.apply({"params": params}, x, logits_slice=jnp.array([2, 4]))
    np.testing.assert_allclose(np.asarray(rows)[:, 0], full[[0, 1], [2, 4]], atol=1e-5)
    hidden, _ = m.apply({"params": params}, x, return_hidden=True)
    assert hidden.shape == (2, 6, cfg.hidden_size)
    np.testing.assert_allclose(np.asarray(m.apply({"params": params}, hidden, method=Llama.logits)), full, atol=1e-5)


def test_remat_gives_same_values_and_gradients(small):
    cfg, m, params = small.cfg, small.m, small.params
    x = jax.random.normal(jax.random.key(4), (1, 5, cfg.hidden_size))

    def loss(p, model):
        return jnp.mean(model.apply({"params": p}, x)[0] ** 2)

    v0, g0 = jax.jit(jax.value_and_grad(lambda p: loss(p, m)))(params)
    v1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(p, Llama(cfg, remat=True))))(params)
    np.testing.assert_allclose(v0, v1, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_bfloat16_compute_runs(small):
    cfg, params = small.cfg, small.params
    x = jax.random.normal(jax.random.key(5), (1, 5, cfg.hidden_size))
    m16 = Llama(cfg, dtype=jnp.bfloat16)
    p16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
    logits, cache = jax.jit(lambda p, c: m16.apply({"params": p}, x, cache=c))(p16, init_cache(cfg, 1, 8, jnp.bfloat16))
    assert logits.dtype == jnp.float32 and cache["layers_1"]["v"].dtype == jnp.bfloat16
    ref = small.full(x)
    assert np.abs(np.asarray(logits) - ref).max() < 0.1 * np.abs(ref).max()


# ------------------------------------------------------------------------------------------------------------
# configs and errors


def test_config_from_hf_variants(tmp_path):
    base = dict(vocab_size=10, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4)
    cfg = llama_config_from_hf_dict(dict(base, rope_theta=123.0, eos_token_id=[2, 7]))  # transformers 4.x
    assert cfg.rope_theta == 123.0 and cfg.num_kv_heads == 4 and cfg.eos_token_id == 2
    cfg = llama_config_from_hf_dict(dict(base, rope_parameters={"rope_type": "default", "rope_theta": 7.0}))
    assert cfg.rope_theta == 7.0
    for bad in (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), dict(attention_bias=True),
                dict(hidden_act="gelu"), dict(model_type="qwen2")):
        with pytest.raises(WeightsError, match="config.json"):
            llama_config_from_hf_dict(dict(base, **bad), tmp_path / "config.json")
    with pytest.raises(WeightsError, match="config.json"):
        llama_config_from_hf(tmp_path)  # no config.json


@pytest.fixture()
def llama_copy(tiny_dir, tmp_path) -> Path:
    dst = tmp_path / "llama"
    shutil.copytree(tiny_dir / "llama", dst)
    return dst


def test_error_truncated_safetensors_shard(llama_copy):
    shard = llama_copy / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="model-00002-of-00002.safetensors"):
        load_llama(llama_copy)


def test_error_missing_shard(llama_copy):
    (llama_copy / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(WeightsError, match="model-00001-of-00002.safetensors"):
        load_llama(llama_copy)


def test_error_keys_not_llama(tmp_path, tiny_dir):
    from safetensors.numpy import save_file

    folder = tmp_path / "notllama"
    folder.mkdir()
    shutil.copy(tiny_dir / "llama" / "config.json", folder / "config.json")
    save_file({"encoder.layer.0.weight": np.zeros((4, 4), np.float32)}, str(folder / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"model\.safetensors.*none of the LLaMA weights"):
        load_llama(folder)
    # a file of another tower, given an explicit config
    with pytest.raises(WeightsError, match="eva_vit.pth"):
        load_llama(tiny_dir / "eva_vit.pth", config=llama_config_from_hf(tiny_dir / "llama"))


def test_error_config_does_not_fit_weights(llama_copy):
    cfg = json.loads((llama_copy / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (llama_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"llama: tensor 'model.layers.0.mlp.down_proj.weight' has shape"):
        load_llama(llama_copy)


def test_error_extra_layer_in_file(llama_copy):
    cfg = json.loads((llama_copy / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (llama_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="unexpected keys model.layers.1"):
        load_llama(llama_copy)


@pytest.mark.parametrize("kernel", [False, True])  # True: a float cache through the FFI kernel's in-place write
@pytest.mark.parametrize("batch", [1, 3, 20])  # 20: past `_UNROLLED_ROWS`, the vmapped write
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "bool"])
@pytest.mark.parametrize("slots_first", [False, True])  # True: new rows as a projection gives them, (B, L, Hkv, Dh)
def test_cache_rows_are_written_at_each_rows_offset(batch, dtype, kernel, slots_first):
    if kernel and not kernels.wmatmul_available():
        pytest.skip("the CPU kernels are not built here")
    with kernels.cpu_kernels(kernel):
        _check_cache_rows(batch, dtype, slots_first)


def _check_cache_rows(batch, dtype, slots_first):
    rng = np.random.default_rng(batch)
    draw = (lambda *s: rng.standard_normal(s) > 0) if dtype == "bool" else (lambda *s: rng.standard_normal(s))
    buf, new = jnp.asarray(draw(batch, 2, 10, 4), dtype), jnp.asarray(draw(batch, 2, 3, 4), dtype)
    index = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)  # past 7: clamped to 7, as dynamic-update-slice does
    given = new.transpose(0, 2, 1, 3) if slots_first else new
    got = np.asarray(jax.jit(lambda b, n, i: _write_rows(b, n, i, axis=2, slots_first=slots_first))(buf, given, index))
    index = np.minimum(np.asarray(index), 7)
    want = np.asarray(buf).copy()
    for b in range(batch):
        want[b, :, int(index[b]):int(index[b]) + 3] = np.asarray(new)[b]
    np.testing.assert_array_equal(got, want)
    if dtype != "bool":  # differentiable: d sum(out * w) / d new = w at the written slots, / d buf = w elsewhere
        w = jnp.asarray(rng.standard_normal(buf.shape), dtype)
        g_buf, g_new = jax.grad(lambda b, n: jnp.sum((_write_rows(b, n, index, axis=2, slots_first=slots_first)
                                                      * w).astype(jnp.float32)), argnums=(0, 1))(buf, given)
        if slots_first:
            g_new = g_new.transpose(0, 2, 1, 3)
        w = np.asarray(w, np.float32)
        written = np.zeros(buf.shape, bool)
        for b in range(batch):
            written[b, :, int(index[b]):int(index[b]) + 3] = True
        np.testing.assert_array_equal(np.asarray(g_buf, np.float32), np.where(written, 0, w))
        np.testing.assert_array_equal(np.asarray(g_new, np.float32),
                                      np.stack([w[b, :, int(index[b]):int(index[b]) + 3] for b in range(batch)]))


@pytest.mark.parametrize("kernel", [False, True])  # True: rotated by the FFI kernel on the way into the cache
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("head_dim", [4, 48, 64])  # halves below one vector, one vector and a tail, whole vectors
def test_keys_are_rotated_on_their_way_into_the_cache(kernel, dtype, head_dim):
    """`_write_rows(..., rope=(cos, sin))` equals rotating the rows first (`apply_rope`) and writing them: in
    bfloat16 / float16 through the kernel bit for bit as PyTorch evaluates the rotation in those dtypes (each product
    and the sum rounded; XLA's own program does the same in bfloat16, and in float16 keeps one product unrounded: one
    unit in the last place apart), in float32 to rounding; its derivatives are those of the rotation then the write;
    and through the kernel the program has no rotation of its own."""
    if kernel and not kernels.wmatmul_available():
        pytest.skip("the CPU kernels are not built here")
    rng = np.random.default_rng(head_dim)
    batch, slots, new_rows, heads = 3, 10, 3, 2
    buf = jnp.asarray(rng.standard_normal((batch, heads, slots, head_dim)), dtype)
    new = jnp.asarray(rng.standard_normal((batch, new_rows, heads, head_dim)) * 4, dtype)  # slots first
    index = jnp.asarray([0, 4, 9], jnp.int32)  # 9: clamped to 7
    cos, sin = rope_cos_sin(jnp.asarray(rng.integers(0, 3000, (batch, new_rows))), head_dim, 1e4)
    w = jnp.asarray(rng.standard_normal(buf.shape), dtype)

    def rotated_in(b, n):
        return _write_rows(b, n, index, axis=2, slots_first=True, rope=(cos, sin))

    def rotated_first(b, n):
        return _write_rows(b, apply_rope(n, cos, sin), index, axis=2, slots_first=True)

    def grads(fn):
        return jax.grad(lambda b, n: jnp.sum((fn(b, n) * w).astype(jnp.float32)), argnums=(0, 1))(buf, new)

    with kernels.cpu_kernels(False):
        want, want_grads = np.asarray(jax.jit(rotated_first)(buf, new), np.float32), grads(rotated_first)
        # PyTorch's arithmetic: each product and the sum rounded to the dtype (float32 sums of exact products)
        r = lambda a: np.asarray(jnp.asarray(a, jnp.float32).astype(dtype), np.float32)  # noqa: E731
        x = np.asarray(new, np.float32)
        c, s = (np.asarray(t.astype(dtype), np.float32)[:, :, None] for t in (cos, sin))
        h = head_dim // 2
        x1, x2 = x[..., :h], x[..., h:]
        torch_rows = np.concatenate([r(r(x1 * c[..., :h]) - r(x2 * s[..., :h])),
                                     r(r(x2 * c[..., h:]) + r(x1 * s[..., h:]))], axis=-1)
        torch_order = np.asarray(_write_rows(buf, jnp.asarray(torch_rows, dtype), index, axis=2, slots_first=True),
                                 np.float32)
    with kernels.cpu_kernels(kernel):
        fn = jax.jit(rotated_in)
        got, got_grads = np.asarray(fn(buf, new), np.float32), grads(rotated_in)
        hlo = fn.lower(buf, new).compile().as_text()
    one_ulp = np.abs(x).max() * 2.0 ** -10  # of float16's largest operand (a difference cancels)
    if dtype == "float32":
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    elif dtype == "bfloat16":
        np.testing.assert_array_equal(got, torch_order)
        np.testing.assert_array_equal(got, want)
    elif kernel:
        np.testing.assert_array_equal(got, torch_order)
        np.testing.assert_allclose(got, want, rtol=0, atol=one_ulp)
    else:
        np.testing.assert_allclose(got, torch_order, rtol=0, atol=one_ulp)
    for g, h in zip(got_grads, want_grads):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(h, np.float32), rtol=1e-6, atol=1e-6)
    if kernel:
        assert kernels.WRITE_TARGET in hlo and " concatenate(" not in hlo


@pytest.mark.skipif(not kernels.wmatmul_available(), reason="the CPU kernels are not built here")
def test_a_cached_step_on_the_cpu_kernels():
    """A cached decode step on the CPU kernels evaluates cos and sin once for all layers (the rotations of q and k run
    inside the attention and the cache write: XLA's CPU compiler had fused cos and sin into every layer's rotation,
    per head, past an optimization barrier, 0.9 + 0.35 ms of each ~30 ms layer of SmolLM2-135M's batch-8 prefill),
    and takes q, k and v in one kernel call per layer, gate and up in another (`layers.matmuls`)."""
    cfg = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4, num_kv_heads=2)
    m = Llama(cfg)
    x = jnp.zeros((2, 1, cfg.hidden_size))
    params = m.init(jax.random.key(0), x)["params"]
    cache = init_cache(cfg, 2, 8, jnp.float32)
    with kernels.cpu_kernels(True):
        hlo = jax.jit(lambda p, x, c: m.apply({"params": p}, x, cache=c)).lower(params, x, cache).compile().as_text()
    assert hlo.count(" cosine(") == 1 and hlo.count(" sine(") == 1
    assert hlo.count(kernels.ATTENTION_TARGET) == cfg.num_layers and " concatenate(" not in hlo.split("ENTRY")[1]
    assert hlo.count(kernels.MANY_TARGET) == 2 * cfg.num_layers
