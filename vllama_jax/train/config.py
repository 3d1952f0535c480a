"""Typed training config: one YAML file per upstream stage (`configs/train_*.yaml`), `--set key=value` overrides.

The layout follows upstream's `train_configs/*.yaml` (upstream.md §8.1) regrouped into sections:

    name, seed, mesh, max_steps, output_dir, compilation_cache, compiler_options,
    frozen_video_qformer, frozen_audio_qformer, frozen_llama_proj, dropout
    model:      config | dir, overrides, precision, remat_vit, remat_llama, scan_layers
    weights:    upstream files of the frozen towers (when no model dir), llama_proj_model, ckpt, ckpt_2, tokenizer
    data:       datasets {name: {path, sample_ratio, ...}} | synthetic, batch_size (global), num_frames, end_sym,
                max_txt_len, prompts, prompt_template, template, max_len, num_workers, reuse_worker_memory,
                augment, features
    optim:      optimizer, lr_sched, init_lr, min_lr, warmup_lr, warmup_steps, iters_per_epoch, max_epoch,
                weight_decay, beta1, beta2, eps, grad_accum, clip_grad_norm, muon_lr_ratio
    checkpoint: every, keep, async_save          (directory: {output_dir}/checkpoints)
    log:        every, peak_tflops               (directory: {output_dir}/logs)
    distributed: coordinator, num_processes, process_id, auto
    lora:       rank (0 = off), alpha, dropout, targets [q, k, v, o, gate, up, down]   (adapters on the frozen LLM)

Unknown keys and impossible values raise `ConfigError` naming the dotted key (same rules as `vllama_jax.config`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..config import (ConfigError, LoraConfig, ModelConfig, from_dict, load_config_dict, override_dict, require,
                      require_at_least, require_positive)
from ..eval.tasks import TASKS
from ..sharding import MeshSpecError, parse_mesh_spec
from ..text import IMAGE_PLACEHOLDER, STAGE2_PROMPT_TEMPLATE

PRECISIONS = ("model", "float32", "bfloat16")
#: where a step's media input comes from (`data.features`)
FEATURE_SOURCES = ("frames", "cached")
LR_SCHEDULES = ("linear_warmup_cosine_lr",)
#: ``optim.optimizer``: upstream's AdamW, or Muon for the trained 2-D kernels (``train.optimizer.make_optimizer``)
OPTIMIZERS = ("adamw", "muon")
REPO_ROOT = Path(__file__).resolve().parents[2]


def with_precision(mc: ModelConfig, mode: str) -> ModelConfig:
    """Apply the training precision preset; trained params are always fp32 master weights."""
    p = mc.precision
    if mode == "float32":
        p = type(p)()
    elif mode == "bfloat16":
        bf = "bfloat16"
        # jax arithmetic: float32 attention scores, no torch-style rounding of the stream (an inference fidelity mode)
        p = dataclasses.replace(p, vit=bf, qformer=bf, imagebind=bf, llama=bf, vit_params=bf, llama_params=bf,
                                llama_arithmetic="jax")
    return dataclasses.replace(mc, precision=dataclasses.replace(p, trainable_params="float32"))


@dataclass(frozen=True)
class ModelSource:
    """Where the architecture (and possibly the frozen towers) come from: a model config YAML or a converted model
    directory (`convert_weights.py` output), exactly one of the two."""

    config: str = ""
    dir: str = ""
    overrides: tuple[str, ...] = ()  # `key=value` applied to the model config (e.g. "llama.num_layers=4")
    # "model": the model config's precision section as written (bf16 LLaMA / fp16 ViT for the released configs);
    # "float32": everything fp32 (CPU, parity tests); "bfloat16": bf16 compute and frozen weights.
    # Trained parameters and their optimizer state are always fp32 (master weights).
    precision: str = "model"
    remat_vit: bool = False
    remat_llama: bool = False
    # the LLaMA layers and the ViT blocks each as one scan over stacked parameters: compiled once instead of once
    # per layer (the stacked layout is the step's view; checkpoints and model directories keep layers_{i} /
    # blocks_{i}; LoRA adapters too)
    scan_layers: bool = False


@dataclass(frozen=True)
class WeightsConfig:
    """Upstream files (upstream.md §10.1). With `model.dir` only the init checkpoints below it are read from here."""

    eva_vit: str = ""
    blip2: str = ""
    imagebind: str = ""
    llama: str = ""  # HF folder (also the default tokenizer)
    llama_proj_model: str = ""  # MiniGPT-4 projection (VL stage 1 init of llama_proj)
    ckpt: str = ""  # Video-LLaMA checkpoint (.pth) or one of our training checkpoint dirs, loaded non-strictly
    ckpt_2: str = ""  # a second one, loaded after `ckpt` (AL stage 2: the AL stage-1 output)
    tokenizer: str = ""  # default: weights.llama, else the model dir
    trainable_from_model_dir: bool = False  # start the trained groups from the model dir instead of fresh init
    random_frozen: bool = False  # random frozen towers when no file is given (benchmarks, smoke runs only)


@dataclass(frozen=True)
class DatasetConfig:
    """One `datasets:` entry: a folder written by `vllama-jax prepare`."""

    path: str = ""
    sample_ratio: float = 1.0
    sampling: str = ""  # "" = the format's default ("headtail" WebVid, else "uniform")
    text_processor: str = ""  # "" = the format's default ("blip_caption" / "none")
    video_message: bool = True


@dataclass(frozen=True)
class SyntheticDataConfig:
    """Generated caption data held in memory (no files): frames whose content determines the caption. For tests,
    benchmarks and smoke runs; `num_examples: 0` = off."""

    num_examples: int = 0
    num_classes: int = 8
    noise: float = 0.1


@dataclass(frozen=True)
class DataConfig:
    datasets: dict[str, DatasetConfig] = field(default_factory=dict)
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    batch_size: int = 32  # GLOBAL batch of one optimizer step (upstream: batch_size_train x number of GPUs)
    num_frames: int = 8
    augment: bool = True  # train-time random crops (alpro_video_train / blip2_image_train)
    end_sym: str = "\n"
    max_txt_len: int = 32
    prompts: tuple[str, ...] = ()  # caption prompts (each with one <ImageHere>); stage 2 only
    prompt_template: str = ""  # "", a template name ("vicuna", "llama_2") or a format string with {}
    template: str = ""  # instruction conversation template; "" = the model config's
    max_len: int = 512  # instruction batches: padded length
    num_workers: int = 0  # grain worker processes
    # the workers hand frames over through memory they reuse (Linux; `vllama_jax.data.transport`); false: a
    # fresh shared-memory block per batch (grain's way), for systems that forbid reading /proc/<pid>/fd
    reuse_worker_memory: bool = True
    # "frames": decode the media and run the frozen towers every step; "cached": read the towers' output from
    # each dataset's feature cache (`vllama-jax encode`), the step skips the towers
    features: str = "frames"


@dataclass(frozen=True)
class OptimConfig:
    """AdamW + upstream `linear_warmup_cosine_lr` (upstream.md §8.3, 8.4); or Muon for the trained 2-D kernels
    (``optimizer: muon``; ``train.optimizer.make_optimizer``)."""

    optimizer: str = "adamw"
    lr_sched: str = "linear_warmup_cosine_lr"
    init_lr: float = 1e-4
    min_lr: float = 8e-5
    warmup_lr: float = 1e-6
    warmup_steps: int = 2500
    iters_per_epoch: int = 2500
    max_epoch: int = 5
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_accum: int = 1  # micro-batches per optimizer step (token-weighted, like the loss)
    clip_grad_norm: float = 0.0  # 0 = no clipping (upstream)
    #: ``optimizer: muon``: Muon's learning rate as a multiple of the schedule's (an orthogonalised update has unit
    #: singular values, not Adam's unit entries, so the two need different scales)
    muon_lr_ratio: float = 5.0

    @property
    def total_steps(self) -> int:
        return self.iters_per_epoch * self.max_epoch


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0  # steps between checkpoints; 0 = once per epoch (iters_per_epoch), as upstream
    keep: int = 3
    async_save: bool = True


@dataclass(frozen=True)
class LogConfig:
    every: int = 1  # console / TensorBoard / CSV every N steps
    peak_tflops: float = 0.0  # per device, for MFU; 0 = measure a matmul once at start


@dataclass(frozen=True)
class EvalConfig:
    """A benchmark run on held-out annotations every `every` steps (`vllama_jax.eval`; docs/eval.md); its metrics
    go to the logs. every = 0: off."""

    task: str = ""  # a `vllama-jax eval --task` name (mvbench, msvd_qa, ...)
    annotations: str = ""  # the task's annotation file or folder, as published
    media_dir: str = ""
    every: int = 0
    limit: int = 0  # the first N questions; 0 = all
    batch_size: int = 4
    num_frames: int = 0  # 0 = data.num_frames
    max_new_tokens: int = 32  # open-ended answers


@dataclass(frozen=True)
class DistributedConfig:
    """Multi-host: explicit coordinator (GPU clusters, local tests) or `auto` (TPU pods, SLURM: jax detects)."""

    coordinator: str = ""  # host:port of process 0
    num_processes: int = 0
    process_id: int = -1
    auto: bool = False


@dataclass(frozen=True)
class TrainConfig:
    name: str = "train"
    seed: int = 42
    mesh: str = ""  # "data=2,fsdp=2,tensor=2"; "" = all devices on fsdp
    max_steps: int = 0  # stop after this many optimizer steps; 0 = the whole schedule (max_epoch x iters_per_epoch)
    output_dir: str = "output/train"
    compilation_cache: str = ""  # persistent XLA compilation cache folder (restarts skip recompiling); "" = off
    # XLA options for compiling the step, e.g. {xla_backend_optimization_level: 0} (CPU tests: 2x faster compile)
    compiler_options: dict[str, Any] = field(default_factory=dict)
    # upstream freeze flags (upstream.md §1.8); they decide train_flag, the branch and the trained parameter groups
    frozen_video_qformer: bool = False
    frozen_audio_qformer: bool = True
    frozen_llama_proj: bool = False
    dropout: bool = True  # dropout 0.1 in the trained Q-Former (False: eval-mode forward, as the fixture grads)
    model: ModelSource = field(default_factory=ModelSource)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    # LoRA adapters on the frozen LLM, trained with the branch (the model config's `lora`, set from here)
    lora: LoraConfig = field(default_factory=LoraConfig)

    # ------------------------------------------------------------------------------------------------------------
    @property
    def train_flag(self) -> int:
        """Upstream `train_flag`: 0 vision branch, 1 audio branch, 2 both, 3 nothing (upstream.md §1.8 table)."""
        return {(False, True): 0, (True, False): 1, (False, False): 2, (True, True): 3}[
            (self.frozen_video_qformer, self.frozen_audio_qformer)]

    @property
    def branch(self) -> str:
        return "audio" if self.train_flag == 1 else "video"

    @property
    def total_steps(self) -> int:
        return self.max_steps or self.optim.total_steps

    @property
    def checkpoint_every(self) -> int:
        return self.checkpoint.every or self.optim.iters_per_epoch

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.output_dir) / "checkpoints"

    @property
    def log_dir(self) -> Path:
        return Path(self.output_dir) / "logs"

    def validate(self) -> "TrainConfig":
        require(self.train_flag in (0, 1), "frozen_video_qformer",
                "frozen_video_qformer and frozen_audio_qformer must differ (train_flag 0: vision branch, 1: audio "
                f"branch); got train_flag {self.train_flag}, which no upstream config uses"
                + (" and that trains nothing" if self.train_flag == 3 else ""))
        m = self.model
        require(bool(m.config) != bool(m.dir), "model", "give exactly one of model.config and model.dir")
        require(m.precision in PRECISIONS, "model.precision",
                f"unknown precision {m.precision!r} (one of {', '.join(PRECISIONS)})")
        for i, o in enumerate(m.overrides):
            require(isinstance(o, str) and "=" in o, f"model.overrides[{i}]", f"expected key=value, got {o!r}")
        require(isinstance(self.seed, int) and self.seed >= 0, "seed", f"must be an integer >= 0, got {self.seed}")
        require_at_least(self, "", 0, "max_steps")
        require(isinstance(self.compiler_options, Mapping), "compiler_options", "expected a mapping")
        try:
            parse_mesh_spec(self.mesh or None)
        except MeshSpecError as e:
            raise ConfigError(f"mesh: {e}") from None
        self._validate_data()
        self._validate_optim()
        require_at_least(self.checkpoint, "checkpoint.", 0, "every")
        require_at_least(self.checkpoint, "checkpoint.", 1, "keep")
        require_at_least(self.log, "log.", 1, "every")
        require_at_least(self.log, "log.", 0, "peak_tflops")
        self._validate_eval()
        self.lora.validate("lora.")
        dist = self.distributed
        if dist.num_processes > 1 or dist.coordinator:
            require(bool(dist.coordinator), "distributed.coordinator", "needed with num_processes > 1")
            require(dist.num_processes >= 1, "distributed.num_processes", "needed with a coordinator")
            require(0 <= dist.process_id < dist.num_processes, "distributed.process_id",
                    f"must be in [0, {dist.num_processes}), got {dist.process_id}")
        return self

    def _validate_data(self) -> None:
        d = self.data
        require(bool(d.datasets) != (d.synthetic.num_examples > 0), "data.datasets",
                "give either data.datasets or data.synthetic.num_examples > 0 (not both)")
        for name, ds in d.datasets.items():
            require(bool(ds.path), f"data.datasets.{name}.path", "missing")
            require(ds.sample_ratio > 0, f"data.datasets.{name}.sample_ratio",
                    f"must be positive, got {ds.sample_ratio}")
        s = d.synthetic
        require_at_least(s, "data.synthetic.", 0, "num_examples")
        require_at_least(s, "data.synthetic.", 1, "num_classes")
        require_positive(d, "data.", "batch_size", "num_frames", "max_txt_len", "max_len")
        require_at_least(d, "data.", 0, "num_workers")
        require(d.features in FEATURE_SOURCES, "data.features",
                f"{d.features!r} is not one of {', '.join(FEATURE_SOURCES)}")
        require(d.features != "cached" or not d.synthetic.num_examples, "data.features",
                "the synthetic captions have no feature cache (their frames are made in memory): use frames")
        require(d.batch_size % self.optim.grad_accum == 0, "data.batch_size",
                f"{d.batch_size} is not divisible by optim.grad_accum={self.optim.grad_accum}")
        for i, p in enumerate(d.prompts):
            require(isinstance(p, str) and p.count(IMAGE_PLACEHOLDER) == 1, f"data.prompts[{i}]",
                    f"needs exactly one {IMAGE_PLACEHOLDER}, got {p!r}")
        if d.prompt_template and "{}" not in d.prompt_template:
            require(d.prompt_template in STAGE2_PROMPT_TEMPLATE or d.prompt_template == "llama_v2",
                    "data.prompt_template", f"{d.prompt_template!r} is neither a template name "
                    f"({', '.join(STAGE2_PROMPT_TEMPLATE)}) nor a format string with {{}}")

    def _validate_eval(self) -> None:
        e = self.eval
        require_at_least(e, "eval.", 0, "every", "limit", "num_frames")
        require_at_least(e, "eval.", 1, "batch_size", "max_new_tokens")
        if e.every:
            require(e.task in TASKS, "eval.task", f"unknown task {e.task!r} (one of {', '.join(TASKS)})")
            require(bool(e.annotations), "eval.annotations", "needed with eval.every > 0")
            require(bool(e.media_dir), "eval.media_dir", "needed with eval.every > 0")
            require(self.branch == "video", "eval.every",
                    "the eval hook asks about videos: it needs the vision branch (frozen_video_qformer: false)")
            require(self.data.features != "cached", "eval.every",
                    "the eval hook encodes its videos with the frozen towers, which a run on cached features "
                    "(data.features: cached) does not load; evaluate the saved checkpoints with `vllama-jax eval`")

    def _validate_optim(self) -> None:
        o = self.optim
        require(o.optimizer in OPTIMIZERS, "optim.optimizer",
                f"unknown optimizer {o.optimizer!r} (one of {', '.join(OPTIMIZERS)})")
        require(o.muon_lr_ratio > 0, "optim.muon_lr_ratio", f"must be positive, got {o.muon_lr_ratio}")
        require(o.lr_sched in LR_SCHEDULES, "optim.lr_sched",
                f"unknown schedule {o.lr_sched!r} (one of {', '.join(LR_SCHEDULES)})")
        for key in ("init_lr", "eps"):
            require(getattr(o, key) > 0, f"optim.{key}", f"must be positive, got {getattr(o, key)}")
        require_at_least(o, "optim.", 0, "min_lr", "warmup_lr", "weight_decay", "clip_grad_norm", "warmup_steps")
        for key in ("beta1", "beta2"):
            require(0 <= getattr(o, key) < 1, f"optim.{key}", f"must be in [0, 1), got {getattr(o, key)}")
        require_at_least(o, "optim.", 1, "iters_per_epoch", "max_epoch", "grad_accum")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        d = self.to_dict()
        d["model"]["overrides"] = list(d["model"]["overrides"])
        d["data"]["prompts"] = list(d["data"]["prompts"])
        d["lora"]["targets"] = list(d["lora"]["targets"])
        return yaml.safe_dump(d, sort_keys=False)


# ----------------------------------------------------------------------------------------------------------------
# dict / YAML -> TrainConfig


def train_config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """Build (and validate) a TrainConfig."""
    return from_dict(TrainConfig, data).validate()


#: where `--set` may add new entries: new datasets (from DatasetConfig's defaults), new XLA compiler options
OPEN_KEYS = {"data.datasets": lambda: dataclasses.asdict(DatasetConfig()), "compiler_options": None}


def apply_train_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """`a.b.c=value` (value parsed as YAML) on the full config dict. Keys must exist, except new dataset names
    under `data.datasets` and new `compiler_options` (so they can be added from the command line)."""
    return override_dict(data, overrides, OPEN_KEYS)


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a training config (YAML/JSON) and apply `--set` overrides; errors name the file and the key."""
    raw = load_config_dict(path)
    try:
        cfg = train_config_from_dict(raw)
        if overrides:
            cfg = train_config_from_dict(apply_train_overrides(cfg.to_dict(), overrides))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return cfg


def resolve_path(p: str) -> Path:
    """Relative paths are relative to the working directory; repository files (e.g. `configs/...`) are also found
    from elsewhere."""
    path = Path(p).expanduser()
    if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
        return REPO_ROOT / path
    return path
