"""What `make demo`'s frozen features carry, and how much of it the demo's training budget can teach.

`make demo` trains the video branch on the frozen towers' outputs of its clips, through the frozen LLM, for
``Settings.steps`` steps of ``Settings.batch_size`` rows (400 x 4). Whether an attribute fails because the features
lack it or because that many rows are too few to learn it decides what to change next. This benchmark builds the
demo's model and features exactly as the demo does (same clips, same towers, same calibration; ``--seed``) and reads
colour, shape and direction from them on clips not trained on, three ways:

* ``ridge``: a closed-form ridge-regression probe on the per-frame features averaged over the image Q-Former's
  queries (frames concatenated in order): what a linear reader with the best fit can read;
* ``linear_sgd``: the same linear reader trained with Adam on the demo's budget (``--steps`` x ``--batch-size``);
* ``linear_sgd_whitened``: that reader with that budget on the same features PCA-whitened (fitted on the training
  clips, eigenvalues floored at 1e-3 of the largest): how much of what ``linear_sgd`` misses is the features'
  conditioning (their variance spans orders of magnitude, the colour fills the largest directions, and gradient
  steps learn a direction at a speed that grows with its variance) rather than the budget;
* ``class_means``: the nearest class mean of the same features (frames concatenated), and ``class_means_motion``
  of the last frame's features minus the first's: what one small gradient step of a reader starting from zero
  learns (its first update is the difference of the class means). Colour is read this way; the colour's spread
  blurs the class means of the frames' positions, and the frame difference cancels it (README: 85% vs 100% for
  the direction on today's clips);
* ``video_branch``: the demo's trained video branch from its start (video Q-Former with its query tokens and frame
  positions, the frozen projection into the LLM) plus a linear head per attribute from zero, trained directly on
  the labels with AdamW at the demo's learning rate and budget, without the LLM. Not a bound on what training
  through the LLM reaches: on the demo's clips (seed 0, 2026-12-06) it reads shape and direction at 89% and 48%,
  the demo 98% and 100%.
  ``video_branch_muon``: the same with Muon for the branch's 2-D kernels (``optim.optimizer``);
  ``video_branch_muon_whitened``: and Muon training the cross-attention keys and values as if the frame features
  were whitened (``train.features.whitened_readers``, eigenvalue floor ``Settings.whiten_floor``), as the demo trains.

    python bench/demo_probe.py [--seed 0] [--clips 480] [--steps 400] [--batch-size 4] [--lr 1e-3] [--json PATH]

The last 80 of the ``--clips`` clips are held out. Prints a table, and the load average before and after.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vllama_jax.demo.clips import ATTRIBUTES, VISUAL, make_dataset  # noqa: E402
from vllama_jax.demo.run import CALIBRATION_CLIPS, Settings, _loaded, calibrate_towers, demo_model  # noqa: E402
from vllama_jax.inference.chat import VideoLLaMAChat  # noqa: E402
from vllama_jax.models import build_model  # noqa: E402
from vllama_jax.models.groups import trained_groups  # noqa: E402
from vllama_jax.models.video_llama import VideoLLaMA  # noqa: E402
from vllama_jax.train.config import OptimConfig  # noqa: E402
from vllama_jax.train.features import frozen_features, whitened_readers  # noqa: E402
from vllama_jax.train.optimizer import make_optimizer  # noqa: E402

HELD_OUT = 80
#: the video branch's groups (trained in the demo)
VIDEO_GROUPS = tuple(g for g in trained_groups({"frozen_video_qformer": False}) if g.startswith("video"))


def demo_features(seed: int, n: int, root: Path) -> tuple[np.ndarray, dict[str, np.ndarray], Any, dict]:
    """The demo's calibrated model and the frozen per-frame image Q-Former outputs (n, T, Q, H) of n clips."""
    config, params, tokenizer, _ = demo_model(seed)
    data = make_dataset(root, n, 0, seed=seed)
    chat = VideoLLaMAChat.from_loaded(_loaded(config, params, tokenizer, root, "probe"), num_frames=4,
                                      compilation_cache=False, log=lambda m: None)
    model = build_model(config)
    frames = np.stack([chat.prepare_video(data.clip_path(c), with_audio=False).frames for c in data.train])
    params = calibrate_towers(model, params, frames[:CALIBRATION_CLIPS], None)  # audio is not probed
    feats = frozen_features(model, params, frames, None)["frame_queries"]
    labels = {a: np.array([ATTRIBUTES[a][1].index(c.truth(a)) for c in data.train]) for a in VISUAL}
    return feats, labels, model, params


