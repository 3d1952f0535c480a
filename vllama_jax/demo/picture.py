"""The demo's picture: the training loss curve and the held-out accuracy bars (trained, untrained, each ablation,
chance) side by side, as a PNG."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on a CI machine or a server
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402

#: report column -> (bar label, colour)
BARS = {
    "trained": ("trained (multiple choice)", "#2b6cb0"),
    "trained_answers": ("trained (free-form answer)", "#90cdf4"),
    "untrained_choice": ("untrained (multiple choice)", "#a0aec0"),
    "shuffled_frames": ("trained, frames shuffled", "#dd6b20"),
    "no_audio": ("trained, audio removed", "#38a169"),
}


def write_picture(path: str | Path, losses: Sequence[float], attributes: Mapping[str, Mapping[str, float]],
                  title: str = "") -> Path:
    """Write the PNG: left the per-step training loss (and its running mean), right one group of bars per
    attribute (``attributes[a][column]`` for each of ``BARS``, accuracy in [0, 1]) with chance as a black tick."""
    path = Path(path)
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [1, 1.8]})
    steps = np.arange(1, len(losses) + 1)
    ax_l.plot(steps, losses, color="#a0aec0", lw=1, label="per step")
    k = max(1, len(losses) // 15)
    if len(losses) >= k:
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax_l.plot(steps[k - 1:], smooth, color="#2b6cb0", lw=2, label=f"mean of {k}")
    ax_l.set(xlabel="training step", ylabel="loss (answer tokens)", title="training loss (both branches)")
    ax_l.legend(frameon=False)
    names = list(attributes)
    width = 0.8 / len(BARS)
    x = np.arange(len(names))
    for j, (col, (label, colour)) in enumerate(BARS.items()):
        vals = [100 * attributes[a][col] for a in names]
        ax_a.bar(x + (j - (len(BARS) - 1) / 2) * width, vals, width, label=label, color=colour)
    for i, a in enumerate(names):
        ax_a.plot([i - 0.42, i + 0.42], [100 * attributes[a]["chance"]] * 2, color="black", lw=1.5,
                  label="chance" if i == 0 else None)
    ax_a.set_xticks(x, names)
    ax_a.set(ylim=(0, 105), ylabel="held-out accuracy (%)", title="what the model answers about unseen clips")
    ax_a.legend(frameon=False, fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["BARS", "write_picture"]
