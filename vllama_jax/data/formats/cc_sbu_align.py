"""MiniGPT-4 ``cc_sbu_align`` (also used upstream for LLaVA-CC3M-595K): ``filter_cap.json`` =
``{"annotations": [{"image_id", "caption"}, ...]}`` and images ``image/{image_id}.jpg``."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..errors import DataError
from .base import BadItem, FormatDefaults, SourceItem, load_json, require_exists


class CCSBUAlign:
    name = "cc_sbu_align"
    defaults = FormatDefaults(kind="caption", media_type="image")  # captions used raw upstream (no blip_caption)
    embeds_media = False

    def _annotation_file(self, source: Path) -> Path:
        require_exists(source, "cc_sbu_align source")
        return source / "filter_cap.json" if source.is_dir() else source

    def source_files(self, source: Path) -> list[Path]:
        return [require_exists(self._annotation_file(source), "filter_cap.json")]

    def iter_items(self, source: Path, media_dir: Path | None) -> Iterator[SourceItem | BadItem]:
        ann_file = self._annotation_file(source)
        data = load_json(ann_file)
        anns = data.get("annotations") if isinstance(data, dict) else None
        if not isinstance(anns, list):
            raise DataError(ann_file, 'expected {"annotations": [{"image_id": ..., "caption": ...}, ...]}')
        image_dir = media_dir if media_dir is not None else ann_file.parent / "image"
        for i, ann in enumerate(anns):
            sid = f"{ann_file.name}[{i}]"
            if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
                yield BadItem(i, sid, str(ann_file), "annotation without image_id/caption")
                continue
            image_id = str(ann["image_id"])
            yield SourceItem(i, sid, "image", str(image_dir / f"{image_id}.jpg"), caption=ann["caption"],
                             meta={"image_id": image_id})


class LlavaCC3M(CCSBUAlign):
    """LLaVA-CC3M-Pretrain-595K: either converted to the cc_sbu_align layout (what upstream stage 1 points its
    ``cc_sbu_align`` builder at), or as distributed: ``chat.json`` = ``[{"id", "image", "conversations":
    [{"from": "human", ...}, {"from": "gpt", "value": caption}]}]`` with images in ``images/`` (the unpacked
    ``images.zip``; or ``--media-dir``). The caption is the gpt turn."""

    name = "llava_cc3m"

    def _annotation_file(self, source: Path) -> Path:
        require_exists(source, "LLaVA-CC3M source")
        if source.is_dir():
            return source / "filter_cap.json" if (source / "filter_cap.json").exists() else source / "chat.json"
        return source

    def iter_items(self, source: Path, media_dir: Path | None) -> Iterator[SourceItem | BadItem]:
        ann_file = self._annotation_file(source)
        data = load_json(ann_file)
        if isinstance(data, dict):  # filter_cap.json layout
            yield from super().iter_items(source, media_dir)
            return
        if not isinstance(data, list):
            raise DataError(ann_file, "expected chat.json (a list) or filter_cap.json ({'annotations': [...]})")
        image_dir = media_dir if media_dir is not None else ann_file.parent / "images"
        for i, entry in enumerate(data):
            sid = f"{ann_file.name}[{i}]"
            conv = entry.get("conversations") if isinstance(entry, dict) else None
            turns = conv if isinstance(conv, list) else []
            gpt = [t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "gpt"]
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not gpt \
                    or not isinstance(gpt[0], str):
                yield BadItem(i, sid, str(ann_file), "entry without 'image' and a gpt caption turn")
                continue
            yield SourceItem(i, sid, "image", str(image_dir / entry["image"]), caption=gpt[0],
                             meta={"image": entry["image"], "id": str(entry.get("id", ""))})
