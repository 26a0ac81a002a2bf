"""Image threshold from NORMAL scores only (numpy only: this runs on the edge PC).

Stations rarely have defect samples, so the image threshold is set for a target false-alarm rate
α (e.g. 0.01 = one alarm per 100 normal parts) from the normal image scores, as an upper
confidence bound (UCB) of their (1 − α) quantile q at `confidence` = 1 − δ (default δ = 0.05):
the proposed threshold T satisfies P(q ≤ T) ≥ 1 − δ, i.e. with that confidence a normal frame
exceeds T with probability ≤ α. The rule, in order:

1. **Order statistic (distribution-free, exact).** The count of scores below q is
   Binomial(n, 1 − α), so x₍ⱼ₎ ≥ q ⇔ at most j − 1 scores fall below q; the smallest j with
   P(Binomial(n, 1 − α) ≤ j − 1) ≥ 1 − δ gives an exact UCB for any continuous distribution. It
   exists once n ≥ ln δ / ln(1 − α) (299 frames for α = 0.01, 2,995 for 0.001, at δ = 0.05);
   then it is proposed (never below the tail estimate), and the tail fit is only reported.
2. **Tail fit beyond the sample maximum (fewer frames).** Then even the maximum is not a
   1 − δ bound (P(x₍ₙ₎ ≥ q) = 1 − (1 − α)ⁿ: 27 % for 31 frames at α = 0.01), so the bound
   must extrapolate. The k largest of n scores exceed u = x₍ₙ₋ₖ₎; their excesses are fitted
   with a generalised Pareto distribution GPD(σ, ξ) by probability-weighted moments (Hosking &
   Wallis 1987: closed form, robust for small k; ξ clipped to [`XI_MIN`, `XI_MAX`], as a strongly
   negative ξ̂ from few excesses would claim a bounded tail), and P(X > x) ≈
   (k/n)(1 + ξ(x − u)/σ)^(−1/ξ) gives the point **estimate** u + σ/ξ((k/(nα))^ξ − 1)
   (u + σ ln(k/(nα)) for ξ = 0), exceeded with probability ≈ α. The bound is the largest of:
   the 1 − δ quantile of the estimate over `n_boot` bootstrap resamples of the scores; the same over
   `n_boot` samples of k excesses drawn from the fitted GPD **with the shape at its own upper
   bound** (the 1 − δ quantile of the resampled ξ, mean excess kept); and the sample maximum.
   Drawing at ξ̂ (as this module did before) understates the spread whenever ξ̂ came out low, and
   ξ̂ from ~10–30 excesses spans ±0.3: in simulation (`benchmarks/calibration_rules.py`: normal,
   exponential, Gumbel, lognormal σ 0.5 and 1, Pareto(3) scores, n = 20…298, α = 0.01,
   δ = 0.05) the old bound held in 70–100 % of draws (mean false-alarm rate up to 1.14 %), this
   one in 90–100 % (at most 0.42 %). The price is a higher threshold where data are few: at
   n = 31 it is 1.9–2.5× the true quantile (old 1.3–1.65×), at n = 298 1.3–1.9×.

Method names in the proposal: "order-statistic", "tail-bootstrap" (the tail bound is the
largest), "sample-max" (the maximum is). All assume independent frames: consecutive frames of
the same part are not independent, so calibrate on distinct parts. The pixel threshold is in
`pixel.py`; several stations from pooled held-out frames in `pool.py`.
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
    method: str  # "order-statistic" | "tail-bootstrap" | "sample-max" | "empirical"
    target_rate: float
    confidence: float
    n: int
    order_statistic_ucb: float | None
    order_statistic_rank: int | None
    min_n_order_statistic: int
    tail: dict | None
    tail_ucb: float | None
    sample_max: float
    empirical_rate_at_threshold: float
    warnings: list[str] = field(default_factory=list)
    pooled: dict | None = None  # set for a group of a pooled proposal (pool.py)

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


def _tail_bootstrap(
    x: np.ndarray, k: int, alpha: float, n_boot: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(tail-quantile estimate, ξ̂) of `n_boot` bootstrap resamples (vectorised, chunked)."""
    rng = np.random.default_rng(seed)
    n = x.size
    quantiles, shapes = [], []
    chunk = max(1, 2_000_000 // n)
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        sample = np.sort(x[rng.integers(0, n, (b, n))], axis=1)
        u = sample[:, n - k - 1]
        sigma, xi = _pwm(sample[:, n - k :] - u[:, None])
        quantiles.append(_gpd_quantile(u, sigma, xi, k / n, alpha))
        shapes.append(xi)
    return np.concatenate(quantiles), np.concatenate(shapes)


def _gpd_parametric_bootstrap(
    fit: TailFit, alpha: float, n_boot: int, seed: int, xi: float | None = None
) -> np.ndarray:
    """Tail-quantile estimates refitted on `n_boot` samples of k excesses drawn from the GPD
    with shape `xi` (default the fitted one) and the fitted mean excess σ/(1 − ξ)."""
    xi = fit.xi if xi is None else float(xi)
    sigma = fit.sigma / (1.0 - fit.xi) * (1.0 - xi)
    rng = np.random.default_rng(seed + 1)
    uniform = rng.random((n_boot, fit.k))
    exponential = abs(xi) < 1e-9
    excess = -sigma * np.log(uniform) if exponential else sigma / xi * (uniform ** (-xi) - 1.0)
    sig, shape = _pwm(np.sort(excess, axis=1))
    return _gpd_quantile(fit.u, sig, shape, fit.rate, alpha)


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


def _tail_bound(
    x: np.ndarray, k: int, alpha: float, confidence: float, n_boot: int, seed: int
) -> tuple[TailFit, float, dict]:
    """The tail fit, its estimate and its report dict (bound as in the module docstring)."""
    fit = fit_tail(x, k)
    estimate = fit.quantile(alpha)
    resampled, shapes = _tail_bootstrap(x, k, alpha, n_boot, seed)
    xi_ucb = float(min(max(np.quantile(shapes, confidence), fit.xi), XI_MAX))
    parametric = _gpd_parametric_bootstrap(fit, alpha, n_boot, seed, xi_ucb)
    ucb_np = float(np.quantile(resampled, confidence))
    ucb_par = float(np.quantile(parametric, confidence))
    tail = {
        **asdict(fit),
        "rate": fit.rate,
        "quantile": estimate,
        "xi_ucb": xi_ucb,
        "ucb": max(ucb_np, ucb_par, estimate),
        "ucb_resampling": ucb_np,
        "ucb_parametric": ucb_par,
        "model_rate_at_threshold": None,
    }
    return fit, estimate, tail


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
    fit = tail = None
    if n >= MIN_SCORES:
        k = default_k(n) if k is None else int(k)
        if k / n > target_rate:
            fit, estimate, tail = _tail_bound(x, k, target_rate, confidence, n_boot, seed)
        else:
            estimate = empirical  # the target is inside the sample: no extrapolation needed
    elif order is None:
        raise ValueError(f"{n} normal scores are too few: a tail fit needs at least {MIN_SCORES}")
    else:
        estimate = empirical
    tail_ucb = None if tail is None else float(tail["ucb"])
    sample_max = float(x.max())
    if order is not None:
        threshold, method = max(order[0], estimate), "order-statistic"
    elif tail_ucb is not None:
        threshold, method = max((tail_ucb, "tail-bootstrap"), (sample_max, "sample-max"))
    else:
        threshold, method = estimate, "empirical"
        warnings.append("no confidence bound available: the threshold is the empirical quantile")
    if order is None and n < n_min:
        warnings.append(
            f"{n} frames: the distribution-free bound needs {n_min}; the proposal extrapolates "
            "beyond the largest score with the tail model (more frames give a smaller margin "
            "and no model assumption)"
        )
    if fit is not None:
        tail["model_rate_at_threshold"] = fit.exceedance(threshold)
    if n < 100:
        warnings.append(f"only {n} normal frames: the margin is wide; 300+ distinct parts advised")
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
        sample_max=sample_max,
        empirical_rate_at_threshold=float(np.mean(x >= threshold)) if n else 0.0,
        warnings=warnings,
    )
