"""PNG plots of the scaling-law fits: iso-FLOP curves, the loss–compute frontier and the
test-time curves (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_all(plot_dir: Path, by_budget: dict, runs: list, held: set[str], fits: dict) -> list[str]:
    """Write ``isoflop.png``, ``frontier.png`` and (with test-time data) ``test_time.png``;
    return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    paths = [_isoflop(plot_dir / "isoflop.png", by_budget, held, fits["isoflop"]),
             _frontier(plot_dir / "frontier.png", runs, held, fits)]
    if fits.get("test_time"):
        paths.append(_test_time(plot_dir / "test_time.png", runs, fits))
    return [str(p) for p in paths]


def test_time_fit_label(fit: dict) -> str:
    """One line for a ``fit_test_time_curve`` fit: its constants, or why it is not
    determined."""
    if fit.get("determined"):
        return (f"fit: L(T) = {fit['L_inf']:.4f} + {fit['Z']:.4f}·exp(−{fit['z']:.4f}·T)"
                f"  (rmse {fit['rmse']:.2e})")
    return f"fit not determined: {fit.get('reason')}"


def draw_test_time_fit(ax, fit: dict | None, t_min: float, t_max: float, color: str = "C1",
                       name: str = "") -> None:
    """Draw a determined ``fit_test_time_curve`` fit (curve and L∞ line) on ``ax`` between
    ``t_min`` and ``t_max``, or a legend entry saying why it is not determined (call
    ``ax.legend()`` afterwards). ``name`` prefixes the legend entry (one curve of several)."""
    if not fit:
        return
    prefix = f"{name} " if name else ""
    if fit.get("determined"):
        dense = np.linspace(t_min, t_max, 200)
        ax.plot(dense, fit["L_inf"] + fit["Z"] * np.exp(-fit["z"] * dense), color=color,
                label=f"{prefix}fit: {fit['L_inf']:.4g} + {fit['Z']:.4g}·exp(−{fit['z']:.4g}·T)")
        ax.axhline(fit["L_inf"], color=color, ls=":", lw=1)
    else:  # a legend entry, so that matplotlib places it clear of the points
        import textwrap

        ax.plot([], [], " ", label=textwrap.fill(prefix + test_time_fit_label(fit), 50))


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _isoflop(path: Path, by_budget: dict, held: set[str], frontier: list[dict]) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for budget, group in sorted(by_budget.items()):
        group = sorted(group, key=lambda r: r.mean_recurrence)
        out = " (held out)" if all(r.name in held for r in group) else ""
        ax.plot([r.mean_recurrence for r in group], [r.loss for r in group], "o-",
                label=f"C = {budget:.3g} FLOPs{out}")
    for f in frontier:
        ax.plot(f["mu_star"], f["loss_star"], "*", color="red" if f["heldout"] else "k", ms=10)
    ax.set(xscale="log", xlabel="μ_rec", ylabel="validation loss", title="Iso-FLOP curves")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _frontier(path: Path, runs: list, held: set[str], fits: dict) -> Path:
    import matplotlib.pyplot as plt

    formula = fits["flops_formula"]
    fig, ax = plt.subplots(figsize=(6, 4))
    mus = sorted({r.mean_recurrence for r in runs})
    cmap = plt.get_cmap("viridis")
    for i, mu in enumerate(mus):
        color = cmap(i / max(1, len(mus) - 1))
        for heldout in (False, True):
            group = [r for r in runs if r.mean_recurrence == mu and (r.name in held) == heldout]
            if group:
                ax.scatter([r.compute(formula) for r in group], [r.loss for r in group], s=25,
                           facecolors="none" if heldout else color, edgecolors=color,
                           label=f"μ_rec = {mu}" if not heldout else None, zorder=3)
    frontier = fits["isoflop"]
    for heldout, marker, label in ((False, "k*", "frontier (fit)"),
                                   (True, "r*", "frontier (held out)")):
        pts = [f for f in frontier if f["heldout"] == heldout]
        if pts:
            ax.plot([f["budget"] for f in pts], [f["loss_star"] for f in pts], marker, ms=13,
                    alpha=0.6, label=label, zorder=2)
    law = fits.get("loss_star_law")
    if law:
        budgets = [f["budget"] for f in frontier]
        grid = np.geomspace(min(budgets) / 1.3, max(budgets) * 1.3, 100)
        ax.plot(grid, law["coefficient"] * grid ** law["exponent"], "k--", lw=1,
                label=f"L*(C) = {law['coefficient']:.3g}·C^{law['exponent']:.3f}")
    ax.set(xscale="log", xlabel=f"training FLOPs C ({formula} formula)",
           ylabel="validation loss", title="Loss–compute frontier (hollow: held out)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _test_time(path: Path, runs: list, fits: dict) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    unified = fits.get("unified_test_time_law")
    for r in runs:
        fit = fits["test_time"].get(r.name)
        if fit is None:
            continue
        t = sorted(r.loss_by_t)
        grid = np.linspace(min(t), max(t), 100)
        line = ax.plot(t, [r.loss_by_t[k] for k in t], "o", ms=3)[0]
        ax.plot(grid, fit["l_inf"] + fit["Z"] * np.exp(-fit["z"] * grid), "-",
                color=line.get_color(), label=r.name)
        if unified:
            pred = (unified["E"] + unified["X"] * r.effective_params ** -unified["x"]
                    + unified["Y"] * r.tokens ** -unified["y"]
                    + unified["Z"] * np.exp(-unified["z"] * grid
                                            / r.mean_recurrence ** unified["gamma"]))
            ax.plot(grid, pred, ":", color=line.get_color())
    title = "Test-time scaling" + (" (dotted: unified law)" if unified else "")
    ax.set(xlabel="loop count T", ylabel="validation loss", title=title)
    ax.legend(fontsize=6, loc="upper right", ncol=2 if len(fits["test_time"]) > 8 else 1)
    return _save(fig, path)
