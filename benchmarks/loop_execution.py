"""Compacted against masked loop execution, timed on one model: shared by
``loop_overhead.py`` (e) and ``gpu_acceptance.py`` (g).

Both modes see the same depth draws in each round (the sampler is reseeded per round), so the
executed-iteration ratio is exact and the wall ratio is taken pair by pair by ``timing``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timing import Spread, interleave


def saving_reaching_wall(wall: Spread, iterations: float) -> Spread:
    """(1 - 1/wall ratio) / (1 - 1/iteration ratio): the share of compaction's saving in
    executed iterations that shows up as saved wall time (monotone in the wall ratio, so the
    median and range map through). NaN when masking executes no more than compaction."""
    saving = 1 - 1 / iterations
    if saving <= 0:
        return Spread(float("nan"), float("nan"), float("nan"))
    return Spread(*((1 - 1 / r) / saving for r in (wall.median, wall.min, wall.max)))


def compare_loop_execution(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor,
                           repeats: int, sync: Callable[[], None] | None = None) -> dict:
    """Time one forward + backward of ``model`` (a ``ParcaeModel``, possibly wrapped: the
    inner one is ``model.module``) with ``loop_execution`` = masked and compact, interleaved.

    Returns the iteration counts per sequence, each mode's wall time and the masked/compact
    ratios as a benchmark's JSON fields (``key``, ``key_min``, ``key_max``; ``repeats``)."""
    inner = model.module if hasattr(model, "module") else model
    cfg = inner.config
    rounds = {"compact": 0, "masked": 0}
    counts = {mode: [0, 0, 0] for mode in rounds}  # sequences, sampled, executed iterations

    def run(mode: str):
        def step() -> None:
            cfg.loop_execution = mode
            inner.depth_sampler.start_step(rounds[mode])  # round k: same draws in both modes
            rounds[mode] += 1
            model.zero_grad(set_to_none=True)
            model(ids, labels=labels).float().mean().backward()
            stats = inner.pop_loop_stats()
            if rounds[mode] > 1:  # the warm-up round counts for neither mode
                for i, n in enumerate((stats.sequences, stats.sampled_iterations,
                                       stats.executed_iterations)):
                    counts[mode][i] += n
        return step

    timings = interleave({"masked": run("masked"), "compact": run("compact")}, repeats,
                         sync=sync)
    sequences, sampled, compact = counts["compact"]
    iterations = counts["masked"][2] / compact
    wall = timings.ratio("masked", "compact")
    return {"mean_sampled_depth": sampled / sequences,
            "compact_over_mean_depth": compact / sampled,
            "masked_over_mean_depth": counts["masked"][2] / sampled,
            "masked_over_compact_iterations": iterations,
            **timings.flat({"masked": "masked_s", "compact": "compact_s"}),
            **wall.flat("masked_over_compact_time"),
            **saving_reaching_wall(wall, iterations).flat("saving_reaching_wall")}
