"""Optimizer steps per budget: one training process against two, side by side in one run (CPU).

    python benchmarks/train_processes.py --data DATA/mtd --budget 4m \
        --out benchmarks/results/train_processes_mtd.json

Runs the default ``lineguard train`` command twice, one after the other (run it alone on the
machine): one process of batch 8 with a synthesis worker (the CPU default before), and two
data-parallel processes of batch 4 (the CPU default now); same data, same budget, same step
batch of 8. Records for each: steps, wall time, the best validation proxy (the figure every
recipe choice is ranked by; no test data is read) and the machine load; then the ratio of steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from lineguard.train.checkpoint import read_checkpoint

VARIANTS = {
    "one process (batch 8, 1 synthesis worker)": [
        "--processes",
        "1",
        "--batch-size",
        "8",
        "--workers",
        "1",
        "--threads",
        "1",
    ],
    "two processes (batch 4 each)": [
        "--processes",
        "2",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--threads",
        "1",
    ],
}


def run_one(data: str, budget: str, out: Path, extra: list[str]) -> dict:
    """Train with the default recipe plus ``extra``; the row of its final.pt metrics."""
    lineguard = [sys.executable, "-m", "lineguard.runtime.cli"]
    args = ["train", "--data", data, "--budget", budget, "--out", str(out), "--no-progress"]
    load_before = round(os.getloadavg()[0], 2)
    t0 = time.perf_counter()
    subprocess.run([*lineguard, *args, *extra], check=True, stdout=subprocess.DEVNULL)
    m = read_checkpoint(out / "final.pt")["metrics"]
    curve = m["curve"]
    return {
        "command": " ".join(["lineguard", *args, *extra]),
        "processes": m.get("processes", 1),
        "steps": m["steps"],
        "budget_s": m["budget_s"],
        "wall_time_s": m["wall_time_s"],
        "run_s": round(time.perf_counter() - t0, 1),
        "best_val_proxy": round(max(p["val_proxy"] for p in curve), 4),
        "val_proxy_curve": [{"wall_s": p["wall_s"], "val_proxy": p["val_proxy"]} for p in curve],
        "load_before": load_before,
        "load_at_evaluations": m["loadavg"]["mean_at_evaluations"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="dataset root (MVTec layout) or pack")
    ap.add_argument("--budget", default="4m", help="training budget of each run")
    ap.add_argument("--work", type=Path, default=Path("runs/train_processes"))
    ap.add_argument("--out", type=Path, required=True, help="result JSON")
    args = ap.parse_args()
    rows = {}
    for i, (name, extra) in enumerate(VARIANTS.items()):
        rows[name] = run_one(args.data, args.budget, args.work / f"v{i}", extra)
        print(name, rows[name]["steps"], "steps", flush=True)
    one, two = rows.values()
    result = {
        "what": "optimizer steps and validation proxy in one training budget, 1 vs 2 processes",
        "command": "python benchmarks/train_processes.py " + " ".join(sys.argv[1:]),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "runs": rows,
        "steps_ratio_two_over_one": round(two["steps"] / max(one["steps"], 1), 3),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("steps_ratio_two_over_one", "cpu_count")}))


if __name__ == "__main__":
    main()
