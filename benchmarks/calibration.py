"""Calibration benchmark: thresholds from normal training/validation images only, checked on the
test split.

One station per class of an MVTec-layout dataset (`<root>/<class>/train/good`, `test/good`,
`test/<defect type>`), each with the artifact's golden prompt for that class (`model.json`
`prompts`; else the first train/good image), no ROI or masks. Every class's train/good images
are scored through its station pipeline; the image threshold for `--target-far` (default 1 %)
then comes from

* with `--held-out CKPT` (the checkpoint's validation split: images the model never trained
  on): the held-out images of ALL classes pooled, each class on its own ruler (median and
  mean absolute deviation of its trained-on images), as `lineguard.runtime.calibration.pool` says —
  8 held-out images per class are too few alone, and trained-on images score optimistically low;
* without it: all train/good images as they are (seen in training: optimistic).

The pixel threshold comes from all train/good images (it shapes regions; the image threshold
alone bounds false alarms). Then test/good and the defective test images are scored through the
same pipeline and judged with those thresholds:

* `test_fpr`    — fraction of test/good images the station would alert on,
* `test_recall` — fraction of defective test images it would alert on,

both at the decision level (image score ≥ image threshold and a region at the pixel threshold,
as the runtime decides); the image-score-only figures are reported next to them. Test images
never choose anything. `validation_loo` is the check that needs no test image: each held-out
image in turn is left out, the thresholds are proposed again without it, and it counts as a
false alarm if it reaches its class's threshold — for the pooled rule and for train/good as is.

    .venv/bin/python benchmarks/calibration.py --artifact runs/art --data DATA \
        --dataset piped --held-out runs/piped/final.pt  # -> results/calibration_piped.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

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


def _held_out_names(source: Path, root: Path) -> dict[str, set[str]]:
    """Per class, the file names of the train/good images the checkpoint held out (its
    validation split). `source` is the checkpoint, or a JSON file {"val": ["<ds>/<rel>", ...]}."""
    if source.suffix == ".json":
        keys = json.loads(source.read_text())["val"]
    else:
        import torch

        keys = torch.load(source, map_location="cpu", weights_only=False)["split"]["val"]
    out: dict[str, set[str]] = {}
    for key in keys:
        rel = key.split("/", 1)[1]
        if not (root / rel).is_file():
            raise SystemExit(f"held-out image {key} not found under {root}")
        cls, *_, name = rel.split("/")
        out.setdefault(cls, set()).add(name)
    return out


def _defect_dirs(root: Path, cls: str) -> list[Path]:
    test = root / cls / "test"
    return sorted(d for d in test.iterdir() if d.is_dir() and d.name != "good")


def _split(normal: Any, held_names: set[str]) -> tuple[np.ndarray, np.ndarray]:
    """(held-out, trained-on) image scores of a class's train/good ScoreSet."""
    image = normal.arrays()[0]
    held = np.array([n in held_names for n in normal.names], bool)
    return image[held], image[~held]


def validation_loo(
    groups: dict[str, tuple[np.ndarray, np.ndarray]], args: argparse.Namespace
) -> dict[str, Any]:
    """Leave-one-out false alarms of the held-out images (see the module docstring)."""
    from lineguard.runtime.calibration.fit import propose_threshold
    from lineguard.runtime.calibration.pool import propose_pooled

    opts = {"n_boot": args.n_boot, "seed": args.seed}
    pooled = as_is = trials = 0
    for cls, (held, trained) in groups.items():
        for i in range(held.size):
            rest = np.delete(held, i)
            others = {**groups, cls: (rest, trained)}
            prop = propose_pooled(others, args.target_far, args.confidence, **opts)
            pooled += bool(held[i] >= prop.for_group(cls).threshold)
            t = propose_threshold(np.r_[rest, trained], args.target_far, args.confidence, **opts)
            as_is += bool(held[i] >= t.threshold)
            trials += 1

    def rate(k: int) -> dict[str, Any]:
        return {"false_alarms": k, "trials": trials, "rate": k / trials if trials else None}

    return {"pooled": rate(pooled), "train_good_as_is": rate(as_is)}


