"""Low-precision weights: the CPU FFI kernel against XLA's dot, int8 quantization (per-channel scales, the
load option, the int8 model directory), and the LLaMA forward with bf16 and int8 weights close to float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from tests.helpers import TINY_CONFIG, tiny_files
from vllama_jax import kernels
from vllama_jax.config import LlamaConfig, load_model_config
from vllama_jax.inference.generate import Generator
from vllama_jax.models import layers, llama, quant
from vllama_jax.models.layers import _kernel_matmul, dequantize, matmul
from vllama_jax.models.llama import Llama
from vllama_jax.tree import flatten_params
from vllama_jax.weights.load import load_upstream
from vllama_jax.weights.model_dir import load_model_dir, save_model_dir

needs_kernel = pytest.mark.skipif(not kernels.wmatmul_available(), reason="no C++ compiler for the CPU kernel")


def _xla_reference(x, w, scale, transposed):
    wf = np.asarray(dequantize(jnp.asarray(w), None if scale is None else jnp.asarray(scale), transposed), np.float64)
    return np.asarray(x, np.float64) @ (wf.T if transposed else wf)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 7, 8, 12, 16, 17, 40])
@pytest.mark.parametrize("wdtype", ["float32", "bfloat16", "float16", "int8"])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("k", [72, 522])
def test_kernel_matches_xla(rows, wdtype, transposed, k):
    """Every path of wmatmul.cc (streamed rows <= 16: one row, or register tiles of 8, 4, 2 and 1 rows of x; the
    prefill's converted slivers beyond, ragged column tails, the (N, K) table's tiles of 4, 2 and 1 rows of x)
    equals the float64 product of the same weights, for each stored dtype. k=522: a decode step splits the rows of
    W into ranges whose partial sums are added (the last range ragged)."""
    rng = np.random.default_rng(rows)
    n = 200  # n % 64 != 0 and k % 16 != 0: the scalar tails run too
    x = rng.standard_normal((rows, k)).astype(np.float32)
    w = rng.standard_normal((n, k) if transposed else (k, n)).astype(np.float32)
    scale = None
    if wdtype == "int8":
        w = np.clip(np.rint(w * 40), -127, 127).astype(np.int8)
        scale = rng.uniform(0.5, 2.0, n).astype(np.float32) / 40
    w = jnp.asarray(w, wdtype)
    got = np.asarray(jax.jit(lambda x, w, s: kernels.wmatmul(x, w, s, nk=transposed))(x, w, scale))
    want = _xla_reference(x, w, scale, transposed)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-4 * np.abs(want).max())
    # and the one matmul path (kernel or XLA) gives the same
    with kernels.cpu_kernels(True):  # this session has 8 simulated devices: the default rule would use XLA
        via = np.asarray(jax.jit(lambda x, w, s: matmul(x, w, s, transposed=transposed))(x, w, scale))
    np.testing.assert_allclose(via, want, rtol=2e-5, atol=2e-4 * np.abs(want).max())


@needs_kernel
@pytest.mark.parametrize("rows", [21, 70])
@pytest.mark.parametrize("wdtype", ["float32", "bfloat16", "packed int8"])
def test_prefill_product_in_converted_slivers(rows, wdtype):
    """The prefill path (more than 16 rows of x): W converted in blocks of at most 256 rows below 64 rows of x, 640
    from there (here 6 and 3 blocks: the sums go on from the previous block's) into slivers of columns, one column
    block per thread, the last sliver ragged (N = 256: 16 columns past the whole slivers of 48 on AVX-512), row
    tiles of 8 and a rest of 5 or 6; against the float64 product. Fails when a block of rows of W restarts the
    sums (checked)."""
    if wdtype == "packed int8" and not kernels.packed_int8_available():
        pytest.skip("the packed int8 path of the CPU kernel needs AVX-512 VNNI")
    rng = np.random.default_rng(rows)
    k, n = 1300, 256
    x = rng.standard_normal((rows, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    scale = None
    if wdtype == "packed int8":
        w = np.clip(np.rint(w * 40), -127, 127).astype(np.int8)
        scale = rng.uniform(0.5, 2.0, n).astype(np.float32) / 40
    w = kernels.pack_int8(jnp.asarray(w)) if wdtype == "packed int8" else jnp.asarray(w, wdtype)
    want = _xla_reference(x, w, scale, False)  # of the weights as stored (dequantize unpacks)
    got = np.asarray(jax.jit(kernels.wmatmul)(x, w, scale))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-4 * np.abs(want).max())


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("transposed", [False, True])
def test_int8_kernel_error_stays_within_the_activation_blocks_bound(rows, transposed):
    """With int8 weights on a CPU with AVX-512 VNNI the kernel scales each 256-deep block of a row of x to 16 bits
    (wmatmul.cc, `quantize_x`): the error of every output is at most sum over blocks of (block max |x| / 65278) *
    sum |w| over the block, times the column scale, so one outlier costs precision only inside its own block. An
    inf or NaN in a row gives that row IEEE results (the float path) and leaves the others exact."""
    rng = np.random.default_rng(rows)
    k, n = 1030, 136  # 4 full blocks + a short one; K % 4 and N % 64 tails
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[:, 256:] *= 1e-3  # small activations after an outlier in the first block: one scale for the whole row
    x[0, 5] = 3.0e3     # (16 bits of 3e3) would round all of them to zero
    w = np.clip(np.rint(rng.standard_normal((n, k) if transposed else (k, n)) * 40), -127, 127).astype(np.int8)
    scale = rng.uniform(0.5, 2.0, n).astype(np.float32) / 40
    f = jax.jit(lambda x, w, s: kernels.wmatmul(x, w, s, nk=transposed))
    got = np.asarray(f(x, jnp.asarray(w), scale), np.float64)
    want = _xla_reference(x, w, scale, transposed)
    wkn = np.abs(w.T if transposed else w).astype(np.float64)  # (k, n)
    bound = np.zeros_like(want)
    for b0 in range(0, k, 256):
        amax = np.abs(x[:, b0:b0 + 256]).max(axis=1, keepdims=True).astype(np.float64)
        bound += amax / 65278 * wkn[b0:b0 + 256].sum(axis=0)[None]
    bound = bound * scale[None] + 1e-6 * np.abs(want) + 1e-5
    assert np.all(np.abs(got - want) <= bound), np.max(np.abs(got - want) / bound)
    # the outlier's block against zero weights: what is left comes from the small activations, which keep their
    # precision (one scale for the whole row would round them all to zero)
    w0 = w.copy()
    (w0[:, :256] if transposed else w0[:256]).fill(0)
    got = np.asarray(f(x, jnp.asarray(w0), scale), np.float64)
    want0 = _xla_reference(x, w0, scale, transposed)
    np.testing.assert_allclose(got, want0, rtol=1e-3, atol=1e-4 * np.abs(want0).max())
    x[0, 7] = np.nan
    got = np.asarray(f(x, jnp.asarray(w), scale), np.float64)
    assert np.all(np.isnan(got[0]))
    np.testing.assert_array_less(np.abs(got[1:] - want[1:]), bound[1:])


@needs_kernel
def test_kernel_gradient_matches_xla():
    """The kernel's custom VJP (XLA backward) equals the gradient of the plain float32 product."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 32)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((32, 48)), jnp.float32)
    f = lambda x, w: jnp.sum(jnp.sin(_kernel_matmul(x, w, None, False)))  # noqa: E731
    g = lambda x, w: jnp.sum(jnp.sin(x @ w))  # noqa: E731
    with kernels.cpu_kernels(True):
        got = jax.grad(f, (0, 1))(x, w)
    for a, b in zip(got, jax.grad(g, (0, 1))(x, w)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


needs_packed = pytest.mark.skipif(not kernels.packed_int8_available(),
                                  reason="the packed int8 path of the CPU kernel needs AVX-512 VNNI")


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 16, 17])  # 17: past a decode step's rows: separate products
@pytest.mark.parametrize("wdtype", ["float32", "bfloat16", "float16", "int8", "packed int8"])
def test_products_of_the_same_x_in_one_call(rows, wdtype):
    """`layers.matmuls`: q, k and v (or gate and up) of a decode step in one kernel call (`kernels.wmatmul_many`), each
    product bit for bit what `matmul` gives it alone (the same arithmetic: VNNI at one row of int8 weights, the
    streaming path otherwise; scales, a ragged width); past `kernels.SMALL_M` rows separate calls; the gradient is
    the separate products'."""
    if wdtype == "packed int8" and not kernels.packed_int8_available():
        pytest.skip("the packed int8 path of the CPU kernel needs AVX-512 VNNI")
    rng = np.random.default_rng(rows)
    k = 520
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
    weights = []
    for n in (192, 64, 128) if wdtype == "packed int8" else (192, 72, 40):
        if "int8" in wdtype:
            w = jnp.asarray(np.clip(np.rint(rng.standard_normal((k, n)) * 40), -127, 127).astype(np.int8))
            w = kernels.pack_int8(w) if wdtype == "packed int8" else w
            weights.append((w, jnp.asarray(rng.uniform(0.5, 2.0, n).astype(np.float32) / 40)))
        else:
            weights.append((jnp.asarray(rng.standard_normal((k, n)), wdtype), None))
    with kernels.cpu_kernels(True):
        fn = jax.jit(lambda x, ws: layers.matmuls(x, ws))
        got = fn(x, weights)
        alone = [jax.jit(layers.matmul)(x, w, s) for w, s in weights]
        hlo = fn.lower(x, weights).compile().as_text()
        loss = lambda x, ws, f: sum(jnp.sum(jnp.sin(y)) for y in f(x, ws))  # noqa: E731
        g_many = jax.grad(loss)(x, weights, layers.matmuls)
        g_alone = jax.grad(loss)(x, weights, lambda x, ws: [layers.matmul(x, w, s) for w, s in ws])
        fused = rows <= kernels.SMALL_M and layers._use_cpu_kernel(weights[0][0].dtype, rows, jnp.float32)
    for a, b in zip(got, alone):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert hlo.count(kernels.MANY_TARGET) == int(fused)
    np.testing.assert_allclose(np.asarray(g_many), np.asarray(g_alone), rtol=1e-5, atol=1e-5)


