"""Many files -> model-ready arrays, one error slot per file (a bad file never sinks the batch)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from .audio import Audio, load_audio
from .errors import MediaError, NoAudioStreamError, describe
from .image import image_as_video, load_image
from .video import Video, load_video

Kind = Literal["video", "image", "audio"]


@dataclass
class BatchResult:
    """Result of ``load_batch``.

    ``arrays`` stacks the model inputs of the files that loaded, in input order: videos (n_ok, T, S, S, 3),
    images (n_ok, S, S, 3) (or (n_ok, 1, S, S, 3) with ``as_video=True``), audio (n_ok, clips, 1, 128, 204).
    ``index[i]`` is the position in ``paths`` of row ``i``; ``errors[j]`` is None or the ``MediaError`` of
    ``paths[j]``; ``items[j]`` the full ``Video`` / ``Audio`` / image array (None on error). Videos shorter
    than the longest one are padded by repeating their last frame; ``lengths`` gives the real frame counts.
    """

    arrays: np.ndarray | None
    index: np.ndarray
    errors: list[MediaError | None]
    items: list[Any] = field(repr=False)
    lengths: np.ndarray | None = None

    @property
    def ok(self) -> np.ndarray:
        return np.array([e is None for e in self.errors], dtype=bool)

    @property
    def failures(self) -> list[tuple[int, str, MediaError]]:
        """(position, path, error) of every file that failed."""
        return [(i, e.path, e) for i, e in enumerate(self.errors) if e is not None]


def _load_one(kind: Kind, path: str, kw: dict[str, Any], rng: np.random.Generator | None) -> Any:
    if kind == "video":
        return load_video(path, rng=rng, **kw)
    if kind == "image":
        kw = dict(kw)
        as_video = kw.pop("as_video", False)
        image = load_image(path, rng=rng, **kw)
        return image_as_video(image) if as_video else image
    return load_audio(path, **kw)  # audio loading is deterministic


def _array_of(item: Any) -> np.ndarray:
    if isinstance(item, Video):
        return item.frames
    if isinstance(item, Audio):
        return item.clips
    return np.asarray(item)


def load_batch(paths: Sequence[str | os.PathLike[str]], kind: Kind = "video", *, workers: int = 1,
               catch_unexpected: bool = True, **kw: Any) -> BatchResult:
    """Load every file of ``paths`` with ``load_video`` / ``load_image`` / ``load_audio`` (``**kw`` passed on).

    ``workers > 1`` decodes files in a thread pool (FFmpeg and numpy release the GIL); video decoders then
    get one thread each unless ``threads`` is given. Randomness: pass ``rng`` for reproducible augmentation
    with ``workers == 1``; with a pool, each file gets its own Generator spawned from it (deterministic per
    position, independent of scheduling). ``catch_unexpected``: a non-``MediaError`` exception (a bug, or an
    error we did not anticipate) is recorded as a ``MediaError`` for that file instead of propagating.
    """
    if kind not in ("video", "image", "audio"):
        raise ValueError(f"kind must be 'video', 'image' or 'audio', got {kind!r}")
    paths = [os.fspath(p) for p in paths]
    kw = dict(kw)
    if workers > 1 and kind == "video":
        kw.setdefault("threads", 1)
    rng = kw.pop("rng", None)
    rngs: list[np.random.Generator | None]
    if rng is not None and workers > 1:
        rngs = list(rng.spawn(len(paths)))
    else:
        rngs = [rng] * len(paths)

    def one(i: int) -> tuple[Any, MediaError | None]:
        try:
            return _load_one(kind, paths[i], kw, rngs[i]), None
        except MediaError as exc:
            return None, exc
        except Exception as exc:  # noqa: BLE001 - one bad file must not sink the batch
            if not catch_unexpected:
                raise
            return None, MediaError(paths[i], f"unexpected error while loading ({describe(exc)})")

    if workers > 1 and len(paths) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(one, range(len(paths))))
    else:
        results = [one(i) for i in range(len(paths))]

    items = [r[0] for r in results]
    errors = [r[1] for r in results]
    good = [i for i, e in enumerate(errors) if e is None]
    arrays, lengths = None, None
    if good:
        arrs = [_array_of(items[i]) for i in good]
        if kind == "video":
            lengths = np.array([a.shape[0] for a in arrs], np.int64)
            t_max = int(lengths.max())
            arrs = [a if a.shape[0] == t_max else np.concatenate([a, np.repeat(a[-1:], t_max - a.shape[0], 0)])
                    for a in arrs]
        arrays = np.stack(arrs)
    return BatchResult(arrays=arrays, index=np.asarray(good, np.int64), errors=errors, items=items,
                       lengths=lengths)


def load_video_with_audio(path: str | os.PathLike[str], num_frames: int = 8, clips_per_video: int = 8, *,
                          audio_kw: dict[str, Any] | None = None, **video_kw: Any) -> tuple[Video, Audio | None]:
    """What the chat demo's ``upload_video`` needs: frames and audio clips of one file, decoded concurrently
    (audio in a worker thread; FFmpeg releases the GIL). Audio is None when the file has no audio stream
    (upstream prints "no audio is found" and goes on with the video); other audio errors propagate.
    The video decoder gets one thread by default (``threads``), the audio thread the other core."""
    video_kw.setdefault("threads", 1)
    with ThreadPoolExecutor(max_workers=1) as pool:
        fut = pool.submit(load_audio, path, clips_per_video, **(audio_kw or {}))
        video = load_video(path, num_frames, **video_kw)
        try:
            audio = fut.result()
        except NoAudioStreamError:
            audio = None
    return video, audio


__all__ = ["BatchResult", "load_batch", "load_video_with_audio"]
