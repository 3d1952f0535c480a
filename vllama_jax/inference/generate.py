"""Jitted text generation for the LLaMA decoder (upstream.md §6.5; GitHub issue 5).

`Generator` owns a `Llama` module and its params (optionally sharded over a mesh) and generates from prompt
*embeddings* — Video-LLaMA splices media embeddings between text embeddings, so like upstream's
`llama_model.generate(inputs_embeds=...)` the engine never needs prompt ids — or from token ids
(`generate_ids`).

How a call runs:

1. Packing. Prompts of different lengths are left-padded into one bucket length (`prompt_bucket`: powers of two
   from 16 up to 512, then multiples of 256) and the KV cache gets `bucket + max_new_tokens` rounded up to a
   multiple of 64 slots, so a new prompt length or a new `max_new_tokens` reuses a compiled program most of the
   time. Padding slots are masked in the cache and real tokens get positions 0..L_b-1 (see `models/llama.py`), so
   padding never changes a row's result.
2. Prefill: one jitted call writes the whole bucket into a fresh cache and returns the last position's logits.
3. Decode: a jitted step (cache donated, so it is updated in place) processes the logits, picks one token per row,
   updates the stop state and runs the decoder on that token. The loop runs on the host so every token can be
   streamed as soon as it exists; the next step is dispatched *before* the host reads the previous token, so the
   device never waits for the host (at most one wasted step when the batch finishes).
   Beam search (`num_beams > 1`) has its own step over B * num_beams rows that reorders the cache by gather.

Semantics follow transformers' `generate` (5.x, the installed version; also what 4.28 does unless noted):
logits processors in HF order (repetition penalty, min_new_tokens, temperature, top-k, top-p; see `sampling.py`),
greedy argmax or a categorical draw from an explicit `jax.random` key, EOS per row (finished rows then emit
`pad_token_id`, not returned here), beam search as HF's vectorised beam search (length penalty on the generated
length including the EOS token, `early_stopping` True / False / "never", max(2, 1 + n_eos) * num_beams candidates
per step; beam *sampling* when do_sample draws those candidates without replacement, by Gumbel-top-k).
Beam search follows 5.x (tested against it). transformers 4.28's `BeamSearchScorer` (upstream) scored a hypothesis
by its full `input_ids` length — [dummy BOS] + generated ids, EOS not counted — which gives the same denominator
for EOS-finished hypotheses but 1 + max_new_tokens instead of max_new_tokens for the ones cut by the length limit,
so with length_penalty != 0 rankings between the two kinds can differ from upstream's in rare cases.
Stop sequences (upstream's `StoppingCriteriaSub`: Vicuna "###" = [835] or [2277, 29937], LLaMA-2 [2]) finish a row
whose generated ids end with one of them; stripping them is the caller's job (`text.postprocess_answer`).

Repetition penalty and the prompt: with an ids prompt HF penalises the prompt ids too (`generate_ids` does the
same). With an embeddings prompt HF 5.x only sees the generated ids; transformers 4.28 (upstream) started
`input_ids` from a dummy [BOS], which was penalised as well — pass `penalty_ids=[[bos]]` to reproduce that.
Upstream uses repetition_penalty 1.0 (off), so this never matters for the demo defaults.
"""

from __future__ import annotations

import dataclasses
import math
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ..config import LlamaConfig
from ..errors import VllamaError
from ..models.llama import Llama, cache_logical_axes, init_cache
from ..runtime import use_compilation_cache
from ..sharding import batch_sharding, logical_axes_of, tree_shardings
from .sampling import (
    ProcessorSpec,
    ProcessorValues,
    gumbel_top_k,
    process_scores,
    select_tokens,
    stop_sequence_hits,
)


FINISH_EOS = "eos"
FINISH_STOP = "stop"
FINISH_LENGTH = "length"
_REASONS = ("", FINISH_EOS, FINISH_STOP, FINISH_LENGTH)  # device-side codes 0..3

_BEAM_NEG = -1.0e9  # HF's "very large negative" used to disable beams / hypotheses

StreamCallback = Callable[[int, np.ndarray], None]


class GenerationError(VllamaError):
    """Base class of the errors raised by this module."""


class GenerationConfigError(GenerationError, ValueError):
    """A `GenerationConfig` field has an impossible value (or values that contradict each other)."""


class GenerationInputError(GenerationError, ValueError):
    """Prompts, masks or call arguments that cannot be generated from."""


# ------------------------------------------------------------------------------------------------------------
# configuration


