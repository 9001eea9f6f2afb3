"""Fit the scaling laws to finished runs (docs/design.md §10), with held-out errors, and plot them.

A run is a telemetry file (``telemetry.jsonl`` of a run directory); its last validation
record gives the loss at μ_rec (``lm_loss``), the loss at other loop counts (``lm_loss_T=k``),
tokens seen, μ_rec, FLOPs per token under the code and the paper formula (docs/design.md §8) and
the effective parameter count N(μ_rec).

Runs are grouped into FLOP budgets by their compute C = tokens × FLOPs/token under the chosen
formula (runs within 10 % of a group's smallest C share a budget: step rounding). Held-out
points (``holdout``) are kept out of every fit and only predicted:

* ``largest-budget``: every run of the largest budget (needs >= 3 budgets, so that the
  compute power laws still see two); the extrapolation check of Chinchilla-style studies;
* ``fraction``: a seeded random share of the runs (at least one);
* ``none``.

The per-run test-time laws are checked the paper's way instead (docs/design.md §10.3): with a
holdout they are fitted on T <= μ_rec (when that leaves 4 points) and predict T > μ_rec.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from parcae_megatron.scaling.fit import (
    fit_isoflop_parabola,
    fit_parametric_law,
    fit_power_law,
    fit_test_time_law,
    fit_unified_test_time_law,
    prediction_errors,
)

BUDGET_TOLERANCE = 1.1


@dataclass(frozen=True)
class RunResult:
    """What the fits use from one finished run (``flops``: code formula, docs/design.md §8.1)."""

    name: str
    mean_recurrence: int
    tokens: float
    flops: float
    effective_params: float
    loss: float
    loss_by_t: dict[int, float]
    paper_flops: float | None = field(default=None)

    def compute(self, formula: str) -> float:
        """Training FLOPs under ``formula`` ("code" or "paper")."""
        if formula == "code":
            return self.flops
        if self.paper_flops is None:
            raise ValueError(f"run {self.name}: its telemetry has no paper_flops_per_token "
                             "(use --flops-formula code)")
        return self.paper_flops


def validation_records(telemetry: Path) -> list[dict]:
    """The ``validation`` records of a telemetry file (the same reading as
    ``training.telemetry.read_records``, without importing torch and Megatron: ``fit`` starts
    in a second instead of 10+). A partial last line is skipped."""
    if not telemetry.exists():
        return []
    out = []
    for line in telemetry.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("type") == "validation":
            out.append(record)
    return out


def load_run(path: Path) -> RunResult:
    """Read a run directory (or its telemetry file)."""
    telemetry = path / "telemetry.jsonl" if path.is_dir() else path
    validation = validation_records(telemetry)
    if not validation:
        raise ValueError(f"{telemetry}: no validation record (is the run finished?)")
    v = validation[-1]
    by_t = {int(k.split("=")[1]): float(x) for k, x in v.items()
            if k.startswith("lm_loss_T=") and x is not None}
    name = path.name if path.is_dir() else path.parent.name
    tokens = float(v["tokens_seen"])
    paper = v.get("paper_flops_per_token")
    return RunResult(name, int(v["mean_recurrence"]), tokens,
                     tokens * float(v["flops_per_token"]), float(v["effective_params"]),
                     float(v["lm_loss"]), by_t, None if paper is None else tokens * float(paper))


def group_budgets(runs: list[RunResult], formula: str) -> dict[float, list[RunResult]]:
    """Runs by FLOP budget: sorted by compute, a new budget starts above 1.1 × the smallest
    compute of the current one; a budget is labelled by its geometric-mean compute."""
    groups: list[list[RunResult]] = []
    for r in sorted(runs, key=lambda r: r.compute(formula)):
        if groups and r.compute(formula) <= BUDGET_TOLERANCE * groups[-1][0].compute(formula):
            groups[-1].append(r)
        else:
            groups.append([r])
    out = {}
    for group in groups:
        mean = math.exp(np.mean([math.log(r.compute(formula)) for r in group]))
        out[float(f"{mean:.3g}")] = group
    return out


def choose_holdout(by_budget: dict[float, list[RunResult]], mode: str, fraction: float,
                   seed: int) -> tuple[set[str], dict]:
    """Names of the held-out runs and the JSON description of the choice."""
    info: dict = {"mode": mode, "applied": False}
    runs = [r for group in by_budget.values() for r in group]
    held: set[str] = set()
    if mode == "largest-budget":
        if len(by_budget) >= 3:
            largest = max(by_budget)
            held = {r.name for r in by_budget[largest]}
            info["budget"] = largest
        else:
            info["reason"] = "needs at least 3 budgets"
    elif mode == "fraction":
        if not 0 < fraction < 1:
            raise ValueError(f"--holdout-fraction must be in (0, 1), got {fraction}")
        if len(runs) >= 2:
            count = min(len(runs) - 1, max(1, round(fraction * len(runs))))
            rng = np.random.default_rng(seed)
            names = sorted(r.name for r in runs)
            held = {names[i] for i in rng.choice(len(names), size=count, replace=False)}
            info["fraction"] = fraction
        else:
            info["reason"] = "needs at least 2 runs"
    elif mode != "none":
        raise ValueError(f"unknown holdout mode {mode!r}")
    info["applied"] = bool(held)
    info["runs"] = sorted(held)
    return held, info


def frontier_point(budget: float, group: list[RunResult]) -> dict:
    """The compute-optimal point of one budget: the minimum of the parabola in log μ_rec when
    the budget has >= 3 distinct μ_rec and the loss is convex in it, else its best run."""
    mus = [r.mean_recurrence for r in group]
    point = {"budget": budget, "runs": len(group),
             "budget_code": float(np.mean([r.flops for r in group])),
             "budget_paper": (float(np.mean([r.paper_flops for r in group]))
                              if all(r.paper_flops is not None for r in group) else None)}
    if len(set(mus)) >= 3:
        parabola = fit_isoflop_parabola(mus, [r.loss for r in group])
        if parabola.c2 > 0:
            tokens_vs_mu = fit_power_law(mus, [r.tokens for r in group])
            return {**point, "method": "parabola", "mu_star": parabola.optimum,
                    "tokens_star": float(tokens_vs_mu(parabola.optimum)),
                    "loss_star": parabola.min_loss}
    best = min(group, key=lambda r: r.loss)
    return {**point, "method": "best_run", "mu_star": float(best.mean_recurrence),
            "tokens_star": best.tokens, "loss_star": best.loss}


def _frontier(by_budget, held: set[str]) -> list[dict]:
    """Frontier points from the training runs of each budget; a budget held out entirely gets
    one from its held-out runs, marked ``heldout``."""
    points = []
    for budget, group in sorted(by_budget.items()):
        train = [r for r in group if r.name not in held]
        point = frontier_point(budget, train or group)
        points.append({**point, "heldout": not train})
    return points


def _compute_laws(frontier: list[dict]) -> dict:
    """μ*(C), D*(C) and L*(C) power laws on the training frontier, with held-out errors."""
    train = [f for f in frontier if not f["heldout"]]
    held = [f for f in frontier if f["heldout"]]
    out = {}
    if len(train) < 2:
        return out
    for key, name in (("mu_star", "mu_star_law"), ("tokens_star", "tokens_star_law"),
                      ("loss_star", "loss_star_law")):
        law = fit_power_law([f["budget"] for f in train], [f[key] for f in train])
        out[name] = {"coefficient": law.coefficient, "exponent": law.exponent,
                     "train": prediction_errors(law([f["budget"] for f in train]),
                                                [f[key] for f in train]),
                     "heldout": prediction_errors(law([f["budget"] for f in held]),
                                                  [f[key] for f in held])}
    return out


def _unified_points(runs: list[RunResult]) -> np.ndarray:
    rows = [(r.effective_params, r.tokens, t, r.mean_recurrence, loss)
            for r in runs if len(r.loss_by_t) >= 3 for t, loss in sorted(r.loss_by_t.items())]
    return np.array(rows, dtype=float).reshape(-1, 5)


def _test_time(runs: list[RunResult], holdout: bool, seed: int) -> tuple[dict, dict]:
    """Per-run L∞ + Z·e^(−zT) fits; with a holdout, fitted on T <= μ_rec, checked on T > μ."""
    fits, predicted, actual = {}, [], []
    for r in runs:
        ts = sorted(r.loss_by_t)
        if len(ts) < 4:
            continue
        inside = [t for t in ts if t <= r.mean_recurrence]
        split = holdout and len(inside) >= 4 and len(inside) < len(ts)
        fit_ts = inside if split else ts
        fit = fit_test_time_law(fit_ts, [r.loss_by_t[t] for t in fit_ts], seed=seed)
        fits[r.name] = {"l_inf": fit.l_inf, "Z": fit.Z, "z": fit.z, "fit_T": fit_ts}
        if split:
            outside = [t for t in ts if t > r.mean_recurrence]
            predicted.extend(fit.predict(outside))
            actual.extend(r.loss_by_t[t] for t in outside)
    return fits, prediction_errors(predicted, actual)


def fit_runs(runs: list[RunResult], restarts: int = 100, seed: int = 0,
             plot_dir: Path | None = None, flops_formula: str = "code",
             holdout: str = "largest-budget", holdout_fraction: float = 0.2) -> dict:
    """All fits the runs support, with held-out errors; JSON-ready. Plots go to ``plot_dir``."""
    by_budget = group_budgets(runs, flops_formula)
    held, holdout_info = choose_holdout(by_budget, holdout, holdout_fraction, seed)
    train = [r for r in runs if r.name not in held]
    test = [r for r in runs if r.name in held]
    out: dict = {"runs": len(runs), "flops_formula": flops_formula, "holdout": holdout_info,
                 "run_compute": [{"name": r.name, "mean_recurrence": r.mean_recurrence,
                                  "tokens": r.tokens, "flops_code": r.flops,
                                  "flops_paper": r.paper_flops, "loss": r.loss,
                                  "heldout": r.name in held} for r in runs]}
    frontier = _frontier(by_budget, held)
    out["isoflop"] = frontier
    out.update(_compute_laws(frontier))
    if len(train) >= 6:
        law = fit_parametric_law([r.effective_params for r in train], [r.tokens for r in train],
                                 [r.loss for r in train], restarts=restarts, seed=seed)
        errs = {name: prediction_errors(law.predict([r.effective_params for r in group],
                                                    [r.tokens for r in group]),
                                        [r.loss for r in group])
                for name, group in (("train", train), ("heldout", test))}
        out["parametric_law"] = {**law.as_dict(),
                                 "mean_rel_error": errs["train"]["mean_abs_rel_error"], **errs}
    points = _unified_points(train)
    if len(points) >= 10 and len({r.mean_recurrence for r in train}) >= 2:
        law = fit_unified_test_time_law(*points.T, restarts=restarts, seed=seed)
        held_points = _unified_points(test)
        out["unified_test_time_law"] = {
            **law.as_dict(),
            "train": prediction_errors(law.predict(*points.T[:4]), points[:, 4]),
            "heldout": prediction_errors(law.predict(*held_points.T[:4]), held_points[:, 4])}
    out["test_time"], out["test_time_heldout"] = _test_time(runs, holdout != "none", seed)
    if plot_dir is not None:
        from parcae_megatron.scaling.plots import plot_all

        plot_dir.mkdir(parents=True, exist_ok=True)
        out["plots"] = plot_all(plot_dir, by_budget, runs, held, out)
    return out


def write_json(result: dict, path: Path) -> None:
    """Write the fit results."""
    path.write_text(json.dumps(result, indent=2))
