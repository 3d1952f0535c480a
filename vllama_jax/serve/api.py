"""The OpenAI chat-completions request as this server understands it: parsing and validation of the JSON body into
a `ChatRequest` (turns with at most one media item, decoding settings), media URLs resolved to bytes (``data:``
URLs, or ``file://`` paths under an allowed folder), and the OpenAI-style error object every refusal is answered
with.

Content parts (the shapes vLLM documents): ``{"type": "text", "text"}``, ``{"type": "image_url", "image_url":
{"url"}}``, ``{"type": "video_url", "video_url": {"url"}}``, ``{"type": "input_audio", "input_audio": {"data":
BASE64, "format": "wav"}}``, ``{"type": "audio_url", "audio_url": {"url"}}``. A conversation holds at most one media
item, as upstream's demo (an upload starts a conversation); a video's sound track is used unless the request says
``"with_audio": false`` (an extension field, the web demo's Audio checkbox).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import first_line
from ..inference.uploads import MediaKind

#: MIME subtype -> file extension for data: URLs (the media loaders pick their decoder from the file)
_MIME_EXT = {"jpeg": ".jpg", "jpg": ".jpg", "png": ".png", "webp": ".webp", "bmp": ".bmp", "gif": ".gif",
             "mp4": ".mp4", "webm": ".webm", "quicktime": ".mov", "x-matroska": ".mkv", "x-msvideo": ".avi",
             "wav": ".wav", "x-wav": ".wav", "wave": ".wav", "mpeg": ".mp3", "mp3": ".mp3", "ogg": ".ogg",
             "flac": ".flac", "mp4a": ".m4a", "x-m4a": ".m4a", "aac": ".aac"}
_PART_KIND = {"image_url": "image", "video_url": "video", "audio_url": "audio", "input_audio": "audio"}


class APIError(Exception):
    """A refused request: HTTP status and the OpenAI error object's type / code / param."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, code=code, param=param)


@dataclass
class MediaRef:
    """One media item of a request: its bytes' hash (the encoder cache key), where the bytes are, and its kind."""

    kind: MediaKind
    digest: str
    path: Path  # a file the media loaders can read (for data: URLs: a file the server wrote)


@dataclass
class ChatRequest:
    """A validated chat-completions request."""

    turns: list[tuple[str, str, MediaRef | None]]
    system: str | None
    max_tokens: int
    temperature: float
    top_p: float
    n: int
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    with_audio: bool
    num_beams: int
    model: str

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.num_beams > 1

    @property
    def media(self) -> MediaRef | None:
        return next((m for _, _, m in self.turns if m is not None), None)


@dataclass
class Limits:
    """Server-side bounds on requests."""

    allowed_media_paths: Sequence[Path] = ()
    media_dir: Path = field(default_factory=lambda: Path("."))
    max_tokens_default: int = 256
    max_n: int = 8


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise bad(f"{name} must be a number in [{lo}, {hi}], got {v!r}", name)
    return float(v)


