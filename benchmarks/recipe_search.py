"""Which recipe wins within a budget? Train candidates one after another, rank them on VALIDATION.

Every candidate is the default recipe (`lineguard.train.auto_recipe`) with a few keys changed,
trained with `lineguard train --config` under the same wall-clock budget, ONE at a time (two at
once halve both). The ranking uses only validation figures stored in each `final.pt`:
`lineguard.train.proxy.recipe_score`, the mean of the training-family proxy and the held-out
judge. With `--report-test` each model is also evaluated on the test split, for the report
only: it says how well the ranking agreed with the test set (Spearman), never which one is chosen.

    python benchmarks/recipe_search.py --data DATASET --name mtd --budget 6m \
        --candidate lr=4e-4 --candidate lr=1e-4 --candidate model.input_size=128 --report-test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml


def _set(recipe: dict, dotted: str, value: str) -> None:
    node = recipe
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = yaml.safe_load(value)


def _judge(ckpt_path: Path, spec: str) -> dict:
    """The proxy of a trained model on validation defects of a FIXED synthesis (same for all)."""
    from lineguard.train.checkpoint import load_model
    from lineguard.train.proxy import proxy_and_calibration, synthetic_validation
    from lineguard.train.synthesis import SynthesisConfig
    from lineguard.train.train_config import TrainConfig
    from lineguard.train.train_data import load_training_data_for, make_synthesizer

    model, ckpt = load_model(ckpt_path)
    tc = TrainConfig.model_validate(ckpt["train_config"])
    data = load_training_data_for(tc)
    synth_cfg: dict = {}
    for item in spec.split(","):
        key, _, value = item.partition("=")
        synth_cfg[key.strip()] = yaml.safe_load(value)
    synth = make_synthesizer(data, SynthesisConfig(**synth_cfg))
    defects = synthetic_validation(data, synth, tc.seed + 1)
    proxy, _ = proxy_and_calibration(model, data, defects, "cpu")
    return {**proxy, "synthesis": synth_cfg}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path, help="MVTec-layout dataset root")
    ap.add_argument("--name", required=True, help="dataset name for the result file")
    ap.add_argument("--budget", default="6m", help="training budget per candidate")
    ap.add_argument(
        "--candidate",
        action="append",
        required=True,
        metavar="K=V[,K=V]",
        help="recipe keys to change from the default (dotted, e.g. model.input_size=160)",
    )
    ap.add_argument("--work", type=Path, default=Path("runs/recipe_search"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--report-test", action="store_true", help="also evaluate on test (report)")
    ap.add_argument(
        "--judge-synthesis",
        metavar="K=V[,K=V]",
        help="also score every model on ONE common validation defect set drawn with these "
        "synthesis keys (e.g. perlin_prob=0: a defect family the candidates differ not in), and "
        "rank by that: for candidates that change the synthesis itself",
    )
    args = ap.parse_args()

    import torch

    from lineguard.train.auto_recipe import default_recipe
    from lineguard.train.checkpoint import read_checkpoint
    from lineguard.train.proxy import recipe_score
    from lineguard.train.train_config import DataConfig

    data = DataConfig.model_validate({"mvtec": [{"root": str(args.data.absolute())}]})
    base, why = default_recipe(data, torch.cuda.is_available())
    rows = []
    for cand in args.candidate:
        recipe = json.loads(json.dumps(base))
        for item in cand.split(","):
            key, _, value = item.partition("=")
            _set(recipe, key.strip(), value.strip())
        tag = cand.replace("=", "-").replace(",", "_").replace(".", "")
        out = args.work / args.name / tag
        recipe["out_dir"] = str(out.absolute())
        out.mkdir(parents=True, exist_ok=True)
        cfg_path = out / "recipe.yaml"
        cfg_path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
        cmd = [
            "lineguard",
            "train",
            "--config",
            str(cfg_path),
            "--budget",
            args.budget,
            "--no-progress",
        ]
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        row = {
            "candidate": cand,
            "command": " ".join(cmd),
            "loadavg_before": round(load0, 2),
            "loadavg_after": round(os.getloadavg()[0], 2),
            "run_s": round(time.perf_counter() - t0, 1),
        }
        ckpt = read_checkpoint(out / "final.pt")
        m = ckpt["metrics"]
        row.update(
            {
                k: m.get(k)
                for k in (
                    "val_proxy",
                    "val_synthetic_image_auroc",
                    "val_synthetic_pixel_ap",
                    "steps",
                    "wall_time_s",
                )
            }
        )
        row["curve"] = [{k: p.get(k) for k in ("wall_s", "val_proxy")} for p in m["curve"]]
        row["recipe_score"] = recipe_score(m)
        row["rank_by"] = row["recipe_score"]["score"] or row["val_proxy"]
        if args.judge_synthesis:
            row["judge"] = _judge(out / "final.pt", args.judge_synthesis)
            row["rank_by"] = row["judge"]["val_proxy"]
        if args.report_test:
            from lineguard.train.evaluate import evaluate_checkpoint

            res = evaluate_checkpoint(ckpt, args.data, progress=False)
            row["test"] = res["mean"]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
    ranked = sorted(rows, key=lambda r: -(r["rank_by"] or 0))
    result = {
        "dataset": args.name,
        "budget": args.budget,
        "base": why,
        "ranked_by": "judge synthesis" if args.judge_synthesis else "recipe_score",
        "chosen": ranked[0]["candidate"],
        "candidates": rows,
    }
    if args.report_test and len(rows) > 2:
        from scipy.stats import spearmanr

        ranking = [r["rank_by"] for r in rows]
        result["ranking_vs_test_spearman"] = {
            k: float(spearmanr(ranking, [r["test"][k] for r in rows]).statistic)
            for k in ("image_auroc", "pixel_ap", "aupro")
        }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"recipe_search_{args.name}.json"
    path.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
