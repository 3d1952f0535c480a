"""LoRA adapters on the LLM (`models.lora`, training config `lora:`): logits equal PEFT's LoRA on transformers'
LlamaForCausalLM, the merged model equals the unmerged adapters, the PEFT export loads with
`PeftModel.from_pretrained`, and training with lora on changes only the adapters and the branch (the frozen LLM
stays bit-identical) and checkpoints them."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.helpers import random_hf_llama
from tests.test_train_support import host, tiny_config
from vllama_jax.cli import main as cli_main
from vllama_jax.config import ConfigError, LlamaConfig, LoraConfig
from vllama_jax.models.groups import LORA_GROUP
from vllama_jax.models.llama import Llama
from vllama_jax.models.lora import LlamaLora, adapters_from_peft, merge_lora, peft_state_dict
from vllama_jax.train.checkpoint import load_trainable_params
from vllama_jax.train.config import train_config_from_dict
from vllama_jax.train.loop import Trainer
from vllama_jax.tree import flatten_params, unflatten_params
from vllama_jax.weights.llama_keys import load_llama
from vllama_jax.weights.model_dir import load_model_dir, save_model_dir

ALL = ("q", "k", "v", "o", "gate", "up", "down")
HF_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATOL = 1e-4


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """(transformers LlamaForCausalLM with GQA, its folder, our (config, params) of it)."""
    hf = random_hf_llama(seed=3, vocab_size=120, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    folder = tmp_path_factory.mktemp("hf_llama")
    hf.save_pretrained(folder)
    return hf, folder, load_llama(folder)


def _ours(config: LlamaConfig, params, ids: np.ndarray, lora: LoraConfig | None = None, adapters=None):
    m = Llama(config, lora=lora or LoraConfig())
    embeds = m.apply({"params": params}, jnp.asarray(ids), method=Llama.embed)
    logits, _ = m.apply({"params": params}, embeds, adapters=adapters)
    return np.asarray(logits)


def _peft(hf, lora: LoraConfig):
    """PEFT's LoraConfig on a fresh copy of `hf`, every lora_A / lora_B random and non-zero."""
    import copy

    import peft
    import torch

    model = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=[HF_NAMES[ALL.index(t)] for t in lora.targets])).eval()
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def _hf_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.float().numpy()


IDS = np.array([[1, 5, 17, 99, 3, 42, 8, 64], [1, 77, 2, 13, 13, 100, 55, 9]], np.int64)


@pytest.mark.parametrize("targets", [("q", "v"), ALL])
def test_logits_equal_peft_lora_on_transformers(hf_llama, targets):
    """(1) Our adapted LLaMA = PEFT's LoraConfig on LlamaForCausalLM with the same non-zero adapters (rank 4,
    alpha 16: scale 4), for PEFT's default targets and for all seven projections."""
    import peft

    hf, _, (cfg, params) = hf_llama
    lora = LoraConfig(rank=4, alpha=16.0, targets=targets)
    model = _peft(hf, lora)
    adapters = adapters_from_peft(peft.get_peft_model_state_dict(model))
    assert sorted(adapters["layers_0"]["self_attn"]) == sorted(
        HF_NAMES[ALL.index(t)] for t in targets if t in ("q", "k", "v", "o"))
    expected = _hf_logits(model, IDS)
    got = _ours(cfg, params, IDS, lora, adapters)
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=ATOL)
    # the adapters matter: without them the logits are the base model's
    base = _ours(cfg, params, IDS)
    assert np.abs(base - expected).max() > 100 * ATOL
    np.testing.assert_allclose(base, _hf_logits(hf, IDS), atol=ATOL, rtol=ATOL)


def test_init_is_peft_s_and_merged_equals_unmerged(hf_llama):
    """(2) `merge_lora` (W + scale * A B) gives the logits of the unmerged adapters; the init is PEFT's (A
    kaiming-uniform in +-1/sqrt(in), B zeros), with logical axes on every adapter leaf."""
    from flax import linen as nn

    _, _, (cfg, params) = hf_llama
    lora = LoraConfig(rank=4, alpha=8.0, targets=ALL)
    boxed = LlamaLora(cfg, lora).init(jax.random.PRNGKey(0))["params"]
    adapters = nn.unbox(boxed)
    flat = flatten_params(adapters)
    assert len(flat) == 2 * 7 * cfg.num_layers
    for p, v in flat.items():
        if p.endswith("lora_B"):
            assert not np.any(np.asarray(v))
        else:
            bound = 1 / np.sqrt(v.shape[0])
            assert np.abs(v).max() <= bound and np.abs(v).max() > 0.8 * bound
    axes = flatten_params(jax.tree.map(lambda b: b.names, boxed, is_leaf=lambda b: isinstance(b, nn.Partitioned)))
    assert axes["layers_1/mlp/down_proj/lora_A"] == ("mlp", "lora_rank")
    assert axes["layers_1/self_attn/k_proj/lora_B"] == ("lora_rank", "kv_heads")

    rng = np.random.default_rng(0)
    adapters = jax.tree.map(lambda a: (0.3 * rng.standard_normal(a.shape)).astype(np.float32), adapters)
    unmerged = _ours(cfg, params, IDS, lora, adapters)
    merged = _ours(cfg, merge_lora(params, adapters, lora), IDS)
    np.testing.assert_allclose(merged, unmerged, atol=ATOL, rtol=ATOL)
    assert np.abs(unmerged - _ours(cfg, params, IDS)).max() > 100 * ATOL


