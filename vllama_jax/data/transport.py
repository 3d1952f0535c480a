"""Batch frames from grain worker processes to the trainer through memory each worker reuses.

grain hands a worker's batch to the trainer in a fresh POSIX shared-memory block per array. On Linux every page
of a fresh block is allocated and zeroed by the kernel when first written: for a batch of 8 clips of 8 224x224
frames (9.6 MB) 6.3 ms, more than half a sample's decoding, spent in the worker next to the work itself; two
workers then did 1.6x the batches of one on 2 cores, against 1.9x with the frames left out (measured, see
README "Data").

Here a worker keeps a few blocks (``memfd_create``: anonymous files, never named in ``/dev/shm``, so nothing can
leak; freed when the processes that map them end) and copies a batch's media array into a free one
(``FramePool.put``; warm memory: 0.3 ms for those 9.6 MB); the batch carries a small ``FrameSlot`` instead. The
trainer's iterator copies the array out (``receive``, through ``/proc/<worker>/fd/<fd>``) and marks the block
consumed; the worker takes only consumed blocks, creates one while it has fewer than its cap, and otherwise falls
back to an ordinary array (grain's path): it never waits and never overwrites a batch that was not read.

Block layout: 64 header bytes (sequence number uint64, state byte: 1 = written, 0 = consumed), then the array.
"""
from __future__ import annotations

import dataclasses
import mmap
import os
import struct
import threading
from typing import Any

import numpy as np

from .errors import DataError

_HEADER = 64  # bytes before the array (keeps it 64-byte aligned)
_SEQ_STATE = struct.Struct("<QB")
_WRITTEN, _CONSUMED = 1, 0


@dataclasses.dataclass(frozen=True)
class FrameSlot:
    """Where a worker wrote one batch array: its process, the block's descriptor, the array's shape and dtype,
    and the block's sequence number (checked on read, so a stale handle can never yield another batch)."""

    pid: int
    fd: int
    shape: tuple[int, ...]
    dtype: np.dtype  # the object, not its .str: bfloat16's is an opaque '<V2'
    seq: int


class _Block:
    def __init__(self, nbytes: int):
        self.fd = os.memfd_create("vllama-batch", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, _HEADER + nbytes)
        self.map = mmap.mmap(self.fd, _HEADER + nbytes)

    def state(self) -> int:
        return self.map[8]


class FramePool:
    """A worker's reusable blocks, by array size; ``max_blocks`` per size (batches in flight + a margin)."""

    def __init__(self, max_blocks: int):
        self.max_blocks = max_blocks
        self._blocks: dict[int, list[_Block]] = {}
        self._seq = 0
        self._lock = threading.Lock()  # grain may build batches in several read threads

    def _take(self, nbytes: int) -> tuple[_Block, int] | None:
        """A consumed (or new) block of `nbytes`, claimed under the next sequence number; None when none is free."""
        with self._lock:
            blocks = self._blocks.setdefault(nbytes, [])
            block = next((b for b in blocks if b.state() == _CONSUMED), None)
            if block is None and len(blocks) < self.max_blocks:
                block = _Block(nbytes)
                blocks.append(block)
            if block is None:
                return None
            self._seq += 1
            _SEQ_STATE.pack_into(block.map, 0, self._seq, _WRITTEN)
            return block, self._seq

    def put(self, array: np.ndarray) -> FrameSlot | np.ndarray:
        """``array`` copied into a free block: its ``FrameSlot``; with no block free, ``array`` itself."""
        array = np.ascontiguousarray(array)
        taken = self._take(array.nbytes)
        if taken is None:
            return array
        block, seq = taken
        np.copyto(np.ndarray(array.shape, array.dtype, buffer=block.map, offset=_HEADER), array)
        return FrameSlot(os.getpid(), block.fd, array.shape, array.dtype, seq)


_pool: FramePool | None = None  # this process's pool: only ever set in a grain worker process (``enable``)


def enable(max_blocks: int) -> None:
    """In a worker process (its ``worker_init_fn``): batch arrays go through this process's reused blocks."""
    global _pool
    _pool = FramePool(max_blocks) if supported() else None


def worker_pool() -> FramePool | None:
    """This process's pool when it is a worker that ``enable``d one, else None (batches keep their arrays)."""
    return _pool


def receive(value: Any) -> Any:
    """In the trainer: a ``FrameSlot`` -> its array (copied out, the block marked consumed); anything else as is."""
    if not isinstance(value, FrameSlot):
        return value
    path = f"/proc/{value.pid}/fd/{value.fd}"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise DataError(path, f"cannot open the batch memory of data worker process {value.pid} ({e.strerror}); "
                        "where the system forbids it, set data.reuse_worker_memory: false "
                        "(PipelineConfig.reuse_worker_memory)") from None
    try:
        seq, state = _SEQ_STATE.unpack(os.pread(fd, _SEQ_STATE.size, 0))
        if (seq, state) != (value.seq, _WRITTEN):
            raise DataError(path, f"batch {value.seq} of worker {value.pid} was replaced before it was read "
                            f"(block holds {seq}, state {state})")
        out = np.empty(value.shape, value.dtype)
        if out.nbytes and os.preadv(fd, [out.reshape(-1).view(np.uint8)], _HEADER) != out.nbytes:
            raise DataError(path, f"short read of batch {value.seq} from worker {value.pid}")
        # The state byte goes back through a system call after the copy: the worker can only see the block
        # consumed once the copy is done.
        os.pwrite(fd, bytes([_CONSUMED]), 8)
    finally:
        os.close(fd)
    return out


def supported() -> bool:
    """Anonymous memory files and /proc: Linux."""
    return hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")
