"""What is fuzzed: one ``Target`` per input path, with its seed files, its case maker and the call under test.

A case is a file or a folder on disk (so a finding is kept as it is, under ``tests/fuzz/regressions/<target>/``).
``make`` runs in the campaign process and only writes bytes; ``run`` runs in a worker process and calls the
library exactly as a user would, reading everything the call returns, so lazy failures surface too.
"""
from __future__ import annotations

import base64
import contextlib
import ctypes
import dataclasses
import http.client
import json
import os
import random
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tests.fuzz.mutate import mp4_boxes, mutate
from vllama_jax.errors import VllamaError

ROOT = Path(__file__).resolve().parents[2]
TINY_LLAMA_TOKENIZER = ROOT / "tests" / "fixtures" / "tiny_vl" / "llama"
TINY_CONFIG = ROOT / "configs" / "tiny_test.yaml"


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    group: str  # media | weights | data | text: the campaign's case budget is per group
    seeds: Callable[[Path], list[Path]]  # seed folder -> real, valid inputs written there
    make: Callable[[random.Random, list[Path], Path], tuple[str, Path, int]]  # -> (label, case path, items)
    run: Callable[[Path], None]
    names_file: bool = True  # a typed error must name the case's file (false for in-memory inputs: strings)
    # once per worker process, before its first case of this target (a server to start and warm up): its time
    # is not the case's (the campaign allows STARTUP_TIMEOUT for it); a failure there surfaces in the case's run
    setup: Callable[[], None] | None = None


