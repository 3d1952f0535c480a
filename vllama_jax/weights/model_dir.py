"""THE model-directory format: one self-contained folder per model, loaded straight into a sharded layout.

```
<dir>/config.yaml      ModelConfig (`config_to_yaml`); `load_model_config` reads it back
<dir>/params/          ONE Orbax checkpoint (PyTreeCheckpointHandler, OCDBT + zarr2, zstd) of the nested params
                       dict: one array per parameter, named by its params path ("llama.layers_0.mlp.up_proj.kernel"),
                       top-level keys = parameter groups ("visual_encoder", "llama", "video_qformer", ...). A tower
                       that was not converted is simply absent. Plain `ocp.PyTreeCheckpointer().restore(dir/"params")`
                       reads it too.
<dir>/tokenizer/       `Tokenizer.save(...)` (absent for a model without an LLM tokenizer)
<dir>/manifest.json    format + version, per-group and per-component sources / dtypes / parameter counts / bytes,
                       creation time, free-form extras
```

Writing streams: `write_params` takes a *producer* that pushes one array at a time; each is handed to TensorStore
as soon as it arrives and dropped once written, with at most `write_buffer_bytes` in flight. Orbax still writes the
tree metadata, so the result is an ordinary Orbax checkpoint (a custom Orbax `TypeHandler` receives the tree of
placeholders and runs the producer). Every directory is assembled in a hidden temporary sibling and renamed into
place only when complete, so an interrupted or failed write never leaves a half-written model directory.

Reading (`load_model_dir`) restores each leaf with `ArrayRestoreArgs(sharding=...)` built from `abstract_params` +
`tree_shardings`, so every device reads only its own shard; a subset of the groups can be restored. The restore
reads at most `restore_buffer_bytes` (default `RESTORE_BUFFER_BYTES`) at a time: Orbax's default (96 GB) lets it
start every read at once, so each array's read buffer and its device copy were alive together and a 15.7 GB model
peaked above 21.7 GB; bounded, the peak is the parameters plus about twice the buffer.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import itertools
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from .. import __version__
from ..config import ConfigError, ModelConfig, config_to_yaml, load_model_config
from ..errors import VllamaError
from ..models import abstract_for_groups, model_groups
from ..models.quant import weight_of, axes_with_scales, check_mode, quantize_flat, quantized_specs, scale_name
from ..runtime import return_freed_buffers_to_os
from ..sharding import put, tree_shardings
from ..text import TokenizerError, load_tokenizer
from ..tree import flatten_params, unflatten_params
from .arrays import cast

FORMAT = "vllama-jax-model-dir"
FORMAT_VERSION = 1
CONFIG_FILE = "config.yaml"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
MANIFEST_FILE = "manifest.json"

# Chunks of at most this many bytes: a sharded restore reads only the chunks overlapping each device's shard, and
# TensorStore compresses chunks in parallel.
CHUNK_BYTES = 16 << 20
# Bytes handed to TensorStore and not yet committed: the producer blocks while more is in flight, so small tensors
# overlap with reading the next ones and a larger tensor is written before the next is read (bench/convert.py:
# 64 MiB was both faster and leaner than 256 MiB on 2 cores).
WRITE_BUFFER_BYTES = 64 << 20
# Bytes of parameters being read (and copied onto their devices) at once while restoring. Bounded, a restore holds
# the parameters plus about twice this; large enough that reads of many small leaves still overlap.
RESTORE_BUFFER_BYTES = 256 << 20

Producer = Callable[[Callable[[str, np.ndarray], None]], None]


class ModelDirError(VllamaError):
    """A model directory that cannot be written or read: the message names the folder and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass
class LoadedModel:
    """What `load_model_dir` returns. `params` holds only the restored groups (see `groups`)."""

    config: ModelConfig
    params: dict[str, Any]
    tokenizer: Any
    path: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(self.params)


