"""The full forward pass sharded over 8 simulated CPU devices on a (data 2, fsdp 2, tensor 2) mesh equals the
unsharded result."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from tests.helpers import assert_close
from vllama_jax.models import abstract_params, build_model
from vllama_jax.sharding import batch_sharding, make_mesh, shard_params, tree_shardings


@pytest.mark.slow
def test_forward_sharded_equals_unsharded(tiny_model, tiny_inputs):
    cfg, params = tiny_model
    inputs = tiny_inputs
    # batch 4 so the batch axis really splits over data x fsdp
    frames = np.concatenate([inputs["video"]] * 2).transpose(0, 2, 3, 4, 1)
    audio = np.concatenate([inputs["audio"]] * 2)
    ids = np.concatenate([inputs["stage2_vicuna.input_ids"]] * 2)
    labels = np.concatenate([inputs["stage2_vicuna.labels"]] * 2)
    mask = np.concatenate([inputs["stage2_vicuna.attention_mask"]] * 2)
    model = build_model(cfg)

    def forward(p, frames, audio, ids, labels, mask):
        res = model.apply({"params": p}, frames, ids, labels, mask, 512, method=model.instruction_loss)
        aud = model.apply({"params": p}, audio, method=model.encode_audio)
        return res["logits"], res["loss"], aud

    ref = jax.jit(forward)(params, frames, audio, ids, labels, mask)

    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    abstract, axes = abstract_params(cfg)
    shardings = tree_shardings(abstract, axes, mesh)
    sharded = shard_params(params, axes, mesh)
    # the rules table really splits something over each axis
    specs = {str(s.spec) for s in jax.tree_util.tree_leaves(shardings)}
    assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs)
    batch = [jax.device_put(x, batch_sharding(mesh, x.ndim, x.shape)) for x in (frames, audio, ids, labels, mask)]
    assert batch[0].sharding.spec[0] == ("data", "fsdp")
    out = jax.jit(forward)(sharded, *batch)
    for a, b, name in zip(out, ref, ("logits", "loss", "audio")):
        assert_close(a, b, atol=2e-5, rtol=2e-5, name=name)
