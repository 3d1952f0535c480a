"""`vllama-jax chat` / `describe` end to end: the embedded default driven through stdin, `--question` mode,
resumable batch description, and one-line errors (never a traceback) for bad input."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vllama_jax.cli import main
from vllama_jax.weights.model_dir import save_model_dir

ROOT = Path(__file__).resolve().parents[1]
FUZZ_REGRESSIONS = ROOT / "tests" / "fuzz" / "regressions"


def _env(devices: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
    return env


def _cli() -> list[str]:
    """The installed console script if there is one (else `python -m vllama_jax.cli`)."""
    script = Path(sys.executable).parent / "vllama-jax"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "vllama_jax.cli"]


def _run(args: list[str], stdin: str | None = None, timeout: int = 300, cmd: list[str] | None = None):
    return subprocess.run((cmd or _cli()) + args, input=stdin, capture_output=True, text=True, cwd=ROOT,
                          env=_env(), timeout=timeout)


@pytest.fixture(scope="module")
def model_dir(tiny_model, tiny_tok, tmp_path_factory) -> Path:
    """The fixture tiny model as a converted model directory (fast to load and to run)."""
    cfg, params = tiny_model
    return save_model_dir(tmp_path_factory.mktemp("models") / "tiny", cfg, params, tiny_tok)


def _assert_clean_failure(rc: int, err: str, code: int, *needles: str) -> None:
    assert rc == code, err
    assert "Traceback" not in err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert "error:" in last
    for n in needles:
        assert n in last, last


# ------------------------------------------------------------------------------------------------------------
# chat


@pytest.mark.slow
def test_interactive_chat_on_the_embedded_default(media_dir, smollm2_path):
    """stdin: a question, a follow-up, /exit -> two streamed answers, the untrained notice, status 0."""
    video = media_dir / "dog_barking.mp4"
    res = _run(["chat", "--video", str(video), "--greedy", "--max-new-tokens", "8"],
               stdin="What is the dog doing?\nIs it indoors?\n/exit\n",
               cmd=[sys.executable, "-m", "vllama_jax.cli"])
    assert res.returncode == 0, res.stderr[-3000:]
    answers = [line for line in res.stdout.splitlines() if line.startswith("Assistant: ")]
    assert len(answers) == 2, res.stdout
    assert all(len(a) > len("Assistant: ") for a in answers)
    assert "UNTRAINED" in res.stderr and "SmolLM2" in res.stderr
    assert "uploaded" in res.stderr and "video + audio" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_question_mode_answers_once(model_dir, media_dir):
    res = _run(["chat", "--model", str(model_dir), "--video", str(media_dir / "dog_barking.mp4"),
                "--question", "What is happening?", "--greedy", "--max-new-tokens", "6"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(res.stdout.splitlines()) == 1 and res.stdout.strip()
    assert "UNTRAINED" not in res.stderr  # a given model gets no embedded-model notice


# ------------------------------------------------------------------------------------------------------------
# describe


@pytest.mark.slow
def test_describe_folder_with_bad_files_is_resumable(model_dir, media_dir, tmp_path):
    videos = tmp_path / "videos"
    (videos / "sub").mkdir(parents=True)
    shutil.copy(media_dir / "dog_barking.mp4", videos / "dog.mp4")
    shutil.copy(media_dir / "boat.mp4", videos / "sub" / "boat.mp4")
    (videos / "empty.mp4").write_bytes(b"")
    (videos / "notes.mp4").write_text("not a video at all\n")
    # fuzz findings: bytes flipped inside the streams (the first made PyAV's decoder set-up raise AttributeError)
    shutil.copy(FUZZ_REGRESSIONS / "media_video" / "0-00017.mkv", videos / "flipped.mkv")
    dog = (media_dir / "dog_barking.mp4").read_bytes()
    (videos / "inverted.mp4").write_bytes(dog[:32] + bytes(b ^ 0xFF for b in dog[32:]))
    (videos / "readme.txt").write_text("ignored: not a video extension\n")
    out = tmp_path / "out" / "results.jsonl"
    args = ["describe", "--model", str(model_dir), "--videos", str(videos), "--prompt", "Describe the video.",
            "--out", str(out), "--batch-size", "2", "--greedy", "--max-new-tokens", "5"]
    res = _run(args)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by_name = {Path(r["video"]).name: r for r in rows}
    assert sorted(by_name) == ["boat.mp4", "dog.mp4", "empty.mp4", "flipped.mkv", "inverted.mp4", "notes.mp4"]
    for name in ("dog.mp4", "boat.mp4"):
        assert isinstance(by_name[name]["answer"], str) and "error" not in by_name[name]
        assert by_name[name]["prompt"] == "Describe the video." and by_name[name]["audio"] is True
        assert by_name[name]["model"] == str(model_dir)
    assert "empty" in by_name["empty.mp4"]["error"] and "answer" not in by_name["empty.mp4"]
    for name in ("notes.mp4", "flipped.mkv", "inverted.mp4"):
        assert by_name[name]["error"].startswith("UnreadableMediaError") and "answer" not in by_name[name]
    assert "2 answered, 4 error rows" in res.stderr

    before = out.read_text()
    again = _run(args)  # same --out: every video already has a row
    assert again.returncode == 0, again.stderr[-3000:]
    assert out.read_text() == before
    assert "6 skipped" in again.stderr


# ------------------------------------------------------------------------------------------------------------
# errors: one line on stderr, non-zero status, no traceback (in-process: fast)


def test_errors_are_one_line(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VLLAMA_JAX_CACHE_DIR", "off")  # in-process: leave this session's JAX settings alone
    bad_video = tmp_path / "bad.mp4"
    bad_video.write_text("this is text")
    cases = [
        (["chat", "--model", str(tmp_path / "nope")], 1, "model directory not found"),
        (["chat", "--model", str(tmp_path)], 1, "not a vllama-jax model directory"),
        (["chat", "--model", str(model_dir), "--video", str(tmp_path / "missing.mp4")], 1, "no such file"),
        (["chat", "--model", str(model_dir), "--video", str(bad_video), "-q", "hi"], 1, "UnreadableMediaError"),
        (["chat", "--model", str(model_dir), "--mesh", "data=3"], 2, "--mesh"),
        (["chat", "--model", str(model_dir), "--mesh", "rows=2"], 2, "unknown axis"),
        (["chat", "--model", str(model_dir), "--top-p", "0"], 2, "top_p"),
        (["describe", "--videos", str(tmp_path / "none"), "--prompt", "x", "--out", str(tmp_path / "o.jsonl")],
         1, "no such file or folder"),
        (["describe", "--videos", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "o.jsonl"),
          "--batch-size", "0"], 2, "--batch-size"),
        (["describe", "--videos", str(model_dir), "--prompt", "x", "--out", str(tmp_path / "o.jsonl")],
         2, "no video files"),
    ]
    for argv, code, needle in cases:
        rc = main(argv)
        _assert_clean_failure(rc, capsys.readouterr().err, code, needle)
    assert main([]) == 2  # no subcommand: help


def test_help_and_module_entry_point():
    res = subprocess.run([sys.executable, "-m", "vllama_jax.cli", "describe", "--help"], capture_output=True,
                         text=True, cwd=ROOT, env=_env(), timeout=60)
    assert res.returncode == 0 and "--batch-size" in res.stdout and "--mesh" in res.stdout
