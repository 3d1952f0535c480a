"""LLaVA-Instruct-150K: JSON list of ``{"image": "<coco id>.jpg", "conversations": [{"from", "value"}, ...]}``;
image file ``{media_dir}/COCO_train2014_{image}``."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from .base import BadItem, FormatDefaults, SourceItem, json_list_entries, parse_turns, require_exists


class LlavaInstruct:
    name = "llava_instruct"
    defaults = FormatDefaults(kind="instruction", media_type="image")
    embeds_media = False

    def source_files(self, source: Path) -> list[Path]:
        return [require_exists(source, "LLaVA-Instruct JSON")]

    def iter_items(self, source: Path, media_dir: Path | None) -> Iterator[SourceItem | BadItem]:
        for i, sid, entry in json_list_entries(source, media_dir, dataset=self.name,
                                               media_dir_is="the COCO train2014 image folder",
                                               entry="{image, conversations}"):
            try:
                if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
                    raise ValueError("entry without an 'image' string")
                turns = parse_turns(entry.get("conversations"))
            except ValueError as e:
                yield BadItem(i, sid, str(source), str(e))
                continue
            meta = {"image": entry["image"]} | ({"id": str(entry["id"])} if "id" in entry else {})
            yield SourceItem(i, sid, "image", str(media_dir / f"COCO_train2014_{entry['image']}"),
                             conversations=turns, meta=meta)
