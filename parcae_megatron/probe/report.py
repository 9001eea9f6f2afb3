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


SOLVED = 0.8  # "loops needed": the first T whose accuracy reaches this


def loops_needed(acc: dict[str, dict[str, float]], ks: list[str]) -> dict[str, int | None]:
    """Per k, the smallest measured T whose accuracy reaches ``SOLVED`` (None: none does)."""
    ts = sorted(acc, key=int)
    return {k: next((int(t) for t in ts if acc[t].get(k, 0.0) >= SOLVED), None) for k in ks}


def _extrapolation_targets(parcae: dict, tf: dict | None, spec: TaskSpec) -> dict:
    """The checks on chains longer than training: the first unseen k reaches ``SOLVED`` at
    some T ≤ 3·μ_rec while T = 1 stays ≤ 0.3 (the loop, not one pass, answers it), and the
    Transformer stays below Parcae's best T on every unseen k."""
    acc, mu = parcae["accuracy"], parcae["mean_recurrence"]
    unseen = [str(k) for k in range(spec.max_k + 1, spec.test_max_k + 1)]
    within = [t for t in acc if int(t) <= 3 * mu]
    first = unseen[0]
    best_t = max(within, key=lambda t: acc[t][first])
    out = {"first_unseen_k_solved_within_3mu": {
        "k": int(first), "best": acc[best_t][first], "best_T": int(best_t),
        "T=1": acc["1"][first] if "1" in acc else None,
        "met": acc[best_t][first] >= SOLVED and "1" in acc and acc["1"][first] <= 0.3}}
    if tf:
        rows = {k: {"parcae_best": max(acc[t][k] for t in acc),
                    "transformer": tf["accuracy"]["0"][k]} for k in unseen}
        out["transformer_below_parcae_best_every_unseen_k"] = {
            **rows, "met": all(r["transformer"] < r["parcae_best"] for r in rows.values())}
    return out


def summarise(results: dict, spec: TaskSpec, options: dict, wall: float) -> dict:
    """The probe.json content, with ``targets`` (docs/probe.md's checks), the loops needed per
    k and a text table. k ≤ max_k are the trained lengths; max_k < k ≤ test_max_k were never
    in training (extrapolation)."""
    hardest = str(spec.max_k)
    trained = [str(k) for k in range(1, spec.max_k + 1)]
    ks = [str(k) for k in range(1, spec.test_max_k + 1)]
    summary = {"task": {"form": "pointer chasing: permutation table in context, answer f^k(x)",
                        "query_form": spec.query_form,
                        "n_symbols": spec.n_symbols, "max_k": spec.max_k,
                        "test_max_k": spec.test_max_k, "trained_k": [int(k) for k in trained],
                        "extrapolated_k": [int(k) for k in ks if k not in trained],
                        "queries_per_document": spec.n_queries,
                        "held_out_queries_per_document": spec.queries_per_document("test"),
                        "held_out": "test tables never occur in training (hash split)"},
               "options": options, "models": results, "wall_s": round(wall, 1)}
    lines = ["\nDepth probe (held-out chains, exact match; k = look-ups, T = loop count"
             + ("; * = longer than any training chain)" if len(ks) > len(trained) else ")")]
    heads = "  ".join(f"{'k=' + k + ('*' if k not in trained else ''):<5}" for k in ks)
    lines.append(f"  model          T  {heads}  ‖h_T‖  ‖h_T−h_T-1‖")
    for name, res in results.items():
        states = res.get("loop_state", {})
        for t, row in res["accuracy"].items():
            label = f"T={t}" if res["looped"] else "  -"
            norms = states.get(t, {})
            tail = (f"  {norms['state_norm']:6.2f}  " + (f"{norms['step_norm']:.3g}"
                                                         if norms.get("step_norm") is not None
                                                         else "-")) if norms else ""
            lines.append(f"  {name:<12} {label:>4}  " + "  ".join(f"{row.get(k, 0):.3f}"
                                                              for k in ks) + tail)
        lines.append(f"  {name:<12} params {res['parameters']:,}, trained in "
                     f"{res['train_wall_s']:.0f} s")
    parcae, tf = results.get("parcae"), results.get("transformer")
    if parcae and parcae["mean_recurrence"]:
        mu = parcae["mean_recurrence"]
        acc = parcae["accuracy"]
        ts = sorted(int(t) for t in acc)
        summary["test_time_fit"] = _fit_error_curves(ts, acc, parcae.get("queries_by_k", {}))
        needed = loops_needed(acc, ks)
        summary["loops_needed"] = {"threshold": SOLVED, "max_T": max(ts), "by_k": needed}
        lines.append(f"  loops needed (first T with ≥ {SOLVED}): " + ", ".join(
            f"k={k} " + (f"T={t}" if t is not None else f"none up to T={max(ts)}")
            for k, t in needed.items()))
        answered = parcae.get("answered_hop", {}).get(str(max(ts)), {})
        for k in (k for k in ks if k not in trained and k in answered):
            top = sorted(answered[k].items(), key=lambda item: -item[1])[:3]
            lines.append(f"  k={k}* answered at T={max(ts)} with f^j(x): " + ", ".join(
                f"j={j} {share:.2f}" for j, share in top))
        targets = {}
        if {str(1), str(mu)} <= acc.keys():
            at1, atmu = acc["1"][hardest], acc[str(mu)][hardest]
            targets["hardest_T_mu_ge_2x_T_1"] = {"T=1": at1, f"T={mu}": atmu,
                                                 "met": atmu >= 2 * at1}
            # every trained chain length, not just their mean, must reach 0.8
            row = [acc[str(mu)][k] for k in trained]
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
        if len(ks) > len(trained):
            targets.update(_extrapolation_targets(parcae, tf, spec))
        summary["targets"] = targets
        lines.append("  targets: " + ", ".join(f"{k} {'met' if v['met'] else 'NOT met'}"
                                               for k, v in targets.items()))
    lines.append(f"  total wall time {wall:.0f} s")
    summary["text"] = "\n".join(lines)
    return summary


