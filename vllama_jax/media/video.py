"""Video decoding and frame sampling (upstream ``load_video`` + ``alpro_video_{eval,train}``), with PyAV.

How a video becomes model input
-------------------------------
1. **Frame index.** One demux-only pass over the video stream (no decoding) lists every packet's presentation
   timestamp (pts); sorted, these are the frames in presentation order, so frame ``k`` is the ``k``-th decoded
   frame and ``vlen`` is the number of frames. This is what decord does too (it indexes packets). We do not
   trust ``stream.frames`` (0 for 3 of the 7 example mp4s) nor ``duration * fps`` (301 instead of 299 frames
   for applausing.mp4); the pass reads packets only and costs ~1 ms per 200 frames.
2. **Sampling** (``sample_frame_indices``): ``n = min(num_frames, vlen)`` indices, "uniform" / "headtail" /
   "random" (see there). With a time ``window`` (start, end seconds; MVBench's per-question bounds) the same
   rule runs over the frames whose timestamp lies inside it, as if they were the whole video.
3. **Fetch by seeking.** For each wanted frame (in pts order): seek to the last keyframe at or before it,
   decode forward to its pts; consecutive targets inside one GOP share one decode run. Output is identical to
   decoding every frame and keeping the ``k``-th (``decode_all_frames``, kept as the reference/fallback path
   and used when packets lack pts, pts are not unique, or a seek does not land where the index says).
4. **Resize** each fetched frame to ``image_size x image_size`` with
   ``frame.reformat(w, h, format="rgb24", interpolation="BILINEAR")``: aspect ratio NOT preserved (decord
   ``VideoReader(height=, width=)`` quirk) and the closest match to decord's swscale output (README numbers:
   max |diff| 3-17/255, mean <= 0.3/255 on the examples; reproduced exactly).
5. **Rotation.** Phone videos carry a display matrix; by default frames are turned to display orientation
   before the (square) resize (``honour_rotation=True``). decord ignores it; ``honour_rotation=False``
   reproduces decord.
6. **Transforms.** eval: ``alpro_video_eval`` (uint8 /255, CLIP normalise); train: ``alpro_video_train``
   (one RandomResizedCrop for all frames, torch-style bicubic on floats, uint8 cast with wraparound).

Bounded work: every decode loop has an explicit step limit, so a corrupt file ends in ``UnreadableMediaError``
or in the nearest decodable frame being used (see ``load_video_uint8``), never in a hang.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

import av
import numpy as np

from .errors import (
    NoVideoStreamError, TimeWindowError, UnreadableMediaError, check_decoder, open_container, translate_errors,
)
from .image import alpro_video_train, normalize_uint8

Sampling = Literal["uniform", "headtail", "random"]
#: (start, end) seconds from the first frame: only the frames shown inside it are sampled
Window = tuple[float, float]

# Errors that end a decode/demux run early on a damaged file (we then work with what was decoded).
_DECODE_ERRORS = (av.error.FFmpegError, OSError, EOFError, ValueError, RuntimeError)
_MAX_PACKETS = 50_000_000  # hard stop for the index pass (about 190 days at 30 fps)
_DECODER_DELAY_SLACK = 64  # frames a decoder may hold back (B-frame reordering, frame threads)


# ---------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------

def _message(indices: np.ndarray, fps: float) -> str:
    # upstream: ", ".join(str(round(f / fps, 1)) for f in indices)
    sec = ", ".join(str(round(float(i) / fps, 1)) for i in np.asarray(indices).tolist())
    return f"The video contains {len(indices)} frames sampled at {sec} seconds. "


@dataclass
class VideoMeta:
    """What was sampled from a video (everything of ``Video`` but the pixels)."""

    indices: np.ndarray  # (T,) int64 frame indices into the presentation-order frame list
    timestamps: np.ndarray  # (T,) float64 seconds: pts of each sampled frame minus the first frame's pts
    fps: float  # average frame rate (decord's get_avg_fps: the stream's avg_frame_rate)
    num_frames_total: int  # vlen
    duration: float  # seconds (stream duration, else container duration, else vlen / fps)
    rotation: int = 0  # degrees counter-clockwise that were applied to reach display orientation
    frames_decoded: int = 0  # how many frames the decoder produced to get these (cost diagnostics)

    def message(self) -> str:
        """Upstream's ``"The video contains {n} frames sampled at t0, t1, ... seconds. "``.

        ``t_i = round(index_i / fps, 1)`` (upstream's formula, i.e. nominal times, not the pts-based
        ``timestamps``; identical for constant-frame-rate files).
        """
        return _message(self.indices, self.fps)


@dataclass
class Video:
    """Model-ready frames of one video plus what was sampled."""

    frames: np.ndarray  # (T, H, W, 3) float32 CLIP-normalised, channels-last
    indices: np.ndarray  # (T,) int64
    timestamps: np.ndarray  # (T,) float64 seconds
    fps: float
    num_frames_total: int
    duration: float
    rotation: int = 0
    frames_decoded: int = field(default=0, repr=False)

    def message(self) -> str:
        """Upstream's ``"The video contains {n} frames sampled at ... seconds. "`` (see ``VideoMeta``)."""
        return _message(self.indices, self.fps)

    @property
    def meta(self) -> VideoMeta:
        return VideoMeta(self.indices, self.timestamps, self.fps, self.num_frames_total, self.duration,
                         self.rotation, self.frames_decoded)


