"""Generation engine on tiny models: fixture parity (upstream greedy ids), transformers parity (greedy with
penalties, soft prompts, beam search, logits processors), sampling, stop rules, streaming, bucketing, sharding,
persistent compilation cache."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from tests.helpers import random_hf_llama, torch_one_thread
from vllama_jax import kernels
from vllama_jax.config import LlamaConfig
from vllama_jax.inference.generate import (
    GenerationConfig,
    GenerationConfigError,
    GenerationInputError,
    Generator,
    process_logits,
)
from vllama_jax.models.llama import Llama
from vllama_jax.sharding import make_mesh
from vllama_jax.text.conversation import stop_token_sequences
from vllama_jax.weights.llama_keys import load_llama

GREEDY = GenerationConfig(do_sample=False, max_new_tokens=12)
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def fixture_llama(tiny_llama, tiny_outputs):
    cfg, params = tiny_llama
    outs = {k: v for k, v in tiny_outputs.items() if k.startswith("chat_") and ".llama." not in k}
    return cfg, params, outs


@pytest.fixture(scope="module")
def gen(fixture_llama):
    cfg, params, _ = fixture_llama
    return Generator(cfg, params, compilation_cache=False)


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    # spread-out logits (HF's default 0.02 init gives near-ties everywhere)
    model = random_hf_llama(unit_embeddings=True, lm_head_scale=3.0, vocab_size=96, hidden_size=64,
                            intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                            pad_token_id=0)
    folder = tmp_path_factory.mktemp("hf_tiny")
    model.save_pretrained(folder)
    cfg, params = load_llama(folder)
    return model, Generator(cfg, params, compilation_cache=False)


ROWS = [[1, 5, 9, 33, 17], [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49], [1, 7, 7, 7]]  # one batch shape: few compiles


def _hf_generate(model, ids_rows, **kw):
    """HF generate on left-padded id rows -> per-row new ids (HF pads finished rows; trimmed by the caller)."""
    import torch

    width = max(len(r) for r in ids_rows)
    ids = np.zeros((len(ids_rows), width), np.int64)
    mask = np.zeros_like(ids)
    for b, r in enumerate(ids_rows):
        ids[b, width - len(r):] = r
        mask[b, width - len(r):] = 1
    with torch.no_grad(), torch_one_thread():
        out = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), pad_token_id=0,
                             return_dict_in_generate=True, output_scores=True, **kw)
    return out.sequences[:, width:].numpy(), out


def _assert_same_prefix(ours: list[int], ref: np.ndarray, pad: int = 0) -> None:
    """Ours == HF's row up to our length; the rest of HF's row is padding of a finished row."""
    ref = [int(x) for x in ref]
    assert ours == ref[:len(ours)], (ours, ref)
    assert all(x == pad for x in ref[len(ours):]), (ours, ref)


# ------------------------------------------------------------------------------------------------------------
# config


def test_config_defaults_are_upstream_chat_answer():
    c = GenerationConfig()
    assert (c.max_new_tokens, c.do_sample, c.temperature, c.top_k, c.top_p, c.num_beams, c.length_penalty,
            c.repetition_penalty) == (300, True, 1.0, 50, 0.9, 1, 1.0, 1.0)
    c = GenerationConfig(eos_token_id=2, stop_sequences=[[835], [2277, 29937]])
    assert c.eos_token_id == (2,) and c.stop_sequences == ((835,), (2277, 29937))


@pytest.mark.parametrize("kw, match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(min_new_tokens=-1), "min_new_tokens"),
    (dict(temperature=0.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(num_beams=0), "num_beams"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(length_penalty=float("nan")), "length_penalty"),
    (dict(early_stopping="sometimes"), "early_stopping"),
    (dict(stop_sequences=((),)), "empty"),
    (dict(stop_sequences=((1, -2),)), "negative"),
    (dict(eos_token_id="x"), "eos_token_id"),
    (dict(pad_token_id=-1), "pad_token_id"),
])
def test_config_validation(kw, match):
    with pytest.raises(GenerationConfigError, match=match):
        GenerationConfig(**kw)


def test_input_errors(gen, fixture_llama):
    e = fixture_llama[2]["chat_vicuna.context_embeds"]
    with pytest.raises(GenerationInputError, match="expected"):
        gen.generate(e[..., :10], config=GREEDY)
    with pytest.raises(GenerationInputError, match="no real token"):
        gen.generate(e, np.zeros(e.shape[:2]), config=GREEDY)
    with pytest.raises(GenerationInputError, match="streaming"):
        gen.generate(e, config=GREEDY.replace(num_beams=2), stream=lambda *a: None)
    with pytest.raises(GenerationInputError, match="outside"):
        gen.generate_ids([[1, 2, 10_000]], GREEDY)
    with pytest.raises(GenerationConfigError, match="pad_token_id"):
        gen.generate(e, config=GREEDY.replace(pad_token_id=10_000))


def test_params_straight_from_init_are_taken():
    """`Module.init` returns params in flax's axis-metadata boxes; the engine takes them as they are (one CPU device
    with the kernel too, where it repacks int8 leaves), and generates what the unboxed params give."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
    model = Llama(cfg)
    boxed = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 32)))["params"]
    with kernels.cpu_kernels(kernels.wmatmul_available()):
        outs = [Generator(model, p, compilation_cache=False, quantize=q).generate_ids([[1, 2, 3]], GREEDY).tokens
                for q in (None, "int8") for p in (boxed, nn.unbox(boxed))]
    assert outs[0] == outs[1] and outs[2] == outs[3]