def test_pack_int8_layout():
    """`pack_int8`: (K, N) -> (K/4, N, 4) with element (k, n) at [k // 4, n, k % 4]; `unpack_int8` inverts it;
    only int8 matrices with K % 4 == 0 and N % 64 == 0 are taken."""
    w = np.random.default_rng(0).integers(-127, 128, (12, 128)).astype(np.int8)
    p = np.asarray(kernels.pack_int8(jnp.asarray(w)))
    assert p.shape == (3, 128, 4)
    k, n = np.meshgrid(np.arange(12), np.arange(128), indexing="ij")
    np.testing.assert_array_equal(p[k // 4, n, k % 4], w)
    np.testing.assert_array_equal(np.asarray(kernels.unpack_int8(jnp.asarray(p))), w)
    assert kernels.is_packed(p) and not kernels.is_packed(w)
    assert kernels.packable(jnp.asarray(w))
    assert not any(kernels.packable(jnp.asarray(v)) for v in (w[:10], w[:, :96], w.astype(np.float32)))


@pytest.mark.skipif(not kernels.wmatmul_available(), reason="the CPU kernel library")
@pytest.mark.parametrize("shape", [(4, 16), (12, 128), (40, 1040)])
def test_pack_int8_into_writes_pack_int8s_layout(shape):
    """The kernel library's packing into given memory (the engine's packed kernels in huge pages) is `pack_int8`
    byte for byte, over however many row ranges it splits into; wrong shapes, dtypes or a read-only target are
    refused before anything is written."""
    w = np.random.default_rng(1).integers(-128, 128, shape).astype(np.int8)
    out = np.full((shape[0] // 4, shape[1], 4), 7, np.int8)
    assert kernels.pack_int8_into(w, out) is out
    np.testing.assert_array_equal(out, np.asarray(kernels.pack_int8(jnp.asarray(w))))
    bad_targets = [np.empty((shape[0] // 4, shape[1], 2), np.int8), out.astype(np.uint8), out[:, ::2]]
    readonly = out.copy()
    readonly.flags.writeable = False
    for target in [*bad_targets, readonly]:
        with pytest.raises(ValueError, match="pack_int8_into"):
            kernels.pack_int8_into(w, target)
    with pytest.raises(ValueError, match="pack_int8_into"):
        kernels.pack_int8_into(w[:, :shape[1] - 8] if shape[1] > 16 else w[:, :8], out)


@needs_packed
@pytest.mark.parametrize("rows", [1, 3, 17, 40])
def test_packed_int8_kernel_equals_the_kn_layout(rows):
    """Every path of the packed kernel (VNNI at one row, the float streaming path up to 16 rows, the slivers above,
    the float path for a row holding NaN) gives the (K, N) layout's results: bit for bit at one row (the same
    integer arithmetic), up to summation order elsewhere; `matmul` takes packed weights with the kernel on and off
    (XLA: unpacked first), and the gradient through them is the (K, N) one."""
    rng = np.random.default_rng(rows)
    k, n = 1040, 192  # 4 full activation blocks + a short one, 3 column steps of 64
    x = rng.standard_normal((rows, k)).astype(np.float32)
    w = jnp.asarray(np.clip(np.rint(rng.standard_normal((k, n)) * 40), -127, 127).astype(np.int8))
    scale = jnp.asarray(rng.uniform(0.5, 2.0, n).astype(np.float32) / 40)
    packed = kernels.pack_int8(w)
    f = jax.jit(kernels.wmatmul)
    got, kn = np.asarray(f(x, packed, scale)), np.asarray(f(x, w, scale))
    if rows == 1:
        np.testing.assert_array_equal(got, kn)
    np.testing.assert_allclose(got, kn, rtol=1e-5, atol=1e-5 * np.abs(kn).max())
    for on in (True, False):
        with kernels.cpu_kernels(on):
            via = np.asarray(jax.jit(matmul)(x, packed, scale))
        np.testing.assert_allclose(via, kn, rtol=1e-4, atol=1e-4 * np.abs(kn).max())
    x[0, 9] = np.nan
    got = np.asarray(f(x, packed, scale))
    assert np.all(np.isnan(got[0])) and not np.any(np.isnan(got[1:]))
    np.testing.assert_allclose(got[1:], kn[1:], rtol=1e-5, atol=1e-5 * np.abs(kn).max())
    x[0, 9] = 0.0
    loss = lambda x, w, s: jnp.sum(jnp.sin(_kernel_matmul(x, w, s, False)))  # noqa: E731
    with kernels.cpu_kernels(True):
        gp = jax.jit(jax.grad(loss, (0, 2)))(x, packed, scale)
        gk = jax.jit(jax.grad(loss, (0, 2)))(x, w, scale)
    for a, b in zip(gp, gk):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


@needs_packed
def test_engine_keeps_packed_int8_kernels_and_releases_only_what_it_owns():
    """On one CPU device with the kernel, the decode engine holds its int8 projections in the packed layout
    (`quant.kernel_layout`; kernels whose N is not a multiple of 64 stay (K, N)), the forward through them equals
    the (K, N) one, and the arrays it was given stay the caller's unless donated (then each is deleted as soon as
    its packed form exists: one extra leaf at a time)."""
    cfg, model, params = _llama(tie=False)
    q = jax.tree.map(jnp.asarray, quant.quantize_params({"llama": params})["llama"])
    with kernels.cpu_kernels(True):
        gen = Generator(model, q, compilation_cache=False)
        flat, given = flatten_params(gen.params), flatten_params(q)
        assert flat["layers_0/self_attn/q_proj/kernel"].shape == (16, 64, 4)      # (64, 64)
        assert flat["layers_0/mlp/down_proj/kernel"].shape == (40, 64, 4)         # (160, 64)
        assert flat["layers_0/mlp/up_proj/kernel"].shape == (64, 160)             # N = 160: as it was
        assert flat["layers_0/self_attn/k_proj/kernel"].shape == (64, 32)
        assert not any(a.is_deleted() for a in given.values())
        ids = jnp.asarray(np.random.default_rng(0).integers(0, 300, (2, 5)))
        fwd = jax.jit(lambda p, i: model.apply({"params": p}, model.apply({"params": p}, i, method=Llama.embed))[0])
        for length in (1, 5):
            np.testing.assert_allclose(np.asarray(fwd(gen.params, ids[:, :length])),
                                       np.asarray(fwd(q, ids[:, :length])), rtol=1e-5, atol=1e-5)
        mine = jax.tree.map(jnp.copy, q)
        Generator(model, mine, compilation_cache=False, donate_params=True)
        deleted = {p for p, a in flatten_params(mine).items() if a.is_deleted()}
        assert deleted == {p for p, a in flat.items() if kernels.is_packed(a)}
    with kernels.cpu_kernels(False):  # XLA's dot (a mesh, an accelerator): nothing to pack
        assert not any(kernels.is_packed(a) for a in flatten_params(Generator(model, q, compilation_cache=False)
                                                                        .params).values())


def test_quantize_leaf_per_channel():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 48)).astype(np.float32) * np.linspace(0.1, 3, 48)[None]
    q, s = quant.quantize_leaf(w, "llama/layers_0/mlp/up_proj/kernel")
    assert q.dtype == np.int8 and s.shape == (48,) and np.abs(q).max() == 127
    assert np.all(np.abs(q * s[None] - w) <= s[None] / 2 + 1e-7)  # rounding error at most half a step per column
    e = rng.standard_normal((10, 8)).astype(np.float32)
    q, s = quant.quantize_leaf(e, "llama/embed_tokens/embedding")
    assert s.shape == (10,) and np.all(np.abs(q * s[:, None] - e) <= s[:, None] / 2 + 1e-7)
    with pytest.raises(quant.QuantizationError, match="choices"):
        quant.check_mode("int4")


def _llama(tie: bool = True) -> tuple[LlamaConfig, Llama, dict]:
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                      num_kv_heads=2, tie_word_embeddings=tie)
    model = Llama(cfg)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 64)))["params"])
    return cfg, model, jax.tree.map(lambda x: x * 3 if x.ndim == 2 else x, params)  # spread-out logits


