"""How should the refiner map be scaled before fusion? Choose the rule for c on VALIDATION data.

The final map is (1-α)·S_rec + α·c·M̂. The official code sets c from the TEST set (transductive);
a station cannot. This scores, with fixed golden prompts, the checkpoint's NORMAL validation
images and a synthetic-defect copy of each (the training proxy's set, `train/proxy.py`), and
ranks rules for c by the validation proxy (mean of image AUROC and synthetic pixel AP):

* ``val_std_ratio`` (what the trainer stores): std(S_rec) / std(M̂) on NORMAL val pixels,
* ``val_midrange``: the official formula, (max + min)/2 of S_rec, on normal val images,
* ``val_range_ratio``: range(S_rec) / range(M̂) on normal val images (and p99−p1 ranges),
* ``S_rec only`` and ``M̂ only`` (α = 0 and α = 1).

The rule with the best validation proxy is the choice. The test metrics of every rule are written
beside it for the report only (with the transductive test midrange as a reference); they choose
nothing.

    .venv/bin/python benchmarks/fusion_scale.py --checkpoint CKPT --data DATASET_ROOT

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
from lineguard.train.metrics import class_metrics, mean_metrics
from lineguard.train.pack import open_data
from lineguard.train.proxy import synthetic_validation
from lineguard.train.train_config import DataConfig, MvtecSource, TrainConfig
from lineguard.train.train_data import load_training_data_for, make_synthesizer


def _spread(x: np.ndarray, q: float) -> float:
    """Robust range: q-th minus (100-q)-th percentile."""
    lo, hi = np.percentile(x, [100 - q, q])
    return float(hi - lo)


def _proxy(model, rec, hat, a, c, n_normal, masks) -> dict[str, float]:
    from sklearn.metrics import average_precision_score, roc_auc_score

    maps = (1 - a) * rec + a * c * hat
    with torch.no_grad():
        scores = model.image_score(torch.from_numpy(maps[:, None])).numpy()
    y = np.r_[np.zeros(n_normal), np.ones(len(maps) - n_normal)]
    auroc = float(roc_auc_score(y, scores))
    ap = float(average_precision_score(masks.ravel() > 0.5, maps[n_normal:].ravel()))
    return {"image_auroc": auroc, "pixel_ap": ap, "val_proxy": 0.5 * (auroc + ap)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="MVTec-layout root")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, ckpt = load_model(args.checkpoint)
    size, classes = model.cfg.input_size, ckpt["classes"]
    cls_id = {c: i for i, c in enumerate(classes)}
    prompts = [prompt_images(ckpt)[c] for c in classes]

    tc = TrainConfig.model_validate(ckpt["train_config"])
    data = load_training_data_for(
        tc, data=DataConfig(mvtec=[MvtecSource(root=args.data, categories=classes)]), size=size
    )
    if [f"{s.dataset}/{s.rel_path}" for s in data.val] != list(ckpt["split"]["val"]):
        raise SystemExit("the validation split rebuilt from the data differs from the checkpoint's")
    bad, masks, bad_labels = synthetic_validation(
        data, make_synthesizer(data, tc.synthesis), tc.seed
    )
    n_val = len(data.val_images)
    v_rec, v_hat = score_parts(
        model,
        np.concatenate([data.val_images, bad]),
        np.concatenate([data.val_labels, bad_labels]),
        prompts,
        "cpu",
    )

    test = open_data(args.data, size, progress=False).select(lambda s: s.split == "test")
    labels = [cls_id[s.category] for s in test.samples]
    t_rec, t_hat = score_parts(model, test.images, labels, prompts, "cpu")

    alpha = model.cfg.fusion_alpha
    nr, nh = v_rec[:n_val], v_hat[:n_val]
    rules = {
        "val_std_ratio": (alpha, fusion_scale(nr, nh)),
        "val_midrange": (alpha, midrange_scale(nr)),
        "val_range_ratio": (alpha, float(np.ptp(nr) / max(np.ptp(nh), 1e-12))),
        "val_p99_range_ratio": (alpha, _spread(nr, 99) / max(_spread(nh, 99), 1e-12)),
        "S_rec only": (0.0, 1.0),
        "M_hat only": (1.0, 1.0),
        "test_midrange (official, transductive; reference only)": (alpha, midrange_scale(t_rec)),
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
        out[name] = {
            "alpha": a,
            "c": c,
            "validation": _proxy(model, v_rec, v_hat, a, c, n_val, masks),
            "test_report_only": mean_metrics(per_class),
        }
        print(name, json.dumps(out[name]), flush=True)
    usable = {k: v for k, v in out.items() if k.startswith(("val_", "S_rec", "M_hat"))}
    chosen = max(usable, key=lambda k: usable[k]["validation"]["val_proxy"])
    dataset = test.samples[0].dataset
    path = Path(__file__).parent / "results" / f"fusion_scale_{dataset}.json"
    path.write_text(
        json.dumps(
            {
                "what": "rules for the fusion scale c of one checkpoint, chosen by the validation "
                "proxy (normal vs synthetic-defect validation images, fixed prompts); test "
                "metrics for the report only",
                "chosen_on_validation": chosen,
                "checkpoint": str(args.checkpoint),
                "model": ckpt["model_config"],
                "val_images": n_val,
                "command": f"benchmarks/fusion_scale.py --checkpoint CKPT --data {args.data}",
                "rules": out,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
