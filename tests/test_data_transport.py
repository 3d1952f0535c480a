"""Worker batches' frames reach the trainer through memory the worker reuses (``data/transport.py``)."""
from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from vllama_jax.data import DataError, DatasetSpec, PipelineConfig, build_train_iterator, synthetic, transport

pytestmark = pytest.mark.skipif(not transport.supported(), reason="memfd_create and /proc: Linux only")


def test_a_block_is_reused_only_after_the_trainer_read_it():
    pool = transport.FramePool(max_blocks=2)
    a, b, c = (np.full((3, 5), k, np.uint8) for k in (1, 2, 3))
    sa = pool.put(a)
    sb = pool.put(b)  # ``a`` not read yet: a second block
    assert isinstance(sa, transport.FrameSlot) and isinstance(sb, transport.FrameSlot) and sa.fd != sb.fd
    assert pool.put(c) is c  # both blocks hold unread batches and the cap is 2: the array itself (grain's path)
    got = transport.receive(pickle.loads(pickle.dumps(sa)))  # as it crosses the process boundary
    np.testing.assert_array_equal(got, a)
    sc = pool.put(c)
    assert sc.fd == sa.fd and sc.seq > sa.seq  # the block ``a`` was read from, now holding ``c``
    with pytest.raises(DataError, match="replaced before it was read"):  # a stale handle never yields ``c``
        transport.receive(sa)
    np.testing.assert_array_equal(transport.receive(sb), b)
    np.testing.assert_array_equal(transport.receive(sc), c)
    assert transport.receive("not a slot") == "not a slot"


def test_dtypes_and_shapes_survive_the_hand_over():
    pool = transport.FramePool(max_blocks=4)
    for x in (np.arange(24, dtype=ml_dtypes.bfloat16).reshape(2, 3, 4),
              np.random.default_rng(0).standard_normal((2, 7)).astype(np.float32),
              np.zeros((0, 3), np.uint8),
              np.arange(12, dtype=np.int64).reshape(3, 4)[:, ::2]):  # not contiguous
        got = transport.receive(pool.put(x))
        assert got.dtype == x.dtype and got.shape == x.shape
        np.testing.assert_array_equal(got.astype(np.float64), x.astype(np.float64))


def test_a_worker_gone_is_a_clear_error():
    code = ("import pickle, sys, numpy as np; from vllama_jax.data import transport; "
            "sys.stdout.buffer.write(pickle.dumps(transport.FramePool(1).put(np.ones(4, np.uint8))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, timeout=120).stdout
    slot = pickle.loads(out)
    with pytest.raises(DataError, match=f"data worker process {slot.pid}"):
        transport.receive(slot)


def test_worker_batches_equal_in_process_batches_and_go_through_the_reused_memory(tmp_path: Path, tiny_dir: Path,
                                                                                  monkeypatch):
    synthetic.make_prepared("webvid", tmp_path, 6, make={"video": {"num_frames": 10, "width": 64, "height": 64}})
    received = []

    def counting(value):
        received.append(isinstance(value, transport.FrameSlot))
        return real(value)

    real = transport.receive
    monkeypatch.setattr(transport, "receive", counting)
    batches = {}
    for workers, reuse in ((0, True), (2, True), (2, False)):
        cfg = PipelineConfig(tokenizer=str(tiny_dir / "llama"), batch_size=2, num_frames=4, image_size=32,
                             seed=3, num_workers=workers, reuse_worker_memory=reuse, process_index=0,
                             process_count=1)
        it = build_train_iterator([DatasetSpec(str(tmp_path / "prepared"))], cfg)
        received.clear()
        batches[workers, reuse] = [next(it) for _ in range(12)]  # more batches than a worker has blocks
        it.close()
        # frames only: every batch's frames travel as a slot with reuse on, none without workers or reuse
        assert sum(received) == (12 if (workers, reuse) == (2, True) else 0)
    for key in ((2, True), (2, False)):
        for want, got in zip(batches[0, True], batches[key]):
            assert sorted(want) == sorted(got)
            for k in want:
                np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=f"{key} {k}")
    assert all(isinstance(b["frames"], np.ndarray) and b["frames"].dtype == np.uint8 for b in batches[2, True])
