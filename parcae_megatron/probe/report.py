"""Probe report: accuracy tables, targets (docs/probe.md), the test-time fit per k, the heatmap."""

from __future__ import annotations

import math
from pathlib import Path

from parcae_megatron.probe.task import TaskSpec


def corrected_errors(by_t: dict[str, dict[str, float]], ts: list[int], k: str,
                     n: int) -> list[float]:
    """k's error rate at each T with half a wrong query of continuity correction,
    (wrong + 0.5) / (n + 1): a perfectly answered row is a small positive error, as the
    test-time law's L∞ > 0 needs, not a zero that stops the fit."""
    return [((1.0 - by_t[str(t)][k]) * n + 0.5) / (n + 1) for t in ts]


def _fit_error_curves(ts: list[int], by_t: dict[str, dict[str, float]],
                      queries: dict[str, int]) -> dict:
    """Fit the test-time law err(T) = E_inf + Z·exp(-z·T) to each k's error rate
    (``scaling.fit.fit_test_time_curve``); the noise is the binomial standard error of the
    accuracy over that k's held-out queries, so a curve within it reports "not determined".
    The error rates are ``corrected_errors``."""
    from parcae_megatron.scaling.fit import fit_test_time_curve

    out = {}
    for k in next(iter(by_t.values())):
        n = max(int(queries.get(k, 0)), 1)
        errors = corrected_errors(by_t, ts, k, n)
        noise = max(math.sqrt(max(e * (1.0 - e), 0.0) / n) for e in errors)
        out[k] = fit_test_time_curve(ts, errors, noise=noise)
    return out


def not_below_margin(a: float, b: float, n: int) -> float:
    """How far accuracy ``b`` may sit under ``a`` and still count as "not below": two standard
    errors of the difference of two accuracies over the same ``n`` held-out queries (pooled
    binomial), i.e. not significantly below. 0 when both are exact (pooled p = 0 or 1)."""
    if n <= 0:
        return 0.0
    p = (a + b) / 2
    return 2 * math.sqrt(2 * p * (1 - p) / n)


def summarise(results: dict, spec: TaskSpec, options: dict, wall: float) -> dict:
    """The probe.json content, with ``targets`` (docs/probe.md's four checks) and a text table."""
    hardest = str(spec.max_k)
    summary = {"task": {"form": "pointer chasing: permutation table in context, answer f^k(x)",
                        "n_symbols": spec.n_symbols, "max_k": spec.max_k,
                        "queries_per_document": spec.n_queries,
                        "held_out": "test tables never occur in training (hash split)"},
               "options": options, "models": results, "wall_s": round(wall, 1)}
    lines = ["\nDepth probe (held-out chains, exact match; k = look-ups, T = loop count)"]
    ks = [str(k) for k in range(1, spec.max_k + 1)]
    lines.append("  model          T  " + "  ".join(f"k={k:<4}" for k in ks))
    for name, res in results.items():
        for t, row in res["accuracy"].items():
            label = f"T={t}" if res["looped"] else "  -"
            lines.append(f"  {name:<12} {label:>4}  " + "  ".join(f"{row.get(k, 0):.3f}"
                                                              for k in ks))
        lines.append(f"  {name:<12} params {res['parameters']:,}, trained in "
                     f"{res['train_wall_s']:.0f} s")
    parcae, tf = results.get("parcae"), results.get("transformer")
    if parcae and parcae["mean_recurrence"]:
        mu = parcae["mean_recurrence"]
        acc = parcae["accuracy"]
        ts = sorted(int(t) for t in acc)
        summary["test_time_fit"] = _fit_error_curves(ts, acc, parcae.get("queries_by_k", {}))
        targets = {}
        if {str(1), str(mu)} <= acc.keys():
            at1, atmu = acc["1"][hardest], acc[str(mu)][hardest]
            targets["hardest_T_mu_ge_2x_T_1"] = {"T=1": at1, f"T={mu}": atmu,
                                                 "met": atmu >= 2 * at1}
            # every trained chain length, not just their mean, must reach 0.8
            row = [acc[str(mu)][k] for k in ks]
            targets["trained_depth_ge_0.8_at_T_mu"] = {"mean_over_k": sum(row) / len(row),
                                                      "min_over_k": min(row),
                                                      "met": min(row) >= 0.8}
            if tf:
                at_tf = tf["accuracy"]["0"][hardest]
                targets["parcae_T_mu_above_transformer_hardest"] = {
                    "parcae": atmu, "transformer": at_tf, "met": atmu > at_tf}
        if {str(mu), str(2 * mu)} <= acc.keys():
            a2, amu = acc[str(2 * mu)][hardest], acc[str(mu)][hardest]
            n = int(parcae.get("queries_by_k", {}).get(hardest, 0))
            margin = not_below_margin(amu, a2, n)
            targets["hardest_T_2mu_not_below_T_mu"] = {
                f"T={2 * mu}": a2, f"T={mu}": amu, "queries": n, "allowed_drop": margin,
                "met": a2 >= amu - margin}
        summary["targets"] = targets
        lines.append("  targets: " + ", ".join(f"{k} {'met' if v['met'] else 'NOT met'}"
                                               for k, v in targets.items()))
    lines.append(f"  total wall time {wall:.0f} s")
    summary["text"] = "\n".join(lines)
    return summary


def plot(path: Path, summary: dict) -> None:
    """Heatmap of Parcae's accuracy by k × T with the Transformer as a last column and, beside
    it, Parcae's error rate by T per k with the fitted test-time law where it is determined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ks = [str(k) for k in range(1, summary["task"]["max_k"] + 1)]
    cols, labels = [], []
    for name, res in summary["models"].items():
        for t in sorted(res["accuracy"], key=int):
            cols.append([res["accuracy"][t].get(k, 0.0) for k in ks])
            labels.append(f"T={t}" if res["looped"] else name)
    grid = np.array(cols).T
    fits = summary.get("test_time_fit")
    width = 1.0 + 0.7 * len(cols)
    fig, axes = plt.subplots(1, 2 if fits else 1, figsize=(width + (4.5 if fits else 0),
                                                          1.5 + 0.5 * max(len(ks), 4)),
                             gridspec_kw={"width_ratios": [width, 4.5]} if fits else None)
    ax = axes[0] if fits else axes
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                color="white" if v < 0.6 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(ks)), ks)
    ax.set(ylabel="k (look-ups)", title="Held-out exact match: Parcae by T, Transformer")
    fig.colorbar(im, ax=ax, fraction=0.04)
    if fits:
        _plot_fits(axes[1], summary, ks)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_fits(ax, summary: dict, ks: list[str]) -> None:
    """Parcae's (continuity-corrected) error rate by T per k, with each k's fitted law."""
    from parcae_megatron.scaling.plots import draw_test_time_fit

    parcae = summary["models"]["parcae"]
    ts = sorted(int(t) for t in parcae["accuracy"])
    for k in ks:
        n = max(int(parcae.get("queries_by_k", {}).get(k, 0)), 1)
        err = corrected_errors(parcae["accuracy"], ts, k, n)
        line, = ax.plot(ts, err, "o", ms=4, label=f"k = {k}")
        draw_test_time_fit(ax, summary["test_time_fit"].get(k), ts[0], ts[-1],
                           color=line.get_color(), name=f"k = {k}")
    ax.set(yscale="log", xlabel="loop count T", ylabel="error rate",
           title="Parcae error by T, fitted law")
    ax.legend(fontsize=6)
