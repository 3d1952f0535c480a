"""Training data: upstream dataset formats -> ArrayRecord (``prepare``, via TFDS) -> grain batches (``pipeline``).

* ``python -m vllama_jax.data.prepare <dataset> --source ... --out ...`` (see :mod:`vllama_jax.data.prepare`)
* :func:`build_train_iterator` (``DatasetSpec`` list + ``PipelineConfig``) -> checkpointable batch iterator
* formats and batch layouts: ``vllama_jax/data/FORMATS.md``
"""
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
)
from .records import Record, Turn

__all__ = [
    "BatchMixture",
    "DATASET_NAMES",
    "DataError",
    "DataIterator",
    "DatasetSpec",
    "MediaDecodeError",
    "PipelineConfig",
    "PreparedDataset",
    "Record",
    "Turn",
    "build_dataset",
    "build_train_iterator",
    "checkpoint_args",
    "read_records",
]
