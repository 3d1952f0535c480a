"""`convert_weights.py`: the released PyTorch files -> one self-contained model directory (see `model_dir`).

    python convert_weights.py RELEASE_FOLDER --out models/vl-llama2-7b
    python convert_weights.py --eva-vit eva_vit_g.pth --blip2 blip2_pretrained_flant5xxl.pth \\
        --llama llama-2-7b-chat-hf --vl-ckpt VL_LLaMA_2_7B_Finetuned.pth --config vl_llama2_7b_chat --out DIR
    python convert_weights.py export --model DIR --out trained.pth        # back to an upstream checkpoint

What it does, in order:

1. Inputs (`detect`: `detect_inputs`, `open_input`). Files come from flags, or from one release folder: candidates
   are matched by file name (`eva_vit*`, `blip2*`, `imagebind*`, `VL_*`, `AL_*`, a LLaMA/Vicuna HF folder or a
   .gguf) AND verified by peeking at their keys; a file whose name and keys disagree is an error. Every input is
   checked to hold the kind of weights its flag says before anything is written.
2. Config (`infer_config`). Whatever the shapes decide is read from the files; the rest comes from `--config`,
   else the defaults (the released sizes); a `--config` value the files contradict is an error naming both.
   `--dtype` / `--dtype-<tower>` set the stored dtypes, and the ViT's and the LLaMA's compute dtype with them
   (`converted_precision`), so a bf16 conversion's config.yaml computes in bf16.
3. Streaming. Each file is read tensor by tensor (`load.load_groups(..., on_tensor=...)`; `--init-missing` groups
   come from the same call). A tensor is a view of the memory-mapped file (safetensors, `.pth` through torch's
   mmap), and a Linear weight's Flax layout a transposed view of it (`keymaps.VIEW_TRANSFORMS`): nothing is
   copied whole. The writer (`model_dir.write_params`) copies a large tensor one stored chunk (16 MiB) at a time,
   transposed and cast to the tower's dtype, and hands the chunks to TensorStore uncompressed, with at most a
   write buffer (64 MiB) in flight; pages of the inputs are returned to the OS as chunks are written
   (`_PageReleaser`), else reading a 13 GB shard would count 13 GB of file cache into the resident set.
4. Atomicity. The directory is assembled in a hidden sibling and renamed into place only when complete; any error
   or Ctrl-C deletes it. An existing output is replaced only with `--force` (and never a non-model folder).

Measured (`bench/convert.py`, 1.1B LLaMA, 4.4 GB fp32 safetensors, largest tensor 262 MB, 2 CPUs, 2026-12-05):
417 MB/s to float32 (0.88x a plain file-to-file copy of the shards in the same run), peak RSS 0.41 GB, of which
0.20 GB above the imported libraries (0.62x the largest tensor + write buffer); the code before, whole-tensor
copies and zstd: 236 MB/s and 0.85 GB. 4.5 GB without the page release. See the bench's docstring for the table.

Layout written: see `model_dir` (config.yaml, params/ = one Orbax checkpoint, tokenizer/, manifest.json).
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import ml_dtypes
import numpy as np
from tqdm import tqdm

from ..config import ModelConfig, PrecisionConfig
from ..models import abstract_for_groups, model_groups
from ..models.groups import BY_NAME, FILE_KINDS, LLM_GROUP, TOWERS, branch_groups, groups_of_file
from ..models.quant import MANIFEST_KEY as QUANT_MANIFEST_KEY
from ..models.quant import quantize_flat, quantized_specs, scale_name
from ..text import TokenizerError, load_tokenizer
from ..tree import flatten_params
from .arrays import contiguous
from .detect import FLAGS, LABELS, ORDER, ConvertError, detect_inputs, llama_weights_path, open_input
from .infer_config import infer_config, load_base_config
from .load import Source, load_groups
from .model_dir import (
    LeafSpec,
    PARAMS_DIR,
    build_manifest,
    check_output_dir,
    staged_dir,
    write_model_files,
    write_params,
)
from .readers import TensorSource

DTYPES = ("float32", "bfloat16", "float16")
# Output dtypes of the LLM only: "int8" writes its projections and token table as int8 + per-channel scales
# (`models.quant`); the towers keep the config's precision.
LLM_ONLY_DTYPES = ("int8",)


# ------------------------------------------------------------------------------------------------------------
# memory: hand pages of memory-mapped inputs back to the OS


class _PageReleaser:
    """Drop this process's resident pages of the memory-mapped input files (madvise MADV_DONTNEED on their
    mappings in /proc/self/maps). The readers mmap whole files (torch mmap=True, safetensors, GGUF); every page
    touched would otherwise stay in the resident set until the file is closed. The mappings are read-only in
    practice (never written), so dropping pages is content-preserving: a later access faults them back in from
    the page cache. Linux only; elsewhere a no-op."""

    MADV_DONTNEED = 4
    RELEASE_EVERY = 32 << 20

    def __init__(self, paths: Iterable[Path]):
        self.prefixes = tuple(str(Path(p).resolve()) for p in paths)
        self._madvise = None
        self._written = 0
        if sys.platform.startswith("linux") and os.path.exists("/proc/self/maps") and self.prefixes:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
                self._madvise = libc.madvise
            except (OSError, AttributeError):
                self._madvise = None

    def after_write(self, path: str, nbytes: int) -> None:
        """`write_params`' `on_written`: the readers hand over views of the mapped files, whose pages the writer
        touches chunk by chunk, so they are released every `RELEASE_EVERY` bytes written."""
        self._written += nbytes
        if self._written >= self.RELEASE_EVERY:
            self._written = 0
            self.release()

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
    """This process's resident-set high-water mark. On Linux from /proc (VmHWM): `ru_maxrss` survives exec, so a
    process started from a large parent (a test runner, a notebook) would report the parent's size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
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


