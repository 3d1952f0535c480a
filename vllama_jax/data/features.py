"""A prepared dataset's feature cache: the frozen towers' output per record, stored beside the records.

The ViT, the image Q-Former and ImageBind never train, so without augmentation their output for a clip is the same
every epoch. ``vllama-jax encode`` (:mod:`vllama_jax.train.encode`) runs them once over a prepared dataset and
writes what they give; a training config with ``data.features: cached`` reads that instead of decoding the media,
and its step skips the towers (batch kinds ``caption_features`` / ``instruction_features``, `data.batch`).

Layout, beside the records (``DATA`` is a folder written by ``vllama-jax prepare``)::

    DATA/features/<branch>-<T>f/features.json          what was encoded, with what (the reader starts here)
    DATA/features/<branch>-<T>f/<record shard path>    one ArrayRecord file per record shard, record i of it
                                                       holding the features of record i of that shard
    DATA/features/<branch>-<T>f/<record shard path>.done.json    written when that file is complete (resume)

``branch`` is ``video`` (the image Q-Former's queries per frame, (Q, hidden)) or ``audio`` (ImageBind's vision
embedding per frame, (out_dim,): upstream trains the audio branch on frames). A record holds ``views`` draws of the
media preprocessing ((views, T, ...) in ``dtype``; one draw without augmentation), the frame-time message of the
video (instruction datasets put it in the prompt) and nothing else; a record whose media did not decode holds an
empty array and the reason, and reading it raises `DataError`, which the pipeline answers as for any bad record.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path
from typing import Any, Mapping, Sequence

import grain
import ml_dtypes
import numpy as np

from ..errors import first_line
from .errors import DataError

FEATURES_DIR = "features"
FEATURES_MANIFEST = "features.json"
DONE_SUFFIX = ".done.json"
#: bump when the record layout changes; the reader refuses other versions
FEATURES_SCHEMA_VERSION = 1
#: the dtypes a cache may hold (name -> numpy dtype)
DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16),
          "float32": np.dtype(np.float32)}


def cache_name(branch: str, num_frames: int) -> str:
    """The folder of a branch's cache at a frame count, under ``DATA/features``."""
    return f"{branch}-{num_frames}f"


def cache_dir(data_dir: str | Path, branch: str, num_frames: int) -> Path:
    return Path(data_dir).expanduser().absolute() / FEATURES_DIR / cache_name(branch, num_frames)


# ----------------------------------------------------------------------------------------------------------------
# one record: [u32 header length][JSON header][array bytes]


def pack_record(features: np.ndarray | None, message: str = "", error: str = "") -> bytes:
    """One record's bytes: the features (views, T, ...) with the video's frame-time message, or, for a record
    whose media failed, no array and the ``error``."""
    header = json.dumps({"message": message, "error": error}).encode()
    body = b"" if features is None else np.ascontiguousarray(features).tobytes()
    return struct.pack("<I", len(header)) + header + body


def unpack_record(raw: bytes, dtype: np.dtype, shape: Sequence[int], where: str) -> tuple[np.ndarray, str]:
    """(features (views, T, ...) as stored, message); DataError naming ``where`` for a bad record."""
    try:
        (n,) = struct.unpack_from("<I", raw)
        header = json.loads(raw[4:4 + n])
        body = raw[4 + n:]
    except (struct.error, ValueError) as e:
        raise DataError(where, f"damaged feature record ({first_line(e)})") from None
    if header.get("error"):
        raise DataError(where, f"no features: {header['error']}")
    arr = np.frombuffer(body, dtype)
    size = int(np.prod(shape))
    if arr.size % size or arr.size == 0:
        raise DataError(where, f"feature record of {arr.size} values does not hold frames of shape {tuple(shape)}")
    return arr.reshape((-1,) + tuple(shape)), header.get("message", "")


# ----------------------------------------------------------------------------------------------------------------
# the manifest and the reader


