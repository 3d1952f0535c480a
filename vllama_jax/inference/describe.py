"""Batch mode: ask one prompt about many videos, one JSON line per video (``vllama-jax describe``).

Output rows (JSONL, UTF-8, one object per line):

    {"video": "clips/a.mp4", "prompt": "...", "answer": "...", "audio": true, "model": "models/vl-7b"}
    {"video": "clips/b.mp4", "error": "UnreadableMediaError: empty file (0 bytes)"}

``audio`` says whether the audio branch saw the sound track (false when asked not to, or when the file has no usable
audio: the upstream fallback to the video-only prompt; ``note`` then says why); ``model`` names the model (the
embedded default's name says that its towers are untrained).

Resumable: videos that already have a row in ``out`` (answer *or* error; matched by absolute path) are skipped, so
rerunning the same command after an interruption finishes the job. Every row is appended and flushed as soon as it
exists; a line cut by an interrupt is removed at the next start.

Batched: files are decoded by a small thread pool one batch ahead of the device (PyAV releases the GIL), each batch's
videos run through the encoders together, and its prompts (different lengths: frame-time messages differ) are
generated as one padded batch of ``batch_size`` rows, so every batch reuses the same compiled programs.
"""
from __future__ import annotations

import json
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import jax
from tqdm import tqdm

from ..media import MediaError, Window
from .chat import VideoLLaMAChat
from .generate import GenerationConfig
from .uploads import VIDEO_EXTENSIONS, Upload


@dataclass
class DescribeResult:
    """Counts of one ``describe`` run over ``total`` distinct videos (``skipped``: already in the output)."""

    total: int
    skipped: int
    answered: int
    errors: int
    out: Path


