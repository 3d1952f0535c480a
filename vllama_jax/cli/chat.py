"""`vllama-jax chat` (one media file, interactive or --question) and `vllama-jax describe` (one prompt over many
videos -> JSONL, resumable).

Without ``--model`` the embedded default (SmolLM2-135M-Instruct + untrained CPU-sized towers, see
``vllama_jax.defaults``) is used and a notice says its visual branch is untrained. Answers go to stdout (streamed
token by token), everything else (notices, notes, progress) to stderr.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ..config import PRECISION_MODES
from ..defaults import EMBEDDED_NOTICE
from ..inference.chat import VideoLLaMAChat
from ..inference.describe import describe, find_videos, path_key, read_done
from ..inference.generate import GenerationConfig, GenerationConfigError
from ..inference.generation_config import BEAM_SEMANTICS
from ..models.quant import QUANTIZE_CHOICES
from .common import UsageError, add_common_args, info, mesh_from_flag, run_command


def register(sub: Any) -> None:
    chat = sub.add_parser("chat", help="chat about one video / image / audio file",
                          description="Upload one media file and chat about it. Without --question, reads questions "
                                      "from stdin (one per line; /reset starts over, /exit or end of input quits).")
    media = chat.add_mutually_exclusive_group()
    media.add_argument("--video", metavar="FILE")
    media.add_argument("--image", metavar="FILE")
    media.add_argument("--audio", metavar="FILE")
    chat.add_argument("--question", "-q", action="append", metavar="TEXT",
                      help="answer this question and exit (repeat for follow-up questions)")
    chat.add_argument("--no-stream", action="store_true", help="print each answer when it is complete")
    _add_model_args(chat)
    chat.set_defaults(run=lambda args: run_command(cmd_chat, args))

    desc = sub.add_parser("describe", help="ask one prompt about many videos -> JSONL (resumable)",
                          description="Answer one prompt about every video, one JSON line per video (answer or "
                                      "error). Videos that already have a row in --out are skipped.")
    desc.add_argument("--videos", required=True, action="append", metavar="FILE_OR_FOLDER",
                      help="a video, or a folder searched recursively for videos (repeatable)")
    desc.add_argument("--prompt", required=True, metavar="TEXT")
    desc.add_argument("--out", required=True, metavar="FILE.jsonl")
    desc.add_argument("--batch-size", type=int, default=4, metavar="N", help="videos per device batch (default 4)")
    desc.add_argument("--workers", type=int, default=2, metavar="N", help="decoding threads (default 2)")
    desc.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_model_args(desc)
    desc.set_defaults(run=lambda args: run_command(cmd_describe, args))


def add_model_args(p: argparse.ArgumentParser, audio_flag: bool = True, huge_pages: bool = False) -> None:
    """The flags that choose and load the model (`chat`, `describe`, `eval`, `serve`: whatever `load_chat`
    reads); `audio_flag`: also --no-audio (not for `serve`, where each request chooses); `huge_pages`: the default
    of --huge-pages (on for `serve`, whose load is paid once)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="DIR", help="converted model directory (default: the embedded SmolLM2 model "
                                                  "with untrained towers)")
    g.add_argument("--mesh", metavar="AXES", help="device mesh, e.g. data=1,fsdp=2,tensor=4 (default: one device)")
    g.add_argument("--template", choices=("vicuna", "llama_2", "chatml"),
                   help="conversation template (default: the model's)")
    g.add_argument("--num-frames", type=int, default=8, metavar="N", help="frames sampled per video (default 8)")
    if audio_flag:
        g.add_argument("--no-audio", action="store_true",
                       help="ignore the sound track of videos (upstream demo's default: its Audio box starts unticked)")
    g.add_argument("--ignore-rotation", action="store_true",
                   help="ignore phone videos' rotation metadata, as upstream's decord does (default: honour it)")
    g.add_argument("--precision", choices=tuple(PRECISION_MODES),
                   help="upstream: as the original ran (fp16 ViT and encoders, bf16 LLaMA, float32 prompt stream); "
                        "bf16: fastest; fp32: exact, twice the memory (default: the model's, upstream for the "
                        "released presets)")
    g.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                   help="load the LLM's weights as int8 with per-channel scales (~4x smaller than float32, faster "
                        "decoding; the vision/audio towers keep their precision)")
    g.add_argument("--huge-pages", action=argparse.BooleanOptionalAction, default=huge_pages,
                   help="on one CPU device, move a --model's LLM weights into 2 MiB pages: decoding ~6%% faster at "
                        "7B, loading ~1 s per GB slower")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    s = p.add_argument_group("decoding (defaults: upstream Chat.answer sampling)")
    s.add_argument("--max-new-tokens", type=int, default=300, metavar="N")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-p", type=float, default=0.9)
    s.add_argument("--top-k", type=int, default=50)
    s.add_argument("--num-beams", type=int, default=1)
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    s.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    s.add_argument("--beam-semantics", choices=BEAM_SEMANTICS, default=None,
                   help="beam sampling (--num-beams > 1) as transformers 4.28's beam_sample (upstream's) or as "
                        "transformers 5 (default: 4.28 for upstream's templates, 5 for ChatML)")
    add_common_args(p, devices=True)


