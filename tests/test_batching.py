"""`inference.batching.ContinuousBatcher` on the fixture LLaMA (fast): requests that join a running batch at
different steps, leave it when done, wait for a free row, and reuse a cached prefix, each decode exactly the
tokens they decode alone with `Generator`."""
from __future__ import annotations

import numpy as np
import pytest

from vllama_jax.inference.batching import (ContextTooLong, ContinuousBatcher, RowRequest, prefix_digests, row_buckets,
                                           slot_buckets)
from vllama_jax.inference.generate import GenerationConfig, Generator

NEW = 6
NO_EOS = GenerationConfig(do_sample=False, max_new_tokens=NEW, eos_token_id=())


@pytest.fixture(scope="module")
def gen(tiny_llama) -> Generator:
    cfg, params = tiny_llama
    return Generator(cfg, params, compilation_cache=False)


def alone(gen: Generator, ids: list[int]) -> list[int]:
    return gen.generate_ids([ids], NO_EOS).tokens[0]


def request(gen: Generator, ids: list[int], **kw) -> RowRequest:
    return RowRequest(np.asarray(gen.embed(np.asarray(ids, np.int32))), ids, NEW, **kw)


def decode_to_end(b: ContinuousBatcher, tokens: dict) -> dict:
    """Step the batch until every row is done, appending each owner's tokens to ``tokens[owner]``."""
    while b.active:
        for owner, token, reason in b.step():
            tokens[owner].append(token)
            if reason:
                b.release(b.rows.index(owner))
    return tokens


def test_rows_join_and_leave_a_running_batch(gen):
    rng = np.random.default_rng(0)
    vocab = gen.config.vocab_size
    prompts = [rng.integers(3, vocab, n).tolist() for n in (5, 11, 3, 17, 8, 2)]
    expected = [alone(gen, p) for p in prompts]
    b = ContinuousBatcher(gen, NO_EOS, max_batch=4, slot_length=64)
    assert b.buckets == (1, 2, 4)
    got: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    waiting = list(range(len(prompts)))
    sizes = []
    step = 0
    while waiting or b.active:
        # one new request every other step, while there is room: rows join mid-decode
        if waiting and step % 2 == 0 and b.has_room():
            i = waiting.pop(0)
            b.insert(b.prefill(request(gen, prompts[i])), i)
        for owner, token, reason in b.step():
            got[owner].append(token)
            if reason:
                assert reason == "length" and len(got[owner]) == NEW
                b.release(b.rows.index(owner))
        sizes.append(len(b.rows))
        step += 1
    assert [got[i] for i in range(len(prompts))] == expected
    assert max(sizes) == 4 and 1 in sizes[2:]  # grew to 4 rows, and compacted again as rows left


def test_prefix_cache_prefills_only_the_new_positions(gen):
    rng = np.random.default_rng(1)
    vocab = gen.config.vocab_size
    head = rng.integers(3, vocab, 20).tolist()
    tail = rng.integers(3, vocab, 7).tolist()
    b = ContinuousBatcher(gen, NO_EOS, max_batch=2, slot_length=64)
    first = b.prefill(request(gen, head, cache_points=[len(head)]))
    assert (first.prefilled_tokens, first.prefix_hit) == (20, False)
    second = b.prefill(request(gen, head + tail))
    assert (second.prompt_tokens, second.prefilled_tokens, second.prefix_hit) == (27, 7, True)
    b.insert(second, "b")
    tokens = [t for _ in range(NEW) for _, t, _ in b.step()]
    assert tokens == alone(gen, head + tail)
    with pytest.raises(ContextTooLong, match="--max-context"):
        b.prefill(RowRequest(np.asarray(gen.embed(np.asarray(head * 3, np.int32))), head * 3, 40))


def test_short_prefills_on_kept_prefixes_share_one_call(gen):
    """`prefill_many`: the requests that add a short piece to a kept prefix (two different prefixes here, pieces of
    3-7 positions) are prefilled in one call; a request without a prefix and one too long for the context are
    handled on their own (the latter refused in its place); every row then decodes what it decodes alone, and a
    whole prompt asked to be kept is kept."""
    rng = np.random.default_rng(5)
    vocab = gen.config.vocab_size
    ids = lambda n: rng.integers(3, vocab, n).tolist()  # noqa: E731
    head1, head2 = ids(20), ids(9)
    b = ContinuousBatcher(gen, NO_EOS, max_batch=8, slot_length=128, max_group=4)
    assert b.group_buckets == (2, 4)
    for head in (head1, head2):
        b.prefill(request(gen, head, cache_points=[len(head)]))
    calls = []
    group_fn = b._extend_group_fn
    b._extend_group_fn = lambda *a: (calls.append(a[2].shape[:2]), group_fn(*a))[1]
    t1 = ids(5)
    prompts = [head1 + t1, head2 + ids(3), ids(12), head1 * 6, head1 + ids(7)]
    reqs = [request(gen, p) for p in prompts]
    reqs[0] = request(gen, prompts[0], cache_points=[len(prompts[0])])
    out = b.prefill_many(reqs)
    assert calls == [(4, 16)]  # three pieces in one call: a group of 4 rows (one spare), 16 positions
    assert isinstance(out[3], ContextTooLong)
    assert [(o.prefilled_tokens, o.prefix_hit) for o in out if not isinstance(o, Exception)] == [
        (5, True), (3, True), (12, False), (7, True)]
    for i, o in enumerate(out):
        if i != 3:
            b.insert(o, i)
    got = decode_to_end(b, {i: [] for i in (0, 1, 2, 4)})
    assert got == {i: alone(gen, prompts[i]) for i in got}
    follow_up = b.prefill(request(gen, prompts[0] + [7, 8]))  # the kept whole first prompt
    assert (follow_up.prefilled_tokens, follow_up.prefix_hit) == (2, True)


