"""Jitted text generation for the LLaMA decoder (upstream.md §6.5; GitHub issue 5): `Generator`, the public API.

`Generator` owns a `Llama` module and its params (optionally sharded over a mesh) and generates from prompt
*embeddings* — Video-LLaMA splices media embeddings between text embeddings, so like upstream's
`llama_model.generate(inputs_embeds=...)` the engine never needs prompt ids — or from token ids
(`generate_ids`), and scores candidate continuations (`score`).

Where each part lives:

* `generation_config.py`: `GenerationConfig` (decoding settings, validated), `GenerationOutput`, the errors;
* `sampling.py`: the logits processors and token selection (`process_logits`);
* `engine.py`: `DecodeEngine`, packing prompts into compiled shapes, prefill, the sampling loop (streamed);
* `beam.py`: beam search; `score.py`: candidate scoring. Both run on the engine's params and cache.

Semantics follow transformers' `generate` (5.x, the installed version; also what 4.28 does unless noted):
logits processors in HF order (repetition penalty, min_new_tokens, temperature, top-k, top-p), greedy argmax or a
categorical draw from an explicit `jax.random` key, EOS per row (finished rows then emit `pad_token_id`, not
returned here), beam search as HF's vectorised beam search (see `beam.py` for where 4.28 differs).
Stop sequences (upstream's `StoppingCriteriaSub`: Vicuna "###" = [835] or [2277, 29937], LLaMA-2 [2]) finish a row
whose generated ids end with one of them; stripping them is the caller's job (`text.postprocess_answer`).

Repetition penalty and the prompt: with an ids prompt HF penalises the prompt ids too (`generate_ids` does the
same). With an embeddings prompt HF 5.x only sees the generated ids; transformers 4.28 (upstream) started
`input_ids` from a dummy [BOS], which was penalised as well — pass `penalty_ids=[[bos]]` to reproduce that.
Upstream uses repetition_penalty 1.0 (off), so this never matters for the demo defaults.

`GenerationConfig`, `GenerationOutput`, the input errors and `process_logits` are re-exported here, the module
callers import the generation API from.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import numpy as np

from .beam import BeamSearch
from .beam428 import BeamSample428
from .engine import DecodeEngine
from .generation_config import (
    GenerationConfig,
    GenerationConfigError,
    GenerationInputError,
    GenerationOutput,
    StreamCallback,
)
from .sampling import process_logits
from .score import Scorer


class Generator(DecodeEngine):
    """Generation and scoring for one LLaMA decoder and its params (built once, reused for many calls). The
    constructor is `DecodeEngine`'s: `Generator(model_or_llama_config, params, mesh=None, ...)`."""

    @functools.cached_property
    def _beams(self) -> BeamSearch:
        return BeamSearch(self)

    @functools.cached_property
    def _beam_sample_428(self) -> BeamSample428:
        return BeamSample428(self)

    @functools.cached_property
    def _scorer(self) -> Scorer:
        return Scorer(self)

    # ---- public entry points -------------------------------------------------------------------------------
    def generate(self, prompt_embeds: Any, attention_mask: Any = None, config: GenerationConfig | None = None,
                 rng: jax.Array | int | None = None, stream: StreamCallback | None = None, *,
                 penalty_ids: Sequence[Sequence[int]] | None = None, output_logits: bool = False
                 ) -> GenerationOutput:
        """Generate from prompt embeddings.

        prompt_embeds: (B, L, D) array (with `attention_mask` (B, L), 1 = real; any padding layout) or a list of
            per-row (L_i, D) arrays. Media embeddings are expected to be spliced in already.
        config: decoding settings (default `GenerationConfig()` = upstream sampling defaults).
        rng: a `jax.random` key or an int seed for sampling (None: a fresh random seed per call).
        stream: called after every step as `stream(step, tokens)` with tokens (B,) int32 — the id generated for
            each row, or -1 for rows that had already finished (the EOS / last stop id itself is delivered).
            Not available with beam search (the best beam is only known at the end).
        penalty_ids: per-row ids the repetition penalty counts besides the generated ones (see module doc).
        output_logits: also return the raw logits of every step (greedy / sampling).
        """
        cfg = self.resolve(config)
        embeds, mask = self.pack(prompt_embeds, attention_mask)
        if cfg.num_beams > 1:
            if stream is not None:
                raise GenerationInputError("streaming is not supported with beam search (num_beams > 1)")
            if output_logits:
                raise GenerationInputError("output_logits is not supported with beam search")
            if cfg.do_sample and cfg.beam_semantics == "4.28":
                return self._beam_sample_428.run(embeds, mask, cfg, rng, penalty_ids)
            return self._beams.run(embeds, mask, cfg, rng, penalty_ids)
        return self.sample(embeds, mask, cfg, rng, stream, penalty_ids, output_logits)

    def generate_ids(self, prompt_ids: Any, config: GenerationConfig | None = None, rng: jax.Array | int | None = None,
                     stream: StreamCallback | None = None, *, attention_mask: Any = None,
                     output_logits: bool = False) -> GenerationOutput:
        """Text-only convenience: prompt ids as a list of per-row id lists (any lengths) or a (B, L) array (with
        an optional attention mask). The repetition penalty counts the prompt ids, as HF does for `input_ids`."""
        if isinstance(prompt_ids, (list, tuple)) and prompt_ids and not np.isscalar(prompt_ids[0]):
            if attention_mask is not None:
                raise GenerationInputError("attention_mask is only for a (B, L) array of ids")
            rows = [np.asarray(r, np.int64).reshape(-1) for r in prompt_ids]
        else:
            arr = np.asarray(prompt_ids, np.int64)
            arr = arr[None] if arr.ndim == 1 else arr
            if arr.ndim != 2:
                raise GenerationInputError(f"prompt_ids must be 1-D or 2-D, got shape {arr.shape}")
            m = np.ones(arr.shape, bool) if attention_mask is None else np.asarray(attention_mask) != 0
            if m.shape != arr.shape:
                raise GenerationInputError(f"attention_mask has shape {m.shape}, prompt_ids {arr.shape}")
            rows = [arr[b][m[b]] for b in range(arr.shape[0])]
        for i, r in enumerate(rows):
            if r.size == 0:
                raise GenerationInputError(f"prompt {i} is empty")
            if r.min() < 0 or r.max() >= self.config.vocab_size:
                raise GenerationInputError(f"prompt {i} has ids outside [0, {self.config.vocab_size})")
        bucket = self.prompt_bucket(max(r.size for r in rows))
        ids = np.zeros((len(rows), bucket), np.int32)
        mask = np.zeros((len(rows), bucket), np.int32)
        for b, r in enumerate(rows):
            ids[b, bucket - r.size:] = r
            mask[b, bucket - r.size:] = 1
        embeds = self.embed(ids)
        return self.generate(embeds, mask, config, rng, stream, penalty_ids=[r.tolist() for r in rows],
                             output_logits=output_logits)

    def score(self, prompt_embeds: Any, candidates: Sequence[Sequence[Sequence[int]]], attention_mask: Any = None
              ) -> list[np.ndarray]:
        """Log-likelihood of candidate continuations after each prompt (multiple-choice evaluation).

        prompt_embeds / attention_mask: as for `generate` (one row per prompt). candidates: per prompt, a list of
        token-id sequences (any number, any lengths >= 1). Returns per prompt a float64 array with the summed
        log-probability of each candidate's tokens given the prompt (teacher forcing; no logits processor).
        One prefill per prompt, all its candidates in one more forward pass (see `score.py`).
        """
        return self._scorer.score(prompt_embeds, candidates, attention_mask)

    def score_shared(self, prefixes: Sequence[Any], group: Sequence[int], tails: Sequence[Any],
                     candidates: Sequence[Sequence[Sequence[int]]]) -> list[np.ndarray]:
        """`score` for prompts ``prefixes[group[i]] + tails[i]`` (embeddings): each shared prefix is prefilled
        once (see `score.py`)."""
        return self._scorer.score_shared(prefixes, group, tails, candidates)


# Generator is defined here; the rest is re-exported for callers that import the generation API from this module.
__all__ = ["GenerationConfig", "GenerationConfigError", "GenerationInputError", "GenerationOutput", "Generator",
           "process_logits"]
