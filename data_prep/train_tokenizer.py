"""``python -m data_prep.train_tokenizer``: train the Parcae tokenizer (docs/design.md §6.3).

Reads the same inputs as ``data_prep.preprocess``, samples up to ``--max-chars`` characters of
documents (each capped at ``--max-doc-chars``) and trains one of two kinds, both with the
special tokens ``<|bos|>``, ``<|eos|>``, ``<|pad|>``:

* ``--kind sentencepiece`` (default): a byte-fallback BPE SentencePiece model with split digits,
  written as ``OUT.model``;
* ``--kind hf-bpe``: the paper's own tokenizer, a GPT-4-style byte-level BPE trained with the
  Hugging Face ``tokenizers`` library (digits in runs of at most two), written as the directory
  ``OUT/`` holding ``tokenizer.json`` and ``tokenizer_config.json``.

Either way ``OUT.settings.json`` records the settings, sample statistics and SHA-256.

The sample is content-defined: every document gets a priority from a hash of its text (and
``--seed``), and the sample is the lowest-priority documents that fit in ``--max-chars``. It is
a uniform sample of documents that does not depend on file order, piece layout or worker count,
and it is found in one streaming pass with memory bounded by ``--max-chars``.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import os
import sys
import time

from data_prep.files import (
    InputError,
    atomic_write_bytes,
    atomic_write_json,
    expand_inputs,
    parse_size,
)
from data_prep.parallel import default_workers, make_pool
from data_prep.readers import TXT_MODES, PieceReader, plan_pieces
from data_prep.tokenizer import (
    BOS_PIECE,
    EOS_PIECE,
    HF_FILE,
    PAD_PIECE,
    SPECIAL_IDS,
    UNK_PIECE,
    HFTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
)
from parcae_megatron import cli

DEFAULT_VOCAB = 32768
DEFAULT_MAX_CHARS = 2_000_000_000  # docs/design.md §6.3: 2B characters of FineWeb-Edu
DEFAULT_MAX_DOC_CHARS = 10_000  # docs/design.md §6.3: documents capped at 10k characters
DEFAULT_THREADS = 16  # SentencePiece's own default
KINDS = ("sentencepiece", "hf-bpe")
# The paper's split (GPT-4's, with digits in runs of one or two instead of three).
HF_SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}|"""
                    r""" ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""")
HF_SPECIALS = (BOS_PIECE, EOS_PIECE, PAD_PIECE)  # ids 0, 1, 2
_PIECE_SIZE = 64 * 1000 * 1000

_SETTINGS: dict = {}


def _priority(text: str, seed: int) -> int:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8,
                             key=seed.to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little")


