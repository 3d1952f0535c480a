"""prepare: every upstream format -> ArrayRecord shards via TFDS (no TensorFlow), resumable, bad entries counted."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vllama_jax.data import DataError, read_records, synthetic
from vllama_jax.cli import main as cli_main
from vllama_jax.data.prepare import prepare
from vllama_jax.data.records import Turn

ALL = ["webvid", "cc_sbu_align", "llava_cc3m", "cc_sbu", "laion", "llava_instruct", "webvid_instruct", "jsonl"]
TINY_VIDEO = {"num_frames": 10, "width": 64, "height": 64}


@pytest.mark.parametrize("dataset", ALL)
def test_prepare_and_read_back_every_format(tmp_path: Path, dataset: str):
    src, summary = synthetic.make_prepared(dataset, tmp_path, 5, make={"video": TINY_VIDEO}, records_per_part=2)
    assert (summary.total, summary.written, summary.bad, summary.parts) == (5, 5, 0, 3)
    out = tmp_path / "prepared"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_records"] == 5
    # every part is an ordinary TFDS dataset directory
    part = out / "vllama_records" / "part-00000" / "1.0.0"
    assert (part / "dataset_info.json").is_file() and (part / "features.json").is_file()
    assert "tensorflow" not in sys.modules  # the whole prepare ran without TensorFlow

    records = read_records(out)
    assert len(records) == 5
    recs = sorted((records[i] for i in range(5)), key=lambda r: r.example_id)
    assert [r.example_id for r in recs] == list(range(5))
    kind = "instruction" if dataset in ("llava_instruct", "webvid_instruct") else "caption"
    for i, r in enumerate(recs):
        assert r.kind == kind
        if kind == "caption":
            assert r.caption == synthetic.caption(i)  # raw text: processors run at read time
        else:
            media = r.media_type
            want = synthetic.conversation(i, media)
            assert [(t.role, t.value) for t in r.conversations] == [(t["from"], t["value"]) for t in want]
        if dataset in ("cc_sbu", "laion"):
            assert r.media_bytes[:2] == b"\xff\xd8" and "#" in r.media_path  # jpg bytes out of the tar
        else:
            assert r.media_bytes == b"" and Path(r.media_path) == src.media_files[i]


def test_llava_cc3m_also_reads_the_cc_sbu_align_layout(tmp_path: Path):
    src = synthetic.make_cc_sbu_align(tmp_path / "src", 3, dataset="llava_cc3m")
    assert prepare("llava_cc3m", src.source, tmp_path / "out", progress=False).written == 3
    assert read_records(tmp_path / "out")[0].caption == synthetic.caption(0)


def test_store_bytes_makes_shards_movable(tmp_path: Path):
    src, summary = synthetic.make_prepared("webvid_instruct", tmp_path / "a", 3, make={"video": TINY_VIDEO},
                                           store_media="bytes")
    assert summary.written == 3
    moved = tmp_path / "moved"
    shutil.move(str(tmp_path / "a" / "prepared"), moved)
    shutil.rmtree(tmp_path / "a")  # the media tree is gone
    recs = read_records(moved)
    r = recs[0]
    assert not Path(r.media_path).exists() and len(r.media_bytes) > 100
    from vllama_jax.data import media_io

    frames, msg = media_io.load_frames("video", r.media_path, r.media_bytes, num_frames=4, image_size=32,
                                       need_message=True)
    assert frames.shape == (4, 32, 32, 3) and msg.startswith("The video contains 4 frames")


def _bad_jsonl(root: Path) -> synthetic.SyntheticSource:
    """6 caption video entries, one corrupt video, one missing file, one malformed JSON line (+ a blank line)."""
    src = synthetic.make_jsonl(root, 6, media="video", video=TINY_VIDEO)
    synthetic.write_corrupt(root / "media" / "2.mp4")
    (root / "media" / "4.mp4").unlink()
    lines = (root / "data.jsonl").read_text().splitlines()
    lines.insert(3, '{"video": "media/x.mp4", "caption": "unterminated')
    lines.insert(5, "")
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return src


def test_bad_entries_are_skipped_counted_and_listed(tmp_path: Path):
    src = _bad_jsonl(tmp_path / "src")
    summary = prepare("jsonl", src.source, tmp_path / "out", progress=False, records_per_part=3)
    assert (summary.total, summary.written, summary.bad) == (7, 4, 3)
    bad = [json.loads(x) for x in (tmp_path / "out" / "bad_records.jsonl").read_text().splitlines()]
    reasons = {b["source_id"]: b["reason"] for b in bad}
    assert set(reasons) == {"custom-2", "data.jsonl:4", "custom-4"}
    assert reasons["data.jsonl:4"].startswith("malformed JSON line")
    assert reasons["custom-4"] == "media file not found"
    assert reasons["custom-2"].startswith("media does not decode: ")
    assert summary.bad_reasons == {"malformed JSON line": 1, "media file not found": 1, "media does not decode": 1}
    assert "3 bad skipped" in summary.line()
    ids = sorted(read_records(tmp_path / "out")[i].source_id for i in range(4))
    assert ids == ["custom-0", "custom-1", "custom-3", "custom-5"]


def test_prepare_resumes_after_interruption(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    src = synthetic.make_cc_sbu_align(tmp_path / "src", 7)
    from vllama_jax.data import prepare as prep_mod

    real = prep_mod._materialize
    calls = {"n": 0}

    def dying(item, *args):
        calls["n"] += 1
        if calls["n"] == 6:  # in the middle of the third part
            raise KeyboardInterrupt
        return real(item, *args)

    monkeypatch.setattr(prep_mod, "_materialize", dying)
    with pytest.raises(KeyboardInterrupt):
        prepare("cc_sbu_align", src.source, tmp_path / "out", progress=False, records_per_part=2, workers=0)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [p["name"] for p in manifest["parts"]] == ["part-00000", "part-00001"] and not manifest["complete"]
    with pytest.raises(DataError, match="did not finish"):
        read_records(tmp_path / "out")

    monkeypatch.setattr(prep_mod, "_materialize", real)
    summary = prepare("cc_sbu_align", src.source, tmp_path / "out", progress=False, records_per_part=2)
    assert (summary.written, summary.parts, summary.parts_resumed) == (7, 4, 2)
    recs = read_records(tmp_path / "out")
    assert sorted(recs[i].example_id for i in range(len(recs))) == list(range(7))
    # a third run resumes everything; a different preparation into the same folder is refused
    assert prepare("cc_sbu_align", src.source, tmp_path / "out", progress=False, records_per_part=2).parts_resumed == 4
    with pytest.raises(DataError, match="different source or with other options"):
        prepare("cc_sbu_align", src.source, tmp_path / "out", progress=False, records_per_part=3)


def test_cli_errors_are_one_line_with_nonzero_exit(tmp_path: Path, capsys: pytest.CaptureFixture):
    def run(*argv):
        try:
            code = cli_main(["prepare", *argv])
        except SystemExit as e:  # argparse's own errors
            code = e.code
        return code, capsys.readouterr().err

    code, err = run("webvid", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert code == 2 and err.count("\n") == 1 and "--source" in err and "does not exist" in err
    code, err = run("imagenet", "--source", str(tmp_path), "--out", str(tmp_path / "o"))
    assert code == 2 and err.count("\n") == 1 and "invalid choice" in err
    code, err = run("webvid", "--out", str(tmp_path / "o"))
    assert code == 2 and err.count("\n") == 1 and "--source" in err
    # a source whose annotation file does not parse: DataError -> one line, exit 1
    (tmp_path / "broken.json").write_text("[{")
    (tmp_path / "media").mkdir()
    rc = cli_main(["prepare", "llava_instruct", "--source", str(tmp_path / "broken.json"), "--media-dir", str(tmp_path / "media"),
               "--out", str(tmp_path / "o2"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "broken.json: not valid JSON" in err
    # webvid without --media-dir
    src = synthetic.make_webvid(tmp_path / "wv", 1, video=TINY_VIDEO)
    rc = cli_main(["prepare", "webvid", "--source", str(src.source), "--out", str(tmp_path / "o3"), "--quiet"])
    assert rc == 1 and "needs --media-dir" in capsys.readouterr().err


@pytest.mark.slow  # a fresh interpreter importing TFDS: ~3 s alone, more on a busy machine
def test_cli_module_entry_point(tmp_path: Path):
    src = synthetic.make_llava_instruct(tmp_path / "src", 3)
    cmd = [sys.executable, "-m", "vllama_jax.cli", "prepare", "llava_instruct", "--source", str(src.source),
           "--media-dir", str(src.media_dir), "--out", str(tmp_path / "out"), "--store-media", "bytes"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "llava_instruct: 3 records written, 0 bad skipped" in r.stdout
    assert "prepare llava_instruct" in r.stderr  # the tqdm progress bar
    recs = read_records(tmp_path / "out")
    assert recs[0].conversations[0] == Turn("human", "<image>\nWhat is shown here?")
