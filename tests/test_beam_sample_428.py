"""transformers 4.28's `beam_sample` (upstream's `Chat.answer` with num_beams > 1) against values recorded from
transformers 4.28.0 itself (tests/fixtures/beam428, made by tests/tools/beam_sample_428.py).

What is compared, step by step, with transformers' own `torch.multinomial` draws fed in (`draws=`), on the same
tiny LLaMA (its HF folder is in the fixture) and the same prompt embeddings:
* the warped scores the draws are made from (log_softmax -> processors -> + beam scores -> warpers), every entry of
  every beam, filtered entries included (-inf in both): atol 1e-4 (float32 logits of two implementations);
* the scorer's output: the next beam scores (atol 1e-4), tokens and flat parent indices (exactly);
* the number of steps (the beam-0 stop criterion, scorer done, or the length limit) and the returned ids
  (4.28's sequence without its dummy BOS, EOS appended as 4.28's finalize appends it): exactly.
Sampling itself is not compared draw for draw (torch's and JAX's generators differ); `test_free_run` checks that the
same machinery draws valid beams from JAX's generator.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vllama_jax.inference.generate import GenerationConfig, Generator
from vllama_jax.weights.llama_keys import load_llama

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "beam428"
REF = json.loads((FIXTURE / "reference.json").read_text())


@pytest.fixture(scope="module")
def engine():
    config, params = load_llama(FIXTURE / "model")
    return Generator(config, params, compilation_cache=False)


@pytest.fixture(scope="module")
def arrays():
    with np.load(FIXTURE / "reference.npz") as z:
        return {k: z[k] for k in z.files}


def _config(case: dict) -> GenerationConfig:
    return GenerationConfig(do_sample=True, num_beams=case["num_beams"], temperature=case["temperature"],
                            top_p=case["top_p"], top_k=case["top_k"], repetition_penalty=case["repetition_penalty"],
                            length_penalty=case["length_penalty"], max_new_tokens=case["max_new_tokens"],
                            stop_sequences=tuple(tuple(s) for s in case["stop"]), eos_token_id=case["eos"],
                            pad_token_id=0, beam_semantics="4.28")


@pytest.mark.parametrize("name", sorted(REF["cases"]))
def test_replayed_draws_give_transformers_428_scores_and_beams(engine, arrays, name):
    case = REF["cases"][name]
    embeds, mask = engine.pack([arrays["prompt_embeds"]], None)
    trace: list[dict[str, np.ndarray]] = []
    out = engine._beam_sample_428.run(embeds, mask, engine.resolve(_config(case)), None, None,
                                    draws=arrays[f"{name}.draws"][:, None], trace=trace)
    assert len(trace) == case["steps"]
    for t, step in enumerate(trace):
        ref = arrays[f"{name}.warped"][t]
        assert np.array_equal(np.isneginf(step["warped"]), np.isneginf(ref)), f"step {t}: filtered entries"
        finite = np.isfinite(ref)
        np.testing.assert_allclose(step["warped"][finite], ref[finite], atol=1e-4, err_msg=f"step {t}")
        np.testing.assert_allclose(step["beam_scores"], arrays[f"{name}.beam_scores"][t], atol=1e-4)
        assert step["beam_tokens"].tolist() == arrays[f"{name}.beam_tokens"][t].tolist(), f"step {t}"
        assert step["beam_indices"].tolist() == arrays[f"{name}.beam_indices"][t].tolist(), f"step {t}"
    assert out.tokens[0] == case["sequence"][1:]


def test_free_run_draws_from_jax_and_starts_from_equal_beams(engine, arrays):
    """Without replayed draws the candidates come from JAX's generator: the same seed gives the same answer, ids stay
    in the vocabulary, and the first step samples from num_beams identical beams (4.28 starts every beam at 0;
    transformers 5, `beam_semantics="5"`, starts beams 1.. at -1e9)."""
    case = REF["cases"]["upstream_defaults"]
    cfg = engine.resolve(_config(case).replace(max_new_tokens=4))
    # `_beam_sample_428`: the Generator's one instance (its jitted steps compile once per engine)
    embeds, mask = engine.pack([arrays["prompt_embeds"]], None)
    runs, traces = [], []
    for seed in (3, 3):
        traces.append([])
        runs.append(engine._beam_sample_428.run(embeds, mask, cfg, seed, None, trace=traces[-1]).tokens[0])
    assert runs[0] == runs[1]
    assert all(0 <= i < engine.config.vocab_size for i in runs[0]) and len(runs[0]) <= 4
    first = traces[0][0]["warped"]
    assert all(np.array_equal(first[0], first[b]) for b in range(1, case["num_beams"]))