def test_lora_config_errors_name_the_key(tiny_dir: Path, tmp_path: Path):
    """Bad `lora:` values are ConfigErrors naming the dotted key."""
    base = tiny_config(tiny_dir, tmp_path).to_dict()
    for bad, key in (({"rank": -1}, "lora.rank"), ({"rank": 4, "alpha": 0}, "lora.alpha"),
                     ({"rank": 4, "dropout": 1.0}, "lora.dropout"), ({"rank": 4, "targets": ["q", "qq"]},
                                                                      "lora.targets[1]"),
                     ({"rank": 4, "targets": []}, "lora.targets"), ({"rank": "four"}, "lora.rank"),
                     ({"rnak": 4}, "lora.rnak")):
        with pytest.raises(ConfigError, match="^" + re.escape(key + ":")):
            train_config_from_dict({**base, "lora": bad})


@pytest.mark.slow
def test_training_with_lora_changes_only_the_adapters_and_exports(tiny_dir: Path, tmp_path: Path, tiny_tok):
    """(4) A few steps of the tiny VL stage 1 with lora on: the LLM stays bit-identical, the adapters (and the
    branch) change, only they have optimizer state, the checkpoint carries them. (3) Their PEFT export loads with
    `PeftModel.from_pretrained` and gives our logits; the merged model directory (`export --format merged`) gives
    the unmerged adapters' logits."""
    import peft
    import transformers

    lora = {"rank": 4, "alpha": 8.0, "dropout": 0.1, "targets": list(ALL)}
    t = Trainer(tiny_config(tiny_dir, tmp_path / "run", max_steps=3, lora=lora))
    try:
        t.setup()
        assert LORA_GROUP in t.trainable_groups and LORA_GROUP not in t.frozen
        llm_before = host(t.frozen["llama"])
        adapters_before = host(t.state["params"][LORA_GROUP])
        assert all(not v.any() for k, v in adapters_before.items() if k.endswith("['lora_B']"))
        is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)  # noqa: E731
        adam = [s for s in jax.tree.leaves(t.state["opt_state"], is_leaf=is_adam) if is_adam(s)][0]
        assert set(flatten_params(adam.mu)) == set(flatten_params(t.state["params"]))
        assert "llama" not in adam.mu
        t.run()
        assert all(np.array_equal(v, llm_before[k]) for k, v in host(t.frozen["llama"]).items())
        after = host(t.state["params"][LORA_GROUP])
        changed = [k for k, v in after.items() if not np.array_equal(v, adapters_before[k])]
        assert len(changed) == len(after)  # every A and B moved (B from zero)
        trained = {k: np.asarray(jax.device_get(v)) for k, v in flatten_params(t.state["params"]).items()}
        llm = jax.device_get(t.frozen["llama"])
        config = t.model_config
    finally:
        t.close()
    saved = load_trainable_params(tmp_path / "run" / "checkpoints")
    assert {k for k in saved if k.startswith(LORA_GROUP + "/")} == {k for k in trained if k.startswith(LORA_GROUP)}
    assert all(np.array_equal(saved[k], trained[k]) for k in trained)

    # (3) PEFT export -> PeftModel.from_pretrained on the fixture's HF LLaMA folder
    ckpt = tmp_path / "run" / "checkpoints"
    assert cli_main(["export", "--format", "peft", "--checkpoint", str(ckpt), "--out", str(tmp_path / "peft"),
                     "--base-model", str(tiny_dir / "llama")]) == 0
    cfg_json = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg_json["r"] == 4 and cfg_json["lora_alpha"] == 8.0 and len(cfg_json["target_modules"]) == 7
    base = transformers.LlamaForCausalLM.from_pretrained(tiny_dir / "llama", torch_dtype="float32").eval()
    model = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    adapters = unflatten_params({k.split("/", 1)[1]: v for k, v in trained.items() if k.startswith(LORA_GROUP + "/")})
    assert set(peft_state_dict(adapters)) == set(peft.get_peft_model_state_dict(model))
    ids = np.array([[1, 20, 30, 40, 50, 60]], np.int64)
    ours = _ours(config.llama, llm, ids, config.lora, adapters)
    np.testing.assert_allclose(ours, _hf_logits(model, ids), atol=ATOL, rtol=ATOL)

    # merged model directory: same logits without adapters, config without lora, trained branch from the run
    model_dir = save_model_dir(tmp_path / "model", dataclasses.replace(config, lora=LoraConfig()),
                               {"llama": llm}, tiny_tok)
    assert cli_main(["export", "--format", "merged", "--model", str(model_dir), "--checkpoint", str(ckpt),
                     "--out", str(tmp_path / "merged")]) == 0
    merged = load_model_dir(tmp_path / "merged")
    assert not merged.config.lora.enabled and LORA_GROUP not in merged.params
    assert set(merged.params) == {"llama", "video_qformer", "video_query_tokens", "video_frame_position_embedding",
                                  "llama_proj"}
    np.testing.assert_allclose(_ours(merged.config.llama, merged.params["llama"], ids), ours, atol=ATOL, rtol=ATOL)
    assert cli_main(["export", "--format", "peft", "--out", str(tmp_path / "x")]) == 2