def _integer(body: dict, name: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        raise bad(f"{name} must be an integer >= {lo}" + (f" and <= {hi}" if hi is not None else "") + f", got {v!r}",
                  name)
    return v


def parse_request(body: Any, limits: Limits) -> ChatRequest:
    """Validate a chat-completions body (raises `APIError` naming the problem); media URLs are resolved here."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    turns: list[tuple[str, str, MediaRef | None]] = []
    system = None
    n_media = 0
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad(f"{where} must be an object", where)
        role = msg.get("role")
        text, media = _content(msg.get("content"), f"{where}.content", limits, role)
        if role in ("system", "developer"):
            system = text if system is None else system + "\n" + text
        elif role == "user":
            turns.append(("user", text, media))
            n_media += media is not None
        elif role == "assistant":
            turns.append(("assistant", text, None))
        else:
            raise bad(f"{where}.role must be system, user or assistant, got {role!r}", f"{where}.role")
    if not turns or turns[-1][0] != "user":
        raise bad("the last message must be the user's", "messages")
    if n_media > 1:
        raise bad("a conversation may hold one media item (image, video or audio), as the upstream demo; "
                  f"this one has {n_media}", "messages")

    max_tokens = _integer(body, "max_completion_tokens", None, 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", limits.max_tokens_default, 1)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    n = _integer(body, "n", 1, 1, limits.max_n)
    num_beams = _integer(body, "num_beams", 1, 1, 8)
    if n > 1 and temperature == 0.0:
        raise bad("n > 1 needs sampling (temperature > 0): greedy choices would all be the same", "n")
    if num_beams > 1 and (n > 1 or body.get("stream")):
        raise bad("num_beams > 1 gives one final answer: it cannot be streamed nor have n > 1", "num_beams")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise bad("stop must be a non-empty string or a list of at most 4 of them", "stop")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise bad("stream_options must be an object", "stream_options")
    with_audio = body.get("with_audio", True)
    if not isinstance(with_audio, bool):
        raise bad("with_audio must be true or false", "with_audio")
    return ChatRequest(
        turns=turns, system=system, max_tokens=max_tokens, temperature=temperature,
        top_p=_number(body, "top_p", 1.0, 1e-6, 1.0), n=n, seed=_integer(body, "seed", None, 0, 2**31 - 1),
        stop=stop, stream=bool(body.get("stream", False)), include_usage=bool(stream_options.get("include_usage")),
        with_audio=with_audio, num_beams=num_beams, model=str(body.get("model") or ""))


def _content(content: Any, where: str, limits: Limits, role: Any) -> tuple[str, MediaRef | None]:
    """(text, media) of a message's content: a string or a list of parts."""
    if isinstance(content, str):
        return content, None
    if content is None and role == "assistant":
        return "", None
    if not isinstance(content, list):
        raise bad(f"{where} must be a string or a list of content parts", where)
    texts: list[str] = []
    media: MediaRef | None = None
    for j, part in enumerate(content):
        pw = f"{where}[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise bad(f"{pw} must be an object with a type", pw)
        kind = part["type"]
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad(f"{pw}.text must be a string", pw)
            texts.append(part["text"])
            continue
        if kind not in _PART_KIND:
            raise bad(f"{pw}: unknown content type {kind!r} (text, image_url, video_url, input_audio, audio_url)",
                      pw, code="unsupported_content_type")
        if role != "user":
            raise bad(f"{pw}: media is only accepted in user messages", pw)
        if media is not None:
            raise bad(f"{where}: a conversation may hold one media item", pw)
        media = _media_part(part, kind, pw, limits)
    return "\n".join(texts), media


def _media_part(part: dict, kind: str, where: str, limits: Limits) -> MediaRef:
    inner = part.get(kind)
    if not isinstance(inner, dict):
        raise bad(f"{where}.{kind} must be an object", where)
    media_kind: MediaKind = _PART_KIND[kind]  # type: ignore[assignment]
    if kind == "input_audio":
        fmt = inner.get("format")
        if not isinstance(fmt, str) or not fmt.isalnum():
            raise bad(f"{where}.input_audio.format must name the audio format (e.g. wav)", where)
        data = _b64(inner.get("data"), where)
        return _stored(data, "." + fmt.lower(), media_kind, limits)
    url = inner.get("url")
    if not isinstance(url, str) or not url:
        raise bad(f"{where}.{kind}.url must be a string", where)
    if url.startswith("data:"):
        header, sep, payload = url[5:].partition(",")
        if not sep or not header.endswith(";base64"):
            raise bad(f"{where}: a data: URL must be base64 (data:<mime>;base64,...)", where, code="invalid_url")
        mime = header[:-7]
        ext = _MIME_EXT.get(mime.partition("/")[2].lower(), "")
        if not ext:
            ext = {"image": ".png", "audio": ".wav"}.get(media_kind, ".mp4")
        return _stored(_b64(payload, where), ext, media_kind, limits)
    if url.startswith("file://"):
        return MediaRef(media_kind, *_allowed_file(url, where, limits))
    scheme = url.partition(":")[0] if ":" in url else "(none)"
    raise APIError(400, f"{where}: media URL scheme {scheme!r} is not accepted: use a data: URL or a file:// path "
                        "under an --allowed-media-path", code="invalid_url", param=where)


def _b64(data: Any, where: str) -> bytes:
    if not isinstance(data, str) or not data:
        raise bad(f"{where}: media data must be a non-empty base64 string", where)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad(f"{where}: media data is not valid base64", where) from None


def _stored(data: bytes, ext: str, kind: MediaKind, limits: Limits) -> MediaRef:
    """Bytes of a data: URL written once under the server's media folder, named by their hash."""
    digest = hashlib.sha256(data).hexdigest()
    path = limits.media_dir / f"{digest}{ext}"
    if not path.exists():
        tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return MediaRef(kind, digest, path)


def _allowed_file(url: str, where: str, limits: Limits) -> tuple[str, Path]:
    try:
        parsed = urllib.parse.urlparse(url)
        # the path is the client's: a NUL byte is a ValueError, a loop of links an OSError
        path = Path(urllib.parse.unquote(parsed.path)).resolve()
    except (OSError, ValueError) as e:
        raise APIError(400, f"{where}: not a usable file:// URL: {first_line(e)}", code="invalid_url",
                       param=where) from None
    if parsed.netloc not in ("", "localhost"):
        raise APIError(400, f"{where}: file:// URLs must name a local path", code="invalid_url", param=where)
    shown = repr(str(path))[:300]  # quoted: a client's path may hold newlines
    if not any(path.is_relative_to(root) for root in limits.allowed_media_paths):
        raise APIError(403, f"{where}: {shown} is not under an allowed media path (server flag "
                            "--allowed-media-path)", code="media_path_not_allowed", param=where)
    try:
        if not path.is_file():
            raise bad(f"{where}: {shown}: no such file", where, code="media_not_found")
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:  # a name too long, a file that cannot be read
        raise bad(f"{where}: {shown} cannot be read: {first_line(e)}"[:500], where, code="media_not_found") from None
    return h.hexdigest(), path


__all__ = ["APIError", "ChatRequest", "Limits", "MediaRef", "bad", "parse_request"]
