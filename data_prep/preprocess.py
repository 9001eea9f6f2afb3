"""``python -m data_prep.preprocess``: corpora to Megatron indexed datasets (.bin/.idx).

How a run works:

1. The inputs (files, directories, globs) are cut into *pieces* of about ``--piece-size``
   bytes: byte ranges of plain JSON Lines/text files, runs of parquet row groups, whole
   compressed files. The plan depends only on the inputs and the piece size.
2. ``--workers`` processes tokenize pieces in parallel; each streams its piece and writes a
   small indexed dataset with megatron-core's ``IndexedDatasetBuilder`` into the work
   directory, then a ``.json`` with its statistics (written last: the "finished" mark).
3. The parent appends finished pieces, in input order, to the output with
   ``IndexedDatasetBuilder.add_index`` while later pieces are still running. Output bytes
   therefore do not depend on the worker count.
4. Outputs are written as ``*.partial`` files and renamed into place only after the whole run
   succeeded; the manifest ``PREFIX.manifest.json`` is written last. A killed run leaves no
   dataset that looks complete, and ``--resume`` reuses its finished pieces.

Memory: each worker holds one record (one line, paragraph or parquet batch) plus the index of
its piece; the parent holds the index (about 100 bytes per document) of the output shard being
written, so ``--shard-size`` bounds it for very large corpora. Exceptions, by nature of the
format: a ``.json`` file holding one JSON array and a ``.txt`` file in ``--txt-mode document``
are read whole.
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from data_prep import __version__, indexed
from data_prep.files import (
    InputError,
    atomic_write_json,
    expand_inputs,
    format_bytes,
    parse_size,
    read_json,
    sha256_file,
)
from data_prep.parallel import default_workers, make_pool, pool_context
from data_prep.readers import REASONS, TXT_MODES, Piece, plan_pieces
from data_prep.report import Progress, SkipCounter, short_path, summary_table
from data_prep.tokenizer import Tokenizer, load_tokenizer
from data_prep.worker import init_worker, piece_key, piece_prefix, process_piece
from parcae_megatron import cli

MANIFEST_FORMAT = "data_prep.manifest/1"
DEFAULT_MAX_BAD_FRACTION = 0.01

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class PreprocessError(RuntimeError):
    """A run that cannot finish; ``exit_code`` is what the CLI returns."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED,
                 manifest: dict | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.manifest = manifest


@dataclass
class Options:
    """Settings of one preprocessing run (the CLI flags)."""

    inputs: list[str]
    output: str
    tokenizer: str
    text_key: str = "text"
    txt_mode: str = "document"
    bos: bool = True
    eos: bool = True
    workers: int | None = None
    piece_size: int | None = None
    shard_size: int | None = None
    resume: bool = False
    overwrite: bool = False
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION
    work_dir: str | None = None
    keep_work: bool = False
    progress: bool = True


def manifest_path(prefix: str) -> str:
    """Where the manifest of output ``prefix`` lives."""
    return prefix + ".manifest.json"


def auto_piece_size(total_bytes: int) -> int:
    """About 64 pieces, between 256 KB and 128 MB each: enough to spread over workers,
    coarse enough that per-piece overhead stays small. Independent of the worker count, so
    a resumed run plans the same pieces."""
    return int(min(128e6, max(256e3, total_bytes / 64)))


def shard_prefix(prefix: str, index: int) -> str:
    """Dataset prefix of shard ``index``."""
    return f"{prefix}_{index:05d}"


