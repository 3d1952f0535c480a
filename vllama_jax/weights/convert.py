"""`convert_weights.py`: the released PyTorch files -> one self-contained model directory (see `model_dir`).

    python convert_weights.py RELEASE_FOLDER --out models/vl-llama2-7b
    python convert_weights.py --eva-vit eva_vit_g.pth --blip2 blip2_pretrained_flant5xxl.pth \\
        --llama llama-2-7b-chat-hf --vl-ckpt VL_LLaMA_2_7B_Finetuned.pth --config vl_llama2_7b_chat --out DIR
    python convert_weights.py export --model DIR --out trained.pth        # back to an upstream checkpoint

What it does, in order:

1. Inputs. Files come from flags, or from one release folder (`detect_inputs`): candidates are matched by file
   name (`eva_vit*`, `blip2*`, `imagebind*`, `VL_*`, `AL_*`, a LLaMA/Vicuna HF folder or a .gguf) AND verified by
   peeking at their keys; a file whose name and keys disagree is an error. Every input is checked to hold the
   kind of weights its flag says before anything is written.
2. Config (`infer_config`). Whatever the shapes decide is read from the files (LLaMA sizes from config.json or the
   GGUF metadata; ViT width/patch/image size/MLP/depth; Q-Former sizes, cross-attention layout, query tokens,
   `max_frame_pos`, audio positions; ImageBind tower sizes; whether the audio branch exists). The rest (head counts
   of the towers, eps values, precision, template) comes from `--config`, else the defaults (the released sizes).
   A value of `--config` that contradicts the files is an error naming both; `--set key=value` is applied last and
   silences such a check for its key.
3. Streaming. Each file is read tensor by tensor (`load_file(..., on_tensor=...)`), converted to the Flax layout
   and the tower's dtype and handed to TensorStore, with at most a write buffer (64 MiB) in flight: resident
   memory stays near the largest tensor plus that buffer, not the model size. Pages of the memory-mapped inputs are
   returned to the OS as the conversion goes (`_PageReleaser`), else reading a 13 GB shard would count 13 GB of
   file cache into the resident set.
4. Atomicity. The directory is assembled in a hidden sibling and renamed into place only when complete; any error
   or Ctrl-C deletes it. An existing output is replaced only with `--force` (and never a non-model folder).

Measured (`bench/convert.py`, 1.1B LLaMA, 4.4 GB fp32 safetensors, largest tensor 262 MB, 2 CPUs): peak RSS
1.17 GB, of which 0.98 GB above the imported libraries (3.7x the largest tensor, 0.27x the checkpoint); 5.4 GB
without the page release. See the bench's docstring for the table.

Layout written: see `model_dir` (config.yaml, params/ = one Orbax checkpoint, tokenizer/, manifest.json).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ..config import ConfigError, ModelConfig, apply_overrides, from_dict, load_model_config
from ..errors import VllamaError
from ..models import abstract_for_groups, init_params, model_groups
from ..models.groups import BY_NAME, FILE_KINDS, TOWERS, branch_groups, groups_of_file
from ..tree import flatten_params
from .load import load_file
from .model_dir import (
    LeafSpec,
    PARAMS_DIR,
    build_manifest,
    check_output_dir,
    staged_dir,
    write_model_files,
    write_params,
)
from .readers import TensorSource, WeightsError, open_weights

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DTYPES = ("float32", "bfloat16", "float16")

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


# ------------------------------------------------------------------------------------------------------------
# inputs


def _short(path: str | Path) -> str:
    """`parent/name`: enough to recognise a file in a message without the whole path."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


def identify(source: TensorSource) -> set[str]:
    """The file kinds whose signature keys `source` holds (a union checkpoint is both VL and AL)."""
    keys = source.keys()
    kinds: set[str] = set()
    if type(source).__name__ == "GGUFSource" or "model.embed_tokens.weight" in keys:
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


def _llama_weights_path(path: Path) -> Path:
    """The thing `open_weights` should open for an LLM given as folder, index file, single file or GGUF."""
    if path.is_file() and path.name.endswith(".index.json"):
        return path.parent
    return path


def open_input(kind: str, path: str | Path, cache: dict[Path, TensorSource] | None = None) -> TensorSource:
    """Open `path` as file kind `kind` and check that it holds that kind of weights."""
    path = Path(path).expanduser()
    if kind == "llama":
        path = _llama_weights_path(path)
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