def ridge(x: np.ndarray, y: np.ndarray, n_train: int, classes: int, alpha: float = 10.0) -> float:
    xtr = x[:n_train]
    targets = np.eye(classes)[y[:n_train]]
    w = xtr.T @ np.linalg.solve(xtr @ xtr.T + alpha * np.eye(n_train), targets)
    return float(np.mean(np.argmax(x[n_train:] @ w, 1) == y[n_train:]))


def whiten(x: np.ndarray, n_train: int, floor: float = 1e-3) -> np.ndarray:
    """``x`` in the principal axes of its first ``n_train`` rows, each axis scaled to unit variance (eigenvalues
    floored at ``floor`` x the largest, so the axes the training rows do not span stay small)."""
    mean = x[:n_train].mean(0)
    eigval, eigvec = np.linalg.eigh(np.cov((x[:n_train] - mean).T))
    return ((x - mean) @ eigvec / np.sqrt(np.maximum(eigval, 0) + floor * eigval.max())).astype(np.float32)


def nearest_class_mean(x: np.ndarray, y: np.ndarray, n_train: int, classes: int) -> float:
    means = np.stack([x[:n_train][y[:n_train] == c].mean(0) for c in range(classes)])
    dist = ((x[n_train:, None, :] - means[None]) ** 2).sum(-1)
    return float(np.mean(np.argmin(dist, 1) == y[n_train:]))


