"""Fit the scaling laws to finished runs (spec §5.2-5.3) and plot them.

A run is a telemetry file (``telemetry.jsonl`` of a run directory); its last validation
record gives the loss at μ_rec (``lm_loss``), the loss at other loop counts (``lm_loss_T=k``),
tokens seen, μ_rec, FLOPs per token and the effective parameter count N(μ_rec).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from parcae_megatron.scaling.fit import (
    fit_isoflop_parabola,
    fit_parametric_law,
    fit_power_law,
    fit_test_time_law,
)
from parcae_megatron.training.telemetry import read_records


@dataclass(frozen=True)
class RunResult:
    """What the fits use from one finished run."""

    name: str
    mean_recurrence: int
    tokens: float
    flops: float
    effective_params: float
    loss: float
    loss_by_t: dict[int, float]


def load_run(path: Path) -> RunResult:
    """Read a run directory (or its telemetry file)."""
    telemetry = path / "telemetry.jsonl" if path.is_dir() else path
    validation = read_records(telemetry, "validation")
    if not validation:
        raise ValueError(f"{telemetry}: no validation record (is the run finished?)")
    v = validation[-1]
    by_t = {int(k.split("=")[1]): float(x) for k, x in v.items()
            if k.startswith("lm_loss_T=") and x is not None}
    name = path.name if path.is_dir() else path.parent.name
    return RunResult(name, int(v["mean_recurrence"]), float(v["tokens_seen"]),
                     float(v["tokens_seen"]) * float(v["flops_per_token"]),
                     float(v["effective_params"]), float(v["lm_loss"]), by_t)


def _budget_key(flops: float) -> float:
    return float(f"{flops:.1e}")


def fit_runs(runs: list[RunResult], restarts: int = 100, seed: int = 0,
             plot_dir: Path | None = None) -> dict:
    """All fits the runs support; JSON-ready. Plots go to ``plot_dir`` when given."""
    out: dict = {"runs": len(runs)}
    by_budget: dict[float, list[RunResult]] = defaultdict(list)
    for r in runs:
        by_budget[_budget_key(r.flops)].append(r)
    frontier = []
    for budget, group in sorted(by_budget.items()):
        mus = [r.mean_recurrence for r in group]
        if len(set(mus)) < 3:
            continue
        parabola = fit_isoflop_parabola(mus, [r.loss for r in group])
        if parabola.c2 <= 0:
            continue
        tokens_vs_mu = fit_power_law(mus, [r.tokens for r in group])
        frontier.append({"budget": budget, "mu_star": parabola.optimum,
                         "tokens_star": float(tokens_vs_mu(parabola.optimum)),
                         "loss_star": parabola.min_loss})
    out["isoflop"] = frontier
    if len(frontier) >= 2:
        budgets = [f["budget"] for f in frontier]
        mu_law = fit_power_law(budgets, [f["mu_star"] for f in frontier])
        d_law = fit_power_law(budgets, [f["tokens_star"] for f in frontier])
        out["mu_star_law"] = {"coefficient": mu_law.coefficient, "exponent": mu_law.exponent}
        out["tokens_star_law"] = {"coefficient": d_law.coefficient, "exponent": d_law.exponent}
    if len(runs) >= 6:
        law = fit_parametric_law([r.effective_params for r in runs], [r.tokens for r in runs],
                                 [r.loss for r in runs], restarts=restarts, seed=seed)
        pred = law.predict([r.effective_params for r in runs], [r.tokens for r in runs])
        rel = np.abs(pred - np.array([r.loss for r in runs])) / np.array([r.loss for r in runs])
        out["parametric_law"] = {**law.as_dict(), "mean_rel_error": float(rel.mean())}
    test_time = {}
    for r in runs:
        if len(r.loss_by_t) >= 4:
            fit = fit_test_time_law(sorted(r.loss_by_t), [r.loss_by_t[t] for t in
                                                          sorted(r.loss_by_t)], seed=seed)
            test_time[r.name] = {"l_inf": fit.l_inf, "Z": fit.Z, "z": fit.z}
    out["test_time"] = test_time
    if plot_dir is not None:
        plot_dir.mkdir(parents=True, exist_ok=True)
        out["plots"] = _plot(plot_dir, by_budget, frontier, runs, test_time)
    return out


def _plot(plot_dir: Path, by_budget, frontier, runs, test_time) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for budget, group in sorted(by_budget.items()):
        group = sorted(group, key=lambda r: r.mean_recurrence)
        ax.plot([r.mean_recurrence for r in group], [r.loss for r in group], "o-",
                label=f"C = {budget:.3g} FLOPs")
    for f in frontier:
        ax.plot(f["mu_star"], f["loss_star"], "k*", ms=10)
    ax.set(xscale="log", xlabel="μ_rec", ylabel="validation loss", title="Iso-FLOP curves")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(str(plot_dir / "isoflop.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    if test_time:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in runs:
            if r.name in test_time:
                t = sorted(r.loss_by_t)
                fit = test_time[r.name]
                grid = np.linspace(min(t), max(t), 100)
                line = ax.plot(t, [r.loss_by_t[k] for k in t], "o", ms=3)[0]
                ax.plot(grid, fit["l_inf"] + fit["Z"] * np.exp(-fit["z"] * grid), "-",
                        color=line.get_color(), label=r.name)
        ax.set(xlabel="loop count T", ylabel="validation loss", title="Test-time scaling")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(str(plot_dir / "test_time.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def write_json(result: dict, path: Path) -> None:
    """Write the fit results."""
    path.write_text(json.dumps(result, indent=2))
