"""Questions per second of the batched benchmark runner (`vllama_jax.eval.evaluate`, what `vllama-jax eval`
runs) against a plain one-question-at-a-time loop over the same chat API, in the same run, on the same questions.

The questions: the demo's generated clips (coloured shapes with a tone), written as an MVBench task file (four
questions per clip, multiple choice over the attribute's values), so both sides do what `eval --task mvbench`
does per question: decode the video, encode it, generate the option letter greedily, and score every option's
log-likelihood. The plain loop is what a user writes with the chat API: `upload_video`, `ask`, `answer`, and
`score_answers` for one question. Both run once on a few questions first (compilation excluded from the timing).

    python bench/eval.py [--clips 8] [--batch-size 8] [--num-frames 4] [--model DIR] [--json PATH]
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

import jax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vllama_jax.demo.clips import ATTRIBUTES, ClipConfig, clip_spec, write_clip  # noqa: E402
from vllama_jax.eval.metrics import multiple_choice_prompt  # noqa: E402
from vllama_jax.eval.runner import evaluate  # noqa: E402
from vllama_jax.eval.tasks import MVBENCH_TASKS, load_questions  # noqa: E402
from vllama_jax.inference.chat import VideoLLaMAChat  # noqa: E402
from vllama_jax.inference.generate import GenerationConfig  # noqa: E402


def write_task(root: Path, n_clips: int, seed: int = 0) -> tuple[Path, Path]:
    """n_clips generated clips and an MVBench task file asking about each clip's four attributes."""
    json_dir = root / "json"
    json_dir.mkdir(parents=True)
    file, sub, _ = MVBENCH_TASKS["Moving Attribute"]
    media = root / "video"
    (media / sub).mkdir(parents=True)
    cfg = ClipConfig()
    entries = []
    for i in range(n_clips):
        spec = clip_spec(seed, i, cfg)
        write_clip(media / sub / f"{i:03d}.mp4", spec, cfg)
        for attr, (question, values) in ATTRIBUTES.items():
            entries.append({"video": f"{i:03d}.mp4", "question": question, "candidates": list(values),
                            "answer": spec.truth(attr)})
    (json_dir / file).write_text(json.dumps(entries))
    return json_dir, media


def plain_loop(chat: VideoLLaMAChat, questions: list, letter_tokens: int = 8) -> None:
    """One question at a time through the chat API (the loop a user would write)."""
    cfg = GenerationConfig(do_sample=False, max_new_tokens=letter_tokens)
    for q in questions:
        up = chat.upload_video(q.video)
        chat.ask(multiple_choice_prompt(q.question, q.options))
        chat.answer(cfg)
        chat.score_answers([q.question], [up], [list(q.options)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=8, help="generated clips (4 questions each; default 8)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-frames", type=int, default=4)
    ap.add_argument("--model", help="model directory (default: the embedded SmolLM2 model)")
    ap.add_argument("--json", metavar="PATH", help="also write the figures here")
    args = ap.parse_args()

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        ann, media = write_task(Path(tmp) / "data", args.clips)
        questions = load_questions("mvbench", ann, media)
        kw = dict(num_frames=args.num_frames, log=lambda m: None)
        chat = (VideoLLaMAChat.from_model_dir(args.model, **kw) if args.model else VideoLLaMAChat.embedded(**kw))
        warm = questions[:args.batch_size]
        evaluate(chat, "mvbench", "mc", warm, Path(tmp) / "warm", batch_size=args.batch_size, progress=False)
        plain_loop(chat, warm[:2])

        t = time.perf_counter()
        res = evaluate(chat, "mvbench", "mc", questions, Path(tmp) / "batched", batch_size=args.batch_size,
                       progress=False)
        batched_s = time.perf_counter() - t
        t = time.perf_counter()
        plain_loop(chat, questions)
        plain_s = time.perf_counter() - t

    n = len(questions)
    load_after = os.getloadavg()
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {jax.default_backend()} "
                   f"({jax.device_count()} device(s))",
        "jax": jax.__version__, "model": chat.name, "questions": n, "clips": args.clips,
        "num_frames": args.num_frames, "batch_size": args.batch_size,
        "batched_s": round(batched_s, 2), "plain_s": round(plain_s, 2),
        "batched_questions_per_s": round(n / batched_s, 3), "plain_questions_per_s": round(n / plain_s, 3),
        "speedup": round(plain_s / batched_s, 2), "accuracy": res.summary["metrics"],
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
    }
    print(f"{n} questions ({args.clips} clips x 4, {args.num_frames} frames, multiple choice: letter + option "
          f"log-likelihoods), {result['machine']}")
    print("| loop | s | questions / s |")
    print("|---|---|---|")
    print(f"| batched runner (batch {args.batch_size}) | {batched_s:.1f} | {n / batched_s:.2f} |")
    print(f"| one question at a time (chat API) | {plain_s:.1f} | {n / plain_s:.2f} |")
    print(f"speed-up {plain_s / batched_s:.2f}x; load average before {load_before[0]:.1f}, after "
          f"{load_after[0]:.1f} (1 min)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
