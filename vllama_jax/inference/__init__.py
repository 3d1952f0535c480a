"""Inference: the chat API (``chat``, media uploads in ``uploads``), batch description (``describe``) and the
generation engine (``generate`` = ``Generator``, built from ``generation_config``, ``sampling``, ``engine``,
``beam``, ``score``; ``placement``: parameters placed once).

The names below are exported lazily on purpose: importing any submodule runs this file first, and eager imports
here would make ``import vllama_jax.inference.generate`` (a text-only LLM engine) load the media decoders
(PyAV, librosa) and the model-directory code that only the chat needs.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GenerationConfig": "generation_config",
    "GenerationOutput": "generation_config",
    "Generator": "generate",
    "VideoLLaMAChat": "chat",
    "Chat": "chat",
    "ChatContext": "chat",
    "ChatError": "chat",
    "Prompt": "chat",
    "Upload": "uploads",
    "video_upload": "uploads",
    "image_upload": "uploads",
    "audio_upload": "uploads",
    "media_kind": "uploads",
    "describe": "describe",
    "DescribeResult": "describe",
    "find_videos": "describe",
    "read_done": "describe",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = list(_EXPORTS)
