"""The trainer's eval hook (`eval.*` config keys): a benchmark on held-out annotations every N steps, on the
parameters being trained, logged to eval.csv / TensorBoard; and its config checks."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.eval_fixtures import WRITERS
from tests.test_train_support import tiny_config
from vllama_jax.config import ConfigError
from vllama_jax.train import loop
from vllama_jax.train.loop import Trainer


def test_eval_config_is_checked(tiny_dir: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="eval.task"):
        tiny_config(tiny_dir, tmp_path, eval={"every": 2, "task": "msvd", "annotations": "a", "media_dir": "m"})
    with pytest.raises(ConfigError, match="eval.annotations"):
        tiny_config(tiny_dir, tmp_path, eval={"every": 2, "task": "mvbench", "media_dir": "m"})
    with pytest.raises(ConfigError, match="eval.batch_size"):
        tiny_config(tiny_dir, tmp_path, eval={"batch_size": 0})
    assert tiny_config(tiny_dir, tmp_path).eval.every == 0  # off by default


@pytest.mark.slow
def test_eval_every_n_steps_on_the_trained_parameters(tiny_dir: Path, tmp_path: Path, monkeypatch):
    built = []

    class CountingChat(loop.VideoLLaMAChat):
        def __init__(self, *a, **kw):
            built.append(1)
            super().__init__(*a, **kw)

    monkeypatch.setattr(loop, "VideoLLaMAChat", CountingChat)
    ann, media, _ = WRITERS["mvbench"](tmp_path / "heldout")
    cfg = tiny_config(tiny_dir, tmp_path / "run", max_steps=4, checkpoint={"every": 100},
                      optim={"init_lr": 3e-2, "warmup_steps": 1, "iters_per_epoch": 4, "max_epoch": 1},
                      eval={"task": "mvbench", "annotations": str(ann), "media_dir": str(media), "every": 2,
                            "limit": 3, "batch_size": 2, "num_frames": 2})
    t = Trainer(cfg)
    try:
        t.run()
    finally:
        t.close()
    assert [e["step"] for e in t.eval_history] == [2, 4]
    for e in t.eval_history:
        assert e["task"] == "mvbench" and e["n"] == 3 and e["errors"] == 0
        assert 0.0 <= e["metrics"]["accuracy"] <= 1.0 and e["model"].endswith(f"step {e['step']}")
    rows = {s: [json.loads(x) for x in (tmp_path / "run" / "eval" / f"step_{s}" / "predictions.jsonl")
                .read_text().splitlines()] for s in (2, 4)}
    # the hook sees the parameters as trained so far: the options' likelihoods moved between the two evals ...
    assert rows[2][0]["scores"] != pytest.approx(rows[4][0]["scores"], abs=1e-5)
    # ... through the programs compiled for the first eval (the chat's parameters are swapped, not rebuilt)
    # (one encoder program per batch bucket: the 3 questions run as batches of 2 and 1 distinct clip-and-window
    # uploads; a rebuilt chat or a recompiling swap would double that)
    assert len(built) == 1 and t._eval_chat._encode_fns["video"]._cache_size() == 2  # noqa: SLF001
    with open(tmp_path / "run" / "logs" / "eval.csv") as f:
        logged = list(csv.DictReader(f))
    assert {(r["step"], r["metric"]) for r in logged} >= {("2", "accuracy"), ("4", "correct_loglik")}
    assert len((tmp_path / "run" / "logs" / "metrics.csv").read_text().splitlines()) == 5  # header + 4 steps