def find_videos(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and folders into the list of videos: a folder gives every file with a video extension below
    it (recursively, sorted); a file is taken as is. Duplicates are dropped. Raises FileNotFoundError for a missing
    path."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(sorted(q for q in p.rglob("*")
                                if q.suffix.lower() in VIDEO_EXTENSIONS and q.is_file() and not q.name.startswith(".")))
        elif p.exists():
            found.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    seen: set[str] = set()
    unique = []
    for p in found:
        key = path_key(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def path_key(path: str | os.PathLike) -> str:
    """How rows are matched to videos: the absolute, case-normalised path."""
    return os.path.normcase(os.path.abspath(os.fspath(path)))


def repair_tail(out: Path) -> None:
    """Drop a trailing partial line (a row whose write was interrupted) so the next row starts on its own line."""
    if not out.is_file() or out.stat().st_size == 0:
        return
    with open(out, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        f.truncate(f.read().rfind(b"\n") + 1)


def read_done(out: str | os.PathLike) -> set[str]:
    """Absolute paths of the videos that already have a row in ``out`` (unparsable lines are ignored)."""
    done: set[str] = set()
    out = Path(out)
    if not out.is_file():
        return done
    with open(out, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("video"), str):
                done.add(path_key(row["video"]))
    return done


def error_text(e: BaseException) -> str:
    """How a failed row names its error: the class and the reason (the path is already in the row)."""
    if isinstance(e, MediaError):
        return f"{type(e).__name__}: {e.reason}"
    return f"{type(e).__name__}: {e}"


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def prefetch_uploads(model: Any, batches: Sequence[Sequence[str | os.PathLike]], *, with_audio: bool = True,
                     workers: int = 2, windows: Sequence[Sequence[Window | None]] | None = None,
                     ) -> Iterator[list[Upload | MediaError]]:
    """For each batch of video paths, its decoded uploads in order (a ``MediaError`` in place of an unreadable or
    missing file). The next batch is decoded by ``workers`` threads while the caller runs the current one on the
    device (PyAV releases the GIL). A path listed twice in one batch (with the same window) is decoded once and
    yields the same ``Upload`` object, so ``VideoLLaMAChat`` encodes it once. ``windows``: per batch, per path,
    the (start, end) seconds its frames are sampled in (``prepare_video(window=)``) or None. Used by
    ``describe`` and ``vllama_jax.eval``."""
    pool = ThreadPoolExecutor(max_workers=max(1, workers))

    def prepare(path: str | os.PathLike, window: Window | None) -> Upload | MediaError:
        try:
            if window is None:  # models without windows (stand-ins) keep working
                return model.prepare_video(path, with_audio=with_audio)
            return model.prepare_video(path, with_audio=with_audio, window=window)
        except MediaError as e:
            return e

    def submit(batch: Sequence[str | os.PathLike], wins: Sequence[Window | None]) -> list[Future]:
        futures: dict[tuple[str, Window | None], Future] = {}
        keys = [(path_key(p), w) for p, w in zip(batch, wins)]
        for p, w, key in zip(batch, wins, keys):
            if key not in futures:
                futures[key] = pool.submit(prepare, p, w)
        return [futures[key] for key in keys]

    if windows is None:
        windows = [[None] * len(b) for b in batches]
    try:
        pending = submit(batches[0], windows[0]) if batches else []
        for bi in range(len(batches)):
            results = [fut.result() for fut in pending]
            # decode ahead of the device
            pending = submit(batches[bi + 1], windows[bi + 1]) if bi + 1 < len(batches) else []
            yield results
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def describe(model: VideoLLaMAChat, videos: Sequence[str | os.PathLike], prompt: str, out: str | os.PathLike, *,
             batch_size: int = 4, with_audio: bool = True, generation_config: GenerationConfig | None = None,
             rng: Any = None, progress: bool = True, workers: int = 2) -> DescribeResult:
    """Answer ``prompt`` about every video and append one row per video to the JSONL file ``out``.

    model: a ``VideoLLaMAChat``; videos: files (see ``find_videos`` for folders); batch_size: videos per device
    batch; with_audio: use the sound track when the model and the file have one; generation_config: decoding
    settings (default: the chat's, i.e. upstream sampling); rng: jax key or int seed (batch i uses
    ``fold_in(key, i)``); workers: decoding threads.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    repair_tail(out)
    done = read_done(out)
    unique: dict[str, Path] = {}
    for v in videos:  # a video listed twice is described once
        unique.setdefault(path_key(v), Path(v))
    todo = [p for k, p in unique.items() if k not in done]
    skipped = len(unique) - len(todo)
    key = None
    if rng is not None:
        key = jax.random.PRNGKey(int(rng)) if isinstance(rng, int) else rng

    model_name = getattr(model, "name", "")
    answered = errors = 0
    bar = tqdm(total=len(unique), initial=skipped, unit="video", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    try:
        with open(out, "a", encoding="utf-8") as f, ExitStack() as stack:
            def write(row: dict) -> None:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()

            batches = _batches(todo, batch_size)
            prepared = stack.enter_context(closing(prefetch_uploads(model, batches, with_audio=with_audio,
                                                                    workers=workers)))
            for bi, (batch, results) in enumerate(zip(batches, prepared)):
                good = [(p, r) for p, r in zip(batch, results) if isinstance(r, Upload)]
                answers: dict[int, str] = {}
                if good:
                    sub = None if key is None else jax.random.fold_in(key, bi)
                    texts = model.answer_uploads([prompt] * len(good), [u for _, u in good], generation_config,
                                                 sub, pad_to=batch_size)
                    answers = {id(u): t for (_, u), t in zip(good, texts)}
                for p, r in zip(batch, results):
                    if isinstance(r, MediaError):
                        write({"video": os.fspath(p), "error": error_text(r)})
                        errors += 1
                    else:
                        row = {"video": os.fspath(p), "prompt": prompt, "answer": answers[id(r)],
                               "audio": r.with_audio}
                        if r.note:
                            row["note"] = r.note
                        if model_name:  # provenance; the embedded model's name says its towers are untrained
                            row["model"] = model_name
                        write(row)
                        answered += 1
                bar.update(len(batch))
                bar.set_postfix(errors=errors, refresh=False)
    finally:
        bar.close()
    return DescribeResult(total=len(unique), skipped=skipped, answered=answered, errors=errors, out=out)


__all__ = ["DescribeResult", "describe", "error_text", "find_videos", "path_key", "prefetch_uploads", "read_done",
           "repair_tail"]