class _Shards:
    """Appends finished pieces, in order, to the output dataset(s) as ``.partial`` files."""

    def __init__(self, prefix: str, dtype, shard_size: int | None) -> None:
        self.prefix, self.dtype, self.shard_size = prefix, dtype, shard_size
        self.done: list[dict] = []
        self._builder = None
        self._current: dict | None = None

    def _open(self) -> None:
        name = (self.prefix if self.shard_size is None
                else shard_prefix(self.prefix, len(self.done)))
        bin_tmp, _ = indexed.partial_paths(name)
        self._builder = indexed.builder(bin_tmp, self.dtype)
        self._current = {"prefix": name, "documents": 0, "tokens": 0, "bin_bytes": 0}

    def add(self, piece_dataset: str, stats: dict) -> None:
        if self._builder is None:
            self._open()
        self._builder.add_index(piece_dataset)
        cur = self._current
        assert cur is not None
        cur["documents"] += stats["documents"]
        cur["tokens"] += stats["tokens"]
        cur["bin_bytes"] += stats["bin_bytes"]
        if self.shard_size is not None and cur["bin_bytes"] >= self.shard_size:
            self._close()

    def _close(self) -> None:
        assert self._builder is not None and self._current is not None
        self._builder.finalize(indexed.partial_paths(self._current["prefix"])[1])
        self.done.append(self._current)
        self._builder = self._current = None

    def finish(self) -> list[dict]:
        """Finalize the open shard (an empty dataset if nothing was added at all)."""
        if self._builder is None and not self.done:
            self._open()
        if self._builder is not None:
            self._close()
        return self.done

    def discard(self) -> None:
        """Remove every partial output file."""
        if self._builder is not None:
            self._builder.data_file.close()
        names = [d["prefix"] for d in self.done]
        if self._current is not None:
            names.append(self._current["prefix"])
        for name in names:
            for path in indexed.partial_paths(name):
                if os.path.exists(path):
                    os.remove(path)


class _Tally:
    """Run totals, per-file counts and skipped records, from pieces added in input order."""

    def __init__(self, paths: list[str]) -> None:
        self.totals = dict.fromkeys(("documents", "tokens", "text_bytes", "records",
                                     "blank_lines", "pieces_reused"), 0)
        self.per_file = {p: {"pieces": 0, "documents": 0, "tokens": 0, "lines": 0}
                         for p in paths}
        self.skipped = SkipCounter()

    def add(self, piece: Piece, stats: dict) -> None:
        info = self.per_file[piece.path]
        for reason, count in stats["skipped"].items():
            first = stats["skipped_first"].get(reason, [])
            for where, detail in first:
                # Lines of earlier pieces of the file turn piece-local positions into
                # file line numbers.
                self.skipped.add(reason, _location(piece, where, info["lines"], detail))
            if count > len(first):
                self.skipped.add(reason, None, count - len(first))
        for key in ("documents", "tokens", "text_bytes", "records", "blank_lines"):
            self.totals[key] += stats[key]
        self.totals["pieces_reused"] += bool(stats["reused"])
        info["pieces"] += 1
        for key in ("documents", "tokens", "lines"):
            info[key] += stats[key]


def _location(piece: Piece, where: int, line_offset: int, detail: str) -> str:
    unit = piece.unit
    pos = where + (line_offset if unit == "line" else piece.first_row if unit == "row" else 0)
    loc = f"{piece.path}:{pos}" if unit == "line" else f"{piece.path}:{unit} {pos}"
    return f"{loc} ({detail})" if detail else loc


def _settings_fingerprint(opts: Options, paths: list[str], tok: Tokenizer) -> dict:
    return {"inputs": [[p, os.path.getsize(p)] for p in paths], "tokenizer_sha256": tok.sha256,
            "text_key": opts.text_key, "txt_mode": opts.txt_mode, "bos": opts.bos,
            "eos": opts.eos, "shard_size": opts.shard_size}


def _work_files(work_dir: str) -> list[str]:
    if not os.path.isdir(work_dir):
        return []
    return [os.path.join(work_dir, f) for f in os.listdir(work_dir)
            if f.startswith("p-") or f == "failed.manifest.json"]


def _clear_work(work_dir: str) -> None:
    """Remove this tool's files from ``work_dir`` (never anything else in it)."""
    for path in _work_files(work_dir):
        os.remove(path)
    if os.path.isdir(work_dir) and not os.listdir(work_dir):
        os.rmdir(work_dir)


