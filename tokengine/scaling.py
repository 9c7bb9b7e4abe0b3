"""Power-law fits of score against vision-token count: S(N) = k * N^gamma = (c / N)^alpha.

The paper (arXiv 2412.18387) fits ``log S = log k + gamma log N`` by ordinary least squares
over all swept points; ``alpha = -gamma`` and ``c = k^(-1/gamma)`` give its (c/N)^alpha form.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class PowerLawFit:
    """S = k * N^gamma fitted in log-log space, with a bootstrap interval for gamma and k."""

    k: float
    gamma: float
    r2: float  # coefficient of determination of the log-log line; NaN for constant scores
    n_points: int
    gamma_ci: tuple[float, float]
    k_ci: tuple[float, float]

    @property
    def alpha(self) -> float:
        return -self.gamma

    @property
    def c(self) -> float:
        """The paper's c in S = (c/N)^alpha; infinite (or 0) when gamma is (nearly) 0."""
        if self.gamma == 0:
            return math.inf
        log_c = -math.log(self.k) / self.gamma
        return math.inf if log_c > 709 else math.exp(log_c)  # exp(709) ~ float64's max

    def predict(self, n: np.ndarray | float) -> np.ndarray | float:
        return self.k * np.asarray(n, dtype=float) ** self.gamma

    def to_dict(self) -> dict:
        """JSON-ready: c out of float range and R^2 of constant scores become None."""
        c = self.c
        return {
            **asdict(self),
            "r2": None if math.isnan(self.r2) else self.r2,
            "alpha": self.alpha,
            "c": c if 0 < c < math.inf else None,
        }


def _ols(logn: np.ndarray, logs: np.ndarray) -> tuple[float, float, float]:
    """Intercept, slope and R^2 of the least-squares line logs ~ logn."""
    slope, intercept = np.polyfit(logn, logs, 1)
    residual = logs - (intercept + slope * logn)
    total = logs - logs.mean()
    ss_tot = float(total @ total)
    # constant scores (up to rounding): R^2 is 0/0, undefined
    flat = np.ptp(logs) <= 1e-9 * max(1.0, float(np.abs(logs).max()))
    r2 = math.nan if flat else 1.0 - float(residual @ residual) / ss_tot
    return float(intercept), float(slope), r2


def fit_power_law(
    tokens: list[float] | np.ndarray,
    scores: list[float] | np.ndarray,
    *,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PowerLawFit:
    """Fit S = k N^gamma by least squares in log-log space.

    Args:
        tokens: N values (> 0), at least two distinct.
        scores: S values (> 0), one per N.
        n_boot: bootstrap resamples of the points (with replacement) for the intervals;
            resamples with a single distinct N are redrawn.
        confidence: two-sided interval level.
        seed: bootstrap seed (the fit itself is deterministic).
    """
    n = np.asarray(tokens, dtype=float)
    s = np.asarray(scores, dtype=float)
    if n.shape != s.shape or n.ndim != 1:
        raise ValueError(f"tokens and scores must be 1-D of equal length, got {n.shape}, {s.shape}")
    if np.any(n <= 0) or np.any(s <= 0):
        raise ValueError("tokens and scores must be > 0 to fit in log-log space")
    if len(np.unique(n)) < 2:
        raise ValueError("need at least two distinct token counts to fit a power law")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    logn, logs = np.log(n), np.log(s)
    intercept, gamma, r2 = _ols(logn, logs)

    rng = np.random.default_rng(seed)
    gammas, ks = [], []
    while len(gammas) < n_boot:
        idx = rng.integers(0, len(n), len(n))
        if len(np.unique(n[idx])) < 2:
            continue
        b_intercept, b_gamma, _ = _ols(logn[idx], logs[idx])
        gammas.append(b_gamma)
        ks.append(math.exp(b_intercept))
    tail = (1 - confidence) / 2 * 100
    g_lo, g_hi = np.percentile(gammas, [tail, 100 - tail])
    k_lo, k_hi = np.percentile(ks, [tail, 100 - tail])
    return PowerLawFit(
        k=math.exp(intercept),
        gamma=gamma,
        r2=r2,
        n_points=len(n),
        gamma_ci=(float(g_lo), float(g_hi)),
        k_ci=(float(k_lo), float(k_hi)),
    )