@pytest.mark.parametrize("kernel", [pytest.param(True, marks=needs_kernel), False])
@pytest.mark.parametrize("tie", [True, False])
def test_llama_int8_and_bf16_close_to_float32(tie, kernel):
    """The LLaMA forward (prefill-sized and one-token) with int8 + scales and with bf16 weights stays close to
    float32; int8 quantizes the projections and the token table (tied head) and keeps the norms."""
    cfg, model, params = _llama(tie)
    q = quant.quantize_params({"llama": params})["llama"]
    flat = flatten_params(q)
    assert flat["embed_tokens/embedding"].dtype == np.int8 and "embed_tokens/embedding_scale" in flat
    assert flat["layers_0/mlp/down_proj/kernel"].dtype == np.int8 and flat["norm/scale"].dtype == np.float32
    bf = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 300, (2, 5)))
    for length in (5, 1):
        def run(p):
            with kernels.cpu_kernels(kernel):  # the FFI kernel, or XLA's dot (as on a mesh or an accelerator)
                return np.asarray(jax.jit(lambda p, i: model.apply(
                    {"params": p}, model.apply({"params": p}, i, method=Llama.embed))[0])(p, ids[:, :length]))
        ref = run(params)
        spread = np.abs(ref).max()
        assert np.abs(run(q) - ref).max() < 0.05 * spread
        assert np.abs(run(bf) - ref).max() < 0.05 * spread
        assert not np.allclose(run(q), ref, atol=1e-6)  # int8 really is in play


