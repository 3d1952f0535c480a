"""Finding and reading tokenizer files: ``load_tokenizer`` (HF LLaMA folders, SentencePiece models, GGUF files,
``tokenizer.json`` folders, folders written by ``Tokenizer.save``) and ``read_gguf_metadata`` (GGUF header
key/values). The tokenizer families themselves are in ``tokenizer.py``.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from sentencepiece import sentencepiece_model_pb2

from .tokenizer import META_FILE, HFTokenizer, LlamaSPTokenizer, Tokenizer, TokenizerError, token_content

# transformers is imported inside the functions that build an "hf" tokenizer: it takes seconds to import, and the
# SentencePiece family (every LLaMA / Vicuna / LLaMA-2 model) never needs it.


def _read_json(path: Path, missing_ok: bool = True) -> dict:
    if not path.is_file():
        if missing_ok:
            return {}
        raise TokenizerError(path, "no such file")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerError(path, f"unreadable JSON ({e})") from e
    if not isinstance(data, dict):
        raise TokenizerError(path, "expected a JSON object")
    return data


def _chat_template_from_config(cfg: dict, folder: Path | None) -> str | None:
    tpl = cfg.get("chat_template")
    if isinstance(tpl, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default") or next(iter(named.values()), None)
    if tpl is None and folder is not None and (folder / "chat_template.jinja").is_file():
        tpl = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if tpl is None and folder is not None and (folder / "chat_template.json").is_file():
        tpl = _read_json(folder / "chat_template.json").get("chat_template")
    return tpl if isinstance(tpl, str) else None


# ====================================================================================================================
# GGUF metadata (header key/values only)
# ====================================================================================================================
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}


def read_gguf_metadata(path, arrays: Sequence[str] = ()) -> dict:
    """Key/value metadata of a GGUF file (header only, tensors untouched). Arrays are reported as
    ``("array", n)`` except the keys listed in ``arrays``, which are returned in full (lists of str, or numpy arrays
    for numbers). Raises :class:`TokenizerError` for anything that is not a readable GGUF file."""
    path = Path(path)
    want = set(arrays)
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise TokenizerError(path, "not a GGUF file (bad magic)")
            try:
                buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError as e:
                raise TokenizerError(path, f"cannot map the file ({e})") from e
            with buf:
                pos = 4
                size = len(buf)

                def unpack(fmt):
                    nonlocal pos
                    v = struct.unpack_from(fmt, buf, pos)[0]
                    pos += struct.calcsize(fmt)
                    return v

                def string():
                    nonlocal pos
                    n = unpack("<Q")
                    if pos + n > size:
                        raise TokenizerError(path, "truncated GGUF header")
                    s = buf[pos : pos + n].decode("utf-8", errors="replace")
                    pos += n
                    return s

                def value(vt, full=False):
                    nonlocal pos
                    if vt in _GGUF_SCALARS:
                        return unpack(_GGUF_SCALARS[vt])
                    if vt == 8:
                        return string()
                    if vt == 9:
                        et = unpack("<I")
                        n = unpack("<Q")
                        if et in _GGUF_NUMPY:
                            nbytes = np.dtype(_GGUF_NUMPY[et]).itemsize * n
                            if pos + nbytes > size:
                                raise TokenizerError(path, "truncated GGUF header")
                            out = np.frombuffer(buf[pos : pos + nbytes], dtype=_GGUF_NUMPY[et]).copy() if full else ("array", n)
                            pos += nbytes
                            return out
                        if et == 8:
                            if full:
                                return [string() for _ in range(n)]
                            for _ in range(n):
                                ln = unpack("<Q")
                                pos += ln
                            if pos > size:
                                raise TokenizerError(path, "truncated GGUF header")
                            return ("array", n)
                        items = [value(et, full) for _ in range(n)]
                        return items if full else ("array", n)
                    raise TokenizerError(path, f"unknown GGUF value type {vt}")

                version = unpack("<I")
                if version < 2:
                    raise TokenizerError(path, f"unsupported GGUF version {version}")
                unpack("<Q")  # tensor count
                n_kv = unpack("<Q")
                meta = {"GGUF.version": version}
                for _ in range(n_kv):
                    key = string()
                    meta[key] = value(unpack("<I"), key in want)
                return meta
    except OSError as e:
        raise TokenizerError(path, f"cannot read ({e.strerror or e})") from e
    except struct.error as e:
        raise TokenizerError(path, f"truncated or corrupt GGUF header ({e})") from e


# ====================================================================================================================
# loading
# ====================================================================================================================
def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _load_llama_folder(folder: Path, model_file: Path | None = None) -> LlamaSPTokenizer:
    model_file = model_file or folder / "tokenizer.model"
    cfg = _read_json(folder / "tokenizer_config.json")
    stm = _read_json(folder / "special_tokens_map.json")
    added = {k: int(v) for k, v in _read_json(folder / "added_tokens.json").items()}
    # newer tokenizer_config.json files list added tokens in "added_tokens_decoder" {id: {"content": ...}}
    for k, v in (cfg.get("added_tokens_decoder") or {}).items():
        content = token_content(v)
        if content is not None and content not in added:
            added[content] = int(k)
    meta = _read_json(folder / META_FILE)
    tok = LlamaSPTokenizer(
        model_file,
        config=cfg,
        added_tokens=added,
        special_tokens_map=stm,
        chat_template=_chat_template_from_config(cfg, folder),
        pad_id=meta.get("pad_id"),
    )
    return tok


_GGUF_TOKENIZER_KEYS = {  # GGUF key -> transformers' GGUF tokenizer-dict name
    "tokenizer.ggml.model": "tokenizer_type",
    "tokenizer.ggml.pre": "pre_tokenizer_type",
    "tokenizer.ggml.tokens": "tokens",
    "tokenizer.ggml.scores": "scores",
    "tokenizer.ggml.token_type": "token_type",
    "tokenizer.ggml.merges": "merges",
    "tokenizer.ggml.precompiled_charsmap": "precompiled_charsmap",
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.unknown_token_id": "unk_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
    "tokenizer.ggml.add_space_prefix": "add_prefix_space",
}
_GGUF_ARRAYS = (
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.precompiled_charsmap",
)


def _hf_from_gguf_fast(meta: dict):
    """Build the transformers tokenizer from metadata we already parsed, through transformers' own GGUF tokenizer
    converter (what ``AutoTokenizer.from_pretrained(gguf_file=...)`` does, without parsing the file twice with the
    slow ``gguf`` reader). Private transformers API: the caller falls back to the public path on any failure."""
    from transformers import PreTrainedTokenizerFast  # lazy: heavy (see the imports)
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    tdict = {}
    for key, name in _GGUF_TOKENIZER_KEYS.items():
        if key in meta:
            v = meta[key]
            tdict[name] = v.tolist() if hasattr(v, "tolist") else v
    tokens = tdict["tokens"]
    cfg = {}
    if isinstance(meta.get("tokenizer.chat_template"), str):
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    if "tokenizer.ggml.add_bos_token" in meta:
        cfg["add_bos_token"] = bool(meta["tokenizer.ggml.add_bos_token"])
    elif tdict.get("tokenizer_type") == "llama":
        cfg["add_bos_token"] = True
    if "tokenizer.ggml.add_eos_token" in meta:
        cfg["add_eos_token"] = bool(meta["tokenizer.ggml.add_eos_token"])
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        i = meta.get(f"tokenizer.ggml.{key}")
        cfg[name] = tokens[int(i)] if i is not None else None
    backend, extra = convert_gguf_tokenizer(meta["general.architecture"], tdict)
    cfg.update(extra or {})
    return PreTrainedTokenizerFast(tokenizer_object=backend, **cfg)


def _sp_proto_from_gguf(meta: dict) -> bytes:
    """A SentencePiece ``ModelProto`` rebuilt from a GGUF "llama" vocabulary (pieces, scores, types — GGUF token
    types use SentencePiece's numbering). Not stored in GGUF and set as in LLaMA's tokenizer.model: BPE, identity
    normalization, no extra-whitespace removal, byte fallback if there are byte pieces, whitespace-only pieces
    allowed if the vocabulary has any (``▁▁``...), dummy prefix from ``tokenizer.ggml.add_space_prefix`` (default
    on)."""
    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores")
    types = meta.get("tokenizer.ggml.token_type")
    if scores is None or types is None or len(scores) != len(tokens) or len(types) != len(tokens):
        raise ValueError("GGUF llama vocabulary without per-token scores and types")
    m = sentencepiece_model_pb2.ModelProto()
    for tok, sc, ty in zip(tokens, scores.tolist(), types.tolist()):
        piece = m.pieces.add()
        piece.piece = tok
        piece.score = float(sc)
        piece.type = int(ty) if int(ty) in (1, 2, 3, 4, 5, 6) else 1
    ts = m.trainer_spec
    ts.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
    ts.vocab_size = len(tokens)
    ts.byte_fallback = any(int(t) == 6 for t in types.tolist())
    ts.allow_whitespace_only_pieces = any(len(t) > 1 and set(t) == {"\u2581"} for t in tokens)
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    if unk is None:
        unk = next((i for i, t in enumerate(types.tolist()) if int(t) == 2), 0)
    ts.unk_id = int(unk)
    ts.unk_piece = tokens[int(unk)]
    for key, attr in (("bos_token_id", "bos"), ("eos_token_id", "eos")):
        i = meta.get(f"tokenizer.ggml.{key}")
        setattr(ts, f"{attr}_id", int(i) if i is not None else -1)
        if i is not None:
            setattr(ts, f"{attr}_piece", tokens[int(i)])
    ts.pad_id = -1
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    return m.SerializeToString()


def _load_gguf_llama(path: Path, meta: dict) -> LlamaSPTokenizer:
    tokens = meta["tokenizer.ggml.tokens"]

    def tok_of(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None else None

    cfg = {
        "bos_token": tok_of("bos_token_id"),
        "eos_token": tok_of("eos_token_id"),
        "unk_token": tok_of("unknown_token_id"),
        "pad_token": tok_of("padding_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", True)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
    }
    tpl = meta.get("tokenizer.chat_template")
    return LlamaSPTokenizer(
        model_proto=_sp_proto_from_gguf(meta),
        source=str(path),
        config={k: v for k, v in cfg.items() if v is not None},
        chat_template=tpl if isinstance(tpl, str) else None,
    )


def _load_gguf(path: Path) -> Tokenizer:
    """A GGUF's tokenizer. A SentencePiece ("llama") vocabulary becomes a :class:`LlamaSPTokenizer` (exact 4.28
    semantics); anything else (GPT2-style BPE, ...) goes through transformers (:class:`HFTokenizer`)."""
    meta = read_gguf_metadata(path, arrays=_GGUF_ARRAYS)
    if not isinstance(meta.get("tokenizer.ggml.tokens"), list):
        raise TokenizerError(path, "GGUF file without a tokenizer (no tokenizer.ggml.tokens)")
    if meta.get("tokenizer.ggml.model") == "llama" and "tokenizer.ggml.scores" in meta:
        try:
            return _load_gguf_llama(path, meta)
        except (ValueError, TokenizerError) as e:
            warnings.warn(f"{path}: could not rebuild the SentencePiece model ({e}); using transformers' conversion")

    hf = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            hf = _hf_from_gguf_fast(meta)
        except Exception:
            hf = None
        if hf is None:
            try:
                from transformers import AutoTokenizer  # lazy: heavy (see the imports)

                hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            except Exception as e:  # transformers raises many types for unsupported GGUF vocabularies
                raise TokenizerError(
                    path, f"transformers could not build a tokenizer from this GGUF ({type(e).__name__}: {e})"
                ) from e

    def meta_int(key):
        v = meta.get(key)
        return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    tok_meta = {
        "bos_id": meta_int("tokenizer.ggml.bos_token_id"),
        "eos_id": meta_int("tokenizer.ggml.eos_token_id"),
        "unk_id": meta_int("tokenizer.ggml.unknown_token_id"),
        "pad_id": meta_int("tokenizer.ggml.padding_token_id"),
        "adds_bos": bool(meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama")),
        "adds_eos": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "chat_template": meta.get("tokenizer.chat_template") if isinstance(meta.get("tokenizer.chat_template"), str) else None,
    }
    return HFTokenizer(hf, source=str(path), meta=tok_meta)


def _load_hf_folder(folder: Path) -> HFTokenizer:
    meta = _read_json(folder / META_FILE)
    try:
        from transformers import AutoTokenizer  # lazy: heavy (see the imports)

        hf = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise TokenizerError(folder / "tokenizer.json", f"transformers could not load it ({type(e).__name__}: {e})") from e
    if "adds_bos" not in meta:
        meta["adds_bos"] = bool(getattr(hf, "add_bos_token", False))
    return HFTokenizer(hf, source=str(folder), meta=meta)


def load_tokenizer(path) -> Tokenizer:
    """Load a tokenizer and register the ``<ImageHere>`` / ``<AudioHere>`` placeholders.

    ``path`` may be: a HF LLaMA folder (``tokenizer.model``), a SentencePiece model file, a GGUF file, a folder with
    ``tokenizer.json``, a folder written by :meth:`Tokenizer.save`, or a folder containing one of those in a
    ``tokenizer/`` sub-folder or a single ``*.gguf``. A folder with both ``tokenizer.model`` and ``tokenizer.json``
    (LLaMA-2 HF folders) uses the SentencePiece model (exact upstream ids).
    """
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise TokenizerError(p, "no such file or directory")
    if p.is_file():
        if _is_gguf(p):
            return _load_gguf(p)
        if p.name == "tokenizer.json":
            return _load_hf_folder(p.parent)
        if p.name.endswith(".json"):
            raise TokenizerError(p, "not a tokenizer file (expected tokenizer.model, tokenizer.json or a .gguf)")
        # anything else is tried as a SentencePiece model (tokenizer.model, *.model, *.spm)
        return _load_llama_folder(p.parent, model_file=p)
    # directory
    meta = _read_json(p / META_FILE)
    family = meta.get("family")
    if family == "llama_sp" or (family is None and (p / "tokenizer.model").is_file()):
        return _load_llama_folder(p)
    if family == "hf" or (p / "tokenizer.json").is_file():
        return _load_hf_folder(p)
    if (p / "tokenizer").is_dir():
        return load_tokenizer(p / "tokenizer")
    ggufs = sorted(q for q in p.glob("*.gguf") if q.is_file())
    if len(ggufs) == 1:
        return _load_gguf(ggufs[0])
    if len(ggufs) > 1:
        raise TokenizerError(p, f"several GGUF files, pass one explicitly: {[q.name for q in ggufs]}")
    raise TokenizerError(p, "no tokenizer found (looked for tokenizer.model, tokenizer.json, tokenizer/, *.gguf)")


__all__ = ["load_tokenizer", "read_gguf_metadata"]
