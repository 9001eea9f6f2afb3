"""The original best-fit packing (pure Python, a sorted list of (length, arrival) keys), kept
verbatim as the reference: tests/test_bestfit.py checks the compiled packer against it row for
row, and benchmarks/packing.py measures it as the baseline. numpy only (no torch)."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence

import numpy

from parcae_megatron.data.packing import Packing


def reference_pack(documents: Iterable[int], lengths: Sequence[int], row_length: int,
                  buffer_size: int, max_rows: int | None = None) -> Packing:
    """The original pure-Python best-fit packing (a sorted list of (length, arrival) keys),
    kept verbatim as the reference the compiled packer must reproduce row for row."""
    stream: Iterator[int] = iter(documents)
    keys: list[tuple[int, int]] = []  # (length, arrival) sorted: a best-fit search is a bisect
    held: dict[int, int] = {}  # arrival -> document id
    arrival = 0
    row_ptr, parts, row_parts = [0], [], []
    cropped = 0

    def refill() -> None:
        nonlocal arrival
        while len(keys) < buffer_size:
            doc = next(stream, None)
            if doc is None:
                return
            n = int(lengths[doc])
            if n == 0:
                continue
            bisect.insort(keys, (n, arrival))
            held[arrival] = int(doc)
            arrival += 1

    while max_rows is None or len(row_ptr) - 1 < max_rows:
        pos, row_parts = 0, []
        while pos < row_length:
            refill()
            if not keys:
                break
            remaining = row_length - pos
            i = bisect.bisect_right(keys, (remaining, arrival)) - 1
            if i >= 0:  # the longest document that fits, the earliest of that length
                i = bisect.bisect_left(keys, (keys[i][0], -1))
                n, key = keys.pop(i)
                take = n
            else:  # nothing fits: crop the shortest
                n, key = keys.pop(0)
                take = remaining
                cropped += n - remaining
            row_parts.append((held.pop(key), take))
            pos += take
        if pos < row_length:
            break
        parts.extend(row_parts)
        row_ptr.append(len(parts))
    return Packing(numpy.asarray(row_ptr, dtype=numpy.int64),
                   numpy.asarray(parts, dtype=numpy.int64).reshape(-1, 2), cropped)
