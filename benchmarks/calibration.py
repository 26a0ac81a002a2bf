"""Calibration benchmark: thresholds from normal images only, checked on the test split.

One station per class of an MVTec-layout dataset (`<root>/<class>/train/good`, `test/good`,
`test/<defect type>`), each with the artifact's golden prompt for that class (`model.json`
`prompts`; else the first train/good image), no ROI or masks. For each station,
`lineguard calibrate`'s fitting proposes image and pixel thresholds for `--target-far` (default
1 %) from normal images scored through the station pipeline; then test/good and the defective
test images are scored through the same pipeline and judged with those thresholds:

* `test_fpr`    — fraction of test/good images the station would alert on,
* `test_recall` — fraction of defective test images it would alert on,

both at the decision level (image score ≥ image threshold and a region at the pixel threshold,
as the runtime decides); the image-score-only figures are reported next to them.

Which normal images: with `--held-out CKPT`, the images that checkpoint held out from training
(never trained on) where a class has at least 20; classes with fewer are calibrated together
(`runtime/calibration/pooled.py`: rulers from their train/good images the model trained on, the
bound from all their held-out images pooled). Without it, all of train/good: seen in training,
their scores are optimistic (lower) compared with unseen parts.

With `--station-frames`, as a station calibrates after installation on frames its own camera
captured (`lineguard calibrate --frames N`): each station's test/good images are split at random
(seeded per class) into two halves; the thresholds are fitted on one half and the false-alarm rate
is measured on the OTHER half (recall on all defective images), then the halves swap and the two
folds are averaged. No image is ever judged by thresholds fitted on it, and none was trained on.
A half with fewer than 20 frames is calibrated with the pooled rule (rulers from train/good, the
bound from all such stations' halves pooled). Each fold's frame names are recorded.

    .venv/bin/python benchmarks/calibration.py --artifact runs/art --data DATA \
        --dataset piped --station-frames   # -> benchmarks/results/calibration_piped.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from calibration_folds import MIN_SCORES, pool_proposal, station_folds

RESULTS = Path(__file__).parent / "results"


def _station(cls: str, dataset: str, artifact: Path, prompt: Path, engine: str, precision: str):
    from lineguard.runtime.config import StationConfig

    sid = re.sub(r"[^A-Za-z0-9_.-]", "_", cls) or "station"
    return StationConfig.model_validate(
        {
            "station_id": sid,
            "line_id": re.sub(r"[^A-Za-z0-9_.-]", "_", dataset) or "line",
            "model": str(artifact),
            "engine": engine,
            "precision": precision,
            "threads": 2,
            "camera": {"kind": "folder", "path": str(prompt.parent)},
            "prompt": {"image": str(prompt)},
        }
    )


def _prompt(artifact: Path, card: Any, root: Path, cls: str) -> tuple[Path, str]:
    rel = card.prompts.get(cls)
    if rel and (artifact / rel).is_file():
        return artifact / rel, "artifact"
    first = sorted(p for p in (root / cls / "train" / "good").iterdir() if p.is_file())[0]
    return first, "first train/good image"


def _held_out_folders(ckpt_path: Path, data: Path, tmp: Path) -> dict[str, Path]:
    """Per class, a folder under `tmp` linking the checkpoint's validation images (held out)."""
    import torch

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    out: dict[str, Path] = {}
    for key in ckpt["split"]["val"]:
        dataset, rel = key.split("/", 1)
        src = data / dataset / rel if (data / dataset / rel).is_file() else data / rel
        if not src.is_file():
            raise SystemExit(f"held-out image {key} not found under {data}")
        cls = rel.split("/", 1)[0]
        folder = out.setdefault(cls, tmp / cls)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / src.name).symlink_to(src.absolute())
    return out


def _defect_dirs(root: Path, cls: str) -> list[Path]:
    test = root / cls / "test"
    return sorted(d for d in test.iterdir() if d.is_dir() and d.name != "good")


def calibration_frames(scorer: Any, root: Path, cls: str, args: argparse.Namespace) -> dict:
    """Score a station's calibration frames: its own held-out frames when there are enough,
    else all train/good (for the report and the pixel threshold) with the held-out ones kept
    apart for the pooled image threshold (`runtime/calibration/pooled.py`)."""
    from lineguard.runtime.calibration.scoring import folder_frames

    good = root / cls / "train" / "good"
    held = args.held_out.get(cls)
    n_held = len(list(held.iterdir())) if held is not None else 0
    if n_held >= MIN_SCORES:
        normal = scorer.score_all(folder_frames(held), True, f"{cls} held-out frames")
        return {"normal": normal, "from": "held out from training (validation split)"}
    normal = scorer.score_all(folder_frames(good), True, f"{cls} train/good frames")
    if not n_held:
        return {"normal": normal, "from": "train/good (seen in training)"}
    held_names = {p.name for p in held.iterdir()}
    image = normal.arrays()[0]
    is_held = np.array([n in held_names for n in normal.names], bool)
    return {
        "normal": normal,
        "from": "pooled: ruler from train/good seen in training, bound from the held-out frames "
        "of all pooled stations",
        "seen": image[~is_held],
        "unseen": image[is_held],
    }