def _id_tuple(value: Any, name: str) -> tuple[int, ...]:
    if isinstance(value, (int, np.integer)):
        value = (value,)
    try:
        ids = tuple(int(v) for v in value)
    except (TypeError, ValueError) as e:
        raise GenerationConfigError(f"{name} must be an int or a sequence of ints, got {value!r}") from e
    if any(i < 0 for i in ids):
        raise GenerationConfigError(f"{name} has negative ids: {ids}")
    return ids


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings. Defaults are upstream `Chat.answer`'s (upstream.md §6.5): sampling, top-k 50, top-p 0.9.

    eos_token_id: int, tuple of ints, or None = the model config's EOS; `()` disables EOS stopping.
    pad_token_id: emitted by finished rows inside the batch (never returned); None = the model config's pad id.
    stop_sequences: id sequences that finish a row when its generated ids end with one of them.
    min_new_tokens: until that many tokens exist, EOS ids and single-token stop sequences get -inf and longer stop
        sequences do not stop the row.
    early_stopping: beam search only, HF semantics (True: stop as soon as num_beams hypotheses are finished; False:
        stop when the best running beam at its current length cannot beat the worst hypothesis; "never": same
        with the best length it could still reach when length_penalty > 0).
    """

    max_new_tokens: int = 300
    min_new_tokens: int = 0
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 0.9
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    repetition_penalty: float = 1.0
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        def fail(msg: str) -> None:
            raise GenerationConfigError(msg)

        if not isinstance(self.max_new_tokens, (int, np.integer)) or self.max_new_tokens < 1:
            fail(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.min_new_tokens, (int, np.integer)) or self.min_new_tokens < 0:
            fail(f"min_new_tokens must be an int >= 0, got {self.min_new_tokens!r}")
        if not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            fail(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.num_beams, (int, np.integer)) or self.num_beams < 1:
            fail(f"num_beams must be an int >= 1, got {self.num_beams!r}")
        for name in ("temperature", "top_p", "length_penalty", "repetition_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(value):
                fail(f"{name} must be a finite number, got {value!r}")
        if self.temperature <= 0:
            fail(f"temperature must be > 0, got {self.temperature} (use do_sample=False for greedy decoding)")
        if not 0 < self.top_p <= 1:
            fail(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            fail(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}")
        if self.early_stopping not in (True, False, "never"):
            fail(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.early_stopping != "never":
            object.__setattr__(self, "early_stopping", bool(self.early_stopping))
        try:
            stops = tuple(_id_tuple(s, "stop_sequences entry") for s in self.stop_sequences)
        except TypeError as e:
            raise GenerationConfigError(f"stop_sequences must be a sequence of id sequences, got "
                                        f"{self.stop_sequences!r}") from e
        if any(len(s) == 0 for s in stops):
            fail("stop_sequences may not contain an empty sequence")
        object.__setattr__(self, "stop_sequences", stops)
        if self.eos_token_id is not None:
            object.__setattr__(self, "eos_token_id", _id_tuple(self.eos_token_id, "eos_token_id"))
        if self.pad_token_id is not None and (not isinstance(self.pad_token_id, (int, np.integer))
                                              or self.pad_token_id < 0):
            fail(f"pad_token_id must be an int >= 0, got {self.pad_token_id!r}")
        for name in ("max_new_tokens", "min_new_tokens", "top_k", "num_beams"):
            object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("temperature", "top_p", "length_penalty", "repetition_penalty"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def replace(self, **changes: Any) -> "GenerationConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """EOS ids as a tuple (empty when unset)."""
        return self.eos_token_id or ()  # type: ignore[return-value]


@dataclass
class GenerationOutput:
    """Result of `Generator.generate`.

    tokens: per row, the generated ids without the prompt (including the EOS / stop ids that finished the row).
    finish_reasons: per row, "eos", "stop" (a stop sequence) or "length" (max_new_tokens).
    scores: per row; beam search: HF's `sequences_scores` (sum of log-probs / length ** length_penalty);
        otherwise the sum of the model's log-probabilities (raw logits) of the generated tokens.
    logits: (steps, B, V) float32 raw next-token logits of every step when `output_logits` (not for beams).
    timings: seconds: "prefill" (prompt -> first token on the host, incl. any compilation), "decode" (the rest),
        "total"; and "steps" (decode steps run).
    """

    tokens: list[list[int]]
    finish_reasons: list[str]
    scores: list[float] | None = None
    logits: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------------
# persistent compilation cache


# ------------------------------------------------------------------------------------------------------------
# logits processing (public, for tests and callers that sample themselves)


def _processor_spec(cfg: GenerationConfig, num_eos: int) -> ProcessorSpec:
    """The static processing switches for a config (greedy configs all map to one spec, so e.g. a temperature
    change under greedy decoding does not recompile)."""
    if not cfg.do_sample:
        return ProcessorSpec()
    # HF keeps n_eos + 1 tokens in beam methods so that a non-EOS continuation always survives.
    min_keep = num_eos + 1 if cfg.num_beams > 1 else 1
    return ProcessorSpec(do_sample=True, top_k=max(cfg.top_k, min_keep) if cfg.top_k > 0 else 0,
                         use_top_p=cfg.top_p < 1.0, min_tokens_to_keep=min_keep)


def _suppress_mask(cfg: GenerationConfig, vocab_size: int) -> np.ndarray:
    """Ids held back by min_new_tokens: EOS ids and single-token stop sequences (ids outside the vocab, e.g.
    LLaMA's "###" id 835 with a tiny test vocabulary, are ignored)."""
    mask = np.zeros((vocab_size,), np.bool_)
    ids = list(cfg.eos_ids) + [s[0] for s in cfg.stop_sequences if len(s) == 1]
    for i in ids:
        if i < vocab_size:
            mask[i] = True
    return mask


def _processor_values(cfg: GenerationConfig, suppress: np.ndarray) -> ProcessorValues:
    return ProcessorValues(
        temperature=np.float32(cfg.temperature),
        top_p=np.float32(cfg.top_p),
        repetition_penalty=np.float32(cfg.repetition_penalty),
        min_new_tokens=np.int32(cfg.min_new_tokens),
        suppress=suppress,
    )


def _presence_from_ids(rows: Sequence[Sequence[int]] | None, batch: int, vocab_size: int) -> np.ndarray:
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
    suppress = _suppress_mask(cfg, vocab)
    spec = _processor_spec(cfg, len(cfg.eos_ids))
    rows = None if generated is None else np.asarray(generated).reshape(batch, -1).tolist()
    presence = jnp.asarray(_presence_from_ids(rows, batch, vocab))
    return process_scores(logits, presence, jnp.int32(step), _processor_values(cfg, suppress), spec)


# ------------------------------------------------------------------------------------------------------------
# the engine


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _forward_tokens(module: Llama, tokens: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
    """One decode step of the decoder: tokens (N,) -> next-token logits (N, V), updated cache."""
    logits, cache = module(module.embed(tokens[:, None]), cache=cache)
    return logits[:, 0], cache


def _shared_prefix(seqs: Sequence[np.ndarray]) -> int:
    """Length of the longest common prefix of `seqs`, at most (shortest length - 1)."""
    n = min(len(x) for x in seqs) - 1
    for other in seqs[1:]:
        same = np.flatnonzero(seqs[0][:n] != other[:n])
        n = int(same[0]) if same.size else n
    return max(n, 0)


class Generator:
    """Prefill + decode engine for one LLaMA decoder and its params (built once, reused for many calls).

    model: a `Llama` module (its dtype is the compute dtype) or a `LlamaConfig` (float32 module).
    params: the decoder's params tree (`load_llama(...)[1]`; inside Video-LLaMA: `params["llama"]`).
    mesh: optional (data, fsdp, tensor) mesh: params are placed by the logical-axis rules table, the KV cache by
        `cache_logical_axes`, prompts are batch-sharded.
    cache_dtype: KV cache dtype (default: the module's compute dtype).
    min_prompt_bucket / cache_multiple: bucketing of compiled shapes (see `prompt_bucket`, `cache_length`).
    compilation_cache: True = `enable_compilation_cache()` unless a JAX cache dir is already configured;
        a path = use that folder; False = leave JAX's settings alone.
    """

    def __init__(self, model: Llama | LlamaConfig, params: Any, *, mesh: Mesh | None = None,
                 cache_dtype: Any = None, min_prompt_bucket: int = 16, cache_multiple: int = 64,
                 compilation_cache: bool | str | os.PathLike = True) -> None:
        if isinstance(model, LlamaConfig):
            model = Llama(model)
        if not isinstance(model, Llama):
            raise GenerationInputError(f"model must be a Llama module or a LlamaConfig, got {type(model).__name__}")
        use_compilation_cache(compilation_cache)
        self.module = model
        self.config: LlamaConfig = model.config
        self.mesh = mesh
        self.cache_dtype = jnp.dtype(cache_dtype if cache_dtype is not None else model.dtype)
        self.min_prompt_bucket = int(min_prompt_bucket)
        self.cache_multiple = int(cache_multiple)
        self.params = self._place_params(params)

        self._embed_fn = jax.jit(self._embed_impl)
        self._prefill_fn = jax.jit(self._prefill_impl, static_argnames=("cache_length", "last"))
        self._sample_step_fn = jax.jit(self._sample_step_impl, static_argnames=("spec",), donate_argnums=(1,))
        self._expand_fn = jax.jit(self._expand_impl, static_argnames=("num_beams",))
        self._score_fn = jax.jit(self._score_impl)
        self._beam_step_fn = jax.jit(self._beam_step_impl, static_argnames=("spec", "num_beams", "num_eos"),
                                     donate_argnums=(1,))

    # ---- shapes --------------------------------------------------------------------------------------------
    def prompt_bucket(self, length: int) -> int:
        """Compiled prompt length for a longest prompt of `length`: powers of two from `min_prompt_bucket` to 512
        (at most 2x padding while prompts are short and cheap), then multiples of 256."""
        if length <= 512:
            return max(self.min_prompt_bucket, 1 << max(0, length - 1).bit_length())
        return _round_up(length, 256)

    def cache_length(self, bucket: int, max_new_tokens: int) -> int:
        """KV cache slots: the prompt bucket + max_new_tokens, rounded up to `cache_multiple`."""
        return _round_up(bucket + max_new_tokens, self.cache_multiple)

    # ---- placement -----------------------------------------------------------------------------------------
    def _place_params(self, params: Any) -> Any:
        if self.mesh is None:
            return jax.device_put(params)
        dummy = jnp.zeros((1, 1, self.config.hidden_size), jnp.float32)
        boxed = jax.eval_shape(lambda: self.module.init(jax.random.PRNGKey(0), dummy))["params"]
        shardings = tree_shardings(params, logical_axes_of(boxed), self.mesh)
        return jax.device_put(params, shardings)

    def _constrain_cache(self, cache: Any) -> Any:
        """Pin the cache to its rules-table sharding (so the donated buffer keeps one layout across steps)."""
        if self.mesh is None:
            return cache
        shardings = tree_shardings(cache, cache_logical_axes(self.config), self.mesh)
        return jax.tree_util.tree_map(jax.lax.with_sharding_constraint, cache, shardings)

    def _put_batch(self, x: Any) -> jax.Array:
        x = jnp.asarray(x)
        if self.mesh is None:
            return x
        return jax.device_put(x, batch_sharding(self.mesh, x.ndim, x.shape))

    # ---- jitted pieces -------------------------------------------------------------------------------------
    def _embed_impl(self, params: Any, ids: jax.Array) -> jax.Array:
        return self.module.apply({"params": params}, ids, method=Llama.embed)

    def _prefill_impl(self, params: Any, embeds: jax.Array, mask: jax.Array, cache_length: int, last: int = 1
                      ) -> tuple[jax.Array, Any]:
        """-> logits of the last `last` positions (B, last, V), the cache."""
        cache = self._constrain_cache(init_cache(self.config, embeds.shape[0], cache_length, self.cache_dtype))
        # Left padding puts every row's last real token in the last column.
        logits, cache = self.module.apply({"params": params}, embeds, attention_mask=mask, cache=cache,
                                          logits_slice=slice(-last, None))
        return logits, self._constrain_cache(cache)

    def _sample_step_impl(self, params: Any, cache: Any, state: dict[str, Any], values: ProcessorValues,
                          ctrl: dict[str, jax.Array], spec: ProcessorSpec
                          ) -> tuple[jax.Array, jax.Array, dict[str, Any], Any]:
        logits, finished = state["logits"], state["finished"]
        batch = logits.shape[0]
        scores = process_scores(logits, state["presence"], state["n_gen"], values, spec)
        key, sub = jax.random.split(state["key"])
        tokens = select_tokens(scores, sub, spec.do_sample)
        tokens = jnp.where(finished, ctrl["pad"], tokens)  # HF: finished rows emit pad

        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
        score = state["score"] + jnp.where(finished, 0.0, logp)
        n_gen = state["n_gen"] + (~finished).astype(jnp.int32)
        recent = jnp.concatenate([state["recent"][:, 1:], tokens[:, None]], axis=1)
        is_eos = jnp.isin(tokens, ctrl["eos"])
        is_stop = (stop_sequence_hits(recent, n_gen, ctrl["stop_ids"], ctrl["stop_lens"])
                   & (n_gen >= values.min_new_tokens))
        is_len = n_gen >= ctrl["max_new"]
        code = jnp.where(is_eos, 1, jnp.where(is_stop, 2, jnp.where(is_len, 3, 0))).astype(jnp.int32)
        newly = ~finished & (code > 0)
        new_state = dict(state, key=key, score=score, n_gen=n_gen, recent=recent,
                         finished=finished | newly, reason=jnp.where(newly, code, state["reason"]),
                         presence=state["presence"].at[jnp.arange(batch), tokens].set(True))
        new_state["logits"], cache = self.module.apply({"params": params}, tokens, cache,
                                                       method=_forward_tokens)
        return tokens, new_state["finished"], new_state, self._constrain_cache(cache)

    def _score_impl(self, params: Any, logits: jax.Array, cache: Any, ids: jax.Array, mask: jax.Array
                    ) -> jax.Array:
        """Prefilled prompts (last logits (B, V), cache of B rows) and candidates ids/mask (B, K, T), right-padded
        -> (B, K) summed log-probabilities of each candidate's real tokens."""
        b, k, t = ids.shape
        rep = lambda x: jnp.repeat(x, k, axis=0)  # noqa: E731  row b -> rows b*K .. b*K+K-1, as for beams
        cache = self._constrain_cache(jax.tree_util.tree_map(rep, cache))
        flat_ids, flat_mask = ids.reshape(b * k, t), mask.reshape(b * k, t)
        embeds = self.module.apply({"params": params}, flat_ids, method=Llama.embed)
        out, _ = self.module.apply({"params": params}, embeds, attention_mask=flat_mask, cache=cache)
        # token j is predicted by the prompt's last logits (j = 0) or by the candidate's token j - 1
        pred = jnp.concatenate([rep(logits)[:, None], out[:, :-1]], axis=1).astype(jnp.float32)
        logp = jnp.take_along_axis(pred, flat_ids[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(pred, axis=-1)
        return jnp.sum(jnp.where(flat_mask != 0, logp, 0.0), axis=1).reshape(b, k)

    def _expand_impl(self, logits: jax.Array, cache: Any, presence: jax.Array, num_beams: int
                     ) -> tuple[jax.Array, Any, jax.Array]:
        # HF expands the prompt to B * num_beams rows before prefill; repeating the prefilled cache is the same.
        rep = lambda x: jnp.repeat(x, num_beams, axis=0)  # noqa: E731  row b -> rows b*K .. b*K+K-1
        return rep(logits), self._constrain_cache(jax.tree_util.tree_map(rep, cache)), rep(presence)

    def _beam_step_impl(self, params: Any, cache: Any, state: dict[str, Any], values: ProcessorValues,
                        ctrl: dict[str, jax.Array], spec: ProcessorSpec, num_beams: int, num_eos: int
                        ) -> tuple[dict[str, Any], Any]:
        """One step of HF's vectorised beam search (`GenerationMixin._beam_search`), for all rows at once."""
        k = num_beams
        flat_rows, vocab = state["logits"].shape
        batch = flat_rows // k
        t = state["step"]
        n_gen = t + 1
        keep = max(2, 1 + num_eos) * k  # candidates kept per row, so that num_beams non-finished ones survive

        # (b) log-probs, processors (on log-probs, as HF), accumulate over the beam
        logp = jax.nn.log_softmax(state["logits"], axis=-1)
        logp = process_scores(logp, state["presence"], t, values, spec)
        acc = (logp.reshape(batch, k, vocab) + state["run_scores"][:, :, None]).reshape(batch, k * vocab)

        # (c) top-`keep` continuations (or `keep` draws without replacement for beam sampling)
        key = state["key"]
        if spec.do_sample:
            key, sub = jax.random.split(key)
            idx = gumbel_top_k(sub, acc, keep)
            cand_lp = jnp.take_along_axis(acc, idx, axis=1)
        else:
            cand_lp, idx = jax.lax.top_k(acc, keep)
        src, tok = idx // vocab, (idx % vocab).astype(jnp.int32)
        gather = lambda x, i: jnp.take_along_axis(x, i.reshape(i.shape + (1,) * (x.ndim - 2)), axis=1)  # noqa
        seq_len = state["run_seq"].shape[-1]
        cand_seq = jnp.where(jnp.arange(seq_len) == t, tok[:, :, None], gather(state["run_seq"], src))
        cand_recent = jnp.concatenate([gather(state["recent"], src)[:, :, 1:], tok[:, :, None]], axis=-1)

        # (d) which candidates hit a stopping criterion
        is_eos = jnp.isin(tok, ctrl["eos"])
        is_stop = (stop_sequence_hits(cand_recent, jnp.full(tok.shape, n_gen), ctrl["stop_ids"], ctrl["stop_lens"])
                   & (n_gen >= values.min_new_tokens))
        hits = is_eos | is_stop | (n_gen >= ctrl["max_new"])
        code = jnp.where(is_eos, 1, jnp.where(is_stop, 2, 3)).astype(jnp.int32)

        # (e) the best `num_beams` unfinished continuations keep running
        run_lp = cand_lp + hits.astype(jnp.float32) * _BEAM_NEG
        nidx = jax.lax.top_k(run_lp, k)[1]
        run_seq, run_scores = gather(cand_seq, nidx), gather(run_lp, nidx)
        run_recent, run_src, run_tok = gather(cand_recent, nidx), gather(src, nidx), gather(tok, nidx)

        # (f) finished hypotheses: only among the top num_beams candidates, length-penalised, best num_beams kept
        just = hits & (jnp.arange(keep) < k)[None, :]
        fin_flag = state["fin_flag"]
        sc = cand_lp / ctrl["len_denom"][t]
        # early_stopping=True: no more hypotheses once num_beams are finished
        sc = sc + (jnp.all(fin_flag, axis=1, keepdims=True) & ctrl["early_true"]).astype(jnp.float32) * _BEAM_NEG
        sc = sc + (~state["unsatisfied"])[:, None].astype(jnp.float32) * _BEAM_NEG
        sc = sc + (~just).astype(jnp.float32) * _BEAM_NEG
        m_scores = jnp.concatenate([state["fin_scores"], sc], axis=1)
        midx = jax.lax.top_k(m_scores, k)[1]
        merge = lambda old, new: gather(jnp.concatenate([old, new], axis=1), midx)  # noqa: E731
        fin_scores = gather(m_scores, midx)
        fin_seq = merge(state["fin_seq"], cand_seq)
        fin_len = merge(state["fin_len"], jnp.full(tok.shape, n_gen, jnp.int32))
        fin_reason = merge(state["fin_reason"], code)
        fin_flag = merge(fin_flag, just)

        # (g) reorder the cache (and the penalty's seen-ids) to the surviving beams' parents
        beam_idx = (jnp.arange(batch)[:, None] * k + run_src).reshape(flat_rows)
        cache = jax.tree_util.tree_map(lambda x: jnp.take(x, beam_idx, axis=0), cache)
        run_tok_flat = run_tok.reshape(flat_rows)
        presence = jnp.take(state["presence"], beam_idx, axis=0).at[jnp.arange(flat_rows), run_tok_flat].set(True)

        # early-stop heuristic and the loop condition (HF `_check_early_stop_heuristic` and friends)
        best_running = run_scores[:, :1] / ctrl["heur_denom"][t]
        worst_fin = jnp.where(fin_flag, jnp.min(fin_scores, axis=1, keepdims=True), _BEAM_NEG)
        unsatisfied = state["unsatisfied"] & jnp.any(best_running > worst_fin, axis=1)
        open_beam = ~(jnp.all(fin_flag) & ctrl["early_true"])
        done = ~(jnp.any(unsatisfied) & open_beam & ~jnp.all(hits))

        new_state = dict(state, presence=presence, key=key, step=t + 1, run_seq=run_seq, run_scores=run_scores,
                         recent=run_recent, fin_seq=fin_seq, fin_scores=fin_scores, fin_len=fin_len,
                         fin_reason=fin_reason, fin_flag=fin_flag, unsatisfied=unsatisfied, done=done)
        new_state["logits"], cache = self.module.apply({"params": params}, run_tok_flat, cache,
                                                       method=_forward_tokens)
        return new_state, self._constrain_cache(cache)

    # ---- input handling ------------------------------------------------------------------------------------
    def embed(self, ids: Any) -> jax.Array:
        """Token ids (L,) or (B, L) -> embeddings of the same leading shape + (D,), with this model's table."""
        arr = np.asarray(ids, np.int32)
        if arr.ndim not in (1, 2):
            raise GenerationInputError(f"ids must be 1-D or 2-D, got shape {arr.shape}")
        out = self._embed_fn(self.params, jnp.asarray(arr.reshape(1, -1) if arr.ndim == 1 else arr))
        return out[0] if arr.ndim == 1 else out

    def _pack(self, prompt_embeds: Any, attention_mask: Any) -> tuple[jax.Array, np.ndarray]:
        """Left-pad prompts into one bucket: -> embeds (B, L_b, D), mask (B, L_b) int32."""
        d = self.config.hidden_size
        if isinstance(prompt_embeds, (list, tuple)):
            if attention_mask is not None:
                raise GenerationInputError("attention_mask is only for a (B, L, D) array; a list of per-row "
                                           "(L_i, D) prompts has no padding")
            if not prompt_embeds:
                raise GenerationInputError("no prompts given")
            rows = [jnp.asarray(r) for r in prompt_embeds]
            for i, r in enumerate(rows):
                if r.ndim != 2 or r.shape[1] != d or r.shape[0] == 0:
                    raise GenerationInputError(f"prompt {i} has shape {tuple(r.shape)}, expected (L>0, {d})")
            lengths = [int(r.shape[0]) for r in rows]
            bucket = self.prompt_bucket(max(lengths))
            dtype = jnp.result_type(*rows)
            embeds = jnp.stack([jnp.pad(r.astype(dtype), ((bucket - n, 0), (0, 0))) for r, n in zip(rows, lengths)])
            mask = np.zeros((len(rows), bucket), np.int32)
            for b, n in enumerate(lengths):
                mask[b, bucket - n:] = 1
            return embeds, mask

        embeds = jnp.asarray(prompt_embeds)
        if embeds.ndim != 3 or embeds.shape[-1] != d or embeds.shape[0] == 0 or embeds.shape[1] == 0:
            raise GenerationInputError(f"prompt_embeds has shape {tuple(embeds.shape)}, expected (B, L, {d}) "
                                       "or a list of (L_i, D) arrays")
        b, length, _ = embeds.shape
        if attention_mask is None:
            mask = np.ones((b, length), np.int32)
        else:
            mask = np.asarray(attention_mask)
            if mask.shape != (b, length):
                raise GenerationInputError(f"attention_mask has shape {mask.shape}, prompts are {(b, length)}")
            mask = (mask != 0).astype(np.int32)
        lengths = mask.sum(axis=1)
        if (lengths == 0).any():
            raise GenerationInputError(f"rows {np.flatnonzero(lengths == 0).tolist()} have no real token")
        bucket = self.prompt_bucket(int(lengths.max()))
        if mask.all():
            return jnp.pad(embeds, ((0, 0), (bucket - length, 0), (0, 0))), np.pad(mask, ((0, 0), (bucket - length, 0)))
        # Any padding pattern (left, right, holes): gather each row's real positions to the right end.
        idx = np.zeros((b, bucket), np.int32)
        new_mask = np.zeros((b, bucket), np.int32)
        for r in range(b):
            pos = np.flatnonzero(mask[r])
            idx[r, bucket - len(pos):] = pos
            new_mask[r, bucket - len(pos):] = 1
        packed = jnp.take_along_axis(embeds, jnp.asarray(idx)[:, :, None], axis=1)
        packed = jnp.where(jnp.asarray(new_mask, bool)[:, :, None], packed, 0)
        return packed, new_mask

    def _resolve(self, config: GenerationConfig | None) -> GenerationConfig:
        cfg = config or GenerationConfig()
        if not isinstance(cfg, GenerationConfig):
            raise GenerationInputError(f"config must be a GenerationConfig, got {type(cfg).__name__}")
        changes: dict[str, Any] = {}
        if cfg.eos_token_id is None:
            changes["eos_token_id"] = (self.config.eos_token_id,)
        if cfg.pad_token_id is None:
            changes["pad_token_id"] = self.config.pad_token_id
        cfg = cfg.replace(**changes) if changes else cfg
        if cfg.pad_token_id >= self.config.vocab_size:
            raise GenerationConfigError(f"pad_token_id {cfg.pad_token_id} is outside the vocabulary "
                                        f"({self.config.vocab_size}); finished rows are fed this id")
        return cfg

    def _controls(self, cfg: GenerationConfig) -> dict[str, np.ndarray]:
        """Stop-rule arrays, padded to multiples of 4 (-1 ids / 0 lengths never match) so that a different EOS
        or stop list usually reuses the compiled step."""
        stops = cfg.stop_sequences
        width = _round_up(max([1] + [len(s) for s in stops]), 4)
        stop_ids = np.full((_round_up(max(1, len(stops)), 4), width), -1, np.int32)
        stop_lens = np.zeros((stop_ids.shape[0],), np.int32)
        for i, s in enumerate(stops):
            stop_ids[i, width - len(s):] = s
            stop_lens[i] = len(s)
        eos = np.full((_round_up(max(1, len(cfg.eos_ids)), 4),), -1, np.int32)
        eos[:len(cfg.eos_ids)] = cfg.eos_ids
        return dict(eos=eos, stop_ids=stop_ids, stop_lens=stop_lens, max_new=np.int32(cfg.max_new_tokens),
                    pad=np.int32(cfg.pad_token_id))

    @staticmethod
    def _key(rng: Any) -> jax.Array:
        if rng is None:  # like HF's global RNG: a fresh draw per call; pass a key for reproducibility
            return jax.random.PRNGKey(secrets.randbits(31))
        if isinstance(rng, (int, np.integer)):
            return jax.random.PRNGKey(int(rng))
        return rng

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
        cfg = self._resolve(config)
        embeds, mask = self._pack(prompt_embeds, attention_mask)
        if cfg.num_beams > 1:
            if stream is not None:
                raise GenerationInputError("streaming is not supported with beam search (num_beams > 1)")
            if output_logits:
                raise GenerationInputError("output_logits is not supported with beam search")
            return self._beam_search(embeds, mask, cfg, rng, penalty_ids)
        return self._sample(embeds, mask, cfg, rng, stream, penalty_ids, output_logits)

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
        embeds = self._embed_fn(self.params, jnp.asarray(ids))
        return self.generate(embeds, mask, config, rng, stream, penalty_ids=[r.tolist() for r in rows],
                             output_logits=output_logits)

    def score(self, prompt_embeds: Any, candidates: Sequence[Sequence[Sequence[int]]], attention_mask: Any = None
              ) -> list[np.ndarray]:
        """Log-likelihood of candidate continuations after each prompt (multiple-choice evaluation).

        prompt_embeds / attention_mask: as for `generate` (one row per prompt). candidates: per prompt, a list of
        token-id sequences (any number, any lengths >= 1). Returns per prompt a float64 array with the summed
        log-probability of each candidate's tokens given the prompt (teacher forcing; no logits processor).

        Each prompt is prefilled once, together with the first tokens all its candidates share ("The shape is"
        of "The shape is red." / "The shape is blue."); the differing tails then run as one chunk over copies of
        its KV cache. Shapes are bucketed (candidates per prompt to a multiple of 2, tail length to a multiple
        of 4) so that calls with similar option lists reuse the compiled programs.
        """
        embeds, mask = self._pack(prompt_embeds, attention_mask)
        if len(candidates) != embeds.shape[0]:
            raise GenerationInputError(f"{embeds.shape[0]} prompts but candidates for {len(candidates)}")
        rows = []
        for i, opts in enumerate(candidates):
            opts = [np.asarray(c, np.int64).reshape(-1) for c in opts]
            if not opts:
                raise GenerationInputError(f"prompt {i} has no candidates")
            for j, c in enumerate(opts):
                if c.size == 0:
                    raise GenerationInputError(f"candidate {j} of prompt {i} is empty")
                if c.min() < 0 or c.max() >= self.config.vocab_size:
                    raise GenerationInputError(f"candidate {j} of prompt {i} has ids outside "
                                               f"[0, {self.config.vocab_size})")
            rows.append(opts)
        batch = len(rows)
        shared = [_shared_prefix(opts) for opts in rows]  # each candidate keeps >= 1 token of its own
        p = max(shared)
        if p:  # append each row's shared tokens to its prompt, right-aligned (holes are packed away by _pack)
            pre_ids = np.zeros((batch, p), np.int32)
            pre_mask = np.zeros((batch, p), np.int32)
            for b, (opts, n) in enumerate(zip(rows, shared)):
                pre_ids[b, p - n:], pre_mask[b, p - n:] = opts[0][:n], 1
            pre = self._embed_fn(self.params, jnp.asarray(pre_ids)).astype(embeds.dtype)
            embeds, mask = self._pack(jnp.concatenate([embeds, pre], axis=1), np.concatenate([mask, pre_mask], 1))
        k = _round_up(max(len(r) for r in rows), 2)
        t = _round_up(max(c.size - n for r, n in zip(rows, shared) for c in r), 4)
        ids = np.zeros((batch, k, t), np.int32)
        cmask = np.zeros((batch, k, t), np.int32)
        for b, (opts, n) in enumerate(zip(rows, shared)):
            for j, c in enumerate(opts + [opts[0]] * (k - len(opts))):  # padding candidates: copies, dropped
                ids[b, j, :c.size - n], cmask[b, j, :c.size - n] = c[n:], 1
        logits, cache = self._prefill(embeds, mask, t, last=p + 1)
        tails = np.asarray(self._score_fn(self.params, logits[:, -1], cache, self._put_batch(ids),
                                          self._put_batch(cmask)), np.float64)
        heads = np.asarray(logits[:, :p], np.float64)  # one transfer; empty when nothing is shared
        out = []
        for b, (opts, n) in enumerate(zip(rows, shared)):
            head = 0.0
            if n:  # column p - n + j of the last p + 1 positions predicts shared token j
                lg = heads[b, p - n:]
                lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
                head = float(np.sum(lg[np.arange(n), opts[0][:n]] - lse))
            out.append(head + tails[b, :len(opts)])
        return out

    # ---- decoding loops ------------------------------------------------------------------------------------
    def _prefill(self, embeds: jax.Array, mask: np.ndarray, new_tokens: int, last: int = 1
                 ) -> tuple[jax.Array, Any]:
        """The logits of the prompts' last `last` positions (B, last, V) and a cache with room for `new_tokens`
        more."""
        cache_length = self.cache_length(embeds.shape[1], new_tokens)
        return self._prefill_fn(self.params, self._put_batch(embeds), self._put_batch(mask), cache_length=cache_length,
                                last=last)

    def _setup(self, cfg: GenerationConfig, batch: int, penalty_ids: Any
               ) -> tuple[ProcessorSpec, ProcessorValues, dict[str, np.ndarray], np.ndarray]:
        vocab = self.config.vocab_size
        suppress = _suppress_mask(cfg, vocab)
        spec = _processor_spec(cfg, len(cfg.eos_ids))
        presence = _presence_from_ids(penalty_ids, batch, vocab)
        return spec, _processor_values(cfg, suppress), self._controls(cfg), presence

    def _sample(self, embeds: jax.Array, mask: np.ndarray, cfg: GenerationConfig, rng: Any,
                stream: StreamCallback | None, penalty_ids: Any, output_logits: bool) -> GenerationOutput:
        t0 = time.perf_counter()
        batch = embeds.shape[0]
        spec, values, ctrl, presence = self._setup(cfg, batch, penalty_ids)
        logits, cache = self._prefill(embeds, mask, cfg.max_new_tokens)
        logits = logits[:, -1]
        state: dict[str, Any] = dict(
            logits=logits, key=self._key(rng), score=jnp.zeros((batch,), jnp.float32),
            n_gen=jnp.zeros((batch,), jnp.int32), recent=jnp.full((batch, ctrl["stop_ids"].shape[1]), -1, jnp.int32),
            finished=jnp.zeros((batch,), jnp.bool_), reason=jnp.zeros((batch,), jnp.int32),
            presence=jnp.asarray(presence))

        tokens: list[list[int]] = [[] for _ in range(batch)]
        done = np.zeros((batch,), bool)
        step_logits: list[jax.Array] = []
        t_first = None

        def consume(step: int, tok: jax.Array, fin: jax.Array) -> bool:
            """Host side of one step (runs one step behind the device); True when every row is finished."""
            nonlocal t_first
            tok_np, fin_np = np.asarray(tok), np.asarray(fin)
            if t_first is None:
                t_first = time.perf_counter()
            out = np.where(done, -1, tok_np).astype(np.int32)
            for b in np.flatnonzero(~done):
                tokens[b].append(int(tok_np[b]))
            done[:] = fin_np
            if stream is not None:
                stream(step, out)
            return bool(done.all())

        pending = None
        steps = 0
        for step in range(cfg.max_new_tokens):
            if output_logits:
                step_logits.append(state["logits"])
            tok, fin, state, cache = self._sample_step_fn(self.params, cache, state, values, ctrl, spec=spec)
            steps += 1
            if pending is not None and consume(*pending):
                pending = None
                break
            pending = (step, tok, fin)
        if pending is not None:
            consume(*pending)
        reasons = np.asarray(state["reason"])
        scores = np.asarray(state["score"])
        t_end = time.perf_counter()
        t_first = t_first or t_end
        return GenerationOutput(
            tokens=tokens, finish_reasons=[_REASONS[int(r)] or FINISH_LENGTH for r in reasons],
            scores=[float(s) for s in scores],
            logits=np.stack([np.asarray(x) for x in step_logits[:max(len(t) for t in tokens)]]) if output_logits
            else None,
            timings=dict(prefill=t_first - t0, decode=t_end - t_first, total=t_end - t0, steps=float(steps)))

    def _beam_search(self, embeds: jax.Array, mask: np.ndarray, cfg: GenerationConfig, rng: Any,
                     penalty_ids: Any) -> GenerationOutput:
        t0 = time.perf_counter()
        batch, k = embeds.shape[0], cfg.num_beams
        spec, values, ctrl, presence = self._setup(cfg, batch, penalty_ids)
        logits, cache = self._prefill(embeds, mask, cfg.max_new_tokens)
        logits = logits[:, -1]
        logits, cache, presence_dev = self._expand_fn(logits, cache, jnp.asarray(presence), num_beams=k)
        logits.block_until_ready()
        t_first = time.perf_counter()

        seq_len = self.cache_length(embeds.shape[1], cfg.max_new_tokens) - embeds.shape[1]
        lp = cfg.length_penalty
        # Length-penalty denominators computed like HF (Python float power, then float32 division).
        len_denom = np.asarray([float(n) ** lp for n in range(1, seq_len + 1)], np.float32)
        heur = (np.full((seq_len,), float(cfg.max_new_tokens) ** lp, np.float32)
                if cfg.early_stopping == "never" and lp > 0 else len_denom)
        # early_stopping is data, not a compile-time switch: "never" only changes the heuristic's denominators.
        ctrl = dict(ctrl, len_denom=len_denom, heur_denom=heur, early_true=np.bool_(cfg.early_stopping is True))
        run_scores = np.zeros((batch, k), np.float32)
        run_scores[:, 1:] = _BEAM_NEG  # only beam 0 is live at first, so the K beams do not start identical
        state: dict[str, Any] = dict(
            logits=logits, key=self._key(rng), step=jnp.int32(0),
            run_seq=jnp.full((batch, k, seq_len), cfg.pad_token_id, jnp.int32), run_scores=jnp.asarray(run_scores),
            recent=jnp.full((batch, k, ctrl["stop_ids"].shape[1]), -1, jnp.int32),
            fin_seq=jnp.full((batch, k, seq_len), cfg.pad_token_id, jnp.int32),
            fin_scores=jnp.full((batch, k), _BEAM_NEG, jnp.float32), fin_len=jnp.zeros((batch, k), jnp.int32),
            fin_reason=jnp.zeros((batch, k), jnp.int32), fin_flag=jnp.zeros((batch, k), jnp.bool_),
            unsatisfied=jnp.ones((batch,), jnp.bool_), done=jnp.bool_(False), presence=presence_dev)
        steps = 0
        for _ in range(cfg.max_new_tokens):
            state, cache = self._beam_step_fn(self.params, cache, state, values, ctrl, spec=spec, num_beams=k,
                                              num_eos=len(cfg.eos_ids))
            steps += 1
            if bool(state["done"]):
                break
        fin_seq, fin_len = np.asarray(state["fin_seq"][:, 0]), np.asarray(state["fin_len"][:, 0])
        t_end = time.perf_counter()
        return GenerationOutput(
            tokens=[fin_seq[b, :fin_len[b]].tolist() for b in range(batch)],
            finish_reasons=[_REASONS[int(r)] or FINISH_LENGTH for r in np.asarray(state["fin_reason"][:, 0])],
            scores=[float(s) for s in np.asarray(state["fin_scores"][:, 0])],
            timings=dict(prefill=t_first - t0, decode=t_end - t_first, total=t_end - t0, steps=float(steps)))


__all__ = [
    "FINISH_EOS",
    "FINISH_LENGTH",
    "FINISH_STOP",
    "GenerationConfig",
    "GenerationConfigError",
    "GenerationError",
    "GenerationInputError",
    "GenerationOutput",
    "Generator",
    "process_logits",
]
