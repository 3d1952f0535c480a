"""LLaMA weights: key maps (HF folders, Video-LLaMA checkpoints, GGUF), configs read from HF/GGUF, `load_llama`.

Params paths are those of `vllama_jax.models.llama.Llama` (see its module docstring). HF keys
(`model.layers.{i}.self_attn.q_proj.weight`, ...) map 1:1 with the Linear transpose; a Video-LLaMA checkpoint
uses the same keys under `llama_model.` (`llama_hf_keymap(cfg).with_prefix("llama_model.", "llama")`). GGUF
tensors (`blk.{i}.attn_q.weight`, ...) come out of `GGUFSource` already un-permuted into the HF layout, so the
GGUF map is a pure renaming with the same transforms.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ConfigError, LlamaConfig
from .keymaps import KeyMap, load_component, rule
from ..tree import unflatten_params
from .readers import GGUFSource, TensorSource, WeightsError, open_hf_folder, open_weights

# (HF submodule under model.layers.{i}., params path under layers_{i}/)
_LAYER_LINEARS = (
    ("self_attn.q_proj", "self_attn/q_proj"),
    ("self_attn.k_proj", "self_attn/k_proj"),
    ("self_attn.v_proj", "self_attn/v_proj"),
    ("self_attn.o_proj", "self_attn/o_proj"),
    ("mlp.gate_proj", "mlp/gate_proj"),
    ("mlp.up_proj", "mlp/up_proj"),
    ("mlp.down_proj", "mlp/down_proj"),
)
_GGUF_LINEARS = (
    ("attn_q", "self_attn/q_proj"),
    ("attn_k", "self_attn/k_proj"),
    ("attn_v", "self_attn/v_proj"),
    ("attn_output", "self_attn/o_proj"),
    ("ffn_gate", "mlp/gate_proj"),
    ("ffn_up", "mlp/up_proj"),
    ("ffn_down", "mlp/down_proj"),
)


def llama_param_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Flat {params path: shape} of `Llama(config)` (what `jax.eval_shape(Llama(config).init, ...)` gives)."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q = config.num_heads * config.head_dim_resolved
    kv = config.num_kv_heads * config.head_dim_resolved
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens/embedding": (v, d), "norm/scale": (d,)}
    if not config.tie_word_embeddings:
        shapes["lm_head/kernel"] = (d, v)
    per_layer = {
        "self_attn/q_proj/kernel": (d, q),
        "self_attn/k_proj/kernel": (d, kv),
        "self_attn/v_proj/kernel": (d, kv),
        "self_attn/o_proj/kernel": (q, d),
        "mlp/gate_proj/kernel": (d, f),
        "mlp/up_proj/kernel": (d, f),
        "mlp/down_proj/kernel": (f, d),
        "input_layernorm/scale": (d,),
        "post_attention_layernorm/scale": (d,),
    }
    for i in range(config.num_layers):
        for p, s in per_layer.items():
            shapes[f"layers_{i}/{p}"] = s
    return shapes


def llama_hf_keymap(config: LlamaConfig) -> KeyMap:
    """HF `LlamaForCausalLM` state-dict keys -> `Llama` params. RoPE `inv_freq` buffers are ignored; with tied
    embeddings a stored `lm_head.weight` is ignored too (HF ties it to the embedding table on load)."""
    rules = [
        rule("model.embed_tokens.weight", "embed_tokens/embedding"),
        rule("model.norm.weight", "norm/scale"),
        rule("model.layers.{i}.input_layernorm.weight", "layers_{i}/input_layernorm/scale"),
        rule("model.layers.{i}.post_attention_layernorm.weight", "layers_{i}/post_attention_layernorm/scale"),
    ]
    rules += [rule(f"model.layers.{{i}}.{hf}.weight", f"layers_{{i}}/{ours}/kernel", "linear")
              for hf, ours in _LAYER_LINEARS]
    ignore = [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"]
    if config.tie_word_embeddings:
        ignore.append(r"lm_head\.weight$")
    else:
        rules.append(rule("lm_head.weight", "lm_head/kernel", "linear"))
    return KeyMap("LLaMA", tuple(rules), claims=(r"model\.", r"lm_head\."), ignore=tuple(ignore))


def llama_gguf_keymap(config: LlamaConfig) -> KeyMap:
    """llama.cpp GGUF tensor names -> `Llama` params (tensors as `GGUFSource` returns them: HF layout)."""
    rules = [
        rule("token_embd.weight", "embed_tokens/embedding"),
        rule("output_norm.weight", "norm/scale"),
        rule("blk.{i}.attn_norm.weight", "layers_{i}/input_layernorm/scale"),
        rule("blk.{i}.ffn_norm.weight", "layers_{i}/post_attention_layernorm/scale"),
    ]
    rules += [rule(f"blk.{{i}}.{g}.weight", f"layers_{{i}}/{ours}/kernel", "linear") for g, ours in _GGUF_LINEARS]
    ignore: list[str] = []
    if config.tie_word_embeddings:
        ignore.append(r"output\.weight$")
    else:
        rules.append(rule("output.weight", "lm_head/kernel", "linear"))
    # rope_freqs (LLaMA-3 rope scaling) is claimed but has no rule: such a file fails as "unexpected" instead of
    # loading into a model that would ignore its scaling.
    return KeyMap("LLaMA (GGUF)", tuple(rules),
                  claims=(r"token_embd\.", r"output_norm\.", r"output\.", r"blk\.", r"rope_freqs\."),
                  ignore=tuple(ignore))


# ------------------------------------------------------------------------------------------------------------
# configs


def _validated(config: LlamaConfig, path: Path) -> LlamaConfig:
    try:
        config.validate()
    except ConfigError as e:
        raise WeightsError(path, f"impossible LLaMA config ({e})") from None
    return config


def llama_config_from_hf_dict(d: dict[str, Any], path: str | Path = "config.json") -> LlamaConfig:
    """`LlamaConfig` from a HF config.json mapping (transformers 4.x and 5.x spellings). Features this decoder
    does not implement (rope scaling, biases, other activations, sliding windows) raise WeightsError."""
    path = Path(path)

    def need(key: str) -> Any:
        if key not in d or d[key] is None:
            raise WeightsError(path, f"missing {key!r}")
        return d[key]

    model_type = d.get("model_type", "llama")
    if model_type not in ("llama", "mistral"):
        raise WeightsError(path, f"model_type {model_type!r} is not a LLaMA-family decoder this port implements")
    # transformers 5 writes rope_parameters {rope_theta, rope_type}; 4.x writes rope_theta + rope_scaling.
    rope = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    for r in (rope, scaling):
        kind = r.get("rope_type", r.get("type", "default"))
        if kind not in ("default", None):
            raise WeightsError(path, f"rope scaling {kind!r} is not supported (only plain RoPE)")
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    for flag in ("attention_bias", "mlp_bias"):
        if d.get(flag):
            raise WeightsError(path, f"{flag} = true is not supported (LLaMA projections have no bias)")
    act = d.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise WeightsError(path, f"hidden_act {act!r} is not supported (LLaMA uses SiLU)")
    if d.get("sliding_window"):
        raise WeightsError(path, "sliding-window attention is not supported")

    def first_id(key: str, default: int) -> int:
        v = d.get(key)
        if isinstance(v, list):  # some configs list several EOS ids; the first is the canonical one
            v = v[0] if v else None
        return default if v is None else int(v)

    heads = int(need("num_attention_heads"))
    cfg = LlamaConfig(
        vocab_size=int(need("vocab_size")),
        hidden_size=int(need("hidden_size")),
        intermediate_size=int(need("intermediate_size")),
        num_layers=int(need("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(d.get("head_dim") or 0),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        max_position_embeddings=int(d.get("max_position_embeddings") or 2048),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        bos_token_id=first_id("bos_token_id", 1),
        eos_token_id=first_id("eos_token_id", 2),
        pad_token_id=first_id("pad_token_id", 0),
    )
    return _validated(cfg, path)


def llama_config_from_hf(folder: str | Path) -> LlamaConfig:
    """`LlamaConfig` from a HF model folder's config.json."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise WeightsError(path, "file not found (a HF LLaMA folder needs its config.json)")
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(path, f"not a readable JSON config ({e})") from None
    if not isinstance(d, dict):
        raise WeightsError(path, "expected a JSON object")
    return llama_config_from_hf_dict(d, path)


