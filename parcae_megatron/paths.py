"""Where the project's own files are, so documented commands work from any directory."""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
"""The checkout holding ``parcae_megatron/`` and ``configs/`` (an editable install points
here)."""


def resolve_config(value: str | Path, base: Path | None = None) -> Path:
    """``value`` as given if it exists; else, for a relative path, the same path under ``base``
    (when given) or under the project root — so ``configs/parcae-1.3b.yaml`` resolves from any
    directory. Returns ``value`` unchanged when neither exists (the caller reports it)."""
    path = Path(value)
    if path.is_file() or path.is_absolute():
        return path
    for root in (base, PROJECT_ROOT):
        if root is not None and (root / path).is_file():
            return root / path
    return path
