"""Evaluation data: a token stream from an indexed dataset or text files, cut into windows.

Documents from text files are encoded as ``<|bos|> text <|eos|>``, exactly as
``data_prep.preprocess`` writes them, so both inputs give the stream the model was trained on.
The stream is cut like Megatron's GPT dataset: windows of ``seq_length + 1`` tokens with stride
``seq_length``, so every token but the first is predicted exactly once.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@dataclass
class TokenWindows:
    """Windows of ``seq_length + 1`` tokens (the last may be shorter) and their origin."""

    windows: list[np.ndarray]
    source: str
    documents: int | None = None

    @property
    def targets(self) -> int:
        """Tokens that get scored (every window position but the first)."""
        return sum(len(w) - 1 for w in self.windows)


def _read_documents(path: str, text_key: str) -> Iterator[str]:
    opener = gzip.open if path.endswith(".gz") else open
    name = path[:-3] if path.endswith(".gz") else path
    with opener(path, "rt", encoding="utf-8") as f:
        if name.endswith((".jsonl", ".json")):
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[text_key]
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise ValueError(f"{path}:{n}: not a JSON object with a {text_key!r} "
                                     f"string ({err})") from err
                if isinstance(text, str) and text:
                    yield text
        elif name.endswith(".txt"):
            text = f.read()
            if text:
                yield text
        else:
            raise ValueError(f"{path}: unsupported file type (use .txt or .jsonl, "
                             f"optionally .gz)")


def text_token_stream(paths: list[str], tokenizer, max_tokens: int | None,
                      text_key: str = "text") -> tuple[np.ndarray, int]:
    """``<|bos|> doc <|eos|>`` for each document (a .txt file is one document; a .jsonl line
    is one); stops once ``max_tokens + 1`` tokens are collected. Returns (stream, documents)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    parts, total, docs = [], 0, 0
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"text file not found: {path}")
        for text in _read_documents(path, text_key):
            ids = tokenizer.encode(text, add_special_tokens=False)
            doc = ([bos] if bos is not None else []) + ids + ([eos] if eos is not None else [])
            parts.append(np.asarray(doc, dtype=np.int64))
            total += len(doc)
            docs += 1
            if max_tokens is not None and total > max_tokens:
                return np.concatenate(parts), docs
    if not parts:
        raise ValueError(f"no text in {', '.join(paths)}")
    return np.concatenate(parts), docs


def indexed_token_stream(prefix: str, max_tokens: int | None) -> tuple[np.ndarray, int]:
    """Sequences of Megatron's indexed dataset ``prefix`` (.bin/.idx), in order, concatenated
    until ``max_tokens + 1`` tokens. Returns (stream, documents touched)."""
    for suffix in (".bin", ".idx"):
        if not os.path.isfile(prefix + suffix):
            raise FileNotFoundError(f"indexed dataset file not found: {prefix + suffix}")
    from data_prep.indexed import open_dataset

    ds = open_dataset(prefix)
    parts, total = [], 0
    for i in range(len(ds)):
        seq = np.asarray(ds[i], dtype=np.int64)
        parts.append(seq)
        total += len(seq)
        if max_tokens is not None and total > max_tokens:
            break
    if not parts:
        raise ValueError(f"indexed dataset {prefix} is empty")
    docs = int(np.searchsorted(ds.document_indices, len(parts), side="left"))
    return np.concatenate(parts), docs


def make_windows(stream: np.ndarray, seq_length: int, max_tokens: int | None = None,
                 max_sequences: int | None = None) -> list[np.ndarray]:
    """Megatron-style windows: ``stream[i·s : (i+1)·s + 1]``, at most ``max_tokens`` targets
    and ``max_sequences`` windows; a shorter tail window is kept."""
    if seq_length < 1:
        raise ValueError("seq_length must be >= 1")
    limit = len(stream) - 1 if max_tokens is None else min(len(stream) - 1, max_tokens)
    windows = []
    for start in range(0, limit, seq_length):
        if max_sequences is not None and len(windows) >= max_sequences:
            break
        windows.append(stream[start: min(start + seq_length, limit) + 1])
    if not windows:
        raise ValueError("not enough tokens to score (need at least 2)")
    return windows


def token_byte_lengths(tokenizer, vocab_size: int) -> np.ndarray:
    """UTF-8 bytes each id stands for (0 for special/control ids), for bits per byte.

    SentencePiece tokenizers are read piece by piece (``<0xNN>`` byte pieces count 1, ``▁`` is a
    space), which is exact even where one character is split over several byte pieces;
    byte-level BPE tokens (``tokenizer.json`` with a ByteLevel decoder) are one character per
    byte; other tokenizers fall back to decoding each id alone.
    """
    table = np.zeros(vocab_size, dtype=np.int64)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    sp = getattr(tokenizer, "sp_model", None)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_level = backend is not None and type(backend.decoder).__name__ == "ByteLevel"
    n = min(vocab_size, len(tokenizer))
    for i in range(n):
        if i in special:
            continue
        if sp is not None:
            if sp.is_control(i) or sp.is_unknown(i):
                continue
            piece = sp.id_to_piece(i)
            table[i] = 1 if _BYTE_PIECE.match(piece) else len(
                piece.replace("\u2581", " ").encode("utf-8"))
        elif byte_level:
            table[i] = len(tokenizer.convert_ids_to_tokens(i))
        else:
            table[i] = len(tokenizer.decode([i]).encode("utf-8"))
    return table
