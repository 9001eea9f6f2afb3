"""Streaming readers: split input files into pieces and yield each piece's documents.

A *piece* is a disjoint part of one input file that one worker processes: a byte range of
a plain ``.jsonl``/``.json``/``.txt`` (line mode) file, a run of parquet row groups, or a whole
compressed or otherwise unsplittable file. Readers stream; the largest thing held in memory is
one record (one line, one paragraph, one parquet batch), except for a ``.json`` file holding a
single JSON array and ``.txt`` in document mode, whose whole content is one record.

Every record is either a document (``text``) or a bad record (``reason``); nothing is dropped
without a reason. Reasons are listed in :data:`REASONS`.
"""

from __future__ import annotations

import io
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from data_prep.files import detect_format, open_decompressed

REASONS = {
    "malformed_json": "line is not valid JSON, or not a JSON object",
    "missing_text_key": "the text key is absent or null",
    "not_a_string": "the text value is not a string",
    "non_utf8": "bytes are not valid UTF-8 (or the text holds lone surrogates)",
    "empty_document": "the text is empty or only whitespace",
    "truncated_gzip": "a gzip member ends early; records before the cut are kept",
    "truncated_zstd": "a zstd frame ends early; records before the cut are kept",
    "corrupt_compressed": "the compressed stream is corrupt; records before it are kept",
    "unreadable_file": "the file cannot be opened as its format (e.g. a broken parquet footer)",
}

TXT_MODES = ("document", "paragraph", "line")

# Unit of the per-piece record position reported for each format, for messages.
_UNITS = {"jsonl": "line", "json": "line", "txt": "line", "json_array": "item", "parquet": "row"}

_READ_CHUNK = 1 << 20
_PARQUET_BATCH = 1024


@dataclass(frozen=True)
class Piece:
    """One unit of work: a part of one input file.

    ``start``/``end`` partition the file's raw bytes across its pieces (used for hashing and
    progress; for splittable plain files, a piece owns exactly the lines that start inside it).
    """

    index: int
    path: str
    fmt: str  # jsonl | json | json_array | txt | parquet
    compression: str
    file_size: int
    start: int
    end: int
    row_groups: tuple[int, ...] = ()
    first_row: int = 0
    error: str = ""  # set when planning found the file unreadable

    @property
    def unit(self) -> str:
        """What a record position counts: ``line``, ``row`` or ``item``."""
        return _UNITS[self.fmt]

    @property
    def whole_file(self) -> bool:
        """Whether this piece is the whole file."""
        return self.start == 0 and self.end == self.file_size


@dataclass
class Record:
    """One record: a document (``text``) or a bad record (``reason``) at position ``where``."""

    where: int
    text: str | None = None
    reason: str | None = None
    detail: str = ""


@dataclass
class ReaderState:
    """Progress of a :class:`PieceReader`, readable while it iterates."""

    raw_pos: int = 0
    lines: int = 0  # line-format files: physical lines owned by the piece (for global numbers)
    blank_lines: int = 0


def plan_pieces(paths: list[str], piece_size: int, txt_mode: str = "document") -> list[Piece]:
    """Cut the input files into pieces of about ``piece_size`` raw bytes, in input order.

    The plan depends only on the files and ``piece_size`` (never on the worker count), so a
    resumed run finds the same pieces.
    """
    pieces: list[Piece] = []
    for path in paths:
        fmt, compression = detect_format(path)
        size = os.path.getsize(path)
        if fmt == "parquet":
            pieces += _plan_parquet(len(pieces), path, size, piece_size)
            continue
        if fmt == "json" and _starts_with_bracket(path, compression):
            fmt = "json_array"
        splittable = (not compression and fmt in ("jsonl", "json")
                      or not compression and fmt == "txt" and txt_mode == "line")
        if not splittable or size <= piece_size:
            pieces.append(Piece(len(pieces), path, fmt, compression, size, 0, size))
            continue
        for start in range(0, size, piece_size):
            end = min(size, start + piece_size)
            pieces.append(Piece(len(pieces), path, fmt, compression, size, start, end))
    return pieces


