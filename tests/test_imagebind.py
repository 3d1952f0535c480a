"""ImageBind audio/vision towers: fixture parity, independent PyTorch references, drop path, key map, wrong files."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import linen as nn

from tests.helpers import load_json
from vllama_jax.config import ImageBindAudioConfig, ImageBindVisionConfig
from vllama_jax.models.imagebind import (
    DropPath,
    ImageBindAudio,
    ImageBindEncoder,
    drop_path_rates,
    fbank_to_channels_last,
    imagebind_dummy_inputs,
    images_to_channels_last,
)
from vllama_jax.weights.imagebind_keys import (
    export_imagebind,
    imagebind_configs_from_weights,
    imagebind_keymap,
    load_imagebind,
)
from vllama_jax.weights.keymaps import load_component
from vllama_jax.weights.readers import DictSource, WeightsError, open_weights

TOL = dict(atol=1e-4, rtol=1e-4)


def assert_close(name: str, got, want, **tol) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    np.testing.assert_allclose(got, want, err_msg=name, **(tol or TOL))
    return float(np.abs(got - want).max())


# ---------------------------------------------------------------------------------------------------------------
# the tiny fixture model


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path):
    """Configs read from the checkpoint shapes (+ head counts from config.json), params loaded strictly."""
    src = open_weights(tiny_dir / "imagebind.pth")
    ib = load_json(tiny_dir / "config.json")["imagebind"]
    audio_cfg, vision_cfg = imagebind_configs_from_weights(
        src, ib["audio_num_heads"], ib["vision_num_heads"],
        audio=ImageBindAudioConfig(drop_path_rate=ib["audio_drop_path"], stride=ib["audio_stride"],
                                   num_mel_bins=ib["audio_num_mel_bins"], target_length=ib["audio_target_len"]),
    )
    assert tuple(audio_cfg.grid) == tuple(ib["audio_patch_grid"])
    params = load_imagebind(src, audio_cfg, vision_cfg)
    model = ImageBindEncoder(audio_cfg, vision_cfg, with_vision=True)
    return dict(src=src, audio_cfg=audio_cfg, vision_cfg=vision_cfg, params=params, model=model)


def test_fixture_audio_parity(tiny, tiny_inputs, tiny_outputs):
    model, params, cfg = tiny["model"], tiny["params"], tiny["audio_cfg"]
    audio = tiny_inputs["audio"]  # (B, S, 1, mel, time)
    ref = tiny_outputs
    b, s = audio.shape[:2]

    @jax.jit
    def run(fbank):
        return model.apply({"params": params}, fbank, method=model.encode_audio, mutable=["intermediates"])

    (feature, embedding), state = run(fbank_to_channels_last(jnp.asarray(audio)))
    inter = state["intermediates"]["audio"]
    diffs = {"audio.preproc_tokens": assert_close("preproc", inter["preproc_tokens"][0], ref["audio.preproc_tokens"])}
    for i in range(cfg.depth):
        diffs[f"audio.trunk_block{i}"] = assert_close(f"block{i}", inter[f"block{i}"][0], ref[f"audio.trunk_block{i}"])
    diffs["audio.trunk_out"] = assert_close("trunk_out", inter["trunk_out"][0], ref["audio.trunk_out"])
    diffs["audio.imagebind_feature"] = assert_close(
        "feature", feature.reshape(b, s, -1), ref["audio.imagebind_feature"])
    diffs["audio.imagebind_out"] = assert_close("embedding", embedding.reshape(b, s, -1), ref["audio.imagebind_out"])
    # the embedding Video-LLaMA uses has norm = logit scale (20)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(embedding), axis=-1), cfg.logit_scale, rtol=1e-5)
    print("max |diff| vs fixture:", {k: f"{v:.2e}" for k, v in diffs.items()})


# ---------------------------------------------------------------------------------------------------------------
# independent PyTorch references built from torch.nn modules (sequence-first nn.MultiheadAttention, as upstream)


class TorchBlock(torch.nn.Module):
    def __init__(self, d: int, heads: int, mlp: int, add_bias_kv: bool):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(d, heads, bias=True, add_bias_kv=add_bias_kv)
        self.norm_1 = torch.nn.LayerNorm(d, eps=1e-6)
        self.norm_2 = torch.nn.LayerNorm(d, eps=1e-6)
        self.fc1 = torch.nn.Linear(d, mlp)
        self.fc2 = torch.nn.Linear(mlp, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (L, N, D)
        h = self.norm_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.norm_2(x))))


class TorchTower(torch.nn.Module):
    """ImageBind audio (Conv2d stem + LayerNorm, bias_kv) or vision (repeat + Conv3d stem, pre-trunk LayerNorm)."""

    def __init__(self, modality: str, d: int, heads: int, mlp: int, depth: int, out: int, num_pos: int):
        super().__init__()
        self.modality = modality
        if modality == "audio":
            self.stem = torch.nn.Conv2d(1, d, 16, stride=10, bias=False)
            self.stem_norm = torch.nn.LayerNorm(d, eps=1e-5)
        else:
            self.stem = torch.nn.Conv3d(3, d, (2, 14, 14), stride=(2, 14, 14), bias=False)
            self.pre_norm = torch.nn.LayerNorm(d, eps=1e-6)
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, num_pos, d))
        self.blocks = torch.nn.ModuleList(TorchBlock(d, heads, mlp, modality == "audio") for _ in range(depth))
        self.head_norm = torch.nn.LayerNorm(d, eps=1e-6)
        self.head = torch.nn.Linear(d, out, bias=False)

    def forward(self, x: torch.Tensor):
        if self.modality == "audio":  # (N, 1, mel, time)
            t = self.stem_norm(self.stem(x).flatten(2).transpose(1, 2))
        else:  # (N, 3, H, W) -> 2-frame video
            t = self.stem(x.unsqueeze(2).repeat(1, 1, 2, 1, 1)).flatten(2).transpose(1, 2)
        pos = self.pos_embed
        if pos.shape[1] - 1 != t.shape[1]:  # as upstream interpolate_pos_encoding_2d (square layouts only)
            n_in, d = pos.shape[1] - 1, pos.shape[2]
            g = int(math.sqrt(n_in))
            patch = F.interpolate(pos[:, 1:].reshape(1, g, g, d).permute(0, 3, 1, 2),
                                  scale_factor=math.sqrt(t.shape[1] / n_in), mode="bicubic")
            pos = torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, -1, d)], dim=1)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1) + pos
        if self.modality == "vision":
            t = self.pre_norm(t)
        t = t.transpose(0, 1)
        for blk in self.blocks:
            t = blk(t)
        t = t.transpose(0, 1)
        feature = self.head_norm(t)[:, 0]
        emb = F.normalize(self.head(feature), dim=-1)
        return t, feature, (emb * 20.0 if self.modality == "audio" else emb)

    def key_names(self) -> dict[str, str]:
        """imagebind_huge.pth key -> name in this module's state dict."""
        m = self.modality
        pre = f"modality_preprocessors.{m}."
        names = {pre + "cls_token": "cls_token", pre + "pos_embedding_helper.pos_embed": "pos_embed",
                 f"modality_heads.{m}.0.weight": "head_norm.weight", f"modality_heads.{m}.0.bias": "head_norm.bias",
                 f"modality_heads.{m}.2.weight": "head.weight"}
        if m == "audio":
            names.update({pre + "rgbt_stem.proj.weight": "stem.weight",
                          pre + "rgbt_stem.norm_layer.weight": "stem_norm.weight",
                          pre + "rgbt_stem.norm_layer.bias": "stem_norm.bias"})
        else:
            names.update({pre + "rgbt_stem.proj.1.weight": "stem.weight",
                          "modality_trunks.vision.pre_transformer_layer.0.weight": "pre_norm.weight",
                          "modality_trunks.vision.pre_transformer_layer.0.bias": "pre_norm.bias"})
        for i in range(len(self.blocks)):
            for k in dict(self.blocks[i].named_parameters()):
                up = k.replace("fc1", "mlp.fc1").replace("fc2", "mlp.fc2")
                names[f"modality_trunks.{m}.blocks.{i}.{up}"] = f"blocks.{i}.{k}"
        return names


