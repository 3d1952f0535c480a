"""Training input: the grain pipeline of `vllama_jax.data` built from a TrainConfig, an in-memory synthetic caption
source with the same interface, and the assembly of per-process batches into global arrays on the mesh.

Every process builds only its own rows of each global batch (the pipeline reads the process's shard of every
dataset); `global_batch` joins them with `jax.make_array_from_process_local_data`, batch axis over (data, fsdp).
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any, Mapping

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..config import ConfigError, ModelConfig
from ..data import CAPTION, DatasetSpec, PipelineConfig, batch_spec, build_train_iterator, with_caption_prompts
from ..data.features import cache_name
from ..sharding import batch_sharding
from ..text import caption_tokens, load_tokenizer
from .config import SyntheticDataConfig, TrainConfig, resolve_path


def branch_image_size(branch: str, model_config: ModelConfig) -> int:
    """Frames go to the EVA ViT (vision branch) or to ImageBind's vision tower (audio branch, upstream.md §1.3)."""
    return model_config.imagebind_vision.image_size if branch == "audio" else model_config.vit.image_size


def frame_feature_shape(branch: str, model_config: ModelConfig) -> tuple[int, ...]:
    """The shape of one frame's frozen-tower output for a branch (`VideoLLaMA.frozen_frame_features`): the image
    Q-Former's (queries, hidden), or ImageBind's vision embedding (out_dim,)."""
    if branch == "audio":
        return (model_config.imagebind_vision.out_dim,)
    return (model_config.qformer.num_query_tokens, model_config.qformer.hidden_size)