class _Sample:
    """The lowest-priority documents whose total length fits a character budget."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.chars = 0
        self._heap: list[tuple[int, str]] = []  # (-priority, text): a max-heap on priority

    def add(self, priority: int, text: str) -> None:
        if self.chars + len(text) > self.budget and self._heap and -self._heap[0][0] < priority:
            return  # would be evicted at once
        heapq.heappush(self._heap, (-priority, text))
        self.chars += len(text)
        while self.chars > self.budget and self._heap:
            _, dropped = heapq.heappop(self._heap)
            self.chars -= len(dropped)

    def items(self) -> list[tuple[int, str]]:
        """``(priority, text)`` in increasing priority."""
        return sorted(((-p, t) for p, t in self._heap), key=lambda x: x[0])


def _init_worker(settings: dict) -> None:
    _SETTINGS.update(settings)


def _sample_piece(piece) -> tuple[list[tuple[int, str]], dict]:
    """Sample one piece; return its candidates and record counts."""
    s = _SETTINGS
    sample = _Sample(s["max_chars"])
    docs = bad = 0
    for record in PieceReader(piece, s["text_key"], s["txt_mode"]):
        if record.text is None or not record.text.strip():
            bad += 1
            continue
        docs += 1
        text = record.text[: s["max_doc_chars"]]
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates from JSON escapes
            bad += 1
            continue
        sample.add(_priority(text, s["seed"]), text)
    return sample.items(), {"documents": docs, "skipped": bad}


def sample_documents(paths: list[str], max_chars: int, max_doc_chars: int, text_key: str,
                     txt_mode: str, seed: int, workers: int) -> tuple[list[str], dict]:
    """The training sample (texts in priority order) and statistics about the scan."""
    pieces = plan_pieces(paths, _PIECE_SIZE, txt_mode)
    settings = {"max_chars": max_chars, "max_doc_chars": max_doc_chars, "text_key": text_key,
                "txt_mode": txt_mode, "seed": seed}
    sample = _Sample(max_chars)
    seen = skipped = 0
    if workers <= 1 or len(pieces) <= 1:
        _init_worker(settings)
        results = map(_sample_piece, pieces)
        pool = None
    else:
        pool = make_pool(min(workers, len(pieces)), _init_worker, (settings,))
        results = pool.imap(_sample_piece, pieces)
    try:
        for items, counts in results:
            seen += counts["documents"]
            skipped += counts["skipped"]
            for priority, text in items:
                sample.add(priority, text)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    texts = [t for _, t in sample.items()]
    return texts, {"documents_seen": seen, "records_skipped": skipped,
                   "documents_sampled": len(texts), "chars_sampled": sample.chars}


def trainer_settings(vocab_size: int, max_doc_chars: int, character_coverage: float,
                     num_threads: int = DEFAULT_THREADS) -> dict:
    """SentencePiece trainer arguments for the Parcae tokenizer.

    Identity normalisation, no dummy prefix and kept whitespace make detokenize(tokenize(x))
    == x; whitespace-only pieces keep code indentation cheap.
    """
    return {
        "model_type": "bpe",
        "vocab_size": vocab_size,
        "byte_fallback": True,
        "split_digits": True,
        "character_coverage": character_coverage,
        "normalization_rule_name": "identity",
        "remove_extra_whitespaces": False,
        "add_dummy_prefix": False,
        "allow_whitespace_only_pieces": True,
        "split_by_whitespace": True,
        "max_sentence_length": 4 * max_doc_chars + 16,  # bytes; a capped doc always fits
        "input_sentence_size": 0,  # we sampled already
        "unk_id": SPECIAL_IDS["unk"], "unk_piece": UNK_PIECE,
        "bos_id": SPECIAL_IDS["bos"], "bos_piece": BOS_PIECE,
        "eos_id": SPECIAL_IDS["eos"], "eos_piece": EOS_PIECE,
        "pad_id": SPECIAL_IDS["pad"], "pad_piece": PAD_PIECE,
        # Recorded in the .model file, so it is part of the file's hash (not of the
        # vocabulary): a fixed default keeps the hash the same on every machine.
        "num_threads": num_threads,
    }


def settings_path(output: str) -> str:
    """The settings sidecar of the tokenizer written at prefix ``output``."""
    return output + ".settings.json"


def train_hf_bpe(texts: list[str], vocab_size: int):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts`` (the paper's kind): the
    split pattern above, then bytes mapped to printable characters; specials first."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(HF_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=0, show_progress=False,
                                  special_tokens=list(HF_SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tk


def train_tokenizer(inputs: list[str], output: str, vocab_size: int = DEFAULT_VOCAB,
                    max_chars: int = DEFAULT_MAX_CHARS,
                    max_doc_chars: int = DEFAULT_MAX_DOC_CHARS, text_key: str = "text",
                    txt_mode: str = "document", seed: int = 0,
                    character_coverage: float = 0.9999, workers: int | None = None,
                    threads: int = DEFAULT_THREADS, verbose: bool = False,
                    kind: str = "sentencepiece") -> dict:
    """Train and write the tokenizer (``output.model``, or the directory ``output`` for
    ``hf-bpe``) and ``output.settings.json``; return the settings' content."""
    if kind not in KINDS:
        raise InputError(f"unknown tokenizer kind {kind!r} (choose from {', '.join(KINDS)})")
    t0 = time.time()
    workers = workers or default_workers()
    paths = expand_inputs(inputs)
    texts, stats = sample_documents(paths, max_chars, max_doc_chars, text_key, txt_mode, seed,
                                    workers)
    if not texts:
        raise InputError("no usable documents in the inputs")
    sample = {**stats, "max_chars": max_chars, "max_doc_chars": max_doc_chars, "seed": seed,
              "text_key": text_key, "txt_mode": txt_mode,
              "inputs": [{"path": p, "size": os.path.getsize(p)} for p in paths]}
    os.makedirs(os.path.dirname(os.path.abspath(output)) or ".", exist_ok=True)
    if kind == "hf-bpe":
        info = _write_hf_bpe(texts, output, vocab_size)
    else:
        info = _write_sentencepiece(texts, output, vocab_size, max_doc_chars,
                                    character_coverage, threads, verbose)
    info = {"kind": kind, **info, "sample": sample, "elapsed_s": round(time.time() - t0, 3)}
    atomic_write_json(settings_path(output), info)
    return info


def _write_hf_bpe(texts: list[str], output: str, vocab_size: int) -> dict:
    import tokenizers

    if vocab_size < 256 + len(HF_SPECIALS):
        raise InputError(f"--vocab-size {vocab_size} is below the 256 bytes and "
                         f"{len(HF_SPECIALS)} special tokens of a byte-level BPE")
    tk = train_hf_bpe(texts, vocab_size)
    config = {f"{r}_token": t for r, t in zip(("bos", "eos", "pad"), HF_SPECIALS, strict=True)}
    HFTokenizer(tk.to_str(), None, config).save_pretrained(output)
    tok = load_tokenizer(output)
    return {"tokenizer": os.path.basename(output) + "/" + HF_FILE, "sha256": tok.sha256,
            "vocab_size": tok.vocab_size,
            "special_tokens": {BOS_PIECE: tok.bos, EOS_PIECE: tok.eos, PAD_PIECE: tok.pad},
            "normalisation": "none; byte-level, every string round-trips",
            "trainer": {"model": "bpe", "byte_level": True, "split_pattern": HF_SPLIT_PATTERN,
                        "vocab_size": vocab_size, "min_frequency": 0},
            "tokenizers_version": tokenizers.__version__}


