"""How should the refiner map be scaled before fusion? Compare rules for c on a checkpoint.

The final map is (1-α)·S_rec + α·c·M̂. The official code sets c from the TEST set (transductive);
a station cannot. This scores the test images of a dataset once (fixed golden prompts), then
recomputes the metrics for several rules for c:

* ``val_std_ratio`` (ours, what the trainer stores): std(S_rec) / std(M̂) on NORMAL val pixels,
* ``val_midrange``: the official formula, (max + min)/2 of S_rec, on normal val images,
* ``test_midrange`` (official, transductive — for reference only),
* ``val_range_ratio``: range(S_rec) / range(M̂) on normal val images (and p99−p1 ranges),
* ``S_rec only`` and ``M̂ only`` (α = 0 and α = 1).

    .venv/bin/python benchmarks/fusion_scale.py --checkpoint CKPT --data ../shared/data/piped

Writes benchmarks/results/fusion_scale_<dataset>.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from lineguard.train.calibration import fusion_scale, midrange_scale, score_parts
from lineguard.train.checkpoint import load_model, prompt_images
from lineguard.train.data import scan_mvtec
from lineguard.train.metrics import class_metrics, mean_metrics
from lineguard.train.pack import load_arrays, open_data


def _spread(x: np.ndarray, q: float) -> float:
    """Robust range: q-th minus (100-q)-th percentile."""
    lo, hi = np.percentile(x, [100 - q, q])
    return float(hi - lo)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="MVTec-layout root")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, ckpt = load_model(args.checkpoint)
    size, classes = model.cfg.input_size, ckpt["classes"]
    cls_id = {c: i for i, c in enumerate(classes)}
    prompts = [prompt_images(ckpt)[c] for c in classes]

    val_keys = set(ckpt["split"]["val"])
    val = [s for s in scan_mvtec(args.data) if f"{s.dataset}/{s.rel_path}" in val_keys]
    val_imgs, _ = load_arrays(val, size, progress=False)
    v_rec, v_hat = score_parts(model, val_imgs, [cls_id[s.category] for s in val], prompts, "cpu")

    test = open_data(args.data, size, progress=False).select(lambda s: s.split == "test")
    labels = [cls_id[s.category] for s in test.samples]
    t_rec, t_hat = score_parts(model, test.images, labels, prompts, "cpu")

    alpha = model.cfg.fusion_alpha
    rules = {
        "val_std_ratio (ours: the trainer's rule)": (alpha, fusion_scale(v_rec, v_hat)),
        "val_midrange": (alpha, midrange_scale(v_rec)),
        "test_midrange (official, transductive)": (alpha, midrange_scale(t_rec)),
        "val_range_ratio": (alpha, float(np.ptp(v_rec) / max(np.ptp(v_hat), 1e-12))),
        "val_p99_range_ratio": (alpha, _spread(v_rec, 99) / max(_spread(v_hat, 99), 1e-12)),
        "S_rec only": (0.0, 1.0),
        "M_hat only": (1.0, 1.0),
    }
    cats = np.array([s.category for s in test.samples])
    y = np.array([s.label for s in test.samples])
    out = {}
    for name, (a, c) in rules.items():
        maps = (1 - a) * t_rec + a * c * t_hat
        with torch.no_grad():
            scores = model.image_score(torch.from_numpy(maps[:, None])).numpy()
        per_class = {
            cls: class_metrics(
                y[cats == cls], scores[cats == cls], test.masks[cats == cls], maps[cats == cls]
            )
            for cls in classes
        }
        out[name] = {"alpha": a, "c": c, "mean": mean_metrics(per_class)}
        print(name, json.dumps(out[name]), flush=True)
    dataset = test.samples[0].dataset
    path = Path(__file__).parent / "results" / f"fusion_scale_{dataset}.json"
    path.write_text(
        json.dumps(
            {
                "what": "test metrics (fixed prompts) of one checkpoint for rules of the fusion "
                "scale c; every val_* rule is usable at a station, test_midrange is not",
                "checkpoint": str(args.checkpoint),
                "checkpoint_epoch": ckpt["epoch"],
                "model": ckpt["model_config"],
                "val_images": len(val),
                "command": f"benchmarks/fusion_scale.py --checkpoint CKPT --data {args.data}",
                "rules": out,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
