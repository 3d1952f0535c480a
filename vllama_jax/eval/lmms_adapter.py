"""A vllama-jax model directory as an lmms-eval model (EvolvingLMMs-Lab/lmms-eval, the field's standard harness),
so its task suite runs on our batched engine:

    python -m lmms_eval --model vllama_jax --model_args 'pretrained=models/vl-7b,mesh="data=2,fsdp=4",batch_size=8' \\
        --tasks mvbench,videomme --batch_size 1

(``pretrained`` empty: the embedded default model.) The model is found through the ``lmms_eval.models``
entry point this package declares (``manifest``). Needs the optional ``lmms-eval`` package; docs/eval.md says how
to install it without replacing this project's CPU torch.

``loglikelihood`` runs ``VideoLLaMAChat.score_answers`` (the request's context as the user turn of a fresh
conversation around its video, the continuation as the assistant's reply) and ``generate_until``
``answer_uploads``, both ``batch_size`` requests per device batch. Visuals are the file paths lmms-eval's video
tasks hand over (videos, images or audio files, by extension); several visuals per request, and multi-round
generation, are not supported and say so.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Sequence

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

from ..errors import VllamaError
from ..inference.chat import VideoLLaMAChat
from ..inference.generate import GenerationConfig
from ..inference.uploads import Upload

MODEL_ID = "vllama_jax"


class LmmsRequestError(VllamaError, ValueError):
    """A request this adapter cannot serve (names the task and document)."""


def manifest() -> ModelManifest:
    """The ``lmms_eval.models`` entry point: ``--model vllama_jax`` loads ``VllamaJaxLMM``."""
    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.VllamaJaxLMM")


def _flag(value: Any) -> bool:
    """lmms-eval passes --model_args values as strings."""
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")


class VllamaJaxLMM(lmms):
    """lmms-eval's ``lmms`` on a ``VideoLLaMAChat``. Arguments (``--model_args key=value,...``): pretrained (a
    model directory; empty: the embedded default), mesh (``data=8`` ...), num_frames, batch_size, with_audio,
    max_new_tokens (default when a task does not say). ``chat``: an already built chat (Python use, tests)."""

    is_simple = True

    def __init__(self, pretrained: str = "", mesh: str = "", num_frames: int | str = 8, batch_size: int | str = 4,
                 with_audio: bool | str = True, max_new_tokens: int | str = 256, chat: VideoLLaMAChat | None = None,
                 **kwargs: Any) -> None:
        super().__init__()
        # a mesh of several axes has commas, so --model_args must quote it (mesh="data=2,fsdp=4"); lmms-eval
        # keeps the quotes
        mesh = str(mesh or "").strip().strip("'\"")
        if chat is None:
            kw: dict[str, Any] = dict(num_frames=int(num_frames))
            chat = (VideoLLaMAChat.from_model_dir(pretrained, mesh=mesh or None, **kw) if pretrained
                    else VideoLLaMAChat.embedded(mesh=mesh or None, **kw))
        self.chat = chat
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise LmmsRequestError(f"batch_size must be >= 1, got {batch_size}")
        self.with_audio = _flag(with_audio)
        self.max_new_tokens = int(max_new_tokens)

    # ---- requests -> (context, upload) ----------------------------------------------------------------------
    def _doc(self, task: str, split: str, doc_id: Any) -> Any:
        try:
            return self.task_dict[task][split][doc_id]
        except (KeyError, IndexError, TypeError):
            raise LmmsRequestError(f"{task}/{split}: document {doc_id} is not in the model's task_dict") from None

    def _upload(self, doc_to_visual: Any, task: str, split: str, doc_id: Any) -> Upload | None:
        visuals = doc_to_visual(self._doc(task, split, doc_id)) if callable(doc_to_visual) else doc_to_visual
        flat = list(_flatten(visuals or []))
        if not flat:
            return None
        if len(flat) > 1 or not isinstance(flat[0], (str, os.PathLike)):
            raise LmmsRequestError(f"{task} document {doc_id}: one media file per request is supported, got "
                                   f"{len(flat)} visual(s) of type {type(flat[0]).__name__}")
        return self.chat.prepare(flat[0], with_audio=self.with_audio)

    def _batches(self, requests: Sequence[Instance]) -> Iterable[list[tuple[int, Instance]]]:
        items = list(enumerate(requests))
        for i in range(0, len(items), self.batch_size):
            yield items[i:i + self.batch_size]

    # ---- the harness's interface ----------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(log-probability of each continuation, whether greedy decoding from the context produces it)."""
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for batch in self._batches(requests):
            contexts, uploads, conts = [], [], []
            for _, req in batch:
                context, target, doc_to_visual, doc_id, task, split = req.args
                cont = target if isinstance(target, str) else target(self._doc(task, split, doc_id))
                contexts.append(context)
                uploads.append(self._upload(doc_to_visual, task, split, doc_id))
                conts.append(cont)
            scores = self.chat.score_answers(contexts, uploads, [[c] for c in conts], pad_to=self.batch_size)
            n_tokens = max(len(self.chat.tokenizer.encode(c)) for c in conts)
            greedy = self.chat.answer_uploads(contexts, uploads, GenerationConfig(do_sample=False,
                                                                                  max_new_tokens=n_tokens),
                                              pad_to=self.batch_size)
            for (i, _), s, g, c in zip(batch, scores, greedy, conts):
                out[i] = (float(s[0]), g.strip().startswith(c.strip()))
        return out

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy unless the task asks for sampling (``temperature`` > 0 / ``do_sample``); cut at ``until``."""
        out = [""] * len(requests)
        for batch in self._batches(requests):
            # rows with different generation settings cannot share one decode call: group them
            groups: dict[tuple, list[tuple[int, str, Upload | None, list[str]]]] = {}
            for i, req in batch:
                context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
                cfg, until = self._generation(dict(gen_kwargs or {}))
                key = (cfg.max_new_tokens, cfg.do_sample, cfg.temperature, cfg.top_p, cfg.num_beams)
                groups.setdefault(key, []).append((i, context, self._upload(doc_to_visual, task, split, doc_id),
                                                   until))
            for key, rows in groups.items():
                cfg = GenerationConfig(max_new_tokens=key[0], do_sample=key[1], temperature=key[2], top_p=key[3],
                                       num_beams=key[4])
                texts = self.chat.answer_uploads([r[1] for r in rows], [r[2] for r in rows], cfg,
                                                 pad_to=self.batch_size)
                for (i, _, _, until), text in zip(rows, texts):
                    for stop in until:
                        if stop and stop in text:
                            text = text[:text.index(stop)]
                    out[i] = text
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise LmmsRequestError("vllama_jax: multi-round generation is not supported (single-turn tasks only)")

    def _generation(self, kw: dict[str, Any]) -> tuple[GenerationConfig, list[str]]:
        until = kw.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(kw.get("temperature") or 0.0)
        do_sample = _flag(kw.get("do_sample", temperature > 0)) and temperature > 0
        cfg = GenerationConfig(max_new_tokens=int(kw.get("max_new_tokens") or self.max_new_tokens),
                               do_sample=do_sample, temperature=temperature if do_sample else 1.0,
                               top_p=float(kw.get("top_p") or 1.0), num_beams=int(kw.get("num_beams") or 1))
        return cfg, until


def _flatten(visuals: Any) -> Iterable[Any]:
    for v in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
        if isinstance(v, (list, tuple)):
            yield from _flatten(v)
        elif v is not None:
            yield v


__all__ = ["LmmsRequestError", "MODEL_ID", "VllamaJaxLMM", "manifest"]
