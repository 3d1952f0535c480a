"""`vllama-jax prepare DATASET --source ... --out ...`: an upstream training set -> ArrayRecord shards (resumable;
see `vllama_jax.data.prepare`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..data.formats import DATASET_NAMES
from ..data.prepare import prepare
from ..data.records import BAD_RECORDS
from .common import UsageError, add_common_args, run_command


def register(sub: Any) -> None:
    p = sub.add_parser("prepare", help="prepare an upstream training set into ArrayRecord shards (resumable)",
                       description="Prepare an upstream training set into ArrayRecord shards through a TFDS builder; "
                                   "bad entries are skipped and listed, a rerun resumes.")
    p.add_argument("dataset", choices=DATASET_NAMES, metavar="dataset",
                   help=f"upstream dataset name: {', '.join(DATASET_NAMES)}")
    p.add_argument("--source", required=True,
                   help="annotation file / folder as distributed (webvid: anno_dir; cc_sbu_align: the folder with "
                        "filter_cap.json; cc_sbu/laion: a folder or glob of .tar shards; instruct sets and jsonl: "
                        "the JSON / JSONL file)")
    p.add_argument("--out", required=True, help="output folder (resumes if it holds the same preparation)")
    p.add_argument("--media-dir", help="media root (webvid videos_dir, COCO train2014, VideoChat videos; "
                                       "cc_sbu_align: default SOURCE/image; jsonl: default the file's folder)")
    p.add_argument("--store-media", choices=("path", "bytes"), default="path",
                   help="store the media path (default) or the media bytes (movable shards)")
    p.add_argument("--records-per-part", type=int, default=5000, help="resume granularity (default 5000)")
    p.add_argument("--workers", type=int, default=4, help="threads checking/reading media (default 4)")
    p.add_argument("--no-check-media", dest="check_media", action="store_false",
                   help="do not decode one frame per entry (faster; bad media are then only caught at read time)")
    p.add_argument("--overwrite", action="store_true", help="replace a different preparation found in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_common_args(p)
    p.set_defaults(run=lambda args: run_command(
        cmd_prepare, args, interrupted="interrupted; run the same command again to resume"))


def cmd_prepare(args: argparse.Namespace) -> int:
    if not Path(args.source).exists() and not any(c in args.source for c in "*?["):
        raise UsageError(f"--source {args.source} does not exist")
    if args.media_dir is not None and not Path(args.media_dir).is_dir():
        raise UsageError(f"--media-dir {args.media_dir} is not a folder")
    if args.records_per_part < 1 or args.workers < 0:
        raise UsageError("--records-per-part must be >= 1 and --workers >= 0")
    summary = prepare(args.dataset, args.source, args.out, media_dir=args.media_dir,
                      store_media=args.store_media, records_per_part=args.records_per_part,
                      check_media=args.check_media, workers=args.workers, overwrite=args.overwrite,
                      progress=not args.quiet)
    print(summary.line())
    if summary.written == 0:
        print(f"error: no usable record in {args.source} (see {args.out}/{BAD_RECORDS})", file=sys.stderr)
        return 1
    return 0
