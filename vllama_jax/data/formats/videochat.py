"""VideoChat-Instruct-11K (upstream builder ``webvid_instruct``): JSON list of
``{"video": relative path, "QA": [{"q", "a"}, ...]}``; video file ``{media_dir}/{video}``.

QA pairs are stored as human/gpt turns (the upstream ``convert_source_vicuna_format`` restructuring, lossless);
the video placeholder and the frame-time message are added at read time.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..records import Turn
from .base import BadItem, FormatDefaults, SourceItem, json_list_entries, require_exists


class VideoChatInstruct:
    name = "webvid_instruct"
    defaults = FormatDefaults(kind="instruction", media_type="video", sampling="uniform")
    embeds_media = False

    def source_files(self, source: Path) -> list[Path]:
        return [require_exists(source, "VideoChat-Instruct JSON")]

    def iter_items(self, source: Path, media_dir: Path | None) -> Iterator[SourceItem | BadItem]:
        for i, sid, entry in json_list_entries(source, media_dir, dataset=self.name,
                                               media_dir_is="the folder the 'video' paths are relative to",
                                               entry="{video, QA}"):
            qa = entry.get("QA") if isinstance(entry, dict) else None
            ok = (isinstance(entry, dict) and isinstance(entry.get("video"), str) and isinstance(qa, list) and qa
                  and all(isinstance(p, dict) and isinstance(p.get("q"), str) and isinstance(p.get("a"), str)
                          for p in qa))
            if not ok:
                yield BadItem(i, sid, str(source), "entry without 'video' string and non-empty 'QA' [{q, a}] list")
                continue
            turns = tuple(t for p in qa for t in (Turn("human", p["q"]), Turn("gpt", p["a"])))
            yield SourceItem(i, sid, "video", str(media_dir / entry["video"]), conversations=turns,
                             meta={"video": entry["video"]})
