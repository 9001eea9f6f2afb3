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

The unary form (``query_form="unary"``) writes a query as ``x`` then k hop marks ``+`` then
``y`` (``b++d`` is f²(b) = d), answered at the last mark. It has no token for k, so a chain
longer than any trained one is made of the same tokens as the trained ones: the form for
testing chains longer than training (``test_max_k > max_k``); the digit form would ask about a
digit token that training never saw.

Held-out chains: a chain is a query (table, x, k). Each table belongs to one split, chosen by a
keyed hash of the table, so no chain of the test split occurs in training.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field

SEPARATOR, TABLE_END, PAD, HOP = ",", "|", ".", "+"
ENTRY_CHARS, QUERY_CHARS = 3, 3
QUERY_FORMS = ("digit", "unary")


@dataclass(frozen=True)
class TaskSpec:
    """Shape of the probe documents."""

    n_symbols: int = 7
    max_k: int = 3
    doc_chars: int = 63  # seq_length - 1 (one EOS token per document)
    k_weights: tuple[float, ...] | None = None  # relative weight of k = 1..max_k
    test_fraction: float = 0.1
    test_max_k: int | None = None  # longest held-out chain (default max_k)
    query_form: str = "digit"

    def __post_init__(self) -> None:
        if self.test_max_k is None:
            object.__setattr__(self, "test_max_k", self.max_k)
        if self.query_form not in QUERY_FORMS:
            raise ValueError(f"query form must be one of {', '.join(QUERY_FORMS)}")
        if not 2 <= self.n_symbols <= 26:
            raise ValueError("n_symbols must be in 2..26")
        # on an n-cycle f^k = f^-(n-k): k > n/2 look-ups forward are n-k backward, and
        # f^(n/2)(x) is the one letter not within n/2 - 1 steps of x either way
        # (look-ups both ways in parallel, then elimination): k < n/2 has no shortcut
        longest = (self.n_symbols - 1) // 2
        if self.query_form == "digit":
            longest = min(9, longest)  # k is one digit
        if not 1 <= self.max_k <= longest:
            raise ValueError(f"max_k must be in 1..{longest} for {self.n_symbols} letters "
                             "(k < n_symbols / 2: no shorter way round the cycle"
                             + (", and one digit)" if self.query_form == "digit" else ")"))
        if not self.max_k <= self.test_max_k <= longest:
            raise ValueError(f"test_max_k must be in max_k..{longest} for {self.n_symbols} "
                             f"letters (k < n_symbols / 2 for every tested k: no shorter way "
                             f"round the cycle), got {self.test_max_k}")
        if self.test_max_k > self.max_k and self.query_form != "unary":
            raise ValueError("chains longer than training need --query-form unary (the "
                             f"digit form would write k = {self.max_k + 1} as a token "
                             "training never saw)")
        for split in ("train", "test"):
            if self.queries_per_document(split) < 1:
                raise ValueError(f"doc_chars {self.doc_chars} leaves no room for a "
                                 f"{self.longest_k(split)}-hop query after a "
                                 f"{self.n_symbols}-entry table")
        if self.k_weights is not None and len(self.k_weights) != self.max_k:
            raise ValueError("k_weights needs one weight per k = 1..max_k")

    @property
    def symbols(self) -> str:
        """The letters the tables permute."""
        return "abcdefghijklmnopqrstuvwxyz"[: self.n_symbols]

    @property
    def n_queries(self) -> int:
        """Queries per training document."""
        return self.queries_per_document("train")

    def longest_k(self, split: str) -> int:
        """The longest chain of ``split``: max_k in training, test_max_k held out."""
        return self.max_k if split == "train" else self.test_max_k

    def query_chars(self, k: int) -> int:
        """Characters of one k-hop query."""
        return QUERY_CHARS if self.query_form == "digit" else k + 2

    def queries_per_document(self, split: str) -> int:
        """Queries per document of ``split``: as many as fit when every one is the longest."""
        room = self.doc_chars - ENTRY_CHARS * self.n_symbols - 1
        return room // self.query_chars(self.longest_k(split))

    @property
    def alphabet(self) -> str:
        """Every character a training document can contain (held-out ones use the same)."""
        marks = ("".join(str(k) for k in range(1, self.max_k + 1))
                 if self.query_form == "digit" else HOP)
        return self.symbols + marks + SEPARATOR + TABLE_END + PAD


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
    """Table and queries of a document's text, either form (inverse of ``make_document``)."""
    head, _, tail = text.partition(TABLE_END)
    table = dict((e[0], e[1]) for e in head.split(SEPARATOR) if e)
    tail = tail.rstrip(PAD)
    if tail[:1].isdigit():
        queries = [(int(tail[i]), tail[i + 1], tail[i + 2]) for i in range(0, len(tail), 3)]
    else:
        queries = [(len(hops), x, y) for x, hops, y in re.findall(rf"(\w)(\{HOP}+)(\w)", tail)]
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
    ks = list(range(1, spec.longest_k(split) + 1))
    # the training mix may favour short chains; held-out chains cover every k evenly
    weights = spec.k_weights if split == "train" else None
    doc = Document(text="", table=table)
    for _ in range(spec.queries_per_document(split)):
        k = rng.choices(ks, weights=weights)[0]
        x = rng.choice(spec.symbols)
        y = follow(table, x, k)
        query = f"{k}{x}{y}" if spec.query_form == "digit" else f"{x}{HOP * k}{y}"
        doc.answer_offsets.append(len(text) + len(query) - 1)
        doc.queries.append((k, x, y))
        text += query
    doc.text = text + PAD * (spec.doc_chars - len(text))
    return doc


def generate(spec: TaskSpec, split: str, n_docs: int, seed: int) -> list[Document]:
    """``n_docs`` documents of ``split``, the same for the same (spec, split, n_docs, seed)."""
    if split not in ("train", "test"):
        raise ValueError("split must be 'train' or 'test'")
    rng = random.Random(f"parcae-probe/{split}/{seed}")
    return [make_document(rng, spec, split) for _ in range(n_docs)]
