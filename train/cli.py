"""``lineguard train``: train one OneNIP model for all the classes of one or more datasets.

Kept torch-free at import time (``lineguard --help`` must stay fast and light); the handler
imports the trainer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

DESCRIPTION = """\
Train ONE OneNIP model for every class of the given data from normal images only. Synthetic
defects (CutPaste, scars, Perlin+texture blobs) teach the refiner; a random normal image of the
same class is the prompt. At the end the map-fusion scale and the score normalisation are
measured on normal validation images carved from train/good, and OUT/final.pt is written
(format lineguard-onenip/1: weights incl. backbone, config, classes, golden prompts,
calibration, data fingerprint, metrics). OUT/last.pt is the resume point; OUT/train_log.jsonl
has one line per epoch.

Several GPUs: torchrun --nproc_per_node=N $(which lineguard) train --config ...
"""

EPILOG = """\
examples:
  lineguard train --config configs/train/piped.yaml
  lineguard train --config configs/train/cpu_small.yaml --data ../shared/data/piped --epochs 5
  lineguard train --config configs/train/mtd.yaml --data mtd_256.npz --out runs/mtd
  lineguard train --config configs/train/piped.yaml --resume runs/piped/last.pt --epochs 400
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``train`` subcommand."""
    p = sub.add_parser(
        "train",
        help="train a OneNIP model from folders of normal images",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        required=True,
        type=Path,
        metavar="YAML",
        help="training recipe (configs/train/*.yaml); data paths in it are relative to the file",
    )
    p.add_argument(
        "--data",
        nargs="+",
        type=Path,
        metavar="ROOT",
        help="MVTec-layout dataset folder(s), or ONE pack .npz from `lineguard data pack`; "
        "replaces the config's data sources",
    )
    p.add_argument("--epochs", type=int, metavar="N", help="override the number of epochs")
    p.add_argument("--out", type=Path, metavar="DIR", help="output folder (config: out_dir)")
    p.add_argument("--resume", type=Path, metavar="CKPT", help="continue from a checkpoint")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override the device")
    p.add_argument("--batch-size", type=int, metavar="B", help="override batch_size")
    p.add_argument("--workers", type=int, metavar="N", help="override num_workers")
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch CPU threads (on a busy CPU 1 is fastest, or export OMP_WAIT_POLICY=PASSIVE)",
    )
    p.add_argument(
        "--stop-after",
        type=int,
        metavar="EPOCH",
        help="stop after this epoch with OUT/last.pt written (same schedule; --resume continues)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run_train)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Command-line values as config keys (paths made absolute against the cwd)."""
    over: dict[str, Any] = {}
    if args.data:
        paths = [p.expanduser().absolute() for p in args.data]
        if len(paths) == 1 and paths[0].suffix == ".npz":
            over["data"] = {"mvtec": [], "folders": [], "pack": str(paths[0])}
        else:
            for p in paths:
                if p.suffix == ".npz":
                    from lineguard.runtime.errors import LineGuardError

                    raise LineGuardError(f"--data: a pack ({p}) must be the only --data value")
            over["data"] = {"mvtec": [{"root": str(p)} for p in paths], "folders": [], "pack": None}
    simple = {
        "epochs": args.epochs,
        "device": args.device,
        "batch_size": args.batch_size,
        "num_workers": args.workers,
        "threads": args.threads,
    }
    over.update({k: v for k, v in simple.items() if v is not None})
    if args.out is not None:
        over["out_dir"] = str(args.out.expanduser().absolute())
    if args.resume is not None:
        over["resume"] = str(args.resume.expanduser().absolute())
    return over


def run_train(args: argparse.Namespace) -> int:
    from lineguard.runtime.errors import LineGuardError
    from lineguard.train.train_config import load_train_config

    if not args.config.is_file():
        raise LineGuardError(f"training config {args.config} not found")
    cfg = load_train_config(args.config, overrides_from_args(args))
    from lineguard.train.backbone import BackboneError
    from lineguard.train.trainer import Trainer

    try:
        trainer = Trainer(cfg, progress=not args.no_progress)
        final = trainer.fit(stop_epoch=args.stop_after)
    except BackboneError as exc:
        raise LineGuardError(str(exc)) from exc
    if trainer.dist.main:
        done = trainer.history[-1]["epoch"] if trainer.history else trainer.start_epoch
        summary = {
            "checkpoint": str(final if done == cfg.epochs else Path(cfg.out_dir) / "last.pt"),
            "epochs": cfg.epochs,
            "epochs_done": done,
            "classes": len(trainer.data.classes),
            "train_images": len(trainer.data.train),
            "val_images": len(trainer.data.val),
            "wall_time_s": round(trainer.wall_time, 1),
            "fusion_scale": trainer.calibration.get("fusion_scale"),
            **{k: v for k, v in trainer.metrics.items() if k.startswith("val_")},
        }
        print(json.dumps(summary, indent=2))
    return 0