# ---------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------

def sample_frame_indices(vlen: int, num_frames: int, sampling: Sampling = "uniform",
                         rng: np.random.Generator | None = None) -> np.ndarray:
    """Frame indices to fetch, ``n = min(num_frames, vlen)`` of them (no cap on ``num_frames``).

    * ``"uniform"`` (upstream): ``np.arange(0, vlen, vlen / n).astype(int)``, i.e. ``floor(k * vlen / n)``
      evaluated with upstream's float arithmetic (differs from exact integer math by one frame for some
      non-power-of-two ``n``, e.g. vlen=30, n=22). Upstream's float ``arange`` can also produce ``n + 1``
      indices (e.g. vlen=17, n=7); we keep the first ``n`` (deviation: upstream returns n + 1 frames there).
    * ``"headtail"`` (upstream): ``n // 2`` distinct random indices from ``[0, vlen // 2)`` sorted, then
      ``n // 2`` from ``[vlen // 2, vlen)`` sorted, so an odd ``n`` yields ``n - 1`` frames, like upstream.
      When that would be no frame at all (n < 2 or vlen < 2) we fall back to "uniform" (upstream: empty).
    * ``"random"``: Video-LLaMA has no random mode; this is the frozen-in-time / VideoChat ``"rand"`` rule its
      lineage uses: split ``[0, vlen)`` at ``linspace(0, vlen, n + 1).astype(int)`` and draw one index per
      segment uniformly from ``[start, end - 1)`` (their ``random.choice(range(start, end - 1))``, which never
      picks a segment's last frame); if any segment is too short for that, ``n`` distinct random indices
      sorted.
    """
    if vlen <= 0:
        raise ValueError("vlen must be positive")
    if num_frames <= 0:
        raise ValueError("num_frames must be positive")
    n = min(int(num_frames), int(vlen))
    rng = rng if rng is not None else np.random.default_rng()
    if sampling == "uniform":
        return np.arange(0, vlen, vlen / n).astype(np.int64)[:n]
    if sampling == "headtail":
        half, mid = n // 2, vlen // 2
        if half == 0 or mid < half or vlen - mid < half:
            return sample_frame_indices(vlen, num_frames, "uniform")
        head = np.sort(rng.choice(mid, size=half, replace=False))
        tail = np.sort(mid + rng.choice(vlen - mid, size=half, replace=False))
        return np.concatenate([head, tail]).astype(np.int64)
    if sampling == "random":
        edges = np.linspace(0, vlen, n + 1).astype(np.int64)
        starts, stops = edges[:-1], edges[1:] - 1
        if np.all(stops > starts):
            return (starts + np.floor(rng.random(n) * (stops - starts)).astype(np.int64)).astype(np.int64)
        return np.sort(rng.permutation(vlen)[:n]).astype(np.int64)
    raise ValueError(f"unknown sampling {sampling!r} (expected 'uniform', 'headtail' or 'random')")


# ---------------------------------------------------------------------------------------------------------
# Container / stream helpers
# ---------------------------------------------------------------------------------------------------------

def _video_stream(container: av.container.InputContainer, path: str) -> av.video.stream.VideoStream:
    """First real video stream (cover art in audio files is an 'attached picture', not a video)."""
    for s in container.streams.video:
        if not (s.disposition & av.stream.Disposition.attached_pic):
            check_decoder(s, path)
            return s
    raise NoVideoStreamError(path, "no video stream")


