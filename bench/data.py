"""Input-pipeline throughput: read + decode + preprocess of 8-frame 224x224 video samples.

    python bench/data.py [--n 64] [--batches 16] [--batch-size 8] [--workers 1,2] [--json PATH]

Generates a small WebVid-format dataset (N videos, 320x240, 3 s at 30 fps, MPEG-4) and prepares it under
``--root`` (kept between runs), then measures samples/s of

* ``loop``: a plain single-process Python loop doing the same per-sample work (read record, decode 8 frames with
  headtail sampling, alpro_video_train transform, caption tokenization) and collation, no grain;
* ``grain, 0 workers``: the grain pipeline building batches in the calling process;
* ``grain, W workers``: the same pipeline with ``mp_prefetch`` worker processes.

Worker start-up (spawn + imports) and the first ``--warmup`` batches are reported separately and excluded from
the steady-state rate: the workers make their reused batch memory (``data/transport.py``) during those. The
ratios the pipeline is held to follow the table (2 workers against 1 and against the loop; a worker's CPU per
sample against the in-process pipeline's), with grain's own hand-over (a fresh shared-memory block per batch)
beside ours, and the shared-memory blocks the workers' batches used that are still in /dev/shm after the iterator
is closed (0: nothing leaked).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vllama_jax.data import DatasetSpec, PipelineConfig, build_train_iterator, synthetic  # noqa: E402
from vllama_jax.data.pipeline import PreparedDataset, _Collate, _ExampleLoader, _Source  # noqa: E402
from vllama_jax.data import text_io  # noqa: E402
from vllama_jax.media.image import bicubic_resize  # noqa: E402


def default_tokenizer() -> str:
    return str(REPO / "tests" / "fixtures" / "tiny_vl" / "llama")


def ensure_dataset(root: Path, n: int) -> Path:
    out = root / "prepared"
    if (out / "manifest.json").is_file():
        return out
    t = time.perf_counter()
    synthetic.make_prepared("webvid", root, n, make={"video": {"num_frames": 90, "width": 320, "height": 240,
                                                               "fps": 30}})
    print(f"generated + prepared {n} videos (320x240, 3 s) in {time.perf_counter() - t:.1f} s -> {out}")
    return out


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its live child processes (the grain workers), from /proc.

    Reported per sample next to the wall-clock rate, because on a shared machine the rate depends on what else
    runs while the CPU cost does not."""
    tick = os.sysconf("SC_CLK_TCK")
    total = sum(os.times()[:2])
    try:
        kids = set()
        for task in Path("/proc/self/task").iterdir():
            kids.update((task / "children").read_text().split())
        for pid in kids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    except OSError:
        pass
    return total


def bench_loop(path: Path, cfg: PipelineConfig, batches: int, warmup: int) -> tuple[float, float, float]:
    """The same per-sample work as the pipeline, in a plain loop (sequential record order)."""
    pd = PreparedDataset.open(path)
    src = _Source(key=0, name=pd.name, kind=pd.kind, media_type=pd.media_type, files=pd.files, host_start=0,
                  host_step=1, n_host=pd.num_records, sampling=pd.defaults["sampling"],
                  text_processor=pd.defaults["text_processor"], video_message=True)
    load, collate = _ExampleLoader(src, cfg), _Collate(pd.kind, pd.name, text_io.TextProcessor(cfg))
    B = cfg.batch_size
    t0 = time.perf_counter()
    for b in range(warmup):  # opens shards, loads the tokenizer
        collate([load(p, p % src.n_host) for p in range(b * B, (b + 1) * B)])
    start = time.perf_counter() - t0
    t, c = time.perf_counter(), cpu_seconds()
    for b in range(warmup, warmup + batches):
        collate([load(p, p % src.n_host) for p in range(b * B, (b + 1) * B)])
    return start, batches * B / (time.perf_counter() - t), (cpu_seconds() - c) / (batches * B)


def shm_blocks() -> set[str]:
    """The POSIX shared-memory blocks in /dev/shm that Python's multiprocessing made (grain's batches)."""
    return {p.name for p in Path("/dev/shm").glob("psm_*")}


def bench_grain(path: Path, cfg: PipelineConfig, batches: int, warmup: int) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    it = build_train_iterator([DatasetSpec(str(path))], cfg)
    for _ in range(warmup):  # start-up: worker spawn, imports, first batches
        next(it)
    start = time.perf_counter() - t0
    t, c = time.perf_counter(), cpu_seconds()
    for _ in range(batches):
        b = next(it)
    rate = batches * cfg.batch_size / (time.perf_counter() - t)
    cpu = (cpu_seconds() - c) / (batches * cfg.batch_size)  # includes work prefetched beyond the last batch
    assert b["frames"].shape == (cfg.batch_size, 8, 224, 224, 3) and b["frames"].dtype == np.uint8
    del b
    it.close()
    return start, rate, cpu


