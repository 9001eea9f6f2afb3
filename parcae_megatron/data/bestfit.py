"""BOS-aligned best-fit packing with crop (docs/design.md §6.3, the authors' "BestFit-Crop"), as a
Megatron dataset over indexed datasets: ``--packing bestfit``.

Each row holds ``seq_length + 1`` tokens (inputs and labels shifted by one) and is filled from a
buffer of up to ``packing_buffer`` documents, refilled from the shuffled document stream before
every pick: the longest buffered document that fits in the rest of the row is placed whole;
when none fits, the shortest is cropped to fill the row and its remainder is dropped. Every row
therefore starts at a document's first token (its ⟨bos⟩), and every document appears at most
once per epoch, whole or as its cropped head. There is no cross-document masking and no
position reset (as in the authors' code).

The packing is a pure function of (documents, seed, sequence length, buffer size): it is
computed once (rank 0, inside Megatron's dataset-build barrier, by the compiled packer of
``packing.py``: ~1 min for the 1.3B run's 50.8M rows), cached next to GPTDataset's indices
(``row_ptr`` and ``parts`` int32), and row ``i`` is then read directly, so resuming
mid-epoch gives exactly the rows a straight run would have seen.

The cache is safe to share: its key includes ``PACKER_VERSION``; each file is written to a
temporary name in the cache directory and renamed into place, the description last, so a
writer killed midway leaves nothing that loads, and a job rewriting a cache never changes
the files another job has mapped; a cache that does not load (a truncated or corrupt file, no
description) is rebuilt.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy
import torch
from megatron.core.datasets.gpt_dataset import (
    GPTDataset,
    GPTDatasetConfig,
    MockGPTDataset,
)
from megatron.core.utils import log_single_rank

from parcae_megatron.data.packing import (
    PACKER_VERSION,
    Packing,
    epoch_stream,
    pack_best_fit,
    umask,
)

__all__ = ["BestFitDatasetConfig", "BestFitGPTDataset", "MockBestFitGPTDataset", "Packing",
           "dataset_class", "pack_best_fit"]

logger = logging.getLogger(__name__)


@dataclass
class BestFitDatasetConfig(GPTDatasetConfig):
    """GPTDatasetConfig plus the best-fit buffer size."""

    packing_buffer: int = 1000
    """Documents held in the best-fit buffer."""

    packer_version: int = PACKER_VERSION
    """The packer's version (part of the cache key; a new one never reads older rows)."""


