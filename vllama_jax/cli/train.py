"""`vllama-jax train` (= `python train.py`): train a Video-LLaMA stage on one device, a GPU cluster or a TPU pod.

    vllama-jax train --config configs/train_vl_stage1.yaml [--set key=value ...] [--steps N]
                     [--dry-run [--device-memory-gib G] [--fake-devices N | --dry-run-topology v5p:2x2x1]]
                     [--coordinator HOST:PORT --num-processes N --process-id I]

Every bad input (config, data, weights, mesh) exits with status 2 and one line; a non-finite loss with 3.
"""
from __future__ import annotations

import argparse
from typing import Any

from ..train.config import load_train_config
from ..train.dry_run import tpu_topology_devices
from ..train.loop import Trainer
from .common import add_common_args, run_command

#: the status every bad input of a training run exits with (scripts around a pod job test for it)
INPUT_ERROR_STATUS = 2


def register(sub: Any) -> None:
    p = sub.add_parser("train", help="train a stage (same as train.py)",
                       description="Train a Video-LLaMA stage (vision/audio branch, stage 1 or 2) on one device, a "
                                   "GPU cluster or a TPU pod; resumes where it stopped.")
    p.add_argument("--config", required=True, help="training config YAML (configs/train_*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.init_lr=3e-5 (repeatable)")
    p.add_argument("--steps", type=int, default=None, help="train at most this many more steps")
    p.add_argument("--dry-run", action="store_true",
                   help="compile the step for the configured mesh from shapes only and print bytes per device")
    p.add_argument("--device-memory-gib", type=float, default=None, help="with --dry-run: memory of one device")
    p.add_argument("--dry-run-topology", default=None, metavar="NAME",
                   help="with --dry-run: compile for a TPU slice without TPUs, e.g. v5p:2x2x1 (needs libtpu)")
    p.add_argument("--coordinator", default=None, help="multi-host: HOST:PORT of process 0")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    add_common_args(p, devices=True)
    p.set_defaults(run=lambda args: run_command(cmd_train, args, input_error_status=INPUT_ERROR_STATUS))


def cmd_train(args: argparse.Namespace) -> int:
    overrides = list(args.set)
    for flag in ("coordinator", "num_processes", "process_id"):
        if getattr(args, flag) is not None:
            overrides.append(f"distributed.{flag}={getattr(args, flag)}")
    cfg = load_train_config(args.config, overrides)
    devices = tpu_topology_devices(args.dry_run_topology) if args.dry_run_topology else None
    trainer = Trainer(cfg, devices=devices)
    try:
        if args.dry_run:
            trainer.dry_run(args.device_memory_gib)
        else:
            trainer.run(args.steps)
    finally:
        trainer.close()
    return 0
