"""Readers for upstream weight files: name -> numpy array, lazily, one tensor at a time.

Supported: PyTorch `.pth`/`.bin` (read with `torch.load(weights_only=True, mmap=True)`, so a pickle that is not
plain weights is refused and tensors are paged in on access), safetensors (single or sharded with an index),
HF model folders, and GGUF files (`GGUFSource`: dequantized, q/k rows un-permuted into the HF layout). Every failure
is a `WeightsError` naming the file and the reason.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any, Iterator, Mapping

import gguf
import ml_dtypes
import numpy as np
from gguf.quants import dequantize
from safetensors import safe_open

from ..errors import VllamaError


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
    import torch  # optional dependency (the `torch` extra), needed only for .pth files; ~1.4 s to import

    if t.dtype == torch.bfloat16:
        # numpy has no bfloat16; go through ml_dtypes so the bits are kept exactly
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
        import torch  # optional dependency (the `torch` extra), needed only for .pth files; ~1.4 s to import

        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=_is_zip(self.path))
        except pickle.UnpicklingError as e:
            raise WeightsError(
                self.path, f"not a plain weights file (refused by torch.load(weights_only=True): {_first_line(e)})"
            ) from None
        except Exception as e:  # noqa: BLE001 - torch's unpickler raises KeyError, IndexError, struct.error...
            # on damaged pickles and zips: whatever torch.load raises on this file is the file's fault
            raise WeightsError(self.path, f"unreadable or truncated PyTorch file ({type(e).__name__}: "
                                          f"{_first_line(e)})") from None
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
        except Exception as e:  # noqa: BLE001 - mmap'ed storage past the end of a truncated file, a damaged dtype
            raise WeightsError(self.path, f"cannot read tensor {key!r} ({_first_line(e)})") from None


#: safetensors dtype names -> numpy dtypes (the ones `SafetensorsSource.get` maps without a copy)
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                       "BOOL": np.bool_}


class SafetensorsSource(TensorSource):
    """A safetensors file. Tensors are read-only views of the memory-mapped file (no copy: the safetensors
    package's numpy reader copies each tensor out of its own mapping, which doubled a conversion's resident set)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        _check_file(self.path)
        try:
            self._f = safe_open(str(self.path), framework="numpy")  # validates the header against the file size
            self._keys = list(self._f.keys())
        except Exception as e:  # safetensors raises its own SafetensorError
            raise WeightsError(self.path, f"unreadable or truncated safetensors file ({_first_line(e)})") from None
        self._map: np.memmap | None = None
        self._entries: dict[str, Any] = {}
        try:
            with open(self.path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                self._entries = {k: v for k, v in json.loads(f.read(n)).items() if k != "__metadata__"}
            self._data_start = 8 + n
        except (OSError, ValueError):  # safe_open accepted it: fall back to its reader
            self._entries = {}

    def keys(self) -> list[str]:
        return self._keys

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._f.get_slice(key).get_shape())

    def _view(self, key: str) -> np.ndarray | None:
        e = self._entries.get(key)
        dtype = _SAFETENSORS_DTYPES.get(e["dtype"]) if e else None
        if dtype is None:
            return None
        if self._map is None:
            self._map = np.memmap(self.path, np.uint8, mode="r")
        start, end = e["data_offsets"]
        return np.asarray(self._map[self._data_start + start:self._data_start + end]).view(dtype).reshape(e["shape"])

    def get(self, key: str) -> np.ndarray:
        try:
            view = self._view(key)
            if view is not None:
                return view
            return self._f.get_tensor(key)
        except Exception as e:
            # bf16 tensors cannot be read with framework="numpy": fall back to torch
            if "bf16" in str(e).lower() or "bfloat16" in str(e).lower():
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


# ------------------------------------------------------------------------------------------------------------
# GGUF (llama.cpp)
#
# Tensors are dequantized to float32 one at a time with the `gguf` package and returned in numpy order (GGUF lists
# dims fastest-first, i.e. reversed). llama.cpp's converter permutes the rows of the q/k projections of `llama`
# models (it interleaves each head's two RoPE halves); `GGUFSource.get` undoes that permutation, so every tensor
# comes out in the HF layout and the HF-style key map / model can use it unchanged (`raw=True` skips it).

