"""Scaling-law fits for looped models (docs/design.md §10).

* ``fit_isoflop_parabola``: loss vs log μ_rec at one FLOP budget → the optimal μ*_rec.
* ``fit_power_law``: y = k · C^γ in log-log space (μ*(C), D*(C)).
* ``fit_parametric_law``: L = E + A·N^(−a) + B·D^(−b), Huber (δ = 1e-3) on log-loss, L-BFGS
  from many seeded restarts (the Chinchilla procedure the paper follows).
* ``fit_test_time_law``: L(T) = L∞ + Z·exp(−z·T), least squares on log-loss;
  ``fit_test_time_curve``: the same fit as a JSON-ready dict that says "not determined" (and
  why) for sweeps that cannot fix the three constants (too few T, flat, decay unresolved).
* ``fit_unified_test_time_law``: L(T | μ_rec, D) = E + X·N(μ_rec)^(−x) + Y·D^(−y)
  + Z·exp(−z·T/μ_rec), Huber on log-loss, L-BFGS from seeded restarts (docs/design.md §10.4).
* ``prediction_errors``: RMSE and mean absolute relative error of predictions (held-out checks).

All fits are deterministic given their seed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp
from threadpoolctl import threadpool_limits


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
    """Chinchilla-style fit (docs/design.md §10.2): minimise
    Σ Huber_δ(LSE(e, α − a ln N, β − b ln D) − ln L) over θ = (e, α, a, β, b) with L-BFGS-B
    from ``restarts`` seeded starting points, within the bounds of ``UNIFIED_BOUNDS``
    (exponents in [0, 3]: a loss that *grows* with parameters or data is not a scaling law);
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
    # Tiny problems: BLAS threads only contend (10x slower on a busy machine).
    with threadpool_limits(1):
        for _ in range(restarts):
            start = rng.uniform(lows, highs)
            res = minimize(objective, start, method="L-BFGS-B", bounds=UNIFIED_BOUNDS[:5],
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
    """Least squares on log-loss (docs/design.md §10.3), from seeded starting points; at least three
    distinct loop counts. Fits whatever it is given: ``fit_test_time_curve`` says whether
    the result means anything."""
    t, log_l = np.asarray(loop_counts, float), np.log(np.asarray(loss, float))
    if len(np.unique(t)) < 3:
        raise ValueError("the test-time law needs at least three distinct loop counts")
    floor = float(np.min(loss))

    def objective(theta: np.ndarray) -> float:
        l_inf, log_z_amp, log_rate = theta
        with np.errstate(over="ignore", invalid="ignore"):  # far steps of the line search
            pred = l_inf + np.exp(log_z_amp) * np.exp(-np.exp(log_rate) * t)
        if not np.all(np.isfinite(pred)) or np.any(pred <= 0):
            return 1e6
        return float(np.mean((np.log(pred) - log_l) ** 2))

    # 0 ≤ L∞ ≤ the largest loss, Z ≤ e^10, e^-8 ≤ z ≤ e^6: far outside anything physical,
    # they stop a sweep the law does not describe (a straight line) from sending L∞ to −∞
    # through thousands of iterations.
    bounds = [(0.0, float(np.max(loss))), (-30.0, 10.0), (-8.0, 6.0)]
    rng = np.random.default_rng(seed)
    best = None
    # Tiny problems: BLAS threads only contend (10x slower on a busy machine).
    with threadpool_limits(1):
        for _ in range(restarts):
            start = [floor * rng.uniform(0.8, 1.0), np.log(rng.uniform(0.05, 5.0)),
                     np.log(rng.uniform(0.05, 2.0))]
            res = minimize(objective, start, method="L-BFGS-B", bounds=bounds,
                           options={"maxiter": 5_000, "ftol": 1e-15, "gtol": 1e-12})
            if best is None or res.fun < best.fun:
                best = res
    l_inf, log_z_amp, log_rate = best.x
    return TestTimeFit(float(l_inf), float(np.exp(log_z_amp)), float(np.exp(log_rate)))


TEST_TIME_FORM = "L(T) = L_inf + Z * exp(-z * T)"


def fit_test_time_curve(loop_counts, loss, noise: float = 0.0, rel_tolerance: float = 1e-3,
                         seed: int = 0) -> dict:
    """Fit L(T) = L∞ + Z·exp(−z·T) to one sweep and judge whether the sweep determines it.

    Returns ``{"form", "determined", "reason", "L_inf", "Z", "z", "rmse", "tolerance",
    "predicted"}`` (JSON-ready). A loss difference counts only above ``tolerance`` =
    max(``rel_tolerance`` × median loss, 3 × ``noise``) (``noise``: e.g. the std over
    initial-state seeds). The constants are ``None`` and ``reason`` says why when:

    * fewer than three distinct T, or a loss that is not finite and positive;
    * the sweep is flat: max − min of the losses within the tolerance;
    * the fitted law does not fall by more than the tolerance (or 3 × its own RMS error)
      between the smallest and the largest T;
    * the decay is over before the second-smallest T (only one point carries it, so Z and z
      trade off freely; e.g. Z = 620, z = 11.6 through a noise wiggle);
    * less than half of the decay lies inside the sweep (z·(T_max − T_min) < ln 2): L∞ would
      be an extrapolation.
    """
    t = np.asarray(loop_counts, float).ravel()
    y = np.asarray(loss, float).ravel()
    out = {"form": TEST_TIME_FORM, "determined": False, "reason": None, "L_inf": None,
           "Z": None, "z": None, "rmse": None, "tolerance": None, "predicted": None}
    distinct = np.unique(t)
    if t.size != y.size:
        raise ValueError("loop_counts and loss must have the same length")
    if distinct.size < 3:
        out["reason"] = f"needs at least three distinct loop counts, got {distinct.size}"
        return out
    if not np.all(np.isfinite(y)) or np.any(y <= 0):
        out["reason"] = "a loss is not finite and positive"
        return out
    tol = float(max(rel_tolerance * np.median(y), 3.0 * noise))
    out["tolerance"] = tol
    spread = float(y.max() - y.min())
    if spread <= tol:
        out["reason"] = (f"flat: the loss varies by {spread:.4f} nats across T = "
                         f"{_span(distinct)}, within the tolerance {tol:.4f}")
        return out
    fit = fit_test_time_law(t, y, seed=seed)
    predicted = fit.predict(t)
    rmse = float(np.sqrt(np.mean((predicted - y) ** 2)))
    out["rmse"] = rmse
    first, second, last = distinct[0], distinct[1], distinct[-1]
    drop = float(fit.predict(first) - fit.predict(last))
    if drop <= max(tol, 3.0 * rmse):
        out["reason"] = (f"no decay: the fitted loss falls by {drop:.4f} nats from T = "
                         f"{first:g} to {last:g} (tolerance {tol:.4f}, fit rmse {rmse:.4f})")
    elif fit.Z * np.exp(-fit.z * second) <= tol:
        out["reason"] = (f"decay unresolved: the fitted decay is over before T = {second:g} "
                         f"(z = {fit.z:.3g}), so Z and z are not separately determined")
    elif fit.z * (last - first) < np.log(2.0):
        out["reason"] = (f"L_inf would be an extrapolation: less than half of the fitted decay "
                         f"(z = {fit.z:.3g}) lies inside T = {_span(distinct)}")
    else:
        out.update(determined=True, L_inf=fit.l_inf, Z=fit.Z, z=fit.z,
                   predicted={_key(k): float(v) for k, v in zip(t, predicted)})
    return out


def _key(t: float) -> int | float:
    return int(t) if float(t).is_integer() else float(t)


def _span(distinct: np.ndarray) -> str:
    return f"{distinct[0]:g}…{distinct[-1]:g}"


@dataclass
class UnifiedTestTimeFit:
    """L(T | μ_rec, D) = E + X·N(μ_rec)^(−x) + Y·D^(−y) + Z·exp(−z·T/μ_rec^γ)
    (docs/design.md §10.4).

    γ = 1 (the paper's choice) unless fitted with ``learn_gamma``.
    """

    E: float
    X: float
    x: float
    Y: float
    y: float
    Z: float
    z: float
    gamma: float
    huber: float

    def floor(self, n, d):
        """The training-law part E + X·N^(−x) + Y·D^(−y): the loss once T ≫ μ_rec."""
        n, d = np.asarray(n, float), np.asarray(d, float)
        return self.E + self.X * n ** (-self.x) + self.Y * d ** (-self.y)

    def predict(self, n, d, t, mu):
        """Predicted loss at loop count ``t`` of a model with N(μ_rec) = ``n`` trained on ``d``
        tokens at mean recurrence ``mu``."""
        t, mu = np.asarray(t, float), np.asarray(mu, float)
        return self.floor(n, d) + self.Z * np.exp(-self.z * t / mu ** self.gamma)

    def as_dict(self) -> dict:
        """JSON-ready constants."""
        return asdict(self)


def _unified_objective(theta: np.ndarray, log_n, log_d, t, log_mu, log_l, delta: float,
                       learn_gamma: bool) -> tuple[float, np.ndarray]:
    """Mean Huber of LSE(e, α − x·lnN, β − y·lnD, ζ − e^ω·T·μ^(−γ)) − ln L, and its gradient."""
    e, alpha, x, beta, y, zeta, omega = theta[:7]
    gamma = theta[7] if learn_gamma else 1.0
    decay = np.exp(omega) * t * np.exp(-gamma * log_mu)
    terms = np.stack([np.full_like(log_n, e), alpha - x * log_n, beta - y * log_d,
                      zeta - decay])
    pred = logsumexp(terms, axis=0)
    weights = np.exp(terms - pred)  # d pred / d term
    residual = pred - log_l
    slope = np.clip(residual, -delta, delta) / residual.size  # d mean-Huber / d pred
    w = weights * slope
    grad = [w[0].sum(), w[1].sum(), -(w[1] * log_n).sum(), w[2].sum(), -(w[2] * log_d).sum(),
            w[3].sum(), -(w[3] * decay).sum()]
    if learn_gamma:
        grad.append((w[3] * decay * log_mu).sum())
    return float(np.mean(_huber(residual, delta))), np.array(grad)


# Bounds of θ = (e, α, x, β, y, ζ, ln z, γ): exponents in [0, 3], ln-amplitudes within ±60,
# z in [e^-8, e^6], γ in [0, 3]. Far outside anything physical, they keep fits on few or noisy
# runs finite (without them a handful of runs lets x run to ~50 and X to ~1e260).
UNIFIED_BOUNDS = [(-10.0, 10.0), (-60.0, 60.0), (0.0, 3.0), (-60.0, 60.0), (0.0, 3.0),
                  (-60.0, 10.0), (-8.0, 6.0), (0.0, 3.0)]


def fit_unified_test_time_law(n, d, t, mu, loss, restarts: int = 200, seed: int = 0,
                              delta: float = 1e-3,
                              learn_gamma: bool = False) -> UnifiedTestTimeFit:
    """Fit the unified test-time law (docs/design.md §10.4) to points (N(μ_rec), D, T, μ_rec, loss).

    Minimises the mean Huber_δ loss between LSE(e, α − x·lnN, β − y·lnD, ζ − z·T/μ^γ) and ln L
    over θ = (e, α, x, β, y, ζ, ln z[, γ]) with L-BFGS-B (analytic gradient, wide bounds:
    ``UNIFIED_BOUNDS``) from ``restarts`` seeded starting points; E = e^e, X = e^α, Y = e^β,
    Z = e^ζ. Returns the best restart.
    """
    arrays = [np.asarray(v, float).ravel() for v in (n, d, t, mu, loss)]
    if len({a.size for a in arrays}) != 1:
        raise ValueError("n, d, t, mu and loss must have the same length")
    log_n, log_d, t_arr, log_mu, log_l = (np.log(arrays[0]), np.log(arrays[1]), arrays[2],
                                          np.log(arrays[3]), np.log(arrays[4]))
    data = (log_n, log_d, t_arr, log_mu, log_l, delta, learn_gamma)
    lows = [-1.0, 0.0, 0.0, 0.0, 0.0, -5.0, -3.0] + ([0.5] if learn_gamma else [])
    highs = [1.5, 25.0, 2.0, 25.0, 2.0, 1.0, 2.5] + ([1.5] if learn_gamma else [])
    rng = np.random.default_rng(seed)
    best = None
    # Tiny problems: BLAS threads only contend (10x slower on a busy machine).
    with threadpool_limits(1):
        for _ in range(restarts):
            res = minimize(_unified_objective, rng.uniform(lows, highs), args=data, jac=True,
                           method="L-BFGS-B", bounds=UNIFIED_BOUNDS[:len(lows)],
                           options={"maxiter": 10_000, "ftol": 1e-15, "gtol": 1e-12})
            if best is None or res.fun < best.fun:
                best = res
    e, alpha, x, beta, y, zeta, omega = best.x[:7]
    gamma = float(best.x[7]) if learn_gamma else 1.0
    return UnifiedTestTimeFit(float(np.exp(e)), float(np.exp(alpha)), float(x),
                              float(np.exp(beta)), float(y), float(np.exp(zeta)),
                              float(np.exp(omega)), gamma, float(best.fun))


def prediction_errors(predicted, actual) -> dict:
    """``{"points", "rmse", "mean_abs_rel_error"}`` of predictions against observations."""
    predicted, actual = np.asarray(predicted, float).ravel(), np.asarray(actual, float).ravel()
    if actual.size == 0:
        return {"points": 0, "rmse": None, "mean_abs_rel_error": None}
    diff = predicted - actual
    return {"points": int(actual.size), "rmse": float(np.sqrt(np.mean(diff**2))),
            "mean_abs_rel_error": float(np.mean(np.abs(diff) / np.abs(actual)))}