def test_which_matmuls_take_the_cpu_kernel(monkeypatch):
    """Low-precision and int8 weights always (XLA would widen them whole); float32 weights only at the few rows of
    decoding and short prefills (`F32_KERNEL_ROWS`: 2-8 rows with 8-lane vectors, 1-4 with AVX-512's 16, every row
    count on an Intel AVX-512 CPU: a (width, vendor) entry overrides the width's), and only when computed in
    float32; bf16 weights computed in bf16 go to XLA's dot on AMX from `BF16_XLA_MIN_ROWS` rows; and a float32
    product through the kernel equals XLA's up to summation order."""
    f32, bf16 = jnp.float32, jnp.bfloat16
    with kernels.cpu_kernels(True):
        assert all(layers._use_cpu_kernel(w, rows, f32) for w in (bf16, jnp.float16, jnp.int8) for rows in (1, 64))
        lanes, vendor = kernels.vector_lanes(), kernels.cpu_vendor()
        assert lanes in (8, 16) and vendor in ("intel", "amd", "")
        lo, hi = {8: (2, 8), 16: (1, 10**9) if vendor == "intel" else (1, 4)}[lanes]
        for rows in (1, 2, 4, 5, 8, 16, 17, 128, 4096):
            assert layers._use_cpu_kernel(f32, rows, f32) == (lo <= rows <= hi), rows
        # bf16 weights computed in bf16: XLA's dot from BF16_XLA_MIN_ROWS rows on where the CPU has AMX-BF16
        big = layers.BF16_XLA_MIN_ROWS
        assert [layers._use_cpu_kernel(bf16, rows, bf16) for rows in (1, big - 1, big, 4 * big)] == [
            True, True, not kernels.amx_bf16(), not kernels.amx_bf16()]
        assert layers._use_cpu_kernel(bf16, 4 * big, f32) and layers._use_cpu_kernel(jnp.float16, 4 * big, jnp.float16)
        monkeypatch.setitem(layers.F32_KERNEL_ROWS, (lanes, vendor), (3, 5))
        assert [layers._use_cpu_kernel(f32, rows, f32) for rows in (2, 3, 5, 6)] == [False, True, True, False]
        assert not layers._use_cpu_kernel(f32, 4, bf16)  # cast to the compute dtype first, as nn.Dense does
        rng = np.random.default_rng(0)
        x, w = jnp.asarray(rng.standard_normal((4, 96)), f32), jnp.asarray(rng.standard_normal((96, 40)), f32)
        np.testing.assert_allclose(np.asarray(jax.jit(layers.matmul)(x, w)), np.asarray(x) @ np.asarray(w),
                                   rtol=1e-5, atol=1e-4)
    with kernels.cpu_kernels(False):
        assert not layers._use_cpu_kernel(bf16, 4, f32)


