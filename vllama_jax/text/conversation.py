"""Conversation templates, chat-prompt rendering and the demo's message strings (upstream.md §6, 9).

Upstream: ``video_llama/conversation/conversation_video.py`` (``Conversation.get_prompt``, ``Chat.ask``,
``Chat.answer`` post-processing, ``Chat.upload_*`` message strings). Reproduced from the spec, including its quirks:

* LLaMA-2 rendering ends with ``str.lstrip("<s>")``, which strips any leading run of the *characters* ``<``, ``s``,
  ``>`` (only ever the initial ``<s>`` because the prompt then continues with ``[INST]``).
* A message that is falsy (``None`` *or* ``""``) renders as a pending turn (``"Role:"`` in SINGLE, nothing in
  LLAMA_2), because upstream tests ``if message:``.
* The audio+video upload message carries 17 / 18-space runs (Python backslash continuations inside a string
  literal upstream).
* The Vicuna stop ids ``[835]`` / ``[2277, 29937]`` ("###") are hard-coded for the real 32000-token LLaMA vocabulary.

``CHATML`` is ours (not upstream): used for models that ship a jinja chat template (SmolLM2); the prompt is rendered
with that template using transformers' ``apply_chat_template`` semantics (sandboxed jinja, ``trim_blocks``,
``lstrip_blocks``), or a built-in ChatML layout when the tokenizer has no template.
"""
from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any, Sequence

from .tokenizer import IMAGE_PLACEHOLDER, Tokenizer


class SeparatorStyle(Enum):
    SINGLE = auto()
    LLAMA_2 = auto()
    CHATML = auto()


@dataclass
class Conversation:
    system: str
    roles: tuple[str, str]
    messages: list[list] = field(default_factory=list)
    sep_style: SeparatorStyle = SeparatorStyle.SINGLE
    sep: str = "###"
    sep2: str | None = None
    #: jinja chat template used by CHATML rendering (None: built-in ChatML layout)
    chat_template: str | None = None
    #: extra variables for the chat template (bos_token, eos_token, ...)
    template_vars: dict = field(default_factory=dict)
    name: str = ""

    def append_message(self, role: str, message: str | None) -> None:
        self.messages.append([role, message])

    def copy(self) -> "Conversation":
        return Conversation(
            system=self.system,
            roles=tuple(self.roles),
            messages=[[r, m] for r, m in self.messages],
            sep_style=self.sep_style,
            sep=self.sep,
            sep2=self.sep2,
            chat_template=self.chat_template,
            template_vars=dict(self.template_vars),
            name=self.name,
        )

    # ---- rendering (= upstream get_prompt) ------------------------------------------------------------------
    def render(self) -> str:
        if self.sep_style == SeparatorStyle.SINGLE:
            ret = self.system + self.sep
            for role, message in self.messages:
                if message:
                    ret += role + ": " + message + self.sep
                else:
                    ret += role + ":"
            return ret
        if self.sep_style == SeparatorStyle.LLAMA_2:
            ret = ""
            for i, (role, message) in enumerate(self.messages):
                if i == 0:
                    if not message:
                        raise ValueError("LLaMA-2 conversation: the first message must not be empty")
                    if role != self.roles[0]:
                        raise ValueError("LLaMA-2 conversation: the first message must come from the user")
                if message:
                    if i == 0:
                        message = "<<SYS>>\n" + self.system + "\n<</SYS>>\n\n" + message
                    if i % 2 == 0:
                        ret += self.sep + "[INST] " + message + " [/INST]"
                    else:
                        ret += " " + message + " " + (self.sep2 or "")
            return ret.lstrip(self.sep)  # upstream quirk: strips the *characters* of sep ('<', 's', '>')
        if self.sep_style == SeparatorStyle.CHATML:
            messages, pending = self.chat_messages()
            return render_chat_template(
                self.chat_template, messages, add_generation_prompt=pending, **self.template_vars
            )
        raise ValueError(f"unknown separator style {self.sep_style}")

    get_prompt = render

    def chat_messages(self) -> tuple[list[dict], bool]:
        """``[{"role", "content"}]`` for a chat template (system first if non-empty) and whether the last
        (assistant) turn is pending."""
        out: list[dict] = []
        if self.system:
            out.append({"role": "system", "content": self.system})
        pending = False
        role_map = {self.roles[0]: "user", self.roles[1]: "assistant"}
        for i, (role, message) in enumerate(self.messages):
            if message is None:
                if i != len(self.messages) - 1:
                    raise ValueError("only the last message may be pending (None)")
                pending = True
                continue
            out.append({"role": role_map.get(role, role), "content": message})
        return out, pending


