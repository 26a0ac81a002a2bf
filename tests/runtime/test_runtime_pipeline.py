"""Pure per-frame pipeline: ROI/resize, normalisation, regions in frame coordinates, ignore masks,
decision rule, live thresholds, shadow thresholds and the debouncer. A scripted fake engine."""

from __future__ import annotations

import threading

import cv2
import numpy as np
import pytest

from lineguard.runtime.artifact import ModelCard
from lineguard.runtime.pipeline import Debouncer, Pipeline, Thresholds
from lineguard.runtime.regions import find_regions, ignore_mask, polygons_to_pixels, roi_pixels


def make_card(input_hw=(30, 50), img=(0.5, 2.0), pix=(1.0, 4.0)) -> ModelCard:
    graph = {"inputs": [], "outputs": [], "files": {}}
    return ModelCard.model_validate(
        {
            "name": "fake",
            "created": "2026-01-01T00:00:00Z",
            "input_size": list(input_hw),
            "resize": "cv2-area",
            "backbone": "none",
            "classes": ["part"],
            "prompt_encoder": graph,
            "detector": graph,
            "score_normalization": {
                "image": {"center": img[0], "scale": img[1]},
                "pixel": {"center": pix[0], "scale": pix[1]},
                "source": "unit test",
                "count": 1,
            },
            "thresholds": {"image": 1.0, "pixel": 1.0},
            "sha256": {},
        }
    )


class ScriptedEngine:
    """Returns whatever raw map/score the test sets; records what it was given."""

    def __init__(self, card: ModelCard) -> None:
        self.card = card
        h, w = card.input_size
        self.raw_map = np.full((h, w), card.score_normalization.pixel.center, np.float32)
        self.raw_score = card.score_normalization.image.center
        self.prompts: list[np.ndarray] = []
        self.inputs: list[np.ndarray] = []

    def encode_prompt(self, rgb: np.ndarray) -> np.ndarray:
        self.prompts.append(rgb.copy())
        return np.ones((1, 4, 8), np.float32)

    def detect(self, rgb: np.ndarray, tokens: np.ndarray):
        assert tokens.shape == (1, 4, 8)
        self.inputs.append(rgb.copy())
        return self.raw_map.copy(), self.raw_score

    def set_normalised(self, norm_map: np.ndarray, norm_score: float) -> None:
        n = self.card.score_normalization
        self.raw_map = norm_map * n.pixel.scale + n.pixel.center
        self.raw_score = norm_score * n.image.scale + n.image.center


FRAME_W, FRAME_H = 200, 100
ROI = (0.25, 0.2, 0.5, 0.6)  # → x 50, y 20, w 100, h 60 px; input 50×30 → 2 frame px per map px


def _frame() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (FRAME_H, FRAME_W, 3), dtype=np.uint8)


def _pipeline(engine, **kw) -> Pipeline:
    kw.setdefault("thresholds", Thresholds(image=1.0, pixel=1.0, min_area_px=4))
    kw.setdefault("roi", ROI)
    return Pipeline(engine, _frame(), **kw)


def _blob_map(shape=(30, 50), rows=(5, 10), cols=(10, 20), value=3.0) -> np.ndarray:
    m = np.zeros(shape, np.float32)
    m[rows[0] : rows[1], cols[0] : cols[1]] = value
    return m


def test_roi_crop_is_resized_with_inter_area_and_prompt_encoded_once():
    engine = ScriptedEngine(make_card())
    pipe = _pipeline(engine)
    frame = _frame()
    for _ in range(3):
        pipe.process(frame)
    expected = cv2.resize(frame[20:80, 50:150], (50, 30), interpolation=cv2.INTER_AREA)
    assert len(engine.prompts) == 1  # tokens computed once, at start
    np.testing.assert_array_equal(engine.prompts[0], expected)  # prompt: same ROI/resize rule
    np.testing.assert_array_equal(engine.inputs[-1], expected)
    assert engine.inputs[-1].shape == (30, 50, 3) and engine.inputs[-1].dtype == np.uint8


