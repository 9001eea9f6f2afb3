"""benchmarks/timing.py: interleaving order, warm-up, pairwise ratios and spreads, checked with
fake callables and a fake clock (no wall time measured or asserted)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.distributed import ROOT

# Loaded from its file: putting benchmarks/ on sys.path would shadow the data_prep package.
_SPEC = importlib.util.spec_from_file_location("benchmark_timing",
                                               ROOT / "benchmarks" / "timing.py")
timing = sys.modules["benchmark_timing"] = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(timing)


class FakeClock:
    """A clock that each fake variant advances by the duration it is given for its call."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def variant(self, name: str, durations: list[float]):
        it = iter(durations)

        def run() -> None:
            self.calls.append(name)
            self.now += next(it)
        return run


def test_variants_alternate_round_by_round_after_the_warmup():
    clock = FakeClock()
    variants = {"a": clock.variant("a", [9.0] * 5), "b": clock.variant("b", [9.0] * 5)}
    timings = timing.interleave(variants, repeats=3, warmup=2, clock=clock)
    assert clock.calls == ["a", "b"] * 5  # A B A B …, warm-up rounds in the same order
    assert timings.repeats == 3


def test_warmup_calls_are_not_recorded():
    clock = FakeClock()
    a = clock.variant("a", [100.0, 1.0, 2.0, 3.0])
    b = clock.variant("b", [50.0, 4.0, 5.0, 6.0])
    timings = timing.interleave({"a": a, "b": b}, repeats=3, warmup=1, clock=clock)
    assert timings.samples == {"a": [1.0, 2.0, 3.0], "b": [4.0, 5.0, 6.0]}


def test_ratio_is_taken_pair_by_pair_not_from_the_medians():
    clock = FakeClock()
    # Round 2 is "under load" for both variants: the pairwise ratio stays 2 every round,
    # while the ratio of the two medians (or of min to max) would not.
    a = clock.variant("a", [2.0, 20.0, 4.0])
    b = clock.variant("b", [1.0, 10.0, 2.0])
    timings = timing.interleave({"a": a, "b": b}, repeats=3, warmup=0, clock=clock)
    assert timings.ratio("a", "b") == timing.Spread(2.0, 2.0, 2.0)
    assert timings.ratio("b", "a") == timing.Spread(0.5, 0.5, 0.5)


def test_median_min_max_of_each_time_and_of_the_ratio():
    clock = FakeClock()
    a = clock.variant("a", [0.0, 3.0, 1.0, 8.0, 2.0, 4.0])
    b = clock.variant("b", [0.0, 1.0, 1.0, 2.0, 4.0, 1.0])
    t_a, t_b, ratio = timing.compare(a, b, repeats=5, warmup=1, clock=clock)
    assert t_a == timing.Spread(3.0, 1.0, 8.0)
    assert t_b == timing.Spread(1.0, 1.0, 4.0)
    assert ratio == timing.Spread(3.0, 0.5, 4.0)  # ratios 3, 1, 4, 0.5, 4


def test_json_keys_carry_median_and_range():
    spread = timing.Spread(2.0, 1.0, 3.0)
    assert spread.flat("step_s") == {"step_s": 2.0, "step_s_min": 1.0, "step_s_max": 3.0}
    assert spread.text(1e3, ".0f") == "2000 [1000–3000]"
    clock = FakeClock()
    timings = timing.interleave({"x": clock.variant("x", [1.0, 2.0])}, repeats=2, warmup=0,
                                clock=clock)
    assert timings.flat({"x": "x_s"}) == {"x_s": 1.5, "x_s_min": 1.0, "x_s_max": 2.0,
                                          "repeats": 2}


def test_sync_runs_around_every_call_and_measure_uses_one_variant():
    clock = FakeClock()
    synced = []
    spread = timing.measure(clock.variant("f", [5.0, 1.0, 3.0]), repeats=2, warmup=1,
                            sync=lambda: synced.append(clock.now), clock=clock)
    assert spread == timing.Spread(2.0, 1.0, 3.0)
    assert len(synced) == 6  # before and after each of the 3 calls


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        timing.interleave({"a": lambda: None}, repeats=0)
    with pytest.raises(ValueError):
        timing.interleave({}, repeats=3)


def test_alternate_keeps_the_recorded_return_values_in_round_order():
    calls = []

    def variant(name: str):
        def run() -> tuple[str, int]:
            calls.append(name)
            return name, len(calls)
        return run

    results = timing.alternate({"x": variant("x"), "y": variant("y")}, repeats=2, warmup=1)
    assert calls == ["x", "y"] * 3
    assert results == {"x": [("x", 3), ("x", 5)], "y": [("y", 4), ("y", 6)]}
