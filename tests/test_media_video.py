"""Video decoding: sampling rules, seek path == decode-all path, formats, rotation, train transform."""
from __future__ import annotations

import re

import numpy as np
import pytest
from tests.media_helpers import frame_image, make_video, read_index

from vllama_jax import media
from vllama_jax.media import image as image_mod

REAL = ["IronMan", "applausing", "birthday", "boat", "dog_barking", "silence_girl", "skateboarding_dog"]


# ------------------------------------------------------------------------------------------------ sampling

def test_uniform_indices_like_upstream():
    for vlen in range(1, 400):
        for n in (1, 3, 7, 8, 16, 22, 32, 64):
            got = media.sample_frame_indices(vlen, n, "uniform")
            k = min(n, vlen)
            assert got.tolist() == np.arange(0, vlen, vlen / k).astype(int)[:k].tolist()
            assert len(got) == k and got.dtype == np.int64
    # powers of two: exactly floor(k * vlen / n)
    for vlen in range(8, 2000):
        assert media.sample_frame_indices(vlen, 8).tolist() == [k * vlen // 8 for k in range(8)]


def test_headtail_indices():
    rng = np.random.default_rng(0)
    for vlen in (2, 9, 100, 1000):
        for n in (2, 8, 9, 16):
            idx = media.sample_frame_indices(vlen, n, "headtail", rng)
            k = min(n, vlen)
            half = k // 2
            assert len(idx) == 2 * half  # odd n -> n - 1 frames, like upstream
            head, tail = idx[:half], idx[half:]
            assert (np.diff(head) > 0).all() and (np.diff(tail) > 0).all()
            assert head.max() < vlen // 2 <= tail.min() and tail.max() < vlen
    a = media.sample_frame_indices(500, 8, "headtail", np.random.default_rng(3))
    b = media.sample_frame_indices(500, 8, "headtail", np.random.default_rng(3))
    assert a.tolist() == b.tolist()
    assert media.sample_frame_indices(1, 8, "headtail", rng).tolist() == [0]  # fallback, never empty


def test_random_indices():
    rng = np.random.default_rng(0)
    for vlen in (30, 100, 1001):
        for n in (4, 8, 13):
            idx = media.sample_frame_indices(vlen, n, "random", rng)
            edges = np.linspace(0, vlen, n + 1).astype(int)
            assert len(idx) == n
            assert ((idx >= edges[:-1]) & (idx < edges[1:] - 1)).all()  # never a segment's last frame
    short = media.sample_frame_indices(10, 8, "random", rng)  # segments too short -> sorted distinct draw
    assert len(short) == 8 and len(set(short.tolist())) == 8 and (np.diff(short) > 0).all()
    with pytest.raises(ValueError):
        media.sample_frame_indices(10, 8, "bogus")


# ------------------------------------------------------------------------------------- seek == decode-all

@pytest.mark.parametrize("name", REAL)
def test_seek_equals_decode_all_real(name, media_dir):
    p = media_dir / f"{name}.mp4"
    for sampling, n in [("uniform", 8), ("random", 13)]:
        a, ma = media.load_video_uint8(p, n, sampling, rng=np.random.default_rng(7))
        b, mb = media.decode_all_frames(p, n, sampling, rng=np.random.default_rng(7))
        assert ma.indices.tolist() == mb.indices.tolist()
        np.testing.assert_array_equal(a, b)
        assert ma.frames_decoded <= mb.frames_decoded


@pytest.mark.parametrize("kw", [dict(gop=10, bframes=2), dict(gop=7, bframes=0), dict(gop=5, vfr=True),
                                dict(codec="mpeg4", pix_fmt="yuv420p"), dict(gop=250, bframes=3)])
def test_seek_equals_decode_all_synthetic(kw, tmp_path):
    p = make_video(tmp_path / "v.mp4", n_frames=45, **kw)
    assert media.video_info(p)["num_frames"] == 45
    for n, sampling in [(45, "uniform"), (64, "uniform"), (9, "random"), (6, "headtail")]:
        a, ma = media.load_video_uint8(p, n, sampling, image_size=96, rng=np.random.default_rng(1))
        b, _ = media.decode_all_frames(p, n, sampling, image_size=96, rng=np.random.default_rng(1))
        np.testing.assert_array_equal(a, b)
        assert [read_index(f) for f in a] == ma.indices.tolist()  # frame k really is the k-th frame


def test_many_frames_no_cap(tmp_path):
    p = make_video(tmp_path / "v.mp4", n_frames=60, gop=12)
    v = media.load_video(p, num_frames=48, image_size=64)
    assert v.frames.shape == (48, 64, 64, 3) and len(v.indices) == 48


def test_fewer_frames_than_requested(tmp_path):
    p = make_video(tmp_path / "short.mp4", n_frames=5)
    v = media.load_video(p, num_frames=8, image_size=96)
    assert v.frames.shape == (5, 96, 96, 3)
    assert v.indices.tolist() == [0, 1, 2, 3, 4] and v.num_frames_total == 5
    assert v.message().startswith("The video contains 5 frames sampled at 0.0, 0.1, 0.2, 0.3, 0.4 seconds.")
    one = make_video(tmp_path / "one.mp4", n_frames=1)
    assert media.load_video(one, num_frames=8, image_size=32).frames.shape == (1, 32, 32, 3)


def test_variable_frame_rate(tmp_path):
    p = make_video(tmp_path / "vfr.mp4", n_frames=30, vfr=True, gop=6)
    u8, meta = media.load_video_uint8(p, num_frames=10, image_size=96)
    assert [read_index(f) for f in u8] == meta.indices.tolist()
    assert meta.num_frames_total == 30
    # timestamps are the real presentation times (irregular), strictly increasing from 0
    assert meta.timestamps[0] == 0 and (np.diff(meta.timestamps) > 0).all()
    gaps = np.diff(media.load_video_uint8(p, num_frames=30, image_size=32)[1].timestamps)
    assert len(set(np.round(gaps, 3).tolist())) > 1


def test_time_window_samples_inside_it(tmp_path):
    """A (start, end) window: the uniform rule over the frames shown in it (MVBench's bounds); both fetch paths
    agree; a window past the end is clipped to the video; an empty or outside one is a TimeWindowError."""
    p = make_video(tmp_path / "w.mp4", n_frames=20, fps=10, gop=4)  # frame k at k / 10 s
    u8, meta = media.load_video_uint8(p, num_frames=3, image_size=96, window=(0.3, 0.8))
    assert meta.indices.tolist() == [3, 5, 7]  # 3 + uniform(6 frames: 0.3 .. 0.8 s, 3)
    assert [read_index(f) for f in u8] == [3, 5, 7]
    np.testing.assert_allclose(meta.timestamps, [0.3, 0.5, 0.7])
    ref, ref_meta = media.decode_all_frames(p, num_frames=3, image_size=96, window=(0.3, 0.8))
    np.testing.assert_array_equal(u8, ref)
    assert ref_meta.indices.tolist() == [3, 5, 7]
    clipped = media.load_video(p, num_frames=8, image_size=32, window=(1.5, 9.0))
    # 5 frames in the clipped window, 8 asked: repeated to 8 (MVBench's get_index always gives num_segments)
    assert clipped.indices.tolist() == [15, 15, 16, 16, 17, 18, 18, 19]
    assert clipped.frames.shape[0] == 8
    for window, reason in [((3.0, 4.0), "holds no frame of the video (2.000 s long)"),
                           ((0.5, 0.5), "end <= start"), ((0.8, 0.3), "end <= start")]:
        with pytest.raises(media.TimeWindowError, match=re.escape(reason)):
            media.load_video_uint8(p, num_frames=3, image_size=32, window=window)


@pytest.mark.parametrize("codec,pix_fmt,ext", [
    ("libx264", "yuv420p10le", "mp4"), ("libx264", "yuv444p", "mp4"), ("libx264", "gray", "mp4"),
    ("ffv1", "gray", "mkv"), ("ffv1", "yuv420p10le", "mkv"), ("mpeg4", "yuv420p", "avi"),
    ("libvpx-vp9", "yuv420p", "webm"), ("libx264", "yuv420p", "ts"), ("libx264", "yuv420p", "h264"),
])
def test_pixel_formats_and_containers(codec, pix_fmt, ext, tmp_path):
    p = make_video(tmp_path / f"v.{ext}", n_frames=10, codec=codec, pix_fmt=pix_fmt)
    u8, meta = media.load_video_uint8(p, num_frames=10, image_size=96)
    assert u8.shape == (10, 96, 96, 3) and u8.dtype == np.uint8
    assert [read_index(f) for f in u8] == list(range(10))
    assert u8[:, 5:30, 5:30].mean() > 200  # the white top-left marker survived the colour conversion


# ----------------------------------------------------------------------------------------------- rotation

def _white_quadrant(rgb: np.ndarray) -> str:
    h, w = rgb.shape[:2]
    q = {"tl": rgb[: h // 2, : w // 2], "tr": rgb[: h // 2, w // 2:], "bl": rgb[h // 2:, : w // 2],
         "br": rgb[h // 2:, w // 2:]}
    return max(q, key=lambda k: q[k].mean())


@pytest.mark.parametrize("rotation,hflip,expected", [
    (0, False, "tl"), (90, False, "bl"), (180, False, "br"), (270, False, "tr"), (-90, False, "tr"),
    (0, True, "tr"), (90, True, "br"),
])
def test_rotation_metadata_honoured(rotation, hflip, expected, tmp_path):
    """Display matrix (PyAV convention: rotate ``rotation`` degrees counter-clockwise, then mirror)."""
    p = make_video(tmp_path / "rot.mp4", n_frames=3, width=96, height=64, rotation=rotation, hflip=hflip)
    u8, meta = media.load_video_uint8(p, num_frames=1, image_size=64)
    raw, raw_meta = media.load_video_uint8(p, num_frames=1, image_size=64, honour_rotation=False)
    assert _white_quadrant(u8[0]) == expected
    assert _white_quadrant(raw[0]) == "tl" and raw_meta.rotation == 0  # decord behaviour
    want = np.rot90(raw[0], (rotation // 90) % 4)
    np.testing.assert_array_equal(u8[0], want[:, ::-1] if hflip else want)
    assert meta.rotation == (rotation % 360)


# ---------------------------------------------------------------------------------------------- transforms

def test_random_resized_crop_params():
    rng = np.random.default_rng(0)
    for _ in range(300):
        top, left, h, w = media.random_resized_crop_params(224, 224, rng)
        assert 0 <= top and top + h <= 224 and 0 <= left and left + w <= 224
        assert 0.5 * 224 * 224 * 0.95 <= h * w <= 224 * 224
        assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05
    # impossible aspect -> centre crop fallback with the ratio clamped
    assert media.random_resized_crop_params(10, 1000, rng) == (0, 493, 10, 13)


def test_bicubic_matches_torch():
    import torch  # a test dependency (pyproject [test])
    F = torch.nn.functional
    rng = np.random.default_rng(0)
    for h, w in [(150, 180), (113, 200), (224, 170), (300, 260)]:
        x = rng.integers(0, 256, (2, h, w, 3)).astype(np.float32)
        ours = media.bicubic_resize(x, 224, 224)
        ref = F.interpolate(torch.from_numpy(x).permute(3, 0, 1, 2), size=(224, 224), mode="bicubic",
                            align_corners=False).permute(1, 2, 3, 0).numpy()
        assert np.abs(ours - ref).max() < 2e-3  # float32 accumulation order only (measured <= 3.5e-4)
        # uint8 cast with wraparound, like torch's .to(torch.uint8)
        ref_u8 = torch.from_numpy(ref).to(torch.uint8).numpy()
        ours_u8 = media.float_to_uint8(ours)
        near_int = np.abs(ref - np.round(ref)) < 2e-3  # where float rounding may flip the truncation
        assert (ours_u8 == ref_u8)[~near_int].all()
        assert ((ref < 0) | (ref >= 256)).any()  # random pixels overshoot: the wraparound is exercised


def test_uint8_wraparound_and_clamp():
    x = np.array([-1.5, -0.2, 0.0, 254.9, 255.0, 255.7, 256.2, 300.0], np.float32)
    assert media.float_to_uint8(x).tolist() == [255, 0, 0, 254, 255, 255, 0, 44]
    assert media.float_to_uint8(x, clamp=True).tolist() == [0, 0, 0, 254, 255, 255, 255, 255]


def test_train_transform(tmp_path):
    p = make_video(tmp_path / "v.mp4", n_frames=20, width=160, height=96)
    a = media.load_video(p, num_frames=8, train=True, rng=np.random.default_rng(5), image_size=112)
    b = media.load_video(p, num_frames=8, train=True, rng=np.random.default_rng(5), image_size=112)
    c = media.load_video(p, num_frames=8, train=True, rng=np.random.default_rng(6), image_size=112)
    assert a.frames.shape == (8, 112, 112, 3) and a.frames.dtype == np.float32
    np.testing.assert_array_equal(a.frames, b.frames)
    assert not np.array_equal(a.frames, c.frames)
    # same crop for every frame: the (static) white marker is in the same place in all frames
    marker = a.frames[..., 0] > 1.8  # white (1.93) but not the index stripes (230 -> 1.57)
    assert (marker == marker[0]).mean() > 0.99
    # equals the transform applied to the raw decode with the same generator state
    rng = np.random.default_rng(5)
    u8, _ = media.load_video_uint8(p, num_frames=8, image_size=112, rng=rng)
    np.testing.assert_array_equal(a.frames, media.alpro_video_train(u8, rng, 112))


def test_alpro_train_vs_torch_reference():
    """Our alpro_video_train vs the same pipeline written with torch ops, given the same crop box."""
    import torch  # a test dependency (pyproject [test])
    rng = np.random.default_rng(0)
    frames = np.stack([frame_image(k, 224, 224) for k in range(4)])
    box = media.random_resized_crop_params(224, 224, np.random.default_rng(11))
    ours = media.alpro_video_train(frames, np.random.default_rng(11), 224)
    top, left, h, w = box
    clip = torch.from_numpy(frames).permute(3, 0, 1, 2).float()[..., top:top + h, left:left + w]
    up = torch.nn.functional.interpolate(clip, size=(224, 224), mode="bicubic", align_corners=False)
    u8 = up.permute(1, 2, 3, 0).to(torch.uint8).numpy()  # ToTHWC + ToUint8 (wraps)
    ref = image_mod.normalize_uint8(u8)
    assert (np.abs(ours - ref) < 1e-5).mean() > 0.999
    del rng


def test_image_train_crop_and_errors(media_dir, tmp_path):
    a = media.load_image(media_dir / "dog.jpg", train=True, rng=np.random.default_rng(0), image_size=64)
    assert a.shape == (64, 64, 3)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes((media_dir / "dog.jpg").read_bytes()[:2000])
    with pytest.raises(media.UnreadableMediaError):
        media.load_image(bad)
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(media.UnreadableMediaError):
        media.load_image(tmp_path / "text.jpg")
