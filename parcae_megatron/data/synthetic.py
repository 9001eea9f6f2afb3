"""A synthetic Megatron indexed dataset of any size at no disk cost (rehearsals, benchmarks).

Document lengths are lognormal (web text is roughly so; default mean 1100 tokens, σ = 1.0 of
the log), the ``.idx`` is Megatron's index format (version 1: header, dtype code, sequence
and document counts, int32 lengths, int64 byte pointers, int64 document boundaries; one
sequence per document), written in chunks, and the ``.bin`` is a sparse file of the right
size: every token reads as id 0 and the file occupies no blocks. Index building, sampling and
packing see exactly the document structure of a real corpus of that size.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy

CHUNK = 1 << 22  # documents per write: bounds the writer's memory


@dataclass(frozen=True)
class SyntheticDataset:
    """What was written: the path prefix, documents, tokens, mean document length."""

    prefix: Path
    documents: int
    tokens: int

    @property
    def mean_length(self) -> float:
        """Mean document length in tokens."""
        return self.tokens / max(self.documents, 1)


def lognormal_lengths(num_tokens: int, mean: float = 1100.0, sigma: float = 1.0,
                      seed: int = 0) -> numpy.ndarray:
    """int32 document lengths (>= 1) drawn lognormally with this mean, summing to exactly
    ``num_tokens`` (the last document is cut)."""
    rng = numpy.random.default_rng(seed)
    mu = math.log(mean) - sigma**2 / 2
    chunks, total = [], 0
    while total < num_tokens:
        n = max(1024, int((num_tokens - total) / mean * 1.05))
        lengths = numpy.maximum(1, numpy.rint(rng.lognormal(mu, sigma, n))).astype(numpy.int64)
        chunks.append(lengths)
        total += int(lengths.sum())
    lengths = numpy.concatenate(chunks)
    ends = numpy.cumsum(lengths)
    count = int(numpy.searchsorted(ends, num_tokens)) + 1
    lengths = lengths[:count]
    lengths[-1] -= int(ends[count - 1]) - num_tokens
    return lengths.astype(numpy.int32)


def write_synthetic_dataset(prefix: str | Path, num_tokens: int, mean: float = 1100.0,
                            sigma: float = 1.0, seed: int = 0,
                            dtype: type[numpy.number] = numpy.uint16) -> SyntheticDataset:
    """Write ``prefix.idx`` and a sparse ``prefix.bin`` holding ``num_tokens`` tokens."""
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType

    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    lengths = lognormal_lengths(num_tokens, mean, sigma, seed)
    count = len(lengths)
    itemsize = numpy.dtype(dtype).itemsize
    with open(f"{prefix}.idx", "wb") as f:
        f.write(_INDEX_HEADER)
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", DType.code_from_dtype(dtype)))
        f.write(struct.pack("<Q", count))
        f.write(struct.pack("<Q", count + 1))  # document boundaries: 0, 1, ..., count
        f.write(lengths.tobytes(order="C"))
        offset = 0
        for lo in range(0, count, CHUNK):
            part = lengths[lo:lo + CHUNK].astype(numpy.int64) * itemsize
            pointers = numpy.cumsum(part) - part + offset
            offset += int(part.sum())
            f.write(pointers.tobytes(order="C"))
        for lo in range(0, count + 1, CHUNK):
            f.write(numpy.arange(lo, min(lo + CHUNK, count + 1), dtype=numpy.int64).tobytes())
    with open(f"{prefix}.bin", "wb") as f:
        f.truncate(num_tokens * itemsize)  # sparse: no blocks written
    return SyntheticDataset(prefix=prefix, documents=count, tokens=num_tokens)
