"""The demo's dataset: short generated videos with sound, and their ground truth.

Each clip is ``seconds`` long at ``fps`` frames per second: one coloured shape (circle / square / triangle) on a
plain dark background moves left or right (its whole path inside the frame, from a random start), while one of four
sounds plays (a hum, a beep, a whistle or a hiss). Colour, shape, direction and sound are drawn independently of
each other. Everything is drawn with numpy and encoded with PyAV (H.264 or MPEG-4 video + Opus or AAC audio in an .mp4),
deterministically from ``(seed, clip index)``.

The generator also says what a model should answer about each clip (``ClipSpec.conversation``: one question and
answer per attribute); for held-out clips that is the ground truth the demo scores answers against
(:mod:`vllama_jax.demo.evaluate`).
"""
from __future__ import annotations

import dataclasses
import json
import math
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Sequence

import av
import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (40, 190, 60),
    "blue": (45, 85, 235),
    "yellow": (240, 215, 40),
    "purple": (150, 55, 205),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
#: left and right only: a shuffled clip keeps the *set* of its frames, and the set of positions of a straight
#: motion tells its axis (horizontal or vertical); with up/down as well, destroying the temporal order could only
#: halve the direction accuracy instead of taking it to chance, so the ablation would not show what order carries
DIRECTIONS = ("left", "right")
#: the sounds, each in its own frequency band so that even a random frozen audio tower hears them apart:
#: word -> (kind, frequency in Hz; for noise the centre of its band, ``HISS_BAND`` times it). The hiss is high
#: band-limited noise, as a real hiss is: broadband noise lit every mel bin, and the random audio tower's
#: embedding of it lay ~11x farther from the three tones than the beep from the whistle, so training told the
#: hiss from the tones first and the beep from the whistle last (seeds 1 and 2 merged them: sound 75%); with the
#: band the pairs' distances are within 2.6x of each other
SOUNDS: dict[str, tuple[str, float]] = {"hum": ("harmonic", 150.0), "beep": ("sine", 1000.0),
                                        "whistle": ("sine", 3600.0), "hiss": ("noise", 6000.0)}
#: the hiss's band, as factors of its centre frequency (about 4.8-7.5 kHz)
HISS_BAND = (0.8, 1.25)

#: attribute -> (the question asked, the possible answer words)
ATTRIBUTES: dict[str, tuple[str, tuple[str, ...]]] = {
    "colour": ("What colour is the shape?", tuple(COLOURS)),
    "shape": ("What shape is it?", SHAPES),
    "direction": ("Which way does it move?", DIRECTIONS),
    "sound": ("What do you hear?", tuple(SOUNDS)),
}
#: attributes answerable from the picture alone (a conversation without the audio block asks only these)
VISUAL = ("colour", "shape", "direction")

_DIRECTION_TEXT = {"left": "to the left", "right": "to the right"}
_STEP = {"left": -1, "right": 1}


