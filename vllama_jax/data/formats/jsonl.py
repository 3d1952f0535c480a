"""The project's own JSONL format for custom data (documented in ``vllama_jax/data/FORMATS.md``).

One JSON object per line::

    {"video": "clips/a.mp4", "caption": "a dog runs"}
    {"image": "imgs/b.jpg", "conversations": [{"from": "human", "value": "What is this?"},
                                              {"from": "gpt", "value": "A cat."}]}

Relative media paths resolve against ``--media-dir`` (default: the JSONL file's folder). An optional ``"id"``
is kept as the source id. One dataset holds one kind (all captions or all conversations) and one media type
(all videos or all images) so that every batch has one fixed shape; lines that differ from the first good line
are skipped and counted.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from .base import BadItem, FormatDefaults, SourceItem, parse_turns, require_exists, resolve


class JsonLines:
    name = "jsonl"
    defaults = FormatDefaults(kind=None, media_type=None, sampling="uniform")
    embeds_media = False

    def source_files(self, source: Path) -> list[Path]:
        return [require_exists(source, "JSONL file")]

    def iter_items(self, source: Path, media_dir: Path | None) -> Iterator[SourceItem | BadItem]:
        root = media_dir if media_dir is not None else source.parent
        first: tuple[str, str] | None = None  # (kind, media type) of the first good line
        index = 0
        with open(source, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue  # blank lines are not entries
                sid = f"{source.name}:{line_no}"
                try:
                    item = self._parse(index, sid, raw, root)
                    key = (item.kind_name, item.media_type)
                    if first is None:
                        first = key
                    elif key != first:
                        raise ValueError(f"{key[0]} {key[1]} entry in a dataset of {first[0]} {first[1]} "
                                         "entries (prepare different kinds / media types as separate datasets)")
                    yield item.item
                except ValueError as e:
                    yield BadItem(index, sid, str(source), str(e))
                index += 1

    @staticmethod
    def _parse(index: int, sid: str, raw: bytes, root: Path) -> "_Parsed":
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested too deep
            raise ValueError(f"malformed JSON line ({e.msg if hasattr(e, 'msg') else e})") from None
        if not isinstance(obj, dict):
            raise ValueError("line is not a JSON object")
        media = [k for k in ("video", "image") if isinstance(obj.get(k), str)]
        if len(media) != 1:
            raise ValueError("need exactly one of 'video' / 'image' (a path string)")
        media_type = media[0]
        has_caption, has_conv = isinstance(obj.get("caption"), str), "conversations" in obj
        if has_caption == has_conv:
            raise ValueError("need exactly one of 'caption' (string) / 'conversations' (list)")
        turns = parse_turns(obj["conversations"]) if has_conv else ()
        sid = str(obj["id"]) if "id" in obj else sid
        item = SourceItem(index, sid, media_type, resolve(obj[media_type], root),
                          caption=obj.get("caption", "") if has_caption else "", conversations=turns)
        return _Parsed(item, "instruction" if has_conv else "caption", media_type)


class _Parsed:
    __slots__ = ("item", "kind_name", "media_type")

    def __init__(self, item: SourceItem, kind_name: str, media_type: str):
        self.item, self.kind_name, self.media_type = item, kind_name, media_type
