"""Training checkpoints with Orbax: trainable params, optimizer state, the data iterator, and a small JSON record.

Layout (one folder per saved step, written to a temporary name and renamed when complete, so a run killed during a
save leaves the previous steps intact):

    {output_dir}/checkpoints/{step}/params      trainable params only (fp32), sharded arrays
                                   /opt_state   AdamW moments and counters
                                   /data        grain iterator state, one JSON per process
                                   /meta        {"step", "trainable_groups", "config"}

The frozen towers are never written here: they are read again from the model directory / upstream files on resume.
Saves are asynchronous: `save` returns once the arrays are copied off the devices, the files are written by a
background thread while training goes on. Restores read at most `restore_buffer_bytes` at a time (as model
directories do, `weights.model_dir.restore_limit_bytes`), so a restore holds the arrays plus a bounded buffer.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from ..config import ConfigError
from ..data import checkpoint_args
from ..runtime import return_freed_buffers_to_os
from ..tree import flatten_params
from ..weights.model_dir import RESTORE_BUFFER_BYTES, bounded_pytree_checkpointer, restore_limit_bytes


def _is_grain_iterator(it: Any) -> bool:
    return isinstance(it, grain.DatasetIterator)


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager`: save every `every` steps, keep the last `keep`."""

    def __init__(self, directory: str | Path, *, every: int, keep: int, async_save: bool = True,
                 restore_buffer_bytes: int = RESTORE_BUFFER_BYTES):
        self.directory = Path(directory).absolute()
        self.every = every
        self.restore_limit = restore_limit_bytes(restore_buffer_bytes, 0)
        # the save decision is ours (`should_save`); Orbax only keeps the last `keep`
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        for item in ("params", "opt_state"):
            # Orbax takes the limit in GB and multiplies by 1e9: a fractional value gives the byte limit
            handler = ocp.StandardCheckpointHandler(restore_concurrent_gb=self.restore_limit / 1e9)  # type: ignore[arg-type]
            registry.add(item, ocp.args.StandardSave, handler)
            registry.add(item, ocp.args.StandardRestore, handler)
        self.manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        return step % self.every == 0

    def save(self, step: int, state: dict[str, Any], data_iter: Any, meta: dict[str, Any]) -> bool:
        items: dict[str, Any] = {"params": ocp.args.StandardSave(state["params"]),
                                 "opt_state": ocp.args.StandardSave(state["opt_state"]),
                                 "meta": ocp.args.JsonSave(meta | {"step": int(step)})}
        if data_iter is not None and _is_grain_iterator(data_iter):
            items["data"] = checkpoint_args(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_params: Any, abstract_opt_state: Any, data_iter: Any) -> dict[str, Any]:
        """Restore onto the shardings carried by the abstract trees (`jax.ShapeDtypeStruct(..., sharding=...)`);
        the data iterator is restored in place."""
        largest = max((_largest_shard_bytes(x) for tree in (abstract_params, abstract_opt_state)
                       for x in jax.tree.leaves(tree)), default=0)
        if largest >= self.restore_limit:
            raise ConfigError(f"{self.directory}: a checkpointed array of {largest} bytes is larger than the "
                              f"restore buffer ({self.restore_limit} bytes): pass a larger restore_buffer_bytes")
        return_freed_buffers_to_os()
        items: dict[str, Any] = {"params": ocp.args.StandardRestore(abstract_params),
                                 "opt_state": ocp.args.StandardRestore(abstract_opt_state),
                                 "meta": ocp.args.JsonRestore()}
        if data_iter is not None and _is_grain_iterator(data_iter):
            if (self.directory / str(step) / "data").is_dir():
                items["data"] = checkpoint_args(data_iter, restore=True)
            else:
                logging.warning("checkpoint step %d has no data iterator state: the data stream starts over", step)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return {"params": out["params"], "opt_state": out["opt_state"], "meta": out["meta"]}

    def meta(self, step: int) -> dict[str, Any]:
        """The JSON record of a saved step (read before restoring arrays, to check the config matches)."""
        return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _largest_shard_bytes(x: Any) -> int:
    """Bytes of the largest device shard of an abstract array (the whole array without a sharding)."""
    shape = tuple(getattr(x, "shape", ()))
    sharding = getattr(x, "sharding", None)
    if sharding is not None and hasattr(sharding, "shard_shape"):
        shape = sharding.shard_shape(shape)
    return int(math.prod(shape)) * np.dtype(getattr(x, "dtype", np.float32)).itemsize


def is_training_checkpoint(path: str | Path) -> bool:
    """A checkpoints folder written by `Checkpointer`, or one step folder of it."""
    p = Path(path)
    return p.is_dir() and ((p / "params").is_dir() or any((c / "params").is_dir() for c in p.iterdir()
                                                            if c.is_dir() and c.name.isdigit()))


def load_trainable_params(path: str | Path) -> dict[str, np.ndarray]:
    """Flat {params path: array} of the trainable params in a training checkpoint (the latest step of a checkpoints
    folder, or the given step folder): how stage 2 starts from our stage-1 output (upstream `ckpt`)."""
    p = Path(path).absolute()
    if not (p / "params").is_dir():
        steps = sorted(int(c.name) for c in p.iterdir() if c.is_dir() and c.name.isdigit() and (c / "params").is_dir())
        if not steps:
            raise FileNotFoundError(f"{p}: no training checkpoint step inside")
        p = p / str(steps[-1])
    # as host numpy arrays: the checkpoint may come from another mesh / number of processes
    meta = ocp.PyTreeCheckpointer().metadata(p / "params")
    meta = getattr(meta, "item_metadata", meta)
    meta = getattr(meta, "tree", meta)
    largest = max((_largest_shard_bytes(x) for x in jax.tree.leaves(meta)), default=0)
    return_freed_buffers_to_os()
    ckptr = bounded_pytree_checkpointer(restore_limit_bytes(None, largest))
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    tree = ckptr.restore(p / "params", args=ocp.args.PyTreeRestore(item=None, restore_args=restore_args))
    return {k: np.asarray(v) for k, v in flatten_params(tree).items()}
