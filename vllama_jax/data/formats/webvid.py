"""WebVid-2M/2.5M: every ``*.csv`` of ``anno_dir`` (columns videoid, page_dir, name);
video file ``videos_dir/{page_dir}/{videoid}.mp4``."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator

from ..errors import DataError
from .base import BadItem, FormatDefaults, SourceItem, listed_files

_COLUMNS = ("videoid", "page_dir", "name")


class WebVid:
    name = "webvid"
    defaults = FormatDefaults(kind="caption", media_type="video", sampling="headtail", text_processor="blip_caption")
    embeds_media = False

    def source_files(self, source: Path) -> list[Path]:
        return listed_files(source, "*.csv", "WebVid anno_dir", "no *.csv annotation file in WebVid anno_dir")

    def iter_items(self, source: Path, media_dir: Path | None) -> Iterator[SourceItem | BadItem]:
        if media_dir is None:
            raise DataError(source, "WebVid needs --media-dir (the videos_dir holding {page_dir}/{videoid}.mp4)")
        index = 0
        for csv_path in self.source_files(source):
            with open(csv_path, newline="", encoding="utf-8", errors="replace") as f:
                reader = csv.DictReader(f)
                missing = [c for c in _COLUMNS if c not in (reader.fieldnames or [])]
                if missing:
                    raise DataError(csv_path, f"missing WebVid column(s) {missing}")
                for row_no, row in enumerate(reader, start=2):  # header is line 1
                    sid = f"{csv_path.name}:{row_no}"
                    vid, page, name = (row.get(c) for c in _COLUMNS)
                    if not vid or not page or name is None:
                        yield BadItem(index, sid, str(csv_path), "row without videoid/page_dir/name")
                    else:
                        path = media_dir / page.strip() / f"{vid.strip()}.mp4"
                        yield SourceItem(index, sid, "video", str(path), caption=name,
                                         meta={"videoid": vid.strip(), "page_dir": page.strip()})
                    index += 1
