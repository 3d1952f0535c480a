"""One pure training step: token-weighted gradient accumulation over micro-batches, AdamW on the trainable tree.

    new_state, metrics = train_step(state, frozen, batch, kind)

* `state` = {"step", "params" (trainable, fp32), "opt_state"}; donated, so the update happens in place.
* `frozen` = the frozen towers the branch reads (never differentiated: `jax.grad` is taken w.r.t. the trainable
  tree only, so no weight gradient of a frozen tower is ever computed; the backward pass still runs through the
  frozen LLaMA to reach the soft prompts).
* `batch` = the device arrays of one global batch, laid out by the spec (`vllama_jax.data.batch`) of its `kind`: a
  caption batch (upstream.md §1.8 path B; with the shared stage-2 prompt rows), an instruction batch (path A),
  a features batch (path A for both branches from cached frozen-tower outputs, `train.features`), or a
  caption_features / instruction_features batch (path B / A of the branch from a feature cache, `train.encode`).
  `kind` is the one the pipeline emitted with the batch, a static argument: each layout compiles once.

Gradient accumulation splits the batch into `grad_accum` micro-batches and sums `loss_sum` gradients, then divides
by the batch's total number of target tokens: exactly the gradient of upstream's token-mean loss over the whole batch
(with one micro-batch it is that gradient).

Dropout keys are `fold_in(fold_in(key(seed), step), micro_index)`: a pure function of the step, so a resumed run
draws the same masks, and (threefry being partitionable) the same masks on any mesh.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..data.batch import CAPTION, CAPTION_FEATURES, FEATURES, INSTRUCTION_FEATURES, batch_spec, kind_of
from ..media.image import normalize_uint8
from ..sharding import logical_to_mesh_spec

TrainState = dict  # {"step": int32 scalar, "params": trainable tree, "opt_state": optax state}


def make_loss_fn(model: Any, branch: str, placeholder_id: int, dropout: bool) -> Callable[..., tuple[Any, Any]]:
    """(trainable, frozen, micro_batch, dropout_key, kind) -> (loss_sum, num_tokens): the summed token loss, so
    micro-batch sums add up to the batch's (upstream's loss is loss_sum / num_tokens over the whole batch). `kind`:
    the batch's (None: recognised from the arrays, for bare fixture batches)."""

    def loss_fn(trainable: Any, frozen: Any, mb: Mapping[str, Any], key: jax.Array,
                kind: str | None = None) -> tuple[Any, Any]:
        variables = {"params": {**frozen, **trainable}}
        rngs = {"dropout": key} if dropout else {}
        kind = kind or kind_of(mb)
        if "frames" in mb and mb["frames"].dtype == jnp.uint8:  # the pipeline's pixels (data.batch.FRAMES)
            mb = {**mb, "frames": normalize_uint8(mb["frames"], jnp)}
        if kind == FEATURES.kind:  # both branches from cached frozen-tower outputs (`branch` does not apply)
            out = model.apply(variables, mb["frame_queries"], mb["audio_embeddings"], mb["with_audio"],
                              mb["input_ids"], mb["labels"], mb["attention_mask"], mb["label_positions"],
                              placeholder_id, mb.get("prompt_prefix"), deterministic=not dropout, rngs=rngs,
                              method=model.feature_instruction_loss)
        elif kind in (CAPTION.kind, CAPTION_FEATURES.kind):  # path B, on frames or on their cached towers' output
            cached = kind == CAPTION_FEATURES.kind
            out = model.apply(variables, mb["frame_features" if cached else "frames"], mb["text_ids"],
                              mb["text_mask"], mb.get("prompt_before"), mb.get("prompt_after"), branch=branch,
                              deterministic=not dropout, cached=cached, rngs=rngs, method=model.caption_loss)
        else:  # path A, on frames or on their cached towers' output
            cached = kind == INSTRUCTION_FEATURES.kind
            out = model.apply(variables, mb["frame_features" if cached else "frames"], mb["input_ids"],
                              mb["labels"], mb["attention_mask"], placeholder_id, branch=branch,
                              deterministic=not dropout, cached=cached, rngs=rngs, method=model.instruction_loss)
        return out["loss_sum"], out["num_tokens"]

    return loss_fn


def _split_micro(batch: Mapping[str, Any], shared: tuple[str, ...], n: int, mesh: Mesh | None) -> dict[str, Any]:
    """(B, ...) -> (n, B/n, ...) per row array. Micro-batch a takes rows a, a+n, a+2n, ...: each device's
    contiguous block of rows splits evenly, so every micro-batch stays spread over the whole mesh without any
    data movement. The `shared` arrays (the prompt ids, one row for the whole batch) are left as they are."""

    def split(x: jax.Array) -> jax.Array:
        y = jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1)
        if mesh is not None:  # the micro-batch axis is the batch: same rule as the whole batch's
            spec = logical_to_mesh_spec((None, "batch") + (None,) * (x.ndim - 1), y.shape, mesh)
            y = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, spec))
        return y

    return {k: (v if k in shared else split(v)) for k, v in batch.items()}


def make_train_step(
    model: Any,
    tx: optax.GradientTransformation,
    lr_fn: Callable[[Any], Any],
    *,
    branch: str,
    placeholder_id: int,
    seed: int,
    grad_accum: int = 1,
    dropout: bool = True,
    mesh: Mesh | None = None,
) -> Callable[..., tuple[TrainState, dict[str, Any]]]:
    """Build the pure step function `train_step(state, frozen, batch, kind)` (jit it with `jit_train_step`)."""
    loss_fn = make_loss_fn(model, branch, placeholder_id, dropout)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, frozen: Any, batch: Mapping[str, Any],
                   kind: str) -> tuple[TrainState, dict[str, Any]]:
        params = state["params"]
        key = jax.random.fold_in(jax.random.PRNGKey(seed), state["step"])
        if grad_accum == 1:
            (loss_sum, ntok), grads = grad_fn(params, frozen, batch, jax.random.fold_in(key, 0), kind)
        else:
            shared_keys = batch_spec(kind).shared_keys
            micro = _split_micro(batch, shared_keys, grad_accum, mesh)
            shared = {k: micro.pop(k) for k in shared_keys if k in micro}

            def body(carry, xs):
                i, mb = xs
                (ls, nt), g = grad_fn(params, frozen, mb | shared, jax.random.fold_in(key, i), kind)
                acc_g, acc_l, acc_n = carry
                return (jax.tree.map(jnp.add, acc_g, g), acc_l + ls, acc_n + nt), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
            (grads, loss_sum, ntok), _ = jax.lax.scan(body, init, (jnp.arange(grad_accum), micro))
        denom = jnp.maximum(ntok, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / denom, grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                     "opt_state": opt_state}
        metrics = {"loss": loss_sum / denom, "num_tokens": ntok, "grad_norm": grad_norm,
                   "lr": lr_fn(state["step"])}
        return new_state, metrics

    return train_step


def jit_train_step(step_fn: Callable, state_shardings: Any, frozen_shardings: Any, mesh: Mesh) -> Callable:
    """jit with explicit state / frozen / metric shardings, the state donated and the batch kind (argument 3)
    static: lower with (state, frozen, batch, kind), call the compiled step with (state, frozen, batch). The batch
    sharding comes from the (global) batch arrays themselves (`train.data.global_batch` puts them on the batch
    axes)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(step_fn, in_shardings=(state_shardings, frozen_shardings, None),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,), static_argnums=(3,))
