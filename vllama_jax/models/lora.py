"""LoRA adapters on the LLaMA projections (config `lora`: `vllama_jax.config.LoraConfig`), as PEFT's `LoraConfig`
applies them to transformers' `LlamaForCausalLM`:

    y = x W + (alpha / rank) * dropout(x) A B          A (in, rank): kaiming-uniform, B (rank, out): zeros

The adapters are a parameter group of their own, `llama_lora` (`models.groups`), so the frozen LLM's tree is never
touched and only the adapters (with the trained branch) get gradients and optimizer state. Its tree mirrors the
LLM's paths with PEFT's leaf names, layout (in, out) as every kernel here:

    llama_lora/layers_{i}/self_attn/{q_proj,k_proj,v_proj,o_proj}/{lora_A (in, rank), lora_B (rank, out)}
    llama_lora/layers_{i}/mlp/{gate_proj,up_proj,down_proj}/{lora_A, lora_B}

`VideoLLaMA.llm` reads the group and hands it to `Llama(..., adapters=...)`; inference merges it into the weights
instead (`merge_lora`: W + scale * A B), and `peft_state_dict` writes PEFT's names and torch layout (out, in).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from ..config import LlamaConfig, LoraConfig
from ..tree import flatten_params, unflatten_params
from .groups import LLM_GROUP, LORA_GROUP
from .layers import Dtype, matmul, with_axes

LORA_A, LORA_B = "lora_A", "lora_B"
#: logical axis of the rank dimension (replicated: the adapters are small)
RANK_AXIS = "lora_rank"


class Projection(NamedTuple):
    """One LLaMA projection: its path under `layers_{i}` (= HF's module path with "/" for ".") and the logical axes
    of its kernel (in, out)."""

    path: str
    axes: tuple[str, str]


#: `lora.targets` name -> projection (the paths and axes of `models.llama`)
TARGETS: dict[str, Projection] = {
    "q": Projection("self_attn/q_proj", ("embed", "heads")),
    "k": Projection("self_attn/k_proj", ("embed", "kv_heads")),
    "v": Projection("self_attn/v_proj", ("embed", "kv_heads")),
    "o": Projection("self_attn/o_proj", ("heads", "embed")),
    "gate": Projection("mlp/gate_proj", ("embed", "mlp")),
    "up": Projection("mlp/up_proj", ("embed", "mlp")),
    "down": Projection("mlp/down_proj", ("mlp", "embed")),
}


def projection_shape(config: LlamaConfig, target: str) -> tuple[int, int]:
    """(in, out) of a projection's kernel."""
    d, f = config.hidden_size, config.intermediate_size
    q = config.num_heads * config.head_dim_resolved
    kv = config.num_kv_heads * config.head_dim_resolved
    return {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, f), "up": (d, f), "down": (f, d)}[target]


def kaiming_uniform_a_sqrt5(key: jax.Array, shape: tuple[int, int], dtype: Dtype = jnp.float32) -> jax.Array:
    """PEFT's init of lora_A: torch `kaiming_uniform_(weight, a=sqrt(5))` on the (rank, in) weight, i.e.
    U(-1/sqrt(in), 1/sqrt(in)); here on the (in, rank) layout."""
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class LoraAdapter(nn.Module):
    """The two matrices of one adapted projection."""

    in_features: int
    out_features: int
    rank: int
    axes: tuple[str, str]
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self) -> dict[str, jax.Array]:
        a = self.param(LORA_A, with_axes(kaiming_uniform_a_sqrt5, (self.axes[0], RANK_AXIS)),
                       (self.in_features, self.rank), self.param_dtype)
        b = self.param(LORA_B, with_axes(nn.initializers.zeros, (RANK_AXIS, self.axes[1])),
                       (self.rank, self.out_features), self.param_dtype)
        return {LORA_A: a, LORA_B: b}


class _Level(nn.Module):
    """One level of the adapter tree: `children` = ((name, sub-level children | a target name), ...)."""

    llama: LlamaConfig
    rank: int
    children: tuple[tuple[str, Any], ...]
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, sub in self.children:
            if isinstance(sub, str):
                fin, fout = projection_shape(self.llama, sub)
                out[name] = LoraAdapter(fin, fout, self.rank, TARGETS[sub].axes, self.param_dtype, name=name)()
            else:
                out[name] = _Level(self.llama, self.rank, sub, self.param_dtype, name=name)()
        return out


def _layer_children(targets: tuple[str, ...]) -> tuple[tuple[str, Any], ...]:
    """((submodule, ((projection, target), ...)), ...) of one decoder layer, in TARGETS order."""
    subs: dict[str, list[tuple[str, str]]] = {}
    for t in TARGETS:
        if t in targets:
            sub, proj = TARGETS[t].path.split("/")
            subs.setdefault(sub, []).append((proj, t))
    return tuple((sub, tuple(projs)) for sub, projs in subs.items())


class LlamaLora(nn.Module):
    """The `llama_lora` group: creates the adapters (PEFT's init) and returns them as the tree `Llama` takes."""

    llama: LlamaConfig
    lora: LoraConfig
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        layer = _layer_children(self.lora.targets)
        # a list attribute in setup names its modules layers_0, layers_1, ... as in the LLM's tree
        self.layers = [_Level(self.llama, self.lora.rank, layer, self.param_dtype)
                       for _ in range(self.llama.num_layers)]

    def __call__(self) -> dict[str, Any]:
        return {f"layers_{i}": layer() for i, layer in enumerate(self.layers)}