@pytest.mark.parametrize("size", [224, 56])  # 56: other sizes resize the position table bicubically
def test_vision_parity_with_torch_reference(tiny, size: int):
    cfg = tiny["vision_cfg"]
    ref = TorchTower("vision", cfg.width, cfg.num_heads, cfg.mlp_dim, cfg.depth, cfg.out_dim,
                     1 + (cfg.image_size // cfg.patch_size) ** 2).eval()
    sd = {ours: torch.from_numpy(tiny["src"].get(up)) for up, ours in ref.key_names().items()}
    ref.load_state_dict(sd, strict=True)
    images = np.random.default_rng(0).normal(size=(3, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        tokens, feature, emb = (t.numpy() for t in ref(torch.from_numpy(images)))

    model = tiny["model"]
    (f, e), state = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_vision,
                                                     mutable=["intermediates"]))(
        tiny["params"], images_to_channels_last(jnp.asarray(images)))
    d = [assert_close("vision trunk_out", state["intermediates"]["vision"]["trunk_out"][0], tokens),
         assert_close("vision feature", f, feature), assert_close("vision embedding", e, emb)]
    np.testing.assert_allclose(np.linalg.norm(np.asarray(e), axis=-1), 1.0, rtol=1e-5)  # no logit scale
    print(f"vision {size}px max |diff| trunk/feature/embedding: {d[0]:.2e} {d[1]:.2e} {d[2]:.2e}")


@pytest.mark.parametrize("n_out", [4, 10, 16, 20])
def test_bicubic_matches_torch_interpolate(n_out: int):
    from vllama_jax.models.imagebind import bicubic_resize_matrix

    grid = np.random.default_rng(3).normal(size=(1, 5, 16, 16)).astype(np.float32)
    want = F.interpolate(torch.from_numpy(grid), scale_factor=n_out / 16, mode="bicubic").numpy()
    m = bicubic_resize_matrix(16, n_out)
    np.testing.assert_allclose(np.einsum("oi,pj,cij->cop", m, m, grid[0]), want[0], atol=1e-5)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial values for every parameter (incl. biases, norm gains, bias_k/bias_v, CLS, positions)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("bias_k", "bias_v", "cls_token", "pos_embed")):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))


