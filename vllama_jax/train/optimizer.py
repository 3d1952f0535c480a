"""Which parameters train, AdamW with upstream's weight-decay groups (or Muon for the 2-D kernels), and the
`linear_warmup_cosine_lr` schedule.

The params tree is split by top-level group into a *trainable* and a *frozen* tree (`partition`). Only the trainable
tree is differentiated and has optimizer state; the frozen towers (ViT, image Q-Former, ImageBind, LLaMA) are plain
inputs of the step. Upstream decides trainability with `requires_grad` per module (upstream.md §1.8); the same flags pick
groups here.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..config import ConfigError, ModelConfig
from ..models.groups import FREEZE_FLAGS, LLM_GROUP, branch_groups, branch_towers, trained_groups
from ..tree import flatten_params, unflatten_params
from ..weights.keymaps import KeyMap, audio_branch_keymap, video_branch_keymap
from .config import OptimConfig, TrainConfig

def trainable_groups(cfg: TrainConfig, model_config: ModelConfig) -> tuple[str, ...]:
    """Top-level param groups trained by the stage's freeze flags (the `trained_by` column of `models.groups`,
    upstream.md §1.8), and the LLM's LoRA adapters when `lora` is configured."""
    if not cfg.frozen_audio_qformer and not model_config.equip_audio_branch:
        raise ConfigError("frozen_audio_qformer: false needs a model with equip_audio_branch: true")
    return trained_groups({flag: getattr(cfg, flag) for flag in FREEZE_FLAGS}, lora=cfg.lora.enabled)


def forward_groups(branch: str, model_config: ModelConfig, abstract_params: Mapping[str, Any],
                   cached: bool = False) -> tuple[str, ...]:
    """Every group the training forward of `branch` reads: its towers (not with ``cached`` features: the step
    starts from their output), its own branch groups, the LLM and its trained groups (LoRA adapters, when the
    model has them), and the top-level single-array params (query tokens), which flax creates eagerly in `setup`
    and must therefore always exist."""
    leaves = tuple(k for k, v in abstract_params.items() if not isinstance(v, Mapping))
    towers = [g for g in branch_towers(branch) if not cached or g == LLM_GROUP]
    wanted = (set(towers) | set(branch_groups(branch, towers=False))
              | set(branch_groups("llm", towers=False)) | set(leaves))
    return tuple(k for k in abstract_params if k in wanted)


