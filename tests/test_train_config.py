"""Training config (the four upstream stages, errors), the LR schedule quirks, the weight-decay groups and AdamW
against PyTorch's with upstream's parameter groups."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from tests.helpers import upstream_rule_no_decay
from tests.test_train_support import ROOT, TINY_MODEL, subprocess_env, tiny_config_dict
from vllama_jax.config import ConfigError, load_model_config
from vllama_jax.train.config import OptimConfig, load_train_config, train_config_from_dict
from vllama_jax.cli import main as cli_main
from vllama_jax.train.loop import resolve_model_config
from vllama_jax.train.optimizer import (decay_mask, lr_schedule, make_optimizer, muon_labels, trainable_groups,
                                       upstream_no_decay, whitening_preconditioner)
from vllama_jax.tree import flatten_params, unflatten_params
from vllama_jax.weights.keymaps import audio_branch_keymap, video_branch_keymap

VL = ("video_qformer", "video_query_tokens", "video_frame_position_embedding", "llama_proj")
AL = ("audio_qformer", "audio_query_tokens", "audio_position_embedding", "audio_llama_proj")

# upstream.md §8.1: (train_flag, init_lr, min_lr, warmup_lr, warmup_steps, iters_per_epoch, max_epoch, global batch,
# max_txt_len, sample ratios, trained groups)
STAGES = {
    "vl_stage1": (0, 1e-4, 8e-5, 1e-6, 2500, 2500, 5, 256, 32, {"webvid": 100, "cc_sbu_align": 24}, VL),
    "vl_stage2": (0, 3e-5, 1e-5, 1e-6, 1000, 1000, 3, 32, 320, {"cc_sbu_align": 1, "llava_instruct": 1,
                                                               "webvid_instruct": 1}, VL),
    "al_stage1": (1, 1e-4, 8e-5, 1e-6, 5000, 5000, 5, 256, 32, {"webvid": 100, "cc_sbu_align": 24}, AL),
    "al_stage2": (1, 3e-5, 1e-5, 1e-6, 400, 1000, 3, 32, 512, {"cc_sbu_align": 1, "llava_instruct": 1,
                                                              "webvid_instruct": 1}, AL),
}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_configs_mirror_upstream(stage: str):
    flag, init, mn, warm, wsteps, ipe, epochs, batch, txt, ratios, groups = STAGES[stage]
    cfg = load_train_config(ROOT / "configs" / f"train_{stage}.yaml")
    o = cfg.optim
    assert cfg.train_flag == flag and cfg.branch == ("video" if flag == 0 else "audio")
    assert (o.init_lr, o.min_lr, o.warmup_lr, o.warmup_steps, o.iters_per_epoch, o.max_epoch) == \
        (init, mn, warm, wsteps, ipe, epochs)
    assert (o.weight_decay, o.beta1, o.beta2, o.eps, o.clip_grad_norm, o.grad_accum) == (0.05, 0.9, 0.999, 1e-8, 0, 1)
    assert cfg.seed == 42 and cfg.data.batch_size == batch and cfg.data.max_txt_len == txt
    assert {k: v.sample_ratio for k, v in cfg.data.datasets.items()} == ratios
    assert cfg.checkpoint_every == ipe  # upstream saves once per epoch
    assert len(cfg.data.prompts) == (4 if stage.endswith("2") else 0)
    assert cfg.data.end_sym == ("</s>" if stage.endswith("2") else "\n")
    assert trainable_groups(cfg, resolve_model_config(cfg)) == groups


def test_config_errors_name_the_key(tiny_dir: Path, tmp_path: Path):
    base = tiny_config_dict(tiny_dir, tmp_path)
    cases = [
        ({"optim": {"lr": 1}}, "optim.lr: unknown key"),
        ({"bogus": 1}, "bogus: unknown key"),
        ({"optim": {"beta2": 1.5}}, "optim.beta2"),
        ({"optim": {"warmup_steps": -1}}, "optim.warmup_steps"),
        ({"optim": {"lr_sched": "step"}}, "optim.lr_sched"),
        ({"optim": {"optimizer": "sgd"}}, "optim.optimizer: unknown optimizer 'sgd' (one of adamw, muon)"),
        ({"optim": {"optimizer": "muon", "muon_lr_ratio": 0}}, "optim.muon_lr_ratio"),
        ({"frozen_video_qformer": True}, "frozen_video_qformer"),  # both frozen: train_flag 3
        ({"model": {"dir": "x"}}, "model: give exactly one"),
        ({"model": {"precision": "fp8"}}, "model.precision"),
        ({"data": {"batch_size": 6}, "optim": {"grad_accum": 4}}, "data.batch_size"),
        ({"data": {"prompts": ["no placeholder"]}}, "data.prompts[0]"),
        ({"data": {"datasets": {"x": {"path": "p"}}}}, "data.datasets"),  # and synthetic: not both
        ({"data": {"datasets": {"x": {"paht": "p"}}, "synthetic": {"num_examples": 0}}}, "data.datasets.x.paht"),
        ({"mesh": "data=2,pipe=2"}, "mesh:"),
        ({"checkpoint": {"keep": 0}}, "checkpoint.keep"),
        ({"distributed": {"num_processes": 2}}, "distributed.coordinator"),
    ]
    from tests.test_train_support import deep_merge

    for extra, msg in cases:
        with pytest.raises(ConfigError) as e:
            train_config_from_dict(deep_merge(base, extra))
        assert msg in str(e.value), (extra, str(e.value))


def test_overrides(tiny_dir: Path, tmp_path: Path):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(tiny_dir, tmp_path)))
    cfg = load_train_config(path, ["optim.init_lr=3e-5", "data.synthetic.num_examples=0",
                                   "data.datasets.mine.path=/data/x", "data.datasets.mine.sample_ratio=2",
                                   "model.overrides=[llama.num_layers=1]"])
    assert cfg.optim.init_lr == 3e-5 and cfg.data.datasets["mine"].sample_ratio == 2.0
    assert resolve_model_config(cfg).llama.num_layers == 1
    with pytest.raises(ConfigError, match=r"c.yaml: optim.nope: unknown key"):
        load_train_config(path, ["optim.nope=1"])
    with pytest.raises(ConfigError, match="model.overrides"):
        resolve_model_config(load_train_config(path, ["model.overrides=[llama.nope=1]"]))


@pytest.mark.slow
def test_cli_errors_are_one_line(tiny_dir: Path, tmp_path: Path, capsys):
    assert cli_main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "missing.yaml" in err and len(err.splitlines()) == 1
    assert cli_main(["train", "--config", str(ROOT / "configs" / "train_tiny.yaml"), "--set", "optim.nope=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "optim.nope: unknown key" in err and len(err.splitlines()) == 1
    # a needed frozen tower without a file
    assert cli_main(["train", "--config", str(ROOT / "configs" / "train_tiny.yaml"), "--set", "weights.eva_vit=",
                 "--set", "mesh=data=1", "--set", f"output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "visual_encoder" in err and len(err.splitlines()) == 1


def test_dry_run_topology_without_libtpu_is_a_one_line_error(capsys):
    import importlib.util
    import os

    if importlib.util.find_spec("libtpu") or os.environ.get("TPU_LIBRARY_PATH"):
        pytest.skip("libtpu is available here: a TPU topology would really compile")
    assert cli_main(["train", "--config", str(ROOT / "configs" / "train_tiny.yaml"), "--dry-run",
                 "--dry-run-topology", "v5p:2x2x1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--dry-run-topology v5p:2x2x1" in err and "libtpu" in err and len(err.splitlines()) == 1


def test_train_py_exit_status(tmp_path: Path):
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/train_tiny.yaml"),
                        "--set", "data.batch_size=0"], capture_output=True, text=True, env=subprocess_env(1),
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "data.batch_size" in lines[0]


# ----------------------------------------------------------------------------------------------------------------
# learning rate (upstream.md §8.4)


def lavis_lr(o: OptimConfig, epoch: int, step: int) -> float:
    """LAVIS LinearWarmupCosineLRScheduler.step(cur_epoch, cur_step), transcribed."""
    total_cur_step = epoch * o.iters_per_epoch + step
    if total_cur_step < o.warmup_steps:
        return min(o.init_lr, o.warmup_lr + (o.init_lr - o.warmup_lr) * step / max(o.warmup_steps, 1))
    return o.min_lr + (o.init_lr - o.min_lr) * 0.5 * (1.0 + math.cos(math.pi * total_cur_step /
                                                                     (o.max_epoch * o.iters_per_epoch)))


def test_lr_schedule_quirks():
    # VL stage 1: right after warm-up the cosine is already at step 2500 of 12500 (not offset): ~9.81e-5
    o = OptimConfig(init_lr=1e-4, min_lr=8e-5, warmup_lr=1e-6, warmup_steps=2500, iters_per_epoch=2500, max_epoch=5)
    lr = lr_schedule(o)
    assert float(lr(0)) == pytest.approx(1e-6)
    assert float(lr(2499)) == pytest.approx(1e-6 + (1e-4 - 1e-6) * 2499 / 2500)
    assert float(lr(2500)) == pytest.approx(9.809e-5, abs=1e-8)
    # warm-up longer than an epoch: the ramp restarts with the in-epoch step
    o = OptimConfig(init_lr=1e-3, min_lr=1e-4, warmup_lr=1e-5, warmup_steps=7, iters_per_epoch=4, max_epoch=3)
    lr = lr_schedule(o)
    got = [float(lr(g)) for g in range(12)]
    want = [lavis_lr(o, g // 4, g % 4) for g in range(12)]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[4] == pytest.approx(1e-5)  # epoch 1, in-epoch step 0: back to warmup_lr


# ----------------------------------------------------------------------------------------------------------------
# weight decay groups and AdamW (upstream.md §8.3)


# The upstream side is written in the tests, independently of vllama_jax.train.optimizer: runner_base's rule
# (upstream.md §8.3, tests/helpers.py::upstream_rule_no_decay) on the PyTorch state-dict names of the released
# checkpoints, read with torch.
# the trainable modules as upstream's VideoLLAMA names them (requires_grad in the stage configs, upstream.md §1.8)
UPSTREAM_TRAINABLE = {
    "vl_ckpt.pth": ("video_Qformer.", "video_query_tokens", "video_frame_position_embedding.", "llama_proj."),
    "al_ckpt.pth": ("audio_Qformer.", "audio_query_tokens", "audio_position_embedding.", "audio_llama_proj."),
}
# buffers the runner saves with the parameters (tests/fixtures/README.md §1.2): not parameters, never in a group
UPSTREAM_BUFFER_SUFFIXES = ("position_ids", "rotary_emb.inv_freq", ".mask", "log_logit_scale")


def _upstream_trainable_params(path: Path) -> dict[str, "torch.Tensor"]:
    """{PyTorch name: tensor} of the trainable parameters in a released-layout checkpoint, read with torch."""
    import torch

    sd = torch.load(path, map_location="cpu", weights_only=True)["model"]
    prefixes = UPSTREAM_TRAINABLE[path.name]
    return {k: v for k, v in sd.items()
            if k.startswith(prefixes) and not k.endswith(UPSTREAM_BUFFER_SUFFIXES)}


def test_decay_mask_equals_upstream_rule_on_upstream_names(tiny_dir: Path):
    """Our decay mask, carried to upstream names through the loader's key maps, equals runner_base's rule applied
    (in this test) to the names and shapes of the trainable parameters of the released-layout VL and AL
    checkpoints."""
    from vllama_jax.models import abstract_params

    mc = load_model_config(TINY_MODEL)
    abstract, _ = abstract_params(mc)
    for groups, km, ckpt in ((VL, video_branch_keymap(), "vl_ckpt.pth"), (AL, audio_branch_keymap(), "al_ckpt.pth")):
        tree = {g: abstract[g] for g in groups}
        mask = flatten_params(decay_mask(tree))
        shapes = flatten_params(tree)
        carried = km.inverse({p: np.full(shapes[p].shape, m) for p, m in mask.items()})
        assert all(v.all() == v.any() for v in carried.values())  # one decision per tensor
        ours = {k: bool(v.all()) for k, v in carried.items()}
        params = _upstream_trainable_params(tiny_dir / ckpt)
        upstream = {k: not upstream_rule_no_decay(k, v.ndim) for k, v in params.items()}
        assert set(ours) == set(upstream), (sorted(set(ours) ^ set(upstream)))
        wrong = {k: (ours[k], upstream[k]) for k in upstream if ours[k] != upstream[k]}
        assert not wrong, f"{ckpt}: (ours, upstream) decay differ on {len(wrong)}, e.g. {dict(list(wrong.items())[:6])}"
        # the consequences upstream.md §8.3 spells out: query tokens (3-D), position tables and every matrix are
        # decayed; LayerNorm gains and biases are not
        q = "video_query_tokens" if ckpt == "vl_ckpt.pth" else "audio_query_tokens"
        assert upstream[q] and params[q].ndim == 3
        assert all(v for k, v in upstream.items() if "position_embedding" in k)
        assert not any(v for k, v in upstream.items() if "LayerNorm" in k or k.endswith("bias"))
        n_decay = sum(upstream.values())
        assert n_decay == sum(1 for v in params.values() if v.ndim >= 2) and 0 < n_decay < len(upstream)


def test_no_decay_rule_equals_runner_base(tiny_dir: Path):
    """The library's rule == runner_base's on every parameter name of the whole model (all six fixture files, as
    VideoLLAMA names them) and on names where each clause of the rule decides alone (on the trainable names only
    `ndim < 2` decides: no 2-D+ trainable parameter has "bias", "ln" or "bn" in its name)."""
    import torch
    from safetensors.numpy import load_file as load_safetensors

    names: dict[str, int] = {}
    for file, prefix in (("eva_vit.pth", "visual_encoder."), ("blip2_qformer.pth", ""), ("imagebind.pth",
                         "audio_encoder."), ("vl_ckpt.pth", ""), ("al_ckpt.pth", "")):
        sd = torch.load(tiny_dir / file, map_location="cpu", weights_only=True)
        for k, v in sd.get("model", sd).items():
            names[prefix + k] = v.ndim
    for f in sorted((tiny_dir / "llama").glob("*.safetensors")):
        names.update({"llama_model." + k: v.ndim for k, v in load_safetensors(f).items()})
    # each clause alone: ndim; "bias" (ImageBind's 3-D bias_k / bias_v); "ln", "bn" (case-sensitive substrings)
    names.update({"a.weight": 2, "a.weight_1d": 1, "a.bias_k": 3, "blocks.0.ln_1.weight": 2, "stem.bn.weight": 2,
                  "enc.LayerNorm.weight": 2, "enc.Bias": 2, "enc.BN.weight": 2, "tok": 0})
    assert sum(1 for k, n in names.items() if n >= 2 and "bias" in k) >= 4  # bias_k/bias_v of ImageBind
    wrong = {k: n for k, n in names.items() if upstream_no_decay(k, n) != upstream_rule_no_decay(k, n)}
    assert not wrong, f"decay rule differs from runner_base on {len(wrong)} names, e.g. {dict(list(wrong.items())[:6])}"


@pytest.mark.slow
def test_adamw_equals_torch_adamw_with_upstream_groups(tiny_dir: Path):
    """3 steps of our optimizer == torch.optim.AdamW with runner_base's two parameter groups and the LAVIS
    scheduler setting each group's lr before every step."""
    import torch

    from vllama_jax.weights.load import load_file

    mc = load_model_config(TINY_MODEL)
    km = video_branch_keymap()
    flat = load_file("vl_ckpt", tiny_dir / "vl_ckpt.pth", mc)
    params = unflatten_params(flat)
    rng = np.random.default_rng(0)
    grads = [unflatten_params({k: rng.normal(size=v.shape).astype(np.float32) for k, v in flat.items()})
             for _ in range(3)]
    o = OptimConfig(init_lr=1e-2, min_lr=1e-3, warmup_lr=1e-4, warmup_steps=2, iters_per_epoch=2, max_epoch=2,
                    weight_decay=0.05)
    tx = make_optimizer(o, params)
    state, p = tx.init(params), jax.tree.map(np.asarray, params)
    for g in grads:
        upd, state = tx.update(g, state, p)
        p = optax.apply_updates(p, upd)

    # torch side: the checkpoint's own tensors and names, runner_base's two groups by the rule written in this test
    named = {k: torch.nn.Parameter(v.clone().float()) for k, v in _upstream_trainable_params(
        tiny_dir / "vl_ckpt.pth").items()}
    assert set(named) == set(km.inverse(flat))
    decay = [t for n, t in named.items() if not upstream_rule_no_decay(n, t.ndim)]
    no_decay = [t for n, t in named.items() if upstream_rule_no_decay(n, t.ndim)]
    assert decay and no_decay
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=o.init_lr, betas=(0.9, 0.999), eps=1e-8)
    for i, g in enumerate(grads):
        for group in opt.param_groups:
            group["lr"] = lavis_lr(o, i // o.iters_per_epoch, i % o.iters_per_epoch)
        gu = km.inverse(flatten_params(g))
        for n, t in named.items():
            t.grad = torch.tensor(gu[n])
        opt.step()
    ours = km.inverse(flatten_params(p))
    for n, t in named.items():
        np.testing.assert_allclose(ours[n], t.detach().numpy(), atol=2e-6, rtol=1e-5, err_msg=n)


def test_muon_orthogonalises_the_kernels_and_leaves_the_rest_to_adamw(tiny_dir: Path):
    """``optim.optimizer: muon``: every 2-D kernel of the trained branch takes an update whose singular values are
    far closer together than the gradient's (spread over orders of magnitude), scaled by ``muon_lr_ratio`` x the
    schedule, with the same decoupled decay; every other leaf (embeddings, query tokens, biases, LayerNorms) steps
    exactly as with AdamW."""
    from vllama_jax.weights.load import load_file

    flat = load_file("vl_ckpt", tiny_dir / "vl_ckpt.pth", load_model_config(TINY_MODEL))
    params = unflatten_params({k: np.asarray(v, np.float32) for k, v in flat.items()})
    labels = flatten_params(muon_labels(params))
    kernels = {k for k, v in flat.items() if k.endswith("/kernel") and np.ndim(v) == 2}
    assert kernels and {k for k, lab in labels.items() if lab == "muon"} == kernels
    rng = np.random.default_rng(0)
    # gradients of ill-conditioned inputs: each kernel's rows (its input axis) scaled over four orders of magnitude
    grads = unflatten_params({k: (rng.normal(size=v.shape) * (np.logspace(0, -4, v.shape[0])[:, None]
                                                              if k in kernels else 1)).astype(np.float32)
                              for k, v in flat.items()})
    o = OptimConfig(init_lr=1e-2, min_lr=1e-3, warmup_lr=1e-2, warmup_steps=0, iters_per_epoch=4, max_epoch=1,
                    weight_decay=0.05, optimizer="muon", muon_lr_ratio=3.0)
    results = {}
    for name, cfg in (("muon", o), ("adamw", dataclasses.replace(o, optimizer="adamw"))):
        tx = make_optimizer(cfg, params)
        upd, _ = tx.update(grads, tx.init(params), params)
        results[name] = flatten_params(upd)
    lr0 = float(lr_schedule(o)(0))
    for k, v in flat.items():
        if k in kernels:
            direction = -results["muon"][k] / (lr0 * o.muon_lr_ratio) - o.weight_decay * np.asarray(v)
            sv = np.linalg.svd(direction, compute_uv=False)[: min(direction.shape)]
            gsv = np.linalg.svd(flatten_params(grads)[k], compute_uv=False)
            # five Newton-Schulz steps lift a small singular value ~3.4x each: the smallest stay below 1, but the
            # spread shrinks ~200-300x (1e4-6e5 -> 2-2,500 on these) and the bulk sits near 1
            spread, gspread = sv.max() / sv.min(), gsv.max() / gsv.min()
            assert gspread > 300 and spread < gspread / 100 and 0.5 < np.median(sv) < 1.5, (k, gspread, spread)
        else:
            np.testing.assert_array_equal(results["muon"][k], results["adamw"][k], err_msg=k)


def test_whitening_preconditioner_equalises_the_input_variances_up_to_its_floor():
    """Rows whose variances span five orders of magnitude come out of ``x @ P`` with every direction's variance at
    the largest one's (floor 0), or lifted to at most the largest with a gain bounded by 1/sqrt(floor); P is
    symmetric and leaves the largest direction's scale."""
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(12, 12)))[0]
    x = rng.normal(size=(4000, 12)) * np.logspace(0, -2.5, 12) @ basis.T
    top = np.linalg.eigvalsh(np.cov(x, rowvar=False)).max()
    p = whitening_preconditioner(x, 0.0)
    np.testing.assert_allclose(p, p.T, atol=1e-6)
    np.testing.assert_allclose(np.linalg.eigvalsh(np.cov(x @ p, rowvar=False)), top, rtol=1e-3)
    floor = 1e-2
    lam = np.linalg.eigvalsh(np.cov(x, rowvar=False))
    np.testing.assert_allclose(np.linalg.eigvalsh(np.cov(x @ whitening_preconditioner(x, floor), rowvar=False)),
                               np.sort(top * lam / (lam + floor * top)), rtol=1e-3)
    with pytest.raises(ValueError, match="do not vary"):
        whitening_preconditioner(np.ones((5, 3)), 1e-2)