# ---- templates (upstream.md §6.2) ------------------------------------------------------------------------------------
LLAMA2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)
CONV_VISION_SYSTEM = (
    "Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I provide it to you. "
    "Please answer my questions."
)

TEMPLATES: dict[str, Conversation] = {
    # default_conversation (Vicuna demo)
    "vicuna": Conversation("", ("Human", "Assistant"), [], SeparatorStyle.SINGLE, "###", None, name="vicuna"),
    # conv_llava_llama_2 (LLaMA-2-chat demo)
    "llama_2": Conversation(LLAMA2_SYSTEM, ("USER", "ASSISTANT"), [], SeparatorStyle.LLAMA_2, "<s>", "</s>", name="llama_2"),
    # training conversations of the instruction datasets
    "vicuna_train": Conversation("", ("Human", "Assistant"), [], SeparatorStyle.SINGLE, "###", None, name="vicuna_train"),
    "llama_2_train": Conversation(" ", ("USER", "ASSISTANT"), [], SeparatorStyle.LLAMA_2, "<s>", "</s>", name="llama_2_train"),
    # CONV_VISION (defined upstream, unused by the demos)
    "conv_vision": Conversation(CONV_VISION_SYSTEM, ("Human", "Assistant"), [], SeparatorStyle.SINGLE, "###", None, name="conv_vision"),
    # ours: ChatML (SmolLM2 and other models that ship a chat template)
    "chatml": Conversation("", ("user", "assistant"), [], SeparatorStyle.CHATML, "<|im_end|>", None, name="chatml"),
}

_ALIASES = {
    "default": "vicuna",
    "default_conversation": "vicuna",
    "llama2": "llama_2",
    "llama_v2": "llama_2",
    "conv_llava_llama_2": "llama_2",
    "llama2_train": "llama_2_train",
    "llama_v2_train": "llama_2_train",
}


def canonical_template_name(name: str) -> str:
    n = _ALIASES.get(name, name)
    if n not in TEMPLATES:
        raise KeyError(f"unknown conversation template {name!r}; known: {sorted(TEMPLATES)} (aliases {sorted(_ALIASES)})")
    return n


def get_template(name: str, tokenizer: Tokenizer | None = None) -> Conversation:
    """A fresh copy of a template. For ``"chatml"`` with a tokenizer that ships a chat template, the conversation
    renders through that template (with its bos/eos strings available to it)."""
    conv = TEMPLATES[canonical_template_name(name)].copy()
    if conv.sep_style == SeparatorStyle.CHATML and tokenizer is not None:
        conv.chat_template = tokenizer.chat_template
        conv.template_vars = _template_vars(tokenizer)
    return conv


def _template_vars(tokenizer: Tokenizer) -> dict:
    out = {}
    for key, i in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id)):
        try:
            out[key] = tokenizer.id_to_token(i)
        except Exception:
            pass
    return out


# ---- jinja chat templates (transformers apply_chat_template semantics) ----------------------------------------------
CHATML_FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_JINJA_CACHE: dict[str, Any] = {}


def _compile(template: str):
    tpl = _JINJA_CACHE.get(template)
    if tpl is not None:
        return tpl
    # jinja2 is imported here on purpose: it is an optional dependency (not in pyproject; torch installs it) that
    # only tokenizer chat templates (ChatML models) need.
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    tpl = env.from_string(template)
    _JINJA_CACHE[template] = tpl
    return tpl


