"""Seconds per training epoch on this CPU for a recipe, at several thread counts.

    .venv/bin/python benchmarks/train_cpu_speed.py --config configs/train/cpu_small.yaml \
        --data DATA/piped --epochs 2 --threads 1 2

Writes benchmarks/results/train_cpu_speed.json (one entry per recipe and thread count; later
runs of other recipes are merged in). The machine is shared, so the load average before and
after each run and the CPU seconds (process + workers, all threads) are recorded next to the
wall time: on a busy machine wall time overstates the cost, CPU time much less so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from lineguard.train.train_config import load_train_config
from lineguard.train.trainer import Trainer

RESULTS = Path(__file__).parent / "results" / "train_cpu_speed.json"


def measure(config: Path, data: Path, epochs: int, threads: int, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        over = {
            "data": {"mvtec": [{"root": str(data.absolute())}], "folders": [], "pack": None},
            "epochs": epochs,
            "threads": threads,
            "num_workers": workers,
            "device": "cpu",
            "checkpoint_every": 0,
            "out_dir": out,
        }
        cfg = load_train_config(config, over)
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        trainer = Trainer(cfg, progress=False)
        setup = time.perf_counter() - t0
        t1 = time.perf_counter()
        trainer.fit()
        total = time.perf_counter() - t1
        per_epoch = [row["seconds"] for row in trainer.history]
        return {
            "recipe": config.name,
            "backbone": cfg.model.backbone,
            "input_size": cfg.model.input_size,
            "layers": [cfg.model.num_encoder_layers, cfg.model.num_decoder_layers],
            "hidden_dim": cfg.model.hidden_dim,
            "threads": threads,
            "num_workers": workers,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default (active spin)"),
            "batch_size": cfg.batch_size,
            "train_images": len(trainer.data.train),
            "steps_per_epoch": -(-len(trainer.data.train) // cfg.batch_size),
            "epochs": epochs,
            "seconds_per_epoch": per_epoch,
            "seconds_per_epoch_min": min(per_epoch),
            "cpu_seconds_per_epoch": [row["cpu_seconds"] for row in trainer.history],
            "setup_s (load images, model)": round(setup, 2),
            "fit_s (incl. feature cache + final calibration)": round(total, 2),
            "loadavg_before": round(load_before, 2),
            "loadavg_after": round(os.getloadavg()[0], 2),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--workers", type=int, default=None, help="default: the recipe's")
    args = ap.parse_args()
    runs = []
    for threads in args.threads:
        workers = args.workers
        if workers is None:
            workers = load_train_config(args.config).num_workers
        res = measure(args.config, args.data, args.epochs, threads, workers)
        print(json.dumps(res))
        runs.append(res)
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"runs": []}

    def key(r: dict) -> tuple:
        policy = r.get("omp_wait_policy", "default (active spin)")
        return r["recipe"], r["threads"], r["num_workers"], policy

    keep = [r for r in old["runs"] if key(r) not in {key(n) for n in runs}]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "what": "seconds per training epoch on a CPU (shared machine: see loadavg)",
                "cpu": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(),
                "torch": torch.__version__,
                "command": "benchmarks/train_cpu_speed.py --config CONFIG --data DATA "
                "--epochs N --threads 1 2",
                "runs": keep + runs,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
