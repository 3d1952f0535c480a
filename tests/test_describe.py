"""Batch description logic with a stand-in model (fast): video discovery, resumption after an interrupt, repair of
a cut last line, error rows, batching and per-batch rng. The real model runs in tests/test_cli.py."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from vllama_jax.inference.uploads import video_upload
from vllama_jax.inference.describe import describe, find_videos, path_key, read_done
from vllama_jax.media import UnreadableMediaError


class StubChat:
    """Answers "<name> #<call>"; files named bad*.mp4 are unreadable; interrupts on call `interrupt_at`."""

    def __init__(self, interrupt_at: int | None = None):
        self.calls: list[dict] = []
        self.interrupt_at = interrupt_at

    def prepare_video(self, path, with_audio=True):
        path = Path(path)
        if path.name.startswith("bad"):
            raise UnreadableMediaError(path, "empty file (0 bytes)")
        frames = np.zeros((2, 4, 4, 3), np.float32)
        clips = np.zeros((1, 1, 4, 4), np.float32) if with_audio and "mute" not in path.name else None
        note = "" if clips is not None or not with_audio else "no usable audio (no audio stream); using the video only"
        return video_upload(frames, clips=clips, frame_message="msg. ", path=str(path), note=note)

    def answer_uploads(self, questions, uploads, generation_config=None, rng=None, pad_to=None):
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        self.calls.append(dict(n=len(uploads), pad_to=pad_to, rng=rng, questions=list(questions)))
        return [f"{Path(u.path).name} #{len(self.calls)}" for u in uploads]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def _files(folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in names:
        (folder / n).write_bytes(b"x")
        paths.append(folder / n)
    return paths


def test_find_videos(tmp_path):
    _files(tmp_path / "a", ["2.mp4", "1.MKV", "x.txt", ".hidden.mp4"])
    _files(tmp_path / "a" / "deep", ["3.webm"])
    single = _files(tmp_path, ["clip.bin"])[0]
    found = find_videos([tmp_path / "a", single, tmp_path / "a" / "2.mp4"])
    assert [p.name for p in found] == ["1.MKV", "2.mp4", "3.webm", "clip.bin"]  # sorted, deduplicated
    with pytest.raises(FileNotFoundError):
        find_videos([tmp_path / "missing"])


def test_rows_errors_batches_and_rng(tmp_path):
    videos = _files(tmp_path / "v", ["a.mp4", "bad1.mp4", "b_mute.mp4", "c.mp4", "d.mp4"])
    out = tmp_path / "res.jsonl"
    stub = StubChat()
    res = describe(stub, videos, "What happens?", out, batch_size=2, rng=7, progress=False)
    assert (res.total, res.skipped, res.answered, res.errors) == (5, 0, 4, 1)
    rows = _rows(out)
    assert [Path(r["video"]).name for r in rows] == ["a.mp4", "bad1.mp4", "b_mute.mp4", "c.mp4", "d.mp4"]
    assert rows[0] == {"video": str(videos[0]), "prompt": "What happens?", "answer": "a.mp4 #1", "audio": True}
    assert rows[1] == {"video": str(videos[1]), "error": "UnreadableMediaError: empty file (0 bytes)"}
    assert rows[2]["audio"] is False and "no usable audio" in rows[2]["note"]
    assert [c["n"] for c in stub.calls] == [1, 2, 1]  # the bad file leaves one video in the first batch
    assert all(c["pad_to"] == 2 for c in stub.calls)  # every batch reuses one compiled batch shape
    keys = [np.asarray(jax.random.key_data(c["rng"])).tolist() for c in stub.calls]
    assert keys[0] == np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.PRNGKey(7), 0))).tolist()
    assert len({str(k) for k in keys}) == 3
    assert read_done(out) == {path_key(v) for v in videos}


def test_resume_after_interrupt_and_cut_line(tmp_path):
    videos = _files(tmp_path / "v", [f"{i}.mp4" for i in range(5)])
    out = tmp_path / "res.jsonl"
    with pytest.raises(KeyboardInterrupt):
        describe(StubChat(interrupt_at=1), videos, "p", out, batch_size=2, progress=False)
    assert [Path(r["video"]).name for r in _rows(out)] == ["0.mp4", "1.mp4"]  # the first batch is on disk
    with open(out, "a") as f:
        f.write('{"video": "' + str(videos[2]) + '", "prom')  # a row cut by the interrupt
    stub = StubChat()
    res = describe(stub, videos + [videos[0]], "p", out, batch_size=2, progress=False)
    assert (res.total, res.skipped, res.answered) == (5, 2, 3)  # duplicates count once; the cut row is redone
    names = [Path(r["video"]).name for r in _rows(out)]
    assert names == ["0.mp4", "1.mp4", "2.mp4", "3.mp4", "4.mp4"]
    res = describe(StubChat(), videos, "p", out, progress=False)
    assert (res.skipped, res.answered, res.errors) == (5, 0, 0)
    with pytest.raises(ValueError):
        describe(StubChat(), videos, "p", out, batch_size=0, progress=False)
