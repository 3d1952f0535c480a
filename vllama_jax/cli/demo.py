"""`vllama-jax demo` (= `make demo`, `python -m vllama_jax.demo`): the whole system end to end on a CPU, no download
(see `vllama_jax.demo.run`)."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from ..demo.run import FAST, Settings, run
from .common import UsageError, add_common_args, run_command


def register(sub: Any) -> None:
    d = Settings()
    p = sub.add_parser("demo", help="the end-to-end demo: generated clips -> prepare -> train -> chat -> accuracy",
                       description="Generate clips with sound, prepare them, train the video branch of the embedded "
                                   "CPU model, and ask held-out clips about what they show.")
    p.add_argument("--out", type=Path, default=d.out, help=f"work folder (default {d.out})")
    p.add_argument("--fast", action="store_true", help="toy size (a smoke run: mechanics, not accuracy)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--train-clips", type=int, default=None, help=f"default {d.train_clips}")
    p.add_argument("--heldout-clips", type=int, default=None, help=f"default {d.heldout_clips}")
    p.add_argument("--steps", type=int, default=None, help=f"training steps (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=None, help=f"default {d.batch_size}")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {d.lr:g})")
    p.add_argument("--config", default=d.config, help=f"training config template (default {d.config})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training-config value (as train.py --set)")
    p.add_argument("--no-export", action="store_true", help="do not write the trained model directory")
    add_common_args(p)
    p.set_defaults(run=lambda args: run_command(cmd_demo, args))


def settings_from_args(args: argparse.Namespace) -> Settings:
    s = Settings(out=args.out, seed=args.seed, config=args.config, train_set=tuple(args.set),
                 export=not args.no_export)
    if args.fast:
        s = dataclasses.replace(s, **FAST)
    for name in ("train_clips", "heldout_clips", "steps", "batch_size", "lr"):
        v = getattr(args, name)
        if v is not None:
            s = dataclasses.replace(s, **{name: v})
    for name in ("train_clips", "heldout_clips", "steps", "batch_size"):
        if getattr(s, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    return s


def cmd_demo(args: argparse.Namespace) -> int:
    run(settings_from_args(args))
    return 0