def towers_fingerprint(branch: str, model_config: ModelConfig) -> str:
    """What a feature cache's frozen towers are, as far as the model config tells: a hash of the config sections
    of the towers the branch's cache comes from (architecture, image size, compute precision). Two model
    directories with the same architecture but other weights hash the same: the cache records its model folder
    too, for the user to see."""
    d = model_config.to_dict()
    keys = ("vit", "qformer") if branch == "video" else ("imagebind_vision",)
    p = d["precision"]
    prec = {k: p[k] for k in (("vit", "qformer", "vit_params") if branch == "video" else ("imagebind",))}
    blob = json.dumps({"branch": branch, **{k: d[k] for k in keys}, "precision": prec}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def num_query_tokens(cfg: TrainConfig, model_config: ModelConfig) -> int:
    return (model_config.audio_qformer if cfg.branch == "audio" else model_config.video_qformer).num_query_tokens


def pipeline_config(cfg: TrainConfig, model_config: ModelConfig, tokenizer_path: str, *, process_index: int,
                    process_count: int) -> PipelineConfig:
    """The data pipeline's settings of the stage (per-process batch)."""
    d = cfg.data
    if d.batch_size % process_count:
        raise ConfigError(f"data.batch_size: {d.batch_size} is not divisible by the {process_count} processes")
    return PipelineConfig(
        tokenizer=tokenizer_path, batch_size=d.batch_size // process_count, seed=cfg.seed, num_frames=d.num_frames,
        image_size=branch_image_size(cfg.branch, model_config), train=d.augment, end_sym=d.end_sym,
        max_txt_len=d.max_txt_len, template=d.template or model_config.template,
        num_query_tokens=num_query_tokens(cfg, model_config), max_len=d.max_len, num_workers=d.num_workers,
        reuse_worker_memory=d.reuse_worker_memory,
        process_index=process_index, process_count=process_count, prompts=d.prompts,
        prompt_template=d.prompt_template,
        features=cache_name(cfg.branch, d.num_frames) if d.features == "cached" else "",
        feature_towers=towers_fingerprint(cfg.branch, model_config) if d.features == "cached" else "")


def build_data_iterator(cfg: TrainConfig, model_config: ModelConfig, tokenizer_path: str, *,
                        process_index: int, process_count: int) -> Any:
    """The iterator of per-process batches (a `grain.DatasetIterator`, checkpointable) for the stage."""
    pcfg = pipeline_config(cfg, model_config, tokenizer_path, process_index=process_index,
                           process_count=process_count)
    if cfg.data.synthetic.num_examples:
        return synthetic_iterator(cfg.data.synthetic, pcfg)
    specs = [DatasetSpec(path=str(resolve_path(ds.path)), sample_ratio=ds.sample_ratio, name=name,
                         sampling=ds.sampling or None, text_processor=ds.text_processor or None,
                         video_message=ds.video_message) for name, ds in cfg.data.datasets.items()]
    return build_train_iterator(specs, pcfg)


# ----------------------------------------------------------------------------------------------------------------
# synthetic captions

_CLASS_CAPTIONS = ("a red ball rolls on grass", "a dog runs on the beach", "two people talk in a kitchen",
                   "a car drives at night", "a cat sleeps on a sofa", "waves crash on rocks",
                   "a man rides a bicycle", "snow falls on a forest")


class SyntheticCaptions:
    """Global batch `i` of a deterministic caption dataset, restricted to this process's rows.

    Example `j` belongs to class `c = j % num_classes`; its frames are the class's fixed random pattern plus noise
    (seeded by j), its caption the class's sentence: the frames determine the caption, so a model that learns
    lowers the loss well below the caption-prior level. Batch `i` holds examples `(i * B + r) % n`, r < B.
    """

    def __init__(self, *, num_examples: int, num_classes: int, noise: float, seed: int, global_batch: int,
                 frames_shape: tuple[int, int, int], text_ids: np.ndarray, text_mask: np.ndarray,
                 process_index: int = 0, process_count: int = 1):
        self.n, self.k, self.noise, self.seed = num_examples, num_classes, noise, seed
        self.global_batch, self.frames_shape = global_batch, frames_shape
        self.text_ids, self.text_mask = text_ids, text_mask  # (num_classes, L) each
        per = global_batch // process_count
        self.rows = np.arange(process_index * per, (process_index + 1) * per)
        rng = np.random.default_rng([seed, 0x5EED])
        self.patterns = rng.normal(size=(num_classes,) + tuple(frames_shape) + (3,)).astype(np.float32)

    def __call__(self, step: int) -> dict[str, Any]:
        ids = (int(step) * self.global_batch + self.rows) % self.n
        cls = ids % self.k
        frames = np.stack([self.patterns[c] + self.noise * np.random.default_rng([self.seed, int(j)]).normal(
            size=self.patterns.shape[1:]).astype(np.float32) for j, c in zip(ids, cls)])
        arrays = CAPTION.arrays({"frames": frames, "text_ids": self.text_ids[cls], "text_mask": self.text_mask[cls]})
        return arrays | {"example_id": ids.astype(np.int64), "kind": CAPTION.kind, "dataset": "synthetic"}


def synthetic_iterator(s: SyntheticDataConfig, pcfg: PipelineConfig) -> grain.DatasetIterator:
    """`SyntheticCaptions` as a grain iterator (stage-2 prompts added as the pipeline adds them)."""
    captions = [_CLASS_CAPTIONS[c % len(_CLASS_CAPTIONS)] + (f" {c}" if c >= len(_CLASS_CAPTIONS) else "")
                for c in range(s.num_classes)]
    ids, mask = caption_tokens(captions, load_tokenizer(pcfg.tokenizer), pcfg.end_sym, pcfg.max_txt_len,
                               pad_to=pcfg.max_txt_len)
    source = SyntheticCaptions(num_examples=s.num_examples, num_classes=s.num_classes, noise=s.noise,
                               seed=pcfg.seed, global_batch=pcfg.batch_size * pcfg.process_count,
                               frames_shape=(pcfg.num_frames, pcfg.image_size, pcfg.image_size),
                               text_ids=ids, text_mask=mask, process_index=pcfg.process_index,
                               process_count=pcfg.process_count)
    # a grain MapDataset over step indices: its iterator state ({"next_index"}) checkpoints like the real pipeline
    return iter(with_caption_prompts(grain.MapDataset.range(sys.maxsize).map(source), pcfg).to_iter_dataset())


# ----------------------------------------------------------------------------------------------------------------
# device placement


def global_batch(local: Mapping[str, Any], mesh: Mesh, process_count: int) -> dict[str, jax.Array]:
    """The device arrays of a per-process batch, laid out by its kind's spec: the per-example rows of every process
    joined into global arrays sharded over (data, fsdp) on the batch axis; the shared rows (the stage-2 prompt, the
    same on every process) replicated."""
    spec = batch_spec(local["kind"])
    out = {}
    for k, x in spec.arrays(local).items():
        if k in spec.shared_keys:
            out[k] = replicated(x, mesh)
        else:
            shape = (x.shape[0] * process_count,) + x.shape[1:]
            out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim, shape), x, shape)
    return out


def replicated(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """The same host array on every device of the mesh (safe with several processes)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, PartitionSpec()), lambda idx: x[idx])