@dataclasses.dataclass(frozen=True)
class FeatureCache:
    """A complete feature cache as its manifest describes it (see the module docstring)."""

    path: Path
    settings: dict[str, Any]  # branch, num_frames, image_size, sampling, augment, views, dtype, towers, ...
    frame_shape: tuple[int, ...]  # (T, ...) of one view
    files: tuple[str, ...]  # one per record shard, in the records' order

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.settings["dtype"]]

    @classmethod
    def open(cls, path: str | Path, record_files: Sequence[str]) -> "FeatureCache":
        """The cache at ``path`` (``DATA/features/<name>``) for a dataset whose record shards are ``record_files``
        (DataError if it is missing, unfinished, or was encoded from other records). Paths are kept relative to
        ``DATA``: a dataset moved with its cache keeps it."""
        path = Path(path)
        mpath = path / FEATURES_MANIFEST
        if not mpath.is_file():
            raise DataError(path, "no feature cache here: run `vllama-jax encode` on the dataset first (or set "
                                  "data.features: frames)")
        try:
            m = json.loads(mpath.read_bytes())
            if m.get("schema_version") != FEATURES_SCHEMA_VERSION:
                raise DataError(mpath, f"schema version {m.get('schema_version')} != {FEATURES_SCHEMA_VERSION}; "
                                       "encode again with --overwrite")
            settings, shards = m["settings"], m["shards"]
            frame_shape = tuple(int(x) for x in m["frame_shape"])
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(mpath, f"corrupt feature manifest ({first_line(e)})") from None
        data_dir = path.parent.parent  # DATA/features/<name>
        records = [str(Path(f).absolute().relative_to(data_dir)) for f in record_files]
        if [s["records"] for s in shards] != records:
            raise DataError(path, "was encoded from other record shards than the dataset has now (prepared again?);"
                                  " encode again with --overwrite")
        files = tuple(str(path / s["file"]) for s in shards)
        unfinished = [f for f in files if not Path(f + DONE_SUFFIX).is_file()]
        if unfinished:
            raise DataError(path, f"encoding did not finish ({len(unfinished)} of {len(files)} shards missing); "
                                  "run the same `vllama-jax encode` command again to resume")
        return cls(path=path, settings=settings, frame_shape=frame_shape, files=files)

    def check(self, want: Mapping[str, Any]) -> None:
        """DataError when a setting the training run needs differs from the one the features were made with."""
        diff = {k: (self.settings.get(k), v) for k, v in want.items() if self.settings.get(k) != v}
        if diff:
            what = "; ".join(f"{k}: cached {a!r}, this run {b!r}" for k, (a, b) in diff.items())
            hint = (" (data.augment draws new random crops every epoch, which a cache of fixed views cannot "
                    "give: set data.augment: false, or encode augmented views with `vllama-jax encode --augment "
                    "--views N`)" if "augment" in diff else
                    " (the towers' architecture or compute precision differ: encode with the run's model and "
                    "`--precision` = its model.precision)" if "towers" in diff else "")
            raise DataError(self.path, f"the cached features do not fit this run ({what}){hint}; encode again "
                                       "with matching settings (--overwrite)")

    def reader(self) -> "FeatureReader":
        return FeatureReader(self.files, self.dtype, self.frame_shape)


class FeatureReader:
    """Random access to a cache's records by global record index (lazy, picklable into grain workers)."""

    def __init__(self, files: Sequence[str], dtype: np.dtype, frame_shape: Sequence[int]):
        self._files, self._dtype, self._shape = tuple(files), np.dtype(dtype), tuple(frame_shape)
        self._source = None

    def __getitem__(self, index: int) -> tuple[np.ndarray, str]:
        """(features (views, T, ...), frame-time message) of record ``index``."""
        if self._source is None:
            try:
                self._source = grain.sources.ArrayRecordDataSource(list(self._files))
            except Exception as e:  # noqa: BLE001 - a damaged footer or index fails to open
                raise DataError(os.path.commonpath(self._files), f"cannot open the feature shards "
                                                                 f"({first_line(e)})") from None
        try:
            raw = self._source[index]
        except IndexError:
            raise
        except Exception as e:  # noqa: BLE001 - array_record raises RuntimeError for a damaged chunk
            raise DataError(os.path.commonpath(self._files), f"feature record {index} is unreadable "
                                                             f"({first_line(e)})") from None
        return unpack_record(raw, self._dtype, self._shape, f"{os.path.commonpath(self._files)} #{index}")

    def __getstate__(self):
        return {"_files": self._files, "_dtype": self._dtype, "_shape": self._shape, "_source": None}


__all__ = ["DTYPES", "FEATURES_DIR", "FEATURES_MANIFEST", "FeatureCache", "FeatureReader", "cache_dir",
           "cache_name", "pack_record", "unpack_record"]
