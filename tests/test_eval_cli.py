"""`vllama-jax eval` end to end on the fixture tiny model: published-format annotations with tiny generated
videos, --limit, summary.json's shape, error rows for missing videos, resumption from a pre-seeded
predictions.jsonl, the same predictions when sharded over 8 simulated devices, and one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.eval_fixtures import WRITERS
from vllama_jax.cli import main
from vllama_jax.weights.model_dir import save_model_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tiny_model, tiny_tok, tmp_path_factory) -> Path:
    cfg, params = tiny_model
    return save_model_dir(tmp_path_factory.mktemp("models") / "tiny", cfg, params, tiny_tok)


def _eval(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run([sys.executable, "-m", "vllama_jax.cli", "eval", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_multiple_choice_end_to_end_resumes_and_shards(model_dir, tmp_path):
    ann, media, _ = WRITERS["mvbench"](tmp_path / "data")
    out = tmp_path / "out"
    common = ["--task", "mvbench", "--annotations", str(ann), "--media-dir", str(media), "--model", str(model_dir),
              "--num-frames", "4", "--batch-size", "2", "--quiet"]
    # pre-seed: the first question already answered by an earlier (interrupted) run
    out.mkdir()
    seeded = {"id": "action_sequence/0", "video": "x", "question": "q", "answer": "Sat down.", "prediction": "B",
              "options": ["Opened the door.", "Sat down.", "Ate food.", "Took a cup."], "answer_index": 1,
              "scores": [-9.0, -1.0, -9.0, -9.0], "choice_loglik": 1, "choice_letter": 1, "correct_letter": True,
              "correct_loglik": True, "correct": True, "category": "Action Sequence"}
    (out / "predictions.jsonl").write_text(json.dumps(seeded) + "\n")
    res = _eval(common + ["--out", str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _rows(out / "predictions.jsonl")
    assert [r["id"] for r in rows] == ["action_sequence/0", "action_sequence/1", "moving_direction/0",
                                       "moving_direction/1"]
    assert rows[0] == seeded  # kept, not asked again
    for r in rows[1:3]:
        assert isinstance(r["prediction"], str) and len(r["scores"]) == len(r["options"])
        assert r["choice_loglik"] == max(range(len(r["scores"])), key=r["scores"].__getitem__)
        assert r["correct"] == r["correct_letter"] and "error" not in r
    assert rows[3]["error"].startswith("UnreadableMediaError") and "prediction" not in rows[3]
    s = json.loads((out / "summary.json").read_text())
    assert (s["task"], s["n"], s["errors"], s["model"]) == ("mvbench", 4, 1, str(model_dir))
    assert set(s["metrics"]) == {"accuracy", "correct_letter", "correct_loglik"}
    assert set(s["per_category"]) == {"Action Sequence", "Moving Direction"} and s["seconds"] > 0
    assert res.stdout.splitlines()[0].startswith("| category | n | correct_letter")  # the Markdown table

    # rerun: nothing left to ask (no model load), same rows
    again = _eval(common + ["--out", str(out)])
    assert again.returncode == 0 and "already answered" in again.stderr
    assert _rows(out / "predictions.jsonl") == rows

    # --limit and 8 simulated devices (batch sharded over data=8): the same scores as on one device
    sharded = _eval(common + ["--out", str(tmp_path / "sharded"), "--limit", "3", "--fake-devices", "8",
                              "--mesh", "data=8"])
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    srows = _rows(tmp_path / "sharded" / "predictions.jsonl")
    assert len(srows) == 3
    for a, b in zip(srows[1:], rows[1:3]):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-3) and a["prediction"] == b["prediction"]


@pytest.mark.slow
def test_open_ended_end_to_end(model_dir, tmp_path):
    ann, media, _ = WRITERS["activitynet_qa"](tmp_path / "data")
    out = tmp_path / "out"
    res = _eval(["--task", "activitynet_qa", "--annotations", str(ann / "test_q.json"), "--media-dir", str(media),
                 "--model", str(model_dir), "--num-frames", "2", "--max-new-tokens", "4", "--limit", "3",
                 "--out", str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _rows(out / "predictions.jsonl")
    assert [r["id"] for r in rows] == ["vidA_0", "vidA_1", "vidB_0"]
    assert all(isinstance(r["prediction"], str) and isinstance(r["contains"], bool) for r in rows)
    s = json.loads((out / "summary.json").read_text())
    assert s["n"] == 3 and s["errors"] == 0 and s["accuracy_of"] == "contains"
    assert set(s["metrics"]) == {"accuracy", "exact_match", "contains"}
    assert "question/s" in res.stderr or "100%" in res.stderr  # the progress bar ran (with its rate and ETA)


def test_eval_errors_are_one_line(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VLLAMA_JAX_CACHE_DIR", "off")
    ann, media, _ = WRITERS["egoschema"](tmp_path / "data")
    base = ["eval", "--task", "egoschema", "--annotations", str(ann), "--media-dir", str(media), "--out",
            str(tmp_path / "o")]
    (tmp_path / "afile").write_text("x")
    cases = [
        (base + ["--batch-size", "0"], 2, "--batch-size must be >= 1"),
        (base + ["--limit", "0"], 2, "--limit must be >= 1"),
        (base + ["--judge-url", "http://127.0.0.1:1/v1"], 2, "multiple choice"),
        (["eval", "--task", "egoschema", "--annotations", str(ann), "--media-dir", str(tmp_path / "none"),
          "--out", str(tmp_path / "o")], 1, "no such folder"),
        (["eval", "--task", "egoschema", "--annotations", str(ann), "--media-dir", str(media),
          "--out", str(tmp_path / "afile")], 2, "is a file"),
        (["eval", "--task", "msvd_qa", "--annotations", str(ann), "--media-dir", str(media),
          "--out", str(tmp_path / "o")], 1, "test_q.json"),
    ]
    for argv, status, needle in cases:
        assert main(argv) == status, argv
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len([e for e in err if e.startswith("error:")]) == 1 and needle in err[-1], err