# ------------------------------------------------------------------------------------------------------------
# upstream fixture (transformers 4.28 greedy generate from inputs_embeds)


@pytest.mark.parametrize("template", ["vicuna", "llama2"])
def test_fixture_greedy_matches_upstream(gen, fixture_llama, template):
    outs = fixture_llama[2]
    cfg = GREEDY.replace(stop_sequences=tuple(map(tuple, stop_token_sequences(template))))
    out = gen.generate(outs[f"chat_{template}.context_embeds"], config=cfg, output_logits=True)
    assert out.tokens[0] == outs[f"chat_{template}.generated_full"][0, 1:].tolist()
    assert out.finish_reasons == ["length"]
    np.testing.assert_allclose(out.logits[:, 0], outs[f"chat_{template}.step_logits"], atol=1e-4, rtol=1e-4)


def test_padding_layouts_and_batch_equal_single_rows(gen, fixture_llama):
    outs = fixture_llama[2]
    a = outs["chat_vicuna.context_embeds"][0]
    b = outs["chat_llama2.context_embeds"][0, :150]
    cfg = GREEDY.replace(max_new_tokens=6)
    single = [gen.generate(x[None], config=cfg).tokens[0] for x in (a, b)]
    assert gen.generate([a, b], config=cfg).tokens == single
    # the same rows as one right-padded (B, L, D) array with a mask, and with a hole in the middle of row 1
    width = a.shape[0] + 3
    arr = np.zeros((2, width, a.shape[1]), np.float32)
    mask = np.zeros((2, width), np.int32)
    arr[0, :a.shape[0]], mask[0, :a.shape[0]] = a, 1
    arr[1, :60], arr[1, 63:63 + 90], mask[1, :60], mask[1, 63:63 + 90] = b[:60], b[60:], 1, 1
    assert gen.generate(arr, mask, config=cfg).tokens == single


def test_prompt_buckets_reuse_compiled_programs(gen, fixture_llama):
    e = fixture_llama[2]["chat_llama2.context_embeds"][0]
    cfg = GREEDY.replace(max_new_tokens=3)
    assert gen.prompt_bucket(1) == 16 and gen.prompt_bucket(17) == 32 and gen.prompt_bucket(513) == 768
    assert gen.cache_length(256, 300) == 576
    gen.generate([e[:40]], config=cfg)
    before = (gen._prefill_fn._cache_size(), gen._sample_step_fn._cache_size())
    for n in (33, 50, 64):  # same bucket (64): no new compilation
        gen.generate([e[:n]], config=cfg.replace(max_new_tokens=2 + n % 5))
    assert (gen._prefill_fn._cache_size(), gen._sample_step_fn._cache_size()) == before


# ------------------------------------------------------------------------------------------------------------
# stop rules, min_new_tokens, streaming


