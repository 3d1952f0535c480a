"""Prepare an upstream training set into ArrayRecord shards through a TFDS builder (no TensorFlow needed).

    vllama-jax prepare webvid --source ANNO_DIR --media-dir VIDEOS_DIR --out /data/webvid
    vllama-jax prepare llava_instruct --source llava_instruct_150k.json \
        --media-dir /coco/train2014 --out /data/llava_instruct --store-media bytes

Output layout (``OUT``)::

    manifest.json                        what was prepared, from what, part by part (the reader starts here)
    bad_records.jsonl                    every skipped entry: example index, source id, file, reason
    vllama_records/part-00000/1.0.0/     one complete TFDS dataset per part (dataset_info.json, features.json,
        vllama_records-train.array_record-00000-of-0000N)    ArrayRecord shards of tf.train.Example records)

Why parts: TFDS writes a dataset atomically, so one huge builder run cannot resume. The source listing is cut into
parts of ``--records-per-part`` entries (in listing order), each part is one TFDS dataset (a BuilderConfig named
``part-XXXXX``), and the manifest records the parts that completed: a restarted prepare skips them. Every part
directory is an ordinary TFDS dataset (``tfds.builder_from_directory(...)`` reads it).

Entries whose annotation cannot be parsed, whose media file is missing, or whose media does not decode (one
small frame is decoded per entry unless ``--no-check-media``) are skipped, counted and listed, never fatal.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import itertools
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import tensorflow_datasets as tfds  # its ArrayRecord writer and Example codec are numpy-only: no TensorFlow
from tqdm import tqdm

from . import media_io
from .errors import DataError, MediaDecodeError
from .formats import BadItem, SourceItem, get_format
from .records import BAD_RECORDS, MANIFEST, SCHEMA_VERSION, Record, StoreMedia, record_features

BUILDER_NAME = "vllama_records"


class VllamaRecords(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of one part of a prepared dataset: the records of a slice of the source listing."""

    VERSION = tfds.core.Version("1.0.0")
    # TFDS looks for checksums/metadata files next to a builder's source (via the optional importlib_resources
    # package for installed modules); this builder has none, so say so instead of having TFDS probe the package.
    code_path = None

    def __init__(self, *, examples: Callable[[], Iterator[Record]], description: str, metadata: dict[str, Any],
                 **kwargs: Any):
        self._examples = examples
        self._description = description
        self._metadata = metadata
        super().__init__(**kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, description=self._description, features=record_features(),
            metadata=tfds.core.MetadataDict(self._metadata),
            disable_shuffling=True,  # keep listing order; the reader shuffles globally with its own seed
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for rec in self._examples():
            yield rec.example_id, rec.to_example()

    # TFDS prints two banner lines per dataset; with one dataset per part they would drown the progress bar.
    def _log_download_done(self) -> None:
        pass

    def _log_download_bytes(self) -> None:
        pass


@dataclasses.dataclass
class PrepareSummary:
    """What one ``prepare`` call did (also stored, cumulated over resumed runs, in ``manifest.json``)."""

    dataset: str
    out: str
    total: int  # entries in the source listing
    written: int  # records in the shards
    bad: int  # skipped entries (listed in bad_records.jsonl)
    parts: int
    parts_resumed: int  # parts found complete and skipped
    bad_reasons: dict[str, int] = dataclasses.field(default_factory=dict)

    def line(self) -> str:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.bad_reasons.items(), key=lambda kv: -kv[1])[:5])
        return (f"{self.dataset}: {self.written} records written, {self.bad} bad skipped"
                f"{' (' + reasons + ')' if reasons else ''}, {self.parts} parts ({self.parts_resumed} resumed)"
                f" -> {self.out}")


