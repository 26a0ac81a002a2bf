"""Calibration on real frames: region scores, scoring through the real station pipeline (real
ONNX artifact), report files, the CLI end to end (without a broker), no torch on the edge, and
the calibration benchmark on a tiny dataset; the rule itself on generated scores. The pooled rule
is in test_runtime_calibration_pooled.py, station-file apply and rollback in
test_runtime_calibration_apply.py."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from calibration_fixtures import (
    defect_image,
    make_artifact,
    normal_image,
    write_images,
    write_site,
    write_station,
)

from lineguard.runtime.audit import AuditLog
from lineguard.runtime.calibration import fit as cal
from lineguard.runtime.calibration.cli import register
from lineguard.runtime.calibration.histogram import render_histogram
from lineguard.runtime.calibration.pixel import PixelTail, propose_pixel_threshold
from lineguard.runtime.calibration.report import (
    classification_at,
    f1_optimal,
    make_report,
    write_report,
)
from lineguard.runtime.calibration.scoring import (
    ScoreSet,
    StationScorer,
    folder_frames,
    region_score,
)
from lineguard.runtime.config_loader import load_station
from lineguard.runtime.errors import LineGuardError
from lineguard.runtime.pipeline import Pipeline
from lineguard.runtime.regions import find_regions

# ---------------------------------------------------------------------------- tail fitting

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
        assert p.method == "tail-bootstrap" and p.order_statistic_ucb is None
        assert p.threshold >= p.estimate and math.isclose(p.margin, p.threshold - p.estimate)
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


def test_region_score_is_the_largest_pixel_threshold_with_a_region():
    smap = np.zeros((30, 40), np.float32)
    smap[5:9, 5:9] = np.arange(16, dtype=np.float32).reshape(4, 4) + 10  # 10..25
    smap[20, 30] = 100.0  # a single hot pixel: never a region of 4
    roi, size = (0, 0, 40, 30), (40, 30)
    r = region_score(smap, 4, None, roi, size)
    assert r == 22.0  # the four largest values (22..25, the last row) form a region of 4
    assert find_regions(smap, r, 4, roi, size)
    assert not find_regions(smap, np.nextafter(np.float32(r), np.float32(np.inf)), 4, roi, size)
    ignore = np.zeros_like(smap, bool)
    ignore[5:9, 7:9] = True  # hide half the blob
    r2 = region_score(smap, 4, ignore, roi, size)
    assert r2 < r and find_regions(smap, r2, 4, roi, size, ignore)
    assert region_score(smap, 2000, None, roi, size) == -np.inf


# ---------------------------------------------------------------------------- real pipeline


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A real artifact, 80 normal frames, 12 defect frames, a station with ROI + ignore mask."""
    root = tmp_path_factory.mktemp("calib")
    art = make_artifact(root / "artifact")
    rng = np.random.default_rng(0)
    normal = write_images(root / "station" / "frames", [normal_image(rng) for _ in range(80)])
    defects = write_images(root / "defects" / "spot", [defect_image(rng) for _ in range(12)])
    station = write_station(
        root / "station",
        art,
        extra="roi: [0.05, 0.05, 0.9, 0.9]\nignore_masks: [[[0, 0], [0.2, 0], [0, 0.2]]]\n",
    )
    return {"root": root, "artifact": art, "normal": normal, "defects": defects, "station": station}


def _scores(world):
    cfg = load_station(world["station"])
    scorer = StationScorer(cfg)
    normal = scorer.score_all(folder_frames(world["normal"]), True, "normal")
    defects = scorer.score_all(folder_frames(world["defects"].parent, recursive=True), False, "d")
    return cfg, scorer, normal, defects


