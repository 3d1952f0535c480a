"""The fuzz campaign: seeded cases -> a pool of worker processes -> a table per target, findings kept.

``python -m tests.fuzz`` (``make fuzz``) runs the full campaign; ``tests/test_fuzz.py`` runs a small seeded one and
replays every kept finding. Each case runs in a worker (``tests/fuzz/worker.py``) under RLIMIT_AS; workers are
reused across cases, and a worker that dies (crash) or does not answer within the time limit (hang, killed) is
replaced, the case being attributed to the target it was running.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import random
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from tests.fuzz.targets import DATA_FORMATS, ROWS_PER_CASE, STRINGS_PER_CASE, TARGETS, Target

ROOT = Path(__file__).resolve().parents[2]
REGRESSIONS = Path(__file__).resolve().parent / "regressions"
GIB = 1 << 30
RSS_LIMIT = 2 * GIB  # the contract: a bad file costs no more than this on top of what its reader already held
STARTUP_TIMEOUT = 600.0  # a worker's imports, on a loaded machine
AS_LIMIT = 8 * GIB  # address space per worker: above the RSS limit, as jax/torch reserve far more than they use
BAD = ("untyped", "hang", "crash", "executed", "memory")


@dataclasses.dataclass
class Case:
    target: str
    path: Path
    label: str = ""
    items: int = 1


@dataclasses.dataclass
class Result:
    case: Case
    status: str  # ok | typed | untyped | executed | hang | crash | memory
    error: str = ""
    peak_rss: int = 0  # the worker's resident memory at its peak during the case
    seconds: float = 0.0
    added_rss: int = 0  # of which the case added (the peak less what the worker held when the case began)


class _Worker:
    def __init__(self, mem_limit: int, log: Path, warm: bool = True):
        env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
                   OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="3")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.fuzz.worker", str(mem_limit), str(log),
                                      "warm" if warm else "cold"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT, env=env, text=True,
                                     bufsize=1)
        self.case: Case | None = None
        self.started = 0.0
        self.limit = 0.0  # seconds the running case (and the setup it waits for, if any) may take
        self.warm: set[str] = set()  # groups whose libraries this worker has imported (torch, jax, tokenizers)
        self.set_up: set[str] = set()  # targets whose once-per-worker setup has been asked of this worker

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Block until the worker has imported everything (its start is not counted in any case's time)."""
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line or not json.loads(line).get("ready"):
            self.kill()
            raise RuntimeError(f"a fuzz worker did not start within {timeout:.0f} s (see its log)")

    def send(self, case: Case, timeout: float) -> None:
        self.case, self.started, self.limit = case, time.monotonic(), timeout
        self.warm.add(_group(case))
        target = TARGETS.get(case.target)
        if target is not None and target.setup is not None and case.target not in self.set_up:
            self.set_up.add(case.target)
            self.limit += STARTUP_TIMEOUT  # its setup runs first; the reply says how long it took
        self.proc.stdin.write(json.dumps({"target": case.target, "path": str(case.path)}) + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Pool:
    """``workers`` reusable worker processes; ``run`` yields one Result per case, in completion order.

    As a context manager the workers outlive one ``run`` (a test module shares them: their start is the costly
    part); otherwise each ``run`` starts and ends its own."""

    def __init__(self, workers: int, timeout: float, log: Path, mem_limit: int = AS_LIMIT, warm: bool = True):
        """``warm=False``: workers skip the warm-up imports (for cases that need none: the pool's own test)."""
        self.n, self.timeout, self.log, self.mem_limit, self.warm = workers, timeout, log, mem_limit, warm
        self._idle: list[_Worker] = []
        self._kept = False

    def __enter__(self) -> "Pool":
        self._kept = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._kept = False
        self._close()

    def _close(self) -> None:
        for w in self._idle:
            w.kill()
        self._idle = []

    def _fill(self) -> None:
        fresh = [_Worker(self.mem_limit, self.log, self.warm) for _ in range(self.n - len(self._idle))]
        for w in fresh:
            w.wait_ready()
        self._idle.extend(fresh)

    def run(self, cases: Iterable[Case]) -> Iterator[Result]:
        todo = iter(cases)
        pending: list[Case] = []
        idle = self._idle
        busy: list[_Worker] = []
        try:
            self._fill()
            while True:
                for w in list(idle):
                    pending.extend(itertools.islice(todo, _LOOKAHEAD - len(pending)))
                    others = {t for o in idle + busy if o is not w for t in o.set_up}
                    i = _pick(pending, w, others)
                    if i is None:  # nothing left but cases another worker is set up for
                        continue
                    idle.remove(w)
                    w.send(pending.pop(i), self.timeout)
                    busy.append(w)
                if not busy:
                    return
                now = time.monotonic()
                wait = max(0.0, min(w.started + w.limit - now for w in busy))
                ready, _, _ = select.select([w.proc.stdout for w in busy], [], [], wait)
                for w in list(busy):
                    elapsed = time.monotonic() - w.started
                    if w.proc.stdout in ready:
                        line = w.proc.stdout.readline()
                        if line:
                            r = json.loads(line)
                            status, error = r["status"], r.get("error", "")
                            elapsed -= r.get("setup_seconds", 0.0)
                            added = r["peak_rss"] - r.get("base_rss", 0)
                            if status in ("ok", "typed") and added > RSS_LIMIT:
                                status, error = "memory", f"the case added {added / GIB:.1f} GB of resident memory"
                            elif r.get("setup_seconds") and elapsed > self.timeout:  # the limit was lifted for it
                                status, error = "hang", f"answered after {elapsed:.0f} s (limit {self.timeout:.0f} s)"
                            busy.remove(w)
                            idle.append(w)
                            yield Result(w.case, status, error, r["peak_rss"], elapsed, added)
                            continue
                        code = w.proc.wait()
                        result = Result(w.case, "crash", f"worker died (exit status {code})", 0, elapsed)
                    elif elapsed >= w.limit:
                        w.kill()
                        result = Result(w.case, "hang", f"no answer after {w.limit:.0f} s", 0, elapsed)
                    else:
                        continue
                    busy.remove(w)
                    self._fill()
                    yield result
        finally:
            for w in busy:  # a run left early: their cases are still running
                w.kill()
            if not self._kept:
                self._close()


_LOOKAHEAD = 64  # cases made ahead, so an idle worker can be given one of a group it has already imported


def _group(case: Case) -> str:
    return TARGETS[case.target].group if case.target in TARGETS else case.target


def _pick(pending: list[Case], w: _Worker, others_set_up: set[str]) -> int | None:
    """The first pending case of a group the worker is warm for (each heavy import then happens in as few
    workers as possible), else the first one; never a case of a target with a setup that another worker has
    done and this one has not (a second server costs more than the cases it would take: those wait)."""
    allowed = [i for i, c in enumerate(pending) if c.target not in others_set_up or c.target in w.set_up]
    return next((i for i in allowed if _group(pending[i]) in w.warm), allowed[0] if allowed else None)


def budgets(scale: str) -> dict[str, int]:
    """Cases per target. full: 2,000 media cases, 500 per weight format, 1,000 data rows, 1,000 strings, 1,000
    request bodies; ci (``make test``): 40 cases per media and weight target (15 model directories), 48 rows per
    data target, 50 strings, 50 request bodies."""
    media = [t for t in TARGETS.values() if t.group == "media"]
    data = [t for t in TARGETS.values() if t.group == "data"]
    if scale == "full":
        per = {"media": math.ceil(2000 / len(media)), "weights": 500,
               "data": math.ceil(1000 / len(data) / ROWS_PER_CASE), "text": math.ceil(1000 / STRINGS_PER_CASE),
               "serve": 1000}
    elif scale == "ci":
        per = {"media": 40, "weights": 40, "data": 4, "text": 1, "serve": 50}
    else:
        raise ValueError(f"unknown scale {scale!r}")
    counts = {t.name: per[t.group] for t in TARGETS.values()}
    if scale == "ci":  # an Orbax restore costs ~2.5 s a case, as much as all the other weight cases together
        counts["weights_model_dir"] = 15
    return counts


def make_cases(targets: list[Target], counts: dict[str, int], seed: int, work: Path) -> Iterator[Case]:
    """The cases, interleaved across targets so a slow target does not leave the pool idle at the end. Case ``i``
    of target ``t`` depends only on (seed, t, i)."""
    seeds: dict[str, list[Path]] = {}
    for t in targets:
        d = work / "seeds" / t.name
        d.mkdir(parents=True)
        seeds[t.name] = t.seeds(d)
    longest = max(counts[t.name] for t in targets)
    for i in range(longest):
        for t in targets:
            if i < counts[t.name]:
                rng = random.Random(f"{seed}:{t.name}:{i}")
                d = work / "cases" / t.name
                d.mkdir(parents=True, exist_ok=True)
                label, path, items = t.make(rng, seeds[t.name], d / f"{seed}-{i:05d}")
                yield Case(t.name, path, label, items)


@dataclasses.dataclass
class Stats:
    cases: int = 0
    items: int = 0
    ok: int = 0
    typed: int = 0
    untyped: int = 0
    hang: int = 0
    crash: int = 0
    executed: int = 0
    memory: int = 0
    peak_rss: int = 0
    most_added: int = 0
    slowest: float = 0.0
    seconds: float = 0.0

    def add(self, r: Result) -> None:
        self.cases += 1
        self.items += r.case.items
        setattr(self, r.status, getattr(self, r.status) + 1)
        self.peak_rss = max(self.peak_rss, r.peak_rss)
        self.most_added = max(self.most_added, r.added_rss)
        self.slowest = max(self.slowest, r.seconds)
        self.seconds += r.seconds

    @property
    def bad(self) -> int:
        return sum(getattr(self, s) for s in BAD)


def keep_finding(r: Result) -> Path:
    """Copy a failing case into tests/fuzz/regressions/<target>/ (file or folder), with what it did beside it."""
    dest_dir = REGRESSIONS / r.case.target
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / r.case.path.name
    if r.case.path.is_dir():
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(r.case.path, dest, ignore=shutil.ignore_patterns("prepared"))
    else:
        shutil.copy2(r.case.path, dest)
    (dest_dir / f"{r.case.path.name}.finding.txt").write_text(f"{r.case.label}\n{r.status}: {r.error}\n")
    return dest


def campaign(scale: str = "full", seed: int = 0, targets: list[str] | None = None, workers: int = 2,
             timeout: float = 30.0, keep: bool = False, log=print,
             pool: Pool | None = None) -> tuple[dict[str, Stats], list[Result]]:
    """Run the seeded campaign; returns per-target stats and the failing results (kept as regressions if
    ``keep``). ``pool``: run on these workers (else a pool of ``workers`` with ``timeout``)."""
    chosen = [TARGETS[n] for n in (targets or list(TARGETS))]
    counts = budgets(scale)
    stats = {t.name: Stats() for t in chosen}
    failures: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="vllama-fuzz-") as tmp:
        work = Path(tmp)
        pool = pool or Pool(workers, timeout, work / "worker.log")
        done = 0
        for r in pool.run(make_cases(chosen, counts, seed, work)):
            stats[r.case.target].add(r)
            done += 1
            if r.status in BAD:
                failures.append(r)
                where = keep_finding(r) if keep else r.case.path
                log(f"FINDING {r.case.target} {r.case.label}: {r.status}: {r.error} -> {where}")
            if done % 200 == 0:
                log(f"... {done} cases")
            _cleanup(r.case)
    return stats, failures