def _starts_with_bracket(path: str, compression: str) -> bool:
    """Whether the (decompressed) file's first non-blank byte is ``[`` (a JSON array)."""
    try:
        stream, raw = open_decompressed(path, compression)
        with raw:
            head = (_ZstdStream(raw) if compression == "zst" else stream).read(4096)
    except Exception:  # unreadable: the worker reports it as a bad record
        return False
    return head.lstrip()[:1] == b"["


def _plan_parquet(first_index: int, path: str, size: int, piece_size: int) -> list[Piece]:
    """Group consecutive row groups into pieces of about ``piece_size`` compressed bytes."""
    try:
        import pyarrow.parquet as pq
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("reading .parquet needs the 'pyarrow' package "
                          "(pip install 'pyarrow>=14')") from err
    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as err:
        return [Piece(first_index, path, "parquet", "", size, 0, size, error=str(err)[:200])]
    groups: list[list[int]] = []
    starts: list[int] = []
    rows_before: list[int] = []
    rows = acc = 0
    for rg in range(meta.num_row_groups):
        group = meta.row_group(rg)
        if not groups or acc >= piece_size:
            col = group.column(0)
            offset = (col.dictionary_page_offset if col.has_dictionary_page
                      else col.data_page_offset)
            groups.append([])
            # Byte ranges must partition the file: the first starts at 0, all increase.
            starts.append(0 if not starts else max(offset, starts[-1] + 1))
            rows_before.append(rows)
            acc = 0
        groups[-1].append(rg)
        acc += group.total_byte_size
        rows += group.num_rows
    if not groups:  # a file with no row groups: one empty piece
        return [Piece(first_index, path, "parquet", "", size, 0, size)]
    ends = starts[1:] + [size]
    return [Piece(first_index + i, path, "parquet", "", size, starts[i], ends[i],
                  tuple(groups[i]), rows_before[i]) for i in range(len(groups))]


class _ZstdStream(io.RawIOBase):
    """Decompress concatenated zstd frames; raise ``EOFError`` if the last frame is cut short.

    ``zstandard``'s own stream reader ends silently at a truncated frame, which would make
    a truncation disappear without a count.
    """

    def __init__(self, raw: BinaryIO) -> None:
        import zstandard

        self._raw = raw
        self._zstd = zstandard
        self._dobj = zstandard.ZstdDecompressor().decompressobj()
        self._pending = b""  # input not yet fed to the decompressor
        self._out = b""
        self._in_frame = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        while not self._out:
            data = self._pending or self._raw.read(_READ_CHUNK)
            self._pending = b""
            if not data:
                if self._in_frame:
                    raise EOFError("zstd frame ended before its end marker")
                return 0
            try:
                self._out = self._dobj.decompress(data)
            except self._zstd.ZstdError as err:
                raise ValueError(f"corrupt zstd data: {err}") from err
            self._in_frame = True
            if self._dobj.eof:  # frame finished: the rest belongs to the next frame
                self._pending = self._dobj.unused_data
                self._dobj = self._zstd.ZstdDecompressor().decompressobj()
                self._in_frame = False
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n


