"""The frozen-feature cache (issue 20): `vllama-jax encode` writes the frozen towers' output beside a prepared
dataset's records; training with ``data.features: cached`` reads it and its step skips the towers.

Must-show 1: on the fixture model, a step on cached features equals the step on the frames (loss within 1e-5,
gradients within the fixture tolerances) for both branches and both batch kinds; through the whole chain (prepare,
encode, the grain pipeline, the Trainer), training on the cache gives the losses of training on the frames.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import TINY_FILES, free_port
from tests.test_data_pipeline import TINY_VIDEO
from tests.test_train_support import subprocess_env, tiny_config
from vllama_jax.cli import main as cli_main
from vllama_jax.data import (DataError, DatasetSpec, PipelineConfig, PreparedDataset, build_train_iterator,
                             read_records, synthetic)
from vllama_jax.data.features import DONE_SUFFIX, FeatureCache, cache_dir
from vllama_jax.media.image import normalize_uint8
from vllama_jax.models import build_model
from vllama_jax.models.video_llama import VideoLLaMA
from vllama_jax.train.encode import encode_dataset
from vllama_jax.train.loop import Trainer
from vllama_jax.train.step import make_loss_fn
from vllama_jax.weights import convert as convert_mod

TRAINED = {"video": ("video_qformer", "video_query_tokens", "video_frame_position_embedding", "llama_proj"),
           "audio": ("audio_qformer", "audio_query_tokens", "audio_position_embedding", "audio_llama_proj")}


def _grad_close(ours, ref, name: str) -> None:
    """The fixture tolerance (tests/fixtures/README.md): max |diff| <= max(1e-4 max |ref|, 1e-6)."""
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(ref)):
        tol = max(1e-4 * float(np.abs(b).max()), 1e-6)
        assert float(np.abs(np.asarray(a) - np.asarray(b)).max()) <= tol, f"{name} {jax.tree_util.keystr(path)}"


@pytest.mark.slow
@pytest.mark.parametrize("branch", ["video", "audio"])
def test_cached_step_equals_the_step_on_frames(tiny_model, tiny_inputs, branch: str):
    """Both branches x both batch kinds: the loss of a caption_features / instruction_features batch (the towers'
    output from `frozen_frame_features`) and its gradients equal those of the caption / instruction batch on the
    frames; no tower is read (the cached step runs without the towers' parameters)."""
    config, params = tiny_model
    model = build_model(config)
    size = config.vit.image_size if branch == "video" else config.imagebind_vision.image_size
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 3, size, size, 3), np.uint8)  # pixels: normalised on the device, as trained
    trainable = {g: params[g] for g in TRAINED[branch]}
    frozen = {g: v for g, v in params.items() if g not in trainable}
    features = jax.jit(lambda p, x: model.apply({"params": p}, normalize_uint8(x, jnp), branch,
                                                method=VideoLLaMA.frozen_frame_features))(params, frames)
    towers = {"video": ("visual_encoder", "ln_vision", "qformer"), "audio": ("audio_encoder",)}[branch]
    no_towers = {g: v for g, v in frozen.items() if g not in towers}
    placeholder = config.llama.vocab_size
    n_media = (config.video_qformer if branch == "video" else config.audio_qformer).num_query_tokens
    z = tiny_inputs
    caption = {"text_ids": z["stage1.text_ids"].astype(np.int32),
               "text_mask": z["stage1.text_attention_mask"].astype(np.int32)}
    ids = np.array([[1, 5, 9] + [placeholder] * n_media + [11, 12, 13, 14, 15, 2, 0, 0]] * 2, np.int32)
    labels = np.where(np.arange(ids.shape[1]) >= 3 + n_media, ids, -100).astype(np.int32)
    labels[:, -2:] = -100
    mask = (np.arange(ids.shape[1]) < ids.shape[1] - 2).astype(np.int32)[None].repeat(2, 0)
    instruction = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    grad = jax.value_and_grad(make_loss_fn(model, branch, placeholder, dropout=False), has_aux=True)
    step = jax.jit(grad, static_argnums=4)
    key = jax.random.PRNGKey(0)
    for kind, text in (("caption", caption), ("instruction", instruction)):
        (loss, ntok), g = step(trainable, frozen, {"frames": frames, **text}, key, kind)
        (loss_c, ntok_c), g_c = step(trainable, no_towers, {"frame_features": features, **text}, key,
                                     f"{kind}_features")
        assert int(ntok) == int(ntok_c) > 0, kind
        assert abs(float(loss_c) / int(ntok) - float(loss) / int(ntok)) <= 1e-5, kind
        _grad_close(g_c, g, kind)


