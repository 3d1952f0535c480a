"""The training loop (its command line is `vllama_jax.cli.train`, run as `train.py` or `vllama-jax train`).

`Trainer(cfg)` builds the mesh, the model, the trainable/frozen split and the jitted step; `setup()` reads the frozen
towers (model dir or upstream files), restores the latest checkpoint or initialises the trained groups (fresh
upstream-style init, then `llama_proj_model`, `ckpt`, `ckpt_2` in upstream's order), and builds the data iterator;
`run()` trains to `max_steps` (or the end of the schedule), checkpointing every N steps; `dry_run()` compiles the
step for the configured mesh from shapes only and reports the bytes per device (`dry_run.py`).

Each batch comes from the data iterator with its `kind` (`vllama_jax.data.batch`): the kind picks the batch layout
put on the devices, the compiled step and the token count.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from ..config import ConfigError, ModelConfig, apply_overrides, load_model_config
from ..data.batch import batch_spec, llm_positions
from ..errors import VllamaError
from ..eval.runner import evaluate as run_eval
from ..eval.tasks import Question, Task, get_task, load_questions
from ..inference.chat import VideoLLaMAChat
from ..models import SCANNED_GROUPS, abstract_params, build_model, scanned_view, unscanned_view
from ..models.groups import branch_towers
from ..runtime import matmul_peak_flops, use_compilation_cache
from ..sharding import put, tree_shardings
from ..text import load_tokenizer
from ..tree import flatten_params
from ..weights.load import MissingGroupsError, Source, load_groups
from . import data as train_data
from . import dry_run
from .checkpoint import Checkpointer, is_training_checkpoint, load_trainable_params
from .config import TrainConfig, resolve_path, with_precision
from .distributed import build_mesh, init_distributed
from .metrics import MetricsLogger, compiled_flops
from .optimizer import forward_groups, lr_schedule, make_optimizer, opt_state_shardings, trainable_groups
from .step import jit_train_step, make_train_step


class NonFiniteLossError(VllamaError, RuntimeError):
    """The loss became NaN or inf: names the step and the examples of its batch."""

    exit_status = 3  # distinct from bad input (2): the data or the learning rate, not the command, is at fault

    def __init__(self, step: int, loss: float, example_ids: Iterable[int], dataset: str | None):
        self.step, self.loss, self.example_ids, self.dataset = step, loss, list(example_ids), dataset
        ids = ", ".join(str(i) for i in self.example_ids[:32]) + (" ..." if len(self.example_ids) > 32 else "")
        src = f" of dataset {dataset}" if dataset else ""
        super().__init__(f"non-finite loss {loss} at step {step}; batch{src} example ids [{ids}]; the run stopped "
                         f"without saving, the last checkpoint before it is intact")


# ----------------------------------------------------------------------------------------------------------------
# model config, precision


def resolve_model_config(cfg: TrainConfig) -> ModelConfig:
    if cfg.model.dir:
        path = resolve_path(cfg.model.dir) / "config.yaml"
        if not path.is_file():
            raise ConfigError(f"model.dir: {path.parent} is not a model directory (no config.yaml)")
    else:
        path = resolve_path(cfg.model.config)
    mc = load_model_config(path)
    try:
        mc = apply_overrides(mc, list(cfg.model.overrides)).validate()
    except ConfigError as e:
        raise ConfigError(f"model.overrides: {e}") from None
    # the LoRA adapters are part of the model the step runs (and of the model config its checkpoints record)
    return dataclasses.replace(with_precision(mc, cfg.model.precision), lora=cfg.lora)


# ----------------------------------------------------------------------------------------------------------------


class Trainer:
    """One training run of a stage (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, *, log_stream: Any = None, devices: list[Any] | None = None):
        """`devices`: the mesh's devices (default: all of this job's); e.g. a TPU topology's for a dry run."""
        self.cfg = cfg
        init_distributed(cfg.distributed)
        use_compilation_cache(cfg.compilation_cache)
        self.model_config = mc = resolve_model_config(cfg)
        self.branch = cfg.branch
        self._check_data_fits_model()
        self.mesh = build_mesh(cfg.mesh, devices)
        self._check_batch_fits_mesh()
        self.scan = cfg.model.scan_layers
        self.model = build_model(mc, remat_vit=cfg.model.remat_vit, remat_llama=cfg.model.remat_llama,
                                 scan_layers=self.scan)
        abstract, axes = abstract_params(mc)  # the layout of the files and checkpoints
        self.trainable_groups = trainable_groups(cfg, mc)
        self.cached = cfg.data.features == "cached"  # the frozen towers' output comes from a feature cache
        self.forward_groups = forward_groups(self.branch, mc, abstract, cached=self.cached)
        self.frozen_groups = tuple(g for g in self.forward_groups if g not in self.trainable_groups)
        shardings = tree_shardings(abstract, axes, self.mesh)
        self.param_shapes = {p: tuple(v.shape) for p, v in flatten_params(abstract).items()}  # for the loaders
        self.load_shardings = {g: shardings[g] for g in self.forward_groups}  # as the loaders restore them
        if self.scan:  # the step's view of the LLM and the ViT: their layers stacked (`models.scanned_view`)
            view, view_axes = abstract_params(mc, scan_layers=True)
            abstract = {**abstract, **{g: view[g] for g in SCANNED_GROUPS if g in view}}
            shardings = {**shardings, **{g: tree_shardings(view[g], view_axes[g], self.mesh)
                                         for g in SCANNED_GROUPS if g in view}}
        self.abstract = {g: abstract[g] for g in self.forward_groups}
        self.shardings = {g: shardings[g] for g in self.forward_groups}
        self.replicated = NamedSharding(self.mesh, PartitionSpec())

        abstract_trainable = {g: abstract[g] for g in self.trainable_groups}
        self.tx = make_optimizer(cfg.optim, abstract_trainable)
        self.lr_fn = lr_schedule(cfg.optim)
        trainable_sh = {g: shardings[g] for g in self.trainable_groups}
        self.abstract_opt_state = jax.eval_shape(self.tx.init, abstract_trainable)
        opt_sh = opt_state_shardings(self.abstract_opt_state, trainable_sh, self.replicated)
        self.state_shardings = {"step": self.replicated, "params": trainable_sh, "opt_state": opt_sh}
        self.frozen_shardings = {g: shardings[g] for g in self.frozen_groups}

        self._tokenizer: Any = None
        step_fn = make_train_step(self.model, self.tx, self.lr_fn, branch=self.branch,
                                  placeholder_id=self.placeholder_id, seed=cfg.seed,
                                  grad_accum=cfg.optim.grad_accum, dropout=cfg.dropout, mesh=self.mesh)
        self.jitted = jit_train_step(step_fn, self.state_shardings, self.frozen_shardings, self.mesh)
        self._compiled: dict[Any, Any] = {}
        self._flops: dict[Any, float] = {}
        self.process_index, self.process_count = jax.process_index(), jax.process_count()
        self.log_stream = log_stream
        self.state: dict[str, Any] | None = None
        self.frozen: dict[str, Any] | None = None
        self.data_iter: Any = None
        self.checkpointer: Checkpointer | None = None
        self.history: list[dict[str, Any]] = []
        #: the summaries of the eval hook's runs (`cfg.eval`)
        self.eval_history: list[dict[str, Any]] = []
        self._eval_questions: list[Question] | None = None
        self._eval_task: Task | None = None
        self._eval_chat: VideoLLaMAChat | None = None

    # ------------------------------------------------------------------------------------------------------------
    # checks and small helpers

    def _check_data_fits_model(self) -> None:
        mc, t = self.model_config, self.cfg.data.num_frames
        limit, key = ((mc.num_audio_positions, "num_audio_positions") if self.branch == "audio"
                      else (mc.max_frame_pos, "max_frame_pos"))
        if t > limit:
            raise ConfigError(f"data.num_frames: {t} frames exceed the model's {key}={limit}")

    def _check_batch_fits_mesh(self) -> None:
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        b, a = self.cfg.data.batch_size, self.cfg.optim.grad_accum
        if (b // a) % shards:
            raise ConfigError(f"data.batch_size: {b} / grad_accum {a} = {b // a} rows per micro-batch cannot be "
                              f"split over data x fsdp = {shards} devices")

    @property
    def compiler_options(self) -> dict[str, Any] | None:
        return dict(self.cfg.compiler_options) or None

    @property
    def tokenizer_path(self) -> str:
        w = self.cfg.weights
        if w.tokenizer or w.llama:
            return str(resolve_path(w.tokenizer or w.llama))
        if self.cfg.model.dir:
            return str(resolve_path(self.cfg.model.dir) / "tokenizer")
        raise ConfigError("weights.tokenizer: no tokenizer (give weights.tokenizer, weights.llama or model.dir)")

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    @property
    def placeholder_id(self) -> int:
        """`<ImageHere>` id: the first id after the LLaMA vocabulary (tokenizer when available, upstream.md §5.2)."""
        try:
            return int(self.tokenizer.image_placeholder_id)
        except Exception:  # noqa: BLE001 - dry runs without tokenizer files
            return self.model_config.llama.vocab_size

    def _meta(self) -> dict[str, Any]:
        return {"name": self.cfg.name, "trainable_groups": list(self.trainable_groups),
                "train_config": self.cfg.to_dict(), "model_config": self.model_config.to_dict()}

    # ------------------------------------------------------------------------------------------------------------
    # parameters

    def _place(self, tree: Mapping[str, Any], groups: Iterable[str]) -> dict[str, Any]:
        """Host (numpy) or device trees -> arrays on the mesh with the group's shardings and dtypes."""
        def one(group: str, x: Any, a: Any, s: Any) -> jax.Array:
            if tuple(x.shape) != tuple(a.shape):
                raise ConfigError(f"parameter of group {group}: shape {tuple(x.shape)} != model {tuple(a.shape)}")
            return put(x.astype(a.dtype) if isinstance(x, jax.Array) else np.asarray(x).astype(a.dtype), s)

        return {g: jax.tree.map(partial(one, g), tree[g], self.abstract[g], self.shardings[g]) for g in groups}

    def _weight_sources(self) -> list[Source]:
        """Where the parameters come from, in upstream's load order (later sources override earlier ones,
        upstream.md §10.5): the model dir (its frozen groups; the trained ones too with
        `weights.trainable_from_model_dir`), the tower files, `llama_proj_model`, `ckpt`, `ckpt_2` (an upstream
        Video-LLaMA checkpoint, loaded non-strictly as upstream does, or one of our training checkpoints, e.g. stage
        1's output for stage 2)."""
        cfg, w = self.cfg, self.cfg.weights
        sources: list[Source] = []
        if cfg.model.dir:
            frozen_only = None if w.trainable_from_model_dir else self.frozen_groups
            sources.append(Source("model_dir", resolve_path(cfg.model.dir), frozen_only, "model.dir"))
        for key in ("eva_vit", "blip2", "llama", "imagebind", "llama_proj_model", "ckpt", "ckpt_2"):
            if not getattr(w, key):
                continue
            path, name = resolve_path(getattr(w, key)), f"weights.{key}"
            if key in ("ckpt", "ckpt_2") and is_training_checkpoint(path):
                sources.append(Source("params", load_trainable_params(path), name=name))
            else:
                sources.append(Source("ckpt" if key == "ckpt_2" else key, path, name=name))
        return sources

    def load_params(self, groups: Iterable[str]) -> dict[str, Any]:
        """The wanted groups on the mesh: from the files where they have them, else a fresh upstream-style init.
        The towers the branch reads must come from files (unless `weights.random_frozen`, for benchmarks)."""
        wanted = set(groups)
        order = [g for g in self.forward_groups if g in wanted]
        towers = () if self.cfg.weights.random_frozen else self._required_towers()

        def announce(name: str, groups: tuple[str, ...]) -> None:
            fresh_trained = [g for g in groups if g in self.trainable_groups] if name == "init" else []
            if fresh_trained:
                self._log(f"fresh (upstream-style random) init of {', '.join(fresh_trained)}")

        try:
            params = load_groups(self.model_config, self._weight_sources(), order, seed=self.cfg.seed,
                                 required=[g for g in towers if g in wanted], shapes=self.param_shapes,
                                 shardings=self.load_shardings, on_source=announce)
        except MissingGroupsError as e:
            hint = "model.dir" if self.cfg.model.dir else "weights.eva_vit / weights.blip2 / weights.imagebind / " \
                                                          "weights.llama"
            raise ConfigError(f"weights: no file gives the frozen group(s) {', '.join(e.groups)} needed by the "
                              f"{self.branch} branch (set {hint}, or weights.random_frozen: true for a benchmark)") \
                from None
        if self.scan:
            params = scanned_view(params, self.model_config)
        return self._place(params, order)

    def _required_towers(self) -> tuple[str, ...]:
        """The frozen groups that must come from files: the branch's towers and the LLM (only the LLM when the
        towers' output is cached)."""
        return tuple(g for g in branch_towers(self.branch) if g in self.forward_groups)

    def new_state(self, params: Mapping[str, Any]) -> dict[str, Any]:
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings["opt_state"])(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), self.replicated)
        return {"step": step, "params": dict(params), "opt_state": opt_state}

    def abstract_state(self) -> tuple[Any, Any]:
        """(trainable params, optimizer state) as ShapeDtypeStructs with their shardings."""
        sds = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)  # noqa: E731
        params = {g: jax.tree.map(sds, self.abstract[g], self.shardings[g]) for g in self.trainable_groups}
        opt = jax.tree.map(sds, self.abstract_opt_state, self.state_shardings["opt_state"])
        return params, opt

    # ------------------------------------------------------------------------------------------------------------
    # set-up

    def setup(self) -> "Trainer":
        """Frozen towers, data iterator, and the train state (restored from the latest checkpoint if any)."""
        if self.state is not None:
            return self
        cfg = self.cfg
        self.metrics = MetricsLogger(cfg.log_dir, total_steps=cfg.total_steps, enabled=self.process_index == 0,
                                     stream=self.log_stream)
        self.checkpointer = Checkpointer(cfg.checkpoint_dir, every=cfg.checkpoint_every, keep=cfg.checkpoint.keep,
                                         async_save=cfg.checkpoint.async_save)
        self.data_iter = train_data.build_data_iterator(cfg, self.model_config, self.tokenizer_path,
                                                        process_index=self.process_index,
                                                        process_count=self.process_count)
        latest = self.checkpointer.latest_step()
        if latest is not None:
            saved = self.checkpointer.meta(latest).get("trainable_groups")
            if saved != list(self.trainable_groups):
                raise ConfigError(f"checkpoint {cfg.checkpoint_dir / str(latest)} trained {saved}, this config "
                                  f"trains {list(self.trainable_groups)} (use another output_dir)")
        # frozen towers always from the files; the trained groups from their init files only for a new run
        params = self.load_params(self.frozen_groups + (self.trainable_groups if latest is None else ()))
        self.frozen = {g: params[g] for g in self.frozen_groups}
        if latest is None:
            self.state = self.new_state({g: params[g] for g in self.trainable_groups})
            self._log(f"{cfg.name}: new run, training {', '.join(self.trainable_groups)} on mesh "
                      f"{dict(self.mesh.shape)}")
        else:
            target_params, target_opt = self.abstract_state()
            r = self.checkpointer.restore(latest, target_params, target_opt, self.data_iter)
            step = jax.device_put(jnp.asarray(latest, jnp.int32), self.replicated)
            self.state = {"step": step, "params": r["params"], "opt_state": r["opt_state"]}
            self._log(f"{cfg.name}: resumed from step {latest} ({cfg.checkpoint_dir / str(latest)})")
        return self

    def _log(self, line: str) -> None:
        if self.process_index == 0:
            print(line, file=self.log_stream or sys.stdout, flush=True)

    # ------------------------------------------------------------------------------------------------------------
    # stepping

    def compiled_step(self, kind: str, batch: Mapping[str, Any]) -> Any:
        """The AOT-compiled step for this batch kind and layout (compiled once per layout; its FLOPs feed the MFU)."""
        sig = (kind,) + tuple((k, tuple(v.shape), str(v.dtype)) for k, v in sorted(batch.items()))
        if sig not in self._compiled:
            t = time.perf_counter()
            compiled = self.jitted.lower(self.state, self.frozen, batch, kind).compile(self.compiler_options)
            self._compiled[sig], self._flops[sig] = compiled, compiled_flops(compiled)
            self._log(f"compiled the {kind} step for {dict((k, s) for k, s, _ in sig[1:])} in "
                      f"{time.perf_counter() - t:.1f} s ({self._flops[sig] / 1e9:.2f} GFLOP per device per step"
                      + ("; XLA counts a scanned layer once, so FLOPs and MFU under-count" if self.scan
                         else "") + ")")
        return self._compiled[sig], self._flops[sig]

    def run(self, steps: int | None = None) -> list[dict[str, Any]]:
        """Train `steps` more steps (default: up to `max_steps` / the end of the schedule); returns this call's
        per-step metrics (all calls: `self.history`). Raises NonFiniteLossError on a NaN/inf loss (nothing is saved
        after the last good checkpoint)."""
        self.setup()
        cfg = self.cfg
        start = int(jax.device_get(self.state["step"]))
        end = cfg.total_steps if steps is None else min(cfg.total_steps, start + steps)
        peak = cfg.log.peak_tflops * 1e12 if cfg.log.peak_tflops else None
        num_media = train_data.num_query_tokens(cfg, self.model_config)
        pending: dict[str, Any] | None = None
        last_saved = self.checkpointer.latest_step()
        first = len(self.history)
        self._clock = time.perf_counter()
        try:
            for step in range(start, end):
                local = next(self.data_iter)
                kind = local["kind"]
                batch = train_data.global_batch(local, self.mesh, self.process_count)
                compiled, flops = self.compiled_step(kind, batch)
                if peak is None and flops:
                    peak = matmul_peak_flops()
                    self._log(f"peak for MFU (measured fp32 matmul): {peak / 1e12:.3f} TFLOP/s per device")
                if pending is None:
                    self._clock = time.perf_counter()  # exclude compilation from the first step's time
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
                    self.state, metrics = compiled(self.state, self.frozen, batch)
                info = {"step": step + 1, "metrics": metrics, "example_id": local.get("example_id"),
                        "dataset": local.get("dataset"), "samples": batch[batch_spec(kind).row_keys[0]].shape[0],
                        "tokens": llm_positions(kind, batch, num_media), "flops": flops, "peak": peak}
                if pending is not None:  # one step behind: the host reads step i-1 while step i runs
                    self._finish(pending)
                pending = info
                if cfg.eval.every and (step + 1) % cfg.eval.every == 0:
                    if pending is not None:  # log the step before its eval
                        self._finish(pending)
                        pending = None
                    self.evaluate(step + 1)
                    self._clock = time.perf_counter()  # the eval's time is not the next step's
                if step + 1 == end or self.checkpointer.should_save(step + 1):
                    if pending is not None:  # never save a state whose loss was not checked
                        self._finish(pending)
                    pending = None
                    if last_saved != step + 1:
                        self.checkpointer.save(step + 1, self.state, self.data_iter, self._meta())
                        last_saved = step + 1
            if pending is not None:
                self._finish(pending)
        finally:
            self.checkpointer.wait()
        if hasattr(self.data_iter, "summary"):  # the pipeline's iterator (the synthetic one has no bad records)
            self._log(f"{cfg.name}: {self.data_iter.summary()}")
        return self.history[first:]

    def _finish(self, info: dict[str, Any]) -> None:
        m = {k: float(v) for k, v in jax.device_get(info["metrics"]).items()}
        now = time.perf_counter()
        dt, self._clock = now - self._clock, now
        step = info["step"]
        ids = info["example_id"]
        if ids is not None and self.process_count > 1:
            ids = np.asarray(multihost_utils.process_allgather(np.asarray(ids))).reshape(-1)
        if not math.isfinite(m["loss"]):
            raise NonFiniteLossError(step, m["loss"], [] if ids is None else np.asarray(ids).tolist(),
                                     info["dataset"])
        row = {"loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"], "num_tokens": int(m["num_tokens"]),
               "step_time_s": dt, "samples_per_s": info["samples"] / dt, "tokens_per_s": info["tokens"] / dt,
               "mfu": info["flops"] / dt / info["peak"] if info["peak"] else 0.0, "dataset": info["dataset"]}
        self.history.append({"step": step, **row, "example_id": None if ids is None else np.asarray(ids)})
        if step % self.cfg.log.every == 0 or step == self.cfg.total_steps:
            self.metrics.log(step, row)

    def evaluate(self, step: int) -> dict[str, Any]:
        """Run the configured benchmark (`cfg.eval`) on the current parameters: OUT = {output_dir}/eval/step_<N>;
        its metrics go to the logs (eval.csv, TensorBoard). Returns the summary."""
        e = self.cfg.eval
        if self.process_count > 1:
            raise ConfigError("eval.every: the eval hook runs in single-process jobs only (for now); evaluate the "
                              "saved checkpoints with `vllama-jax eval` instead")
        if self._eval_questions is None:
            self._eval_task = get_task(e.task)
            self._eval_questions = load_questions(self._eval_task, resolve_path(e.annotations),
                                                  resolve_path(e.media_dir), e.limit or None)
        params = {**self.frozen, **self.state["params"]}
        if self.scan:  # the chat runs the layers one by one, on the checkpoints' layout
            params = unscanned_view(params)
        if self._eval_chat is None:
            self._eval_chat = VideoLLaMAChat(self.model_config, params, self.tokenizer, mesh=self.mesh,
                                             num_frames=e.num_frames or self.cfg.data.num_frames,
                                             compilation_cache=False, log=self._log)
        else:  # the same compiled programs, this step's parameters
            self._eval_chat.update_params(params)
        chat = self._eval_chat
        chat.name = f"{self.cfg.name} step {step}"
        res = run_eval(chat, self._eval_task.name, self._eval_task.kind, self._eval_questions,
                       Path(self.cfg.output_dir) / "eval" / f"step_{step}", batch_size=e.batch_size,
                       max_new_tokens=e.max_new_tokens, progress=False)
        s = res.summary
        self.metrics.log_eval(step, s["task"], s["metrics"], s["errors"], s["n"])
        self.eval_history.append({"step": step, **s})
        return s

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close()
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
        if self.data_iter is not None and hasattr(self.data_iter, "close"):
            self.data_iter.close()

    # ------------------------------------------------------------------------------------------------------------

    def dry_run(self, device_memory_gib: float | None = None) -> list[dict[str, Any]]:
        """Compile the step from shapes only and report bytes per device (`dry_run.dry_run`)."""
        return dry_run.dry_run(self, device_memory_gib)
