"""grain input pipeline: prepared ArrayRecord datasets -> fixed-shape numpy training batches, on every host.

How a batch is made (all indices are deterministic functions of the seed, so any step can be recomputed)::

    per dataset k:  range(n_host_k) -shuffle(seed_k, reshuffled each epoch)-> repeat forever
                    -map_with_index-> read record, decode + transform media, tokenize   (bad record -> replacement)
                    -batch(B)-> one fixed-shape batch dict of the dataset's kind (``batch.py``)
    mixture:        step i -> (dataset k_i, batch j_i) with k_i ~ sample_ratio (one whole batch per dataset,
                    upstream upstream.md §8.2), j_i = number of earlier steps that drew k_i
                    -> stage 2: the caption prompt drawn for step i (``with_caption_prompts``)
    grain:          select_from_datasets -> to_iter_dataset -> mp_prefetch(num_workers) -> bad-record counter

With ``PipelineConfig.features`` the media are not decoded: each record's frozen-tower output is read from the
dataset's feature cache (`features`, written by ``vllama-jax encode``) and the batches are of the cached kinds
(``caption_features`` / ``instruction_features``).

Decoding, augmentation and tokenization all run where the batch is built, i.e. in the ``mp_prefetch`` worker
processes (one whole batch per worker at a time, as a PyTorch DataLoader worker does). Hosts: host ``h`` of ``H``
reads records ``h, h + H, h + 2H, ...`` of every dataset (disjoint, together the whole dataset) and all hosts draw
the same dataset at the same step (the mixture ignores the host), so a global batch is one dataset.

The iterator is a ``grain.DatasetIterator``: ``get_state()`` / ``set_state()`` (JSON) restore it exactly, and it
checkpoints through Orbax with ``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore`` (see
:func:`checkpoint_args`). A state is only valid for the same datasets, config and ``num_workers``.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import json
import logging
import os
import sys
import threading
import zlib
from pathlib import Path
from typing import Any, Literal, Sequence

import grain
import jax
import numpy as np
from absl import flags
from grain._src.python.ipc.shared_memory_array import SharedMemoryArray

from ..errors import first_line
from ..text.conversation import canonical_template_name
from . import media_io, text_io, transport
from .batch import CACHED_KIND, CAPTION, batch_spec
from .errors import DataError
from .features import FEATURES_DIR, FeatureCache, FeatureReader
from .records import MANIFEST, SCHEMA_VERSION, Kind, MediaType, Record, record_features

_log = logging.getLogger(__name__)

#: grain's shuffle takes 32-bit seeds
_SEED_MOD = 2**32


# ------------------------------------------------------------------------------------------------------------ configs
@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One dataset of a training stage (a ``datasets:`` entry of the upstream configs).

    ``path`` is a folder written by ``vllama-jax prepare``. ``sample_ratio`` is upstream's: the
    probability that a step's batch comes from this dataset is ``sample_ratio / sum(sample_ratios)``. The other
    fields override the format defaults stored in the manifest (``None`` = keep): ``sampling`` "headtail" (WebVid)
    / "uniform" / "random"; ``text_processor`` "blip_caption" (WebVid, cc_sbu, laion) / "none"; ``video_message``
    False drops the "The video contains ..." frame-time message (upstream ``data_type`` containing "cn").
    """

    path: str
    sample_ratio: float = 1.0
    name: str | None = None  # default: the dataset name in the manifest (must be unique within a mixture)
    sampling: str | None = None
    text_processor: Literal["blip_caption", "none"] | None = None
    video_message: bool = True


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Stage-level settings (upstream ``run`` + model + dataset config values); defaults = VL stage 1.

    ``batch_size`` is per host (upstream ``batch_size_train`` is per GPU: multiply by local devices).
    Caption batches use ``end_sym`` / ``max_txt_len``; instruction batches use ``template`` ("vicuna",
    "llama_2" (alias "llama_v2") or "chatml"), ``num_query_tokens`` (32 vision branch / 8 audio branch) and
    ``max_len``. Stage-2 caption batches also get one prompt per batch: ``prompts`` (upstream ``prompt_path``
    lines, each with one ``<ImageHere>``) wrapped in ``prompt_template`` (see ``text_io.caption_prompt_list``).
    """

    tokenizer: str
    batch_size: int
    seed: int = 42
    num_frames: int = 8
    image_size: int = 224
    train: bool = True  # random-crop train transforms (alpro_video_train / blip2_image_train); False = eval
    end_sym: str = "\n"
    max_txt_len: int = 32
    template: str = "vicuna"
    num_query_tokens: int = 32
    max_len: int = 512
    num_workers: int = 0  # grain worker processes (0: build batches in this process)
    worker_buffer_size: int = 2  # batches each worker keeps ready (a B=32 video batch is 38 MB)
    # workers hand their batches' frames over through memory they reuse (``transport``, Linux) instead of a
    # fresh shared-memory block per batch (grain's way, kept where False or not Linux)
    reuse_worker_memory: bool = True
    read_threads: int = 1  # batches built concurrently per process (ReadOptions.num_threads)
    max_retries: int = 10  # replacement attempts for a bad record (upstream WebVid: 10)
    process_index: int | None = None  # None: jax.process_index()
    process_count: int | None = None  # None: jax.process_count()
    prompts: tuple[str, ...] = ()  # stage-2 caption prompts; () = none (stage 1)
    prompt_template: str = ""  # "", a template name ("vicuna", "llama_2") or a format string with {}
    # read the frozen towers' output from each dataset's feature cache of this name (`features.cache_name`)
    # instead of decoding the media; "" = decode the media
    features: str = ""
    feature_towers: str = ""  # the towers' fingerprint the cache must have been encoded with ("" = not checked)

    def validate(self) -> "PipelineConfig":
        for name in ("batch_size", "num_frames", "image_size", "max_txt_len", "max_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise DataError(None, f"PipelineConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("num_query_tokens", "num_workers", "read_threads", "max_retries"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise DataError(None, f"PipelineConfig.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.max_len <= self.num_query_tokens:
            raise DataError(None, f"PipelineConfig.max_len={self.max_len} leaves no room next to "
                                  f"{self.num_query_tokens} query tokens")
        try:
            canonical_template_name(self.template)
        except KeyError as e:
            raise DataError(None, f"PipelineConfig.template: {e.args[0]}") from None
        try:
            text_io.caption_prompt_list(self.prompts, self.prompt_template)
        except (KeyError, ValueError) as e:
            raise DataError(None, f"PipelineConfig.prompts: {e}") from None
        if not Path(self.tokenizer).exists():
            raise DataError(self.tokenizer, "tokenizer not found")
        return self


# -------------------------------------------------------------------------------------------------- prepared datasets
@dataclasses.dataclass(frozen=True)
class PreparedDataset:
    """A prepared folder as described by its manifest."""

    path: Path
    name: str
    kind: Kind
    media_type: MediaType
    num_records: int
    files: tuple[str, ...]
    defaults: dict[str, Any]
    bad: int  # entries skipped by prepare

    @classmethod
    def open(cls, path: str | Path) -> "PreparedDataset":
        path = Path(path).expanduser().absolute()
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise DataError(path, f"no {MANIFEST}: not a prepared dataset (run vllama-jax prepare)")
        try:
            m = json.loads(mpath.read_bytes())
        except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, nested too deep
            raise DataError(mpath, f"corrupt manifest ({first_line(e)})") from None
        try:
            return cls._from_manifest(path, mpath, m)
        except (KeyError, TypeError, ValueError, AttributeError, OSError) as e:  # valid JSON, not a manifest
            raise DataError(mpath, f"corrupt manifest ({type(e).__name__}: {first_line(e)})") from None

    @classmethod
    def _from_manifest(cls, path: Path, mpath: Path, m: Any) -> "PreparedDataset":
        if m.get("schema_version") != SCHEMA_VERSION:
            raise DataError(mpath, f"schema version {m.get('schema_version')} != {SCHEMA_VERSION}; prepare again")
        if not m.get("complete"):
            raise DataError(path, "preparation did not finish; run the same prepare command again to resume")
        files = tuple(str(path / f) for p in m["parts"] for f in p["files"])
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise DataError(missing[0], f"shard listed in {MANIFEST} is missing ({len(missing)} missing)")
        n = int(m["num_records"])
        if n == 0:
            raise DataError(path, "the prepared dataset holds no record")
        defaults = m.get("defaults", {})
        return cls(path=path, name=m["fingerprint"]["dataset"], kind=m.get("kind") or defaults["kind"],
                   media_type=m.get("media_type") or defaults["media_type"], num_records=n, files=files,
                   defaults=defaults, bad=int(m.get("bad", 0)))


class RecordReader:
    """Random access to the :class:`Record` s of a prepared dataset (lazy: opens the shards on first use, so it
    pickles cheaply into grain worker processes)."""

    def __init__(self, files: Sequence[str]):
        self._files = tuple(files)
        self._source = None
        self._features = None

    def __len__(self) -> int:
        return len(self._open())

    def __getitem__(self, index: int) -> Record:
        source = self._open()
        try:
            raw = source[index]
            return Record.from_example(self._features.deserialize_example_np(raw))
        except (IndexError, DataError):
            raise
        except Exception as e:  # noqa: BLE001 - array_record raises RuntimeError for a damaged chunk, and the
            # example's decoding whatever its damaged bytes lead to: either way this record of this shard is bad
            raise DataError(self._file_of(index), f"record {index} is unreadable ({first_line(e)})") from None

    def _file_of(self, index: int) -> str:
        try:  # the shard holding a record: array_record knows, through a private helper
            reader, _ = self._source._reader_idx_and_position(index)
            return self._source._paths[reader]
        except Exception:  # noqa: BLE001 - any other array_record version: name the dataset's folder
            return os.path.commonpath(self._files)

    def _open(self):
        if self._source is None:  # features first: another thread may use them as soon as _source is set
            self._features = record_features()
            try:
                self._source = grain.sources.ArrayRecordDataSource(list(self._files))
            except Exception as e:  # noqa: BLE001 - a shard whose footer/index is damaged fails to open
                raise DataError(os.path.commonpath(self._files), f"cannot open the record shards "
                                                                 f"({first_line(e)})") from None
        return self._source

    def __getstate__(self):
        return {"_files": self._files, "_source": None, "_features": None}


def read_records(path: str | Path) -> RecordReader:
    """All records of a prepared dataset, for inspection and tests: ``read_records(p)[i]`` -> Record."""
    return RecordReader(PreparedDataset.open(path).files)


# ----------------------------------------------------------------------------------------------------------- examples
@dataclasses.dataclass(frozen=True)
class _Source:
    """Everything a worker needs to build examples of one dataset (picklable, resolved settings)."""

    key: int  # stable id of the dataset in the mixture (seeds)
    name: str
    kind: Kind
    media_type: MediaType
    files: tuple[str, ...]
    host_start: int  # host h reads global records h, h + H, ...
    host_step: int
    n_host: int
    sampling: str
    text_processor: str
    video_message: bool
    features: FeatureReader | None = None  # the feature cache to read instead of the media


class _ExampleLoader:
    """(position in the dataset's infinite stream, host-local record index) -> one example dict.

    The randomness of the media transform comes from ``(seed, dataset, epoch, global record index, attempt)``
    only, so an example is the same whichever worker builds it and after any restore. A record that fails
    (missing / corrupt media, too few frames, untokenizable conversation) is replaced by another record of the same
    host drawn from that same RNG (up to ``max_retries`` times, like upstream WebVid) and counted in the example's
    ``num_replaced``; the global indices of the records it replaced are its ``replaced_ids`` (-1 padded).
    """

    def __init__(self, src: _Source, cfg: PipelineConfig):
        self.src, self.cfg = src, cfg
        self._reader = RecordReader(src.files)
        self._text = text_io.TextProcessor(cfg)

    def __call__(self, position: int, local_index: int) -> dict[str, Any]:
        src, cfg = self.src, self.cfg
        epoch = position // src.n_host
        failures: list[str] = []
        replaced = np.full(cfg.max_retries, -1, np.int64)
        for attempt in range(cfg.max_retries + 1):
            g = src.host_start + int(local_index) * src.host_step
            rng = np.random.default_rng([cfg.seed, src.key, epoch, g, attempt])
            try:
                return self._build(self._reader[g], rng, g, epoch) | {"num_replaced": np.int32(attempt),
                                                                      "replaced_ids": replaced}
            except DataError as e:
                if attempt < cfg.max_retries:
                    replaced[attempt] = g
                failures.append(str(e))
                _log.warning("bad record %s #%d replaced: %s", src.name, g, e)
                local_index = int(rng.integers(src.n_host))
        raise DataError(src.files[0], f"{len(failures)} bad records in a row in {src.name}; last: {failures[-1]}")

    def _build(self, rec: Record, rng: np.random.Generator, g: int, epoch: int) -> dict[str, Any]:
        src, cfg = self.src, self.cfg
        if rec.media_type != src.media_type:
            raise DataError(rec.media_path, f"{rec.media_type} record in a {src.media_type} dataset")
        if src.features is not None:  # the frozen towers' output, cached: view e % views at epoch e
            views, msg = src.features[g]
            ex: dict[str, Any] = {"frame_features": views[epoch % len(views)]}
            msg = msg if src.video_message else ""
        else:
            frames, msg = media_io.load_frames(
                rec.media_type, rec.media_path, rec.media_bytes, num_frames=cfg.num_frames, sampling=src.sampling,
                image_size=cfg.image_size, train=cfg.train, rng=rng,
                need_message=src.kind == "instruction" and src.video_message)
            ex = {"frames": frames}
        ex["example_id"] = np.int64(rec.example_id)
        try:
            if src.kind == "caption":
                ids, mask = self._text.caption(rec.caption, src.text_processor)
                ex |= {"text_ids": ids, "text_mask": mask}
            else:
                ids, labels = self._text.instruction(rec.conversations, rec.media_type, msg)
                ex |= {"input_ids": ids, "labels": labels}
        except (ValueError, KeyError, IndexError) as e:  # e.g. a conversation the template cannot render
            raise DataError(rec.source_id, f"cannot tokenize ({e})") from None
        return ex


class _Collate:
    """Examples of one dataset -> the fixed-shape batch dict of its kind (``batch.py``), with the host fields."""

    def __init__(self, kind: Kind, name: str, text: text_io.TextProcessor, cached: bool = False):
        self.kind, self.name, self.text, self.cached = kind, name, text, cached

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        media = "frame_features" if self.cached else "frames"
        arrays = {media: np.stack([e[media] for e in examples])}
        kind = CACHED_KIND[self.kind] if self.cached else self.kind
        if self.kind == CAPTION.kind:
            arrays |= {k: np.stack([e[k] for e in examples]) for k in ("text_ids", "text_mask")}
        else:  # input_ids, labels, attention_mask: padded to max_len
            arrays |= self.text.collate_instruction([(e["input_ids"], e["labels"]) for e in examples])
        arrays = batch_spec(kind).arrays(arrays)
        pool = transport.worker_pool()  # in a worker process: the frames leave through its reused memory
        if pool is not None:
            arrays[media] = pool.put(arrays[media])
        return arrays | {
            "example_id": np.array([e["example_id"] for e in examples], dtype=np.int64),
            "num_replaced": np.array([e["num_replaced"] for e in examples], dtype=np.int32),
            "replaced_ids": np.stack([e["replaced_ids"] for e in examples]),
            "kind": kind, "dataset": self.name}


class _CaptionPrompt:
    """(step, batch) -> the batch, with the stage-2 prompt of that step when it is a caption batch."""

    def __init__(self, text: text_io.TextProcessor, seed: int):
        self.text, self.seed = text, seed

    def __call__(self, step: int, batch: dict[str, Any]) -> dict[str, Any]:
        if batch["kind"] not in (CAPTION.kind, CACHED_KIND[CAPTION.kind]):
            return batch
        return batch | self.text.caption_prompt(step, self.seed)


def with_caption_prompts(batches: grain.MapDataset, cfg: PipelineConfig) -> grain.MapDataset:
    """Stage 2 (``cfg.prompts``): every caption batch gets one prompt, drawn for its step (the index in
    ``batches``, which is the training step): shared ``prompt_before`` / ``prompt_after`` ids. Unchanged without
    prompts."""
    text = text_io.TextProcessor(cfg)
    return batches.map_with_index(_CaptionPrompt(text, cfg.seed)) if text.prompt_list else batches


# ------------------------------------------------------------------------------------------------------------ mixture
class BatchMixture(grain.transforms.DatasetSelectionMap):
    """Step ``i`` -> (dataset k, batch index within k): k drawn with probability ∝ weight, independently per step.

    Choices come in blocks of ``block`` steps from an RNG seeded by ``(seed, block index)``; the number of earlier
    draws of each dataset (the batch index) is a cumulative count kept per block, computed lazily. Deterministic,
    stateless for grain (the caches are memoization), O(1) amortized per step.
    """

    def __init__(self, weights: Sequence[float], seed: int, block: int = 4096):
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or len(w) == 0 or np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
            raise DataError(None, f"sample ratios must be >= 0 with a positive sum, got {list(weights)}")
        self._p = w / w.sum()
        self._seed, self._block = int(seed), int(block)
        self._prefix: list[np.ndarray] = [np.zeros(len(w), np.int64)]  # draws before block b
        self._cache: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()  # grain may index from several prefetch threads

    def __len__(self) -> int:
        return sys.maxsize

    def _choices(self, b: int) -> np.ndarray:
        c = self._cache.get(b)
        if c is None:
            rng = np.random.default_rng([self._seed, 0x6D6978, b])  # "mix"
            c = rng.choice(len(self._p), size=self._block, p=self._p)
            if len(self._cache) > 8:
                self._cache.clear()
            self._cache[b] = c
        return c

    def __getitem__(self, step: int) -> tuple[int, int]:
        b, r = divmod(int(step), self._block)
        with self._lock:
            while len(self._prefix) <= b:
                nb = len(self._prefix) - 1
                self._prefix.append(self._prefix[nb] + np.bincount(self._choices(nb), minlength=len(self._p)))
            c = self._choices(b)
            before = self._prefix[b]
        k = int(c[r])
        return k, int(before[k] + np.count_nonzero(c[:r] == k))

    def __getstate__(self):
        return {**self.__dict__, "_prefix": [self._prefix[0]], "_cache": {}, "_lock": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


# ----------------------------------------------------------------------------------------------------------- pipeline
def _host(cfg: PipelineConfig) -> tuple[int, int]:
    if cfg.process_index is not None or cfg.process_count is not None:
        index, count = cfg.process_index or 0, cfg.process_count or 1
    else:
        index, count = jax.process_index(), jax.process_count()
    if not 0 <= index < count:
        raise DataError(None, f"process_index {index} not in [0, {count})")
    return index, count


def _dataset_key(name: str) -> int:
    return zlib.crc32(name.encode())  # stable across runs and list orders (Python's hash() is salted)


def build_dataset(datasets: Sequence[DatasetSpec], cfg: PipelineConfig) -> grain.IterDataset:
    """The (infinite) grain pipeline of one host for a stage: see the module docstring."""
    if not datasets:
        raise DataError(None, "no dataset given")
    cfg.validate()
    host, hosts = _host(cfg)
    text = text_io.TextProcessor(cfg)
    batched, names = [], set()
    for spec in datasets:
        pd = PreparedDataset.open(spec.path)
        name = spec.name or pd.name
        if name in names:
            raise DataError(spec.path, f"dataset name {name!r} used twice in the mixture; set DatasetSpec.name")
        names.add(name)
        n_host = len(range(host, pd.num_records, hosts))
        if n_host == 0:
            raise DataError(spec.path, f"{pd.num_records} records cannot feed {hosts} hosts")
        sampling = spec.sampling or pd.defaults.get("sampling", "uniform")
        text_processor = spec.text_processor or pd.defaults.get("text_processor", "none")
        if sampling not in ("uniform", "headtail", "random") or text_processor not in ("blip_caption", "none"):
            raise DataError(spec.path, f"unknown sampling {sampling!r} or text_processor {text_processor!r}")
        features = None
        if cfg.features:
            cache = FeatureCache.open(pd.path / FEATURES_DIR / cfg.features, pd.files)
            want = {"num_frames": cfg.num_frames, "image_size": cfg.image_size, "sampling": sampling,
                    "augment": cfg.train}
            cache.check(want | ({"towers": cfg.feature_towers} if cfg.feature_towers else {}))
            features = cache.reader()
        src = _Source(key=_dataset_key(name), name=name, kind=pd.kind, media_type=pd.media_type, files=pd.files,
                      host_start=host, host_step=hosts, n_host=n_host,
                      sampling=sampling, text_processor=text_processor, video_message=spec.video_message,
                      features=features)
        ds = (grain.MapDataset.range(n_host)
              .shuffle(seed=(cfg.seed * 1_000_003 + src.key) % _SEED_MOD)  # new permutation every epoch
              .repeat()
              .map_with_index(_ExampleLoader(src, cfg))
              .batch(cfg.batch_size, drop_remainder=True,
                     batch_fn=_Collate(pd.kind, name, text, cached=features is not None)))
        batched.append(ds)
    mixed = grain.MapDataset.select_from_datasets(batched, BatchMixture([s.sample_ratio for s in datasets],
                                                                        cfg.seed))
    mixed = with_caption_prompts(mixed, cfg)
    it = mixed.to_iter_dataset(grain.ReadOptions(num_threads=max(cfg.read_threads, 0),
                                                 prefetch_buffer_size=max(cfg.read_threads, 1)))
    if cfg.num_workers > 0:
        _absl_flags_ready()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers,
                                                         per_worker_buffer_size=cfg.worker_buffer_size),
                            worker_init_fn=functools.partial(_init_worker, reuse_memory=cfg.reuse_worker_memory,
                                                             max_blocks=cfg.worker_buffer_size + 4))
    return _CountReplaced(it)


def _init_worker(worker_index: int, worker_count: int, *, reuse_memory: bool, max_blocks: int) -> None:
    """grain's ``worker_init_fn``: the allocator settings below, and the worker's pool of batch memory (at most
    ``max_blocks`` batches of each size in flight: the worker's queue, the batch being built and a margin)."""
    del worker_index, worker_count  # the same in every worker
    keep_freed_memory()
    if reuse_memory:
        transport.enable(max_blocks)


def keep_freed_memory() -> None:
    """In a worker process: let glibc's malloc keep the memory it frees instead of handing it back to the OS.

    A sample allocates and frees the same few-MB frame buffers (decoded frames, the crop in float32, the resize's
    passes). By default glibc maps buffers that large afresh (its mmap threshold) and trims the heap's free top, so
    every sample page-faults on tens of MB of new zeroed pages. Measured on a sample's work: a plain loop 63 -> 29
    ms of CPU a sample; built in grain's read thread, as in a worker, 40 -> 37 ms (a thread's arena trims less).
    Kept buffers are reused as they are; a worker's resident memory settles at its peak working set. Not applied to
    the calling process (the trainer itself, for ``num_workers=0``), whose allocations are not this regular."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest: buffers below it come from the heap
    libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)  # free heap top kept up to this
    libc.mallopt(_M_TOP_PAD, 64 << 20)  # heap grown in steps of this


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters (malloc.h)


def _absl_flags_ready() -> None:
    """grain 0.2.18's mp_prefetch reads an absl flag, which raises in programs that never parsed absl flags
    (google/grain#1355, fixed upstream later): mark them parsed (defaults) unless the program did parse them."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def build_train_iterator(datasets: Sequence[DatasetSpec], cfg: PipelineConfig) -> "DataIterator":
    """An iterator of training batches for a stage; ``next(it)`` -> batch dict (see ``FORMATS.md``)."""
    return iter(build_dataset(datasets, cfg))


def checkpoint_args(iterator: grain.DatasetIterator, restore: bool = False):
    """Orbax ``CheckpointArgs`` saving / restoring ``iterator`` (one JSON file per process)::

        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                data=checkpoint_args(it)))
        mngr.restore(step, args=ocp.args.Composite(state=..., data=checkpoint_args(it, restore=True)))
    """
    import grain.checkpoint as gc  # imports orbax (0.6 s): only for checkpointing, not for reading data

    return gc.CheckpointRestore(iterator) if restore else gc.CheckpointSave(iterator)


# --------------------------------------------------------------------------------------------- bad-record counter
class _CountReplaced(grain.IterDataset):
    """Last stage: counts batches and replaced (bad) records; the totals are part of the iterator state."""

    def __init__(self, parent: grain.IterDataset):
        super().__init__(parent)

    def __iter__(self) -> "DataIterator":
        return DataIterator(self._parent.__iter__())

    def __str__(self) -> str:
        return "CountReplaced"


class DataIterator(grain.DatasetIterator):
    """The training iterator: grain's, plus ``stats`` = {"batches": n, "replaced": bad records replaced so far
    (a bad record drawn twice counts twice), "skipped": {dataset: sorted global indices of the distinct bad
    records}}."""

    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self.stats: dict[str, Any] = {"batches": 0, "replaced": 0, "skipped": {}}

    def __next__(self) -> dict[str, Any]:
        batch = {k: transport.receive(v) for k, v in next(self._parent).items()}
        self.stats["batches"] += 1
        self.stats["replaced"] += int(np.sum(batch["num_replaced"]))
        ids = np.asarray(batch["replaced_ids"])
        if (ids >= 0).any():
            seen = set(self.stats["skipped"].get(batch["dataset"], ()))
            # a new dict, not an update in place: a copy of ``stats`` taken earlier keeps its own counts
            self.stats["skipped"] = {**self.stats["skipped"],
                                     batch["dataset"]: sorted(seen | {int(i) for i in ids[ids >= 0]})}
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(),
                "stats": {**self.stats, "skipped": {k: list(v) for k, v in self.stats["skipped"].items()}}}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.stats = {"skipped": {}, **state["stats"]}  # checkpoints written before "skipped" existed

    def close(self) -> None:
        """Stop the worker processes and free every shared-memory block of a batch they made: grain unlinks a
        block when its array is garbage-collected, in a thread pool that a closing program may never run (the
        resource tracker then warns of leaked blocks at exit); flushing that pool here unlinks them now."""
        super().close()
        pool = SharedMemoryArray._del_thread_pool  # grain 0.2.18's pool of pending unlinks (private)
        if pool is not None:
            SharedMemoryArray._del_thread_pool = None  # arrays freed from now on unlink at once
            pool.close()
            pool.join()

    def summary(self) -> str:
        """One line for the end of a run: batches read, bad records replaced, distinct bad records skipped."""
        skipped = self.stats["skipped"]
        n = sum(len(v) for v in skipped.values())
        where = "; ".join(f"{d}: records {', '.join(map(str, v[:20]))}{' ...' if len(v) > 20 else ''}"
                          for d, v in sorted(skipped.items()))
        return (f"data: {self.stats['batches']} batches, {n} bad records skipped"
                + (f" ({where}), replaced {self.stats['replaced']} times" if n else ""))