def render_chat_template(
    template: str | None, messages: Sequence[dict], add_generation_prompt: bool = False, **variables
) -> str:
    """Render ``messages`` with a jinja chat template like transformers' ``apply_chat_template(tokenize=False)``.
    ``template=None`` uses the plain ChatML layout."""
    tpl = _compile(template or CHATML_FALLBACK_TEMPLATE)
    return tpl.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **variables)


# ---- demo messages (upstream.md §6.3 / 9) ----------------------------------------------------------------------------
IMAGE_UPLOAD_MESSAGE = "<Image><ImageHere></Image> "
VIDEO_UPLOAD_PREFIX = "<Video><ImageHere></Video> "
AUDIO_VIDEO_UPLOAD_MESSAGE = (
    "Close your eyes, open your ears and you imagine only based on the sound that: <ImageHere>."
    + " " * 17
    + "Close your ears, open your eyes and you see that <Video><ImageHere></Video>."
    + " " * 18
    + "Now answer my question based on what you have just seen and heard."
)
DEMO_SYSTEM_IMAGE = (
    "You are able to understand the visual content that the user provides. Follow the instructions carefully and "
    "explain your answers in detail."
)
#: demo_video.py uses DEMO_SYSTEM_IMAGE for videos too; demo_audiovideo.py uses "" for videos (with/without audio)
DEMO_SYSTEM_VIDEO = DEMO_SYSTEM_IMAGE
DEMO_SYSTEM_AUDIOVIDEO = ""


def video_upload_message(msg: str = "") -> str:
    """``"<Video><ImageHere></Video> " + msg`` (msg: the frame-time message, or "")."""
    return VIDEO_UPLOAD_PREFIX + msg


def frame_time_message(frame_indices: Sequence[int], fps: float) -> str:
    """``load_video``'s message: ``"The video contains {n} frames sampled at {t0}, {t1}, ... seconds. "`` with
    ``t_i = round(index_i / fps, 1)`` printed as Python floats."""
    sec = ", ".join(str(round(float(f) / float(fps), 1)) for f in frame_indices)
    return f"The video contains {len(frame_indices)} frames sampled at {sec} seconds. "


def ask(conv: Conversation, text: str) -> None:
    """``Chat.ask``: if the last message is the user's and holds a media block (``</Video>`` or ``</Image>``), join
    the question to it with one space; otherwise start a new user message."""
    if (
        conv.messages
        and conv.messages[-1][0] == conv.roles[0]
        and isinstance(conv.messages[-1][1], str)
        and ("</Video>" in conv.messages[-1][1] or "</Image>" in conv.messages[-1][1])
    ):
        conv.messages[-1][1] = " ".join([conv.messages[-1][1], text])
    else:
        conv.append_message(conv.roles[0], text)


def upload(conv: Conversation, message: str, system: str | None = None) -> None:
    """An upload: optionally set the system prompt, then append the user media message."""
    if system is not None:
        conv.system = system
    conv.append_message(conv.roles[0], message)


def chat_prompt(conv: Conversation) -> str:
    """``get_context_emb`` step 1: append the pending assistant turn and render (mutates ``conv``)."""
    conv.append_message(conv.roles[1], None)
    return conv.render()


def prompt_segments(prompt: str, num_media: int) -> list[str]:
    """Split a rendered chat prompt on ``<ImageHere>``; there must be exactly ``num_media + 1`` pieces."""
    segs = prompt.split(IMAGE_PLACEHOLDER)
    if len(segs) != num_media + 1:
        raise ValueError(
            f"prompt has {len(segs) - 1} {IMAGE_PLACEHOLDER} placeholder(s) but {num_media} media item(s) were given"
        )
    return segs


