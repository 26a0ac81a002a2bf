"""Image threshold fitting from NORMAL scores only (numpy only: this runs on the edge PC).

Stations rarely have defect samples, so the image threshold is set for a target false-alarm rate
α (e.g. 0.001 = one alarm per 1,000 normal parts) from the upper tail of the normal image-score
distribution, with a stated confidence margin:

* **Tail model (peaks over threshold).** The k largest of n scores exceed u = x₍ₙ₋ₖ₎; their
  excesses y = x − u are fitted with a generalised Pareto distribution GPD(σ, ξ) by probability-
  weighted moments (Hosking & Wallis 1987: closed form, robust for small k; ξ is clipped to
  [`XI_MIN`, `XI_MAX`] because a strongly negative ξ̂ from a few excesses would claim a bounded
  tail). P(X > x) ≈ (k/n)·(1 + ξ(x−u)/σ)^(−1/ξ), so the α-quantile is
  u + σ/ξ·((k/(nα))^ξ − 1) (u + σ·ln(k/(nα)) for ξ = 0). This is the point **estimate**.
* **Confidence margin.** The fit is repeated on `n_boot` bootstrap resamples of the scores
  (captures the choice of u and the data) and on `n_boot` samples of k excesses drawn from the
  fitted GPD (captures the ξ uncertainty that resampling few excesses understates); the larger of
  the two `confidence` quantiles is the tail **upper confidence bound**. The percentile bootstrap
  of an extrapolated quantile is approximate: in simulation (normal, exponential, Gumbel and
  Pareto(3) scores, n = 30…1000, α = 0.01…0.001, 95 % nominal) the bound held in 72–98 % of
  trials, the lower figures for heavy (Pareto) tails, which max-pooled anomaly scores rarely have.
* **Order statistic (distribution-free).** When n is large enough, the smallest order statistic
  x₍ⱼ₎ with P(Binomial(n, 1−α) ≤ j−1) ≥ confidence is an exact upper confidence bound of the true
  (1−α)-quantile for any continuous distribution: it needs n ≥ ln(1−confidence)/ln(1−α)
  (2,995 frames for α = 0.001 at 95 %). When it exists it is proposed (no model assumption;
  never below the estimate); otherwise the tail bound is. Both are reported.

The proposed threshold therefore has a true exceedance probability ≤ α with (approximately, for
the tail bound) the stated confidence; the estimate's exceedance is ≈ α. Both assume independent
frames: consecutive frames of the same part are not independent, so calibrate on distinct parts.

The pixel threshold is in `pixel.py`, the defect metrics in `report.py`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

XI_MIN, XI_MAX = -0.3, 0.5
MIN_SCORES = 20  # below this a tail fit is refused


@dataclass(frozen=True)
class TailFit:
    """GPD fit of the excesses over u: P(X > x) ≈ rate·(1 + ξ(x − u)/σ)^(−1/ξ) for x ≥ u."""

    u: float
    sigma: float
    xi: float
    k: int
    n: int

    @property
    def rate(self) -> float:
        return self.k / self.n

    def quantile(self, alpha: float) -> float:
        """Score exceeded with probability `alpha` (alpha below the fitted tail's rate)."""
        return float(_gpd_quantile(self.u, self.sigma, self.xi, self.rate, alpha))

    def exceedance(self, x: float) -> float:
        """Model probability that a normal score exceeds `x` (x ≥ u)."""
        z = max(float(x) - self.u, 0.0) / self.sigma
        if abs(self.xi) < 1e-9:
            return self.rate * math.exp(-z)
        base = 1.0 + self.xi * z
        return 0.0 if base <= 0 else self.rate * base ** (-1.0 / self.xi)


@dataclass
class ThresholdProposal:
    """What `propose_threshold` found; `threshold` is the value to use."""

    threshold: float
    estimate: float
    margin: float
    method: str  # "order-statistic" | "tail-bootstrap" | "empirical"
    target_rate: float
    confidence: float
    n: int
    order_statistic_ucb: float | None
    order_statistic_rank: int | None
    min_n_order_statistic: int
    tail: dict | None
    tail_ucb: float | None
    empirical_rate_at_threshold: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def default_k(n: int) -> int:
    """Exceedances used for the tail fit: ~20 % of small samples, ~√n·3 of large ones, ≤ 400."""
    k = max(round(0.2 * n), round(3 * math.sqrt(n)), MIN_SCORES // 2)
    return int(min(k, 400, n - 1))


def _gpd_quantile(u, sigma, xi, rate, alpha):
    ratio = np.asarray(rate, np.float64) / alpha
    xi = np.asarray(xi, np.float64)
    small = np.abs(xi) < 1e-9
    safe = np.where(small, 1.0, xi)
    return u + sigma * np.where(small, np.log(ratio), (ratio**safe - 1.0) / safe)


def _pwm(excess_sorted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Probability-weighted-moment GPD fit of ascending excesses along the last axis."""
    k = excess_sorted.shape[-1]
    p = (np.arange(1, k + 1) - 0.35) / k
    a0 = excess_sorted.mean(-1)
    a1 = (excess_sorted * (1.0 - p)).mean(-1)
    denom = a0 - 2.0 * a1
    tiny = np.maximum(a0, 1e-12) * 1e-9
    ok = denom > tiny
    xi = np.where(ok, 2.0 - a0 / np.where(ok, denom, 1.0), XI_MAX)
    xi = np.clip(xi, XI_MIN, XI_MAX)
    # σ from the first moment given the (clipped) ξ: E[Y] = σ / (1 − ξ).
    sigma = np.maximum(a0 * (1.0 - xi), 1e-12)
    return sigma, xi


def fit_tail(scores: np.ndarray, k: int | None = None) -> TailFit:
    """Fit the GPD to the excesses of the k largest scores over the (k+1)-th largest."""
    x = np.sort(np.asarray(scores, np.float64).ravel())
    n = x.size
    if n < MIN_SCORES:
        raise ValueError(f"need at least {MIN_SCORES} normal scores for a tail fit, got {n}")
    k = default_k(n) if k is None else int(k)
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}], got {k}")
    u = x[n - k - 1]
    sigma, xi = _pwm(x[n - k :] - u)
    return TailFit(float(u), float(sigma), float(xi), k, n)


def _tail_bootstrap(x: np.ndarray, k: int, alpha: float, n_boot: int, seed: int) -> np.ndarray:
    """Tail-quantile estimates of `n_boot` bootstrap resamples (vectorised, chunked)."""
    rng = np.random.default_rng(seed)
    n = x.size
    out = []
    chunk = max(1, 2_000_000 // n)
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        sample = np.sort(x[rng.integers(0, n, (b, n))], axis=1)
        u = sample[:, n - k - 1]
        sigma, xi = _pwm(sample[:, n - k :] - u[:, None])
        out.append(_gpd_quantile(u, sigma, xi, k / n, alpha))
    return np.concatenate(out)


def _gpd_parametric_bootstrap(fit: TailFit, alpha: float, n_boot: int, seed: int) -> np.ndarray:
    """Tail-quantile estimates refitted on `n_boot` samples of k excesses drawn from the fit."""
    rng = np.random.default_rng(seed + 1)
    uniform = rng.random((n_boot, fit.k))
    if abs(fit.xi) < 1e-9:
        excess = -fit.sigma * np.log(uniform)
    else:
        excess = fit.sigma / fit.xi * (uniform ** (-fit.xi) - 1.0)
    sigma, xi = _pwm(np.sort(excess, axis=1))
    return _gpd_quantile(fit.u, sigma, xi, fit.rate, alpha)


def _binom_cdf(j: np.ndarray, n: int, p: float) -> np.ndarray:
    """P(Binomial(n, p) ≤ j) for every j in 0..n (log-space pmf, cumulative sum)."""
    i = np.arange(n + 1)
    logpmf = (
        np.array([math.lgamma(n + 1) - math.lgamma(v + 1) - math.lgamma(n - v + 1) for v in i])
        + i * math.log(p)
        + (n - i) * math.log1p(-p)
    )
    cdf = np.cumsum(np.exp(logpmf - logpmf.max())) * math.exp(logpmf.max())
    return np.minimum(cdf, 1.0)[np.asarray(j)]


def min_n_order_statistic(alpha: float, confidence: float) -> int:
    """Smallest n for which the sample maximum is a `confidence` UCB of the (1−α)-quantile."""
    return math.ceil(math.log(1.0 - confidence) / math.log(1.0 - alpha))


def order_statistic_ucb(
    scores: np.ndarray, alpha: float, confidence: float
) -> tuple[float, int] | None:
    """Distribution-free upper confidence bound of the (1−α)-quantile: (x₍ⱼ₎, j), or None.

    x₍ⱼ₎ ≥ q ⇔ at most j−1 scores fall below q, and that count is Binomial(n, 1−α).
    """
    x = np.sort(np.asarray(scores, np.float64).ravel())
    n = x.size
    if n < min_n_order_statistic(alpha, confidence):
        return None
    cdf = _binom_cdf(np.arange(n), n, 1.0 - alpha)  # P(count ≤ j−1) for j = 1..n
    ranks = np.nonzero(cdf >= confidence)[0]
    if ranks.size == 0:
        return None
    j = int(ranks[0]) + 1
    return float(x[j - 1]), j


def propose_threshold(
    scores: np.ndarray,
    target_rate: float,
    confidence: float = 0.95,
    *,
    k: int | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> ThresholdProposal:
    """Threshold whose exceedance probability by a normal score is ≤ `target_rate` with
    `confidence` (see the module docstring for the method)."""
    x = np.asarray(scores, np.float64).ravel()
    if not np.all(np.isfinite(x)):
        raise ValueError("scores contain NaN or infinity")
    if not 0.0 < target_rate < 1.0 or not 0.0 < confidence < 1.0:
        raise ValueError("target_rate and confidence must be in (0, 1)")
    n = x.size
    warnings: list[str] = []
    n_min = min_n_order_statistic(target_rate, confidence)
    order = order_statistic_ucb(x, target_rate, confidence)
    empirical = float(np.quantile(x, 1.0 - target_rate)) if n else float("nan")
    tail = tail_ucb = None
    if n >= MIN_SCORES:
        k = default_k(n) if k is None else int(k)
        if k / n > target_rate:
            fit = fit_tail(x, k)
            estimate = fit.quantile(target_rate)
            resampled = _tail_bootstrap(x, k, target_rate, n_boot, seed)
            parametric = _gpd_parametric_bootstrap(fit, target_rate, n_boot, seed)
            ucb_np = float(np.quantile(resampled, confidence))
            ucb_par = float(np.quantile(parametric, confidence))
            tail_ucb = max(ucb_np, ucb_par, estimate)
            tail = {
                **asdict(fit),
                "rate": fit.rate,
                "quantile": estimate,
                "ucb": tail_ucb,
                "ucb_resampling": ucb_np,
                "ucb_parametric": ucb_par,
                "model_rate_at_threshold": None,
            }
        else:
            estimate = empirical  # the target is inside the sample: no extrapolation needed
    elif order is None:
        raise ValueError(f"{n} normal scores are too few: a tail fit needs at least {MIN_SCORES}")
    else:
        estimate = empirical
    if order is not None:
        threshold, method = max(order[0], estimate), "order-statistic"
    elif tail_ucb is not None:
        threshold, method = tail_ucb, "tail-bootstrap"
    else:
        threshold, method = estimate, "empirical"
        warnings.append("no confidence bound available: the threshold is the empirical quantile")
    if order is None and n < n_min:
        warnings.append(
            f"{n} frames: the distribution-free bound needs {n_min}; the proposal relies on the "
            "tail model (more frames give a smaller margin and no model assumption)"
        )
    if tail is not None:
        tail["model_rate_at_threshold"] = fit.exceedance(threshold)
    if n < 100:
        warnings.append(f"only {n} normal frames: the margin is wide; 200+ distinct parts advised")
    return ThresholdProposal(
        threshold=float(threshold),
        estimate=float(estimate),
        margin=float(threshold - estimate),
        method=method,
        target_rate=float(target_rate),
        confidence=float(confidence),
        n=int(n),
        order_statistic_ucb=None if order is None else order[0],
        order_statistic_rank=None if order is None else order[1],
        min_n_order_statistic=n_min,
        tail=tail,
        tail_ucb=tail_ucb,
        empirical_rate_at_threshold=float(np.mean(x >= threshold)) if n else 0.0,
        warnings=warnings,
    )