def _check_existing(opts: Options, prefix: str, fingerprint: dict, work_dir: str
                    ) -> dict | None:
    """The previous manifest if the output is already complete (and ``--resume``)."""
    mpath = manifest_path(prefix)
    old = read_json(mpath) if os.path.exists(mpath) else None
    present = old is not None or indexed.exists(prefix) or indexed.exists(
        shard_prefix(prefix, 0))
    if not present:
        return None
    if opts.overwrite:
        return None
    if opts.resume and old is not None and old.get("status") == "complete":
        if old.get("fingerprint") == fingerprint and all(
                indexed.exists(d["prefix"]) for d in old["datasets"]):
            return old
        raise PreprocessError(f"{prefix}: a complete output made from other inputs or "
                              "settings exists; pass --overwrite to replace it", EXIT_USAGE)
    if opts.resume and old is None and os.path.isdir(work_dir):
        return None  # a run interrupted while publishing: finish it
    raise PreprocessError(f"{prefix}: output exists; pass --overwrite to replace it (or "
                          "--resume to finish an interrupted run)", EXIT_USAGE)


def preprocess(opts: Options) -> dict:
    """Run one preprocessing job; return its manifest (raise :class:`PreprocessError`)."""
    t_start = time.time()
    paths = expand_inputs(opts.inputs)
    tok = load_tokenizer(opts.tokenizer)
    prefix = os.path.abspath(opts.output)
    fingerprint = _settings_fingerprint(opts, paths, tok)
    work_dir = os.path.abspath(opts.work_dir or prefix + ".work")
    done = _check_existing(opts, prefix, fingerprint, work_dir)
    if done is not None:
        return {**done, "already_complete": True}
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    if not opts.resume:
        _clear_work(work_dir)
    os.makedirs(work_dir, exist_ok=True)

    total_bytes = sum(os.path.getsize(p) for p in paths)
    piece_size = opts.piece_size or auto_piece_size(total_bytes)
    pieces = plan_pieces(paths, piece_size, opts.txt_mode)
    dtype = indexed.token_dtype(tok.vocab_size)  # imports megatron-core before forking
    indexed.freeze_gc()
    settings = {"text_key": opts.text_key, "txt_mode": opts.txt_mode, "bos": opts.bos,
                "eos": opts.eos, "tokenizer_sha256": tok.sha256,
                "dtype": indexed.dtype_name(dtype), "tokenizer": tok,
                "work_dir": work_dir, "resume": opts.resume}
    workers = max(1, min(opts.workers or default_workers(), len(pieces)))

    t0 = time.time()  # throughput counts from here: imports and planning are startup
    counters = pool_context().Array("q", 4)  # docs, tokens, text bytes, input bytes
    pool = make_pool(workers, init_worker, (settings, counters))
    # Full-file hashes for the manifest, computed by a thread alongside the workers (started
    # after the fork: forking a process with running threads risks deadlocked children).
    hasher = ThreadPoolExecutor(max_workers=1)
    file_hashes = {p: hasher.submit(sha256_file, p) for p in paths}
    progress = Progress(total_bytes, "preprocess", opts.progress)
    shards = _Shards(prefix, dtype, opts.shard_size)
    tally = _Tally(paths)
    finished = 0
    try:
        results = [pool.apply_async(process_piece, (p,)) for p in pieces]
        while finished < len(pieces):
            results[finished].wait(0.2)
            progress.update(counters[3], counters[0], counters[1], counters[2])
            while finished < len(pieces) and results[finished].ready():
                piece = pieces[finished]
                try:
                    stats = results[finished].get()
                except Exception as err:
                    raise PreprocessError(
                        f"piece {piece.index} ({piece.path}, bytes {piece.start}-{piece.end}) "
                        f"failed: {type(err).__name__}: {err}") from err
                shards.add(piece_prefix(work_dir, piece_key(piece, settings)), stats)
                tally.add(piece, stats)
                finished += 1
        pool.close()
        pool.join()
        progress.update(counters[3], counters[0], counters[1], counters[2])
        datasets = shards.finish()
    except BaseException as err:
        pool.terminate()
        pool.join()
        shards.discard()
        hasher.shutdown(wait=False, cancel_futures=True)
        progress.close()
        if isinstance(err, KeyboardInterrupt):
            raise PreprocessError(f"interrupted after {finished} of {len(pieces)} pieces; "
                                  "rerun with --resume to continue", EXIT_INTERRUPTED) from err
        raise
    progress.close()

    totals, skipped, per_file = tally.totals, tally.skipped, tally.per_file
    records = totals["records"]
    bad_fraction = skipped.total / records if records else 0.0
    manifest = {
        "format": MANIFEST_FORMAT,
        "status": "complete",
        "prefix": prefix,
        "datasets": datasets,
        "documents": totals["documents"],
        "tokens": totals["tokens"],
        "text_bytes": totals["text_bytes"],
        "bin_bytes": sum(d["bin_bytes"] for d in datasets),
        "input_bytes": total_bytes,
        "records": records,
        "skipped_total": skipped.total,
        "bad_fraction": bad_fraction,
        "max_bad_fraction": opts.max_bad_fraction,
        "skipped": skipped.to_json(),
        "blank_lines": totals["blank_lines"],
        "dtype": indexed.dtype_name(dtype),
        "bos": opts.bos,
        "eos": opts.eos,
        "text_key": opts.text_key,
        "txt_mode": opts.txt_mode,
        "tokenizer": {"path": tok.model_path, "kind": tok.kind, "sha256": tok.sha256,
                      "vocab_size": tok.vocab_size, "bos": tok.bos, "eos": tok.eos,
                      "pad": tok.pad},
        "inputs": [{"path": p, "format": _fmt(pieces, p), "size": os.path.getsize(p),
                    "sha256": file_hashes[p].result(), **per_file[p]} for p in paths],
        "pieces": len(pieces),
        "pieces_reused": totals["pieces_reused"],
        "piece_size": piece_size,
        "shard_size": opts.shard_size,
        "workers": workers,
        "elapsed_s": round(time.time() - t0, 3),
        "startup_s": round(t0 - t_start, 3),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "tool": {"data_prep": __version__, **_versions()},
        "fingerprint": fingerprint,
    }
    hasher.shutdown()
    for entry in manifest["inputs"]:
        entry.pop("lines")
    if bad_fraction > opts.max_bad_fraction:
        shards.discard()
        manifest["status"] = "failed"
        atomic_write_json(os.path.join(work_dir, "failed.manifest.json"), manifest)
        raise PreprocessError(
            f"{skipped.total:,} of {records:,} records skipped ({100 * bad_fraction:.3f}%), "
            f"over --max-bad-fraction {opts.max_bad_fraction}; nothing was published. Finished "
            f"pieces are kept in {short_path(work_dir)}: fix the inputs or raise the limit, "
            "then rerun with --resume", EXIT_FAILED, manifest)
    _publish(prefix, datasets, manifest)
    if not opts.keep_work:
        _clear_work(work_dir)
    return manifest