def llama_config_from_gguf(source: str | Path | GGUFSource) -> LlamaConfig:
    """`LlamaConfig` from a GGUF file's `llama.*` metadata. The vocabulary size is the embedding table's row
    count (the token list normally has the same length); the embeddings are tied when there is no
    `output.weight` tensor, as in transformers' GGUF loader."""
    src = source if isinstance(source, GGUFSource) else GGUFSource(source)
    arch = src.field("general.architecture")
    if arch != "llama":
        raise WeightsError(src.path, f"GGUF architecture {arch!r} is not supported (expected 'llama')")

    def meta(key: str, default: Any = None) -> Any:
        v = src.field(f"{arch}.{key}", default)
        if v is None:
            raise WeightsError(src.path, f"missing GGUF metadata {arch}.{key}")
        return v

    scaling = src.field(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none", ""):
        raise WeightsError(src.path, f"rope scaling {scaling!r} is not supported (only plain RoPE)")
    if "token_embd.weight" not in src.keys():
        raise WeightsError(src.path, "no token_embd.weight tensor: not a LLaMA GGUF")
    hidden = int(meta("embedding_length"))
    heads = int(meta("attention.head_count"))
    head_dim = int(src.field(f"{arch}.attention.key_length") or hidden // heads)
    rot = src.field(f"{arch}.rope.dimension_count")
    if rot is not None and int(rot) != head_dim:
        raise WeightsError(src.path, f"partial rotary embeddings ({rot} of {head_dim} dims) are not supported")
    tokens = src.array_length("tokenizer.ggml.tokens")
    vocab = src.shape("token_embd.weight")[0]
    if tokens is not None and tokens > vocab:
        raise WeightsError(src.path, f"token list has {tokens} entries but the embedding table only {vocab} rows")
    defaults = LlamaConfig()
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_layers=int(meta("block_count")),
        num_heads=heads,
        num_kv_heads=int(src.field(f"{arch}.attention.head_count_kv") or heads),
        head_dim=0 if head_dim * heads == hidden else head_dim,
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        max_position_embeddings=int(meta("context_length", 2048)),
        tie_word_embeddings="output.weight" not in src.keys(),
        bos_token_id=int(src.field("tokenizer.ggml.bos_token_id", defaults.bos_token_id)),
        eos_token_id=int(src.field("tokenizer.ggml.eos_token_id", defaults.eos_token_id)),
        pad_token_id=int(src.field("tokenizer.ggml.padding_token_id", defaults.pad_token_id)),
    )
    return _validated(cfg, src.path)


# ------------------------------------------------------------------------------------------------------------
# loading


def load_llama_params(source: TensorSource, config: LlamaConfig, *, gguf: bool | None = None,
                      src_prefix: str = "", dtype: Any = np.float32) -> dict[str, Any]:
    """Nested params dict (numpy arrays of `dtype`) of `Llama(config)` from an open source.
    `src_prefix` selects keys under a prefix (e.g. "llama_model." in a Video-LLaMA checkpoint)."""
    if gguf is None:
        gguf = isinstance(source, GGUFSource)
    keymap = llama_gguf_keymap(config) if gguf else llama_hf_keymap(config)
    if src_prefix:
        keymap = keymap.with_prefix(src_prefix)
    flat = load_component(source, keymap, llama_param_shapes(config), dtype=dtype)
    return unflatten_params(flat)


def load_llama(path: str | Path, config: LlamaConfig | None = None,
               dtype: Any = np.float32) -> tuple[LlamaConfig, dict[str, Any]]:
    """Load a LLaMA decoder from a HF folder (safetensors or .bin, sharded with an index or single), a single
    weight file (its config.json is looked up beside it unless `config` is given) or a .gguf file (dequantized).
    Returns (config, params) with params ready for `Llama(config).apply({"params": params}, ...)`."""
    path = Path(path)
    if path.is_dir():
        config = config or llama_config_from_hf(path)
        source = open_hf_folder(path)
    else:
        source = open_weights(path)
        if config is None:
            config = (llama_config_from_gguf(source) if isinstance(source, GGUFSource)
                      else llama_config_from_hf(path.parent))
    try:
        return config, load_llama_params(source, config, dtype=dtype)
    finally:
        source.close()