def test_stop_rules_and_streaming(gen, fixture_llama):
    outs = fixture_llama[2]
    e0 = outs["chat_vicuna.context_embeds"][0]
    e1 = outs["chat_llama2.context_embeds"][0]
    cfg = GREEDY.replace(eos_token_id=())
    ref0, ref1 = gen.generate([e0, e1], config=cfg).tokens
    assert ref0[:12] == outs["chat_vicuna.generated_full"][0, 1:].tolist()

    # a single-token stop, a two-token stop, and EOS — each at the first position its id(s) occur
    first = next(i for i in range(2, 12) if ref0[i] not in ref0[:i])
    out = gen.generate([e0], config=cfg.replace(stop_sequences=((ref0[first],),)))
    assert out.tokens == [ref0[:first + 1]] and out.finish_reasons == ["stop"]
    out = gen.generate([e0], config=cfg.replace(stop_sequences=((999, 998), (ref0[first - 1], ref0[first]))))
    assert out.tokens == [ref0[:first + 1]] and out.finish_reasons == ["stop"]
    out = gen.generate([e0], config=cfg.replace(eos_token_id=ref0[first]))
    assert out.tokens == [ref0[:first + 1]] and out.finish_reasons == ["eos"]

    # min_new_tokens: the EOS id is banned until then, a multi-token stop does not count before then
    out = gen.generate([e0], config=cfg.replace(eos_token_id=ref0[first], min_new_tokens=first + 2))
    assert len(out.tokens[0]) > first + 1 and ref0[first] not in out.tokens[0][:first + 2]
    out = gen.generate([e0], config=cfg.replace(stop_sequences=((ref0[first - 1], ref0[first]),),
                                                min_new_tokens=first + 2))
    assert out.tokens[0][:first + 1] == ref0[:first + 1] and len(out.tokens[0]) > first + 1

    # per-row finishing in a batch, streamed
    seen: list[tuple[int, list[int]]] = []
    out = gen.generate([e0, e1], config=cfg.replace(stop_sequences=((ref0[first],),)),
                       stream=lambda step, toks: seen.append((step, toks.tolist())))
    assert out.tokens == [ref0[:first + 1], ref1] and out.finish_reasons == ["stop", "length"]
    assert [s for s, _ in seen] == list(range(12))
    assert [t[0] for _, t in seen] == ref0[:first + 1] + [-1] * (11 - first)
    assert [t[1] for _, t in seen] == ref1


# ------------------------------------------------------------------------------------------------------------
# transformers parity: greedy with processors, soft prompts, beam search


def test_greedy_with_penalty_and_min_new_matches_transformers(hf_tiny):
    model, g = hf_tiny
    rows = ROWS
    eos = int(g.generate_ids(rows, GenerationConfig(do_sample=False, max_new_tokens=10, eos_token_id=())
                             ).tokens[0][1])
    for kw in (dict(), dict(repetition_penalty=1.6), dict(repetition_penalty=0.7, min_new_tokens=4)):
        ref, _ = _hf_generate(model, rows, max_new_tokens=10, do_sample=False, eos_token_id=eos, **kw)
        out = g.generate_ids(rows, GenerationConfig(do_sample=False, max_new_tokens=10, eos_token_id=eos,
                                                    pad_token_id=0, **kw))
        for b in range(len(rows)):
            _assert_same_prefix(out.tokens[b], ref[b])


def test_soft_prompt_embeddings_match_transformers(hf_tiny):
    import torch

    model, g = hf_tiny
    rng = np.random.default_rng(0)
    table = model.get_input_embeddings().weight.detach().numpy()
    prompts = []
    for before, after, n in (([1, 4, 5], [6, 7], 5), ([1, 30], [31, 32, 33, 34], 9), ([1], [8], 2)):
        soft = rng.standard_normal((n, table.shape[1])).astype(np.float32)
        prompts.append(np.concatenate([table[before], soft, table[after]]))
    cfg = GenerationConfig(do_sample=False, max_new_tokens=10, repetition_penalty=1.3)  # EOS: the model's (2)
    out = g.generate(prompts, config=cfg)
    for p, ours in zip(prompts, out.tokens):
        with torch.no_grad(), torch_one_thread():
            ref = model.generate(inputs_embeds=torch.tensor(p[None]), attention_mask=torch.ones(1, len(p)).long(),
                                 max_new_tokens=10, do_sample=False, repetition_penalty=1.3, pad_token_id=0)
        _assert_same_prefix(ours, ref[0].numpy())


