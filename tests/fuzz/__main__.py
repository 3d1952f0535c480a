"""``python -m tests.fuzz`` (``make fuzz``): the full seeded campaign, its table, findings kept as regressions."""
from __future__ import annotations

import argparse
import signal
import sys
import time

from tests.fuzz.campaign import campaign, table
from tests.fuzz.targets import TARGETS


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    ap.add_argument("--scale", choices=("full", "ci"), default="full")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds before a case counts as a hang")
    ap.add_argument("--target", action="append", choices=sorted(TARGETS), help="only these targets (repeatable)")
    ap.add_argument("--keep", action="store_true", help="copy findings into tests/fuzz/regressions/")
    args = ap.parse_args()
    # a plain `kill` then ends the workers too (the pool's finally), not only this process
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.monotonic()
    stats, failures = campaign(args.scale, args.seed, args.target, args.workers, args.timeout, args.keep,
                               log=lambda m: print(m, flush=True))
    print(table(stats))
    print(f"{sum(s.cases for s in stats.values())} cases in {time.monotonic() - t0:.0f} s; "
          f"{len(failures)} findings")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
