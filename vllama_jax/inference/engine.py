"""The decode engine: one LLaMA decoder and its placed params, packing prompts into compiled shapes, prefill,
and the sampling loop (greedy / top-k / top-p, streamed token by token). Beam search (`beam.py`) and scoring
(`score.py`) run on the same engine; `generate.Generator` is the public API over all three.

Packing: prompts of different lengths are left-padded into one bucket length (`prompt_bucket`: powers of two from
16 up to 512, then multiples of 256) and the KV cache gets `bucket + max_new_tokens` rounded up to a multiple of
64 slots, so a new prompt length or a new `max_new_tokens` reuses a compiled program most of the time. Padding
slots are masked in the cache and real tokens get positions 0..L_b-1 (see `models/llama.py`), so padding never
changes a row's result.

Sampling loop: a jitted step (cache donated, so it is updated in place) processes the logits, picks one token per
row, updates the stop state and runs the decoder on that token. The loop runs on the host so every token can be
streamed as soon as it exists; the next step is dispatched *before* the host reads the previous token, so the
device never waits for the host (at most one wasted step when the batch finishes).
"""

from __future__ import annotations

import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta
from jax.sharding import Mesh

from ..config import LlamaConfig
from ..models.groups import LLM_GROUP
from ..models.llama import Llama, cache_logical_axes, init_cache
from ..models.quant import check_mode, is_quantized, kernel_layout, quantize_params
from ..runtime import HostArena, use_compilation_cache
from ..sharding import batch_sharding, make_mesh, tree_shardings
from ..tree import flatten_params, unflatten_params
from .generation_config import (
    GenerationConfig,
    GenerationConfigError,
    GenerationInputError,
    GenerationOutput,
    StreamCallback,
    finish_reasons,
    timings,
)
from .placement import placed_llm
from .sampling import (
    ProcessorSpec,
    ProcessorValues,
    process_scores,
    processor_setup,
    select_tokens,
    stop_sequence_hits,
    token_logprobs,
)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def forward_tokens(module: Llama, tokens: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
    """One decode step of the decoder (a `Llama.apply` method): tokens (N,) -> next-token logits (N, V), updated
    cache."""
    logits, cache = module(module.embed(tokens[:, None]), cache=cache)
    return logits[:, 0], cache


class DecodeEngine:
    """Prefill + sampling for one LLaMA decoder and its params (built once, reused for many calls).

    model: a `Llama` module (its dtype is the compute dtype) or a `LlamaConfig` (float32 module).
    params: the decoder's params tree (`load_llama(...)[1]`; inside Video-LLaMA: `params["llama"]`), placed
        (`models.place_params`, `load_model_dir`) or host arrays, which are then placed here once
        (`placement.placed_llm`).
    mesh: optional (data, fsdp, tensor) mesh (or its spec string): params live on it by the logical-axis rules
        table, the KV cache by `cache_logical_axes`, prompts are batch-sharded.
    cache_dtype: KV cache dtype (default: the module's compute dtype).
    min_prompt_bucket / cache_multiple: bucketing of compiled shapes (see `prompt_bucket`, `cache_length`).
    compilation_cache: True = `enable_compilation_cache()` unless a JAX cache dir is already configured;
        a path = use that folder; False = leave JAX's settings alone.
    quantize: "int8" = run with the projections and token table in int8 + per-channel scales (`models.quant`),
        quantized here on the host leaf by leaf (params already int8 are taken as they are).
    donate_params: the engine may delete the arrays of `params` it replaces (int8 kernels repacked for the CPU
        kernel), so that at most one extra leaf is held; the caller must not use them afterwards.
    huge_pages: on one CPU device, with `donate_params`, every donated array moves into 2 MiB pages
        (`runtime.HostArena`; two leaves' extra memory at a time, ~1 s per GB on this project's host). Host arrays
        placed here, and the packed int8 kernels (copies made here anyway), land there without it.
    """

    def __init__(self, model: Llama | LlamaConfig, params: Any, *, mesh: Mesh | str | None = None,
                 cache_dtype: Any = None, min_prompt_bucket: int = 16, cache_multiple: int = 64,
                 compilation_cache: bool | str | os.PathLike = True, quantize: str | None = None,
                 donate_params: bool = False, huge_pages: bool = False) -> None:
        if isinstance(model, LlamaConfig):
            model = Llama(model)
        if not isinstance(model, Llama):
            raise GenerationInputError(f"model must be a Llama module or a LlamaConfig, got {type(model).__name__}")
        use_compilation_cache(compilation_cache)
        self.module = model
        self.config: LlamaConfig = model.config
        self.mesh = make_mesh(mesh) if isinstance(mesh, str) else mesh
        self.cache_dtype = jnp.dtype(cache_dtype if cache_dtype is not None else model.dtype)
        self.min_prompt_bucket = int(min_prompt_bucket)
        self.cache_multiple = int(cache_multiple)
        self._params = self._placed(params, quantize=quantize, donate=donate_params, huge_pages=huge_pages)

        self._embed_fn = jax.jit(self._embed_impl)
        self._prefill_fn = jax.jit(self._prefill_impl, static_argnames=("cache_length", "last"))
        self._sample_step_fn = jax.jit(self._sample_step_impl, static_argnames=("spec",), donate_argnums=(1,))

    @property
    def params(self) -> Any:
        """The decoder's params as the compiled programs take them: placed, and on one CPU device with the FFI
        kernel the int8 projections in its packed layout (`models.quant.kernel_layout`)."""
        return self._params

    @params.setter
    def params(self, value: Any) -> None:
        """New values of the same params (e.g. a training run's); the arrays given stay the caller's."""
        self._params = self._placed(value)

    def _placed(self, params: Any, quantize: str | None = None, donate: bool = False, huge_pages: bool = False
                ) -> Any:
        params = meta.unbox(params)  # `Module.init`'s axis-metadata boxes
        given = {id(x) for x in jax.tree_util.tree_leaves(params)}
        if check_mode(quantize) and not is_quantized(params):
            params = quantize_params({LLM_GROUP: params}, quantize)[LLM_GROUP]
        params = placed_llm(self.config, params, self.mesh)  # host arrays: placed in huge pages already
        if self.mesh is not None:
            return params
        # The packed int8 kernels are a copy made here anyway: written straight into huge pages. Arrays made here
        # (quantized, placed) or donated are deleted as soon as their packed form exists.
        arena = HostArena()
        params = kernel_layout(params, release=lambda w: donate or id(w) not in given, arena=arena)
        if not (huge_pages and donate):
            return params
        # the donated device arrays still in XLA's buffers move, two at a time (copies and page faults overlap)
        flat = flatten_params(params)
        moving = [p for p, w in flat.items() if id(w) in given and isinstance(w, jax.Array)]
        with ThreadPoolExecutor(2) as pool:
            flat.update(zip(moving, pool.map(arena.move, [flat[p] for p in moving])))
        return unflatten_params(flat)

    # ---- shapes --------------------------------------------------------------------------------------------
    def prompt_bucket(self, length: int) -> int:
        """Compiled prompt length for a longest prompt of `length`: powers of two from `min_prompt_bucket` to 512
        (at most 2x padding while prompts are short and cheap), then multiples of 256."""
        if length <= 512:
            return max(self.min_prompt_bucket, 1 << max(0, length - 1).bit_length())
        return round_up(length, 256)

    def cache_length(self, bucket: int, max_new_tokens: int) -> int:
        """KV cache slots: the prompt bucket + max_new_tokens, rounded up to `cache_multiple`."""
        return round_up(bucket + max_new_tokens, self.cache_multiple)

    # ---- placement of batches and caches --------------------------------------------------------------------
    def constrain_cache(self, cache: Any) -> Any:
        """Pin the cache to its rules-table sharding (so the donated buffer keeps one layout across steps)."""
        if self.mesh is None:
            return cache
        shardings = tree_shardings(cache, cache_logical_axes(self.config), self.mesh)
        return jax.tree_util.tree_map(jax.lax.with_sharding_constraint, cache, shardings)

    def put_batch(self, x: Any) -> jax.Array:
        """A batch-major array onto the devices (sharded over the batch axes of the mesh)."""
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
        cache = self.constrain_cache(init_cache(self.config, embeds.shape[0], cache_length, self.cache_dtype))
        # Left padding puts every row's last real token in the last column.
        logits, cache = self.module.apply({"params": params}, embeds, attention_mask=mask, cache=cache,
                                          logits_slice=slice(-last, None))
        return logits, self.constrain_cache(cache)

    def _sample_step_impl(self, params: Any, cache: Any, state: dict[str, Any], values: ProcessorValues,
                          ctrl: dict[str, jax.Array], spec: ProcessorSpec
                          ) -> tuple[jax.Array, jax.Array, dict[str, Any], Any]:
        logits, finished = state["logits"], state["finished"]
        batch = logits.shape[0]
        scores = process_scores(logits, state["presence"], state["n_gen"], values, spec)
        key, sub = jax.random.split(state["key"])
        tokens = select_tokens(scores, sub, spec.do_sample)
        tokens = jnp.where(finished, ctrl["pad"], tokens)  # HF: finished rows emit pad

        logp = token_logprobs(logits, tokens)
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
                                                       method=forward_tokens)
        return tokens, new_state["finished"], new_state, self.constrain_cache(cache)

    # ---- input handling ------------------------------------------------------------------------------------
    def embed(self, ids: Any) -> jax.Array:
        """Token ids (L,) or (B, L) -> embeddings of the same leading shape + (D,), with this model's table."""
        arr = np.asarray(ids, np.int32)
        if arr.ndim not in (1, 2):
            raise GenerationInputError(f"ids must be 1-D or 2-D, got shape {arr.shape}")
        out = self._embed_fn(self.params, jnp.asarray(arr.reshape(1, -1) if arr.ndim == 1 else arr))
        return out[0] if arr.ndim == 1 else out

    def pack(self, prompt_embeds: Any, attention_mask: Any) -> tuple[jax.Array, np.ndarray]:
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

    def resolve(self, config: GenerationConfig | None) -> GenerationConfig:
        """`config` (default `GenerationConfig()`) with the model's EOS / pad ids filled in where unset."""
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

    def controls(self, cfg: GenerationConfig) -> dict[str, np.ndarray]:
        """Stop-rule arrays, padded to multiples of 4 (-1 ids / 0 lengths never match) so that a different EOS
        or stop list usually reuses the compiled step."""
        stops = cfg.stop_sequences
        width = round_up(max([1] + [len(s) for s in stops]), 4)
        stop_ids = np.full((round_up(max(1, len(stops)), 4), width), -1, np.int32)
        stop_lens = np.zeros((stop_ids.shape[0],), np.int32)
        for i, s in enumerate(stops):
            stop_ids[i, width - len(s):] = s
            stop_lens[i] = len(s)
        eos = np.full((round_up(max(1, len(cfg.eos_ids)), 4),), -1, np.int32)
        eos[:len(cfg.eos_ids)] = cfg.eos_ids
        return dict(eos=eos, stop_ids=stop_ids, stop_lens=stop_lens, max_new=np.int32(cfg.max_new_tokens),
                    pad=np.int32(cfg.pad_token_id))

    @staticmethod
    def key(rng: Any) -> jax.Array:
        """A `jax.random` key from a key, an int seed or None (a fresh random seed)."""
        if rng is None:  # like HF's global RNG: a fresh draw per call; pass a key for reproducibility
            return jax.random.PRNGKey(secrets.randbits(31))
        if isinstance(rng, (int, np.integer)):
            return jax.random.PRNGKey(int(rng))
        return rng

    # ---- prefill and the sampling loop ---------------------------------------------------------------------
    def prefill(self, embeds: jax.Array, mask: np.ndarray, new_tokens: int, last: int = 1
                ) -> tuple[jax.Array, Any]:
        """The logits of the prompts' last `last` positions (B, last, V) and a cache with room for `new_tokens`
        more."""
        cache_length = self.cache_length(embeds.shape[1], new_tokens)
        return self._prefill_fn(self.params, self.put_batch(embeds), self.put_batch(mask), cache_length=cache_length,
                                last=last)

    def processors(self, cfg: GenerationConfig, batch: int, penalty_ids: Any
                   ) -> tuple[ProcessorSpec, ProcessorValues, dict[str, np.ndarray], np.ndarray]:
        """(processing spec, values, stop controls, (B, V) presence) of a resolved config for a batch."""
        spec, values, presence = processor_setup(cfg, batch, self.config.vocab_size, penalty_ids)
        return spec, values, self.controls(cfg), presence

    def sample(self, embeds: jax.Array, mask: np.ndarray, cfg: GenerationConfig, rng: Any,
               stream: StreamCallback | None, penalty_ids: Any, output_logits: bool) -> GenerationOutput:
        """Greedy / sampled decoding of packed prompts (`pack`) with a resolved config (`resolve`)."""
        t0 = time.perf_counter()
        batch = embeds.shape[0]
        spec, values, ctrl, presence = self.processors(cfg, batch, penalty_ids)
        logits, cache = self.prefill(embeds, mask, cfg.max_new_tokens)
        logits = logits[:, -1]
        state: dict[str, Any] = dict(
            logits=logits, key=self.key(rng), score=jnp.zeros((batch,), jnp.float32),
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
        scores = np.asarray(state["score"])
        t_end = time.perf_counter()
        return GenerationOutput(
            tokens=tokens, finish_reasons=finish_reasons(state["reason"]), scores=[float(s) for s in scores],
            logits=np.stack([np.asarray(x) for x in step_logits[:max(len(t) for t in tokens)]]) if output_logits
            else None,
            timings=timings(t0, t_first or t_end, t_end, steps))


__all__ = ["DecodeEngine", "forward_tokens", "round_up"]
