"""What every upstream format reader yields, and shared parsing helpers.

A format reader only *lists* the entries of a source (parsing annotation files, never decoding media): it yields a
:class:`SourceItem` for each entry that could be parsed and a :class:`BadItem` for each that could not, in a
deterministic order (that order defines ``example_id`` and the resumable parts of ``prepare``).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterator, Protocol

from ..errors import DataError
from ..records import Kind, MediaType, Turn


@dataclasses.dataclass(frozen=True)
class SourceItem:
    """One parsed entry of an upstream source, before its media is checked."""

    index: int  # position in the listing -> example_id
    source_id: str  # human-readable origin, e.g. "results_2M_train.csv:17"
    media_type: MediaType
    media_path: str
    caption: str = ""
    conversations: tuple[Turn, ...] = ()
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    media_bytes: bytes | None = None  # set by formats whose media live inside the source (webdataset tars)


@dataclasses.dataclass(frozen=True)
class BadItem:
    """An entry skipped by ``prepare`` (listed in the summary and in ``bad_records.jsonl``)."""

    index: int
    source_id: str
    path: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class FormatDefaults:
    """Read-time defaults of a format (the upstream dataset builder's choices); a DatasetSpec may override them."""

    kind: Kind | None  # None: decided by the data (jsonl)
    media_type: MediaType | None
    sampling: str = "uniform"  # video frame sampling
    text_processor: str = "none"  # "blip_caption" or "none" (captions only)


class SourceFormat(Protocol):
    """A reader of one upstream distribution format."""

    name: str
    defaults: FormatDefaults
    #: True when media always come out of the source itself (then they are always stored as bytes)
    embeds_media: bool

    def source_files(self, source: Path) -> list[Path]:
        """Annotation / shard files that make up the source (fingerprinted for resumable prepare)."""

    def iter_items(self, source: Path, media_dir: Path | None) -> Iterator[SourceItem | BadItem]:
        """Every entry, in a deterministic order."""


def require_exists(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(path, f"{what} does not exist")
    return path


def listed_files(source: Path, pattern: str, what: str, none_found: str) -> list[Path]:
    """``source`` itself, or the files matching ``pattern`` in it when it is a folder (sorted); DataError if none."""
    require_exists(source, what)
    files = sorted(source.glob(pattern)) if source.is_dir() else [source]
    if not files:
        raise DataError(source, none_found)
    return files


def json_list_entries(source: Path, media_dir: Path | None, *, dataset: str, media_dir_is: str,
                      entry: str) -> Iterator[tuple[int, str, Any]]:
    """``(index, source_id, entry)`` of a JSON-list annotation file whose media paths are relative to
    ``--media-dir`` (required: ``media_dir_is`` says what it is); ``entry`` names the expected entry layout."""
    if media_dir is None:
        raise DataError(source, f"{dataset} needs --media-dir ({media_dir_is})")
    data = load_json(source)
    if not isinstance(data, list):
        raise DataError(source, f"expected a JSON list of {entry}")
    for i, item in enumerate(data):
        yield i, f"{source.name}[{i}]", item


def load_json(path: Path) -> Any:
    """Parse a whole JSON annotation file; a file that does not parse is fatal (nothing in it can be trusted)."""
    require_exists(path, "annotation file")
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested too deep
        raise DataError(path, f"not valid JSON ({e})") from None


def parse_turns(conversations: Any) -> tuple[Turn, ...]:
    """Validate an upstream ``[{"from": "human"|"gpt", "value": str}, ...]`` list; raise ValueError if malformed."""
    if not isinstance(conversations, list) or not conversations:
        raise ValueError("'conversations' must be a non-empty list")
    turns = []
    for t in conversations:
        if not isinstance(t, dict) or t.get("from") not in ("human", "gpt") or not isinstance(t.get("value"), str):
            raise ValueError(f"bad turn {str(t)[:80]!r} (need {{'from': 'human'|'gpt', 'value': str}})")
        turns.append(Turn(t["from"], t["value"]))
    if not any(t.role == "gpt" for t in turns):
        raise ValueError("conversation has no 'gpt' turn (nothing to learn)")
    return tuple(turns)


def resolve(path: str, root: Path) -> str:
    """``path`` made absolute against ``root`` (absolute paths are kept)."""
    p = Path(os.path.expanduser(path))
    return str(p if p.is_absolute() else (root / p))
