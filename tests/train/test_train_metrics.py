"""Metrics against hand-computed cases and a brute-force PRO reference."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import ndimage

from lineguard.train.metrics import (
    aupro,
    class_metrics,
    image_ap,
    image_auroc,
    mean_metrics,
    pixel_ap,
    pixel_auroc,
    pixel_metrics,
    pro_curve,
    resize_masks,
    std_metrics,
)


def test_image_auroc_and_ap_by_hand():
    labels = [0, 0, 1, 1]
    scores = [0.1, 0.4, 0.35, 0.8]
    # pairs (pos, neg): (0.35,0.1) ok, (0.35,0.4) wrong, (0.8,*) ok -> 3/4
    assert image_auroc(labels, scores) == pytest.approx(0.75)
    # ranking 0.8(+) 0.4(-) 0.35(+) 0.1(-): AP = 0.5*1 + 0.5*(2/3)
    assert image_ap(labels, scores) == pytest.approx(0.5 + 1 / 3)


def test_auroc_is_not_flipped_below_half():
    assert image_auroc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == pytest.approx(0.0)
    assert image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.05]) == pytest.approx(0.25)


def test_single_class_gives_nan():
    assert math.isnan(image_auroc([0, 0], [0.1, 0.2]))
    assert math.isnan(image_ap([0, 0], [0.1, 0.2]))


def test_pixel_metrics_by_hand():
    masks = np.array([[[1, 0], [0, 0]]])
    assert pixel_auroc(masks, np.array([[[0.9, 0.2], [0.5, 0.1]]])) == pytest.approx(1.0)
    # the one positive (0.3) beats 2 of 3 negatives (0.2, 0.1) but not 0.5
    maps = np.array([[[0.3, 0.5], [0.2, 0.1]]])
    assert pixel_auroc(masks, maps) == pytest.approx(2 / 3)
    # ranking 0.5(-) 0.3(+): precision 1/2 at recall 1
    assert pixel_ap(masks, maps) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        pixel_auroc(masks, maps[:, :1])


def _row_case():
    # one 1×10 image: region A = pixels 0,1 ; region B = pixel 3 ; 7 normal pixels
    mask = np.array([[[1, 1, 0, 1, 0, 0, 0, 0, 0, 0]]], np.uint8)
    smap = np.array([[[0.9, 0.5, 0.8, 0.7, 0.4, 0.3, 0.2, 0.1, 0.05, 0.0]]], np.float32)
    return mask, smap


def test_pro_curve_by_hand():
    fpr, pro = pro_curve(*_row_case())
    # t=0.9: A half found -> PRO (1/2+0)/2; t=0.8: one false positive; t=0.7: B found; t=0.5: all
    np.testing.assert_allclose(fpr[:6], [0, 0, 1 / 7, 1 / 7, 1 / 7, 2 / 7])
    np.testing.assert_allclose(pro[:6], [0, 0.25, 0.25, 0.75, 1.0, 1.0])
    assert fpr[-1] == pytest.approx(1.0) and pro[-1] == pytest.approx(1.0)


def test_aupro_by_hand():
    # area to FPR 0.3: 0.25 * 1/7 + 1.0 * (0.3 - 1/7), normalised by 0.3
    expected = (0.25 / 7 + (0.3 - 1 / 7)) / 0.3
    assert aupro(*_row_case()) == pytest.approx(expected)
    # interpolation inside the last segment: to FPR 1/7 + half a step
    mask, smap = _row_case()
    assert aupro(mask, smap, max_fpr=1 / 7) == pytest.approx(0.25)


def test_pro_uses_eight_connectivity_and_ties():
    # (0,0) touches (1,1) only diagonally: with 8-connectivity the three pixels are ONE region,
    # so finding (0,0) gives PRO 1/3 (4-connectivity would give (1 + 0) / 2 regions = 0.5)
    mask = np.zeros((1, 3, 3), np.uint8)
    mask[0, 0, 0] = mask[0, 1, 1] = mask[0, 1, 2] = 1
    smap = np.zeros((1, 3, 3), np.float32)
    smap[0, 0, 0] = 1.0
    fpr, pro = pro_curve(mask, smap)
    assert pro[1] == pytest.approx(1 / 3) and fpr[1] == 0.0
    # all-equal scores: one threshold admits everything at once
    fpr, pro = pro_curve(mask, np.ones_like(smap))
    np.testing.assert_allclose(fpr, [0, 1])
    np.testing.assert_allclose(pro, [0, 1])


def _brute_aupro(masks, maps, max_fpr=0.3):
    """Slow reference: loop over every distinct threshold with scipy's labelling."""
    regions = []
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [(i, lab == r) for r in range(1, n + 1)]
    normal = masks == 0
    pts = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        above = maps >= t
        fpr = (above & normal).sum() / normal.sum()
        pro = np.mean([above[i][r].mean() for i, r in regions])
        pts.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x0 >= max_fpr:
            break
        if x1 <= max_fpr:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            yv = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            area += (max_fpr - x0) * (y0 + yv) / 2
    return area / max_fpr


