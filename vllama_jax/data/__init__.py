"""Training data: upstream dataset formats -> ArrayRecord (``prepare``, via TFDS) -> grain batches (``pipeline``).

* ``vllama-jax prepare <dataset> --source ... --out ...`` (see :mod:`vllama_jax.data.prepare`)
* :func:`build_train_iterator` (``DatasetSpec`` list + ``PipelineConfig``) -> checkpointable batch iterator
* the caption and instruction batch layouts, defined once: :mod:`vllama_jax.data.batch`
* a dataset's cache of the frozen towers' output (``vllama-jax encode``): :mod:`vllama_jax.data.features`
* formats and batch layouts explained: ``vllama_jax/data/FORMATS.md``
"""
from .batch import CAPTION, HOST_KEYS, INSTRUCTION, LAYOUTS, BatchSpec, Dims, batch_spec
from .errors import DataError, MediaDecodeError
from .formats import DATASET_NAMES
from .pipeline import (
    BatchMixture,
    DataIterator,
    DatasetSpec,
    PipelineConfig,
    PreparedDataset,
    build_dataset,
    build_train_iterator,
    checkpoint_args,
    read_records,
    with_caption_prompts,
)
from .records import Record, Turn
from .text_io import caption_prompt_list

__all__ = [
    "BatchMixture",
    "BatchSpec",
    "CAPTION",
    "DATASET_NAMES",
    "DataError",
    "DataIterator",
    "DatasetSpec",
    "Dims",
    "HOST_KEYS",
    "INSTRUCTION",
    "MediaDecodeError",
    "PipelineConfig",
    "PreparedDataset",
    "Record",
    "LAYOUTS",
    "Turn",
    "batch_spec",
    "build_dataset",
    "build_train_iterator",
    "caption_prompt_list",
    "checkpoint_args",
    "read_records",
    "with_caption_prompts",
]
