"""Kaldi fbank vs kaldi-native-fbank, resampler and clip sampler properties."""
from __future__ import annotations

import math

import kaldi_native_fbank as knf  # a test dependency: missing, it fails rather than skips
import numpy as np
import pytest

from vllama_jax import media
from vllama_jax.media import audio as audio_mod



def knf_fbank(x: np.ndarray, num_bins: int = 80, frame_length_ms: float = 25.0, snip_edges: bool = True,
              window: str = "hanning") -> np.ndarray:
    """kaldi-native-fbank with upstream's options. knf takes the samples as given (no int16 rescaling:
    feeding x * 32768 only shifts every log energy by log(32768^2))."""
    o = knf.FbankOptions()
    o.frame_opts.dither = 0.0
    o.frame_opts.window_type = window
    o.frame_opts.samp_freq = 16000
    o.frame_opts.snip_edges = snip_edges
    o.frame_opts.remove_dc_offset = True
    o.frame_opts.preemph_coeff = 0.97
    o.frame_opts.frame_length_ms = frame_length_ms
    o.mel_opts.num_bins = num_bins
    o.mel_opts.low_freq = 20.0
    o.mel_opts.high_freq = 0.0
    o.use_energy = False
    o.htk_compat = True
    o.use_log_fbank = True
    o.use_power = True
    fb = knf.OnlineFbank(o)
    fb.accept_waveform(16000, np.asarray(x, np.float32).tolist())
    fb.input_finished()
    return np.stack([np.asarray(fb.get_frame(i)) for i in range(fb.num_frames_ready)])


def _signals(media_dir) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    t = np.arange(32000) / 16000
    w, sr = media.decode_audio(media_dir / "dog_audio.wav")
    real = media.resample(w, sr, 16000)[0, 16000:48000]
    return {
        "real_dog_audio": real,
        "noise": (0.1 * rng.standard_normal(32000)).astype(np.float32),
        "sweep": (0.5 * np.sin(2 * np.pi * (50 * t + (7900 - 50) / 4 * t**2))).astype(np.float32),
        "silence": np.zeros(32000, np.float32),
        "quiet_noise": (1e-4 * rng.standard_normal(32000)).astype(np.float32),
    }


@pytest.fixture(scope="module")
def signals(media_dir):
    return _signals(media_dir)


# knf (like Kaldi) refuses 128 bins with a 512-point FFT ("num_mel_bins too large": the lowest mel filters
# contain no FFT bin); torchaudio/upstream just leaves those bands at log(eps). So compare knf at 80 bins with
# upstream's framing, and at 128 bins with 50 ms frames (1024-point FFT).
@pytest.mark.parametrize("name", ["real_dog_audio", "noise", "sweep", "silence", "quiet_noise"])
@pytest.mark.parametrize("cfg", [dict(num_bins=80), dict(num_bins=128, frame_length_ms=50.0),
                                 dict(num_bins=80, snip_edges=False), dict(num_bins=64, window="hamming"),
                                 dict(num_bins=64, window="povey")])
def test_fbank_matches_knf(name, cfg, signals):
    x = signals[name]
    ref = knf_fbank(x, **cfg)
    ours = media.kaldi_fbank(x, num_mel_bins=cfg["num_bins"], frame_length_ms=cfg.get("frame_length_ms", 25.0),
                             snip_edges=cfg.get("snip_edges", True), window_type=cfg.get("window", "hanning"))
    assert ours.shape == ref.shape and ours.dtype == np.float32
    assert np.isfinite(ours).all()
    # knf computes in float32, we in float64: band energies agree to float32 rounding of the frame's
    # dominant energy (a sweep leaves bands 1e-10 below the peak, where only that absolute error is defined),
    # and in the log domain wherever a band holds a non-negligible share of the frame's energy.
    e_ours, e_ref = np.exp(ours.astype(np.float64)), np.exp(ref.astype(np.float64))
    peak = e_ref.max(axis=1, keepdims=True)
    assert (np.abs(e_ours - e_ref) <= 5e-5 * peak).all()  # measured <= 1.7e-5
    strong = e_ref > 1e-4 * peak
    assert np.abs(ours - ref)[strong].max() < 1e-3  # measured <= 3.3e-4
    assert np.median(np.abs(ours - ref)) < 1e-5


def test_fbank_knf_int16_scaling(signals):
    """knf does not rescale floats: int16-scaled input shifts every log energy by exactly 2 ln 32768."""
    x = signals["noise"]
    a, b = knf_fbank(x * 32768), knf_fbank(x)
    np.testing.assert_allclose(a - b, 2 * math.log(32768), atol=1e-3)
    np.testing.assert_allclose(media.kaldi_fbank(x * 32768, num_mel_bins=80), a, atol=2e-3)


