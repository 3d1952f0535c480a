"""Readers of the upstream training-set formats (one module per format) and the registry of dataset names."""
from __future__ import annotations

from ..errors import DataError
from .base import BadItem, FormatDefaults, SourceFormat, SourceItem
from .cc_sbu_align import CCSBUAlign, LlavaCC3M
from .jsonl import JsonLines
from .llava_instruct import LlavaInstruct
from .videochat import VideoChatInstruct
from .webdataset import WebDatasetCaptions
from .webvid import WebVid

#: dataset name (as in the upstream configs) -> reader. Several names may share one format.
_FACTORIES = {
    "webvid": WebVid,
    "cc_sbu_align": CCSBUAlign,
    "llava_cc3m": LlavaCC3M,  # LLaVA-CC3M-595K: chat.json as distributed, or the cc_sbu_align layout
    "cc_sbu": lambda: WebDatasetCaptions("cc_sbu"),
    "laion": lambda: WebDatasetCaptions("laion"),
    "llava_instruct": LlavaInstruct,
    "webvid_instruct": VideoChatInstruct,
    "videochat_instruct": VideoChatInstruct,
    "jsonl": JsonLines,
}

DATASET_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def get_format(dataset: str) -> SourceFormat:
    """The reader for an upstream dataset name (see ``DATASET_NAMES``)."""
    try:
        return _FACTORIES[dataset]()
    except KeyError:
        raise DataError(None, f"unknown dataset {dataset!r} (known: {', '.join(DATASET_NAMES)})") from None


__all__ = ["BadItem", "DATASET_NAMES", "FormatDefaults", "SourceFormat", "SourceItem", "get_format"]