def partition(params: Mapping[str, Any], trainable: Iterable[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainable tree, frozen tree) split by top-level group."""
    names = set(trainable)
    return ({k: v for k, v in params.items() if k in names}, {k: v for k, v in params.items() if k not in names})


# ----------------------------------------------------------------------------------------------------------------
# weight decay groups (upstream.md §8.3)


def upstream_no_decay(name: str, ndim: int) -> bool:
    """Upstream runner rule: no weight decay for `ndim < 2` or names containing "bias", "ln" or "bn" (case-sensitive
    substrings of the PyTorch parameter name)."""
    return ndim < 2 or "bias" in name or "ln" in name or "bn" in name


def _param_patterns(keymaps: Iterable[KeyMap]) -> list[tuple[re.Pattern, str]]:
    """(regex over our params path, upstream name template) for every single-target rule of the key maps."""
    out = []
    for km in keymaps:
        for r in km.rules:
            if len(r.dst) == 1:
                pat = re.compile("^" + re.escape(r.dst[0]).replace(r"\{i\}", r"(?P<i>\d+)") + "$")
                out.append((pat, r.src))
    return out


_TRAINABLE_PATTERNS = _param_patterns([video_branch_keymap(), audio_branch_keymap()])


def upstream_name(path: str) -> str:
    """The upstream (PyTorch state-dict) name of one of our trainable params paths ("video_qformer/layer_0/...")
    via the key maps used by the weight loader; our own path if no map covers it."""
    for pat, src in _TRAINABLE_PATTERNS:
        m = pat.match(path)
        if m:
            i = m.groupdict().get("i")
            return src.replace("{i}", i) if i is not None else src
    return path.replace("/", ".")


def decay_mask(trainable: Mapping[str, Any]) -> dict[str, Any]:
    """Bool tree over the trainable params: True = weight decay applies (upstream rule on upstream names; the
    transposed Linear kernels keep their ndim, so the ndim test is the same on our arrays)."""
    flat = flatten_params(trainable)
    return unflatten_params({p: not upstream_no_decay(upstream_name(p), len(v.shape)) for p, v in flat.items()})


# ----------------------------------------------------------------------------------------------------------------
# learning rate (upstream.md §8.4)


def lr_schedule(o: OptimConfig) -> Callable[[Any], Any]:
    """Upstream `linear_warmup_cosine_lr` as a function of the optimizer step `g` (0-based: the lr used by the
    g-th update; upstream calls the scheduler with (epoch, in-epoch step) before each iteration).

    Quirks kept: the warm-up ramp uses the *in-epoch* step `g % iters_per_epoch` (it restarts each epoch if the
    warm-up is longer than an epoch), and the cosine runs over the whole run `g / total`, not offset by warm-up.
    """
    total = float(o.total_steps)

    def lr(g):
        g = jnp.asarray(g, jnp.float32)
        s = jnp.mod(g, o.iters_per_epoch)
        warm = jnp.minimum(o.init_lr, o.warmup_lr + (o.init_lr - o.warmup_lr) * s / max(o.warmup_steps, 1))
        cos = o.min_lr + (o.init_lr - o.min_lr) * 0.5 * (1.0 + jnp.cos(math.pi * g / total))
        return jnp.where(g < o.warmup_steps, warm, cos)

    return lr


def muon_labels(trainable: Mapping[str, Any]) -> dict[str, Any]:
    """Per leaf of ``trainable``: "muon" for a 2-D kernel (a dense layer's ``x @ W``: its rows the input axis), "adamw"
    for everything else (embeddings, position tables, query tokens, biases, LayerNorms), as Muon is meant to be used."""
    return unflatten_params({k: "muon" if k.rsplit("/", 1)[-1] == "kernel" and len(v.shape) == 2 else "adamw"
                             for k, v in flatten_params(trainable).items()})


def whitening_preconditioner(inputs: Any, floor: float) -> np.ndarray:
    """The symmetric (d, d) matrix that whitens the rows of ``inputs`` (..., d): P = E diag(sqrt(l_max / (l +
    floor * l_max))) E^T over the eigenpairs (l, E) of their covariance. The largest direction keeps its scale (up
    to 1/sqrt(1 + floor)), a direction with a fraction f of its variance grows by up to 1/sqrt(f + floor): ``floor``
    bounds the gain (1e-2: 10x) so that directions the samples hardly span are not blown up."""
    x = np.asarray(inputs, np.float64).reshape(-1, np.shape(inputs)[-1])
    eigval, eigvec = np.linalg.eigh(np.cov(x, rowvar=False))
    eigval = np.maximum(eigval, 0.0)
    top = float(eigval.max())
    if not top > 0:
        raise ValueError("the inputs do not vary: nothing to whiten")
    return ((eigvec * np.sqrt(top / (eigval + floor * top))) @ eigvec.T).astype(np.float32)


def precondition_inputs(preconditioners: Mapping[str, Any]) -> optax.GradientTransformation:
    """Multiplies the update of each kernel named in ``preconditioners`` (flattened params path -> symmetric (in, in)
    matrix P) by P from the left; other leaves pass unchanged. Placed before and after an update rule it trains a
    kernel W as W = P V, V the rule's variable: the rule sees the inputs x @ P instead of x (a fixed, input-side
    preconditioner, as K-FAC's or Shampoo's left factor, here known before training). Stateless; leaves masked out
    by ``optax.partition`` (empty nodes) are skipped."""
    mats = {k: jnp.asarray(v, jnp.float32) for k, v in preconditioners.items()}

    def update(updates, state, params=None):
        del params

        def apply(path: tuple, u: Any) -> Any:
            p = mats.get("/".join(str(getattr(k, "key", k)) for k in path))
            return u if p is None else p @ u

        return jax.tree_util.tree_map_with_path(apply, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(o: OptimConfig, trainable: Mapping[str, Any],
                   preconditioners: Mapping[str, Any] | None = None) -> optax.GradientTransformation:
    """AdamW (PyTorch semantics: decoupled decay `p -= lr * wd * p`, eps outside the sqrt) over the trainable tree,
    decay masked per upstream groups; optional global-norm clipping first.

    ``optimizer: muon``: the 2-D kernels (``muon_labels``) take Muon's update instead (momentum orthogonalised by
    Newton-Schulz iterations, lr ``muon_lr_ratio`` x the schedule, the same decoupled decay), the rest AdamW as
    above. An orthogonalised update moves every direction of a kernel's input alike, where Adam's moves the
    directions the inputs vary most in fastest: the demo's frozen features span four orders of magnitude of
    variance, the colour in the largest directions, the shape in small ones (``bench/demo_probe.py``).

    ``preconditioners`` (Muon only; flattened path of a kernel -> P, e.g. ``whitening_preconditioner`` of the
    inputs it reads): Muon runs on the kernel as W = P V (``precondition_inputs`` around its orthogonalised
    update; the decay and the lr apply to W as without). An orthogonalised update moves every direction of the
    kernel's *output* alike, but what it learns per input direction still scales with that direction's variance;
    with whitened inputs it does not (``demo.run.Settings.whiten_floor``)."""
    lr = lr_schedule(o)
    adamw = optax.adamw(lr, b1=o.beta1, b2=o.beta2, eps=o.eps, weight_decay=o.weight_decay,
                        mask=decay_mask(trainable))
    tx = adamw
    if preconditioners and o.optimizer != "muon":
        raise ValueError(f"input preconditioners need optim.optimizer: muon, not {o.optimizer!r}")
    if o.optimizer == "muon":
        unknown = sorted(set(preconditioners or {}) - {k for k, v in flatten_params(muon_labels(trainable)).items()
                                                       if v == "muon"})
        if unknown:
            raise ValueError(f"preconditioners for parameters that are not trained 2-D kernels: {unknown}")
        pre = precondition_inputs(preconditioners or {})
        # optax's Muon with learning_rate -1 is its raw update (scale_by_learning_rate flips the sign back), so that
        # the preconditioner acts on it before the decay and the lr, as optax.contrib.muon orders them
        muon = optax.chain(pre, optax.contrib.muon(-1.0), pre, optax.add_decayed_weights(o.weight_decay),
                           optax.scale_by_learning_rate(lambda g: lr(g) * o.muon_lr_ratio))
        tx = optax.partition({"muon": muon, "adamw": adamw}, muon_labels(trainable))
    if o.clip_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(o.clip_grad_norm), tx)
    return tx


def opt_state_shardings(abstract_opt_state: Any, param_shardings: Any, replicated: Any) -> Any:
    """Optimizer-state shardings: a leaf that mirrors a parameter (Adam's moments, Muon's momentum: its key path ends
    in that parameter's dict keys) follows the parameter's sharding; counters and the rest are replicated. Found by
    key path because ``optax.tree_map_params`` cannot see through ``optax.partition``'s masked subtrees."""
    by_path = {tuple(k.key for k in path): s for path, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}

    def follow(path: tuple, leaf: Any) -> Any:
        keys: list[Any] = []
        for k in reversed(path):
            if not isinstance(k, jax.tree_util.DictKey):
                break
            keys.insert(0, k.key)
        return by_path.get(tuple(keys), replicated)

    return jax.tree_util.tree_map_with_path(follow, abstract_opt_state)


__all__ = ["decay_mask", "forward_groups", "lr_schedule", "make_optimizer", "muon_labels",
           "opt_state_shardings", "partition", "precondition_inputs", "trainable_groups", "upstream_name",
           "upstream_no_decay", "whitening_preconditioner"]
