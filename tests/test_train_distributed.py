"""Multi-process training and crash safety, with real subprocesses.

* Two processes of 4 simulated CPU devices each, joined by `jax.distributed.initialize` on 127.0.0.1 (collectives
  over gloo), train the same steps as one process of 8 devices: same parameters (each process feeds only its own
  rows of every global batch; the checkpoint is written by both).
* A process killed with SIGKILL while an asynchronous checkpoint save is in flight leaves the previous checkpoint
  restorable (Orbax writes each step into a temporary folder and renames it only when complete).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.helpers import free_port
from tests.test_train_support import subprocess_env, tiny_config, tiny_config_dict
from vllama_jax.train.checkpoint import load_trainable_params
from vllama_jax.train.loop import Trainer
from vllama_jax.tree import flatten_params

WORKER = textwrap.dedent('''
    import json, sys
    from vllama_jax.train.config import train_config_from_dict
    from vllama_jax.train.loop import Trainer

    cfg = train_config_from_dict(json.loads(sys.argv[1]))
    t = Trainer(cfg)
    hist = t.run()
    t.close()
    print("LOSSES", json.dumps([h["loss"] for h in hist]))
''')


DIST = dict(mesh="data=2,fsdp=2,tensor=2", max_steps=2, data={"batch_size": 8}, optim={"grad_accum": 2},
            checkpoint={"every": 100})


@pytest.mark.slow
def test_two_processes_equal_one_process_of_8_devices(tiny_dir: Path, tmp_path: Path):
    port = free_port()
    procs = []
    for pid in range(2):
        d = tiny_config_dict(tiny_dir, tmp_path / "two", **DIST,
                             distributed={"coordinator": f"127.0.0.1:{port}", "num_processes": 2, "process_id": pid})
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(d)], env=subprocess_env(4),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    losses = [json.loads(o.split("LOSSES", 1)[1]) for o, _ in outs if "LOSSES" in o]
    assert losses, "process 0 printed no losses"

    # one process, 8 devices (this pytest process), same config
    t = Trainer(tiny_config(tiny_dir, tmp_path / "one", **DIST))
    try:
        hist = t.run()
        ref = flatten_params(jax.device_get(t.state["params"]))
    finally:
        t.close()
    np.testing.assert_allclose(losses[0], [h["loss"] for h in hist], rtol=1e-6, atol=1e-6)
    two = load_trainable_params(tmp_path / "two" / "checkpoints")
    assert two.keys() == ref.keys()
    for k in two:
        np.testing.assert_allclose(two[k], ref[k], atol=2e-6, rtol=1e-5, err_msg=k)


KILLED = textwrap.dedent('''
    import json, sys, time
    from pathlib import Path
    import numpy as np
    from vllama_jax.train.config import train_config_from_dict
    from vllama_jax.train.loop import Trainer

    cfg = train_config_from_dict(json.loads(sys.argv[1]))
    marker = Path(sys.argv[2])
    t = Trainer(cfg)
    t.run(3)  # step 3 is saved normally
    from vllama_jax.tree import flatten_params
    np.savez(marker.parent / "step3.npz", **{k: np.asarray(v) for k, v in flatten_params(t.state["params"]).items()})

    # From now on the commit of an async save (the rename of its temporary folder) hangs: the save of step 6
    # is in flight when the test kills us.
    from orbax.checkpoint._src.checkpointers import async_checkpointer as ac

    def stuck(*args, **kwargs):
        marker.write_text("save in flight")
        time.sleep(600)

    ac._on_commit_callback = stuck
    t.run(3)
''')


@pytest.mark.slow
def test_kill_during_async_save_keeps_previous_checkpoint(tiny_dir: Path, tmp_path: Path):
    d = tiny_config_dict(tiny_dir, tmp_path, max_steps=6, dropout=False)
    marker = tmp_path / "in_flight"
    p = subprocess.Popen([sys.executable, "-c", KILLED, json.dumps(d), str(marker)], env=subprocess_env(8),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600
        while not marker.exists():
            assert p.poll() is None, p.communicate()[1][-3000:]
            assert time.time() < deadline, "the save of step 6 never started"
            time.sleep(0.2)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == -signal.SIGKILL
    ckpt = tmp_path / "checkpoints"
    assert any("tmp" in c.name for c in ckpt.iterdir()), list(ckpt.iterdir())  # step 6 was mid-write
    assert not (ckpt / "6").exists()

    saved = np.load(tmp_path / "step3.npz")
    t = Trainer(tiny_config(tiny_dir, tmp_path, max_steps=6, dropout=False)).setup()
    try:
        assert int(t.state["step"]) == 3
        restored = flatten_params(t.state["params"])
        for k in saved.files:
            np.testing.assert_array_equal(np.asarray(restored[k]), saved[k], err_msg=k)
        t.run()  # and training goes on from there
        assert int(t.state["step"]) == 6
    finally:
        t.close()