def segment_token_ids(segments: Sequence[str], tokenizer: Tokenizer, add_bos: bool | None = None) -> list[list[int]]:
    """Token ids of each segment; only the first gets BOS (when ``add_bos``, default: ``tokenizer.adds_bos``,
    True for LLaMA)."""
    if add_bos is None:
        add_bos = tokenizer.adds_bos
    return [tokenizer.encode(s, add_bos=(add_bos and i == 0)) for i, s in enumerate(segments)]


# ---- generation stop rules / answer post-processing (upstream.md §6.5) -----------------------------------------------
VICUNA_STOP_IDS = [[835], [2277, 29937]]
LLAMA2_STOP_IDS = [[2]]


def stop_token_sequences(template_name: str, tokenizer: Tokenizer | None = None) -> list[list[int]]:
    """Stop sequences of ``Chat.answer``: Vicuna stops on the hard-coded LLaMA ids of "###" ([835] or
    [2277, 29937] — they belong to the real 32000-token vocabulary), LLaMA-2 on [2]. ChatML (ours) stops on the
    tokenizer's ``<|im_end|>`` and EOS (needs ``tokenizer``). HF generate also stops on EOS in every case."""
    name = canonical_template_name(template_name)
    conv = TEMPLATES[name]
    if conv.sep_style == SeparatorStyle.SINGLE:
        return [list(s) for s in VICUNA_STOP_IDS]
    if conv.sep_style == SeparatorStyle.LLAMA_2:
        return [list(s) for s in LLAMA2_STOP_IDS]
    if tokenizer is None:
        raise ValueError("ChatML stop sequences need the tokenizer")
    out = []
    i = tokenizer.token_to_id(conv.sep)
    if i is not None:
        out.append([i])
    if [tokenizer.eos_id] not in out:
        out.append([tokenizer.eos_id])
    return out


def postprocess_answer(text: str, template_name: str) -> str:
    """Vicuna: cut at the first "###", keep the text after the last "Assistant:", strip. LLaMA-2: same with
    "</s>" and "ASSISTANT:". ChatML (ours): cut at "<|im_end|>", strip."""
    conv = TEMPLATES[canonical_template_name(template_name)]
    if conv.sep == "###":
        text = text.split("###")[0]
        return text.split(conv.roles[1] + ":")[-1].strip()
    if conv.sep_style == SeparatorStyle.LLAMA_2:
        text = text.split(conv.sep2)[0]
        return text.split(conv.roles[1] + ":")[-1].strip()
    return text.split(conv.sep)[0].strip()


def answer_from_ids(ids, tokenizer: Tokenizer, template_name: str) -> str:
    """``Chat.answer`` after generate: drop a leading unk (0), then a leading BOS (1), decode with special tokens
    kept, post-process."""
    ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
    if ids and tokenizer.unk_id is not None and ids[0] == tokenizer.unk_id:
        ids = ids[1:]
    if ids and ids[0] == tokenizer.bos_id:
        ids = ids[1:]
    return postprocess_answer(tokenizer.decode(ids), template_name)


__all__ = [
    "SeparatorStyle",
    "Conversation",
    "TEMPLATES",
    "LLAMA2_SYSTEM",
    "canonical_template_name",
    "get_template",
    "render_chat_template",
    "CHATML_FALLBACK_TEMPLATE",
    "IMAGE_UPLOAD_MESSAGE",
    "VIDEO_UPLOAD_PREFIX",
    "AUDIO_VIDEO_UPLOAD_MESSAGE",
    "DEMO_SYSTEM_IMAGE",
    "DEMO_SYSTEM_VIDEO",
    "DEMO_SYSTEM_AUDIOVIDEO",
    "video_upload_message",
    "frame_time_message",
    "ask",
    "upload",
    "chat_prompt",
    "prompt_segments",
    "segment_token_ids",
    "VICUNA_STOP_IDS",
    "LLAMA2_STOP_IDS",
    "stop_token_sequences",
    "postprocess_answer",
    "answer_from_ids",
]