@needs_kernel
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_attention_kernel_against_float64(dtype):
    """The attention kernel against float64 numpy at a decode step's and a prefill's shapes with long caches (the
    keys 16 at a time summed by the lane shuffle tree, the ragged last vector, the vectorised exp over scores spread
    wide, grouped-query heads): float32 to 1e-5, a half-precision cache to its rounding of the probabilities."""
    rng = np.random.default_rng(0)
    lanes = kernels.vector_lanes()
    for b, lq, h, hkv, s, d in [(1, 1, 9, 3, 1088, 64), (2, 1, 4, 4, 513, 128), (1, 20, 6, 2, 255, 64),
                                (1, 3, 2, 1, 33, lanes), (1, 2, 2, 2, 70, 256)]:
        q = (4 * rng.standard_normal((b, lq, h, d))).astype(np.float32)
        k = jnp.asarray(rng.standard_normal((b, hkv, s, d)), dtype)
        v = jnp.asarray(rng.standard_normal((b, hkv, s, d)), dtype)
        causal = np.arange(s)[None, :] <= (s - lq + np.arange(lq))[:, None]
        bias = np.where(causal, 0.0, np.finfo(np.float32).min).astype(np.float32)[None, None]
        got = np.asarray(jax.jit(lambda *a: kernels.attention(*a, d ** -0.5))(q, k, v, bias))
        kf, vf = (np.repeat(np.asarray(x, np.float64), h // hkv, axis=1) for x in (k, v))
        scores = np.einsum("blhd,bhsd->bhls", q.astype(np.float64), kf) * d ** -0.5 + np.where(causal, 0, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        want = np.einsum("bhls,bhsd->blhd", probs / probs.sum(-1, keepdims=True), vf)
        tol = 1e-5 if dtype == "float32" else 1e-2
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=str((b, lq, h, hkv, s, d)))


@needs_kernel
@pytest.mark.skipif(not kernels.amx_bf16(), reason="int8 products in AMX tiles need a CPU with AMX-BF16")
@pytest.mark.parametrize("packed", [False, True])
def test_int8_prefill_in_amx_tiles(packed):
    """A bf16-compute product of `INT8_AMX_MIN_ROWS` rows or more with int8 weights takes XLA's dot in AMX tiles on
    the weight converted to bf16 (exactly, either layout), the per-channel scale after: against float64 to bf16's
    rounding of the output, fewer rows stay on the kernel, and the gradient reaches x."""
    rng = np.random.default_rng(packed)
    k, n, rows = 256, 192, layers.INT8_AMX_MIN_ROWS + 3
    w = jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8)
    scale = jnp.asarray(rng.uniform(0.001, 0.01, n), jnp.float32)
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
    wk = kernels.pack_int8(w) if packed else w
    with kernels.cpu_kernels(True):
        np.testing.assert_array_equal(np.asarray(jax.jit(kernels.int8_as_bf16)(wk, x), np.float32),
                                      np.asarray(w, np.float32))
        fn = jax.jit(lambda x, w, s: matmul(x, w, s, dtype=jnp.bfloat16))
        got = np.asarray(fn(x, wk, scale), np.float32)
        assert kernels.INT8_BF16_TARGET in fn.lower(x, wk, scale).as_text()
        assert kernels.INT8_BF16_TARGET not in fn.lower(x[:layers.INT8_AMX_MIN_ROWS - 1], wk, scale).as_text()
        grad = jax.grad(lambda x: jnp.sum(matmul(x, wk, scale, dtype=jnp.bfloat16).astype(jnp.float32)))(x)
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64) * np.asarray(scale, np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * np.abs(want).max())
    w_scaled = np.asarray(w, np.float64) * np.asarray(scale, np.float64)
    np.testing.assert_allclose(np.asarray(grad, np.float32), np.broadcast_to(w_scaled.sum(1), (rows, k)), rtol=2e-2,
                               atol=1e-3)


