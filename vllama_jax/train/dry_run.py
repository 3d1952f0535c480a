"""The dry run (`vllama-jax train --dry-run`): the train step compiled ahead of time for the configured mesh from
shapes only (no parameter is allocated, no weight file is read), and the bytes one device would hold. With
`tpu_topology_devices` the mesh can be a TPU slice that is not there (deviceless compilation through libtpu)."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies

from ..config import ConfigError
from ..data import LAYOUTS, Dims, PreparedDataset, batch_spec, caption_prompt_list
from ..data.batch import CACHED_KIND
from ..sharding import batch_sharding
from ..text import prompt_wrap_ids, split_prompt
from .config import TrainConfig, resolve_path
from .data import branch_image_size, frame_feature_shape
from .metrics import compiled_flops

if TYPE_CHECKING:  # pragma: no cover
    from .loop import Trainer


def tpu_topology_devices(name: str) -> list[Any]:
    """The devices of a TPU slice described by name (e.g. "v5p:2x2x1"), for compiling without TPUs (deviceless
    ahead-of-time compilation through libtpu: `pip install libtpu`, or TPU_LIBRARY_PATH)."""
    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
    except Exception as e:  # noqa: BLE001 - jax raises assorted errors when libtpu is absent or the name is bad
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--dry-run-topology {name}: no TPU compiler for it ({first}); install libtpu "
                          f"(pip install 'libtpu==0.0.42.*' for jax 0.10) or set TPU_LIBRARY_PATH") from None


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded arrays / ShapeDtypeStructs with shardings (largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


def _gib(n: float) -> str:
    return f"{n / 2**30:9.3f} GiB"


# ----------------------------------------------------------------------------------------------------------------
# the batches of the stage, from shapes


def dataset_kinds(cfg: TrainConfig) -> set[str]:
    """The batch kinds of the stage's datasets (from their manifests when readable, else guessed from the names)."""
    d = cfg.data
    if d.synthetic.num_examples:
        return {"caption"}
    kinds = set()
    for name, ds in d.datasets.items():
        try:
            kinds.add(PreparedDataset.open(resolve_path(ds.path)).kind)
        except Exception:  # noqa: BLE001 - datasets not prepared on this machine: guess from the name
            kinds.add("instruction" if "instruct" in name else "caption")
    return kinds


def _prompt_lengths(trainer: "Trainer", prompt: str) -> tuple[list[int], list[int]]:
    try:
        return prompt_wrap_ids(prompt, trainer.tokenizer)
    except Exception:  # noqa: BLE001 - no tokenizer files for a dry run: ~3 characters per token
        before, after = split_prompt(prompt)
        return [0] * (len(before) // 3 + 1), [0] * (len(after) // 3 + 1)


def abstract_batches(trainer: "Trainer") -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
    """{kind: batch shapes} of the stage (`data.batch` specs: caption and/or instruction, or their cached-feature
    layouts with ``data.features: cached``), largest frame count,
    longest prompt, sharded as the device put shards them."""
    cfg, d = trainer.cfg, trainer.cfg.data
    prompts = caption_prompt_list(d.prompts, d.prompt_template)
    before, after = 0, 0
    if prompts:
        before, after = max(((len(x), len(y)) for x, y in (_prompt_lengths(trainer, p) for p in prompts)), key=sum)
    dims = Dims(batch=d.batch_size, frames=d.num_frames, image_size=branch_image_size(cfg.branch, trainer.model_config),
                max_txt_len=d.max_txt_len, max_len=d.max_len, prompt_before=before, prompt_after=after,
                frame_feature=frame_feature_shape(cfg.branch, trainer.model_config))
    kinds = dataset_kinds(cfg)
    if trainer.cached:  # the layouts of a feature cache's batches
        kinds = {CACHED_KIND[k] for k in kinds}
    out = {}
    for kind in (k for k in LAYOUTS if k in kinds):
        spec = batch_spec(kind)
        out[kind] = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=trainer.replicated if k in spec.shared_keys
                                             else batch_sharding(trainer.mesh, len(shape), shape))
                     for k, (shape, dtype) in spec.shapes(dims, shared=bool(prompts)).items()}
    return out


# ----------------------------------------------------------------------------------------------------------------


def dry_run(trainer: "Trainer", device_memory_gib: float | None = None) -> list[dict[str, Any]]:
    """Compile the trainer's step for each batch kind of the stage from shapes only and report bytes per device
    (also printed, `format_dry_run`)."""
    sds = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)  # noqa: E731
    params, opt = trainer.abstract_state()
    state = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=trainer.replicated), "params": params,
             "opt_state": opt}
    frozen = {g: jax.tree.map(sds, trainer.abstract[g], trainer.shardings[g]) for g in trainer.frozen_groups}
    reports = []
    for kind, batch in abstract_batches(trainer).items():
        t = time.perf_counter()
        compiled = trainer.jitted.lower(state, frozen, batch, kind).compile(trainer.compiler_options)
        mem = compiled.memory_analysis()
        r = {"kind": kind, "compile_s": time.perf_counter() - t,
             "devices": trainer.mesh.size, "mesh": dict(trainer.mesh.shape),
             "batch_shapes": {k: tuple(v.shape) for k, v in batch.items()},
             "trainable_params": per_device_bytes(params), "optimizer_state": per_device_bytes(opt),
             "frozen_params": per_device_bytes(frozen), "batch": per_device_bytes(batch),
             "xla_arguments": mem.argument_size_in_bytes, "xla_outputs": mem.output_size_in_bytes,
             "xla_aliased": mem.alias_size_in_bytes, "activations_temp": mem.temp_size_in_bytes,
             "generated_code": mem.generated_code_size_in_bytes,
             "flops_per_device": compiled_flops(compiled)}
        r["peak_estimate"] = (r["xla_arguments"] + r["xla_outputs"] - r["xla_aliased"] + r["activations_temp"]
                              + r["generated_code"])
        reports.append(r)
        trainer._log(format_dry_run(trainer.cfg.name, r, device_memory_gib))
    return reports


def format_dry_run(name: str, r: Mapping[str, Any], device_memory_gib: float | None = None) -> str:
    lines = [f"dry run {name}: {r['kind']} step on {r['devices']} devices, mesh {r['mesh']}, "
             f"compiled in {r['compile_s']:.1f} s",
             f"  batch {r['batch_shapes']}",
             "  bytes per device:",
             f"    trainable params (fp32)      {_gib(r['trainable_params'])}",
             f"    optimizer state (AdamW)      {_gib(r['optimizer_state'])}",
             f"    frozen params                {_gib(r['frozen_params'])}",
             f"    batch                        {_gib(r['batch'])}",
             f"    activations + XLA temporaries{_gib(r['activations_temp'])}",
             f"    XLA arguments / outputs / aliased(donated) {_gib(r['xla_arguments']).strip()} / "
             f"{_gib(r['xla_outputs']).strip()} / {_gib(r['xla_aliased']).strip()}",
             f"    peak estimate                {_gib(r['peak_estimate'])}"]
    if device_memory_gib:
        frac = r["peak_estimate"] / (device_memory_gib * 2**30)
        lines.append(f"    of {device_memory_gib:g} GiB per device: {100 * frac:.1f}% "
                     f"({'fits' if frac <= 1 else 'DOES NOT FIT'})")
    if r.get("flops_per_device"):
        lines.append(f"  {r['flops_per_device'] / 1e12:.3f} TFLOP per device per step (XLA cost analysis)")
    return "\n".join(lines)