def test_candidate_scores_match_transformers_log_likelihood(hf_tiny):
    """score(): each candidate's summed log-probability after its prompt equals the log-likelihood transformers
    computes on the whole sequence (prompts of different lengths, soft prompts, candidates of different lengths
    and counts per prompt)."""
    import torch

    model, g = hf_tiny
    rng = np.random.default_rng(1)
    table = model.get_input_embeddings().weight.detach().numpy()
    prompts = [table[[1, 4, 5, 6]],
               np.concatenate([table[[1, 30]], rng.standard_normal((5, table.shape[1])).astype(np.float32)]),
               table[[1, 8]]]
    candidates = [[[7], [9, 10, 11], [12, 13]],
                  [[3, 3, 3, 3, 3, 3, 3, 3, 3], [40]],
                  [[50, 51], [52], [53], [54], [55, 56, 57]],
                  [[20, 21, 22, 23], [20, 21, 22, 24, 25], [20, 21, 26]],  # shared first tokens run with the prompt
                  [[30, 31], [30, 31, 32]]]  # one candidate is the other's prefix: it keeps its last token
    prompts.append(table[[1, 9, 9]])
    prompts.append(np.concatenate([rng.standard_normal((3, table.shape[1])).astype(np.float32), table[[1, 2]]]))
    ours = g.score(prompts, candidates)
    for p, opts, got in zip(prompts, candidates, ours):
        assert got.shape == (len(opts),)
        for c, value in zip(opts, got):
            full = np.concatenate([p, table[c]])
            with torch.no_grad(), torch_one_thread():
                logits = model(inputs_embeds=torch.tensor(full[None])).logits[0].double()
            logp = torch.log_softmax(logits, -1)[len(p) - 1:-1]
            ref = float(logp[torch.arange(len(c)), torch.tensor(c)].sum())
            assert abs(value - ref) < 1e-3 * max(1.0, abs(ref)), (c, value, ref)
    # scoring one prompt alone (no other row's shared tokens to align with) gives the same numbers
    np.testing.assert_allclose(g.score(prompts[2:3], candidates[2:3])[0], ours[2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g.score(prompts[3:4], candidates[3:4])[0], ours[3], rtol=1e-5, atol=1e-5)
    with pytest.raises(GenerationInputError, match="no candidates"):
        g.score(prompts[:1], [[]])
    with pytest.raises(GenerationInputError, match="empty"):
        g.score(prompts[:1], [[[5], []]])
    with pytest.raises(GenerationInputError, match="outside"):
        g.score(prompts[:1], [[[500]]])
    with pytest.raises(GenerationInputError, match="2 prompts but candidates for 1"):
        g.score(prompts[:2], [[[5]]])


@pytest.mark.parametrize("length_penalty, early_stopping", [(1.0, False), (0.8, False), (0.8, True),
                                                            (2.0, "never"), (-0.5, "never")])
def test_beam_search_matches_transformers(hf_tiny, length_penalty, early_stopping):
    model, g = hf_tiny
    rows = ROWS
    # an EOS id the beams actually produce, so finished hypotheses compete with running beams
    eos = int(g.generate_ids(rows, GenerationConfig(do_sample=False, max_new_tokens=10, eos_token_id=())
                             ).tokens[0][2])
    kw = dict(num_beams=3, length_penalty=length_penalty, early_stopping=early_stopping, max_new_tokens=10,
              do_sample=False, eos_token_id=eos)
    ref, hf_out = _hf_generate(model, rows, **kw)
    out = g.generate_ids(rows, GenerationConfig(pad_token_id=0, **kw))
    for b in range(len(rows)):
        _assert_same_prefix(out.tokens[b], ref[b], pad=eos)  # HF fills beam outputs with `pad or eos` (pad is 0)
    np.testing.assert_allclose(out.scores, hf_out.sequences_scores.numpy(), rtol=1e-4, atol=1e-5)
    assert any(r == "eos" for r in out.finish_reasons) or eos not in sum(out.tokens, [])


@pytest.mark.skipif(not kernels.wmatmul_available(), reason="no C++ compiler for the CPU kernel")
def test_greedy_pick_in_the_kernel_library_equals_xla(fixture_llama):
    """`kernels.row_argmax` is `jnp.argmax` (the first of tied values, within a vector and across vectors; the first
    NaN; an all -inf row; widths below and between vectors) and `kernels.log_softmax_at` is the log-softmax at the
    index (NaN where a row holds a NaN); on the kernels, greedy decoding gives XLA's tokens and scores."""
    rng = np.random.default_rng(3)
    for b, v in [(1, 49152), (8, 1000), (3, 37), (2, 5)]:
        x = rng.standard_normal((b, v)).astype(np.float32)
        x[0, [v // 3, v // 2]] = x[0].max() + 1  # tied, in different vectors
        x[-1, [1, 2]] = x[-1].max() + 1  # tied in one vector
        idx = np.asarray(jax.jit(kernels.row_argmax)(x))
        np.testing.assert_array_equal(idx, np.argmax(x, axis=-1))
        want = np.asarray(jax.nn.log_softmax(jnp.asarray(x), axis=-1))[np.arange(b), idx]
        np.testing.assert_allclose(np.asarray(jax.jit(kernels.log_softmax_at)(x, idx)), want, rtol=1e-6, atol=1e-6)
    x = rng.standard_normal((3, 100)).astype(np.float32)
    x[0, [70, 7]] = np.nan
    x[1, [3, 90]] = np.inf
    x[2] = -np.inf
    np.testing.assert_array_equal(np.asarray(kernels.row_argmax(jnp.asarray(x))), [7, 3, 0])
    assert np.isnan(np.asarray(kernels.log_softmax_at(jnp.asarray(x), jnp.asarray([7, 3, 0])))).all()

    cfg, params, outs = fixture_llama
    prompts = [outs["chat_vicuna.context_embeds"][0], outs["chat_llama2.context_embeds"][0, :150]]
    results = []
    for enabled in (True, False):
        with kernels.cpu_kernels(enabled):
            g = Generator(cfg, params, compilation_cache=False)
            results.append(g.generate(prompts, config=GREEDY))
            hlo = g._sample_step_fn.lower(*_step_args(g, prompts)).as_text()
        assert (kernels.ARGMAX_TARGET in hlo and kernels.LOG_SOFTMAX_AT_TARGET in hlo) == enabled
    assert results[0].tokens == results[1].tokens
    np.testing.assert_allclose(results[0].scores, results[1].scores, rtol=1e-5)


def _step_args(g: Generator, prompts: list) -> tuple:
    """The arguments of a generator's compiled sampling step for greedy decoding of `prompts`."""
    embeds, mask = g.pack(prompts, None)
    cfg = g.resolve(GREEDY)
    spec, values, ctrl, presence = g.processors(cfg, len(prompts), None)
    logits, cache = g.prefill(embeds, mask, cfg.max_new_tokens)
    b = len(prompts)
    state = dict(logits=logits[:, -1], key=jax.random.PRNGKey(0), score=jnp.zeros((b,), jnp.float32),
                 n_gen=jnp.zeros((b,), jnp.int32), recent=jnp.full((b, ctrl["stop_ids"].shape[1]), -1, jnp.int32),
                 finished=jnp.zeros((b,), jnp.bool_), reason=jnp.zeros((b,), jnp.int32), presence=jnp.asarray(presence))
    return g.params, cache, state, values, ctrl, spec


def test_process_logits_matches_transformers_processors():
    import torch
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinNewTokensLengthLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    rng = np.random.default_rng(0)
    batch, vocab, prompt_len = 4, 500, 6
    logits = (3 * rng.standard_normal((batch, vocab))).astype(np.float32)
    ids = rng.integers(0, vocab, size=(batch, prompt_len + 3))
    ids[:, -1] = 7  # a token that is also an EOS id below
    cases = [
        dict(temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.3, min_new_tokens=5),
        dict(temperature=1.0, top_k=0, top_p=0.8, repetition_penalty=1.0, min_new_tokens=0),
        dict(temperature=1.6, top_k=10, top_p=1.0, repetition_penalty=0.8, min_new_tokens=2),
        dict(temperature=0.5, top_k=3, top_p=0.5, repetition_penalty=1.0, min_new_tokens=0, num_beams=2),
    ]
    for case in cases:
        cfg = GenerationConfig(do_sample=True, eos_token_id=(7, 11), **case)
        keep = len(cfg.eos_ids) + 1 if cfg.num_beams > 1 else 1
        procs = LogitsProcessorList()
        if cfg.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty))
        if cfg.min_new_tokens:
            procs.append(MinNewTokensLengthLogitsProcessor(prompt_len, cfg.min_new_tokens, list(cfg.eos_ids)))
        if cfg.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(cfg.temperature))
        if cfg.top_k:
            procs.append(TopKLogitsWarper(cfg.top_k, min_tokens_to_keep=keep))
        if cfg.top_p < 1.0:
            procs.append(TopPLogitsWarper(cfg.top_p, min_tokens_to_keep=keep))
        want = procs(torch.tensor(ids), torch.tensor(logits)).numpy()
        got = np.asarray(process_logits(logits, ids, step=ids.shape[1] - prompt_len, config=cfg))
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want), err_msg=str(case))
        np.testing.assert_allclose(np.asarray(jax.nn.softmax(got)), torch.softmax(torch.tensor(want), -1).numpy(),
                                   atol=1e-6, err_msg=str(case))
        assert np.isfinite(got).sum(axis=1).min() >= keep