def converted_precision(config: ModelConfig, dtype: str | None, per_tower: Mapping[str, str | None]
                        ) -> PrecisionConfig:
    """The precision the converted config.yaml records: the stored dtypes of `tower_dtypes`, and the ViT and the
    LLaMA computing in the dtype asked for them (`--dtype bfloat16`: both in bf16, as the released presets run the
    LLaMA; a float32 compute over bf16 weights would double every matmul's memory traffic). Without a choice for a
    tower its compute dtype is the config's (the preset's with `--config`)."""
    stored = tower_dtypes(config, dtype, per_tower)
    p = config.precision

    def compute(tower: str, current: str) -> str:
        return per_tower.get(tower) or dtype or current

    return dataclasses.replace(p, vit=compute("vit", p.vit), llama=compute("llama", p.llama),
                               vit_params=stored["vit"], llama_params=stored["llama"],
                               trainable_params=stored["trainable"])


def _load_tokenizer(tokenizer: str | Path | None, llama_path: Path | None, no_tokenizer: bool) -> Any:
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
    start_rss = _rss_bytes()  # includes the libraries (jax, orbax, tensorstore: imported with this module)
    llama_path = llama_weights_path(paths["llama"]) if "llama" in paths else None
    base, label = load_base_config(config)
    cfg = infer_config(sources, llama_path=llama_path, config=base, config_label=label, overrides=overrides,
                       name=out.name, notes=notes)
    # int8 is a transform of the LLM leaves as they stream to disk, not a tower dtype: take it out first.
    quantize = next((d for d in (dtype, (dtypes or {}).get("llama")) if d in LLM_ONLY_DTYPES), None)
    dtypes = {t: d for t, d in (dtypes or {}).items() if d not in LLM_ONLY_DTYPES}
    dtype = None if dtype in LLM_ONLY_DTYPES else dtype
    chosen = tower_dtypes(cfg, dtype, dtypes)
    cfg = dataclasses.replace(cfg, precision=converted_precision(cfg, dtype, dtypes)).validate()
    tok = _load_tokenizer(tokenizer, llama_path, no_tokenizer)
    if tok is not None and tok.base_vocab_size > cfg.llama.vocab_size:
        raise ConvertError(f"tokenizer has {tok.base_vocab_size} tokens but the LLM's embedding table only "
                           f"{cfg.llama.vocab_size} rows; wrong tokenizer?")

    for kind in ("imagebind", "al_ckpt"):
        if kind in sources and not cfg.equip_audio_branch:
            raise ConvertError(f"{sources[kind].path}: {LABELS[kind]} needs equip_audio_branch: true")
    all_groups = model_groups(cfg)
    kind_of_group = {g: k for k in sources for g in groups_of_file(k)}
    to_init: list[str] = []
    if init_missing:
        for b in ("video", "audio"):
            to_init += [g for g in branch_groups(b, towers=False) if g in all_groups and g not in kind_of_group]
    wanted = [g for g in all_groups if g in kind_of_group or g in to_init]
    abstract, _ = abstract_for_groups(cfg, wanted)
    shapes = {p: tuple(v.shape) for p, v in flatten_params(abstract).items()}
    specs: dict[str, LeafSpec] = {}
    for path, shape in shapes.items():
        g = path.split("/", 1)[0]
        if g in kind_of_group:
            specs[path] = LeafSpec(shape, _np_dtype(chosen[BY_NAME[g].tower]))
        elif g in to_init:
            specs[path] = LeafSpec(shape, _np_dtype(chosen["trainable"]))
    if not specs:
        raise ConvertError("nothing to write: the given files fill no parameter of this model")
    if quantize:
        specs = {p: LeafSpec(tuple(a.shape), np.dtype(a.dtype))
                 for p, a in quantized_specs({p: jax.ShapeDtypeStruct(s.shape, s.dtype) for p, s in specs.items()},
                                             quantize).items()}

    releaser = _PageReleaser([Path(s.path) for s in sources.values()] if release_pages else [])
    for src in sources.values():
        _release_after_get(src, releaser)
    largest = [0]
    bar = _progress(sum(s.nbytes for s in specs.values()), progress)

    def producer(write: Callable[[str, np.ndarray], None]) -> None:
        def on_tensor(path: str, array: np.ndarray) -> None:
            largest[0] = max(largest[0], array.nbytes)
            if quantize and scale_name(path) is not None:  # quantized by rows: a transposed view made whole first
                for p, a in quantize_flat({path: contiguous(array)}, quantize).items():
                    write(p, a)
            else:
                write(path, array)
            bar.update(array.nbytes)

        # no dtype while reading: `write` casts only when needed (a cast while reading always copies)
        load_groups(cfg, [Source(k, sources[k]) for k in ORDER if k in sources], wanted, seed=seed,
                    required=list(kind_of_group), shapes=shapes, on_tensor=on_tensor,
                    on_source=lambda name, _: bar.set_description(name))

    try:
        with staged_dir(out, force) as tmp:
            kw = {} if write_buffer_bytes is None else {"write_buffer_bytes": write_buffer_bytes}
            write_params(tmp / PARAMS_DIR, specs, producer, on_written=releaser.after_write, **kw)
            bar.close()
            components: dict[str, dict[str, Any]] = {
                k: {"source": str(Path(sources[k].path).absolute()), "groups": list(groups_of_file(k))}
                for k in ORDER if k in sources}
            if to_init:
                components["init"] = {"source": f"random init (seed {seed})", "groups": to_init}
            manifest = build_manifest(specs, components, tok, {
                "converted_from": {k: str(Path(p).absolute()) for k, p in paths.items()},
                "notes": notes, **({QUANT_MANIFEST_KEY: {LLM_GROUP: quantize}} if quantize else {})})
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
    # tqdm disables itself when stderr is not a terminal (disable=None)
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=None, leave=False)
