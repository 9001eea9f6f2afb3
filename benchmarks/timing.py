"""Timing shared by every benchmark: warm-up, then the variants interleaved round by round.

A benchmark that compares A with B times them A B A B … rather than all A then all B, so a
burst of load from another process lands on both sides of a pair instead of on one variant;
the ratio is taken pair by pair (round by round) and reported as its median and min–max, never
as a ratio of two separately taken best or mean times. Warm-up calls run the same interleaved
order and are not recorded.

Benchmarks run as ``python benchmarks/<name>.py`` import this module as ``timing`` (the
script's own directory is first on ``sys.path``). JSON convention: a timed quantity ``key``
appears as ``key`` (the median), ``key_min`` and ``key_max``, next to the run's ``repeats``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Spread:
    """Median and range of one quantity over the repeats."""

    median: float
    min: float
    max: float

    @classmethod
    def of(cls, samples: list[float]) -> Spread:
        """The spread of ``samples`` (at least one)."""
        if not samples:
            raise ValueError("no samples")
        return cls(statistics.median(samples), min(samples), max(samples))

    def flat(self, key: str) -> dict[str, float]:
        """``{key: median, key_min: min, key_max: max}`` for a benchmark's JSON line."""
        return {key: self.median, f"{key}_min": self.min, f"{key}_max": self.max}

    def text(self, scale: float = 1.0, fmt: str = ".3f") -> str:
        """``median [min–max]`` (each value multiplied by ``scale``) for a printed table."""
        return (f"{self.median * scale:{fmt}} [{self.min * scale:{fmt}}–"
                f"{self.max * scale:{fmt}}]")


@dataclass(frozen=True)
class Timings:
    """Wall times per variant, one sample per round, rounds in the order they ran."""

    samples: dict[str, list[float]]

    @property
    def repeats(self) -> int:
        """Number of timed rounds."""
        return len(next(iter(self.samples.values())))

    def time(self, name: str) -> Spread:
        """Spread of variant ``name``'s wall time (seconds)."""
        return Spread.of(self.samples[name])

    def ratio(self, numerator: str, denominator: str) -> Spread:
        """Spread of ``numerator / denominator`` taken round by round (pair by pair)."""
        return Spread.of([a / b for a, b in zip(self.samples[numerator],
                                                self.samples[denominator], strict=True)])

    def flat(self, keys: Mapping[str, str] | None = None) -> dict[str, float | int]:
        """Every variant's spread under ``keys[name]`` (default ``name``), plus ``repeats``."""
        out: dict[str, float | int] = {}
        for name in self.samples:
            out.update(self.time(name).flat((keys or {}).get(name, name)))
        out["repeats"] = self.repeats
        return out


def alternate(variants: Mapping[str, Callable[[], object]], repeats: int = 5,
              warmup: int = 1) -> dict[str, list]:
    """Call each callable of ``variants`` once per round, in the mapping's order, for
    ``warmup`` unrecorded rounds and then ``repeats`` recorded ones; the recorded return
    values per variant. For benchmarks whose variants time themselves (a worker process
    reporting its own seconds); ``interleave`` times the calls."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    if not variants:
        raise ValueError("no variants to time")
    results: dict[str, list] = {name: [] for name in variants}
    for round_ in range(warmup + repeats):
        for name, fn in variants.items():
            value = fn()
            if round_ >= warmup:
                results[name].append(value)
    return results


def interleave(variants: Mapping[str, Callable[[], object]], repeats: int = 5, warmup: int = 1,
               sync: Callable[[], object] | None = None,
               clock: Callable[[], float] = time.perf_counter) -> Timings:
    """Wall time of each callable of ``variants``, alternated round by round (``alternate``).

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each clock read, so queued device
    work is charged to the call that queued it.
    """
    def timed(fn: Callable[[], object]) -> Callable[[], float]:
        def run() -> float:
            if sync is not None:
                sync()
            start = clock()
            fn()
            if sync is not None:
                sync()
            return clock() - start
        return run

    return Timings(alternate({name: timed(fn) for name, fn in variants.items()}, repeats,
                             warmup))


def compare(a: Callable[[], object], b: Callable[[], object], repeats: int = 5,
            warmup: int = 1, sync: Callable[[], object] | None = None,
            clock: Callable[[], float] = time.perf_counter) -> tuple[Spread, Spread, Spread]:
    """``a`` and ``b`` alternated A B A B …: spreads of A's time, B's time and A/B pair by
    pair."""
    timings = interleave({"a": a, "b": b}, repeats, warmup, sync, clock)
    return timings.time("a"), timings.time("b"), timings.ratio("a", "b")


def measure(fn: Callable[[], object], repeats: int = 5, warmup: int = 1,
            sync: Callable[[], object] | None = None,
            clock: Callable[[], float] = time.perf_counter) -> Spread:
    """Spread of ``fn``'s wall time over ``repeats`` calls after ``warmup`` unrecorded ones."""
    return interleave({"fn": fn}, repeats, warmup, sync, clock).time("fn")