def _cache_attention_case(rng, b, lq, hkv, group, s, dh, dt):
    """q, k, v and a bias with everything a cache meets: causal rows ending at the last slot, padding holes
    (float32's lowest), a plain additive bias (-1e9 and small values), and one row whose every key is masked."""
    q = jnp.asarray(rng.standard_normal((b, lq, hkv * group, dh)), dt)
    k = jnp.asarray(rng.standard_normal((b, hkv, s, dh)), dt)
    v = jnp.asarray(rng.standard_normal((b, hkv, s, dh)), dt)
    slot = np.arange(s)
    allowed = (slot[None, None, :] <= (s - lq + np.arange(lq))[None, :, None]) & (rng.random((b, 1, s)) > 0.2)
    allowed[0, 0] = False
    bias = np.where(allowed, rng.uniform(-1, 1, allowed.shape), np.finfo(np.float32).min)
    bias[-1, -1, : s // 4] = -1e9
    return q, k, v, jnp.asarray(bias[:, None], jnp.float32)


@needs_kernel
@pytest.mark.parametrize("cache_dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("hkv,group,lq", [(4, 1, 1), (2, 3, 1), (4, 1, 2), (2, 3, 40)])
@pytest.mark.parametrize("torch_scores", [False, True])
def test_attention_over_the_kv_cache_is_one_kernel_call(cache_dtype, hkv, group, lq, torch_scores):
    """A step's attention over the (B, Hkv, S, Dh) cache, decode (1-2 query rows) or prefill (40): through the CPU
    kernel (scores, softmax and values in one call) it equals XLA's einsums (float32 to rounding; a half-precision
    cache, and upstream's rounded scores, to a rounding of the output), masked keys skipped or not; the compiled
    program makes one kernel call that reads the cache as it is (no reshaped or float32 copy) and q and the output
    in their own layout (no transposition)."""
    rng = np.random.default_rng(hkv + group + lq)
    b, s, dh = 2, 40, 16
    dt = jnp.dtype(cache_dtype)
    q, k, v, bias = _cache_attention_case(rng, b, lq, hkv, group, s, dh, dt)

    def attend(q, k, v, bias):
        return layers.dot_product_attention(q, k, v, bias, kv_heads_first=True, half_precision_scores=torch_scores)

    with kernels.cpu_kernels(True):
        fn = jax.jit(attend)
        got = np.asarray(fn(q, k, v, bias), np.float32)
        hlo = fn.lower(q, k, v, bias).compile().as_text()
    with kernels.cpu_kernels(False):
        want = np.asarray(jax.jit(attend)(q, k, v, bias), np.float32)
    tol = 1e-5 if cache_dtype == "float32" else 2e-2 if torch_scores else 1e-2
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    assert hlo.count(kernels.ATTENTION_TARGET) == 1 and kernels.TARGET not in hlo
    assert f"[{b * hkv},{s},{dh}]" not in hlo and " transpose(" not in hlo
    if cache_dtype != "float32":
        assert f"f32[{b},{hkv},{s},{dh}]" not in hlo


@needs_kernel
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("dh", [16, 48, 64])  # halves below one AVX-512 vector, a vector and a tail, whole vectors
@pytest.mark.parametrize("lq", [1, 40])
def test_attention_kernel_rotates_q_as_it_loads_it(dtype, dh, lq):
    """`dot_product_attention(..., rope=(cos, sin))` through the kernel (q rotated as its rows are loaded, rounded as
    XLA rounds the rotation in q's dtype) equals XLA's rotation then attention, as the unrotated kernel does; the
    program has no rotation of its own; the backward pass differentiates the rotation too."""
    rng = np.random.default_rng(dh + lq)
    q, k, v, bias = _cache_attention_case(rng, 2, lq, 2, 3, 40, dh, jnp.dtype(dtype))
    cos, sin = llama.rope_cos_sin(jnp.asarray(rng.integers(0, 3000, (2, lq))), dh, 1e4)

    def attend(q, k, v):
        return layers.dot_product_attention(q, k, v, bias, kv_heads_first=True, rope=(cos, sin))

    with kernels.cpu_kernels(True):
        fn = jax.jit(attend)
        got = np.asarray(fn(q, k, v), np.float32)
        hlo = fn.lower(q, k, v).compile().as_text()
    with kernels.cpu_kernels(False):
        want = np.asarray(jax.jit(attend)(q, k, v), np.float32)
    tol = 1e-5 if dtype == "float32" else 1e-2
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    assert hlo.count(kernels.ATTENTION_TARGET) == 1 and " concatenate(" not in hlo
    if dtype == "float32":
        def loss(q, k, v, enabled):
            with kernels.cpu_kernels(enabled):
                return jnp.sum(jnp.sin(attend(q, k, v)))

        for x, y in zip(jax.grad(loss, argnums=(0, 1, 2))(q, k, v, True),
                        jax.grad(loss, argnums=(0, 1, 2))(q, k, v, False)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_attention_kernel_skips_nothing_it_should_not():
    """The kernel's choices, pinned against XLA in float32: rows whose allowed keys are far apart (a hole between),
    a row allowed only its first or only its last key, a row with no allowed key (every key equally likely, as XLA's
    softmax of equal scores), no bias at all, and an odd head size it does not take (XLA's attention then, no call);
    the backward pass through it (a loss over a cached prompt prefix) is XLA's."""
    rng = np.random.default_rng(0)
    b, lq, h, s, dh = 1, 5, 2, 50, 16
    q = jnp.asarray(rng.standard_normal((b, lq, h, dh)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, h, s, dh)), jnp.float32) for _ in range(2))
    lowest = np.finfo(np.float32).min
    bias = np.full((b, 1, lq, s), lowest, np.float32)
    bias[0, 0, 0, [3, 45]] = 0.0  # two keys far apart
    bias[0, 0, 1, 0] = 0.0        # the first key only
    bias[0, 0, 2, s - 1] = 0.0    # the last key only
    bias[0, 0, 4, :] = 0.5        # every key (row 3: none)

    def attend(q, k, v, bias):
        return layers.dot_product_attention(q, k, v, bias, kv_heads_first=True)

    for args in ((q, k, v, None), (q, k, v, jnp.asarray(bias))):
        with kernels.cpu_kernels(True):
            got = np.asarray(jax.jit(attend)(*args))
        with kernels.cpu_kernels(False):
            want = np.asarray(jax.jit(attend)(*args))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[0, 3], np.asarray(v).mean(axis=2)[0], rtol=1e-5, atol=1e-6)  # row 3: uniform
    odd = jnp.zeros((b, lq, h, 12)), jnp.zeros((b, h, s, 12)), jnp.zeros((b, h, s, 12)), jnp.asarray(bias)
    with kernels.cpu_kernels(True):
        assert kernels.ATTENTION_TARGET not in jax.jit(attend).lower(*odd).as_text()

    def loss(q, k, v, enabled):
        with kernels.cpu_kernels(enabled):
            return jnp.sum(jnp.sin(attend(q, k, v, jnp.asarray(bias))))

    g_kernel = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, True)
    g_xla = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, False)
    for x, y in zip(g_kernel, g_xla):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def saved(tiny_dir, tiny_tok, tmp_path_factory):
    cfg = load_model_config(TINY_CONFIG)
    params = load_upstream(cfg, tiny_files(tiny_dir, "blip2", "llama", "vl_ckpt"))
    out = tmp_path_factory.mktemp("q") / "model"
    save_model_dir(out, cfg, params, tokenizer=tiny_tok)
    return out, params