def test_audio_parity_with_torch_reference_bias_kv(tmp_path: Path):
    """A different audio config (width 48, 3 heads, 2 blocks, out 16) with random weights, written in the
    imagebind_huge.pth layout (plus an ignored text tower and buffers): pins the bias_k/bias_v semantics."""
    cfg = ImageBindAudioConfig(width=48, depth=2, num_heads=3, mlp_dim=192, out_dim=16)
    gh, gw = cfg.grid
    ref = TorchTower("audio", cfg.width, cfg.num_heads, cfg.mlp_dim, cfg.depth, cfg.out_dim, 1 + gh * gw).eval()
    _randomize(ref, seed=1)
    own = ref.state_dict()
    sd = {up: own[ours].clone() for up, ours in ref.key_names().items()}
    sd["modality_postprocessors.audio.1.log_logit_scale"] = torch.tensor(math.log(20.0))
    sd["modality_preprocessors.text.mask"] = torch.full((77, 77), float("-inf")).triu(1)
    sd["modality_trunks.text.blocks.0.attn.in_proj_weight"] = torch.randn(24, 8)
    torch.save(sd, tmp_path / "imagebind_audio_only.pth")

    params = load_imagebind(tmp_path / "imagebind_audio_only.pth", cfg, with_vision=False)
    assert set(params) == {"audio"}
    fbank = np.random.default_rng(1).normal(size=(4, 1, cfg.num_mel_bins, cfg.target_length)).astype(np.float32)
    with torch.no_grad():
        tokens, feature, emb = (t.numpy() for t in ref(torch.from_numpy(fbank)))
    model = ImageBindEncoder(cfg, with_vision=False)
    (f, e), state = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_audio,
                                                     mutable=["intermediates"]))(params, fbank_to_channels_last(fbank))
    d = [assert_close("audio trunk_out", state["intermediates"]["audio"]["trunk_out"][0], tokens),
         assert_close("audio feature", f, feature), assert_close("audio embedding", e, emb)]
    print(f"audio (48w/3h/2b) max |diff| trunk/feature/embedding: {d[0]:.2e} {d[1]:.2e} {d[2]:.2e}")

    # the extra key/value slot matters: zeroing bias_k/bias_v changes the output
    zeroed = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if "bias_k" in jax.tree_util.keystr(p) or "bias_v" in jax.tree_util.keystr(p)
        else x, params)
    _, e0 = model.apply({"params": zeroed}, fbank_to_channels_last(fbank), method=model.encode_audio)
    assert np.abs(np.asarray(e0) - emb).max() > 1e-2

    # export is the inverse of the load (buffers and the text tower excluded)
    exported = export_imagebind(params, with_vision=False)
    assert set(exported) == set(ref.key_names())
    for k, v in exported.items():
        np.testing.assert_array_equal(v, sd[k].numpy(), err_msg=k)


