"""The demo's dataset: short generated videos with sound, and their ground truth.

Each clip is ``seconds`` long at ``fps`` frames per second: one coloured shape (circle / square / triangle) on a
plain dark background moves in one direction (left / right / up / down), while a sine tone plays whose pitch is set
by the shape (circle low, square medium, triangle high). Everything is drawn with numpy and encoded with PyAV
(H.264 or MPEG-4 video + AAC audio in an .mp4), deterministically from ``(seed, clip index)``.

The generator also writes what a model should say about each clip: a caption ("a red circle moves to the left")
and question/answer pairs, one per attribute. Those become the training conversations (our JSONL format, see
``vllama_jax/data/FORMATS.md`` section 3) and, for held-out clips, the ground truth the demo scores answers
against (:mod:`vllama_jax.demo.evaluate`).
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
DIRECTIONS = ("left", "right", "up", "down")
#: the tone each shape makes: (word used in answers, frequency in Hz)
TONES: dict[str, tuple[str, float]] = {"circle": ("low", 220.0), "square": ("medium", 523.25),
                                       "triangle": ("high", 1318.5)}
SOUNDS = tuple(TONES[s][0] for s in SHAPES)

#: attribute -> (the question asked, the possible answer words)
ATTRIBUTES: dict[str, tuple[str, tuple[str, ...]]] = {
    "colour": ("What colour is the shape?", tuple(COLOURS)),
    "shape": ("What shape is it?", SHAPES),
    "direction": ("Which way does it move?", DIRECTIONS),
    "sound": ("What does it sound like?", SOUNDS),
}

_DIRECTION_TEXT = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


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
    return f"The shape makes a {value} tone."  # sound


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """One clip's ground truth and drawing parameters (all derived from ``(seed, index)``)."""

    index: int
    colour: str
    shape: str
    direction: str
    size: int  # shape radius in pixels
    start: tuple[float, float]  # (x, y) centre at t = 0
    travel: float  # pixels moved over the whole clip
    background: int  # grey level of the background
    jitter: tuple[int, int, int]  # small per-clip colour offset

    @property
    def sound(self) -> str:
        return TONES[self.shape][0]

    @property
    def pitch(self) -> float:
        return TONES[self.shape][1]

    def answer(self, attribute: str) -> str:
        """The generator's answer to ``ATTRIBUTES[attribute]``'s question (see :func:`answer_text`)."""
        return answer_text(attribute, self.truth(attribute))

    def truth(self, attribute: str) -> str:
        return getattr(self, attribute)

    @property
    def caption(self) -> str:
        return f"A {self.colour} {self.shape} moves {_DIRECTION_TEXT[self.direction]} with a {self.sound} tone."

    def conversation(self, rng: np.random.Generator,
                     attributes: Sequence[str] = tuple(ATTRIBUTES)) -> list[dict[str, str]]:
        """Questions about the clip (all attributes by default), in a random order, as human/gpt turns."""
        order = [attributes[i] for i in rng.permutation(len(attributes))]
        turns = []
        for a in order:
            turns += [{"from": "human", "value": ATTRIBUTES[a][0]}, {"from": "gpt", "value": self.answer(a)}]
        return turns

    def training_conversations(self) -> list[list[dict[str, str]]]:
        """What the demo trains on for this clip: two single-question conversations, the colour question and one
        of the other three (in turn by clip index), so half of all training answers are about colour."""
        others = [a for a in ATTRIBUTES if a != "colour"]
        rng = np.random.default_rng(0)  # one attribute per conversation: the order is moot
        return [self.conversation(rng, ("colour",)), self.conversation(rng, (others[self.index % len(others)],))]


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """How clips look and sound. The defaults make a 2 s, 8 fps, 64x64 clip with 16 kHz mono audio."""

    size: int = 64
    fps: int = 8
    seconds: float = 2.0
    sample_rate: int = 16000
    codec: str = "libx264"  # falls back to "mpeg4" when this PyAV build lacks it
    radius: tuple[float, float] = (0.2, 0.26)  # shape radius range, fraction of the frame size
    travel: tuple[float, float] = (0.25, 0.35)  # distance moved over the clip, fraction of the frame size
    background: tuple[int, int] = (40, 40)  # grey level range of the background (plain dark grey)

    @property
    def num_frames(self) -> int:
        return int(round(self.fps * self.seconds))


def clip_spec(seed: int, index: int, cfg: ClipConfig = ClipConfig()) -> ClipSpec:
    """Draw clip ``index`` of the dataset with ``seed``; attributes cycle through every combination in a
    seed-shuffled order so that any 72 consecutive clips cover all colour x shape x direction combinations."""
    combos = [(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS]
    cycle, k = divmod(index, len(combos))
    order = np.random.default_rng([seed, 0xC0B0, cycle]).permutation(len(combos))
    colour, shape, direction = combos[int(order[k])]
    rng = np.random.default_rng([seed, index])
    n = cfg.size
    size = int(rng.integers(round(cfg.radius[0] * n), round(cfg.radius[1] * n) + 1))
    travel = float(rng.uniform(*cfg.travel) * n)
    dx, dy = _STEP[direction]
    margin = size + 1
    # start so that the whole path stays inside the frame
    lo_x, hi_x = margin + max(0, -dx) * travel, n - margin - max(0, dx) * travel
    lo_y, hi_y = margin + max(0, -dy) * travel, n - margin - max(0, dy) * travel
    start = (float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y)))
    background = int(rng.integers(cfg.background[0], cfg.background[1] + 1))
    jitter = tuple(int(v) for v in rng.integers(-15, 16, size=3))
    return ClipSpec(index, colour, shape, direction, size, start, travel, background, jitter)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------------ drawing