def _fmt(pieces: list[Piece], path: str) -> str:
    piece = next(p for p in pieces if p.path == path)
    return piece.fmt + (f".{piece.compression}" if piece.compression else "")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("megatron-core", "sentencepiece", "tokenizers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:  # pragma: no cover
            out[name] = None
    return out


def _publish(prefix: str, datasets: list[dict], manifest: dict) -> None:
    """Replace any previous output with the new datasets, manifest last."""
    mpath = manifest_path(prefix)
    old = read_json(mpath) if os.path.exists(mpath) else None
    if old is not None:
        os.remove(mpath)
    new_names = {d["prefix"] for d in datasets}
    stale = {d["prefix"] for d in (old or {}).get("datasets", [])} | {prefix}
    for name in sorted(stale - new_names):
        if indexed.exists(name):
            indexed.remove(name)
    for d in datasets:
        indexed.publish(d["prefix"])
    atomic_write_json(mpath, manifest)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    reasons = "\n".join(f"  {k:<20} {v}" for k, v in REASONS.items())
    parser = cli.ArgumentParser(
        prog="python -m data_prep.preprocess",
        description="Tokenize text corpora into a Megatron indexed dataset (PREFIX.bin/.idx)\n"
                    "plus PREFIX.manifest.json: in parallel, with bounded memory, atomic\n"
                    "output and --resume. Bad records are skipped and counted; the run fails\n"
                    "only above --max-bad-fraction.",
        epilog="inputs: .jsonl/.ndjson, .json (JSON Lines or one JSON array), .txt - each\n"
               "plain, .gz or .zst - and .parquet.\n\n"
               f"skip reasons:\n{reasons}\n\n"
               "exit status: 0 ok, 1 failed (nothing published), 2 usage, 130 interrupted\n\n"
               "example:\n  python -m data_prep.preprocess data/stdlib/train.jsonl \\\n"
               "      --tokenizer data/tokenizer.model --output data/stdlib_train",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="files, directories (recursive) or globs")
    parser.add_argument("--output", required=True,
                        help="output prefix: writes PREFIX.bin, PREFIX.idx, "
                             "PREFIX.manifest.json (or PREFIX_00000.* shards)")
    parser.add_argument("--tokenizer", required=True,
                        help="SentencePiece .model or Hugging Face tokenizer.json (file or "
                             "directory; from data_prep.train_tokenizer)")
    parser.add_argument("--text-key", default="text",
                        help="JSON field / parquet column with the text (default %(default)s)")
    parser.add_argument("--txt-mode", choices=TXT_MODES, default="document",
                        help="what one .txt document is: the whole file, a blank-line "
                             "separated paragraph, or a line (default %(default)s)")
    parser.add_argument("--no-bos", dest="bos", action="store_false",
                        help="do not put <|bos|> before each document")
    parser.add_argument("--no-eos", dest="eos", action="store_false",
                        help="do not put <|eos|> after each document")
    parser.add_argument("--workers", type=int, default=None,
                        help="tokenizing processes (default: all cores)")
    parser.add_argument("--piece-size", type=parse_size, default=None,
                        help="bytes of input per unit of work, e.g. 64MB (default: input "
                             "size / 64, between 256 KB and 128 MB). Compressed files are "
                             "always one piece each")
    parser.add_argument("--shard-size", type=parse_size, default=None,
                        help="start a new output dataset PREFIX_NNNNN once one reaches this "
                             ".bin size, e.g. 10GB (cut at piece boundaries; default: one "
                             "dataset)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse finished pieces of an interrupted (or failed) run whose "
                             "inputs and settings are unchanged")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output")
    parser.add_argument("--max-bad-fraction", type=float, default=DEFAULT_MAX_BAD_FRACTION,
                        help="fail (publishing nothing) if more than this fraction of records "
                             "is skipped (default %(default)s)")
    parser.add_argument("--work-dir", default=None,
                        help="where pieces are written (default: PREFIX.work); needs about "
                             "the output's size in free space")
    parser.add_argument("--keep-work", action="store_true",
                        help="keep the pieces after success")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 failed, 2 usage, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    # SIGTERM (e.g. from a job scheduler) stops the workers like Ctrl-C instead of leaving
    # them orphaned; finished pieces stay for --resume.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main else None
    opts = Options(inputs=args.inputs, output=args.output, tokenizer=args.tokenizer,
                   text_key=args.text_key, txt_mode=args.txt_mode, bos=args.bos, eos=args.eos,
                   workers=args.workers, piece_size=args.piece_size,
                   shard_size=args.shard_size, resume=args.resume, overwrite=args.overwrite,
                   max_bad_fraction=args.max_bad_fraction, work_dir=args.work_dir,
                   keep_work=args.keep_work, progress=not args.quiet)
    try:
        manifest = preprocess(opts)
    except (InputError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except PreprocessError as err:
        if err.manifest is not None and not args.quiet:
            print(summary_table(err.manifest))
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    if manifest.get("already_complete"):
        print(f"{short_path(manifest['prefix'])}: already complete "
              f"({manifest['documents']:,} documents, {manifest['tokens']:,} tokens)")
    elif not args.quiet:
        print(summary_table(manifest))
        print(f"manifest: {short_path(manifest_path(manifest['prefix']))}; "
              f"output {format_bytes(manifest['bin_bytes'])}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
