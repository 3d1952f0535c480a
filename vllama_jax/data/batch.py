"""The two batch layouts of training, defined once: the arrays of a caption batch and of an instruction batch, their
dtypes and shapes.

Every batch the pipeline emits is a dict holding the arrays of one `BatchSpec` (numpy, fixed shapes), its ``kind``
(the spec's name: ``"caption"`` or ``"instruction"``, the dataset's kind) and the host-only fields of
``HOST_KEYS``. Everything downstream reads the layout from here and the kind from the batch: the pipeline's
collation, the device put (``train.data.global_batch``), the train step (loss path, micro-batch split), the dry
run's abstract batches and the token count behind the MFU (``llm_positions``).

Shapes are written with the dimension names of `Dims`::

    caption      frames (batch, frames, image_size, image_size, 3) uint8 RGB pixels (the train step normalises
                 them on the device; float32 values already CLIP-normalised are taken as they are: the fixtures,
                 synthetic data), text_ids / text_mask (batch, max_txt_len)
                 int32 (upstream.md §1.8 path B); stage 2 adds one prompt for the whole batch: prompt_before
                 (1, prompt_before) / prompt_after (1, prompt_after) int32
    instruction  frames, input_ids / labels / attention_mask (batch, max_len) int32 (path A)
    features     path A for both branches from cached frozen-tower outputs instead of frames: frame_queries
                 (batch, frames, queries, hidden) and audio_embeddings (batch, audio_clips, audio_dim) float32,
                 with_audio (batch,) int32 (1: the audio+video flow, 0: video only), input_ids / labels /
                 attention_mask as an instruction batch, and label_positions (batch, max_labels) int32: the
                 positions t whose next token t+1 is labelled, -1 padded (``label_positions``), so that the LM
                 head runs only there (``VideoLLaMA.feature_instruction_loss``); optionally one prompt_prefix
                 (1, prompt_prefix) int32 for the whole batch: the tokens every row starts with (the ids hold only
                 what follows), run once and attended to by every row
    caption_features      a caption batch (path B) with frame_features (batch, frames, *frame_feature) in place of
                 the frames: the branch's frozen towers' output per frame (``VideoLLaMA.frozen_frame_features``: the
                 video branch's image Q-Former queries (queries, hidden), the audio branch's ImageBind vision
                 embedding (audio_dim,)), float32 or as cached (bfloat16, float16); read from a feature cache
                 (``data.features``, written by ``vllama-jax encode``)
    instruction_features  an instruction batch (path A) with frame_features in place of the frames
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from ..text.instruct import IGNORE_INDEX
from .records import Kind

#: the host-only fields of every batch (never sent to the devices)
HOST_KEYS = ("kind", "dataset", "example_id", "num_replaced", "replaced_ids")


@dataclasses.dataclass(frozen=True)
class Dims:
    """The sizes batch shapes are made of (the prompt lengths only for stage-2 caption batches)."""

    batch: int
    frames: int
    image_size: int
    max_txt_len: int = 0
    max_len: int = 0
    prompt_before: int = 0
    prompt_after: int = 0
    queries: int = 0
    hidden: int = 0
    audio_clips: int = 0
    audio_dim: int = 0
    max_labels: int = 0
    frame_feature: tuple[int, ...] = ()  # the trailing shape of one frame's cached features (per branch)


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    name: str
    dtype: type  # what the pipeline emits (and the dry run assumes)
    shape: tuple[str | int, ...]  # names of `Dims` fields, or sizes
    also: tuple[type, ...] = ()  # other dtypes the step takes as they are

    def convert(self, x: Any) -> np.ndarray:
        """``x`` in an accepted dtype: kept if it is one, else cast to the first of the same kind (a float64 array
        to float32, never to uint8 pixels), else to ``dtype``."""
        x = np.asarray(x)
        accepted = [np.dtype(d) for d in (self.dtype, *self.also)]
        if x.dtype in accepted:
            return x
        same_kind = [d for d in accepted if d.kind == x.dtype.kind]
        return x.astype(same_kind[0] if same_kind else accepted[0])

    def shape_for(self, dims: Dims) -> tuple[int, ...]:
        out: list[int] = []
        for d in self.shape:
            size = getattr(dims, d) if isinstance(d, str) else d
            out.extend(size if isinstance(size, tuple) else (size,))  # a tuple-valued dim is several axes
        return tuple(out)


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """One batch layout. `rows` hold one row per example (split over the batch axes of the mesh); `shared` hold one
    row for the whole batch (replicated, left whole by the micro-batch split) and are optional."""

    kind: Kind | str
    rows: tuple[ArraySpec, ...]
    shared: tuple[ArraySpec, ...] = ()

    @property
    def row_keys(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.rows)

    @property
    def shared_keys(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.shared)

    def arrays(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The spec's arrays of `batch` in the spec's dtypes (every row array, the shared ones present)."""
        missing = [k for k in self.row_keys if k not in batch]
        if missing:
            raise ValueError(f"{self.kind} batch without {missing} (keys: {sorted(batch)})")
        return {a.name: a.convert(batch[a.name]) for a in self.rows + self.shared if a.name in batch}

    def shapes(self, dims: Dims, *, shared: bool = False) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """{name: (shape, dtype)} of a batch of these sizes (with the shared arrays if `shared`)."""
        specs = self.rows + (self.shared if shared else ())
        return {a.name: (a.shape_for(dims), np.dtype(a.dtype)) for a in specs}


