"""Which image-score pooling the VALIDATION data prefers for a trained checkpoint.

The image score is the max of the anomaly map average-pooled over ``score_pool``² pixels
(`OneNIP.image_score`). The pool was set from the input size, never measured. This scores the
checkpoint's validation images once per defect family (the training synthesis, as the proxy
draws it, and the held-out judge family), each against its class's FIXED golden prompt with the
map the model ships (smoothing and prompt match as chosen in training), and reads the image
AUROC of normal vs defective validation images at every pool in ``--pools``: the pool changes
only the max over the map, so one pass serves every pool. The test split is scored too only with
``--report-test`` and only for the report; nothing here changes a model.

    .venv/bin/python benchmarks/score_pool.py --checkpoint runs/mtd/final.pt \\
        --report-test DATA/mtd --out benchmarks/results/score_pool_mtd.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

POOLS = (1, 4, 6, 8, 12, 16, 24, 32)


def pooled_aurocs(model, maps: np.ndarray, labels: np.ndarray, pools) -> dict[str, float]:
    """Image AUROC of ``maps`` (N×H×W, shipped maps) at each pool size; the model keeps its own."""
    from lineguard.train.calibration import image_scores

    out, shipped = {}, model.cfg.score_pool
    try:
        for pool in pools:
            model.cfg.score_pool = int(pool)
            out[str(pool)] = float(roc_auc_score(labels, image_scores(model, maps)))
    finally:
        model.cfg.score_pool = shipped
    return out


def validation_maps(model, ckpt: dict, data, defects, device) -> tuple[np.ndarray, np.ndarray]:
    """Shipped maps of the normal validation images followed by ``defects``' images, each
    against its class's golden prompt; and their labels (0 normal, 1 defective)."""
    from lineguard.train.checkpoint import prompt_images
    from lineguard.train.evaluate import detect_all

    bad, _, bad_labels = defects
    images = np.concatenate([data.val_images, bad])
    assign = np.concatenate([data.val_labels, bad_labels])
    golden = prompt_images(ckpt)
    prompts = [golden[c] for c in data.classes]
    maps, _ = detect_all(model, images, assign, prompts, device, progress=False)
    return maps, np.r_[np.zeros(len(data.val_images)), np.ones(len(bad))]


def test_maps(model, ckpt: dict, root: Path, size: int, device) -> tuple[np.ndarray, np.ndarray]:
    """Shipped maps and labels of the test split (for the report only)."""
    from lineguard.train.evaluate import detect_all, fixed_prompt_pairs
    from lineguard.train.pack import open_data

    pack = open_data(root, size, None, progress=False)
    test = pack.select(lambda s: s.split == "test")
    classes, chosen, assign = fixed_prompt_pairs(pack, test, size, "fixed", ckpt["prompts"])
    maps, _ = detect_all(model, test.images, assign, [chosen[c][1] for c in classes], device)
    return maps, np.array([s.label for s in test.samples], float)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="final.pt of a training run")
    p.add_argument("--pools", type=int, nargs="+", default=list(POOLS))
    p.add_argument("--report-test", type=Path, help="also score this test split (report only)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True, help="result JSON")
    args = p.parse_args(argv)

    import torch

    from lineguard.train.checkpoint import load_model
    from lineguard.train.proxy import judge_validation, synthetic_validation
    from lineguard.train.train_config import TrainConfig
    from lineguard.train.train_data import load_training_data_for, make_synthesizer

    torch.set_num_threads(args.threads)
    started, load_before = time.time(), os.getloadavg()[0]
    model, ckpt = load_model(args.checkpoint)
    shipped_pool = int(model.cfg.score_pool)
    cfg = TrainConfig.model_validate(ckpt["train_config"])
    data = load_training_data_for(cfg)  # the split training made (seed, fraction, val_min)
    families = {
        "training synthesis (the proxy's)": synthetic_validation(
            data, make_synthesizer(data, cfg.synthesis), cfg.seed
        ),
        "judge (held out, never trained on)": judge_validation(data, cfg.seed),
    }
    result: dict = {
        "what": "image AUROC of the shipped map at each image-score pool size",
        "command": "python benchmarks/score_pool.py "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "checkpoint": str(args.checkpoint),
        "input_size": int(model.cfg.input_size),
        "shipped_pool": shipped_pool,
        "validation_images": len(data.val_images),
        "validation": {},
    }
    with torch.no_grad():
        for name, defects in families.items():
            maps, labels = validation_maps(model, ckpt, data, defects, "cpu")
            result["validation"][name] = pooled_aurocs(model, maps, labels, args.pools)
        if args.report_test is not None:
            maps, labels = test_maps(model, ckpt, args.report_test, model.cfg.input_size, "cpu")
            result["test_for_the_report_only"] = pooled_aurocs(model, maps, labels, args.pools)
    result["validation_mean"] = {
        str(k): float(np.mean([v[str(k)] for v in result["validation"].values()]))
        for k in args.pools
    }
    result["validation_prefers"] = int(
        max(args.pools, key=lambda k: result["validation_mean"][str(k)])
    )
    result["loadavg"] = {"before": load_before, "after": os.getloadavg()[0]}
    result["seconds"] = round(time.time() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, row in result["validation"].items():
        print(name, {k: round(v, 4) for k, v in row.items()})
    if "test_for_the_report_only" in result:
        print(
            "test (report only)",
            {k: round(v, 4) for k, v in result["test_for_the_report_only"].items()},
        )
    print(f"validation prefers pool {result['validation_prefers']} (ships {shipped_pool})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
