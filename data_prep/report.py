"""Counting skipped records, the progress bar, and the final summary table."""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

from data_prep.files import format_bytes

FIRST_LOCATIONS = 5  # how many locations are kept per skip reason


class SkipCounter:
    """Skipped records by reason, with the first few locations of each."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.first: dict[str, list[str]] = {}

    def add(self, reason: str, location: str | None, count: int = 1) -> None:
        """Count ``count`` records skipped for ``reason``; remember ``location`` if early."""
        self.counts[reason] = self.counts.get(reason, 0) + count
        first = self.first.setdefault(reason, [])
        if location is not None and len(first) < FIRST_LOCATIONS:
            first.append(location)

    @property
    def total(self) -> int:
        """All skipped records."""
        return sum(self.counts.values())

    def to_json(self) -> dict:
        """``{reason: {"count": n, "first": [locations]}}``, most frequent reason first."""
        order = sorted(self.counts, key=lambda r: (-self.counts[r], r))
        return {r: {"count": self.counts[r], "first": self.first.get(r, [])} for r in order}


class Progress:
    """A tqdm bar over input bytes with documents/s, MB/s (of text) and tokens/s."""

    def __init__(self, total_bytes: int, desc: str, enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        self.t0 = time.time()
        self.bar = None
        if enabled:
            from tqdm import tqdm

            stream = stream or sys.stderr
            # Redraw often on a terminal, rarely in a log file.
            interval = 0.5 if stream.isatty() else 30.0
            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000,
                            desc=desc, file=stream, dynamic_ncols=True, smoothing=0.1,
                            mininterval=interval)
        self._shown = 0

    def update(self, raw_bytes: int, docs: int, tokens: int, text_bytes: int) -> None:
        """Show cumulative totals."""
        if self.bar is None:
            return
        self.bar.update(raw_bytes - self._shown)
        self._shown = raw_bytes
        dt = max(time.time() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{docs / dt:,.0f} docs/s, {text_bytes / dt / 1e6:.1f} MB/s, "
                                 f"{tokens / dt:,.0f} tok/s", refresh=False)

    def close(self) -> None:
        """Finish the bar."""
        if self.bar is not None:
            self.bar.close()


def short_path(path: str) -> str:
    """``path`` relative to the working directory when that is shorter."""
    try:
        rel = os.path.relpath(path)
    except ValueError:  # pragma: no cover - other drive on Windows
        return path
    return rel if len(rel) < len(path) else path


def _short_location(location: str) -> str:
    """A ``/abs/path:line (detail)`` location with the path relative to the working dir."""
    cwd = os.getcwd() + os.sep
    return location[len(cwd):] if location.startswith(cwd) else location


def summary_table(m: dict) -> str:
    """The human summary of a preprocessing manifest ``m``."""
    dt = max(m["elapsed_s"], 1e-9)
    rows = [
        ("status", m["status"]),
        ("inputs", f"{len(m['inputs'])} files, {format_bytes(m['input_bytes'])} "
                   f"in {m['pieces']} pieces ({m['pieces_reused']} reused)"),
        ("documents", f"{m['documents']:,}"),
        ("tokens", f"{m['tokens']:,}"
                   + (f"  ({m['text_bytes'] / m['tokens']:.2f} bytes/token)"
                      if m["tokens"] else "")),
        ("text", format_bytes(m["text_bytes"])),
        ("output", f"{format_bytes(sum(d['bin_bytes'] for d in m['datasets']))} in "
                   f"{len(m['datasets'])} dataset(s), {m['dtype']}: "
                   + ", ".join(short_path(d["prefix"]) for d in m["datasets"][:3])
                   + (" ..." if len(m["datasets"]) > 3 else "")),
        ("elapsed", f"{m['elapsed_s']:.1f} s with {m['workers']} workers, "
                    f"+{m.get('startup_s', 0):.1f} s startup  "
                    f"({m['documents'] / dt:,.0f} docs/s, {m['text_bytes'] / dt / 1e6:.2f} "
                    f"MB/s, {m['tokens'] / dt:,.0f} tokens/s)"),
        ("skipped", f"{m['skipped_total']:,} of {m['records']:,} records "
                    f"({100 * m['bad_fraction']:.3f}%, limit "
                    f"{100 * m['max_bad_fraction']:.3f}%)"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"data_prep.preprocess: {short_path(m['prefix'])}"]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    for reason, info in m["skipped"].items():
        lines.append(f"    {reason:<20} {info['count']:>10,}   first: "
                     + "; ".join(_short_location(loc) for loc in info["first"][:3]))
    if m.get("blank_lines"):
        lines.append(f"  (blank lines ignored: {m['blank_lines']:,})")
    return "\n".join(lines)
