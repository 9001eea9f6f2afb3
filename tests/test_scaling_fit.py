"""Scaling-law fits recover known constants from synthetic data (docs/design.md §10)."""

from __future__ import annotations

import numpy as np
import pytest

from parcae_megatron.scaling.fit import (
    fit_isoflop_parabola,
    fit_parametric_law,
    fit_power_law,
    fit_test_time_curve,
    fit_test_time_law,
    fit_unified_test_time_law,
    prediction_errors,
)

# Paper's 140M parametric law (docs/design.md §10.2)
E, A, ALPHA, B, BETA = 2.662, 522733.307, 0.771, 25420.102, 0.525


def _synthetic(noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = np.geomspace(1.5e8, 3e9, 8)  # effective (unrolled) parameters
    d = np.geomspace(1e9, 5e10, 7)
    nn, dd = (g.ravel() for g in np.meshgrid(n, d))
    loss = E + A * nn ** -ALPHA + B * dd ** -BETA
    return nn, dd, loss * np.exp(rng.normal(0.0, noise, loss.shape))


def test_parametric_law_recovers_paper_constants():
    n, d, loss = _synthetic(noise=0.002)
    fit = fit_parametric_law(n, d, loss, restarts=60, seed=0)
    assert fit.E == pytest.approx(E, rel=0.02)
    assert fit.a == pytest.approx(ALPHA, rel=0.1)
    assert fit.b == pytest.approx(BETA, rel=0.1)
    held_out = E + A * 1e9 ** -ALPHA + B * 2e10 ** -BETA
    assert float(fit.predict(1e9, 2e10)) == pytest.approx(held_out, rel=0.005)
    again = fit_parametric_law(n, d, loss, restarts=60, seed=0)
    assert again == fit  # deterministic given the seed


def test_parametric_law_exact_without_noise():
    n, d, loss = _synthetic(noise=0.0)
    fit = fit_parametric_law(n, d, loss, restarts=60, seed=1)
    assert fit.E == pytest.approx(E, rel=1e-3)
    assert fit.a == pytest.approx(ALPHA, rel=1e-2) and fit.b == pytest.approx(BETA, rel=1e-2)


def test_isoflop_parabola_and_power_laws():
    mus = np.array([2, 4, 6, 8, 10, 12])
    budgets = np.array([1e18, 2e18, 4e18, 8e18, 16e18])
    optimum = 0.5 * (budgets / 1e18) ** 0.40  # γ_μ = 0.40 (docs/design.md §10.1), grid-scaled
    found = []
    for c, mu_star in zip(budgets, optimum * 8):
        loss = 3.0 + 0.05 * (np.log(mus) - np.log(mu_star)) ** 2 + 0.01 * np.log10(c)
        fit = fit_isoflop_parabola(mus, loss)
        assert fit.optimum == pytest.approx(mu_star, rel=1e-6)
        found.append(fit.optimum)
    law = fit_power_law(budgets, found)
    assert law.exponent == pytest.approx(0.40, abs=1e-6)
    with pytest.raises(ValueError, match="three distinct"):
        fit_isoflop_parabola([2, 2, 4], [3.0, 3.0, 2.9])


def test_test_time_law_recovers_constants():
    t = np.arange(1, 25)
    rng = np.random.default_rng(3)
    loss = (2.95 + 0.6 * np.exp(-0.45 * t)) * np.exp(rng.normal(0, 1e-4, t.shape))
    fit = fit_test_time_law(t, loss, seed=0)
    assert fit.l_inf == pytest.approx(2.95, rel=1e-3)
    assert fit.Z == pytest.approx(0.6, rel=0.02) and fit.z == pytest.approx(0.45, rel=0.02)
    assert fit_test_time_law(t, loss, seed=0) == fit
    with pytest.raises(ValueError, match="three distinct"):
        fit_test_time_law([1, 2, 2], [3.0, 2.9, 2.9])


@pytest.mark.parametrize("l_inf,z_amp,z,ts", [
    (2.95, 0.6, 0.45, [1, 2, 3, 4, 6, 8, 12, 16]),  # a paper-like curve (docs/design.md §10.3)
    (4.2, 1.5, 1.2, [1, 2, 3, 4, 5, 6, 7, 8]),  # fast decay, still seen at T = 2
    (3.3, 0.3, 0.2, [1, 2, 4, 8, 16, 24]),  # slow decay, mostly inside the sweep
])
def test_test_time_report_recovers_known_constants(l_inf, z_amp, z, ts):
    rng = np.random.default_rng(0)
    t = np.asarray(ts, float)
    loss = (l_inf + z_amp * np.exp(-z * t)) * np.exp(rng.normal(0, 2e-5, t.shape))
    out = fit_test_time_curve(t, loss, noise=1e-4)
    assert out["determined"] and out["reason"] is None
    assert out["L_inf"] == pytest.approx(l_inf, rel=2e-3)
    assert out["Z"] == pytest.approx(z_amp, rel=0.05) and out["z"] == pytest.approx(z, rel=0.05)
    assert out["rmse"] < 1e-3 and sorted(out["predicted"]) == ts


@pytest.mark.parametrize("ts,loss,reason", [
    ([1, 2], [3.0, 2.9], "at least three distinct"),
    ([1, 2, 2, 1], [3.0, 2.9, 2.9, 3.0], "at least three distinct"),
    ([1, 2, 4], [3.0, float("nan"), 2.8], "not finite"),
    ([1, 2, 4, 8], [3.0, 3.0, 3.0, 3.0], "flat"),
    # the quickstart's curve at 300 steps: 0.004 nats over T = 1..8
    ([1, 2, 3, 4, 5, 6, 7, 8], [4.6157, 4.6113, 4.6120, 4.6130, 4.6140, 4.6130, 4.6135,
                                4.6139], "flat"),
    # docs/evaluation.md's old example: fitted as 4.62 + 620·exp(−11.6·T)
    ([1, 2, 4, 8], [4.6272, 4.6201, 4.6219, 4.6227], "decay unresolved"),
    ([1, 2, 4, 8], [5.0, 4.5, 4.5, 4.5], "decay unresolved"),  # one step, then flat
    ([1, 2, 4, 8], [3.0, 3.1, 3.2, 3.3], "no decay"),  # rising with T
    ([1, 2, 3, 4], [5.0, 4.9, 4.8, 4.7], "extrapolation"),  # straight line: no floor in sight
])
def test_test_time_report_refuses_degenerate_sweeps(ts, loss, reason):
    out = fit_test_time_curve(ts, loss)
    assert not out["determined"] and reason in out["reason"]
    assert out["L_inf"] is None and out["Z"] is None and out["z"] is None


def test_test_time_report_noise_sets_the_tolerance():
    t = [1, 2, 4, 8]
    loss = [3.0 + 0.02 * np.exp(-0.5 * x) for x in t]  # a 0.016-nat decay
    assert fit_test_time_curve(t, loss, noise=1e-4)["determined"]
    out = fit_test_time_curve(t, loss, noise=0.01)  # 3 × noise = 0.03 > the whole drop
    assert not out["determined"] and "flat" in out["reason"] and out["tolerance"] == 0.03


def _unified_synthetic(gamma: float, noise: float, seed: int = 0):
    """The paper's 140M training law (docs/design.md §10.2) as the floor of the unified
    test-time law (docs/design.md §10.4) with Z = 0.5, z = 3, on an iso-FLOP grid evaluated at
    the paper's T values."""
    rng = np.random.default_rng(seed)
    rows = []
    for budget in (1e18, 2e18, 4e18, 8e18, 16e18):
        for mu in (2, 4, 6, 8, 10, 12):
            n = 1.0e8 + (mu - 1) * 1.4e7  # N(μ_rec): a 140M-like model unrolled
            d = budget / (6 * n + 2e8)  # tokens at this budget
            rows += [(n, d, t, mu) for t in (1, 2, 4, 6, 8, 10, 12, 16, 20, 24)]
    n, d, t, mu = np.array(rows, dtype=float).T
    loss = E + A * n ** -ALPHA + B * d ** -BETA + 0.5 * np.exp(-3.0 * t / mu ** gamma)
    return n, d, t, mu, loss * np.exp(rng.normal(0.0, noise, loss.shape))


def test_unified_test_time_law_recovers_constants():
    n, d, t, mu, loss = _unified_synthetic(gamma=1.0, noise=5e-4)
    fit = fit_unified_test_time_law(n, d, t, mu, loss, restarts=20, seed=0)
    assert fit.gamma == 1.0 and fit.E == pytest.approx(E, rel=0.01)
    assert fit.x == pytest.approx(ALPHA, rel=0.05) and fit.y == pytest.approx(BETA, rel=0.05)
    assert fit.Z == pytest.approx(0.5, rel=0.02) and fit.z == pytest.approx(3.0, rel=0.02)
    # a model off the grid (μ = 5, 3e9 tokens) at T = 3: the law, not the noise
    truth = E + A * 1.56e8 ** -ALPHA + B * 3e9 ** -BETA + 0.5 * np.exp(-3.0 * 3 / 5)
    assert float(fit.predict(1.56e8, 3e9, 3, 5)) == pytest.approx(truth, rel=2e-3)
    assert float(fit.floor(1.56e8, 3e9)) == pytest.approx(truth - 0.5 * np.exp(-1.8), rel=2e-3)
    assert fit_unified_test_time_law(n, d, t, mu, loss, restarts=20, seed=0) == fit


def test_unified_test_time_law_learns_gamma():
    # γ = 1.19: the paper's learned exponent for 140M (docs/design.md §10.4)
    n, d, t, mu, loss = _unified_synthetic(gamma=1.19, noise=2e-4, seed=1)
    fit = fit_unified_test_time_law(n, d, t, mu, loss, restarts=15, seed=0, learn_gamma=True)
    assert fit.gamma == pytest.approx(1.19, abs=0.03)
    assert fit.z == pytest.approx(3.0, rel=0.1) and fit.Z == pytest.approx(0.5, rel=0.03)


def test_prediction_errors_by_hand():
    # residuals 0.1 and −0.2 on 2.0 and 4.0: RMSE = sqrt((0.01 + 0.04) / 2) = 0.158114,
    # mean |relative error| = (0.05 + 0.05) / 2 = 0.05
    errs = prediction_errors([2.1, 3.8], [2.0, 4.0])
    assert errs["points"] == 2
    assert errs["rmse"] == pytest.approx(0.158114, rel=1e-5)
    assert errs["mean_abs_rel_error"] == pytest.approx(0.05)
    assert prediction_errors([], []) == {"points": 0, "rmse": None, "mean_abs_rel_error": None}
