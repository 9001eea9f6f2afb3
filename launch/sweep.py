"""A list of training configs run as one SLURM job array (one run directory per element).

A sweep file is YAML::

    name: isoflop-1e19          # optional (default: the file name)
    concurrency: 4              # optional: at most this many elements run at once
    args: [--train-iters, "5000"]   # optional: training flags for every element
    runs:
      - configs/parcae-140m.yaml                # a config path ...
      - config: configs/parcae-370m.yaml        # ... or a mapping
        name: p370m                             # optional (default: the config's stem)
        args: [--global-batch-size, "128"]      # optional: flags for this element only

Config paths are relative to the current directory (or else to the sweep file's directory).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from launch.sbatch import LaunchError
from parcae_megatron.paths import resolve_config


@dataclass(frozen=True)
class Element:
    """One run of a submission: its config file, name and own training flags."""

    config: Path
    name: str
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Sweep:
    """Elements plus the settings of the array."""

    name: str | None
    elements: list[Element]
    args: tuple[str, ...] = ()
    concurrency: int | None = None
    source: Path | None = field(default=None)


def safe_name(text: str) -> str:
    """``text`` reduced to characters that are safe in a path and a job name."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", text).strip("-.") or "run"


def _config_path(value: object, base: Path, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise LaunchError(f"{where}: the config must be a path, got {value!r}")
    path = resolve_config(value, base)
    if not path.is_file():
        raise LaunchError(f"{where}: config file not found: {value}")
    return path.resolve()


def _flags(value: object, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str | int | float) for v in value):
        raise LaunchError(f"{where}: args must be a list of strings, got {value!r}")
    return tuple(str(v) for v in value)


def element(config: Path, name: str | None = None, args: tuple[str, ...] = ()) -> Element:
    """An element from a config path (checked to exist)."""
    path = _config_path(str(config), Path.cwd(), str(config))
    return Element(config=path, name=safe_name(name or path.stem), args=args)


def load(path: Path) -> Sweep:
    """Read and check a sweep file."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise LaunchError(f"cannot read sweep file {path}: {exc}") from exc
    if isinstance(data, list):
        data = {"runs": data}
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list) or not data["runs"]:
        raise LaunchError(f"{path}: expected a list of runs (or a mapping with 'runs:')")
    unknown = set(data) - {"name", "concurrency", "args", "runs"}
    if unknown:
        raise LaunchError(f"{path}: unknown keys {sorted(unknown)}")
    concurrency = data.get("concurrency")
    if concurrency is not None and (not isinstance(concurrency, int) or concurrency < 1):
        raise LaunchError(f"{path}: concurrency must be a positive integer")
    elements = []
    for index, item in enumerate(data["runs"]):
        where = f"{path}: run {index}"
        if isinstance(item, str):
            item = {"config": item}
        if not isinstance(item, dict) or set(item) - {"config", "name", "args"}:
            raise LaunchError(f"{where}: expected a config path or {{config, name, args}}")
        config = _config_path(item.get("config"), path.parent, where)
        name = item.get("name")
        elements.append(Element(config=config, name=safe_name(str(name or config.stem)),
                                args=_flags(item.get("args"), where)))
    name = data.get("name")
    return Sweep(name=safe_name(str(name)) if name else safe_name(path.stem), elements=elements,
                 args=_flags(data.get("args"), str(path)), concurrency=concurrency, source=path)
