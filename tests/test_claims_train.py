"""README "Features" training claims that no other test pinned: global-norm clipping, optimizer state for exactly
the trained subset, remat of the LLM / ViT in the trainer, bf16 compute with f32 master weights, keep-last-K
checkpoints, the MFU metric, a NaN/inf loss stopping `train.py` with status 3."""
from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml

from tests.test_train_loop import InjectNaN
from tests.test_train_support import compiled, host, tiny_config, tiny_config_dict
from vllama_jax.cli import main as cli_main
from vllama_jax.train import loop as loop_mod
from vllama_jax.train.loop import NonFiniteLossError, Trainer
from vllama_jax.train.metrics import compiled_flops
from vllama_jax.train.optimizer import decay_mask
from vllama_jax.train.step import make_loss_fn
from vllama_jax.tree import flatten_params

VL = {"video_qformer", "video_query_tokens", "video_frame_position_embedding", "llama_proj"}


@pytest.fixture(scope="module")
def trainer(tiny_dir: Path, tmp_path_factory):
    """A set-up trainer of the tiny VL stage 1 with global-norm clipping at 1.0 (no step is run)."""
    t = Trainer(tiny_config(tiny_dir, tmp_path_factory.mktemp("claims"), optim={"clip_grad_norm": 1.0},
                            dropout=False)).setup()
    yield t
    t.close()


def _random_like(tree, seed: int, scale: float):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: (scale * rng.normal(size=a.shape)).astype(np.float32), tree)


def _apply(tx, params, grads_seq):
    """The updates of successive optimizer steps (jitted: op-by-op dispatch over ~200 leaves is slow)."""
    update = jax.jit(tx.update)
    state, p, updates = jax.jit(tx.init)(params), params, []
    for g in grads_seq:
        u, state = update(g, state, p)
        p = optax.apply_updates(p, u)
        updates.append(jax.device_get(u))
    return updates


# ------------------------------------------------------------------------------------------------------------
# optimizer: global-norm clipping, state only for the trained subset


def test_clip_grad_norm_clips_by_the_global_norm(trainer):
    """`optim.clip_grad_norm: c`: the trainer's optimizer scales the whole gradient by min(1, c / ||g||) (the norm
    over every trained leaf together), then AdamW. Reference: that scaling by hand, fed to the same AdamW without
    clipping. A huge first gradient leaves the second update unchanged by Adam's normalisation only if clipped."""
    t = trainer
    params = jax.device_get(t.state["params"])
    grads = [_random_like(params, 1, 1e6), _random_like(params, 2, 1.0)]  # a blow-up, then an ordinary step

    def global_clip(g, c=1.0):
        norm = math.sqrt(sum(float(np.sum(np.square(x, dtype=np.float64))) for x in jax.tree.leaves(g)))
        return jax.tree.map(lambda x: x * min(1.0, c / norm), g)

    def leaf_clip(g, c=1.0):  # a per-tensor clip: not what the claim says
        return jax.tree.map(lambda x: x * min(1.0, c / float(np.linalg.norm(x))), g)

    plain = optax.adamw(t.lr_fn, b1=0.9, b2=0.999, eps=1e-8, weight_decay=t.cfg.optim.weight_decay,
                        mask=decay_mask(params))
    ours = _apply(t.tx, params, grads)
    ref = _apply(plain, params, [global_clip(g) for g in grads])
    for u, r in zip(ours, ref):
        for k, v in flatten_params(r).items():
            np.testing.assert_allclose(np.asarray(flatten_params(u)[k]), v, rtol=1e-5, atol=1e-9, err_msg=k)
    unclipped, per_leaf = _apply(plain, params, grads), _apply(plain, params, [leaf_clip(g) for g in grads])
    for other in (unclipped, per_leaf):  # the reference is not satisfied by these two
        diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                   for a, b in zip(jax.tree.leaves(other[1]), jax.tree.leaves(ours[1])))
        assert diff > 1e-6


def test_optimizer_state_exists_for_exactly_the_trained_leaves(trainer):
    """AdamW moments (mu, nu) for every leaf of the trained groups and for nothing else; the frozen towers are
    plain inputs of the step without optimizer state."""
    t = trainer
    trained = flatten_params(t.state["params"])
    assert set(t.state["params"]) == VL
    adam = [s for s in jax.tree.leaves(t.state["opt_state"], is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]
    assert len(adam) == 1
    for moment in (adam[0].mu, adam[0].nu):
        flat = flatten_params(moment)
        assert set(flat) == set(trained)
        assert all(flat[k].shape == trained[k].shape and flat[k].dtype == jnp.float32 for k in flat)
    # every other leaf of the optimizer state is a scalar (step counts)
    moments = 2 * sum(int(np.prod(x.shape)) for x in trained.values())
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t.state["opt_state"]))
    scalars = [x for x in jax.tree.leaves(t.state["opt_state"]) if x.ndim == 0]
    assert total == moments + len(scalars) and len(scalars) <= 3
    assert set(t.frozen) >= {"visual_encoder", "qformer", "llama"} and not set(t.frozen) & VL


