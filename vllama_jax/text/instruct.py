"""Training text: caption processing, caption-path tokens (path B) and instruction samples (path A).

Reproduces upstream Video-LLaMA exactly (upstream.md §1.8, 6.3, 7.3, 7.5-7.7), quirks included:

* **Vicuna mask drift** (upstream.md §12.12): turn lengths are counted by tokenizing the header and every turn
  string *separately, each with BOS*; those counts are laid end to end over the ids of the whole conversation. The
  isolated "###..." encodes one token shorter ("▁###" vs "##","#" in context) and the extra BOS compensates only
  where that holds, so spans drift by a token or more on other vocabularies (the tiny fixture vocabulary drifts by
  one per turn: the first human "###" stays unmasked, supervised spans start one token late).
* Vicuna keeps the first two tokens of every human turn (the "###" pieces) as targets; the final "###" is a target.
* Human turns are masked only if their ``"from"`` is exactly ``"human"`` (rendering lower-cases the role, masking
  does not).
* Vicuna turn lengths count tokens different from the pad id (= unk = 0), so a literal ``<unk>`` is not counted.
* LLaMA-2 keeps the space token before ``</s>`` and ``</s>`` itself as targets; a leading non-human turn is
  dropped; truncation at ``max_len`` (512) tokens happens before masking.
* Caption targets mask every position whose id equals the pad id (also a genuine unk when pad = unk).
"""
from __future__ import annotations

import random
import re
from typing import Sequence

import numpy as np

from .conversation import canonical_template_name, get_template, render_chat_template
from .tokenizer import IMAGE_PLACEHOLDER, Tokenizer

IGNORE_INDEX = -100

# ---- caption text (upstream.md §7.3) ---------------------------------------------------------------------------------
_PUNCT = re.compile(r"([.!\"()*#:;~])")
_MULTI_WS = re.compile(r"\s{2,}")


def blip_caption(text: str, max_words: int = 50, prompt: str = "") -> str:
    """LAVIS ``BlipCaptionProcessor`` (prompt "", max_words 50): lower-case; ``. ! " ( ) * # : ; ~`` -> space;
    runs of 2+ whitespace -> one space; strip trailing newlines then surrounding spaces; keep the first
    ``max_words`` space-separated words."""
    caption = _PUNCT.sub(" ", text.lower())
    caption = _MULTI_WS.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return prompt + caption


# ---- stage-2 caption prompts (upstream.md §7.7) ----------------------------------------------------------------------
ALIGNMENT_PROMPTS: list[str] = [
    "<Image><ImageHere></Image> Describe this image in detail.",
    "<Image><ImageHere></Image> Take a look at this image and describe what you notice.",
    "<Image><ImageHere></Image> Please provide a detailed description of the picture.",
    "<Image><ImageHere></Image> Could you describe the contents of this image for me?",
]
STAGE2_PROMPT_TEMPLATE = {
    "vicuna": "###Human: {} ###Assistant: ",
    "llama_2": "[INST] <<SYS>>\n \n<</SYS>>\n\n{} [/INST] ",
}
STAGE2_END_SYM = {"vicuna": "###", "llama_2": "</s>"}


def stage2_prompt_list(template: str, prompts: Sequence[str] = ALIGNMENT_PROMPTS) -> list[str]:
    """Upstream ``prompt_list``: the prompt lines that contain ``<ImageHere>``, each formatted into the template."""
    tpl = STAGE2_PROMPT_TEMPLATE[_instruct_template(template)]
    return [tpl.format(p) for p in prompts if IMAGE_PLACEHOLDER in p]


def split_prompt(prompt: str) -> tuple[str, str]:
    """``prompt_wrap``: ``p_before, p_after = prompt.split('<ImageHere>')`` (exactly one placeholder)."""
    parts = prompt.split(IMAGE_PLACEHOLDER)
    if len(parts) != 2:
        raise ValueError(f"a caption prompt needs exactly one {IMAGE_PLACEHOLDER}, got {len(parts) - 1}: {prompt!r}")
    return parts[0], parts[1]