def test_decision_scores_reproduce_the_station_pipeline_decisions(world):
    cfg, scorer, normal, defects = _scores(world)
    assert len(normal) == 80 and len(defects) == 12
    assert defects.names[0] == "spot/0000.png"
    assert min(defects.image) > max(normal.image)  # the fixture model separates them
    # The same pipeline a Station builds, at thresholds between the two populations and at
    # thresholds inside the normal population: decisions must equal decision_scores >= T.
    prompt = cv2.cvtColor(cv2.imread(str(cfg.prompt.image)), cv2.COLOR_BGR2RGB)
    pipe = Pipeline(
        scorer.engine,
        prompt,
        thresholds=scorer.active,
        roi=cfg.roi,
        ignore_masks=cfg.ignore_masks,
    )
    frames = [rgb for _, rgb in folder_frames(world["normal"])][:30]
    frames += [rgb for _, rgb in folder_frames(world["defects"])]
    sets = ScoreSet()
    for rgb in frames:
        scorer.score(rgb, sets)
    for t_img, t_pix in ((np.median(normal.image), np.median(normal.region)), (2.0, 1.5)):
        pipe.set_thresholds(image=t_img, pixel=t_pix)
        expected = [pipe.process(rgb).defective for rgb in frames]
        got = list(sets.decision_scores(t_pix) >= t_img)
        assert got == expected
        assert 0 < sum(expected) < len(frames) or t_img == 2.0
    scorer.close()


def test_report_json_and_histogram(world, tmp_path):
    cfg, scorer, normal, defects = _scores(world)
    report = make_report(
        station={"id": cfg.station_id, "line": cfg.line_id},
        normal=normal,
        defects=defects,
        old=scorer.active.as_dict(),
        target_far=0.01,
        confidence=0.95,
        pixel_rate=0.001,
        n_boot=300,
    )
    scorer.close()
    prop = report["proposed"]
    assert prop["image"] >= report["image"]["threshold"] >= report["image"]["estimate"]
    assert prop["image"] > max(normal.image)  # 80 frames, target 1 %: above every normal score
    assert prop["pixel"] >= report["pixel"]["threshold"]
    assert report["normal"]["at_proposed"]["normal_alarm_rate"] == 0.0
    d = report["defects"]
    assert d["at_proposed"]["recall"] == 1.0 and d["at_proposed"]["precision"] == 1.0
    assert d["at_f1_optimal"]["f1"] == 1.0
    assert "GPD" in report["method"]["image"] and report["image"]["method"] == "tail-bootstrap"
    path, png = write_report(report, tmp_path / "rep")
    data = json.loads(path.read_text())
    assert data["histogram"] == "histogram.png" and data["proposed"] == prop
    assert len(data["scores"]["normal"]["image"]) == 80
    img = cv2.imread(str(png))
    assert img.shape == (540, 960, 3)
    green = (img[:, :, 1] > 140) & (img[:, :, 0] < 80) & (img[:, :, 2] < 80)
    assert green.sum(0).max() > 300  # the proposed threshold's vertical line
    red = (img[:, :, 2] > 200) & (img[:, :, 0] < 160) & (img[:, :, 1] < 160)
    blue = (img[:, :, 0] > 180) & (img[:, :, 2] < 180)
    assert red.sum() > 200 and blue.sum() > 2000
    # without defects: no red bars at all
    plain = render_histogram({**report, "scores": {"normal": report["scores"]["normal"]}})
    red = (plain[:, :, 2] > 200) & (plain[:, :, 0] < 120) & (plain[:, :, 1] < 120)
    assert red.sum() == 0


# ---------------------------------------------------------------------------- CLI


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="lineguard")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["calibrate", *argv])
    return args.handler(args)


