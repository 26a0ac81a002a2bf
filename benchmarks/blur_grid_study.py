"""Does the map-blur grid end too early? Judged on VALIDATION only.

The blur rule picks σ from ``BLUR_SIGMAS`` by the training-family proxy; on the mtd default
model it picked the grid's largest σ (4 px at 192 px) with the proxy still rising. For each σ
of a wider grid this runs the whole closing pipeline of a checkpoint as training would (blur,
then the prompt-match share and the normal statistics' share on the held-out judge defects)
and reports the blur rule's proxy, the judge's figures of the shipped map, their mean (the
recipe score, :func:`lineguard.train.proxy.recipe_score`) and the judge set's AUPRO (for the
report: the test metric the grid is suspected to limit). ``--stats-taps 1,2`` fits the normal
statistics on the stride-4 pair instead of the shipped stride-8 one (same question for the
statistics' grid). No test image is read.

    .venv/bin/python benchmarks/blur_grid_study.py --checkpoint runs/mtd/final.pt \\
        --data DATA/mtd --out benchmarks/results/blur_grid_mtd.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from lineguard.train import normal_stats as ns
from lineguard.train.calibration import fused, score_parts, stats_parts
from lineguard.train.checkpoint import load_model, read_checkpoint
from lineguard.train.metrics import aupro
from lineguard.train.normal_stats import fit_model
from lineguard.train.proxy import (
    choose_match_weight,
    choose_stats_weight,
    judge_validation,
    proxy_and_calibration,
    recipe_score,
    synthetic_validation,
)
from lineguard.train.train_config import DataConfig, TrainConfig
from lineguard.train.train_data import load_training_data_for, make_synthesizer

SIGMAS = (0.0, 1.0, 2.0, 4.0, 6.0, 8.0)


def judge_aupro(model, td, judge, device) -> float:
    """AUPRO (FPR <= 0.3) of the model's shipped map on the normal validation images and the
    judge defects made from them."""
    normal = td.val_images
    bad, masks, bad_labels = judge
    both = np.concatenate([normal, bad])
    labels = np.concatenate([td.val_labels, bad_labels])
    s_rec, m_hat, match = score_parts(model, both, labels, td.prompt_images(), device)
    stats = stats_parts(model, both, device) if model.uses_stats else None
    amap, _ = fused(model, s_rec, m_hat, match, stats)
    truth = np.concatenate([np.zeros((len(normal), *masks.shape[1:]), np.float32), masks])
    return float(aupro(truth > 0.5, amap))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a default-recipe final.pt")
    ap.add_argument("--data", required=True, help="the MVTec-layout folder it was trained on")
    ap.add_argument("--out", required=True, help="JSON to write")
    ap.add_argument("--sigmas", default=",".join(f"{s:g}" for s in SIGMAS))
    ap.add_argument(
        "--stats-taps",
        default=",".join(map(str, ns.STATS_TAPS)),
        help="backbone taps (finer, coarser) of the normal statistics' descriptors: 2,3 = "
        "stride 8 as shipped, 1,2 = stride 4 (the prompt match's pair)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    t0, device = time.perf_counter(), "cpu"
    ckpt = read_checkpoint(args.checkpoint)
    cfg = TrainConfig.model_validate(ckpt["train_config"])
    roots = DataConfig.model_validate({"mvtec": [{"root": args.data}]})
    td = load_training_data_for(cfg, progress=False, data=roots)
    model, _ = load_model(args.checkpoint, device)
    defects = synthetic_validation(td, make_synthesizer(td, cfg.synthesis), cfg.seed)
    judge = judge_validation(td, cfg.seed)
    ns.STATS_TAPS = tuple(int(t) for t in args.stats_taps.split(","))
    fit_from = time.perf_counter()
    fit_model(model, td.train_images, device)
    fit_s = time.perf_counter() - fit_from
    mean, precision = model.stats_mean.clone(), model.stats_precision.clone()
    rows = {}
    for sigma in (float(s) for s in args.sigmas.split(",")):
        model.cfg.match_weight = model.cfg.stats_weight = 0.0
        model.set_normal_stats(mean, precision)
        model.set_map_blur(sigma)
        proxy, _ = proxy_and_calibration(model, td, defects, device)
        match, _, base = choose_match_weight(model, td, device, judge)
        stats, _ = choose_stats_weight(model, td, device, judge, base)
        metrics = {"map_blur": {"val_proxy": proxy}, "prompt_match": match, "normal_stats": stats}
        rows[f"{sigma:g}"] = {
            **recipe_score(metrics),
            "blur_rule_proxy": proxy["val_proxy"],
            "match": {"weight": match["weight"], "zoom": match["zoom"]},
            "stats_weight": stats["weight"],
            "judge_aupro": judge_aupro(model, td, judge, device),
        }
        print(sigma, json.dumps(rows[f"{sigma:g}"]), flush=True)
    picked = max(rows, key=lambda s: rows[s]["blur_rule_proxy"])
    result = {
        "checkpoint": args.checkpoint,
        "command": "python benchmarks/blur_grid_study.py --checkpoint CKPT --data DATA "
        f"--sigmas {args.sigmas}"
        + ("" if args.stats_taps == "2,3" else f" --stats-taps {args.stats_taps}")
        + f" --out {args.out}",
        "input_size": model.cfg.input_size,
        "validation_images": len(td.val_images),
        "stats": {
            "taps": list(ns.STATS_TAPS),
            "positions": int(mean.shape[0]),
            "channels": int(mean.shape[1]),
            "constants_mb": round((mean.numel() + precision.numel()) * 4 / 1e6, 1),
            "fit_s": round(fit_s, 1),
        },
        "sigmas": rows,
        "blur_rule_picks": picked,
        "seconds": round(time.perf_counter() - t0, 1),
        "loadavg_1m_end": round(os.getloadavg()[0], 2),
        "test_images_read": 0,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
