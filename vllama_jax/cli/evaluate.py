"""`vllama-jax eval`: a standard video-QA benchmark from its published annotation files -> OUT/predictions.jsonl,
OUT/summary.json and a Markdown table on stdout (docs/eval.md). Resumable: questions already in
OUT/predictions.jsonl are not asked again."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from ..eval.judge import Judge
from ..eval.metrics import markdown_table
from ..eval.runner import ABLATIONS, MC_PROTOCOLS, PREDICTIONS, SUMMARY, evaluate, read_rows, write_summary
from ..eval.tasks import TASKS, get_task, load_questions
from .chat import add_model_args, load_chat
from .common import UsageError, add_common_args, info, run_command


def register(sub: Any) -> None:
    p = sub.add_parser("eval", help="run a video-QA benchmark (MSVD-QA, MVBench, EgoSchema, ...) -> accuracy",
                       description="Evaluate a model on a video-QA benchmark read from its published annotation "
                                   "files. Writes OUT/predictions.jsonl (one row per question; resumable) and "
                                   "OUT/summary.json, and prints a Markdown table. See docs/eval.md.")
    p.add_argument("--task", required=True, choices=sorted(TASKS), help="the benchmark")
    p.add_argument("--annotations", required=True, metavar="FILE_OR_DIR",
                   help="the benchmark's annotation file, or the folder holding it (as published)")
    p.add_argument("--media-dir", required=True, metavar="DIR", help="folder of the benchmark's videos")
    p.add_argument("--subtitles", metavar="DIR",
                   help="videomme only: folder of Video-MME's subtitle/<videoID>.srt files; the lines shown at the "
                        "sampled frames go before each question (lmms-eval's videomme_w_subtitle)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (predictions.jsonl, summary.json)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N questions")
    p.add_argument("--batch-size", type=int, default=4, metavar="N", help="questions per device batch (default 4)")
    p.add_argument("--workers", type=int, default=2, metavar="N", help="decoding threads (default 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                   help="length limit of open-ended answers (default 64; greedy decoding)")
    p.add_argument("--protocol", choices=("both",) + MC_PROTOCOLS, default="both",
                   help="multiple-choice tasks: the generated option letter (lmms-eval's), the options' "
                        "log-likelihood, or both (default; the accuracy is the letter's)")
    p.add_argument("--ablation", choices=sorted(ABLATIONS),
                   help="ask about altered videos: shuffled_frames puts the sampled frames in a random order "
                        "(fixed per video); use a separate --out (with --no-audio: the audio removed)")
    j = p.add_argument_group("GPT judge (open-ended tasks; off unless --judge-url is given)")
    j.add_argument("--judge-url", metavar="URL",
                   help="an OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (Video-ChatGPT's protocol)")
    j.add_argument("--judge-model", default="gpt-3.5-turbo", metavar="NAME",
                   help="judge model name (default gpt-3.5-turbo, as Video-ChatGPT)")
    j.add_argument("--judge-key-env", default="OPENAI_API_KEY", metavar="VAR",
                   help="environment variable holding the endpoint's API key, if it needs one")
    add_model_args(p)
    add_common_args(p, devices=True)
    p.set_defaults(run=lambda args: run_command(cmd_eval, args))


def cmd_eval(args: argparse.Namespace) -> int:
    for flag in ("batch_size", "workers", "max_new_tokens"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    task = get_task(args.task)
    media = Path(args.media_dir)
    if not media.is_dir():
        raise FileNotFoundError(f"--media-dir {media}: no such folder")
    if args.subtitles is not None:
        if not task.subtitles:
            raise UsageError(f"--subtitles: {task.name} has no subtitles (only videomme)")
        if not Path(args.subtitles).is_dir():
            raise FileNotFoundError(f"--subtitles {args.subtitles}: no such folder")
    out = Path(args.out)
    if out.is_file():
        raise UsageError(f"--out {out}: is a file (give a folder)")
    if args.protocol != "both" and task.kind != "mc":
        raise UsageError(f"--protocol: {task.name} is open-ended; protocols are for multiple-choice tasks")
    judge = None
    if args.judge_url:
        if task.kind != "open":
            raise UsageError(f"--judge-url: {task.name} is multiple choice; the judge scores open-ended answers")
        judge = Judge(args.judge_url, args.judge_model, api_key=os.environ.get(args.judge_key_env))
    questions = load_questions(task, args.annotations, media, args.limit, subtitles=args.subtitles)
    if not questions:
        raise UsageError(f"--annotations {args.annotations}: no questions")
    done = read_rows(out / PREDICTIONS)
    if all(q.id in done for q in questions):  # nothing to ask: skip the model load, refresh the summary
        summary = write_summary(out, task.name, task.kind, [done[q.id] for q in questions],
                                model=_previous_model(out), annotations=str(args.annotations))
        info(f"all {len(questions)} questions already answered in {out / PREDICTIONS}")
    else:
        chat = load_chat(args, generation_config=None)
        info(f"{task.name}: {len(questions)} questions ({len(questions) - sum(q.id in done for q in questions)} "
             f"to ask), batch {args.batch_size}")
        summary = evaluate(chat, task.name, task.kind, questions, out, batch_size=args.batch_size,
                           max_new_tokens=args.max_new_tokens, judge=judge, with_audio=not args.no_audio,
                           workers=args.workers, progress=not args.quiet, annotations=str(args.annotations),
                           protocols=MC_PROTOCOLS if args.protocol == "both" else (args.protocol,),
                           ablation=args.ablation).summary
    print(markdown_table(summary))
    info(f"{summary['n']} questions, {summary['errors']} error rows; accuracy ({summary['accuracy_of']}) "
         f"{100 * summary['metrics']['accuracy']:.1f}%; {out / SUMMARY}")
    return 0


def _previous_model(out: Path) -> str:
    """The model an earlier run of this OUT named (its summary), for a summary rewritten without a model load."""
    try:
        return str(json.loads((out / SUMMARY).read_text(encoding="utf-8")).get("model", ""))
    except (OSError, ValueError, AttributeError):
        return ""
