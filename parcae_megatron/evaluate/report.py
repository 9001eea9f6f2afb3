"""The test-time law fit (spec §5.3), the JSON report and the loss-vs-T plot."""

from __future__ import annotations

import json
import os

import numpy as np

from parcae_megatron.scaling.fit import fit_test_time_law


def fit_loop_curve(loop_counts: list[int], losses: list[float],
                   mean_recurrence: int | None = None, seed: int = 0) -> dict | None:
    """Fit L(T) = L∞ + Z·exp(−z·T) (least squares on log-loss); ``None`` with fewer than three
    distinct T. Adds the fit's RMS error and, when μ_rec was evaluated, how far L∞ is from the
    measured L(μ_rec) (the paper reports them within 0.6%)."""
    t = np.asarray(loop_counts, float)
    loss = np.asarray(losses, float)
    if len(np.unique(t)) < 3:
        return None
    fit = fit_test_time_law(t, loss, seed=seed)
    predicted = fit.predict(t)
    out = {"form": "L(T) = L_inf + Z * exp(-z * T)", "L_inf": fit.l_inf, "Z": fit.Z,
           "z": fit.z, "rmse": float(np.sqrt(np.mean((predicted - loss) ** 2))),
           "predicted": {int(k): float(v) for k, v in zip(t, predicted)}}
    if mean_recurrence is not None and mean_recurrence in loop_counts:
        at_mu = float(loss[list(loop_counts).index(mean_recurrence)])
        out["L_inf_rel_error_vs_T_mu_rec"] = abs(fit.l_inf - at_mu) / at_mu
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
    fit = report.get("fit")
    if fit:
        dense = np.linspace(t.min(), t.max(), 200)
        ax.plot(dense, fit["L_inf"] + fit["Z"] * np.exp(-fit["z"] * dense), color="C1",
                label=f"fit: {fit['L_inf']:.3f} + {fit['Z']:.3f}·exp(−{fit['z']:.3f}·T)")
        ax.axhline(fit["L_inf"], color="C1", ls=":", lw=1)
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
    fit = report.get("fit")
    if fit:
        lines.append(f"fit: L(T) = {fit['L_inf']:.4f} + {fit['Z']:.4f}·exp(−{fit['z']:.4f}·T)"
                     f"  (rmse {fit['rmse']:.2e})")
    return "\n".join(lines)