def test_load_model_dir_quantize_int8(saved, monkeypatch):
    """quantize="int8" reads the LLM leaf-chunk by leaf-chunk (a 1-byte chunk limit: one leaf at a time) and gives
    exactly `quantize_params` of the float model; the towers stay float."""
    path, params = saved
    monkeypatch.setattr("vllama_jax.weights.model_dir.QUANTIZE_CHUNK_BYTES", 1)
    m = load_model_dir(path, quantize="int8")
    want = flatten_params(quant.quantize_params({"llama": params["llama"]}))
    got = flatten_params(m.params)
    for p, v in want.items():
        assert got[p].dtype == v.dtype, p
        np.testing.assert_array_equal(np.asarray(got[p]), v, err_msg=p)
    assert got["llama_proj/kernel"].dtype == np.float32
    assert quant.resident_bytes(m.params["llama"]) < 0.3 * quant.resident_bytes(params["llama"])
    with pytest.raises(quant.QuantizationError):
        load_model_dir(path, quantize="int3")


def test_convert_dtype_int8_writes_the_quantized_llm(tiny_dir, tmp_path):
    """`convert --dtype int8`: the LLM leaves are written as `quantize_params` makes them (manifest says so), the
    directory loads as int8 without options, and the loaded model runs."""
    from vllama_jax.cli import main as cli_main

    float_dir, int8_dir = tmp_path / "f32", tmp_path / "int8"
    for out, extra in ((float_dir, []), (int8_dir, ["--dtype", "int8"])):
        assert cli_main(["convert", "--llama", str(tiny_dir / "llama"), "--out", str(out), *extra]) == 0
    ref = load_model_dir(float_dir)
    m = load_model_dir(int8_dir)
    assert m.manifest[quant.MANIFEST_KEY] == {"llama": "int8"}
    want = flatten_params(quant.quantize_params(ref.params))
    got = flatten_params(m.params)
    assert set(got) == set(want)
    for p, v in want.items():
        np.testing.assert_array_equal(np.asarray(got[p]), np.asarray(v), err_msg=p)
    assert flatten_params(load_model_dir(int8_dir, quantize="int8").params).keys() == got.keys()
