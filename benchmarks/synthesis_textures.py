"""Which texture source for Perlin defects? A small CPU experiment on real data (PIPED).

DTD, the paper's texture set, is not available offline. This trains the same tiny OneNIP with
each offline source — ``procedural``, ``images`` (other classes' training images), ``mixed``
(50/50) — plus a control without Perlin defects (CutPaste + Scar only), for the same epochs and
seeds, and evaluates each on the PIPED test set with the fixed golden prompt per class (test
images are used only to judge, never to fit anything).

    .venv/bin/python benchmarks/synthesis_textures.py --data DATA/piped \
        --epochs 10 --seeds 0

Writes benchmarks/results/synthesis_textures.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lineguard.train.evaluate import evaluate_checkpoint
from lineguard.train.pack import open_data
from lineguard.train.train_config import TrainConfig
from lineguard.train.trainer import Trainer

RESULTS = Path(__file__).parent / "results" / "synthesis_textures.json"

MODEL = dict(
    backbone="tf_efficientnet_lite0",
    input_size=128,
    hidden_dim=64,
    nhead=4,
    dim_feedforward=256,
    num_encoder_layers=1,
    num_decoder_layers=1,
    refiner_channels=32,
    score_pool=8,
)

VARIANTS = {
    "procedural": {"textures": "procedural"},
    "images": {"textures": "images"},
    "mixed": {"textures": "mixed"},
    "no_perlin (control)": {"perlin_prob": 0.0},
}


def run(data: Path, variant: str, seed: int, epochs: int, lr: float, test) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig.model_validate(
            dict(
                data={"mvtec": [{"root": str(data.absolute())}]},
                model=MODEL,
                synthesis=VARIANTS[variant],
                epochs=epochs,
                lr=lr,
                seed=seed,
                device="cpu",
                threads=1,
                num_workers=0,
                checkpoint_every=0,
                out_dir=out,
            )
        )
        t0 = time.perf_counter()
        trainer = Trainer(cfg, progress=False)
        final = trainer.fit()
        train_s = time.perf_counter() - t0
        res = evaluate_checkpoint(final, test, prompt="fixed", device="cpu", progress=False)
    return {
        "variant": variant,
        "seed": seed,
        "train_s": round(train_s, 1),
        "val_synthetic_image_auroc": trainer.metrics.get("val_synthetic_image_auroc"),
        "mean": res["mean"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-3, help="raised for the tiny width")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--summarize-only", action="store_true", help="recompute the summary")
    args = ap.parse_args()
    torch.set_num_threads(1)
    runs = []
    if args.summarize_only:
        args.seeds = []
        runs = json.loads(RESULTS.read_text())["runs"]
    else:
        full = open_data(args.data, MODEL["input_size"], progress=False)
        test = full.select(lambda s: s.split == "test")
    for seed in args.seeds:
        for variant in args.variants:
            r = run(args.data, variant, seed, args.epochs, args.lr, test)
            print(json.dumps(r), flush=True)
            runs.append(r)
    if RESULTS.is_file():  # merge: variants/seeds may be run one invocation at a time
        old = json.loads(RESULTS.read_text())
        if old.get("epochs") == args.epochs and old.get("lr") == args.lr:
            done = {(r["variant"], r["seed"]) for r in runs}
            runs = [r for r in old["runs"] if (r["variant"], r["seed"]) not in done] + runs
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in runs)]
    seeds = sorted({r["seed"] for r in runs})
    keys = list(runs[0]["mean"])
    summary = {}
    for variant in variants:
        rows = [r["mean"] for r in runs if r["variant"] == variant]
        summary[variant] = {
            k: {
                "mean": float(np.mean([x[k] for x in rows])),
                "std": float(np.std([x[k] for x in rows])),
                "n": len(rows),
            }
            for k in keys
        }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "what": "PIPED test metrics (fixed prompts) of a tiny OneNIP trained with each "
                "Perlin texture source; same recipe, epochs and seeds",
                "command": "benchmarks/synthesis_textures.py --data DATA/piped "
                f"--epochs {args.epochs} --seeds {' '.join(map(str, seeds))}",
                "model": MODEL,
                "epochs": args.epochs,
                "lr": args.lr,
                "seeds": seeds,
                "cpu_count": os.cpu_count(),
                "summary": summary,
                "runs": runs,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
