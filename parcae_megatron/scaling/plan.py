"""Iso-FLOP sweep planning (spec §5.2): one run per (FLOP budget, μ_rec).

For each μ_rec (μ_bwd = ⌈μ_rec/2⌉) the training FLOPs per token follow the authors' code
formula (spec §5.1); tokens = budget / (FLOPs per token), steps = tokens / tokens per step.
The plan is written as a sweep file that ``python -m launch.submit --sweep`` runs as one
SLURM job array.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from parcae_megatron.model.accounting import count_parameters_from_config, flops_per_token
from parcae_megatron.model.presets import preset_config


@dataclass(frozen=True)
class PlannedRun:
    """One element of an iso-FLOP sweep."""

    name: str
    budget: float
    mean_recurrence: int
    mean_backprop_depth: int
    flops_per_token: float
    tokens: int
    train_iters: int

    def args(self) -> list[str]:
        """Training flags of this run (on top of the base config)."""
        return ["--mean-recurrence", str(self.mean_recurrence),
                "--mean-backprop-depth", str(self.mean_backprop_depth),
                "--train-iters", str(self.train_iters),
                "--lr-wsd-decay-iters", str(max(1, self.train_iters // 2))]


def plan_isoflop(preset: str, budgets: list[float], recurrences: list[int],
                 global_batch: int = 256, seq_length: int = 2048) -> list[PlannedRun]:
    """The runs of an iso-FLOP sweep of ``preset`` (spec §5.2 conventions)."""
    tokens_per_step = global_batch * seq_length
    runs = []
    for budget in budgets:
        for mu in recurrences:
            bwd = math.ceil(mu / 2)
            cfg = preset_config(preset, mean_recurrence=mu, mean_backprop_depth=bwd,
                                seq_length=seq_length)
            per_token = flops_per_token(cfg, count_parameters_from_config(cfg))
            steps = max(1, round(budget / per_token / tokens_per_step))
            runs.append(PlannedRun(f"{preset}-C{budget:.0e}-mu{mu}".replace("+", ""), budget, mu,
                                   bwd, per_token, steps * tokens_per_step, steps))
    return runs


def sweep_document(runs: list[PlannedRun], config: str, name: str,
                   concurrency: int | None = None) -> dict:
    """The ``launch.submit --sweep`` YAML document for ``runs`` on top of ``config``."""
    doc: dict = {"name": name,
                 "runs": [{"config": config, "name": r.name, "args": r.args()} for r in runs]}
    if concurrency:
        doc["concurrency"] = concurrency
    return doc
