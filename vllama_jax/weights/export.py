"""The way back: trainable parameters -> an upstream-format Video-LLaMA checkpoint (`.pth`).

The original demo loads its fine-tuned weights with `model.load_state_dict(ckpt['model'], strict=False)`
(`ckpt` = VL checkpoint, `ckpt_2` = AL checkpoint), so a file with exactly the trainable *parameters* under their
upstream names loads into it: `video_Qformer.*`, `video_query_tokens`, `video_frame_position_embedding.weight`,
`llama_proj.*` (vision branch) and `audio_Qformer.*`, `audio_query_tokens`, `audio_position_embedding.weight`,
`audio_llama_proj.*` (audio branch), as float32 torch tensors in the PyTorch layout (`KeyMap.inverse`).

Buffers that upstream's runner also saves (`*.bert.embeddings.position_ids`, LLaMA `rotary_emb.inv_freq`,
ImageBind scale/mask buffers) are deliberately NOT written: the demo's non-strict load keeps the values its
constructor computed, which are the same constants. A file with both branches serves as `ckpt` and `ckpt_2`.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import VllamaError
from ..models.groups import branch_groups
from ..tree import flatten_params
from .keymaps import audio_branch_keymap, video_branch_keymap
from .model_dir import load_model_dir, model_dir_groups

BRANCHES = {b: branch_groups(b, towers=False) for b in ("video", "audio")}
_KEYMAPS = {"video": video_branch_keymap, "audio": audio_branch_keymap}


class ExportError(VllamaError):
    """An export that cannot proceed; one line naming what and why."""


def trainable_state_dict(params: Mapping[str, Any], branches: Sequence[str] = ("video", "audio")) -> dict[str, np.ndarray]:
    """Upstream names -> float32 numpy arrays (PyTorch layout) of the given branches' parameters. Every group of a
    requested branch must be present in `params`."""
    out: dict[str, np.ndarray] = {}
    for b in branches:
        if b not in BRANCHES:
            raise ExportError(f"unknown branch {b!r} (video or audio)")
        missing = [g for g in BRANCHES[b] if g not in params]
        if missing:
            raise ExportError(f"{b} branch: parameter groups {', '.join(missing)} are missing")
        flat = flatten_params({g: params[g] for g in BRANCHES[b]})
        sd = _KEYMAPS[b]().inverse({p: np.asarray(v, dtype=np.float32) for p, v in flat.items()})
        # every parameter must have found its upstream name (the inverse silently skips unmatched ones)
        produced = sum(int(np.prod(v.shape)) for v in sd.values())
        expected = sum(int(np.prod(np.shape(v))) for v in flat.values())
        if produced != expected:
            raise ExportError(f"{b} branch: {expected - produced} parameters have no upstream name")
        out.update(sd)
    return out


def save_upstream_checkpoint(state: Mapping[str, np.ndarray], out_path: str | Path, force: bool = False) -> Path:
    """`torch.save({'model': state})`, atomically (temp file in the same folder, renamed when complete)."""
    import torch  # optional dependency (the `torch` extra), needed only to write a .pth; ~1.4 s to import

    out = Path(out_path).expanduser().absolute()
    if out.exists() and not force:
        raise ExportError(f"{out}: already exists (pass --force to replace it)")
    if out.is_dir():
        raise ExportError(f"{out}: is a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    try:
        torch.save({"model": {k: torch.tensor(np.asarray(v, dtype=np.float32)) for k, v in state.items()}}, tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


@dataclass
class ExportReport:
    out_path: Path
    branches: list[str]
    tensors: int
    params: int

    def summary(self) -> str:
        return (f"wrote {self.out_path}: {', '.join(self.branches)} branch parameters, {self.tensors} tensors, "
                f"{self.params:,} parameters (float32, upstream names; load with strict=False as the demo does)")


def export_checkpoint(model_dir: str | Path, out_path: str | Path, *, branch: str = "all",
                      force: bool = False) -> ExportReport:
    """Export a model directory's trainable parameters to an upstream `.pth`. branch: "video", "audio" or "all"
    (every branch present in the directory; an error if none is)."""
    present = set(model_dir_groups(model_dir))
    if branch == "all":
        branches = [b for b, gs in BRANCHES.items() if all(g in present for g in gs)]
        if not branches:
            raise ExportError(f"{model_dir}: holds no complete trainable branch (groups: "
                              f"{', '.join(sorted(present)) or 'none'})")
    elif branch in BRANCHES:
        branches = [branch]
        missing = [g for g in BRANCHES[branch] if g not in present]
        if missing:
            raise ExportError(f"{model_dir}: no {branch} branch (missing {', '.join(missing)})")
    else:
        raise ExportError(f"unknown branch {branch!r} (all, video or audio)")
    groups = [g for b in branches for g in BRANCHES[b]]
    loaded = load_model_dir(model_dir, groups=groups)
    state = trainable_state_dict(loaded.params, branches)
    path = save_upstream_checkpoint(state, out_path, force=force)
    return ExportReport(path, branches, len(state), sum(int(np.prod(v.shape)) for v in state.values()))
