"""Scanned layers (`model.scan_layers`, issue 20 must-show 4): the LLaMA layers and the ViT blocks, each one
`nn.scan` over stacked parameters, give the loop's outputs and gradients, and a training run with them the losses of
one without; checkpoints and model directories keep the per-layer layout (the stacked one is the step's view)."""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from tests.conftest import require_devices
from tests.test_train_support import host, tiny_config
from vllama_jax.config import LlamaConfig, ViTConfig
from vllama_jax.models.eva_vit import EvaViT
from vllama_jax.models.llama import Llama
from vllama_jax.tree import stack_layers, unstack_layers
from vllama_jax.train.loop import Trainer


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_layers_equal_the_loop(remat: bool):
    """Logits and the gradients w.r.t. the inputs and every weight: scanned (stacked view of the same weights) =
    the loop, with GQA and a padded row; `stack_layers` / `unstack_layers` are inverse views."""
    c = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4, num_kv_heads=2)
    loop, scan = Llama(c, remat=remat), Llama(c, remat=remat, scan_layers=True)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 7, 64))
    mask = jnp.array([[1] * 7, [1] * 5 + [0] * 2])
    params = nn.unbox(loop.init(jax.random.PRNGKey(0), x, mask)["params"])
    stacked = stack_layers(params, "layers", c.num_layers)
    shapes = jax.eval_shape(lambda: nn.unbox(scan.init(jax.random.PRNGKey(0), x, mask)["params"]))
    assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(lambda a: a.shape, stacked)
    assert stacked["layers"]["self_attn"]["q_proj"]["kernel"].shape == (3, 64, 64)
    back = unstack_layers(stacked, "layers")
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)

    def loss(p, model, x):
        logits, _ = model.apply({"params": p}, x, mask)
        return jnp.mean(jnp.where(mask[..., None] > 0, logits, 0.0) ** 2)

    ref, (g_ref, gx_ref) = jax.value_and_grad(loss, argnums=(0, 2))(params, loop, x)
    got, (g_got, gx_got) = jax.value_and_grad(loss, argnums=(0, 2))(stacked, scan, x)
    assert abs(float(got) - float(ref)) <= 1e-6 * abs(float(ref))
    np.testing.assert_allclose(gx_got, gx_ref, rtol=1e-5, atol=1e-9)
    flat_ref = jax.tree_util.tree_leaves_with_path(g_ref)
    for (path, a), b in zip(flat_ref, jax.tree.leaves(unstack_layers(g_got, "layers"))):
        # float32 sums in another order: within 1e-5 relative, or 1e-6 of the leaf's largest gradient
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * float(np.abs(a).max()),
                                   err_msg=jax.tree_util.keystr(path))
    with pytest.raises(ValueError, match="no KV cache"):
        scan.apply({"params": stacked}, x, mask, cache={"index": 0})


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_vit_blocks_equal_the_loop(remat: bool):
    """The ViT's tokens and the gradients w.r.t. the images and every weight: scanned = the loop."""
    c = ViTConfig(image_size=28, patch_size=14, width=32, depth=3, num_heads=4, mlp_dim=64)
    loop, scan = EvaViT(c, remat=remat), EvaViT(c, remat=remat, scan_layers=True)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 28, 28, 3))
    params = nn.unbox(loop.init(jax.random.PRNGKey(0), x)["params"])
    stacked = stack_layers(params, "blocks", c.depth)
    shapes = jax.eval_shape(lambda: nn.unbox(scan.init(jax.random.PRNGKey(0), x)["params"]))
    assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(lambda a: a.shape, stacked)

    def loss(p, model, x):
        return jnp.mean(model.apply({"params": p}, x) ** 2)

    ref, (g_ref, gx_ref) = jax.value_and_grad(loss, argnums=(0, 2))(params, loop, x)
    got, (g_got, gx_got) = jax.value_and_grad(loss, argnums=(0, 2))(stacked, scan, x)
    assert abs(float(got) - float(ref)) <= 1e-6 * abs(float(ref))
    np.testing.assert_allclose(gx_got, gx_ref, rtol=1e-5, atol=1e-9)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_ref),
                            jax.tree.leaves(unstack_layers(g_got, "blocks"))):
        # float32 sums in another order: within 1e-5 relative, or 1e-6 of the leaf's largest gradient
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * float(np.abs(a).max()),
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
@pytest.mark.parametrize("lora", [0, 4])
def test_training_with_scanned_layers_equals_the_loop(tiny_dir: Path, tmp_path: Path, lora: int):
    """The fixture model, 3 steps on the synthetic captions: scanned LLaMA layers and ViT blocks give the loop's
    losses and trained parameters, with and without LoRA adapters on the LLM (which keep their per-layer layout in
    the state, so checkpoints and the PEFT export do not change); the frozen LLM and ViT are held stacked."""
    runs = {}
    for scan in (False, True):
        cfg = tiny_config(tiny_dir, tmp_path / str(scan), dropout=False, max_steps=3, checkpoint={"every": 100},
                          model={"scan_layers": scan}, lora={"rank": lora, "alpha": 8, "dropout": 0.0})
        t = Trainer(cfg)
        try:
            runs[scan] = ([h["loss"] for h in t.run()], jax.device_get(t.state["params"]), t.frozen["llama"],
                          t.frozen["visual_encoder"])
        finally:
            t.close()
    (loss_loop, p_loop, llm_loop, vit_loop), (loss_scan, p_scan, llm_scan, vit_scan) = runs[False], runs[True]
    assert "layers" in llm_scan and "layers_0" in llm_loop and "layers_0" not in llm_scan
    assert "blocks" in vit_scan and "blocks_0" in vit_loop and "blocks_0" not in vit_scan
    if lora:
        assert "layers_0" in p_scan["llama_lora"] and jax.tree.structure(p_scan) == jax.tree.structure(p_loop)
        b = p_scan["llama_lora"]["layers_1"]["self_attn"]["q_proj"]["lora_B"]
        assert np.abs(b).max() > 0  # the adapters trained (B starts at zero)
    np.testing.assert_allclose(loss_scan, loss_loop, rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(p_scan), jax.tree.leaves(p_loop)):
        name = jax.tree_util.keystr(path)
        tol = 6e-3 if "['key']['bias']" in name else 1e-5  # noise-level gradients: see test_feature_cache
        np.testing.assert_allclose(a, b, rtol=0, atol=tol, err_msg=name)