@dataclass(frozen=True)
class LeafSpec:
    """Shape and stored dtype of one parameter to be written."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(math.prod(self.shape)) * np.dtype(self.dtype).itemsize


# ------------------------------------------------------------------------------------------------------------
# writing


@contextlib.contextmanager
def staged_dir(out_dir: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty hidden sibling of `out_dir`; on normal exit rename it to `out_dir`, on any exception
    (KeyboardInterrupt included) delete it. An existing `out_dir` is replaced only with `force`, and only if it is a
    model directory or empty (so `--force` cannot wipe an unrelated folder)."""
    out = Path(out_dir).expanduser().absolute()
    check_output_dir(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the model directory should not be
    except OSError as e:
        raise ModelDirError(out, f"cannot create the output folder ({e.strerror or e})") from None
    try:
        yield tmp
        check_output_dir(out, force)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            if old is not None:  # put the previous directory back
                os.rename(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_dir(out: Path, force: bool) -> None:
    """Raise ModelDirError if `out` exists and may not be replaced."""
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise ModelDirError(out, "already exists (pass --force / force=True to replace it)")
    if not out.is_dir() or out.is_symlink():
        raise ModelDirError(out, "exists and is not a folder; not replacing it even with force")
    if any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
        raise ModelDirError(out, "exists and is not a vllama-jax model directory (no manifest.json); "
                                 "not replacing it even with force")


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else type(e).__name__


class _Pending:
    """Placeholder leaf handed to Orbax: the data arrives later through the producer."""

    __slots__ = ("path", "spec")

    def __init__(self, path: str, spec: LeafSpec):
        self.path = path
        self.spec = spec


def _open_leaf(info: Any, arg: Any, spec: LeafSpec) -> Any:
    """Start creating the leaf's TensorStore array exactly where (and as) Orbax's NumpyHandler would; returns the
    TensorStore open future."""
    tspec = ocp.type_handlers.get_json_tspec_write(
        info, use_ocdbt=info.is_ocdbt_checkpoint, global_shape=spec.shape, local_shape=spec.shape,
        dtype=np.dtype(spec.dtype), process_index=jax.process_index() if info.is_ocdbt_checkpoint else None, arg=arg)
    # Stored uncompressed: Orbax's zstd saves ~8% on weights (random or trained floats hardly compress) and costs
    # most of a conversion's CPU; its encoded chunks also stayed resident (+0.24 GB per 262 MB tensor written).
    # A standard restore reads either (the codec is in each array's metadata).
    tspec["metadata"]["compressor"] = None
    return ts.open(ts.Spec(tspec), create=True, open=True, context=info.ts_context)


def _chunk_regions(shape: tuple[int, ...], chunks: Sequence[int]) -> list[tuple[slice, ...]]:
    """The regions of an array of `shape` stored in chunks of `chunks`, one per chunk, in C order."""
    axes = [[slice(i, min(i + c, n)) for i in range(0, n, c)] for n, c in zip(shape, chunks)]
    return [tuple(r) for r in itertools.product(*axes)]


def _write_leaf(store: Any, array: np.ndarray) -> Any:
    """Start writing one whole array into its opened TensorStore; returns the write future (TensorStore keeps a
    reference to `array` until then, no copy). Module-level so tests can inject write failures."""
    return store.write(array, can_reference_source_data_indefinitely=True)


def _stream_handler(producer: Producer, write_buffer_bytes: int, chunk_bytes: int,
                    on_written: Callable[[str, int], None] | None):
    class StreamingHandler(ocp.type_handlers.NumpyHandler):
        """Orbax TypeHandler for `_Pending` leaves: runs the producer and writes each array as it arrives, in the
        layout (and with the typestr) of Orbax's own NumpyHandler, so a standard restore reads it back."""

        def typestr(self) -> str:
            return "np.ndarray"

        async def serialize(self, values, infos, args=None):  # noqa: ANN001 - Orbax signature
            args = args or [ocp.SaveArgs()] * len(values)
            for info in infos:
                await info.await_path_creation()
            targets = {v.path: (v.spec, info, arg) for v, info, arg in zip(values, infos, args)}
            # Create every array up front, concurrently: each creation commits metadata to the OCDBT store, and
            # concurrent commits are batched (one at a time costs tens of ms per leaf). Data writes are then
            # started as the producer delivers arrays and run concurrently inside TensorStore.
            try:
                opening = {p: _open_leaf(info, arg, spec) for p, (spec, info, arg) in targets.items()}
                stores = {p: f.result() for p, f in opening.items()}
            except Exception as e:
                raise OSError(f"cannot create the parameter arrays: {_first_line(e)}") from None
            in_flight: collections.deque = collections.deque()
            state = {"bytes": 0}

            def drain(limit: int) -> None:
                while in_flight and state["bytes"] > limit:
                    fut, n, path = in_flight.popleft()
                    state["bytes"] -= n
                    try:
                        fut.result()
                    except OSError:
                        raise
                    except Exception as e:  # TensorStore reports I/O errors (ENOSPC, ...) as ValueError
                        raise OSError(f"cannot write parameter {path}: {_first_line(e)}") from None
                    if on_written is not None:
                        on_written(path, n)

            def write(path: str, array: np.ndarray) -> None:
                if path not in targets:
                    raise ValueError(f"parameter {path!r} is not expected or was written twice")
                spec, info, arg = targets.pop(path)
                array = np.asarray(array)
                if tuple(array.shape) != spec.shape:
                    raise ValueError(f"parameter {path}: shape {tuple(array.shape)}, expected {spec.shape}")
                store = stores.pop(path)
                # A large array goes out one stored chunk at a time, each cast / made contiguous on its own (the
                # producer may hand over views: a Linear weight transposed, pages of a mapped file), so a tensor
                # never needs a second full-size copy; a small one in one piece.
                whole = array.nbytes <= chunk_bytes or array.ndim == 0
                regions = [()] if whole else _chunk_regions(spec.shape, store.chunk_layout.write_chunk.shape)
                for region in regions:
                    block = cast(array[region], spec.dtype)
                    in_flight.append((_write_leaf(store[region] if region else store, block), block.nbytes, path))
                    state["bytes"] += block.nbytes
                    # Block the producer until what is in flight fits the buffer again: small tensors overlap
                    # with reading the next ones; a large one is written a few chunks ahead of its reading.
                    drain(write_buffer_bytes)

            try:
                producer(write)
                drain(-1)
            except BaseException:
                # let started writes end (or fail) before the caller deletes the folder
                for fut, _, _ in in_flight:
                    with contextlib.suppress(Exception):
                        fut.result()
                raise
            if targets:
                missing = sorted(targets)
                more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
                raise ValueError(f"the producer never wrote {', '.join(missing[:5])}{more}")
            return []

    return StreamingHandler(deepcopy_host_arrays=False)


class _QuietOrbax(logging.Filter):
    """Orbax warns that our registry has no jax.Array handler (ArrayMetadata persistence); irrelevant here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "ArrayMetadata persistence is disabled" not in record.getMessage()


def write_params(
    params_dir: str | Path,
    specs: Mapping[str, LeafSpec],
    producer: Producer,
    *,
    write_buffer_bytes: int = WRITE_BUFFER_BYTES,
    chunk_bytes: int = CHUNK_BYTES,
    on_written: Callable[[str, int], None] | None = None,
) -> None:
    """Write an Orbax checkpoint of the params whose flat "/" paths and shapes/dtypes are `specs`.

    `producer(write)` must call `write(path, array)` exactly once per path (any order); arrays (views of any
    layout too) are cast to the spec dtype and streamed to disk, at most `write_buffer_bytes` in flight.
    `on_written(path, nbytes)` is called as each piece of a parameter reaches the store (a whole small array, or one
    chunk of a large one). `params_dir` must not exist yet.
    """
    if not specs:
        raise ValueError("no parameters to write")
    tree = unflatten_params({p: _Pending(p, s) for p, s in specs.items()})
    save_args = unflatten_params({p: ocp.SaveArgs(chunk_byte_size=chunk_bytes) for p in specs})
    return_freed_buffers_to_os()
    handler = _stream_handler(producer, write_buffer_bytes, chunk_bytes, on_written)
    registry = ocp.type_handlers.create_type_handler_registry((_Pending, handler))
    quiet = _QuietOrbax()
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(quiet)
    try:
        ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))
        ckptr.save(Path(params_dir).absolute(), args=ocp.args.PyTreeSave(tree, save_args=save_args))
        ckptr.close()
    finally:
        absl_logger.removeFilter(quiet)


def dtype_name(dtype: Any) -> str:
    return np.dtype(dtype).name


def group_stats(specs: Mapping[str, LeafSpec]) -> dict[str, dict[str, Any]]:
    """{group: {"dtype", "params", "bytes", "tensors"}} of flat leaf specs."""
    out: dict[str, dict[str, Any]] = {}
    for path, s in specs.items():
        g = out.setdefault(path.split("/", 1)[0], {"dtype": set(), "params": 0, "bytes": 0, "tensors": 0})
        g["dtype"].add(dtype_name(s.dtype))
        g["params"] += int(math.prod(s.shape))
        g["bytes"] += s.nbytes
        g["tensors"] += 1
    for g in out.values():
        g["dtype"] = "/".join(sorted(g["dtype"]))
    return out


def build_manifest(specs: Mapping[str, LeafSpec], components: Mapping[str, Mapping[str, Any]] | None = None,
                   tokenizer: Any = None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The manifest.json content. `components` maps a component name (upstream file kind) to at least its
    "groups" and "source"; counts/bytes/dtypes are filled in from `specs`."""
    groups = group_stats(specs)
    comps: dict[str, Any] = {}
    for name, c in (components or {}).items():
        gs = [g for g in c.get("groups", ()) if g in groups]
        comps[name] = {
            **dict(c),
            "groups": gs,
            "dtype": "/".join(sorted({groups[g]["dtype"] for g in gs})),
            "params": sum(groups[g]["params"] for g in gs),
            "bytes": sum(groups[g]["bytes"] for g in gs),
        }
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "vllama_jax_version": __version__,
        "params_layout": "orbax PyTreeCheckpointHandler (ocdbt, zarr2, zstd); top-level keys are parameter groups",
        "groups": groups,
        "components": comps,
        "total": {"params": sum(g["params"] for g in groups.values()),
                  "bytes": sum(g["bytes"] for g in groups.values())},
        "tokenizer": None if tokenizer is None else {
            "family": getattr(tokenizer, "family", ""), "source": str(getattr(tokenizer, "source", "")),
            "base_vocab_size": getattr(tokenizer, "base_vocab_size", None)},
    }
    for k, v in (extra or {}).items():
        if k in ("format", "format_version"):
            raise ValueError(f"manifest_extra may not set {k!r}")
        manifest[k] = v
    return manifest


def write_model_files(tmp: Path, config: ModelConfig, tokenizer: Any, manifest: Mapping[str, Any]) -> None:
    """config.yaml, tokenizer/ and manifest.json (written last: its presence marks a complete directory)."""
    (tmp / CONFIG_FILE).write_text(config_to_yaml(config))
    if tokenizer is not None:
        tokenizer.save(tmp / TOKENIZER_DIR)
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str) + "\n")


