"""Tiny synthetic media for the media tests, written with PyAV into a temp dir (fast: a few KB each).

Video frames carry their own index as 6 binary stripes (white = 1) across the lower half, so a test can read
back which frame it got; the top-left quadrant is white (an asymmetric marker for orientation tests).
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

BITS = 6


def frame_image(k: int, width: int, height: int) -> np.ndarray:
    """RGB uint8 (H, W, 3): top-left quadrant white, index ``k`` as BITS stripes in the bottom half."""
    img = np.full((height, width, 3), 40, np.uint8)
    img[: height // 2, : width // 2] = 255
    stripe = width // BITS
    for b in range(BITS):
        if (k >> b) & 1:
            img[height // 2 + 2:, b * stripe + 1:(b + 1) * stripe - 1] = 230
    return img


def read_index(rgb: np.ndarray) -> int:
    """Inverse of ``frame_image`` on a decoded (possibly resized) frame in the original orientation."""
    h, w = rgb.shape[:2]
    stripe = w / BITS
    k = 0
    for b in range(BITS):
        x0, x1 = int(b * stripe + stripe * 0.3), int(b * stripe + stripe * 0.7)
        if rgb[int(h * 0.6): int(h * 0.95), x0:x1].mean() > 135:
            k |= 1 << b
    return k


def make_video(path: Path, n_frames: int = 12, width: int = 96, height: int = 64, fps: int = 10,
               codec: str = "libx264", pix_fmt: str = "yuv420p", rotation: int | None = None,
               hflip: bool = False, vfr: bool = False, gop: int | None = None, bframes: int | None = None,
               audio: dict | None = None, options: dict | None = None) -> Path:
    """Write a small video. ``vfr``: irregular frame durations (pts in ms). ``audio``: dict for add_audio."""
    out = av.open(str(path), "w")
    opts = dict(options or {})
    if codec == "libx264":
        opts.setdefault("preset", "ultrafast")
        if gop is not None:
            opts.update({"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0"})
        if bframes is not None:
            opts.update({"bf": str(bframes)})
            if bframes:
                opts.setdefault("x264-params", f"bframes={bframes}")
    time_base = Fraction(1, 1000) if vfr else Fraction(1, fps)
    vs = out.add_stream(codec, rate=fps, options=opts)
    vs.width, vs.height, vs.pix_fmt = width, height, pix_fmt
    if vfr:
        vs.codec_context.time_base = time_base
    if codec == "libx264" and gop is not None:
        vs.codec_context.gop_size = gop
    if rotation is not None or hflip:
        vs.set_display_rotation(rotation or 0, hflip=hflip)
    a_stream = None
    if audio is not None:
        a_stream = out.add_stream(audio.get("codec", "aac"), rate=audio.get("rate", 44100),
                                  layout=audio.get("layout", "stereo"))
    rng = np.random.default_rng(0)
    t_ms = 0
    for k in range(n_frames):
        frame = av.VideoFrame.from_ndarray(frame_image(k, width, height), format="rgb24").reformat(format=pix_fmt)
        if vfr:
            frame.pts = t_ms
            t_ms += int(rng.choice([20, 50, 100, 170]))
        else:
            frame.pts = k
        frame.time_base = time_base
        for p in vs.encode(frame):
            out.mux(p)
    for p in vs.encode(None):
        out.mux(p)
    if a_stream is not None:
        _encode_audio(out, a_stream, audio)
    out.close()
    return path


def _encode_audio(out, stream, audio: dict) -> None:
    rate = audio.get("rate", 44100)
    layout = av.AudioLayout(audio.get("layout", "stereo"))
    seconds = audio.get("seconds", 1.0)
    signal = audio.get("signal", "sine")
    n = int(rate * seconds)
    t = np.arange(n) / rate
    if signal == "silence":
        sig = np.zeros(n)
    elif signal == "noise":
        sig = 0.2 * np.random.default_rng(1).standard_normal(n)
    else:
        sig = 0.5 * np.sin(2 * np.pi * 440 * t)
    data = np.stack([sig * (1 - 0.1 * c) for c in range(layout.nb_channels)]).astype(np.float32)
    codec_name = stream.codec_context.name
    fmt = "fltp" if codec_name in ("aac", "libopus", "mp3", "libmp3lame", "flac") else "s16"
    if codec_name == "flac":
        fmt = "s16"
    frame_size = stream.codec_context.frame_size or 1024
    for start in range(0, n, frame_size):
        chunk = data[:, start:start + frame_size]
        if fmt == "s16":
            arr = (np.clip(chunk, -1, 1) * 32767).astype(np.int16).T.reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(arr, format="s16", layout=layout.name)
        else:
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout=layout.name)
        frame.sample_rate = rate
        frame.pts = start
        frame.time_base = Fraction(1, rate)
        for p in stream.encode(frame):
            out.mux(p)
    for p in stream.encode(None):
        out.mux(p)


def make_audio(path: Path, rate: int = 44100, layout: str = "stereo", seconds: float = 1.0,
               codec: str | None = None, signal: str = "sine") -> Path:
    """Write an audio-only file (wav -> pcm_s16le by default, m4a/mp4 -> aac)."""
    if codec is None:
        codec = "pcm_s16le" if path.suffix == ".wav" else "aac"
    out = av.open(str(path), "w")
    stream = out.add_stream(codec, rate=rate, layout=layout)
    _encode_audio(out, stream, {"rate": rate, "layout": layout, "seconds": seconds, "signal": signal})
    out.close()
    return path
