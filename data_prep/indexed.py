"""Thin layer over megatron-core's indexed dataset (.bin/.idx): import, dtype, atomic publish.

The format itself is always written by ``megatron.core.datasets.indexed_dataset``'s
``IndexedDatasetBuilder``; nothing here writes .bin/.idx bytes by hand. Importing megatron-core
takes several seconds, so it happens on first use, not at import time (``--help`` stays fast).
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

import numpy as np

PARTIAL = ".partial"  # suffix of files being written; never a complete dataset


def megatron_indexed() -> ModuleType:
    """``megatron.core.datasets.indexed_dataset``, imported quietly on first use."""
    import logging

    # torch logs "No CUDA runtime is found" on CPU machines when megatron imports it.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed"
        from megatron.core.datasets import indexed_dataset
    # Megatron's log helper warns once per call without torch.distributed; data prep is
    # single-rank by design.
    warnings.filterwarnings("ignore", message="Could not determine rank")
    # The reader logs a line per index load at INFO; keep the CLIs' output readable.
    logging.getLogger(indexed_dataset.__name__).setLevel(logging.WARNING)
    return indexed_dataset


def freeze_gc() -> None:
    """Exclude every object that exists now from garbage collection passes.

    ``IndexedDatasetBuilder.add_index`` calls ``gc.collect()`` once per merged dataset. With
    torch and megatron-core loaded that pass walks ~400k objects (~0.3 s), which would cost
    minutes over thousands of pieces; frozen objects are skipped, making it ~0.1 ms. The
    imported modules live for the whole process anyway.
    """
    import gc

    gc.freeze()


def token_dtype(vocab_size: int) -> type[np.number]:
    """The smallest dtype Megatron uses for ``vocab_size`` ids (uint16 below 65500)."""
    return megatron_indexed().DType.optimal_dtype(vocab_size)


def dtype_name(dtype: type[np.number]) -> str:
    """``"uint16"`` style name of a NumPy dtype class."""
    return np.dtype(dtype).name


def builder(bin_path: str, dtype: type[np.number]):
    """An ``IndexedDatasetBuilder`` writing ``bin_path``."""
    return megatron_indexed().IndexedDatasetBuilder(bin_path, dtype=dtype)


def exists(prefix: str) -> bool:
    """Whether both ``prefix.bin`` and ``prefix.idx`` exist."""
    return os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")


def partial_paths(prefix: str) -> tuple[str, str]:
    """Where the .bin/.idx of ``prefix`` are written before they are published."""
    return prefix + ".bin" + PARTIAL, prefix + ".idx" + PARTIAL


def publish(prefix: str) -> None:
    """Rename ``prefix``'s partial files into place.

    The old .idx goes first, so at no moment do a new .bin and an old .idx (or a half-written
    file) form a pair that looks complete; the .idx, written last, completes the dataset.
    """
    bin_tmp, idx_tmp = partial_paths(prefix)
    if os.path.exists(prefix + ".idx"):
        os.remove(prefix + ".idx")
    os.replace(bin_tmp, prefix + ".bin")
    os.replace(idx_tmp, prefix + ".idx")


def remove(prefix: str) -> None:
    """Delete ``prefix``'s dataset files, partial ones included, if present."""
    for path in (prefix + ".bin", prefix + ".idx", *partial_paths(prefix)):
        if os.path.exists(path):
            os.remove(path)


def open_dataset(prefix: str):
    """Megatron's ``IndexedDataset`` for ``prefix`` (memory-mapped)."""
    return megatron_indexed().IndexedDataset(prefix, mmap=True)
