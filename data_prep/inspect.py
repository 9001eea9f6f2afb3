"""``python -m data_prep.inspect PREFIX``: what is in an indexed dataset, and is it intact.

Prints document/token counts, document length percentiles and a length histogram, the most
frequent tokens, a few decoded samples, and the result of a consistency check of .idx against
.bin (header, pointers, document boundaries, file size, token ids below the vocabulary size,
counts against the manifest). Exit status 0 when consistent, 1 when not, 2 on usage errors.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from dataclasses import dataclass, field

import numpy as np

from data_prep import indexed
from data_prep.files import format_bytes, read_json
from parcae_megatron import cli

_CHUNK_TOKENS = 1 << 23
_IDX_HEADER = b"MMIDIDX\x00\x00"


@dataclass
class Report:
    """Result of :func:`inspect_dataset`."""

    prefix: str
    problems: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether no problem was found."""
        return not self.problems


def _read_index(prefix: str, report: Report):
    """Megatron's index reader for ``prefix``, or None (with a problem noted)."""
    idx_path = prefix + ".idx"
    with open(idx_path, "rb") as f:
        head = f.read(34)
    if len(head) < 34 or head[:9] != _IDX_HEADER:
        report.problems.append(f"{idx_path}: not a Megatron index (bad header or too short)")
        return None
    if struct.unpack("<Q", head[9:17])[0] != 1:
        report.problems.append(f"{idx_path}: unknown index version")
        return None
    try:
        return indexed.megatron_indexed()._IndexReader(idx_path, multimodal=False)
    except (ValueError, AssertionError, KeyError) as err:
        report.problems.append(f"{idx_path}: index is truncated or corrupt ({err})")
        return None


def check_index(reader, bin_size: int, report: Report) -> bool:
    """Check the index against itself and the .bin size; True if tokens can be read."""
    lengths = np.array(reader.sequence_lengths, dtype=np.int64)
    pointers = np.array(reader.sequence_pointers, dtype=np.int64)
    docs = np.array(reader.document_indices, dtype=np.int64)
    itemsize = np.dtype(reader.dtype).itemsize
    ok = True
    if len(docs) == 0 or docs[0] != 0:
        report.problems.append("document indices do not start at 0")
        ok = False
    elif np.any(np.diff(docs) < 0) or docs[-1] != len(lengths):
        report.problems.append("document indices are not increasing up to the sequence count")
        ok = False
    if np.any(lengths < 0):
        report.problems.append("negative sequence lengths in the index")
        return False
    expected_pointers = np.concatenate([[0], np.cumsum(lengths)[:-1]]) * itemsize
    if len(lengths) and not np.array_equal(pointers, expected_pointers):
        report.problems.append("sequence pointers disagree with sequence lengths")
        ok = False
    expected = int(lengths.sum()) * itemsize
    if bin_size < expected:
        missing = (expected - bin_size) / itemsize
        report.problems.append(
            f".bin is truncated: {bin_size:,} bytes, the index expects {expected:,} "
            f"({missing:,.0f} tokens missing)")
        ok = False
    elif bin_size > expected:
        report.problems.append(f".bin has {bin_size - expected:,} bytes more than the index "
                               f"describes ({expected:,}): index and data do not match")
        ok = False
    return ok


