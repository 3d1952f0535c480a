"""`vllama-jax encode`: the frozen towers run once over a prepared dataset, their output cached beside the records.

    vllama-jax encode /data/webvid --model models/vl-llama2-7b [--branch video] [--num-frames 8] [--dtype bfloat16]

What is written and how training reads it: `vllama_jax.data.features`. The work:

* the model directory's frozen towers of the branch only (the video branch: ViT, ``ln_vision``, image Q-Former; the
  audio branch: ImageBind, whose vision tower upstream trains the audio branch with) on a ``data`` mesh over this
  process's devices: each batch of frames is split over them, the towers replicated;
* every host takes the record shards ``i`` with ``i % hosts == host`` (each its own shards; together the dataset);
  a shard is written to a temporary name and renamed, then marked done, so a rerun skips finished shards and redoes
  an interrupted one (resume granularity: a record shard, ``prepare --records-per-part``);
* media are decoded by a pool of threads (``--workers``) while the devices encode the previous batch; the
  preprocessing is the training pipeline's (`data.media_io.load_frames`), uint8 pixels normalised on the device as
  the train step does, so without augmentation a cached feature is what the uncached step computes;
* ``--views N`` caches N draws of the random preprocessing per record (random crops with ``--augment``; random
  frame sampling such as WebVid's "headtail"); training reads view ``epoch % N``. One view of an augmented or
  randomly sampled dataset repeats one draw every epoch, which the command says.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from ..config import ModelConfig, load_model_config
from ..data import PreparedDataset
from ..data import media_io
from ..data.errors import DataError
from ..data.features import (DONE_SUFFIX, DTYPES, FEATURES_MANIFEST, FEATURES_SCHEMA_VERSION, cache_dir,
                             pack_record)
from ..data.pipeline import RecordReader
from ..data.prepare import ordered_map
from ..media.image import normalize_uint8
from ..models import abstract_params, build_model, cast_to_config_dtypes
from ..models.groups import LLM_GROUP, branch_towers
from ..models.video_llama import VideoLLaMA
from ..sharding import make_mesh
from ..weights.model_dir import CONFIG_FILE, load_model_dir, read_manifest
from .config import PRECISIONS, with_precision
from .data import branch_image_size, frame_feature_shape, towers_fingerprint

BRANCHES = ("video", "audio")


@dataclasses.dataclass
class EncodeSummary:
    """What one ``encode`` call did on this host."""

    out: str
    records: int  # records encoded now
    bad: int  # of which their media failed (stored as bad: training replaces them)
    shards: int  # shards encoded now
    resumed: int  # shards found done and skipped
    frames: int  # frames through the towers (views x frames per record)
    seconds: float

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        return (f"encoded {self.records} records ({self.bad} bad) in {self.shards} shards ({self.resumed} resumed), "
                f"{self.frames} frames in {self.seconds:.1f} s = {self.frames_per_s:.1f} frames/s -> {self.out}")


def encode_settings(model_config: ModelConfig, pd: PreparedDataset, *, branch: str, num_frames: int,
                    sampling: str | None, augment: bool, views: int, dtype: str) -> dict[str, Any]:
    """The settings a cache records and training checks (`FeatureCache.check`)."""
    return {"branch": branch, "num_frames": num_frames,
            "image_size": branch_image_size(branch, model_config),
            "sampling": sampling or pd.defaults.get("sampling", "uniform"), "augment": augment, "views": views,
            "dtype": dtype, "towers": towers_fingerprint(branch, model_config)}


def tower_groups(branch: str, abstract: dict[str, Any]) -> tuple[str, ...]:
    """The groups the branch's frozen towers read, plus the top-level arrays flax's setup creates eagerly."""
    leaves = [k for k, v in abstract.items() if not isinstance(v, dict)]
    return tuple(g for g in abstract if (g in branch_towers(branch) and g != LLM_GROUP) or g in leaves)


def encode_dataset(data_dir: str | os.PathLike[str], model_dir: str | os.PathLike[str], *, branch: str = "video",
                   num_frames: int = 8, sampling: str | None = None, augment: bool = False, views: int = 1,
                   dtype: str = "bfloat16", batch_size: int = 16, workers: int = 4, seed: int = 42,
                   mesh_spec: str | None = None, precision: str = "model", overwrite: bool = False,
                   progress: bool = True, log: Callable[[str], None] = print) -> EncodeSummary:
    """Encode the prepared dataset at ``data_dir`` with the frozen towers of ``model_dir`` (see the module
    docstring); resumable. ``precision``: the compute precision of the towers, as the training config's
    ``model.precision`` ("model": the model directory's; "float32"; "bfloat16"): a run trains on the cache only
    with the precision it was made in. Raises `DataError` for an unusable dataset or a cache of other settings."""
    if branch not in BRANCHES:
        raise DataError(None, f"unknown branch {branch!r} (one of {', '.join(BRANCHES)})")
    if dtype not in DTYPES:
        raise DataError(None, f"unknown feature dtype {dtype!r} (one of {', '.join(DTYPES)})")
    for name, v, low in (("num_frames", num_frames, 1), ("views", views, 1), ("batch_size", batch_size, 1),
                         ("workers", workers, 0)):
        if not isinstance(v, int) or v < low:
            raise DataError(None, f"{name} must be an integer >= {low}, got {v!r}")
    pd = PreparedDataset.open(data_dir)
    model_dir = Path(model_dir).expanduser().absolute()
    read_manifest(model_dir)  # a clear error for a folder that is not a model directory
    if precision not in PRECISIONS:
        raise DataError(None, f"unknown precision {precision!r} (one of {', '.join(PRECISIONS)})")
    config = with_precision(load_model_config(model_dir / CONFIG_FILE), precision)
    if branch == "audio" and not config.equip_audio_branch:
        raise DataError(model_dir, "the model has no audio branch (equip_audio_branch: false)")
    settings = encode_settings(config, pd, branch=branch, num_frames=num_frames, sampling=sampling,
                               augment=augment, views=views, dtype=dtype)
    random_draws = augment or settings["sampling"] in ("headtail", "random")
    if random_draws and views == 1 and pd.media_type == "video":
        log(f"note: {'augmentation' if augment else settings['sampling'] + ' frame sampling'} draws anew every "
            "epoch without a cache; one cached view repeats one draw (--views N caches N draws)")

    out = cache_dir(pd.path, branch, num_frames)
    host, hosts = jax.process_index(), jax.process_count()
    mine = [i for i in range(len(pd.files)) if i % hosts == host]
    mesh = make_mesh(mesh_spec or f"data={len(jax.local_devices())}", jax.local_devices())
    model = build_model(config)
    abstract, _ = abstract_params(config)
    params = cast_to_config_dtypes(load_model_dir(model_dir, mesh=mesh, groups=tower_groups(branch, abstract)).params,
                                   config)
    t = 1 if pd.media_type == "image" else num_frames
    size = settings["image_size"]
    split = mesh.shape["data"] * mesh.shape["fsdp"]  # the batch axis of `in_sharding`
    rows = -(-batch_size // split) * split  # a whole number of rows per device
    frame_shape = (t,) + frame_feature_shape(branch, config)
    np_dtype = DTYPES[dtype]
    in_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))

    @jax.jit
    def towers(p: Any, pixels: jax.Array) -> jax.Array:
        x = normalize_uint8(pixels, jnp)
        return model.apply({"params": p}, x, branch, method=VideoLLaMA.frozen_frame_features).astype(np_dtype)

    shards = _write_manifest(out, pd, settings, frame_shape, overwrite, mine)
    counts = [len(grain.sources.ArrayRecordDataSource([f])) for f in pd.files]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    todo = [i for i in mine if overwrite or not (out / (shards[i]["file"] + DONE_SUFFIX)).is_file()]
    summary = EncodeSummary(out=str(out), records=0, bad=0, shards=0, resumed=len(mine) - len(todo), frames=0,
                            seconds=0.0)
    bar = tqdm(total=sum(counts[i] for i in todo), unit="rec", desc=f"encode {branch}", disable=not progress,
               dynamic_ncols=True)
    start = time.perf_counter()
    try:
        for i in todo:
            path = out / shards[i]["file"]
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            n_bad = 0
            writer = ArrayRecordWriter(str(tmp), "group_size:1")  # one record per chunk: random access
            try:
                reader = RecordReader([pd.files[i]])
                items = ((offsets[i] + j, reader, j) for j in range(counts[i]))
                decode = lambda it: _decode(it, views, t, size, settings["sampling"], augment, seed)  # noqa: E731
                for rec_bytes, bad in _encode_stream(ordered_map(decode, items, workers), towers, params, rows,
                                                     in_sharding, (t, size, size, 3)):
                    writer.write(rec_bytes)
                    n_bad += bad
                    bar.update(1)
            finally:
                writer.close()
            os.replace(tmp, path)
            done = {"records": counts[i], "bad": n_bad, "host": host}
            (out / (shards[i]["file"] + DONE_SUFFIX)).write_text(json.dumps(done))
            summary.records += counts[i]
            summary.bad += n_bad
            summary.frames += (counts[i] - n_bad) * views * t
            summary.shards += 1
            summary.seconds = time.perf_counter() - start
            bar.set_postfix(frames_per_s=f"{summary.frames_per_s:.1f}", refresh=False)
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - start
    return summary


def _write_manifest(out: Path, pd: PreparedDataset, settings: dict[str, Any], frame_shape: tuple[int, ...],
                    overwrite: bool, mine: Sequence[int]) -> list[dict[str, str]]:
    """The cache's manifest (every host writes the same one; a different one there needs ``overwrite``, and then
    each host removes the old files of its own shards, ``mine``); returns the per-shard entries (record shard ->
    feature file)."""
    shards = [{"records": rel, "file": rel} for rel in (str(Path(f).relative_to(pd.path)) for f in pd.files)]
    manifest = {"schema_version": FEATURES_SCHEMA_VERSION, "settings": settings, "frame_shape": list(frame_shape),
                "shards": shards}
    mpath = out / FEATURES_MANIFEST
    if mpath.is_file():
        try:
            old = json.loads(mpath.read_bytes())
        except ValueError:
            old = None
        if old != manifest:
            if not overwrite:
                raise DataError(out, "holds features encoded with other settings or from other records; pass "
                                     "--overwrite to replace them")
            for i in mine:
                for name in (shards[i]["file"], shards[i]["file"] + DONE_SUFFIX):
                    (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{FEATURES_MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, mpath)
    return shards


def _decode(item: tuple[int, RecordReader, int], views: int, t: int, size: int, sampling: str, augment: bool,
            seed: int) -> tuple[np.ndarray | None, str, str]:
    """One record -> (uint8 frames (views, T, H, W, 3), frame-time message, "") or (None, "", reason)."""
    g, reader, j = item
    try:
        rec = reader[j]
        out, message = [], ""
        for v in range(views):
            rng = np.random.default_rng([seed, 0x656E63, int(g), v])  # "enc": a draw per record and view
            frames, msg = media_io.load_frames(rec.media_type, rec.media_path, rec.media_bytes, num_frames=t,
                                               sampling=sampling, image_size=size, train=augment, rng=rng,
                                               need_message=rec.media_type == "video")
            out.append(frames)
            message = message or msg
        return np.stack(out), message, ""
    except DataError as e:
        return None, "", e.reason


def _encode_stream(decoded: Iterator[tuple[np.ndarray | None, str, str]], towers: Callable, params: Any, rows: int,
                   in_sharding: Any, frame_shape: Sequence[int]) -> Iterator[tuple[bytes, int]]:
    """Decoded records -> (record bytes, 1 if bad), in order. The views of consecutive records fill batches of
    ``rows`` (the last one padded); a batch is dispatched before the previous one is read back, so decoding and
    the device work overlap."""
    waiting: collections.deque = collections.deque()  # records not written yet, in order
    done: list[np.ndarray] = []  # views read back, not yet written (the head records' first)
    buf: list[np.ndarray] = []  # views of the batch being filled
    in_flight: tuple[Any, int] | None = None  # (device output, views in it)

    def ready() -> Iterator[tuple[bytes, int]]:
        while waiting:
            frames, message, error = waiting[0]
            if frames is None:
                yield pack_record(None, error=error), 1
            elif len(done) >= len(frames):
                yield pack_record(np.stack(done[: len(frames)]), message), 0
                del done[: len(frames)]
            else:
                return
            waiting.popleft()

    def dispatch() -> tuple[Any, int]:
        batch = np.stack(buf + [np.zeros(frame_shape, np.uint8)] * (rows - len(buf)))
        return towers(params, jax.device_put(batch, in_sharding)), len(buf)

    for rec in decoded:
        waiting.append(rec)
        for view in () if rec[0] is None else rec[0]:
            buf.append(view)
            if len(buf) == rows:
                nxt = dispatch()
                buf = []
                if in_flight is not None:
                    done.extend(np.asarray(in_flight[0])[: in_flight[1]])
                in_flight = nxt
        yield from ready()
    for out, n in [x for x in (in_flight, dispatch() if buf else None) if x is not None]:
        done.extend(np.asarray(out)[:n])
    yield from ready()
    if waiting:  # every view was read back: nothing can be left
        raise AssertionError(f"{len(waiting)} records left unwritten")


__all__ = ["BRANCHES", "EncodeSummary", "encode_dataset", "encode_settings", "tower_groups"]