def test_fbank_upstream_config_properties(signals):
    fb = media.kaldi_fbank(signals["noise"])  # upstream defaults: 128 bins, 25/10 ms
    assert fb.shape == (198, 128)  # 1 + (32000 - 400) // 160
    floor = math.log(np.finfo(np.float32).eps)
    np.testing.assert_allclose(media.kaldi_fbank(signals["silence"]), floor, rtol=0, atol=1e-6)
    banks = media.mel_banks(128, 512, 16000, 20.0, 0.0)
    assert banks.shape == (128, 257) and (banks >= 0).all() and banks.max() <= 1 and (banks[:, 256] == 0).all()
    empty = np.flatnonzero(banks.sum(1) == 0)
    assert len(empty) > 0 and (fb[:, empty] == np.float32(floor)).all()  # the filters knf refuses
    assert media.kaldi_fbank(np.zeros(399, np.float32)).shape == (0, 128)
    # channel 0 only, (samples,) and (channels, samples) agree
    two = np.stack([signals["noise"], signals["sweep"]])
    np.testing.assert_array_equal(media.kaldi_fbank(two), fb)


def test_resample_properties():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 44100)).astype(np.float32)
    assert media.resample(x, 16000, 16000).shape == x.shape
    for sr, n in [(8000, 8000), (22050, 22050), (44100, 44100), (48000, 44100), (11025, 1234), (44100, 7)]:
        y = media.resample(x[:, :n], sr, 16000)
        assert y.shape == (2, math.ceil(16000 * n / sr)) and y.dtype == np.float32
    # a 1 kHz tone keeps its amplitude across up- and down-sampling (away from the edges)
    for sr in (8000, 48000):
        t = np.arange(sr) / sr
        y = media.resample(np.sin(2 * np.pi * 1000 * t)[None].astype(np.float32), sr, 16000)[0, 1000:-1000]
        ref = np.sin(2 * np.pi * 1000 * (np.arange(16000) / 16000))[1000:-1000]
        assert np.abs(y - ref).max() < 2e-3
    # content above the new Nyquist is removed
    t = np.arange(48000) / 48000
    y = media.resample(np.sin(2 * np.pi * 12000 * t)[None].astype(np.float32), 48000, 16000)
    assert np.abs(y[0, 200:-200]).max() < 1e-2


def test_resample_ranges_equal_full():
    """The clip path resamples only the ranges it needs; those samples equal the full resample."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 50000)).astype(np.float32)
    full = media.resample(x, 44100, 16000)
    rs = audio_mod._Resampler.make(44100, 16000)
    for a, b in [(0, 1), (0, 18000), (5, 17), (1000, 9999), (full.shape[1] - 50, full.shape[1])]:
        lo, hi, _ = rs.input_span(a, b)
        part = rs.apply(audio_mod._read_padded(x, lo, hi), a, b)
        np.testing.assert_allclose(part, full[:, a:b], rtol=0, atol=1e-6)


def test_clip_timepoints():
    assert media.clip_timepoints(1.5) == [(0, 2)] * 8
    assert media.clip_timepoints(2.0) == [(0, 2)] * 8
    t = media.clip_timepoints(10.0)
    assert [float(s) for s, _ in t] == [k * 1.0 for k in range(8)]  # (10 - 2) / 8, last clip ends at 9 s
    assert all(e - s == 2 for s, e in t)
    assert len(media.clip_timepoints(10.0, clips_per_video=3)) == 3


def test_waveform_to_clips_short_and_silent():
    """Silence gives finite clips; audio shorter than one fbank window (upstream: ZeroDivisionError) gives
    all-padding clips."""
    clips, times, dur = media.waveform_to_clips(np.zeros((2, 48000), np.float32), 48000)
    assert clips.shape == (8, 1, 128, 204) and np.isfinite(clips).all() and dur == 1.0
    clips, _, _ = media.waveform_to_clips(np.ones((1, 100), np.float32), 16000)
    np.testing.assert_allclose(clips, -media.FBANK_MEAN / media.FBANK_STD, rtol=1e-6)
    x = np.random.default_rng(0).standard_normal((2, 80000)).astype(np.float32)
    before = x.copy()
    media.waveform_to_clips(x, 16000)
    np.testing.assert_array_equal(x, before)  # the in-place quirk never touches the caller's array