# ---------------------------------------------------------------------------------------------------------------
# drop path


def test_drop_path_unit_semantics():
    x = jnp.ones((4, 20000, 3))
    rng = {"dropout": jax.random.key(0)}
    dp = DropPath(0.25)
    np.testing.assert_array_equal(dp.apply({}, x, deterministic=True), x)
    y = np.asarray(dp.apply({}, x, deterministic=False, rngs=rng))
    # upstream (sequence-first timm DropPath): one decision per token position, shared by the batch and features
    assert set(np.unique(y).tolist()) == {0.0, float(np.float32(1.0) / np.float32(0.75))}
    assert (y == y[:1, :, :1]).all()
    assert abs(y.mean() - 1.0) < 0.02  # kept branches are scaled by 1/keep: expectation preserved
    assert abs((y[0, :, 0] == 0).mean() - 0.25) < 0.02
    ys = np.asarray(DropPath(0.25, per_sample=True).apply({}, jnp.ones((20000, 5, 3)), deterministic=False, rngs=rng))
    assert (ys == ys[:, :1, :1]).all() and abs(ys.mean() - 1.0) < 0.02
    assert drop_path_rates(0.1, 12)[0] == 0.0 and abs(drop_path_rates(0.1, 12)[-1] - 0.1) < 1e-7


def test_drop_path_in_tower(tiny):
    cfg = tiny["audio_cfg"]
    assert cfg.drop_path_rate > 0 and cfg.depth >= 2
    params = {"params": tiny["params"]["audio"]}
    model = ImageBindAudio(cfg)
    one = np.random.default_rng(2).normal(size=(1, cfg.num_mel_bins, cfg.target_length, 1)).astype(np.float32)
    fbank = jnp.asarray(np.concatenate([one, one]))  # two identical samples
    run = jax.jit(lambda x, det, key: model.apply(params, x, det, rngs={"dropout": key}), static_argnums=1)
    f_eval, e_eval = jax.jit(lambda x: model.apply(params, x))(fbank)
    f_det, e_det = run(fbank, True, jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(e_det), np.asarray(e_eval))
    np.testing.assert_array_equal(np.asarray(f_det), np.asarray(f_eval))
    f_tr, e_tr = run(fbank, False, jax.random.key(3))
    f_tr2, _ = run(fbank, False, jax.random.key(4))
    assert np.abs(np.asarray(f_tr) - np.asarray(f_eval)).max() > 1e-4
    assert np.abs(np.asarray(f_tr) - np.asarray(f_tr2)).max() > 1e-4
    # the mask is shared across the batch (upstream sequence-first DropPath): identical samples stay identical
    np.testing.assert_allclose(np.asarray(f_tr[0]), np.asarray(f_tr[1]), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(e_tr), axis=-1), cfg.logit_scale, rtol=1e-5)
    # drop_path_rate 0: training mode is the eval computation
    no_drop = ImageBindAudio(dataclasses.replace(cfg, drop_path_rate=0.0))
    f0, _ = jax.jit(lambda x: no_drop.apply(params, x, False, rngs={"dropout": jax.random.key(3)}))(fbank)
    np.testing.assert_allclose(np.asarray(f0), np.asarray(f_eval), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# key map, params layout, wrong files


def test_keymap_claims_every_key_and_ignores_other_modalities(tiny):
    src = tiny["src"]
    km = imagebind_keymap(tiny["audio_cfg"], tiny["vision_cfg"])
    keys = src.keys()
    assert all(km.claims_key(k) for k in keys)
    used = {k for k in keys if not km.ignores_key(k)}
    assert all(km.match(k) is not None for k in used)
    assert {k.split(".")[1] for k in used} == {"audio", "vision"}
    ignored = set(keys) - used
    assert {k.split(".")[1] for k in ignored} == {"text", "depth", "thermal", "imu", "audio"}
    assert [k for k in ignored if ".audio." in k] == ["modality_postprocessors.audio.1.log_logit_scale"]
    # without vision, vision keys are ignored too and no vision params are built
    km_a = imagebind_keymap(with_vision=False)
    assert all(km_a.ignores_key(k) for k in keys if ".vision." in k)
    assert set(load_imagebind(src, tiny["audio_cfg"], with_vision=False)) == {"audio"}


def test_params_layout_and_logical_axes(tiny):
    a, v = tiny["audio_cfg"], tiny["vision_cfg"]
    model = ImageBindEncoder(a, v)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *imagebind_dummy_inputs(a, v)))["params"]
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    shapes = jax.tree_util.tree_map(lambda x: x.shape, nn.unbox(boxed))
    assert shapes == jax.tree_util.tree_map(np.shape, tiny["params"])
    blk = shapes["audio"]["blocks_0"]["attn"]
    assert set(blk) == {"query", "key", "value", "out_proj", "bias_k", "bias_v"}
    assert "bias_k" not in shapes["vision"]["blocks_0"]["attn"]
    assert set(shapes["vision"]) >= {"stem", "cls_token", "pos_embed", "pre_transformer_layernorm", "head_norm", "head"}
    assert set(shapes["audio"]) >= {"stem", "stem_norm", "cls_token", "pos_embed", "head_norm", "head"}


