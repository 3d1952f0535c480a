"""The one command line: `vllama-jax --help` lists every subcommand, and each subcommand given a bad path exits
non-zero with exactly one `error:` line naming the path (no traceback)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vllama_jax.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ("convert", "export", "prepare", "encode", "train", "chat", "describe", "eval", "serve", "demo")


def test_help_lists_every_subcommand():
    res = subprocess.run([sys.executable, "-m", "vllama_jax.cli", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    for name in SUBCOMMANDS:
        assert f"    {name} " in res.stdout, res.stdout
    registered = set(build_parser()._subparsers._group_actions[0].choices)  # noqa: SLF001 - argparse's registry
    assert registered == set(SUBCOMMANDS) and len(COMMANDS) == 8


def _bad_path_cases(tmp: Path) -> list[tuple[list[str], int, str]]:
    missing = tmp / "missing"
    a_file = tmp / "a_file"
    a_file.write_text("not a folder")
    return [
        (["convert", str(missing), "--out", str(tmp / "out")], 1, str(missing)),
        (["export", "--model", str(missing), "--out", str(tmp / "x.pth")], 1, str(missing)),
        (["prepare", "webvid", "--source", str(missing), "--out", str(tmp / "p")], 2, str(missing)),
        (["encode", str(missing), "--model", str(tmp)], 2, str(missing)),
        (["train", "--config", str(missing / "train.yaml")], 2, "train.yaml"),
        (["chat", "--model", str(missing)], 1, str(missing)),
        (["describe", "--videos", str(missing), "--prompt", "x", "--out", str(tmp / "o.jsonl")], 1, str(missing)),
        (["eval", "--task", "mvbench", "--annotations", str(missing), "--media-dir", str(tmp), "--out",
          str(tmp / "e")], 1, str(missing)),
        (["serve", "--model", str(missing)], 1, str(missing)),
        (["demo", "--out", str(a_file)], 1, str(a_file)),
    ]


@pytest.mark.parametrize("index", range(len(SUBCOMMANDS)), ids=SUBCOMMANDS)
def test_bad_path_is_one_error_line(index, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VLLAMA_JAX_CACHE_DIR", "off")  # in-process: leave this session's JAX settings alone
    argv, status, needle = _bad_path_cases(tmp_path)[index]
    assert argv[0] == SUBCOMMANDS[index]
    assert main(argv) == status
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert "Traceback" not in "\n".join(err)
    assert len([line for line in err if line.startswith("error:")]) == 1 and err[-1].startswith("error:"), err
    assert needle in err[-1], err