# ------------------------------------------------------------------------------------------------------------
# MFU; a non-finite loss


def test_compiled_flops_count_a_matmul():
    """The MFU numerator: XLA's cost analysis of the compiled program, 2*M*N*K for an (M,K)@(K,N) matmul."""
    a, b = jnp.ones((64, 32), jnp.float32), jnp.ones((32, 48), jnp.float32)
    assert compiled_flops(jax.jit(jnp.matmul).lower(a, b).compile()) == 2 * 64 * 32 * 48


def test_mfu_and_non_finite_loss_on_a_fake_step(trainer, monkeypatch: pytest.MonkeyPatch):
    """A step's metrics row: mfu = FLOPs per device / step time / peak FLOP/s; a NaN or inf loss raises
    NonFiniteLossError naming the step and the batch's example ids."""
    t = trainer
    metrics = {"loss": np.float32(2.5), "lr": np.float32(1e-3), "grad_norm": np.float32(0.7),
               "num_tokens": np.float32(40)}
    info = {"step": 7, "metrics": metrics, "example_id": np.arange(4), "dataset": "fake", "samples": 4,
            "tokens": 400, "flops": 3e9, "peak": 2e12}
    monkeypatch.setattr(loop_mod.time, "perf_counter", lambda: 100.5)
    t._clock = 100.0  # the step took 0.5 s
    t._finish(info)
    row = t.history[-1]
    assert row["step"] == 7 and row["step_time_s"] == pytest.approx(0.5)
    assert row["mfu"] == pytest.approx(3e9 / 0.5 / 2e12)  # 0.3%
    assert row["tokens_per_s"] == pytest.approx(800) and row["samples_per_s"] == pytest.approx(8)
    for bad in (np.inf, -np.inf, np.nan):
        t._clock = 100.0
        with pytest.raises(NonFiniteLossError, match="at step 8; batch of dataset fake example ids \\[0, 1, 2, 3\\]"):
            t._finish(dict(info, step=8, metrics=dict(metrics, loss=np.float32(bad))))
    assert t.history[-1]["step"] == 7  # nothing recorded for the bad step


@pytest.mark.slow
def test_train_py_stops_on_nan_with_status_3_and_no_checkpoint_after(tiny_dir: Path, tmp_path: Path, capsys,
                                                                    monkeypatch: pytest.MonkeyPatch):
    """`train.py` (the CLI) on a run whose 5th batch is NaN: status 3, one error line naming step and batch, the
    checkpoints before it only. (The config of test_train_loop's NaN test: the compiled step is cached.)"""
    d = tiny_config_dict(tiny_dir, tmp_path, max_steps=6, checkpoint={"every": 2})
    d["dropout"] = False
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(d))
    setup = Trainer.setup

    def setup_with_nan(self):
        setup(self)
        if not isinstance(self.data_iter, InjectNaN):
            self.data_iter = InjectNaN(self.data_iter, at=5)
        return self

    monkeypatch.setattr(Trainer, "setup", setup_with_nan)
    monkeypatch.setenv("VLLAMA_JAX_CACHE_DIR", "off")
    code = cli_main(["train", "--config", str(tmp_path / "cfg.yaml")])
    err = capsys.readouterr().err
    assert code == 3, err[-2000:]
    last = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(last) == 1 and "non-finite loss nan at step 5" in last[0] and "16, 17, 18, 19" in last[0]
    assert "Traceback" not in err
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]


# ------------------------------------------------------------------------------------------------------------
# remat; bf16 compute with f32 master weights; keep-last-K checkpoints


