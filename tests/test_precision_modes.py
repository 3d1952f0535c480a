"""The named precision modes against a PyTorch reference of upstream's mixed precision (upstream.md §1.6).

The reference is written here from upstream's arithmetic, on the fixture model's weights (tiny_vl: random weights of
the fixture's sizes, read from its upstream files):

* the video Q-Former and `llama_proj` under CUDA fp16 autocast, its op lists written out explicitly (CPU autocast
  has other lists): Linear and matmul in fp16, softmax and LayerNorm in fp32, fp16 + fp32 sums promoted to fp32;
* the chat prompt as `Chat.get_context_emb` builds it: bf16 token embeddings and fp16 media embeddings concatenated
  (torch.cat promotes to float32);
* transformers 4.28's `LlamaDecoderLayer` / `LlamaRMSNorm` / `LlamaAttention` with bf16 weights on that float32
  input: the residual stream stays float32, each norm's output is cast to bf16, matmuls run in bf16, the additive
  mask has the input's dtype, softmax in float32 cast back to bf16; then one KV-cache decode step from a bf16
  token embedding (a bf16 stream).

The `upstream` mode must match it within bf16/fp16 rounding and be measurably closer than the `bf16` mode.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import ROOT, TINY_CONFIG, tiny_files, torch_one_thread
from vllama_jax.config import (PRECISION_MODES, ConfigError, ModelConfig, PrecisionConfig, apply_overrides,
                               load_model_config)
from vllama_jax.inference.engine import forward_tokens
from vllama_jax.models import build_model, set_precision
from vllama_jax.models.layers import as_dtype
from vllama_jax.models.llama import init_cache
from vllama_jax.models.video_llama import VideoLLaMA, llama_module
from vllama_jax.weights.load import load_upstream

# Bounds on max |ours - reference| / max |reference|, and measured values on this project's CPU (2026-12-02):
# * media embeddings (video Q-Former + llama_proj, fp16): upstream mode 1.0e-3 (fp16's relative spacing is 9.8e-4:
#   about one ulp; the fp16 matmul/bias-add roundings of XLA and torch differ in places), bf16 mode 4.8e-3;
# * LLaMA on the reference's float32 prompt, the last layer's residual stream and the logits: upstream mode 0.0
#   (bit-identical, prefill and decode step, jitted), bf16 mode 5.1e-3 / 9.8e-3 (prefill stream / logits),
#   1.2e-2 / 9.7e-3 (decode step).
MEDIA_RTOL = 2e-3      # two fp16 ulps
LLAMA_RTOL = 4e-3      # one bf16 ulp of the largest logit (other CPUs may accumulate matmuls in another order)
CLOSER_FACTOR = 3.0    # the bf16 mode's media error is at least this many times the upstream mode's

TEXT_IDS = ([1, 37, 205, 9, 411, 12], [88, 3, 150, 71, 301, 7, 46])  # two text segments around one media block
NEXT_TOKEN = 123


def _t(x, dtype=torch.float32) -> torch.Tensor:
    """A JAX/NumPy array (any float dtype) as a torch tensor of `dtype` (bf16 values convert exactly)."""
    return torch.from_numpy(np.asarray(jnp.asarray(x, jnp.float32))).to(dtype)


# ---- the reference --------------------------------------------------------------------------------------------


def _linear16(x: torch.Tensor, p: dict) -> torch.Tensor:
    """nn.Linear under fp16 autocast: input, weight and bias cast to fp16, fp16 out."""
    return F.linear(x.half(), _t(p["kernel"]).T.half(), _t(p["bias"]).half())


def _ln32(x: torch.Tensor, p: dict, eps: float) -> torch.Tensor:
    """LayerNorm under autocast: float32 in, float32 out."""
    return F.layer_norm(x.float(), x.shape[-1:], _t(p["scale"]), _t(p["bias"]), eps)


def _bert_attention(h: torch.Tensor, mem: torch.Tensor, p: dict, heads: int, eps: float) -> torch.Tensor:
    """LAVIS BertAttention + BertSelfOutput under fp16 autocast (eval; all-ones masks add float32 zeros)."""
    def split(x):
        return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

    q, k, v = split(_linear16(h, p["query"])), split(_linear16(mem, p["key"])), split(_linear16(mem, p["value"]))
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])          # fp16
    scores = scores + torch.zeros((), dtype=torch.float32).expand(scores.shape)      # extended mask: fp32 -> fp32
    probs = torch.softmax(scores.float(), dim=-1)                                    # autocast: fp32
    ctx = torch.matmul(probs.half(), v.half())                                       # autocast: fp16
    ctx = ctx.transpose(1, 2).reshape(h.shape[0], h.shape[1], -1)
    return _ln32(_linear16(ctx, p["output"]) + h, p["output_layernorm"], eps)        # fp16 + fp32 -> fp32


def ref_video_qformer(memory: torch.Tensor, params: dict, cfg) -> torch.Tensor:
    """video_Qformer.bert(query_embeds=video_query_tokens, encoder_hidden_states=memory) -> llama_proj, fp16 out."""
    qc = cfg.video_qformer
    qp = params["video_qformer"]
    h = _ln32(_t(params["video_query_tokens"]).expand(memory.shape[0], -1, -1), qp["embeddings_layernorm"],
              qc.layer_norm_eps)
    for i in range(qc.num_layers):
        lp = qp[f"layer_{i}"]
        h = _bert_attention(h, h, lp["attention"], qc.num_heads, qc.layer_norm_eps)
        if qc.has_cross_attention(i):
            h = _bert_attention(h, memory, lp["crossattention"], qc.num_heads, qc.layer_norm_eps)
        ff = F.gelu(_linear16(h, lp["intermediate_query"]))                           # gelu: fp16 in, fp16 out
        h = _ln32(_linear16(ff, lp["output_query"]) + h, lp["output_query_layernorm"], qc.layer_norm_eps)
    return _linear16(h, params["llama_proj"])


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers 4.28 LlamaRMSNorm."""
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    if w.dtype in (torch.float16, torch.bfloat16):
        x = x.to(w.dtype)
    return w * x


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RefLlama:
    """transformers 4.28 LlamaForCausalLM arithmetic with bf16 weights, eager attention, a (key, value) cache."""

    def __init__(self, params: dict, cfg) -> None:
        self.c = cfg.llama
        self.w = jax.tree.map(lambda a: _t(a, torch.bfloat16), params)
        dh = self.c.head_dim_resolved
        inv_freq = 1.0 / (self.c.rope_theta ** (torch.arange(0, dh, 2).float() / dh))
        freqs = torch.einsum("i,j->ij", torch.arange(self.c.max_position_embeddings).float(), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()
        self.past: list = [None] * self.c.num_layers

    def embed(self, ids: list[int]) -> torch.Tensor:
        return self.w["embed_tokens"]["embedding"][torch.tensor(ids)][None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: (1, L, D) inputs_embeds in its own dtype -> bf16 logits (1, L, V)."""
        c, w = self.c, self.w
        b, l, _ = x.shape
        start = 0 if self.past[0] is None else self.past[0][0].shape[2]
        pos = torch.arange(start, start + l)
        # _prepare_decoder_attention_mask: causal (for L > 1) in inputs_embeds' dtype, padding part all zeros
        mask = torch.zeros((1, 1, l, start + l), dtype=x.dtype)
        if l > 1:
            causal = torch.full((l, l), torch.finfo(x.dtype).min).triu(1).to(x.dtype)
            mask[..., start:] = causal
        for i in range(c.num_layers):
            lw = w[f"layers_{i}"]
            sa = lw["self_attn"]
            residual = x
            h = _rms(x, lw["input_layernorm"]["scale"], c.rms_norm_eps)

            def proj(t, name, n):
                return (t @ sa[name]["kernel"]).view(b, l, n, -1).transpose(1, 2)

            q, k, v = proj(h, "q_proj", c.num_heads), proj(h, "k_proj", c.num_kv_heads), proj(h, "v_proj",
                                                                                             c.num_kv_heads)
            cos, sin = self.cos[pos].to(v.dtype)[None, None], self.sin[pos].to(v.dtype)[None, None]
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            if self.past[i] is not None:
                k, v = torch.cat([self.past[i][0], k], dim=2), torch.cat([self.past[i][1], v], dim=2)
            self.past[i] = (k, v)
            attn = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1])
            attn = attn + mask
            attn = torch.max(attn, torch.tensor(torch.finfo(attn.dtype).min))
            attn = torch.softmax(attn, dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(attn, v).transpose(1, 2).reshape(b, l, -1) @ sa["o_proj"]["kernel"]
            x = residual + out
            residual = x
            h = _rms(x, lw["post_attention_layernorm"]["scale"], c.rms_norm_eps)
            m = lw["mlp"]
            mlp = (F.silu(h @ m["gate_proj"]["kernel"]) * (h @ m["up_proj"]["kernel"])) @ m["down_proj"]["kernel"]
            x = residual + mlp
        self.hidden = x  # the last layer's output (the residual stream before the final norm)
        h = _rms(x, w["norm"]["scale"], c.rms_norm_eps)
        return h @ w["lm_head"]["kernel"]


# ---- the project's modes ----------------------------------------------------------------------------------------


def our_media(cfg, params, mode: str, memory: np.ndarray) -> np.ndarray:
    """The video Q-Former + llama_proj output in precision `mode` (float32 array of the values)."""
    cfg, p = set_precision(cfg, params, mode)
    model = build_model(cfg)
    media = jax.jit(lambda prm, m: model.apply({"params": prm}, m, True, method=VideoLLaMA._video_from_memory))(
        p, jnp.asarray(memory))
    return np.asarray(media, np.float32)


def our_llama(cfg, params, mode: str, prompt: np.ndarray) -> dict[str, np.ndarray]:
    """The chat path's LLaMA in precision `mode` on a float32 prompt (1, L, D): prefill through the KV cache, then
    one decode step from a token id (the engine's `forward_tokens`). Last-layer streams, logits and dtypes."""
    cfg, p = set_precision(cfg, params, mode)
    llama = llama_module(cfg)
    lp = {"params": p["llama"]}
    last = f"layer{cfg.llama.num_layers - 1}"
    cache = init_cache(cfg.llama, 1, 64, as_dtype(cfg.precision.llama))
    (logits, cache), pre = jax.jit(lambda c, x: llama.apply(lp, x, cache=c, mutable=["intermediates"]))(
        cache, jnp.asarray(prompt))
    (step, _), dec = jax.jit(lambda c, t: llama.apply(lp, t, c, method=forward_tokens, mutable=["intermediates"]))(
        cache, jnp.asarray([NEXT_TOKEN]))
    pre, dec = pre["intermediates"][last][0], dec["intermediates"][last][0]
    return dict(prefill_stream=np.asarray(pre[0], np.float32), prefill_logits=np.asarray(logits[0], np.float32),
                step_stream=np.asarray(dec[0, -1], np.float32), step_logits=np.asarray(step[0], np.float32),
                prefill_dtype=pre.dtype, step_dtype=dec.dtype)


@pytest.fixture(scope="module")
def tiny_vl_llm(tiny_dir):
    """(config, params) of the fixture model's groups these tests run: the VL branch, its query tokens, LLaMA (and
    the AL branch, whose query tokens `VideoLLaMA.setup` declares); not the ViT and ImageBind towers."""
    cfg = load_model_config(TINY_CONFIG)
    return cfg, load_upstream(cfg, tiny_files(tiny_dir, "blip2", "vl_ckpt", "al_ckpt", "llama"))


@pytest.fixture(scope="module")
def reference(tiny_vl_llm):
    """The reference run: memory -> fp16 media -> float32 prompt -> bf16 LLaMA prefill + one decode step."""
    cfg, params = tiny_vl_llm
    rng = np.random.default_rng(0)
    frames = 2
    memory = rng.standard_normal((1, frames * cfg.qformer.num_query_tokens, cfg.qformer.hidden_size)).astype(np.float32)
    _, up = set_precision(cfg, params, "upstream")
    with torch_one_thread(), torch.no_grad():
        media = ref_video_qformer(torch.from_numpy(memory), up, cfg)
        assert media.dtype == torch.float16
        ref = RefLlama(up["llama"], cfg)
        prompt = torch.cat([ref.embed(TEXT_IDS[0]), media, ref.embed(TEXT_IDS[1])], dim=1)
        assert prompt.dtype == torch.float32  # torch.cat(bf16, fp16) promotes, as upstream's get_context_emb
        prefill_logits = ref(prompt)[0]
        prefill_stream = ref.hidden[0]
        step_logits = ref(ref.embed([NEXT_TOKEN]))[0, -1]
        assert ref.hidden.dtype == torch.bfloat16  # decode steps run a bf16 stream upstream
        step_stream = ref.hidden[0, -1]
    out = dict(prefill_stream=prefill_stream, prefill_logits=prefill_logits, step_stream=step_stream,
               step_logits=step_logits)
    return memory, media.float().numpy(), prompt.numpy(), {k: v.float().numpy() for k, v in out.items()}


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def test_upstream_mode_qformer_matches_fp16_autocast(tiny_vl_llm, reference):
    cfg, params = tiny_vl_llm
    memory, ref_media, _, _ = reference
    err = {mode: _rel(our_media(cfg, params, mode, memory)[0], ref_media[0]) for mode in ("upstream", "bf16")}
    print("media embeddings, max |ours - reference| / max |reference|:", err)
    assert err["upstream"] < MEDIA_RTOL, err
    assert err["bf16"] > CLOSER_FACTOR * err["upstream"], err


def test_upstream_mode_llama_matches_upstreams_float32_stream(tiny_vl_llm, reference):
    cfg, params = tiny_vl_llm
    _, _, prompt, ref = reference
    errors = {}
    for mode in ("upstream", "bf16"):
        ours = our_llama(cfg, params, mode, prompt)
        errors[mode] = {k: _rel(ours[k], ref[k]) for k in ref}
        if mode == "upstream":  # the prompt's stream stays float32; decode steps from bf16 embeddings run bf16
            assert ours["prefill_dtype"] == jnp.float32 and ours["step_dtype"] == jnp.bfloat16
        else:
            assert ours["prefill_dtype"] == jnp.bfloat16
    print("LLaMA, max |ours - reference| / max |reference|:", errors)
    assert max(errors["upstream"].values()) < LLAMA_RTOL, errors
    assert errors["bf16"]["prefill_stream"] > LLAMA_RTOL and errors["bf16"]["prefill_logits"] > LLAMA_RTOL, errors


def test_named_modes_in_configs_and_flags():
    assert PrecisionConfig.named("fp32") == PrecisionConfig()
    up = PrecisionConfig.named("upstream")
    assert (up.vit, up.vit_params, up.qformer, up.imagebind, up.llama, up.llama_params, up.llama_arithmetic) == (
        "float16", "float16", "float16", "float16", "bfloat16", "bfloat16", "torch")
    assert up.trainable_params == "float32" and up.mode == "upstream"
    assert dataclasses.replace(up, llama_arithmetic="jax").mode == "custom"
    assert set(PRECISION_MODES) == {"upstream", "bf16", "fp32"}
    for name in ("vl_llama2_7b_chat", "al_llama2_13b_chat", "vl_vicuna_7b"):
        assert load_model_config(ROOT / "configs" / f"{name}.yaml").precision.mode == "upstream"
    assert apply_overrides(ModelConfig(), ["precision=bf16"]).precision == PrecisionConfig.named("bf16")
    with pytest.raises(ConfigError, match="precision: unknown mode 'fp8'"):
        apply_overrides(ModelConfig(), ["precision=fp8"])
    with pytest.raises(ConfigError, match="precision.llama_arithmetic"):
        PrecisionConfig(llama_arithmetic="float32").validate()
