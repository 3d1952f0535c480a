"""transformers 4.28's `beam_sample` on the decode engine: what upstream's `Chat.answer` runs whenever
num_beams > 1, since it always passes do_sample=True (upstream.md §6.5). `beam.py` is transformers 5's beam search;
`GenerationConfig.beam_semantics` picks one of the two.

Semantics (transformers 4.28 `GenerationMixin.beam_sample` + `BeamSearchScorer`), per step, for each row:
1. log_softmax of the logits -> the logits *processors* (repetition penalty over 4.28's `input_ids`, i.e. the dummy
   BOS and the generated ids) -> + the running beam scores -> the *warpers* (temperature, top-k, top-p) on those
   accumulated scores. The warped scores are the new beam scores (temperature compounds over the steps).
2. All num_beams beams start at score 0 (identical beams; transformers 5 starts beams 1.. at -1e9).
3. 2 * num_beams candidates are drawn without replacement from softmax over the row's num_beams * V warped scores
   (`torch.multinomial`; here Gumbel-top-k, the same distribution), then sorted by score, descending.
4. `BeamSearchScorer.process`: in that order, an EOS candidate among the first num_beams becomes a finished
   hypothesis (its ids *without* the EOS, score / (1 + generated) ** length_penalty, where 1 counts the dummy BOS);
   the first num_beams non-EOS candidates are the next beams. A row is done once it holds num_beams hypotheses and
   (early_stopping or the worst of them >= the best candidate score / (2 + generated) ** length_penalty: the
   length after this step's token).
5. Stop when every row is done, at max_new_tokens, or when upstream's `StoppingCriteriaSub` fires: it checks the
   stop sequences against `input_ids[0]` only, i.e. beam 0 of row 0, and then ends the generation for every row.
6. `finalize`: rows not done add their running beams as hypotheses (score / (1 + steps) ** length_penalty); the
   best hypothesis is returned with EOS appended when shorter than max_new_tokens (also after a stop sequence).

Scores are float32 here; 4.28 divides and compares hypothesis scores as Python floats (float64), which can only
matter for scores equal in float32. A done row's beams are padded as 4.28 pads them, but reordered onto its own
beam 0 (4.28 points them at the batch's flat beam 0; the row's output does not depend on them).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .engine import DecodeEngine, forward_tokens
from .generation_config import GenerationConfig, GenerationOutput, finish_reasons, timings
from .sampling import ProcessorSpec, ProcessorValues, gumbel_top_k, process_scores, stop_sequence_hits, warp_scores

HYP_NONE = -1.0e9  # score of an empty hypothesis slot


class BeamSample428:
    """transformers 4.28's beam sampling over `engine`'s params, prefill and cache (jitted steps, compiled once per
    engine)."""

    def __init__(self, engine: DecodeEngine) -> None:
        self.engine = engine
        self._expand_fn = jax.jit(self._expand_impl, static_argnames=("num_beams",))
        self._step_fn = jax.jit(self._step_impl, static_argnames=("spec", "num_beams", "replay"),
                                donate_argnums=(1,))

    def run(self, embeds: jax.Array, mask: np.ndarray, cfg: GenerationConfig, rng: Any, penalty_ids: Any,
            draws: np.ndarray | None = None, trace: list[dict[str, np.ndarray]] | None = None) -> GenerationOutput:
        """Beam sampling from packed prompts (`engine.pack`) with a resolved config (`engine.resolve`); the best
        hypothesis per row.

        draws: optional (steps, B, 2 * num_beams) flat candidate indices (into a row's num_beams * V scores, in draw
            order) to use instead of drawing: replays a recorded run, e.g. transformers' `torch.multinomial` draws.
        trace: if a list, one dict per step is appended: the warped scores (B * num_beams, V) the draws come from,
            and the scorer's output (`beam_scores`, `beam_tokens`, `beam_indices` (flat B * num_beams rows)).
        """
        t0 = time.perf_counter()
        batch, k = embeds.shape[0], cfg.num_beams
        spec, values, ctrl, presence = self.engine.processors(cfg, batch, penalty_ids)
        presence[:, self.engine.config.bos_token_id] = True  # 4.28's input_ids begin with a dummy BOS
        logits, cache = self.engine.prefill(embeds, mask, cfg.max_new_tokens)
        logits, cache, presence_dev = self._expand_fn(logits[:, -1], cache, jnp.asarray(presence), num_beams=k)
        logits.block_until_ready()
        t_first = time.perf_counter()

        n = cfg.max_new_tokens
        lp = cfg.length_penalty
        # hypothesis length = 4.28's input_ids length: the dummy BOS + generated ids
        ctrl = dict(ctrl, len_denom=np.asarray([float(1 + i) ** lp for i in range(n + 1)], np.float32),
                    early=np.bool_(cfg.early_stopping is True))
        state: dict[str, Any] = dict(
            logits=logits, key=self.engine.key(rng), step=jnp.int32(0), presence=presence_dev,
            run_seq=jnp.full((batch, k, n), cfg.pad_token_id, jnp.int32), run_scores=jnp.zeros((batch, k), jnp.float32),
            recent=jnp.full((batch, k, ctrl["stop_ids"].shape[1]), -1, jnp.int32),
            fin_seq=jnp.full((batch, k, n), cfg.pad_token_id, jnp.int32),
            fin_scores=jnp.full((batch, k), HYP_NONE, jnp.float32), fin_len=jnp.zeros((batch, k), jnp.int32),
            fin_count=jnp.zeros((batch,), jnp.int32), done=jnp.zeros((batch,), jnp.bool_),
            stop_hit=jnp.bool_(False), stop=jnp.bool_(False))
        steps = 0
        for t in range(n):
            replay = draws is not None
            forced = jnp.asarray(draws[t] if replay else np.zeros((batch, 2 * k), np.int32), jnp.int32)
            state, cache, out = self._step_fn(self.engine.params, cache, state, values, ctrl, forced, spec=spec,
                                              num_beams=k, replay=replay)
            steps += 1
            if trace is not None:
                trace.append({name: np.asarray(v) for name, v in out.items()})
            if bool(state["stop"]):
                break
        tokens, reasons, scores = self._finalize(state, steps, cfg)
        t_end = time.perf_counter()
        return GenerationOutput(tokens=tokens, finish_reasons=finish_reasons(np.asarray(reasons)), scores=scores,
                                timings=timings(t0, t_first, t_end, steps))

    # ---- host-side finalize (BeamSearchScorer.finalize) ------------------------------------------------------------
    @staticmethod
    def _finalize(state: dict[str, Any], steps: int, cfg: GenerationConfig
                  ) -> tuple[list[list[int]], list[int], list[float]]:
        k, n, lp = cfg.num_beams, cfg.max_new_tokens, cfg.length_penalty
        done = np.asarray(state["done"])
        fin_scores, fin_seq, fin_len = (np.asarray(state[x]) for x in ("fin_scores", "fin_seq", "fin_len"))
        run_scores, run_seq = np.asarray(state["run_scores"]), np.asarray(state["run_seq"])
        stopped_by_sequence = bool(state["stop_hit"])
        tokens, reasons, scores = [], [], []
        for b in range(done.shape[0]):
            # (score, ids, reason) of the row's hypotheses, in the order they were added
            hyps = [(float(fin_scores[b, i]), fin_seq[b, i, :fin_len[b, i]].tolist(), 1)
                    for i in range(k) if fin_scores[b, i] > HYP_NONE]
            if not done[b]:
                for i in range(k):
                    score = float(run_scores[b, i]) / float(1 + steps) ** lp
                    if len(hyps) < k or score > min(h[0] for h in hyps):
                        hyps.append((score, run_seq[b, i, :steps].tolist(), 2 if stopped_by_sequence else 3))
                        if len(hyps) > k:
                            hyps.pop(min(range(len(hyps)), key=lambda j: hyps[j][0]))
            best = sorted(hyps, key=lambda h: h[0])[-1]  # as 4.28: sorted(...) then pop()
            ids = list(best[1]) + ([cfg.eos_ids[0]] if len(best[1]) < n and cfg.eos_ids else [])
            tokens.append(ids)
            reasons.append(best[2])
            scores.append(best[0])
        return tokens, reasons, scores

    # ---- jitted pieces -------------------------------------------------------------------------------------
    def _expand_impl(self, logits: jax.Array, cache: Any, presence: jax.Array, num_beams: int
                     ) -> tuple[jax.Array, Any, jax.Array]:
        rep = lambda x: jnp.repeat(x, num_beams, axis=0)  # noqa: E731  row b -> rows b*K .. b*K+K-1
        return rep(logits), self.engine.constrain_cache(jax.tree_util.tree_map(rep, cache)), rep(presence)

    def _step_impl(self, params: Any, cache: Any, state: dict[str, Any], values: ProcessorValues,
                   ctrl: dict[str, jax.Array], forced: jax.Array, spec: ProcessorSpec, num_beams: int, replay: bool
                   ) -> tuple[dict[str, Any], Any, dict[str, jax.Array]]:
        k = num_beams
        flat_rows, vocab = state["logits"].shape
        batch = flat_rows // k
        t = state["step"]
        done = state["done"]
        gather = lambda x, i: jnp.take_along_axis(x, i.reshape(i.shape + (1,) * (x.ndim - 2)), axis=1)  # noqa

        # 1. processors on the log-probs, + beam scores, then the warpers on the sum
        logp = jax.nn.log_softmax(state["logits"].astype(jnp.float32), axis=-1)
        processed = process_scores(logp, state["presence"], t, values, dataclasses.replace(spec, do_sample=False))
        warped = warp_scores(processed + state["run_scores"].reshape(flat_rows)[:, None], values, spec)
        row_scores = warped.reshape(batch, k * vocab)

        # 3. 2K draws without replacement (or the given ones), sorted by score descending (stable: draw order)
        key = state["key"]
        if replay:
            idx = forced
        else:
            key, sub = jax.random.split(key)
            idx = gumbel_top_k(sub, row_scores, 2 * k)
        cand, order = jax.lax.top_k(jnp.take_along_axis(row_scores, idx, axis=1), 2 * k)
        idx = jnp.take_along_axis(idx, order, axis=1)
        src, tok = idx // vocab, (idx % vocab).astype(jnp.int32)
        rank = jnp.arange(2 * k)[None, :]

        # 4. the scorer: EOS candidates among the first K -> hypotheses; the first K others -> the next beams
        is_eos = jnp.isin(tok, ctrl["eos"])
        add = is_eos & (rank < k) & ~done[:, None]
        sel = jax.lax.top_k(-jnp.where(is_eos, 2 * k + rank, rank), k)[1]  # first K non-EOS, in rank order
        next_scores = jnp.where(done[:, None], 0.0, gather(cand, sel))
        next_tok = jnp.where(done[:, None], ctrl["pad"], gather(tok, sel))
        next_src = jnp.where(done[:, None], 0, gather(src, sel))

        denom = ctrl["len_denom"][t]
        new_sc = jnp.where(add, cand / denom, HYP_NONE)
        m_scores = jnp.concatenate([state["fin_scores"], new_sc], axis=1)
        midx = jax.lax.top_k(m_scores, k)[1]  # top-K of all added, earlier ones first on ties (4.28's add rule)
        merge = lambda old, new: gather(jnp.concatenate([old, new], axis=1), midx)  # noqa: E731
        fin_scores = gather(m_scores, midx)
        fin_seq = merge(state["fin_seq"], gather(state["run_seq"], src))
        fin_len = merge(state["fin_len"], jnp.full(tok.shape, t, jnp.int32))
        fin_count = jnp.minimum(k, state["fin_count"] + jnp.sum(add, axis=1))
        worst = jnp.min(jnp.where(fin_scores > HYP_NONE, fin_scores, jnp.inf), axis=1)
        # 4.28 divides the best candidate score by the length *after* this step's token (its `cur_len += 1`)
        row_done = (fin_count >= k) & (ctrl["early"] | (worst >= jnp.max(cand, axis=1) / ctrl["len_denom"][t + 1]))
        done = done | row_done

        # reorder the beams (sequences, stop-window, seen ids, cache) to the chosen parents, append the tokens
        seq_len = state["run_seq"].shape[-1]
        run_seq = jnp.where(jnp.arange(seq_len) == t, next_tok[:, :, None], gather(state["run_seq"], next_src))
        recent = jnp.concatenate([gather(state["recent"], next_src)[:, :, 1:], next_tok[:, :, None]], axis=-1)
        beam_idx = (jnp.arange(batch)[:, None] * k + next_src).reshape(flat_rows)
        cache = jax.tree_util.tree_map(lambda x: jnp.take(x, beam_idx, axis=0), cache)
        tok_flat = next_tok.reshape(flat_rows)
        presence = jnp.take(state["presence"], beam_idx, axis=0).at[jnp.arange(flat_rows), tok_flat].set(True)

        # 5. stopping: all rows done, the length limit, or a stop sequence at the end of beam 0 of row 0
        n_gen = t + 1
        stop_hit = stop_sequence_hits(recent[0, 0], n_gen, ctrl["stop_ids"], ctrl["stop_lens"])
        stop = jnp.all(done) | (n_gen >= ctrl["max_new"]) | stop_hit

        new_state = dict(state, key=key, step=t + 1, presence=presence, run_seq=run_seq, run_scores=next_scores,
                         recent=recent, fin_seq=fin_seq, fin_scores=fin_scores, fin_len=fin_len, fin_count=fin_count,
                         done=done, stop_hit=stop_hit & ~jnp.all(done), stop=stop)
        new_state["logits"], cache = self.engine.module.apply({"params": params}, tok_flat, cache,
                                                              method=forward_tokens)
        out = dict(warped=warped, beam_scores=next_scores.reshape(flat_rows), beam_tokens=tok_flat,
                   beam_indices=beam_idx)
        return new_state, self.engine.constrain_cache(cache), out


__all__ = ["BeamSample428"]