# ------------------------------------------------------------------------------------------------------------
# config inference


class _Evidence:
    """Values read from the files, each with where it was read; two files disagreeing is an error."""

    def __init__(self) -> None:
        self.values: dict[str, tuple[Any, str]] = {}

    def add(self, key: str, value: Any, where: str) -> None:
        if key in self.values and not _same(self.values[key][0], value):
            old, old_where = self.values[key]
            raise ConvertError(f"{key}: {old_where} says {old}, {where} says {value}")
        self.values.setdefault(key, (value, where))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    return a == b


def _get(d: Mapping[str, Any], key: str) -> Any:
    for part in key.split("."):
        d = d[part]
    return d


def _put(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for part in parts[:-1]:
        d = d[part]
    d[parts[-1]] = value


def _shape(src: TensorSource, key: str) -> tuple[int, ...]:
    if key not in src.keys():
        raise ConvertError(f"{src.path}: no tensor {key!r}; is it the right file?")
    return tuple(int(d) for d in src.shape(key))


def _layer_indices(keys: Iterable[str], prefix: str) -> list[int]:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in keys for m in [pat.match(k)] if m})


def _infer_qformer(src: TensorSource, upstream: str, section: str, ev: _Evidence, base_freq: int) -> None:
    where = f"{_short(src.path)} ({upstream})"
    keys = src.keys()
    p = f"{upstream}.bert.encoder.layer."
    layers = _layer_indices(keys, p)
    if not layers:
        raise ConvertError(f"{src.path}: no {upstream} layers found")
    n = layers[-1] + 1
    ev.add(f"{section}.num_layers", n, where)
    ev.add(f"{section}.hidden_size", _shape(src, f"{upstream}.bert.embeddings.LayerNorm.weight")[0], where)
    ev.add(f"{section}.intermediate_size", _shape(src, f"{p}0.intermediate_query.dense.weight")[0], where)
    cross = [i for i in layers if f"{p}{i}.crossattention.self.key.weight" in keys]
    if not cross or cross[0] != 0:
        raise ConvertError(f"{src.path}: {upstream} layer 0 has no cross-attention (unsupported layout)")
    ev.add(f"{section}.encoder_width", _shape(src, f"{p}0.crossattention.self.key.weight")[1], where)
    # cross-attention in layers i % f == 0; with only layer 0, every f >= n describes it (keep the config's)
    freq = (cross[1] - cross[0]) if len(cross) > 1 else (base_freq if base_freq >= n else n)
    if cross != list(range(0, n, freq)):
        raise ConvertError(f"{src.path}: {upstream} cross-attention layers {cross} are not every {freq}th layer")
    ev.add(f"{section}.cross_attention_freq", freq, where)


