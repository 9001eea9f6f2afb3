"""``python -m data_prep.merge``: concatenate indexed datasets into one, in the order given.

The result equals the concatenation: its .bin is the inputs' .bin files back to back and its
documents are the inputs' documents in order. Inputs may be sharded outputs of
``data_prep.preprocess`` (a prefix whose manifest lists shards). Written with megatron-core's
``IndexedDatasetBuilder.add_index``, through ``.partial`` files renamed at the end.
"""

from __future__ import annotations

import datetime
import os
import sys

import numpy as np

from data_prep import __version__, indexed
from data_prep.files import atomic_write_json, format_bytes, read_json
from data_prep.report import short_path
from parcae_megatron import cli


class MergeError(ValueError):
    """Inputs that cannot be merged (missing, different dtypes or tokenizers)."""


def resolve_prefix(prefix: str) -> tuple[list[str], dict | None]:
    """The dataset prefixes behind ``prefix`` and its manifest (if any).

    A prefix with a ``.manifest.json`` stands for the datasets the manifest lists (its shards);
    otherwise it must be a dataset itself.
    """
    mpath = prefix + ".manifest.json"
    manifest = read_json(mpath) if os.path.isfile(mpath) else None
    if manifest is not None and manifest.get("datasets"):
        names = [d["prefix"] for d in manifest["datasets"]]
        # Manifests store absolute paths; if the tree moved, look next to the manifest.
        here = os.path.dirname(os.path.abspath(prefix))
        names = [n if indexed.exists(n) else os.path.join(here, os.path.basename(n))
                 for n in names]
        missing = [n for n in names if not indexed.exists(n)]
        if missing:
            raise MergeError(f"{prefix}: manifest lists datasets that are missing: {missing[:3]}")
        return names, manifest
    if not indexed.exists(prefix):
        raise MergeError(f"{prefix}: no {prefix}.bin/.idx (and no manifest)")
    return [prefix], manifest


def index_counts(prefix: str) -> dict:
    """Documents, tokens, dtype and .bin size of a dataset, from its index."""
    reader = indexed.megatron_indexed()._IndexReader(prefix + ".idx", multimodal=False)
    counts = {"prefix": prefix, "documents": int(len(reader.document_indices) - 1),
              "tokens": int(np.array(reader.sequence_lengths, dtype=np.int64).sum()),
              "bin_bytes": os.path.getsize(prefix + ".bin"),
              "dtype": indexed.dtype_name(reader.dtype)}
    del reader
    return counts


def merge(inputs: list[str], output: str, overwrite: bool = False,
          allow_mixed_tokenizers: bool = False) -> dict:
    """Concatenate ``inputs`` (dataset or manifest prefixes) into ``output``; return its
    manifest."""
    output = os.path.abspath(output)
    parts: list[str] = []
    manifests: list[dict] = []
    for prefix in inputs:
        names, manifest = resolve_prefix(prefix)
        parts += [os.path.abspath(n) for n in names]
        if manifest is not None:
            manifests.append(manifest)
    if output in parts:
        raise MergeError(f"{output}: the output is also an input")
    if (indexed.exists(output) or os.path.exists(output + ".manifest.json")) and not overwrite:
        raise MergeError(f"{output}: exists; pass --overwrite to replace it")
    counts = [index_counts(p) for p in parts]
    dtypes = sorted({c["dtype"] for c in counts})
    if len(dtypes) > 1:
        raise MergeError(f"inputs have different token dtypes {dtypes}; they come from "
                         "tokenizers of different vocabulary sizes")
    tokenizers = {m["tokenizer"]["sha256"] for m in manifests if m.get("tokenizer")}
    if len(tokenizers) > 1 and not allow_mixed_tokenizers:
        raise MergeError("inputs were made with different tokenizers (sha256 "
                         f"{sorted(t[:12] for t in tokenizers)}); pass "
                         "--allow-mixed-tokenizers if that is intended")
    dtype = np.dtype(dtypes[0] if dtypes else "int32").type
    indexed.freeze_gc()  # add_index runs gc.collect() per input
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    bin_tmp, idx_tmp = indexed.partial_paths(output)
    builder = indexed.builder(bin_tmp, dtype)
    try:
        for part in parts:
            builder.add_index(part)
        builder.finalize(idx_tmp)
    except BaseException:
        builder.data_file.close()
        for path in (bin_tmp, idx_tmp):
            if os.path.exists(path):
                os.remove(path)
        raise
    mpath = output + ".manifest.json"
    if os.path.exists(mpath):
        os.remove(mpath)
    indexed.publish(output)
    total = {"documents": sum(c["documents"] for c in counts),
             "tokens": sum(c["tokens"] for c in counts)}
    manifest = {
        "format": "data_prep.manifest/1",
        "status": "complete",
        "prefix": output,
        "datasets": [{"prefix": output, **total, "bin_bytes": os.path.getsize(output + ".bin")}],
        **total,
        "bin_bytes": os.path.getsize(output + ".bin"),
        "dtype": dtypes[0] if dtypes else "int32",
        "tokenizer": manifests[0].get("tokenizer") if len(tokenizers) == 1 else None,
        "merged_from": counts,
        "skipped_total": sum(m.get("skipped_total", 0) for m in manifests),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "tool": {"data_prep": __version__},
    }
    atomic_write_json(mpath, manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = cli.ArgumentParser(
        prog="python -m data_prep.merge",
        description="Concatenate indexed datasets (or sharded data_prep outputs) into one "
                    "dataset, in the order given. Token dtypes must match; tokenizers too "
                    "(checked through the manifests).",
        epilog="example: python -m data_prep.merge --output data/all data/part1 data/part2")
    parser.add_argument("inputs", nargs="+", help="dataset prefixes (without .bin/.idx)")
    parser.add_argument("--output", required=True, help="output prefix")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--allow-mixed-tokenizers", action="store_true",
                        help="merge datasets whose manifests name different tokenizers")
    args = parser.parse_args(argv)
    try:
        manifest = merge(args.inputs, args.output, args.overwrite, args.allow_mixed_tokenizers)
    except MergeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{short_path(manifest['prefix'])}: {manifest['documents']:,} documents, "
          f"{manifest['tokens']:,} tokens, {format_bytes(manifest['bin_bytes'])} from "
          f"{len(manifest['merged_from'])} dataset(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
