"""Pooled calibration of stations with few unseen frames (`runtime/calibration/pooled.py`), on
generated scores: frames a model trained on score low and tight, new parts of the same kind
score higher; a threshold fitted on the former alarms far too often on the latter, the pooled
bound does not. The benchmark's pooled path on a tiny dataset is in test_runtime_calibration.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from lineguard.runtime.calibration.fit import propose_threshold
from lineguard.runtime.calibration.pooled import make_ruler, propose_pooled


def _stations(n: int = 12) -> dict[str, tuple[float, float]]:
    """station -> (center, spread) of its normal scores: stations differ in level and spread."""
    rng = np.random.default_rng(123)
    return {f"s{i}": (rng.uniform(-0.5, 2.0), rng.uniform(0.05, 0.5)) for i in range(n)}


def _scores(rng, center, spread, n, seen):
    """Gumbel-tailed normal scores; seen frames (trained on) sit lower and tighter."""
    if seen:
        return center - spread + 0.3 * spread * rng.gumbel(size=n)
    return center + spread * rng.gumbel(size=n)


def test_pooled_thresholds_bound_the_unseen_false_alarm_rate_where_seen_frames_do_not():
    """12 stations with 25 frames seen in training and 8 new ones each (piped's shape): the
    pooled thresholds' false-alarm rate on fresh parts, averaged over the stations, stays near
    the target; the seen-frame fits alarm on a large share of them."""
    rng = np.random.default_rng(0)
    target, stations = 0.01, _stations()
    seen = {s: _scores(rng, c, w, 25, True) for s, (c, w) in stations.items()}
    unseen = {s: _scores(rng, c, w, 8, False) for s, (c, w) in stations.items()}
    pooled = propose_pooled(seen, unseen, target, seed=1)
    assert set(pooled.thresholds) == set(stations) and pooled.z.n == 96
    pooled_rates, seen_rates = [], []
    for s, (c, w) in stations.items():
        fresh = _scores(rng, c, w, 20_000, False)
        pooled_rates.append(np.mean(fresh >= pooled.thresholds[s]))
        seen_rates.append(np.mean(fresh >= propose_threshold(seen[s], target, seed=1).threshold))
        ruler = pooled.rulers[s]  # the threshold is the pooled bound read on the station's ruler
        assert pooled.thresholds[s] == pytest.approx(ruler.from_z(pooled.z.threshold))
    assert np.mean(pooled_rates) <= 2 * target, pooled_rates
    assert np.mean(seen_rates) > 10 * target, seen_rates  # the failure being fixed
    assert "pooled" in pooled.note and "12 stations" in pooled.note
    assert pooled.to_dict()["frames"] == {s: 8 for s in stations}


def test_ruler_is_median_and_p90_spread_and_never_zero():
    ruler = make_ruler(np.arange(11.0))
    assert ruler.center == 5.0 and ruler.spread == pytest.approx(4.0)
    assert ruler.from_z(1.0) == pytest.approx(9.0)
    flat = make_ruler(np.full(30, 2.0))
    assert flat.spread > 0 and np.isfinite(flat.to_z(np.array([2.5]))).all()
    with pytest.raises(ValueError, match="at least 2 finite"):
        make_ruler(np.array([1.0, np.nan]))


def test_too_few_pooled_frames_or_a_station_without_training_frames_is_refused():
    rng = np.random.default_rng(2)
    seen = {s: rng.normal(size=25) for s in "ab"}
    with pytest.raises(ValueError, match="needs at least 20"):
        propose_pooled(seen, {s: rng.normal(size=8) for s in "ab"}, 0.01)
    with pytest.raises(ValueError, match=r"no training-frame scores for stations \['c'\]"):
        propose_pooled(seen, {s: rng.normal(size=12) for s in "abc"}, 0.01)
