"""Chat with a Video-LLaMA model: THE Python inference API (upstream ``conversation_video.Chat`` and the demo flows
of ``demo_video.py`` / ``demo_audiovideo.py``; upstream.md §6.3-6.5 and 9).

```python
from vllama_jax.inference import VideoLLaMAChat, GenerationConfig

chat = VideoLLaMAChat.from_model_dir("models/vl-llama2-7b", mesh="data=1,fsdp=2,tensor=4")
chat.upload_video("dog_barking.mp4", with_audio=True)
chat.ask("What is the dog doing and what can you hear?")
print(chat.answer())                      # upstream sampling defaults (top-p 0.9, top-k 50, T=1)
chat.ask("Is it indoors?")                # multi-turn: history and media are kept
print(chat.answer(GenerationConfig(do_sample=False, max_new_tokens=64)))

chat.generate_batch([("Describe the video.", "a.mp4"), ("What is in the image?", "b.jpg"), "Say hi."])
```

Each upload starts a fresh conversation; the demo flows (video with / without audio, image, audio file) and their
messages are in ``uploads.py``.

``ask`` joins the first question to the upload message with one space (upstream rule). ``answer`` builds the
context like ``get_context_emb`` (upstream.md §6.4): render with a pending assistant turn, split the prompt string on
``<ImageHere>``, tokenize the pieces (only the first gets BOS, if the tokenizer adds one), embed, interleave with
the media blocks, keep the last ``max_length - max_new_tokens`` (2000 - 300 = 1700) positions; then generates
(``inference.generate.Generator``, template stop sequences always added) and post-processes the text (upstream.md §6.5).
The ChatML template (SmolLM2) goes through the tokenizer's own chat template with the same placeholder text.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence, Union

import jax
import numpy as np

from ..config import ModelConfig
from ..defaults import embedded_model
from ..errors import VllamaError
from ..media import MediaError, Window, load_audio, load_image, load_video
from ..models import build_model, set_precision
from ..models.groups import LLM_GROUP, branch_groups
from ..models.lora import with_merged_lora
from ..models.video_llama import VideoLLaMA, llama_module
from ..runtime import use_compilation_cache
from ..sharding import batch_sharding, make_mesh
from ..text import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    Conversation,
    Tokenizer,
    ask as conversation_ask,
    chat_prompt,
    get_template,
    postprocess_answer,
    prompt_segments,
    segment_token_ids,
    stop_token_sequences,
    upload as conversation_upload,
)
from ..text.conversation import TEMPLATES, SeparatorStyle, canonical_template_name
from ..weights.model_dir import load_model_dir
from .batching import ContextTooLong
from .engine import round_up
from .generate import GenerationConfig, GenerationOutput, Generator
from .placement import placed
from .uploads import MediaKind, Upload, audio_upload, image_upload, media_kind, video_upload

#: upstream Chat.answer's context budget (max_length); the context keeps max_length - max_new_tokens positions
MAX_LENGTH = 2000
#: frames sampled per video (upstream load_video n_frms)
NUM_FRAMES = 8
#: parameter groups the vision path needs (a model directory without them cannot chat about videos)
VISION_GROUPS = branch_groups("video")
AUDIO_GROUPS = branch_groups("audio")


class ChatError(VllamaError, RuntimeError):
    """The chat cannot do what was asked (e.g. an audio upload on a model without an audio branch)."""


# ------------------------------------------------------------------------------------------------------------
# prompts and contexts


@dataclass
class Prompt:
    """One row of ``generate_batch``: a question and at most one media item (a path or a prepared ``Upload``).
    ``kind`` None: from the file extension."""

    text: str
    media: Union[str, os.PathLike, Upload, None] = None
    kind: MediaKind | None = None
    with_audio: bool = True


PromptLike = Union[str, Prompt, tuple]


@dataclass
class ChatContext:
    """What ``get_context_emb`` builds: the rendered prompt, its pieces and their ids, and the (L, D) embeddings
    actually fed to the LLM (after left truncation: ``truncated`` positions were dropped)."""

    prompt: str
    segments: list[str]
    segment_ids: list[list[int]]
    embeds: np.ndarray
    truncated: int = 0


class _TextStream:
    """Turns the engine's per-step token callback into text deltas for a display: decodes the row's tokens so far,
    cuts at a stop marker and holds back a partial marker or an incomplete UTF-8 character at the end."""

    def __init__(self, tokenizer: Tokenizer, markers: Sequence[str], emit: Callable[[str], None]):
        self.tokenizer = tokenizer
        self.markers = [m for m in markers if m]
        self.emit = emit
        self.ids: list[int] = []
        self.shown = ""

    def _display(self, text: str) -> str:
        for m in self.markers:
            i = text.find(m)
            if i >= 0:
                text = text[:i]
        for m in self.markers:  # a marker may be arriving token by token
            for k in range(min(len(m) - 1, len(text)), 0, -1):
                if text.endswith(m[:k]):
                    text = text[:-k]
                    break
        return text.rstrip("\ufffd").lstrip()

    def on_step(self, step: int, tokens: np.ndarray) -> None:
        tok = int(tokens[0])
        if tok < 0:
            return
        self.ids.append(tok)
        self._show(self._display(self.tokenizer.decode(self.ids)))

    def _show(self, text: str) -> None:
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.emit(text[len(self.shown):])
            self.shown = text

    def finish(self, final: str) -> None:
        self._show(final)


def shared_contexts(contexts: Sequence[Any], uploads: Sequence[Any]) -> tuple[list, list[int], list] | None:
    """Split the single-turn contexts of questions about the same upload into the prefix they share and each
    one's tail: ``(prefixes, group of each context, tails)`` (every tail keeps at least its last position), or None
    when no upload is asked about twice (nothing to share)."""
    members: dict[int, list[int]] = {}
    for i, u in enumerate(uploads):
        members.setdefault(id(u) if u is not None else -1 - i, []).append(i)
    if all(len(m) == 1 for m in members.values()):
        return None
    host = [np.asarray(c) for c in contexts]
    prefixes: list[np.ndarray] = []
    group = [0] * len(host)
    tails: list[np.ndarray] = [host[0]] * len(host)
    for m in members.values():
        n = min(len(host[i]) for i in m) - 1
        for i in m[1:]:
            differ = np.flatnonzero(np.any(host[m[0]][:n] != host[i][:n], axis=1))
            n = int(differ[0]) if differ.size else n
        n = max(n, 1)  # a prefix of at least one position (the prompts all start with BOS / the template)
        for i in m:
            group[i], tails[i] = len(prefixes), host[i][n:]
        prefixes.append(host[m[0]][:n])
    return prefixes, group, tails


def _stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _bucket(n: int, multiple: int = 1) -> int:
    """Batch size actually compiled for n rows: the next power of two, rounded up to a multiple of the devices
    that shard the batch (fewer distinct shapes -> fewer compilations)."""
    return round_up(1 << max(0, n - 1).bit_length(), multiple)


# ------------------------------------------------------------------------------------------------------------
# the chat


class VideoLLaMAChat:
    """A Video-LLaMA model ready to chat (see the module docstring).

    config / params / tokenizer: a model (``weights.load_model_dir`` gives all three; params may be a subset of the
        groups: without the audio groups the audio branch is off). mesh: None (one device), a ``Mesh`` or a spec
        string ``"data=1,fsdp=2,tensor=4"``; batches are sharded over data x fsdp, and the answers are those of one
        device. Params come placed (``load_model_dir(mesh=...)``, ``embedded_model(mesh=...)``,
        ``models.place_params``) and are used as they are; host arrays are placed here, once
        (``placement.placed``).
    template: conversation template name (default ``config.template``: "vicuna", "llama_2" or "chatml").
    demo: which demo's system strings to use for video uploads: "audiovideo" (demo_audiovideo.py: "") or "video"
        (demo_video.py). num_frames: frames sampled per video. max_length: upstream's context budget (2000).
    honour_rotation: turn phone videos upright by their rotation metadata (False: as upstream's decord, which
        ignores it). audio_fallback: which failures to load a video's sound fall back to the video-only flow:
        "media" (unreadable or missing audio; other errors propagate) or "any" (upstream's bare ``except``).
    generation_config: the default decoding settings of ``answer`` / ``generate_batch`` (upstream sampling).
    compilation_cache: enable JAX's persistent compilation cache (see ``vllama_jax.runtime.use_compilation_cache``).
    notice: a line to show users about this model (the embedded model's "untrained" notice); log: where notes
        (audio fallbacks, truncation) go (default: stderr).
    donate_llm: the chat may delete the LLM's arrays it replaces (int8 kernels repacked for the CPU kernel,
        `DecodeEngine`'s ``donate_params``), holding one extra leaf at most; ``from_model_dir`` and ``embedded``,
        which own the model they load, pass True.
    huge_pages: on one CPU device, move the LLM's weights into 2 MiB pages (`DecodeEngine`'s ``huge_pages``; with
        ``donate_llm``): decoding streams them faster (LLaMA-2-7B: +6-7%), loading takes ~1 s per GB longer. Worth it
        for long sessions (serving, evaluation); weights placed from host arrays are in huge pages anyway.
    """

    def __init__(self, config: ModelConfig, params: dict[str, Any], tokenizer: Tokenizer, *, mesh: Any = None,
                 template: str | None = None, demo: Literal["audiovideo", "video"] = "audiovideo",
                 num_frames: int = NUM_FRAMES, max_length: int = MAX_LENGTH,
                 generation_config: GenerationConfig | None = None, compilation_cache: bool | str = True,
                 notice: str | None = None, name: str = "", log: Callable[[str], None] | None = None,
                 honour_rotation: bool = True, audio_fallback: Literal["media", "any"] = "media",
                 donate_llm: bool = False, huge_pages: bool = False) -> None:
        if tokenizer is None:
            raise ChatError("the model has no tokenizer (a model directory needs its tokenizer/ folder to chat)")
        missing = [g for g in VISION_GROUPS + (LLM_GROUP,) if g not in params]
        if missing:
            raise ChatError(f"the model lacks parameter group(s) {', '.join(missing)} needed to chat")
        if not 1 <= num_frames <= config.max_frame_pos:
            raise ChatError(f"num_frames must be in 1..{config.max_frame_pos} (the model's frame positions), "
                            f"got {num_frames}")
        if demo not in ("audiovideo", "video"):
            raise ValueError(f"demo must be 'audiovideo' or 'video', got {demo!r}")
        if audio_fallback not in ("media", "any"):
            raise ValueError(f"audio_fallback must be 'media' or 'any', got {audio_fallback!r}")
        use_compilation_cache(compilation_cache)  # before the first compilation, so the encoders are cached too
        self.config = config
        self.tokenizer = tokenizer
        self.template = canonical_template_name(template or config.template)
        self.demo = demo
        self.honour_rotation = bool(honour_rotation)
        self.audio_fallback = audio_fallback
        self.num_frames = int(num_frames)
        self.max_length = int(max_length)
        self.generation_config = generation_config or GenerationConfig()
        self.notice = notice
        self.name = name
        self.log = log or _stderr_log
        self.mesh = make_mesh(mesh) if isinstance(mesh, str) else mesh
        self.has_audio = config.equip_audio_branch and all(g in params for g in AUDIO_GROUPS)

        # LoRA adapters (a training run's eval hook) run merged into the LLM's weights
        self.params = placed(config, with_merged_lora(params, config.lora), self.mesh)
        self.model: VideoLLaMA = build_model(config)
        llama = llama_module(config)
        self.generator = Generator(llama, self.params[LLM_GROUP], mesh=self.mesh, compilation_cache=False,
                                   donate_params=donate_llm, huge_pages=huge_pages)
        self.params = {**self.params, LLM_GROUP: self.generator.params}  # one copy of the LLM: the engine's
        self._towers = {k: v for k, v in self.params.items() if k != LLM_GROUP}
        model = self.model
        self._encode_fns = {
            kind: jax.jit(lambda prm, x, _m=method: model.apply({"params": prm}, x, method=_m))
            for kind, method in (("video", VideoLLaMA.encode_video), ("audio", VideoLLaMA.encode_audio))}

        self.conv: Conversation = get_template(self.template, tokenizer)
        self.media: list[np.ndarray] = []
        self.upload_info: Upload | None = None
        self._join_next = False
        #: the engine's output of the last ``answer`` (token ids, finish reason, timings)
        self.last_output: GenerationOutput | None = None

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_model_dir(cls, path: str | os.PathLike, mesh: Any = None, quantize: str | None = None,
                       **kw: Any) -> "VideoLLaMAChat":
        """Load a converted model directory (``vllama-jax convert`` / ``save_model_dir``) straight onto ``mesh``;
        ``quantize="int8"``: the LLM's weights as int8 + per-channel scales (``models.quant``), quantized leaf by
        leaf as they are read."""
        mesh = make_mesh(mesh) if isinstance(mesh, str) else mesh
        kw.setdefault("donate_llm", True)
        return cls.from_loaded(load_model_dir(path, mesh=mesh, quantize=quantize), mesh=mesh, **kw)

    @classmethod
    def from_loaded(cls, loaded: Any, mesh: Any = None, precision: str | None = None, **kw: Any
                    ) -> "VideoLLaMAChat":
        """From a ``LoadedModel`` (or anything with ``config``, ``params``, ``tokenizer``). ``precision``: a named
        precision mode ("upstream", "bf16", "fp32") instead of the model's own (its params are cast to it)."""
        manifest = getattr(loaded, "manifest", None) or {}
        kw.setdefault("notice", manifest.get("notice"))
        kw.setdefault("name", manifest.get("name") or str(getattr(loaded, "path", "") or ""))
        config, params = loaded.config, loaded.params
        if precision is not None:
            config, params = set_precision(config, params, precision)
        return cls(config, params, loaded.tokenizer, mesh=mesh, **kw)

    @classmethod
    def embedded(cls, seed: int = 0, mesh: Any = None, quantize: str | None = None, **kw: Any) -> "VideoLLaMAChat":
        """The embedded default model (``vllama_jax.defaults``): SmolLM2-135M-Instruct + untrained CPU towers,
        built onto ``mesh`` (its LLM in int8 with ``quantize="int8"``)."""
        mesh = make_mesh(mesh) if isinstance(mesh, str) else mesh
        kw.setdefault("donate_llm", True)
        return cls.from_loaded(embedded_model(seed, mesh=mesh, quantize=quantize), mesh=mesh, **kw)

    def update_params(self, params: dict[str, Any]) -> None:
        """Swap in new values of the same parameter groups (e.g. a training run's current state, for its eval
        hook). The compiled encoders, prefill, decode and scoring programs take the parameters as arguments, so
        nothing is recompiled."""
        params = with_merged_lora(params, self.config.lora)
        if set(params) != set(self.params):
            raise ChatError(f"update_params: groups {sorted(params)} differ from the chat's {sorted(self.params)}")
        self.params = placed(self.config, params, self.mesh)
        self._towers = {k: v for k, v in self.params.items() if k != LLM_GROUP}
        self.generator.params = self.params[LLM_GROUP]
        self.params = {**self.params, LLM_GROUP: self.generator.params}

    @property
    def batch_multiple(self) -> int:
        """Rows a batch is padded to a multiple of (the mesh axes that shard the batch)."""
        if self.mesh is None:
            return 1
        return int(self.mesh.shape.get("data", 1) * self.mesh.shape.get("fsdp", 1))

    def swap_media_params(self, params: dict[str, Any]) -> None:
        """Use other values for the media groups (every group but the LLM; same shapes, e.g. the branches before
        and after training). The LLM and every compiled program are kept: no recompilation. The conversation's
        already encoded media are not re-encoded."""
        if LLM_GROUP in params:
            raise ValueError("swap_media_params keeps the LLM; pass the media groups only")
        unknown = sorted(set(params) - set(self._towers))
        if unknown:
            raise ValueError(f"unknown media group(s) {', '.join(unknown)}")
        new = placed(self.config, dict(params), self.mesh)
        self.params = {**self.params, **new}
        self._towers = {**self._towers, **new}

    # ---- media preparation (host) -------------------------------------------------------------------------
    def prepare_video(self, path: str | os.PathLike, with_audio: bool = True, window: Window | None = None
                      ) -> Upload:
        """Decode a video (and its audio) into an ``Upload``; raises ``MediaError`` if the video is unreadable.
        A failed audio load falls back to the video-only flow (``note`` says why), as upstream. ``window``:
        (start, end) seconds the frames are sampled in (``load_video``); the audio clips still span the file."""
        video = load_video(path, num_frames=self.num_frames, image_size=self.config.vit.image_size,
                           honour_rotation=self.honour_rotation, window=window)
        note = ""
        clips = None
        if with_audio:
            if not self.has_audio:
                note = "this model has no audio branch; using the video only"
            else:
                try:
                    clips = load_audio(path, clips_per_video=self.config.num_audio_positions).clips
                except (MediaError if self.audio_fallback == "media" else Exception) as e:
                    reason = e.reason if isinstance(e, MediaError) else f"{type(e).__name__}: {e}"
                    note = f"no usable audio ({reason}); using the video only"
        return video_upload(video.frames, clips=clips, frame_message=video.message(), demo=self.demo,
                            path=os.fspath(path), note=note, times=video.timestamps)

    def prepare_image(self, path: str | os.PathLike) -> Upload:
        return image_upload(load_image(path, image_size=self.config.vit.image_size), path=os.fspath(path))

    def prepare_audio(self, path: str | os.PathLike) -> Upload:
        if not self.has_audio:
            raise ChatError("this model has no audio branch (convert it with the ImageBind and AL checkpoints)")
        clips = load_audio(path, clips_per_video=self.config.num_audio_positions).clips
        return audio_upload(clips, path=os.fspath(path))

    def prepare(self, path: str | os.PathLike, kind: MediaKind | None = None, with_audio: bool = True) -> Upload:
        kind = kind or media_kind(path)
        if kind == "image":
            return self.prepare_image(path)
        if kind == "audio":
            return self.prepare_audio(path)
        if kind == "video":
            return self.prepare_video(path, with_audio)
        raise ValueError(f"unknown media kind {kind!r} (video, image or audio)")

    # ---- encoding (device) --------------------------------------------------------------------------------
    def encode(self, uploads: Sequence[Upload]) -> list[list[np.ndarray]]:
        """Media embedding blocks of each upload, in placeholder order; same-shaped inputs of all uploads run as one
        batch per encoder (padded to a compiled bucket)."""
        jobs: dict[tuple[str, tuple[int, ...]], list[tuple[int, int, np.ndarray]]] = {}
        out: list[list[Any]] = [[None] * len(u.blocks) for u in uploads]
        for i, u in enumerate(uploads):
            for j, block in enumerate(u.blocks):
                if block == "audio":
                    if not self.has_audio:
                        raise ChatError("this model has no audio branch")
                    x, enc = u.clips, "audio"
                else:  # video, or image as a one-frame video
                    x, enc = u.frames, "video"
                if x is None:
                    raise ValueError(f"upload {i} ({u.path or u.kind}) has no {block} input")
                jobs.setdefault((enc, tuple(x.shape)), []).append((i, j, x))
        for (enc, _), items in jobs.items():
            embeds = self._run_encoder(enc, [x for _, _, x in items])
            for (i, j, _), emb in zip(items, embeds):
                out[i][j] = emb
        return out

    def _run_encoder(self, enc: str, xs: list[np.ndarray]) -> list[np.ndarray]:
        n = len(xs)
        batch = np.zeros((_bucket(n, self.batch_multiple),) + xs[0].shape, np.float32)
        batch[:n] = np.stack(xs)
        x = jax.device_put(batch, batch_sharding(self.mesh, batch.ndim, batch.shape)) if self.mesh else batch
        emb = np.asarray(self._encode_fns[enc](self._towers, x))
        return [emb[k] for k in range(n)]

    def embed_ids(self, rows: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """LLM token embeddings of several id lists (one padded call; placeholder ids embed as id 0)."""
        lengths = [len(r) for r in rows]
        total = sum(lengths)
        ids = np.zeros((1, max(16, 1 << max(0, total - 1).bit_length())), np.int32)
        ids[0, :total] = [t for r in rows for t in r]
        ids[ids >= self.config.llama.vocab_size] = 0  # as VideoLLaMA.embed_tokens: the table is not resized
        flat = np.asarray(self.generator.embed(ids))[0, :total].astype(np.float32)
        return np.split(flat, np.cumsum(lengths)[:-1]) if rows else []

    # ---- conversation ---------------------------------------------------------------------------------------
    def set_template(self, name: str) -> None:
        """Switch the conversation template (e.g. "vicuna" / "llama_2" / "chatml"); starts a fresh conversation."""
        self.template = canonical_template_name(name)
        self.reset()

    def reset(self, keep_media: bool = False) -> None:
        """Forget the conversation and the uploaded media; ``keep_media``: start over with the same upload (its
        message and embeddings, no re-encoding)."""
        upload, media = self.upload_info, self.media
        self.conv = get_template(self.template, self.tokenizer)
        self.media = []
        self.upload_info = None
        self._join_next = False
        if keep_media and upload is not None:
            conversation_upload(self.conv, upload.message, upload.system)
            self.media, self.upload_info, self._join_next = media, upload, upload.join_question

    def upload(self, upload: Upload) -> Upload:
        """Start a fresh conversation around one prepared upload (encodes it now, like upstream)."""
        embeds = self.encode([upload])[0]
        self.reset()
        conversation_upload(self.conv, upload.message, upload.system)
        self.media = embeds
        self.upload_info = upload
        self._join_next = upload.join_question
        if upload.note:
            self.log(f"note: {upload.path or upload.kind}: {upload.note}")
        return upload

    def upload_video(self, path: str | os.PathLike, with_audio: bool = True) -> Upload:
        return self.upload(self.prepare_video(path, with_audio))

    def upload_image(self, path: str | os.PathLike) -> Upload:
        return self.upload(self.prepare_image(path))

    def upload_audio(self, path: str | os.PathLike) -> Upload:
        return self.upload(self.prepare_audio(path))

    def ask(self, text: str) -> None:
        """Add a user question (joined to a pending upload message, upstream ``Chat.ask``)."""
        self._ask(self.conv, text, self._join_next)
        self._join_next = False

    @staticmethod
    def _ask(conv: Conversation, text: str, join: bool) -> None:
        if IMAGE_PLACEHOLDER in text:
            # one placeholder string stands for one media block; a literal one would misalign them
            raise ValueError(f"a question may not contain {IMAGE_PLACEHOLDER}")
        if join and conv.messages and conv.messages[-1][0] == conv.roles[0]:
            conv.messages[-1][1] = conv.messages[-1][1] + " " + text
        else:
            conversation_ask(conv, text)

    def conversation(self, turns: Sequence[tuple[str, str, Upload | None]], system: str | None = None
                     ) -> Conversation:
        """A fresh conversation built from a whole history the way ``upload`` / ``ask`` / ``answer`` build it turn
        by turn: ``turns`` are ``(role, text, upload)`` with role "user" or "assistant"; a user turn with an upload
        first puts the upload's message (and system string) in, then its text is asked (joined as ``ask`` joins
        it). ``system``: replaces the system string (the upload's or the template's). Used by the server."""
        conv = get_template(self.template, self.tokenizer)
        for role, text, upload in turns:
            if role == "assistant":
                conv.append_message(conv.roles[1], text)
                continue
            if role != "user":
                raise ValueError(f"a turn's role is 'user' or 'assistant', got {role!r}")
            if upload is not None:
                conversation_upload(conv, upload.message, upload.system)
            if text or upload is None:
                self._ask(conv, text, upload is not None and upload.join_question)
        if system is not None:
            conv.system = system
        return conv

    def head_tokens(self, conv: Conversation, ctx: ChatContext) -> int:
        """How many leading ids of ``ctx`` (built from ``conv``) render what comes before the conversation's first
        message (the system prompt and the first role tag): a prefix every conversation with the same system
        prompt shares, which a server prefills once. Where that text tokenizes differently on its own (a merge across
        the boundary), the ids both agree on; 0 when none."""
        if not conv.messages or not isinstance(conv.messages[0][1], str) or not ctx.segment_ids:
            return 0
        at = ctx.prompt.find(conv.messages[0][1])
        if at <= 0:
            return 0
        return self._agreeing_ids(ctx.prompt[:at], ctx.segment_ids[0], first=True)

    def tail_tokens(self, ctx: ChatContext, text: str) -> int:
        """How many leading ids of ``ctx``'s last text segment render what comes before the last occurrence of
        ``text`` in it (the ids both agree on, as in `head_tokens`); 0 when ``text`` is not there. With the last
        user message as ``text``: the part of the prompt after the media that is the same for every question
        about them (the closing media tag, the template's fixed instruction), which a server prefills once per
        media."""
        if not ctx.segments or not text:
            return 0
        at = ctx.segments[-1].rfind(text)
        if at <= 0:
            return 0
        return self._agreeing_ids(ctx.segments[-1][:at], ctx.segment_ids[-1], first=len(ctx.segments) == 1)

    def _agreeing_ids(self, before: str, ids: Sequence[int], first: bool) -> int:
        """The leading ids of ``ids`` (a segment's, the prompt's first when ``first``: it may start with BOS) that
        ``before`` tokenized on its own agrees on (at most all but one)."""
        head = segment_token_ids([before], self.tokenizer, add_bos=None if first else False)[0]
        ids = list(ids)
        n = 0
        while n < min(len(head), len(ids) - 1) and head[n] == ids[n]:
            n += 1
        return n

    @property
    def history(self) -> list[tuple[str, str | None]]:
        return [(r, m) for r, m in self.conv.messages]

    # ---- context (upstream.md §6.4) -----------------------------------------------------------------------------
    def context(self, max_new_tokens: int | None = None) -> ChatContext:
        """The context ``answer`` would feed the LLM now (the conversation is not changed)."""
        conv = self.conv.copy()
        return self.build_context(conv, self.media, max_new_tokens)

    def build_context(self, conv: Conversation, media: Sequence[np.ndarray],
                      max_new_tokens: int | None = None, max_positions: int | None = None) -> ChatContext:
        """``get_context_emb`` on ``conv`` (appends the pending assistant turn to it) and its media blocks.
        ``max_positions`` (a server's slots per row): a longer prompt raises ``ContextTooLong`` before its text is
        embedded, so a 200,000-character question costs its tokenization, not a 65,536-row embedding."""
        prompt = chat_prompt(conv)
        segments = prompt_segments(prompt, len(media))
        seg_ids = segment_token_ids(segments, self.tokenizer)
        if max_positions is not None:
            width = self.config.llama.hidden_size
            positions = sum(len(s) for s in seg_ids) + sum(int(np.size(m)) // width for m in media)
            if positions > max_positions:
                raise ContextTooLong(f"the conversation has {positions} positions, more than the {max_positions} "
                                     "a row of the batch holds")
        seg_embs = self.embed_ids(seg_ids)
        parts: list[np.ndarray] = []
        for k, emb in enumerate(seg_embs):
            parts.append(emb)
            if k < len(media):
                parts.append(np.asarray(media[k], np.float32).reshape(-1, emb.shape[-1]))
        embeds = np.concatenate(parts, axis=0)
        mnt = self.generation_config.max_new_tokens if max_new_tokens is None else max_new_tokens
        keep = max(1, self.max_length - mnt)  # upstream: embs[:, max(0, L + max_new_tokens - max_length):]
        dropped = max(0, embeds.shape[0] - keep)
        return ChatContext(prompt, segments, seg_ids, embeds[dropped:], dropped)

    # ---- generation ---------------------------------------------------------------------------------------
    def stop_sequences(self) -> list[list[int]]:
        """Upstream's stop ids for the template (Vicuna "###" ids, LLaMA-2 EOS, ChatML <|im_end|> / EOS)."""
        return stop_token_sequences(self.template, self.tokenizer)

    def resolve_config(self, config: GenerationConfig | None = None) -> GenerationConfig:
        """``config`` (default: the chat's) with the template's stop sequences added, and, unless it says otherwise,
        beam sampling as upstream ran it (transformers 4.28's ``beam_sample``) for upstream's templates and as
        transformers 5 for the others (ChatML)."""
        cfg = config or self.generation_config
        stops = list(cfg.stop_sequences)
        for s in self.stop_sequences():
            if tuple(s) not in stops:
                stops.append(tuple(s))
        semantics = cfg.beam_semantics
        if semantics is None:
            semantics = "5" if TEMPLATES[self.template].sep_style == SeparatorStyle.CHATML else "4.28"
        return cfg.replace(stop_sequences=tuple(stops), beam_semantics=semantics)

    def _markers(self) -> list[str]:
        conv = TEMPLATES[self.template]
        marks = {conv.sep2 or "", "###" if conv.sep == "###" else ""}
        if conv.sep_style == SeparatorStyle.CHATML:
            marks.add(conv.sep)
        try:
            marks.add(self.tokenizer.id_to_token(self.tokenizer.eos_id))
        except Exception:
            pass
        return sorted(m for m in marks if m)

    def decode_answer(self, tokens: Sequence[int]) -> str:
        """Upstream post-processing of generated ids (the engine returns only the new ids, so upstream's
        dummy-BOS strip has nothing to remove): decode with special tokens kept, cut at the stop text, strip."""
        return postprocess_answer(self.tokenizer.decode(list(tokens)), self.template)

    def generate_contexts(self, contexts: Sequence[np.ndarray], config: GenerationConfig | None = None,
                          rng: Any = None, stream: Callable[[int, np.ndarray], None] | None = None,
                          pad_to: int | None = None) -> GenerationOutput:
        """Run the engine on several (L_i, D) contexts at once. ``pad_to``: repeat the first row up to this many
        rows (a fixed batch shape reuses compiled programs; the extra rows are dropped)."""
        n = len(contexts)
        rows = self._pad_rows([np.asarray(c) for c in contexts], pad_to)
        out = self.generator.generate(rows, config=self.resolve_config(config), rng=rng, stream=stream)
        if len(rows) != n:
            out = dataclasses.replace(out, tokens=out.tokens[:n], finish_reasons=out.finish_reasons[:n],
                                      scores=None if out.scores is None else out.scores[:n])
        return out

    def _pad_rows(self, rows: list, pad_to: int | None) -> list:
        """``rows`` + copies of its first row up to ``max(len, pad_to)`` rounded up to ``batch_multiple`` (a fixed
        batch shape reuses compiled programs; the caller drops the extra rows' results)."""
        target = round_up(max(len(rows), pad_to or 0), self.batch_multiple)
        return rows + [rows[0]] * (target - len(rows))

    def answer(self, generation_config: GenerationConfig | None = None, rng: Any = None,
               stream: Callable[[str], None] | None = None) -> str:
        """Answer the pending question; the answer joins the history. ``stream`` receives text pieces as they are
        generated (not with beam search); ``rng``: a jax key or int seed for sampling."""
        cfg = self.resolve_config(generation_config)
        ctx = self.build_context(self.conv.copy(), self.media, cfg.max_new_tokens)
        if ctx.truncated:
            self.log(f"warning: the conversation is longer than the context budget; its first {ctx.truncated} "
                     f"positions are dropped (upstream max_length {self.max_length})")
        streamer = _TextStream(self.tokenizer, self._markers(), stream) if stream is not None else None
        out = self.generate_contexts([ctx.embeds], cfg, rng, streamer.on_step if streamer else None)
        self.last_output = out
        text = self.decode_answer(out.tokens[0])
        if streamer is not None:
            streamer.finish(text)
        # upstream: append (assistant, None) for the prompt, then store the answer in it
        self.conv.append_message(self.conv.roles[1], text)
        return text

    # ---- batches -------------------------------------------------------------------------------------------
    def generate_batch(self, prompts: Sequence[PromptLike], generation_config: GenerationConfig | None = None,
                       rng: Any = None, pad_to: int | None = None) -> list[str]:
        """Answer many single-turn prompts in one device batch. Each prompt is a string (text only), a
        ``(text, media)`` / ``(text, media, kind)`` tuple, or a ``Prompt``; media is a path or a prepared
        ``Upload``. Media are loaded here (``MediaError`` on a bad file), encoded in batches, and the rows of
        different lengths are generated together. Returns the answers in order."""
        items = [self._as_prompt(p) for p in prompts]
        uploads = [None if p.media is None else
                   p.media if isinstance(p.media, Upload) else self.prepare(p.media, p.kind, p.with_audio)
                   for p in items]
        return self.answer_uploads([p.text for p in items], uploads, generation_config, rng, pad_to)

    def answer_uploads(self, questions: Sequence[str], uploads: Sequence[Upload | None],
                       generation_config: GenerationConfig | None = None, rng: Any = None,
                       pad_to: int | None = None) -> list[str]:
        """One fresh single-turn conversation per (question, upload) pair, generated as one batch."""
        cfg = self.resolve_config(generation_config)
        contexts = self._single_turn_contexts(questions, uploads, cfg.max_new_tokens)
        if not contexts:
            return []
        out = self.generate_contexts(contexts, cfg, rng, pad_to=pad_to)
        return [self.decode_answer(t) for t in out.tokens]

    def score_answers(self, questions: Sequence[str], uploads: Sequence[Upload | None],
                      options: Sequence[Sequence[str]], pad_to: int | None = None) -> list[np.ndarray]:
        """Multiple choice: for each (question, upload) pair, in a fresh single-turn conversation, the
        log-likelihood the model gives each of its candidate answers (``options[i]``, texts of the assistant's
        reply, each tokenized on its own as the continuation of the prompt). Returns per question an array of
        summed log-probabilities; ``argmax`` is the model's choice. One prefill per question, all its options in
        one more forward pass. ``pad_to``: as in ``generate_contexts``."""
        if len(options) != len(questions):
            raise ValueError(f"{len(questions)} questions but option lists for {len(options)}")
        for i, opts in enumerate(options):
            if not opts or any(not o for o in opts):
                raise ValueError(f"question {i}: every question needs at least one non-empty option")
        contexts = self._single_turn_contexts(questions, uploads, max_new_tokens=0)
        if not contexts:
            return []
        ids = [[self.tokenizer.encode(o) for o in opts] for opts in options]
        n = len(contexts)
        shared = shared_contexts(contexts, uploads)
        if shared is None:
            return self.generator.score(self._pad_rows(contexts, pad_to), self._pad_rows(ids, pad_to))[:n]
        prefixes, group, tails = shared
        rows = self._pad_rows(list(range(n)), pad_to)
        return self.generator.score_shared(self._pad_rows(prefixes, None), [group[i] for i in rows],
                                           [tails[i] for i in rows], [ids[i] for i in rows])[:n]

    def _single_turn_contexts(self, questions: Sequence[str], uploads: Sequence[Upload | None],
                              max_new_tokens: int) -> list[np.ndarray]:
        """The context embeddings of one fresh single-turn conversation per (question, upload) pair (each
        distinct upload encoded once)."""
        if len(questions) != len(uploads):
            raise ValueError(f"{len(questions)} questions but {len(uploads)} uploads")
        unique = {id(u): u for u in uploads if u is not None}  # an upload asked about several times encodes once
        encoded = dict(zip(unique, self.encode(list(unique.values()))))
        contexts = []
        for q, u in zip(questions, uploads):
            conv = get_template(self.template, self.tokenizer)
            media: list[np.ndarray] = []
            if u is not None:
                conversation_upload(conv, u.message, u.system)
                media = encoded[id(u)]
            self._ask(conv, q, u is not None and u.join_question)
            contexts.append(self.build_context(conv, media, max_new_tokens).embeds)
        return contexts

    def conversation_sample(self, upload: Upload, turns: Sequence[tuple[str, str]],
                            media_rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """A training sample of a conversation about ``upload``: ``(input_ids, labels)`` (1-D int32, labels -100
        except on the replies and their end-of-turn token), with ``media_rows[k]`` placeholder ids where media block
        k goes. Its first turn is token for token the context ``answer_uploads`` / ``score_answers`` build for that
        question (the reply tokenized as ``score_answers`` tokenizes an option); each later turn adds the text the
        template renders for it."""
        if len(media_rows) != len(upload.blocks):
            raise ValueError(f"{len(upload.blocks)} media blocks but {len(media_rows)} row counts")
        placeholder = int(self.tokenizer.image_placeholder_id)
        conv = get_template(self.template, self.tokenizer)
        conversation_upload(conv, upload.message, upload.system)
        ids: list[int] = []
        labels: list[int] = []

        def add(tokens: Sequence[int], trained: Sequence[bool]) -> None:
            ids.extend(tokens)
            labels.extend(t if y else IGNORE_INDEX for t, y in zip(tokens, trained))

        before = ""
        for k, (question, reply) in enumerate(turns):
            self._ask(conv, question, k == 0 and upload.join_question)
            prompt = chat_prompt(conv)
            if k == 0:
                for j, seg in enumerate(segment_token_ids(prompt_segments(prompt, len(media_rows)), self.tokenizer)):
                    add(seg, [False] * len(seg))
                    if j < len(media_rows):
                        add([placeholder] * media_rows[j], [False] * media_rows[j])
            else:  # the previous reply's end of turn (trained) and this turn's question (not)
                delta = self._rendered_after(prompt, before)
                add(delta, [True] + [False] * (len(delta) - 1))
            answer = self.tokenizer.encode(reply)
            add(answer, [True] * len(answer))
            conv.messages[-1][1] = reply
            before = prompt + reply
        end = self._rendered_after(conv.render(), before)
        add(end[:1], [True])
        return np.asarray(ids, np.int32), np.asarray(labels, np.int32)

    def _rendered_after(self, rendered: str, before: str) -> list[int]:
        if not rendered.startswith(before):
            raise ChatError(f"the {self.template} template does not render a conversation as a prefix of its "
                            "continuation; cannot build multi-turn samples")
        return self.tokenizer.encode(rendered[len(before):])

    @staticmethod
    def _as_prompt(p: PromptLike) -> Prompt:
        if isinstance(p, Prompt):
            return p
        if isinstance(p, str):
            return Prompt(p)
        if isinstance(p, tuple) and 1 <= len(p) <= 3 and isinstance(p[0], str):
            return Prompt(*p)
        raise TypeError(f"a prompt is a string, a (text, media[, kind]) tuple or a Prompt; got {p!r}")


Chat = VideoLLaMAChat

__all__ = [
    "Chat",
    "ChatContext",
    "ChatError",
    "MAX_LENGTH",
    "NUM_FRAMES",
    "Prompt",
    "VideoLLaMAChat",
]
