"""The training loop with the real data pipeline: the loss falls, a restarted run resumes exactly, a NaN stops the
run naming the batch, and the dry run reports bytes per device without allocating the model."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from tests.helpers import TINY_CONFIG, tiny_files
from tests.test_train_support import host, tiny_config
from vllama_jax.config import ConfigError, load_model_config
from vllama_jax.train.loop import NonFiniteLossError, Trainer
from vllama_jax.weights.load import load_upstream
from vllama_jax.weights.model_dir import save_model_dir


@pytest.fixture(scope="module")
def image_captions(tmp_path_factory) -> str:
    """A prepared cc_sbu_align set of 8 generated images, each with its own caption (the image determines it)."""
    from vllama_jax.data import synthetic

    root = tmp_path_factory.mktemp("cc_sbu")
    synthetic.make_prepared("cc_sbu_align", root, 8)
    return str(root / "prepared")


def pipeline_config(tiny_dir: Path, out: Path, dataset: str, **extra):
    data = {"datasets": {"cc_sbu_align": {"path": dataset}}, "synthetic": {"num_examples": 0}, "batch_size": 4,
            "max_txt_len": 16, "augment": True}
    return tiny_config(tiny_dir, out, data=data, **extra)


@pytest.mark.slow
def test_loss_falls_on_a_generated_dataset(tiny_dir: Path, tmp_path: Path, image_captions: str):
    cfg = pipeline_config(tiny_dir, tmp_path, image_captions, max_steps=30, checkpoint={"every": 100},
                          optim={"init_lr": 3e-3, "warmup_steps": 3, "iters_per_epoch": 30, "max_epoch": 1})
    t = Trainer(cfg)
    try:
        hist = t.run()
    finally:
        t.close()
    losses = np.array([h["loss"] for h in hist])
    assert len(losses) == 30 and np.isfinite(losses).all()
    assert losses[-5:].mean() < losses[:3].mean() - 0.7, losses  # ~7.0 -> ~5.9
    # metrics went to TensorBoard and the CSV
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "logs").iterdir())
    csv = (tmp_path / "logs" / "metrics.csv").read_text().splitlines()
    assert csv[0].startswith("step,loss,lr,grad_norm") and len(csv) == 31


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_equals_an_uninterrupted_run(tiny_dir: Path, tmp_path: Path, image_captions: str, optimizer: str):
    """6 steps straight == 3 steps, a new Trainer restoring the checkpoint, 3 more steps: same parameters,
    optimizer state and batches (the grain iterator state is part of the checkpoint; dropout keys follow the
    step). With either optimizer (Muon's momentum is checkpointed as AdamW's moments are)."""
    optim = {"optimizer": optimizer}
    straight = Trainer(pipeline_config(tiny_dir, tmp_path / "straight", image_captions, max_steps=6, optim=optim))
    try:
        h_straight = straight.run()
        s_straight = host(straight.state)
    finally:
        straight.close()

    cfg = pipeline_config(tiny_dir, tmp_path / "resumed", image_captions, max_steps=6, optim=optim)
    first = Trainer(cfg)
    try:
        h_first = first.run(3)
    finally:
        first.close()
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir() if p.name.isdigit()) == ["3"]
    second = Trainer(cfg)
    try:
        second.setup()
        assert int(second.state["step"]) == 3
        h_second = second.run()
        s_resumed = host(second.state)
    finally:
        second.close()

    hist = h_first + h_second
    assert [h["step"] for h in hist] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(h_straight, hist):
        np.testing.assert_array_equal(a["example_id"], b["example_id"])
        assert a["loss"] == b["loss"], (a["step"], a["loss"], b["loss"])
    assert s_straight.keys() == s_resumed.keys()
    for k in s_straight:
        np.testing.assert_array_equal(s_resumed[k], s_straight[k], err_msg=k)


class InjectNaN:
    """Wraps a data iterator: the batch of step `at` (1-based) gets NaN frames."""

    def __init__(self, it, at: int):
        self.it, self.at, self.n = it, at, 0

    def __next__(self):
        batch = next(self.it)
        self.n += 1
        if self.n == self.at:
            batch = dict(batch, frames=np.full(batch["frames"].shape, np.nan, np.float32))
        return batch


@pytest.mark.slow
def test_nan_loss_stops_the_run_naming_step_and_batch(tiny_dir: Path, tmp_path: Path):
    cfg = tiny_config(tiny_dir, tmp_path, max_steps=6, checkpoint={"every": 2}, dropout=False)
    t = Trainer(cfg).setup()
    t.data_iter = InjectNaN(t.data_iter, at=5)
    try:
        with pytest.raises(NonFiniteLossError) as e:
            t.run()
    finally:
        t.close()
    # synthetic batch 4 (0-based) holds examples 16..19
    assert e.value.step == 5 and e.value.example_ids == [16, 17, 18, 19] and e.value.dataset == "synthetic"
    assert "step 5" in str(e.value) and "16, 17, 18, 19" in str(e.value)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 4]  # nothing saved at or after the bad step
    again = Trainer(cfg).setup()
    try:
        assert int(again.state["step"]) == 4
        assert all(np.isfinite(x).all() for x in host(again.state["params"]).values())
    finally:
        again.close()
    # a config training other groups refuses to resume this folder
    other = Trainer(tiny_config(tiny_dir, tmp_path, frozen_llama_proj=True))
    with pytest.raises(ConfigError, match=r"this config trains \['video_qformer', 'video_query_tokens', "
                                          r"'video_frame_position_embedding'\]"):
        other.setup()
    other.close()


@pytest.mark.slow
def test_dry_run_reports_bytes_per_device_without_allocating(tiny_dir: Path, tmp_path: Path, capsys):

    # the program of test_step_on_8_devices_equals_one_device (persistent compilation cache); no weight file is read
    cfg = tiny_config(tiny_dir, tmp_path, mesh="data=2,fsdp=2,tensor=2", data={"batch_size": 8},
                      optim={"grad_accum": 2}, weights={"eva_vit": "", "blip2": "", "llama": "/nonexistent"})
    t = Trainer(cfg)
    [r] = t.dry_run(device_memory_gib=95)
    assert t.state is None and t.frozen is None
    assert r["devices"] == 8 and r["kind"] == "caption"
    # the LLaMA / ViT weights are split over fsdp x tensor: a device holds less than the whole frozen tree
    full = sum(np.prod(x.shape) * 4 for g in t.frozen_groups for x in jax.tree.leaves(t.abstract[g]))
    assert 0 < r["frozen_params"] < full
    assert r["optimizer_state"] >= 2 * r["trainable_params"] > 0
    assert r["activations_temp"] > 0 and r["peak_estimate"] > r["frozen_params"]
    out = capsys.readouterr().out
    assert "bytes per device" in out and "of 95 GiB per device" in out


@pytest.mark.slow
def test_frozen_towers_from_a_model_directory(tiny_dir: Path, tiny_tok, tmp_path: Path):
    """`model.dir` (a converted model directory) instead of upstream files: the frozen towers and the tokenizer come
    from it, restored straight onto the mesh; the trained groups start fresh."""
    mc = load_model_config(TINY_CONFIG)
    params = load_upstream(mc, tiny_files(tiny_dir, "eva_vit", "blip2", "llama"))
    save_model_dir(tmp_path / "model", mc, params, tokenizer=tiny_tok)
    cfg = tiny_config(tiny_dir, tmp_path / "run", dropout=False, max_steps=1,
                      model={"config": "", "dir": str(tmp_path / "model")},
                      weights={"eva_vit": "", "blip2": "", "llama": ""})
    t = Trainer(cfg).setup()
    try:
        for g in ("visual_encoder", "qformer", "ln_vision", "query_tokens", "llama"):
            got, want = host(t.frozen[g]), host(params[g])
            assert got.keys() == want.keys()
            for k in want:
                np.testing.assert_array_equal(got[k], want[k], err_msg=g + k)
        assert np.isfinite(t.run()[0]["loss"])
    finally:
        t.close()


def _corrupt_streams(path: Path) -> None:
    """Keep the first 32 bytes (the ftyp box), invert everything after: the container's index and its streams are
    gone, as after a bad copy."""
    data = path.read_bytes()
    path.write_bytes(data[:32] + bytes(b ^ 0xFF for b in data[32:]))


@pytest.mark.slow
def test_a_run_over_partly_corrupted_clips_finishes_and_counts_exactly_those(tiny_dir: Path, tmp_path: Path,
                                                                             capsys):
    """40 clips prepared, then 2 of them (5%) corrupted on disk: the run over more than one epoch finishes, and its
    summary names exactly those 2 records as skipped (a bad record drawn again is not counted twice)."""
    from vllama_jax.data import read_records, synthetic

    src, summary = synthetic.make_prepared("webvid", tmp_path / "webvid", 40,
                                           make={"video": {"num_frames": 6, "width": 32, "height": 32}})
    assert summary.written == 40
    corrupted = {5, 26}
    for i in corrupted:
        _corrupt_streams(src.media_files[i])
    prepared = str(tmp_path / "webvid" / "prepared")
    data = {"datasets": {"webvid": {"path": prepared}}, "synthetic": {"num_examples": 0}, "batch_size": 4,
            "max_txt_len": 16}
    cfg = tiny_config(tiny_dir, tmp_path / "run", data=data, max_steps=12, checkpoint={"every": 100})
    t = Trainer(cfg)
    try:
        hist = t.run()
        skipped = t.data_iter.stats["skipped"]
    finally:
        t.close()
    assert len(hist) == 12 and all(np.isfinite(h["loss"]) for h in hist)
    records = read_records(prepared)
    assert {d: sorted(records[g].example_id for g in ids) for d, ids in skipped.items()} == \
        {"webvid": sorted(corrupted)}
    out = capsys.readouterr().out
    assert "data: 12 batches, 2 bad records skipped (webvid: records " in out
