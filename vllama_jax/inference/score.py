"""Scoring on the decode engine: the log-likelihood of given continuations after each prompt (multiple-choice
evaluation; `Generator.score`, `VideoLLaMAChat.score_answers`).

Each prompt is prefilled once, together with the first tokens all its candidates share ("The shape is" of "The
shape is red." / "The shape is blue."); the differing tails then run as one chunk over copies of its KV cache.
Shapes are bucketed (candidates per prompt to a multiple of 2, tail length to a multiple of 4) so that calls with
similar option lists reuse the compiled programs. No logits processor: teacher forcing on the raw logits.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..models.llama import Llama
from .engine import DecodeEngine, round_up
from .generation_config import GenerationInputError


def shared_prefix(seqs: Sequence[np.ndarray]) -> int:
    """Length of the longest common prefix of `seqs`, at most (shortest length - 1)."""
    n = min(len(x) for x in seqs) - 1
    for other in seqs[1:]:
        same = np.flatnonzero(seqs[0][:n] != other[:n])
        n = int(same[0]) if same.size else n
    return max(n, 0)


class Scorer:
    """Candidate scoring over `engine`'s params, prefill and cache (its own jitted step, compiled once per engine)."""

    def __init__(self, engine: DecodeEngine) -> None:
        self.engine = engine
        self._score_fn = jax.jit(self._score_impl)
        self._tail_fn = jax.jit(self._tail_impl)

    def score(self, prompt_embeds: Any, candidates: Sequence[Sequence[Sequence[int]]], attention_mask: Any = None
              ) -> list[np.ndarray]:
        """`Generator.score`: per prompt, the summed log-probability of each candidate (float64 array)."""
        engine = self.engine
        embeds, mask = engine.pack(prompt_embeds, attention_mask)
        rows = self._checked(candidates, embeds.shape[0])
        batch = len(rows)
        shared = [shared_prefix(opts) for opts in rows]  # each candidate keeps >= 1 token of its own
        p = max(shared)
        if p:  # append each row's shared tokens to its prompt, right-aligned (holes are packed away by `pack`)
            pre_ids = np.zeros((batch, p), np.int32)
            pre_mask = np.zeros((batch, p), np.int32)
            for b, (opts, n) in enumerate(zip(rows, shared)):
                pre_ids[b, p - n:], pre_mask[b, p - n:] = opts[0][:n], 1
            pre = engine.embed(pre_ids).astype(embeds.dtype)
            embeds, mask = engine.pack(jnp.concatenate([embeds, pre], axis=1), np.concatenate([mask, pre_mask], 1))
        k = round_up(max(len(r) for r in rows), 2)
        t = round_up(max(c.size - n for r, n in zip(rows, shared) for c in r), 4)
        ids = np.zeros((batch, k, t), np.int32)
        cmask = np.zeros((batch, k, t), np.int32)
        for b, (opts, n) in enumerate(zip(rows, shared)):
            for j, c in enumerate(opts + [opts[0]] * (k - len(opts))):  # padding candidates: copies, dropped
                ids[b, j, :c.size - n], cmask[b, j, :c.size - n] = c[n:], 1
        logits, cache = engine.prefill(embeds, mask, t, last=p + 1)
        tails = np.asarray(self._score_fn(engine.params, logits[:, -1], cache, engine.put_batch(ids),
                                          engine.put_batch(cmask)), np.float64)
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

    def score_shared(self, prefixes: Sequence[Any], group: Sequence[int], tails: Sequence[Any],
                     candidates: Sequence[Sequence[Sequence[int]]]) -> list[np.ndarray]:
        """`score` for prompts that share prefixes: prompt i is ``prefixes[group[i]]`` followed by ``tails[i]``
        (embeddings (P_g, D) and (T_i >= 1, D)). Each prefix is prefilled once; its cache is copied to the prompts
        of its group, which prefill only their tails (one right-padded chunk), then the candidates run as in
        `score`. Several questions about one video pay for the video's context once."""
        engine = self.engine
        rows = self._checked(candidates, len(tails))
        if len(group) != len(tails) or not prefixes or min(group) < 0 or max(group) >= len(prefixes):
            raise GenerationInputError(f"{len(tails)} tails but a group index list of {len(group)} entries "
                                       f"into {len(prefixes)} prefixes")
        tails = [np.asarray(x, np.float32) for x in tails]
        if any(x.ndim != 2 or x.shape[0] == 0 for x in tails):
            raise GenerationInputError("every tail needs at least one position: (T >= 1, D)")
        batch = len(rows)
        k = round_up(max(len(r) for r in rows), 2)
        t = round_up(max(c.size for r in rows for c in r), 4)
        tt = round_up(max(x.shape[0] for x in tails), 4)
        embeds, mask = engine.pack(list(prefixes), None)
        _, cache = engine.prefill(embeds, mask, tt + t)
        tail = np.zeros((batch, tt, tails[0].shape[1]), np.float32)
        tmask = np.zeros((batch, tt), np.int32)
        for b, x in enumerate(tails):
            tail[b, :len(x)], tmask[b, :len(x)] = x, 1
        logits, cache = self._tail_fn(engine.params, cache, engine.put_batch(np.asarray(group, np.int32)),
                                      engine.put_batch(tail.astype(embeds.dtype)), engine.put_batch(tmask))
        ids = np.zeros((batch, k, t), np.int32)
        cmask = np.zeros((batch, k, t), np.int32)
        for b, opts in enumerate(rows):
            for j, c in enumerate(opts + [opts[0]] * (k - len(opts))):
                ids[b, j, :c.size], cmask[b, j, :c.size] = c, 1
        out = np.asarray(self._score_fn(engine.params, logits, cache, engine.put_batch(ids),
                                        engine.put_batch(cmask)), np.float64)
        return [out[b, :len(opts)] for b, opts in enumerate(rows)]

    def _checked(self, candidates: Sequence[Sequence[Sequence[int]]], prompts: int) -> list[list[np.ndarray]]:
        """The candidates as 1-D int arrays, checked (GenerationInputError naming the prompt and candidate)."""
        if len(candidates) != prompts:
            raise GenerationInputError(f"{prompts} prompts but candidates for {len(candidates)}")
        vocab = self.engine.config.vocab_size
        rows = []
        for i, opts in enumerate(candidates):
            opts = [np.asarray(c, np.int64).reshape(-1) for c in opts]
            if not opts:
                raise GenerationInputError(f"prompt {i} has no candidates")
            for j, c in enumerate(opts):
                if c.size == 0:
                    raise GenerationInputError(f"candidate {j} of prompt {i} is empty")
                if c.min() < 0 or c.max() >= vocab:
                    raise GenerationInputError(f"candidate {j} of prompt {i} has ids outside [0, {vocab})")
            rows.append(opts)
        return rows

    # ---- jitted pieces -------------------------------------------------------------------------------------
    def _tail_impl(self, params: Any, cache: Any, group: jax.Array, tail: jax.Array, mask: jax.Array
                   ) -> tuple[jax.Array, Any]:
        """Prefilled prefixes (cache of G rows), each prompt's group (B,) and right-padded tails (B, T, D) ->
        the logits after each prompt's last real tail position (B, V) and the cache of the B prompts."""
        cache = self.engine.constrain_cache(jax.tree_util.tree_map(lambda x: jnp.take(x, group, axis=0), cache))
        last = jnp.sum(mask, axis=1) - 1
        logits, cache = self.engine.module.apply({"params": params}, tail, attention_mask=mask, cache=cache,
                                                 logits_slice=last)
        return logits[:, 0], self.engine.constrain_cache(cache)

    def _score_impl(self, params: Any, logits: jax.Array, cache: Any, ids: jax.Array, mask: jax.Array
                    ) -> jax.Array:
        """Prefilled prompts (last logits (B, V), cache of B rows) and candidates ids/mask (B, K, T), right-padded
        -> (B, K) summed log-probabilities of each candidate's real tokens."""
        b, k, t = ids.shape
        rep = lambda x: jnp.repeat(x, k, axis=0)  # noqa: E731  row b -> rows b*K .. b*K+K-1, as for beams
        cache = self.engine.constrain_cache(jax.tree_util.tree_map(rep, cache))
        flat_ids, flat_mask = ids.reshape(b * k, t), mask.reshape(b * k, t)
        embeds = self.engine.module.apply({"params": params}, flat_ids, method=Llama.embed)
        out, _ = self.engine.module.apply({"params": params}, embeds, attention_mask=flat_mask, cache=cache)
        # token j is predicted by the prompt's last logits (j = 0) or by the candidate's token j - 1
        pred = jnp.concatenate([rep(logits)[:, None], out[:, :-1]], axis=1).astype(jnp.float32)
        logp = jnp.take_along_axis(pred, flat_ids[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(pred, axis=-1)
        return jnp.sum(jnp.where(flat_mask != 0, logp, 0.0), axis=1).reshape(b, k)


__all__ = ["Scorer", "shared_prefix"]