def sgd(loss: Callable, params: Any, data: tuple, order: np.ndarray, steps: int, batch: int, opt) -> Any:
    state = opt.init(params)

    @jax.jit
    def step(p, s, *xs):
        g = jax.grad(loss)(p, *xs)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    for k in range(steps):
        idx = order[k * batch:(k + 1) * batch]
        params, state = step(params, state, *(d[idx] for d in data))
    return params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clips", type=int, default=480, help="clips made (the last 80 held out; a multiple of 12)")
    ap.add_argument("--steps", type=int, default=Settings.steps)
    ap.add_argument("--batch-size", type=int, default=Settings.batch_size)
    ap.add_argument("--lr", type=float, default=Settings.lr)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        feats, labels, model, params = demo_features(args.seed, args.clips, Path(tmp))
    t_feats = time.perf_counter() - t0
    n_train = args.clips - HELD_OUT
    rng = np.random.default_rng(args.seed)
    order = np.concatenate([rng.permutation(n_train) for _ in range(args.steps * args.batch_size // n_train + 1)])
    per_frame = feats.mean(2).reshape(len(feats), -1)
    per_frame = (per_frame - per_frame[:n_train].mean(0)) / (per_frame[:n_train].std(0) + 1e-6)
    motion = feats[:, -1].mean(1) - feats[:, 0].mean(1)
    whitened = whiten(per_frame, n_train)
    results: dict[str, dict[str, float]] = {"ridge": {}, "linear_sgd": {}, "linear_sgd_whitened": {},
                                            "class_means": {}, "class_means_motion": {}}
    for a in VISUAL:
        k = len(ATTRIBUTES[a][1])
        results["ridge"][a] = ridge(per_frame, labels[a], n_train, k)
        for name, x in (("linear_sgd", per_frame), ("linear_sgd_whitened", whitened)):
            w = sgd(lambda w, x, y: optax.softmax_cross_entropy_with_integer_labels(x @ w, y).mean(),
                    jnp.zeros((x.shape[1], k)), (x, labels[a]), order, args.steps, args.batch_size,
                    optax.adam(args.lr))
            results[name][a] = float(np.mean(np.argmax(x[n_train:] @ np.asarray(w), 1) == labels[a][n_train:]))
        results["class_means"][a] = nearest_class_mean(per_frame, labels[a], n_train, k)
        results["class_means_motion"][a] = nearest_class_mean(motion, labels[a], n_train, k)
    # the video branch + a linear head per attribute, on its LLM rows (flattened, unit-normalised)
    frozen = {g: v for g, v in params.items() if g not in VIDEO_GROUPS and g != "llama"}

    def rows(branch, x):
        def fn(m: VideoLLaMA, x):
            return m._video_from_memory(m.video_qformer_memory(x), True)
        r = model.apply({"params": {**frozen, **branch}}, x, method=fn).reshape(x.shape[0], -1)
        return r / (jnp.linalg.norm(r, axis=-1, keepdims=True) + 1e-6) * 10

    def branch_loss(p, x, *ys):
        r = rows(p["branch"], x)
        return sum(optax.softmax_cross_entropy_with_integer_labels(r @ p["heads"][a], y).mean()
                   for a, y in zip(VISUAL, ys))

    width = model.config.llama.hidden_size * model.config.video_qformer.num_query_tokens
    p0 = {"branch": {g: params[g] for g in VIDEO_GROUPS},
          "heads": {a: jnp.zeros((width, len(ATTRIBUTES[a][1]))) for a in VISUAL}}
    adamw = optax.adamw(args.lr, weight_decay=0.05)
    # Muon as the demo trains with it (``optim.optimizer: muon``): the branch's 2-D kernels at muon_lr_ratio x lr
    muon_cfg = OptimConfig(init_lr=args.lr, min_lr=args.lr, warmup_steps=0, weight_decay=0.05, optimizer="muon")

    def muon(pre: dict | None) -> optax.GradientTransformation:
        """The demo's optimizer on the branch (its masks are built on the branch's own tree), AdamW on the heads."""
        branch_tx = make_optimizer(muon_cfg, p0["branch"], pre)

        def update(u, state, p=None):
            ub, sb = branch_tx.update(u["branch"], state[0], None if p is None else p["branch"])
            uh, sh = adamw.update(u["heads"], state[1], None if p is None else p["heads"])
            return {"branch": ub, "heads": uh}, (sb, sh)

        return optax.GradientTransformation(lambda p: (branch_tx.init(p["branch"]), adamw.init(p["heads"])), update)

    pre = whitened_readers({"frame_queries": feats[:n_train]}, p0["branch"], Settings.whiten_floor)
    for name, opt in (("video_branch", adamw), ("video_branch_muon", muon(None)),
                      ("video_branch_muon_whitened", muon(pre))):
        p = sgd(branch_loss, p0, (feats,) + tuple(labels[a] for a in VISUAL), order, args.steps, args.batch_size, opt)
        r = np.asarray(rows(p["branch"], feats[n_train:]))
        results[name] = {a: float(np.mean(np.argmax(r @ np.asarray(p["heads"][a]), 1) == labels[a][n_train:]))
                         for a in VISUAL}
    load_after = os.getloadavg()
    chance = {a: 1 / len(ATTRIBUTES[a][1]) for a in VISUAL}
    print(f"demo features of {args.clips} clips (seed {args.seed}) in {t_feats:.0f} s; {HELD_OUT} held out; "
          f"budget {args.steps} steps x {args.batch_size}, lr {args.lr:g}")
    print("| reader | " + " | ".join(VISUAL) + " |\n|---|" + "---|" * len(VISUAL))
    for name, accs in list(results.items()) + [("chance", chance)]:
        print(f"| {name} | " + " | ".join(f"{100 * accs[a]:.0f}%" for a in VISUAL) + " |")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "results": results, "chance": chance, "settings": vars(args), "held_out": HELD_OUT,
            "features_s": round(t_feats, 1), "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in load_after], "machine": platform.platform(),
            "cpus": os.cpu_count(), "date": datetime.date.today().isoformat(), "jax": jax.__version__}, indent=1))


if __name__ == "__main__":
    main()