class BestFitGPTDataset(GPTDataset):
    """GPTDataset whose samples are best-fit packed rows (see the module docstring).

    Documents are streamed in GPTDataset's order (shuffled per epoch with the config's seed);
    rows are not shuffled further, as in the authors' streaming loader.
    """

    @staticmethod
    def _key_config_attributes() -> list[str]:
        return [*GPTDataset._key_config_attributes(), "packing_buffer", "packer_version"]

    def _document_stream(self) -> Iterator[numpy.ndarray]:
        """Epochs, each a fresh shuffle of this split's documents (Megatron's order)."""
        return epoch_stream(self.indices, self.config.random_seed)

    def _pack(self) -> Packing:
        lengths = self.dataset.sequence_lengths
        row = self.config.sequence_length + self.config.add_extra_token_to_sequence
        if self.num_samples is None:  # one pass over the documents
            return pack_best_fit(next(self._document_stream()), lengths, row,
                                 self.config.packing_buffer)
        if not numpy.any(lengths[self.indices]):
            raise ValueError(f"{self.dataset_path}: no tokens in the {self.index_split.name} "
                             "split")
        return pack_best_fit(self._document_stream(), lengths, row,
                             self.config.packing_buffer, self.num_samples)

    def _build_document_sample_shuffle_indices(self):
        """Pack (or load the cached packing); returns (parts, row_ptr, None)."""
        if self.config.defer_npy_index_mmap:
            raise ValueError("--packing bestfit does not support deferred index loading")
        path_to_cache = self.config.path_to_cache
        if path_to_cache is None and not self.config.mock:
            path_to_cache = os.path.join(self.dataset.path_prefix, "cache",
                                         f"{type(self).__name__}_indices")
        paths = {}
        if path_to_cache:
            base = f"{self.unique_description_hash}-{type(self).__name__}-{self.index_split.name}"
            paths = {k: os.path.join(path_to_cache, f"{base}-{k}")
                     for k in ("description.txt", "row_ptr.npy", "parts.npy")}
        cached = _load_cache(paths, self.unique_description) if paths else None
        if cached is not None:
            log_single_rank(logger, logging.INFO,
                            f"Load the {type(self).__name__} {self.index_split.name} packing")
            return (*cached, None)
        start = time.time()
        packing = self._pack()
        log_single_rank(
            logger, logging.INFO,
            f"> best-fit packed {len(packing.row_ptr) - 1} {self.index_split.name} rows from "
            f"{len(packing.parts)} document heads in {time.time() - start:.1f}s "
            f"({packing.cropped_tokens} tokens cropped)")
        if paths and (not torch.distributed.is_initialized()
                      or torch.distributed.get_rank() == 0):
            os.makedirs(path_to_cache, exist_ok=True)
            _replace(paths["parts.npy"], lambda f: numpy.save(f, packing.parts))
            _replace(paths["row_ptr.npy"], lambda f: numpy.save(f, packing.row_ptr))
            # Last: a cache without its description is never loaded.
            _replace(paths["description.txt"],
                     lambda f: f.write(self.unique_description.encode()))
        return packing.parts, packing.row_ptr, None

    def _query_document_sample_shuffle_indices(self, idx: int):
        """Row ``idx``: its tokens, document ids and per-document token counts."""
        lo, hi = int(self.sample_index[idx]), int(self.sample_index[idx + 1])
        parts = self.document_index[lo:hi]
        pieces = [self.dataset.get(int(doc), offset=0, length=int(n)) for doc, n in parts]
        return (numpy.concatenate(pieces).astype(numpy.int64),
                numpy.asarray(parts[:, 0], dtype=numpy.int64), [int(n) for n in parts[:, 1]])


def _load_cache(paths: dict[str, str], description: str
                ) -> tuple[numpy.ndarray, numpy.ndarray] | None:
    """(parts, row_ptr) memory-mapped from a complete cache of ``description``; None when it
    is missing, incomplete or does not load (it is then rebuilt)."""
    try:
        with open(paths["description.txt"]) as f:
            if f.read() != description:
                return None
        parts = numpy.load(paths["parts.npy"], mmap_mode="r")
        row_ptr = numpy.load(paths["row_ptr.npy"], mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:
        if not isinstance(e, FileNotFoundError):
            logger.warning("best-fit packing cache %s does not load (%s): rebuilding",
                           paths["parts.npy"], e)
        return None
    if parts.ndim != 2 or parts.shape[1] != 2 or row_ptr.ndim != 1 or not len(row_ptr) \
            or int(row_ptr[-1]) != len(parts):
        logger.warning("best-fit packing cache %s is inconsistent: rebuilding",
                       paths["parts.npy"])
        return None
    return parts, row_ptr


def _replace(path: str, write) -> None:
    """Write ``path`` through ``write(binary file)`` to a temporary name in its directory,
    readable as the umask allows (as a plain ``open`` would create it), then rename it."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-",
                               suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class MockBestFitGPTDataset(BestFitGPTDataset, MockGPTDataset):
    """Best-fit packing over Megatron's mock documents (``--mock-data``)."""


def dataset_class(packing: str, mock: bool) -> type[GPTDataset]:
    """The dataset class for ``--packing`` (``concat``: Megatron's GPTDataset)."""
    if packing == "bestfit":
        return MockBestFitGPTDataset if mock else BestFitGPTDataset
    return MockGPTDataset if mock else GPTDataset


