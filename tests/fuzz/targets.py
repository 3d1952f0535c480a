"""What is fuzzed: one ``Target`` per input path, with its seed files, its case maker and the call under test.

A case is a file or a folder on disk (so a finding is kept as it is, under ``tests/fuzz/regressions/<target>/``).
``make`` runs in the campaign process and only writes bytes; ``run`` runs in a worker process and calls the
library exactly as a user would, reading everything the call returns, so lazy failures surface too.
"""
from __future__ import annotations

import dataclasses
import json
import random
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tests.fuzz.mutate import mp4_boxes, mutate

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
