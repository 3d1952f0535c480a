"""Training on cached frozen-tower outputs: both branches at once, without re-running the frozen towers each step.

The ViT, the image Q-Former and ImageBind are frozen; without augmentation their outputs for a clip never change.
`frozen_features` computes them once per clip, in batched jitted passes through the model's own functions
(`VideoLLaMA.encode_frames` for the video branch, `VideoLLaMA.audio_segments` for the audio branch: the same
computation the chat's `encode_video` / `encode_audio` start with), and `FeatureTrainer` trains the branches on them
with the project's step (`train.step.make_train_step` with the "features" batch layout of `data.batch`, AdamW and the
learning-rate schedule of `train.optimizer`, the trained groups from the freeze flags of `models.groups`).

This is what `make demo` trains with: clips held in memory, both branches in one step. The Trainer's cache of the
frozen towers' output on disk (prepared datasets, meshes, hosts, checkpoints) is `train.encode` +
``data.features: cached``; both start from `VideoLLaMA`'s own tower functions.
"""
from __future__ import annotations

import time
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ..data.batch import FEATURES
from ..models.groups import FROZEN_TOWERS, LLM_GROUP, trained_groups
from ..models.video_llama import VideoLLaMA
from ..sharding import make_mesh
from ..tree import flatten_params
from .config import OptimConfig
from .optimizer import lr_schedule, make_optimizer, whitening_preconditioner
from .step import jit_train_step, make_train_step


def frozen_features(model: VideoLLaMA, params: Mapping[str, Any], frames: np.ndarray, clips: np.ndarray | None,
                    batch_size: int = 16, audio_output: str = "embedding") -> dict[str, np.ndarray]:
    """The frozen towers' outputs for N clips: ``frame_queries`` (N, T, Q, hidden) from frames (N, T, H, W, 3) and,
    with ``clips`` (N, S, 1, mel, time), ``audio_embeddings`` (N, S, out_dim) (``audio_output="feature"``: the
    audio head's LayerNorm output (N, S, width) instead, under that name). One compiled shape: the last batch is
    padded. ``params`` needs only the frozen towers (and the top-level query tokens flax creates eagerly)."""
    index = {"feature": 0, "embedding": 1}[audio_output]
    towers = {k: v for k, v in params.items() if k != LLM_GROUP}
    video = jax.jit(lambda p, x: model.apply({"params": p}, x, method=VideoLLaMA.encode_frames))
    audio = jax.jit(lambda p, x: model.apply({"params": p}, x, method=VideoLLaMA.audio_segments)[index])
    out = {"frame_queries": _batched(video, towers, frames, batch_size)}
    if clips is not None:
        out["audio_embeddings"] = _batched(audio, towers, clips, batch_size)
    return out


def _batched(fn: Any, params: Any, xs: np.ndarray, batch_size: int) -> np.ndarray:
    """``fn(params, x)`` over ``xs`` in batches of ``batch_size`` rows (one compiled shape: the last batch is
    padded), as one host array."""
    n = len(xs)
    b = min(batch_size, n)
    outs = []
    for k in range(0, n, b):
        chunk = np.asarray(xs[k:k + b], np.float32)
        if len(chunk) < b:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], b - len(chunk), axis=0)])
        outs.append(np.asarray(fn(params, chunk))[: min(b, n - k)])
    return np.concatenate(outs)


#: cached feature -> the trained group whose cross-attention keys and values read it (with its position embedding)
FEATURE_READERS = {"frame_queries": "video_qformer", "audio_embeddings": "audio_qformer"}


def whitened_readers(features: Mapping[str, np.ndarray], trainable: Mapping[str, Any],
                     floor: float) -> dict[str, np.ndarray]:
    """Muon preconditioners (``train.optimizer.make_optimizer``) for the trained kernels that read cached features:
    each cross-attention key and value kernel of the ``FEATURE_READERS`` group of a feature in ``features`` gets
    ``whitening_preconditioner`` of that feature's rows (the training clips' frozen outputs, (N, ..., width))."""
    out = {}
    for name, x in features.items():
        if name not in FEATURE_READERS:
            raise ValueError(f"unknown cached feature {name!r} (one of {', '.join(FEATURE_READERS)})")
        group = FEATURE_READERS[name]
        p = whitening_preconditioner(x, floor)
        for path, leaf in flatten_params({group: trainable.get(group, {})}).items():
            parts = path.split("/")
            if parts[-3:-1] in (["crossattention", "key"], ["crossattention", "value"]) and parts[-1] == "kernel" \
                    and leaf.shape[0] == p.shape[0]:
                out[path] = p
        if not any(k.startswith(group + "/") for k in out):
            raise ValueError(f"no trained cross-attention kernel of {group} reads {name!r} (is {group} trained?)")
    return out