def _configure_decoder(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
                       threads: int | None) -> None:
    # Only this stream is needed from this container: discarding the others makes the demuxer skip their
    # packets (halves the index pass on a file with audio).
    for other in container.streams:
        if other.index != stream.index:
            other.discard = av.stream.Discard.all
    # Frame+slice threads: FFmpeg decodes several frames in parallel (0 = one per core).
    cc = stream.codec_context
    cc.thread_type = "AUTO"
    cc.thread_count = 0 if threads is None else int(threads)


@dataclass
class _FrameIndex:
    pts: np.ndarray | None  # (vlen,) sorted presentation timestamps, None when unusable for seeking
    key_pts: np.ndarray  # sorted pts of keyframes (empty when pts is None)
    vlen: int
    time_base: Fraction


def _build_index(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
                 path: str) -> _FrameIndex:
    """Demux-only pass: one entry per frame-carrying packet."""
    pts: list[int] = []
    keys: list[int] = []
    count = 0
    usable = True
    try:
        for pkt in container.demux(stream):
            if pkt.size == 0 or pkt.is_discard:  # EOF flush packet / edit-list-discarded frame
                continue
            count += 1
            if count > _MAX_PACKETS:
                raise UnreadableMediaError(path, f"more than {_MAX_PACKETS} video packets")
            if pkt.pts is None:
                usable = False
                continue
            pts.append(pkt.pts)
            if pkt.is_keyframe:
                keys.append(pkt.pts)
    except _DECODE_ERRORS:
        pass  # damaged tail: index what could be read; frames past it are unreachable anyway
    if count == 0:
        raise UnreadableMediaError(path, "the video stream has no readable packets (truncated or corrupt?)")
    tb = stream.time_base or Fraction(1, 1)
    arr = np.sort(np.asarray(pts, np.int64))
    if not usable or len(arr) == 0 or np.any(np.diff(arr) == 0) or len(keys) == 0:
        return _FrameIndex(None, np.zeros(0, np.int64), count, tb)
    return _FrameIndex(arr, np.unique(np.asarray(keys, np.int64)), count, tb)


def _fps(stream: av.video.stream.VideoStream, index: _FrameIndex) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0:
            return float(rate)
    if index.pts is not None and index.vlen > 1:
        span = float((index.pts[-1] - index.pts[0]) * index.time_base)
        if span > 0:
            return (index.vlen - 1) / span
    return 1.0


def _frame_times(index: _FrameIndex, fps: float) -> np.ndarray:
    """Seconds of every frame from the first one: pts-based, else nominal (k / fps) when pts are unusable."""
    if index.pts is not None:
        return ((index.pts - index.pts[0]) * float(index.time_base)).astype(np.float64)
    return np.arange(index.vlen, dtype=np.float64) / fps


def _window_range(path: str, times: np.ndarray, window: Window | None, duration: float) -> tuple[int, int]:
    """``[lo, hi)``: the frames whose time lies in ``window`` (all of them without one)."""
    if window is None:
        return 0, len(times)
    start, end = float(window[0]), float(window[1])
    if not end > start:  # also NaN
        raise TimeWindowError(path, f"time window [{start:g}, {end:g}] s is empty (end <= start)")
    eps = 1e-6  # pts times are rounded: a frame at 0.5 s may read 0.49999999
    lo = int(np.searchsorted(times, start - eps, side="left"))
    hi = int(np.searchsorted(times, end + eps, side="right"))
    if hi <= lo:
        raise TimeWindowError(path, f"time window [{start:g}, {end:g}] s holds no frame of the video "
                                    f"({duration:.3f} s long)")
    return lo, hi


def _duration(container: av.container.InputContainer, stream: av.video.stream.VideoStream, vlen: int,
              fps: float) -> float:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return vlen / fps


# ---------------------------------------------------------------------------------------------------------
# Orientation and resize
# ---------------------------------------------------------------------------------------------------------

