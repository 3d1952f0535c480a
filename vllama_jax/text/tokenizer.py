"""Tokenizers with Video-LLaMA's two media placeholder tokens.

Two families:

* ``"llama_sp"`` — a LLaMA SentencePiece model (``tokenizer.model`` of a HF LLaMA / Vicuna / LLaMA-2 folder).
  Encoding reproduces the *slow* ``LlamaTokenizer`` of transformers 4.28 (the version Video-LLaMA pins, "legacy"
  behaviour) exactly, implemented directly on ``sentencepiece.SentencePieceProcessor`` so that it does not depend on
  whichever transformers version is installed:

  1. the text is split around the special / added tokens (``<s>``, ``</s>``, ``<unk>``, ``<ImageHere>``,
     ``<AudioHere>`` and any token from ``added_tokens.json``); at each position the longest match wins;
  2. whitespace adjacent to a *plain-string* added token (``<ImageHere>``, ``<AudioHere>``, non-special entries of
     ``added_tokens.json``) is stripped on both sides; the tokenizer's own special tokens (``<s>``, ``</s>``,
     ``<unk>``, a configured pad token) are ``AddedToken(lstrip=False, rstrip=False)`` and strip nothing;
  3. every remaining non-empty chunk is encoded by SentencePiece on its own (so each chunk gets the dummy ``▁``
     prefix); special/added tokens map to their ids (``<s>`` -> 1, ``</s>`` -> 2);
  4. BOS is prepended only on request (``add_bos``).

  Decoding reproduces 4.28's ``LlamaTokenizer.decode`` (special tokens kept unless skipped, added tokens joined with
  single spaces, a space inserted before a special token that follows ordinary text).

* ``"hf"`` — anything else, built through transformers (a GGUF file such as SmolLM2's GPT2-style BPE, or a folder
  with ``tokenizer.json``). The placeholders are added as special tokens (no whitespace stripping), bos/eos/pad and
  the chat template come from the GGUF metadata.

The placeholder ids are ``base_vocab_size`` and ``base_vocab_size + 1`` (LLaMA-2: 32000 / 32001); the LLM embedding
table is *not* resized for them (upstream behaviour, see upstream.md §5.2).

``load_tokenizer`` (``tokenizer_files.py``) finds the files of either family and builds the tokenizer.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from ..errors import VllamaError

IMAGE_PLACEHOLDER = "<ImageHere>"
AUDIO_PLACEHOLDER = "<AudioHere>"
PLACEHOLDERS = (IMAGE_PLACEHOLDER, AUDIO_PLACEHOLDER)

#: metadata file written by :meth:`Tokenizer.save` next to the tokenizer files
META_FILE = "vllama_tokenizer.json"


class TokenizerError(VllamaError):
    """A tokenizer could not be loaded; names the file and the reason."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def token_content(tok) -> str | None:
    """A special token as stored in tokenizer_config.json / special_tokens_map.json (str, AddedToken dict, None)."""
    if tok is None:
        return None
    if isinstance(tok, str):
        return tok
    if isinstance(tok, dict):
        return tok.get("content")
    return str(tok)


def _as_list(ids) -> list:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return list(ids)


_SURROGATE = re.compile("[\ud800-\udfff]")


def scalar_text(text: str) -> str:
    """``text`` with every surrogate code point replaced by U+FFFD. A Python str can hold lone surrogates (from a
    JSON ``\\ud800`` escape, a bad decode with ``surrogateescape``); no UTF-8 encoder (SentencePiece, HF tokenizers)
    accepts them, and replacing is what a UTF-8 reader does with the equivalent bytes."""
    return _SURROGATE.sub("\ufffd", text) if _SURROGATE.search(text) else text


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")



