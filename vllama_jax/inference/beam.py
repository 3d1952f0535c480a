"""Beam search on the decode engine: transformers' vectorised beam search (`GenerationMixin._beam_search`, 5.x),
for every row of the batch at once, as one jitted step over B * num_beams rows that reorders the KV cache by
gather.

Semantics (HF): the length penalty divides by the generated length including the EOS token; `early_stopping`
True / False / "never"; max(2, 1 + n_eos) * num_beams candidates per step, so that num_beams unfinished ones
survive; beam *sampling* when do_sample draws those candidates without replacement (Gumbel-top-k). transformers
4.28's `BeamSearchScorer` (upstream) scored a hypothesis by its full `input_ids` length — [dummy BOS] + generated
ids, EOS not counted — which gives the same denominator for EOS-finished hypotheses but 1 + max_new_tokens
instead of max_new_tokens for the ones cut by the length limit, so with length_penalty != 0 rankings between the
two kinds can differ from upstream's in rare cases.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .engine import DecodeEngine, forward_tokens
from .generation_config import GenerationConfig, GenerationOutput, finish_reasons, timings
from .sampling import ProcessorSpec, ProcessorValues, gumbel_top_k, process_scores, stop_sequence_hits

BEAM_NEG = -1.0e9  # HF's "very large negative" used to disable beams / hypotheses


class BeamSearch:
    """Beam search over `engine`'s params, prefill and cache (its own jitted steps, compiled once per engine)."""

    def __init__(self, engine: DecodeEngine) -> None:
        self.engine = engine
        self._expand_fn = jax.jit(self._expand_impl, static_argnames=("num_beams",))
        self._beam_step_fn = jax.jit(self._beam_step_impl, static_argnames=("spec", "num_beams", "num_eos"),
                                     donate_argnums=(1,))

    def run(self, embeds: jax.Array, mask: np.ndarray, cfg: GenerationConfig, rng: Any, penalty_ids: Any
            ) -> GenerationOutput:
        """Beam search from packed prompts (`engine.pack`) with a resolved config (`engine.resolve`); the best
        hypothesis per row."""
        t0 = time.perf_counter()
        batch, k = embeds.shape[0], cfg.num_beams
        spec, values, ctrl, presence = self.engine.processors(cfg, batch, penalty_ids)
        logits, cache = self.engine.prefill(embeds, mask, cfg.max_new_tokens)
        logits = logits[:, -1]
        logits, cache, presence_dev = self._expand_fn(logits, cache, jnp.asarray(presence), num_beams=k)
        logits.block_until_ready()
        t_first = time.perf_counter()

        seq_len = self.engine.cache_length(embeds.shape[1], cfg.max_new_tokens) - embeds.shape[1]
        lp = cfg.length_penalty
        # Length-penalty denominators computed like HF (Python float power, then float32 division).
        len_denom = np.asarray([float(n) ** lp for n in range(1, seq_len + 1)], np.float32)
        heur = (np.full((seq_len,), float(cfg.max_new_tokens) ** lp, np.float32)
                if cfg.early_stopping == "never" and lp > 0 else len_denom)
        # early_stopping is data, not a compile-time switch: "never" only changes the heuristic's denominators.
        ctrl = dict(ctrl, len_denom=len_denom, heur_denom=heur, early_true=np.bool_(cfg.early_stopping is True))
        run_scores = np.zeros((batch, k), np.float32)
        run_scores[:, 1:] = BEAM_NEG  # only beam 0 is live at first, so the K beams do not start identical
        state: dict[str, Any] = dict(
            logits=logits, key=self.engine.key(rng), step=jnp.int32(0),
            run_seq=jnp.full((batch, k, seq_len), cfg.pad_token_id, jnp.int32), run_scores=jnp.asarray(run_scores),
            recent=jnp.full((batch, k, ctrl["stop_ids"].shape[1]), -1, jnp.int32),
            fin_seq=jnp.full((batch, k, seq_len), cfg.pad_token_id, jnp.int32),
            fin_scores=jnp.full((batch, k), BEAM_NEG, jnp.float32), fin_len=jnp.zeros((batch, k), jnp.int32),
            fin_reason=jnp.zeros((batch, k), jnp.int32), fin_flag=jnp.zeros((batch, k), jnp.bool_),
            unsatisfied=jnp.ones((batch,), jnp.bool_), done=jnp.bool_(False), presence=presence_dev)
        steps = 0
        for _ in range(cfg.max_new_tokens):
            state, cache = self._beam_step_fn(self.engine.params, cache, state, values, ctrl, spec=spec, num_beams=k,
                                              num_eos=len(cfg.eos_ids))
            steps += 1
            if bool(state["done"]):
                break
        fin_seq, fin_len = np.asarray(state["fin_seq"][:, 0]), np.asarray(state["fin_len"][:, 0])
        t_end = time.perf_counter()
        return GenerationOutput(
            tokens=[fin_seq[b, :fin_len[b]].tolist() for b in range(batch)],
            finish_reasons=finish_reasons(state["fin_reason"][:, 0]),
            scores=[float(s) for s in np.asarray(state["fin_scores"][:, 0])],
            timings=timings(t0, t_first, t_end, steps))

    # ---- jitted pieces -------------------------------------------------------------------------------------
    def _expand_impl(self, logits: jax.Array, cache: Any, presence: jax.Array, num_beams: int
                     ) -> tuple[jax.Array, Any, jax.Array]:
        # HF expands the prompt to B * num_beams rows before prefill; repeating the prefilled cache is the same.
        rep = lambda x: jnp.repeat(x, num_beams, axis=0)  # noqa: E731  row b -> rows b*K .. b*K+K-1
        return rep(logits), self.engine.constrain_cache(jax.tree_util.tree_map(rep, cache)), rep(presence)

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
        run_lp = cand_lp + hits.astype(jnp.float32) * BEAM_NEG
        nidx = jax.lax.top_k(run_lp, k)[1]
        run_seq, run_scores = gather(cand_seq, nidx), gather(run_lp, nidx)
        run_recent, run_src, run_tok = gather(cand_recent, nidx), gather(src, nidx), gather(tok, nidx)

        # (f) finished hypotheses: only among the top num_beams candidates, length-penalised, best num_beams kept
        just = hits & (jnp.arange(keep) < k)[None, :]
        fin_flag = state["fin_flag"]
        sc = cand_lp / ctrl["len_denom"][t]
        # early_stopping=True: no more hypotheses once num_beams are finished
        sc = sc + (jnp.all(fin_flag, axis=1, keepdims=True) & ctrl["early_true"]).astype(jnp.float32) * BEAM_NEG
        sc = sc + (~state["unsatisfied"])[:, None].astype(jnp.float32) * BEAM_NEG
        sc = sc + (~just).astype(jnp.float32) * BEAM_NEG
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
        worst_fin = jnp.where(fin_flag, jnp.min(fin_scores, axis=1, keepdims=True), BEAM_NEG)
        unsatisfied = state["unsatisfied"] & jnp.any(best_running > worst_fin, axis=1)
        open_beam = ~(jnp.all(fin_flag) & ctrl["early_true"])
        done = ~(jnp.any(unsatisfied) & open_beam & ~jnp.all(hits))

        new_state = dict(state, presence=presence, key=key, step=t + 1, run_seq=run_seq, run_scores=run_scores,
                         recent=run_recent, fin_seq=fin_seq, fin_scores=fin_scores, fin_len=fin_len,
                         fin_reason=fin_reason, fin_flag=fin_flag, unsatisfied=unsatisfied, done=done)
        new_state["logits"], cache = self.engine.module.apply({"params": params}, run_tok_flat, cache,
                                                       method=forward_tokens)
        return new_state, self.engine.constrain_cache(cache)


__all__ = ["BEAM_NEG", "BeamSearch"]