def test_preconditioned_muon_trains_the_kernel_as_P_times_muons_variable():
    """``make_optimizer(..., preconditioners={kernel: P})`` is Muon on V with W = P V: its trajectory of W equals
    plain Muon's trajectory of V (gradients through W = P V) mapped by P, step for step (no decay: the decay acts on
    W itself); the kernels without a P and the AdamW leaves step as without preconditioners. A P for anything but a
    trained 2-D kernel, or with AdamW, is refused."""
    rng = np.random.default_rng(1)
    p = whitening_preconditioner(rng.normal(size=(500, 6)) * np.logspace(0, -2, 6), 1e-2)
    w0 = rng.normal(size=(6, 5)).astype(np.float32)
    other = rng.normal(size=(5, 4)).astype(np.float32)
    params = {"video_qformer": {"a": {"kernel": w0, "bias": np.zeros(5, np.float32)}, "b": {"kernel": other}}}
    target = rng.normal(size=(8, 4)).astype(np.float32)
    xs = (rng.normal(size=(8, 6)) * np.logspace(0, -2, 6)).astype(np.float32)

    def loss(q, w_of=lambda q: q["video_qformer"]["a"]["kernel"]):
        h = jax.numpy.dot(xs, w_of(q)) + q["video_qformer"]["a"]["bias"]
        return 0.5 * jax.numpy.mean((h @ q["video_qformer"]["b"]["kernel"] - target) ** 2)

    o = OptimConfig(init_lr=1e-2, min_lr=1e-3, warmup_lr=1e-2, warmup_steps=0, iters_per_epoch=5, max_epoch=1,
                    weight_decay=0.0, optimizer="muon")
    path = "video_qformer/a/kernel"
    pre_tx, plain_tx = make_optimizer(o, params, {path: p}), make_optimizer(o, params)
    v_params = {"video_qformer": {"a": {"kernel": np.linalg.solve(p, w0), "bias": params["video_qformer"]["a"]["bias"]},
                                  "b": {"kernel": other}}}
    pre, plain = (params, pre_tx.init(params)), (v_params, plain_tx.init(v_params))
    for _ in range(5):
        g = jax.grad(loss)(pre[0])
        u, s = pre_tx.update(g, pre[1], pre[0])
        pre = (optax.apply_updates(pre[0], u), s)
        g = jax.grad(lambda q: loss(q, lambda q: p @ q["video_qformer"]["a"]["kernel"]))(plain[0])
        u, s = plain_tx.update(g, plain[1], plain[0])
        plain = (optax.apply_updates(plain[0], u), s)
    np.testing.assert_allclose(pre[0]["video_qformer"]["a"]["kernel"], p @ plain[0]["video_qformer"]["a"]["kernel"],
                               rtol=2e-4, atol=2e-6)
    for k in ("video_qformer/a/bias", "video_qformer/b/kernel"):
        np.testing.assert_allclose(flatten_params(pre[0])[k], flatten_params(plain[0])[k], rtol=2e-4, atol=2e-6)
    g = jax.grad(loss)(params)  # and P changes the step: W's first update with and without it
    first = [np.asarray(tx.update(g, tx.init(params), params)[0]["video_qformer"]["a"]["kernel"])
             for tx in (pre_tx, plain_tx)]
    assert np.abs(first[0] - first[1]).max() > 0.1 * np.abs(first[1]).max()
    with pytest.raises(ValueError, match="need optim.optimizer: muon"):
        make_optimizer(dataclasses.replace(o, optimizer="adamw"), params, {path: p})
    with pytest.raises(ValueError, match="not trained 2-D kernels.*bias"):
        make_optimizer(o, params, {"video_qformer/a/bias": p})
