"""The training iterator's state goes into an Orbax checkpoint and a NEW process resumes with the same batches."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from vllama_jax.data import DatasetSpec, PipelineConfig, build_train_iterator, checkpoint_args, synthetic

TINY_VIDEO = {"num_frames": 10, "width": 64, "height": 64}

# Run in a fresh interpreter: rebuild the pipeline, restore its state from the Orbax checkpoint, dump batches.
RESTORE = textwrap.dedent('''
    import json, sys
    import numpy as np
    import orbax.checkpoint as ocp
    from vllama_jax.data import DatasetSpec, PipelineConfig, build_train_iterator, checkpoint_args

    def main():
        a = json.loads(sys.argv[1])
        it = build_train_iterator([DatasetSpec(**s) for s in a["specs"]], PipelineConfig(**a["cfg"]))
        mngr = ocp.CheckpointManager(a["ckpt"])
        mngr.restore(a["step"], args=ocp.args.Composite(data=checkpoint_args(it, restore=True)))
        batches = [next(it) for _ in range(a["n"])]
        np.savez(a["out"], **{f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()})
        print(json.dumps(it.stats))
        it.close()

    if __name__ == "__main__":
        main()
''')


def _arrays(batches: list[dict]) -> dict[str, np.ndarray]:
    return {f"{i}/{k}": np.asarray(v) for i, b in enumerate(batches) for k, v in b.items()}


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_iterator_state_restores_exactly_in_a_new_process(tmp_path: Path, tiny_dir: Path, num_workers: int):
    import orbax.checkpoint as ocp

    root = tmp_path / "data"
    specs = []
    for name, n, ratio in (("webvid", 5, 100), ("cc_sbu_align", 4, 24), ("webvid_instruct", 3, 24)):
        synthetic.make_prepared(name, root / name, n, make={"video": TINY_VIDEO}, check_media=False)
        specs.append({"path": str(root / name / "prepared"), "sample_ratio": ratio})
    # one bad record, so that the replaced-record counter is part of what must survive the restore
    (root / "webvid" / "source" / "videos" / "000" / "1001.mp4").unlink()
    cfg = dict(tokenizer=str(tiny_dir / "llama"), batch_size=2, num_frames=4, image_size=32, num_query_tokens=8,
               max_len=128, seed=7, num_workers=num_workers, process_index=0, process_count=1)

    k, n = 5, 4
    it = build_train_iterator([DatasetSpec(**s) for s in specs], PipelineConfig(**cfg))
    for _ in range(k):
        next(it)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt")
    mngr.save(k, args=ocp.args.Composite(data=checkpoint_args(it)))
    mngr.wait_until_finished()
    saved_stats = dict(it.stats)
    expected = [next(it) for _ in range(n)]
    it.close()
    # what is restored is non-trivial: steps 5-8 of the seed-7 mixture switch datasets, and records are being
    # replaced (the deleted 1001.mp4), so both the mixture position and the counters must survive. The
    # sequence is fixed by the seed alone (BatchMixture: numpy RNG per block), not by the number of workers.
    assert [b["dataset"] for b in expected] == ["webvid", "cc_sbu_align", "webvid", "webvid"]
    assert (saved_stats["batches"], saved_stats["replaced"]) == (k, 1)
    assert [(d, len(ids)) for d, ids in saved_stats["skipped"].items()] == [("webvid", 1)]  # 1001.mp4, once
    assert [b["num_replaced"].tolist() for b in expected] == [[0, 2], [0, 0], [0, 0], [0, 1]]

    args = {"specs": specs, "cfg": cfg, "ckpt": str(tmp_path / "ckpt"), "step": k, "n": n,
            "out": str(tmp_path / "restored.npz")}
    r = subprocess.run([sys.executable, "-c", RESTORE, json.dumps(args)], capture_output=True, text=True,
                       timeout=300, env=os.environ | {"JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "leaked shared_memory" not in r.stderr  # the workers' batches are all unlinked by the end
    got = np.load(tmp_path / "restored.npz")
    want = _arrays(expected)
    assert sorted(got.files) == sorted(want)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    stats = json.loads(r.stdout.strip().splitlines()[-1])
    assert stats["batches"] == saved_stats["batches"] + n
    assert stats["replaced"] == saved_stats["replaced"] + sum(int(b["num_replaced"].sum()) for b in expected)
    assert stats["skipped"] == saved_stats["skipped"]  # the same deleted clip, however often it is drawn


def test_state_is_json_and_set_state_rewinds(tmp_path: Path, tiny_dir: Path):
    synthetic.make_prepared("cc_sbu_align", tmp_path, 5)
    cfg = PipelineConfig(tokenizer=str(tiny_dir / "llama"), batch_size=2, image_size=32, process_index=0,
                         process_count=1)
    it = build_train_iterator([DatasetSpec(str(tmp_path / "prepared"))], cfg)
    next(it)
    state = json.loads(json.dumps(it.get_state()))
    a = [next(it)["example_id"].tolist() for _ in range(4)]
    it.set_state(state)
    assert [next(it)["example_id"].tolist() for _ in range(4)] == a