@pytest.mark.slow
def test_scanned_layers_on_8_devices_equal_the_loop_on_one(tiny_dir: Path, tmp_path: Path):
    """Scanned layers on (data 2, fsdp 2, tensor 2) with dropout and 2 micro-batches train as the loop on one
    device (the stacked weights shard by the same rules, their layer axis replicated)."""
    require_devices(8)
    runs = {}
    for mesh, scan in (("data=1", False), ("data=2,fsdp=2,tensor=2", True)):
        cfg = tiny_config(tiny_dir, tmp_path / str(scan), mesh=mesh, max_steps=2, data={"batch_size": 8},
                          optim={"grad_accum": 2}, checkpoint={"every": 100}, model={"scan_layers": scan})
        t = Trainer(cfg)
        try:
            runs[scan] = (t.run(), host(t.state["params"]))
            if scan:
                q = t.frozen["llama"]["layers"]["self_attn"]["q_proj"]["kernel"]
                assert q.shape[0] == 2 and not q.sharding.is_fully_replicated
        finally:
            t.close()
    (h1, s1), (h8, s8) = runs[False], runs[True]
    for a, b in zip(h1, h8):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * a["grad_norm"]
    for k in s1:
        tol = 6e-3 if "['key']['bias']" in k else 2e-6
        np.testing.assert_allclose(s8[k], s1[k], atol=tol, rtol=1e-5, err_msg=k)
