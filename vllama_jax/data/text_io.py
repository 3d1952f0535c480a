"""The one place where ``vllama_jax.data`` touches ``vllama_jax.text``: caption ids, stage-2 caption prompts and
instruction samples.

Tokenization happens here, at read time, from the raw text stored in the records (see ``records.py`` for why).
The tokenizer is loaded lazily in each worker process (only its path is pickled).
"""
from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..text import (blip_caption, caption_tokens, collate_instruction, instruction_sample, load_tokenizer,
                    prompt_wrap_ids, split_prompt, stage2_prompt_list)
from .records import Turn

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import PipelineConfig

_LLAVA_IMAGE = "<image>"


def caption_prompt_list(prompts: Sequence[str], template: str = "") -> list[str]:
    """The stage-2 caption prompts in full (upstream ``prompt_list``, upstream.md §1.8 B.2): ``prompts`` as given
    without a template, each formatted into a format-string template (``"... {} ..."``), or into a conversation
    template by name (``stage2_prompt_list``). Raises ValueError unless each has exactly one ``<ImageHere>``."""
    if not prompts or not template:
        full = list(prompts)
    elif "{}" in template:
        full = [template.format(p) for p in prompts]
    else:
        full = stage2_prompt_list(template, prompts)
    for p in full:
        split_prompt(p)
    return full


class TextProcessor:
    """Caption-path and instruction-path text of one stage config (picklable; tokenizer loaded on first use)."""

    def __init__(self, cfg: "PipelineConfig"):
        self.tokenizer_path = str(cfg.tokenizer)
        self.end_sym, self.max_txt_len = cfg.end_sym, cfg.max_txt_len
        self.template, self.num_query_tokens, self.max_len = cfg.template, cfg.num_query_tokens, cfg.max_len
        self.prompt_list = caption_prompt_list(cfg.prompts, cfg.prompt_template)
        self._tok = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tok": None}

    @property
    def tokenizer(self):
        if self._tok is None:
            self._tok = load_tokenizer(self.tokenizer_path)
        return self._tok

    @property
    def caption_pad_id(self) -> int:
        return int(self.tokenizer.pad_id)

    @property
    def instruct_pad_id(self) -> int:
        """Upstream's instruction datasets pad with unk (0 for LLaMA), whatever the tokenizer's pad token."""
        return int(self.tokenizer.instruct_pad_id)

    def caption(self, caption: str, processor: str) -> tuple[np.ndarray, np.ndarray]:
        """upstream.md §1.8 path B step 3: ``caption + end_sym`` without BOS, truncated and right-padded to max_txt_len."""
        if processor == "blip_caption":
            caption = blip_caption(caption.strip())
        elif processor != "none":
            raise ValueError(f"unknown text processor {processor!r}")
        ids, mask = caption_tokens([caption], self.tokenizer, self.end_sym, self.max_txt_len, pad_to=self.max_txt_len)
        return ids[0], mask[0]

    def instruction(self, turns: Sequence[Turn], media_type: str, video_msg: str) -> tuple[np.ndarray, np.ndarray]:
        """upstream.md §7.5 / 7.6: (input_ids, labels) of one conversation, unpadded (at most max_len tokens).

        Images follow LLaVA (every ``<image>`` becomes the image block; a conversation without ``<image>`` gets one
        in front of its first human turn), videos follow VideoChat (the first turn is prefixed with the video block
        and the frame-time message). Raises ValueError unless exactly ``num_query_tokens`` consecutive placeholders
        survive (truncation, several ``<image>``) — the training step would reject the sample.
        """
        conv = [{"from": t.role, "value": t.value} for t in turns]
        if media_type == "image" and not any(_LLAVA_IMAGE in t["value"] for t in conv):
            first = next((t for t in conv if t["from"] == "human"), None)
            if first is None:
                raise ValueError("conversation has no human turn")
            first["value"] = f"{_LLAVA_IMAGE}\n{first['value']}"
        ids, labels = instruction_sample(conv, self.template, self.tokenizer, self.num_query_tokens, media_type,
                                         video_msg=video_msg, max_len=self.max_len)
        where = np.flatnonzero(ids == self.tokenizer.image_placeholder_id)
        n = self.num_query_tokens
        if len(where) != n or (n and where[-1] - where[0] != n - 1):
            raise ValueError(f"{len(where)} media placeholders after tokenization (need {n} consecutive)")
        return ids, labels

    def collate_instruction(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
        """Right-pad to the fixed ``max_len``: ids with the pad id, labels with -100; attention_mask = ids != pad."""
        return collate_instruction(list(pairs), self.instruct_pad_id, pad_to=self.max_len)

    def caption_prompt(self, step: int, seed: int) -> dict[str, np.ndarray]:
        """Stage 2: the prompt of step ``step``'s caption batch (upstream: one ``random.choice`` per batch; drawn
        from ``(seed, step)`` here, so a resumed run draws the same) as the shared ``prompt_before`` /
        ``prompt_after`` ids, (1, n) int32 each; {} without prompts."""
        if not self.prompt_list:
            return {}
        prompt = random.Random(seed * 1_000_003 + step).choice(self.prompt_list)
        before, after = prompt_wrap_ids(prompt, self.tokenizer)
        return {"prompt_before": np.asarray([before], np.int32), "prompt_after": np.asarray([after], np.int32)}