def _header_len(data: bytes) -> int:
    """Bytes that count as the header: the ftyp box of an mp4 (so body damage reaches moov/mdat), else 64."""
    boxes = mp4_boxes(data)
    return boxes[0][1] if boxes else min(64, len(data) // 8)


def _mutated_copy(rng: random.Random, seeds: list[Path], out: Path, header: int | None = None) -> tuple[str, Path, int]:
    seed = rng.choice(seeds)
    data = seed.read_bytes()
    label, new = mutate(rng, data, _header_len(data) if header is None else header)
    path = out.with_suffix(seed.suffix)
    path.write_bytes(new)
    return f"{seed.name}:{label}", path, 1


# ------------------------------------------------------------------------------------------------------ media


def media_seeds(d: Path) -> list[Path]:
    """One clip per container/codec the media tests already make (tests/media_helpers.py)."""
    from tests.media_helpers import make_video

    v = dict(n_frames=12, width=64, height=48)
    return [
        make_video(d / "h264_aac.mp4", **v, audio={"codec": "aac", "seconds": 1.2}),
        make_video(d / "h264_bframes.mp4", **v, gop=4, bframes=2),
        make_video(d / "vp9_opus.webm", codec="libvpx-vp9", **v, audio={"codec": "libopus", "rate": 48000}),
        make_video(d / "h264_flac.mkv", **v, audio={"codec": "flac", "rate": 22050}),
        make_video(d / "mjpeg_pcm.avi", codec="mjpeg", pix_fmt="yuvj420p", **v,
                   audio={"codec": "pcm_s16le", "rate": 16000}),
        make_video(d / "anim.gif", codec="gif", pix_fmt="rgb8", **v),
        make_video(d / "rot90.mp4", **v, rotation=90),
    ]


def audio_seeds(d: Path) -> list[Path]:
    from tests.media_helpers import make_audio

    return media_seeds(d)[:5] + [
        make_audio(d / "tone.wav", rate=16000, layout="mono", seconds=2.5),
        make_audio(d / "noise.flac", rate=22050, codec="flac", signal="noise"),
        make_audio(d / "sweep.mp3", rate=44100, codec="libmp3lame"),
        make_audio(d / "noise.ogg", rate=48000, codec="libopus", signal="noise"),
        make_audio(d / "tone.m4a", rate=44100, seconds=1.5),
    ]


def image_seeds(d: Path) -> list[Path]:
    from PIL import Image

    from tests.media_helpers import frame_image

    img = Image.fromarray(frame_image(5, 64, 48))
    out = []
    for name, kw in (("a.jpg", {"quality": 90}), ("a.png", {}), ("a.webp", {"quality": 80}), ("a.gif", {}),
                     ("progressive.jpg", {"progressive": True})):
        img.save(d / name, **kw)
        out.append(d / name)
    return out


def run_video(path: Path) -> None:
    from vllama_jax.media import load_video, video_info

    video_info(path)
    v = load_video(path, num_frames=4, image_size=32, threads=1, rng=np.random.default_rng(0))
    np.asarray(v.frames).sum()


def run_video_train(path: Path) -> None:
    from vllama_jax.media import load_video

    load_video(path, num_frames=3, sampling="random", image_size=32, train=True, threads=1,
               rng=np.random.default_rng(1))


def run_image(path: Path) -> None:
    from vllama_jax.media import load_image

    load_image(path, image_size=32)
    load_image(path, image_size=32, train=True, rng=np.random.default_rng(0))


def run_audio(path: Path) -> None:
    from vllama_jax.media import load_audio

    a = load_audio(path, clips_per_video=2)
    np.asarray(a.clips).sum()


def run_batch(path: Path) -> None:
    """The batch loader and the chat's video+audio upload: a bad file is a per-file error slot, never a raise."""
    from vllama_jax.media import NoAudioStreamError, load_batch, load_video_with_audio

    res = load_batch([path, path], "video", workers=2, catch_unexpected=False, num_frames=2, image_size=32)
    for e in res.errors:
        if e is not None and "unexpected error" in e.reason:
            raise AssertionError(e.reason)
    try:
        load_video_with_audio(path, num_frames=2, clips_per_video=2, image_size=32)
    except NoAudioStreamError:  # only a silent file may lose its audio quietly; any other error propagates
        pass


# ---------------------------------------------------------------------------------------------------- weights


def _state_dict() -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    return {"model": {"video_query_tokens": torch.randn(1, 4, 8, generator=g),
                      "llama_proj.weight": torch.randn(6, 8, generator=g).to(torch.float16),
                      "llama_proj.bias": torch.randn(6, generator=g).to(torch.bfloat16),
                      "video_frame_position_embedding.weight": torch.randn(3, 8, generator=g),
                      "step": torch.tensor(7, dtype=torch.int64)},
            "epoch": 3}


def pth_zip_seeds(d: Path) -> list[Path]:
    import torch

    torch.save(_state_dict(), d / "ckpt.pth")
    torch.save(_state_dict()["model"], d / "flat.pth")
    return [d / "ckpt.pth", d / "flat.pth"]


def pth_legacy_seeds(d: Path) -> list[Path]:
    import torch

    torch.save(_state_dict(), d / "legacy.pth", _use_new_zipfile_serialization=False)
    return [d / "legacy.pth"]


def safetensors_seeds(d: Path) -> list[Path]:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    save_file({"a.weight": rng.standard_normal((6, 8), np.float32), "a.bias": np.arange(6, dtype=np.int64),
               "b": rng.standard_normal((2, 3, 4)).astype(np.float16)}, str(d / "model.safetensors"),
              metadata={"format": "pt"})
    return [d / "model.safetensors"]


def gguf_seeds(d: Path) -> list[Path]:
    import gguf

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(d / "tiny.gguf"), "llama")
    w.add_block_count(1)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_token_list([b"<unk>", b"a", b"b"])
    w.add_tensor("token_embd.weight", rng.standard_normal((3, 32), np.float32))
    w.add_tensor("blk.0.attn_q.weight", rng.standard_normal((32, 32), np.float32).astype(np.float16))
    w.add_tensor("blk.0.attn_k.weight", rng.standard_normal((16, 32), np.float32))
    q8 = gguf.quants.quantize(rng.standard_normal((4, 64), np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.ffn_up.weight", q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return [d / "tiny.gguf"]


def run_weights(path: Path) -> None:
    """Open, list, and read every tensor (and GGUF metadata): the laziness of the readers must not hide damage."""
    from vllama_jax.weights.readers import GGUFSource, open_weights

    src = open_weights(path)
    if isinstance(src, GGUFSource):
        src.metadata
    for k in src.keys():
        src.shape(k)
        np.asarray(src.get(k)).sum()


def make_pth(rng: random.Random, seeds: list[Path], out: Path) -> tuple[str, Path, int]:
    """Byte mutations, and half the time damage aimed at the pickle itself (pickle.py's opcodes)."""
    if rng.random() < 0.5:
        return _mutated_copy(rng, seeds, out)
    seed = rng.choice(seeds)
    label, data = mutate_pickle(rng, seed.read_bytes(), out.with_suffix(".pwned"))
    path = out.with_suffix(".pth")
    path.write_bytes(data)
    return f"{seed.name}:{label}", path, 1


_EVIL_CALLS = (("os", "system"), ("posix", "system"), ("subprocess", "check_call"), ("builtins", "exec"),
               ("builtins", "eval"), ("builtins", "open"), ("torch", "load"), ("numpy", "load"),
               ("torch._utils", "_rebuild_tensor_v2"), ("collections", "OrderedDict"),
               ("torch.serialization", "_get_layout"))


def evil_opcodes(rng: random.Random, canary: Path) -> bytes:
    """Protocol-0/2 opcodes that call a global with a string that would create ``canary`` if executed."""
    mod, name = rng.choice(_EVIL_CALLS)
    cmd = {"system": f"touch {canary}", "check_call": f"touch {canary}",
           "exec": f"open({str(canary)!r}, 'w')", "eval": f"open({str(canary)!r}, 'w')"}.get(name, str(canary))
    if rng.random() < 0.5:
        glob = b"c" + mod.encode() + b"\n" + name.encode() + b"\n"
    else:  # STACK_GLOBAL form (protocol 4)
        glob = (b"\x8c" + bytes([len(mod)]) + mod.encode() + b"\x8c" + bytes([len(name)]) + name.encode()
                + b"\x93")
    arg = cmd.encode()
    call = glob + b"(" + b"X" + struct.pack("<I", len(arg)) + arg + b"tR"
    return call + (b"0" if rng.random() < 0.5 else b"")  # POP the result, or leave it on the stack


def mutate_pickle(rng: random.Random, data: bytes, canary: Path, evil: bool | None = None) -> tuple[str, bytes]:
    """Inject a code-executing call into the pickle stream (the zip's data.pkl, or a legacy file's pickles),
    or damage the opcodes there (``evil``: which; default 70% injections); the canary file only appears if a
    reader executed the call."""
    import io
    import zipfile

    evil = rng.random() < 0.7 if evil is None else evil
    if data[:2] == b"PK":
        zin = zipfile.ZipFile(io.BytesIO(data))
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zout:
            for info in zin.infolist():
                body = zin.read(info)
                if info.filename.endswith("data.pkl"):
                    body = _pickle_damage(rng, body, canary, evil)
                zout.writestr(info, body)
        return ("evil_pickle" if evil else "pickle_opcodes"), buf.getvalue()
    return ("evil_pickle" if evil else "pickle_opcodes"), _pickle_damage(rng, data, canary, evil)


def _pickle_damage(rng: random.Random, body: bytes, canary: Path, evil: bool) -> bytes:
    at = rng.randrange(2, max(3, min(len(body), 400)))  # near the start: the outer dict is built there
    if evil:
        return body[:at] + evil_opcodes(rng, canary) + body[at:]
    op = rng.choice((b"R", b"c", b"\x93", b"b", b"i", b"o", b"\x81", b"\x92", b".", b"s", b"u", b"e"))
    return body[:at] + op + body[at + rng.choice((0, 1)):]


def make_safetensors(rng: random.Random, seeds: list[Path], out: Path) -> tuple[str, Path, int]:
    """The 8-byte header length, the JSON header (dtypes, shapes, offsets), or bytes anywhere."""
    seed = rng.choice(seeds)
    data = seed.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    kind = rng.choice(("length", "json", "json", "bytes"))
    if kind == "length":
        new = struct.pack("<Q", rng.choice((0, 1, 2, n - 1, n + 1, len(data), 1 << 40, (1 << 64) - 1))) + data[8:]
    elif kind == "json":
        label, header = _mutate_json(rng, header)
        text = json.dumps(header).encode()
        new = struct.pack("<Q", len(text)) + text + body
        kind = f"json:{label}"
    else:
        kind, new = mutate(rng, data, 0)
    path = out.with_suffix(".safetensors")
    path.write_bytes(new)
    return kind, path, 1


_EXTREME_JSON = (None, True, 0, -1, 1, 2**31, 2**63, -2**63, 2**64 + 5, 1e308, float("nan"), "", "F32", "BF16",
                 "X9", "../../etc/passwd", [], [0], [2**62, 2**62], [-1, 4], {}, "\u0000\ud800", "a" * 5000)


def _mutate_json(rng: random.Random, obj: Any) -> tuple[str, Any]:
    """Set, delete or retype one value anywhere in a JSON tree (extreme values: huge, negative, wrong type)."""
    paths: list[tuple[Any, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k in list(node):
                paths.append((node, k))
                walk(node[k])
        elif isinstance(node, list):
            for i in range(len(node)):
                paths.append((node, i))
                walk(node[i])

    walk(obj)
    if not paths or rng.random() < 0.05:
        return "root", rng.choice(_EXTREME_JSON)
    parent, key = rng.choice(paths)
    op = rng.choice(("set", "set", "set", "delete", "dup"))
    if op == "delete":
        del parent[key]
    elif op == "dup" and isinstance(parent, list):
        parent.insert(key, parent[key])
    else:
        parent[key] = rng.choice(_EXTREME_JSON)
    return f"{op}:{key}", obj


def sharded_seeds(d: Path) -> list[Path]:
    from safetensors.numpy import save_file

    folder = d / "sharded"
    folder.mkdir()
    rng = np.random.default_rng(0)
    save_file({"a": rng.standard_normal((4, 4), np.float32)}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({"b": rng.standard_normal((3,), np.float32)}, str(folder / "model-00002-of-00002.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 76}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                                        "b": "model-00002-of-00002.safetensors"}}))
    return [folder]


def make_sharded(rng: random.Random, seeds: list[Path], out: Path) -> tuple[str, Path, int]:
    folder = out.with_suffix("")
    shutil.copytree(seeds[0], folder)
    index = folder / "model.safetensors.index.json"
    if rng.random() < 0.6:
        label, obj = _mutate_json(rng, json.loads(index.read_text()))
        index.write_text(json.dumps(obj))
    elif rng.random() < 0.5:
        label, data = mutate(rng, index.read_bytes(), 0)
        index.write_bytes(data)
    else:
        shard = rng.choice(sorted(folder.glob("*.safetensors")))
        label, data = mutate(rng, shard.read_bytes(), 0)
        shard.write_bytes(data)
        label = f"{shard.name}:{label}"
    return label, folder, 1


def model_dir_seeds(d: Path) -> list[Path]:
    """A real model directory (config.yaml, manifest.json, Orbax params/, tokenizer/) of the tiny config,
    holding two small groups so a case restores real arrays."""
    import jax
    import jax.numpy as jnp

    from vllama_jax.config import load_model_config
    from vllama_jax.models import abstract_for_groups
    from vllama_jax.text import load_tokenizer
    from vllama_jax.weights.model_dir import save_model_dir

    cfg = load_model_config(TINY_CONFIG)
    groups = ["llama_proj", "video_query_tokens"]
    abstract, _ = abstract_for_groups(cfg, groups)
    params = jax.tree_util.tree_map(lambda s: jnp.ones(s.shape, s.dtype), abstract)
    save_model_dir(d / "model", cfg, params, tokenizer=load_tokenizer(TINY_LLAMA_TOKENIZER))
    return [d / "model"]


def make_model_dir(rng: random.Random, seeds: list[Path], out: Path) -> tuple[str, Path, int]:
    folder = out.with_suffix("")
    shutil.copytree(seeds[0], folder)
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    small = [p for p in files if p.name in ("manifest.json", "config.yaml", "_METADATA", "_CHECKPOINT_METADATA",
                                            "tokenizer_config.json", "special_tokens_map.json")]
    victim = rng.choice(small) if small and rng.random() < 0.8 else rng.choice(files)
    rel = victim.relative_to(folder)
    if victim.suffix == ".json" and rng.random() < 0.5:
        try:
            label, obj = _mutate_json(rng, json.loads(victim.read_text()))
            victim.write_text(json.dumps(obj))
            return f"{rel}:json:{label}", folder, 1
        except ValueError:
            pass
    if rng.random() < 0.05:
        victim.unlink()
        return f"{rel}:deleted", folder, 1
    label, data = mutate(rng, victim.read_bytes(), 0)
    victim.write_bytes(data)
    return f"{rel}:{label}", folder, 1


def run_model_dir(path: Path) -> None:
    import jax

    from vllama_jax.weights.model_dir import load_model_dir

    m = load_model_dir(path)
    for leaf in jax.tree_util.tree_leaves(m.params):
        np.asarray(leaf).sum()
    if m.tokenizer is not None:
        m.tokenizer.decode(m.tokenizer.encode("a dog <ImageHere> runs"))


# ------------------------------------------------------------------------------------------------------- data

DATA_FORMATS = ("webvid", "cc_sbu_align", "llava_cc3m", "cc_sbu", "llava_instruct", "webvid_instruct", "jsonl")
ROWS_PER_CASE = 12
_TINY_CLIP = {"num_frames": 4, "width": 32, "height": 32}


def data_seeds(dataset: str) -> Callable[[Path], list[Path]]:
    def seeds(d: Path) -> list[Path]:
        from vllama_jax.data import synthetic

        root = d / dataset
        make = {"video": _TINY_CLIP} if dataset in ("webvid", "webvid_instruct") else {}
        src = synthetic.make_source(dataset, root, ROWS_PER_CASE, **make)
        (root / "case.json").write_text(json.dumps({
            "dataset": dataset, "source": str(src.source.relative_to(root)),
            "media_dir": str(src.media_dir.relative_to(root)) if src.media_dir else None}))
        return [root]
    return seeds


def _mutate_rows(rng: random.Random, f: Path) -> str:
    """Damage an annotation file row by row (a few rows given extreme or wrong-typed values, duplicated or
    dropped) or as bytes (flips, truncation, chunks)."""
    text = f.read_bytes()
    if f.suffix in (".tar",) or rng.random() < 0.3:
        label, data = mutate(rng, text, 512 if f.suffix == ".tar" else 0)
        f.write_bytes(data)
        return f"bytes:{label}"
    if f.suffix == ".jsonl" or f.suffix == ".csv":
        lines = text.split(b"\n")
        labels = []
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(lines))
            if f.suffix == ".jsonl" and lines[i].strip() and rng.random() < 0.7:
                try:
                    label, obj = _mutate_json(rng, json.loads(lines[i]))
                    lines[i] = json.dumps(obj).encode()
                    labels.append(f"row{i}:{label}")
                    continue
                except ValueError:
                    pass
            op = rng.choice(("dup", "drop", "garbage", "cut"))
            if op == "dup":
                lines.insert(i, lines[i])
            elif op == "drop":
                lines.pop(i)
            elif op == "garbage":
                lines[i] = rng.choice((b"\x00\xff\xfe", b'"unclosed, "quote', b",,,,,,", b"{" * 5000, b"[]",
                                       "\u202e\ud7ff\u0000".encode("utf-8", "surrogatepass"), b"null"))
            else:
                lines[i] = lines[i][:rng.randrange(len(lines[i]) + 1)]
            labels.append(f"row{i}:{op}")
        f.write_bytes(b"\n".join(lines))
        return ",".join(labels)
    try:
        obj = json.loads(text)
    except ValueError:
        label, data = mutate(rng, text, 0)
        f.write_bytes(data)
        return f"bytes:{label}"
    labels = []
    for _ in range(rng.randint(1, 5)):
        label, obj = _mutate_json(rng, obj)
        labels.append(label)
    f.write_text(json.dumps(obj))
    return "json:" + ",".join(labels)


def make_data(rng: random.Random, seeds: list[Path], out: Path) -> tuple[str, Path, int]:
    from vllama_jax.data.formats import get_format

    folder = out.with_suffix("")
    shutil.copytree(seeds[0], folder)
    case = json.loads((folder / "case.json").read_text())
    files = get_format(case["dataset"]).source_files(folder / case["source"])
    victim = rng.choice(files)
    label = _mutate_rows(rng, victim)
    return f"{victim.name}:{label}", folder, ROWS_PER_CASE


def run_prepare(path: Path) -> None:
    """``prepare`` the damaged annotations, then read back every record that was written."""
    from vllama_jax.data import read_records
    from vllama_jax.data.prepare import prepare

    case = json.loads((path / "case.json").read_text())
    out = path / "prepared"
    shutil.rmtree(out, ignore_errors=True)  # a replayed regression case starts clean
    media = path / case["media_dir"] if case["media_dir"] else None
    summary = prepare(case["dataset"], path / case["source"], out, media_dir=media, check_media=False,
                      workers=1, progress=False)
    if summary.written:
        records = read_records(out)
        for i in range(len(records)):
            records[i]


def records_seeds(d: Path) -> list[Path]:
    """A prepared jsonl dataset with the media bytes inside the records (mixed images), read back at train time."""
    from vllama_jax.data import synthetic

    root = d / "records"
    synthetic.make_prepared("jsonl", root, ROWS_PER_CASE, make={"media": "image"}, store_media="bytes",
                            records_per_part=6)
    shutil.rmtree(root / "source")
    return [root / "prepared"]


def make_records(rng: random.Random, seeds: list[Path], out: Path) -> tuple[str, Path, int]:
    folder = out.with_suffix("")
    shutil.copytree(seeds[0], folder)
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.stat().st_size]
    shards = [p for p in files if "array_record" in p.name]
    victim = rng.choice(shards) if rng.random() < 0.85 else rng.choice(files)
    rel = victim.relative_to(folder)
    if victim.suffix == ".json" and rng.random() < 0.5:
        label, obj = _mutate_json(rng, json.loads(victim.read_text()))
        victim.write_text(json.dumps(obj))
        return f"{rel}:json:{label}", folder, ROWS_PER_CASE
    label, data = mutate(rng, victim.read_bytes(), 0)
    victim.write_bytes(data)
    return f"{rel}:{label}", folder, ROWS_PER_CASE


def run_records(path: Path) -> None:
    """Every record through the reader and the media decoding the training pipeline does; a damaged record is a
    ``DataError`` for that record, the others still read."""
    from vllama_jax.data import DataError, media_io, read_records

    records = read_records(path)
    for i in range(len(records)):
        try:
            rec = records[i]
            media_io.load_frames(rec.media_type, rec.media_path, rec.media_bytes, num_frames=2, sampling="uniform",
                                 image_size=32, train=True, rng=np.random.default_rng(i), need_message=False)
        except DataError:
            continue


# ------------------------------------------------------------------------------------------------------- text

STRINGS_PER_CASE = 50
_HANDMADE = ("", "\x00", "\x00" * 1000, "<ImageHere>" * 300, "<s></s><unk>", "<|im_start|>system\n<|im_end|>",
             "\ud800", "\udfff\ud800", "\U0010ffff" * 50, "e\u0301" * 2000, "\u202e\u2066abc\u2069", "\r\n\t\x0b\x0c",
             "\ufeff\ufffe\uffff", "\x7f\x80\x9f", "🦙" * 5000, " " * 20000, "a" * 200_000,
             "".join(chr(c) for c in range(0, 0x3000, 7)), "\u3000" * 100, "▁" * 1000)


def hypothesis_strings(seed: int, n: int) -> list[str]:
    """``n`` strings drawn by Hypothesis from a fixed seed: any unicode (surrogates and unassigned code points
    included), control characters, and long strings."""
    from hypothesis import HealthCheck, Phase, given, settings, strategies as st
    from hypothesis import seed as hseed

    out: list[str] = []
    strategy = st.one_of(
        st.text(),
        st.text(st.characters(codec=None, categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Mn", "So"))),
        st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF), min_size=500, max_size=4000),
        st.lists(st.sampled_from(("<ImageHere>", "<AudioHere>", "<s>", "</s>", "<unk>", "[INST]", "###", "\n",
                                  "<|im_start|>", "<|endoftext|>", " ", "▁")), max_size=200).map("".join),
    )

    @hseed(seed)
    @settings(max_examples=n, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(s: str) -> None:
        out.append(s)

    collect()
    return out[:n]


def make_strings(rng: random.Random, seeds: list[Path], out: Path) -> tuple[str, Path, int]:
    strings = hypothesis_strings(rng.randrange(2**32), STRINGS_PER_CASE - 2)
    strings += rng.sample(_HANDMADE, 2)
    path = out.with_suffix(".json")
    path.write_text(json.dumps(strings))  # lone surrogates survive as \ud800 escapes
    return "hypothesis", path, len(strings)


_TOKENIZERS: list[Any] = []


def _tokenizers() -> list[Any]:
    if not _TOKENIZERS:
        from vllama_jax.defaults import smollm2_gguf_path
        from vllama_jax.text import load_tokenizer

        _TOKENIZERS.extend([load_tokenizer(TINY_LLAMA_TOKENIZER), load_tokenizer(smollm2_gguf_path())])
    return _TOKENIZERS


def run_tokenizer(path: Path) -> None:
    """Both tokenizer kinds (SentencePiece LLaMA, GGUF/HF BPE) encode and decode any string."""
    for s in json.loads(path.read_text()):
        for tok in _tokenizers():
            ids = tok.encode(s, add_bos=True)
            tok.encode_with_special(s)
            tok.decode(ids)
            tok.decode(ids, skip_special_tokens=True)


def no_seeds(d: Path) -> list[Path]:
    return []


# ------------------------------------------------------------------------------------------------------ serve

# Media the server may read by file:// (its --allowed-media-path); a fixed folder, so a kept request body that names
# a file there means the same thing in any later worker (each worker makes it if it is missing).
SERVE_MEDIA = Path(tempfile.gettempdir()) / "vllama-fuzz-serve-media"
SERVE_MAX_TOKENS = 3  # generation stays tiny: the cases are about parsing and refusals, not decoding


class RequestRefused(VllamaError):
    """The server's typed refusal of a request body: a 4xx answer carrying an OpenAI error object with a message."""


def serve_media() -> dict[str, Path]:
    """The allowed folder's files (made once, atomically: workers and the campaign may race): real media, a file
    that is not media, an empty file, a folder, a FIFO, and symlinks pointing out of the folder."""
    from tests.media_helpers import make_audio, make_video

    SERVE_MEDIA.mkdir(exist_ok=True)
    tag = f".{os.getpid()}.tmp"
    files = {"video": SERVE_MEDIA / "clip.mp4", "image": SERVE_MEDIA / "image.png", "audio": SERVE_MEDIA / "sound.wav",
             "not_media": SERVE_MEDIA / "not_media.mp4", "empty": SERVE_MEDIA / "empty.png"}
    makers: dict[str, Callable[[Path], Any]] = {
        "video": lambda p: make_video(p, n_frames=8, width=64, height=48, audio={"seconds": 1.0}),
        "image": lambda p: _png(p),
        "audio": lambda p: make_audio(p, rate=16000, layout="mono", seconds=1.0),
        "not_media": lambda p: p.write_bytes(b"this is not a video" * 50),
        "empty": lambda p: p.write_bytes(b""),
    }
    for key, path in files.items():
        if not path.exists():
            tmp = path.with_name(path.stem + tag + path.suffix)  # the suffix picks the encoder
            makers[key](tmp)
            os.replace(tmp, path)
    (SERVE_MEDIA / "folder").mkdir(exist_ok=True)
    for name, dest in (("escape.mp4", "/etc/hostname"), ("up.mp4", "../")):
        if not (SERVE_MEDIA / name).is_symlink():
            os.symlink(dest, SERVE_MEDIA / (name + tag))
            os.replace(SERVE_MEDIA / (name + tag), SERVE_MEDIA / name)
    with contextlib.suppress(FileExistsError):
        os.mkfifo(SERVE_MEDIA / "fifo.mp4")  # never a media file: opening it would wait for a writer forever
    return files


def _png(path: Path) -> None:
    from PIL import Image

    from tests.media_helpers import frame_image

    Image.fromarray(frame_image(3, 64, 48)).save(path, format="PNG")


def _data_url(mime: str, path: Path) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def serve_bodies(media: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Valid chat-completions bodies, one per way of sending media and per decoding setting the server takes."""
    def user(text: str, part: dict | None = None) -> dict:
        return {"role": "user", "content": text if part is None else [part, {"type": "text", "text": text}]}

    base = {"model": "vllama-jax", "max_tokens": SERVE_MAX_TOKENS, "temperature": 0}
    video_url = {"url": _data_url("video/mp4", media["video"])}
    return {
        "text.json": {**base, "messages": [{"role": "system", "content": "Be brief."}, user("Say hello.")]},
        "image_data.json": {**base, "temperature": 0.7, "top_p": 0.9, "seed": 3, "messages": [
            user("What is in the image?", {"type": "image_url", "image_url": {"url": _data_url("image/png",
                                                                                              media["image"])}})]},
        "video_data_stream.json": {**base, "stream": True, "stream_options": {"include_usage": True}, "messages": [
            user("What happens?", {"type": "video_url", "video_url": video_url})]},
        "input_audio.json": {**base, "temperature": 1.0, "seed": 1, "n": 2, "stream": False, "messages": [
            user("What do you hear?", {"type": "input_audio", "input_audio": {
                "data": base64.b64encode(media["audio"].read_bytes()).decode(), "format": "wav"}})]},
        "audio_url.json": {**base, "messages": [
            user("What do you hear?", {"type": "audio_url", "audio_url": {"url": _data_url("audio/wav",
                                                                                            media["audio"])}})]},
        "video_file.json": {**base, "with_audio": False, "stop": ["."], "messages": [
            user("Describe it.", {"type": "video_url", "video_url": {"url": media["video"].as_uri()}})]},
        "image_file_turns.json": {"model": "m", "max_completion_tokens": SERVE_MAX_TOKENS, "temperature": 0.5,
                                  "top_p": 0.5, "seed": 9, "messages": [
            user("What is shown?", {"type": "image_url", "image_url": {"url": media["image"].as_uri()}}),
            {"role": "assistant", "content": "A picture."}, user("Which colours?")]},
        "text_stream_n.json": {**base, "temperature": 0.9, "n": 2, "stream": True, "stop": ["!", "\n"],
                               "messages": [user("Name a fruit.")]},
    }


def serve_seeds(d: Path) -> list[Path]:
    out = []
    for name, body in serve_bodies(serve_media()).items():
        (d / name).write_text(json.dumps(body))
        out.append(d / name)
    return out


_DEEP = 100_000  # past any recursion limit of a JSON parser or of code walking the parsed tree
_BAD_NUMBERS = (0, -1, -2**31, 2**31, 2**63, 2**64 + 1, 10**400, 1e308, -1e-300, 0.5, 3.0, float("nan"),
                float("inf"), -float("inf"), True, None, "1", [], {})
_NUMBER_KEYS = ("max_tokens", "max_completion_tokens", "n", "seed", "temperature", "top_p", "num_beams")
_EXTRA_KEYS = {"num_beams": (2, 9, 0), "with_audio": (False, "no", None), "stream": ("yes", 1, None, {}),
               "stream_options": ({"include_usage": "x"}, [], "on"), "stop": ([], [""], ["a"] * 5, 3, [None]),
               "logprobs": (True,), "tools": ([{"type": "function"}],), "response_format": ({"type": "json"},),
               "user": ("x" * 10_000,), "\u0000": (1,), "": ({},)}
_BAD_FILE_URLS = (
    "file:///etc/passwd", f"file://{SERVE_MEDIA}/../../etc/passwd", f"file://{SERVE_MEDIA}/%2e%2e/%2e%2e/etc/passwd",
    f"file://{SERVE_MEDIA}/escape.mp4", f"file://{SERVE_MEDIA}/up.mp4/etc/passwd", f"file://{SERVE_MEDIA}/fifo.mp4",
    f"file://{SERVE_MEDIA}/folder", f"file://{SERVE_MEDIA}/", f"file://{SERVE_MEDIA}/missing.mp4",
    f"file://{SERVE_MEDIA}/not_media.mp4", f"file://{SERVE_MEDIA}/empty.png", f"file://{SERVE_MEDIA}/a%00.mp4",
    f"file://{SERVE_MEDIA}/" + "a" * 300 + ".mp4", f"file://{SERVE_MEDIA}/" + "a/" * 3000, "file://evil.example/x.mp4",
    f"file://localhost{SERVE_MEDIA}/clip.mp4", f"file://localhost:99{SERVE_MEDIA}/clip.mp4", "file://[::1/x.mp4",
    "file:", "file://", "file:///dev/zero", "file:///proc/self/environ", f"FILE://{SERVE_MEDIA}/clip.mp4",
    f"file://{SERVE_MEDIA}/clip.mp4?x=1#frag", f"file://{SERVE_MEDIA}/%ff%fe.mp4", "http://127.0.0.1/a.mp4",
    "ftp://x/a.mp4", "javascript:alert(1)", "clip.mp4", "/etc/passwd", "\u0000", " data:image/png;base64,AA==")
_BAD_DATA_URLS = ("data:", "data:,", "data:image/png,iVBORw0KGgo=", "data:;base64,", "data:image/png;base64",
                  "data:image/png;base64,", "data:image/png;base64,====", "data:image/png;base64,***",
                  "data:video/../../x;base64,AAAA", "data:" + "x" * 5000 + ";base64,AAAA",
                  "data:image/png;charset=utf-8;base64,AAAA", "data:image/svg+xml;base64,PHN2Zy8+",
                  "data:application/x-sh;base64,IyEvYmluL3NoCg==", "data:video/mp4;base64,AAAA",
                  "data:audio/wav;base64," + "A" * 400_000, "data:image/png;BASE64,AAAA")


def _media_parts(body: Any) -> list[dict]:
    """The media parts' inner objects ({"url"} or {"data", "format"}) of a parsed body, wherever they are."""
    found: list[dict] = []
    for msg in body.get("messages", []) if isinstance(body, dict) and isinstance(body.get("messages"), list) else []:
        content = msg.get("content") if isinstance(msg, dict) else None
        for part in content if isinstance(content, list) else []:
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and isinstance(part.get(kind), dict):
                found.append(part[kind])
    return found


def _mutate_base64(rng: random.Random, text: str) -> tuple[str, str]:
    """Bad base64 (alphabet, padding, whitespace, cut) or good base64 of damaged media bytes."""
    op = rng.choice(("media_bytes", "media_bytes", "cut", "alphabet", "padding", "whitespace", "empty"))
    if op == "media_bytes":
        try:
            raw = base64.b64decode(text, validate=True)
        except ValueError:  # already damaged by an earlier mutation of this case
            raw = text.encode("utf-8", "surrogatepass")
        label, raw = mutate(rng, raw, _header_len(raw))
        return f"media_bytes:{label}", base64.b64encode(raw).decode()
    if op == "cut":
        return op, text[:rng.randrange(len(text) + 1)]
    if op == "alphabet":
        at = rng.randrange(len(text) + 1)
        return op, text[:at] + rng.choice(("-", "_", "!", "\u00e9", "\u0000", "%2B")) + text[at:]
    if op == "padding":
        return op, text.rstrip("=") + rng.choice(("", "=", "===", "=A="))
    if op == "whitespace":
        return op, "\n".join(text[i:i + 76] for i in range(0, len(text), 76))
    return op, ""


def _mutate_media(rng: random.Random, body: Any) -> str:
    """Damage one media part: bad data:/file:// URLs, bad base64, or the media's own bytes."""
    parts = _media_parts(body)
    if not parts:  # a text-only body gets a media part, with a URL from the bad ones
        msgs = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(msgs, list) or not msgs or not isinstance(msgs[-1], dict):
            return ""
        kind = rng.choice(("image_url", "video_url", "audio_url"))
        url = rng.choice(_BAD_FILE_URLS + _BAD_DATA_URLS)
        msgs[-1]["content"] = [{"type": kind, kind: {"url": url}}, {"type": "text", "text": "What is it?"}]
        return "media:added"
    inner = rng.choice(parts)
    key = "url" if "url" in inner else "data"
    value = inner.get(key)
    op = rng.choice(("file_url", "data_url", "base64", "base64", "format"))
    if op == "file_url":
        inner[key] = rng.choice(_BAD_FILE_URLS)
    elif op == "data_url":
        inner[key] = rng.choice(_BAD_DATA_URLS)
    elif op == "format" and key == "data":
        inner["format"] = rng.choice(("", "exe", "../wav", "WAV", "mp4", "png", "x" * 300, 3, None))
    elif isinstance(value, str) and value.startswith("data:"):
        head, _, payload = value.partition(",")
        label, payload = _mutate_base64(rng, payload)
        inner[key] = f"{head},{payload}"
        return f"media:{label}"
    elif isinstance(value, str) and key == "data":
        label, inner[key] = _mutate_base64(rng, value)
        return f"media:{label}"
    else:
        inner[key] = rng.choice(_BAD_FILE_URLS + _BAD_DATA_URLS)
    return f"media:{op}"


def _mutate_messages(rng: random.Random, body: Any) -> str:
    """Conversations the parser must refuse or survive: roles, part types, media where it may not be, many or
    long turns, text the tokenizers dislike."""
    msgs = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(msgs, list) or not msgs:
        return ""
    op = rng.choice(("role", "part_type", "two_media", "media_elsewhere", "last_assistant", "many", "long",
                     "odd_text", "content_type"))
    msg = rng.choice(msgs)
    if not isinstance(msg, dict):
        return ""
    if op == "role":
        msg["role"] = rng.choice(("tool", "function", "USER", "", None, 1, ["user"], {"user": 1}, "developer"))
    elif op == "part_type":
        msg["content"] = [{"type": rng.choice(("hologram", "", "image_url", "video_url", "input_audio", "text",
                                               None, 5, ["text"]))}]
    elif op == "two_media":
        parts = [p for p in msg.get("content", []) if isinstance(p, dict) and p.get("type") != "text"] \
            if isinstance(msg.get("content"), list) else []
        if parts:
            msg["content"] = parts * 2
        else:
            msgs.insert(0, {"role": "user", "content": [{"type": "image_url", "image_url": {
                "url": (SERVE_MEDIA / "image.png").as_uri()}}]})
    elif op == "media_elsewhere":
        msgs.insert(0, {"role": rng.choice(("system", "assistant", "developer")), "content": [
            {"type": "image_url", "image_url": {"url": (SERVE_MEDIA / "image.png").as_uri()}}]})
    elif op == "last_assistant":
        msgs.append({"role": "assistant", "content": rng.choice(("ok", None, [], [{"type": "text", "text": "x"}]))})
    elif op == "many":
        msgs[:] = msgs + [{"role": r, "content": "hi"} for _ in range(rng.choice((50, 2000))) for r in
                          ("user", "assistant")] + [msgs[-1]]
    elif op == "long":
        msg["content"] = rng.choice(("word " * 400, "x" * 200_000, "<ImageHere>" * 300, "\n" * 5000))
    elif op == "odd_text":
        msg["content"] = rng.choice(_HANDMADE)
    else:
        msg["content"] = rng.choice((None, 5, True, {"text": "hi"}, [], [None], [[]], ["text"], "", {}))
    return f"messages:{op}"


def _mutate_fields(rng: random.Random, body: Any) -> str:
    """Top-level settings: numbers out of range or of the wrong type, keys dropped, extension/unknown keys added."""
    if not isinstance(body, dict):
        return ""
    op = rng.choice(("number", "number", "drop", "extra"))
    if op == "number":
        key = rng.choice(_NUMBER_KEYS)
        body[key] = rng.choice(_BAD_NUMBERS)
        return f"fields:{key}={body[key]!r}"[:80]
    if op == "drop" and body:
        key = rng.choice(sorted(body))
        del body[key]
        return f"fields:drop:{key}"
    key = rng.choice(sorted(_EXTRA_KEYS))
    body[key] = rng.choice(_EXTRA_KEYS[key])
    return f"fields:extra:{key!r}"


def _splice_json(rng: random.Random, text: str) -> tuple[str, str]:
    """Values spliced in as text, as building them as objects would hit our own limits first: nesting past any
    recursion limit, and number literals longer than Python converts."""
    if rng.random() < 0.3:
        literal = rng.choice(("1" * 5000, "-" + "9" * 10_000, "1e99999", "0." + "0" * 5000 + "1"))
        label = "long_number"
    else:
        depth = rng.choice((900, 5000, _DEEP))
        open_, close = rng.choice((("[", "]"), ('{"a":', "}")))
        literal, label = open_ * depth + "1" + close * depth, f"deep{depth}"
    where = rng.choice(("body", "messages", "model", "max_tokens", "temperature", "stop"))
    if where == "body" or not text.endswith("}"):
        return f"{label}:body", literal
    return f"{label}:{where}", f'{text[:-1]}, "{where}": {literal}}}'  # the last of a duplicated key wins


def _to_bytes(rng: random.Random, text: str) -> tuple[str, bytes]:
    """The body's bytes, or bytes a broken client sends: cut JSON, non-UTF-8, other encodings, byte damage."""
    data = text.encode("utf-8", "surrogatepass")
    if rng.random() < 0.75:  # most cases test what is inside a parsable body
        return "", data
    op = rng.choice(("truncate", "latin1", "utf16", "bom", "invalid_utf8", "bytes", "empty"))
    if op == "truncate":
        return "bytes:truncate", data[:rng.randrange(len(data))]
    if op == "latin1":
        return "bytes:latin1", text.replace("hello", "h\u00e9llo").encode("latin-1", "replace")
    if op == "utf16":
        return "bytes:utf16", text.encode("utf-16", "surrogatepass")
    if op == "bom":
        return "bytes:bom", b"\xef\xbb\xbf" + data
    if op == "invalid_utf8":
        at = rng.randrange(len(data) + 1)
        bad = rng.choice((b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80"))
        return "bytes:invalid_utf8", data[:at] + bad + data[at:]
    if op == "bytes":
        label, new = mutate(rng, data, 0)
        return f"bytes:{label}", new
    return "bytes:empty", b""


def make_request(rng: random.Random, seeds: list[Path], out: Path) -> tuple[str, Path, int]:
    """One to three structural mutations of a seed body (fields, messages, media, JSON values anywhere), then
    maybe a deep nesting or damage to its bytes."""
    seed = rng.choice(seeds)
    body = json.loads(seed.read_text())
    labels = [seed.stem]
    for _ in range(rng.choice((1, 1, 2, 3))):
        kind = rng.choice(("fields", "fields", "messages", "media", "media", "json"))
        if kind == "json":
            label, body = _mutate_json(rng, body)
            label = f"json:{label}"
        else:
            label = {"fields": _mutate_fields, "messages": _mutate_messages, "media": _mutate_media}[kind](rng, body)
        labels.append(label or kind + ":none")
    text = json.dumps(body)  # NaN and Infinity come out as the bare words some clients send
    if rng.random() < 0.08:
        label, text = _splice_json(rng, text)
        labels.append(label)
    label, data = _to_bytes(rng, text)
    labels += [label] if label else []
    path = out.with_suffix(".json")
    path.write_bytes(data)
    return "+".join(labels), path, 1


_SERVER: list[Any] = []


def serve_setup() -> None:
    """Start the server on the embedded default model (as tests/test_serve.py; a small batch and context keep
    the worker's memory low) and send every seed body once, so the compilations they need are not any case's."""
    if _SERVER:
        return
    from vllama_jax.inference import VideoLLaMAChat
    from vllama_jax.serve import Server

    media = serve_media()
    server = Server(VideoLLaMAChat.embedded(quantize="int8"), port=0, allowed_media_paths=[SERVE_MEDIA], max_batch=2,
                    max_queue=8, max_context=256, max_tokens_default=SERVE_MAX_TOKENS).start()
    _SERVER.append(server)
    for body in serve_bodies(media).values():
        post_request(server.url, json.dumps(body).encode())
    _trim_heap()


def post_request(url: str, body: bytes) -> None:
    """POST a body to /v1/chat/completions and read the whole answer. Returns on a 2xx that is a completion (or a
    stream ending in [DONE]); raises ``RequestRefused`` on a 4xx carrying an OpenAI error message (the typed
    refusal); anything else (5xx, a 4xx without that object, a broken answer, a dropped connection) raises
    another exception, which the worker counts as untyped. No client timeout: the campaign's is the limit."""
    host, _, port = url.removeprefix("http://").partition(":")
    conn = http.client.HTTPConnection(host, int(port))
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        kind = resp.getheader("Content-Type", "")
    finally:
        conn.close()
    if 200 <= resp.status < 300:
        if kind.startswith("text/event-stream"):
            events = [line[5:].strip() for line in raw.decode().splitlines() if line.startswith("data:")]
            if not events or events[-1] != "[DONE]":
                raise AssertionError(f"a stream that does not end with [DONE]: {raw[-300:]!r}")
            for e in events[:-1]:
                if "error" in json.loads(e):  # only a failing decode loop answers this way, after the 200
                    raise AssertionError(f"an error event in a {resp.status} stream: {e[:300]}")
        elif not isinstance(json.loads(raw).get("choices"), list):
            raise AssertionError(f"a {resp.status} answer without choices: {raw[:300]!r}")
        return
    try:
        err = json.loads(raw)["error"]
        message, code = err["message"], err.get("code")
    except (ValueError, KeyError, TypeError):
        raise AssertionError(f"HTTP {resp.status} without an OpenAI error object: {raw[:300]!r}") from None
    if 400 <= resp.status < 500 and isinstance(message, str) and message:
        raise RequestRefused(f"HTTP {resp.status} {code}: {message}")
    raise AssertionError(f"HTTP {resp.status} {code}: {str(message)[:300]}")


def run_request(path: Path) -> None:
    """The case's bytes, as the body of a chat-completions request to the worker's running server."""
    if not _SERVER:
        serve_setup()  # the setup failed (or the case is replayed alone): fail, or start, here
    try:
        post_request(_SERVER[0].url, path.read_bytes())
    finally:
        _trim_heap()


def _trim_heap() -> None:
    """Hand freed heap back to the OS (glibc's malloc_trim). The server's threads each keep a malloc arena whose
    freed pages would otherwise stay resident: measured, ~60 MB more RSS per 100 cases without it, flat with it;
    the next case's peak RSS is then its own, not what earlier cases left in the allocator."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# ----------------------------------------------------------------------------------------------------- registry

TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("media_video", "media", media_seeds, _mutated_copy, run_video),
    Target("media_video_train", "media", media_seeds, _mutated_copy, run_video_train),
    Target("media_image", "media", image_seeds, _mutated_copy, run_image),
    Target("media_audio", "media", audio_seeds, _mutated_copy, run_audio),
    Target("media_batch", "media", media_seeds, _mutated_copy, run_batch),
    Target("weights_pth_zip", "weights", pth_zip_seeds, make_pth, run_weights),
    Target("weights_pth_legacy", "weights", pth_legacy_seeds, make_pth, run_weights),
    Target("weights_safetensors", "weights", safetensors_seeds, make_safetensors, run_weights),
    Target("weights_gguf", "weights", gguf_seeds, _mutated_copy, run_weights),
    Target("weights_sharded", "weights", sharded_seeds, make_sharded, run_weights),
    Target("weights_model_dir", "weights", model_dir_seeds, make_model_dir, run_model_dir),
    *[Target(f"data_{f}", "data", data_seeds(f), make_data, run_prepare) for f in DATA_FORMATS],
    Target("data_records", "data", records_seeds, make_records, run_records),
    Target("text_tokenizer", "text", no_seeds, make_strings, run_tokenizer, names_file=False),
    Target("serve_requests", "serve", serve_seeds, make_request, run_request, names_file=False, setup=serve_setup),
]}


def run_probe(path: Path) -> None:
    """The harness's own check (tests/test_fuzz.py): a case that hangs, kills its worker, or allocates past the
    address-space limit."""
    import os
    import time

    action = json.loads(path.read_text())
    if action == "sleep":
        time.sleep(3600)
    elif action == "abort":
        os.abort()
    elif action == "alloc":
        np.ones(16 << 30, np.uint8)  # 16 GiB: refused by RLIMIT_AS, a MemoryError


# Not fuzz targets (no campaign runs them): what the worker also accepts, to test the pool itself.
PROBES: dict[str, Target] = {"probe": Target("probe", "probe", no_seeds, make_strings, run_probe, names_file=False)}
