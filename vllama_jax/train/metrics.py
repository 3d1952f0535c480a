"""Training metrics: TensorBoard event files (tensorboardX), a CSV file and a console progress line.

MFU = (FLOPs of one step per device) / (step time x peak FLOP/s per device). The FLOPs come from XLA's cost analysis
of the compiled step (what the device really executes: frozen forward passes, the backward through the LLM,
rematerialised recomputation included); the peak is `log.peak_tflops` from the config, or measured once with a
large matmul when not given (then "MFU" is relative to the best this backend achieves on a matmul).
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Any, Mapping, TextIO


CSV_FIELDS = ("step", "loss", "lr", "grad_norm", "num_tokens", "step_time_s", "samples_per_s", "tokens_per_s",
              "mfu", "dataset")


def compiled_flops(compiled: Any) -> float:
    """FLOPs per device of a compiled executable (XLA cost analysis); 0 if the backend does not report them."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - backends without cost analysis
        return 0.0
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


class MetricsLogger:
    """Writes one row per logged step to `{log_dir}/metrics.csv` and TensorBoard, prints a progress line. Only the
    process with `enabled=True` (process 0) writes anything."""

    def __init__(self, log_dir: str | Path, *, total_steps: int, enabled: bool = True, stream: TextIO | None = None):
        self.enabled = enabled
        self.total_steps = total_steps
        self.stream = stream or sys.stdout
        self._tb = None
        self._csv_file = None
        if not enabled:
            return
        self.log_dir = log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        path = log_dir / "metrics.csv"
        new = not path.exists() or path.stat().st_size == 0
        self._csv_file = open(path, "a", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            self._csv.writeheader()
        from tensorboardX import SummaryWriter  # lazy: 1.6 s of imports (protobuf), for process 0's logs only

        self._tb = SummaryWriter(str(log_dir))

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **values}
        self._csv.writerow(row)
        self._csv_file.flush()
        for k, v in values.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self._tb.add_scalar(f"train/{k}", v, step)
        self._tb.flush()
        print(self.format_line(step, values), file=self.stream, flush=True)

    def log_eval(self, step: int, task: str, metrics: Mapping[str, float], errors: int, n: int) -> None:
        """A benchmark's metrics at `step`: `{log_dir}/eval.csv` (step, task, metric, value), TensorBoard
        `eval/<task>/<metric>`, and one line."""
        if not self.enabled:
            return
        path = self.log_dir / "eval.csv"
        new = not path.exists() or path.stat().st_size == 0
        with open(path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["step", "task", "metric", "value"])
            for k, v in metrics.items():
                w.writerow([step, task, k, v])
                self._tb.add_scalar(f"eval/{task}/{k}", v, step)
        self._tb.flush()
        shown = ", ".join(f"{k} {100 * v:.1f}%" if k != "judge_score" else f"{k} {v:.2f}" for k, v in metrics.items())
        print(f"step {step}/{self.total_steps} | eval {task}: {shown} ({n} questions, {errors} errors)",
              file=self.stream, flush=True)

    def format_line(self, step: int, v: Mapping[str, Any]) -> str:
        parts = [f"step {step}/{self.total_steps}", f"loss {v['loss']:.4f}", f"lr {v['lr']:.3e}",
                 f"gnorm {v['grad_norm']:.3f}", f"{v['samples_per_s']:.2f} samples/s",
                 f"{v['tokens_per_s']:.0f} tok/s", f"{v['step_time_s']:.3f} s/step"]
        if v.get("mfu"):
            parts.append(f"mfu {100 * v['mfu']:.1f}%")
        if v.get("dataset"):
            parts.append(str(v["dataset"]))
        return " | ".join(parts)

    def text(self, line: str) -> None:
        if self.enabled:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._csv_file is not None:
            self._csv_file.close()