# ------------------------------------------------------------------------------------------------------------
# sampling


def test_sampling_reproducible_and_inside_top_k_top_p(gen, fixture_llama):
    outs = fixture_llama[2]
    prompts = [outs["chat_vicuna.context_embeds"][0], outs["chat_llama2.context_embeds"][0]]
    cfg = GenerationConfig(max_new_tokens=10, top_k=8, top_p=0.6, temperature=1.3, eos_token_id=())
    a = gen.generate(prompts, config=cfg, rng=jax.random.PRNGKey(3), output_logits=True)
    b = gen.generate(prompts, config=cfg, rng=jax.random.PRNGKey(3))
    c = gen.generate(prompts, config=cfg, rng=jax.random.PRNGKey(4))
    assert a.tokens == b.tokens and a.tokens != c.tokens
    sizes = []
    for step in range(10):
        allowed = np.isfinite(np.asarray(process_logits(a.logits[step], None, step, cfg)))
        sizes.append(allowed.sum(axis=1))
        for row in range(2):
            assert allowed[row, a.tokens[row][step]], (step, row)
    sizes = np.asarray(sizes)
    assert sizes.max() <= 8 and sizes.min() >= 1 and (sizes < 8).any()  # top-p cut below top-k sometimes
    # greedy decoding ignores the warpers entirely
    assert (gen.generate(prompts, config=cfg.replace(do_sample=False)).tokens
            == gen.generate(prompts, config=GREEDY.replace(max_new_tokens=10, eos_token_id=())).tokens)