def inspect_dataset(prefix: str, tokenizer=None, samples: int = 3, top: int = 20,
                    sample_chars: int = 300, seed: int = 0) -> Report:
    """Check and summarise the dataset at ``prefix`` (``tokenizer`` optional, for decoding)."""
    report = Report(prefix)
    for suffix in (".bin", ".idx"):
        if not os.path.isfile(prefix + suffix):
            report.problems.append(f"{prefix + suffix}: missing")
    if report.problems:
        return report
    bin_size = os.path.getsize(prefix + ".bin")
    reader = _read_index(prefix, report)
    if reader is None:
        return report
    lengths = np.array(reader.sequence_lengths, dtype=np.int64)
    docs = np.array(reader.document_indices, dtype=np.int64)
    dtype = reader.dtype
    del reader
    cumulative = np.concatenate([[0], np.cumsum(lengths)])  # token offset of each sequence
    info = report.info
    info.update(bin_bytes=bin_size, idx_bytes=os.path.getsize(prefix + ".idx"),
                dtype=indexed.dtype_name(dtype), sequences=int(len(lengths)),
                documents=int(max(len(docs) - 1, 0)), tokens=int(lengths.sum()))
    reader = indexed.megatron_indexed()._IndexReader(prefix + ".idx", multimodal=False)
    readable = check_index(reader, bin_size, report)
    del reader
    if len(docs) > 1 and docs[-1] == len(lengths):
        # Document lengths (a document may span several sequences in general).
        doc_lengths = cumulative[docs[1:]] - cumulative[docs[:-1]]
        qs = [0, 10, 50, 90, 99, 100]
        info["doc_length_percentiles"] = {f"p{q}": int(v) for q, v in
                                          zip(qs, np.percentile(doc_lengths, qs))}
        info["doc_length_mean"] = float(doc_lengths.mean())
        edges = 2 ** np.arange(0, int(np.log2(max(doc_lengths.max(), 1))) + 2)
        hist, _ = np.histogram(doc_lengths, bins=np.concatenate([[0], edges]))
        info["doc_length_histogram"] = [[int(lo), int(hi), int(n)] for lo, hi, n in
                                        zip(np.concatenate([[0], edges[:-1]]), edges, hist) if n]
    vocab = tokenizer.vocab_size if tokenizer is not None else None
    if readable and info["tokens"]:
        data = np.memmap(prefix + ".bin", dtype=dtype, mode="r")
        counts = None
        max_id = 0
        for start in range(0, len(data), _CHUNK_TOKENS):
            chunk = np.asarray(data[start:start + _CHUNK_TOKENS], dtype=np.int64)
            max_id = max(max_id, int(chunk.max()))
            if chunk.min() < 0 or max_id > 10_000_000:
                report.problems.append(f"token ids out of any plausible range (max {max_id})")
                counts = None
                break
            part = np.bincount(chunk, minlength=max_id + 1)
            if counts is None:
                counts = part
            else:
                if len(part) > len(counts):
                    counts = np.pad(counts, (0, len(part) - len(counts)))
                counts[: len(part)] += part
        info["max_token_id"] = max_id
        if vocab is not None and max_id >= vocab:
            report.problems.append(f"token id {max_id} is outside the tokenizer's vocabulary "
                                   f"({vocab})")
        if counts is not None:
            info["distinct_tokens"] = int((counts > 0).sum())
            order = np.argsort(-counts, kind="stable")[:top]
            info["top_tokens"] = [
                {"id": int(i), "count": int(counts[i]),
                 "share": float(counts[i] / info["tokens"]),
                 **({"piece": tokenizer.id_to_piece(int(i))}
                    if tokenizer is not None and i < vocab else {})}
                for i in order if counts[i]]
        if samples and info["documents"]:
            rng = np.random.default_rng(seed)
            picks = np.sort(rng.choice(info["documents"], min(samples, info["documents"]),
                                       replace=False))
            info["samples"] = []
            for d in picks:
                ids = np.asarray(data[cumulative[docs[d]]:cumulative[docs[d + 1]]])
                sample = {"document": int(d), "tokens": int(len(ids)),
                          "first_ids": [int(x) for x in ids[:16]]}
                if tokenizer is not None and (vocab is None or ids.max(initial=0) < vocab):
                    sample["text"] = tokenizer.detokenize(ids)[:sample_chars]
                info["samples"].append(sample)
        del data
    _check_manifest(prefix, report)
    return report


def _check_manifest(prefix: str, report: Report) -> None:
    """Compare counts with the manifest that describes ``prefix``, if one does."""
    candidates = [prefix + ".manifest.json"]
    base, _, tail = prefix.rpartition("_")
    if tail.isdigit():
        candidates.append(base + ".manifest.json")  # a shard of a sharded output
    for mpath in candidates:
        if not os.path.isfile(mpath):
            continue
        manifest = read_json(mpath)
        entry = next((d for d in manifest.get("datasets", [])
                      if os.path.basename(d["prefix"]) == os.path.basename(prefix)), None)
        if entry is None:
            continue
        report.info["manifest"] = mpath
        for key in ("documents", "tokens"):
            if key in report.info and entry.get(key) != report.info[key]:
                report.problems.append(f"{key}: the index has {report.info[key]:,}, the "
                                       f"manifest says {entry.get(key):,}")
        return