def prepare(
    dataset: str,
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    media_dir: str | os.PathLike[str] | None = None,
    store_media: StoreMedia = "path",
    records_per_part: int = 5000,
    check_media: bool = True,
    workers: int = 4,
    overwrite: bool = False,
    progress: bool = True,
) -> PrepareSummary:
    """Turn the upstream ``dataset`` at ``source`` into ArrayRecord shards under ``out`` (resumable).

    ``store_media="bytes"`` copies each media file into its record so that ``out`` can be moved without the
    media tree; ``"path"`` stores the absolute media path. Raises :class:`DataError` for unusable input (unknown
    dataset, missing source, an annotation file that does not parse, ``out`` holding a different preparation).
    """
    fmt = get_format(dataset)
    if store_media not in ("path", "bytes"):
        raise DataError(None, f"store_media must be 'path' or 'bytes', not {store_media!r}")
    if records_per_part < 1:
        raise DataError(None, "records_per_part must be >= 1")
    source = Path(source).expanduser().absolute()
    media_root = Path(media_dir).expanduser().absolute() if media_dir is not None else None
    if media_root is not None and not media_root.is_dir():
        raise DataError(media_root, "media dir does not exist")
    out = Path(out).expanduser().absolute()
    files = fmt.source_files(source)
    effective_store = "bytes" if fmt.embeds_media else store_media
    fingerprint = {
        "dataset": dataset, "source": str(source), "media_dir": str(media_root) if media_root else None,
        "store_media": effective_store, "records_per_part": records_per_part, "check_media": check_media,
        "files": [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
    }
    manifest = _open_manifest(out, fingerprint, overwrite)
    defaults = fmt.defaults
    manifest.setdefault("defaults", dataclasses.asdict(defaults))

    tfds.disable_progress_bar()  # ours below counts records across all parts
    logging.getLogger("absl").setLevel(logging.ERROR)  # "Using custom data configuration part-XXXXX" per part

    # Listing is cheap for annotation files, so count first for a real progress bar; tars would be read twice.
    total = None if fmt.embeds_media else sum(1 for _ in fmt.iter_items(source, media_root))
    bar = _progress(total, dataset, progress)
    parts_done = {p["name"]: p for p in manifest["parts"] if p.get("complete")}
    resumed = 0
    items = fmt.iter_items(source, media_root)
    try:
        for part_no in itertools.count():
            chunk = list(itertools.islice(items, records_per_part))
            if not chunk:
                break
            name = f"part-{part_no:05d}"
            if name in parts_done and all((out / f).is_file() for f in parts_done[name]["files"]):
                resumed += 1
                bar.update(len(chunk))
                _track_kind(manifest, parts_done[name])
                continue
            part = _prepare_part(out, name, chunk, manifest, effective_store == "bytes",
                                 check_media, workers, bar)
            manifest["parts"] = [p for p in manifest["parts"] if p["name"] != name] + [part]
            manifest["parts"].sort(key=lambda p: p["name"])
            _track_kind(manifest, part)
            _write_json(out / MANIFEST, manifest)
    finally:
        bar.close()
    return _finish(out, manifest, dataset, resumed)


def _prepare_part(out: Path, name: str, chunk: Sequence[SourceItem | BadItem],
                  manifest: dict[str, Any], store_bytes: bool, check_media: bool, workers: int,
                  bar) -> dict[str, Any]:
    part_dir = out / BUILDER_NAME / name
    if part_dir.exists():  # a part not recorded as complete is redone from scratch (it may be partial)
        shutil.rmtree(part_dir)
    bad: list[BadItem] = []
    counts = {"video": 0, "image": 0, "caption": 0, "instruction": 0}
    bad_before = sum(p["num_bad"] for p in manifest["parts"] if p["name"] < name)  # for the progress bar

    def examples() -> Iterator[Record]:
        for result in ordered_map(lambda it: _materialize(it, store_bytes, check_media), chunk, workers):
            bar.update(1)
            if isinstance(result, BadItem):
                bad.append(result)
                bar.set_postfix(bad=bad_before + len(bad), refresh=False)
                continue
            counts[result.media_type] += 1
            counts[result.kind] += 1
            yield result

    meta = {"schema_version": SCHEMA_VERSION, "dataset": manifest["fingerprint"]["dataset"], "part": name}
    builder = VllamaRecords(examples=examples, description=f"vllama-jax {meta['dataset']} {name}", metadata=meta,
                          config=tfds.core.BuilderConfig(name=name), data_dir=str(out),
                          file_format="array_record")
    tmp_downloads = out / ".tfds_downloads"
    try:
        builder.download_and_prepare(download_dir=str(tmp_downloads))
    except AssertionError:
        # TFDS refuses to finish a split that received no example: a part whose every entry is bad is an empty
        # part (no shard), not a failed preparation
        if counts["caption"] + counts["instruction"]:
            raise
        shutil.rmtree(part_dir, ignore_errors=True)
        num_records, files = 0, []
    else:
        split = builder.info.splits["train"]
        num_records, files = int(split.num_examples), [str(Path(f).relative_to(out)) for f in split.filepaths]
    shutil.rmtree(tmp_downloads, ignore_errors=True)
    bad_file = out / "bad" / f"{name}.jsonl"
    bad_file.parent.mkdir(parents=True, exist_ok=True)
    bad_file.write_text("".join(json.dumps(b.to_json()) + "\n" for b in bad))
    return {"name": name, "complete": True, "entries": len(chunk), "num_records": num_records,
            "num_bad": len(bad), "files": files, "counts": counts,
            "bad_reasons": dict(collections.Counter(_reason_class(b.reason) for b in bad))}


def _materialize(item: SourceItem | BadItem, store_bytes: bool, check_media: bool) -> Record | BadItem:
    """Listing entry -> record (reading the media bytes if stored, probing the media if asked) or BadItem."""
    if isinstance(item, BadItem):
        return item
    data = item.media_bytes
    try:
        _check_text(item)
        if data is None:
            if not os.path.isfile(item.media_path):
                raise DataError(item.media_path, "media file not found")
            if store_bytes:
                data = Path(item.media_path).read_bytes()
        if check_media:
            media_io.probe(item.media_type, item.media_path, data)
    except MediaDecodeError as e:
        return BadItem(item.index, item.source_id, item.media_path, f"media does not decode: {e.reason}")
    except DataError as e:
        return BadItem(item.index, item.source_id, item.media_path, e.reason)
    except OSError as e:
        return BadItem(item.index, item.source_id, item.media_path, f"cannot read media ({e.strerror or e})")
    except ValueError as e:  # a NUL byte or a lone surrogate in the media path: no file can have that name
        return BadItem(item.index, item.source_id, item.media_path[:200], f"not a usable media path ({e})")
    return Record(example_id=item.index, source_id=item.source_id, media_type=item.media_type,
                  media_path=item.media_path, media_bytes=data or b"", caption=item.caption,
                  conversations=item.conversations, meta=item.meta)


def _check_text(item: SourceItem) -> None:
    """Records store UTF-8: a caption or turn holding a lone surrogate (a JSON ``\\ud800`` escape) is a bad entry
    here, not a failure of the shard writer later."""
    for text in (item.source_id, item.caption, item.media_path, *(t.value for t in item.conversations)):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(item.source_id, f"text is not valid Unicode ({e.reason} at character {e.start})") from None


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int) -> Iterator[Any]:
    """``map`` on a thread pool, in order, with a bounded number of items in flight (bytes can be large)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with cf.ThreadPoolExecutor(workers) as pool:
        pending: collections.deque[cf.Future] = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _reason_class(reason: str) -> str:
    """Group bad-record reasons for the one-line summary ("media file not found", "malformed JSON line", ...)."""
    return reason.split(" (")[0].split(": ")[0][:60]


def _track_kind(manifest: dict[str, Any], part: dict[str, Any]) -> None:
    c = part["counts"]
    for key, a, b in (("media_type", "video", "image"), ("kind", "caption", "instruction")):
        seen = [k for k in (a, b) if c.get(k)]
        if len(seen) > 1 or (seen and manifest.get(key) not in (None, seen[0])):
            raise DataError(part["name"], f"dataset mixes {a} and {b} records")
        if seen:
            manifest[key] = seen[0]


def _open_manifest(out: Path, fingerprint: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    path = out / MANIFEST
    if path.exists():
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise DataError(path, "corrupt manifest; pass overwrite (--overwrite) to start over") from None
        if manifest.get("fingerprint") == fingerprint and manifest.get("schema_version") == SCHEMA_VERSION:
            return manifest
        if not overwrite:
            raise DataError(out, "holds a preparation of a different source or with other options; "
                                 "pass --overwrite to replace it or choose another --out")
    if overwrite:
        for name in (MANIFEST, BAD_RECORDS, "bad", BUILDER_NAME, ".tfds_downloads"):
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    elif out.exists() and any(out.iterdir()):
        raise DataError(out, "exists, is not empty and has no manifest.json; choose an empty --out")
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"schema_version": SCHEMA_VERSION, "fingerprint": fingerprint, "parts": [], "complete": False}
    _write_json(path, manifest)
    return manifest


def _finish(out: Path, manifest: dict[str, Any], dataset: str, resumed: int) -> PrepareSummary:
    parts = manifest["parts"]
    reasons: collections.Counter[str] = collections.Counter()
    for p in parts:
        reasons.update(p.get("bad_reasons", {}))
    with open(out / BAD_RECORDS, "w") as f:  # one list of every skipped entry, over all parts and runs
        for p in parts:
            bad_file = out / "bad" / f"{p['name']}.jsonl"
            if bad_file.exists():
                f.write(bad_file.read_text())
    manifest.update(
        complete=True, total=sum(p["entries"] for p in parts), num_records=sum(p["num_records"] for p in parts),
        bad=sum(p["num_bad"] for p in parts), bad_reasons=dict(reasons),
        store_media=manifest["fingerprint"]["store_media"],
    )
    _write_json(out / MANIFEST, manifest)
    return PrepareSummary(dataset=dataset, out=str(out), total=manifest["total"], written=manifest["num_records"],
                          bad=manifest["bad"], parts=len(parts), parts_resumed=resumed, bad_reasons=dict(reasons))


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written manifest


def _progress(total: int | None, dataset: str, enabled: bool):
    return tqdm(total=total, desc=f"prepare {dataset}", unit="rec", disable=not enabled, dynamic_ncols=True)
