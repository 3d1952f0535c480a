"""The training step on the tiny fixture model: upstream gradients, AdamW update, frozen towers untouched, the same
step sharded over 8 devices, gradient accumulation.

Gradients are compared in eval mode (`dropout: false`): the fixture grads (grads.npz) were computed by upstream with
`model.eval()`, and upstream's training-mode dropout masks cannot be reproduced bit for bit. Everything else
(which parameters get gradients, the token-mean loss, the backward through the frozen LLaMA) is the training path.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from tests.helpers import upstream_rule_no_decay
from tests.test_train_support import compiled, host, tiny_config
from vllama_jax.media.image import normalize_uint8
from vllama_jax.train.features import frozen_features
from vllama_jax.train.loop import Trainer
from vllama_jax.train.optimizer import decay_mask
from vllama_jax.train.step import make_loss_fn
from vllama_jax.tree import flatten_params
from vllama_jax.weights.keymaps import video_branch_keymap


class FixtureBatches:
    """The stage-1 caption batch of inputs.npz, every step (B = 2, T = 4, 32 text tokens)."""

    def __init__(self, inputs: dict[str, np.ndarray]):
        self.batch = {"frames": inputs["video"].transpose(0, 2, 3, 4, 1),
                      "text_ids": inputs["stage1.text_ids"].astype(np.int32),
                      "text_mask": inputs["stage1.text_attention_mask"].astype(np.int32),
                      "example_id": np.arange(2), "kind": "caption", "dataset": "fixture"}

    def __next__(self) -> dict:
        return dict(self.batch)


@pytest.fixture(scope="module")
def parity_trainer(tiny_dir: Path, tiny_inputs, tmp_path_factory):
    """Trainer whose trained groups start from the fixture's VL checkpoint (`ckpt`), eval-mode forward."""
    out = tmp_path_factory.mktemp("parity")
    cfg = tiny_config(tiny_dir, out, dropout=False, weights={"ckpt": str(tiny_dir / "vl_ckpt.pth")},
                      data={"batch_size": 2, "max_txt_len": 32}, max_steps=3, checkpoint={"every": 100})
    trainer = Trainer(cfg).setup()
    trainer.data_iter = FixtureBatches(tiny_inputs)
    trainer.params0 = jax.device_get(trainer.state["params"])  # the fixture's values, before any step
    yield trainer
    trainer.close()