def _leaf_spec(x: Any) -> LeafSpec:
    return LeafSpec(tuple(int(d) for d in np.shape(x)), np.dtype(x.dtype))


def save_model_dir(
    out_dir: str | Path,
    config: ModelConfig,
    params: Mapping[str, Any],
    tokenizer: Any = None,
    manifest_extra: Mapping[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Write a model directory from an in-memory params tree (numpy or jax arrays, possibly sharded; each leaf is
    gathered to the host one at a time). Groups absent from `params` are absent from the directory. Atomic: the
    folder appears only when complete; an existing one is replaced only with `force`. Returns the path.

    `manifest_extra` is merged into manifest.json; its "components" entry (if any) names per-component sources
    ({name: {"groups": [...], "source": "..."}}), otherwise each group is listed as its own in-memory component.
    """
    try:
        config.validate()
    except ConfigError as e:
        raise ModelDirError(out_dir, f"invalid config ({e})") from None
    flat = flatten_params(params)
    if not flat:
        raise ModelDirError(out_dir, "no parameters to save")
    specs = {p: _leaf_spec(v) for p, v in flat.items()}
    extra = dict(manifest_extra or {})
    components = extra.pop("components", None) or {
        g: {"groups": [g], "source": "<in memory>"} for g in dict.fromkeys(p.split("/", 1)[0] for p in specs)}

    def producer(write: Callable[[str, np.ndarray], None]) -> None:
        for p, v in flat.items():
            write(p, np.asarray(v))

    out = Path(out_dir).expanduser().absolute()
    with staged_dir(out, force) as tmp:
        write_params(tmp / PARAMS_DIR, specs, producer)
        write_model_files(tmp, config, tokenizer, build_manifest(specs, components, tokenizer, extra))
    return out


# ------------------------------------------------------------------------------------------------------------
# reading


def read_manifest(path: str | Path) -> dict[str, Any]:
    """manifest.json of a model directory, checked for format and version."""
    path = Path(path)
    if not path.exists():
        raise ModelDirError(path, "model directory not found")
    if not path.is_dir():
        raise ModelDirError(path, "not a folder (a model directory is a folder with config.yaml, params/, "
                                  "manifest.json)")
    mf = path / MANIFEST_FILE
    if not mf.is_file():
        raise ModelDirError(path, "no manifest.json: not a vllama-jax model directory, or an incomplete one")
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelDirError(mf, f"corrupt manifest ({_first_line(e)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelDirError(mf, f"not a vllama-jax model manifest (format {manifest.get('format')!r})"
                            if isinstance(manifest, dict) else "not a vllama-jax model manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelDirError(mf, f"format version {version!r} is not supported (this vllama-jax reads up to "
                                f"{FORMAT_VERSION}); upgrade vllama-jax")
    return manifest


def model_dir_groups(path: str | Path) -> tuple[str, ...]:
    """The parameter groups present in a model directory (from its manifest)."""
    return tuple(read_manifest(path).get("groups", {}))


def _params_metadata(params_dir: Path) -> dict[str, Any]:
    """Flat {params path: (shape, dtype)} of the Orbax checkpoint, from its metadata only."""
    if not params_dir.is_dir():
        raise ModelDirError(params_dir, "missing (the model directory has no parameters folder)")
    if not (params_dir / "_METADATA").is_file():
        raise ModelDirError(params_dir, "incomplete Orbax checkpoint (no _METADATA file)")
    try:
        md = ocp.PyTreeCheckpointer().metadata(params_dir)
    except Exception as e:  # orbax/tensorstore raise assorted types for damaged checkpoints
        raise ModelDirError(params_dir, f"corrupt Orbax checkpoint metadata ({_first_line(e)})") from None
    tree = getattr(md, "item_metadata", md)
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, Mapping):  # Orbax returns None when the arrays' own metadata cannot be read
        raise ModelDirError(params_dir, "corrupt Orbax checkpoint (the arrays' metadata cannot be read)")
    flat: dict[str, Any] = {}
    for p, leaf in flatten_params(tree).items():
        shape, dt = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
        if shape is None or dt is None:
            raise ModelDirError(params_dir, f"leaf {p} is not an array in the checkpoint metadata")
        flat[p] = (tuple(int(d) for d in shape), np.dtype(dt))
    return flat


def restore_limit_bytes(buffer_bytes: int | None, largest_bytes: int) -> int:
    """The in-flight byte limit for an Orbax restore: `buffer_bytes` (default RESTORE_BUFFER_BYTES), raised to fit
    the largest single read (Orbax refuses a read larger than its limit). `largest_bytes` is the largest array (or
    shard) read, as stored; a read is counted in whole chunks, hence the margin of one chunk."""
    limit = RESTORE_BUFFER_BYTES if buffer_bytes is None else int(buffer_bytes)
    if limit <= 0:
        raise ValueError(f"restore buffer must be positive, got {limit} bytes")
    return max(limit, int(largest_bytes) + CHUNK_BYTES + 1)


def bounded_pytree_checkpointer(limit_bytes: int) -> ocp.Checkpointer:
    """A PyTree checkpointer whose restores read at most `limit_bytes` at a time (see `restore_limit_bytes`)."""
    # Orbax takes the limit in GB and multiplies by 1e9: a fractional value gives the byte limit
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(restore_concurrent_gb=limit_bytes / 1e9))  # type: ignore[arg-type]


def _largest_read_bytes(shardings: Mapping[str, Any], stored: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> int:
    """The largest single read of a restore: per leaf, its largest device shard, at the stored dtype."""
    largest = 0
    for p, (shape, dt) in stored.items():
        s = shardings[p]
        shard = s.shard_shape(shape) if hasattr(s, "shard_shape") else shape
        largest = max(largest, int(math.prod(shard)) * np.dtype(dt).itemsize)
    return largest


QUANTIZE_CHUNK_BYTES = 1 << 29  # bytes (as stored) read per chunk when quantizing at load


def _restore(ckptr: ocp.Checkpointer, params_dir: Path, args: Mapping[str, Any],
             shapes: Mapping[str, tuple[int, ...]], read_as: Callable[[str], Any]) -> dict[str, Any]:
    """Flat {path: array} of the leaves `args` names (Orbax restore args per flat path)."""
    if not args:
        return {}
    item = unflatten_params({p: jax.ShapeDtypeStruct(shapes[p], read_as(p)) for p in args})
    try:
        tree = ckptr.restore(
            params_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=unflatten_params(dict(args)),
                                                    partial_restore=True))
    except Exception as e:
        raise ModelDirError(params_dir, f"cannot read the parameters ({_first_line(e)})") from None
    flat = flatten_params(tree)
    return {p: flat[p] for p in args}


def _chunks(paths: list[str], size: Callable[[str], int], limit: int) -> Iterator[list[str]]:
    """`paths` in consecutive runs of at most `limit` total size (a larger single leaf is a run of its own)."""
    run: list[str] = []
    total = 0
    for p in paths:
        if run and total + size(p) > limit:
            yield run
            run, total = [], 0
        run.append(p)
        total += size(p)
    if run:
        yield run


def _ordered(expected: Mapping[str, Any], flat: Mapping[str, Any]) -> list[str]:
    """The paths of `flat` in checkpoint order, each scale right after its weight."""
    out: list[str] = []
    for p in expected:
        if p in flat:
            out.append(p)
        s = scale_name(p)
        if s is not None and s in flat and s not in expected:
            out.append(s)
    return out


def load_model_dir(
    path: str | Path,
    *,
    mesh: Any = None,
    shardings: Mapping[str, Any] | None = None,
    groups: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    dtype: Any = None,
    restore_buffer_bytes: int | None = None,
    quantize: str | None = None,
) -> LoadedModel:
    """Restore a model directory.

    mesh: a `jax.sharding.Mesh` (from `vllama_jax.sharding.make_mesh`): every leaf is restored straight into its
      NamedSharding from the logical-axis rules (each device reads only its shards). None: onto the default device.
    shardings: {group: tree of Sharding} to restore onto instead (e.g. a trainer's, already computed); wins over mesh.
    groups: the top-level parameter groups to restore (default: all present); exclude: groups to skip
      (e.g. ("audio_encoder",)). Requesting a group that is not in the directory is an error.
    dtype: cast every float parameter to this dtype while reading (default: as stored; int8 weights and their
      scales stay as they are).
    quantize: "int8" = the LLM's projections and token table as int8 + per-channel scales (`models.quant`),
      quantized on the host leaf by leaf as they are read (at most `QUANTIZE_CHUNK_BYTES` as stored at a time).
      A directory converted with `--dtype int8` is int8 already (with or without this option).
    restore_buffer_bytes: read at most this many bytes at a time (default RESTORE_BUFFER_BYTES; raised to the
      largest array when that is bigger): peak memory is the parameters plus about twice this.
    """
    mode = check_mode(quantize)
    path = Path(path).expanduser().absolute()  # TensorStore resolves relative paths differently
    manifest = read_manifest(path)
    try:
        config = load_model_config(path / CONFIG_FILE)
    except ConfigError as e:
        raise ModelDirError(path, f"bad config.yaml ({e})") from None
    params_dir = path / PARAMS_DIR
    stored = _params_metadata(params_dir)
    present = tuple(dict.fromkeys(p.split("/", 1)[0] for p in stored))
    listed = tuple(manifest.get("groups", {}))
    if set(listed) != set(present):
        raise ModelDirError(path, f"manifest lists groups {sorted(listed)} but params/ holds {sorted(present)}")
    if groups is None:
        wanted = list(present)
    else:
        wanted = list(dict.fromkeys(groups))
        absent = [g for g in wanted if g not in present]
        if absent:
            raise ModelDirError(path, f"no parameter group(s) {', '.join(absent)} in this directory "
                                      f"(it has: {', '.join(present) or 'none'})")
    skip = set(exclude)
    wanted = [g for g in wanted if g not in skip]

    unknown = [g for g in wanted if g not in model_groups(config)]
    if unknown:
        raise ModelDirError(path, f"group(s) {', '.join(unknown)} are not part of the model config.yaml describes")
    abstract, axes = abstract_for_groups(config, wanted)
    flat_abstract = flatten_params(abstract)
    stored_int8 = any(scale_name(p) in stored for p in stored)  # a directory written with --dtype int8
    if stored_int8:
        flat_abstract = quantized_specs(flat_abstract)
        abstract = unflatten_params(flat_abstract)
        axes = axes_with_scales(axes, abstract)
    expected = {p: tuple(v.shape) for p, v in flat_abstract.items()}
    have = {p: s for p, s in stored.items() if p.split("/", 1)[0] in wanted}
    if set(expected) != set(have):
        missing, extra = sorted(set(expected) - set(have)), sorted(set(have) - set(expected))
        raise ModelDirError(path, "params/ does not match config.yaml: "
                                  + "; ".join(x for x in (f"missing {', '.join(missing[:5])}" if missing else "",
                                                          f"unexpected {', '.join(extra[:5])}" if extra else "") if x))
    for p, shape in expected.items():
        if have[p][0] != shape:
            raise ModelDirError(path, f"params/{p} has shape {have[p][0]} but config.yaml implies {shape}")

    params: dict[str, Any] = {}
    if wanted:
        if shardings is not None:
            flat_shardings = flatten_params({g: shardings[g] for g in wanted})
        elif mesh is not None:
            flat_shardings = flatten_params(tree_shardings(abstract, axes, mesh))
        else:
            dev = SingleDeviceSharding(jax.devices()[0])
            flat_shardings = {p: dev for p in expected}
        def read_as(p: str) -> np.dtype:
            keep = dtype is None or not np.issubdtype(have[p][1], np.floating) or weight_of(p) is not None
            return have[p][1] if keep else np.dtype(dtype)

        # Leaves quantized here are read to the host in chunks and placed as int8; the rest restore straight
        # into their shardings.
        to_quantize = [p for p in expected if mode and not stored_int8 and scale_name(p) is not None]
        direct = [p for p in expected if p not in set(to_quantize)]
        largest = _largest_read_bytes(flat_shardings, {p: have[p] for p in expected})
        return_freed_buffers_to_os()
        ckptr = bounded_pytree_checkpointer(restore_limit_bytes(restore_buffer_bytes, largest))
        flat = _restore(ckptr, params_dir, {p: ocp.ArrayRestoreArgs(sharding=flat_shardings[p], global_shape=have[p][0],
                                                             dtype=read_as(p)) for p in direct},
                        {p: have[p][0] for p in direct}, read_as)
        if to_quantize:
            q_flat = quantized_specs(flat_abstract)
            if shardings is None and mesh is not None:  # int8 weights and scales by the rules table
                flat_shardings = flatten_params(tree_shardings(
                    unflatten_params(q_flat), axes_with_scales(axes, unflatten_params(q_flat)), mesh))

            def target(p: str) -> Any:
                if p in flat_shardings:
                    return flat_shardings[p]
                w = flat_shardings[weight_of(p)]  # a scale, with caller-given shardings: replicated beside it
                return NamedSharding(w.mesh, PartitionSpec()) if isinstance(w, NamedSharding) else w

            # read as stored (bf16 is half of float32's bytes); quantize_leaf converts a block of rows at a time
            for chunk in _chunks(to_quantize, lambda p: int(np.prod(have[p][0])) * np.dtype(have[p][1]).itemsize,
                                 QUANTIZE_CHUNK_BYTES):
                host = _restore(ckptr, params_dir, {p: ocp.RestoreArgs(restore_type=np.ndarray, dtype=have[p][1])
                                             for p in chunk}, {p: have[p][0] for p in chunk}, lambda p: have[p][1])
                flat.update(quantize_flat(host, mode, put=lambda p, a: put(a, target(p))))
                del host
        params = unflatten_params({p: flat[p] for p in _ordered(expected, flat)})
        params = {g: params[g] for g in wanted}

    tokenizer = None
    if (path / TOKENIZER_DIR).is_dir():
        try:
            tokenizer = load_tokenizer(path / TOKENIZER_DIR)
        except TokenizerError as e:
            raise ModelDirError(path / TOKENIZER_DIR, f"cannot load the tokenizer ({e.reason})") from None
    return LoadedModel(config=config, params=params, tokenizer=tokenizer, path=path, manifest=manifest)
