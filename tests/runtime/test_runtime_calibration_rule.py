"""The threshold rule on generated scores of known distributions (no images, no datasets): the
image bound (order statistic, tail fit beyond the sample maximum), pooling held-out scores of
several groups on their training-image rulers, the pixel quantile and the defect metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lineguard.runtime.calibration import fit as cal
from lineguard.runtime.calibration.pixel import PixelTail, propose_pixel_threshold
from lineguard.runtime.calibration.pool import propose_pooled, ruler
from lineguard.runtime.calibration.report import classification_at, f1_optimal, make_report
from lineguard.runtime.calibration.scoring import ScoreSet

SF = {
    "exponential": (lambda r, n: r.exponential(size=n), lambda x: math.exp(-max(x, 0.0))),
    "gumbel": (lambda r, n: r.gumbel(size=n), lambda x: -math.expm1(-math.exp(-x))),
    "normal": (lambda r, n: r.normal(size=n), lambda x: 0.5 * math.erfc(x / math.sqrt(2))),
}
TAILS = {  # light to heavy upper tails: exponential, Gumbel, lognormal σ = 1, Pareto(3)
    "exponential": SF["exponential"],
    "gumbel": SF["gumbel"],
    "lognormal": (
        lambda r, n: r.lognormal(0.0, 1.0, n),
        lambda x: 0.5 * math.erfc(math.log(x) / math.sqrt(2)) if x > 0 else 1.0,
    ),
    "pareto3": (lambda r, n: r.pareto(3.0, n), lambda x: (1.0 + max(x, 0.0)) ** -3.0),
}
GUMBEL_Q99 = -math.log(-math.log(0.99))


# ---------------------------------------------------------------------------- image bound


SF = {
    "exponential": (lambda r, n: r.exponential(size=n), lambda x: math.exp(-max(x, 0.0))),
    "gumbel": (lambda r, n: r.gumbel(size=n), lambda x: -math.expm1(-math.exp(-x))),
    "normal": (lambda r, n: r.normal(size=n), lambda x: 0.5 * math.erfc(x / math.sqrt(2))),
}


@pytest.mark.parametrize("name", sorted(SF))
def test_tail_estimate_hits_the_target_and_the_bound_covers_it(name):
    """n = 1,000 scores, target 1e-3: the estimate's true exceedance is close to the target
    (geometric mean within a factor 2) and the proposed bound is at or below the target in at
    least 80 % of repetitions (95 % nominal; the bootstrap bound is approximate)."""
    gen, sf = SF[name]
    rng = np.random.default_rng(7)
    alpha, reps = 1e-3, 40
    est, prop = [], []
    for rep in range(reps):
        p = cal.propose_threshold(gen(rng, 1000), alpha, 0.95, n_boot=400, seed=rep)
        assert p.method in ("tail-bootstrap", "sample-max") and p.order_statistic_ucb is None
        assert p.threshold >= max(p.estimate, p.sample_max)
        assert math.isclose(p.margin, p.threshold - p.estimate)
        est.append(sf(p.estimate))
        prop.append(sf(p.threshold))
    geo = math.exp(np.mean(np.log(np.maximum(est, 1e-12))))
    assert 0.5 * alpha < geo < 2.0 * alpha, geo / alpha
    coverage = np.mean(np.array(prop) <= alpha)
    assert coverage >= 0.8, coverage
    assert np.median(prop) < alpha  # the margin really moves the threshold up


def test_order_statistic_bound_rank_is_the_binomial_one_and_covers():
    n, alpha, conf = 400, 0.01, 0.9
    # smallest j with P(Binomial(n, 1 - alpha) <= j - 1) >= conf, by direct summation
    p = 1 - alpha
    cdf, j = 0.0, None
    for i in range(n + 1):
        cdf += math.comb(n, i) * p**i * (1 - p) ** (n - i)
        if cdf >= conf:
            j = i + 1
            break
    x = np.random.default_rng(0).random(n)
    value, rank = cal.order_statistic_ucb(x, alpha, conf)
    assert rank == j and value == np.sort(x)[j - 1]
    # coverage on uniform scores: true exceedance of the bound is 1 - value
    rng = np.random.default_rng(1)
    hits = [1 - cal.order_statistic_ucb(rng.random(n), alpha, conf)[0] <= alpha for _ in range(400)]
    assert np.mean(hits) >= 0.86  # exact 0.9 or more; binomial noise of 400 trials
    assert cal.order_statistic_ucb(x[:200], alpha, 0.95) is None  # needs 299 frames
    assert cal.min_n_order_statistic(0.001, 0.95) == 2995


def test_proposal_uses_the_distribution_free_bound_when_there_are_enough_frames():
    x = np.random.default_rng(3).exponential(size=1000)
    p = cal.propose_threshold(x, 0.01, 0.95, n_boot=200)
    assert p.method == "order-statistic"
    assert p.threshold == max(p.order_statistic_ucb, p.estimate)
    assert p.tail is not None and p.tail_ucb is not None  # both reported
    assert p.empirical_rate_at_threshold <= 0.01


def test_too_few_or_bad_scores_are_refused():
    with pytest.raises(ValueError, match="too few"):
        cal.propose_threshold(np.arange(5.0), 0.001)
    with pytest.raises(ValueError, match="NaN"):
        cal.propose_threshold(np.array([1.0, np.nan] * 20), 0.01)
    p = cal.propose_threshold(np.random.default_rng(0).random(30), 0.01, n_boot=100)
    assert any("only 30" in w for w in p.warnings)


@pytest.mark.parametrize("n", [31, 76])
@pytest.mark.parametrize("name", sorted(TAILS))
def test_small_sample_bound_holds_its_confidence_on_light_and_heavy_tails(name, n):
    """Below the 299 frames a distribution-free 95 % bound needs at α = 0.01 the bound
    extrapolates beyond the largest score. With the tail shape at its upper bound it holds in at
    least 85 % of draws (95 % nominal) even for lognormal and Pareto tails, where drawing at the
    fitted shape held in 71-79 %, and the mean false-alarm rate stays under the target."""
    gen, sf = TAILS[name]
    rng = np.random.default_rng(n)
    alpha, reps = 0.01, 80
    exceed = []
    for rep in range(reps):
        x = gen(rng, n)
        p = cal.propose_threshold(x, alpha, 0.95, n_boot=500, seed=rep)
        assert p.method in ("tail-bootstrap", "sample-max") and p.threshold >= x.max()
        exceed.append(sf(p.threshold))
    exceed = np.array(exceed)
    assert np.mean(exceed <= alpha) >= 0.85, np.mean(exceed <= alpha)
    assert exceed.mean() <= alpha, exceed.mean()


@pytest.mark.parametrize("name", ["gumbel", "pareto3"])
def test_large_sample_bound_is_distribution_free_and_close_to_the_target(name):
    """3,000 frames, α = 0.01: the order statistic (exact, ≥ 95 % coverage for any continuous
    distribution) whose true exceedance averages between half the target and the target, i.e.
    not needlessly conservative when frames are plenty."""
    gen, sf = TAILS[name]
    rng = np.random.default_rng(11)
    exceed = []
    for rep in range(40):
        p = cal.propose_threshold(gen(rng, 3000), 0.01, 0.95, n_boot=100, seed=rep)
        assert p.method == "order-statistic"
        exceed.append(sf(p.threshold))
    exceed = np.array(exceed)
    assert np.mean(exceed <= 0.01) >= 0.9
    assert 0.005 < exceed.mean() < 0.01, exceed.mean()


def test_the_margin_shrinks_as_frames_grow_and_never_undercuts_the_quantile():
    rng = np.random.default_rng(5)
    medians = []
    for n in (31, 100, 300, 1000):
        t = [
            cal.propose_threshold(rng.gumbel(size=n), 0.01, n_boot=300, seed=i).threshold
            for i in range(25)
        ]
        medians.append(float(np.median(t)))
    assert medians == sorted(medians, reverse=True), medians
    assert medians[-1] > GUMBEL_Q99


def test_without_the_distribution_free_bound_the_threshold_is_above_every_normal_score():
    x = np.r_[np.random.default_rng(2).exponential(size=59), 40.0]  # one odd normal part
    p = cal.propose_threshold(x, 0.01, 0.95, n_boot=300)
    assert p.method == "sample-max" and p.threshold == 40.0 == p.sample_max
    assert p.tail_ucb < 40.0 and p.tail["xi_ucb"] >= p.tail["xi"]


# ---------------------------------------------------------------------------- pooling


def test_pooling_one_group_is_the_rule_on_its_held_out_scores_whatever_its_ruler():
    rng = np.random.default_rng(0)
    held = rng.gumbel(size=40)
    direct = cal.propose_threshold(held, 0.01, 0.95, n_boot=400, seed=3).threshold
    for trained in (rng.gumbel(size=30), 5.0 + 3.0 * rng.normal(size=200)):
        pooled = propose_pooled({"a": (held, trained)}, 0.01, 0.95, n_boot=400, seed=3)
        assert pooled.for_group("a").threshold == pytest.approx(direct, rel=1e-9)


def _groups(rng, n_groups, held, trained, bias):
    """Groups with their own level and spread; held-out ~ c + s·Gumbel, training images scored
    through `bias` (z ↦ z: unbiased)."""
    truth, groups = {}, {}
    for g in range(n_groups):
        c, s = rng.normal(0.0, 2.0), rng.uniform(0.3, 3.0)
        truth[f"g{g}"] = (c, s)
        groups[f"g{g}"] = (c + s * rng.gumbel(size=held), c + s * bias(rng.gumbel(size=trained)))
    return truth, groups


def test_pooled_groups_keep_the_target_on_average_through_their_own_rulers():
    """12 groups × 8 held-out scores (too few alone): pooled on their rulers, the groups' mean
    true false-alarm rate stays under the target in nearly every draw, each threshold is the
    pooled bound through the group's ruler and above the group's own held-out scores."""
    rng = np.random.default_rng(21)
    means = []
    for rep in range(30):
        truth, groups = _groups(rng, 12, 8, 23, lambda z: z)
        pooled = propose_pooled(groups, 0.01, 0.95, n_boot=300, seed=rep)
        fprs = []
        for name, (c, s) in truth.items():
            t = pooled.for_group(name).threshold
            r = ruler(groups[name][1])
            assert t == pytest.approx(r.center + r.spread * pooled.z.threshold)
            assert t >= groups[name][0].max()
            fprs.append(TAILS["gumbel"][1]((t - c) / s))
        means.append(np.mean(fprs))
    assert np.mean(np.array(means) <= 0.01) >= 0.9 and np.mean(means) < 0.01


def test_training_images_scored_low_raise_the_pooled_threshold_above_the_naive_one():
    """Training images scored low (shifted down and squeezed, as a model scores images it
    fitted): a threshold fitted on them as if new misses the target; the pooled one, which
    uses them only as rulers, is higher in every group and keeps it."""
    rng = np.random.default_rng(8)
    naive_fpr, pooled_fpr = [], []
    for rep in range(20):
        truth, groups = _groups(rng, 3, 25, 300, lambda z: -0.5 + 0.6 * z)
        pooled = propose_pooled(groups, 0.01, 0.95, n_boot=300, seed=rep)
        for name, (c, s) in truth.items():
            held, trained = groups[name]
            naive = cal.propose_threshold(np.r_[held, trained], 0.01, n_boot=300, seed=rep)
            t = pooled.for_group(name).threshold
            assert t > naive.threshold
            naive_fpr.append(TAILS["gumbel"][1]((naive.threshold - c) / s))
            pooled_fpr.append(TAILS["gumbel"][1]((t - c) / s))
    assert np.mean(naive_fpr) > 0.01 > np.mean(pooled_fpr), (naive_fpr, pooled_fpr)


def test_pooling_refuses_what_it_cannot_use():
    good = np.arange(10.0)
    with pytest.raises(ValueError, match="ruler needs"):
        propose_pooled({"a": (good, good[:3])}, 0.01)
    with pytest.raises(ValueError, match="all equal"):
        propose_pooled({"a": (good, np.ones(10))}, 0.01)
    with pytest.raises(ValueError, match="NaN"):
        propose_pooled({"a": (np.r_[good, np.nan], good)}, 0.01)
    with pytest.raises(ValueError, match="no groups"):
        propose_pooled({}, 0.01)
    with pytest.raises(ValueError, match="too few"):  # 10 held-out scores in all
        propose_pooled({"a": (good, good), "b": (np.array([]), good)}, 0.01)


def test_report_carries_a_pooled_proposal():
    rng = np.random.default_rng(4)
    _, groups = _groups(rng, 4, 10, 30, lambda z: z)
    pooled = propose_pooled(groups, 0.01, 0.95, n_boot=200)
    held, trained = groups["g1"]
    normal = ScoreSet(pixels=PixelTail())
    for i, v in enumerate(np.r_[held, trained]):
        normal.names.append(f"{i}.png")
        normal.image.append(float(v))
        normal.region.append(float(v))
        normal.pixels.add(rng.exponential(size=(20, 20)))
    old = {"image": 1.0, "pixel": 1.0, "min_area_px": 4}
    report = make_report(station={"id": "g1", "line": "l"}, normal=normal, defects=None,
                         old=old, target_far=0.01, confidence=0.95, pixel_rate=0.001,
                         n_boot=100, image=pooled.for_group("g1"))  # fmt: skip
    assert report["image"]["pooled"]["group"] == "g1"
    assert report["image"]["pooled"]["held_out"] == 40
    assert report["proposed"]["image"] >= pooled.for_group("g1").threshold
    assert "Pooled" in report["method"]["image"]


# ---------------------------------------------------------------------------- pixel, metrics


def test_pixel_threshold_is_the_pooled_quantile_with_a_frame_bootstrap_margin():
    rng = np.random.default_rng(0)
    maps = [rng.exponential(size=(40, 50)).astype(np.float32) for _ in range(60)]
    tail = PixelTail()
    for m in maps:
        tail.add(m)
    rate = 1e-3
    res = propose_pixel_threshold(tail, rate, 0.95, n_boot=100)
    pooled = np.sort(np.concatenate([m.ravel() for m in maps]))[::-1]
    need = math.ceil(rate * pooled.size)
    assert res["estimate"] == pytest.approx(float(pooled[need - 1]))
    assert res["threshold"] >= res["estimate"] and res["pixels"] == pooled.size
    assert abs(math.exp(-res["estimate"]) / rate - 1) < 0.3  # true rate of Exp(1) pixels
    assert not res["warnings"]
    # an ignore mask removes pixels from the statistics
    masked = PixelTail()
    valid = np.ones((40, 50), bool)
    valid[:, :25] = False
    for m in maps:
        masked.add(m, valid)
    assert propose_pixel_threshold(masked, rate, n_boot=10)["pixels"] == pooled.size // 2
    # a frame with far more high pixels than it kept makes the estimate a lower bound: warned
    tail.add(np.full((40, 50), 50.0, np.float32))
    assert propose_pixel_threshold(tail, rate, n_boot=10)["warnings"]


def test_metrics_match_sklearn_and_brute_force():
    from sklearn.metrics import f1_score, precision_score, recall_score

    rng = np.random.default_rng(2)
    normal = rng.normal(0, 1, 200)
    defect = np.concatenate([rng.normal(2.5, 1, 40), [-np.inf]])  # one frame that cannot alert
    y = np.r_[np.zeros(normal.size), np.ones(defect.size)]
    s = np.r_[normal, defect]
    m = classification_at(normal, defect, 1.5)
    pred = s >= 1.5
    assert m["recall"] == pytest.approx(recall_score(y, pred))
    assert m["precision"] == pytest.approx(precision_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["fpr"] == pytest.approx(np.mean(normal >= 1.5))
    best = f1_optimal(normal, defect)
    brute = max(f1_score(y, s >= t) for t in np.unique(s[np.isfinite(s)]))
    assert best["f1"] == pytest.approx(brute)
