"""README.md's "Features" and "Faithfulness" sections name, for each claim, the test that pins it
(`test_file.py::test_name`). Every test named there must exist, and every test written to pin a README claim
(tests/test_claims_*.py, tests/test_data_formats_published.py) must be named there."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PINNING = ("test_claims_model.py", "test_claims_train.py", "test_data_formats_published.py")


def _sections() -> str:
    text = (ROOT / "README.md").read_text()
    start, end = text.index("\n## Features\n"), text.index("\n## Performance\n")
    return text[start:end]


def _tests_in(file: Path) -> set[str]:
    tree = ast.parse(file.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_every_test_the_readme_cites_exists():
    refs = re.findall(r"`(test_\w+\.py)::(test_\w+)`", _sections())
    assert len(refs) > 100, len(refs)
    missing = [f"{f}::{n}" for f, n in sorted(set(refs))
               if not (ROOT / "tests" / f).is_file() or n not in _tests_in(ROOT / "tests" / f)]
    assert not missing, f"README.md names tests that do not exist: {missing}"


def test_every_claim_pinning_test_is_cited():
    cited = set(re.findall(r"`(test_\w+\.py::test_\w+)`", _sections()))
    # (the published-format file's pipeline-level checks back the per-format tests, which are the ones cited)
    optional = {"test_webvid_caption_reaches_the_batch_as_blip_caption",
                "test_llava_image_token_after_the_question_becomes_the_image_block_in_place",
                "test_webdataset_storage_brace_list_as_in_the_upstream_config"}
    uncited = [f"{f}::{n}" for f in PINNING for n in sorted(_tests_in(ROOT / "tests" / f) - optional)
               if f"{f}::{n}" not in cited]
    assert not uncited, f"tests written for a README claim that the README does not name: {uncited}"