def _infer_from_file(kind: str, src: TensorSource, llama_path: Path | None, ev: _Evidence,
                     base: ModelConfig) -> dict[str, Any]:
    """Record in `ev` what `src` decides; returns extra facts (EVA block count)."""
    where = _short(src.path)
    facts: dict[str, Any] = {}
    if kind == "eva_vit":
        d, _, ph, pw = _shape(src, "patch_embed.proj.weight")
        ev.add("vit.width", d, where)
        ev.add("vit.patch_size", ph, where)
        npos = _shape(src, "pos_embed")[1] - 1
        grid = math.isqrt(npos)
        if grid * grid != npos or ph != pw:
            raise ConvertError(f"{src.path}: pos_embed has {npos} patch positions, not a square grid")
        ev.add("vit.image_size", grid * ph, where)
        ev.add("vit.mlp_dim", _shape(src, "blocks.0.mlp.fc1.weight")[0], where)
        facts["eva_blocks"] = len(_layer_indices(src.keys(), "blocks."))
    elif kind == "blip2":
        _infer_qformer(src, "Qformer", "qformer", ev, base.qformer.cross_attention_freq)
        tok = _shape(src, "query_tokens")
        ev.add("qformer.num_query_tokens", tok[1], where)
        ev.add("qformer.hidden_size", tok[2], where)
        ev.add("vit.width", _shape(src, "ln_vision.weight")[0], f"{where} (ln_vision)")
    elif kind == "vl_ckpt":
        _infer_qformer(src, "video_Qformer", "video_qformer", ev, base.video_qformer.cross_attention_freq)
        ev.add("video_qformer.num_query_tokens", _shape(src, "video_query_tokens")[1], where)
        ev.add("max_frame_pos", _shape(src, "video_frame_position_embedding.weight")[0], where)
        ev.add("llama.hidden_size", _shape(src, "llama_proj.weight")[0], f"{where} (llama_proj)")
    elif kind == "al_ckpt":
        _infer_qformer(src, "audio_Qformer", "audio_qformer", ev, base.audio_qformer.cross_attention_freq)
        ev.add("audio_qformer.num_query_tokens", _shape(src, "audio_query_tokens")[1], where)
        pos = _shape(src, "audio_position_embedding.weight")
        ev.add("num_audio_positions", pos[0], where)
        ev.add("imagebind_audio.out_dim", pos[1], f"{where} (audio_position_embedding)")
        ev.add("llama.hidden_size", _shape(src, "audio_llama_proj.weight")[0], f"{where} (audio_llama_proj)")
        ev.add("equip_audio_branch", True, where)
    elif kind == "imagebind":
        from .imagebind_keys import imagebind_configs_from_weights

        # head counts are not in the shapes: pass 1 (always valid) and take only the shape-given fields
        try:
            audio, vision = imagebind_configs_from_weights(src, 1, 1, audio=base.imagebind_audio,
                                                           vision=base.imagebind_vision)
        except ConfigError as e:
            raise ConvertError(f"{src.path}: impossible ImageBind shapes ({e})") from None
        for f in ("width", "kernel_size", "depth", "mlp_dim", "out_dim"):
            ev.add(f"imagebind_audio.{f}", getattr(audio, f), where)
        if vision is not None:
            for f in ("width", "kernel_time", "patch_size", "image_size", "depth", "mlp_dim", "out_dim"):
                ev.add(f"imagebind_vision.{f}", getattr(vision, f), where)
        ev.add("equip_audio_branch", True, where)
    elif kind == "llama":
        from .llama_keys import llama_config_from_gguf, llama_config_from_hf

        if type(src).__name__ == "GGUFSource":
            lc, where = llama_config_from_gguf(src), _short(src.path)
        else:
            folder = llama_path if llama_path is not None and llama_path.is_dir() else Path(src.path).parent
            lc, where = llama_config_from_hf(folder), _short(Path(folder) / "config.json")
        for f in dataclasses.fields(lc):
            v = lc.head_dim_resolved if f.name == "head_dim" else getattr(lc, f.name)
            ev.add(f"llama.{f.name}", v, where)
    return facts


# (heads key, width key): head counts are invisible in the shapes; without --config they are the released
# models' and only valid for the released widths
_HEADS = (("vit.num_heads", "vit.width"), ("qformer.num_heads", "qformer.hidden_size"),
          ("video_qformer.num_heads", "video_qformer.hidden_size"),
          ("audio_qformer.num_heads", "audio_qformer.hidden_size"),
          ("imagebind_audio.num_heads", "imagebind_audio.width"),
          ("imagebind_vision.num_heads", "imagebind_vision.width"))


def _infer_template(llama_path: Path | None, source: TensorSource | None, others: Iterable[Path]) -> str | None:
    names = " ".join(p.name.lower() for p in ([llama_path] if llama_path else []) + list(others))
    if source is not None and type(source).__name__ == "GGUFSource":
        tpl = source.field("tokenizer.chat_template")
        if isinstance(tpl, str) and tpl:
            return "llama_2" if "[INST]" in tpl else "chatml"
    if re.search(r"llama.?2", names):
        return "llama_2"
    if "vicuna" in names:
        return "vicuna"
    if llama_path is not None and llama_path.is_dir():
        try:
            tpl = json.loads((llama_path / "tokenizer_config.json").read_text()).get("chat_template")
        except (OSError, ValueError, AttributeError):
            tpl = None
        if isinstance(tpl, str) and tpl:
            return "llama_2" if "[INST]" in tpl else "chatml"
    return None


def resolve_config_arg(config: str | Path) -> Path:
    """A config file path, or a preset name from configs/ (with or without .yaml)."""
    p = Path(config).expanduser()
    if p.is_file():
        return p
    for cand in (REPO_CONFIGS / f"{config}", REPO_CONFIGS / f"{config}.yaml"):
        if cand.is_file():
            return cand
    presets = sorted(q.stem for q in REPO_CONFIGS.glob("*.yaml")) if REPO_CONFIGS.is_dir() else []
    raise ConvertError(f"{config}: no such config file or preset (presets: {', '.join(presets) or 'none'})")