# Architectures whose q/k rows llama.cpp's converter permuted (`LlamaModel.permute` in convert_hf_to_gguf).
_PERMUTED_ARCHS = ("llama",)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k permutation: rows (n_head, Dh/2, 2) -> (n_head, 2, Dh/2), i.e. from the
    interleaved RoPE pairs back to HF's rotate_half halves. `n_head` is the head count of this projection
    (num_kv_heads for k)."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows cannot be split into {n_head} heads of even size")
    half = rows // n_head // 2
    return np.ascontiguousarray(w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


class GGUFSource(TensorSource):
    """A .gguf file: `.keys()` are GGUF tensor names (`token_embd.weight`, `blk.0.attn_q.weight`, ...),
    `.get` dequantizes to float32, `.metadata` holds the key/value header."""

    def __init__(self, path: str | Path, raw: bool = False):
        self.path = Path(path)
        _check_file(self.path)
        try:
            self._reader = gguf.GGUFReader(str(self.path), "r")
            self._tensors = {t.name: t for t in self._reader.tensors}
        except Exception as e:  # bad magic, truncated header, tensor data past the end of the file, ...
            raise WeightsError(self.path, f"unreadable or truncated GGUF file ({_first_line(e)})") from None
        # The reader maps tensor data lazily; check now that every tensor's bytes are inside the file.
        size = self.path.stat().st_size
        for t in self._tensors.values():
            if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
                raise WeightsError(self.path, f"truncated GGUF file: tensor {t.name!r} extends past the end")
        self._metadata: dict[str, Any] | None = None
        arch = self.field("general.architecture")
        self._unpermute = (not raw) and arch in _PERMUTED_ARCHS
        self._heads = self.field(f"{arch}.attention.head_count") if arch else None
        self._kv_heads = self.field(f"{arch}.attention.head_count_kv", self._heads) if arch else None

    # -- metadata --------------------------------------------------------------------------------------------

    def field(self, key: str, default: Any = None) -> Any:
        """One metadata value (str, int, float, bool or list), or `default` when absent."""
        f = self._reader.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except Exception as e:
            raise WeightsError(self.path, f"cannot read GGUF metadata {key!r} ({_first_line(e)})") from None

    def array_length(self, key: str) -> int | None:
        """Number of items of an array-valued metadata field (e.g. the token list) without decoding them."""
        f = self._reader.fields.get(key)
        return None if f is None else len(f.data)

    @property
    def metadata(self) -> dict[str, Any]:
        """All metadata key/values (the GGUF.* header fields excluded). Built on first access."""
        if self._metadata is None:
            self._metadata = {k: self.field(k) for k in self._reader.fields if not k.startswith("GGUF.")}
        return self._metadata

    # -- tensors ---------------------------------------------------------------------------------------------

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[key].shape.tolist()))

    def tensor_type(self, key: str) -> str:
        """The GGML storage type name (F32, F16, Q4_1, Q8_0, ...)."""
        return self._tensors[key].tensor_type.name

    def get(self, key: str) -> np.ndarray:
        t = self._tensors[key]
        try:
            if t.data.dtype == np.uint8:  # block-quantized (and bf16) types are stored as raw bytes
                a = dequantize(t.data, t.tensor_type)
            else:
                a = t.data
            a = np.asarray(a, dtype=np.float32).reshape(self.shape(key))
        except Exception as e:
            raise WeightsError(self.path, f"cannot dequantize tensor {key!r} ({t.tensor_type.name}: "
                                          f"{_first_line(e)})") from None
        if self._unpermute and a.ndim == 2:
            if key.endswith(".attn_q.weight"):
                a = self._unpermute_or_fail(key, a, self._heads)
            elif key.endswith(".attn_k.weight"):
                a = self._unpermute_or_fail(key, a, self._kv_heads)
        return a

    def _unpermute_or_fail(self, key: str, a: np.ndarray, heads: Any) -> np.ndarray:
        if not isinstance(heads, int) or heads <= 0:
            raise WeightsError(self.path, f"cannot un-permute {key!r}: no usable attention.head_count metadata")
        try:
            return unpermute_qk(a, heads)
        except ValueError as e:
            raise WeightsError(self.path, f"cannot un-permute {key!r}: {e}") from None


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
            files = _index_shards(index)
            missing = [f for f in files if not (folder / f).is_file()]
            if missing:
                raise WeightsError(index, f"lists shard files that are missing: {', '.join(missing)}")
            return ShardedSource(folder, [open_weights(folder / f) for f in files])
        if (folder / single_name).exists():
            return open_weights(folder / single_name)
    raise WeightsError(folder, "no model.safetensors(.index.json) or pytorch_model.bin(.index.json) in this folder")


def _index_shards(index: Path) -> list[str]:
    """The shard files a weight index names: plain file names beside the index (a path that leaves the folder,
    or a value that is not a file name, is a broken index, not something to open)."""
    try:
        weight_map = json.loads(index.read_bytes())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise WeightsError(index, f"not a valid weight index ({_first_line(e)})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsError(index, "not a valid weight index ('weight_map' is not a non-empty object)")
    for key, f in weight_map.items():
        if not isinstance(f, str) or not f or Path(f).name != f or f in (".", "..") or len(f) > 255 or "\0" in f:
            raise WeightsError(index, f"not a valid weight index (tensor {key[:80]!r} maps to {str(f)[:80]!r}, "
                                      "not a shard file name)")
    return sorted(set(weight_map.values()))


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