def prompt_wrap_ids(prompt: str, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """Ids of ``p_before`` / ``p_after`` (no special tokens), as ``prompt_wrap``."""
    before, after = split_prompt(prompt)
    return tokenizer.encode(before), tokenizer.encode(after)


def choose_prompt(prompt_list: Sequence[str], rng: random.Random | None = None) -> str:
    """One prompt for the whole batch (upstream ``random.choice``)."""
    return (rng or random).choice(list(prompt_list))


# ---- caption tokens (path B step 3/4) -------------------------------------------------------------------------------
def caption_tokens(
    captions: Sequence[str],
    tokenizer: Tokenizer,
    end_sym: str,
    max_txt_len: int,
    pad_to: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``tokenizer([c + end_sym for c in captions], padding="longest", truncation=True, max_length=max_txt_len,
    add_special_tokens=False)``: ids (B, L) int32 right-padded with ``tokenizer.pad_id``, attention mask (B, L) int32.
    ``L`` is the longest row after truncation, or ``pad_to`` (static shapes; must be >= that)."""
    rows = [tokenizer.encode(c + end_sym)[:max_txt_len] for c in captions]
    longest = max((len(r) for r in rows), default=0)
    length = longest if pad_to is None else int(pad_to)
    if length < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest caption ({longest} tokens)")
    ids = np.full((len(rows), length), tokenizer.pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), length), dtype=np.int32)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = r
        mask[b, : len(r)] = 1
    return ids, mask


def caption_targets(text_ids: np.ndarray, pad_id: int, prefix_len: int) -> np.ndarray:
    """Path B step 4: text ids with pad-id positions -> -100, preceded by ``prefix_len`` (= 1 + wrapped media
    length: BOS, prompt, media) columns of -100."""
    text_ids = np.asarray(text_ids)
    t = np.where(text_ids == pad_id, IGNORE_INDEX, text_ids).astype(np.int32)
    pre = np.full((t.shape[0], prefix_len), IGNORE_INDEX, dtype=np.int32)
    return np.concatenate([pre, t], axis=1)


# ---- placeholder insertion (upstream.md §6.3) ------------------------------------------------------------------------
LLAVA_IMAGE_TOKEN = "<image>"


def media_block(num_query_tokens: int, media: str) -> str:
    """``"<Image>" + "<ImageHere>"*N + "</Image>"`` or the ``<Video>`` equivalent."""
    tag = {"image": "Image", "video": "Video"}[media]
    return f"<{tag}>" + IMAGE_PLACEHOLDER * num_query_tokens + f"</{tag}>"


def insert_placeholders(turns: Sequence[dict], num_query_tokens: int, media: str | None, video_msg: str = "") -> list[dict]:
    """A copy of ``turns`` with the media placeholders inserted.

    ``media="image"`` (LLaVA): every ``"<image>"`` in every turn -> ``"<Image>" + "<ImageHere>"*N + "</Image>"``.
    ``media="video"`` (VideoChat): the first turn's text is prefixed with
    ``"<Video>" + "<ImageHere>"*N + "</Video> " + video_msg``.
    ``media=None``: unchanged (the turns already carry their placeholders)."""
    out = [dict(t) for t in turns]
    if media is None or media == "none":
        return out
    if media == "image":
        block = media_block(num_query_tokens, "image")
        for t in out:
            t["value"] = t["value"].replace(LLAVA_IMAGE_TOKEN, block)
        return out
    if media == "video":
        if not out:
            raise ValueError("no turns to attach the video to")
        out[0]["value"] = media_block(num_query_tokens, "video") + " " + video_msg + out[0]["value"]
        return out
    raise ValueError(f"media must be 'image', 'video' or None, got {media!r}")


def videochat_turns(qa: Sequence[dict]) -> list[dict]:
    """VideoChat-Instruct ``QA`` list ``[{"q", "a"}, ...]`` -> ``[{"from": "human", "value": q},
    {"from": "gpt", "value": a}, ...]``."""
    out = []
    for pair in qa:
        out.append({"from": "human", "value": pair["q"]})
        out.append({"from": "gpt", "value": pair["a"]})
    return out


# ---- instruction samples (upstream.md §7.5 / 7.6) --------------------------------------------------------------------
def _instruct_template(template: str) -> str:
    name = canonical_template_name(template)
    return {"vicuna": "vicuna", "vicuna_train": "vicuna", "llama_2": "llama_2", "llama_2_train": "llama_2",
            "chatml": "chatml"}.get(name, name)


def _ids(tokenizer: Tokenizer, text: str, max_len: int | None = None) -> list[int]:
    """``tokenizer(text)`` as the dataset code calls it (special tokens on), optionally truncated."""
    ids = tokenizer.encode_with_special(text)
    return ids if max_len is None else ids[:max_len]


def vicuna_conversation(turns: Sequence[dict], system: str = "") -> tuple[str, str, list[str]]:
    """Upstream ``_add_speaker_and_signal``: header ``system + "\\n\\n"``; each turn
    ``"###" + role + ": " + value + "\\n"`` (role "Human" for from.lower() == "human", "Assistant" for "gpt",
    else "unknown"); the conversation ends with "###". Returns (conversation, header, turn strings)."""
    header = f"{system}\n\n"
    strings = []
    for t in turns:
        f = t["from"].lower()
        role = "Human" if f == "human" else "Assistant" if f == "gpt" else "unknown"
        strings.append("###" + role + ": " + t["value"] + "\n")
    return header + "".join(strings) + "###", header, strings


def _vicuna_sample(turns, tokenizer, max_len, pad_id):
    conversation, header, strings = vicuna_conversation(turns)
    input_ids = _ids(tokenizer, conversation, max_len)
    labels = list(input_ids)

    def count(text):
        return sum(1 for i in _ids(tokenizer, text, max_len) if i != pad_id)

    cur = count(header)
    labels[:cur] = [IGNORE_INDEX] * len(labels[:cur])
    for t, s in zip(turns, strings):
        n = count(s)
        if t["from"] == "human":
            lo, hi = min(cur + 2, len(labels)), min(cur + n, len(labels))
            if hi > lo:
                labels[lo:hi] = [IGNORE_INDEX] * (hi - lo)
        cur += n
    return input_ids, labels


def llama2_conversation(turns: Sequence[dict]) -> tuple[str, list[dict]]:
    """The LLaMA-2 training prompt (system " "): a leading non-human turn is dropped, roles must alternate."""
    if turns and turns[0]["from"] != "human":
        turns = turns[1:]
    conv = get_template("llama_2_train")
    roles = {"human": conv.roles[0], "gpt": conv.roles[1]}
    for j, t in enumerate(turns):
        role = roles.get(t["from"])
        if role != conv.roles[j % 2]:
            raise ValueError(f"turn {j}: expected from={'human' if j % 2 == 0 else 'gpt'!r}, got {t['from']!r}")
        conv.append_message(role, t["value"])
    return conv.render(), list(turns)


def _llama2_sample(turns, tokenizer, max_len):
    conversation, _ = llama2_conversation(turns)
    input_ids = _ids(tokenizer, conversation, max_len)
    labels = list(input_ids)
    n = len(labels)

    def mask(lo, hi):
        lo, hi = max(0, min(lo, n)), max(0, min(hi, n))
        if hi > lo:
            labels[lo:hi] = [IGNORE_INDEX] * (hi - lo)

    sep = "[/INST] "
    cur = 1
    mask(0, cur)
    for rou in conversation.split("</s>"):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        instr = parts[0] + sep
        round_len = len(_ids(tokenizer, rou))
        instr_len = len(_ids(tokenizer, instr)) - 2
        mask(cur, cur + instr_len)
        cur += round_len
    mask(cur, n)
    return input_ids, labels


def instruction_sample(
    turns: Sequence[dict],
    template: str,
    tokenizer: Tokenizer,
    num_query_tokens: int,
    media: str | None,
    video_msg: str = "",
    max_len: int = 512,
    pad_id: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One instruction sample -> ``(input_ids, labels)`` (1-D int32, labels -100 where masked).

    ``turns``: LLaVA ``conversations`` (``[{"from": "human"/"gpt", "value"}]``); use :func:`videochat_turns` for
    VideoChat QA lists. ``media``: "image" (LLaVA ``<image>`` replacement), "video" (first question prefixed with
    the video block and ``video_msg``) or None (placeholders already present). ``template``: "vicuna" (upstream.md §7.5),
    "llama_2" (7.6) or "chatml" (ours: :func:`chat_instruction_sample`). ``pad_id`` (default: unk, what upstream's
    datasets pad with) only matters for Vicuna's turn-length counts."""
    name = _instruct_template(template)
    turns = insert_placeholders(turns, num_query_tokens, media, video_msg)
    if name == "vicuna":
        ids, labels = _vicuna_sample(turns, tokenizer, max_len, tokenizer.instruct_pad_id if pad_id is None else pad_id)
    elif name == "llama_2":
        ids, labels = _llama2_sample(turns, tokenizer, max_len)
    elif name == "chatml":
        return chat_instruction_sample(turns, tokenizer, num_query_tokens=num_query_tokens, media=None, max_len=max_len)
    else:
        raise ValueError(f"no instruction format for template {template!r}")
    return np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32)


def collate_instruction(samples, pad_id: int, pad_to: int | None = None) -> dict[str, np.ndarray]:
    """Upstream instruction collater: right-pad ``input_ids`` with ``pad_id`` and ``labels`` with -100 to the batch
    max (or ``pad_to``); ``attention_mask = input_ids != pad_id``. ``samples``: ``(input_ids, labels)`` pairs or
    dicts with those keys. All outputs int32 (B, L)."""
    pairs = []
    for s in samples:
        if isinstance(s, dict):
            pairs.append((np.asarray(s["input_ids"]), np.asarray(s["labels"])))
        else:
            pairs.append((np.asarray(s[0]), np.asarray(s[1])))
    longest = max((len(i) for i, _ in pairs), default=0)
    length = longest if pad_to is None else int(pad_to)
    if length < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest sample ({longest} tokens)")
    ids = np.full((len(pairs), length), pad_id, dtype=np.int32)
    labels = np.full((len(pairs), length), IGNORE_INDEX, dtype=np.int32)
    for b, (i, l) in enumerate(pairs):
        if len(i) != len(l):
            raise ValueError(f"sample {b}: {len(i)} input ids but {len(l)} labels")
        ids[b, : len(i)] = i
        labels[b, : len(l)] = l
    return {"input_ids": ids, "labels": labels, "attention_mask": (ids != pad_id).astype(np.int32)}


# ---- ours: chat-template instruction samples (SmolLM2 demo) ---------------------------------------------------------
def chat_instruction_sample(
    turns: Sequence[dict],
    tokenizer: Tokenizer,
    num_query_tokens: int = 0,
    media: str | None = None,
    video_msg: str = "",
    max_len: int = 512,
    system: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """NOT upstream — our recipe for models that ship a chat template (e.g. SmolLM2's ChatML).

    The turns (placeholders inserted as in :func:`insert_placeholders`) are rendered with the tokenizer's jinja chat
    template (built-in ChatML if it has none); every token is masked (-100) except the assistant replies: each
    reply's content plus its end-of-turn marker (``<|im_end|>``), not the whitespace after it. The whole string is
    tokenized at once; tokens are assigned to replies by character offsets (fast tokenizers) or by tokenizing the
    masked/unmasked pieces separately (others). BOS is prepended only if the tokenizer adds one by default.
    ``system``: a system message (None: the template's default, e.g. SmolLM2's)."""
    turns = insert_placeholders(turns, num_query_tokens, media, video_msg)
    messages = [] if not system else [{"role": "system", "content": system}]
    role = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant", "system": "system"}
    for t in turns:
        r = role.get(t["from"].lower())
        if r is None:
            raise ValueError(f"unknown speaker {t['from']!r}")
        messages.append({"role": r, "content": t["value"]})
    conv = get_template("chatml", tokenizer)
    tpl, vars_ = conv.chat_template, conv.template_vars
    full = render_chat_template(tpl, messages, add_generation_prompt=False, **vars_)
    spans: list[tuple[int, int]] = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render_chat_template(tpl, messages[:k], add_generation_prompt=True, **vars_)
        upto = render_chat_template(tpl, messages[: k + 1], add_generation_prompt=False, **vars_)
        if not full.startswith(upto) or not upto.startswith(prefix):
            raise ValueError("the chat template does not render conversations incrementally; cannot locate replies")
        reply = upto[len(prefix):].rstrip()
        spans.append((len(prefix), len(prefix) + len(reply)))

    ids: list[int]
    targets: list[bool]
    if hasattr(tokenizer, "encode_with_offsets"):
        ids, offsets = tokenizer.encode_with_offsets(full)
        targets = [any(a <= s < b for a, b in spans) and e > s for s, e in offsets]
    else:
        ids, targets, pos = [], [], 0
        for a, b in spans + [(len(full), len(full))]:
            for piece, tgt in ((full[pos:a], False), (full[a:b], True)):
                if piece:
                    p = tokenizer.encode(piece)
                    ids += p
                    targets += [tgt] * len(p)
            pos = b
    if tokenizer.adds_bos:
        ids = [tokenizer.bos_id] + ids
        targets = [False] + targets
    ids, targets = ids[:max_len], targets[:max_len]
    labels = [i if t else IGNORE_INDEX for i, t in zip(ids, targets)]
    return np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32)


__all__ = [
    "IGNORE_INDEX",
    "blip_caption",
    "ALIGNMENT_PROMPTS",
    "STAGE2_PROMPT_TEMPLATE",
    "STAGE2_END_SYM",
    "stage2_prompt_list",
    "split_prompt",
    "prompt_wrap_ids",
    "choose_prompt",
    "caption_tokens",
    "caption_targets",
    "LLAVA_IMAGE_TOKEN",
    "media_block",
    "insert_placeholders",
    "videochat_turns",
    "vicuna_conversation",
    "llama2_conversation",
    "instruction_sample",
    "collate_instruction",
    "chat_instruction_sample",
]
