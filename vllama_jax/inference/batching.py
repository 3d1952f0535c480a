"""Continuous batching on a `DecodeEngine`: a running decode batch whose rows (slots) are filled and freed one request
at a time, plus a cache of prefilled prompt prefixes. The server (`vllama_jax.serve`) drives it from one thread.

Layout: one batched KV cache of `rows` x S slots (`models.llama.init_cache`); each row has its own write index,
valid mask and next position, so a row can be overwritten by a new request while the others keep decoding. A
request is prefilled on its own (batch 1; several short pieces on top of kept prefixes, such as questions about
media already prefilled, share one call: `prefill_many`) into a cache just long enough for its prompt and its new
tokens (a slot bucket: powers of two times the engine's `cache_multiple`, up to `slot_length`), and its cache row
and sampling state are copied into a free row (`insert`); every `step` decodes one token for all rows; a finished
or cancelled row is simply forgotten (`release`) and its slots are overwritten by the next insert. Both sizes follow
the load in a few compiled shapes: the rows (1, 2, 4, 8, 12, 16, 24, ..., `max_batch`) grow when a request finds no
free row and are compacted when at most a quarter of them is in use (as soon as a smaller bucket holds them, when
nothing waits to join), so one client does not pay for 32 rows; the slots S are the largest bucket a running row
needs, so short requests do not pay for `slot_length` (every step reads all S slots of every row: at 32 rows the
attention over 512 slots cost 3x the step's matmuls). `warm_up` compiles every (rows, slots) shape before the first
request.

Sampling is per row (temperature, top-p, greedy or not, max new tokens, an own `jax.random` key derived from the
request's seed, so a seeded request draws the same tokens whatever else is in the batch); top-k is one value for
the whole batch (a compile-time shape). That is why the step is its own jitted function here rather than
`DecodeEngine`'s, whose processing values are one scalar per call. The processors themselves are the engine's
(`sampling.process_scores`, `select_tokens`, `stop_sequence_hits`).

Prefix cache: the prefilled cache of a prompt prefix (system prompt + media block, or a whole earlier prompt of a
conversation) is kept, keyed by a hash of the prefix's items (token ids and media content hashes); a request whose
prompt starts with a stored prefix copies that cache and prefills only its remaining positions on top of it
(`Llama` attends to the cached slots, positions continue from the prefix). Entries are evicted least recently used.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..models.llama import resize_cache
from .engine import DecodeEngine, forward_tokens, round_up
from .generation_config import FINISH_CODES, GenerationConfig, GenerationInputError
from .sampling import ProcessorSpec, ProcessorValues, process_scores, select_tokens, stop_sequence_hits

#: one item of a prompt for prefix matching: a token id, or (media content hash, number of embedding rows)
PromptItem = int | tuple[str, int]


class ContextTooLong(GenerationInputError):
    """A prompt (plus the tokens asked for) does not fit in a slot of the running batch."""


@dataclass
class RowRequest:
    """What one row of the batch decodes: the prompt as embeddings with its items (for the prefix cache) and the
    per-row sampling settings."""

    embeds: np.ndarray  # (L, D)
    items: Sequence[PromptItem]  # len(items) positions in total: ints count 1, media tuples their row count
    max_new_tokens: int
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    #: item counts after which the prefilled prefix is worth keeping (e.g. the end of the media block)
    cache_points: Sequence[int] = ()


@dataclass
class Prefilled:
    """A prefilled request ready to be inserted (the cache row and the sampling state of one row)."""

    row: dict[str, Any]
    prompt_tokens: int
    prefilled_tokens: int  # positions actually computed (the rest came from the prefix cache)
    prefix_hit: bool


#: a prefill of at most this many positions on top of a kept prefix can share one call with others (`prefill_many`)
GROUP_CHUNK = 32


@dataclass
class _PrefixEntry:
    cache: Any  # a (1, slot_length) cache holding the prefix
    positions: int  # real positions in it


@dataclass
class _Plan:
    """A checked request and where its prefill starts: the kept prefix (or None) and the item counts to stop at
    (its cache points after the prefix, then its end)."""

    req: RowRequest
    embeds: np.ndarray
    digests: list[bytes]
    starts: np.ndarray  # starts[k]: the embedding row where item k starts
    entry: _PrefixEntry | None
    cuts: list[int]

    @property
    def total(self) -> int:
        return int(self.embeds.shape[0])

    @property
    def done(self) -> int:
        return 0 if self.entry is None else self.entry.positions


def item_positions(item: PromptItem) -> int:
    return 1 if isinstance(item, (int, np.integer)) else int(item[1])


def prefix_digests(items: Sequence[PromptItem]) -> list[bytes]:
    """digests[k] identifies items[:k] (k = 0..len); a chained hash, so all prefixes cost one pass."""
    h = hashlib.sha256(b"prompt")
    out = [h.digest()]
    for it in items:
        h = h.copy()
        h.update(repr(int(it) if isinstance(it, (int, np.integer)) else tuple(it)).encode())
        out.append(h.digest())
    return out


def slot_buckets(slot_length: int, multiple: int) -> tuple[int, ...]:
    """KV slot counts a row's cache is sized to: `multiple` times powers of two below slot_length, then
    slot_length."""
    sizes, n = [], multiple
    while n < slot_length:
        sizes.append(n)
        n *= 2
    return tuple(sizes) + (slot_length,)


def row_buckets(max_batch: int) -> tuple[int, ...]:
    """Compiled batch sizes: 1, 2, 4, 8, then 1.5x and 2x apart by turns (12, 16, 24, 32, 48, ...), then
    max_batch. Up to about 8 rows a CPU step costs what one row does (it reads every weight once either way); from
    there its cost grows with the rows, so a draining batch should not step many more rows than it runs."""
    sizes, n = [], 1
    while n < max_batch:
        sizes.append(n)
        n = n * 2 if n < 8 else n * 3 // 2 if n & (n - 1) == 0 else n * 4 // 3
    return tuple(sizes) + (max_batch,)


class ContinuousBatcher:
    """The running batch of one `DecodeEngine` (see the module docstring). Not thread-safe: one thread drives it.

    config: the base `GenerationConfig` (resolved by the engine: EOS, pad; the stop sequences of the chat
        template); per-row settings come with each `RowRequest`. top_k: for sampled rows (0 = off).
    slot_length: KV slots per row (prompt, padded to compiled shapes, + new tokens); a multiple of the engine's
        `cache_multiple`. prefix_cache_size: prefixes kept (each is one (1, slot_length) cache).
    max_group: the most short prefills `prefill_many` runs as one call (1: each on its own).
    """

    def __init__(self, engine: DecodeEngine, config: GenerationConfig, *, max_batch: int = 32,
                 slot_length: int = 1024, top_k: int = 0, prefix_cache_size: int = 16, max_group: int = 4) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.engine = engine
        self.config = engine.resolve(config)
        self.slot_length = round_up(int(slot_length), engine.cache_multiple)
        self.max_batch = int(max_batch)
        self.buckets = row_buckets(self.max_batch)
        self.slot_buckets = slot_buckets(self.slot_length, engine.cache_multiple)
        self.group_buckets = tuple(b for b in row_buckets(max(1, int(max_group))) if b > 1)  # empty: no groups
        self.spec = ProcessorSpec(do_sample=True, top_k=int(top_k), use_top_p=True)
        self.ctrl = {k: jnp.asarray(v) for k, v in engine.controls(self.config).items() if k != "max_new"}
        self.prefix_cache_size = int(prefix_cache_size)
        self.prefixes: OrderedDict[bytes, _PrefixEntry] = OrderedDict()
        self.rows: list[Any] = []  # per row: the owner's handle, or None when free
        self.row_slots: list[int] = []  # per row: the KV slots its request needs (its cache's bucket)
        self.cache: Any = None
        self.state: dict[str, Any] | None = None
        self._step_fn = jax.jit(self._step_impl, static_argnames=("spec",), donate_argnums=(1, 2))
        self._extend_fn = jax.jit(self._extend_impl)
        self._extend_group_fn = jax.jit(self._extend_group_impl)
        self._set_row_fn = jax.jit(_set_row, donate_argnums=(0,))
        self._take_rows_fn = jax.jit(_take_rows)  # a new shape: nothing to donate into
        self._fit_slots_fn = jax.jit(resize_cache, static_argnums=(1,))

    # ---- jitted pieces ---------------------------------------------------------------------------------------
    def _extend_impl(self, params: Any, cache: Any, embeds: jax.Array, mask: jax.Array) -> tuple[jax.Array, Any]:
        """Prefill `embeds` (1, L, D) on top of a cache that holds a prefix (not donated: the prefix is kept)."""
        logits, cache = self.engine.module.apply({"params": params}, embeds, attention_mask=mask, cache=cache,
                                                 logits_slice=slice(-1, None))
        return logits[:, -1], self.engine.constrain_cache(cache)

    def _extend_group_impl(self, params: Any, caches: tuple[Any, ...], embeds: jax.Array, mask: jax.Array
                           ) -> tuple[jax.Array, tuple[Any, ...]]:
        """Prefill `embeds` (G, L, D) on top of G one-row prefix caches (of one slot count) side by side; returns
        the last logits (G, V) and the G one-row caches."""
        cache = jax.tree_util.tree_map(lambda *rows: jnp.concatenate(rows, 0), *caches)
        logits, cache = self._extend_impl(params, cache, embeds, mask)
        rows = tuple(self.engine.constrain_cache(jax.tree_util.tree_map(lambda b: b[r:r + 1], cache))
                     for r in range(len(caches)))
        return logits, rows

    def _step_impl(self, params: Any, cache: Any, state: dict[str, Any], ctrl: dict[str, jax.Array],
                   spec: ProcessorSpec) -> tuple[jax.Array, jax.Array, dict[str, Any], Any]:
        logits = state["logits"]
        values = ProcessorValues(temperature=state["temperature"][:, None], top_p=state["top_p"][:, None],
                                 repetition_penalty=jnp.float32(1.0), min_new_tokens=jnp.int32(0),
                                 suppress=jnp.zeros((logits.shape[-1],), jnp.bool_))
        greedy_tokens = select_tokens(process_scores(logits, None, state["n_gen"], values, ProcessorSpec()), None,
                                      False)
        keys = jax.vmap(jax.random.split)(state["key"])  # (B, 2, 2): the next key, this step's key

        def sample(_: Any) -> jax.Array:
            scores = process_scores(logits, None, state["n_gen"], values, spec)
            sampled = jax.vmap(lambda k, s: select_tokens(s[None], k, True)[0])(keys[:, 1], scores)
            return jnp.where(state["greedy"], greedy_tokens, sampled)

        # top-k / top-p and the draws cost a sort and a (B, V) of random bits: skipped when every row is greedy
        tokens = jax.lax.cond(jnp.all(state["greedy"]), lambda _: greedy_tokens, sample, None)
        n_gen = state["n_gen"] + 1
        recent = jnp.concatenate([state["recent"][:, 1:], tokens[:, None]], axis=1)
        is_eos = jnp.isin(tokens, ctrl["eos"])
        is_stop = stop_sequence_hits(recent, n_gen, ctrl["stop_ids"], ctrl["stop_lens"])
        is_len = n_gen >= state["max_new"]
        code = jnp.where(is_eos, 1, jnp.where(is_stop, 2, jnp.where(is_len, 3, 0))).astype(jnp.int32)
        new_state = dict(state, key=keys[:, 0], n_gen=n_gen, recent=recent)
        new_state["logits"], cache = self.engine.module.apply({"params": params}, tokens, cache,
                                                              method=forward_tokens)
        return tokens, code, new_state, self.engine.constrain_cache(cache)

    # ---- prefill ---------------------------------------------------------------------------------------------
    def _pack(self, embeds: np.ndarray) -> tuple[jax.Array, np.ndarray]:
        return self.engine.pack([np.asarray(embeds)], None)

    def _store_prefix(self, digest: bytes, cache: Any, positions: int) -> None:
        if self.prefix_cache_size <= 0:
            return
        self.prefixes[digest] = _PrefixEntry(cache, positions)
        self.prefixes.move_to_end(digest)
        while len(self.prefixes) > self.prefix_cache_size:
            self.prefixes.popitem(last=False)

    def _lookup(self, digests: list[bytes]) -> tuple[int, _PrefixEntry | None]:
        """The longest stored prefix that leaves at least one item to prefill: (its item count, entry)."""
        for k in range(len(digests) - 2, 0, -1):
            entry = self.prefixes.get(digests[k])
            if entry is not None:
                self.prefixes.move_to_end(digests[k])
                return k, entry
        return 0, None

    def _fits(self, used_slots: int, max_new: int, prompt_tokens: int) -> None:
        if used_slots + max_new > self.slot_length:
            raise ContextTooLong(
                f"the prompt has {prompt_tokens} positions (using {used_slots} cache slots with the padding of "
                f"compiled shapes) and {max_new} new tokens were asked for: more than the {self.slot_length} slots "
                "of the server's context (--max-context)")

    def _plan(self, req: RowRequest) -> _Plan:
        """Check a request and find the longest kept prefix it starts with; raises `GenerationInputError`."""
        embeds = np.asarray(req.embeds, np.float32)
        total = embeds.shape[0]
        if sum(item_positions(i) for i in req.items) != total:
            raise GenerationInputError("the prompt items do not add up to the embedding rows")
        if req.max_new_tokens < 1:
            raise GenerationInputError(f"max_new_tokens must be >= 1, got {req.max_new_tokens}")
        digests = prefix_digests(req.items)
        starts = np.cumsum([0] + [item_positions(i) for i in req.items])  # embedding row where item k starts
        hit_items, entry = self._lookup(digests)
        points = sorted(k for k in set(req.cache_points) if hit_items < k < len(req.items))
        return _Plan(req, embeds, digests, starts, entry, points + [len(req.items)])

    def _groupable(self, plan: _Plan) -> bool:
        """A short piece on top of a kept prefix, with no cache point inside: it can share a call with others."""
        return plan.entry is not None and len(plan.cuts) == 1 and plan.total - plan.done <= GROUP_CHUNK

    def prefill(self, req: RowRequest) -> Prefilled:
        """Prefill one request, reusing and extending the prefix cache; raises `ContextTooLong`."""
        return self._prefill_plan(self._plan(req))

    def _prefill_plan(self, plan: _Plan) -> Prefilled:
        req, embeds, done = plan.req, plan.embeds, plan.done
        cache = None if plan.entry is None else plan.entry.cache
        index = 0 if cache is None else _index(cache)
        chunks = []  # (rows, packed, mask): the prompt's pieces as they are prefilled, padded to compiled shapes
        for k in plan.cuts:
            rows = int(plan.starts[k])
            chunks.append((rows, *self._pack(embeds[done if not chunks else chunks[-1][0]:rows])))
        used = index + sum(p.shape[1] for _, p, _ in chunks)
        self._fits(used, req.max_new_tokens, plan.total)
        slots = next(n for n in self.slot_buckets if n >= used + req.max_new_tokens)
        if cache is not None and _slots(cache) < slots:
            cache = self._fit_slots_fn(cache, slots)  # a longer copy: the stored prefix keeps its own
        prefilled = 0
        logits = None
        # prefill up to each cache point (storing it), then the rest
        for k, (rows, packed, mask) in zip(plan.cuts, chunks):
            if cache is None:
                logits, cache = self.engine.prefill(packed, mask, slots - packed.shape[1])
                logits = logits[:, -1]
            else:
                logits, cache = self._extend_fn(self.engine.params, cache, self.engine.put_batch(packed),
                                                self.engine.put_batch(mask))
            prefilled += rows - done
            done = rows
            if k in req.cache_points:
                self._store_prefix(plan.digests[k], cache, rows)
        return self._prefilled(req, cache, logits, prefilled, plan.entry is not None)

    def _prefilled(self, req: RowRequest, cache: Any, logits: jax.Array, prefilled: int, hit: bool) -> Prefilled:
        row = dict(
            cache=cache,
            logits=logits, key=jnp.asarray(self.engine.key(req.seed))[None], n_gen=jnp.zeros((1,), jnp.int32),
            recent=jnp.full((1, self.ctrl["stop_ids"].shape[1]), -1, jnp.int32),
            greedy=jnp.asarray([bool(req.greedy)]), temperature=jnp.asarray([max(req.temperature, 1e-6)], jnp.float32),
            top_p=jnp.asarray([req.top_p], jnp.float32), max_new=jnp.asarray([req.max_new_tokens], jnp.int32))
        return Prefilled(row, int(req.embeds.shape[0]), prefilled, hit)

    def prefill_many(self, reqs: Sequence[RowRequest]) -> list[Prefilled | GenerationInputError]:
        """Prefill several requests (in order; each result, or the `GenerationInputError` that refused it, in its
        place). Those that only add a short piece to a kept prefix (a question about media already prefilled, a
        follow-up turn; at most `GROUP_CHUNK` positions) share one call: their prefixes side by side as one batch,
        their pieces left-padded to one length. On a CPU a matmul over 16 positions runs at a fraction of the
        speed of one over 64, so four such questions cost little more than one. The others are prefilled one by
        one first, each planned after the previous one stored its prefixes (two questions about a new video: the
        second reuses what the first prefilled)."""
        out: list[Any] = [None] * len(reqs)
        group: list[tuple[int, _Plan]] = []

        def alone(i: int, plan: _Plan) -> None:
            try:
                out[i] = self._prefill_plan(plan)
            except GenerationInputError as e:
                out[i] = e

        for i, req in enumerate(reqs):
            try:
                plan = self._plan(req)
            except GenerationInputError as e:
                out[i] = e
                continue
            if self._groupable(plan):
                group.append((i, plan))
            else:
                alone(i, plan)
        if group:
            length = self.engine.prompt_bucket(max(p.total - p.done for _, p in group))
            cap = self.group_buckets[-1] if self.group_buckets else 1
            shared = [(i, p) for i, p in group
                      if _index(p.entry.cache) + length + p.req.max_new_tokens <= self.slot_length]
            calls = [shared[k:k + cap] for k in range(0, len(shared), cap)]
            calls = [c for c in calls if len(c) > 1]
            grouped = {i for c in calls for i, _ in c}
            for i, p in group:
                if i not in grouped:
                    alone(i, p)
            for c in calls:
                for (i, _), pre in zip(c, self._prefill_group([p for _, p in c], length)):
                    out[i] = pre
        return out

    def _prefill_group(self, plans: list[_Plan], length: int) -> list[Prefilled]:
        size = next(b for b in self.group_buckets if b >= len(plans))
        d = plans[0].embeds.shape[1]
        embeds = np.zeros((size, length, d), np.float32)
        mask = np.zeros((size, length), np.int32)
        for r, p in enumerate(plans):  # left-padded, as `DecodeEngine.pack`; spare rows repeat the last one
            piece = p.embeds[p.done:]
            embeds[r, length - len(piece):], mask[r, length - len(piece):] = piece, 1
        embeds[len(plans):], mask[len(plans):] = embeds[len(plans) - 1], mask[len(plans) - 1]
        # the slots every row needs, and never fewer than a prefix has (a cache is only padded, never cut)
        slots = max(max(_slots(p.entry.cache), next(n for n in self.slot_buckets
                                                     if n >= _index(p.entry.cache) + length + p.req.max_new_tokens))
                    for p in plans)
        caches = [p.entry.cache if _slots(p.entry.cache) == slots else self._fit_slots_fn(p.entry.cache, slots)
                  for p in plans]
        caches += [caches[-1]] * (size - len(plans))
        logits, rows = self._extend_group_fn(self.engine.params, tuple(caches), self.engine.put_batch(embeds),
                                             self.engine.put_batch(mask))
        out = []
        for r, p in enumerate(plans):
            if len(p.req.items) in p.req.cache_points:
                self._store_prefix(p.digests[len(p.req.items)], rows[r], p.total)
            out.append(self._prefilled(p.req, rows[r], logits[r:r + 1], p.total - p.done, True))
        return out

    def fork(self, pre: Prefilled, seed: int | None) -> Prefilled:
        """The same prefilled prompt with another sampling key (the n choices of one request)."""
        row = dict(pre.row, key=jnp.asarray(self.engine.key(seed))[None])
        return Prefilled(row, pre.prompt_tokens, 0, True)

    # ---- the running batch -------------------------------------------------------------------------------------
    @property
    def active(self) -> int:
        return sum(r is not None for r in self.rows)

    def has_room(self) -> bool:
        return self.active < self.max_batch

    def _resize(self, size: int) -> None:
        """Re-layout the batch to `size` rows, active rows first (their order is kept)."""
        keep = [i for i, r in enumerate(self.rows) if r is not None]
        idx = np.asarray(keep + [keep[0] if keep else 0] * (size - len(keep)), np.int32)
        self.cache, self.state = self._take_rows_fn((self.cache, self.state), jnp.asarray(idx))
        self.rows = [self.rows[i] for i in keep] + [None] * (size - len(keep))
        self.row_slots = [self.row_slots[i] for i in keep] + [0] * (size - len(keep))

    def insert(self, pre: Prefilled, owner: Any) -> int:
        """Put a prefilled request into a free row (growing the batch if none is free); returns the row."""
        if not self.has_room():
            raise RuntimeError("the batch is full")
        row_state = {k: v for k, v in pre.row.items() if k != "cache"}
        row_cache, need = pre.row["cache"], _slots(pre.row["cache"])
        if self.cache is None:
            # a copy (the step donates the batch's buffers, and the prefilled cache may be a kept prefix), made by
            # a compiled program: its arrays are then placed as every later batch's are (the step compiled for
            # uncommitted arrays, as an eager copy gives, would be another program than the one `warm_up` made)
            self.cache, self.state = self._take_rows_fn((row_cache, row_state), jnp.zeros((1,), jnp.int32))
            self.rows, self.row_slots = [owner], [need]
            return 0
        if None not in self.rows:
            self._resize(next(b for b in self.buckets if b > len(self.rows)))
        if need > _slots(self.cache):
            self.cache = self._fit_slots_fn(self.cache, need)
        elif need < _slots(self.cache):
            row_cache = self._fit_slots_fn(row_cache, _slots(self.cache))
        i = self.rows.index(None)
        self.cache, self.state = self._set_row_fn((self.cache, self.state), (row_cache, row_state), jnp.int32(i))
        self.rows[i], self.row_slots[i] = owner, need
        return i

    def release(self, i: int, *, expect_more: bool = True) -> None:
        """Forget row i (finished or cancelled). The batch is compacted to the smallest row bucket that holds the
        rows left when at most a quarter of it is in use, or, with `expect_more=False` (nothing is waiting to join),
        as soon as a smaller bucket holds them: every step costs all its rows on a CPU, and a batch that is only
        draining gains nothing from keeping free rows for arrivals (the quarter rule keeps a batch that new
        requests keep filling from shrinking and growing again every few steps)."""
        self.rows[i], self.row_slots[i] = None, 0
        n = self.active
        if n == 0:
            self.cache, self.state, self.rows, self.row_slots = None, None, [], []
            return
        fit = next(b for b in self.buckets if b >= n)
        if fit < len(self.rows) and (not expect_more or n <= len(self.rows) // 4):
            self._resize(fit)
        need = max(self.row_slots)
        if need < _slots(self.cache):  # the rows still running fit in fewer slots (theirs are at the front)
            self.cache = self._fit_slots_fn(self.cache, need)

    def warm_up(self) -> int:
        """Compile, before any request, every program the running batch can need: the decode step for each row
        bucket x slot bucket, the row insert, the compactions and growths between row buckets, the slot resizes and
        the shared calls of short prefills (`prefill_many`) for each group size x piece length x slot bucket (a
        server that compiled them on first use would stall all its clients for seconds each time the load reached a
        new shape). Run on a stand-in batch (one prefilled padding position), which is then dropped;
        the prefix cache is untouched. Returns the number of programs compiled (0 when all were already)."""
        if self.active:
            raise RuntimeError("warm_up runs before the batch takes requests")
        stand_in = self.prefill(RowRequest(np.zeros((1, self.engine.config.hidden_size), np.float32), [0], 1))
        row_state = {k: v for k, v in stand_in.row.items() if k != "cache"}
        row_cache = stand_in.row["cache"]
        fns = (self._step_fn, self._set_row_fn, self._take_rows_fn, self._fit_slots_fn, self._extend_group_fn)
        before = sum(f._cache_size() for f in fns)  # noqa: SLF001 - jax's own count of compiled shapes
        lengths = sorted({self.engine.prompt_bucket(n) for n in range(1, GROUP_CHUNK + 1)})
        width = self.engine.config.hidden_size
        for slots in self.slot_buckets:
            row = self._fit_slots_fn(row_cache, slots)
            for size in self.group_buckets:  # short prefills sharing a call (`prefill_many`)
                for length in (n for n in lengths if n < slots):
                    embeds = self.engine.put_batch(np.zeros((size, length, width), np.float32))
                    mask = self.engine.put_batch(np.ones((size, length), np.int32))
                    jax.block_until_ready(self._extend_group_fn(self.engine.params, (row,) * size, embeds, mask)[0])
            for size in self.slot_buckets:  # a request's (or a kept prefix's) cache padded to more slots
                if size > slots:
                    self._fit_slots_fn(row, size)
            for rows in self.buckets:
                batch = self._take_rows_fn((row, row_state), jnp.zeros((rows,), jnp.int32))
                grown = next((b for b in self.buckets if b > rows), rows)
                for other in self.buckets:  # growth (to the next bucket) and compaction (to any smaller one)
                    if other < rows or other == grown != rows:
                        self._take_rows_fn(batch, jnp.zeros((other,), jnp.int32))
                for size in self.slot_buckets:  # the batch's slots following its longest row
                    if size != slots:
                        self._fit_slots_fn(batch[0], size)
                cache, state = self._set_row_fn(batch, (row, row_state), jnp.int32(0))
                jax.block_until_ready(self._step_fn(self.engine.params, cache, state, self.ctrl, spec=self.spec))
        return sum(f._cache_size() for f in fns) - before  # noqa: SLF001

    def step(self) -> list[tuple[Any, int, str]]:
        """One decode step of every row: [(owner, token, finish reason or "")] for the active rows."""
        if self.cache is None:
            return []
        tokens, code, self.state, self.cache = self._step_fn(self.engine.params, self.cache, self.state, self.ctrl,
                                                             spec=self.spec)
        tokens, code = np.asarray(tokens), np.asarray(code)
        return [(owner, int(tokens[i]), FINISH_CODES[int(code[i])]) for i, owner in enumerate(self.rows)
                if owner is not None]


def _set_row(batch: Any, row: Any, i: jax.Array) -> Any:
    """batch[i] = row[0] for every leaf (leaves are batch-major)."""
    return jax.tree_util.tree_map(
        lambda b, r: jax.lax.dynamic_update_slice(b, r.astype(b.dtype), (i,) + (0,) * (b.ndim - 1)), batch, row)


def _index(cache: Any) -> int:
    """The next slot a one-row cache writes (the positions it holds, with their padding)."""
    return int(np.asarray(cache["index"])[0])


def _slots(cache: Any) -> int:
    return int(cache["valid"].shape[1])


def _take_rows(batch: Any, idx: jax.Array) -> Any:
    return jax.tree_util.tree_map(lambda b: jnp.take(b, idx, axis=0), batch)


__all__ = ["ContextTooLong", "ContinuousBatcher", "Prefilled", "PromptItem", "RowRequest", "item_positions",
           "prefix_digests", "row_buckets", "slot_buckets"]