def test_cli_preview_apply_from_report_and_rollback(world, tmp_path, capsys):
    st_dir = tmp_path / "stations"
    station = write_station(st_dir, world["artifact"])
    site = write_site(tmp_path, "stations/*.yaml")
    original = station.read_text()
    out = tmp_path / "report"
    common = ["--station", str(station), "--folder", str(world["normal"])]
    assert _cli(*common, "--defects", str(world["defects"].parent), "--out", str(out)) == 0
    assert station.read_text() == original  # a preview changes nothing
    printed = capsys.readouterr().out
    assert "preview only" in printed and "recall 100.0%" in printed
    report = json.loads((out / "calibration.json").read_text())
    # a change needs a reason, and the error comes before any scoring
    with pytest.raises(LineGuardError, match="--reason"):
        _cli(*common, "--apply", "config", "--site", str(site))
    with pytest.raises(LineGuardError, match="audited"):
        _cli(*common, "--apply", "config", "--reason", "x")
    args = ["--station", str(station), "--site", str(site), "--by", "alice"]
    assert (
        _cli(
            *args,
            "--from-report",
            str(out / "calibration.json"),
            "--apply",
            "config",
            "--reason",
            "new lens",
        )
        == 0
    )
    cfg = load_station(station)
    assert cfg.thresholds.image == report["proposed"]["image"]
    assert cfg.thresholds.pixel == report["proposed"]["pixel"]
    assert "# tuned by hand" in station.read_text()
    entry = AuditLog(tmp_path / "state" / "audit.jsonl").entries()[-1]
    assert entry["action"] == "calibrate/apply" and entry["by"] == "alice"
    assert entry["old"]["image"] == 1.0 and entry["new"]["image"] == report["proposed"]["image"]
    assert entry["reason"].startswith("new lens") and entry["ts"]
    assert _cli("rollback", *args, "--reason", "too sensitive") == 0
    assert station.read_text() == original
    entry = AuditLog(tmp_path / "state" / "audit.jsonl").entries()[-1]
    assert entry["action"] == "calibrate/rollback" and entry["new"]["image"] == 1.0
    # a report of another station is refused
    other = write_station(st_dir, world["artifact"], station_id="s2")
    with pytest.raises(LineGuardError, match="report is for"):
        _cli("--station", str(other), "--from-report", str(out / "calibration.json"))


def test_cli_scores_frames_from_the_stations_own_camera(world, tmp_path, capsys):
    cam = f"{{kind: folder, path: {world['normal']}}}"
    station = write_station(tmp_path / "stations", world["artifact"], camera=cam)
    out = tmp_path / "rep"
    args = ["--station", str(station), "--frames", "30", "--every", "2", "--out", str(out)]
    assert _cli(*args, "--target-far", "0.05") == 0
    report = json.loads((out / "calibration.json").read_text())
    assert report["source"] == {"kind": "camera", "camera": "folder", "every": 2, "frames": 30}
    assert report["normal"]["frames"] == 30
    # every second frame, as the camera delivers them
    assert report["scores"]["normal"]["names"][:2] == ["frame-0", "frame-2"]
    # a finite camera that ends before N frames is a clear error
    with pytest.raises(LineGuardError, match="ended after 80 of 100 frames"):
        _cli("--station", str(station), "--frames", "100", "--out", str(out))


def test_cli_live_change_without_broker_is_a_clear_error(world, tmp_path):
    station = write_station(tmp_path / "stations", world["artifact"])
    site = write_site(tmp_path, "stations/*.yaml")
    with pytest.raises(LineGuardError, match="no broker"):
        _cli(
            "--station",
            str(station),
            "--site",
            str(site),
            "--folder",
            str(world["normal"]),
            "--apply",
            "mqtt",
            "--reason",
            "x",
        )