def format_report(report: Report) -> str:
    """Human-readable text of a :class:`Report`."""
    info = report.info
    lines = [f"dataset   {report.prefix}"]
    if "documents" in info:
        lines.append(f"files     .bin {format_bytes(info['bin_bytes'])}, .idx "
                     f"{format_bytes(info['idx_bytes'])}, dtype {info['dtype']}")
        lines.append(f"counts    {info['documents']:,} documents, {info['sequences']:,} "
                     f"sequences, {info['tokens']:,} tokens")
    if "doc_length_percentiles" in info:
        pct = info["doc_length_percentiles"]
        lines.append("doc len   " + "  ".join(f"{k}={v:,}" for k, v in pct.items())
                     + f"  mean={info['doc_length_mean']:,.1f} tokens")
        peak = max(n for _, _, n in info["doc_length_histogram"])
        for lo, hi, n in info["doc_length_histogram"]:
            bar = "#" * max(1, round(40 * n / peak))
            lines.append(f"  [{lo:>7,}, {hi:>7,})  {n:>9,}  {bar}")
    if "top_tokens" in info:
        lines.append(f"tokens    {info['distinct_tokens']:,} distinct, max id "
                     f"{info['max_token_id']:,}; most frequent:")
        for t in info["top_tokens"]:
            piece = f" {t['piece']!r}" if "piece" in t else ""
            lines.append(f"  {t['id']:>7}{piece:<16} {t['count']:>12,}  {100 * t['share']:5.2f}%")
    for s in info.get("samples", []):
        lines.append(f"sample    document {s['document']:,} ({s['tokens']:,} tokens):")
        lines.append("  " + (repr(s["text"]) if "text" in s else f"ids {s['first_ids']} ..."))
    if report.ok:
        lines.append("check     OK: index and data are consistent"
                     + (" and match the manifest" if "manifest" in info else ""))
    else:
        lines += [f"ERROR     {p}" for p in report.problems]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: 0 consistent, 1 problems found, 2 usage error."""
    parser = cli.ArgumentParser(
        prog="python -m data_prep.inspect",
        description="Summarise an indexed dataset (counts, length percentiles and histogram, "
                    "frequent tokens, decoded samples) and check that .idx and .bin agree. "
                    "Exits 1 if the dataset is inconsistent (e.g. a truncated .bin).",
        epilog="example: python -m data_prep.inspect data/stdlib_train --samples 2")
    parser.add_argument("prefix", help="dataset prefix (without .bin/.idx)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer (.model or tokenizer.json) for decoding (default: the "
                             "one named in the manifest, if it exists)")
    parser.add_argument("--samples", type=int, default=3, help="documents to decode (default 3)")
    parser.add_argument("--sample-chars", type=int, default=300,
                        help="characters shown per sample (default 300)")
    parser.add_argument("--top", type=int, default=20, help="frequent tokens shown (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="which samples (default 0)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    prefix = args.prefix[:-4] if args.prefix.endswith((".bin", ".idx")) else args.prefix
    tokenizer = None
    path = args.tokenizer
    if path is None and os.path.isfile(prefix + ".manifest.json"):
        path = (read_json(prefix + ".manifest.json").get("tokenizer") or {}).get("path")
        if path and not os.path.isfile(path):
            path = None
    if path:
        from data_prep.tokenizer import load_tokenizer

        try:
            tokenizer = load_tokenizer(path)
        except (FileNotFoundError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    report = inspect_dataset(prefix, tokenizer, args.samples, args.top, args.sample_chars,
                             args.seed)
    if args.json:
        print(json.dumps({"prefix": prefix, "ok": report.ok, "problems": report.problems,
                          **report.info}, indent=2))
    else:
        print(format_report(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
