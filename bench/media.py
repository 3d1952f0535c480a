"""Media-input benchmark: seconds to produce 8 frames + 8 audio clips per file.

For every clip in shared/media and for a generated 10-minute 1920x1080 video with AAC audio, this times

* ours: ``vllama_jax.media.load_video_with_audio`` - frames fetched by seeking (demux-only index pass, seek
  to the keyframe before each sampled frame, decode forward), audio clips decoded concurrently in a second
  thread (``decode="auto"``: exact; seeks on long tracks unless the decoder is stateful), and
* a decode-every-frame baseline in the same run: decode all video frames (keep the sampled ones) and the
  whole audio track, same transforms. The script asserts both give identical arrays.

Wall and process-CPU seconds are printed (the CPU column sums all threads; on a shared machine it is the
steadier number). Usage::

    .venv/bin/python bench/media.py                        # everything (generates the long video once)
    .venv/bin/python bench/media.py --skip-baseline-long   # the long-video baseline takes ~20 CPU-s
    VLLAMA_BENCH_CACHE=/some/dir .venv/bin/python bench/media.py

The long video (libx264 ultrafast, 25 fps, GOP 250, crf 28, 164 MiB; stereo AAC 44.1 kHz of a wobbling tone
plus noise) is cached in ``$VLLAMA_BENCH_CACHE`` (default ``/tmp/vllama_media_bench``); generating it takes
about two minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vllama_jax import media  # noqa: E402
from vllama_jax.media import audio as audio_mod  # noqa: E402
from vllama_jax.media import video as video_mod  # noqa: E402

LONG_NAME = "long_1080p_10min_25fps_gop250_aac.mp4"


def make_long_video(path: Path, seconds: int = 600, fps: int = 25, width: int = 1920, height: int = 1080,
                    gop: int = 250, sample_rate: int = 44100) -> Path:
    """Encode a synthetic video (sliding texture, libx264 ultrafast, GOP ``gop``) with a stereo AAC track."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial.mp4")
    rng = np.random.default_rng(0)
    # A smooth random texture wider than the frame; each frame is a shifted window of it (cheap to make,
    # gives the encoder real motion instead of a static frame).
    pad = 512
    coarse = rng.integers(16, 235, size=((height + pad) // 16 + 1, (width + pad) // 16 + 1), dtype=np.uint8)
    luma = np.kron(coarse, np.ones((16, 16), np.uint8))[: height + pad, : width + pad]
    luma = (luma.astype(np.int16) + rng.integers(-6, 7, size=luma.shape)).clip(16, 235).astype(np.uint8)
    cb = np.full((height // 2, width // 2), 110, np.uint8)
    cr = np.full((height // 2, width // 2), 150, np.uint8)

    out = av.open(str(tmp), "w")
    vs = out.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "g": str(gop), "keyint_min": str(gop),
                                                     "sc_threshold": "0", "crf": "28"})
    vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
    aus = out.add_stream("aac", rate=sample_rate, layout="stereo")
    frame_size = 1024
    t_audio = 0
    n_frames = seconds * fps
    for i in range(n_frames):
        off = (i * 3) % pad
        y = luma[off % pad: off % pad + height, off: off + width]
        yuv = np.concatenate([y, cb.reshape(-1, width), cr.reshape(-1, width)], axis=0)
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(yuv), format="yuv420p")
        vf.pts = i
        vf.time_base = Fraction(1, fps)
        for p in vs.encode(vf):
            out.mux(p)
        # audio up to the end of this video frame
        while t_audio < (i + 1) * sample_rate // fps:
            t = (t_audio + np.arange(frame_size)) / sample_rate
            sig = 0.3 * np.sin(2 * np.pi * (220 + 40 * np.sin(2 * np.pi * t / 7)) * t)
            sig = sig + 0.05 * rng.standard_normal(frame_size)
            arr = np.stack([sig, 0.5 * sig]).astype(np.float32)
            af = av.AudioFrame.from_ndarray(arr, format="fltp", layout="stereo")
            af.sample_rate = sample_rate
            af.pts = t_audio
            af.time_base = Fraction(1, sample_rate)
            for p in aus.encode(af):
                out.mux(p)
            t_audio += frame_size
    for s in (vs, aus):
        for p in s.encode(None):
            out.mux(p)
    out.close()
    os.replace(tmp, path)
    return path


def _time(fn, repeats: int) -> tuple[float, float, object]:
    """Median wall seconds, median process CPU seconds (all threads), last result."""
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus), result


def ours(path: Path, sampling: str = "uniform", audio_decode: str = "auto"):
    """8 eval frames + 8 audio clips the way the chat demo needs them (audio decoded concurrently)."""
    return media.load_video_with_audio(path, 8, 8, sampling=sampling, rng=np.random.default_rng(0),
                                       audio_kw={"decode": audio_decode})


def baseline(path: Path, sampling: str = "uniform"):
    """Decode every video frame (keep the sampled ones) and the whole audio track; same transforms."""
    u8, meta = video_mod.decode_all_frames(path, num_frames=8, sampling=sampling, rng=np.random.default_rng(0))
    frames = media.normalize_uint8(u8)
    try:
        a = audio_mod.load_audio(path, clips_per_video=8, decode="full")
    except media.NoAudioStreamError:
        a = None
    return frames, a


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=os.environ.get("VLLAMA_SHARED", str(REPO.parent / "shared")))
    ap.add_argument("--cache", default=os.environ.get("VLLAMA_BENCH_CACHE", "/tmp/vllama_media_bench"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-baseline-long", action="store_true")
    ap.add_argument("--generate-only", action="store_true")
    args = ap.parse_args()

    long_path = Path(args.cache) / LONG_NAME
    if not long_path.exists():
        print(f"generating {long_path} (once) ...", flush=True)
        t0 = time.perf_counter()
        make_long_video(long_path)
        print(f"  generated in {time.perf_counter() - t0:.0f} s, {long_path.stat().st_size / 2**20:.0f} MiB", flush=True)
    if args.generate_only:
        return

    load_before = os.getloadavg()[0]
    media_dir = Path(args.shared) / "media"
    files = sorted(media_dir.glob("*.mp4")) + sorted(media_dir.glob("*.wav"))
    rows = []
    for p in files + [long_path]:
        is_long = p == long_path
        if p.suffix == ".wav":
            w, c, a = _time(lambda: media.load_audio(p, clips_per_video=8), args.repeats)
            bw, bc, _ = _time(lambda: audio_mod.load_audio(p, clips_per_video=8, decode="full"), args.repeats)
            rows.append((p.name, "audio only", a.decode_mode, 0, w, c, bw, bc))
            continue
        variants = [("uniform", "auto")]
        if is_long:
            variants += [("random", "auto"), ("uniform", "seek")]
        for sampling, audio_decode in variants:
            w, c, (v, a) = _time(lambda: ours(p, sampling, audio_decode), args.repeats)
            if is_long and (args.skip_baseline_long or audio_decode == "seek" or sampling == "random"):
                bw = bc = float("nan")
            else:
                bw, bc, (bf, ba) = _time(lambda: baseline(p, sampling), 1 if is_long else args.repeats)
                # same frames and clips as the baseline, or the timing is meaningless
                assert np.array_equal(bf, v.frames), p
                if a is not None:
                    assert np.array_equal(ba.clips, a.clips), p
            name = p.name if not is_long else f"10-min 1080p ({v.num_frames_total} frames)"
            label = f"{sampling}" + ("" if a is not None else ", no audio") + (
                ", decode=seek" if audio_decode == "seek" else "")
            mode = a.decode_mode if a is not None else "-"
            rows.append((name, label, mode, v.frames_decoded, w, c, bw, bc))

    print()
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, numpy {np.__version__}, "
          f"PyAV {__import__('av').__version__}; median of {args.repeats} runs (baseline on the long video: 1 run); "
          f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}")
    print("ours = load_video_with_audio (seek-based frames; audio concurrently, exact decode='auto' unless noted);"
          " baseline = decode every frame + whole audio track")
    hdr = (f"{'file':<34} {'sampling':<22} {'audio':<7} {'frames dec.':>11} {'ours wall/cpu s':>16} "
           f"{'baseline wall/cpu s':>20} {'speed-up':>8}")
    print(hdr)
    print("-" * len(hdr))
    for name, label, mode, dec, w, c, bw, bc in rows:
        sp = f"{bw / w:7.1f}x" if bw == bw else "       -"
        base = f"{bw:9.3f}/{bc:<9.3f}" if bw == bw else f"{'-':>9}/{'-':<9}"
        print(f"{name:<34} {label:<22} {mode:<7} {dec:>11} {w:>7.3f}/{c:<8.3f} {base:>20} {sp:>8}")


if __name__ == "__main__":
    main()