def test_calibration_modules_import_no_torch_sklearn_scipy_or_matplotlib():
    code = (
        "import sys\n"
        "import lineguard.runtime.calibration.cli, lineguard.runtime.calibration.actions, "
        "lineguard.runtime.calibration.fit, lineguard.runtime.calibration.pixel, "
        "lineguard.runtime.calibration.report, lineguard.runtime.calibration.histogram, "
        "lineguard.runtime.calibration.apply, lineguard.runtime.calibration.scoring, "
        "lineguard.runtime.calibration.pooled\n"
        "bad = [m for m in ('torch', 'sklearn', 'scipy', 'matplotlib', 'timm') "
        "if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------- benchmark


def _run_with_own_tmpdir(cmd: list[str], tmp_path: Path):
    """Run the benchmark with a private TMPDIR, to see that its frame links do not outlive it."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env), scratch


def test_calibration_benchmark_on_a_tiny_dataset(tmp_path):
    """benchmarks/calibration.py end to end: one station per class, thresholds from train/good
    only, FPR on test/good and recall on the defect folders, in the issue's result format."""
    art = make_artifact(tmp_path / "artifact", classes=("widget", "gadget"))
    rng = np.random.default_rng(4)
    root = tmp_path / "data" / "tiny"
    for cls in ("widget", "gadget"):
        write_images(root / cls / "train" / "good", [normal_image(rng, cls) for _ in range(60)])
        write_images(root / cls / "test" / "good", [normal_image(rng, cls) for _ in range(30)])
        write_images(root / cls / "test" / "spot", [defect_image(rng, cls) for _ in range(8)])
        write_images(root / cls / "test" / "dent", [defect_image(rng, cls) for _ in range(4)])
    out = tmp_path / "calibration_tiny.json"
    script = Path(__file__).parents[2] / "benchmarks" / "calibration.py"
    cmd = [sys.executable, str(script), "--artifact", str(art), "--data", str(tmp_path / "data")]
    cmd += ["--dataset", "tiny", "--engine", "onnxruntime", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["target_far"] == 0.01 and set(result["per_station"]) == {"widget", "gadget"}
    assert result["command"].startswith("python benchmarks/calibration.py --artifact ")
    for r in result["per_station"].values():
        assert {"image_threshold", "test_fpr", "test_recall"} <= set(r)
        assert r["calibration_frames"] == 60 and r["test_good"] == 30 and r["test_defective"] == 12
        assert 0.0 <= r["test_fpr"] <= 0.034  # at most one of 30 normal test images
        assert r["test_recall"] == 1.0 and r["prompt"] == "artifact"
    assert set(result["mean"]) == {"test_fpr", "test_recall"}
    assert result["mean"]["test_recall"] == 1.0


def test_calibration_benchmark_pools_stations_with_few_held_out_frames(tmp_path):
    """With --held-out naming 12 validation images per class (< 20), each station's image
    threshold is the pooled bound of the held-out frames (24) read on its own ruler from the
    frames seen in training, and the result says so."""
    torch = pytest.importorskip("torch")
    art = make_artifact(tmp_path / "artifact", classes=("widget", "gadget"))
    rng = np.random.default_rng(5)
    root = tmp_path / "data" / "tiny"
    val = []
    for cls in ("widget", "gadget"):
        write_images(root / cls / "train" / "good", [normal_image(rng, cls) for _ in range(36)])
        write_images(root / cls / "test" / "good", [normal_image(rng, cls) for _ in range(20)])
        write_images(root / cls / "test" / "spot", [defect_image(rng, cls) for _ in range(6)])
        val += [f"tiny/{cls}/train/good/{i:04d}.png" for i in range(0, 36, 3)]
    ckpt = tmp_path / "final.pt"
    torch.save({"split": {"val": val}}, ckpt)
    out = tmp_path / "calibration_tiny.json"
    script = Path(__file__).parents[2] / "benchmarks" / "calibration.py"
    cmd = [sys.executable, str(script), "--artifact", str(art), "--data", str(tmp_path / "data")]
    cmd += ["--dataset", "tiny", "--engine", "onnxruntime", "--held-out", str(ckpt)]
    run, scratch = _run_with_own_tmpdir([*cmd, "--out", str(out)], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert not list(scratch.glob("lineguard-*"))
    result = json.loads(out.read_text())
    pooled = result["pooled"]
    assert pooled["z"]["n"] == 24 and pooled["frames"] == {"widget": 12, "gadget": 12}
    for cls, r in result["per_station"].items():
        assert r["method"].startswith("pooled ") and r["unseen_frames"] == 12
        assert r["calibration_frames_from"].startswith("pooled")
        ruler = pooled["rulers"][cls]
        bound = ruler["center"] + pooled["z"]["threshold"] * ruler["spread"]
        assert bound <= r["image_threshold"] <= bound + 1e-4  # rounded up, never below
        assert r["test_recall"] == 1.0 and r["test_fpr"] <= 0.05  # at most one of 20


def test_calibration_benchmark_station_frames_never_judges_a_frame_it_was_fitted_on(tmp_path):
    """--station-frames: each station's test/good split in two halves; thresholds fitted on one
    are judged on the other, then swapped. Halves of >= 20 frames get their own fit, smaller ones
    the pooled rule; the result records each fold's frames."""
    art = make_artifact(tmp_path / "artifact", classes=("widget", "gadget", "gizmo"))
    rng = np.random.default_rng(6)
    root = tmp_path / "data" / "tiny"
    for cls, n_good in (("widget", 44), ("gadget", 24), ("gizmo", 24)):
        write_images(root / cls / "train" / "good", [normal_image(rng, cls) for _ in range(30)])
        write_images(root / cls / "test" / "good", [normal_image(rng, cls) for _ in range(n_good)])
        write_images(root / cls / "test" / "spot", [defect_image(rng, cls) for _ in range(6)])
    out = tmp_path / "calibration_tiny.json"
    script = Path(__file__).parents[2] / "benchmarks" / "calibration.py"
    cmd = [sys.executable, str(script), "--artifact", str(art), "--data", str(tmp_path / "data")]
    cmd += ["--dataset", "tiny", "--engine", "onnxruntime", "--station-frames"]
    run, scratch = _run_with_own_tmpdir([*cmd, "--out", str(out)], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert not list(scratch.glob("lineguard-*"))
    result = json.loads(out.read_text())
    assert result["calibration_frames"].startswith("station frames")
    assert len(result["pooled"]) == 2  # one pooled fit per fold: gadget and gizmo, 12 + 12
    assert all(f["frames"] == {"gadget": 12, "gizmo": 12} for f in result["pooled"])
    for cls, n_good in (("widget", 44), ("gadget", 24), ("gizmo", 24)):
        r = result["per_station"][cls]
        a, b = (set(f["calibration_frame_names"]) for f in r["folds"])
        assert not a & b and len(a | b) == n_good and len(a) == n_good // 2
        for fold, other in zip(r["folds"], (b, a), strict=True):
            assert fold["test_good"] == len(other)  # judged on the half it was not fitted on
        assert r["method"].startswith("pooled ") == (cls != "widget")
        assert r["test_recall"] == 1.0 and r["test_fpr"] <= 0.1
        assert r["test_fpr"] == np.mean([f["test_fpr"] for f in r["folds"]])
    both = subprocess.run([*cmd, "--held-out", str(out)], capture_output=True, text=True)
    assert both.returncode == 2 and "two different calibration sources" in both.stderr


def test_cli_says_how_many_calibration_images_the_model_trained_on(world, tmp_path, capsys):
    """`calibrate --folder` counts the folder's files among the artifact's trained-file keys
    and warns; an artifact without them says it cannot tell."""
    import shutil

    from lineguard.runtime.calibration.seen import file_key

    art = tmp_path / "artifact"
    shutil.copytree(world["artifact"], art)
    card = json.loads((art / "model.json").read_text())
    frames = sorted(world["normal"].iterdir())
    card["trained_file_keys"] = [*sorted(file_key(f) for f in frames[:5]), "0" * 16]
    (art / "model.json").write_text(json.dumps(card))
    station = write_station(tmp_path / "stations", art)
    out = tmp_path / "report"
    assert _cli("--station", str(station), "--folder", str(world["normal"]), "--out", str(out)) == 0
    report = json.loads((out / "calibration.json").read_text())
    assert report["trained_on"]["checked"] is True
    assert (report["trained_on"]["frames"], report["trained_on"]["of"]) == (5, 80)
    assert report["trained_on"]["names"] == [f.name for f in frames[:5]]
    assert "5 of 80 frames are images this model TRAINED ON" in capsys.readouterr().out
    plain = write_station(tmp_path / "plain", world["artifact"])
    out2 = tmp_path / "report2"
    assert _cli("--station", str(plain), "--folder", str(world["normal"]), "--out", str(out2)) == 0
    report = json.loads((out2 / "calibration.json").read_text())
    assert report["trained_on"]["checked"] is False
    assert "cannot tell whether the model trained on" in capsys.readouterr().out
