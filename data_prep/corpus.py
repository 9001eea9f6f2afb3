"""The embedded default corpus: Python's own standard library, found through ``sysconfig``.

Real text (code, comments and English docstrings) that exists wherever Python is installed,
so the quickstart and the tests need no download. Assembly is deterministic for a given
Python version: files are chosen by a hash of their relative path and written in path order.

Two documents per module: its source file (``{"text": source, "source": "json/decoder.py"}``)
and, optionally, its docstrings joined by blank lines (``"source": "json/decoder.py#doc"``).
A held-out validation split is made of whole modules (both documents of a module go to the
same split), chosen by the same hash.

CLI: ``python -m data_prep.corpus --out-dir data/stdlib`` writes ``train.jsonl`` and
``valid.jsonl``.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator

from data_prep.files import atomic_write_bytes, format_bytes
from parcae_megatron import cli

# Directories that hold tests, third-party code or generated/bundled files, not library text.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
              "_bundled", "config-3", "lib-dynload", "turtledemo"}
DEFAULT_MAX_BYTES = 4_000_000
DEFAULT_VALID_PERCENT = 5
DEFAULT_MAX_FILE_BYTES = 200_000


def stdlib_root() -> str:
    """The standard library directory of the running interpreter."""
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: str | None = None, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
                 ) -> list[str]:
    """Relative paths of the library's ``.py`` files, sorted, tests and packages excluded.

    Files over ``max_file_bytes`` are left out (they are generated tables, e.g. pydoc topics).
    """
    root = root or stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in _SKIP_DIRS and not d.startswith(("config-", ".")))
        for name in filenames:
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            if os.path.getsize(path) <= max_file_bytes:
                found.append(os.path.relpath(path, root).replace(os.sep, "/"))
    return sorted(found)


def _rank(relpath: str) -> str:
    """Deterministic pseudo-random order, independent of the file system's listing order."""
    return hashlib.sha256(relpath.encode()).hexdigest()


def module_docstrings(source: str) -> str:
    """The module, class and function docstrings of ``source``, in order, blank-line joined."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    docs = [ast.get_docstring(n, clean=True) for n in nodes]
    return "\n\n".join(d for d in docs if d and d.strip())


def iter_default_corpus(split: str = "train", max_bytes: int | None = DEFAULT_MAX_BYTES,
                        max_docs: int | None = None, docstrings: bool = True,
                        valid_percent: int = DEFAULT_VALID_PERCENT, root: str | None = None,
                        ) -> Iterator[dict]:
    """Yield the records of one split of the embedded corpus, in path order.

    ``split`` is ``"train"``, ``"valid"`` or ``"all"``. Modules are taken in hash order until
    the split's source text reaches ``max_bytes`` (``valid`` gets ``valid_percent`` of the
    modules and of ``max_bytes``); ``max_docs`` then caps the number of documents.
    """
    if split not in ("train", "valid", "all"):
        raise ValueError(f"split must be train, valid or all, not {split!r}")
    root = root or stdlib_root()
    ranked = sorted(stdlib_files(root), key=_rank)
    n_valid = max(1, len(ranked) * valid_percent // 100) if valid_percent else 0
    if split == "valid":
        ranked, budget = ranked[:n_valid], (max_bytes * valid_percent // 100 if max_bytes
                                            else None)
    elif split == "train":
        ranked, budget = ranked[n_valid:], max_bytes
    else:
        budget = max_bytes
    chosen, total = [], 0
    for rel in ranked:
        if budget is not None and total >= budget:
            break
        size = os.path.getsize(os.path.join(root, rel))
        chosen.append(rel)
        total += size
    count = 0
    for rel in sorted(chosen):
        try:
            with open(os.path.join(root, rel), encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue  # not UTF-8 (none in CPython's library outside tests); skip
        records = [{"text": text, "source": rel}]
        if docstrings:
            doc = module_docstrings(text)
            if doc:
                records.append({"text": doc, "source": rel + "#doc"})
        for record in records:
            if max_docs is not None and count >= max_docs:
                return
            if record["text"].strip():
                count += 1
                yield record


def build_default_corpus(out_path: str, max_docs: int | None = None,
                         max_bytes: int | None = DEFAULT_MAX_BYTES, split: str = "train",
                         docstrings: bool = True, valid_percent: int = DEFAULT_VALID_PERCENT,
                         ) -> dict:
    """Write one split of the embedded corpus to ``out_path`` as JSON Lines.

    Each line is ``{"text": ..., "source": relative path}``. Same Python version, same
    arguments: same bytes. Returns ``{"path", "documents", "bytes", "python"}``.
    """
    lines = [json.dumps(r, ensure_ascii=False) + "\n"
             for r in iter_default_corpus(split, max_bytes, max_docs, docstrings, valid_percent)]
    data = "".join(lines).encode("utf-8")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    atomic_write_bytes(out_path, data)
    return {"path": out_path, "documents": len(lines), "bytes": len(data),
            "python": sys.version.split()[0]}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = cli.ArgumentParser(
        prog="python -m data_prep.corpus",
        description="Write the embedded default corpus (the running Python's standard library "
                    "source and docstrings) as train.jsonl and valid.jsonl. Deterministic for "
                    "a given Python version; no download.")
    parser.add_argument("--out-dir", required=True, help="directory for train.jsonl/valid.jsonl")
    parser.add_argument("--max-mb", type=float, default=DEFAULT_MAX_BYTES / 1e6,
                        help="source text to take for train, in MB (valid gets "
                             "--valid-percent of it); 0 = the whole library (default %(default)s)")
    parser.add_argument("--max-docs", type=int, default=None, help="cap documents per split")
    parser.add_argument("--valid-percent", type=int, default=DEFAULT_VALID_PERCENT,
                        help="percent of modules held out for valid.jsonl (default %(default)s)")
    parser.add_argument("--no-docstrings", action="store_true",
                        help="source files only, no per-module docstring documents")
    args = parser.parse_args(argv)
    max_bytes = int(args.max_mb * 1e6) or None
    for split in ("train", "valid"):
        info = build_default_corpus(os.path.join(args.out_dir, f"{split}.jsonl"),
                                    max_docs=args.max_docs, max_bytes=max_bytes, split=split,
                                    docstrings=not args.no_docstrings,
                                    valid_percent=args.valid_percent)
        print(f"{info['path']}: {info['documents']} documents, {format_bytes(info['bytes'])} "
              f"(Python {info['python']} standard library)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
