"""Audio input: ImageBind's ``load_and_transform_audio_data`` (as Video-LLaMA calls it) in numpy + PyAV.

Pipeline (upstream.md §4.1, upstream.md §13.2), per file:

1. Decode the first audio stream to float32 in [-1, 1], channels first (all channels kept: 5.1 stays 6
   channels, as torchaudio returns it). Integer PCM is scaled like torchaudio/sox (int16 / 32768, ...).
2. Resample to 16 kHz with torchaudio's default windowed-sinc resampler (``resample``).
3. ``D = N_16k / 16000``; 8 clip windows from pytorchvideo 0.1.5's ``ConstantClipsPerVideoSampler``
   (``clip_timepoints``): starts ``k * max(D - 2, 0) / 8`` in exact Fraction arithmetic, each 2 s; samples
   ``[int(start * 16000), int(end * 16000))``.
4. Per clip: subtract the clip mean over all channels, IN PLACE on a view of the shared waveform, so later
   overlapping clips see already-shifted samples (upstream quirk; ``inplace_mean_quirk=False`` subtracts from
   a copy instead) -> Kaldi fbank of channel 0 only (``kaldi_fbank``: 128 mel, 25/10 ms, hanning, ...) ->
   (128, frames) -> zero-pad / crop to 204 frames -> ``(x + 4.268) / 9.138``.
5. Stack -> (S, 1, 128, 204) float32.

Only the samples that the clips (plus the resampler's context) touch are ever resampled; on long files only
those are decoded too (``decode="auto"``, see ``load_audio``).

One module on purpose: it is that one pipeline, file to clips (its fbank and resampler serve nothing else).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, Protocol

import av
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .errors import NoAudioStreamError, UnreadableMediaError, check_decoder, open_container, translate_errors

TARGET_SAMPLE_RATE = 16000
FBANK_MEAN = -4.268
FBANK_STD = 9.138
_FLOAT32_EPS = float(np.finfo(np.float32).eps)  # torchaudio's log floor (torch.finfo(torch.float).eps)
_DECODE_ERRORS = (av.error.FFmpegError, OSError, EOFError, ValueError, RuntimeError)


@dataclass
class Audio:
    """Model-ready audio clips of one file."""

    clips: np.ndarray  # (S, 1, 128, 204) float32 normalised log-mel fbank
    clip_times: np.ndarray  # (S, 2) float64 start / end seconds of each clip
    sample_rate: int  # sample rate of the decoded stream (before resampling to 16 kHz)
    duration: float  # seconds, D = N_16k / 16000 (what the clip sampler used)
    num_channels: int = 0  # channels of the decoded stream (mean removal uses all, fbank channel 0)
    decode_mode: str = "full"  # how samples were read: "full" | "seek" | "stream" (see load_audio)


# ---------------------------------------------------------------------------------------------------------
# Kaldi-compatible fbank (torchaudio.compliance.kaldi.fbank semantics), vectorised
# ---------------------------------------------------------------------------------------------------------

def _mel(freq: np.ndarray | float) -> np.ndarray:
    return 1127.0 * np.log(1.0 + np.asarray(freq, np.float64) / 700.0)


def mel_banks(num_bins: int, padded_window_size: int, sample_rate: float, low_freq: float,
              high_freq: float) -> np.ndarray:
    """Kaldi triangular mel filters, (num_bins, padded_window_size // 2 + 1) float64 (last FFT bin weight 0)."""
    num_fft_bins = padded_window_size // 2
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if not (0.0 <= low_freq < nyquist and 0.0 < high_freq <= nyquist and low_freq < high_freq):
        raise ValueError(f"bad mel range low={low_freq} high={high_freq} (nyquist {nyquist})")
    mel_low, mel_high = _mel(low_freq), _mel(high_freq)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = np.arange(num_bins, dtype=np.float64)[:, None]
    left, center, right = mel_low + b * delta, mel_low + (b + 1) * delta, mel_low + (b + 2) * delta
    mel_f = _mel((sample_rate / padded_window_size) * np.arange(num_fft_bins))[None, :]
    up = (mel_f - left) / (center - left)
    down = (right - mel_f) / (right - center)
    banks = np.maximum(0.0, np.minimum(up, down))
    return np.pad(banks, ((0, 0), (0, 1)))


def _window(kind: str, size: int) -> np.ndarray:
    n = np.arange(size, dtype=np.float64)
    if kind == "hanning":  # symmetric, torch.hann_window(size, periodic=False)
        return 0.5 - 0.5 * np.cos(2 * np.pi * n / (size - 1))
    if kind == "povey":
        return (0.5 - 0.5 * np.cos(2 * np.pi * n / (size - 1))) ** 0.85
    if kind == "hamming":
        return 0.54 - 0.46 * np.cos(2 * np.pi * n / (size - 1))
    if kind == "rectangular":
        return np.ones(size)
    raise ValueError(f"unknown window_type {kind!r}")


def _frames(x: np.ndarray, size: int, shift: int, snip_edges: bool) -> np.ndarray:
    """(num_frames, size) analysis frames, Kaldi rules (reflection at the edges when not snipping)."""
    n = x.shape[0]
    if snip_edges:
        if n < size:
            return np.zeros((0, size), x.dtype)
        return sliding_window_view(x, size)[::shift]
    m = (n + shift // 2) // shift
    if m == 0:
        return np.zeros((0, size), x.dtype)
    idx = (np.arange(m) * shift + shift // 2 - size // 2)[:, None] + np.arange(size)[None, :]
    # Kaldi's ExtractWindow: reflect with the edge sample repeated (x[-1] := x[0], x[n] := x[n-1])
    idx = np.where(idx < 0, -idx - 1, idx)
    idx = np.where(idx >= n, 2 * n - 1 - idx, idx)
    return x[np.clip(idx, 0, n - 1)]


def kaldi_fbank(waveform: np.ndarray, sample_rate: float = 16000, num_mel_bins: int = 128,
                frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0, low_freq: float = 20.0,
                high_freq: float = 0.0, preemphasis: float = 0.97, remove_dc_offset: bool = True,
                window_type: str = "hanning", snip_edges: bool = True, channel: int = 0,
                use_power: bool = True, use_log: bool = True, round_to_power_of_two: bool = True) -> np.ndarray:
    """Kaldi-compatible log-mel filterbank, (frames, num_mel_bins) float32.

    Same semantics as ``torchaudio.compliance.kaldi.fbank`` with ``dither=0``, ``use_energy=False``,
    ``htk_compat`` irrelevant without energy, and its defaults: one channel (``channel``; -1 means 0, like
    torchaudio), frames of ``int(sr * 25 ms)`` every ``int(sr * 10 ms)`` samples, per-frame DC removal,
    pre-emphasis ``x[i] - 0.97 x[i-1]`` (``x[-1] := x[0]``), symmetric Hann window, zero-pad to a power of two,
    |rfft|^2, Kaldi mel filters (mel = 1127 ln(1 + f/700)), ``log(max(e, float32 eps))``.
    Computed in float64 (torchaudio: float32; they agree to ~5e-4 before normalisation, far closer than the
    log of tiny band energies lets two float32 implementations agree).
    """
    w = np.asarray(waveform)
    if w.ndim == 2:
        w = w[max(channel, 0)]
    elif w.ndim != 1:
        raise ValueError(f"waveform must be (samples,) or (channels, samples), got {w.shape}")
    x = w.astype(np.float64)
    size = int(sample_rate * frame_length_ms * 0.001)
    shift = int(sample_rate * frame_shift_ms * 0.001)
    padded = 1 << (size - 1).bit_length() if round_to_power_of_two else size
    banks = mel_banks(num_mel_bins, padded, sample_rate, low_freq, high_freq)
    frames = _frames(x, size, shift, snip_edges)
    if frames.shape[0] == 0:
        return np.zeros((0, num_mel_bins), np.float32)
    if remove_dc_offset:
        frames = frames - frames.mean(axis=1, keepdims=True)
    if preemphasis != 0.0:
        prev = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
        frames = frames - preemphasis * prev
    frames = frames * _window(window_type, size)
    spec = np.abs(np.fft.rfft(frames, n=padded, axis=1))
    if use_power:
        spec = spec * spec
    energies = spec @ banks.T
    if use_log:
        energies = np.log(np.maximum(energies, _FLOAT32_EPS))
    return energies.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# torchaudio-compatible resampling (sinc_interp_hann), as a polyphase FIR
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Resampler:
    orig: int  # gcd-reduced rates
    new: int
    width: int  # input samples of context on each side
    kernel: np.ndarray  # (new, 2 * width + orig) float32: output phase j of a block <- input taps

    @classmethod
    def make(cls, orig_sr: int, new_sr: int, lowpass_filter_width: int = 6, rolloff: float = 0.99) -> "_Resampler":
        g = math.gcd(int(orig_sr), int(new_sr))
        orig, new = int(orig_sr) // g, int(new_sr) // g
        base = min(orig, new) * rolloff  # cutoff, in units of the reduced rates
        width = math.ceil(lowpass_filter_width * orig / base)
        # float32 arithmetic step by step, like torchaudio (which builds the kernel in the waveform's dtype):
        # the kernel then differs from the exact one by up to 4e-6, and so does upstream's output. Matching
        # that rounding brings the 16 kHz waveform to ~1e-7 of upstream instead of ~6e-6, which matters for
        # the log of near-silent mel bands.
        f32 = np.float32
        idx = np.arange(-width, width + orig, dtype=f32) / f32(orig)
        t = (-np.arange(new, dtype=f32) / f32(new))[:, None] + idx[None, :]
        t = np.clip(t * f32(base), -lowpass_filter_width, lowpass_filter_width).astype(f32)
        window = np.cos(t * f32(np.pi) / f32(lowpass_filter_width) / f32(2)) ** 2
        t = t * f32(np.pi)
        safe = np.where(t == 0, f32(1), t)
        kernel = np.where(t == 0, f32(1), np.sin(safe) / safe) * window * f32(base / orig)
        return cls(orig, new, width, kernel.astype(f32))

    def out_length(self, n_in: int) -> int:
        return -(-self.new * n_in // self.orig)  # ceil(new * n / orig), as torchaudio

    def input_span(self, out_start: int, out_stop: int) -> tuple[int, int, int]:
        """Input samples [lo, hi) needed for outputs [out_start, out_stop), and the first block index."""
        b0, b1 = out_start // self.new, (out_stop - 1) // self.new + 1
        taps = self.kernel.shape[1]
        return b0 * self.orig - self.width, (b1 - 1) * self.orig - self.width + taps, b0

    def apply(self, x: np.ndarray, out_start: int, out_stop: int) -> np.ndarray:
        """Outputs [out_start, out_stop) from ``x`` = the input span (see ``input_span``, zeros outside the
        signal), (C, span) -> (C, out_stop - out_start) float32. Blocks are processed in chunks to bound
        memory on long signals."""
        b0 = out_start // self.new
        taps = self.kernel.shape[1]
        n_blocks = (x.shape[-1] - taps) // self.orig + 1
        out = np.empty((x.shape[0], n_blocks * self.new), np.float32)
        chunk = 2048  # blocks per matmul: (C, 2048, taps) float32 is ~8 MB for 44.1 -> 16 kHz
        for c0 in range(0, n_blocks, chunk):
            c1 = min(c0 + chunk, n_blocks)
            seg = x[:, c0 * self.orig: (c1 - 1) * self.orig + taps].astype(np.float32, copy=False)
            # (C, blocks, taps), made contiguous: matmul on the strided view skips BLAS (~30x slower)
            blocks = np.ascontiguousarray(sliding_window_view(seg, taps, axis=-1)[:, :: self.orig])
            out[:, c0 * self.new: c1 * self.new] = (blocks @ self.kernel.T).reshape(x.shape[0], -1)
        lo = out_start - b0 * self.new
        return out[:, lo: lo + (out_stop - out_start)]


def resample(waveform: np.ndarray, orig_sr: int, new_sr: int, lowpass_filter_width: int = 6,
             rolloff: float = 0.99) -> np.ndarray:
    """``torchaudio.functional.resample`` (sinc_interp_hann) in numpy: (..., N) -> (..., ceil(N*new/orig)).

    Rates are gcd-reduced (44100 -> 16000 is 441 -> 160); output phase j of block b is a dot product of a
    Hann-windowed sinc kernel with input samples around ``b * orig``, zero outside the signal.
    """
    w = np.asarray(waveform, np.float32)
    if int(orig_sr) == int(new_sr):
        return w.copy()
    shape = w.shape
    flat = w.reshape(-1, shape[-1])
    rs = _Resampler.make(orig_sr, new_sr, lowpass_filter_width, rolloff)
    n_out = rs.out_length(shape[-1])
    if n_out == 0:
        return np.zeros(shape[:-1] + (0,), np.float32)
    lo, hi, _ = rs.input_span(0, n_out)
    x = _read_padded(flat, lo, hi)
    return rs.apply(x, 0, n_out).reshape(shape[:-1] + (n_out,))


def _read_padded(w: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """w[:, lo:hi] with zeros where the range leaves [0, N)."""
    n = w.shape[-1]
    out = np.zeros((w.shape[0], hi - lo), np.float32)
    a, b = max(lo, 0), min(hi, n)
    if b > a:
        out[:, a - lo: b - lo] = w[:, a:b]
    return out


# ---------------------------------------------------------------------------------------------------------
# Clip sampler (pytorchvideo 0.1.5 ConstantClipsPerVideoSampler, as ImageBind's get_clip_timepoints uses it)
# ---------------------------------------------------------------------------------------------------------

def clip_timepoints(duration: float, clip_duration: float = 2.0, clips_per_video: int = 8) -> list[tuple[Fraction, Fraction]]:
    """``clips_per_video`` (start, end) pairs as exact Fractions.

    ``max_start = Fraction(max(duration - clip_duration, 0))`` (the subtraction happens in float, as in
    pytorchvideo where ``duration`` is a float), step ``max_start / clips_per_video`` (0.1.5 divides by
    clips_per_video, not clips_per_video - 1), start_k = k * step, end = start + clip_duration.
    """
    if clips_per_video <= 0:
        raise ValueError("clips_per_video must be positive")
    clip = Fraction(clip_duration)
    max_start = Fraction(max(float(duration) - float(clip), 0))
    step = max_start / clips_per_video
    return [(step * k, step * k + clip) for k in range(clips_per_video)]


# ---------------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------------

_INT_SCALE = {"s16": 32768.0, "s32": 2147483648.0, "s64": 9223372036854775808.0}


def _frame_to_float(frame: av.AudioFrame) -> np.ndarray:
    """Decoded frame -> (channels, samples) float32 in [-1, 1] (int16 / 32768 like torchaudio's sox path)."""
    fmt = frame.format
    arr = frame.to_ndarray()
    channels = frame.layout.nb_channels
    if not fmt.is_planar:  # packed: one row of interleaved samples
        arr = arr.reshape(-1, channels).T
    base = fmt.name.rstrip("p")
    if base in ("flt", "dbl"):
        return arr.astype(np.float32, copy=False)
    if base == "u8":
        return ((arr.astype(np.float32) - 128.0) / 128.0).astype(np.float32)
    if base in _INT_SCALE:
        return (arr.astype(np.float64) / _INT_SCALE[base]).astype(np.float32)
    raise ValueError(f"unsupported sample format {fmt.name}")


def _audio_stream(container: av.container.InputContainer, path: str) -> av.audio.stream.AudioStream:
    if not container.streams.audio:
        raise NoAudioStreamError(path, "no audio stream")
    stream = container.streams.audio[0]
    check_decoder(stream, path)
    for other in container.streams:  # skip the video packets while demuxing
        if other.index != stream.index:
            other.discard = av.stream.Discard.all
    return stream


def decode_audio(path: str | os.PathLike[str]) -> tuple[np.ndarray, int]:
    """Decode the whole first audio stream: ``(waveform (channels, samples) float32, sample_rate)``.

    Frames are concatenated as decoded (torchaudio/FFmpeg semantics; timestamp gaps are not filled).
    """
    p = os.fspath(path)
    container = open_container(p)
    try:
        return _decode_whole(container, _audio_stream(container, p), p)
    finally:
        container.close()


def _decode_whole(container: av.container.InputContainer, stream: av.audio.stream.AudioStream,
                  path: str) -> tuple[np.ndarray, int]:
    chunks: list[np.ndarray] = []
    sr, channels = None, None
    with translate_errors(path, "decoding the audio stream"):
        try:
            for frame in container.decode(stream):
                if frame.samples == 0:
                    continue
                if sr is None:
                    sr, channels = frame.sample_rate, frame.layout.nb_channels
                elif frame.sample_rate != sr or frame.layout.nb_channels != channels:
                    raise UnreadableMediaError(path, "audio sample rate / channel count changes mid-stream")
                chunks.append(_frame_to_float(frame))
        except _DECODE_ERRORS:
            if not chunks:
                raise
            # damaged tail: keep what decoded (FFmpeg CLI behaves the same way)
    if not chunks:
        raise UnreadableMediaError(path, "the audio stream decoded to no samples")
    return np.concatenate(chunks, axis=1), int(sr)


class _Source(Protocol):
    sample_rate: int
    channels: int
    num_samples: int
    mode: str

    def read(self, ranges: list[tuple[int, int]]) -> list[np.ndarray]: ...


class _ArraySource:
    mode = "full"

    def __init__(self, waveform: np.ndarray, sample_rate: int) -> None:
        self.waveform = waveform
        self.sample_rate = int(sample_rate)
        self.channels, self.num_samples = waveform.shape

    def read(self, ranges: list[tuple[int, int]]) -> list[np.ndarray]:
        return [_read_padded(self.waveform, lo, hi) for lo, hi in ranges]


class _NotSeekable(Exception):
    """The packet layout does not let us map samples to packets exactly; decode the whole track instead."""


class _PacketSource:
    """Decodes only requested sample ranges of a long track, exactly.

    Valid when every packet decodes to exactly ``frame_size`` samples at pts-contiguous positions (AAC, MP3,
    AC-3 ... ; checked in a demux-only pass, and again on every decoded frame). Then sample ``s`` of the
    decoded track sits at pts ``P0 + s`` (in samples) and ``N`` follows from the packet count, so no full
    decode is needed to know the duration and the clip positions.

    ``seek=True``: each range is decoded from a few packets earlier (``preroll``) after a seek. With ``verify``
    every range is decoded a second time from a longer preroll (and a different decoder state) and must come
    out identical. That catches decoders whose output depends on more than the last few packets - AAC noise
    substitution (PNS) draws from a decoder-wide random generator, SBR keeps state - and then (as with
    ``seek=False``) the track is decoded from the start, keeping only the requested ranges and stopping after
    the last one: exactly what a full decode gives, without holding the whole waveform.
    """

    def __init__(self, path: str, container: av.container.InputContainer, stream: av.audio.stream.AudioStream,
                 preroll_packets: int = 4, seek: bool = True, verify: bool = True) -> None:
        self.path = path
        self.seek, self.verify = seek, verify
        self.preroll = max(int(preroll_packets), 1)
        self.mode = "seek" if seek else "stream"
        # the caller's container (it closes it), reused for every seek: seeking flushes the decoder
        self._container, self.stream = container, stream
        self._index(container, stream)

    @staticmethod
    def plausible(container: av.container.InputContainer, stream: av.audio.stream.AudioStream,
                  min_seconds: float) -> bool:
        """Cheap pre-check before any demuxing: fixed frame size and (estimated) longer than min_seconds."""
        cc = stream.codec_context
        if not cc.sample_rate or not cc.frame_size or not stream.time_base:
            return False  # PCM, Vorbis, ...: decoding the whole track is the way
        if min_seconds <= 0:
            return True
        est = float(stream.duration * stream.time_base) if stream.duration else (
            container.duration / av.time_base if container.duration else math.inf)
        return est > min_seconds

    def _to_samples(self, pts: np.ndarray | int, time_base: Fraction) -> np.ndarray:
        """pts -> sample units; exact or _NotSeekable."""
        prod = np.asarray(pts, np.int64) * int(time_base.numerator) * self.sample_rate
        if np.any(prod % int(time_base.denominator)):
            raise _NotSeekable("timestamps are not whole samples")
        return prod // int(time_base.denominator)

    def _index(self, container: av.container.InputContainer, stream: av.audio.stream.AudioStream) -> None:
        cc = stream.codec_context
        self.sample_rate, fs = int(cc.sample_rate or 0), int(cc.frame_size or 0)
        if not self.sample_rate or not fs or not stream.time_base:
            raise _NotSeekable("no fixed frame size")
        pts: list[int] = []
        lead = 0  # decoded samples dropped at the start (encoder priming: skip_samples / discarded packets)
        skip_end, skip_end_at = 0, -1
        for pkt in container.demux(stream):
            if pkt.size == 0:
                continue
            if pkt.pts is None:
                raise _NotSeekable("packet without pts")
            if pkt.is_discard:  # only priming packets at the very start may be discarded
                if len(pts) * fs != lead:
                    raise _NotSeekable("discarded packet after the start")
                lead += fs
            for sd in pkt.iter_sidedata():
                if sd.data_type == "skip_samples":
                    raw = bytes(sd)
                    s0, s1 = int.from_bytes(raw[0:4], "little"), int.from_bytes(raw[4:8], "little")
                    if s0 and not pkt.is_discard:
                        if len(pts) * fs != lead or s0 > fs:
                            raise _NotSeekable("skip_samples after the start")
                        lead += s0
                    if s1:
                        skip_end, skip_end_at = s1, len(pts)
            pts.append(pkt.pts)
        # Packet durations are not used: decoders ignore them (boat.mp4's last packet says 96 samples and
        # decodes to 1024); every decoded frame is checked against this model instead.
        if len(pts) < 2:
            raise _NotSeekable("too few packets")
        self.time_base = stream.time_base
        self.pts = np.asarray(pts, np.int64)  # stream time base, for seeking
        self.pos = self._to_samples(self.pts, self.time_base)  # same, in samples
        if np.any(np.diff(self.pos) != fs):
            raise _NotSeekable("packet timestamps are not contiguous")
        if skip_end and skip_end_at != len(pts) - 1:
            raise _NotSeekable("end padding before the last packet")
        self.frame_size = fs
        self.channels = cc.layout.nb_channels
        self.p0 = int(self.pos[0]) + lead  # sample-unit pts of decoded sample 0
        self.num_samples = len(pts) * fs - lead - skip_end
        if self.num_samples <= 0:
            raise _NotSeekable("no samples")

    def read(self, ranges: list[tuple[int, int]]) -> list[np.ndarray]:
        if self.seek:
            try:
                out = [self._read_seeking(lo, hi, self.preroll) for lo, hi in ranges]
                if self.verify:
                    for (lo, hi), got in zip(ranges, out):
                        if not np.array_equal(self._read_seeking(lo, hi, 2 * self.preroll + 3), got):
                            raise _NotSeekable("samples depend on where decoding started (AAC PNS / SBR?)")
                return out
            except _NotSeekable:
                if not self.verify:
                    raise
                self.mode = "stream"
        return self._read_from_start(ranges)

    def _copy_frames(self, frames, outs: list[np.ndarray], ranges: list[tuple[int, int]], budget: int) -> None:
        """Copy decoded frames into the ``outs`` buffers of ``ranges`` (sample ranges clipped to [0, N)),
        checking every frame that lands in a range against the packet model; stop after the last range.
        Runs once per decoded frame (tens of thousands on a long track), so plain int arithmetic only."""
        fs, n, p0 = self.frame_size, self.num_samples, self.p0
        first_pos = int(self.pos[0])
        num, den = int(self.time_base.numerator) * self.sample_rate, int(self.time_base.denominator)
        start = min(lo for lo, _ in ranges)
        end = max(min(hi, n) for _, hi in ranges)
        covered = 0
        for frame in frames:
            budget -= 1
            if budget < 0:
                raise _NotSeekable("decoded more frames than the ranges need")
            samples, pts = frame.samples, frame.pts
            if samples == 0:
                continue
            if pts is None:
                raise _NotSeekable("frame without pts")
            fpos, rem = divmod(pts * num, den)
            pos = fpos - p0  # position of the frame's first sample in the decoded track
            if pos + samples <= start:
                continue  # preroll / before the first range: only warms the decoder up
            # a frame must end where its packet ends (the track's end for the last one)
            pkt_end = ((fpos - first_pos) // fs + 1) * fs + first_pos - p0
            if (rem or pos < 0 or pos + samples != min(pkt_end, n) or frame.sample_rate != self.sample_rate
                    or frame.layout.nb_channels != self.channels):
                raise _NotSeekable(f"frame of {samples} samples at {pos} breaks the packet model")
            data = None
            for (lo, hi), out in zip(ranges, outs):
                s0, s1 = max(pos, lo, 0), min(pos + samples, hi, n)
                if s1 > s0:
                    data = _frame_to_float(frame) if data is None else data
                    out[:, s0 - lo: s1 - lo] = data[:, s0 - pos: s1 - pos]
                    covered += s1 - s0
            if pos + samples >= end:
                break
        if covered != sum(max(min(hi, n) - max(lo, 0), 0) for lo, hi in ranges):
            raise _NotSeekable("ranges not fully decoded")

    def _read_seeking(self, lo: int, hi: int, preroll: int) -> np.ndarray:
        out = np.zeros((self.channels, hi - lo), np.float32)
        a, b = max(lo, 0), min(hi, self.num_samples)
        if b <= a:
            return out
        fs = self.frame_size
        first = (a + self.p0 - int(self.pos[0])) // fs
        start_pkt = max(first - preroll, 0)
        if start_pkt == 0:
            # Near the start there is no room for a preroll, and a decoder flushed by a seek is not in the
            # state of a fresh one (stale overlap buffers; the priming packet may not come back): decode
            # from the start with a fresh decoder, which is exactly what a full decode does.
            return self._read_from_start([(lo, hi)])[0]
        container, stream = self._container, self.stream
        container.seek(int(self.pts[start_pkt]), stream=stream, backward=True, any_frame=False)
        self._copy_frames(container.decode(stream), [out], [(lo, hi)], (b - a) // fs + preroll + 64)
        return out

    def _read_from_start(self, ranges: list[tuple[int, int]]) -> list[np.ndarray]:
        outs = [np.zeros((self.channels, hi - lo), np.float32) for lo, hi in ranges]
        if not any(min(hi, self.num_samples) > max(lo, 0) for lo, hi in ranges):
            return outs
        # a fresh demuxer + decoder, so the decoder state evolves exactly as in a full decode
        container = open_container(self.path)
        try:
            stream = _audio_stream(container, self.path)
            self._copy_frames(container.decode(stream), outs, ranges, len(self.pts) + 64)
        finally:
            container.close()
        return outs


# ---------------------------------------------------------------------------------------------------------
# Clips
# ---------------------------------------------------------------------------------------------------------

def _merge(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[list[int]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _clips_from_source(src: _Source, clips_per_video: int, clip_duration: float, inplace_mean_quirk: bool,
                       num_mel_bins: int, target_length: int) -> tuple[np.ndarray, np.ndarray, float]:
    sr_out = TARGET_SAMPLE_RATE
    rs = None if src.sample_rate == sr_out else _Resampler.make(src.sample_rate, sr_out)
    n16 = src.num_samples if rs is None else rs.out_length(src.num_samples)
    duration = n16 / sr_out
    times = clip_timepoints(duration, clip_duration, clips_per_video)
    # upstream: waveform[:, int(start * sr) : int(end * sr)] (Fraction -> int truncates); slices past the end
    # are shorter
    spans = [(min(int(s * sr_out), n16), min(int(e * sr_out), n16)) for s, e in times]
    segments = _merge([sp for sp in spans if sp[1] > sp[0]])
    if rs is None:
        bufs = src.read(segments)
    else:
        need = [rs.input_span(a, b) for a, b in segments]
        raw = src.read([(lo, hi) for lo, hi, _ in need])
        bufs = [rs.apply(x, a, b) for x, (a, b) in zip(raw, segments)]
    # Segment buffers play the role of upstream's full 16 kHz waveform: clip views into them overlap exactly
    # as upstream's views into the waveform do, so the in-place mean removal propagates the same way.
    clips = np.empty((clips_per_video, 1, num_mel_bins, target_length), np.float32)
    for k, (s, e) in enumerate(spans):
        if e > s:
            seg_i = next(i for i, (a, b) in enumerate(segments) if a <= s and e <= b)
            a = segments[seg_i][0]
            view = bufs[seg_i][:, s - a: e - a]
            mean = np.float32(view.mean(dtype=np.float64))
            if inplace_mean_quirk:
                view -= mean
                clip = view
            else:
                clip = view - mean
            fb = kaldi_fbank(clip, sample_rate=sr_out, num_mel_bins=num_mel_bins).T  # (mel, frames)
        else:
            fb = np.zeros((num_mel_bins, 0), np.float32)
        # upstream crashes (division by zero) for clips under 25 ms; we zero-pad them like shorter clips
        fb = fb[:, :target_length]
        padded = np.zeros((num_mel_bins, target_length), np.float32)
        padded[:, : fb.shape[1]] = fb
        clips[k, 0] = (padded - np.float32(FBANK_MEAN)) / np.float32(FBANK_STD)
    clip_times = np.asarray([[float(s), float(e)] for s, e in times], np.float64)
    return clips, clip_times, duration


def waveform_to_clips(waveform: np.ndarray, sample_rate: int, clips_per_video: int = 8,
                      clip_duration: float = 2.0, inplace_mean_quirk: bool = True, num_mel_bins: int = 128,
                      target_length: int = 204) -> tuple[np.ndarray, np.ndarray, float]:
    """(channels, samples) float waveform at any rate -> ``(clips (S,1,mel,T), clip_times (S,2), duration)``.

    The input array is not modified (the in-place quirk acts on internal buffers)."""
    w = np.asarray(waveform, np.float32)
    if w.ndim == 1:
        w = w[None]
    if w.shape[-1] == 0:
        raise ValueError("empty waveform")
    return _clips_from_source(_ArraySource(w, sample_rate), clips_per_video, clip_duration,
                              inplace_mean_quirk, num_mel_bins, target_length)


def load_audio(path: str | os.PathLike[str], clips_per_video: int = 8, inplace_mean_quirk: bool = True,
               clip_duration: float = 2.0, *, decode: Literal["auto", "full", "seek"] = "auto",
               seek_above_seconds: float = 120.0, num_mel_bins: int = 128, target_length: int = 204) -> Audio:
    """Audio (or video) file -> ``Audio`` with (S, 1, 128, 204) normalised fbank clips.

    Raises ``NoAudioStreamError`` if the file has no audio stream, ``UnreadableMediaError`` if it cannot be
    decoded. ``decode``:

    * ``"full"``: decode the whole track (upstream's way; exact).
    * ``"seek"``: decode only the ~2 s ranges the clips use, by seeking (falls back to "full" when the
      packet layout does not allow exact sample positions). Bit-identical to "full" for decoders whose output
      depends only on the last few packets (checked on the example media, MP3, AAC without PNS). AAC noise
      substitution (PNS, used by FFmpeg's own AAC encoder on noisy content) draws from a decoder-wide random
      generator, so after a seek those bands get different, statistically equivalent noise: up to 0.4 in
      the normalised fbank on a 30 s white-noise AAC file.
    * ``"auto"`` (default): exact. Tracks longer than ``seek_above_seconds`` are read by seeking and every
      range is decoded twice from different starting points; if the two differ (PNS/SBR state), the track
      is decoded from the start instead, keeping only the clip ranges and stopping after the last one
      (``decode_mode == "stream"``). Shorter tracks are decoded whole (cheap).
    """
    p = os.fspath(path)
    if decode not in ("auto", "full", "seek"):
        raise ValueError(f"decode must be 'auto', 'full' or 'seek', got {decode!r}")
    args = (clips_per_video, clip_duration, inplace_mean_quirk, num_mel_bins, target_length)
    container = open_container(p)  # one open serves both paths as long as nothing was demuxed yet
    try:
        stream = _audio_stream(container, p)
        min_s = seek_above_seconds if decode == "auto" else 0.0
        if decode != "full" and _PacketSource.plausible(container, stream, min_s):
            try:
                with translate_errors(p, "reading audio clips"):
                    packets = _PacketSource(p, container, stream, verify=(decode == "auto"))
                    clips, times, duration = _clips_from_source(packets, *args)
                return Audio(clips, times, packets.sample_rate, duration, packets.channels, packets.mode)
            except _NotSeekable:  # a packet layout we cannot map exactly: decode the whole track
                container.close()
                container = open_container(p)
                stream = _audio_stream(container, p)
        waveform, sr = _decode_whole(container, stream, p)
    finally:
        container.close()
    clips, times, duration = _clips_from_source(_ArraySource(waveform, sr), *args)
    return Audio(clips, times, sr, duration, waveform.shape[0], "full")


__all__ = [
    "Audio", "FBANK_MEAN", "FBANK_STD", "TARGET_SAMPLE_RATE", "clip_timepoints", "decode_audio", "kaldi_fbank",
    "load_audio", "mel_banks", "resample", "waveform_to_clips",
]
