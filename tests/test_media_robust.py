"""Real-world files: broken inputs give one typed MediaError (never a hang or a crash); odd layouts work."""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.media_helpers import make_audio, make_video, read_index
from vllama_jax import media

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _timeout_guard():
    """Every test here must finish in 60 s: a hang fails the test instead of stalling CI."""
    def boom(signum, frame):  # noqa: ARG001
        raise TimeoutError("media test exceeded 60 s (hang?)")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(60)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _bad_files(d: Path, media_dir: Path) -> dict[str, Path]:
    """Broken inputs, each next to a good one made the same way."""
    d.mkdir(parents=True, exist_ok=True)
    good = make_video(d / "good.mp4", n_frames=30, audio={"seconds": 3.0})
    fast = make_video(d / "faststart.mp4", n_frames=30, audio={"seconds": 3.0})  # rewritten below
    files = {}
    (d / "empty.mp4").write_bytes(b"")
    files["empty"] = d / "empty.mp4"
    data = good.read_bytes()
    (d / "trunc_half.mp4").write_bytes(data[: len(data) // 2])  # PyAV writes moov at the end: lost
    files["truncated_half"] = d / "trunc_half.mp4"
    (d / "trunc_head.mp4").write_bytes(data[:200])
    files["truncated_head"] = d / "trunc_head.mp4"
    real = (media_dir / "dog_barking.mp4").read_bytes()  # moov first: truncation loses the media data
    (d / "trunc_data.mp4").write_bytes(real[: len(real) // 3])
    files["truncated_data"] = d / "trunc_data.mp4"
    rng = np.random.default_rng(0)
    for ext in ("mp4", "wav", "jpg", "mkv", "bin"):
        (d / f"random.{ext}").write_bytes(rng.bytes(50_000))
        files[f"random_{ext}"] = d / f"random.{ext}"
    (d / "text.mp4").write_text("this is not a video\n" * 200)
    files["text_as_mp4"] = d / "text.mp4"
    files["missing"] = d / "does_not_exist.mp4"
    files["directory"] = d
    del fast
    return files


OUTCOMES_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from vllama_jax import media
    out = {}
    for name, path in json.loads(sys.argv[2]).items():
        for fn in ("load_video", "load_audio", "load_image"):
            try:
                getattr(media, fn)(path)
                out[f"{name}/{fn}"] = "ok"
            except media.MediaError as e:
                assert e.path == path and e.reason and path in str(e), e
                out[f"{name}/{fn}"] = type(e).__name__
    print(json.dumps(out))
""")


def test_broken_files_in_subprocess(tmp_path, media_dir):
    """All broken inputs in a child process with a timeout: no hang, no crash (segfault/abort), only
    typed errors."""
    files = _bad_files(tmp_path / "bad", media_dir)
    proc = subprocess.run([sys.executable, "-c", OUTCOMES_SCRIPT, str(REPO),
                           json.dumps({k: str(v) for k, v in files.items()})],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcomes = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in files:
        for fn in ("load_video", "load_audio", "load_image"):
            got = outcomes[f"{name}/{fn}"]
            if name == "truncated_data" and fn != "load_image":
                # the readable part decodes: the missing frames are the last decodable one (see
                # test_truncated_media_data_degrades_gracefully), the audio is what survives
                assert got == "ok", (name, fn, got)
            elif name == "random_jpg" and fn == "load_audio":
                # FFmpeg's image2 demuxer accepts any *.jpg as a one-picture video stream: no audio in it
                assert got in ("NoAudioStreamError", "UnreadableMediaError")
            else:
                assert got == "UnreadableMediaError", (name, fn, got)


@pytest.mark.parametrize("case", ["empty", "truncated_half", "truncated_head", "random_mp4", "random_wav",
                                  "text_as_mp4", "missing", "directory"])
def test_broken_file_errors_in_process(case, tmp_path, media_dir):
    p = _bad_files(tmp_path / "bad", media_dir)[case]
    for fn in (media.load_video, media.load_video_uint8, media.load_audio, media.decode_audio, media.load_image,
               media.decode_all_frames, media.video_info):
        with pytest.raises(media.UnreadableMediaError) as ei:
            fn(p)
        assert ei.value.path == os.fspath(p) and os.fspath(p) in str(ei.value) and ei.value.reason
    reasons = {"empty": "empty file", "missing": "no such file", "directory": "not a regular file"}
    if case in reasons:
        with pytest.raises(media.UnreadableMediaError, match=reasons[case]):
            media.load_video(p)


def test_truncated_media_data_degrades_gracefully(tmp_path, media_dir):
    """moov first, media data cut: the index lists frames that cannot be decoded any more; we return
    the last decodable frame for those (documented) instead of failing or hanging. Every frame that still
    decodes is exactly the intact file's frame."""
    full = media_dir / "dog_barking.mp4"
    real = full.read_bytes()
    p = tmp_path / "cut.mp4"
    p.write_bytes(real[: len(real) // 3])
    vlen = media.video_info(p)["num_frames"]  # frames the (surviving) index lists
    assert 0 < vlen < media.video_info(full)["num_frames"]
    u8, meta = media.load_video_uint8(p, num_frames=vlen)  # every listed frame
    assert meta.indices.tolist() == list(range(vlen)) and meta.num_frames_total == vlen
    decodable = meta.frames_decoded
    assert 0 < decodable < vlen, (decodable, vlen)  # really damaged: listed frames that do not decode
    intact, _ = media.load_video_uint8(full, num_frames=media.video_info(full)["num_frames"])
    np.testing.assert_array_equal(u8[:decodable], intact[:decodable])  # what decodes is the intact file's
    for k in range(decodable, vlen):  # the rest: the last decodable frame
        np.testing.assert_array_equal(u8[k], intact[decodable - 1], err_msg=f"frame {k}")
    # the other entry points agree: the reference decoder, and the model-ready frames
    b, _ = media.decode_all_frames(p, num_frames=vlen)
    np.testing.assert_array_equal(u8, b)
    v = media.load_video(p, num_frames=vlen)
    assert v.frames.shape == (vlen, 224, 224, 3)
    np.testing.assert_array_equal(v.frames, media.normalize_uint8(u8))
    # the default 8-frame sampling decodes too
    assert media.load_video(p).frames.shape == (8, 224, 224, 3)


def test_no_audio_stream_video_works(tmp_path):
    p = make_video(tmp_path / "silent.mp4", n_frames=10)
    assert media.load_video(p, image_size=64).frames.shape == (8, 64, 64, 3)
    with pytest.raises(media.NoAudioStreamError) as ei:
        media.load_audio(p)
    assert "no audio stream" in str(ei.value) and str(p) in str(ei.value)
    v, a = media.load_video_with_audio(p, image_size=64)
    assert a is None and v.frames.shape[0] == 8


def test_audio_only_file_is_no_video(tmp_path):
    p = make_audio(tmp_path / "a.m4a", seconds=1.0)
    with pytest.raises(media.NoVideoStreamError):
        media.load_video(p)
    assert media.load_audio(p).clips.shape == (8, 1, 128, 204)


def test_video_with_audio(tmp_path):
    p = make_video(tmp_path / "va.mp4", n_frames=30, audio={"seconds": 3.0, "rate": 48000})
    v, a = media.load_video_with_audio(p, image_size=96)
    assert [read_index(f) for f in media.load_video_uint8(p, image_size=96)[0]] == v.indices.tolist()
    assert a.clips.shape == (8, 1, 128, 204) and a.sample_rate == 48000 and np.isfinite(a.clips).all()


@pytest.mark.parametrize("name,kw", [
    ("mono_8k.wav", dict(rate=8000, layout="mono")),
    ("stereo_48k.m4a", dict(rate=48000, layout="stereo")),
    ("surround_51.m4a", dict(rate=48000, layout="5.1")),
    ("surround_51.wav", dict(rate=44100, layout="5.1")),
    ("silence.m4a", dict(rate=44100, signal="silence")),
    ("silence.wav", dict(rate=16000, signal="silence")),
    ("tiny.wav", dict(rate=16000, seconds=0.01)),
    ("sweep.mp3", dict(rate=44100, codec="libmp3lame")),
    ("noise.ogg", dict(rate=48000, codec="libopus", signal="noise")),
    ("noise.flac", dict(rate=22050, codec="flac", signal="noise")),
    ("noise_11k.wav", dict(rate=11025, signal="noise", seconds=2.5)),
])
def test_audio_layouts_and_rates(name, kw, tmp_path):
    p = make_audio(tmp_path / name, **kw)
    w, sr = media.decode_audio(p)
    channels = {"mono": 1, "stereo": 2, "5.1": 6}[kw.get("layout", "stereo")]
    assert w.shape[0] == channels and sr == kw["rate"] and w.dtype == np.float32
    a = media.load_audio(p)
    assert a.clips.shape == (8, 1, 128, 204) and a.clips.dtype == np.float32 and np.isfinite(a.clips).all()
    assert a.num_channels == channels and a.sample_rate == kw["rate"]
    # the file path and the array path agree (all channels kept; mean over all, fbank of channel 0)
    clips, times, dur = media.waveform_to_clips(w, sr)
    np.testing.assert_array_equal(a.clips, clips)
    assert dur == a.duration and (times == a.clip_times).all()
    if kw.get("signal") == "silence":  # every band at the log floor, then the zero padding
        floor, pad = (np.log(np.finfo(np.float32).eps) + 4.268) / 9.138, 4.268 / 9.138
        assert np.all(np.isclose(a.clips, floor, atol=1e-5) | np.isclose(a.clips, pad, atol=1e-6))


def test_multichannel_semantics():
    """Mean removal over ALL channels (a step at overlapping clip boundaries, in place), fbank of channel 0."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((6, 16000 * 5)).astype(np.float32) * 0.1
    dc = np.array([0.0, 0.3, -0.2, 0.5, 0.1, 0.4], np.float32)[:, None]
    six, _, _ = media.waveform_to_clips(base + dc, 16000)
    ch0, _, _ = media.waveform_to_clips((base + dc)[:1], 16000)
    assert np.abs(six - ch0).max() > 1e-3  # the other channels' DC shifts channel 0 via the quirk
    no_quirk6, _, _ = media.waveform_to_clips(base + dc, 16000, inplace_mean_quirk=False)
    no_quirk1, _, _ = media.waveform_to_clips((base + dc)[:1], 16000, inplace_mean_quirk=False)
    # without the quirk the mean removal is a constant shift per clip, which the per-frame DC removal undoes
    # channels 1..5 enter only through the mean: permuting them changes nothing (channel 0 is filter-banked)
    swapped = (base + dc)[[0, 3, 1, 5, 2, 4]]
    same, _, _ = media.waveform_to_clips(swapped, 16000)
    np.testing.assert_allclose(same, six, atol=1e-4)
    assert np.abs(no_quirk6 - no_quirk1).max() < 1e-4


@pytest.mark.parametrize("name,kw,mode", [("noise.m4a", dict(codec="aac", signal="noise"), "stream"),
                                          ("tone.mp3", dict(codec="libmp3lame", signal="sine"), "seek")])
def test_audio_seek_paths_are_exact(name, kw, mode, tmp_path):
    """Long tracks: decode="auto" reads only the clip ranges and equals a full decode bit for bit. MP3 is
    read by seeking; FFmpeg-encoded AAC of noise uses noise substitution (decoder-wide random state), which
    the double decode detects, so that track is decoded from the start instead ("stream")."""
    p = make_audio(tmp_path / name, rate=44100, seconds=24.0, **kw)
    full = media.load_audio(p, decode="full")
    auto = media.load_audio(p, seek_above_seconds=10)
    assert auto.decode_mode == mode
    np.testing.assert_array_equal(auto.clips, full.clips)
    seek = media.load_audio(p, decode="seek")  # fast, approximate for stateful decoders
    assert seek.decode_mode == "seek" and (seek.clip_times == full.clip_times).all()
    if mode == "seek":
        np.testing.assert_array_equal(seek.clips, full.clips)


def test_batch_with_errors(tmp_path, media_dir):
    good = make_video(tmp_path / "g.mp4", n_frames=12)
    short = make_video(tmp_path / "s.mp4", n_frames=3)
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 100)
    paths = [good, tmp_path / "bad.mp4", short, tmp_path / "missing.mp4", media_dir / "dog.jpg"]
    for workers in (1, 3):
        r = media.load_batch(paths, "video", workers=workers, image_size=64)
        assert r.index.tolist() == [0, 2, 4] and r.ok.tolist() == [True, False, True, False, True]
        assert r.arrays.shape == (3, 8, 64, 64, 3) and r.lengths.tolist() == [8, 3, 1]
        np.testing.assert_array_equal(r.arrays[1, 3:], np.repeat(r.arrays[1, 2:3], 5, 0))  # padded
        assert [type(e).__name__ for _, _, e in r.failures] == ["UnreadableMediaError"] * 2
        assert r.failures[0][1] == str(tmp_path / "bad.mp4")
    audio = media.load_batch([media_dir / "birthday.mp4", media_dir / "dog_audio.wav"], "audio")
    assert audio.arrays.shape == (1, 8, 1, 128, 204) and isinstance(audio.errors[0], media.NoAudioStreamError)
    imgs = media.load_batch([media_dir / "dog.jpg", tmp_path / "bad.mp4"], "image", as_video=True)
    assert imgs.arrays.shape == (1, 1, 224, 224, 3)
    a = media.load_batch([good, good], "video", workers=2, train=True, rng=np.random.default_rng(0), image_size=64)
    b = media.load_batch([good, good], "video", workers=2, train=True, rng=np.random.default_rng(0), image_size=64)
    np.testing.assert_array_equal(a.arrays, b.arrays)  # per-file generators: reproducible with a pool


def test_errors_are_typed_and_picklable():
    for cls in (media.MediaError, media.NoAudioStreamError, media.NoVideoStreamError, media.UnreadableMediaError):
        e = cls("/x/y.mp4", "some reason")
        assert isinstance(e, media.MediaError) and isinstance(e, Exception)
        assert "/x/y.mp4" in str(e) and "some reason" in str(e)
        e2 = pickle.loads(pickle.dumps(e))
        assert type(e2) is cls and e2.path == e.path and e2.reason == e.reason
