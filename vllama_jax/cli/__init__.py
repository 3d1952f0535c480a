"""`vllama-jax`: the one command line of the project (`python -m vllama_jax.cli` works too).

    vllama-jax convert RELEASE_FOLDER --out models/vl-llama2-7b       # upstream .pth files -> a model directory
    vllama-jax export --model DIR --out trained.pth                    # trained branches -> upstream .pth
    vllama-jax export --format peft --checkpoint CKPT --out adapter/   # LoRA adapters -> PEFT (or --format merged)
    vllama-jax prepare webvid --source ANNO --media-dir VIDEOS --out /data/webvid
    vllama-jax encode /data/webvid --model models/vl-llama2-7b             # cache the frozen towers' output
    vllama-jax train --config configs/train_vl_stage1.yaml
    vllama-jax chat --model DIR --video clip.mp4 --question "What happens?"
    vllama-jax describe --model DIR --videos clips/ --prompt "Describe the video." --out results.jsonl
    vllama-jax eval --task mvbench --annotations MVBench/json --media-dir MVBench/video --out runs/mvbench
    vllama-jax serve --model DIR --port 8000 --allowed-media-path clips/   # OpenAI API + web demo
    vllama-jax demo

One module per subcommand (`register(subparsers)`); the error contract, `--debug`, library quieting and simulated
devices live in `common`. `train.py` and `convert_weights.py` at the repository root are thin wrappers.
"""
from __future__ import annotations

import sys
from typing import Sequence

from . import chat, convert, demo, encode, evaluate, prepare, serve, train
from .common import PROG, Parser

#: subcommand modules, in the order `--help` lists them
COMMANDS = (convert, prepare, encode, train, chat, evaluate, serve, demo)


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="Video-LLaMA in JAX: convert the released weights, prepare data, train, "
                                           "chat about a video, image or sound, describe many videos, "
                                           "run a video-QA benchmark, or serve a model over HTTP.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if not getattr(args, "run", None):
        parser.print_help(sys.stderr)
        return 2
    return args.run(args)


__all__ = ["build_parser", "main"]
