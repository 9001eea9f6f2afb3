"""Iso-FLOP sweep planning (docs/design.md §10.1): one run per (FLOP budget, μ_rec).

For each μ_rec (μ_bwd = ⌈μ_rec/2⌉) the training FLOPs per token follow the authors' code
formula (docs/design.md §8.1, the default: it reproduces the paper's budgets) or the paper's App. D
formula (2·N̂₁ + 6·N̂₂ plus attention); tokens = budget / (FLOPs per token), steps = tokens /
tokens per step. Both formulas' FLOPs per token are kept on every run. The plan is written as
a sweep file that ``python -m launch.submit --sweep`` runs as one SLURM job array.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from parcae_megatron.model.accounting import (
    FLOPS_FORMULAS,
    count_parameters_from_config,
    flops_per_token,
    paper_flops_per_token,
)
from parcae_megatron.model.presets import preset_config


@dataclass(frozen=True)
class PlannedRun:
    """One element of an iso-FLOP sweep (``flops_per_token`` is the planning formula's)."""

    name: str
    budget: float
    mean_recurrence: int
    mean_backprop_depth: int
    flops_per_token: float
    tokens: int
    train_iters: int
    code_flops_per_token: float = 0.0
    paper_flops_per_token: float = 0.0
    flops_formula: str = "code"

    def args(self) -> list[str]:
        """Training flags of this run (on top of the base config)."""
        return ["--mean-recurrence", str(self.mean_recurrence),
                "--mean-backprop-depth", str(self.mean_backprop_depth),
                "--train-iters", str(self.train_iters),
                "--lr-wsd-decay-iters", str(max(1, self.train_iters // 2))]


def budget_label(budget: float) -> str:
    """``1e18`` → ``1e18``, ``1.5e18`` → ``1.5e18`` (3 significant digits, no '+')."""
    return f"{budget:.3g}".replace("+", "")


def plan_isoflop(preset: str, budgets: list[float], recurrences: list[int],
                 global_batch: int = 256, seq_length: int = 2048,
                 flops_formula: str = "code", vocab_size: int | None = None) -> list[PlannedRun]:
    """The runs of an iso-FLOP sweep of ``preset`` (docs/design.md §10.1 conventions); tokens are
    set by ``flops_formula`` ("code" or "paper", docs/design.md §8). ``vocab_size`` (padded,
    as the model sees it) overrides the preset's when the tokenizer differs: value-embedding
    tables and the LM head enter the FLOPs."""
    if flops_formula not in FLOPS_FORMULAS:
        raise ValueError(f"unknown FLOP formula {flops_formula!r}; known: {sorted(FLOPS_FORMULAS)}")
    tokens_per_step = global_batch * seq_length
    runs = []
    for budget in budgets:
        for mu in recurrences:
            bwd = math.ceil(mu / 2)
            extra = {"vocab_size": vocab_size} if vocab_size else {}
            cfg = preset_config(preset, mean_recurrence=mu, mean_backprop_depth=bwd,
                                seq_length=seq_length, **extra)
            counts = count_parameters_from_config(cfg)
            code, paper = flops_per_token(cfg, counts), paper_flops_per_token(cfg, counts)
            per_token = code if flops_formula == "code" else paper
            steps = max(1, round(budget / per_token / tokens_per_step))
            runs.append(PlannedRun(f"{preset}-C{budget_label(budget)}-mu{mu}", budget, mu, bwd,
                                   per_token, steps * tokens_per_step, steps, code, paper,
                                   flops_formula))
    return runs


def sweep_document(runs: list[PlannedRun], config: str, name: str,
                   concurrency: int | None = None) -> dict:
    """The ``launch.submit --sweep`` YAML document for ``runs`` on top of ``config``."""
    doc: dict = {"name": name,
                 "runs": [{"config": config, "name": r.name, "args": r.args()} for r in runs]}
    if concurrency:
        doc["concurrency"] = concurrency
    return doc


def sweep_header(runs: list[PlannedRun]) -> str:
    """YAML comment lines recording each run's budget and FLOPs under both formulas."""
    formula = runs[0].flops_formula if runs else "code"
    lines = [f"# iso-FLOP plan (parcae_megatron.scaling plan); tokens set by the {formula} "
             "FLOP formula (docs/design.md §8)",
             "# run: budget | FLOPs/token code, paper | tokens | FLOPs code, paper"]
    for r in runs:
        lines.append(f"#   {r.name}: {r.budget:.3g} | {r.code_flops_per_token:.4g}, "
                     f"{r.paper_flops_per_token:.4g} | {r.tokens} | "
                     f"{r.tokens * r.code_flops_per_token:.4g}, "
                     f"{r.tokens * r.paper_flops_per_token:.4g}")
    return "\n".join(lines) + "\n"
