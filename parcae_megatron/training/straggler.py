"""A straggler report that knows loop depth.

With per-sequence loop depth a rank's step time follows the loops it sampled: comparing raw
step times (Megatron's ``--log-straggler``) reads a deep batch as slow hardware and lets a
slow device hide behind a shallow one. This report compares *time per executed FLOP* instead.

Per rank and step it measures the compute time (from the start of ``train_step`` to the
gradient synchronisation, ``finalize_model_grads``: the part of a step a slow device lengthens
and the others wait through), the wall time of the step, and the executed loop iterations and
FLOPs of the rank's data-parallel replica (docs/design.md §8.1 with the realised depths); the
first step of each process (warm-up) is left out. Every
``--straggler-window`` steps one small all_gather brings the window's sums to the last rank,
which writes a ``straggler`` record through the telemetry sink and prints one line per rank whose
time per executed FLOP exceeds the median over ranks by ``--straggler-factor``, naming its host.
"""

from __future__ import annotations

import socket
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

# Per rank and window: data-parallel rank, steps, compute time, wall time, sequences,
# executed loop iterations, gradient loop iterations (the last three: this rank's loop owner
# share; summed per replica on the last rank).
_FIELDS = ("dp_rank", "steps", "compute_s", "wall_s", "sequences", "executed_iterations",
           "grad_iterations")


class StragglerMonitor:
    """Per-rank timing and loop work over a window, gathered and judged on the last rank."""

    def __init__(self) -> None:
        self.window = 0
        self.factor = 1.2
        self.step_start: float | None = None
        self.compute_s: float | None = None
        self.sums = [0.0] * len(_FIELDS)
        self.first_step: int | None = None
        self.hosts: list[str] | None = None
        self.warm = False

    def configure(self, args) -> None:
        """Read ``--straggler-window`` (0: off) and ``--straggler-factor``."""
        self.window = max(0, getattr(args, "straggler_window", 0) or 0)
        self.factor = getattr(args, "straggler_factor", 1.2)

    # -------------------------------------------------------- timing hooks (megatron_patches)
    def on_step_start(self) -> None:
        """``train_step`` begins."""
        self.step_start, self.compute_s = time.perf_counter(), None

    def on_gradient_sync(self) -> None:
        """``finalize_model_grads`` begins: this rank's compute for the step is done."""
        if self.step_start is not None and self.compute_s is None:
            self.compute_s = time.perf_counter() - self.step_start

    # -------------------------------------------------------- per step
    def on_step(self, iteration: int, wall_s: float | None, loop: tuple[int, int, int],
                dp_rank: int, flops: Callable[[float, float], float], seq_length: int,
                sink: Callable[[dict, int], None]) -> None:
        """Add one step (``loop``: this rank's sequences, executed and gradient iterations)
        and, at the end of a window, gather over the world and report through ``sink``
        (called on the last rank). ``flops(depth, grad_depth)``: executed FLOPs per token."""
        if not self.window:
            return
        if not self.warm:  # the first step of a process (warm-up) says nothing about a rank
            self.warm = True
            return
        if self.first_step is None:
            self.first_step = iteration
        compute = self.compute_s if self.compute_s is not None else (wall_s or 0.0)
        step = (dp_rank, 1, compute, wall_s or 0.0, *loop)
        self.sums = [float(dp_rank), *(a + b for a, b in zip(self.sums[1:], step[1:],
                                                              strict=True))]
        if iteration % self.window:
            return
        rows = self._gather()
        first, self.first_step, self.sums = self.first_step, None, [0.0] * len(_FIELDS)
        if rows is not None:
            sink(judge(rows, self.hosts, flops, seq_length, self.factor, first, iteration),
                 iteration)

    def _gather(self) -> list[list[float]] | None:
        mine = torch.tensor(self.sums, dtype=torch.float64)
        if not dist.is_initialized():
            self.hosts = self.hosts or [socket.gethostname()]
            return [mine.tolist()]
        if self.hosts is None:  # once: which node each rank is on
            self.hosts = [""] * dist.get_world_size()
            dist.all_gather_object(self.hosts, socket.gethostname())
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        out = torch.zeros(dist.get_world_size() * len(_FIELDS), dtype=torch.float64,
                          device=device)
        dist.all_gather_into_tensor(out, mine.to(device))
        if dist.get_rank() != dist.get_world_size() - 1:
            return None
        return out.view(-1, len(_FIELDS)).cpu().tolist()


def judge(rows: list[list[float]], hosts: list[str] | None,
          flops: Callable[[float, float], float], seq_length: int, factor: float,
          first: int | None, last: int) -> dict[str, Any]:
    """The ``straggler`` record of one window from the per-rank sums ``rows``: each rank's
    time per executed FLOP (its replica's FLOPs), the median over ranks, and the ranks above
    ``factor`` × median."""
    replicas: dict[int, list[float]] = {}
    for row in rows:
        totals = replicas.setdefault(int(row[0]), [0.0, 0.0, 0.0])
        for i in range(3):
            totals[i] += row[4 + i]
    ranks = []
    for rank, row in enumerate(rows):
        steps = max(row[1], 1.0)
        seqs, executed, grad = replicas[int(row[0])]
        work = flops(executed / seqs, grad / seqs) * seqs * seq_length if seqs else 0.0
        ranks.append({"rank": rank, "host": hosts[rank] if hosts else "",
                      "compute_s": row[2] / steps, "step_time_s": row[3] / steps,
                      "executed_iterations": executed / steps, "executed_flops": work / steps,
                      "s_per_tflop": row[2] / work * 1e12 if work else None})
    per_flop = [r["s_per_tflop"] for r in ranks if r["s_per_tflop"] is not None]
    median = statistics.median(per_flop) if per_flop else None
    for r in ranks:
        r["ratio"] = (r["s_per_tflop"] / median
                      if median and r["s_per_tflop"] is not None else None)
    flagged = [r for r in ranks if r["ratio"] is not None and r["ratio"] > factor]
    return {"type": "straggler", "iteration": last, "first_iteration": first,
            "factor": factor, "median_s_per_tflop": median,
            "max_ratio": max((r["ratio"] for r in ranks if r["ratio"] is not None),
                             default=None),
            "flagged": [{"rank": r["rank"], "host": r["host"], "ratio": r["ratio"]}
                        for r in flagged],
            "num_flagged": len(flagged), "ranks": ranks}


def describe(record: dict) -> list[str]:
    """One line per flagged rank of a ``straggler`` record."""
    return [f"straggler: rank {f['rank']} on {f['host']} takes {f['ratio']:.2f}x the median "
            f"time per executed FLOP over iterations {record['first_iteration']}-"
            f"{record['iteration']} (flag at {record['factor']}x)" for f in record["flagged"]]


STRAGGLER = StragglerMonitor()