def _eqns(jaxpr):
    """Every equation of a jaxpr, those of its sub-jaxprs (jit, remat, custom_vjp, scan) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


def _dot_dtypes(jaxpr) -> list[tuple[str, ...]]:
    """Operand dtypes of every dot_general."""
    return [tuple(str(v.aval.dtype) for v in e.invars) for e in _eqns(jaxpr) if e.primitive.name == "dot_general"]


def _remat_regions(jaxpr) -> int:
    return sum(1 for e in _eqns(jaxpr) if e.primitive.name in ("checkpoint", "remat", "remat2"))


def _caption_batch(inputs) -> dict[str, np.ndarray]:
    return {"frames": inputs["video"].transpose(0, 2, 3, 4, 1),
            "text_ids": inputs["stage1.text_ids"].astype(np.int32),
            "text_mask": inputs["stage1.text_attention_mask"].astype(np.int32)}


@pytest.mark.slow
def test_remat_of_llama_and_vit_gives_the_same_loss_and_gradients(tiny_dir: Path, tmp_path: Path, trainer,
                                                                   tiny_inputs):
    """`model.remat_llama` / `model.remat_vit`: the trainer's model rematerialises (the step's jaxpr has checkpoint
    regions) and its loss and gradients equal those without."""
    t = trainer
    r = Trainer(tiny_config(tiny_dir, tmp_path, model={"remat_llama": True, "remat_vit": True}))
    assert (r.model.remat_llama, r.model.remat_vit) == (True, True)
    assert (t.model.remat_llama, t.model.remat_vit) == (False, False)
    batch = _caption_batch(tiny_inputs)
    args = (jax.device_get(t.state["params"]), jax.device_get(t.frozen), batch, jax.random.PRNGKey(0))
    results = []
    for model in (t.model, r.model):
        fn = jax.value_and_grad(make_loss_fn(model, "video", t.placeholder_id, dropout=False), has_aux=True)
        regions = _remat_regions(jax.make_jaxpr(fn)(*args).jaxpr)
        assert regions == (2 * 2 if model is r.model else 0)  # 2 ViT blocks + 2 LLaMA layers
        results.append(compiled(fn, *args)(*args))
    (l0, n0), g0 = results[0]
    (l1, n1), g1 = results[1]
    assert int(n0) == int(n1) and float(l1) == pytest.approx(float(l0), rel=1e-6)
    a, b = flatten_params(g0), flatten_params(g1)
    assert a.keys() == b.keys() and set(g0) == VL
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-7, err_msg=k)


@pytest.mark.slow
def test_bf16_compute_fp32_master_weights_and_keep_last_k(tiny_dir: Path, tmp_path: Path):
    """`model.precision: bfloat16`: the towers and the LLM compute (and are stored) in bf16 while the trained
    parameters and their AdamW moments stay float32 through the steps. `checkpoint.keep: 2` with a checkpoint every
    step: after 4 steps only steps 3 and 4 remain. The logged mfu is the step's FLOPs / step time / log.peak_tflops."""
    cfg = tiny_config(tiny_dir, tmp_path, model={"precision": "bfloat16"}, max_steps=4,
                      checkpoint={"every": 1, "keep": 2})
    t = Trainer(cfg).setup()
    try:
        p = t.model_config.precision
        assert (p.vit, p.qformer, p.llama, p.llama_params, p.trainable_params) == \
            ("bfloat16", "bfloat16", "bfloat16", "bfloat16", "float32")
        assert {x.dtype for x in jax.tree.leaves(t.frozen["llama"])} == {jnp.dtype(jnp.bfloat16)}
        # copies: a numpy view of a CPU device buffer would keep it alive and block the donation checked below
        before = {k: np.array(v) for k, v in host(t.state["params"]).items()}
        donated = jax.tree.leaves(t.state)
        hist = t.run()
        assert all(x.is_deleted() for x in donated)  # the jitted step consumed (donated) the previous state
        after = host(t.state["params"])
        assert [h["step"] for h in hist] == [1, 2, 3, 4] and all(np.isfinite(h["loss"]) for h in hist)
        assert {v.dtype for v in after.values()} == {np.dtype(np.float32)}  # master weights
        assert any(not np.array_equal(before[k], after[k]) for k in after)
        assert {x.dtype for x in jax.tree.leaves(t.state["opt_state"]) if x.ndim} == {jnp.dtype(jnp.float32)}
        # the step computes in bf16: every matmul of the forward takes bf16 operands; the backward's too, except
        # the attention-probability gradients, whose softmax side is f32 (no matmul is f32 x f32)
        batch = {k: v for k, v in next(t.data_iter).items() if k in ("frames", "text_ids", "text_mask")}
        loss = make_loss_fn(t.model, "video", t.placeholder_id, dropout=True)
        args = (t.state["params"], t.frozen, batch, jax.random.PRNGKey(0))
        fwd = _dot_dtypes(jax.make_jaxpr(lambda *a: loss(*a)[0])(*args).jaxpr)
        assert len(fwd) > 20 and set(fwd) == {("bfloat16", "bfloat16")}, set(fwd)
        bwd = _dot_dtypes(jax.make_jaxpr(jax.grad(lambda *a: loss(*a)[0]))(*args).jaxpr)
        assert all("bfloat16" in d for d in bwd), set(bwd)
        # keep-last-K
        steps = sorted(int(q.name) for q in (tmp_path / "checkpoints").iterdir() if q.name.isdigit())
        assert steps == [3, 4]
        # mfu = flops / step time / peak (log.peak_tflops = 1.0 in the test config)
        [flops] = set(t._flops.values())
        assert flops > 0
        for h in hist:
            assert h["mfu"] == pytest.approx(flops / h["step_time_s"] / 1e12, rel=1e-9)
    finally:
        t.close()
