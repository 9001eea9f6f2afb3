"""Blend files: which datasets the trainer reads, with what weights, for which split.

A blend file is YAML (or JSON). Either one pool of datasets that Megatron splits by ratio::

    split: "98,1,1"              # train,valid,test shares of every dataset
    datasets:
      - {weight: 0.7, prefix: fineweb/train}
      - {weight: 0.3, prefix: code/train}

or a list per split (the valid/test sets are then separate data, e.g. held-out files)::

    train:
      - {weight: 1.0, prefix: stdlib_train}
    valid:
      - {weight: 1.0, prefix: stdlib_valid}
    # test: optional

Relative prefixes are relative to the blend file. ``weight`` may be left out, on every
entry of a list or on none (Megatron then weighs datasets by size). A prefix written by
``data_prep.preprocess --shard-size`` stands for its shards: its weight is shared among them
in proportion to their tokens.

:meth:`Blend.megatron_args` gives Megatron-LM's ``--data-path``/``--split`` or
``--train-data-path``/``--valid-data-path``/``--test-data-path`` arguments;
:meth:`Blend.config_kwargs` gives ``blend``/``split`` or ``blend_per_split`` for
megatron-core's ``GPTDatasetConfig``.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import dataclass

from data_prep.files import read_json
from parcae_megatron import cli

SPLITS = ("train", "valid", "test")

Entry = tuple[float | None, str]  # (weight, absolute dataset prefix)


class BlendError(ValueError):
    """A blend file that does not describe a usable blend."""


@dataclass
class Blend:
    """A parsed blend: ``split`` + ``datasets``, or ``per_split``."""

    path: str
    datasets: list[Entry] | None = None
    split: str | None = None
    per_split: dict[str, list[Entry]] | None = None

    def megatron_args(self) -> list[str]:
        """Megatron-LM command-line arguments for this blend."""
        if self.datasets is not None:
            return ["--data-path", *_flatten(self.datasets), "--split", str(self.split)]
        args: list[str] = []
        assert self.per_split is not None
        for split in SPLITS:
            entries = self.per_split.get(split)
            if entries:
                args += [f"--{split}-data-path", *_flatten(entries)]
        return args

    def config_kwargs(self) -> dict:
        """``blend`` + ``split`` or ``blend_per_split`` for ``GPTDatasetConfig``."""
        if self.datasets is not None:
            return {"blend": _as_megatron_blend(self.datasets), "split": self.split}
        assert self.per_split is not None
        return {"blend_per_split": [_as_megatron_blend(self.per_split[s])
                                    if self.per_split.get(s) else None for s in SPLITS]}

    def prefixes(self) -> list[str]:
        """Every dataset prefix the blend reads."""
        if self.datasets is not None:
            return [p for _, p in self.datasets]
        assert self.per_split is not None
        return [p for entries in self.per_split.values() for _, p in entries]


def _flatten(entries: list[Entry]) -> list[str]:
    if entries[0][0] is None:
        return [p for _, p in entries]
    return [x for w, p in entries for x in (repr(float(w)), p)]


def _as_megatron_blend(entries: list[Entry]) -> tuple[list[str], list[float] | None]:
    prefixes = [p for _, p in entries]
    weights = None if entries[0][0] is None else [float(w) for w, _ in entries]  # type: ignore
    return prefixes, weights


def _parse_entries(raw: object, where: str, base: str, check: bool) -> list[Entry]:
    if not isinstance(raw, list) or not raw:
        raise BlendError(f"{where}: expected a non-empty list of {{weight, prefix}} entries")
    entries: list[Entry] = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            item = {"prefix": item}
        if not isinstance(item, dict) or "prefix" not in item:
            raise BlendError(f"{where}[{i}]: expected {{weight: W, prefix: PATH}}, got {item!r}")
        unknown = set(item) - {"weight", "prefix"}
        if unknown:
            raise BlendError(f"{where}[{i}]: unknown keys {sorted(unknown)}")
        weight = item.get("weight")
        if weight is not None:
            if isinstance(weight, bool) or not isinstance(weight, int | float) or weight <= 0:
                raise BlendError(f"{where}[{i}]: weight must be a positive number, not "
                                 f"{weight!r}")
            weight = float(weight)
        prefix = os.path.normpath(os.path.join(base, os.path.expanduser(str(item["prefix"]))))
        entries += _expand(weight, prefix, f"{where}[{i}]", check)
    if len({w is None for w, _ in entries}) > 1:
        raise BlendError(f"{where}: give a weight on every entry or on none")
    return entries


def _expand(weight: float | None, prefix: str, where: str, check: bool) -> list[Entry]:
    """A prefix, or the shards its manifest lists (weight shared by tokens)."""
    mpath = prefix + ".manifest.json"
    if os.path.isfile(mpath):
        manifest = read_json(mpath)
        shards = manifest.get("datasets") or []
        if len(shards) > 1 or (shards and os.path.basename(shards[0]["prefix"])
                               != os.path.basename(prefix)):
            here = os.path.dirname(prefix)
            names = [os.path.join(here, os.path.basename(s["prefix"])) for s in shards]
            missing = [n for n in names if check and not (os.path.isfile(n + ".bin")
                                                          and os.path.isfile(n + ".idx"))]
            if missing:
                raise BlendError(f"{where}: shards of {prefix} are missing: {missing[:3]}")
            total = sum(s["tokens"] for s in shards) or 1
            return [(None if weight is None else weight * s["tokens"] / total, n)
                    for s, n in zip(shards, names)]
    if check and not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
        raise BlendError(f"{where}: no dataset at {prefix} (.bin/.idx missing)")
    return [(weight, prefix)]


def load_blend(path: str, check: bool = True) -> Blend:
    """Parse and validate the blend file at ``path``.

    ``check`` also requires every dataset's .bin/.idx to exist.
    """
    import yaml

    with open(path, encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise BlendError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise BlendError(f"{path}: expected a mapping with 'datasets' + 'split', or "
                         "'train'/'valid'/'test' lists")
    base = os.path.dirname(os.path.abspath(path))
    unknown = set(raw) - {"datasets", "split", *SPLITS}
    if unknown:
        raise BlendError(f"{path}: unknown keys {sorted(unknown)}")
    if "datasets" in raw:
        if set(raw) & set(SPLITS):
            raise BlendError(f"{path}: use either 'datasets' + 'split' or per-split lists, "
                             "not both")
        split = raw.get("split", "98,1,1")
        if isinstance(split, list | tuple):
            split = ",".join(str(x) for x in split)
        parts = str(split).split(",")
        try:
            shares = [float(x) for x in parts]
        except ValueError:
            shares = []
        if not 1 <= len(shares) <= 3 or any(s < 0 for s in shares) or sum(shares) <= 0:
            raise BlendError(f"{path}: split must look like '98,1,1', not {split!r}")
        datasets = _parse_entries(raw["datasets"], f"{path}: datasets", base, check)
        if check:
            _check_split_sizes(datasets, shares, f"{path}: split {split!r}")
        return Blend(os.path.abspath(path), datasets=datasets, split=str(split))
    if "split" in raw:
        raise BlendError(f"{path}: 'split' applies to a 'datasets' list; per-split lists are "
                         "already split")
    if "train" not in raw:
        raise BlendError(f"{path}: needs 'datasets' (with 'split') or a 'train' list")
    per_split = {s: _parse_entries(raw[s], f"{path}: {s}", base, check)
                 for s in SPLITS if raw.get(s) is not None}
    if check:
        for s, entries in per_split.items():
            _check_split_sizes(entries, [1.0], f"{path}: {s}")
    return Blend(os.path.abspath(path), per_split=per_split)


def sequence_count(prefix: str) -> int:
    """Sequences (= documents, for data_prep output) in a dataset, from its .idx header."""
    with open(prefix + ".idx", "rb") as f:
        head = f.read(34)
    if len(head) < 34:
        raise BlendError(f"{prefix}.idx: truncated index")
    return int.from_bytes(head[18:26], "little")


def _check_split_sizes(entries: list[Entry], shares: list[float], where: str) -> None:
    """Refuse splits that would get no documents of a dataset.

    Megatron splits each dataset by sequence with the rounding below; an empty split of a
    dataset makes ``GPTDataset`` loop forever while counting epochs, so catch it here.
    """
    total = sum(shares)
    bounds = [0.0]
    for share in shares:
        bounds.append(bounds[-1] + share / total)
    for _, prefix in entries:
        n = sequence_count(prefix)
        for i, share in enumerate(shares):
            if share > 0 and round(bounds[i + 1] * n) <= round(bounds[i] * n):
                raise BlendError(
                    f"{where}: {prefix} has {n} documents, so its {SPLITS[i]} share "
                    f"({share / total:.3g}) gets none; Megatron would hang building that "
                    "split. Use more data, a larger share, or per-split lists")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = cli.ArgumentParser(
        prog="python -m data_prep.blend",
        description="Validate a blend file and print the Megatron-LM data arguments it stands "
                    "for (or, with --json, the GPTDatasetConfig blend fields).",
        epilog="example: python -m data_prep.blend data/blend.yaml")
    parser.add_argument("blend", help="blend file (YAML or JSON)")
    parser.add_argument("--json", action="store_true",
                        help="print GPTDatasetConfig keyword arguments as JSON")
    parser.add_argument("--no-check", action="store_true",
                        help="do not require the datasets to exist")
    args = parser.parse_args(argv)
    try:
        blend = load_blend(args.blend, check=not args.no_check)
    except (BlendError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(blend.config_kwargs(), indent=2))
    else:
        print(shlex.join(blend.megatron_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
