"""The test-time law fit (docs/design.md §10.3), the JSON report and the loss-vs-T plot."""

from __future__ import annotations

import json
import os

import numpy as np

from parcae_megatron.scaling.fit import fit_test_time_curve
from parcae_megatron.scaling.plots import draw_test_time_fit, test_time_fit_label


def fit_loop_curve(loop_counts: list[int], losses: list[float],
                   mean_recurrence: int | None = None, seed: int = 0,
                   noise: float = 0.0) -> dict:
    """Fit L(T) = L∞ + Z·exp(−z·T) (least squares on log-loss) through
    ``scaling.fit.fit_test_time_curve``: ``determined`` is False, with a ``reason``, for sweeps
    that cannot fix the constants (fewer than three distinct T, flat within the tolerance or
    3 × ``noise``, decay unresolved). When determined and μ_rec was evaluated, adds how far L∞ is
    from the measured L(μ_rec) (the paper reports them within 0.6%)."""
    out = fit_test_time_curve(loop_counts, losses, noise=noise, seed=seed)
    if out["determined"] and mean_recurrence is not None and mean_recurrence in loop_counts:
        at_mu = float(losses[list(loop_counts).index(mean_recurrence)])
        out["L_inf_rel_error_vs_T_mu_rec"] = abs(out["L_inf"] - at_mu) / at_mu
    return out


def write_json(report: dict, path: str) -> None:
    """Write ``report`` atomically (``path.tmp`` then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def save_figure(fig, path: str) -> None:
    """Lay out ``fig``, write it to ``path`` (creating its folder) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def write_outputs(report: dict, out: str | None, plot_path: str | None, plot_fn) -> None:
    """The report as JSON at ``out`` and ``plot_fn(report, plot_path)``, each when asked for."""
    if out:
        write_json(report, out)
        print(f"wrote {out}")
    if plot_path:
        plot_fn(report, plot_path)
        print(f"wrote {plot_path}")


def plot(report: dict, path: str) -> None:
    """Loss vs T (mean ± std over seeds), the fitted curve and μ_rec."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    t = np.array([r["T"] for r in rows], float)
    loss = np.array([r["loss"] for r in rows])
    std = np.array([r["loss_std"] or 0.0 for r in rows])
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    ax.errorbar(t, loss, yerr=std, fmt="o", capsize=3, color="C0",
                label=f"measured (mean ± std over {len(rows[0]['seeds'])} seed(s))")
    draw_test_time_fit(ax, report.get("fit"), t.min(), t.max())
    mu = report.get("mean_recurrence")
    if mu:
        ax.axvline(mu, color="grey", ls="--", lw=1, label=f"μ_rec = {mu}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(t)
    ax.set_xticklabels([str(int(x)) for x in t])
    ax.set_xlabel("loop count T")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"{report.get('model', 'model')}: loss vs loop count", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def format_table(report: dict) -> str:
    """A plain-text table of the results and the fit."""
    lines = [f"{'T':>4}  {'loss':>8}  {'± std':>7}  {'ppl':>9}  {'bpb':>7}  {'tokens':>9}"]
    for r in report["results"]:
        bpb = f"{r['bpb']:.4f}" if r["bpb"] is not None else "n/a"
        lines.append(f"{r['T']:>4}  {r['loss']:>8.4f}  {r['loss_std']:>7.4f}  "
                     f"{r['perplexity']:>9.3f}  {bpb:>7}  {r['tokens']:>9,}")
    if report.get("fit"):
        lines.append(test_time_fit_label(report["fit"]))
    return "\n".join(lines)