def evaluate_class(
    scorer: Any, normal: Any, image: Any, root: Path, cls: str, args: argparse.Namespace
) -> dict[str, Any]:
    from lineguard.runtime.calibration.report import make_report
    from lineguard.runtime.calibration.scoring import ScoreSet, folder_frames

    report = make_report(
        station={"id": scorer.cfg.station_id, "line": scorer.cfg.line_id},
        normal=normal,
        defects=None,
        old=scorer.active.as_dict(),
        target_far=args.target_far,
        confidence=args.confidence,
        pixel_rate=args.pixel_rate,
        require_region=scorer.pipeline.require_region,
        n_boot=args.n_boot,
        seed=args.seed,
        image=image,
    )
    t_img, t_pix = report["proposed"]["image"], report["proposed"]["pixel"]
    good = scorer.score_all(folder_frames(root / cls / "test" / "good"), False, f"{cls} test/good")
    bad = ScoreSet()
    for d in _defect_dirs(root, cls):
        part = scorer.score_all(folder_frames(d), False, f"{cls} test/{d.name}")
        bad.names += [f"{d.name}/{n}" for n in part.names]
        bad.image += part.image
        bad.region += part.region
    rr = scorer.pipeline.require_region

    def rate(s: ScoreSet, image_only: bool = False) -> float | None:
        if not len(s):
            return None
        scores = s.arrays()[0] if image_only else s.decision_scores(t_pix, rr)
        return float(np.mean(scores >= t_img))

    return {
        "image_threshold": t_img,
        "pixel_threshold": t_pix,
        "test_fpr": rate(good),
        "test_recall": rate(bad),
        "image_only": {"test_fpr": rate(good, True), "test_recall": rate(bad, True)},
        "estimate": report["image"]["estimate"],
        "margin": report["image"]["margin"],
        "method": report["image"]["method"],
        "calibration_frames": len(normal),
        "test_good": len(good),
        "test_defective": len(bad),
        "train_alarm_rate": report["normal"]["at_proposed"]["normal_alarm_rate"],
        "warnings": report["warnings"],
    }


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2%}"


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--artifact", type=Path, required=True, help="model artifact folder")
    p.add_argument("--data", type=Path, required=True, help="data root (or the dataset folder)")
    p.add_argument("--dataset", required=True, help="dataset name, e.g. piped or mtd")
    p.add_argument("--classes", nargs="*", help="classes to run (default: all with train/good)")
    p.add_argument("--target-far", type=float, default=0.01)
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--pixel-rate", type=float, default=0.001)
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples of the bound")
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
        help="the training checkpoint whose validation split (images never trained on) sets the "
        "image thresholds, pooled over classes (or a JSON file {'val': [keys]}); default: all "
        "train/good as they are (seen in training: optimistic scores)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    args.artifact = args.artifact.absolute()
    from lineguard.runtime.artifact import load_card
    from lineguard.runtime.calibration.pool import propose_pooled
    from lineguard.runtime.calibration.scoring import StationScorer, folder_frames
    from lineguard.runtime.engine import load_engine

    root = args.data / args.dataset if (args.data / args.dataset).is_dir() else args.data
    held_names = _held_out_names(args.held_out, root) if args.held_out else {}
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
    loo = None
    try:
        scorers, normals, prompts = {}, {}, {}
        for cls in classes:  # 1: score every class's train/good (thresholds need all of them)
            prompt, prompts[cls] = _prompt(args.artifact, card, root, cls)
            cfg = _station(cls, args.dataset, args.artifact, prompt, args.engine, precision)
            scorers[cls] = StationScorer(cfg, engine=engine)
            folder = folder_frames(root / cls / "train" / "good")
            normals[cls] = scorers[cls].score_all(folder, True, f"{cls} train/good")
        images: dict[str, Any] = dict.fromkeys(classes)
        if held_names:
            groups = {c: _split(normals[c], held_names.get(c, set())) for c in classes}
            pooled = propose_pooled(
                groups, args.target_far, args.confidence, n_boot=args.n_boot, seed=args.seed
            )
            images = {c: pooled.for_group(c) for c in classes}
            loo = validation_loo(groups, args)
        for cls in classes:  # 2: propose, then judge on the test split
            r = evaluate_class(scorers[cls], normals[cls], images[cls], root, cls, args)
            held = int(images[cls].pooled["group_held_out"]) if held_names else 0
            r["image_threshold_from"] = (
                f"held-out images of all {len(classes)} classes pooled ({held} of this class)"
                if held_names
                else "all train/good images as they are (seen in training)"
            )
            per_station[cls] = {**r, "prompt": prompts[cls]}
            print(
                f"{cls}: image threshold {r['image_threshold']:.4g} ({r['method']}), "
                f"test FPR {_pct(r['test_fpr'])} of {r['test_good']}, "
                f"recall {_pct(r['test_recall'])} of {r['test_defective']}"
            )
    finally:
        engine.close()

    def mean(key: str) -> float | None:
        vals = [r[key] for r in per_station.values() if r[key] is not None]
        return float(np.mean(vals)) if vals else None

    fprs = [r["test_fpr"] for r in per_station.values() if r["test_fpr"] is not None]
    result = {
        "target_far": args.target_far,
        "per_station": per_station,
        "mean": {"test_fpr": mean("test_fpr"), "test_recall": mean("test_recall")},
        "worst_station_test_fpr": max(fprs) if fprs else None,
        "validation_loo": loo,
        "dataset": args.dataset,
        "confidence": args.confidence,
        "pixel_rate": args.pixel_rate,
        "decision": "image score >= image_threshold and a region >= min_area_px at the pixel "
        "threshold (the runtime's rule)",
        "image_thresholds_from": (
            f"the normal images held out from training by {args.held_out.name} (its validation "
            "split, never trained on), pooled over classes on each class's ruler (median and "
            "mean absolute deviation of its trained-on images)"
            if held_names
            else "all train/good images as they are (seen in training)"
        ),
        "artifact": {
            "name": card.name,
            "model_json_sha256": hashlib.sha256(
                (args.artifact / "model.json").read_bytes()
            ).hexdigest(),
        },
        "engine": args.engine,
        "precision": precision,
        "seconds": round(time.time() - started, 1),
    }
    out = args.out or RESULTS / f"calibration_{args.dataset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    m = result["mean"]
    print(
        f"mean test FPR {_pct(m['test_fpr'])} (worst station "
        f"{_pct(result['worst_station_test_fpr'])}), recall {_pct(m['test_recall'])} -> {out}"
    )
    if loo:
        print(
            "validation leave-one-out false alarms: pooled "
            f"{loo['pooled']['false_alarms']}/{loo['pooled']['trials']}, train/good as is "
            f"{loo['train_good_as_is']['false_alarms']}/{loo['train_good_as_is']['trials']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
