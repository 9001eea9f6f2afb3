"""Scaling-law fits for looped models (spec §5.2-5.3).

* ``fit_isoflop_parabola``: loss vs log μ_rec at one FLOP budget → the optimal μ*_rec.
* ``fit_power_law``: y = k · C^γ in log-log space (μ*(C), D*(C)).
* ``fit_parametric_law``: L = E + A·N^(−a) + B·D^(−b), Huber (δ = 1e-3) on log-loss, L-BFGS
  from many seeded restarts (the Chinchilla procedure the paper follows).
* ``fit_test_time_law``: L(T) = L∞ + Z·exp(−z·T), least squares on log-loss.

All fits are deterministic given their seed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp


@dataclass
class ParabolaFit:
    """loss ≈ c2·x² + c1·x + c0 with x = ln μ_rec."""

    c2: float
    c1: float
    c0: float

    @property
    def optimum(self) -> float:
        """μ*_rec = exp(−c1 / 2c2) (requires a convex fit)."""
        if self.c2 <= 0:
            raise ValueError("the loss is not convex in log μ_rec at this budget")
        return float(np.exp(-self.c1 / (2 * self.c2)))

    @property
    def min_loss(self) -> float:
        """The fitted loss at μ*_rec."""
        x = np.log(self.optimum)
        return float(self.c2 * x * x + self.c1 * x + self.c0)


def fit_isoflop_parabola(mean_recurrence, loss) -> ParabolaFit:
    """Fit one iso-FLOP curve; at least three distinct μ_rec values."""
    x = np.log(np.asarray(mean_recurrence, dtype=float))
    if len(np.unique(x)) < 3:
        raise ValueError("a parabola needs at least three distinct mean_recurrence values")
    c2, c1, c0 = np.polyfit(x, np.asarray(loss, dtype=float), 2)
    return ParabolaFit(float(c2), float(c1), float(c0))


@dataclass
class PowerLawFit:
    """y = coefficient · x^exponent."""

    coefficient: float
    exponent: float

    def __call__(self, x):
        return self.coefficient * np.asarray(x, dtype=float) ** self.exponent


def fit_power_law(x, y) -> PowerLawFit:
    """Least squares in log-log space."""
    slope, intercept = np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)
    return PowerLawFit(float(np.exp(intercept)), float(slope))


def _huber(residual: np.ndarray, delta: float) -> np.ndarray:
    small = np.abs(residual) <= delta
    return np.where(small, 0.5 * residual**2, delta * (np.abs(residual) - 0.5 * delta))


@dataclass
class ParametricFit:
    """L = E + A·N^(−a) + B·D^(−b) and its training objective."""

    E: float
    A: float
    a: float
    B: float
    b: float
    huber: float

    def predict(self, n, d):
        """Predicted loss for parameters ``n`` and tokens ``d``."""
        n, d = np.asarray(n, float), np.asarray(d, float)
        return self.E + self.A * n ** (-self.a) + self.B * d ** (-self.b)

    def as_dict(self) -> dict:
        """JSON-ready constants."""
        return asdict(self)


def fit_parametric_law(n, d, loss, restarts: int = 200, seed: int = 0,
                       delta: float = 1e-3) -> ParametricFit:
    """Chinchilla-style fit (spec §5.2): minimise Σ Huber_δ(LSE(e, α − a ln N, β − b ln D) −
    ln L) over θ = (e, α, a, β, b) with L-BFGS from ``restarts`` seeded starting points;
    E = e^e, A = e^α, B = e^β. Returns the best restart."""
    log_n, log_d = np.log(np.asarray(n, float)), np.log(np.asarray(d, float))
    log_l = np.log(np.asarray(loss, float))

    def objective(theta: np.ndarray) -> float:
        e, alpha, a, beta, b = theta
        pred = logsumexp(np.stack([np.full_like(log_n, e), alpha - a * log_n,
                                   beta - b * log_d]), axis=0)
        return float(np.mean(_huber(pred - log_l, delta)))

    rng = np.random.default_rng(seed)
    lows = np.array([-1.0, 0.0, 0.0, 0.0, 0.0])
    highs = np.array([1.5, 25.0, 2.0, 25.0, 2.0])
    best = None
    for _ in range(restarts):
        start = rng.uniform(lows, highs)
        res = minimize(objective, start, method="L-BFGS-B",
                       options={"maxiter": 10_000, "ftol": 1e-15, "gtol": 1e-12})
        if best is None or res.fun < best.fun:
            best = res
    e, alpha, a, beta, b = best.x
    return ParametricFit(float(np.exp(e)), float(np.exp(alpha)), float(a), float(np.exp(beta)),
                         float(b), float(best.fun))


@dataclass
class TestTimeFit:
    """L(T) = L∞ + Z·exp(−z·T)."""

    l_inf: float
    Z: float
    z: float

    def predict(self, t):
        """Predicted loss at loop count(s) ``t``."""
        return self.l_inf + self.Z * np.exp(-self.z * np.asarray(t, float))


def fit_test_time_law(loop_counts, loss, restarts: int = 20, seed: int = 0) -> TestTimeFit:
    """Least squares on log-loss (spec §5.3), from seeded starting points."""
    t, log_l = np.asarray(loop_counts, float), np.log(np.asarray(loss, float))
    floor = float(np.min(loss))

    def objective(theta: np.ndarray) -> float:
        l_inf, log_z_amp, log_rate = theta
        pred = l_inf + np.exp(log_z_amp) * np.exp(-np.exp(log_rate) * t)
        if np.any(pred <= 0):
            return 1e6
        return float(np.mean((np.log(pred) - log_l) ** 2))

    rng = np.random.default_rng(seed)
    best = None
    for _ in range(restarts):
        start = [floor * rng.uniform(0.8, 1.0), np.log(rng.uniform(0.05, 5.0)),
                 np.log(rng.uniform(0.05, 2.0))]
        res = minimize(objective, start, method="L-BFGS-B",
                       options={"maxiter": 5_000, "ftol": 1e-15, "gtol": 1e-12})
        if best is None or res.fun < best.fun:
            best = res
    l_inf, log_z_amp, log_rate = best.x
    return TestTimeFit(float(l_inf), float(np.exp(log_z_amp)), float(np.exp(log_rate)))