def _resize_work(seconds: float) -> float:
    """Resizes of 8-frame 240x320 crops to 224x224 (the heaviest step of a sample) for ``seconds``; per second."""
    x = np.random.default_rng(0).integers(0, 256, (8, 240, 320, 3)).astype(np.float32)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        bicubic_resize(x, 224, 224)
        n += 1
    return n / (time.perf_counter() - t)


def machine_scaling(seconds: float = 4.0) -> float:
    """How much two processes get done against one, on this machine, for the pipeline's own memory-bound kernel:
    the ceiling the 2-worker figure can reach here (2.0 on cores with memory bandwidth to spare)."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as p:
        one = p.apply(_resize_work, (seconds,))
    with ctx.Pool(2) as p:
        two = sum(p.map(_resize_work, [seconds, seconds]))
    return two / one


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="/tmp/vllama_bench_data")
    p.add_argument("--n", type=int, default=64, help="videos in the generated dataset")
    p.add_argument("--batches", type=int, default=16, help="timed batches per configuration")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--warmup", type=int, default=12, help="batches taken before the clock starts")
    p.add_argument("--workers", default="1,2", help="comma-separated worker-process counts")
    p.add_argument("--tokenizer", default=default_tokenizer())
    p.add_argument("--json", help="write the figures here")
    a = p.parse_args()

    path = ensure_dataset(Path(a.root), a.n)
    load0 = f"{os.getloadavg()[0]:.1f}"
    cfg = PipelineConfig(tokenizer=a.tokenizer, batch_size=a.batch_size, num_frames=8, image_size=224, train=True,
                         seed=0, process_index=0, process_count=1)
    shm_before = shm_blocks()
    rows = [("loop (1 process, no grain)", *bench_loop(path, cfg, a.batches, a.warmup))]
    rates, cpus = {}, {}
    workers = [0] + [int(x) for x in a.workers.split(",") if x.strip()]
    for w in workers:
        label = "grain, in-process (0 workers)" if w == 0 else f"grain, {w} worker process{'es' if w > 1 else ''}"
        rows.append((label, *bench_grain(path, dataclasses.replace(cfg, num_workers=w), a.batches, a.warmup)))
        rates[w], cpus[w] = rows[-1][2], rows[-1][3]
    if max(workers) > 0:  # grain's own hand-over beside ours: a fresh shared-memory block per batch
        w = max(workers)
        rows.append((f"grain, {w} worker processes, fresh shared memory per batch (reuse_worker_memory=False)",
                     *bench_grain(path, dataclasses.replace(cfg, num_workers=w, reuse_worker_memory=False),
                                  a.batches, a.warmup)))
        rates["fresh"] = rows[-1][2]
    gc.collect()
    left = len(shm_blocks() - shm_before)
    ceiling = machine_scaling()

    print(f"\n{os.cpu_count()} CPU cores (load average before/after: {load0} / {os.getloadavg()[0]:.1f}); "
          f"batch {a.batch_size}; {a.batches} timed batches; 8 frames 224x224 (headtail + alpro_video_train), "
          "caption tokenized\n")
    print(f"| configuration | samples/s | CPU ms / sample | start-up + first {a.warmup} batches (s) |")
    print("|---|---:|---:|---:|")
    for label, start, rate, cpu in rows:
        print(f"| {label} | {rate:.1f} | {1000 * cpu:.0f} | {start:.1f} |")
    ratios = {}
    if 1 in rates and 2 in rates:
        ratios = {"2 workers / 1 worker": rates[2] / rates[1], "2 workers / loop": rates[2] / rows[0][2],
                  "worker CPU per sample / in-process": cpus[1] / cpus[0]}
    if "fresh" in rates:
        ratios["reused / fresh worker memory"] = rates[max(workers)] / rates["fresh"]
    ratios["machine: 2 processes / 1 (the resize kernel alone)"] = ceiling
    print("\n" + "; ".join(f"{k}: {v:.2f}x" for k, v in ratios.items())
          + f"; shared-memory blocks left after close: {left}")
    if a.json:
        Path(a.json).write_text(json.dumps({
            "load_average": [float(load0), os.getloadavg()[0]], "cpus": os.cpu_count(), "batch_size": a.batch_size,
            "rows": [{"configuration": r[0], "startup_s": r[1], "samples_per_s": r[2], "cpu_ms_per_sample": 1000 * r[3]}
                     for r in rows], "ratios": ratios, "shm_blocks_left": left}, indent=1))


if __name__ == "__main__":
    main()
