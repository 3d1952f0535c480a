"""The record stored in the prepared ArrayRecord shards (one schema for every upstream format).

Why raw text instead of token ids: one prepared dataset then serves both conversation templates (Vicuna /
LLaMA-2), any number of query tokens (32 for the vision branch, 8 for the audio branch), any ``max_txt_len`` and
any tokenizer; tokenizing a few hundred tokens is cheap next to decoding 8 video frames, so it costs nothing to do
it in the reading workers. Caption cleaning (``blip_caption``) is also applied at read time for the same reason.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

import numpy as np

MediaType = Literal["video", "image"]
StoreMedia = Literal["path", "bytes"]
Kind = Literal["caption", "instruction"]

#: bump when the feature layout changes; the reader refuses other versions.
SCHEMA_VERSION = 1
#: file names of a prepared folder (see ``prepare``)
MANIFEST = "manifest.json"
BAD_RECORDS = "bad_records.jsonl"


@dataclasses.dataclass(frozen=True)
class Turn:
    """One conversation turn: ``role`` is "human" or "gpt" (the upstream LLaVA/VideoChat spelling)."""

    role: str
    value: str


@dataclasses.dataclass(frozen=True)
class Record:
    """One training example as stored (before media decoding and tokenization).

    ``example_id`` is the position of the entry in the source listing (stable across re-preparation, so a NaN loss
    can be traced back to the annotation line). ``media_path`` is always filled (the original location, or
    ``"shard.tar#key.jpg"`` for webdataset members); ``media_bytes`` is non-empty when the dataset was prepared
    with ``--store-media bytes``.
    """

    example_id: int
    source_id: str
    media_type: MediaType
    media_path: str
    media_bytes: bytes = b""
    caption: str = ""
    conversations: tuple[Turn, ...] = ()
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def kind(self) -> Kind:
        return "instruction" if self.conversations else "caption"

    def to_example(self) -> dict[str, Any]:
        """The dict TFDS serializes (see :func:`record_features`)."""
        return {
            "example_id": np.int64(self.example_id),
            "source_id": self.source_id,
            "media_type": self.media_type,
            "media_path": self.media_path,
            "media_bytes": self.media_bytes,
            "caption": self.caption,
            "conversations": {"from": [t.role for t in self.conversations],
                              "value": [t.value for t in self.conversations]},
            "meta": json.dumps(self.meta, sort_keys=True),
        }

    @classmethod
    def from_example(cls, ex: dict[str, Any]) -> "Record":
        """Inverse of :meth:`to_example` applied to TFDS' numpy deserialization (text comes back as bytes)."""
        conv = ex["conversations"]
        return cls(
            example_id=int(ex["example_id"]),
            source_id=_text(ex["source_id"]),
            media_type=_text(ex["media_type"]),  # type: ignore[arg-type]
            media_path=_text(ex["media_path"]),
            media_bytes=bytes(ex["media_bytes"]),
            caption=_text(ex["caption"]),
            conversations=tuple(Turn(_text(r), _text(v)) for r, v in zip(conv["from"], conv["value"])),
            meta=json.loads(_text(ex["meta"]) or "{}"),
        )


def _text(x: Any) -> str:
    return x.decode("utf-8") if isinstance(x, (bytes, np.bytes_)) else str(x)


def record_features():
    """TFDS feature spec of a :class:`Record` (numpy-only code paths: no TensorFlow needed to write or read)."""
    import tensorflow_datasets as tfds  # heavy import kept local: only prepare and the readers need it

    text = tfds.features.Text
    return tfds.features.FeaturesDict({
        "example_id": np.int64,
        "source_id": text(),
        "media_type": text(),
        "media_path": text(),
        "media_bytes": tfds.features.Tensor(shape=(), dtype=np.object_),
        "caption": text(),
        "conversations": tfds.features.Sequence({"from": text(), "value": text()}),
        "meta": text(),
    })
