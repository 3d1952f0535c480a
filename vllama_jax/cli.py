"""``vllama-jax``: chat with a video, or describe many videos (``python -m vllama_jax.cli`` works too).

    vllama-jax chat --video clip.mp4                                   # interactive, embedded default model
    vllama-jax chat --model models/vl-llama2-7b --video clip.mp4 --question "What happens?"
    vllama-jax chat --model DIR --image photo.jpg --mesh data=1,fsdp=2,tensor=4 --greedy
    vllama-jax describe --model DIR --videos clips/ --prompt "Describe the video." --out results.jsonl

Without ``--model`` the embedded default (SmolLM2-135M-Instruct + untrained CPU-sized towers, see
``vllama_jax.defaults``) is used and a notice says its visual branch is untrained. Answers go to stdout (streamed
token by token), everything else (notices, notes, progress) to stderr. Bad input ends with one ``error: ...`` line
on stderr and a non-zero status (2: bad arguments, 1: a file or model that cannot be used, 130: interrupted),
never a traceback (``--debug`` shows it).

``vllama-jax convert ...`` and ``vllama-jax train ...`` forward to ``convert_weights.py`` / ``train.py``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

PROG = "vllama-jax"

#: subcommands owned by other modules: ``vllama-jax NAME ARGS`` == ``module.main(ARGS)``
PASSTHROUGH = {
    "convert": ("vllama_jax.weights.convert", "convert upstream PyTorch files into a model directory "
                                              "(same as convert_weights.py)"),
    "train": ("vllama_jax.train.loop", "train a stage (same as train.py)"),
}


class UsageError(ValueError):
    """A bad command-line value (exit status 2)."""


# ------------------------------------------------------------------------------------------------------------
# parser


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="DIR", help="converted model directory (default: the embedded SmolLM2 model "
                                                  "with untrained towers)")
    g.add_argument("--mesh", metavar="AXES", help="device mesh, e.g. data=1,fsdp=2,tensor=4 (default: one device)")
    g.add_argument("--template", choices=("vicuna", "llama_2", "chatml"),
                   help="conversation template (default: the model's)")
    g.add_argument("--num-frames", type=int, default=8, metavar="N", help="frames sampled per video (default 8)")
    g.add_argument("--no-audio", action="store_true", help="ignore the sound track of videos")

    s = p.add_argument_group("decoding (defaults: upstream Chat.answer sampling)")
    s.add_argument("--max-new-tokens", type=int, default=300, metavar="N")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-p", type=float, default=0.9)
    s.add_argument("--top-k", type=int, default=50)
    s.add_argument("--num-beams", type=int, default=1)
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    s.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Video-LLaMA in JAX: chat about a video, image or sound, or describe many videos.",
        epilog="Also: " + "; ".join(f"{PROG} {k} ... ({v[1]})" for k, v in PASSTHROUGH.items()))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

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
    chat.set_defaults(func=cmd_chat)

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
    desc.set_defaults(func=cmd_describe)
    return parser


# ------------------------------------------------------------------------------------------------------------
# shared helpers


def _generation_config(args: argparse.Namespace):
    from .inference.generate import GenerationConfig, GenerationConfigError

    try:
        return GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=not args.greedy,
                                temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                num_beams=args.num_beams, repetition_penalty=args.repetition_penalty)
    except GenerationConfigError as e:
        raise UsageError(str(e)) from None


def _mesh(spec: str | None):
    if not spec:
        return None
    import jax

    from .sharding import MeshSpecError, make_mesh

    try:
        return make_mesh(spec)
    except MeshSpecError as e:
        hint = ""
        if jax.default_backend() == "cpu" and "available" in str(e):
            hint = " (on CPU, simulate devices with XLA_FLAGS=--xla_force_host_platform_device_count=N)"
        raise UsageError(f"--mesh: {e}{hint}") from None


def _info(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _load_chat(args: argparse.Namespace):
    """The chat for --model (or the embedded default, with its notice)."""
    from .inference.chat import VideoLLaMAChat

    if args.num_frames < 1:
        raise UsageError(f"--num-frames must be >= 1, got {args.num_frames}")
    gen = _generation_config(args)
    mesh = _mesh(args.mesh)
    kw: dict[str, Any] = dict(template=args.template, num_frames=args.num_frames, generation_config=gen, log=_info)
    if args.model:
        if not Path(args.model).exists():
            raise FileNotFoundError(f"{args.model}: model directory not found")
        _info(f"loading {args.model} ...")
        return VideoLLaMAChat.from_model_dir(args.model, mesh=mesh, **kw)
    from .defaults import EMBEDDED_NOTICE

    _info(EMBEDDED_NOTICE)
    return VideoLLaMAChat.embedded(mesh=mesh, **kw)


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
        _info(f"uploaded {path} ({what})")

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

    _info("type a question and press Enter; /reset starts the conversation over, /exit (or Ctrl-D) quits")
    interactive = sys.stdin.isatty()
    turn = 0
    while True:
        if interactive:
            print("You: ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            chat.reset(keep_media=True)
            _info("conversation cleared" + (" (the upload is kept)" if chat.upload_info else ""))
            continue
        try:
            chat.ask(line)
        except ValueError as e:
            _info(f"error: {e}")
            continue
        answer(turn, "Assistant: ")
        turn += 1
    return 0


# ------------------------------------------------------------------------------------------------------------
# describe


def cmd_describe(args: argparse.Namespace) -> int:
    from .inference.describe import describe, find_videos, path_key, read_done

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
        _info(f"0 answered, 0 error rows, {len(videos)} skipped (already in {out}); {len(videos)} videos")
        return 0
    chat = _load_chat(args)
    res = describe(chat, videos, args.prompt, out, batch_size=args.batch_size, with_audio=not args.no_audio,
                   rng=args.seed, progress=not args.quiet, workers=args.workers)
    _info(f"{res.answered} answered, {res.errors} error rows, {res.skipped} skipped (already in {out}); "
          f"{res.total} videos")
    return 0


# ------------------------------------------------------------------------------------------------------------
# entry point


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _quiet_libraries() -> None:
    warnings.simplefilter("ignore")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in ("absl", "jax", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:
        import importlib

        module = importlib.import_module(PASSTHROUGH[argv[0]][0])
        return int(module.main(argv[1:]) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    if not args.debug:
        _quiet_libraries()

    from .defaults import EmbeddedModelError
    from .inference.chat import ChatError
    from .media import MediaError

    handled: tuple[type[BaseException], ...] = (MediaError, ChatError, EmbeddedModelError, OSError)
    try:
        from .config import ConfigError
        from .text import TokenizerError
        from .weights.model_dir import ModelDirError
        from .weights.readers import WeightsError

        handled += (ModelDirError, TokenizerError, WeightsError, ConfigError)
    except ImportError:  # pragma: no cover - partial installs
        pass
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except UsageError as e:
        print(f"{PROG} {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `vllama-jax chat ... | head -1`
        return 0
    except handled as e:
        if args.debug:
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # anything else: still one line unless --debug
        if args.debug:
            raise
        print(f"error: {type(e).__name__}: {_one_line(e)} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