def infer_config(
    sources: Mapping[str, TensorSource],
    *,
    llama_path: Path | None = None,
    config: ModelConfig | None = None,
    config_label: str = "--config",
    overrides: Sequence[str] = (),
    name: str = "converted",
    notes: list[str] | None = None,
) -> ModelConfig:
    """The model config: shape-decided values from `sources`, the rest from `config` (else defaults), then
    `overrides`. A `config` value contradicting the files raises ConvertError naming both (unless overridden)."""
    notes = notes if notes is not None else []
    given = config is not None
    base = config if given else ModelConfig()
    set_keys = {o.split("=", 1)[0].strip() for o in overrides}
    ev = _Evidence()
    facts: dict[str, Any] = {}
    for kind in ORDER:
        if kind in sources:
            facts.update(_infer_from_file(kind, sources[kind], llama_path, ev, base))

    data = dataclasses.asdict(base)
    for key, (value, where) in ev.values.items():
        current = base.llama.head_dim_resolved if key == "llama.head_dim" else _get(data, key)
        if given and key not in set_keys and not _same(current, value):
            raise ConvertError(f"{key}: {config_label} says {current}, {where} says {value} "
                               f"(fix the config or pass --set {key}=...)")
        _put(data, key, value)
    if "llama.head_dim" in ev.values:  # store 0 ("hidden / heads") when that is what it is
        lc = data["llama"]
        if lc["head_dim"] * lc["num_heads"] == lc["hidden_size"]:
            lc["head_dim"] = 0

    if "eva_blocks" in facts:
        blocks = facts["eva_blocks"]
        if given:
            if base.vit.depth > blocks and "vit.depth" not in set_keys:
                raise ConvertError(f"vit.depth: {config_label} says {base.vit.depth}, "
                                   f"{_short(sources['eva_vit'].path)} has only {blocks} blocks")
        else:
            # upstream builds EVA-g with depth 39 and drops the file's 40th block; other files: all blocks
            data["vit"]["depth"] = blocks - 1 if (blocks == 40 and data["vit"]["width"] == 1408) else blocks
            if data["vit"]["depth"] != blocks:
                notes.append(f"vit.depth {data['vit']['depth']}: the EVA-g file's last block is unused, as upstream")

    if not given:
        data["name"] = name
        data["equip_audio_branch"] = "imagebind" in sources or "al_ckpt" in sources
        defaults = dataclasses.asdict(ModelConfig())
        for heads_key, width_key in _HEADS:
            if width_key in ev.values and heads_key not in set_keys:
                width, where = ev.values[width_key]
                if width != _get(defaults, width_key):
                    raise ConvertError(
                        f"{heads_key}: not visible in the weights ({where} has {width_key.split('.')[-1]} {width}, "
                        f"not the released {_get(defaults, width_key)}); give --config with the model's sizes or "
                        f"--set {heads_key}=N")
        tpl = _infer_template(llama_path, sources.get("llama"),
                              [Path(s.path) for k, s in sources.items() if k in ("vl_ckpt", "al_ckpt")])
        if tpl is None:
            notes.append(f"template: could not tell from the file names, using {data['template']} "
                         "(--set template=vicuna|llama_2|chatml to change)")
        else:
            data["template"] = tpl
    try:
        cfg = from_dict(ModelConfig, data)
        cfg = apply_overrides(cfg, list(overrides))
        return cfg.validate()
    except ConfigError as e:
        raise ConvertError(f"config: {e}") from None


# ------------------------------------------------------------------------------------------------------------
# memory: hand pages of memory-mapped inputs back to the OS