FRAMES = ArraySpec("frames", np.uint8, ("batch", "frames", "image_size", "image_size", 3), also=(np.float32,))

CAPTION = BatchSpec(
    "caption",
    rows=(FRAMES, ArraySpec("text_ids", np.int32, ("batch", "max_txt_len")),
          ArraySpec("text_mask", np.int32, ("batch", "max_txt_len"))),
    shared=(ArraySpec("prompt_before", np.int32, (1, "prompt_before")),
            ArraySpec("prompt_after", np.int32, (1, "prompt_after"))))

_IDS = tuple(ArraySpec(k, np.int32, ("batch", "max_len")) for k in ("input_ids", "labels", "attention_mask"))

INSTRUCTION = BatchSpec("instruction", rows=(FRAMES, *_IDS))

#: the frozen towers' output per frame (`VideoLLaMA.encode_frames`), cached in place of the frames
FRAME_QUERIES = ArraySpec("frame_queries", np.float32, ("batch", "frames", "queries", "hidden"))

FEATURES = BatchSpec(
    "features",
    rows=(FRAME_QUERIES,
          ArraySpec("audio_embeddings", np.float32, ("batch", "audio_clips", "audio_dim")),
          ArraySpec("with_audio", np.int32, ("batch",)), *_IDS,
          ArraySpec("label_positions", np.int32, ("batch", "max_labels"))),
    shared=(ArraySpec("prompt_prefix", np.int32, (1, "prompt_prefix")),))

#: a branch's frozen towers' output per frame, read from a feature cache in place of the frames (the dtype it was
#: cached in travels to the device as it is: half the bytes of float32 for bfloat16)
FRAME_FEATURES = ArraySpec("frame_features", np.float32, ("batch", "frames", "frame_feature"),
                           also=(ml_dtypes.bfloat16, np.float16))

CAPTION_FEATURES = BatchSpec("caption_features", rows=(FRAME_FEATURES, *CAPTION.rows[1:]), shared=CAPTION.shared)
INSTRUCTION_FEATURES = BatchSpec("instruction_features", rows=(FRAME_FEATURES, *INSTRUCTION.rows[1:]))

LAYOUTS: dict[str, BatchSpec] = {s.kind: s for s in (CAPTION, INSTRUCTION, FEATURES, CAPTION_FEATURES,
                                                     INSTRUCTION_FEATURES)}
#: the layout of a dataset kind's batches when its frames come from a feature cache
CACHED_KIND = {CAPTION.kind: CAPTION_FEATURES.kind, INSTRUCTION.kind: INSTRUCTION_FEATURES.kind}


def label_positions(labels: np.ndarray, max_labels: int | None = None) -> np.ndarray:
    """(B, L) labels (-100 = not trained) -> (B, max_labels) int32: per row the positions t with a label at t+1,
    in order, -1 padded; ``max_labels`` defaults to the most any row has (ValueError when a row has more)."""
    labels = np.asarray(labels)
    rows = [np.flatnonzero(r[1:] != IGNORE_INDEX).astype(np.int32) for r in labels]
    k = max((len(r) for r in rows), default=0) if max_labels is None else max_labels
    if any(len(r) > k for r in rows):
        raise ValueError(f"a row has {max(len(r) for r in rows)} labelled tokens, more than max_labels={k}")
    out = np.full((len(rows), k), -1, np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def batch_spec(kind: str) -> BatchSpec:
    try:
        return LAYOUTS[kind]
    except KeyError:
        raise ValueError(f"unknown batch kind {kind!r} (one of {', '.join(LAYOUTS)})") from None


def kind_of(arrays: Mapping[str, Any]) -> Kind:
    """The kind of bare arrays that come without their ``kind`` (fixtures, tests): the spec whose rows they hold."""
    for spec in LAYOUTS.values():
        if all(k in arrays for k in spec.row_keys):
            return spec.kind
    layouts = "; ".join(f"{k}: {s.row_keys}" for k, s in LAYOUTS.items())
    raise ValueError(f"arrays {sorted(arrays)} hold the rows of no batch layout ({layouts})")


def llm_positions(kind: str, arrays: Mapping[str, Any], num_media: int) -> int:
    """LLaMA sequence positions one batch fills: an instruction (or features) batch its ids; a caption batch BOS +
    the prompt + the `num_media` query tokens + the text, per example."""
    b = arrays[batch_spec(kind).row_keys[0]].shape[0]
    if kind in (INSTRUCTION.kind, FEATURES.kind, INSTRUCTION_FEATURES.kind):
        return b * arrays["input_ids"].shape[1]
    prompt = sum(arrays[k].shape[1] for k in CAPTION.shared_keys if k in arrays)
    return b * (1 + prompt + num_media + arrays["text_ids"].shape[1])