def _orientation(frame: av.VideoFrame, stream: av.video.stream.VideoStream) -> tuple[int, bool]:
    """(quarter turns counter-clockwise, mirror after turning) that bring a frame to display orientation.

    From the frame's DISPLAYMATRIX side data (FFmpeg exports the container's matrix, e.g. mp4 ``tkhd``, on
    every decoded frame), with PyAV's convention (``VideoStream.set_display_rotation(deg, hflip)``: rotate
    ``deg`` counter-clockwise, then mirror). Legacy ``rotate`` metadata tag (clockwise degrees) as fallback.
    Non-multiples of 90 degrees are rounded to the nearest quarter turn.
    """
    matrix = None
    try:
        raw = bytes(frame.side_data["DISPLAYMATRIX"])
        if len(raw) >= 36:
            matrix = np.frombuffer(raw[:36], dtype="<i4").astype(np.float64) / 65536.0
    except (KeyError, ValueError):
        # No matrix, or PyAV cannot wrap some other side data of this frame (it raises for types it does
        # not know, e.g. on JPEG frames): fall back to the angle, which PyAV reads at C level.
        if frame.rotation:
            return int(round(frame.rotation / 90.0)) % 4, False
    if matrix is not None:
        a, b, c, d = matrix[0], matrix[1], matrix[3], matrix[4]
        mirror = (a * d - b * c) < 0
        if mirror:  # undo the mirror (negated first column) to read the rotation
            a, c = -a, -c
        # av_display_rotation_set(-deg) gives a = cos(deg), c = sin(deg)
        deg = np.degrees(np.arctan2(c, a))
        return int(round(deg / 90.0)) % 4, bool(mirror)
    tag = stream.metadata.get("rotate") if stream.metadata else None
    if tag:
        try:
            return int(round(-float(tag) / 90.0)) % 4, False
        except ValueError:
            pass
    return 0, False


def _to_rgb(frame: av.VideoFrame, size: int, turns: int, mirror: bool) -> np.ndarray:
    """Decoded frame -> (size, size, 3) uint8 in display orientation (swscale bilinear, aspect not kept)."""
    # threads=1: PyAV's default lets swscale size a thread pool to the machine and start it for every frame
    # (16 thread starts a clip on 2 cores: +40% of a training sample's CPU, and a decode's wall time doubled
    # while another process kept the other core busy); callers parallelize over frames or records themselves.
    rgb = frame.reformat(width=size, height=size, format="rgb24", interpolation="BILINEAR",
                         threads=1).to_ndarray()
    # Resizing to a square then turning equals turning then resizing (the bilinear filter is separable
    # with the same target length on both axes), and the turn of a 224x224 array is nearly free.
    if turns:
        rgb = np.rot90(rgb, turns)
    if mirror:
        rgb = rgb[:, ::-1]
    return np.ascontiguousarray(rgb)


# ---------------------------------------------------------------------------------------------------------
# Frame fetching
# ---------------------------------------------------------------------------------------------------------

class _SeekMiss(Exception):
    """The seek path could not prove it returns the k-th frame; use the sequential path instead."""


class _SeekingReader:
    """Fetches frames by pts: seek to the preceding keyframe, decode forward; reuse a run when cheaper."""

    def __init__(self, container: av.container.InputContainer, stream: av.video.stream.VideoStream,
                 index: _FrameIndex) -> None:
        self.container, self.stream, self.index = container, stream, index
        self._gen = None
        self._pos: int | None = None  # pts of the last frame taken from the current run
        self.decoded = 0
        self._budget = index.vlen * 2 + 10 * _DECODER_DELAY_SLACK  # total frames we allow ourselves

    def _restart(self, key_pts: int) -> None:
        self.container.seek(int(key_pts), stream=self.stream, backward=True, any_frame=False)
        self._gen = self.container.decode(self.stream)
        self._pos = None

    def _next(self) -> av.VideoFrame | None:
        if self.decoded >= self._budget:
            raise _SeekMiss("decode budget exhausted")
        try:
            f = next(self._gen)
        except StopIteration:
            return None
        except _DECODE_ERRORS:
            return None
        self.decoded += 1
        return f

    def frame_at(self, target: int) -> av.VideoFrame:
        keys = self.index.key_pts
        ki = max(int(np.searchsorted(keys, target, side="right")) - 1, 0)
        if self._gen is None or self._pos is None or target <= self._pos or keys[ki] > self._pos:
            self._restart(keys[ki])
        fresh = self._pos is None
        while True:
            f = self._next()
            if f is None or f.pts is None:
                raise _SeekMiss("end of stream before the target, or a frame without pts")
            if f.pts < target:
                self._pos, fresh = f.pts, False
                continue
            if f.pts == target:
                self._pos = f.pts
                return f
            # Overshoot: the seek landed after the target (imprecise seeking); retry from an earlier key.
            if fresh and ki > 0:
                ki -= 1
                self._restart(keys[ki])
                continue
            raise _SeekMiss(f"frame with pts {target} not produced by the decoder")


