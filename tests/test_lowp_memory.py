"""Half-precision and int8 weights stay that size inside the compiled programs: the LLaMA prefill and decode step
and the EVA ViT, compiled ahead of time on CPU, need no more temporaries than the same program with float32
weights (activations, scores: float32 weights need no copies) plus a small fraction of the weight bytes. XLA
converting a bf16/int8 dot operand to float32 would add a full float32 copy: 2x (bf16) or 4x (int8) the weights."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

from vllama_jax import kernels
from vllama_jax.config import LlamaConfig, ViTConfig
from vllama_jax.inference.engine import DecodeEngine
from vllama_jax.models import quant
from vllama_jax.models.eva_vit import EvaViT
from vllama_jax.models.llama import Llama, init_cache

pytestmark = pytest.mark.skipif(not kernels.wmatmul_available(), reason="no C++ compiler for the CPU kernel")

# Mid-size: 6.3M weights in the layers, 4.1M in the (tied) table.
LLAMA = LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1536, num_layers=2, num_heads=8,
                    num_kv_heads=4, tie_word_embeddings=True)
FRACTION = 0.05  # of the weight bytes, beyond the float32 program's temporaries


def _weights(config: LlamaConfig, mode: str) -> dict:
    """Abstract params (no arrays: compiling needs only shapes) in float32, bf16, or int8 + scales."""
    model = Llama(config)
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4, config.hidden_size))))
    abstract = abstract["params"]
    if mode == "float32":
        return abstract
    if mode in ("bfloat16", "bfloat16-compute"):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16) if x.ndim == 2 else x, abstract)
    from vllama_jax.tree import flatten_params, unflatten_params

    flat = quant.quantized_specs({f"llama/{p}": v for p, v in flatten_params(abstract).items()})
    if mode == "int8-packed":  # the decode engine's layout on one CPU device with VNNI (`quant.kernel_layout`)
        flat = {p: jax.eval_shape(kernels.pack_int8, v) if p.endswith("/kernel") and kernels.packable(v) else v
                for p, v in flat.items()}
    return unflatten_params(flat)["llama"]


def _temp_and_weights(compiled, params) -> tuple[int, int]:
    return compiled.memory_analysis().temp_size_in_bytes, quant.resident_bytes(params)


def _llama_programs(mode: str, batch: int) -> dict:
    """{"prefill": (temp bytes, weight bytes), "decode": ...} of the compiled programs with `mode` weights."""
    params = _weights(LLAMA, mode.removesuffix("-bfloat16-compute"))
    # bf16 compute too: its prefill's products (32 rows and more) take XLA's dot on a CPU with AMX-BF16
    module = Llama(LLAMA, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16) if mode.endswith("compute") else LLAMA
    engine = DecodeEngine(module, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), params),
                          compilation_cache=False)
    with kernels.cpu_kernels(True):  # the test session simulates 8 devices; a real CPU process has one
        embeds = jax.ShapeDtypeStruct((batch, 32, LLAMA.hidden_size), jnp.float32)
        mask = jax.ShapeDtypeStruct((batch, 32), jnp.int32)
        prefill = engine._prefill_fn.lower(params, embeds, mask, cache_length=128).compile()
        cache = jax.eval_shape(lambda: init_cache(LLAMA, batch, 128, engine.cache_dtype))
        model = engine.module
        step = jax.jit(lambda p, t, c: model.apply({"params": p}, model.apply({"params": p}, t[:, None],
                                                                               method=Llama.embed), cache=c),
                       donate_argnums=(2,)).lower(params, jax.ShapeDtypeStruct((batch,), jnp.int32), cache).compile()
    return {"prefill": _temp_and_weights(prefill, params), "decode": _temp_and_weights(step, params)}


@pytest.mark.parametrize("mode", ["bfloat16", "bfloat16-compute", "int8", "int8-bfloat16-compute",
                                  pytest.param("int8-packed", marks=pytest.mark.skipif(
    not kernels.packed_int8_available(), reason="the packed int8 path needs AVX-512 VNNI"))])
@pytest.mark.parametrize("batch", [1, 4])
def test_llama_prefill_and_decode_keep_low_precision_weights(mode, batch):
    ref = _llama_programs("float32", batch)
    # an int8 prefill in AMX tiles (`layers.INT8_AMX_MIN_ROWS`) converts one matrix at a time to bf16: one such
    # matrix more (the largest), never all of them (this model's 14 projections at once: 8x this allowance)
    converted = 2 * LLAMA.hidden_size * LLAMA.intermediate_size
    for name, (temp, weights) in _llama_programs(mode, batch).items():
        allowed = ref[name][0] + FRACTION * weights + (converted if mode == "int8-bfloat16-compute" else 0)
        assert temp <= allowed, f"{mode} {name}: {temp} temp bytes for {weights} weight bytes (allowed {allowed})"


def test_float32_copies_would_be_caught():
    """The same measure sees XLA's float32 copy when the kernel is off (the check can fail)."""
    params = _weights(LLAMA, "int8")
    model = Llama(LLAMA)
    with kernels.cpu_kernels(False):
        compiled = jax.jit(lambda p, t: model.apply({"params": p}, model.apply({"params": p}, t, method=Llama.embed))
                           ).lower(params, jax.ShapeDtypeStruct((1, 1), jnp.int32)).compile()
    temp, weights = _temp_and_weights(compiled, params)
    assert temp > 2 * weights