def score_defects(scorer: Any, root: Path, cls: str) -> Any:
    """Every defective test image of a class, named `<defect type>/<file>`."""
    from lineguard.runtime.calibration.scoring import ScoreSet, folder_frames

    bad = ScoreSet()
    for d in _defect_dirs(root, cls):
        part = scorer.score_all(folder_frames(d), False, f"{cls} test/{d.name}")
        bad.names += [f"{d.name}/{n}" for n in part.names]
        bad.image += part.image
        bad.region += part.region
    return bad


def evaluate_class(
    scorer: Any, cls: str, cal: dict, pooled: Any, good: Any, bad: Any, args: argparse.Namespace
) -> dict[str, Any]:
    """Fit the station's thresholds on `cal` and judge the normal frames `good` and the
    defective frames `bad` with them."""
    from lineguard.runtime.calibration.report import make_report, round_up
    from lineguard.runtime.calibration.scoring import ScoreSet

    normal = cal["normal"]
    report = make_report(
        station={"id": scorer.cfg.station_id, "line": scorer.cfg.line_id},
        normal=normal,
        defects=None,
        old=scorer.active.as_dict(),
        target_far=args.target_far,
        confidence=args.confidence,
        pixel_rate=args.pixel_rate,
        require_region=scorer.pipeline.require_region,
        seed=args.seed,
    )
    t_img, t_pix = report["proposed"]["image"], report["proposed"]["pixel"]
    image = {k: report["image"][k] for k in ("estimate", "margin", "method")}
    warnings = report["warnings"]
    if "unseen" in cal:
        t_img = round_up(pooled.thresholds[cls])
        ruler = pooled.rulers[cls]
        image = {
            "estimate": ruler.from_z(pooled.z.estimate),
            "margin": t_img - ruler.from_z(pooled.z.estimate),
            "method": f"pooled {pooled.z.method}",
            "ruler": {"center": ruler.center, "spread": ruler.spread},
            "unseen_frames": len(cal["unseen"]),
            "seen_frame_proposal": report["proposed"]["image"],
        }
        warnings = [pooled.note, *pooled.z.warnings, *report["pixel"]["warnings"]]
    rr = scorer.pipeline.require_region

    def rate(s: ScoreSet, image_only: bool = False) -> float | None:
        if not len(s):
            return None
        scores = s.arrays()[0] if image_only else s.decision_scores(t_pix, rr)
        return float(np.mean(scores >= t_img))

    n_dec = normal.decision_scores(t_pix, rr)
    return {
        "calibration_vs_test_good": _same_distribution(
            cal["unseen"] if "unseen" in cal else normal.arrays()[0], good.arrays()[0]
        ),
        "image_threshold": t_img,
        "pixel_threshold": t_pix,
        "test_fpr": rate(good),
        "test_recall": rate(bad),
        "image_only": {"test_fpr": rate(good, True), "test_recall": rate(bad, True)},
        **image,
        "calibration_frames": len(normal),
        "calibration_frames_from": cal["from"],
        "test_good": len(good),
        "test_defective": len(bad),
        "train_alarm_rate": float(np.mean(n_dec >= t_img)) if len(normal) else 0.0,
        "warnings": warnings,
    }


def _same_distribution(calib: np.ndarray, test_good: np.ndarray) -> dict[str, Any] | None:
    """Do the calibration frames' image scores look like the test normals'? (two-sample
    Kolmogorov-Smirnov). A threshold fitted on one sample cannot keep its false-alarm target on
    another drawn from a different distribution, however good the fit."""
    if len(calib) < 2 or len(test_good) < 2:
        return None
    from scipy.stats import ks_2samp

    def quantiles(x: np.ndarray) -> dict[str, float]:
        return {f"p{q:g}": float(np.quantile(x, q / 100)) for q in (50, 90, 99)}

    return {
        "ks_p": float(ks_2samp(calib, test_good).pvalue),
        "calibration_quantiles": quantiles(calib),
        "test_good_quantiles": quantiles(test_good),
    }


