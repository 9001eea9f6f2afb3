"""Input discovery, format detection, sizes, hashing and atomic writes shared by the CLIs."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from collections.abc import Iterable
from typing import Any, BinaryIO

# Suffix (after stripping a compression suffix) -> record format.
_FORMATS = {".jsonl": "jsonl", ".json": "json", ".ndjson": "jsonl", ".txt": "txt",
            ".parquet": "parquet"}
_COMPRESSIONS = {".gz": "gz", ".zst": "zst", ".zstd": "zst"}

HASH_CHUNK = 1 << 20


class InputError(ValueError):
    """An input argument names nothing usable (missing file, unknown format, empty glob)."""


def detect_format(path: str) -> tuple[str, str]:
    """``(format, compression)`` of ``path`` from its suffixes, e.g. ``("jsonl", "gz")``.

    Formats: ``jsonl`` (also ``.ndjson``), ``json`` (JSON Lines, or one JSON array), ``txt``,
    ``parquet``. Compression: ``""``, ``"gz"`` or ``"zst"`` (not for parquet, which compresses
    internally).
    """
    name = path.lower()
    compression = ""
    for suffix, comp in _COMPRESSIONS.items():
        if name.endswith(suffix):
            compression, name = comp, name[: -len(suffix)]
            break
    fmt = _FORMATS.get(os.path.splitext(name)[1])
    if fmt is None or (fmt == "parquet" and compression):
        raise InputError(
            f"{path}: unsupported input type; expected .jsonl/.json/.ndjson/.txt (optionally .gz "
            f"or .zst) or .parquet")
    return fmt, compression


def is_supported(path: str) -> bool:
    """Whether :func:`detect_format` accepts ``path`` (and it is not a data_prep manifest)."""
    if path.endswith(".manifest.json"):
        return False  # our own output, e.g. when the output prefix is inside an input dir
    try:
        detect_format(path)
    except InputError:
        return False
    return True


def expand_inputs(specs: Iterable[str]) -> list[str]:
    """Absolute paths of the input files named by ``specs``, in a deterministic order.

    Each spec is a file, a directory (searched recursively for supported files; hidden
    entries, ``*.work`` directories and ``*.manifest.json`` files skipped) or a glob (``**``
    allowed). Directory and glob matches are sorted; the order of
    the specs is kept and duplicates are dropped, so the output order (and thus the dataset's
    document order) depends only on the arguments and the file names.
    """
    out: list[str] = []
    seen: set[str] = set()

    def add(path: str) -> None:
        real = os.path.abspath(path)
        if real not in seen:
            seen.add(real)
            out.append(real)

    for spec in specs:
        if os.path.isdir(spec):
            found = []
            for root, dirs, files in os.walk(spec):
                # Hidden directories and preprocess work directories are never inputs.
                dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                                 and not d.endswith(".work"))
                found += [os.path.join(root, f) for f in files
                          if not f.startswith(".") and is_supported(f)]
            if not found:
                raise InputError(f"{spec}: directory holds no supported input files")
            for path in sorted(found):
                add(path)
        elif os.path.isfile(spec):
            detect_format(spec)  # raises for an unsupported explicit file
            add(spec)
        elif glob.has_magic(spec):
            matches = sorted(p for p in glob.glob(spec, recursive=True)
                             if os.path.isfile(p) and is_supported(p))
            if not matches:
                raise InputError(f"{spec}: glob matches no supported input files")
            for path in matches:
                add(path)
        else:
            raise InputError(f"{spec}: no such file or directory")
    return out


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in a human size: ``"1048576"``, ``"64KB"``, ``"64KiB"``, ``"1.5GB"``.

    Decimal (KB = 1000) and binary (KiB = 1024) units are both accepted.
    """
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 4096, 64MB, 1GiB)")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** "_kmgt".index(unit.lower() or "_"))


def format_bytes(n: float) -> str:
    """``12.3 MB`` style (decimal units, like the MB/s figures)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def sha256_file(path: str, start: int = 0, end: int | None = None) -> str:
    """Hex SHA-256 of ``path`` (or of its byte range ``[start, end)``)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = (os.path.getsize(path) if end is None else end) - start
        while left > 0:
            chunk = f.read(min(HASH_CHUNK, left))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename.

    A reader never sees a partly written file: either the old content or the new one.
    """
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str, obj: Any) -> None:
    """:func:`atomic_write_bytes` of ``obj`` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str) -> Any:
    """Parse a JSON file."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def open_decompressed(path: str, compression: str) -> tuple[BinaryIO, BinaryIO]:
    """``(stream, raw)``: a binary stream of the decompressed content and the raw file under it.

    ``raw.tell()`` gives the position in the on-disk file (for progress). ``.zst`` needs the
    ``zstandard`` package, imported here only.
    """
    raw = open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    if compression == "gz":
        import gzip

        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    if compression == "zst":
        try:
            import zstandard
        except ImportError as err:  # pragma: no cover - depends on the environment
            raw.close()
            raise InputError(
                f"{path}: reading .zst needs the 'zstandard' package "
                f"(pip install 'zstandard>=0.22')") from err
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        return reader, raw
    return raw, raw
