"""Per-position image-score rulers for tiled stations (`tiling.position_norm`, `lineguard
calibrate --positions`): the noisiest tile position no longer sets every frame's score.

The artifact is the calibration tests' real ONNX one (map = smoothed |frame − golden sample|,
score = the map's max). Normal frames carry strong noise in ONE corner, seen by one tile only;
defects are dark spots in the opposite corner, no brighter in the map than that noise. On one ruler
the defects hide among the noisy normals; on per-position rulers they stand out."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from calibration_fixtures import make_artifact as _make_artifact
from calibration_fixtures import (
    normal_image,
    write_images,
    write_site,
    write_station,
)

from lineguard.runtime.calibration.apply import write_thresholds
from lineguard.runtime.calibration.cli import register
from lineguard.runtime.calibration.positions import MIN_FRAMES, fit_rulers, ruled_scores
from lineguard.runtime.calibration.scoring import StationScorer, folder_frames
from lineguard.runtime.config_loader import ConfigError, load_station
from lineguard.runtime.errors import LineGuardError
from lineguard.runtime.tiling import TilingConfig

TILED = "tiling: {scale: 1.0, overlap: 0.25}   # 48-px frames, 32-px tiles: 2x2\n"


def _noisy_corner(rng: np.random.Generator) -> np.ndarray:
    img = normal_image(rng).astype(np.float32)
    img[:12, :12] += rng.normal(0, 40, (12, 12, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _spot(rng: np.random.Generator) -> np.ndarray:
    img = _noisy_corner(rng)
    y, x = (int(v) for v in rng.integers(38, 42, 2))
    img[y - 2 : y + 3, x - 2 : x + 3] = np.clip(img[y - 2 : y + 3, x - 2 : x + 3] - 40.0, 0, 255)
    return img


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    root = tmp_path_factory.mktemp("positions")
    art = _make_artifact(root / "artifact")
    rng = np.random.default_rng(1)
    normal = write_images(root / "normal", [_noisy_corner(rng) for _ in range(40)])
    defects = write_images(root / "defects" / "spot", [_spot(rng) for _ in range(12)])
    return {"root": root, "artifact": art, "normal": normal, "defects": defects}


def _score(station, folder) -> tuple[np.ndarray, list[np.ndarray]]:
    scorer = StationScorer(load_station(station))
    try:
        s = scorer.score_all(folder_frames(folder, recursive=True), False, "frames")
    finally:
        scorer.close()
    return np.asarray(s.image), s.tiles


def _above_all_normals(normal: np.ndarray, defects: np.ndarray) -> float:
    return float(np.mean(defects > normal.max()))


def test_rulers_let_a_defect_on_a_quiet_position_outscore_every_normal_frame(line, tmp_path):
    station = write_station(tmp_path, line["artifact"], extra=TILED)
    normal, normal_tiles = _score(station, line["normal"])
    defects, defect_tiles = _score(station, line["defects"])
    assert len(normal_tiles) == 40 and all(len(t) == 4 for t in normal_tiles)
    # one ruler: the noisy corner's tile sets the normal frames' scores, the spots hide
    assert _above_all_normals(normal, defects) < 0.5
    rulers = fit_rulers(normal_tiles)
    assert len(rulers) == 4
    noisy = int(np.argmax([r["center"] for r in rulers]))
    assert noisy == 0  # the top-left tile
    # written to the station file, the runtime's pipeline scores on them
    write_thresholds(station, {"image": 1.0}, position_norm=rulers)
    assert load_station(station).tiling.position_norm[0].center == rulers[0]["center"]
    ruled_normal, _ = _score(station, line["normal"])
    ruled_defects, _ = _score(station, line["defects"])
    np.testing.assert_allclose(ruled_normal, ruled_scores(normal_tiles, rulers), rtol=1e-9)
    np.testing.assert_allclose(ruled_defects, ruled_scores(defect_tiles, rulers), rtol=1e-9)
    assert _above_all_normals(ruled_normal, ruled_defects) > 0.9


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="lineguard")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["calibrate", *argv])
    return args.handler(args)


def test_calibrate_positions_proposes_on_the_rulers_and_writes_both(line, tmp_path):
    station = write_station(tmp_path / "st", line["artifact"], extra=TILED)
    site = write_site(tmp_path, "st/*.yaml")
    common = ["--station", str(station), "--folder", str(line["normal"])]
    # a loose pixel threshold (4 % of normal pixels above it, about the noisy corner's share), so
    # the image threshold decides: that is what the rulers change
    common += ["--defects", str(line["defects"].parent), "--target-far", "0.05"]
    common += ["--pixel-rate", "0.04"]
    assert _cli(*common, "--out", str(tmp_path / "plain")) == 0
    plain = json.loads((tmp_path / "plain" / "calibration.json").read_text())
    assert "position_norm" not in plain
    # live or shadow changes of the ruler are refused before any scoring
    for live in (["--apply", "mqtt"], ["--shadow"]):
        with pytest.raises(LineGuardError, match="--apply config only"):
            _cli(*common, "--positions", *live, "--reason", "r", "--site", str(site))
    args = [*common, "--positions", "--out", str(tmp_path / "ruled")]
    assert _cli(*args, "--apply", "config", "--reason", "rulers", "--site", str(site)) == 0
    ruled = json.loads((tmp_path / "ruled" / "calibration.json").read_text())
    assert len(ruled["position_norm"]) == 4
    # the same frames, the same target: the spots are found on the rulers, not on one ruler
    recall = {
        n: r["defects"]["at_proposed"]["recall"] for n, r in (("plain", plain), ("ruled", ruled))
    }
    assert recall["ruled"] >= 0.9 > 0.5 >= recall["plain"], recall
    cfg = load_station(station)
    assert [p.model_dump() for p in cfg.tiling.position_norm] == ruled["position_norm"]
    assert cfg.thresholds.image == ruled["proposed"]["image"]
    assert "# 48-px frames" in station.read_text()  # comments kept


def test_positions_refused_where_they_cannot_mean_anything(line, tmp_path):
    untiled = write_station(tmp_path / "u", line["artifact"])
    with pytest.raises(LineGuardError, match="not tiled"):
        _cli("--station", str(untiled), "--folder", str(line["normal"]), "--positions")
    with pytest.raises(LineGuardError, match="tiled station"):
        write_thresholds(untiled, {"image": 1.0}, position_norm=[{"center": 0.0, "scale": 1.0}])
    with pytest.raises(LineGuardError, match=f"at least {MIN_FRAMES}"):
        fit_rulers([np.zeros(4)] * (MIN_FRAMES - 1))
    with pytest.raises(LineGuardError, match="one size"):
        fit_rulers([np.zeros(4)] * MIN_FRAMES + [np.zeros(6)])
    # a station file whose rulers do not fit its golden sample's grid is refused by
    # validate-config, and (should it get past) by the pipeline a station builds
    station = write_station(tmp_path / "w", line["artifact"], extra=TILED)
    write_thresholds(station, {"image": 1.0}, position_norm=[{"center": 0.0, "scale": 1.0}] * 3)
    with pytest.raises(ConfigError, match="3 positions but the golden sample's grid has 4"):
        load_station(station)  # validate-config
    with pytest.raises(LineGuardError, match="3 positions but the golden sample's grid has 4"):
        StationScorer(load_station(station, check_files=False))


@pytest.mark.parametrize(
    "bad",
    [
        [{"center": float("nan"), "scale": 1.0}],
        [{"center": 0.0, "scale": float("inf")}],
        [{"center": 0.0, "scale": 0.0}],
        [{"center": 0.0, "scale": -1.0}],
        [{"center": 0.0}],
        [{"center": 0.0, "scale": 1.0, "extra": 1}],
        [],
    ],
)
def test_rulers_must_be_finite_and_positive(bad):
    with pytest.raises(ValueError):
        TilingConfig(position_norm=bad)


def test_a_tiny_threshold_is_written_as_a_yaml_float(line, tmp_path):
    """`1e-05` reads back as a string in YAML 1.1: thresholds and rulers are written so they
    read back as the very floats."""
    station = write_station(tmp_path, line["artifact"], extra=TILED)
    rulers = [{"center": 1e-05, "scale": 2.5e-07}] * 4
    write_thresholds(station, {"image": 1e-03, "pixel": 5e-05}, position_norm=rulers)
    cfg = load_station(station)
    assert cfg.thresholds.pixel == 5e-05
    assert [p.model_dump() for p in cfg.tiling.position_norm] == rulers
    with pytest.raises(ConfigError):  # and a hand-written bad ruler is refused at load
        station.write_text(station.read_text().replace("scale: 2.5e-07", "scale: -1.0", 1))
        load_station(station)