class PieceReader:
    """Iterate the :class:`Record` s of one piece.

    ``text_key`` names the JSON field / parquet column holding the text; ``txt_mode`` says what
    one ``.txt`` document is: the whole file, a blank-line separated paragraph, or a line.
    """

    def __init__(self, piece: Piece, text_key: str = "text", txt_mode: str = "document") -> None:
        if txt_mode not in TXT_MODES:
            raise ValueError(f"txt_mode must be one of {TXT_MODES}, not {txt_mode!r}")
        self.piece = piece
        self.text_key = text_key
        self.txt_mode = txt_mode
        self.state = ReaderState(raw_pos=piece.start)

    def __iter__(self) -> Iterator[Record]:
        piece = self.piece
        if piece.error:
            yield Record(1, reason="unreadable_file", detail=piece.error)
            return
        if piece.fmt == "parquet":
            yield from self._parquet()
        elif piece.fmt == "json_array":
            yield from self._json_array()
        elif piece.fmt == "txt" and self.txt_mode == "document":
            yield from self._txt_document()
        else:
            yield from self._line_records()

    # -- line formats --------------------------------------------------------------------
    def _lines(self) -> Iterator[tuple[int, bytes]]:
        """``(line number within the piece, raw line)`` for the lines the piece owns.

        Compression errors surface as :class:`_StreamError` after the complete lines before
        them have been yielded.
        """
        piece = self.piece
        stream, raw = open_decompressed(piece.path, piece.compression)
        if piece.compression == "zst":
            stream = io.BufferedReader(_ZstdStream(raw), buffer_size=_READ_CHUNK)
        with raw, stream:
            if piece.start > 0:
                # The line that contains byte start-1 belongs to the previous piece.
                stream.seek(piece.start - 1)
                stream.readline()
            pos = stream.tell() if not piece.compression else 0
            number = 0
            while True:
                if not piece.compression and pos >= piece.end:
                    break
                try:
                    line = stream.readline()
                except EOFError as err:
                    kind = "truncated_gzip" if piece.compression == "gz" else "truncated_zstd"
                    raise _StreamError(number + 1, kind, str(err)) from err
                except (OSError, ValueError, zlib.error) as err:  # BadGzipFile, bad deflate
                    raise _StreamError(number + 1, "corrupt_compressed", str(err)) from err
                if not line:
                    break
                number += 1
                pos += len(line)
                self.state.lines = number
                self.state.raw_pos = raw.tell() if piece.compression else pos
                yield number, line

    def _line_records(self) -> Iterator[Record]:
        """Records of ``jsonl``/``json`` lines or ``.txt`` lines/paragraphs."""
        txt = self.piece.fmt == "txt"
        paragraph: list[bytes] = []
        para_start = 0
        try:
            for number, line in self._lines():
                if txt and self.txt_mode == "paragraph":
                    if line.strip():
                        if not paragraph:
                            para_start = number
                        paragraph.append(line)
                        continue
                    self.state.blank_lines += 1
                    if paragraph:
                        yield _text_record(para_start, b"".join(paragraph))
                        paragraph = []
                    continue
                if not line.strip():
                    # Blank lines hold no record (JSON Lines readers skip them too); counted.
                    self.state.blank_lines += 1
                    continue
                yield _text_record(number, line) if txt else self._json_record(number, line)
        except _StreamError as err:
            if paragraph:
                # The paragraph in progress may be cut: keep what is complete, count the cut.
                yield _text_record(para_start, b"".join(paragraph))
            yield Record(err.where, reason=err.reason, detail=err.detail)
            return
        if paragraph:
            yield _text_record(para_start, b"".join(paragraph))

    def _json_record(self, where: int, line: bytes) -> Record:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            return Record(where, reason="non_utf8", detail=f"byte {err.start}")
        try:
            obj = json.loads(text.rstrip("\r\n"))
        except (ValueError, RecursionError) as err:
            return Record(where, reason="malformed_json", detail=str(err)[:80])
        return self._object_record(where, obj)

    def _object_record(self, where: int, obj: object) -> Record:
        if not isinstance(obj, dict):
            return Record(where, reason="malformed_json", detail=f"a JSON {type(obj).__name__},"
                                                                 " not an object")
        value = obj.get(self.text_key)
        if value is None:
            return Record(where, reason="missing_text_key", detail=f"no {self.text_key!r}")
        if not isinstance(value, str):
            return Record(where, reason="not_a_string", detail=type(value).__name__)
        return Record(where, text=value)

    # -- whole-file formats ----------------------------------------------------------------
    def _read_all(self) -> tuple[bytes, Record | None]:
        """The whole decompressed file, and a bad record if the stream broke early."""
        piece = self.piece
        stream, raw = open_decompressed(piece.path, piece.compression)
        if piece.compression == "zst":
            stream = _ZstdStream(raw)
        chunks: list[bytes] = []
        problem = None
        with raw:
            try:
                while chunk := stream.read(_READ_CHUNK):
                    chunks.append(chunk)
            except EOFError as err:
                kind = "truncated_gzip" if piece.compression == "gz" else "truncated_zstd"
                problem = Record(1, reason=kind, detail=str(err))
            except (OSError, ValueError, zlib.error) as err:
                problem = Record(1, reason="corrupt_compressed", detail=str(err)[:120])
        self.state.raw_pos = piece.end
        return b"".join(chunks), problem

    def _txt_document(self) -> Iterator[Record]:
        data, problem = self._read_all()
        if problem is None or data:
            # A cut .txt document keeps the text before the cut (and the cut is counted).
            yield _text_record(1, data)
        if problem is not None:
            yield problem

    def _json_array(self) -> Iterator[Record]:
        data, problem = self._read_all()
        if problem is not None:
            # A cut JSON array cannot be parsed; the truncation is the one bad record.
            yield problem
            return
        try:
            items = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as err:
            yield Record(1, reason="non_utf8", detail=f"byte {err.start}")
            return
        except (ValueError, RecursionError) as err:
            yield Record(1, reason="malformed_json", detail=str(err)[:80])
            return
        if not isinstance(items, list):
            items = [items]
        for i, obj in enumerate(items, start=1):
            yield self._object_record(i, obj)

    def _parquet(self) -> Iterator[Record]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        piece = self.piece
        try:
            pfile = pq.ParquetFile(piece.path)
        except Exception as err:
            yield Record(1, reason="unreadable_file", detail=str(err)[:200])
            return
        where = 0
        if self.text_key not in pfile.schema_arrow.names:
            for rg in piece.row_groups:
                for _ in range(pfile.metadata.row_group(rg).num_rows):
                    where += 1
                    yield Record(where, reason="missing_text_key",
                                 detail=f"no column {self.text_key!r}")
            self.state.raw_pos = piece.end
            return
        col_type = pfile.schema_arrow.field(self.text_key).type
        textual = pa.types.is_string(col_type) or pa.types.is_large_string(col_type)
        binary = pa.types.is_binary(col_type) or pa.types.is_large_binary(col_type)
        step = (piece.end - piece.start) // max(1, len(piece.row_groups))
        for rg in piece.row_groups:
            rows = pfile.metadata.row_group(rg).num_rows
            done = 0
            try:
                # Batches, not whole row groups, bound the memory held at once.
                for batch in pfile.iter_batches(batch_size=_PARQUET_BATCH, row_groups=[rg],
                                                columns=[self.text_key]):
                    column = batch.column(0)
                    if textual:
                        # Decode ourselves: arrow does not re-validate UTF-8 of stored strings.
                        column = column.cast(pa.large_binary())
                    for value in column.to_pylist():
                        where += 1
                        done += 1
                        yield self._parquet_value(where, value, textual or binary, col_type)
            except Exception as err:  # a corrupt page: the rest of the row group is unreadable
                for _ in range(rows - done):
                    where += 1
                    yield Record(where, reason="unreadable_file", detail=str(err)[:120])
            self.state.raw_pos = min(piece.end, self.state.raw_pos + step)
        self.state.raw_pos = piece.end

    @staticmethod
    def _parquet_value(where: int, value: object, stringy: bool, col_type: object) -> Record:
        if value is None:
            return Record(where, reason="missing_text_key", detail="null")
        if not stringy:
            return Record(where, reason="not_a_string", detail=str(col_type))
        try:
            return Record(where, text=value.decode("utf-8"))  # type: ignore[union-attr]
        except UnicodeDecodeError as err:
            return Record(where, reason="non_utf8", detail=f"byte {err.start}")


class _StreamError(Exception):
    """A compressed stream broke at record ``where`` (internal to the line readers)."""

    def __init__(self, where: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.where, self.reason, self.detail = where, reason, detail


def _text_record(where: int, data: bytes) -> Record:
    """A ``.txt`` record: the bytes decoded, without the final line break."""
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    try:
        return Record(where, text=data.decode("utf-8"))
    except UnicodeDecodeError as err:
        return Record(where, reason="non_utf8", detail=f"byte {err.start}")