def add_adapter(module: nn.Module, name: str, y: jax.Array, x: jax.Array, adapters: Mapping[str, Any] | None,
                lora: LoraConfig, deterministic: bool) -> jax.Array:
    """y (the output of projection `name` of `module` for input x) plus its adapter, if `adapters` has one:
    y + scale * dropout(x) A B, computed in the adapters' dtype (PEFT casts the input to lora_A's dtype) and added
    in it, then rounded to y's dtype (as torch's promotion of a bf16 base output and a float32 adapter gives).
    Called from `module`'s compact method: the dropout (training only) is its submodule `{name}_lora_dropout`, so
    every projection draws its own mask, as PEFT's per-module `lora_dropout`."""
    adapter = None if adapters is None else adapters.get(name)
    if adapter is None:
        return y
    a, b = adapter[LORA_A], adapter[LORA_B]
    if lora.dropout > 0 and not deterministic:
        x = nn.Dropout(lora.dropout, name=f"{name}_lora_dropout")(x, deterministic=False)
    delta = matmul(matmul(x, a, dtype=a.dtype), b, dtype=a.dtype) * lora.scale
    return (y.astype(delta.dtype) + delta).astype(y.dtype)


# ----------------------------------------------------------------------------------------------------------------
# merging and PEFT's format


def _adapted_kernels(adapters: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{LLM kernel path ("layers_0/self_attn/q_proj/kernel"): (A, B)} of an adapter tree."""
    flat = flatten_params(adapters)
    return {p[: -len(LORA_A)] + "kernel": (flat[p], flat[p[: -len(LORA_A)] + LORA_B])
            for p in flat if p.endswith("/" + LORA_A)}


def merge_lora(llm: Mapping[str, Any], adapters: Mapping[str, Any], lora: LoraConfig) -> dict[str, Any]:
    """The LLM's params tree with every adapter folded into its kernel: W + scale * A B (in float32, rounded once to
    W's dtype). The same function as the unmerged adapters, without their cost at inference. int8 weights cannot
    take a merge (quantize after merging)."""
    flat = dict(flatten_params(llm))
    for path, (a, b) in _adapted_kernels(adapters).items():
        if path not in flat:
            raise KeyError(f"adapter for {path}, which the LLM does not have")
        w = flat[path]
        if jnp.issubdtype(w.dtype, jnp.integer):
            raise ValueError(f"{path} is int8: merge LoRA adapters into float weights, then quantize")
        if isinstance(w, jax.Array):  # on the devices (a trainer's eval hook): stays there
            delta = jnp.asarray(a, jnp.float32) @ jnp.asarray(b, jnp.float32) * lora.scale
            flat[path] = (w.astype(jnp.float32) + delta).astype(w.dtype)
        else:
            delta = np.asarray(a, np.float32) @ np.asarray(b, np.float32) * lora.scale
            flat[path] = (np.asarray(w, np.float32) + delta).astype(w.dtype)
    return unflatten_params(flat)


def with_merged_lora(params: Mapping[str, Any], lora: LoraConfig) -> dict[str, Any]:
    """A Video-LLaMA params tree with its `llama_lora` group (if any) merged into the `llama` group and dropped:
    what inference runs (the decoder's compiled programs take plain LLM weights)."""
    if LORA_GROUP not in params:
        return dict(params)
    rest = {g: v for g, v in params.items() if g != LORA_GROUP}
    if LLM_GROUP in rest:
        rest[LLM_GROUP] = merge_lora(rest[LLM_GROUP], params[LORA_GROUP], lora)
    return rest


#: PEFT's key prefix for a `LlamaForCausalLM` (PeftModel -> LoraModel -> LlamaForCausalLM -> LlamaModel)
PEFT_PREFIX = "base_model.model.model."


def peft_state_dict(adapters: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """PEFT's adapter_model.safetensors content: `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`
    (rank, in) and `...lora_B.weight` (out, rank), float32 torch layout (out, in)."""
    out: dict[str, np.ndarray] = {}
    for path, (a, b) in _adapted_kernels(adapters).items():
        key = PEFT_PREFIX + path[: -len("/kernel")].replace("/", ".").replace("layers_", "layers.", 1)
        out[f"{key}.{LORA_A}.weight"] = np.ascontiguousarray(np.asarray(a, np.float32).T)
        out[f"{key}.{LORA_B}.weight"] = np.ascontiguousarray(np.asarray(b, np.float32).T)
    return out


def adapters_from_peft(state: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `peft_state_dict`: an adapter tree from PEFT's keys (`get_peft_model_state_dict`, or
    adapter_model.safetensors) and torch layout, as float32 numpy arrays."""
    flat: dict[str, np.ndarray] = {}
    for key, v in state.items():
        if not key.startswith(PEFT_PREFIX) or not key.endswith(".weight"):
            raise KeyError(f"{key}: not a PEFT LoRA weight of a LlamaForCausalLM")
        path = key[len(PEFT_PREFIX): -len(".weight")].replace("layers.", "layers_", 1).replace(".", "/")
        flat[path] = np.ascontiguousarray(np.asarray(v, np.float32).T)
    return unflatten_params(flat)


def peft_adapter_config(lora: LoraConfig, base_model: str = "") -> dict[str, Any]:
    """PEFT's adapter_config.json for these adapters (a LoRA of a causal LM, PEFT's defaults otherwise)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or None,
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
        "target_modules": sorted(TARGETS[t].path.split("/")[1] for t in lora.targets),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }


__all__ = ["LORA_A", "LORA_B", "LORA_GROUP", "LlamaLora", "LoraAdapter", "PEFT_PREFIX", "TARGETS", "RANK_AXIS",
           "adapters_from_peft", "add_adapter", "kaiming_uniform_a_sqrt5", "merge_lora", "peft_adapter_config",
           "peft_state_dict", "projection_shape", "with_merged_lora"]