def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (4.28 and 5.x alike): drop the space before . ? ! , and English
    contractions, as `decode(..., clean_up_tokenization_spaces=True)` does."""
    return (text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",").replace(" ' ", "'")
            .replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s").replace(" 've", "'ve")
            .replace(" 're", "'re"))


class Tokenizer:
    """Common interface. Use :func:`load_tokenizer` to build one.

    Attributes: ``bos_id``, ``eos_id``, ``pad_id``, ``unk_id`` (``None`` if the model has none), ``base_vocab_size``
    (without the two placeholders), ``image_placeholder_id`` (= ``base_vocab_size``), ``audio_placeholder_id``
    (= ``base_vocab_size + 1``), ``chat_template`` (jinja string or ``None``), ``family`` (``"llama_sp"`` / ``"hf"``),
    ``adds_bos`` / ``adds_eos`` (what the model's own ``tokenizer(text)`` adds by default; LLaMA: BOS only).

    ``clean_up_tokenization_spaces``: whether ``decode`` applies :func:`clean_up_tokenization` by default, as the
    source tokenizer's files say (transformers semantics; ``decode(..., clean_up_tokenization_spaces=...)``
    overrides it per call).

    ``pad_id`` is the model tokenizer's pad token if its files name one, else ``unk`` (upstream
    ``pad_token = unk_token``). Upstream's *instruction* datasets always pad with ``unk`` (0):
    use :attr:`instruct_pad_id` for them.
    """

    family: str = ""
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int | None
    base_vocab_size: int
    image_placeholder_id: int
    audio_placeholder_id: int
    chat_template: str | None = None
    adds_bos: bool = True
    adds_eos: bool = False
    source: str = ""

    # ---- interface -------------------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None) -> str:
        raise NotImplementedError

    @property
    def clean_up_tokenization_spaces(self) -> bool:
        raise NotImplementedError

    def save(self, directory) -> None:
        raise NotImplementedError

    def id_to_token(self, i: int) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    # ---- shared helpers --------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Total number of ids including the two placeholders."""
        return self.base_vocab_size + 2

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def instruct_pad_id(self) -> int:
        """Pad id of upstream's instruction datasets (``pad_token = unk_token`` unconditionally)."""
        return self.unk_id if self.unk_id is not None else self.pad_id

    @property
    def special_ids(self) -> set[int]:
        """Ids dropped by ``decode(skip_special_tokens=True)``."""
        s = {self.bos_id, self.eos_id, self.pad_id}
        if self.unk_id is not None:
            s.add(self.unk_id)
        return s

    def encode_with_special(self, text: str) -> list[int]:
        """What the model's own ``tokenizer(text)`` (``add_special_tokens=True``) returns."""
        return self.encode(text, add_bos=self.adds_bos, add_eos=self.adds_eos)

    def encode_batch(self, texts: Iterable[str], add_bos: bool = False) -> list[list[int]]:
        return [self.encode(t, add_bos=add_bos) for t in texts]

    def _meta(self) -> dict:
        return {
            "family": self.family,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "unk_id": self.unk_id,
            "base_vocab_size": self.base_vocab_size,
            "image_placeholder_id": self.image_placeholder_id,
            "audio_placeholder_id": self.audio_placeholder_id,
            "adds_bos": self.adds_bos,
            "adds_eos": self.adds_eos,
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(family={self.family!r}, base_vocab_size={self.base_vocab_size}, "
            f"bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id}, unk={self.unk_id}, "
            f"image={self.image_placeholder_id}, audio={self.audio_placeholder_id}, source={self.source!r})"
        )


# ====================================================================================================================
# SentencePiece LLaMA tokenizer (transformers 4.28 slow LlamaTokenizer semantics)
# ====================================================================================================================
class LlamaSPTokenizer(Tokenizer):
    family = "llama_sp"

    def __init__(
        self,
        model_file=None,
        *,
        model_proto: bytes | None = None,
        source: str | None = None,
        config: dict | None = None,
        added_tokens: dict[str, int] | None = None,
        special_tokens_map: dict | None = None,
        chat_template: str | None = None,
        pad_id: int | None = None,
    ):
        """From a SentencePiece model file (``model_file``) or its serialized bytes (``model_proto``, e.g. rebuilt
        from a GGUF; ``source`` names where it came from)."""
        if model_proto is None:
            if model_file is None:
                raise TypeError("LlamaSPTokenizer needs model_file or model_proto")
            model_file = Path(model_file)
            if not model_file.is_file():
                raise TokenizerError(model_file, "no such file")
            try:
                model_proto = model_file.read_bytes()
            except OSError as e:
                raise TokenizerError(model_file, f"cannot read ({e.strerror or e})") from e
        where = source or str(model_file)
        self.source = where
        sp = spm.SentencePieceProcessor()
        try:
            ok = sp.LoadFromSerializedProto(model_proto)
        except Exception as e:  # sentencepiece raises RuntimeError / OSError with a parser message
            raise TokenizerError(where, f"not a SentencePiece model ({type(e).__name__}: {e})") from e
        if ok is False or sp.get_piece_size() == 0:
            raise TokenizerError(where, "not a SentencePiece model (empty vocabulary)")
        self.sp = sp
        self._model_proto = bytes(model_proto)
        cfg = dict(config or {})
        stm = dict(special_tokens_map or {})
        self.config = cfg
        # 4.28's LlamaTokenizer defaults to False when tokenizer_config.json does not say
        self._clean_up = bool(cfg.get("clean_up_tokenization_spaces", False))
        n_sp = sp.get_piece_size()

        def piece_id(tok: str | None, default: int) -> int:
            if tok is None:
                return default
            if tok in (added_tokens or {}):
                return added_tokens[tok]
            i = sp.piece_to_id(tok)
            if 0 <= i < n_sp and sp.id_to_piece(i) == tok:
                return i
            return default

        bos_tok = token_content(cfg.get("bos_token", stm.get("bos_token"))) or "<s>"
        eos_tok = token_content(cfg.get("eos_token", stm.get("eos_token"))) or "</s>"
        unk_tok = token_content(cfg.get("unk_token", stm.get("unk_token"))) or "<unk>"
        pad_tok = token_content(cfg.get("pad_token", stm.get("pad_token")))
        self.bos_id = piece_id(bos_tok, sp.bos_id())
        self.eos_id = piece_id(eos_tok, sp.eos_id())
        unk = piece_id(unk_tok, sp.unk_id())
        self.unk_id = unk if unk >= 0 else None
        self.adds_bos = bool(cfg.get("add_bos_token", True))
        self.adds_eos = bool(cfg.get("add_eos_token", False))
        self.chat_template = chat_template

        # tokens with an id >= n_sp (added_tokens.json, e.g. Vicuna v0's "[PAD]"), placeholders excluded
        self._added: dict[str, int] = {}
        placeholder_ids: dict[str, int] = {}
        for tok, i in sorted((added_tokens or {}).items(), key=lambda kv: kv[1]):
            if tok in PLACEHOLDERS:
                placeholder_ids[tok] = int(i)
            elif int(i) >= n_sp:
                self._added[tok] = int(i)
        self.base_vocab_size = n_sp + len(self._added)
        if self._added and max(self._added.values()) != self.base_vocab_size - 1:
            raise TokenizerError(where, f"added token ids are not contiguous after {n_sp}: {self._added}")
        self.image_placeholder_id = placeholder_ids.get(IMAGE_PLACEHOLDER, self.base_vocab_size)
        self.audio_placeholder_id = placeholder_ids.get(AUDIO_PLACEHOLDER, self.image_placeholder_id + 1)
        if pad_id is not None:
            self.pad_id = int(pad_id)
        else:
            pad = piece_id(pad_tok, -1) if pad_tok is not None else -1
            self.pad_id = pad if pad >= 0 else (self.unk_id if self.unk_id is not None else 0)

        # Special tokens of the tokenizer (AddedToken(lstrip=False, rstrip=False) in 4.28: nothing stripped).
        self._special_tokens: dict[str, int] = {}
        for tok, i in ((unk_tok, self.unk_id), (bos_tok, self.bos_id), (eos_tok, self.eos_id), (pad_tok, self.pad_id)):
            if tok is not None and i is not None and i >= 0:
                self._special_tokens[tok] = i
        # Plain-string added tokens (whitespace stripped on both sides).
        self._stripping: dict[str, int] = {
            IMAGE_PLACEHOLDER: self.image_placeholder_id,
            AUDIO_PLACEHOLDER: self.audio_placeholder_id,
        }
        for tok, i in self._added.items():
            if tok not in self._special_tokens:
                self._stripping[tok] = i
            # an added token that is also a special token (e.g. pad "[PAD]") keeps no-strip semantics
        self._no_split: dict[str, int] = {**self._special_tokens, **self._added, **self._stripping}
        self._id_to_added: dict[int, str] = {i: t for t, i in {**self._added, **self._stripping}.items()}
        self._special_token_strings = set(self._special_tokens)
        # leftmost match, longest token first at a position (regex alternation order) == 4.28's trie split here
        self._split_re = re.compile(
            "(" + "|".join(re.escape(t) for t in sorted(self._no_split, key=len, reverse=True)) + ")"
        )

    # ---- encode ---------------------------------------------------------------------------------------------
    def _split(self, text: str) -> list[str]:
        """Split around no-split tokens, keeping the tokens (no empty pieces)."""
        return [p for p in self._split_re.split(text) if p]

    def tokenize(self, text: str) -> list[str]:
        """Token strings (SentencePiece pieces / special tokens), as 4.28's ``tokenize``."""
        out: list[str] = []
        for chunk in self._chunks(scalar_text(text)):
            if chunk in self._no_split:
                out.append(chunk)
            else:
                out.extend(self.sp.encode(chunk, out_type=str))
        return out

    def _chunks(self, text: str) -> list[str]:
        tokens = self._split(text)
        for i, tok in enumerate(tokens):
            if tok in self._stripping and tok in self._no_split:
                # plain-string added token: strip the neighbours (left after right, like 4.28; in place, so a
                # neighbour already emptied is skipped)
                if i + 1 < len(tokens) and tokens[i + 1]:
                    tokens[i + 1] = tokens[i + 1].lstrip()
                if i > 0 and tokens[i - 1]:
                    tokens[i - 1] = tokens[i - 1].rstrip()
        return [t for t in tokens if t]

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids: list[int] = [self.bos_id] if add_bos else []
        for chunk in self._chunks(scalar_text(text)):
            tid = self._no_split.get(chunk)
            if tid is not None:
                ids.append(tid)
            else:
                ids.extend(self.sp.encode(chunk))
        if add_eos:
            ids.append(self.eos_id)
        return ids

    # ---- decode ---------------------------------------------------------------------------------------------
    def id_to_token(self, i: int) -> str:
        i = int(i)
        if i in self._id_to_added:
            return self._id_to_added[i]
        if 0 <= i < self.sp.get_piece_size():
            return self.sp.id_to_piece(i)
        raise IndexError(f"token id {i} out of range (vocabulary of {self.vocab_size})")

    def token_to_id(self, token: str) -> int | None:
        if token in self._no_split:
            return self._no_split[token]
        i = self.sp.piece_to_id(token)
        if 0 <= i < self.sp.get_piece_size() and self.sp.id_to_piece(i) == token:
            return i
        return None

    def _tokens_to_string(self, tokens: list[str]) -> str:
        # 4.28 LlamaTokenizer.convert_tokens_to_string
        cur: list[str] = []
        out = ""
        prev_special = False
        for i, tok in enumerate(tokens):
            if tok in self._special_token_strings:
                if not prev_special and i != 0:
                    out += " "
                out += self.sp.decode_pieces(cur) + tok
                prev_special = True
                cur = []
            else:
                cur.append(tok)
                prev_special = False
        return out + self.sp.decode_pieces(cur)

    @property
    def clean_up_tokenization_spaces(self) -> bool:
        return self._clean_up

    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None) -> str:
        ids = [int(i) for i in _as_list(ids)]
        if skip_special_tokens:
            skip = set(self._special_tokens.values())
            ids = [i for i in ids if i not in skip]
        # 4.28 PreTrainedTokenizer._decode: added tokens are separate sub-texts joined with " "
        sub_texts: list[str] = []
        cur: list[str] = []
        for i in ids:
            tok = self.id_to_token(i)
            if i in self._id_to_added:
                if cur:
                    sub_texts.append(self._tokens_to_string(cur))
                    cur = []
                sub_texts.append(tok)
            else:
                cur.append(tok)
        if cur:
            sub_texts.append(self._tokens_to_string(cur))
        text = " ".join(sub_texts)
        clean = self._clean_up if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        return clean_up_tokenization(text) if clean else text

    # ---- save -----------------------------------------------------------------------------------------------
    def save(self, directory) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "tokenizer.model").write_bytes(self._model_proto)
        inv = {i: t for t, i in self._special_tokens.items()}
        cfg = {
            "tokenizer_class": "LlamaTokenizer",
            "add_bos_token": self.adds_bos,
            "add_eos_token": self.adds_eos,
            "bos_token": inv.get(self.bos_id, "<s>"),
            "eos_token": inv.get(self.eos_id, "</s>"),
            "unk_token": inv.get(self.unk_id, "<unk>") if self.unk_id is not None else None,
            "pad_token": None if self.pad_id == self.unk_id else inv.get(self.pad_id),
            "clean_up_tokenization_spaces": self._clean_up,
            "legacy": True,
        }
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        _write_json(d / "tokenizer_config.json", cfg)
        _write_json(
            d / "special_tokens_map.json",
            {k: v for k, v in cfg.items() if k.endswith("_token") and isinstance(v, str)},
        )
        if self._added:
            _write_json(d / "added_tokens.json", dict(self._added))
        _write_json(d / META_FILE, self._meta())


