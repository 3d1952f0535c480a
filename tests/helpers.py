"""Small helpers shared by tests (not a test module)."""

from __future__ import annotations

import contextlib
import json
import math
import socket
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import linen as nn

from vllama_jax.tree import flatten_params
from vllama_jax.weights.load import UpstreamFiles

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "tiny_test.yaml"  # the model config of the fixture model
TINY_VL = Path(__file__).resolve().parent / "fixtures" / "tiny_vl"  # the golden set (tests/fixtures/README.md §1)
# Absolute bound on |our logits - transformers' logits| for SmolLM2-135M-Instruct from its GGUF, float32 on CPU
# (logit range ~57-67; test_llama_gguf.py, test_convert.py). Measured on this project's 2-core CPU: prefill 1.06e-4,
# KV-cache decode steps <= 9.0e-5, after conversion 1.34e-4; the bound leaves 1.5x margin over the worst.
SMOLLM2_LOGIT_ATOL = 2e-4
# upstream file of each weight kind inside tiny_vl (tests/fixtures/README.md §1.2)
TINY_FILES = {"eva_vit": "eva_vit.pth", "blip2": "blip2_qformer.pth", "imagebind": "imagebind.pth",
              "llama": "llama", "vl_ckpt": "vl_ckpt.pth", "al_ckpt": "al_ckpt.pth"}


def shapes_of(module: nn.Module, *args, prefix: str = "", **kw) -> dict[str, tuple[int, ...]]:
    """Flat {prefix + path: shape} of a module's params, without allocating them."""
    boxed = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, **kw))["params"]
    return {prefix + k: tuple(v.shape) for k, v in flatten_params(nn.unbox(boxed)).items()}


def assert_close(actual, expected, atol=1e-4, rtol=1e-4, name=""):
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    assert a.shape == e.shape, f"{name}: shape {a.shape} != {e.shape}"
    np.testing.assert_allclose(a, e, atol=atol, rtol=rtol, err_msg=name)


def upstream_rule_no_decay(name: str, ndim: int) -> bool:
    """Upstream's weight-decay rule, written here independently of the library (upstream.md §8.3,
    video_llama/runners/runner_base.py: `if p.ndim < 2 or "bias" in n or "ln" in n or "bn" in n:` -> no decay),
    for the PyTorch state-dict name `name` of a parameter with `ndim` dimensions."""
    return ndim < 2 or "bias" in name or "ln" in name or "bn" in name


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def load_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def tiny_files(tiny_dir: Path, *kinds: str) -> UpstreamFiles:
    """The fixture model's upstream files: the given kinds (keys of TINY_FILES), or all six."""
    return UpstreamFiles(**{k: tiny_dir / TINY_FILES[k] for k in kinds or TINY_FILES})


@contextlib.contextmanager
def torch_one_thread():
    """Run torch on one thread: small models are faster and far steadier that way on a busy 2-core machine (torch's
    spinning OpenMP pool made a 2-thread SmolLM2 generate 10x slower: 31 s vs 2.8 s of CPU for one 20-token batch)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def random_hf_llama(*, seed: int = 0, unit_embeddings: bool = False, lm_head_scale: float = 1.0, **config):
    """A transformers LlamaForCausalLM (eager attention, eval mode) of `transformers.LlamaConfig(**config)` with every
    parameter random and non-trivial: norm gains 1 + 0.1 N, matrices N(0, 1/fan_in) (embeddings N(0, 1) with
    `unit_embeddings`; `lm_head` times `lm_head_scale`, for spread-out logits)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**config)
    cfg._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif unit_embeddings and "embed" in name:
                p.copy_(torch.randn_like(p))
            else:
                scale = lm_head_scale if "lm_head" in name else 1.0
                p.copy_(scale * torch.randn_like(p) / math.sqrt(p.shape[1]))
    return model


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server or a coordinator started by a test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
