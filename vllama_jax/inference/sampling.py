"""Logits processing and token selection for generation (`jax.numpy`, usable inside `jit`; on one CPU device the greedy
argmax and the chosen tokens' log-probabilities go through the kernel library's row passes, `kernels.row_argmax` and
`kernels.log_softmax_at`: XLA's CPU argmax alone took 0.65 ms over (8, 49152) logits).

The processors reproduce transformers' `LogitsProcessorList` in the order `generate` builds it (upstream.md §6.5):

    RepetitionPenaltyLogitsProcessor -> MinNewTokensLengthLogitsProcessor       (always)
    -> TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper         (sampling only)

then greedy `argmax` or a categorical draw. Everything that changes the *shape* of the computation (whether
sampling, top-k's k, whether a processor runs at all) lives in the hashable `ProcessorSpec` (a `jit` static
argument); the numbers (temperature, top_p, penalty, min_new_tokens) are traced scalars in `ProcessorValues`, so
moving a temperature slider does not recompile.

Two deliberate simplifications, both only visible with exactly tied logits: top-k keeps every token tied with the
k-th value (as HF does) but top-p is computed over the k best only; top-p keeps every token tied with its cut-off
value (HF cuts inside a run of ties by sort position).

The host-side half turns a `GenerationConfig` into these inputs (`processor_setup`), and `process_logits` applies
the whole chain outside the engine (for tests and callers that sample themselves).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import kernels
from .generation_config import GenerationConfig, GenerationInputError

NEG_INF = -jnp.inf


@dataclass(frozen=True)
class ProcessorSpec:
    """Static (compile-time) part of the logits processing: only what changes shapes or the op graph."""

    do_sample: bool = False
    top_k: int = 0  # 0 = off; already max(top_k, min_tokens_to_keep)
    use_top_p: bool = False  # top_p < 1 (HF skips the warper at 1.0, which can differ for probability-0 tokens)
    min_tokens_to_keep: int = 1  # HF: 1 for sampling, n_eos + 1 for beam sampling


class ProcessorValues(NamedTuple):
    """Traced (run-time) part of the logits processing."""

    temperature: jax.Array  # () f32
    top_p: jax.Array  # () f32
    repetition_penalty: jax.Array  # () f32
    min_new_tokens: jax.Array  # () i32
    suppress: jax.Array  # (V,) bool: ids forced to -inf while fewer than min_new_tokens were generated


def apply_repetition_penalty(scores: jax.Array, presence: jax.Array, penalty: jax.Array) -> jax.Array:
    """HF `RepetitionPenaltyLogitsProcessor`: on every id already seen, score < 0 -> score * p, else score / p."""
    penalized = jnp.where(scores < 0, scores * penalty, scores / penalty)
    return jnp.where(presence, penalized, scores)


def top_k_top_p_filter(scores: jax.Array, top_k: int, top_p: jax.Array | None, min_tokens_to_keep: int = 1
                       ) -> jax.Array:
    """HF `TopKLogitsWarper` then `TopPLogitsWarper` (filter value -inf) on (B, V) scores.

    Both filters keep the tokens whose score is >= a per-row threshold, so they are computed as one threshold:
    the k-th best score for top-k, and for top-p the smallest score that survives HF's rule (sort ascending,
    drop the prefix whose cumulative probability is <= 1 - top_p, never drop the last `min_tokens_to_keep`).
    With top-k on, top-p only has to look at the k best (the others already have probability 0), which avoids
    sorting the whole vocabulary at every step.
    """
    v = scores.shape[-1]
    k = v if top_k <= 0 else min(top_k, v)
    if top_k > 0 and k < v:
        best = jax.lax.top_k(scores, k)[0]  # (B, k) descending
        threshold = best[:, -1]
        ascending = best[:, ::-1]
    else:
        threshold = jnp.full(scores.shape[:-1], NEG_INF, scores.dtype)
        ascending = jnp.sort(scores, axis=-1) if top_p is not None else None
    if top_p is not None:
        probs = jax.nn.softmax(ascending, axis=-1)
        cumulative = jnp.cumsum(probs, axis=-1)
        remove = cumulative <= (1.0 - top_p)
        keep_last = jnp.arange(ascending.shape[-1]) >= ascending.shape[-1] - min_tokens_to_keep
        remove = remove & ~keep_last
        # `cumulative` is non-decreasing, so the removed entries are a prefix: the cut-off is the first survivor.
        n_removed = jnp.sum(remove, axis=-1)
        cutoff = jnp.take_along_axis(ascending, n_removed[:, None], axis=-1)[:, 0]
        threshold = jnp.maximum(threshold, cutoff)
    return jnp.where(scores >= threshold[:, None], scores, NEG_INF)


def process_scores(scores: jax.Array, presence: jax.Array | None, num_generated: jax.Array,
                   values: ProcessorValues, spec: ProcessorSpec) -> jax.Array:
    """Run the processor chain on (B, V) float32 scores (raw logits, or log-probs in beam search as HF does).

    presence: (B, V) bool, ids counted by the repetition penalty (None: no penalty).
    num_generated: () or (B,) int, tokens generated so far (for min_new_tokens).
    """
    scores = scores.astype(jnp.float32)
    if presence is not None:
        scores = apply_repetition_penalty(scores, presence, values.repetition_penalty)
    active = jnp.broadcast_to(num_generated < values.min_new_tokens, scores.shape[:1])
    scores = jnp.where(active[:, None] & values.suppress[None, :], NEG_INF, scores)
    return warp_scores(scores, values, spec)


def warp_scores(scores: jax.Array, values: ProcessorValues, spec: ProcessorSpec) -> jax.Array:
    """The warpers of the chain (sampling only): temperature, then top-k / top-p. transformers 4.28's
    `beam_sample` runs them apart from the processors, on the beam-accumulated scores."""
    if spec.do_sample:
        scores = scores / values.temperature
        if spec.top_k > 0 or spec.use_top_p:
            scores = top_k_top_p_filter(scores, spec.top_k, values.top_p if spec.use_top_p else None,
                                        spec.min_tokens_to_keep)
    return scores


def select_tokens(scores: jax.Array, key: jax.Array | None, do_sample: bool) -> jax.Array:
    """Greedy argmax (first index on ties, like torch) or one categorical draw per row from softmax(scores)."""
    if do_sample:
        return jax.random.categorical(key, scores, axis=-1).astype(jnp.int32)
    if scores.ndim == 2 and kernels.use_cpu_kernels():
        return kernels.row_argmax(scores)
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """(B, V) logits, (B,) tokens -> (B,) float32 log-softmax of each row at its token."""
    if logits.ndim == 2 and kernels.use_cpu_kernels():
        return kernels.log_softmax_at(logits, tokens)
    return jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), tokens[:, None], axis=-1)[:, 0]


def gumbel_top_k(key: jax.Array, scores: jax.Array, k: int) -> jax.Array:
    """Indices of k draws *without replacement* from softmax(scores) along the last axis, in draw order
    (Gumbel-top-k; the same distribution as `torch.multinomial(softmax(scores), k, replacement=False)`)."""
    gumbel = jax.random.gumbel(key, scores.shape, jnp.float32)
    return jax.lax.top_k(scores + gumbel, k)[1]


def stop_sequence_hits(recent: jax.Array, num_generated: jax.Array, stop_ids: jax.Array, stop_lens: jax.Array
                       ) -> jax.Array:
    """Whether the generated ids end with one of the stop sequences.

    recent: (..., W) the last W generated ids (oldest first); num_generated: (...) how many ids were generated;
    stop_ids: (S, W) each stop sequence right-aligned, left-filled with -1; stop_lens: (S,), 0 marks an unused
    row (the arrays are padded to a few fixed sizes so that a new stop list rarely recompiles).
    """
    if stop_ids.shape[0] == 0:
        return jnp.zeros(recent.shape[:-1], jnp.bool_)
    w = recent.shape[-1]
    in_tail = jnp.arange(w)[None, :] >= (w - stop_lens)[:, None]  # (S, W)
    equal = (recent[..., None, :] == stop_ids) | ~in_tail  # (..., S, W)
    long_enough = (num_generated[..., None] >= stop_lens) & (stop_lens > 0)  # (..., S)
    return jnp.any(jnp.all(equal, axis=-1) & long_enough, axis=-1)


# ------------------------------------------------------------------------------------------------------------
# from a GenerationConfig (host side)


def processor_spec(cfg: GenerationConfig, num_eos: int) -> ProcessorSpec:
    """The static processing switches for a config (greedy configs all map to one spec, so e.g. a temperature
    change under greedy decoding does not recompile)."""
    if not cfg.do_sample:
        return ProcessorSpec()
    # HF keeps n_eos + 1 tokens in beam methods so that a non-EOS continuation always survives.
    min_keep = num_eos + 1 if cfg.num_beams > 1 else 1
    return ProcessorSpec(do_sample=True, top_k=max(cfg.top_k, min_keep) if cfg.top_k > 0 else 0,
                         use_top_p=cfg.top_p < 1.0, min_tokens_to_keep=min_keep)


def suppress_mask(cfg: GenerationConfig, vocab_size: int) -> np.ndarray:
    """Ids held back by min_new_tokens: EOS ids and single-token stop sequences (ids outside the vocab, e.g.
    LLaMA's "###" id 835 with a tiny test vocabulary, are ignored)."""
    mask = np.zeros((vocab_size,), np.bool_)
    ids = list(cfg.eos_ids) + [s[0] for s in cfg.stop_sequences if len(s) == 1]
    for i in ids:
        if i < vocab_size:
            mask[i] = True
    return mask


def processor_values(cfg: GenerationConfig, suppress: np.ndarray) -> ProcessorValues:
    """The traced numbers of the processing for a config."""
    return ProcessorValues(
        temperature=np.float32(cfg.temperature),
        top_p=np.float32(cfg.top_p),
        repetition_penalty=np.float32(cfg.repetition_penalty),
        min_new_tokens=np.int32(cfg.min_new_tokens),
        suppress=suppress,
    )


def presence_from_ids(rows: Sequence[Sequence[int]] | None, batch: int, vocab_size: int) -> np.ndarray:
    """(B, V) bool: which ids each row has seen (negative / out-of-vocab ids ignored)."""
    presence = np.zeros((batch, vocab_size), np.bool_)
    if rows is not None:
        if len(rows) != batch:
            raise GenerationInputError(f"penalty ids have {len(rows)} rows, the batch has {batch}")
        for b, ids in enumerate(rows):
            ids = np.asarray(ids, np.int64).reshape(-1)
            ids = ids[(ids >= 0) & (ids < vocab_size)]
            presence[b, ids] = True
    return presence


def process_logits(logits: jax.Array | np.ndarray, generated: jax.Array | np.ndarray | None = None, step: int = 0,
                   config: GenerationConfig | None = None) -> jax.Array:
    """The processed next-token scores the engine samples from (filtered entries are -inf).

    logits: (B, V) raw logits (log-probs in beam search, as HF); generated: (B, T) ids counted by the repetition
    penalty (negative entries ignored; HF passes the prompt ids + generated ids), `step`: tokens generated so
    far (for min_new_tokens). Same order and semantics as transformers' `LogitsProcessorList` built by
    `generate`: RepetitionPenalty -> MinNewTokensLength -> (sampling only) Temperature -> TopK -> TopP.
    `jax.nn.softmax` of the result is the sampling distribution.
    """
    cfg = config or GenerationConfig()
    logits = jnp.asarray(logits, jnp.float32)
    batch, vocab = logits.shape
    rows = None if generated is None else np.asarray(generated).reshape(batch, -1).tolist()
    spec, values, presence = processor_setup(cfg, batch, vocab, rows)
    return process_scores(logits, jnp.asarray(presence), jnp.int32(step), values, spec)


def processor_setup(cfg: GenerationConfig, batch: int, vocab_size: int,
                    penalty_ids: Sequence[Sequence[int]] | None = None
                    ) -> tuple[ProcessorSpec, ProcessorValues, np.ndarray]:
    """(static spec, traced values, (B, V) seen-ids presence) of a config for a batch."""
    spec = processor_spec(cfg, len(cfg.eos_ids))
    values = processor_values(cfg, suppress_mask(cfg, vocab_size))
    return spec, values, presence_from_ids(penalty_ids, batch, vocab_size)