def answer_text(attribute: str, value: str) -> str:
    """The answer to ``ATTRIBUTES[attribute]``'s question when the attribute has ``value``, phrased the way SmolLM2
    starts its own answers ("The shape is ..."), so that training teaches the content, not a new style. The
    training targets, and the options of the multiple-choice evaluation."""
    if value not in ATTRIBUTES[attribute][1]:
        raise KeyError(f"{value!r} is not a value of {attribute}")
    if attribute == "colour":
        return f"The shape is {value}."
    if attribute == "shape":
        return f"The shape is a {value}."
    if attribute == "direction":
        return f"The shape moves {_DIRECTION_TEXT[value]}."
    return f"I hear a {value}."  # sound


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """One clip's ground truth and drawing parameters (all derived from ``(seed, index)``)."""

    index: int
    colour: str
    shape: str
    direction: str
    sound: str
    size: int  # shape radius in pixels
    start: tuple[float, float]  # (x, y) centre at t = 0
    travel: float  # pixels moved over the whole clip
    background: int  # grey level of the background
    jitter: tuple[int, int, int]  # small per-clip colour offset

    def answer(self, attribute: str) -> str:
        """The generator's answer to ``ATTRIBUTES[attribute]``'s question (see :func:`answer_text`)."""
        return answer_text(attribute, self.truth(attribute))

    def truth(self, attribute: str) -> str:
        return getattr(self, attribute)

    @property
    def video_id(self) -> str:
        """The clip's file name without ``.mp4`` (its index, zero-padded)."""
        return f"{self.index:05d}"

    @property
    def caption(self) -> str:
        return f"A {self.colour} {self.shape} moves {_DIRECTION_TEXT[self.direction]}; you hear a {self.sound}."

    def conversation(self, rng: np.random.Generator,
                     attributes: Sequence[str] = tuple(ATTRIBUTES)) -> list[dict[str, str]]:
        """Questions about the clip (all attributes by default), in a random order, as human/gpt turns."""
        order = [attributes[i] for i in rng.permutation(len(attributes))]
        turns = []
        for a in order:
            turns += [{"from": "human", "value": ATTRIBUTES[a][0]}, {"from": "gpt", "value": self.answer(a)}]
        return turns


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """How clips look and sound. The defaults make a 2 s, 8 fps, 112x112 clip (the demo model's frame size, so
    nothing is lost to a resize) with 16 kHz mono audio."""

    size: int = 112
    fps: int = 8
    seconds: float = 2.0
    sample_rate: int = 16000
    codec: str = "libx264"  # falls back to "mpeg4" when this PyAV build lacks it
    #: shape radius range, fraction of the frame size: large enough for the demo's random frozen towers to tell the
    #: shapes apart (a ridge probe on their outputs of 240 clips reads the shape of held-out ones 73% of the time at
    #: 0.20-0.26, 58% at 0.15-0.18), narrow so that a shape's area says which shape it is (``_mask``)
    radius: tuple[float, float] = (0.20, 0.21)
    #: distance moved over the clip, fraction of the frame size: as far as the frame allows (the two directions'
    #: paths then span the same interval and their starts lie apart): a linear head on the demo's video branch at
    #: its start, trained on 400 clips, read the direction of held-out ones 63% of the time at 0.26-0.29, 89% here
    travel: tuple[float, float] = (0.40, 0.45)
    #: the path's height: the frame's middle +- this fraction of the frame size. No question asks the height, and
    #: drawn over the whole frame it hid the shape from the random features (ridge probe on 1,200 clips, held-out
    #: shape: 88% drawn over the frame, 95% at +- 0.035)
    y_span: float = 0.035
    background: tuple[int, int] = (40, 40)  # grey level range of the background (plain dark grey)

    @property
    def num_frames(self) -> int:
        return int(round(self.fps * self.seconds))


#: clips are drawn in blocks of this many (the least common multiple of the attributes' value counts): within a
#: block every value of every attribute occurs equally often, each attribute in its own random order
BLOCK = 12


def clip_spec(seed: int, index: int, cfg: ClipConfig = ClipConfig()) -> ClipSpec:
    """Draw clip ``index`` of the dataset with ``seed``. Each attribute is drawn independently of the others (its
    own permutation per block of ``BLOCK`` clips), so no attribute can be told from another and any run of whole
    blocks is exactly balanced.

    The shape moves horizontally by ``travel`` over the clip and stays inside the frame: a right-moving clip starts
    uniformly in [margin, n - margin - travel], a left-moving one in [margin + travel, n - margin]. The set of
    positions a clip visits is then the same interval [a, a + travel], a uniform, whatever the direction, so only
    the order of the frames tells the direction: the set of frames a shuffled clip keeps says nothing, the middle
    frame's position nothing, and the first frame's position tells it only to a reader who knows it is the first
    (with these sizes the two directions' start ranges do not overlap). No wrap-around:
    a shape that leaves on one side and enters on the other jumps, and frozen random features then saw no motion
    (a ridge probe on them read the direction at chance with wrap-around, 98% without)."""
    block, k = divmod(index, BLOCK)
    values = {}
    for i, (a, (_, options)) in enumerate(ATTRIBUTES.items()):
        order = np.random.default_rng([seed, 0xC0B0, i, block]).permutation(BLOCK)
        values[a] = options[int(order[k]) % len(options)]
    rng = np.random.default_rng([seed, index])
    n = cfg.size
    size = int(rng.integers(round(cfg.radius[0] * n), round(cfg.radius[1] * n) + 1))
    travel = float(rng.uniform(*cfg.travel) * n)
    margin = math.ceil(SHAPE_EXTENT * size) + 2  # every shape's pixels stay 2 px off the edges
    # the whole path stays in the frame: right-moving clips start in the left part, left-moving in the right part
    lo = margin + (travel if values["direction"] == "left" else 0.0)
    hi = n - margin - (travel if values["direction"] == "right" else 0.0)
    start = (float(rng.uniform(lo, hi)), float(n / 2 + rng.uniform(-1, 1) * cfg.y_span * n))
    background = int(rng.integers(cfg.background[0], cfg.background[1] + 1))
    jitter = tuple(int(v) for v in rng.integers(-15, 16, size=3))
    return ClipSpec(index, values["colour"], values["shape"], values["direction"], values["sound"], size, start,
                    travel, background, jitter)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------------ drawing
