"""YAML run configs: a mapping of flag name -> value, optionally extending another file.

``base: OTHER.yaml`` names a config whose keys this one extends and overrides (resolved
relative to this file's directory, then the working directory, then the project's
``configs/``, then the project root); bases may themselves have a base.
So ``configs/parcae-1.3b-fp8.yaml`` is ``configs/parcae-1.3b.yaml`` plus its FP8 keys, by
construction. A missing base or a cycle is a ``ConfigFileError`` with one message. Light on
purpose (no torch / Megatron): the SLURM launcher reads configs and command lines too.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from parcae_megatron import cli
from parcae_megatron.paths import PROJECT_ROOT, resolve_config

BASE_KEY = "base"


class ConfigFileError(ValueError):
    """An unreadable config file, a missing base, a base cycle, or an unknown key or value."""


def _read_mapping(path: Path, shown: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigFileError(f"cannot read config {shown}: "
                                f"{str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigFileError(f"{shown}: expected a mapping of flag: value")
    return data


def _resolve_base(value: object, including: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigFileError(f"{including}: base must be a config file name, got {value!r}")
    path = Path(value)
    if not path.is_absolute() and (including.parent / path).is_file():
        return including.parent / path
    found = resolve_config(path, base=PROJECT_ROOT / "configs")
    if not found.is_file():
        raise ConfigFileError(f"{including}: base config not found: {value}")
    return found


def config_layers(value: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """Each file of a config's ``base:`` chain as (name as shown, its own keys), this file
    first; the ``base`` key removed."""
    path = resolve_config(value)
    if not path.is_file():
        raise ConfigFileError(f"config file not found: {value}")
    chain: list[Path] = []
    layers: list[tuple[str, dict[str, Any]]] = []
    shown = str(value)
    while True:
        real = path.resolve()
        if real in chain:
            names = " -> ".join(p.name for p in [*chain, real])
            raise ConfigFileError(f"config base cycle: {names}")
        chain.append(real)
        data = _read_mapping(path, shown)
        base = data.pop(BASE_KEY, None)
        layers.append((shown, data))
        if base is None:
            return layers
        path = _resolve_base(base, path)
        shown = str(path)


def load_config(value: str | Path) -> dict[str, Any]:
    """The resolved flag mapping of a config file (its ``base:`` chain merged, this file's
    keys last; the ``base`` key itself removed). Key order: the base's, then new keys."""
    merged: dict[str, Any] = {}
    for _, data in reversed(config_layers(value)):
        merged.update(data)
    return merged


def check_keys(value: str | Path, options: Mapping[str, argparse.Action]) -> None:
    """Raise ``ConfigFileError`` naming the file and key of the first key that is not a flag
    in ``options`` (a parser's ``--flag`` -> action) or whose value the flag does not take."""
    known = [flag[2:] for flag in options if flag.startswith("--")]
    for shown, data in config_layers(value):
        for key, item in data.items():
            name = str(key).replace("_", "-")
            action = options.get("--" + name)
            if action is None:
                hint = cli.closest(name, known, cli.ALIASES)
                raise ConfigFileError(f"{shown}: unknown key {str(key)!r}"
                                      + (f" (did you mean {hint!r}?)" if hint else ""))
            problem = _value_problem(action, item)
            if problem:
                raise ConfigFileError(f"{shown}: key {str(key)!r} {problem}")


def _value_problem(action: argparse.Action, value: Any) -> str | None:
    """Why ``value`` (from YAML) cannot be given to ``action``'s flag, or None."""
    if action.nargs == 0:  # a switch: true sets it, false leaves it out
        if value is None or isinstance(value, bool):
            return None
        return f"is a switch: expected true or false, got {value!r}"
    if value is None or value is False:
        return None  # left out of the command line
    kind = getattr(action.type, "__name__", "") if action.type else "str"
    kind = kind if kind.isidentifier() else "a valid value"  # e.g. a lambda
    if value is True:
        return f"expects {kind}, got true"
    if isinstance(value, (list, tuple)) and action.nargs in (None, "?"):
        return f"expects one {kind}, got a list"
    for item in value if isinstance(value, (list, tuple)) else [value]:
        try:
            converted = action.type(str(item)) if callable(action.type) else str(item)
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            return f"expects {kind}, got {item!r}"
        if action.choices is not None and converted not in action.choices:
            return f"expects one of {', '.join(map(str, action.choices))}, got {item!r}"
    return None


def standalone_text(value: str | Path) -> str:
    """The config as one self-contained YAML document: the file verbatim (comments kept) when
    it has no ``base:``, else the resolved mapping with a header naming the source. What a
    job directory keeps, so the job does not depend on other config files."""
    path = resolve_config(value)
    merged = load_config(path)
    text = path.read_text()
    if BASE_KEY not in _read_mapping(path, str(value)):
        return text
    return (f"# resolved from {value} (its base: chain merged)\n"
            + yaml.safe_dump(merged, sort_keys=False))


def flag_present(argv: Sequence[str], flag: str) -> bool:
    """Whether ``flag`` is given in ``argv`` (as ``--flag`` or ``--flag=value``)."""
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The last value ``argv`` gives ``flag`` (``--flag v`` or ``--flag=v``), else None."""
    value = None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value
