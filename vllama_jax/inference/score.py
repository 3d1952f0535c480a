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

    def score(self, prompt_embeds: Any, candidates: Sequence[Sequence[Sequence[int]]], attention_mask: Any = None
              ) -> list[np.ndarray]:
        """`Generator.score`: per prompt, the summed log-probability of each candidate (float64 array)."""
        engine = self.engine
        embeds, mask = engine.pack(prompt_embeds, attention_mask)
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
                if c.min() < 0 or c.max() >= engine.config.vocab_size:
                    raise GenerationInputError(f"candidate {j} of prompt {i} has ids outside "
                                               f"[0, {engine.config.vocab_size})")
            rows.append(opts)
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

    # ---- jitted pieces -------------------------------------------------------------------------------------
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
