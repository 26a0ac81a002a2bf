"""Seconds per training step of the default CPU recipe: eager against torch.compile, one run.

    python benchmarks/train_step_variants.py --data DATA/mtd \
        --out benchmarks/results/train_step_variants_mtd.json

The default recipe for the data (`train/auto_recipe.py`) in one process of one thread at the
batch one rank trains on (4), the loader's synthesis included: the same loader batches go
through the eager step and through the step wrapped in ``torch.compile`` (inductor; its C++
compile needs a compiler on the training machine), each after warm-up steps, alternating
``--rounds`` times so that a change in the machine's load falls on both. Records the seconds per
step of each, the compile time (the first compiled steps) and the load. Run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from lineguard.train.auto_recipe import default_recipe
from lineguard.train.cli import data_override
from lineguard.train.train_config import DataConfig, TrainConfig
from lineguard.train.trainer import Trainer


def _timed(trainer: Trainer, step, batches, feats, images) -> float:
    t = time.perf_counter()
    for b in batches:
        trainer._step(step, b, feats, images)
    return (time.perf_counter() - t) / len(batches)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="dataset root (MVTec layout) or pack")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per variant and round")
    ap.add_argument("--rounds", type=int, default=2, help="eager/compiled alternations")
    ap.add_argument("--batch-size", type=int, default=4, help="batch of one rank (default 4)")
    ap.add_argument("--variants", nargs="+", default=["eager", "compile"])
    ap.add_argument("--out", type=Path, required=True, help="result JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    data = DataConfig.model_validate(data_override([Path(args.data)]))
    recipe, _ = default_recipe(data, cuda=False)
    with tempfile.TemporaryDirectory() as out:
        recipe.update(
            threads=1,
            num_workers=0,
            processes=1,
            batch_size=args.batch_size,
            budget=None,
            epochs=1,
            out_dir=out,
        )
        trainer = Trainer(TrainConfig.model_validate(recipe), progress=False)
        loader, feats, images, eager = trainer._prepare()
    trainer.model.train()
    it = iter(loader)

    def batches(n: int) -> list:
        nonlocal it
        got = []
        while len(got) < n:
            try:
                got.append(next(it))
            except StopIteration:
                it = iter(loader)
        return got

    steps = {"eager": eager}
    rows: dict[str, dict] = {v: {"seconds_per_step": []} for v in args.variants}
    load_before = round(os.getloadavg()[0], 2)
    warm = batches(3)
    for name in args.variants:
        if name == "compile":
            steps[name] = torch.compile(eager, dynamic=False)
        t = time.perf_counter()
        for b in warm:
            trainer._step(steps[name], b, feats, images)
        rows[name]["warm_up_s (3 steps, compile included)"] = round(time.perf_counter() - t, 1)
    for _ in range(args.rounds):
        timed = batches(args.steps)
        for name in args.variants:
            rows[name]["seconds_per_step"].append(
                round(_timed(trainer, steps[name], timed, feats, images), 4)
            )
    for row in rows.values():
        row["mean_s"] = round(sum(row["seconds_per_step"]) / len(row["seconds_per_step"]), 4)
    result = {
        "what": __doc__.split("\n\n")[0],
        "command": "python benchmarks/train_step_variants.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "recipe": {k: recipe[k] for k in ("batch_size", "threads")} | recipe["model"],
        "variants": rows,
        "load_before": load_before,
        "load_after": round(os.getloadavg()[0], 2),
    }
    if {"eager", "compile"} <= set(rows):
        result["compile_over_eager"] = round(rows["compile"]["mean_s"] / rows["eager"]["mean_s"], 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v["mean_s"] for k, v in rows.items()}), "->", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