def test_the_batch_has_the_slots_its_running_rows_need(tiny_llama):
    """Each request's cache is sized to its prompt and new tokens (a slot bucket); the batch takes the largest
    its running rows need, grows when a longer one joins and shrinks when it leaves; every row decodes what it
    decodes alone (short rows padded into a longer batch, a long row joining short ones)."""
    cfg, params = tiny_llama
    gen = Generator(cfg, params, compilation_cache=False, cache_multiple=16)
    b = ContinuousBatcher(gen, NO_EOS, max_batch=4, slot_length=128)
    assert b.slot_buckets == (16, 32, 64, 128)
    rng = np.random.default_rng(2)
    vocab = gen.config.vocab_size
    short, long_ = rng.integers(3, vocab, 5).tolist(), rng.integers(3, vocab, 40).tolist()
    slots = lambda: int(b.cache["valid"].shape[1])  # noqa: E731
    got: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    b.insert(b.prefill(request(gen, short)), "a")  # 16 (prompt bucket) + 6 new -> 32 slots
    assert slots() == 32
    for owner, token, _ in b.step():
        got[owner].append(token)
    b.insert(b.prefill(request(gen, long_)), "b")  # 64 + 6 -> 128: the batch grows
    assert slots() == 128
    b.insert(b.prefill(request(gen, short[::-1])), "c")  # 32 slots of its own, padded into the batch
    assert slots() == 128
    while b.active:
        for owner, token, reason in b.step():
            got[owner].append(token)
            if reason:
                b.release(b.rows.index(owner))
                if owner == "b":
                    assert b.active == 0 or slots() == 32  # the long row left: back to what the others need
    assert got == {"a": alone(gen, short), "b": alone(gen, long_), "c": alone(gen, short[::-1])}


def test_prefix_digests_and_buckets():
    d = prefix_digests([1, 2, ("video", 32)])
    assert len(d) == 4 and len(set(d)) == 4 and prefix_digests([1, 2])[:3] == d[:3]
    assert row_buckets(32) == (1, 2, 4, 8, 12, 16, 24, 32) and row_buckets(6) == (1, 2, 4, 6)
    assert row_buckets(1) == (1,) and row_buckets(40) == (1, 2, 4, 8, 12, 16, 24, 32, 40)
    assert slot_buckets(1024, 64) == (64, 128, 256, 512, 1024) and slot_buckets(320, 64) == (64, 128, 256, 320)


@pytest.mark.slow
def test_warm_up_compiles_every_shape_the_batch_then_takes(tiny_llama):
    """After `warm_up`, requests of every length joining and leaving at every batch size, and short prefills
    sharing a call, compile nothing more, and each still decodes what it decodes alone."""
    cfg, params = tiny_llama
    gen = Generator(cfg, params, compilation_cache=False, cache_multiple=16)
    b = ContinuousBatcher(gen, NO_EOS, max_batch=2, slot_length=64)
    assert b.warm_up() > 0 and b.active == 0 and not b.prefixes
    fns = (b._step_fn, b._set_row_fn, b._take_rows_fn, b._fit_slots_fn, b._extend_group_fn)
    compiled = [f._cache_size() for f in fns]
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, gen.config.vocab_size, n).tolist() for n in (3, 20, 9, 2, 17)]
    head = prompts[1]
    b.prefill(request(gen, head, cache_points=[len(head)]))
    for n in (2, 3, 4):  # short pieces on the kept prefix, prefilled together in groups of 2 and 4
        b.prefill_many([request(gen, head + [5] * k) for k in range(1, n + 1)])
    got: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    waiting, step = list(range(len(prompts))), 0
    while waiting or b.active:
        if waiting and step % 3 != 2 and b.has_room():
            i = waiting.pop(0)
            b.insert(b.prefill(request(gen, prompts[i])), i)
        for owner, token, reason in b.step():
            got[owner].append(token)
            if reason:
                b.release(b.rows.index(owner), expect_more=bool(waiting))
        step += 1
    assert [f._cache_size() for f in fns] == compiled
    assert [got[i] for i in range(len(prompts))] == [alone(gen, p) for p in prompts]
    assert b.warm_up() == 0


def test_a_draining_batch_compacts_to_the_smallest_bucket_that_holds_it(gen):
    """With requests waiting the batch keeps its rows until a quarter is in use; draining (nothing waits), it moves
    to the smallest row bucket that holds the rows left as soon as there is one (16 -> 12 -> 8 -> 4); the rows
    that stay decode on as they would alone."""
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, gen.config.vocab_size, 4).tolist() for _ in range(16)]
    for expect_more, sizes in ((True, [16] * 11 + [4]), (False, [16] * 3 + [12] * 4 + [8] * 4 + [4])):
        b = ContinuousBatcher(gen, NO_EOS, max_batch=16, slot_length=64)
        assert b.buckets == (1, 2, 4, 8, 12, 16)
        for i, p in enumerate(prompts):
            b.insert(b.prefill(request(gen, p)), i)
        first = {owner: token for owner, token, _ in b.step()}
        seen = []
        for owner in range(12):
            b.release(b.rows.index(owner), expect_more=expect_more)
            seen.append(len(b.rows))
        assert seen == sizes and b.active == 4
        tokens = decode_to_end(b, {owner: [first[owner]] for owner in range(12, 16)})
        assert tokens == {i: alone(gen, prompts[i]) for i in tokens}