# ====================================================================================================================
# transformers-backed tokenizer (GGUF BPE, tokenizer.json folders)
# ====================================================================================================================
class HFTokenizer(Tokenizer):
    family = "hf"

    def __init__(self, hf_tokenizer, *, source: str, meta: dict | None = None):
        self.hf = hf_tokenizer
        self.source = source
        meta = dict(meta or {})
        t = hf_tokenizer
        existing = {tok: t.convert_tokens_to_ids(tok) for tok in PLACEHOLDERS}
        unk_id_guess = t.unk_token_id
        have = {k: v for k, v in existing.items() if v is not None and v != unk_id_guess and k in t.get_vocab()}
        if len(have) == 2:
            self.base_vocab_size = meta.get("base_vocab_size", min(have.values()))
        else:
            self.base_vocab_size = len(t)
            t.add_tokens([tok for tok in PLACEHOLDERS if tok not in have], special_tokens=True)
        self.image_placeholder_id = int(t.convert_tokens_to_ids(IMAGE_PLACEHOLDER))
        self.audio_placeholder_id = int(t.convert_tokens_to_ids(AUDIO_PLACEHOLDER))

        def pick(key, attr):
            v = meta.get(key)
            if v is None:
                v = getattr(t, attr, None)
            return None if v is None else int(v)

        self.bos_id = pick("bos_id", "bos_token_id")
        self.eos_id = pick("eos_id", "eos_token_id")
        self.unk_id = pick("unk_id", "unk_token_id")
        pad = pick("pad_id", "pad_token_id")
        if self.eos_id is None:
            raise TokenizerError(source, "the tokenizer defines no end-of-sequence token")
        if self.bos_id is None:  # some BPE models have no BOS; fall back to EOS (never added unless asked)
            self.bos_id = self.eos_id
        self.pad_id = pad if pad is not None else (self.unk_id if self.unk_id is not None else self.eos_id)
        self.adds_bos = bool(meta.get("adds_bos", False))
        self.adds_eos = bool(meta.get("adds_eos", False))
        self.chat_template = meta.get("chat_template") or getattr(t, "chat_template", None)
        if isinstance(self.chat_template, dict):
            self.chat_template = self.chat_template.get("default") or next(iter(self.chat_template.values()), None)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = list(self.hf.encode(scalar_text(text), add_special_tokens=False)) if text else []
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of ``text`` (no BOS) and the character span of every token."""
        enc = self.hf(scalar_text(text), add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    @property
    def clean_up_tokenization_spaces(self) -> bool:
        return bool(self.hf.clean_up_tokenization_spaces)  # transformers read it from the source files

    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None) -> str:
        ids = [int(i) for i in _as_list(ids)]
        if skip_special_tokens:
            # the model's special tokens; the placeholders are kept (as for the LLaMA tokenizer)
            skip = (self.special_ids | set(self.hf.all_special_ids)) - {self.image_placeholder_id, self.audio_placeholder_id}
            ids = [i for i in ids if i not in skip]
        return self.hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=clean_up_tokenization_spaces)

    def id_to_token(self, i: int) -> str:
        tok = self.hf.convert_ids_to_tokens(int(i))
        if tok is None:
            raise IndexError(f"token id {i} out of range")
        return tok

    def token_to_id(self, token: str) -> int | None:
        i = self.hf.convert_tokens_to_ids(token)
        if i is None or (i == self.unk_id and token != self.hf.unk_token):
            return None
        return int(i)

    def save(self, directory) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(d))
        meta = self._meta()
        meta["chat_template"] = self.chat_template
        _write_json(d / META_FILE, meta)


__all__ = [
    "clean_up_tokenization",
    "IMAGE_PLACEHOLDER",
    "AUDIO_PLACEHOLDER",
    "PLACEHOLDERS",
    "TokenizerError",
    "Tokenizer",
    "LlamaSPTokenizer",
    "HFTokenizer",
]