def test_sampling_frequencies_follow_processed_distribution():
    from vllama_jax.inference.sampling import select_tokens

    logits = jnp.asarray(np.random.default_rng(1).standard_normal((1, 12)) * 1.5, jnp.float32)
    cfg = GenerationConfig(top_k=6, top_p=0.85, temperature=0.9)
    scores = process_logits(logits, None, 0, cfg)
    probs = np.asarray(jax.nn.softmax(scores))[0]
    draws = jax.vmap(lambda k: select_tokens(scores, k, True)[0])(jax.random.split(jax.random.PRNGKey(0), 20000))
    freq = np.bincount(np.asarray(draws), minlength=12) / 20000
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(probs))
    np.testing.assert_allclose(freq, probs, atol=0.015)


def test_beam_sampling_runs_and_is_reproducible(gen, fixture_llama):
    e = fixture_llama[2]["chat_vicuna.context_embeds"]
    cfg = GenerationConfig(num_beams=3, max_new_tokens=6, eos_token_id=())
    a = gen.generate(e, config=cfg, rng=1)
    assert a.tokens == gen.generate(e, config=cfg, rng=1).tokens and len(a.tokens[0]) == 6


# ------------------------------------------------------------------------------------------------------------
# sharding


@pytest.mark.slow
@pytest.mark.parametrize("spec, n_devices", [("data=2,fsdp=2,tensor=2", 8), ("tensor=4", 4)])
def test_sharded_generation_equals_single_device(fixture_llama, gen, spec, n_devices):
    cfg, params, outs = fixture_llama
    mesh = make_mesh(spec, devices=jax.devices()[:n_devices])
    sharded = Generator(cfg, params, mesh=mesh, compilation_cache=False)
    wq = sharded.params["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert wq.sharding.spec != jax.sharding.PartitionSpec() and len(wq.sharding.device_set) == n_devices
    e0, e1 = outs["chat_vicuna.context_embeds"][0], outs["chat_llama2.context_embeds"][0]
    prompts = [e0, e1[:120], e1, e0[:77]]
    # greedy on both meshes; sampling (same key -> same draws) on the 3-axis one, beams (cache gather) on the other
    extra = (GenerationConfig(max_new_tokens=8, top_k=20, eos_token_id=()) if n_devices == 8
             else GREEDY.replace(max_new_tokens=6, num_beams=2, length_penalty=0.8))
    for config in (GREEDY.replace(max_new_tokens=8), extra):
        one = gen.generate(prompts, config=config, rng=5)
        many = sharded.generate(prompts, config=config, rng=5)
        assert many.tokens == one.tokens, config


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int8", "bfloat16"])
def test_low_precision_sharded_generation_equals_single_device(fixture_llama, precision):
    """int8 (quantized at construction) and bf16 weights on the 3-axis mesh give the one-device tokens; the int8
    one-device run goes through the CPU kernel (when built), the mesh through XLA's dot."""
    cfg, params, outs = fixture_llama
    if precision == "bfloat16":
        params = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16) if np.ndim(x) == 2 else x, params)
    quantize = "int8" if precision == "int8" else None
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    one = Generator(cfg, params, quantize=quantize, compilation_cache=False)
    many = Generator(cfg, params, mesh=mesh, quantize=quantize, compilation_cache=False)
    wq = many.params["layers_0"]["self_attn"]["q_proj"]
    assert wq["kernel"].dtype == (jnp.int8 if quantize else jnp.bfloat16)
    assert wq["kernel"].sharding.spec != jax.sharding.PartitionSpec()
    if quantize:
        assert wq["kernel_scale"].sharding.spec == jax.sharding.PartitionSpec("tensor")
    e0, e1 = outs["chat_vicuna.context_embeds"][0], outs["chat_llama2.context_embeds"][0]
    prompts = [e0, e1[:120], e1, e0[:77]]
    for config in (GREEDY.replace(max_new_tokens=8), GenerationConfig(max_new_tokens=8, top_k=20, eos_token_id=())):
        with kernels.cpu_kernels(True if quantize else None):
            a = one.generate(prompts, config=config, rng=5)
        b = many.generate(prompts, config=config, rng=5)
        assert b.tokens == a.tokens, config