def test_aupro_matches_brute_force_on_random_maps():
    rng = np.random.default_rng(3)
    masks = np.zeros((3, 12, 12), np.uint8)
    masks[0, 2:5, 2:6] = 1
    masks[0, 8, 8] = 1
    masks[1, 6:11, 1:3] = 1
    smap = rng.random(masks.shape).astype(np.float32) + 0.6 * masks
    smap = np.round(smap, 2)  # create ties
    assert aupro(masks, smap) == pytest.approx(_brute_aupro(masks, smap), abs=2e-4)


def test_resize_masks_nearest_and_class_metrics_shapes():
    m = np.zeros((2, 8, 8), np.uint8)
    m[1, 4:, 4:] = 255
    r = resize_masks(m, (4, 4))
    assert r.shape == (2, 4, 4) and set(np.unique(r)) == {0, 1} and r[1].sum() == 4
    maps = np.zeros((2, 1, 4, 4), np.float32)
    maps[1, 0, 2:, 2:] = 1.0
    res = class_metrics([0, 1], [0.0, 1.0], m, maps)
    assert res == pytest.approx(
        {"image_auroc": 1.0, "image_ap": 1.0, "pixel_auroc": 1.0, "pixel_ap": 1.0, "aupro": 1.0}
    )


def test_mean_and_std_skip_nan():
    keys = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro")
    a = dict.fromkeys(keys, 0.8)
    b = dict.fromkeys(keys, 0.6)
    b["aupro"] = math.nan
    mean = mean_metrics({"a": a, "b": b})
    assert mean["image_auroc"] == pytest.approx(0.7) and mean["aupro"] == pytest.approx(0.8)
    assert std_metrics([a, b])["image_auroc"] == pytest.approx(0.1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("decimals", [2, None])
def test_one_sort_pixel_metrics_equal_sklearn(decimals, dtype):
    rng = np.random.default_rng(7)
    masks = (rng.random((5, 16, 16)) < 0.1).astype(np.uint8)
    masks[2] = 0  # a normal image
    maps = rng.random(masks.shape) + 0.5 * masks - 0.6  # negative scores too
    if decimals is not None:
        maps = np.round(maps, decimals)  # many ties, also across positives and negatives
    maps = maps.astype(dtype)
    maps[0, 0, :3] = [0.0, -0.0, 0.0]
    fast = pixel_metrics(masks, maps)
    assert fast["pixel_auroc"] == pytest.approx(pixel_auroc(masks, maps), abs=1e-12)
    assert fast["pixel_ap"] == pytest.approx(pixel_ap(masks, maps), abs=1e-12)
    assert fast["aupro"] == pytest.approx(aupro(masks, maps), abs=1e-12)
    assert math.isnan(pixel_metrics(np.zeros_like(masks), maps)["pixel_ap"])
    with pytest.raises(ValueError, match="NaN"):
        pixel_metrics(masks, np.full(masks.shape, np.nan))
