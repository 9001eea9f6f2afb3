"""Best-fit packing with crop (docs/design.md §6.3) at the scale of a real run.

The rule (the authors' "BestFit-Crop"): each row holds ``row_length`` tokens and is filled
from a buffer of up to ``buffer_size`` documents, refilled from the document stream before
every pick; the longest buffered document that fits in the rest of the row is placed whole
(ties: the one that entered the buffer first); when none fits, the shortest (ties: the
earliest) is cropped to fill the row and its remainder is dropped. The stream may end: the
buffer then drains, and a last partial row is dropped.

A 1.3B run packs ~50M rows, so the loop is compiled: ``bestfit_kernel.c`` keeps one FIFO per
document length and a bitset of the lengths present (O(1) per pick instead of a sorted list),
built with the system C compiler on first use into ``$PARCAE_KERNEL_DIR`` (default
``~/.cache/parcae_megatron``) and loaded with ctypes, as Megatron-LM once built its own dataset
helpers. ``python -m parcae_megatron.data.packing`` builds it ahead of time (e.g. on a login
node, into a shared directory, for compute nodes without a compiler). Without it, a
pure-Python version of the same algorithm packs up to ``PYTHON_ROW_LIMIT`` rows.

No torch import here: the benchmark measures the packing's own memory.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import heapq
import itertools
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy

SOURCE = Path(__file__).with_name("bestfit_kernel.c")
PACKER_VERSION = 1
"""Part of a cached packing's key: bump it whenever the packer's rows for the same input
change (kernel or Python fallback), so that no run reuses rows of the old rule."""
PYTHON_ROW_LIMIT = 1_000_000
"""Rows the pure-Python fallback may pack (~10 s); more needs the compiled kernel."""
CHUNK = 1 << 22
"""Stream ids handed to the kernel per call (progress is reported between calls)."""
PART_SLACK = 1024
"""Parts allocated beyond 4 per row at the start (the output grows as needed)."""
INT32_LIMIT = 2**31 - 1
"""Parts beyond which ``row_ptr`` is widened to int64."""
NEED_INPUT, MAX_ROWS, OUTPUT_FULL, DONE, WIDEN = range(5)


@dataclass
class Packing:
    """Rows as runs of document heads: row i is ``parts[row_ptr[i]:row_ptr[i+1]]``, each part
    (document id, tokens taken from its start)."""

    row_ptr: numpy.ndarray
    """One more entry than rows; int32 (int64 past 2**31 parts or from the Python fallback)."""
    parts: numpy.ndarray
    """int32, shape (parts, 2)."""
    cropped_tokens: int
    """Tokens dropped from the ends of cropped documents."""


class KernelUnavailable(RuntimeError):
    """The compiled packer could not be built or loaded."""


def kernel_dir() -> Path:
    """Where the compiled kernel is cached: ``$PARCAE_KERNEL_DIR`` or the user's cache."""
    env = os.environ.get("PARCAE_KERNEL_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "parcae_megatron"


def kernel_path() -> Path:
    """The shared library for this source and platform (a new source gets a new name)."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    return kernel_dir() / f"bestfit_kernel-{sys.platform}-{os.uname().machine}-{digest}.so"


def umask() -> int:
    """The process's file-creation mask (read without changing it where Linux allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def build_kernel() -> Path:
    """Compile the kernel (``$CC``, default ``cc``; a command with arguments such as
    ``ccache gcc`` is fine) unless it is cached; returns its path."""
    target = kernel_path()
    if target.is_file():
        return target
    compiler = shlex.split(os.environ.get("CC", "")) or ["cc"]
    if shutil.which(compiler[0]) is None:
        raise KernelUnavailable(f"no C compiler ({compiler[0]!r} not found; set CC)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Compile to a private name and rename: ranks or jobs sharing the directory never see
        # a half-written library.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    except OSError as e:
        raise KernelUnavailable(f"cannot write {target.parent} ({e}; set PARCAE_KERNEL_DIR)"
                                ) from None
    os.close(fd)
    try:
        result = subprocess.run([*compiler, "-O2", "-shared", "-fPIC", "-o", tmp, str(SOURCE)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise KernelUnavailable(f"{shlex.join(compiler)} failed: "
                                    f"{result.stderr.strip()[-500:]}")
        # mkstemp's 0600 would keep the other users of a shared directory from loading it.
        os.chmod(tmp, 0o777 & ~umask())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


@functools.cache
def load_kernel() -> ctypes.CDLL:
    """The compiled kernel (built on first use); raises KernelUnavailable."""
    try:
        lib = ctypes.CDLL(str(build_kernel()))
    except OSError as e:
        raise KernelUnavailable(str(e)) from e
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.bf_new.restype, lib.bf_new.argtypes = ptr, [i64, i64]
    lib.bf_free.restype, lib.bf_free.argtypes = None, [ptr]
    for name in ("bf_cropped", "bf_rows", "bf_parts"):
        getattr(lib, name).restype, getattr(lib, name).argtypes = i64, [ptr]
    lib.bf_pack.restype = ctypes.c_int
    lib.bf_pack.argtypes = [ptr, ptr, i64, ctypes.POINTER(i64), ctypes.c_int, ptr, i64, ptr,
                            i64, ptr, ctypes.c_int, i64, i64]
    return lib


def kernel_available() -> bool:
    """Whether the compiled kernel builds and loads here."""
    try:
        load_kernel()
    except KernelUnavailable:
        return False
    return True


def epoch_stream(indices: numpy.ndarray, seed: int) -> Iterator[numpy.ndarray]:
    """Endless epochs over ``indices``, each a fresh shuffle: the order Megatron's
    ``_build_document_index(indices, 1, rng, False)`` gives for consecutive calls on one
    ``RandomState(seed)``, built as one int32 copy per epoch (no int64 temporaries)."""
    rng = numpy.random.RandomState(seed)
    while True:  # no reference kept here: an epoch is freed once the packer is past it
        yield _shuffled(indices, rng)


def _shuffled(indices: numpy.ndarray, rng: numpy.random.RandomState) -> numpy.ndarray:
    epoch = indices.astype(numpy.int32)  # always a copy: shuffled in place
    rng.shuffle(epoch)  # the same swaps whatever the dtype
    return epoch


def _chunks(documents: Iterable[int] | numpy.ndarray) -> Iterator[numpy.ndarray]:
    """The document stream as int32 arrays of at most CHUNK ids (views of the arrays in the
    stream, e.g. one shuffled epoch each; loose ids are gathered)."""
    if isinstance(documents, numpy.ndarray):
        documents = (documents,)
    pending: list[int] = []
    for item in documents:
        if isinstance(item, numpy.ndarray):
            if pending:
                yield numpy.asarray(pending, dtype=numpy.int32)
                pending = []
            array = numpy.ascontiguousarray(item, dtype=numpy.int32)
            item = None  # so that the next epoch is not built while this one is still held
            for lo in range(0, len(array), CHUNK):
                yield array[lo:lo + CHUNK]
            array = None
        else:
            pending.append(int(item))
            if len(pending) == 4096:
                yield numpy.asarray(pending, dtype=numpy.int32)
                pending = []
    if pending:
        yield numpy.asarray(pending, dtype=numpy.int32)


def _as_int32(lengths: Sequence[int] | numpy.ndarray) -> numpy.ndarray:
    array = numpy.asarray(lengths)
    if array.dtype != numpy.int32:
        if array.size and (array.min() < 0 or array.max() > numpy.iinfo(numpy.int32).max):
            raise ValueError("document lengths must be in [0, 2**31)")
        array = array.astype(numpy.int32)
    return numpy.ascontiguousarray(array)


def _grow(array: numpy.ndarray, rows: int) -> numpy.ndarray:
    # In-place resize is a realloc: large blocks are remapped, not copied, so growing the
    # output does not double the peak memory.
    array.resize((rows, *array.shape[1:]), refcheck=False)
    return array


def pack_best_fit(documents: Iterable[int] | numpy.ndarray, lengths: Sequence[int],
                  row_length: int, buffer_size: int, max_rows: int | None = None,
                  progress=None) -> Packing:
    """Best-fit packing of the document stream ``documents`` (ids into ``lengths``).

    ``documents`` is an array, an iterable of arrays (consumed lazily, so an endless stream of
    epochs is fine with ``max_rows``), or an iterable of ids. Stops after ``max_rows`` rows or
    when the stream runs out. ``progress(rows)`` is called as rows complete, if given.
    """
    if row_length < 1 or buffer_size < 1:
        raise ValueError("row_length and buffer_size must be positive")
    lengths = _as_int32(lengths)
    try:
        lib = load_kernel()
    except KernelUnavailable as e:
        rows = max_rows
        if rows is None and isinstance(documents, numpy.ndarray):  # one pass: at most this
            rows = int(lengths[documents].sum(dtype=numpy.int64) // row_length)
        if rows is not None and rows > PYTHON_ROW_LIMIT:
            raise KernelUnavailable(
                f"best-fit packing of {rows} rows needs the compiled packer ({e}); build it "
                "where a C compiler exists with `python -m parcae_megatron.data.packing` and "
                "point PARCAE_KERNEL_DIR at the same directory here") from None
        return _pack_python(documents, lengths, row_length, buffer_size, max_rows)
    rows_cap = max_rows if max_rows is not None else max(1, len(lengths) // 2)
    row_ptr = numpy.zeros(rows_cap + 1, dtype=numpy.int32)
    parts = numpy.empty((rows_cap * 4 + PART_SLACK, 2), dtype=numpy.int32)
    packer = lib.bf_new(row_length, buffer_size)
    if not packer:
        raise MemoryError("best-fit packer state")
    consumed = ctypes.c_int64(0)
    chunks, chunk, final = _chunks(documents), numpy.empty(0, numpy.int32), False
    try:
        while True:
            rc = lib.bf_pack(packer, chunk.ctypes.data, len(chunk), ctypes.byref(consumed),
                             final, lengths.ctypes.data,
                             max_rows if max_rows is not None else 2**62, parts.ctypes.data,
                             len(parts), row_ptr.ctypes.data, row_ptr.dtype == numpy.int64,
                             len(row_ptr) - 1, INT32_LIMIT)
            if progress is not None:
                progress(lib.bf_rows(packer))
            if rc == NEED_INPUT:
                chunk = None  # one epoch of the stream in memory at a time
                chunk = next(chunks, None)
                if chunk is None:
                    chunk, final = numpy.empty(0, numpy.int32), True
                elif len(chunk) and (chunk.min() < 0 or chunk.max() >= len(lengths)):
                    raise IndexError(f"document ids must be in [0, {len(lengths)})")
                consumed.value = 0
            elif rc == WIDEN:
                row_ptr = row_ptr.astype(numpy.int64)
            elif rc == OUTPUT_FULL:
                if lib.bf_parts(packer) >= len(parts):
                    parts = _grow(parts, len(parts) + len(parts) // 2 + 1024)
                else:
                    row_ptr = _grow(row_ptr, len(row_ptr) + len(row_ptr) // 2 + 1024)
            else:
                break
        rows, used, cropped = lib.bf_rows(packer), lib.bf_parts(packer), lib.bf_cropped(packer)
    finally:
        lib.bf_free(packer)
    return Packing(_grow(row_ptr, rows + 1), _grow(parts, used), int(cropped))


def _pack_python(documents: Iterable[int] | numpy.ndarray, lengths: numpy.ndarray,
                 row_length: int, buffer_size: int, max_rows: int | None) -> Packing:
    """The kernel's algorithm in Python (per-length FIFOs, lengths present as an int's bits),
    for machines without a C compiler and small runs."""
    ids = itertools.chain.from_iterable(chunk.tolist() for chunk in _chunks(documents))
    lengths = lengths.tolist() if len(lengths) <= 1 << 24 else lengths  # list: faster lookups
    fifo: dict[int, deque[int]] = {}  # length <= row_length -> documents, earliest first
    present = 0  # bit n: some buffered document has length n
    long_docs: list[tuple[int, int, int]] = []  # (length, arrival, document), a heap
    held = arrival = cropped = 0
    row_ptr, parts, row = [0], [], []

    while max_rows is None or len(row_ptr) - 1 < max_rows:
        pos, row = 0, []
        while pos < row_length:
            while held < buffer_size:
                doc = next(ids, None)
                if doc is None:
                    break
                n = int(lengths[doc])
                if n == 0:
                    continue
                if n > row_length:
                    heapq.heappush(long_docs, (n, arrival, doc))
                else:
                    fifo.setdefault(n, deque()).append(doc)
                    present |= 1 << n
                held, arrival = held + 1, arrival + 1
            if not held:
                break
            remaining = row_length - pos
            n = (present & ((2 << remaining) - 1)).bit_length() - 1
            if n > 0:
                take = n
            elif present:  # nothing fits: crop the shortest
                n = (present & -present).bit_length() - 1
                take = remaining
            else:
                n, _, doc = heapq.heappop(long_docs)
                take = remaining
            if n <= row_length:
                queue = fifo[n]
                doc = queue.popleft()
                if not queue:
                    present ^= 1 << n
            cropped += n - take
            held -= 1
            row.append((doc, take))
            pos += take
        if pos < row_length:
            break
        parts.extend(row)
        row_ptr.append(len(parts))
    return Packing(numpy.asarray(row_ptr, dtype=numpy.int64),
                   numpy.asarray(parts, dtype=numpy.int32).reshape(-1, 2), cropped)


def synthetic_lengths(count: int, seed: int = 0, mean: float = 1100.0,
                      sigma: float = 1.1) -> numpy.ndarray:
    """``count`` int32 document lengths, lognormal with the given mean (at least 1 token).

    mean 1100 and sigma 1.1 give ~3.2 pieces per best-fit row of 2049 tokens, as measured on
    a real corpus; drawn in slices, so the float temporaries stay small.
    """
    rng = numpy.random.default_rng(seed)
    mu = numpy.log(mean) - sigma**2 / 2
    out = numpy.empty(count, dtype=numpy.int32)
    step = 1 << 22
    for lo in range(0, count, step):
        draw = rng.lognormal(mu, sigma, size=min(step, count - lo))
        out[lo:lo + len(draw)] = numpy.clip(draw, 1, numpy.iinfo(numpy.int32).max)
    return out


def main() -> None:
    """Build the compiled packer ahead of time and print where it is."""
    try:
        print(build_kernel())
    except KernelUnavailable as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