def _write_sentencepiece(texts: list[str], output: str, vocab_size: int, max_doc_chars: int,
                         character_coverage: float, threads: int, verbose: bool) -> dict:
    import sentencepiece as spm

    settings = trainer_settings(vocab_size, max_doc_chars, character_coverage, threads)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model,
                                   minloglevel=0 if verbose else 2, **settings)
    proto = model.getvalue()
    atomic_write_bytes(output + ".model", proto)
    tok = SentencePieceTokenizer(model_proto=proto)
    return {
        "tokenizer": os.path.basename(output) + ".model",
        "sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "special_tokens": {UNK_PIECE: tok.unk, BOS_PIECE: tok.bos, EOS_PIECE: tok.eos,
                           PAD_PIECE: tok.pad},
        "normalisation": "identity; U+2581 decodes as a space, everything else round-trips",
        "trainer": settings,
        "sentencepiece_version": spm.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = cli.ArgumentParser(
        prog="python -m data_prep.train_tokenizer",
        description="Train the Parcae tokenizer on a sample of the inputs: a SentencePiece "
                    "BPE (byte fallback, split digits; writes OUTPUT.model) or, with --kind "
                    "hf-bpe, the paper's GPT-4-style byte-level BPE (writes OUTPUT/ with "
                    "tokenizer.json and tokenizer_config.json). Special tokens <|bos|> <|eos|> "
                    "<|pad|>; settings in OUTPUT.settings.json.",
        epilog="example: python -m data_prep.train_tokenizer data/stdlib/train.jsonl "
               "--output data/tokenizer (add --vocab-size 8192 for a tiny model)")
    parser.add_argument("inputs", nargs="+",
                        help="files, directories or globs (.jsonl/.json/.txt, plain, .gz or "
                             ".zst; .parquet)")
    parser.add_argument("--output", required=True,
                        help="output prefix (writes OUTPUT.model or OUTPUT/, and "
                             "OUTPUT.settings.json)")
    parser.add_argument("--kind", choices=KINDS, default="sentencepiece",
                        help="sentencepiece (default) or hf-bpe: the paper's byte-level BPE "
                             "from the Hugging Face tokenizers library")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB,
                        help="total vocabulary incl. 4 special and 256 byte pieces "
                             "(default %(default)s)")
    parser.add_argument("--max-chars", type=parse_size, default=DEFAULT_MAX_CHARS,
                        help="characters to sample for training, e.g. 2G or 50M (default 2G, "
                             "as docs/design.md §6.3; SentencePiece needs roughly 10-20 bytes "
                             "of memory "
                             "per sampled character)")
    parser.add_argument("--max-doc-chars", type=int, default=DEFAULT_MAX_DOC_CHARS,
                        help="cap each sampled document at this many characters "
                             "(default %(default)s)")
    parser.add_argument("--text-key", default="text",
                        help="JSON field / parquet column with the text (default %(default)s)")
    parser.add_argument("--txt-mode", choices=TXT_MODES, default="document",
                        help=".txt documents: whole file, blank-line paragraph or line "
                             "(default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--character-coverage", type=float, default=0.9999,
                        help="share of characters given their own piece; the rest use byte "
                             "fallback (default %(default)s)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes reading the inputs (default: all cores)")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help="SentencePiece trainer threads (default %(default)s). The value "
                             "is stored in the .model, so it changes the file's hash; the "
                             "vocabulary does not depend on it")
    parser.add_argument("--verbose", action="store_true", help="show SentencePiece's log")
    args = parser.parse_args(argv)
    try:
        info = train_tokenizer(args.inputs, args.output, args.vocab_size, args.max_chars,
                               args.max_doc_chars, args.text_key, args.txt_mode, args.seed,
                               args.character_coverage, args.workers, args.threads,
                               args.verbose, args.kind)
    except (InputError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # SentencePiece reports bad settings this way
        print(f"error: SentencePiece: {err}", file=sys.stderr)
        return 2
    s = info["sample"]
    where = args.output + (".model" if args.kind == "sentencepiece" else "/")
    print(f"{where}: vocab {info['vocab_size']}, sha256 {info['sha256'][:16]}, "
          f"trained on {s['documents_sampled']:,} of {s['documents_seen']:,} documents "
          f"({s['chars_sampled']:,} chars) in {info['elapsed_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
