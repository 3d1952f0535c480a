"""Questions per second of the batched benchmark runner (`vllama_jax.eval.evaluate`, what `vllama-jax eval` runs) at
several batch sizes, against a plain one-question-at-a-time loop over the same chat API, in the same run, on the
same questions, for both kinds of benchmark:

- multiple choice ("mc", as `eval --task mvbench`): decode the video, encode it, generate the option letter
  greedily and score every option's log-likelihood. The plain loop: `upload_video`, `ask`, `answer`,
  `score_answers` for one question.
- open-ended ("open", as `eval --task msvd_qa`): decode, encode, generate a short answer greedily (scored by the
  runner with exact match / containment, which costs nothing next to the model). The plain loop: `upload_video`,
  `ask`, `answer`.

The questions: the demo's generated clips (coloured shapes with a tone), four questions per clip (colour, shape,
direction, sound), written once as an MVBench task file and once in the Video-ChatGPT layout (test_q.json /
test_a.json) the open-ended tasks are read from. Each batch size, and the plain loop, runs first untimed on a few
questions (at least one question per attribute, and one whole batch) so that compilation stays out of the timing;
the programs compiled during the timed runs are counted and reported all the same.

To keep the default run within ~15 minutes on a loaded 2-core CPU (8.2 minutes on 2026-12-02, sharing the cores
with another job), open-ended answers are limited to --max-new-tokens 16 (the runner's default is 64).

The runner groups a clip's questions: within a batch each video is decoded and encoded once (and, for multiple
choice, the shared prompt prefix is prefilled once), while the plain loop does it per question; at batch 1 neither
shares anything.

    python bench/eval.py [--clips 8] [--batch-sizes 1,8,32] [--num-frames 4] [--max-new-tokens 16] [--model DIR]
                         [--json PATH]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vllama_jax.demo.clips import ATTRIBUTES, ClipConfig, clip_spec, write_clip  # noqa: E402
from vllama_jax.demo.evaluate import write_open_ended_task  # noqa: E402
from vllama_jax.eval.metrics import multiple_choice_prompt  # noqa: E402
from vllama_jax.eval.runner import evaluate  # noqa: E402
from vllama_jax.eval.tasks import MVBENCH_TASKS, Kind, Question, load_questions  # noqa: E402
from vllama_jax.inference.chat import VideoLLaMAChat  # noqa: E402
from vllama_jax.inference.generate import GenerationConfig  # noqa: E402

#: the benchmark each path is read as, and how the table names it
PATHS: dict[Kind, tuple[str, str]] = {"mc": ("mvbench", "multiple choice"), "open": ("msvd_qa", "open-ended")}
#: where MVBench's "Moving Attribute" task keeps its videos; the open-ended task reads the same folder
MVBENCH_FILE, MVBENCH_SUB, _ = MVBENCH_TASKS["Moving Attribute"]
#: JAX records one of these per program it compiles (or loads from the persistent cache): jax._src.dispatch's
#: BACKEND_COMPILE_EVENT, spelled out because that module is private
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def write_tasks(root: Path, n_clips: int, seed: int = 0) -> dict[Kind, list[Question]]:
    """n_clips generated clips, asked about their four attributes as an MVBench task file (multiple choice over
    the attribute's values) and as the demo's open-ended task (``write_open_ended_task``: Video-ChatGPT's
    test_q.json / test_a.json, the reference answer being the value). Returns each path's questions, in the same
    order."""
    media = root / "video"
    cfg = ClipConfig()
    specs = [clip_spec(seed, i, cfg) for i in range(n_clips)]
    mc = []
    for spec in specs:
        write_clip(media / MVBENCH_SUB / f"{spec.video_id}.mp4", spec, cfg)
        mc += [{"video": f"{spec.video_id}.mp4", "question": question, "candidates": list(values),
                "answer": spec.truth(attr)} for attr, (question, values) in ATTRIBUTES.items()]
    (root / "mvbench").mkdir(parents=True)
    (root / "mvbench" / MVBENCH_FILE).write_text(json.dumps(mc))
    open_dir = write_open_ended_task(root / "msvd_qa", specs)
    return {"mc": load_questions("mvbench", root / "mvbench", media),
            "open": load_questions("msvd_qa", open_dir, media / MVBENCH_SUB)}


def plain_loop(chat: VideoLLaMAChat, kind: Kind, questions: list[Question], max_new_tokens: int,
               letter_tokens: int) -> None:
    """One question at a time through the chat API (the loop a user would write), doing per question what the
    runner does for that path (same prompts, same greedy settings: `evaluate`'s max_new_tokens / letter_tokens)."""
    cfg = GenerationConfig(do_sample=False, max_new_tokens=letter_tokens if kind == "mc" else max_new_tokens)
    for q in questions:
        up = chat.upload_video(q.video)
        if kind == "mc":
            chat.ask(multiple_choice_prompt(q.question, q.options))
            chat.answer(cfg)
            chat.score_answers([q.question], [up], [list(q.options)])
        else:
            chat.ask(q.question)
            chat.answer(cfg)


class CompileCounter:
    """Counts the programs JAX compiles (or loads from its cache) while ``active``: a timed run that compiles is
    not measuring the steady state, and the table says so instead of hiding it."""

    def __init__(self) -> None:
        self.active = False
        self.count = 0
        self.seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_: Any) -> None:
        if self.active and event == COMPILE_EVENT:
            self.count += 1
            self.seconds += duration

    def timed(self, fn: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
        """fn's result, and its wall-clock seconds and what it compiled."""
        self.active, self.count, self.seconds = True, 0, 0.0
        t = time.perf_counter()
        try:
            result = fn()
        finally:
            self.active = False
        return result, {"seconds": time.perf_counter() - t, "compiled": self.count, "compile_s": self.seconds}


def bench_path(chat: VideoLLaMAChat, kind: Kind, questions: list[Question], batch_sizes: list[int], out: Path,
               counter: CompileCounter, max_new_tokens: int, letter_tokens: int) -> list[dict[str, Any]]:
    """The plain loop, then the runner at each batch size, on the same questions; one row per loop."""
    task, _ = PATHS[kind]
    per_clip = len(ATTRIBUTES)  # every attribute's question has its own prompt and option shapes: warm them all
    run_kw = dict(max_new_tokens=max_new_tokens, letter_tokens=letter_tokens, progress=False)
    rows = []
    plain_loop(chat, kind, questions[:per_clip], max_new_tokens, letter_tokens)  # warm-up
    _, t = counter.timed(lambda: plain_loop(chat, kind, questions, max_new_tokens, letter_tokens))
    rows.append({"loop": "one at a time", "batch": None, **t})
    for b in batch_sizes:
        # warm-up: one whole batch (its padded shape, its number of distinct videos) and every attribute
        evaluate(chat, task, kind, questions[:max(b, per_clip)], out / f"{kind}-warm-{b}", batch_size=b, **run_kw)
        res, t = counter.timed(lambda: evaluate(chat, task, kind, questions, out / f"{kind}-{b}", batch_size=b,
                                                **run_kw))
        rows.append({"loop": "batched runner", "batch": b, **t, "metrics": res.summary["metrics"]})
    n, one_at_a_time = len(questions), rows[0]["seconds"]
    for r in rows:
        r.update(path=kind, questions=n, questions_per_s=round(n / r["seconds"], 4),
                 speedup=round(one_at_a_time / r["seconds"], 3), seconds=round(r["seconds"], 3),
                 compile_s=round(r["compile_s"], 3))
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| path | loop | batch | seconds | questions/s | speed-up vs one at a time |", "|---|---|---|---|---|---|"]
    for r in rows:
        compiled = f" ({r['compiled']} programs compiled while timed)" if r["compiled"] else ""
        lines.append(f"| {PATHS[r['path']][1]} | {r['loop']}{compiled} | {r['batch'] or '-'} | {r['seconds']:.1f} "
                     f"| {r['questions_per_s']:.3f} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def parse_batch_sizes(text: str) -> list[int]:
    sizes = [int(s) for s in text.split(",") if s.strip()]
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {text!r}")
    return sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=8, help="generated clips (4 questions each; default 8: 32 questions)")
    ap.add_argument("--batch-sizes", type=parse_batch_sizes, default=[1, 8, 32], metavar="B,B,...",
                    help="batch sizes of the runner (default 1,8,32)")
    ap.add_argument("--num-frames", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=16, help="length of open-ended answers (default 16)")
    ap.add_argument("--letter-tokens", type=int, default=8, help="length of the generated option letter (default 8)")
    ap.add_argument("--model", help="model directory (default: the embedded SmolLM2 model)")
    ap.add_argument("--json", metavar="PATH", help="also write the figures here")
    args = ap.parse_args()

    load_before = os.getloadavg()
    started = datetime.datetime.now(datetime.timezone.utc)
    counter = CompileCounter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        questions = write_tasks(Path(tmp) / "data", args.clips)
        kw = dict(num_frames=args.num_frames, log=lambda m: None)
        chat = VideoLLaMAChat.from_model_dir(args.model, **kw) if args.model else VideoLLaMAChat.embedded(**kw)
        for kind in PATHS:
            rows += bench_path(chat, kind, questions[kind], args.batch_sizes, Path(tmp) / "out", counter,
                               args.max_new_tokens, args.letter_tokens)
    load_after = os.getloadavg()

    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, {jax.default_backend()} "
               f"({jax.device_count()} device(s))")
    n = len(questions["mc"])
    print(f"{n} questions per path ({args.clips} clips x {len(ATTRIBUTES)}, {args.num_frames} frames), model "
          f"{chat.name}, {machine}, jax {jax.__version__}")
    print(f"multiple choice: option letter ({args.letter_tokens} tokens) + option log-likelihoods; open-ended: "
          f"answer of {args.max_new_tokens} tokens at most; greedy")
    print(markdown(rows))
    print("load average (1, 5, 15 min): before " + ", ".join(f"{x:.2f}" for x in load_before) + "; after "
          + ", ".join(f"{x:.2f}" for x in load_after))
    if args.json:
        result = {
            "date": started.isoformat(timespec="seconds"), "machine": machine, "jax": jax.__version__,
            "model": chat.name, "clips": args.clips, "questions_per_path": n, "num_frames": args.num_frames,
            "max_new_tokens": args.max_new_tokens, "letter_tokens": args.letter_tokens,
            "batch_sizes": args.batch_sizes, "rows": rows,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in load_after],
        }
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