def _mask(shape: str, cx: float, cy: float, r: float, n: int) -> np.ndarray:
    y, x = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if shape == "square":
        h = r * 0.9
        return (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    if shape == "triangle":  # pointing up, inscribed in the circle of radius r (a bit enlarged)
        r = r * 1.15
        top, bottom = cy - r, cy + 0.6 * r
        half = (y - top) / (bottom - top) * r  # half-width grows from the apex to the base
        return (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half)
    raise KeyError(shape)


def render_frames(spec: ClipSpec, cfg: ClipConfig = ClipConfig()) -> np.ndarray:
    """(T, H, W, 3) uint8 frames of the clip."""
    n, t_total = cfg.size, cfg.num_frames
    colour = np.clip(np.array(COLOURS[spec.colour]) + np.array(spec.jitter), 0, 255).astype(np.uint8)
    dx, dy = _STEP[spec.direction]
    frames = np.full((t_total, n, n, 3), spec.background, np.uint8)
    for t in range(t_total):
        f = t / max(t_total - 1, 1)
        cx, cy = spec.start[0] + dx * spec.travel * f, spec.start[1] + dy * spec.travel * f
        frames[t][_mask(spec.shape, cx, cy, spec.size, n)] = colour
    return frames


def render_audio(spec: ClipSpec, cfg: ClipConfig = ClipConfig()) -> np.ndarray:
    """(samples,) float32 mono: the shape's sine tone with short fades."""
    n = int(round(cfg.seconds * cfg.sample_rate))
    t = np.arange(n, dtype=np.float64) / cfg.sample_rate
    wave = 0.4 * np.sin(2 * math.pi * spec.pitch * t)
    fade = min(n // 2, int(0.02 * cfg.sample_rate))
    env = np.ones(n)
    env[:fade] = np.linspace(0, 1, fade)
    env[n - fade:] = np.linspace(1, 0, fade)
    return (wave * env).astype(np.float32)


def _video_codec(preferred: str) -> str:
    for name in (preferred, "libx264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001 - codec missing from this PyAV build
            continue
    raise RuntimeError("PyAV has neither libx264 nor mpeg4 encoders")


def write_clip(path: str | Path, spec: ClipSpec, cfg: ClipConfig = ClipConfig(), audio: bool = True) -> Path:
    """Encode the clip as an .mp4 (video + AAC audio)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = render_frames(spec, cfg)
    codec = _video_codec(cfg.codec)
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
            as_ = out.add_stream("aac", rate=cfg.sample_rate)
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
    train_jsonl: Path  # conversations, our JSONL format
    train: tuple[ClipSpec, ...]
    heldout: tuple[ClipSpec, ...]
    clip_config: ClipConfig

    def clip_path(self, spec: ClipSpec) -> Path:
        return self.root / "clips" / f"{spec.index:05d}.mp4"


def _write_truth(path: Path, split_specs: Iterable[tuple[str, Sequence[ClipSpec]]]) -> None:
    with open(path, "w") as f:
        for split, specs in split_specs:
            for s in specs:
                f.write(json.dumps({"video": f"clips/{s.index:05d}.mp4", "split": split, "colour": s.colour,
                                    "shape": s.shape, "direction": s.direction, "sound": s.sound,
                                    "caption": s.caption}) + "\n")


def make_dataset(root: str | Path, num_train: int, num_heldout: int, seed: int = 0,
                 cfg: ClipConfig = ClipConfig(), progress=None) -> DemoData:
    """Write ``num_train + num_heldout`` clips under ``root/clips`` plus

    * ``root/train.jsonl``: the training clips' conversations (``ClipSpec.training_conversations``: one question
      each, the colour question and one other), ready for ``prepare(dataset="jsonl", ...)``;
    * ``root/truth.jsonl``: every clip's split, attributes and caption (the held-out clips are never trained on).

    Existing files are overwritten; the whole folder is a pure function of the arguments.
    """
    root = Path(root)
    (root / "clips").mkdir(parents=True, exist_ok=True)
    specs = [clip_spec(seed, i, cfg) for i in range(num_train + num_heldout)]
    train, heldout = specs[:num_train], specs[num_train:]
    for k, s in enumerate(specs):
        write_clip(root / "clips" / f"{s.index:05d}.mp4", s, cfg)
        if progress is not None:
            progress(k + 1, len(specs))
    with open(root / "train.jsonl", "w") as f:
        for s in train:
            for c, conv in enumerate(s.training_conversations()):
                f.write(json.dumps({"video": f"clips/{s.index:05d}.mp4", "id": f"clip-{s.index}-{c}",
                                    "conversations": conv}) + "\n")
    _write_truth(root / "truth.jsonl", (("train", train), ("heldout", heldout)))
    return DemoData(root, root / "train.jsonl", tuple(train), tuple(heldout), cfg)
