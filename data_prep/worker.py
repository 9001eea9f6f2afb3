"""Tokenize one piece into its own small indexed dataset (runs in a worker process).

Each finished piece leaves ``p-ID.bin``, ``p-ID.idx`` and, written last, ``p-ID.json`` (its
statistics and the SHA-256 of the input bytes it covers) in the work directory. ``ID`` hashes
everything that determines the piece's output (file, byte range, settings, tokenizer), so a
resumed run reuses a piece only if nothing about it changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from typing import Any

from data_prep import indexed
from data_prep.files import atomic_write_json, read_json, sha256_file
from data_prep.readers import Piece, PieceReader
from data_prep.report import FIRST_LOCATIONS
from data_prep.tokenizer import Tokenizer

PROGRESS_EVERY_S = 0.25

_W: dict[str, Any] = {}  # per-process settings, filled by init_worker


def piece_key(piece: Piece, settings: dict) -> dict:
    """Everything that determines a piece's output (its index in the plan excluded)."""
    fields = asdict(piece)
    fields.pop("index")
    key = {"version": 1, **fields, **{k: settings[k] for k in
                                      ("text_key", "txt_mode", "bos", "eos", "tokenizer_sha256",
                                       "dtype")}}
    return json.loads(json.dumps(key))  # as stored in the piece's .json (tuples -> lists)


def piece_id(key: dict) -> str:
    """Short stable id of a piece key (the work file names)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def piece_prefix(work_dir: str, key: dict) -> str:
    """Dataset prefix of a piece in ``work_dir``."""
    return os.path.join(work_dir, "p-" + piece_id(key))


def init_worker(settings: dict, counters: Any) -> None:
    """Pool initializer: keep the settings (the tokenizer arrives pickled, once per process)."""
    _W.clear()
    _W.update(settings)
    _W["counters"] = counters
    _W["np_dtype"] = indexed.token_dtype(_W["tokenizer"].vocab_size)


class _Reporter:
    """Adds this worker's progress to the shared counters a few times a second."""

    def __init__(self) -> None:
        self.pending = [0, 0, 0, 0]  # docs, tokens, text bytes, raw bytes
        self.last = time.time()

    def add(self, docs: int = 0, tokens: int = 0, text: int = 0, raw: int = 0,
            force: bool = False) -> None:
        for i, v in enumerate((docs, tokens, text, raw)):
            self.pending[i] += v
        now = time.time()
        if (force or now - self.last > PROGRESS_EVERY_S) and _W.get("counters") is not None:
            counters = _W["counters"]
            with counters.get_lock():
                for i, v in enumerate(self.pending):
                    counters[i] += v
            self.pending = [0, 0, 0, 0]
            self.last = now


def process_piece(piece: Piece) -> dict:
    """Tokenize ``piece`` (or reuse its finished output on ``resume``); return its stats."""
    key = piece_key(piece, _W)
    prefix = piece_prefix(_W["work_dir"], key)
    reporter = _Reporter()
    if _W["resume"] and os.path.exists(prefix + ".json") and indexed.exists(prefix):
        stats = read_json(prefix + ".json")
        if stats.get("key") == key and sha256_file(piece.path, piece.start, piece.end) \
                == stats.get("sha256"):
            reporter.add(stats["documents"], stats["tokens"], stats["text_bytes"],
                         piece.end - piece.start, force=True)
            return {**stats, "reused": True}
    t0 = time.time()
    tok: Tokenizer = _W["tokenizer"]
    bin_tmp, idx_tmp = indexed.partial_paths(prefix)
    out = indexed.builder(bin_tmp, _W["np_dtype"])
    reader = PieceReader(piece, _W["text_key"], _W["txt_mode"])
    stats: dict[str, Any] = {"key": key, "documents": 0, "tokens": 0, "text_bytes": 0,
                             "records": 0, "skipped": {}, "skipped_first": {}}
    raw_seen = piece.start
    encode = tok.encoder(_W["bos"], _W["eos"])

    def skip(where: int, reason: str, detail: str) -> None:
        stats["skipped"][reason] = stats["skipped"].get(reason, 0) + 1
        first = stats["skipped_first"].setdefault(reason, [])
        if len(first) < FIRST_LOCATIONS:
            first.append([where, detail])

    for record in reader:
        stats["records"] += 1
        text = record.text
        if text is None:
            skip(record.where, record.reason or "unknown", record.detail)
            continue
        if not text.strip():
            skip(record.where, "empty_document", "")
            continue
        try:
            n_bytes = len(text.encode("utf-8"))
        except UnicodeEncodeError as err:  # lone surrogates, e.g. from a "\ud800" JSON escape
            skip(record.where, "non_utf8", f"lone surrogate at char {err.start}")
            continue
        # One call per document: batch encoding is no faster single-threaded.
        ids = encode(text)
        out.add_document(ids, [len(ids)])
        stats["documents"] += 1
        stats["tokens"] += len(ids)
        stats["text_bytes"] += n_bytes
        reporter.add(1, len(ids), n_bytes, reader.state.raw_pos - raw_seen)
        raw_seen = reader.state.raw_pos
    out.finalize(idx_tmp)
    reporter.add(raw=piece.end - raw_seen, force=True)
    indexed.publish(prefix)
    stats.update(lines=reader.state.lines, blank_lines=reader.state.blank_lines,
                 bin_bytes=os.path.getsize(prefix + ".bin"),
                 sha256=sha256_file(piece.path, piece.start, piece.end),
                 seconds=round(time.time() - t0, 3))
    # Written last: its presence is what marks the piece finished.
    atomic_write_json(prefix + ".json", stats)
    return {**stats, "reused": False}