@pytest.mark.slow
def test_step_reproduces_upstream_gradients_and_updates_only_trainables(parity_trainer, tiny_outputs, tiny_grads):
    """Upstream's stage-1 gradients; the first update is AdamW with upstream's decay groups; after 3 steps every
    trained tensor moved and every frozen one is bit-identical. (The only test that steps `parity_trainer`.)"""
    t = parity_trainer
    assert int(t.state["step"]) == 0
    assert set(t.state["params"]) == {"video_qformer", "video_query_tokens", "video_frame_position_embedding",
                                      "llama_proj"}
    assert set(t.frozen) >= {"visual_encoder", "ln_vision", "qformer", "query_tokens", "llama"}
    out_ref = tiny_outputs

    # the step's own loss function, differentiated w.r.t. the trainable tree only
    loss_fn = make_loss_fn(t.model, "video", t.placeholder_id, dropout=False)
    batch = {k: v for k, v in t.data_iter.batch.items() if k in ("frames", "text_ids", "text_mask")}
    args = (t.params0, t.frozen, batch, jax.random.PRNGKey(0))
    (loss_sum, ntok), grads = compiled(jax.value_and_grad(loss_fn, has_aux=True), *args)(*args)
    assert abs(float(loss_sum) / int(ntok) - float(out_ref["stage1.loss"])) < 1e-5
    g = flatten_params(jax.tree.map(lambda x: np.asarray(x, np.float64) / int(ntok), grads))
    ours = video_branch_keymap().inverse(g)
    expected = {k.split("/", 1)[1]: v for k, v in tiny_grads.items() if k.startswith("stage1/")}
    assert set(ours) == set(expected)
    for name, ref in expected.items():
        tol = max(1e-4 * float(np.abs(ref).max()), 1e-6)  # tests/fixtures/README.md §1.6 (key-bias grads are ~1e-9 noise)
        assert float(np.abs(ours[name] - ref).max()) <= tol, name

    # step 1 = AdamW at count 0: m_hat = g, v_hat = g^2, so p1 = p0 - lr0 * (g / (|g| + eps) + wd * mask * p0),
    # lr0 = warmup_lr (upstream.md §8.3/8.4)
    frozen_before = host(t.frozen)
    p0 = flatten_params(jax.tree.map(lambda x: np.asarray(x, np.float64), t.params0))
    # upstream's decay groups: runner_base's rule on the PyTorch names of the trained tensors (not the library's)
    km = video_branch_keymap()
    up_names = km.inverse({k: np.full(v.shape, k, object) for k, v in p0.items()})  # upstream name -> our path
    mask = {str(v.flat[0]): float(not upstream_rule_no_decay(n, v.ndim)) for n, v in up_names.items()}
    assert mask.keys() == p0.keys()
    assert mask == {k: float(m) for k, m in flatten_params(decay_mask(t.params0)).items()}
    history = t.run(1)
    assert abs(history[0]["loss"] - float(out_ref["stage1.loss"])) < 1e-5
    p1 = flatten_params(jax.device_get(t.state["params"]))
    o = t.cfg.optim
    for k in p0:
        want = p0[k] - o.warmup_lr * (g[k] / (np.abs(g[k]) + o.eps) + o.weight_decay * mask[k] * p0[k])
        # g / (|g| + eps) is ill-conditioned where g is rounding noise (key biases, ~1e-9): compare the rest
        clear = np.abs(g[k]) > 1e-6
        np.testing.assert_allclose(p1[k][clear], want[clear], atol=1e-7, rtol=0, err_msg=k)
        assert np.all(np.abs(p1[k] - want) <= 2 * o.warmup_lr), k

    history += t.run(2)
    assert [h["step"] for h in history] == [1, 2, 3]
    frozen_after = host(t.frozen)  # frozen towers: bit-identical after 3 steps
    assert frozen_after.keys() == frozen_before.keys()
    for k in frozen_before:
        np.testing.assert_array_equal(frozen_after[k], frozen_before[k], err_msg=k)
    p3 = flatten_params(jax.device_get(t.state["params"]))
    for k in p0:  # every trained tensor moved (AdamW moves each entry by ~lr per step)
        assert not np.array_equal(p0[k].astype(np.float32), p3[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("tag", ["stage1_prompt", "stage2_vicuna"])
def test_prompt_and_instruction_batches_reproduce_upstream_gradients(parity_trainer, tiny_inputs, tiny_outputs,
                                                                     tiny_grads, tag: str):
    """The step's loss on a stage-2 style caption batch with a prompt (path B with prompt_before / prompt_after)
    and on an instruction batch (path A, placeholder run replaced in place) gives upstream's gradients."""
    t = parity_trainer
    z = tiny_inputs
    frames = z["video"].transpose(0, 2, 3, 4, 1)
    if tag == "stage1_prompt":
        batch = {"frames": frames, "text_ids": z[f"{tag}.text_ids"], "text_mask": z[f"{tag}.text_attention_mask"],
                 "prompt_before": z[f"{tag}.p_before_ids"], "prompt_after": z[f"{tag}.p_after_ids"]}
    else:
        batch = {"frames": frames, **{k: z[f"{tag}.{k}"] for k in ("input_ids", "labels", "attention_mask")}}
    batch = {k: np.asarray(v, np.float32 if k == "frames" else np.int32) for k, v in batch.items()}
    loss_fn = make_loss_fn(t.model, "video", t.placeholder_id, dropout=False)
    args = (t.params0, t.frozen, batch, jax.random.PRNGKey(0))
    (loss_sum, ntok), grads = compiled(jax.value_and_grad(loss_fn, has_aux=True), *args)(*args)
    assert abs(float(loss_sum) / int(ntok) - float(tiny_outputs[f"{tag}.loss"])) < 1e-5
    ours = video_branch_keymap().inverse(flatten_params(jax.tree.map(lambda g: np.asarray(g) / int(ntok), grads)))
    expected = {k.split("/", 1)[1]: v for k, v in tiny_grads.items() if k.startswith(tag + "/")}
    for name, ref in expected.items():
        tol = max(1e-4 * float(np.abs(ref).max()), 1e-6)
        assert float(np.abs(ours[name] - ref).max()) <= tol, name


@pytest.mark.slow
@pytest.mark.parametrize("tag", ["stage1", "stage1_prompt"])
def test_cached_caption_step_equals_the_step_on_frames(parity_trainer, tiny_inputs, tag: str):
    """Path B (stage 1, and with a stage-2 prompt) on the frozen towers' cached output (a caption_features batch)
    is the step on the frames: the same loss, token count and gradient of every trained leaf (issue 20, must-show
    1 for caption batches; `test_feature_cache.py` pins both branches and both kinds, `test_demo.py::
    test_cached_feature_step_equals_the_uncached_step` the demo's both-branch layout)."""
    t = parity_trainer
    z = tiny_inputs
    frames = z["video"].transpose(0, 2, 3, 4, 1).astype(np.float32)
    queries = frozen_features(t.model, {**t.frozen, **t.params0}, frames, None)["frame_queries"]
    text = {"text_ids": z[f"{tag}.text_ids"].astype(np.int32),
            "text_mask": z[f"{tag}.text_attention_mask"].astype(np.int32)}
    if tag == "stage1_prompt":
        text |= {"prompt_before": z[f"{tag}.p_before_ids"].astype(np.int32),
                 "prompt_after": z[f"{tag}.p_after_ids"].astype(np.int32)}
    loss_fn = jax.value_and_grad(make_loss_fn(t.model, "video", t.placeholder_id, dropout=False), has_aux=True)
    outs = []
    for kind, batch in (("caption", {"frames": frames, **text}), ("caption_features", {"frame_features": queries,
                                                                                         **text})):
        args = (t.params0, t.frozen, batch, jax.random.PRNGKey(0), kind)
        outs.append(jax.device_get(jax.jit(loss_fn, static_argnums=4)(*args)))
    ((loss, ntok), grads), ((loss_c, ntok_c), grads_c) = outs
    assert int(ntok) == int(ntok_c) > 0
    assert abs(float(loss_c) - float(loss)) <= 1e-5 * abs(float(loss))
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads_c), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * scale, err_msg=str(path))


