"""`vllama-jax convert` (upstream PyTorch files -> a model directory) and `vllama-jax export` (a model directory's
trained branches -> an upstream-format .pth). `convert_weights.py` at the repository root is the same command."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..models.groups import TOWERS
from ..weights.convert import DTYPES, LLM_ONLY_DTYPES, convert
from ..weights.detect import FLAGS, LABELS
from ..weights.export import export_checkpoint
from .common import add_common_args, run_command


def register(sub: Any) -> None:
    ap = sub.add_parser(
        "convert", help="convert the released PyTorch files into a model directory",
        description="Convert the released Video-LLaMA PyTorch files into one vllama-jax model directory "
                    "(Orbax params + config + tokenizer). `vllama-jax export --help`: the way back.")
    ap.add_argument("folder", nargs="?", help="release folder to auto-detect the files in (flags override it)")
    ap.add_argument("--out", required=True, help="model directory to create")
    for kind, flag in FLAGS.items():
        ap.add_argument(flag, dest=kind, metavar="PATH", help=LABELS[kind])
    ap.add_argument("--config", help="config file or preset name (configs/*.yaml); default: inferred")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, applied last (repeatable), e.g. --set template=vicuna")
    ap.add_argument("--dtype", choices=DTYPES + LLM_ONLY_DTYPES,
                    help="stored dtype of every tower, and compute dtype of the ViT and the LLaMA (default: the "
                         "config's); int8: the LLM's weights as int8 with per-channel scales, the towers as the "
                         "config says")
    for t in TOWERS:
        also = ", and its compute dtype" if t in ("vit", "llama") else ""
        ap.add_argument(f"--dtype-{t}", dest=f"dtype_{t}", choices=DTYPES + (LLM_ONLY_DTYPES if t == "llama" else ()),
                        help=f"stored dtype of the {t} tower{also}")
    ap.add_argument("--tokenizer", metavar="PATH", help="tokenizer to use (default: the LLM's)")
    ap.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer")
    ap.add_argument("--init-missing", action="store_true",
                    help="random-initialise absent trainable groups (video/audio branch), for training from scratch")
    ap.add_argument("--seed", type=int, default=0, help="seed of --init-missing")
    ap.add_argument("--force", action="store_true", help="replace an existing model directory")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--report-json", metavar="PATH", help="also write the summary as JSON here")
    add_common_args(ap)
    ap.set_defaults(run=lambda args: run_command(cmd_convert, args, interrupted="interrupted; nothing was written"))

    ex = sub.add_parser(
        "export", help="write a model directory's trained branches as an upstream .pth",
        description="Write the trainable parts of a model directory (video/audio Q-Formers, query tokens, "
                    "position embeddings, projections) as an upstream-format .pth ({'model': {...}}) that the "
                    "original PyTorch demo loads as its ckpt / ckpt_2.")
    ex.add_argument("--model", required=True, help="model directory")
    ex.add_argument("--out", required=True, help=".pth file to write")
    ex.add_argument("--branch", choices=("all", "video", "audio"), default="all",
                    help="which branch to export (default: every branch present)")
    ex.add_argument("--force", action="store_true", help="replace an existing file")
    add_common_args(ex)
    ex.set_defaults(run=lambda args: run_command(cmd_export, args, interrupted="interrupted; nothing was written"))


def cmd_convert(args: argparse.Namespace) -> int:
    rep = convert(
        args.out, folder=args.folder,
        files={k: getattr(args, k) for k in FLAGS},
        config=args.config, overrides=args.overrides, dtype=args.dtype,
        dtypes={t: getattr(args, f"dtype_{t}") for t in TOWERS},
        tokenizer=args.tokenizer, no_tokenizer=args.no_tokenizer, init_missing=args.init_missing,
        seed=args.seed, force=args.force, progress=not args.quiet)
    print(rep.summary())
    if args.report_json:
        Path(args.report_json).write_text(json.dumps(rep.to_json(), indent=2, default=str) + "\n")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    print(export_checkpoint(args.model, args.out, branch=args.branch, force=args.force).summary())
    return 0
