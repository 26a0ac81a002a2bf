"""How well validation ranks the checkpoints of ONE training run against the test split.

Every choice in training rests on validation; on mtd three choices (input size, score pool,
backbone) went one way on validation and the other on test. Comparing different runs mixes in
their seed and machine noise; this compares the checkpoints of one run instead. Train with
``save_evaluations: true`` in the recipe (every evaluated checkpoint lands in
``OUT/evaluations/``); this script then gives each of them the closing choices a shipped model
gets (map smoothing on the proxy, prompt-match share on the held-out judge defects:
:func:`lineguard.train.recalibrate.recalibrate`, on validation only), evaluates it on the test
split with fixed prompts (for this report only) and writes the Spearman rank correlation of each
validation signal with each test metric:

* ``proxy_in_training``: the proxy as the run measured it (what selects ``final.pt``),
* ``proxy``: the same family after the smoothing choice, ``judge``: the held-out defect family
  with the chosen match share, ``joint``: their mean (:func:`lineguard.train.proxy.recipe_score`,
  how recipes are ranked).

    .venv/bin/python benchmarks/checkpoint_ranking.py --run runs/mtd --data DATA/mtd \\
        --out benchmarks/results/checkpoint_ranking_mtd.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

SIGNALS = ("proxy_in_training", "proxy", "judge", "joint")
TEST_KEYS = ("image_auroc", "pixel_ap", "aupro")


def score_checkpoint(path: Path, data: Path, work: Path) -> dict:
    """Closing choices on validation, then the test metrics (fixed prompts) of one checkpoint."""
    from lineguard.train.checkpoint import read_checkpoint
    from lineguard.train.evaluate import evaluate_checkpoint
    from lineguard.train.proxy import recipe_score
    from lineguard.train.recalibrate import recalibrate

    point = read_checkpoint(path)["metrics"]["point"]
    shipped = work / path.name
    recalibrate(path, out=shipped, device="cpu", progress=False)
    metrics = read_checkpoint(shipped)["metrics"]
    ranked = recipe_score(metrics)
    test = evaluate_checkpoint(shipped, data, device="cpu", progress=False)["mean"]
    shipped.unlink()
    return {
        "checkpoint": path.name,
        "step": point["step"],
        "wall_s": point["wall_s"],
        "weights": point.get("weights", "raw"),
        "validation": {
            "proxy_in_training": point["val_proxy"],
            "proxy": ranked["proxy"],
            "judge": ranked["judge"],
            "joint": ranked["score"],
        },
        "map_blur_sigma": metrics["map_blur"]["sigma"],
        "match": {k: metrics["prompt_match"][k] for k in ("weight", "zoom")},
        "test_for_the_report_only": {k: test[k] for k in (*TEST_KEYS, "image_ap", "pixel_auroc")},
    }


def rank_correlations(rows: list[dict]) -> dict[str, dict[str, float | None]]:
    """Spearman ρ of every validation signal with every test metric over ``rows`` (None where
    one side is constant: no ranking to compare)."""
    out: dict[str, dict[str, float | None]] = {}
    for signal in SIGNALS:
        values = [r["validation"][signal] for r in rows]
        row: dict[str, float | None] = {}
        for key in TEST_KEYS:
            test = [r["test_for_the_report_only"][key] for r in rows]
            constant = len(set(values)) < 2 or len(set(test)) < 2
            row[key] = None if constant else float(spearmanr(values, test).statistic)
        known = [v for v in row.values() if v is not None]
        row["mean"] = float(np.mean(known)) if known else None
        out[signal] = row
    return out


def picks(rows: list[dict]) -> dict[str, dict]:
    """The checkpoint each validation signal would keep (first best), with its test figures."""
    out = {}
    for signal in SIGNALS:
        best = max(rows, key=lambda r: r["validation"][signal])
        out[signal] = {
            "checkpoint": best["checkpoint"],
            "test_for_the_report_only": best["test_for_the_report_only"],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="OUT of a run with save_evaluations")
    p.add_argument("--data", type=Path, required=True, help="the MVTec-layout dataset root")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True, help="result JSON")
    args = p.parse_args(argv)

    import torch
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    paths = sorted((args.run / "evaluations").glob("step*.pt"))
    if len(paths) < 3:
        raise SystemExit(f"{args.run}/evaluations: {len(paths)} checkpoints; need 3 or more")
    started, load_before = time.time(), os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for path in tqdm(paths, desc="checkpoints", unit="ckpt"):
            rows.append(score_checkpoint(path, args.data, Path(work)))
    result = {
        "what": "Spearman rank correlation of validation signals with test metrics over the "
        "evaluated checkpoints of one run (test for this report only)",
        "command": "python benchmarks/checkpoint_ranking.py "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "run": str(args.run),
        "checkpoints": len(rows),
        "spearman": rank_correlations(rows),
        "picked": picks(rows),
        "rows": rows,
        "loadavg": {"before": load_before, "after": os.getloadavg()[0]},
        "seconds": round(time.time() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for signal, row in result["spearman"].items():
        print(f"{signal:18s}", {k: v if v is None else round(v, 3) for k, v in row.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
