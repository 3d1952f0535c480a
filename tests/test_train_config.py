"""Training config (the four upstream stages, errors), the LR schedule quirks, the weight-decay groups and AdamW
against PyTorch's with upstream's parameter groups."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from tests.test_train_support import ROOT, TINY_MODEL, subprocess_env, tiny_config_dict
from vllama_jax.config import ConfigError, load_model_config
from vllama_jax.train.config import OptimConfig, load_train_config, train_config_from_dict
from vllama_jax.cli import main as cli_main
from vllama_jax.train.loop import resolve_model_config
from vllama_jax.train.optimizer import decay_mask, lr_schedule, make_optimizer, trainable_groups, upstream_no_decay
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


def _upstream_trainables(path: Path) -> dict[str, np.ndarray]:
    import re

    from vllama_jax.weights.keymaps import CHECKPOINT_BUFFERS
    from vllama_jax.weights.readers import open_weights

    src = open_weights(path)
    return {k: src.get(k) for k in src.keys() if not any(re.match(b, k) for b in CHECKPOINT_BUFFERS)}


def test_decay_mask_equals_upstream_rule_on_upstream_names(tiny_dir: Path):
    """Our mask, carried to upstream names through the loader's key maps, equals runner_base's rule applied to the
    parameter names and shapes of the released-layout VL and AL checkpoints."""
    from vllama_jax.models import abstract_params

    mc = load_model_config(TINY_MODEL)
    abstract, _ = abstract_params(mc)
    for groups, km, ckpt in ((VL, video_branch_keymap(), "vl_ckpt.pth"), (AL, audio_branch_keymap(), "al_ckpt.pth")):
        tree = {g: abstract[g] for g in groups}
        mask = flatten_params(decay_mask(tree))
        shapes = flatten_params(tree)
        ours = {k: bool(v.all()) for k, v in km.inverse(
            {p: np.full(shapes[p].shape, m) for p, m in mask.items()}).items()}
        upstream = {k: not upstream_no_decay(k, v.ndim) for k, v in _upstream_trainables(tiny_dir / ckpt).items()}
        assert ours == upstream
        # the consequences upstream.md §8.3 spells out
        assert upstream[km.rules[-4].src] and any(v for k, v in upstream.items() if "position_embedding" in k)
        assert not any(v for k, v in upstream.items() if "LayerNorm" in k or k.endswith("bias"))


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

    named = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in km.inverse(flat).items()}
    decay = [t for n, t in named.items() if not upstream_no_decay(n, t.ndim)]
    no_decay = [t for n, t in named.items() if upstream_no_decay(n, t.ndim)]
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
