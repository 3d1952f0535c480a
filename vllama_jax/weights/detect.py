"""Conversion inputs: which upstream file is which (`detect_inputs` for a release folder, `open_input` for a file
given by flag). A file is recognised by its name AND its keys (`identify`); a file whose name and keys disagree is
an error, and every input is checked to hold the kind of weights its flag says before anything is written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import VllamaError
from ..models.groups import FILE_KINDS
from .readers import GGUFSource, TensorSource, WeightsError, open_weights

FLAGS = {"eva_vit": "--eva-vit", "blip2": "--blip2", "imagebind": "--imagebind", "llama": "--llama",
         "vl_ckpt": "--vl-ckpt", "al_ckpt": "--al-ckpt"}
LABELS = {"eva_vit": "an EVA ViT state dict (eva_vit_g.pth)",
          "blip2": "a BLIP-2 checkpoint (blip2_pretrained_flant5xxl.pth)",
          "imagebind": "an ImageBind checkpoint (imagebind_huge.pth)",
          "llama": "a LLaMA-family LLM (HF folder or .gguf)",
          "vl_ckpt": "a Video-LLaMA vision-branch (VL) checkpoint",
          "al_ckpt": "a Video-LLaMA audio-branch (AL) checkpoint"}
# conversion order: small files first, so a wrong small file fails before the LLM is streamed
ORDER = ("blip2", "vl_ckpt", "al_ckpt", "eva_vit", "imagebind", "llama")


class ConvertError(VllamaError):
    """A conversion that cannot proceed; the message is one line saying what and why."""


def identify(source: TensorSource) -> set[str]:
    """The file kinds whose signature keys `source` holds (a union checkpoint is both VL and AL)."""
    keys = source.keys()
    kinds: set[str] = set()
    if isinstance(source, GGUFSource) or "model.embed_tokens.weight" in keys:
        kinds.add("llama")
    if "patch_embed.proj.weight" in keys and any(k.startswith("blocks.") for k in keys):
        kinds.add("eva_vit")
    if "query_tokens" in keys and any(k.startswith("Qformer.bert.encoder.") for k in keys):
        kinds.add("blip2")
    if any(k.startswith("modality_trunks.audio.") for k in keys):
        kinds.add("imagebind")
    if any(k.startswith("video_Qformer.") for k in keys):
        kinds.add("vl_ckpt")
    if any(k.startswith("audio_Qformer.") for k in keys):
        kinds.add("al_ckpt")
    return kinds


def _describe(kinds: set[str]) -> str:
    if not kinds:
        return "it holds none of the weights this converter knows"
    return "it looks like " + " and ".join(LABELS[k] for k in sorted(kinds))


def llama_weights_path(path: Path) -> Path:
    """The thing `open_weights` should open for an LLM given as folder, index file, single file or GGUF."""
    if path.is_file() and path.name.endswith(".index.json"):
        return path.parent
    return path


def open_input(kind: str, path: str | Path, cache: dict[Path, TensorSource] | None = None) -> TensorSource:
    """Open `path` as file kind `kind` and check that it holds that kind of weights."""
    path = Path(path).expanduser()
    if kind == "llama":
        path = llama_weights_path(path)
    if not path.exists():
        raise ConvertError(f"{path}: not found (given as {FLAGS[kind]})")
    key = path.resolve()
    src = cache.get(key) if cache is not None else None
    if src is None:
        src = open_weights(path)
        if cache is not None:
            cache[key] = src
    kinds = identify(src)
    if kind not in kinds:
        raise ConvertError(f"{path}: given as {FLAGS[kind]} ({LABELS[kind]}), but {_describe(kinds)}")
    return src


_NAME_PATTERNS = {
    "eva_vit": r"eva.?vit|eva.?clip",
    "blip2": r"blip.?2",
    "imagebind": r"imagebind",
    "vl_ckpt": r"(^|[^a-z])vl([^a-z]|$)|vision.?branch|finetune.vicuna\d*b.v\d",
    "al_ckpt": r"(^|[^a-z])al([^a-z]|$)|audio.?branch",
}
_LLM_NAME = r"llama|vicuna|mistral|smollm"
_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".gguf")


def _is_hf_llm_folder(folder: Path) -> bool:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return False
    try:
        d = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and d.get("model_type") in ("llama", "mistral")


def detect_inputs(folder: str | Path, cache: dict[Path, TensorSource] | None = None) -> tuple[dict[str, Path], list[str]]:
    """Find the release files in one folder: {kind: path} and notes on what was ignored.

    A candidate needs a matching name or matching keys; a name that promises a kind the keys do not hold is an
    error. Per kind, name-matched candidates win over key-only ones (so a union `videollama_ckpt.pth` next to
    `vl_ckpt.pth`/`al_ckpt.pth` is not ambiguous); two equally good candidates are an error.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ConvertError(f"{folder}: not a folder (the positional argument is a release folder)")
    named: dict[str, list[Path]] = {k: [] for k in FILE_KINDS}
    keyed: dict[str, list[Path]] = {k: [] for k in FILE_KINDS}
    notes: list[str] = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        low = entry.name.lower()
        if entry.is_dir():
            if _is_hf_llm_folder(entry):
                (named if re.search(_LLM_NAME, low) else keyed)["llama"].append(entry)
            continue
        if not low.endswith(_WEIGHT_SUFFIXES):
            continue
        if low.endswith(".gguf"):
            (named if re.search(_LLM_NAME, low) else keyed)["llama"].append(entry)
            continue
        by_name = {k for k, pat in _NAME_PATTERNS.items() if re.search(pat, low)}
        try:
            src = open_weights(entry)
        except WeightsError as e:
            if by_name:
                raise ConvertError(str(e)) from None
            notes.append(f"ignored {entry.name} ({e.reason})")
            continue
        if cache is not None:
            cache[entry.resolve()] = src
        by_keys = identify(src) - {"llama"}
        if by_name and not (by_name & by_keys):
            raise ConvertError(f"{entry}: the name suggests {' or '.join(LABELS[k] for k in sorted(by_name))}, "
                               f"but {_describe(by_keys)}")
        if not by_keys:
            notes.append(f"ignored {entry.name} ({_describe(by_keys)})")
        for k in by_keys:
            (named if k in by_name else keyed)[k].append(entry)
    found: dict[str, Path] = {}
    for kind in FILE_KINDS:
        cands = named[kind] or keyed[kind]
        if len(cands) > 1:
            raise ConvertError(f"{folder}: several files look like {LABELS[kind]}: "
                               f"{', '.join(c.name for c in cands)}; pass the one to use with {FLAGS[kind]}")
        if cands:
            found[kind] = cands[0]
    if not found:
        raise ConvertError(f"{folder}: no Video-LLaMA release files found (expected e.g. eva_vit_g.pth, "
                           "blip2_pretrained_flant5xxl.pth, imagebind_huge.pth, VL_*.pth, AL_*.pth, a LLaMA folder)")
    return found, notes