class FeatureTrainer:
    """Trains the groups of ``freeze_flags`` (upstream names, e.g. ``{"frozen_video_qformer": False,
    "frozen_audio_qformer": False}``; a missing flag counts as frozen) on "features" batches, on one device.

    ``params``: the whole model's params (the trained groups start from their values here); only the LLM and the
    top-level frozen leaves are read by the step, the towers' work being in the batches already.

    ``whiten``: cached features (name -> the training rows' values) whose reading kernels Muon trains on whitened
    inputs (``whitened_readers``, eigenvalue floor ``whiten_floor``)."""

    def __init__(self, model: VideoLLaMA, params: Mapping[str, Any], optim: OptimConfig,
                 freeze_flags: Mapping[str, bool], *, placeholder_id: int, seed: int = 0, dropout: bool = False,
                 whiten: Mapping[str, np.ndarray] | None = None, whiten_floor: float = 1e-2):
        self.trainable_groups = trained_groups(freeze_flags)
        if not self.trainable_groups:
            raise ValueError(f"the freeze flags {dict(freeze_flags)} train nothing")
        leaves = {k for k, v in params.items() if not isinstance(v, Mapping)}  # created eagerly by flax's setup
        # the frozen towers' work is in the batches; the LLM, untrained projections and leaves are still read
        self.frozen_groups = tuple(g for g in params if g not in self.trainable_groups
                                   and (g not in FROZEN_TOWERS or g == LLM_GROUP or g in leaves))
        self.mesh = make_mesh("data=1", jax.devices()[:1])
        rep = NamedSharding(self.mesh, PartitionSpec())
        trainable = {g: jax.tree.map(lambda x: jax.device_put(jnp.asarray(x, jnp.float32), rep), params[g])
                     for g in self.trainable_groups}
        self.frozen = {g: jax.tree.map(lambda x: jax.device_put(jnp.asarray(x), rep), params[g])
                       for g in self.frozen_groups}
        pre = whitened_readers(whiten, trainable, whiten_floor) if whiten else None
        self.tx = make_optimizer(optim, trainable, pre)
        self.lr_fn = lr_schedule(optim)
        # every leaf of the state placed as the step returns it, so that step 2 does not compile again
        opt_sh = jax.tree.map(lambda _: rep, jax.eval_shape(self.tx.init, trainable))
        opt_state = jax.jit(self.tx.init, out_shardings=opt_sh)(trainable)
        self.state = {"step": jax.device_put(jnp.zeros((), jnp.int32), rep), "params": trainable,
                      "opt_state": opt_state}
        state_sh = jax.tree.map(lambda _: rep, self.state)
        step_fn = make_train_step(model, self.tx, self.lr_fn, branch="video", placeholder_id=placeholder_id,
                                  seed=seed, dropout=dropout)
        self._step = jit_train_step(step_fn, state_sh, jax.tree.map(lambda _: rep, self.frozen), self.mesh)
        self.placeholder_id = placeholder_id
        self.history: list[dict[str, float]] = []

    def run(self, batches: Iterable[Mapping[str, np.ndarray]], log: Any = None, log_every: int = 0) -> list[dict]:
        """One optimizer step per batch (arrays of the ``FEATURES`` layout); returns per-step metrics."""
        for batch in batches:
            prefix = batch.get("prompt_prefix")
            if prefix is not None and np.any(np.asarray(prefix) == self.placeholder_id):
                # the prefix is embedded as plain tokens, once for all rows: media placed there would be lost
                raise ValueError("prompt_prefix holds media placeholders; a shared prefix must end before the "
                                 "first media block (each row's media differ)")
            arrays = FEATURES.arrays(batch)
            t = time.perf_counter()
            self.state, m = self._step(self.state, self.frozen, arrays, FEATURES.kind)
            row = {k: float(v) for k, v in jax.device_get(m).items()}
            if not np.isfinite(row["loss"]):
                raise FloatingPointError(f"non-finite loss at step {len(self.history) + 1}")
            row["step_time_s"] = time.perf_counter() - t
            self.history.append(row)
            if log is not None and log_every and len(self.history) % log_every == 0:
                log(len(self.history), row)
        return self.history

    def trained_params(self) -> dict[str, Any]:
        """The trained groups as host (numpy) arrays."""
        return jax.tree.map(np.asarray, jax.device_get(self.state["params"]))


__all__ = ["FEATURE_READERS", "FeatureTrainer", "frozen_features", "whitened_readers"]
