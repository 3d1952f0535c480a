"""GGUF (llama.cpp) weight files as a `TensorSource`.

Tensors are dequantized to float32 one at a time with the `gguf` package and returned in numpy order (GGUF lists
dims fastest-first, i.e. reversed). llama.cpp's converter permutes the rows of the q/k projections of `llama`
models (it interleaves each head's two RoPE halves); `GGUFSource.get` undoes that permutation, so every tensor
comes out in the HF layout and the HF-style key map / model can use it unchanged (`raw=True` skips it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .readers import TensorSource, WeightsError, _check_file, _first_line

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
        import gguf

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
        from gguf.quants import dequantize

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
