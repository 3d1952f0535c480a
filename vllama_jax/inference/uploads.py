"""Media uploads: what one uploaded video / image / audio file puts into a fresh conversation (the message with
its ``<ImageHere>`` placeholders, the system string, and the decoded inputs of each media block), following the
demo flows of upstream ``demo_video.py`` / ``demo_audiovideo.py`` (upstream.md §9).

Flows (each upload starts a fresh conversation with an empty media list, as in the demos):

* video with audio (``upload_video(path, with_audio=True)``): media list ``[audio, video]`` (8 + 32 rows upstream),
  system ``""``, the "Close your eyes, open your ears ..." message (no frame-time message). If the audio cannot be
  loaded (no audio stream, undecodable, or the model has no audio branch) it falls back to the video-only flow and
  says why (``Upload.note``, logged on upload).
* video without audio: ``"<Video><ImageHere></Video> " + frame-time message``; system ``""`` (demo_audiovideo.py,
  the default ``demo="audiovideo"``) or the "You are able to understand ..." string (``demo="video"``).
* image: ``"<Image><ImageHere></Image> "``, system "You are able to understand ...".
* audio file (ours, no upstream flow): ``"Close your eyes, open your ears and you imagine only based on the sound
  that: <ImageHere>. Now answer my question based on what you have just heard."``, system ``""``; the question is
  joined to it like upstream joins it to a video/image message.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from ..text import (
    AUDIO_VIDEO_UPLOAD_MESSAGE,
    DEMO_SYSTEM_AUDIOVIDEO,
    DEMO_SYSTEM_IMAGE,
    DEMO_SYSTEM_VIDEO,
    IMAGE_UPLOAD_MESSAGE,
    video_upload_message,
)

MediaKind = Literal["video", "image", "audio"]

#: ours: the audio-file flow has no upstream counterpart; it reuses the first sentence of the audio+video message
AUDIO_UPLOAD_MESSAGE = (
    "Close your eyes, open your ears and you imagine only based on the sound that: <ImageHere>. "
    "Now answer my question based on what you have just heard."
)

VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv",
                              ".3gp", ".ts", ".mts", ".ogv", ".gif"})
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
AUDIO_EXTENSIONS = frozenset({".wav", ".mp3", ".flac", ".ogg", ".m4a", ".aac", ".opus", ".wma"})


def media_kind(path: str | os.PathLike[str]) -> MediaKind:
    """"image" / "audio" by file extension, anything else is treated as a video."""
    ext = Path(path).suffix.lower()
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in AUDIO_EXTENSIONS:
        return "audio"
    return "video"


# ------------------------------------------------------------------------------------------------------------
# uploads: decoded media + the message/system they put into a fresh conversation


@dataclass
class Upload:
    """One media upload, preprocessed on the host, not yet encoded.

    blocks: the media embedding blocks the message's ``<ImageHere>`` placeholders stand for, in order
    (audio before video, upstream); frames: (T, H, W, 3) video frames or (1, H, W, 3) for an image; clips:
    (S, 1, mel, time) audio fbank clips.
    """

    kind: MediaKind
    message: str
    system: str | None
    blocks: tuple[str, ...]
    frames: np.ndarray | None = None
    clips: np.ndarray | None = None
    path: str = ""
    note: str = ""
    join_question: bool = False
    #: seconds of the sampled video frames from the video's start (what frame-aligned text, e.g. subtitles, needs)
    times: tuple[float, ...] = ()

    @property
    def with_audio(self) -> bool:
        return "audio" in self.blocks


def video_upload(frames: np.ndarray, *, clips: np.ndarray | None = None, frame_message: str = "",
                 demo: str = "audiovideo", path: str = "", note: str = "", times: Sequence[float] = ()) -> Upload:
    """The video flows of upstream.md §9: with ``clips`` the audio+video flow, otherwise video only (with the frame-time
    message ``frame_message``; system per ``demo``: "audiovideo" -> "", "video" -> demo_video.py's string).
    ``times``: the frames' seconds (``Upload.times``)."""
    frames = np.asarray(frames, np.float32)
    if frames.ndim != 4:
        raise ValueError(f"video frames must be (T, H, W, 3), got shape {frames.shape}")
    times = tuple(float(t) for t in times)
    if clips is not None:
        return Upload("video", AUDIO_VIDEO_UPLOAD_MESSAGE, DEMO_SYSTEM_AUDIOVIDEO, ("audio", "video"), frames,
                      np.asarray(clips, np.float32), path, note, times=times)
    system = DEMO_SYSTEM_VIDEO if demo == "video" else DEMO_SYSTEM_AUDIOVIDEO
    return Upload("video", video_upload_message(frame_message), system, ("video",), frames, None, path, note,
                  times=times)


def image_upload(image: np.ndarray, *, path: str = "") -> Upload:
    """Image flow: (H, W, 3) normalised image, 32 rows from the video Q-Former on one frame (upstream)."""
    image = np.asarray(image, np.float32)
    if image.ndim != 3:
        raise ValueError(f"an image must be (H, W, 3), got shape {image.shape}")
    return Upload("image", IMAGE_UPLOAD_MESSAGE, DEMO_SYSTEM_IMAGE, ("image",), image[None], None, path)


def audio_upload(clips: np.ndarray, *, path: str = "") -> Upload:
    """Audio-file flow (ours): (S, 1, mel, time) clips, the question is joined to the message."""
    return Upload("audio", AUDIO_UPLOAD_MESSAGE, DEMO_SYSTEM_AUDIOVIDEO, ("audio",), None,
                  np.asarray(clips, np.float32), path, join_question=True)


__all__ = [
    "AUDIO_EXTENSIONS",
    "AUDIO_UPLOAD_MESSAGE",
    "IMAGE_EXTENSIONS",
    "MediaKind",
    "Upload",
    "VIDEO_EXTENSIONS",
    "audio_upload",
    "image_upload",
    "media_kind",
    "video_upload",
]
