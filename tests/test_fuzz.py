"""The fuzz harness in CI: a small seeded campaign over every target (tests/fuzz/), and a replay of every finding
ever kept (tests/fuzz/regressions/). ``make fuzz`` runs the full campaign."""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pytest

from tests.fuzz import worker
from tests.fuzz.campaign import BAD, Case, Pool, budgets, campaign, regression_cases, replay, table
from tests.fuzz.mutate import MUTATORS, mp4_boxes, mutate, riff_chunks
from tests.fuzz.targets import TARGETS

# Every case that raised an untyped error, hung or crashed before its fix (findings are never deleted).
REGRESSIONS = regression_cases()


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Two warmed-up workers shared by the campaign and the replay (starting them is the costly part)."""
    with Pool(2, timeout=30.0, log=tmp_path_factory.mktemp("fuzz") / "worker.log") as p:
        yield p


@pytest.mark.slow
def test_seeded_campaign_keeps_the_error_contract(pool):
    """~50 cases (rows, strings) per target from a fixed seed: no untyped error, hang, crash, executed code, or
    case over 2 GB; and the cases really ran (a broken seed or call would make a whole group end one way)."""
    stats, failures = campaign("ci", seed=0, log=print, pool=pool)
    print(table(stats))
    assert not failures, "\n".join(f"{r.case.target} {r.case.path.name} {r.case.label}: {r.status}: {r.error}"
                                   for r in failures)
    for name, count in budgets("ci").items():
        assert stats[name].cases == count and stats[name].bad == 0
    for group in ("media", "weights", "data", "serve"):
        ok = sum(s.ok for n, s in stats.items() if TARGETS[n].group == group)
        typed = sum(s.typed for n, s in stats.items() if TARGETS[n].group == group)
        assert ok > 0 and typed > 0, f"{group}: {ok} results, {typed} typed errors"


@pytest.mark.slow
@pytest.mark.skipif(not REGRESSIONS, reason="no finding kept yet")
def test_every_kept_finding_is_now_a_typed_error_or_a_result(pool):
    results = replay(REGRESSIONS, pool=pool)
    assert len(results) == len(REGRESSIONS)
    bad = [f"{r.case.target}/{r.case.path.name} ({r.case.label}): {r.status}: {r.error}"
           for r in results if r.status in BAD]
    assert not bad, "\n".join(bad)


def test_regressions_cover_the_first_findings():
    """The findings of issue 17 are kept: an untyped error from PyAV's decoder set-up, from torch's unpickler,
    from a damaged weight index, from a damaged ArrayRecord chunk, and a multi-line typed error."""
    kept = {c.target for c in REGRESSIONS}
    assert {"media_video", "weights_pth_zip", "weights_sharded", "data_records", "weights_model_dir"} <= kept
    for c in REGRESSIONS:
        assert c.target in TARGETS and c.path.exists(), c.path


def test_request_bodies_are_seeded_and_reach_every_part_of_the_request(tmp_path: Path):
    """The serve target's cases: the same (seed, case) gives the same bytes; the mutations touch the settings,
    the messages, the media (data:, file:// and base64) and the bytes, and most bodies still parse as JSON."""
    target = TARGETS["serve_requests"]
    (tmp_path / "seeds").mkdir()
    seeds = target.seeds(tmp_path / "seeds")
    for s in seeds:
        assert isinstance(json.loads(s.read_text())["messages"], list), s
    labels, parsed = [], 0
    for i in range(120):
        label, path, _ = target.make(random.Random(f"0:{i}"), seeds, tmp_path / f"a{i}")
        _, again, _ = target.make(random.Random(f"0:{i}"), seeds, tmp_path / f"b{i}")
        assert path.read_bytes() == again.read_bytes(), label
        labels.append(label)
        try:
            json.loads(path.read_bytes())
            parsed += 1
        except (ValueError, RecursionError):
            pass
    for family in ("fields:", "messages:", "media:file_url", "media:data_url", "media:media_bytes", "bytes:"):
        assert any(family in lab for lab in labels), family
    assert 60 < parsed < 120


def test_mutations_are_seeded_and_change_the_file():
    data = bytes(range(256)) * 40
    for name, fn in MUTATORS.items():
        a = fn(random.Random(5), data, 64)
        assert a == fn(random.Random(5), data, 64), name
    outs = {mutate(random.Random(i), data, 64)[1] for i in range(50)}
    assert len(outs) > 40 and data not in outs


def test_container_structure_is_found(tmp_path: Path):
    from tests.media_helpers import make_audio, make_video

    mp4 = make_video(tmp_path / "a.mp4", n_frames=3).read_bytes()
    boxes = mp4_boxes(mp4)
    assert [mp4[a + 4:a + 8] for a, _ in boxes][:1] == [b"ftyp"] and boxes[-1][1] == len(mp4)
    wav = make_audio(tmp_path / "a.wav", seconds=0.1).read_bytes()
    assert [wav[a:a + 4] for a, _ in riff_chunks(wav)][0] == b"fmt "


def test_pool_attributes_hangs_crashes_and_memory_and_goes_on(tmp_path: Path):
    """A case that never answers is killed after the time limit and counted as a hang, a case that kills its
    worker as a crash, an allocation past RLIMIT_AS fails inside the case; the pool replaces dead workers and
    runs the next case."""
    cases = []
    for action in ("sleep", "abort", "alloc", "fine"):
        p = tmp_path / f"{action}.json"
        p.write_text(f'"{action}"')
        cases.append(Case("probe", p))
    results = {r.case.path.stem: r for r in Pool(1, timeout=5.0, log=tmp_path / "log", warm=False).run(cases)}
    assert results["sleep"].status == "hang"
    assert results["abort"].status == "crash"
    assert results["alloc"].status == "untyped" and "MemoryError" in results["alloc"].error
    assert results["fine"].status == "ok" and results["fine"].peak_rss > 0


@pytest.mark.parametrize("reset", [True, False], ids=["high-water-mark", "sampled"])
def test_a_case_is_charged_only_the_memory_it_adds(monkeypatch, reset: bool):
    """The memory limit is on what a case adds: a worker that already holds a server (or once held a large
    buffer) does not charge it to the next case, whether the kernel's high-water mark can be reset or not (then
    the RSS is sampled)."""
    if not reset:
        monkeypatch.setattr(worker, "_status_kb", lambda field: 1 << 50)  # a mark that no reset brings down
    before = np.ones(300 << 20, np.uint8)  # held before the case: not its cost
    with worker.CaseMemory() as idle:
        time.sleep(0.05)
    del before
    with worker.CaseMemory() as busy:
        held = np.ones(200 << 20, np.uint8)
        time.sleep(0.05)
        del held
    assert idle.base >= 300 << 20 and idle.peak - idle.base < 64 << 20
    assert busy.peak - busy.base >= 190 << 20