class _PageReleaser:
    """Drop this process's resident pages of the memory-mapped input files (madvise MADV_DONTNEED on their
    mappings in /proc/self/maps). The readers mmap whole files (torch mmap=True, safetensors, GGUF); every page
    touched would otherwise stay in the resident set until the file is closed. The mappings are read-only in
    practice (never written), so dropping pages is content-preserving: a later access faults them back in from
    the page cache. Linux only; elsewhere a no-op."""

    MADV_DONTNEED = 4

    def __init__(self, paths: Iterable[Path]):
        self.prefixes = tuple(str(Path(p).resolve()) for p in paths)
        self._madvise = None
        if sys.platform.startswith("linux") and os.path.exists("/proc/self/maps") and self.prefixes:
            try:
                import ctypes

                libc = ctypes.CDLL(None, use_errno=True)
                libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
                self._madvise = libc.madvise
            except (OSError, AttributeError):
                self._madvise = None

    def release(self) -> None:
        if self._madvise is None:
            return
        try:
            with open("/proc/self/maps") as f:
                lines = f.readlines()
        except OSError:
            return
        for line in lines:
            parts = line.split(maxsplit=5)
            if len(parts) < 6 or not parts[5].strip().startswith(self.prefixes):
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            self._madvise(start, end - start, self.MADV_DONTNEED)


def _release_after_get(source: TensorSource, releaser: _PageReleaser) -> None:
    """Make `source.get` hand the file pages it touched back right away (the array it returns is a copy, or a
    view that faults its pages back in when used). Patched on the instance, not wrapped: the loaders dispatch on
    the source's type (GGUF)."""
    inner = source.get

    def get(key: str) -> np.ndarray:
        a = inner(key)
        releaser.release()
        return a

    source.get = get  # type: ignore[method-assign]


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# ------------------------------------------------------------------------------------------------------------
# conversion


@dataclass
class ComponentReport:
    name: str
    source: str
    groups: list[str]
    dtype: str
    params: int
    bytes: int