def _frames_source(args: argparse.Namespace, held_out_from: Path | None) -> str:
    if args.station_frames:
        return (
            "station frames: each station's test/good split at random into two halves; "
            "thresholds fitted on one half, the false-alarm rate measured on the other, then "
            f"swapped and averaged (see each station's folds); halves with fewer than {MIN_SCORES} "
            "frames pooled, each on its station's ruler from train/good"
        )
    if held_out_from:
        return (
            f"per station: the normal images held out from training by {held_out_from.name} "
            f"(its validation split, never trained on) where there are >= {MIN_SCORES}; else "
            "the held-out frames of all such stations pooled, each read on its station's ruler "
            "from its train/good frames seen in training (see calibration_frames_from and "
            "pooled)"
        )
    return "all train/good images (seen in training)"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2%}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--artifact", type=Path, required=True, help="model artifact folder")
    p.add_argument("--data", type=Path, required=True, help="data root (or the dataset folder)")
    p.add_argument("--dataset", required=True, help="dataset name, e.g. piped or mtd")
    p.add_argument("--classes", nargs="*", help="classes to run (default: all with train/good)")
    p.add_argument("--target-far", type=float, default=0.01)
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--pixel-rate", type=float, default=0.001)
    p.add_argument("--engine", choices=("openvino", "onnxruntime"), default="openvino")
    p.add_argument(
        "--precision",
        choices=("int8", "fp32", "bf16"),
        default=None,
        help="default: int8 when the artifact has it (the edge default), else fp32",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="result JSON (default results/calibration_<dataset>)")
    p.add_argument(
        "--held-out",
        type=Path,
        metavar="CKPT",
        help="calibrate each station on the normal images this training checkpoint HELD OUT "
        "(its validation split: never trained on), as a station calibrates on its own new "
        "frames; default: all of train/good (seen in training: optimistic scores)",
    )
    p.add_argument(
        "--station-frames",
        action="store_true",
        help="calibrate each station on half of its test/good frames (as frames its camera "
        "captured) and measure the false-alarm rate on the other half, then swap",
    )
    args = p.parse_args(argv)
    if args.station_frames and args.held_out:
        p.error("--station-frames and --held-out are two different calibration sources")
    args.artifact = args.artifact.absolute()
    args.command = "python benchmarks/calibration.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    with tempfile.TemporaryDirectory(prefix="lineguard-calibration-") as tmp:
        args.tmp = Path(tmp)  # the frame links of --held-out and --station-frames
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    held_out_from = args.held_out
    args.held_out = _held_out_folders(args.held_out, args.data, args.tmp) if args.held_out else {}

    from lineguard.runtime.artifact import load_card
    from lineguard.runtime.calibration.scoring import StationScorer, folder_frames
    from lineguard.runtime.engine import load_engine

    root = args.data / args.dataset if (args.data / args.dataset).is_dir() else args.data
    card = load_card(args.artifact)
    precision = args.precision or ("int8" if "int8" in card.precisions else "fp32")
    if args.engine == "onnxruntime":
        precision = "fp32"
    classes = args.classes or sorted(
        d.name for d in root.iterdir() if (d / "train" / "good").is_dir()
    )
    if not classes:
        print(f"no class folders with train/good under {root}", file=sys.stderr)
        return 2
    engine = load_engine(args.artifact, backend=args.engine, precision=precision, threads=2)
    started = time.time()
    per_station: dict[str, Any] = {}
    pooled: Any = None
    try:
        scorers, prompts, bad = {}, {}, {}
        for cls in classes:
            prompt, prompts[cls] = _prompt(args.artifact, card, root, cls)
            cfg = _station(cls, args.dataset, args.artifact, prompt, args.engine, precision)
            scorers[cls] = StationScorer(cfg, engine=engine)
            bad[cls] = score_defects(scorers[cls], root, cls)
        if args.station_frames:
            per_station, per_fold = station_folds(scorers, bad, root, args, evaluate_class)
            pooled = [f and f.to_dict() for f in per_fold]
        else:
            cals = {cls: calibration_frames(scorers[cls], root, cls, args) for cls in classes}
            proposal = pool_proposal(cals, args)
            pooled = proposal and proposal.to_dict()
            for cls in classes:
                good = scorers[cls].score_all(
                    folder_frames(root / cls / "test" / "good"), False, f"{cls} test/good"
                )
                per_station[cls] = evaluate_class(
                    scorers[cls], cls, cals[cls], proposal, good, bad[cls], args
                )
        for cls in classes:
            r = per_station[cls] = {**per_station[cls], "prompt": prompts[cls]}
            print(
                f"{cls}: image threshold {r['image_threshold']} ({r['method']}), "
                f"test FPR {_pct(r['test_fpr'])} of {r['test_good']}, "
                f"recall {_pct(r['test_recall'])} of {r['test_defective']}"
            )
    finally:
        engine.close()

    def mean(key: str) -> float | None:
        vals = [r[key] for r in per_station.values() if r[key] is not None]
        return float(np.mean(vals)) if vals else None

    result = {
        "command": args.command,
        "target_far": args.target_far,
        "per_station": per_station,
        "mean": {"test_fpr": mean("test_fpr"), "test_recall": mean("test_recall")},
        "dataset": args.dataset,
        "confidence": args.confidence,
        "pixel_rate": args.pixel_rate,
        "decision": "image score >= image_threshold and a region >= min_area_px at the pixel "
        "threshold (the runtime's rule)",
        "calibration_frames": _frames_source(args, held_out_from),
        "artifact": {
            "name": card.name,
            "model_json_sha256": hashlib.sha256(
                (args.artifact / "model.json").read_bytes()
            ).hexdigest(),
        },
        "pooled": pooled,
        "engine": args.engine,
        "precision": precision,
        "seconds": round(time.time() - started, 1),
    }
    out = args.out or RESULTS / f"calibration_{args.dataset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    m = result["mean"]
    print(f"mean test FPR {_pct(m['test_fpr'])}, recall {_pct(m['test_recall'])} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
