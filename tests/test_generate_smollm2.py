"""Greedy generation with the real SmolLM2-135M-Instruct (GGUF Q4_1) against transformers' `generate` on the same
file: ChatML text prompts (one left-padded batch of different lengths) and prompts with random
soft-prompt embeddings spliced in (`generate(inputs_embeds=...)`). All prompts fall in one bucket (64), so both tests
share one compiled prefill and decode step. Beam search parity runs on a tiny random model in
test_generate.py (SmolLM2 beams in transformers take too long on 2 CPU cores)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import torch_one_thread
from vllama_jax.inference.generate import GenerationConfig, Generator
from vllama_jax.weights.llama_keys import load_llama

pytestmark = pytest.mark.slow

NEW_TOKENS = 20
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why they are prime.",
]


@pytest.fixture(scope="module")
def smollm2(smollm2_path, smollm2_hf):
    """(transformers model, its tokenizer, our Generator on the same GGUF)."""
    hf, tok = smollm2_hf
    cfg, params = load_llama(smollm2_path)
    return hf, tok, Generator(cfg, params, compilation_cache=False)


def _chatml_ids(tok, question: str) -> list[int]:
    enc = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    return list(enc["input_ids"] if hasattr(enc, "keys") else enc)


def _until_eos(ids, eos: int) -> list[int]:
    ids = [int(i) for i in ids]
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def _hf_greedy_left_padded(hf, rows: list[np.ndarray], eos: int) -> list[list[int]]:
    """transformers' greedy `generate(inputs_embeds=...)` on one left-padded batch (zero embeddings, mask 0)."""
    import torch

    width = max(len(r) for r in rows)
    embeds = np.zeros((len(rows), width, rows[0].shape[1]), np.float32)
    mask = np.zeros((len(rows), width), np.int64)
    for b, r in enumerate(rows):
        embeds[b, width - len(r):], mask[b, width - len(r):] = r, 1
    with torch.no_grad(), torch_one_thread():
        out = hf.generate(inputs_embeds=torch.tensor(embeds), attention_mask=torch.tensor(mask),
                          max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=eos)
    return [_until_eos(row, eos) for row in out.numpy()]


def test_greedy_chatml_batch_matches_transformers(smollm2):
    import torch

    hf, tok, gen = smollm2
    eos = tok.eos_token_id
    rows = [_chatml_ids(tok, q) for q in QUESTIONS]
    assert len({len(r) for r in rows}) == len(rows)  # different lengths: left padding inside one bucket
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), eos)
    mask = np.zeros((len(rows), width), np.int64)
    for b, r in enumerate(rows):
        ids[b, width - len(r):], mask[b, width - len(r):] = r, 1
    with torch.no_grad(), torch_one_thread():
        out = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=NEW_TOKENS,
                          do_sample=False, pad_token_id=eos)
    want = [_until_eos(row[width:], eos) for row in out.numpy()]
    got = gen.generate_ids(rows, GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS))
    assert got.tokens == want
    assert got.finish_reasons == ["eos" if w[-1] == eos else "length" for w in want]


def test_greedy_soft_prompt_embeddings_match_transformers(smollm2):
    hf, tok, gen = smollm2
    table = hf.get_input_embeddings().weight.detach().numpy()
    rng = np.random.default_rng(0)
    prompts = []
    for q, n_soft in zip(QUESTIONS, (4, 12, 20)):
        text = _chatml_ids(tok, q)
        cut = 8  # splice the soft prompt after the first few ChatML tokens (like a media block)
        soft = rng.standard_normal((n_soft, table.shape[1])).astype(np.float32) * table.std()
        prompts.append(np.concatenate([table[text[:cut]], soft, table[text[cut:]]]))
    want = _hf_greedy_left_padded(hf, prompts, tok.eos_token_id)
    got = gen.generate(prompts, config=GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS))
    assert got.tokens == want
