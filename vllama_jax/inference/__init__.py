"""Inference: the generation engine (``generate``), the chat API (``chat``) and batch description (``describe``).

Submodules are imported lazily so that ``import vllama_jax.inference.generate`` stays light.
"""
from __future__ import annotations

from typing import Any

_EXPORTS = {
    "GenerationConfig": "generate",
    "GenerationOutput": "generate",
    "Generator": "generate",
    "VideoLLaMAChat": "chat",
    "Chat": "chat",
    "ChatContext": "chat",
    "ChatError": "chat",
    "Prompt": "chat",
    "Upload": "chat",
    "video_upload": "chat",
    "image_upload": "chat",
    "audio_upload": "chat",
    "media_kind": "chat",
    "describe": "describe",
    "DescribeResult": "describe",
    "find_videos": "describe",
    "read_done": "describe",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = list(_EXPORTS)
