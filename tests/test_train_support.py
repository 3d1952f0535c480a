"""Helpers shared by the training tests (this module has no tests of its own).

Every test config is the tiny fixture model (configs/tiny_test.yaml) with the frozen towers read from
tests/fixtures/tiny_vl, fp32, a persistent compilation cache shared by the tests and their subprocesses (the
same step program compiles once per session), and a fresh output folder.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np

from tests.helpers import ROOT, TINY_CONFIG
from vllama_jax.train.config import TrainConfig, train_config_from_dict

TINY_MODEL = TINY_CONFIG
# unoptimised XLA CPU code compiles ~2x faster; the tiny model runs in milliseconds either way
FAST_COMPILE = {"xla_backend_optimization_level": 0}
CACHE = Path(os.environ.get("VLLAMA_TEST_JAX_CACHE", "/tmp/vllama-jax-test-compile-cache"))


def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def tiny_config_dict(tiny_dir: Path, out: Path, **extra: Any) -> dict:
    base = {
        "name": "test", "seed": 0, "mesh": "data=1", "max_steps": 6, "output_dir": str(out),
        "compilation_cache": str(CACHE), "compiler_options": FAST_COMPILE,
        "model": {"config": str(TINY_MODEL), "precision": "float32"},
        "weights": {"eva_vit": str(tiny_dir / "eva_vit.pth"), "blip2": str(tiny_dir / "blip2_qformer.pth"),
                    "llama": str(tiny_dir / "llama")},
        "data": {"synthetic": {"num_examples": 32, "num_classes": 4, "noise": 0.1}, "batch_size": 4,
                 "num_frames": 4, "max_txt_len": 16},
        "optim": {"init_lr": 1e-3, "min_lr": 1e-4, "warmup_lr": 1e-4, "warmup_steps": 2, "iters_per_epoch": 20,
                  "max_epoch": 3},
        "checkpoint": {"every": 3, "keep": 3},
        "log": {"every": 1, "peak_tflops": 1.0},
    }
    return deep_merge(base, extra)


def tiny_config(tiny_dir: Path, out: Path, **extra: Any) -> TrainConfig:
    return train_config_from_dict(tiny_config_dict(tiny_dir, out, **extra))


def host(tree: Any) -> dict[str, np.ndarray]:
    """Flat {path: numpy array} of a (possibly sharded) tree."""
    import jax

    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p): np.asarray(jax.device_get(v)) for p, v in flat}


def subprocess_env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def compiled(fn: Any, *args: Any) -> Any:
    """`jax.jit(fn)` compiled for `args` with the tests' fast XLA options."""
    import jax

    return jax.jit(fn).lower(*args).compile(FAST_COMPILE)
