"""The one place where ``vllama_jax.data`` touches ``vllama_jax.media`` (keep it narrow).

Everything else in the data package sees frames as ``(T, H, W, 3)`` float32 arrays (normalized with the CLIP
mean/std by the media loaders; images get ``T = 1``) and failures as :class:`~vllama_jax.data.errors.DataError`.
Records prepared with ``--store-media bytes`` are decoded through a private temporary file, because the media
loaders take paths.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from ..media import MediaError, load_image, load_video
from .errors import DataError, MediaDecodeError


@contextlib.contextmanager
def _media_file(path: str, data: bytes | None) -> Iterator[str]:
    """A readable file path for ``path`` / ``data`` (a temporary copy when the bytes are stored in the record)."""
    if not data:
        yield path
        return
    suffix = Path(path.partition("#")[2] or path).suffix or ".bin"
    fd, tmp = tempfile.mkstemp(suffix=suffix, prefix="vllama_media_")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield tmp
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def load_frames(
    media_type: str,
    path: str,
    data: bytes | None = None,
    *,
    num_frames: int = 8,
    sampling: str = "uniform",
    image_size: int = 224,
    train: bool = True,
    rng: np.random.Generator | None = None,
    need_message: bool = False,
) -> tuple[np.ndarray, str]:
    """Decode + preprocess one media item -> (frames (T, H, W, 3) uint8 pixels, frame-time message or "").

    The pixels are the processor's output before its CLIP normalisation, which the train step applies on the
    device (``media.normalize_uint8``): a quarter of the bytes to move between processes and to the device.

    Videos must yield exactly ``num_frames`` frames (fixed batch shapes; upstream WebVid also rejects shorter
    clips), otherwise :class:`MediaDecodeError` is raised like for any undecodable file.
    """
    try:
        with _media_file(path, data) as f:
            if media_type == "video":
                # threads=1: the pipeline parallelizes over records (worker processes), not inside one video
                video = load_video(f, num_frames=num_frames, sampling=sampling, image_size=image_size,
                                   train=train, rng=rng, threads=1, normalize=False)
                frames = video.frames
                message = video.message() if need_message else ""
            elif media_type == "image":
                frames = load_image(f, image_size=image_size, train=train, rng=rng, normalize=False)[None]
                message = ""
            else:
                raise MediaDecodeError(path, f"unknown media type {media_type!r}")
    except MediaError as e:
        raise MediaDecodeError(path, e.reason) from None
    except DataError:
        raise
    except Exception as e:  # a decoder bug must not kill a long training run: report it as a bad record
        raise MediaDecodeError(path, f"{type(e).__name__}: {e}") from None
    if media_type == "video" and frames.shape[0] != num_frames:
        raise MediaDecodeError(path, f"video yields {frames.shape[0]} frames, need {num_frames}")
    return frames, message


def probe(media_type: str, path: str, data: bytes | None = None) -> None:
    """Cheap validity check used by ``prepare``: decode one small frame; raise DataError if that fails."""
    if not data and not os.path.isfile(path):
        raise DataError(path, "media file not found")
    load_frames(media_type, path, data, num_frames=1, sampling="uniform", image_size=32, train=False)