@dataclass
class ConvertReport:
    """What `convert` did; `summary()` is the table the CLI prints."""

    out_dir: Path
    config: ModelConfig
    components: list[ComponentReport]
    absent_groups: list[str]
    seconds: float
    peak_rss_bytes: int
    start_rss_bytes: int
    largest_tensor_bytes: int
    tokenizer: str | None
    notes: list[str] = field(default_factory=list)

    @property
    def total_params(self) -> int:
        return sum(c.params for c in self.components)

    @property
    def total_bytes(self) -> int:
        return sum(c.bytes for c in self.components)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out_dir"] = str(self.out_dir)
        d["config"] = self.config.name
        d["total_params"], d["total_bytes"] = self.total_params, self.total_bytes
        return d

    def summary(self) -> str:
        rows = [("component", "source", "dtype", "params", "size")]
        for c in self.components:
            rows.append((c.name, c.source, c.dtype, f"{c.params:,}", _fmt_bytes(c.bytes)))
        rows.append(("total", "", "", f"{self.total_params:,}", _fmt_bytes(self.total_bytes)))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = [f"wrote {self.out_dir} in {self.seconds:.1f} s: peak RSS {_fmt_bytes(self.peak_rss_bytes)} "
                 f"({_fmt_bytes(self.start_rss_bytes)} before converting; largest tensor "
                 f"{_fmt_bytes(self.largest_tensor_bytes)})"]
        for i, r in enumerate(rows):
            lines.append("  ".join(r[j].rjust(widths[j]) if j >= 3 else r[j].ljust(widths[j]) for j in range(5)))
            if i == 0 or i == len(rows) - 2:
                lines.append("  ".join("-" * w for w in widths))
        lines.append(f"config: {self.config.name} (template {self.config.template}, "
                     f"audio branch {'yes' if self.config.equip_audio_branch else 'no'})")
        lines.append(f"tokenizer: {self.tokenizer or 'none'}")
        if self.absent_groups:
            lines.append(f"not in the directory (no input given): {', '.join(self.absent_groups)}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _fmt_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _np_dtype(name: str) -> np.dtype:
    if name not in DTYPES:
        raise ConvertError(f"unknown dtype {name!r} (one of {', '.join(DTYPES)})")
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def tower_dtypes(config: ModelConfig, dtype: str | None, per_tower: Mapping[str, str | None]) -> dict[str, str]:
    """Stored dtype per tower: the config's parameter dtypes (vit_params, llama_params, trainable_params; float32
    for the Q-Former and ImageBind towers), replaced by `dtype` if given, then by the per-tower choices."""
    unknown = [t for t in per_tower if t not in TOWERS]
    if unknown:
        raise ConvertError(f"unknown tower {unknown[0]!r} for a dtype (one of {', '.join(TOWERS)})")
    p = config.precision
    out = {"vit": p.vit_params, "qformer": "float32", "imagebind": "float32", "llama": p.llama_params,
           "trainable": p.trainable_params}
    for t in TOWERS:
        if dtype is not None:
            out[t] = dtype
        if per_tower.get(t):
            out[t] = per_tower[t]  # type: ignore[assignment]
    for v in out.values():
        _np_dtype(v)
    return out


def _load_tokenizer(tokenizer: str | Path | None, llama_path: Path | None, no_tokenizer: bool) -> Any:
    from ..text import TokenizerError, load_tokenizer

    if no_tokenizer:
        return None
    if tokenizer is None and llama_path is None:
        return None
    where = Path(tokenizer).expanduser() if tokenizer is not None else llama_path
    assert where is not None
    if tokenizer is None and where.is_file() and where.suffix != ".gguf":
        where = where.parent  # a single weights file: its tokenizer lives beside it
    try:
        return load_tokenizer(where)
    except TokenizerError as e:
        hint = "" if tokenizer is not None else " (pass --tokenizer PATH, or --no-tokenizer for a model without one)"
        raise ConvertError(f"{e}{hint}") from None


def convert(
    out_dir: str | Path,
    *,
    folder: str | Path | None = None,
    files: Mapping[str, str | Path | None] | None = None,
    config: str | Path | ModelConfig | None = None,
    overrides: Sequence[str] = (),
    dtype: str | None = None,
    dtypes: Mapping[str, str | None] | None = None,
    tokenizer: str | Path | None = None,
    no_tokenizer: bool = False,
    init_missing: bool = False,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
    write_buffer_bytes: int | None = None,
    release_pages: bool = True,
) -> ConvertReport:
    """Convert upstream files into the model directory `out_dir` (see the module docstring).

    folder: a release folder to auto-detect files in; files: {file kind: path} (kinds of `load.FILE_KINDS`),
    overriding what the folder gave. config: a ModelConfig, a config file or a preset name. dtype/dtypes: stored
    dtype for all towers / per tower ("vit", "qformer", "imagebind", "llama", "trainable"). init_missing: absent
    trainable groups (video/audio branch) get upstream-style random init (`seed`).
    Raises ConvertError, WeightsError, ModelDirError or OSError; on any failure nothing is left at `out_dir`.
    """
    t0 = time.perf_counter()
    out = Path(out_dir).expanduser().absolute()
    check_output_dir(out, force)  # fail before any work
    notes: list[str] = []
    cache: dict[Path, TensorSource] = {}

    paths: dict[str, Path] = {}
    if folder is not None:
        found, found_notes = detect_inputs(folder, cache)
        paths.update(found)
        notes += found_notes
    for kind, p in (files or {}).items():
        if kind not in FILE_KINDS:
            raise ConvertError(f"unknown file kind {kind!r} (one of {', '.join(FILE_KINDS)})")
        if p is not None:
            paths[kind] = Path(p).expanduser()
    if not paths and not init_missing:
        raise ConvertError("nothing to convert: give a release folder or at least one of "
                           + ", ".join(FLAGS.values()))
    sources = {kind: open_input(kind, p, cache) for kind, p in paths.items()}
    import jax  # noqa: F401 - imported before measuring the start RSS, which then includes the libraries
    import orbax.checkpoint  # noqa: F401
    import tensorstore  # noqa: F401

    start_rss = _rss_bytes()
    llama_path = _llama_weights_path(paths["llama"]) if "llama" in paths else None

    base: ModelConfig | None
    label = "--config"
    if isinstance(config, ModelConfig):
        base = config
    elif config is not None:
        cpath = resolve_config_arg(config)
        label = f"--config {cpath.name}"
        try:
            base = load_model_config(cpath)
        except ConfigError as e:
            raise ConvertError(str(e)) from None
    else:
        base = None
    cfg = infer_config(sources, llama_path=llama_path, config=base, config_label=label, overrides=overrides,
                       name=out.name, notes=notes)
    chosen = tower_dtypes(cfg, dtype, dtypes or {})
    cfg = dataclasses.replace(cfg, precision=dataclasses.replace(
        cfg.precision, vit_params=chosen["vit"], llama_params=chosen["llama"],
        trainable_params=chosen["trainable"])).validate()
    tok = _load_tokenizer(tokenizer, llama_path, no_tokenizer)
    if tok is not None and tok.base_vocab_size > cfg.llama.vocab_size:
        raise ConvertError(f"tokenizer has {tok.base_vocab_size} tokens but the LLM's embedding table only "
                           f"{cfg.llama.vocab_size} rows; wrong tokenizer?")

    for kind in ("imagebind", "al_ckpt"):
        if kind in sources and not cfg.equip_audio_branch:
            raise ConvertError(f"{sources[kind].path}: {LABELS[kind]} needs equip_audio_branch: true")
    all_groups = model_groups(cfg)
    kind_of_group = {g: k for k in sources for g in groups_of_file(k)}
    init_groups: list[str] = []
    if init_missing:
        for b in ("video", "audio"):
            init_groups += [g for g in branch_groups(b, towers=False) if g in all_groups and g not in kind_of_group]
    abstract, _ = abstract_for_groups(cfg, [g for g in all_groups if g in kind_of_group or g in init_groups])
    shapes = {p: tuple(v.shape) for p, v in flatten_params(abstract).items()}
    specs: dict[str, LeafSpec] = {}
    for path, shape in shapes.items():
        g = path.split("/", 1)[0]
        if g in kind_of_group:
            specs[path] = LeafSpec(shape, _np_dtype(chosen[BY_NAME[g].tower]))
        elif g in init_groups:
            specs[path] = LeafSpec(shape, _np_dtype(chosen["trainable"]))
    if not specs:
        raise ConvertError("nothing to write: the given files fill no parameter of this model")

    releaser = _PageReleaser([Path(s.path) for s in sources.values()] if release_pages else [])
    for src in sources.values():
        _release_after_get(src, releaser)
    largest = [0]
    bar = _progress(sum(s.nbytes for s in specs.values()), progress)

    def producer(write: Callable[[str, np.ndarray], None]) -> None:
        def on_tensor(path: str, array: np.ndarray) -> None:
            largest[0] = max(largest[0], array.nbytes)
            write(path, array)
            bar.update(array.nbytes)

        for kind in ORDER:
            if kind in sources:
                bar.set_description(kind)
                # no dtype here: `write` casts only when needed (load_component's cast always copies)
                load_file(kind, sources[kind], cfg, shapes, on_tensor=on_tensor)
        if init_groups:
            bar.set_description("init")
            for path, array in _init_groups(cfg, init_groups, seed).items():
                on_tensor(path, array)

    try:
        with staged_dir(out, force) as tmp:
            kw = {} if write_buffer_bytes is None else {"write_buffer_bytes": write_buffer_bytes}
            write_params(tmp / PARAMS_DIR, specs, producer, **kw)
            bar.close()
            components: dict[str, dict[str, Any]] = {
                k: {"source": str(Path(sources[k].path).absolute()), "groups": list(groups_of_file(k))}
                for k in ORDER if k in sources}
            if init_groups:
                components["init"] = {"source": f"random init (seed {seed})", "groups": init_groups}
            manifest = build_manifest(specs, components, tok, {
                "converted_from": {k: str(Path(p).absolute()) for k, p in paths.items()},
                "notes": notes})
            write_model_files(tmp, cfg, tok, manifest)
    finally:
        bar.close()
    comps = [ComponentReport(name, c["source"], c["groups"], c["dtype"], c["params"], c["bytes"])
             for name, c in manifest["components"].items()]
    return ConvertReport(
        out_dir=out, config=cfg, components=comps,
        absent_groups=[g for g in all_groups if g not in manifest["groups"]],
        seconds=time.perf_counter() - t0, peak_rss_bytes=_peak_rss_bytes(), start_rss_bytes=start_rss,
        largest_tensor_bytes=largest[0],
        tokenizer=None if tok is None else f"{tok.family} from {tok.source} ({tok.base_vocab_size} tokens)",
        notes=notes)


def _init_groups(config: ModelConfig, groups: Sequence[str], seed: int) -> dict[str, np.ndarray]:
    """Upstream-style random init of some top-level groups (the same values `init_params(config, seed)` gives);
    jit's dead-code elimination skips the initialisers of every other group, so the LLM is never materialised."""
    import jax

    sub = jax.jit(lambda: {g: init_params(config, seed)[g] for g in groups})()
    return {p: np.asarray(v) for p, v in flatten_params(sub).items()}


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_description(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    # tqdm disables itself when stderr is not a terminal (disable=None)
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=None, leave=False)
