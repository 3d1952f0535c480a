"""Seeded mutations of real files: what a bad disk, a cut download or a broken writer does to a file.

Every function takes a ``random.Random`` and the original bytes and returns new bytes; nothing else decides the
output, so a (seed, case number) pair names a case for ever. ``header`` is how many leading bytes count as the
file's header: body mutations leave it alone, so the damage reaches the streams and not only the demuxer's probe.
"""
from __future__ import annotations

import random
import struct
from collections.abc import Callable

Mutator = Callable[[random.Random, bytes, int], bytes]

# values that break size/count/offset fields: zero, one, the sign bits, the maxima
_EXTREMES_32 = (0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)
_EXTREMES_64 = _EXTREMES_32 + (0x7FFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF, 1 << 40)


def _body(rng: random.Random, data: bytes, header: int) -> int:
    """A random offset past the header (or anywhere, for files not longer than their header)."""
    lo = header if len(data) > header + 1 else 0
    return rng.randrange(lo, max(lo + 1, len(data)))


def flip_bytes(rng: random.Random, data: bytes, header: int) -> bytes:
    """1 to a few hundred random bytes of the body XORed with random values."""
    out = bytearray(data)
    for _ in range(rng.choice((1, 2, 8, 32, 200))):
        out[_body(rng, data, header)] ^= rng.randrange(1, 256)
    return bytes(out)


def flip_bits(rng: random.Random, data: bytes, header: int) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice((1, 4, 16))):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def truncate(rng: random.Random, data: bytes, header: int) -> bytes:
    """Cut anywhere: inside the header, just after it, or in the body."""
    where = rng.choice(("head", "body", "body", "near_end"))
    if where == "head":
        return data[:rng.randrange(1, max(2, min(header, len(data))))]
    if where == "near_end":
        return data[:max(1, len(data) - rng.randrange(1, 64))]
    return data[:max(1, _body(rng, data, header))]


def duplicate_chunk(rng: random.Random, data: bytes, header: int) -> bytes:
    a = _body(rng, data, header)
    n = rng.choice((4, 64, 512, 4096))
    at = _body(rng, data, header)
    return data[:at] + data[a:a + n] + data[at:]


def drop_chunk(rng: random.Random, data: bytes, header: int) -> bytes:
    a = _body(rng, data, header)
    n = rng.choice((1, 4, 64, 512, 4096))
    out = data[:a] + data[a + n:]
    return out or data[:1]


def zero_run(rng: random.Random, data: bytes, header: int) -> bytes:
    a = _body(rng, data, header)
    n = rng.choice((16, 256, 2048))
    return data[:a] + bytes(min(n, len(data) - a)) + data[a + n:]


def extreme_field(rng: random.Random, data: bytes, header: int) -> bytes:
    """A 16/32/64-bit field (little or big endian) set to an extreme value, in the header most of the time:
    sizes, counts, offsets and dimensions live there."""
    width = rng.choice((2, 4, 4, 8))
    span = header if header > width and rng.random() < 0.7 else len(data)
    if span <= width:
        return data
    at = rng.randrange(0, span - width)
    value = rng.choice(_EXTREMES_64 if width == 8 else _EXTREMES_32) & ((1 << (8 * width)) - 1)
    packed = value.to_bytes(width, rng.choice(("little", "big")))
    return data[:at] + packed + data[at + width:]


def mp4_boxes(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of the top-level ISO-BMFF boxes (mp4/mov/m4a), or [] if the file is not one."""
    boxes, pos = [], 0
    while pos + 8 <= len(data):
        size = struct.unpack(">I", data[pos:pos + 4])[0]
        if size == 1 and pos + 16 <= len(data):
            size = struct.unpack(">Q", data[pos + 8:pos + 16])[0]
        if size < 8 or pos + size > len(data):
            break
        boxes.append((pos, pos + size))
        pos += size
    return boxes if pos == len(data) and len(boxes) > 1 else []


def riff_chunks(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of the chunks inside a RIFF file (wav, avi, webp), or []."""
    if data[:4] != b"RIFF" or len(data) < 12:
        return []
    chunks, pos = [], 12
    while pos + 8 <= len(data):
        size = struct.unpack("<I", data[pos + 4:pos + 8])[0]
        end = pos + 8 + size + (size & 1)
        if end > len(data):
            break
        chunks.append((pos, end))
        pos = end
    return chunks if len(chunks) > 1 else []


def shuffle_boxes(rng: random.Random, data: bytes, header: int) -> bytes:
    """Reorder, drop or repeat the container's top-level boxes (mp4 atoms, RIFF chunks); other files get
    blocks of 256 bytes past the header swapped."""
    spans = mp4_boxes(data) or riff_chunks(data)
    if spans:
        head = data[:spans[0][0]]
        parts = [data[a:b] for a, b in spans]
        op = rng.choice(("shuffle", "drop", "repeat"))
        if op == "shuffle":
            rng.shuffle(parts)
        elif op == "drop":
            parts.pop(rng.randrange(len(parts)))
        else:
            parts.insert(rng.randrange(len(parts) + 1), rng.choice(parts))
        return head + b"".join(parts) + data[spans[-1][1]:]
    if len(data) < header + 512:
        return flip_bytes(rng, data, header)
    a, b = sorted(rng.sample(range(header, len(data) - 256), 2))
    if b - a < 256:
        return data
    return data[:a] + data[b:b + 256] + data[a + 256:b] + data[a:a + 256] + data[b + 256:]


MUTATORS: dict[str, Mutator] = {
    "flip_bytes": flip_bytes, "flip_bits": flip_bits, "truncate": truncate, "duplicate_chunk": duplicate_chunk,
    "drop_chunk": drop_chunk, "zero_run": zero_run, "extreme_field": extreme_field, "shuffle_boxes": shuffle_boxes,
}


def mutate(rng: random.Random, data: bytes, header: int) -> tuple[str, bytes]:
    """One or two stacked mutations; returns (their names joined by '+', the bytes). An empty input gets random
    bytes (there is nothing to flip or cut)."""
    if not data:
        return "fill", rng.randbytes(rng.choice((1, 16, 4096)))
    names = [rng.choice(list(MUTATORS))]
    if rng.random() < 0.25:
        names.append(rng.choice(list(MUTATORS)))
    out = data
    for name in names:
        out = MUTATORS[name](rng, out, header)
    if out == data:  # e.g. boxes shuffled back into their order, a field set to the value it had
        names.append("flip_bytes")
        out = flip_bytes(rng, out, header)
    return "+".join(names), out


__all__ = ["MUTATORS", "mp4_boxes", "mutate", "riff_chunks"]