# ----------------------------------------------------------------------------------------------------------------
# the whole chain: prepare -> encode -> pipeline -> Trainer


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_dir: Path) -> dict[str, Path]:
    """A converted model directory of the fixture model and two prepared datasets (captions, instructions)."""
    root = tmp_path_factory.mktemp("cache")
    convert_mod.convert(root / "model", files={k: tiny_dir / v for k, v in TINY_FILES.items()}, config="tiny_test",
                        progress=False)
    out = {"model": root / "model"}
    for name in ("webvid", "webvid_instruct"):
        synthetic.make_prepared(name, root / name, 6, make={"video": TINY_VIDEO})
        out[name] = root / name / "prepared"
    return out


def _train_config(tiny_dir: Path, chain: dict[str, Path], out: Path, branch: str, dataset: str, features: str):
    audio = branch == "audio"
    return tiny_config(tiny_dir, out, model={"config": "", "dir": str(chain["model"])},
                       weights={"eva_vit": "", "blip2": "", "llama": ""},
                       frozen_video_qformer=audio, frozen_audio_qformer=not audio, frozen_llama_proj=audio,
                       data={"synthetic": {"num_examples": 0}, "batch_size": 2, "num_frames": 4, "augment": False,
                             "max_len": 64, "features": features,
                             "datasets": {dataset: {"path": str(chain[dataset]), "sampling": "uniform"}}},
                       max_steps=3, checkpoint={"every": 100})


@pytest.mark.slow
@pytest.mark.parametrize("branch,dataset", [("video", "webvid"), ("audio", "webvid_instruct")])
def test_training_on_the_cache_equals_training_on_frames(tiny_dir: Path, chain, tmp_path: Path, branch: str,
                                                         dataset: str):
    """encode, then the same 3 steps with data.features cached and frames: the same examples, the same losses
    (within 1e-5), the same trained parameters; the cached run never loads the towers."""
    summary = encode_dataset(chain[dataset], chain["model"], branch=branch, num_frames=4, sampling="uniform",
                             dtype="float32", batch_size=4, progress=False, log=lambda s: None)
    assert summary.records == 6 and summary.bad == 0 and summary.frames == 24
    runs = {}
    for features in ("frames", "cached"):
        t = Trainer(_train_config(tiny_dir, chain, tmp_path / features, branch, dataset, features))
        try:
            history = t.run()
            runs[features] = (history, jax.device_get(t.state["params"]), set(t.frozen))
        finally:
            t.close()
    (h_f, p_f, frozen_f), (h_c, p_c, frozen_c) = runs["frames"], runs["cached"]
    towers = {"video": {"visual_encoder", "qformer", "ln_vision"}, "audio": {"audio_encoder"}}[branch]
    assert towers <= frozen_f and not towers & frozen_c
    assert [list(h["example_id"]) for h in h_f] == [list(h["example_id"]) for h in h_c]
    for a, b in zip(h_f, h_c):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a["step"], a["loss"], b["loss"])
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(p_c), jax.tree.leaves(p_f)):
        name = jax.tree_util.keystr(path)
        if "['key']['bias']" in name:
            # softmax ignores a key bias: its gradient is rounding noise (~1e-9), which AdamW's g / |g| turns into
            # +-lr steps of either sign; it is compared as a bound (tests/fixtures/README.md says the same)
            assert float(np.abs(a - b).max()) <= 2 * 3 * 1e-3, name
            continue
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name)


def _pipeline(tiny_dir: Path, data: Path, **kw) -> PipelineConfig:
    base = dict(tokenizer=str(tiny_dir / "llama"), batch_size=2, num_frames=4, image_size=56, num_query_tokens=8,
                max_len=64, process_index=0, process_count=1, train=False, features="video-4f")
    return PipelineConfig(**(base | kw))


