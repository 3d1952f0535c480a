"""``cc_sbu`` / ``laion`` webdataset shards: tar files whose members are grouped by key (``{key}.jpg`` +
``{key}.json`` with a ``caption`` field; a ``{key}.txt`` caption is accepted too). The source is a folder of
``*.tar``, one tar, a glob, or a brace list as the upstream configs write ``storage``
(``/path/cc_sbu_dataset/{00000..01255}.tar``, expanded as webdataset's ``braceexpand`` does).

The images live inside the tars, so their bytes are always stored in the records (``media_path`` keeps
``shard.tar#key.jpg`` for naming). Upstream reads these shards with resampling and a 1000-element shuffle buffer;
here the prepared records are shuffled globally at read time instead.
"""
from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path
from typing import Iterator

from ..errors import DataError
from .base import BadItem, FormatDefaults, SourceItem, listed_files

_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Shard names of an upstream ``storage`` pattern: ``{00000..00002}`` (a numeric range, zero-padded to its
    bounds' width) and ``{a,b}`` (alternatives), as ``braceexpand``; other braces are kept as written."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        a, b = rng.groups()
        width = max(len(a), len(b)) if a.startswith("0") or b.startswith("0") else 0
        step = 1 if int(a) <= int(b) else -1
        choices = [str(i).zfill(width) for i in range(int(a), int(b) + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:
        return [head + "{" + body + "}" + t for t in expand_braces(tail)]
    return [head + c + t for c in choices for t in expand_braces(tail)]


def _split_key(name: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first dot of the basename."""
    dirname, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{dirname}/{stem}" if dirname else stem), ext.lower()


class WebDatasetCaptions:
    defaults = FormatDefaults(kind="caption", media_type="image", text_processor="blip_caption")
    embeds_media = True

    def __init__(self, name: str):
        self.name = name

    def source_files(self, source: Path) -> list[Path]:
        none_found = "no *.tar webdataset shard found"
        if "{" in str(source):
            files = [Path(p) for p in expand_braces(str(source))]
            missing = [p for p in files if not p.is_file()]
            if missing:
                raise DataError(missing[0], f"webdataset shard of the list {source.name} does not exist "
                                            f"({len(missing)} of {len(files)} missing)")
            return files
        if not any(c in str(source) for c in "*?["):
            return listed_files(source, "*.tar", "webdataset source", none_found)
        files = sorted(Path(source.anchor or ".").glob(str(source.relative_to(source.anchor or "."))))
        if not files:
            raise DataError(source, none_found)
        return files

    def iter_items(self, source: Path, media_dir: Path | None) -> Iterator[SourceItem | BadItem]:
        index = 0
        for shard in self.source_files(source):
            for item in self._shard_items(shard, index):
                yield item
                index += 1

    def _shard_items(self, shard: Path, start: int) -> Iterator[SourceItem | BadItem]:
        index = start
        group_key: str | None = None
        group: dict[str, bytes] = {}
        try:
            with tarfile.open(shard, "r|*") as tar:  # streaming: shards can be large
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = _split_key(member.name)
                    if key != group_key and group_key is not None:
                        yield self._make_item(index, shard, group_key, group)
                        index += 1
                        group = {}
                    group_key = key
                    f = tar.extractfile(member)
                    group[ext] = f.read() if f is not None else b""
        except (tarfile.TarError, OSError, EOFError) as e:
            if group_key is not None and group:
                yield self._make_item(index, shard, group_key, group)
                index += 1
            yield BadItem(index, f"{shard.name}#<rest>", str(shard), f"unreadable tar shard ({e}); rest skipped")
            return
        if group_key is not None:
            yield self._make_item(index, shard, group_key, group)

    @staticmethod
    def _make_item(index: int, shard: Path, key: str, group: dict[str, bytes]) -> SourceItem | BadItem:
        sid = f"{shard.name}#{key}"
        img_ext = next((e for e in _IMAGE_EXTS if e in group), None)
        if img_ext is None:
            return BadItem(index, sid, str(shard), f"sample {key!r} has no image member")
        caption = None
        if "json" in group:
            try:
                caption = json.loads(group["json"]).get("caption")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                return BadItem(index, sid, str(shard), f"sample {key!r}: malformed json member")
        if caption is None and "txt" in group:
            caption = group["txt"].decode("utf-8", errors="replace")
        if not isinstance(caption, str):
            return BadItem(index, sid, str(shard), f"sample {key!r} has no caption")
        return SourceItem(index, sid, "image", f"{shard}#{key}.{img_ext}", caption=caption,
                          media_bytes=group[img_ext], meta={"key": key})
