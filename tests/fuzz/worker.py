"""A fuzz worker process: runs cases one after another under an address-space limit, one JSON line per case.

Protocol: the worker warms up (imports) and says ``{"ready": true}``; then the campaign writes ``{"target": name, "path": case}`` lines to stdin; the worker answers each on its
original stdout (its own stdout/stderr go to a log file, FFmpeg and friends write there) with
``{"status": "ok"|"typed"|"untyped"|"executed", "error": ..., "peak_rss": bytes, "base_rss": bytes,
"setup_seconds": s}`` (the case's peak resident memory and what the worker held when it began; the time of
the target's once-per-worker ``Target.setup``, the HTTP server, run before the first such case; not the case's). A
case that kills the process or never answers is seen by the campaign as a crash or a hang.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
import traceback
from pathlib import Path


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class CaseMemory:
    """The resident memory of one case: ``base`` when it began and ``peak`` while it ran.

    The peak is the kernel's high-water mark (VmHWM) after resetting it (writing 5 to clear_refs, Linux >= 4.0);
    where the reset is refused or does not take (some sandboxes), the mark would be the worker's lifetime peak,
    so a thread samples the RSS every 2 ms instead (it can miss a spike shorter than that)."""

    def __init__(self) -> None:
        self.base = self.peak = 0
        self._samples: list[int] = []
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def __enter__(self) -> "CaseMemory":
        self.base = _rss()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            reset = _status_kb("VmHWM:") <= _rss() + (16 << 20)
        except OSError:
            reset = False
        if not reset:
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._samples.append(_rss())

    def __exit__(self, *exc: object) -> None:
        if self._sampler is None:
            self.peak = max(_status_kb("VmHWM:"), self.base)
        else:
            self._stop.set()
            self._sampler.join()
            self.peak = max([self.base, _rss(), *self._samples])


def classify(target_name: str, path: Path) -> dict:
    """Run one case in this process; what happened, as the campaign's result record."""
    from tests.fuzz.targets import PROBES, TARGETS
    from vllama_jax.errors import VllamaError

    target = TARGETS[target_name] if target_name in TARGETS else PROBES[target_name]
    canary = path.with_suffix(".pwned")
    result: dict = {"status": "ok"}
    try:
        target.run(path)
    except VllamaError as e:
        result = {"status": "typed", "error": f"{type(e).__name__}: {str(e)[:300]}"}
        if target.names_file and path.name not in str(e):
            result = {"status": "untyped", "error": f"typed error that does not name the file: {str(e)[:300]}"}
        elif "\n" in str(e).strip():
            result = {"status": "untyped", "error": f"typed error of more than one line: {str(e)[:300]!r}"}
    except BaseException as e:  # noqa: BLE001 - anything else breaks the contract, and is what we look for
        tb = traceback.extract_tb(e.__traceback__)[-3:]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(tb))
        result = {"status": "untyped", "error": f"{type(e).__name__}: {str(e)[:300]} at {where}"}
    if canary.exists():
        result = {"status": "executed", "error": f"the file ran code: {canary} was created"}
    return result


def warm_up() -> None:
    """Import and first-use everything the targets call, once per worker, before the first case: torch's first
    ``torch.load`` alone takes 10 s on a loaded 2-core machine, and the time limit is for the case, not for the
    worker's start."""
    import io

    import jax.numpy as jnp
    import orbax.checkpoint  # noqa: F401
    import torch

    import vllama_jax.data.pipeline  # noqa: F401
    import vllama_jax.data.prepare  # noqa: F401
    import vllama_jax.media  # noqa: F401
    import vllama_jax.weights.model_dir  # noqa: F401
    from tests.fuzz.targets import _tokenizers

    buf = io.BytesIO()
    torch.save({"x": torch.zeros(2)}, buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)
    jnp.zeros(2).block_until_ready()
    _tokenizers()


def set_up_target(target_name: str) -> float:
    """Run the target's once-per-worker setup, if it has one; its seconds. A setup that fails is not an answer
    here: the case's own run needs what it makes, and fails there, classified like any case."""
    from tests.fuzz.targets import TARGETS

    target = TARGETS.get(target_name)
    if target is None or target.setup is None:
        return 0.0
    t0 = time.monotonic()
    try:
        target.setup()
    except Exception:  # noqa: BLE001 - see the docstring; the traceback goes to the worker's log
        traceback.print_exc()
    return time.monotonic() - t0


def main() -> None:
    mem_limit = int(sys.argv[1])
    log = sys.argv[2]
    resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import av  # quiet FFmpeg's per-packet complaints: they are expected here and only slow the run

    av.logging.set_level(av.logging.PANIC)
    if sys.argv[3] == "warm":
        warm_up()
    replies.write(json.dumps({"ready": True}) + "\n")
    set_up: set[str] = set()
    for line in sys.stdin:
        case = json.loads(line)
        setup_seconds = 0.0
        if case["target"] not in set_up:
            set_up.add(case["target"])
            setup_seconds = set_up_target(case["target"])
        with CaseMemory() as mem:
            result = classify(case["target"], Path(case["path"]))
        result["peak_rss"], result["base_rss"] = mem.peak, mem.base
        result["setup_seconds"] = setup_seconds
        replies.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
