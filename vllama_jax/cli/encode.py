"""`vllama-jax encode DATA --model DIR`: run the frozen towers once over a prepared dataset and cache their output
beside its records, for training with ``data.features: cached`` (resumable; see `vllama_jax.train.encode`)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..data.features import DTYPES
from ..train.config import PRECISIONS, DistributedConfig
from ..train.distributed import init_distributed
from ..train.encode import BRANCHES, encode_dataset
from .common import UsageError, add_common_args, info, run_command


def register(sub: Any) -> None:
    p = sub.add_parser("encode", help="cache the frozen towers' output of a prepared dataset (resumable)",
                       description="Run the frozen towers of a model directory (ViT + image Q-Former for the video "
                                   "branch, ImageBind's vision tower for the audio branch) once over a dataset "
                                   "written by `vllama-jax prepare`, and write their output beside its records; "
                                   "train with data.features: cached to skip the towers. A rerun resumes.")
    p.add_argument("data", help="a prepared dataset folder (vllama-jax prepare --out)")
    p.add_argument("--model", required=True, help="model directory whose frozen towers encode (convert output)")
    p.add_argument("--branch", choices=BRANCHES, default="video",
                   help="the branch the training stage trains (default video; audio: ImageBind vision)")
    p.add_argument("--num-frames", type=int, default=8, help="frames per video, as data.num_frames (default 8)")
    p.add_argument("--sampling", choices=("uniform", "headtail", "random"), default=None,
                   help="frame sampling (default: the dataset's, e.g. headtail for WebVid)")
    p.add_argument("--augment", action="store_true",
                   help="random-crop train transforms, as data.augment: true (use with --views N)")
    p.add_argument("--views", type=int, default=1,
                   help="random draws of the preprocessing cached per record; epoch e trains on view e %% N")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16", help="stored dtype (default bfloat16)")
    p.add_argument("--precision", choices=PRECISIONS, default="model",
                   help="compute precision of the towers, as the training config's model.precision (default: the "
                        "model directory's); training refuses a cache made in another")
    p.add_argument("--batch-size", type=int, default=16, help="frames sequences per device batch (default 16)")
    p.add_argument("--workers", type=int, default=4, help="threads decoding media (default 4)")
    p.add_argument("--seed", type=int, default=42, help="seed of the random draws (default 42)")
    p.add_argument("--mesh", default=None, help="mesh of this process's devices (default data=<all>)")
    p.add_argument("--overwrite", action="store_true", help="replace a cache encoded with other settings")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--coordinator", default=None, help="multi-host: HOST:PORT of process 0")
    p.add_argument("--num-processes", type=int, default=0)
    p.add_argument("--process-id", type=int, default=-1)
    add_common_args(p, devices=True)
    p.set_defaults(run=lambda args: run_command(
        cmd_encode, args, interrupted="interrupted; run the same command again to resume"))


def cmd_encode(args: argparse.Namespace) -> int:
    if not Path(args.data).is_dir():
        raise UsageError(f"{args.data} is not a folder (a dataset written by vllama-jax prepare)")
    if not Path(args.model).is_dir():
        raise UsageError(f"--model {args.model} is not a folder (a model directory)")
    for flag in ("num_frames", "views", "batch_size"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.workers < 0:
        raise UsageError("--workers must be >= 0")
    if args.coordinator:
        init_distributed(DistributedConfig(coordinator=args.coordinator, num_processes=args.num_processes,
                                           process_id=args.process_id))
    summary = encode_dataset(args.data, args.model, branch=args.branch, num_frames=args.num_frames,
                             sampling=args.sampling, augment=args.augment, views=args.views, dtype=args.dtype,
                             batch_size=args.batch_size, workers=args.workers, seed=args.seed, mesh_spec=args.mesh,
                             precision=args.precision, overwrite=args.overwrite, progress=not args.quiet, log=info)
    print(summary.line())
    return 0