@pytest.mark.slow
def test_pixel_frames_are_normalised_on_the_device(parity_trainer, tiny_inputs):
    """The pipeline ships uint8 pixels (data.batch.FRAMES); the loss on them equals the loss on the same pixels
    CLIP-normalised on the host (the float32 path of the fixtures and of inference), gradients too."""
    t = parity_trainer
    z = tiny_inputs
    pixels = np.random.default_rng(0).integers(0, 256, z["video"].transpose(0, 2, 3, 4, 1).shape, np.uint8)
    ids = {"text_ids": z["stage1.text_ids"].astype(np.int32),
           "text_mask": z["stage1.text_attention_mask"].astype(np.int32)}
    loss_fn = jax.value_and_grad(make_loss_fn(t.model, "video", t.placeholder_id, dropout=False), has_aux=True)
    outs = []
    for frames in (pixels, normalize_uint8(pixels)):
        args = (t.params0, t.frozen, {"frames": frames, **ids}, jax.random.PRNGKey(0))
        outs.append(jax.device_get(compiled(loss_fn, *args)(*args)))
    (loss_u8, _), grads_u8 = outs[0]
    (loss_f32, _), grads_f32 = outs[1]
    assert abs(float(loss_u8) - float(loss_f32)) <= 1e-6 * abs(float(loss_f32))
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads_f32))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads_u8), jax.tree.leaves(grads_f32)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale, err_msg=str(path))
    np.testing.assert_array_equal(jax.jit(lambda x: normalize_uint8(x, jax.numpy))(pixels), normalize_uint8(pixels))