@pytest.mark.slow
def test_cache_resumes_refuses_mismatches_and_replaces_bad_records(tiny_dir: Path, chain, tmp_path: Path, capsys):
    """A rerun skips finished shards and redoes an unfinished one (the CLI, one line); a run whose settings differ from the cache's
    (augmentation, frame sampling, frame count) is refused with the reason; a record whose media failed at encode
    time is stored as bad and the pipeline replaces it like any bad record; the CLI prints one line."""
    data = tmp_path / "webvid"
    shutil.copytree(chain["webvid"], data, ignore=shutil.ignore_patterns("features"))  # the records only
    # one record's video disappears after prepare: its media fails at encode time
    victim = read_records(data)[3].media_path
    Path(victim).rename(victim + ".gone")
    try:
        s = encode_dataset(data, chain["model"], num_frames=4, sampling="uniform", dtype="bfloat16", batch_size=4,
                           progress=False, log=lambda s: None)
    finally:
        Path(victim + ".gone").rename(victim)
    assert (s.records, s.bad, s.shards, s.resumed) == (6, 1, 1, 0)
    out = cache_dir(data, "video", 4)
    again = encode_dataset(data, chain["model"], num_frames=4, sampling="uniform", dtype="bfloat16",
                           progress=False, log=lambda s: None)
    assert (again.records, again.resumed) == (0, 1)

    # training reads bf16 features and replaces the bad record
    it = build_train_iterator([DatasetSpec(str(data), sampling="uniform")], _pipeline(tiny_dir, data))
    seen = set()
    for _ in range(6):
        b = next(it)
        assert b["kind"] == "caption_features" and b["frame_features"].shape == (2, 4, 8, 32)
        assert b["frame_features"].dtype == jnp.bfloat16 and "frames" not in b
        seen |= set(b["example_id"].tolist())
    assert 3 not in seen and it.stats["skipped"] == {"webvid": [3]}
    it.close()

    # mismatches: augmentation, sampling, frames; a missing cache; an unfinished one
    for kw, words in ((dict(train=True), "augment"), (dict(num_frames=3, features="video-3f"), "vllama-jax encode"),):
        with pytest.raises(DataError, match=words):
            build_train_iterator([DatasetSpec(str(data), sampling="uniform")], _pipeline(tiny_dir, data, **kw))
    with pytest.raises(DataError, match="compute precision"):  # towers of another config or precision
        build_train_iterator([DatasetSpec(str(data), sampling="uniform")],
                             _pipeline(tiny_dir, data, feature_towers="0123456789abcdef"))
    with pytest.raises(DataError, match="sampling"):
        build_train_iterator([DatasetSpec(str(data), sampling="headtail")], _pipeline(tiny_dir, data))
    with pytest.raises(DataError, match="other settings"):
        encode_dataset(data, chain["model"], num_frames=4, sampling="uniform", dtype="float32", progress=False,
                       log=lambda s: None)
    done = next(out.rglob("*" + DONE_SUFFIX))
    done.unlink()
    with pytest.raises(DataError, match="did not finish"):
        FeatureCache.open(out, PreparedDataset.open(data).files)
    assert cli_main(["encode", str(data), "--model", str(chain["model"]), "--num-frames", "4", "--sampling",
                     "uniform", "--quiet"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("encoded 6 records (0 bad) in 1 shards (0 resumed)"), line  # the video is back
    assert cli_main(["encode", str(tmp_path / "nope"), "--model", str(chain["model"])]) == 2
    assert "is not a folder" in capsys.readouterr().err
    # other settings replace the cache only with --overwrite
    assert cli_main(["encode", str(data), "--model", str(chain["model"]), "--num-frames", "4", "--sampling",
                     "uniform", "--dtype", "float32", "--quiet"]) == 1  # a DataError: one line, status 1
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(["encode", str(data), "--model", str(chain["model"]), "--num-frames", "4", "--sampling",
                     "uniform", "--dtype", "float32", "--overwrite", "--quiet"]) == 0
    assert FeatureCache.open(out, PreparedDataset.open(data).files).settings["dtype"] == "float32"


@pytest.mark.slow
def test_resume_on_the_cache_equals_an_uninterrupted_run(tiny_dir: Path, chain, tmp_path: Path):
    """A run on cached features stopped after its checkpoint at step 2 and started again gives the losses of one
    run straight to step 4 (the iterator state restores the position in the cache)."""
    encode_dataset(chain["webvid"], chain["model"], num_frames=4, sampling="uniform", dtype="float32",
                   progress=False, log=lambda s: None)

    def trainer(out: Path) -> Trainer:
        cfg = _train_config(tiny_dir, chain, out, "video", "webvid", "cached")
        return Trainer(dataclasses.replace(cfg, max_steps=4,
                                           checkpoint=dataclasses.replace(cfg.checkpoint, every=2, async_save=False)))

    straight = trainer(tmp_path / "straight")
    try:
        want = [h["loss"] for h in straight.run()]
    finally:
        straight.close()
    first = trainer(tmp_path / "resumed")
    try:
        got = [h["loss"] for h in first.run(2)]
    finally:
        first.close()
    second = trainer(tmp_path / "resumed")
    try:
        got += [h["loss"] for h in second.run()]
    finally:
        second.close()
    assert len(want) == 4 and np.allclose(got, want, rtol=0, atol=1e-6), (got, want)


@pytest.mark.slow
def test_two_hosts_encode_their_own_shards_into_one_cache(tiny_dir: Path, chain, tmp_path: Path):
    """Two processes joined by jax.distributed (`vllama-jax encode --coordinator ...`) each encode their own record
    shards; together they write the cache one process writes, record for record (each shard marked by its host)."""
    data = tmp_path / "two_parts"
    synthetic.make_prepared("webvid", data, 6, make={"video": TINY_VIDEO}, records_per_part=3)
    data = data / "prepared"
    assert len(PreparedDataset.open(data).files) == 2
    single = tmp_path / "single"
    shutil.copytree(data, single)
    args = ["--model", str(chain["model"]), "--num-frames", "4", "--sampling", "uniform", "--quiet"]
    assert cli_main(["encode", str(single), *args]) == 0
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "vllama_jax.cli", "encode", str(data), *args, "--coordinator",
                               f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              env=subprocess_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert "encoded 3 records (0 bad) in 1 shards" in out, out
    hosts = sorted(json.loads(f.read_text())["host"] for f in cache_dir(data, "video", 4).rglob("*" + DONE_SUFFIX))
    assert hosts == [0, 1]
    files = PreparedDataset.open(data).files
    a = FeatureCache.open(cache_dir(data, "video", 4), files).reader()
    b = FeatureCache.open(cache_dir(single, "video", 4), PreparedDataset.open(single).files).reader()
    for i in range(6):
        (fa, ma), (fb, mb) = a[i], b[i]
        # the single process batches over this session's 8 simulated devices, each host over its 1: the same
        # values up to the bfloat16 rounding of slightly different float32 sums (one ulp, 2^-8)
        np.testing.assert_allclose(fa.astype(np.float32), fb.astype(np.float32), rtol=2**-7, atol=1e-6)
        assert ma == mb


TRAIN_WORKER = """
import json, sys
from vllama_jax.train.config import train_config_from_dict
from vllama_jax.train.loop import Trainer

t = Trainer(train_config_from_dict(json.loads(sys.argv[1])))
hist = t.run()
t.close()
print("LOSSES", json.dumps([h["loss"] for h in hist]))
"""


@pytest.mark.slow
def test_two_processes_train_on_the_cache_as_on_frames(tiny_dir: Path, chain, tmp_path: Path):
    """Two processes of 4 simulated devices each (jax.distributed on 127.0.0.1), each reading its own records:
    training on the cache gives the losses of the same two processes training on the frames."""
    encode_dataset(chain["webvid"], chain["model"], num_frames=4, sampling="uniform", dtype="float32",
                   progress=False, log=lambda s: None)
    losses = {}
    for features in ("frames", "cached"):
        port = free_port()
        procs = []
        for pid in range(2):
            cfg = _train_config(tiny_dir, chain, tmp_path / features, "video", "webvid", features)
            d = cfg.to_dict() | {"mesh": "data=2,fsdp=2,tensor=2", "max_steps": 2,
                                 "distributed": {"coordinator": f"127.0.0.1:{port}", "num_processes": 2,
                                                 "process_id": pid, "auto": False}}
            d["data"]["batch_size"] = 8
            procs.append(subprocess.Popen([sys.executable, "-c", TRAIN_WORKER, json.dumps(d)],
                                          env=subprocess_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
        outs = [p.communicate(timeout=900) for p in procs]
        for p, (_, err) in zip(procs, outs):
            assert p.returncode == 0, err[-3000:]
        losses[features] = json.loads(next(o for o, _ in outs if "LOSSES" in o).split("LOSSES", 1)[1])
    assert len(losses["cached"]) == 2
    np.testing.assert_allclose(losses["cached"], losses["frames"], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_augmented_views_are_read_one_per_epoch(tiny_dir: Path, chain, tmp_path: Path):
    """`--augment --views 2` caches two random-crop draws per record (different features); a run with
    data.augment trains on view 0 in epoch 0 and view 1 in epoch 1."""
    data = tmp_path / "webvid"
    shutil.copytree(chain["webvid"], data, ignore=shutil.ignore_patterns("features"))
    s = encode_dataset(data, chain["model"], num_frames=4, sampling="uniform", augment=True, views=2,
                       dtype="float32", progress=False, log=lambda s: None)
    assert s.frames == 6 * 2 * 4
    cache = FeatureCache.open(cache_dir(data, "video", 4), PreparedDataset.open(data).files)
    reader = cache.reader()
    views = [reader[i][0] for i in range(6)]
    assert all(v.shape == (2, 4, 8, 32) and not np.allclose(v[0], v[1]) for v in views)
    it = build_train_iterator([DatasetSpec(str(data), sampling="uniform")], _pipeline(tiny_dir, data, train=True))
    for epoch in range(2):
        for _ in range(3):  # 6 records, batches of 2: one epoch
            b = next(it)
            for row, i in zip(b["frame_features"], b["example_id"]):
                np.testing.assert_array_equal(row, views[int(i)][epoch])
    it.close()
