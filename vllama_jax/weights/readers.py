"""Readers for upstream weight files: name -> numpy array, lazily, one tensor at a time.

Supported: PyTorch `.pth`/`.bin` (read with `torch.load(weights_only=True, mmap=True)`, so a pickle that is not
plain weights is refused and tensors are paged in on access), safetensors (single or sharded with an index),
HF model folders, and GGUF files (dequantized). Every failure is a `WeightsError` naming the file and the reason.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Iterator, Mapping

from ..errors import VllamaError

import numpy as np


class WeightsError(VllamaError):
    """A weight file that cannot be used: the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class TensorSource:
    """A read-only mapping from tensor names to numpy arrays, loaded on access."""

    path: Path

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self, key: str) -> np.ndarray:
        raise NotImplementedError

    def __contains__(self, key: str) -> bool:
        return key in set(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for k in self.keys():
            yield k, self.get(k)

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        # numpy has no bfloat16; go through ml_dtypes so the bits are kept exactly
        import ml_dtypes

        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.detach().contiguous().numpy()


class DictSource(TensorSource):
    """An in-memory mapping (tests, or a state dict already loaded)."""

    def __init__(self, tensors: Mapping[str, np.ndarray], path: str | Path = "<memory>"):
        self.path = Path(str(path))
        self._t = dict(tensors)

    def keys(self) -> list[str]:
        return list(self._t)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(np.shape(self._t[key]))

    def get(self, key: str) -> np.ndarray:
        return np.asarray(self._t[key])


class PthSource(TensorSource):
    """A torch-saved state dict; `{'model': state_dict, ...}` wrappers (LAVIS / Video-LLaMA checkpoints) unwrap."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        _check_file(self.path)
        import pickle

        import torch

        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=_is_zip(self.path))
        except pickle.UnpicklingError as e:
            raise WeightsError(
                self.path, f"not a plain weights file (refused by torch.load(weights_only=True): {_first_line(e)})"
            ) from None
        except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as e:
            raise WeightsError(self.path, f"unreadable or truncated PyTorch file ({_first_line(e)})") from None
        if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
            obj = obj["model"]
        elif isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise WeightsError(self.path, f"expected a state dict, found a {type(obj).__name__}")
        self._t = {}
        for k, v in obj.items():
            if isinstance(v, torch.Tensor):
                self._t[str(k)] = v
        if not self._t:
            raise WeightsError(self.path, "contains no tensors")

    def keys(self) -> list[str]:
        return list(self._t)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._t[key].shape)

    def get(self, key: str) -> np.ndarray:
        try:
            return _torch_to_numpy(self._t[key])
        except RuntimeError as e:  # mmap'ed storage beyond the end of a truncated file
            raise WeightsError(self.path, f"cannot read tensor {key!r} ({_first_line(e)})") from None


class SafetensorsSource(TensorSource):
    def __init__(self, path: str | Path):
        self.path = Path(path)
        _check_file(self.path)
        from safetensors import safe_open

        try:
            self._f = safe_open(str(self.path), framework="numpy")
            self._keys = list(self._f.keys())
        except Exception as e:  # safetensors raises its own SafetensorError
            raise WeightsError(self.path, f"unreadable or truncated safetensors file ({_first_line(e)})") from None

    def keys(self) -> list[str]:
        return self._keys

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._f.get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        try:
            return self._f.get_tensor(key)
        except Exception as e:
            # bf16 tensors cannot be read with framework="numpy": fall back to torch
            if "bf16" in str(e).lower() or "bfloat16" in str(e).lower():
                from safetensors import safe_open

                with safe_open(str(self.path), framework="pt") as f:
                    return _torch_to_numpy(f.get_tensor(key))
            raise WeightsError(self.path, f"cannot read tensor {key!r} ({_first_line(e)})") from None


class ShardedSource(TensorSource):
    """Several sources seen as one (sharded checkpoints with an index)."""

    def __init__(self, path: str | Path, shards: list[TensorSource]):
        self.path = Path(path)
        self._where: dict[str, TensorSource] = {}
        for s in shards:
            for k in s.keys():
                self._where[k] = s

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def get(self, key: str) -> np.ndarray:
        return self._where[key].get(key)


def open_hf_folder(folder: str | Path) -> TensorSource:
    """A HF model folder: safetensors preferred over .bin (as transformers does), single or sharded with index."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(folder, "not a folder")
    for index_name, single_name in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = folder / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise WeightsError(index, f"not a valid weight index ({e})") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (folder / f).exists()]
            if missing:
                raise WeightsError(index, f"lists shard files that are missing: {', '.join(missing)}")
            return ShardedSource(folder, [open_weights(folder / f) for f in files])
        if (folder / single_name).exists():
            return open_weights(folder / single_name)
    raise WeightsError(folder, "no model.safetensors(.index.json) or pytorch_model.bin(.index.json) in this folder")


def open_weights(path: str | Path) -> TensorSource:
    """Open any supported weight file or HF folder by its name/contents."""
    path = Path(path)
    if path.is_dir():
        return open_hf_folder(path)
    _check_file(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return SafetensorsSource(path)
    if suffix == ".gguf" or _magic(path) == b"GGUF":
        from .gguf_reader import GGUFSource

        return GGUFSource(path)
    if suffix in (".pth", ".pt", ".bin", ".ckpt") or _is_zip(path):
        return PthSource(path)
    raise WeightsError(path, f"unknown weight file type {suffix!r} (expected .pth, .bin, .safetensors or .gguf)")


def _check_file(path: Path) -> None:
    if not path.exists():
        raise WeightsError(path, "file not found")
    if not path.is_file():
        raise WeightsError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise WeightsError(path, "file is empty (0 bytes)")


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def _is_zip(path: Path) -> bool:
    return _magic(path)[:2] == b"PK"


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else type(e).__name__