def _vit_temp(dtype: str) -> tuple[int, int]:
    cfg = ViTConfig(image_size=56, patch_size=14, width=384, depth=2, num_heads=6, mlp_dim=1536)
    vit = EvaViT(cfg, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype))
    images = jax.ShapeDtypeStruct((2, 56, 56, 3), jnp.float32)
    params = nn.unbox(jax.eval_shape(vit.init, jax.random.PRNGKey(0), images))["params"]
    with kernels.cpu_kernels(True):
        compiled = jax.jit(lambda p, x: vit.apply({"params": p}, x)).lower(params, images).compile()
    return _temp_and_weights(compiled, params)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_vit_keeps_low_precision_weights(dtype):
    ref, _ = _vit_temp("float32")
    temp, weights = _vit_temp(dtype)
    assert temp <= ref + FRACTION * weights, f"{dtype}: {temp} temp bytes for {weights} weight bytes (f32: {ref})"


def _decode_step_hlo(dtype: str, batch: int, slots: int) -> str:
    """The optimized HLO of one decode step of a `dtype` LLaMA (weights and KV cache), cache donated."""
    dt = jnp.dtype(dtype)
    model = Llama(LLAMA, dtype=dt, param_dtype=dt)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dt), _weights(LLAMA, "float32"))
    cache = jax.eval_shape(lambda: init_cache(LLAMA, batch, slots, dt))
    with kernels.cpu_kernels(True):
        step = jax.jit(lambda p, t, c: model.apply({"params": p}, model.apply({"params": p}, t[:, None],
                                                                               method=Llama.embed), cache=c),
                       donate_argnums=(2,))
        return step.lower(params, jax.ShapeDtypeStruct((batch,), jnp.int32), cache).compile().as_text()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("batch", [1, 2])
def test_decode_step_writes_the_kv_cache_in_place(dtype, batch):
    """A decode step writes one slot of each layer's donated K and V: no copy of a whole cache array, and for a
    bf16 cache no float32 version of it (XLA's CPU compiler turned the vmapped bf16 write into a float32 round trip
    of the whole cache plus a copy, and a float32 cache read by XLA's dot into up to four copies per step). Every
    instruction that makes a cache array is an in-place write: the kernel's aliased `vllama_write_rows`, a
    dynamic-update-slice of the buffer itself, or a fusion rooted at one (a fusion rooted anywhere else, such as
    the bitcast-convert of the cache's bits that a float32 cache once went through, rewrites every element, so a
    step cost time in proportion to the whole cache: 2.6 ms at 1088 slots for SmolLM2-135M instead of 0.1)."""
    slots = 96
    shape = f"[{batch},{LLAMA.num_kv_heads},{slots},{LLAMA.hidden_size // LLAMA.num_heads}]"
    hlo = _decode_step_hlo(dtype, batch, slots)
    whole_cache_copies = [line for line in hlo.splitlines() if f"{shape}" in line.split("=", 1)[-1].split("(")[0]
                          and " copy(" in line]
    assert not whole_cache_copies, whole_cache_copies[:2]
    roots = dict(re.findall(r"\n%(\S+) [^\n]*\{\n(?:[^\n]*\n)*?\s*ROOT %\S+ = \S+ ([a-z-]+\(%\S+?)[,)]", hlo))
    entry = hlo[hlo.index("\nENTRY"):]
    writes = [line.strip() for line in entry.splitlines()
              if f"{shape}" in line.split("=", 1)[-1].split("(")[0] and "parameter(" not in line
              and " bitcast(" not in line and "ENTRY" not in line]
    assert len(writes) >= 2 * LLAMA.num_layers, writes
    for line in writes:
        fused = re.search(r"calls=%([\w.-]+)", line)
        if 'custom_call_target="vllama_write_rows"' in line or " dynamic-update-slice(" in line:
            continue
        assert fused and re.fullmatch(r"dynamic-update-slice\(%param_\S+", roots.get(fused.group(1), "")), (
            line[:200], roots.get(fused.group(1) if fused else ""))
    assert f"f32{shape}" not in hlo or dtype == "float32"