def plot(path: Path, summary: dict) -> None:
    """Heatmap of Parcae's accuracy by k × T with the Transformer as a last column (a dashed
    line above the longest trained k, the longer ones marked "unseen"); beside it Parcae's
    error rate by T per k with the fitted test-time law where it is determined, and the loop
    state's norm ‖h_T‖ by T where it was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    task = summary["task"]
    max_k = task["max_k"]
    ks = [str(k) for k in range(1, task.get("test_max_k", max_k) + 1)]
    cols, labels = [], []
    for name, res in summary["models"].items():
        for t in sorted(res["accuracy"], key=int):
            cols.append([res["accuracy"][t].get(k, 0.0) for k in ks])
            labels.append(f"T={t}" if res["looped"] else name)
    grid = np.array(cols).T
    fits = summary.get("test_time_fit")
    states = summary["models"].get("parcae", {}).get("loop_state")
    width = 1.0 + 0.7 * len(cols)
    panels = [width] + ([4.5] if fits else []) + ([3.5] if states else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(sum(panels), 1.5 + 0.5 * max(len(ks), 4)),
                             gridspec_kw={"width_ratios": panels}, squeeze=False)
    axes = list(axes[0])
    ax = axes[0]
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                color="white" if v < 0.6 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(ks)), [k if int(k) <= max_k else f"{k} unseen" for k in ks])
    if len(ks) > max_k:  # the trained range below the line, the extrapolated k above it
        ax.axhline(max_k - 0.5, color="white", ls="--", lw=1.5)
    ax.set(ylabel="k (look-ups)", title="Held-out exact match: Parcae by T, Transformer"
           + (f" (trained k ≤ {max_k})" if len(ks) > max_k else ""))
    fig.colorbar(im, ax=ax, fraction=0.04)
    if fits:
        _plot_fits(axes[1], summary, ks)
    if states:
        _plot_states(axes[-1], states, summary["models"]["parcae"]["mean_recurrence"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_states(ax, states: dict, mu: int) -> None:
    """‖h_T‖ and ‖h_T − h_{T−1}‖ (means over held-out tokens) by T: does the state settle?"""
    ts = sorted(states, key=int)
    ax.plot([int(t) for t in ts], [states[t]["state_norm"] for t in ts], "o-", ms=3,
            label="‖h_T‖")
    steps = [(int(t), states[t]["step_norm"]) for t in ts if states[t]["step_norm"] is not None]
    if steps:
        ax.plot(*zip(*steps), "s-", ms=3, label="‖h_T − h_T−1‖")
    ax.axvline(mu, color="grey", ls=":", lw=1, label="μ_rec")
    ax.set(yscale="log", xlabel="loop count T", title="Loop state norm by T")
    ax.legend(fontsize=6)


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