def _generation_config(args: argparse.Namespace):
    try:
        return GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=not args.greedy,
                                temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                num_beams=args.num_beams, repetition_penalty=args.repetition_penalty,
                                beam_semantics=args.beam_semantics)
    except GenerationConfigError as e:
        raise UsageError(str(e)) from None


def _load_chat(args: argparse.Namespace) -> VideoLLaMAChat:
    return load_chat(args, _generation_config(args))


def load_chat(args: argparse.Namespace, generation_config: GenerationConfig | None) -> VideoLLaMAChat:
    """The chat for --model (or the embedded default, with its notice) with the --mesh, --template and
    --num-frames of `args` (`chat`, `describe`, `eval`)."""
    if args.num_frames < 1:
        raise UsageError(f"--num-frames must be >= 1, got {args.num_frames}")
    mesh = mesh_from_flag(args.mesh)
    kw: dict[str, Any] = dict(template=args.template, num_frames=args.num_frames,
                              generation_config=generation_config, log=info, precision=args.precision,
                              honour_rotation=not args.ignore_rotation)
    if args.model:
        if not Path(args.model).exists():
            raise FileNotFoundError(f"{args.model}: model directory not found")
        info(f"loading {args.model} ...")
        return VideoLLaMAChat.from_model_dir(args.model, mesh=mesh, quantize=args.quantize,
                                             huge_pages=args.huge_pages, **kw)
    info(EMBEDDED_NOTICE)
    return VideoLLaMAChat.embedded(mesh=mesh, quantize=args.quantize, **kw)


def _check_file(path: str, flag: str) -> None:
    """Fail before the (slow) model load when a given file is obviously missing."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path}: no such file")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a folder, not a file")


def _rng(args: argparse.Namespace, turn: int) -> Any:
    return None if args.seed is None else args.seed + turn


# ------------------------------------------------------------------------------------------------------------
# chat


def cmd_chat(args: argparse.Namespace) -> int:
    media = [(flag, getattr(args, flag)) for flag in ("video", "image", "audio") if getattr(args, flag)]
    for flag, path in media:
        _check_file(path, f"--{flag}")
    if args.question is not None and any(not q.strip() for q in args.question):
        raise UsageError("--question: empty question")
    chat = _load_chat(args)
    if media:
        flag, path = media[0]
        if flag == "video":
            chat.upload_video(path, with_audio=not args.no_audio)
        elif flag == "image":
            chat.upload_image(path)
        else:
            chat.upload_audio(path)
        up = chat.upload_info
        what = up.kind if up.kind != "video" else "video + audio" if up.with_audio else "video only"
        info(f"uploaded {path} ({what})")

    stream = not args.no_stream and args.num_beams == 1

    def answer(turn: int, prefix: str) -> None:
        out = sys.stdout
        out.write(prefix)
        out.flush()
        printed: list[str] = []

        def on_text(piece: str) -> None:
            printed.append(piece)
            out.write(piece)
            out.flush()

        text = chat.answer(rng=_rng(args, turn), stream=on_text if stream else None)
        shown = "".join(printed)
        if not stream:
            out.write(text)
        elif shown != text and not text.startswith(shown):
            out.write("\n" + text)  # post-processing changed what was streamed: print the final answer
        out.write("\n")
        out.flush()

    if args.question:
        for turn, q in enumerate(args.question):
            chat.ask(q)
            answer(turn, "")
        return 0

    info("type a question and press Enter; /reset starts the conversation over, /exit (or Ctrl-D) quits")
    interactive = sys.stdin.isatty()
    turn = 0
    while True:
        if interactive:
            print("You: ", end="", file=sys.stderr, flush=True)
        raw = sys.stdin.readline()
        if not raw:
            break
        line = raw.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            chat.reset(keep_media=True)
            info("conversation cleared" + (" (the upload is kept)" if chat.upload_info else ""))
            continue
        try:
            chat.ask(raw.rstrip("\r\n"))  # as typed, spaces included: upstream's demo passes the text unstripped
        except ValueError as e:
            info(f"error: {e}")
            continue
        answer(turn, "Assistant: ")
        turn += 1
    return 0


# ------------------------------------------------------------------------------------------------------------
# describe


def cmd_describe(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not args.prompt.strip():
        raise UsageError("--prompt: empty prompt")
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out {out}: is a folder (give a .jsonl file)")
    videos = find_videos(args.videos)
    if not videos:
        raise UsageError(f"--videos: no video files found in {', '.join(args.videos)}")
    done = read_done(out)
    if all(path_key(v) in done for v in videos):  # nothing to do: skip the model load
        info(f"0 answered, 0 error rows, {len(videos)} skipped (already in {out}); {len(videos)} videos")
        return 0
    chat = _load_chat(args)
    res = describe(chat, videos, args.prompt, out, batch_size=args.batch_size, with_audio=not args.no_audio,
                   rng=args.seed, progress=not args.quiet, workers=args.workers)
    info(f"{res.answered} answered, {res.errors} error rows, {res.skipped} skipped (already in {out}); "
          f"{res.total} videos")
    return 0