def _fetch_seeking(path: str, container: av.container.InputContainer, stream: av.video.stream.VideoStream,
                   index: _FrameIndex, indices: np.ndarray, size: int, honour_rotation: bool,
                   ) -> tuple[np.ndarray, int, int]:
    reader = _SeekingReader(container, stream, index)
    wanted = np.unique(indices)
    rgb: dict[int, np.ndarray] = {}
    turns, mirror = 0, False
    for n, k in enumerate(wanted.tolist()):
        frame = reader.frame_at(int(index.pts[k]))
        if n == 0 and honour_rotation:
            turns, mirror = _orientation(frame, stream)
        rgb[k] = _to_rgb(frame, size, turns, mirror)
    return np.stack([rgb[k] for k in indices.tolist()]), turns * 90, reader.decoded


def _fetch_sequential(path: str, vlen: int, indices: np.ndarray, size: int, honour_rotation: bool,
                      threads: int | None, decode_to_end: bool = False) -> tuple[np.ndarray, int, int]:
    """Decode from the start (a fresh demuxer: no reliance on seeking), keep the k-th decoded frames.
    Indices past the decodable frames (damaged file) get the last decodable frame."""
    container = open_container(path)
    try:
        stream = _video_stream(container, path)
        _configure_decoder(container, stream, threads)
        return _sequential(path, container, stream, vlen, indices, size, honour_rotation, decode_to_end)
    finally:
        container.close()


def _sequential(path: str, container: av.container.InputContainer, stream: av.video.stream.VideoStream,
                vlen: int, indices: np.ndarray, size: int, honour_rotation: bool,
                decode_to_end: bool) -> tuple[np.ndarray, int, int]:
    wanted = set(indices.tolist())
    last_wanted = max(wanted)
    rgb: dict[int, np.ndarray] = {}
    turns, mirror = 0, False
    last_frame = None
    k = -1
    limit = vlen + _DECODER_DELAY_SLACK
    gen = container.decode(stream)
    while k + 1 < limit:
        try:
            frame = next(gen)
        except StopIteration:
            break
        except _DECODE_ERRORS:
            break
        k += 1
        if k == 0 and honour_rotation:
            turns, mirror = _orientation(frame, stream)
        last_frame = frame
        if k in wanted:
            rgb[k] = _to_rgb(frame, size, turns, mirror)
        if k >= last_wanted and not decode_to_end:
            break
    if last_frame is None:
        raise UnreadableMediaError(path, "no video frame could be decoded")
    fill = None
    out = []
    for i in indices.tolist():
        if i not in rgb:  # damaged file: fewer decodable frames than packets
            if fill is None:
                fill = _to_rgb(last_frame, size, turns, mirror)
            out.append(fill)
        else:
            out.append(rgb[i])
    return np.stack(out), turns * 90, k + 1


def _load(path: str | os.PathLike[str], num_frames: int, sampling: Sampling, image_size: int,
          rng: np.random.Generator | None, honour_rotation: bool, threads: int | None,
          method: Literal["seek", "sequential", "decode_all"], window: Window | None = None,
          ) -> tuple[np.ndarray, VideoMeta]:
    p = os.fspath(path)
    container = open_container(p)
    try:
        with translate_errors(p, "reading the video"):
            return _load_open(p, container, num_frames, sampling, image_size, rng, honour_rotation, threads, method,
                              window)
    finally:
        container.close()


def _load_open(p: str, container: av.container.InputContainer, num_frames: int, sampling: Sampling,
               image_size: int, rng: np.random.Generator | None, honour_rotation: bool, threads: int | None,
               method: Literal["seek", "sequential", "decode_all"], window: Window | None,
               ) -> tuple[np.ndarray, VideoMeta]:
    stream = _video_stream(container, p)
    _configure_decoder(container, stream, threads)
    with translate_errors(p, "indexing the video stream"):
        index = _build_index(container, stream, p)
    fps = _fps(stream, index)
    duration = _duration(container, stream, index.vlen, fps)
    times = _frame_times(index, fps)
    lo, hi = _window_range(p, times, window, duration)
    indices = lo + sample_frame_indices(hi - lo, num_frames, sampling, rng)
    frames = None
    with translate_errors(p, "decoding video frames"):
        if method == "seek" and index.pts is not None:
            try:
                frames, rotation, decoded = _fetch_seeking(p, container, stream, index, indices,
                                                           image_size, honour_rotation)
            except _SeekMiss:
                frames = None
        if frames is None:
            frames, rotation, decoded = _fetch_sequential(p, index.vlen, indices, image_size,
                                                          honour_rotation, threads,
                                                          decode_to_end=(method == "decode_all"))
    if window is not None and 0 < len(indices) < num_frames:
        # a window shorter than num_frames frames still gives num_frames (repeats), as MVBench's get_index does:
        # every question of a batch keeps one frame count, so one compiled encoder serves them all
        take = (np.arange(num_frames) * len(indices)) // num_frames
        frames, indices = frames[take], indices[take]
    meta = VideoMeta(indices=indices, timestamps=times[indices], fps=fps, num_frames_total=index.vlen,
                     duration=duration, rotation=rotation, frames_decoded=decoded)
    return frames, meta


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------