def test_videollama_prefixed_keys(tiny):
    """Inside the Video-LLaMA model the same keys carry `audio_encoder.`; other components' keys are skipped."""
    src = tiny["src"]
    tensors = {"audio_encoder." + k: src.get(k) for k in src.keys()}
    tensors["llama_model.model.norm.weight"] = np.ones(4, np.float32)
    tensors["audio_Qformer.bert.embeddings.position_ids"] = np.arange(4)[None]
    params = load_imagebind(DictSource(tensors, "videollama.pth"), tiny["audio_cfg"], tiny["vision_cfg"],
                            src_prefix="audio_encoder.")
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, tiny["params"])
    km = imagebind_keymap().with_prefix("audio_encoder.", "")
    assert km.match("audio_encoder.modality_trunks.audio.blocks.1.attn.bias_k")[1] == (
        "audio_encoder/audio/blocks_1/attn/bias_k",)


def test_unknown_imagebind_keys_are_errors(tiny):
    src = tiny["src"]
    base = {k: src.get(k) for k in src.keys()}
    extra_block = dict(base, **{"modality_trunks.audio.blocks.7.norm_1.weight": np.ones(tiny["audio_cfg"].width)})
    with pytest.raises(WeightsError, match="unexpected keys.*blocks.7"):
        load_imagebind(DictSource(extra_block, "ib_extra.pth"), tiny["audio_cfg"], tiny["vision_cfg"])
    foreign = dict(base, **{"t5_proj.weight": np.ones((2, 2), np.float32)})
    with pytest.raises(WeightsError, match="ib_foreign.pth.*not ImageBind keys.*t5_proj"):
        load_imagebind(DictSource(foreign, "ib_foreign.pth"), tiny["audio_cfg"], tiny["vision_cfg"])
    missing = {k: v for k, v in base.items() if "heads.audio.2" not in k}
    with pytest.raises(WeightsError, match="missing parameters.*audio/head/kernel"):
        load_imagebind(DictSource(missing, "ib_missing.pth"), tiny["audio_cfg"], tiny["vision_cfg"])
    # a config that does not fit the file (e.g. an ImageBind-Huge config on the tiny file) names the tensor
    with pytest.raises(WeightsError, match="imagebind.pth.*does not fit"):
        load_imagebind(src, ImageBindAudioConfig(), ImageBindVisionConfig())


def test_wrong_files(tiny, tiny_dir: Path):
    a, v = tiny["audio_cfg"], tiny["vision_cfg"]
    eva = tiny_dir / "eva_vit.pth"
    with pytest.raises(WeightsError, match="none of the ImageBind") as e:
        load_imagebind(eva, a, v)
    assert str(eva) in str(e.value)
    llama_like = DictSource({"model.embed_tokens.weight": np.zeros((8, 4), np.float32),
                             "model.layers.0.self_attn.q_proj.weight": np.zeros((4, 4), np.float32)},
                            "llama-7b/model.safetensors")
    with pytest.raises(WeightsError, match=r"llama-7b/model.safetensors: none of the ImageBind"):
        load_imagebind(llama_like, a, v)
    # the raw key map on load_component gives the same diagnosis for an EVA state dict
    from vllama_jax.weights.imagebind_keys import imagebind_param_shapes

    with pytest.raises(WeightsError, match="eva_vit.pth: none of the ImageBind weights"):
        load_component(open_weights(eva), imagebind_keymap(a, v), imagebind_param_shapes(a, v))


