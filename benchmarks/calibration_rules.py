"""Calibration rules on SIMULATED normal scores: why `lineguard calibrate` bounds as it does.

No model and no image: scores are drawn from distributions whose true false-alarm rate at any
threshold is known, so each rule's real rate can be measured over many draws (target α = 1 %,
95 % confidence). Three studies, written to `results/calibration_rules.json`:

* `bound` — one station, n normal scores, n below the 299 a distribution-free bound needs: the
  tail bound drawing its parametric bootstrap at the fitted shape ξ̂ (the previous rule) vs at
  the shape's upper bound, with the sample-maximum floor (the current rule, `fit.py`). Per tail
  shape and n: coverage (share of draws whose true rate is ≤ α), mean true rate, and the median
  threshold over the true (1 − α) quantile (what the margin costs in recall).
* `training_bias` — stations whose only normal images are training images, scored low by the
  model (`bias`: none; affine: shifted down and squeezed; tail: the upper tail squeezed; mixed:
  both, each group its own amount), plus a few held-out images. piped-like: 12 groups × (8
  held-out + 23 trained), 16 test images each; mtd-like: 1 group × (76 + 686), 190 test images.
  Rules: `as_is` (all images as if new), `pooled` (held-out only, pooled on each group's
  training-image ruler: `pool.py`, the current rule), `corrected` (training scores shifted and
  scaled so their median and 90th percentile match the held-out ones, pooled on the same
  rulers, then calibrated on together with the held-out scores) and `corrected_margin` (the
  same at 1 − δ/2 plus a bootstrap margin for the correction at 1 − δ/2). Per rule: mean and
  worst-group true rate, the share of draws whose simulated test sets pass the issue's
  acceptance (mean test FPR ≤ 3 %, every station ≤ 7 %), and the median threshold over the
  true quantile.
* `ruler` — how noisy each candidate scale of 23 training-image scores is (coefficient of
  variation): the pooled rule's ruler uses the least noisy, the mean absolute deviation.

    .venv/bin/python benchmarks/calibration_rules.py   # -> results/calibration_rules.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lineguard.runtime.calibration import fit
from lineguard.runtime.calibration.pool import propose_pooled, ruler

RESULTS = Path(__file__).parent / "results"
ALPHA, CONF = 0.01, 0.95


def _lognormal(sigma: float) -> tuple[Callable, Callable, float]:
    sf = lambda x: 0.5 * math.erfc(math.log(x) / sigma / math.sqrt(2)) if x > 0 else 1.0  # noqa: E731
    return (lambda r, n: r.lognormal(0.0, sigma, n)), sf, math.exp(sigma * 2.326348)


TAILS: dict[str, tuple[Callable, Callable, float]] = {  # draw, survival function, q(1 − α)
    "normal": (
        lambda r, n: r.normal(size=n),
        lambda x: 0.5 * math.erfc(x / math.sqrt(2)),
        2.326348,
    ),
    "exponential": (lambda r, n: r.exponential(size=n), lambda x: math.exp(-max(x, 0)), 4.60517),
    "gumbel": (lambda r, n: r.gumbel(size=n), lambda x: -math.expm1(-math.exp(-x)), 4.600149),
    "lognormal0.5": _lognormal(0.5),
    "lognormal1": _lognormal(1.0),
    "pareto3": (lambda r, n: r.pareto(3.0, n), lambda x: (1 + max(x, 0)) ** -3, 100 ** (1 / 3) - 1),
}


def fitted_shape_bound(x: np.ndarray, n_boot: int, seed: int) -> float:
    """The previous tail bound: parametric bootstrap drawn at the fitted ξ̂, no maximum floor."""
    k = fit.default_k(x.size)
    tail = fit.fit_tail(x, k)
    resampled, _ = fit._tail_bootstrap(x, k, ALPHA, n_boot, seed)
    parametric = fit._gpd_parametric_bootstrap(tail, ALPHA, n_boot, seed)
    q = [np.quantile(resampled, CONF), np.quantile(parametric, CONF)]
    return float(max(tail.quantile(ALPHA), *q))


def study_bound(reps: int, ns: list[int], n_boot: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (draw, sf, q) in TAILS.items():
        for n in ns:
            rng = np.random.default_rng(n)
            rates: dict[str, list[float]] = {"fitted_shape": [], "shape_ucb_max_floor": []}
            levels: dict[str, list[float]] = {k: [] for k in rates}
            for rep in range(reps):
                x = draw(rng, n)
                for rule, t in (
                    ("fitted_shape", fitted_shape_bound(x, n_boot, rep)),
                    ("shape_ucb_max_floor", fit.propose_threshold(x, ALPHA, CONF, n_boot=n_boot,
                                                                  seed=rep).threshold),
                ):  # fmt: skip
                    rates[rule].append(sf(t))
                    levels[rule].append(t / q)
            out[f"{name}/n={n}"] = {rule: _summary(rates[rule], levels[rule]) for rule in rates}
            print(f"bound {name} n={n}: " + ", ".join(
                f"{r} cover {v['coverage']:.2f}" for r, v in out[f"{name}/n={n}"].items()
            ))  # fmt: skip
    return out


def _summary(rates: list[float], levels: list[float]) -> dict[str, float]:
    r = np.asarray(rates)
    return {
        "coverage": float(np.mean(r <= ALPHA)),
        "mean_rate": float(r.mean()),
        "median_threshold_over_quantile": float(np.median(levels)),
    }


BIAS = ("none", "affine", "tail", "mixed")


def squeeze(kind: str, rng: np.random.Generator) -> Callable[[np.ndarray], np.ndarray]:
    """How the model scores its training images, in units of the held-out distribution."""
    if kind == "none":
        return lambda z: z
    if kind == "affine":  # shifted down and squeezed
        a, b = rng.uniform(-0.8, -0.2), rng.uniform(0.5, 0.9)
        return lambda z: a + b * z
    shift = rng.uniform(-0.5, 0.0) if kind == "mixed" else 0.0
    c = rng.uniform(0.3, 0.8) if kind == "mixed" else rng.uniform(0.3, 0.7)
    return lambda z: shift + np.where(z < 1, z, 1 + c * (z - 1))  # the upper tail squeezed


def _match(zh: np.ndarray, zt: np.ndarray) -> tuple[float, float]:
    """(a, b) with a + b·(median, q90 of training z) = (median, q90 of held-out z), one-sided
    (never lowering a score: a ≥ 0, b ≥ 1)."""
    qh, qt = np.quantile(zh, [0.5, 0.9]), np.quantile(zt, [0.5, 0.9])
    b = max((qh[1] - qh[0]) / max(qt[1] - qt[0], 1e-12), 1.0)
    return max(qh[0] - b * qt[0], 0.0), b


def corrected(groups: dict, margin: bool, n_boot: int, seed: int) -> dict[str, float]:
    """Training scores shifted/scaled by `_match` on the groups' rulers, then the rule on
    held-out + corrected; with `margin`, δ split and a bootstrap bound of the correction."""
    rng = np.random.default_rng(seed)
    rulers = {g: ruler(t) for g, (_, t) in groups.items()}
    zh = np.concatenate([rulers[g].to_z(h) for g, (h, _) in groups.items()])
    zt = np.concatenate([rulers[g].to_z(t) for g, (_, t) in groups.items()])
    a, b = _match(zh, zt)
    conf = 1 - (1 - CONF) / 2 if margin else CONF
    z_t = fit.propose_threshold(
        np.r_[zh, a + b * zt], ALPHA, conf, n_boot=n_boot, seed=seed
    ).threshold
    if margin:  # resample held-out and training scores within groups, re-match, move z_t
        levels = []
        w = (z_t - a) / b
        for _ in range(200):
            zhb, ztb = [], []
            for h, t in groups.values():
                tb = t[rng.integers(0, t.size, t.size)]
                rb = ruler(tb)
                zhb.append(rb.to_z(h[rng.integers(0, h.size, h.size)]))
                ztb.append(rb.to_z(tb))
            ab, bb = _match(np.concatenate(zhb), np.concatenate(ztb))
            levels.append(ab + bb * w)
        z_t = max(z_t, float(np.quantile(levels, conf)))
    return {g: r.from_z(z_t) for g, r in rulers.items()}


def _draw_groups(
    rng: np.random.Generator, sizes: tuple[int, int, int], tails: list, bias: str, rep: int
) -> tuple[dict, dict]:
    """Groups with their own level c and spread s: held-out c + s·Z, training c + s·squeeze(Z);
    the tail shapes rotate over groups and draws."""
    n_groups, n_held, n_trained = sizes
    truth, groups = {}, {}
    for g in range(n_groups):
        draw, sf, q = TAILS[tails[(g + rep) % len(tails)]]
        c, s, low = rng.normal(0, 1), rng.uniform(0.5, 2), squeeze(bias, rng)
        truth[g] = (c, s, sf, q)
        groups[g] = (c + s * draw(rng, n_held), c + s * low(draw(rng, n_trained)))
    return truth, groups


def _thresholds(groups: dict, n_boot: int, seed: int) -> dict[str, dict]:
    pooled = propose_pooled(groups, ALPHA, CONF, n_boot=n_boot, seed=seed)
    as_is = {
        g: fit.propose_threshold(np.r_[h, t], ALPHA, CONF, n_boot=n_boot, seed=seed).threshold
        for g, (h, t) in groups.items()
    }
    return {
        "as_is": as_is,
        "pooled": {g: pooled.for_group(g).threshold for g in groups},
        "corrected": corrected(groups, False, n_boot, seed),
        "corrected_margin": corrected(groups, True, n_boot, seed),
    }


def study_training_bias(reps: int, n_boot: int) -> dict[str, Any]:
    scenarios = {"piped_like": ((12, 8, 23), 16), "mtd_like": ((1, 76, 686), 190)}
    mixes = {"gumbel": ["gumbel"], "mixed_tails": ["gumbel", "lognormal0.5", "lognormal1"]}
    out: dict[str, Any] = {}
    for scen, (sizes, n_test) in scenarios.items():
        for (mix, tails), bias in itertools.product(mixes.items(), BIAS):
            acc: dict[str, dict[str, list]] = {}
            for rep in range(reps):
                rng = np.random.default_rng(10_000 + rep)
                truth, groups = _draw_groups(rng, sizes, tails, bias, rep)
                for rule, th in _thresholds(groups, n_boot, rep).items():
                    rates = np.array([sf((th[g] - c) / s) for g, (c, s, sf, _) in truth.items()])
                    test = rng.binomial(n_test, rates) / n_test
                    a = acc.setdefault(rule, {"mean": [], "worst": [], "pass": [], "level": []})
                    a["mean"].append(rates.mean())
                    a["worst"].append(rates.max())
                    a["pass"].append(test.mean() <= 0.03 and test.max() <= 0.07)
                    a["level"] += [(th[g] - c) / s / q for g, (c, s, _, q) in truth.items()]
            key = f"{scen}/{mix}/{bias}"
            out[key] = {
                r: {
                    "mean_rate": float(np.mean(v["mean"])),
                    "worst_group_rate": float(np.mean(v["worst"])),
                    "acceptance_pass": float(np.mean(v["pass"])),
                    "median_threshold_over_quantile": float(np.median(v["level"])),
                }
                for r, v in acc.items()
            }
            passes = ", ".join(f"{r} {v['acceptance_pass']:.2f}" for r, v in out[key].items())
            print(f"training_bias {key}: acceptance pass {passes}", flush=True)
    return out


def study_ruler(n: int = 23, draws: int = 4000) -> dict[str, Any]:
    """Coefficient of variation of scale estimates from n training-image scores: the ruler's
    own noise, which reaches every pooled group's threshold."""
    rng = np.random.default_rng(23)
    out: dict[str, Any] = {}
    for name in ("gumbel", "lognormal0.5", "lognormal1"):
        x = TAILS[name][0](rng, n * draws).reshape(draws, n)
        med = np.median(x, axis=1, keepdims=True)
        scales = {
            "mean_abs_deviation": np.abs(x - med).mean(axis=1),
            "q90_minus_median": np.quantile(x, 0.9, axis=1) - med[:, 0],
            "std": x.std(axis=1),
        }
        out[name] = {k: float(v.std() / v.mean()) for k, v in scales.items()}
    return {"n": n, "coefficient_of_variation": out}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--reps", type=int, default=60, help="draws per cell")
    p.add_argument("--n-boot", type=int, default=500, help="bootstrap resamples per bound")
    p.add_argument("--ns", type=int, nargs="*", default=[20, 31, 76, 150, 298])
    p.add_argument("--out", type=Path, default=RESULTS / "calibration_rules.json")
    args = p.parse_args(argv)
    started = time.time()
    result = {
        "target_far": ALPHA,
        "confidence": CONF,
        "reps": args.reps,
        "n_boot": args.n_boot,
        "bound": study_bound(args.reps, args.ns, args.n_boot),
        "training_bias": study_training_bias(args.reps, args.n_boot),
        "ruler": study_ruler(),
        "seconds": round(time.time() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
