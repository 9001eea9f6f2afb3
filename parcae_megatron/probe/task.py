"""Pointer-chasing documents: a function table in context, queries that follow it k times.

A document (one line of the probe corpus) is a random cyclic permutation f of ``n_symbols``
letters (one cycle through all of them, so f^k(x) != x for k < n_symbols and no answer can be
guessed from the query letter; k < n_symbols / 2, so neither going backwards round the cycle
nor eliminating the letters near x is shorter) written as a table, then queries, each three
characters ``k x y`` with ``y = f^k(x)``::

    cb,ae,ba,dc,ed,|2ad1cb2ec1ed...

Table entries come in shuffled order, so answering ``k x`` needs k sequential look-ups of the
table (no shortcut through position). The answer ``y`` is predicted at the position of ``x``;
many queries per document make most of the loss the look-up itself. Every document has exactly
``doc_chars`` characters (``.`` pads the tail) so that, with one EOS token per document and
one token per character, documents fill Megatron's ``seq_length``-token samples exactly.

Held-out chains: a chain is a query (table, x, k). Each table belongs to one split, chosen by a
keyed hash of the table, so no chain of the test split occurs in training.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

SEPARATOR, TABLE_END, PAD = ",", "|", "."
ENTRY_CHARS, QUERY_CHARS = 3, 3


@dataclass(frozen=True)
class TaskSpec:
    """Shape of the probe documents."""

    n_symbols: int = 7
    max_k: int = 3
    doc_chars: int = 63  # seq_length - 1 (one EOS token per document)
    k_weights: tuple[float, ...] | None = None  # relative weight of k = 1..max_k
    test_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not 2 <= self.n_symbols <= 26:
            raise ValueError("n_symbols must be in 2..26")
        if not 1 <= self.max_k <= min(9, (self.n_symbols - 1) // 2):
            # on an n-cycle f^k = f^-(n-k): k > n/2 look-ups forward are n-k backward, and
            # f^(n/2)(x) is the one letter not within n/2 - 1 steps of x either way
            # (look-ups both ways in parallel, then elimination): k < n/2 has no shortcut
            raise ValueError("max_k must be in 1..min(9, (n_symbols - 1) // 2) (one digit, "
                             "and no shorter way round the cycle)")
        if self.n_queries < 1:
            raise ValueError(f"doc_chars {self.doc_chars} leaves no room for a query after "
                             f"a {self.n_symbols}-entry table")
        if self.k_weights is not None and len(self.k_weights) != self.max_k:
            raise ValueError("k_weights needs one weight per k = 1..max_k")

    @property
    def symbols(self) -> str:
        """The letters the tables permute."""
        return "abcdefghijklmnopqrstuvwxyz"[: self.n_symbols]

    @property
    def n_queries(self) -> int:
        """Queries per document."""
        return (self.doc_chars - ENTRY_CHARS * self.n_symbols - 1) // QUERY_CHARS

    @property
    def alphabet(self) -> str:
        """Every character a document can contain."""
        digits = "".join(str(k) for k in range(1, self.max_k + 1))
        return self.symbols + digits + SEPARATOR + TABLE_END + PAD


@dataclass
class Document:
    """One probe document and where its answers are."""

    text: str
    table: dict[str, str]
    queries: list[tuple[int, str, str]] = field(default_factory=list)  # (k, x, answer)
    answer_offsets: list[int] = field(default_factory=list)  # char offset of each answer

    def to_json(self) -> dict:
        """The corpus line (``text``) plus what evaluation needs."""
        return {"text": self.text, "queries": [list(q) for q in self.queries],
                "answer_offsets": self.answer_offsets}


def follow(table: dict[str, str], x: str, k: int) -> str:
    """``f^k(x)``: k sequential look-ups."""
    for _ in range(k):
        x = table[x]
    return x


def split_of(table: dict[str, str], test_fraction: float) -> str:
    """``"test"`` or ``"train"`` for a table, from a fixed hash (independent of the seed)."""
    key = "".join(table[s] for s in sorted(table)).encode()
    h = int.from_bytes(hashlib.blake2b(key, digest_size=8, person=b"parcae-probe").digest(),
                       "little")
    return "test" if h / 2**64 < test_fraction else "train"


def parse(text: str) -> tuple[dict[str, str], list[tuple[int, str, str]]]:
    """Table and queries of a document's text (inverse of ``make_document``)."""
    head, _, tail = text.partition(TABLE_END)
    table = dict((e[0], e[1]) for e in head.split(SEPARATOR) if e)
    tail = tail.rstrip(PAD)
    queries = [(int(tail[i]), tail[i + 1], tail[i + 2]) for i in range(0, len(tail), 3)]
    return table, queries


def make_document(rng: random.Random, spec: TaskSpec, split: str) -> Document:
    """A document whose table belongs to ``split``."""
    while True:
        cycle = list(spec.symbols)
        rng.shuffle(cycle)
        table = {a: b for a, b in zip(cycle, cycle[1:] + cycle[:1])}
        if split_of(table, spec.test_fraction) == split:
            break
    entries = [f"{x}{table[x]}{SEPARATOR}" for x in spec.symbols]
    rng.shuffle(entries)
    text = "".join(entries) + TABLE_END
    ks = list(range(1, spec.max_k + 1))
    doc = Document(text="", table=table)
    for _ in range(spec.n_queries):
        k = rng.choices(ks, weights=spec.k_weights)[0]
        x = rng.choice(spec.symbols)
        y = follow(table, x, k)
        doc.answer_offsets.append(len(text) + 2)
        doc.queries.append((k, x, y))
        text += f"{k}{x}{y}"
    doc.text = text + PAD * (spec.doc_chars - len(text))
    return doc


def generate(spec: TaskSpec, split: str, n_docs: int, seed: int) -> list[Document]:
    """``n_docs`` documents of ``split``, the same for the same (spec, split, n_docs, seed)."""
    if split not in ("train", "test"):
        raise ValueError("split must be 'train' or 'test'")
    rng = random.Random(f"parcae-probe/{split}/{seed}")
    return [make_document(rng, spec, split) for _ in range(n_docs)]