def load_video_uint8(path: str | os.PathLike[str], num_frames: int = 8, sampling: Sampling = "uniform",
                     image_size: int = 224, rng: np.random.Generator | None = None, honour_rotation: bool = True,
                     threads: int | None = None, window: Window | None = None) -> tuple[np.ndarray, VideoMeta]:
    """Decode the sampled frames: ``(frames (T, S, S, 3) uint8 RGB, VideoMeta)`` - upstream decord output,
    before any transform.

    ``rng`` feeds "headtail"/"random" sampling. ``threads``: decoder threads (None/0 = one per core; use 1
    when decoding many files in parallel). ``window``: (start, end) seconds; the frames are sampled among those
    whose timestamp lies in it (``TimeWindowError`` when end <= start or none does); indices and timestamps
    stay those of the whole video. If a damaged file has fewer decodable frames than packets, indices
    past the last decodable frame get that frame; if none decodes, ``UnreadableMediaError``.
    """
    return _load(path, num_frames, sampling, image_size, rng, honour_rotation, threads, "seek", window)


def load_video(path: str | os.PathLike[str], num_frames: int = 8, sampling: Sampling = "uniform",
               image_size: int = 224, train: bool = False, rng: np.random.Generator | None = None,
               honour_rotation: bool = True, threads: int | None = None, clamp: bool = False,
               window: Window | None = None, normalize: bool = True) -> Video:
    """Video file -> ``Video`` with (T, S, S, 3) float32 CLIP-normalised frames (``normalize=False``: the uint8
    pixels they are normalised from).

    ``train=False``: ``alpro_video_eval``; ``train=True``: ``alpro_video_train`` (random crop from ``rng``;
    ``clamp=True`` clips bicubic overshoot instead of upstream's uint8 wraparound). One ``rng`` drives both
    the sampling and the crop (a fresh unseeded Generator if None). ``window``: see ``load_video_uint8``.
    """
    rng = rng if rng is not None else np.random.default_rng()
    u8, meta = load_video_uint8(path, num_frames, sampling, image_size, rng, honour_rotation, threads, window)
    if train:
        frames = alpro_video_train(u8, rng, image_size, clamp=clamp, normalize=normalize)
    else:
        frames = normalize_uint8(u8) if normalize else u8
    return Video(frames=frames, indices=meta.indices, timestamps=meta.timestamps, fps=meta.fps,
                 num_frames_total=meta.num_frames_total, duration=meta.duration, rotation=meta.rotation,
                 frames_decoded=meta.frames_decoded)


def decode_all_frames(path: str | os.PathLike[str], num_frames: int = 8, sampling: Sampling = "uniform",
                      image_size: int = 224, rng: np.random.Generator | None = None, honour_rotation: bool = True,
                      threads: int | None = None, window: Window | None = None) -> tuple[np.ndarray, VideoMeta]:
    """Reference path: decode every frame of the file in order and keep the sampled ones (frame ``k`` = the
    ``k``-th decoded frame). Same output as ``load_video_uint8``; slow on long videos (benchmark baseline)."""
    return _load(path, num_frames, sampling, image_size, rng, honour_rotation, threads, "decode_all", window)


def video_info(path: str | os.PathLike[str]) -> dict[str, float | int]:
    """Frame count (``vlen``), fps and duration without decoding (demux-only pass)."""
    p = os.fspath(path)
    container = open_container(p)
    try:
        with translate_errors(p, "indexing the video stream"):
            stream = _video_stream(container, p)
            index = _build_index(container, stream, p)
            fps = _fps(stream, index)
            return {"num_frames": index.vlen, "fps": fps,
                    "duration": _duration(container, stream, index.vlen, fps)}
    finally:
        container.close()


__all__ = [
    "Video", "VideoMeta", "Window", "decode_all_frames", "load_video", "load_video_uint8", "sample_frame_indices",
    "video_info",
]