@pytest.mark.slow
def test_audio_branch_step_trains_only_the_audio_branch(tiny_dir: Path, tmp_path: Path):
    """train_flag 1 (AL stages): frames go through ImageBind's vision tower; only the audio Q-Former, its tokens,
    positions and projection train; the vision towers are not even loaded."""
    cfg = tiny_config(tiny_dir, tmp_path, frozen_video_qformer=True, frozen_audio_qformer=False,
                      frozen_llama_proj=True, max_steps=2, checkpoint={"every": 100},
                      weights={"eva_vit": "", "blip2": "", "imagebind": str(tiny_dir / "imagebind.pth")},
                      data={"batch_size": 2, "num_frames": 3})
    t = Trainer(cfg).setup()
    try:
        assert set(t.state["params"]) == {"audio_qformer", "audio_query_tokens", "audio_position_embedding",
                                          "audio_llama_proj"}
        assert "audio_encoder" in t.frozen and "visual_encoder" not in t.frozen and "qformer" not in t.frozen
        before, frozen_before = host(t.state["params"]), host(t.frozen)
        hist = t.run()
        assert all(np.isfinite(h["loss"]) for h in hist)
        after = host(t.state["params"])
        assert all(not np.array_equal(before[k], after[k]) for k in before)
        frozen_after = host(t.frozen)
        for k in frozen_before:
            np.testing.assert_array_equal(frozen_after[k], frozen_before[k], err_msg=k)
    finally:
        t.close()


@pytest.mark.slow
def test_step_on_8_devices_equals_one_device(tiny_dir: Path, tmp_path: Path):
    """(data 2, fsdp 2, tensor 2) vs one device, dropout on (threefry keys are partitionable: same masks), with
    gradient accumulation over 2 micro-batches."""
    runs = {}
    for mesh in ("data=1", "data=2,fsdp=2,tensor=2"):
        cfg = tiny_config(tiny_dir, tmp_path / mesh.replace(",", "_"), mesh=mesh, max_steps=2,
                          data={"batch_size": 8}, optim={"grad_accum": 2}, checkpoint={"every": 100})
        t = Trainer(cfg)
        try:
            hist = t.run()
            sharded_leaves = [x for x in jax.tree.leaves(t.frozen) if len(x.sharding.device_set) == 8
                              and not x.sharding.is_fully_replicated]
            runs[mesh] = (hist, host(t.state), len(sharded_leaves))
        finally:
            t.close()
    (h1, s1, n1), (h8, s8, n8) = runs["data=1"], runs["data=2,fsdp=2,tensor=2"]
    assert n1 == 0 and n8 > 0  # the frozen towers really are split over the 8 devices
    for a, b in zip(h1, h8):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * a["grad_norm"]
    assert s1.keys() == s8.keys()
    for k in s1:
        np.testing.assert_allclose(s8[k], s1[k], atol=2e-6, rtol=1e-5, err_msg=k)


@pytest.mark.slow
def test_gradient_accumulation_is_token_weighted(tiny_dir: Path, tmp_path: Path):
    """2 micro-batches of 2 give the same update as one batch of 4 (eval mode): the accumulated gradient is the
    gradient of the token-mean loss over the whole batch, not a mean of per-micro-batch means."""
    states = []
    for accum in (1, 2):
        cfg = tiny_config(tiny_dir, tmp_path / f"a{accum}", dropout=False, max_steps=2,
                          optim={"grad_accum": accum}, checkpoint={"every": 100})
        t = Trainer(cfg)
        try:
            t.run()
            states.append(host(t.state["params"]))
        finally:
            t.close()
    for k in states[0]:
        np.testing.assert_allclose(states[1][k], states[0][k], atol=2e-6, rtol=1e-5, err_msg=k)