#: the square's half-side and the triangle's half-base, in circle radii (``_mask``)
SQUARE_HALF_SIDE = 1.1
TRIANGLE_SCALE = 1.15
#: how far any shape reaches from its centre, in radii: the margin a clip's path keeps from the frame's edges
SHAPE_EXTENT = max(1.0, SQUARE_HALF_SIDE, TRIANGLE_SCALE)


def _mask(shape: str, cx: float, cy: float, r: float, n: int) -> np.ndarray:
    """The shape's pixels. The square has half-side ``SQUARE_HALF_SIDE`` r, a little larger than the one around
    the circle, so that the three shapes' areas step by about 1.5x (triangle 2.1 r^2, circle 3.14 r^2, square
    4.84 r^2). With half-side 0.9 r the square covered nearly the circle's area (3.24 r^2) and a linear reader of
    the random towers' outputs told the two apart at chance (1,200 clips: circle and square 50/50 either way, the
    triangle 100%); with half-side r (4 r^2) the same reader was right 90% of the time and the trained demo's
    misses were squares called circles. Ridge probe of the demo's frozen features, seed 0, 480 training clips and
    720 held out (the path's margin then r + 2 px), held-out shape at half-side 1.0 / 1.1 / 1.2 r: 94.0 / 95.6 /
    96.5% (query-averaged frames), 97.4 / 98.1 / 98.5% (all queries). 1.1 keeps the square within the triangle's
    reach (1.15 r), which sets the margin of a clip's path (``SHAPE_EXTENT``)."""
    y, x = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if shape == "square":
        h = SQUARE_HALF_SIDE * r
        return (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    if shape == "triangle":  # pointing up, inscribed in the circle of radius r (a bit enlarged)
        r = r * TRIANGLE_SCALE
        top, bottom = cy - r, cy + 0.6 * r
        half = (y - top) / (bottom - top) * r  # half-width grows from the apex to the base
        return (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half)
    raise KeyError(shape)


def render_frames(spec: ClipSpec, cfg: ClipConfig = ClipConfig()) -> np.ndarray:
    """(T, H, W, 3) uint8 frames of the clip."""
    n, t_total = cfg.size, cfg.num_frames
    colour = np.clip(np.array(COLOURS[spec.colour]) + np.array(spec.jitter), 0, 255).astype(np.uint8)
    frames = np.full((t_total, n, n, 3), spec.background, np.uint8)
    for t in range(t_total):
        f = t / max(t_total - 1, 1)
        cx, cy = spec.start[0] + _STEP[spec.direction] * spec.travel * f, spec.start[1]
        frames[t][_mask(spec.shape, cx, cy, spec.size, n)] = colour
    return frames


def render_audio(spec: ClipSpec, cfg: ClipConfig = ClipConfig()) -> np.ndarray:
    """(samples,) float32 mono: the clip's sound (``SOUNDS``) with short fades."""
    n = int(round(cfg.seconds * cfg.sample_rate))
    t = np.arange(n, dtype=np.float64) / cfg.sample_rate
    kind, freq = SOUNDS[spec.sound]
    if kind == "sine":
        wave = 0.4 * np.sin(2 * math.pi * freq * t)
    elif kind == "harmonic":  # a low buzz: the fundamental and two overtones
        wave = sum(0.4 / k * np.sin(2 * math.pi * k * freq * t) for k in (1, 2, 3))
    else:  # noise drawn from the clip's own seed, band-passed around ``freq`` (``HISS_BAND``)
        noise = np.random.default_rng([spec.index, 0x5EED]).standard_normal(n)
        spectrum, bins = np.fft.rfft(noise), np.fft.rfftfreq(n, 1 / cfg.sample_rate)
        spectrum[(bins < HISS_BAND[0] * freq) | (bins > HISS_BAND[1] * freq)] = 0
        band = np.fft.irfft(spectrum, n)
        wave = 0.25 * band / band.std()
    fade = min(n // 2, int(0.02 * cfg.sample_rate))
    env = np.ones(n)
    env[:fade] = np.linspace(0, 1, fade)
    env[n - fade:] = np.linspace(1, 0, fade)
    return np.clip(wave * env, -1, 1).astype(np.float32)


def _codec(names: Sequence[str]) -> str:
    """The first of ``names`` this PyAV build can encode with."""
    for name in names:
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001 - codec missing from this PyAV build
            continue
    raise RuntimeError(f"PyAV has none of the encoders {', '.join(names)}")


def write_clip(path: str | Path, spec: ClipSpec, cfg: ClipConfig = ClipConfig(), audio: bool = True) -> Path:
    """Encode the clip as an .mp4 (H.264 video + Opus audio; FFmpeg's AAC encoder, the fallback, takes ~4x as
    long as everything else together)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = render_frames(spec, cfg)
    codec = _codec((cfg.codec, "libx264", "mpeg4"))
    with av.open(str(path), "w") as out:
        vs = out.add_stream(codec, rate=cfg.fps)
        vs.width = vs.height = cfg.size
        vs.pix_fmt = "yuv420p"
        if codec == "libx264":
            vs.options = {"crf": "18", "preset": "veryfast", "tune": "zerolatency"}
        else:
            vs.bit_rate = 400_000
        as_ = None
        if audio:
            as_ = out.add_stream(_codec(("libopus", "aac")), rate=cfg.sample_rate)
            as_.layout = "mono"
        _encode(out, vs, ((av.VideoFrame.from_ndarray(img, format="rgb24"), k) for k, img in enumerate(frames)),
                cfg.fps)
        if as_ is not None:
            wave = render_audio(spec, cfg)
            chunk = 1024
            _encode(out, as_, ((_audio_frame(wave[k:k + chunk], cfg.sample_rate), k)
                               for k in range(0, len(wave), chunk)), cfg.sample_rate)
    return path


def _audio_frame(piece: np.ndarray, sample_rate: int) -> Any:
    af = av.AudioFrame.from_ndarray(np.ascontiguousarray(piece[None, :]), format="fltp", layout="mono")
    af.sample_rate = sample_rate
    return af


def _encode(out: Any, stream: Any, frames: Iterable[tuple[Any, int]], rate: int) -> None:
    """Encode `(frame, pts)` pairs (time base 1 / rate) into `stream`, flush it, mux every packet into `out`."""
    for frame, pts in frames:
        frame.pts, frame.time_base = pts, Fraction(1, rate)
        for p in stream.encode(frame):
            out.mux(p)
    for p in stream.encode():
        out.mux(p)


# ------------------------------------------------------------------------------------------------------ dataset
@dataclasses.dataclass(frozen=True)
class DemoData:
    """What :func:`make_dataset` wrote."""

    root: Path
    train: tuple[ClipSpec, ...]
    heldout: tuple[ClipSpec, ...]
    clip_config: ClipConfig

    def clip_path(self, spec: ClipSpec) -> Path:
        return self.root / "clips" / f"{spec.video_id}.mp4"


def _write_truth(path: Path, split_specs: Iterable[tuple[str, Sequence[ClipSpec]]]) -> None:
    with open(path, "w") as f:
        for split, specs in split_specs:
            for s in specs:
                f.write(json.dumps({"video": f"clips/{s.video_id}.mp4", "split": split,
                                    **{a: s.truth(a) for a in ATTRIBUTES}, "caption": s.caption}) + "\n")


def make_dataset(root: str | Path, num_train: int, num_heldout: int, seed: int = 0,
                 cfg: ClipConfig = ClipConfig(), progress=None) -> DemoData:
    """Write ``num_train + num_heldout`` clips under ``root/clips`` plus ``root/truth.jsonl``: every clip's split,
    attributes and caption (the held-out clips are the last ones, never trained on). With both counts multiples
    of ``BLOCK`` every attribute is exactly balanced in each split, so a model that always gives the same answer
    scores exactly chance. Existing files are overwritten; the whole folder is a pure function of the arguments.
    """
    root = Path(root)
    (root / "clips").mkdir(parents=True, exist_ok=True)
    specs = [clip_spec(seed, i, cfg) for i in range(num_train + num_heldout)]
    train, heldout = specs[:num_train], specs[num_train:]
    for k, s in enumerate(specs):
        write_clip(root / "clips" / f"{s.video_id}.mp4", s, cfg)
        if progress is not None:
            progress(k + 1, len(specs))
    _write_truth(root / "truth.jsonl", (("train", train), ("heldout", heldout)))
    return DemoData(root, tuple(train), tuple(heldout), cfg)