def test_scores_are_normalised_with_the_card():
    engine = ScriptedEngine(make_card(img=(0.5, 2.0), pix=(1.0, 4.0)))
    pipe = _pipeline(engine)
    engine.raw_map = np.full((30, 50), 9.0, np.float32)
    engine.raw_score = 4.5
    d = pipe.process(_frame())
    assert d.image_score == pytest.approx((4.5 - 0.5) / 2.0)
    np.testing.assert_allclose(d.score_map, (9.0 - 1.0) / 4.0)


def test_region_box_lands_in_frame_coordinates_with_roi_offset():
    engine = ScriptedEngine(make_card())
    pipe = _pipeline(engine)
    m = _blob_map()
    m[7, 12] = 5.0
    engine.set_normalised(m, 2.0)
    d = pipe.process(_frame())
    assert d.defective and len(d.regions) == 1
    r = d.regions[0]
    # map rows 5..9, cols 10..19 → frame x 50+2·10=70, y 20+2·5=30, 20×10 px
    assert r.bbox == (70, 30, 20, 10)
    assert r.area_px == pytest.approx(50 * 4)
    assert r.area_input_px == 50
    assert r.max_score == pytest.approx(5.0)
    assert r.mean_score == pytest.approx((49 * 3.0 + 5.0) / 50)
    assert d.frame_size == (FRAME_W, FRAME_H) and d.roi == (50, 20, 100, 60)


def test_ignore_mask_removes_pixels_and_can_suppress_the_alert():
    engine = ScriptedEngine(make_card())
    # Mask the left half of the blob: frame x 70..80 (map cols 10..14), generously in y.
    poly = [(70 / FRAME_W, 0.0), (80 / FRAME_W, 0.0), (80 / FRAME_W, 1.0), (70 / FRAME_W, 1.0)]
    pipe = _pipeline(engine, ignore_masks=[poly])
    engine.set_normalised(_blob_map(), 2.0)
    d = pipe.process(_frame())
    assert [r.bbox for r in d.regions] == [(80, 30, 10, 10)]
    assert (d.score_map[5:10, 10:15] == 0).all() and (d.score_map[5:10, 15:20] == 3.0).all()
    # A blob entirely under the mask: high image score but no region → not defective.
    engine.set_normalised(_blob_map(cols=(10, 15)), 5.0)
    d = pipe.process(_frame())
    assert d.regions == [] and not d.defective


def test_min_area_is_in_model_input_pixels():
    engine = ScriptedEngine(make_card())
    m = _blob_map(rows=(0, 2), cols=(0, 2))  # 4 px
    m[20:23, 30:33] = 3.0  # 9 px
    engine.set_normalised(m, 2.0)
    pipe = _pipeline(engine, thresholds=Thresholds(1.0, 1.0, min_area_px=5))
    assert [r.area_input_px for r in pipe.process(_frame()).regions] == [9]
    pipe.set_thresholds(min_area_px=10)
    d = pipe.process(_frame())
    assert d.regions == [] and not d.defective


def test_decision_needs_score_and_region_unless_told_otherwise():
    engine = ScriptedEngine(make_card())
    pipe = _pipeline(engine)
    engine.set_normalised(_blob_map(), 0.9)  # region but score below threshold
    assert not pipe.process(_frame()).defective
    engine.set_normalised(np.zeros((30, 50), np.float32), 3.0)  # score but no region
    assert not pipe.process(_frame()).defective
    plain = _pipeline(engine, require_region=False)
    assert plain.process(_frame()).defective


def test_threshold_change_applies_from_the_next_frame():
    engine = ScriptedEngine(make_card())
    pipe = _pipeline(engine)
    engine.set_normalised(_blob_map(value=2.0), 1.5)
    assert pipe.process(_frame()).defective
    assert pipe.set_thresholds(image=2.0) == Thresholds(2.0, 1.0, 4)
    assert not pipe.process(_frame()).defective
    pipe.set_thresholds(image=1.2, pixel=2.5)
    d = pipe.process(_frame())
    assert not d.defective and d.thresholds == Thresholds(1.2, 2.5, 4)