def test_input_layout_errors(tiny):
    model = ImageBindAudio(tiny["audio_cfg"])
    params = {"params": tiny["params"]["audio"]}
    cfg = tiny["audio_cfg"]
    with pytest.raises(ValueError, match="channels-last"):
        model.apply(params, jnp.zeros((1, 1, cfg.num_mel_bins, cfg.target_length)))
    x = jnp.zeros((2, 3, 1, cfg.num_mel_bins, cfg.target_length))
    assert fbank_to_channels_last(x).shape == (6, cfg.num_mel_bins, cfg.target_length, 1)


def test_init_remat_and_bf16(tiny):
    a, v = tiny["audio_cfg"], tiny["vision_cfg"]
    fbank, _ = imagebind_dummy_inputs(a, None, batch=2)
    # init from fbank alone still creates the vision tower
    shapes = jax.eval_shape(lambda: ImageBindEncoder(a, v).init(jax.random.key(0), fbank))["params"]
    assert set(shapes) == {"audio", "vision"}
    # a small random audio tower (2x3 patch grid, two blocks) keeps the compiles cheap
    small = ImageBindAudioConfig(width=16, depth=2, num_heads=2, mlp_dim=32, out_dim=8, num_mel_bins=26,
                                 target_length=36)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 26, 36, 1)).astype(np.float32))
    rng = np.random.default_rng(6)  # random values on the abstract params tree: no init compile needed
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape).astype(np.float32)),
        nn.unbox(jax.eval_shape(ImageBindAudio(small).init, jax.random.key(1), x)))

    # The loss must depend on what remat recomputes. The embedding is L2-normalised (x 20), so sum(embedding**2)
    # is a constant and its gradients are rounding noise; instead use fixed random projections of the trunk
    # tokens (the output of the rematerialised blocks), of the pre-normalisation feature and of the embedding.
    tokens_shape = (2, 1 + small.grid[0] * small.grid[1], small.width)
    r_tok = jnp.asarray(rng.normal(size=tokens_shape).astype(np.float32))
    r_feat = jnp.asarray(rng.normal(size=(2, small.width)).astype(np.float32))
    r_emb = jnp.asarray(rng.normal(size=(2, small.out_dim)).astype(np.float32))

    def loss(p, model):
        (feature, embedding), state = model.apply(p, x, mutable=["intermediates"])
        trunk = state["intermediates"]["trunk_out"][0]
        return jnp.sum(trunk * r_tok) + jnp.sum(feature * r_feat) + jnp.sum(embedding * r_emb)

    g_plain, g_remat, ref, e16 = jax.jit(lambda p: (
        jax.grad(loss)(p, ImageBindAudio(small)), jax.grad(loss)(p, ImageBindAudio(small, remat=True)),
        ImageBindAudio(small).apply(p, x)[1], ImageBindAudio(small, dtype=jnp.bfloat16).apply(p, x)[1]))(params)
    flat_plain = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(g_plain)}
    flat_remat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(g_remat)}
    assert flat_plain.keys() == flat_remat.keys()
    scale = max(np.abs(g).max() for g in flat_plain.values())
    worst = 0.0
    for name, gp in flat_plain.items():
        gr = flat_remat[name]
        # the key projection's bias gets a mathematically zero gradient (softmax is shift invariant): skip the
        # "is it large" check for it, but still compare it
        if not ("key" in name and "bias" in name):
            assert np.abs(gp).max() > 1e-3 * scale, f"{name}: gradient ~0 ({np.abs(gp).max():.2e}): loss too weak"
        diff = float(np.abs(gp - gr).max())
        worst = max(worst, diff / scale)
        assert diff <= 1e-5 * scale, f"{name}: remat gradient differs by {diff:.2e} (max |g| over params {scale:.2e})"
    assert scale > 0.1, scale  # O(1) gradients, not rounding noise
    print(f"remat vs plain: max |g| {scale:.3g}, max |diff| / max |g| {worst:.2e}")
    assert e16.dtype == jnp.float32
    cos = np.sum(np.asarray(e16) * np.asarray(ref), -1) / (small.logit_scale ** 2)
    assert (cos > 0.99).all(), cos