# ------------------------------------------------------------------------------------------------------------
# persistent compilation cache


@pytest.mark.slow
def test_persistent_compilation_cache(tmp_path, tiny_dir):
    """Two processes generate with the same cache folder: the first compiles and writes every program (cache
    misses, new files), the second loads every program from the folder (JAX's '/jax/compilation_cache/cache_hits'
    events, no miss, no file written or rewritten)."""
    script = textwrap.dedent(f"""
        import collections, json, os
        os.environ["JAX_PLATFORMS"] = "cpu"
        import jax
        events = collections.Counter()
        jax.monitoring.register_event_listener(lambda event, **kw: events.update([event]))
        from vllama_jax.inference.generate import Generator, GenerationConfig
        from vllama_jax.weights.llama_keys import load_llama
        cfg, params = load_llama({str(tiny_dir / "llama")!r})
        g = Generator(cfg, params, compilation_cache={str(tmp_path / "cache")!r})
        out = g.generate_ids([[1, 5, 6, 7]], GenerationConfig(do_sample=False, max_new_tokens=3))
        print(json.dumps({{"tokens": [int(t) for t in out.tokens[0]],
                          "events": {{k: v for k, v in events.items() if k.startswith("/jax/compilation_cache/")}}}}))
    """)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XLA_FLAGS": ""}
    runs = []
    for run in range(2):
        res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        result = json.loads(res.stdout.strip().splitlines()[-1])
        files = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}
        runs.append((result, files))
        print(f"run {run}: {result['events']}, {len(files)} cache files")
    (first, first_files), (second, second_files) = runs
    hits, misses = "/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"
    assert len(first["tokens"]) == 3 and second["tokens"] == first["tokens"]
    # first process: every program compiled and written (embed, prefill, decode step at least), nothing read
    assert first["events"].get(misses, 0) >= 3 and first["events"].get(hits, 0) == 0, first["events"]
    assert len(first_files) == first["events"][misses], (first_files, first["events"])
    # second process: the same programs, every one a cache hit; no compilation wrote a new or rewritten entry
    assert second["events"].get(hits, 0) == first["events"][misses], second["events"]
    assert second["events"].get(misses, 0) == 0, second["events"]
    assert second_files == first_files  # same names, same modification times
