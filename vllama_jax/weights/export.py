"""The way back: trainable parameters -> an upstream-format Video-LLaMA checkpoint (`.pth`).

The original demo loads its fine-tuned weights with `model.load_state_dict(ckpt['model'], strict=False)`
(`ckpt` = VL checkpoint, `ckpt_2` = AL checkpoint), so a file with exactly the trainable *parameters* under their
upstream names loads into it: `video_Qformer.*`, `video_query_tokens`, `video_frame_position_embedding.weight`,
`llama_proj.*` (vision branch) and `audio_Qformer.*`, `audio_query_tokens`, `audio_position_embedding.weight`,
`audio_llama_proj.*` (audio branch), as float32 torch tensors in the PyTorch layout (`KeyMap.inverse`).

Buffers that upstream's runner also saves (`*.bert.embeddings.position_ids`, LLaMA `rotary_emb.inv_freq`,
ImageBind scale/mask buffers) are deliberately NOT written: the demo's non-strict load keeps the values its
constructor computed, which are the same constants. A file with both branches serves as `ckpt` and `ckpt_2`.

LoRA adapters of the LLM (`models.lora`, trained with `lora:` in the training config) leave a training checkpoint
two ways: `export_peft` writes PEFT's format (adapter_config.json + adapter_model.safetensors, for
`PeftModel.from_pretrained` on the HF LLaMA), `export_merged` a model directory whose LLM has them merged in
(W + scale * B A; with the checkpoint's trained branch too), which every command here loads as any other.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from safetensors.numpy import save_file

from ..config import ConfigError, LoraConfig, from_dict
from ..errors import VllamaError
from ..models.groups import LLM_GROUP, LORA_GROUP, branch_groups
from ..models.lora import peft_adapter_config, peft_state_dict, with_merged_lora
from ..train.checkpoint import load_checkpoint_meta, load_trainable_params
from ..tree import flatten_params, unflatten_params
from .keymaps import audio_branch_keymap, video_branch_keymap
from .model_dir import check_output_dir, load_model_dir, model_dir_groups, save_model_dir

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


# ----------------------------------------------------------------------------------------------------------------
# LoRA adapters: PEFT's format, or merged into a model directory

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"


def checkpoint_lora(checkpoint: str | Path) -> tuple[LoraConfig, dict[str, Any], dict[str, np.ndarray]]:
    """(the LoRA config the run trained with, its adapters tree, every trained param flat) of a training checkpoint
    (the latest step of a checkpoints folder, or a step folder)."""
    meta = load_checkpoint_meta(checkpoint)
    try:
        lora = from_dict(LoraConfig, (meta.get("model_config") or {}).get("lora"), "lora.")
    except ConfigError as e:
        raise ExportError(f"{checkpoint}: bad LoRA config in the checkpoint's record ({e})") from None
    flat = load_trainable_params(checkpoint)
    adapters = unflatten_params({p: v for p, v in flat.items() if p.split("/", 1)[0] == LORA_GROUP})
    if not lora.enabled or LORA_GROUP not in adapters:
        raise ExportError(f"{checkpoint}: this training run has no LoRA adapters (train with lora.rank > 0)")
    return lora, adapters[LORA_GROUP], flat


@dataclass
class LoraExportReport:
    out_path: Path
    kind: str  # "peft" or "merged"
    lora: LoraConfig
    adapted: int  # adapted projections (all layers)

    def summary(self) -> str:
        what = ("PEFT adapter (adapter_config.json + adapter_model.safetensors; PeftModel.from_pretrained)"
                if self.kind == "peft" else "model directory with the LoRA adapters merged into the LLM")
        return (f"wrote {self.out_path}: {what}; rank {self.lora.rank}, alpha {self.lora.alpha:g}, "
                f"{self.adapted} adapted projections ({', '.join(self.lora.targets)})")


def export_peft(checkpoint: str | Path, out_dir: str | Path, *, base_model: str = "",
                force: bool = False) -> LoraExportReport:
    """A training checkpoint's LoRA adapters in PEFT's format: OUT/adapter_config.json and
    OUT/adapter_model.safetensors (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`, ...; float32,
    torch layout). `base_model`: the HF LLaMA it adapts, recorded as `base_model_name_or_path`."""
    lora, adapters, _ = checkpoint_lora(checkpoint)
    tensors = peft_state_dict(adapters)
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: is not a folder")
    existing = [n for n in (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE) if (out / n).exists()]
    if existing and not force:
        raise ExportError(f"{out}: already holds {', '.join(existing)} (pass --force to replace them)")
    out.mkdir(parents=True, exist_ok=True)
    # each file written under a temporary name and renamed when complete (as the .pth export)
    for name, write in ((PEFT_WEIGHTS_FILE, lambda f: save_file(tensors, f, metadata={"format": "pt"})),
                        (PEFT_CONFIG_FILE, lambda f: Path(f).write_text(
                            json.dumps(peft_adapter_config(lora, base_model), indent=2) + "\n"))):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=out)
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, out / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return LoraExportReport(out, "peft", lora, len(tensors) // 2)


def export_merged(model_dir: str | Path, checkpoint: str | Path, out_dir: str | Path, *,
                  force: bool = False) -> LoraExportReport:
    """A new model directory: `model_dir` with a training checkpoint's trained groups (its branch) in place of its
    own and the checkpoint's LoRA adapters merged into the LLM (W + scale * B A, rounded once to the stored dtype).
    Its config has no `lora` (the adapters are part of the weights now)."""
    out = Path(out_dir).expanduser().absolute()
    check_output_dir(out, force)
    lora, adapters, trained = checkpoint_lora(checkpoint)
    loaded = load_model_dir(model_dir)
    if LLM_GROUP not in loaded.params:
        raise ExportError(f"{model_dir}: has no LLM ({LLM_GROUP}) to merge the adapters into")
    params = {**loaded.params, **unflatten_params(trained)}
    try:
        merged = with_merged_lora(params, lora)
    except ValueError as e:  # int8 weights
        raise ExportError(f"{model_dir}: {e}") from None
    config = dataclasses.replace(loaded.config, lora=LoraConfig())
    extra = {"merged_lora": {"checkpoint": str(Path(checkpoint).absolute()), **dataclasses.asdict(lora)},
             "trained_groups": sorted(g for g in unflatten_params(trained) if g != LORA_GROUP)}
    save_model_dir(out, config, merged, loaded.tokenizer, manifest_extra=extra, force=force)
    return LoraExportReport(out, "merged", lora, len(flatten_params(adapters)) // 2)
