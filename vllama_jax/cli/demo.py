"""`vllama-jax demo` (= `make demo`, `python -m vllama_jax.demo`): the whole system end to end on a CPU, no download
(see `vllama_jax.demo.run`)."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from ..demo.clips import BLOCK
from ..demo.run import FAST, Settings, run
from ..train.config import OPTIMIZERS
from .common import UsageError, add_common_args, run_command


def register(sub: Any) -> None:
    d = Settings()
    p = sub.add_parser("demo", help="the end-to-end demo: generated clips -> train both branches -> chat -> ablations",
                       description="Generate clips with sound, train both branches (video and audio) of the embedded "
                                   "CPU model on them, and ask held-out clips about what they show and sound like, "
                                   "with two ablations (frames shuffled, audio removed).")
    p.add_argument("--out", type=Path, default=d.out, help=f"work folder (default {d.out})")
    p.add_argument("--fast", action="store_true", help="toy size (a smoke run: mechanics, not accuracy)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--train-clips", type=int, default=None, help=f"default {d.train_clips}")
    p.add_argument("--heldout-clips", type=int, default=None, help=f"default {d.heldout_clips}")
    p.add_argument("--steps", type=int, default=None, help=f"training steps (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=None, help=f"default {d.batch_size}")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {d.lr:g})")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                   help=f"for the branches' 2-D kernels: muon or upstream's adamw (default {d.optimizer})")
    p.add_argument("--whiten-floor", type=float, default=None,
                   help="Muon trains the video Q-Former's cross-attention keys and values on whitened frame "
                        f"features, this eigenvalue floor; 0: off; Muon only (default {d.whiten_floor:g})")
    p.add_argument("--frames", type=int, default=None, dest="num_frames",
                   help=f"frames per clip (default {d.num_frames})")
    p.add_argument("--no-export", action="store_true", help="do not write the trained model directory")
    add_common_args(p)
    p.set_defaults(run=lambda args: run_command(cmd_demo, args))


def settings_from_args(args: argparse.Namespace) -> Settings:
    s = Settings(out=args.out, seed=args.seed, export=not args.no_export)
    if args.fast:
        s = dataclasses.replace(s, **FAST)
    for name in ("train_clips", "heldout_clips", "steps", "batch_size", "lr", "num_frames", "optimizer",
                 "whiten_floor"):
        v = getattr(args, name)
        if v is not None:
            s = dataclasses.replace(s, **{name: v})
    for name in ("train_clips", "heldout_clips", "steps", "batch_size", "num_frames"):
        if getattr(s, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if not s.whiten_floor >= 0:
        raise UsageError(f"--whiten-floor must be >= 0, got {s.whiten_floor}")
    for name in ("train_clips", "heldout_clips"):
        if getattr(s, name) % BLOCK:
            raise UsageError(f"--{name.replace('_', '-')} must be a multiple of {BLOCK} (balanced attributes)")
    return s


def cmd_demo(args: argparse.Namespace) -> int:
    run(settings_from_args(args))
    return 0