def _cleanup(case: Case) -> None:
    # folders of prepared data are the bulk of a campaign's disk use
    if case.path.is_dir():
        shutil.rmtree(case.path, ignore_errors=True)
    else:
        case.path.unlink(missing_ok=True)


def regression_cases() -> list[Case]:
    """Every kept finding (tests/fuzz/regressions/<target>/<case>, beside its .finding.txt)."""
    out = []
    for note in sorted(REGRESSIONS.glob("*/*.finding.txt")):
        path = note.with_name(note.name[: -len(".finding.txt")])
        out.append(Case(note.parent.name, path, note.read_text().splitlines()[0]))
    return out


def replay(cases: list[Case], workers: int = 2, timeout: float = 30.0, pool: Pool | None = None) -> list[Result]:
    """Run kept cases (on copies: prepare writes into its case folder) through ``pool`` (or a new one)."""
    with tempfile.TemporaryDirectory(prefix="vllama-fuzz-replay-") as tmp:
        copies = []
        for c in cases:
            dest = Path(tmp) / c.target / c.path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if c.path.is_dir() else shutil.copy2)(c.path, dest)
            copies.append(Case(c.target, dest, c.label))
        return list((pool or Pool(workers, timeout, Path(tmp) / "worker.log")).run(copies))


def table(stats: dict[str, Stats]) -> str:
    """Markdown: one row per target."""
    head = ("| target | cases | items | results | typed errors | untyped errors | hangs | crashes | ran code "
            "| added over 2 GB | most added | peak RSS | slowest case | mean case |")
    lines = [head, "|" + "---|" * 14]
    for name, s in stats.items():
        mean = s.seconds / s.cases if s.cases else 0.0
        lines.append(f"| {name} | {s.cases} | {s.items} | {s.ok} | {s.typed} | {s.untyped} | {s.hang} | {s.crash} "
                     f"| {s.executed} | {s.memory} | {s.most_added / 2**20:.0f} MB | {s.peak_rss / 2**20:.0f} MB "
                     f"| {s.slowest:.1f} s | {mean:.2f} s |")
    return "\n".join(lines)


__all__ = ["BAD", "Case", "Pool", "Result", "Stats", "budgets", "campaign", "regression_cases", "replay", "table",
           "DATA_FORMATS"]