def test_concurrent_threshold_changes_never_mix_within_a_frame():
    engine = ScriptedEngine(make_card())
    pipe = _pipeline(engine)
    engine.set_normalised(_blob_map(value=2.0), 1.5)
    stop = threading.Event()

    def flip():
        i = 0
        while not stop.is_set():
            v = 1.0 + (i % 7)
            pipe.set_thresholds(image=v, pixel=v, min_area_px=int(v))
            i += 1

    t = threading.Thread(target=flip)
    t.start()
    try:
        for _ in range(300):
            d = pipe.process(_frame())
            th = d.thresholds
            assert th.image == th.pixel == th.min_area_px  # one consistent set per frame
            assert d.defective == (th.image <= 1.5 and th.pixel <= 2.0)
    finally:
        stop.set()
        t.join()


def test_shadow_thresholds_are_decided_alongside():
    engine = ScriptedEngine(make_card())
    pipe = _pipeline(engine)
    engine.set_normalised(_blob_map(value=2.0), 1.5)
    assert pipe.process(_frame()).shadow_defective is None
    pipe.set_shadow(Thresholds(image=3.0, pixel=1.0, min_area_px=4))
    d = pipe.process(_frame())
    assert d.defective and d.shadow_defective is False
    pipe.set_shadow(Thresholds(image=0.5, pixel=0.5, min_area_px=1))
    assert pipe.process(_frame()).shadow_defective is True


def test_bgr_models_get_bgr_input():
    card = make_card()
    card.color_order = "BGR"
    engine = ScriptedEngine(card)
    pipe = _pipeline(engine, roi=None)
    frame = np.zeros((30, 50, 3), np.uint8)
    frame[..., 0] = 255  # red
    pipe.process(frame)
    assert engine.inputs[-1][0, 0].tolist() == [0, 0, 255]


def test_geometry_helpers():
    assert roi_pixels(None, 64, 48) == (0, 0, 64, 48)
    assert roi_pixels((0.5, 0.5, 0.5, 0.5), 64, 48) == (32, 24, 32, 24)
    assert roi_pixels((0.999, 0.0, 0.001, 1.0), 64, 48)[2] == 1  # never empty
    polys = polygons_to_pixels([[(0.0, 0.0), (0.5, 0.0), (0.5, 1.0), (0.0, 1.0)]], 64, 48)
    mask = ignore_mask(polys, (0, 0, 64, 48), (24, 32))  # input at half size
    assert mask[:, :16].all() and not mask[:, 16:].any()
    assert ignore_mask([], (0, 0, 64, 48), (24, 32)) is None


def test_regions_sorted_by_max_score_and_8_connected():
    m = np.zeros((20, 20), np.float32)
    m[2, 2] = m[3, 3] = 2.0  # diagonal neighbours: one region
    m[10:12, 10:12] = 4.0
    regions = find_regions(m, 1.0, 1, (0, 0, 20, 20), (20, 20))
    assert [r.area_input_px for r in regions] == [4, 2]
    assert regions[1].bbox == (2, 2, 2, 2)


@pytest.mark.parametrize(
    ("consecutive", "cooldown", "pattern", "expected"),
    [
        (1, 0.0, "DDND", [0, 1, 3]),
        (3, 0.0, "DDNDDDDDDD", [5, 8]),
        (2, 0.0, "DNDNDN", []),
        (1, 2.5, "DDDDDDD", [0, 3, 6]),  # one frame per second → every 3rd frame
        (2, 2.5, "DDDDD", [1, 4]),  # run reached 2 in the cooldown: fires right after it
        (2, 2.5, "DDDDNNNDD", [1, 8]),  # a normal frame resets the run
    ],
)
def test_debouncer(consecutive, cooldown, pattern, expected):
    deb = Debouncer(consecutive, cooldown)
    fired = [i for i, c in enumerate(pattern) if deb.update(c == "D", float(i))]
    assert fired == expected
