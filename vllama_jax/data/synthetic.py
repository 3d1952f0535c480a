"""Tiny synthetic datasets in every upstream distribution format (real encoded videos and JPEGs).

Used by the tests and ``bench/data.py``; also handy to try ``prepare`` without downloading anything::

    from vllama_jax.data import synthetic
    src = synthetic.make_source("webvid", "/tmp/webvid_toy", n=8)
    # vllama-jax prepare webvid --source {src.source} --media-dir {src.media_dir} --out ...
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import tarfile
from pathlib import Path
from typing import Callable

import av
import numpy as np
from PIL import Image

from .prepare import prepare

_WORDS = ("a dog runs on the beach", "two people talk in a kitchen", "a red car drives at night",
          "a cat sleeps on a sofa", "waves crash on rocks", "a child plays with a ball",
          "a man rides a bicycle", "snow falls on a forest")


@dataclasses.dataclass(frozen=True)
class SyntheticSource:
    """Arguments for ``prepare`` (``dataset``, ``source``, ``media_dir``) and the entries that were written."""

    dataset: str
    source: Path
    media_dir: Path | None
    n: int
    media_files: tuple[Path, ...]  # in listing order (webdataset: empty, media live in the tars)


def write_video(path: str | Path, *, num_frames: int = 10, width: int = 64, height: int = 64, fps: int = 10,
                seed: int = 0) -> Path:
    """An MPEG-4 video with a moving square on a colour gradient (distinct content per seed and frame)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = _gradient(height, width, rng)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for t in range(num_frames):
            frame = base.copy()
            s = max(4, min(width, height) // 4)
            y = (t * 3) % max(1, height - s)
            x = (t * 5) % max(1, width - s)
            frame[y:y + s, x:x + s] = (255 - 20 * t) % 256
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def image_bytes(*, width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_gradient(height, width, np.random.default_rng(seed))).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_image(path: str | Path, *, width: int = 64, height: int = 48, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(width=width, height=height, seed=seed))
    return path


def write_corrupt(path: str | Path) -> Path:
    """A file with a media extension and garbage content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not a media file\x00\x01\x02" * 8)
    return path


def _gradient(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = (np.arange(w)[None, :, None] / max(w - 1, 1) + np.arange(h)[:, None, None] / max(h - 1, 1)) / 2
    return (c0 * (1 - t) + c1 * t).astype(np.uint8)


def caption(i: int) -> str:
    return f"{_WORDS[i % len(_WORDS)].capitalize()}, take {i}."


def conversation(i: int, media: str) -> list[dict[str, str]]:
    q0 = "<image>\nWhat is shown here?" if media == "image" else "What happens in the video?"
    return [{"from": "human", "value": q0}, {"from": "gpt", "value": f"{_WORDS[i % len(_WORDS)].capitalize()}."},
            {"from": "human", "value": "Anything else?"}, {"from": "gpt", "value": f"It is take number {i}."}]


# ------------------------------------------------------------------------------------------------------ per format
def make_webvid(root: Path, n: int, *, video: dict | None = None) -> SyntheticSource:
    anno, videos = root / "anno", root / "videos"
    anno.mkdir(parents=True, exist_ok=True)
    files, rows = [], []
    for i in range(n):
        page = f"{i // 4:03d}"
        files.append(write_video(videos / page / f"{1000 + i}.mp4", seed=i, **(video or {})))
        rows.append({"videoid": 1000 + i, "contentUrl": "", "duration": "PT00H00M03S", "page_dir": page,
                     "name": caption(i)})
    half = (n + 1) // 2  # two csv files: WebVid ships several
    for k, chunk in enumerate((rows[:half], rows[half:])):
        with open(anno / f"results_{k}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(chunk)
    return SyntheticSource("webvid", anno, videos, n, tuple(files))


def make_cc_sbu_align(root: Path, n: int, *, dataset: str = "cc_sbu_align", **_) -> SyntheticSource:
    files = [write_image(root / "image" / f"{i}.jpg", seed=i) for i in range(n)]
    (root / "filter_cap.json").write_text(json.dumps(
        {"annotations": [{"image_id": str(i), "caption": caption(i)} for i in range(n)]}))
    return SyntheticSource(dataset, root, None, n, tuple(files))


def make_llava_cc3m(root: Path, n: int, **_) -> SyntheticSource:
    """LLaVA-CC3M-Pretrain-595K as distributed: chat.json + images/ (unpacked images.zip)."""
    files = [write_image(root / "images" / f"GCC_train_{i:09d}.jpg", seed=i) for i in range(n)]
    (root / "chat.json").write_text(json.dumps([
        {"id": f"GCC_train_{i:09d}", "image": f"GCC_train_{i:09d}.jpg",
         "conversations": [{"from": "human", "value": "Give a brief description of the image.\n<image>"},
                           {"from": "gpt", "value": caption(i)}]} for i in range(n)]))
    return SyntheticSource("llava_cc3m", root, None, n, tuple(files))


def make_webdataset(root: Path, n: int, *, dataset: str = "cc_sbu", shards: int = 2, **_) -> SyntheticSource:
    root.mkdir(parents=True, exist_ok=True)
    per = -(-n // shards)
    for s in range(shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for i in range(s * per, min(n, (s + 1) * per)):
                for ext, data in ((".jpg", image_bytes(seed=i)),
                                  (".json", json.dumps({"caption": caption(i), "key": f"{i:09d}"}).encode())):
                    info = tarfile.TarInfo(f"{i:09d}{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return SyntheticSource(dataset, root, None, n, ())


def make_llava_instruct(root: Path, n: int, **_) -> SyntheticSource:
    images = root / "train2014"
    files = [write_image(images / f"COCO_train2014_{i:012d}.jpg", seed=i) for i in range(n)]
    data = [{"id": f"{i:012d}", "image": f"{i:012d}.jpg", "conversations": conversation(i, "image")}
            for i in range(n)]
    (root / "llava_instruct_150k.json").write_text(json.dumps(data))
    return SyntheticSource("llava_instruct", root / "llava_instruct_150k.json", images, n, tuple(files))


def make_videochat(root: Path, n: int, *, video: dict | None = None) -> SyntheticSource:
    videos = root / "videos"
    files = [write_video(videos / "clips" / f"v{i}.mp4", seed=100 + i, **(video or {})) for i in range(n)]
    data = [{"video": f"clips/v{i}.mp4",
             "QA": [{"q": t["value"], "a": a["value"]} for t, a in zip(conv[::2], conv[1::2])]}
            for i, conv in ((i, conversation(i, "video")) for i in range(n))]
    (root / "videochat_instruct_11k.json").write_text(json.dumps(data))
    return SyntheticSource("webvid_instruct", root / "videochat_instruct_11k.json", videos, n, tuple(files))


def make_jsonl(root: Path, n: int, *, media: str = "video", kind: str = "caption",
               video: dict | None = None) -> SyntheticSource:
    files, lines = [], []
    for i in range(n):
        rel = f"media/{i}.mp4" if media == "video" else f"media/{i}.jpg"
        files.append(write_video(root / rel, seed=200 + i, **(video or {})) if media == "video"
                     else write_image(root / rel, seed=200 + i))
        obj: dict = {media: rel, "id": f"custom-{i}"}
        if kind == "caption":
            obj["caption"] = caption(i)
        else:
            obj["conversations"] = conversation(i, media)
        lines.append(json.dumps(obj))
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return SyntheticSource("jsonl", root / "data.jsonl", None, n, tuple(files))


_MAKERS: dict[str, Callable[..., SyntheticSource]] = {
    "webvid": make_webvid,
    "cc_sbu_align": make_cc_sbu_align,
    "llava_cc3m": make_llava_cc3m,
    "cc_sbu": lambda root, n, **kw: make_webdataset(root, n, dataset="cc_sbu", **kw),
    "laion": lambda root, n, **kw: make_webdataset(root, n, dataset="laion", **kw),
    "llava_instruct": make_llava_instruct,
    "webvid_instruct": make_videochat,
    "jsonl": make_jsonl,
}


def make_source(dataset: str, root: str | Path, n: int, **kwargs) -> SyntheticSource:
    """Write ``n`` entries of ``dataset``'s upstream format under ``root``."""
    return _MAKERS[dataset](Path(root), n, **kwargs)


def make_prepared(dataset: str, root: str | Path, n: int, *, make: dict | None = None, **prepare_kwargs):
    """``make_source`` then ``prepare`` into ``root/prepared`` (quiet); returns (SyntheticSource, PrepareSummary)."""
    root = Path(root)
    src = make_source(dataset, root / "source", n, **(make or {}))
    prepare_kwargs.setdefault("progress", False)
    summary = prepare(dataset, src.source, root / "prepared", media_dir=src.media_dir, **prepare_kwargs)
    return src, summary
