"""``lineguard train``: train one OneNIP model for all the classes of one or more datasets.

Kept torch-free at import time (``lineguard --help`` must stay fast and light); the handler
imports the trainer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lineguard.train.train_config import TrainConfig

DESCRIPTION = """\
Train ONE OneNIP model for every class of the given data from normal images only. Synthetic
defects (CutPaste, scars, Perlin+texture blobs) teach the refiner; a random normal image of the
same class is the prompt. At the end the map-fusion scale and the score normalisation are
measured on normal validation images carved from train/good, and OUT/final.pt is written
(format lineguard-onenip/1: weights incl. backbone, config, classes, golden prompts,
calibration, data fingerprint, metrics). OUT/last.pt is the resume point; OUT/train_log.jsonl
has one line per epoch.

Without --config the recipe is chosen from the data and the device (backbone, input size and
widths from the image size and count; see docs/training.md) and trained within a 30-minute
wall-clock budget: the learning rate warms up and decays over the budget, and the checkpoint
with the best validation proxy (normal vs synthetic-defect VALIDATION images) becomes final.pt.
--budget gives any recipe a wall-clock budget instead of a number of epochs.

Several GPUs: torchrun --nproc_per_node=N $(which lineguard) train --config ...
"""

EPILOG = """\
examples:
  lineguard train --data my_line --out runs/my_line
  lineguard train --data my_line --budget 10m --out runs/quick
  lineguard train --config configs/train/piped.yaml --data my_line --budget 2h
  lineguard train --config configs/train/cpu_small.yaml --data DATA/piped --epochs 5
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
        type=Path,
        metavar="YAML",
        help="training recipe (configs/train/*.yaml); data paths in it are relative to the file. "
        "Default: a recipe chosen from --data and the device (printed, and saved as "
        "OUT/recipe.yaml)",
    )
    p.add_argument(
        "--budget",
        metavar="TIME",
        help="wall-clock training budget, e.g. 30m, 1.5h, 900 (seconds); replaces --epochs",
    )
    p.add_argument("--lr", type=float, metavar="LR", help="override the (peak) learning rate")
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
        help="torch CPU threads per process (on a busy CPU 1 is fastest, or export "
        "OMP_WAIT_POLICY=PASSIVE)",
    )
    p.add_argument(
        "--processes",
        type=int,
        metavar="N",
        help="CPU: data-parallel training processes (batch size is per process; the CPU "
        "default recipe uses 2 on 2 or more cores)",
    )
    p.add_argument(
        "--stop-after",
        type=int,
        metavar="EPOCH",
        help="stop after this epoch with OUT/last.pt written (same schedule; --resume continues)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run_train)

    r = sub.add_parser(
        "recalibrate",
        help="re-choose a checkpoint's map smoothing, prompt-match share and normal statistics "
        "and re-measure its fusion scales and score normalisation on validation data (no "
        "training)",
        description=(
            "Rebuild the checkpoint's normal validation split from its own recipe, choose the map "
            "smoothing (Gaussian σ) by the validation proxy and the share of the training-free "
            "prompt match on held-out validation defects, fit the normal statistics on the "
            "training split and choose their share the same way, re-measure the map-fusion scales "
            "and the score normalisation on it with the golden prompts, and "
            "write the checkpoint again (atomically). For checkpoints from an older calibration "
            "rule. The data must be the data it was trained on (same fingerprint)."
        ),
    )
    r.add_argument("--checkpoint", required=True, type=Path, metavar="CKPT", help="checkpoint")
    r.add_argument("--out", type=Path, metavar="CKPT2", help="write here (default: in place)")
    r.add_argument(
        "--data",
        nargs="+",
        type=Path,
        metavar="ROOT",
        help="where the training data is now (MVTec roots or ONE pack .npz)",
    )
    r.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device")
    r.add_argument("--threads", type=int, metavar="N", help="torch CPU threads")
    r.set_defaults(handler=run_recalibrate)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Command-line values as config keys (paths made absolute against the cwd)."""
    over: dict[str, Any] = {}
    if args.data:
        over["data"] = data_override(args.data)
    simple = {
        "epochs": args.epochs,
        "device": args.device,
        "batch_size": args.batch_size,
        "num_workers": args.workers,
        "threads": args.threads,
        "processes": args.processes,
        "budget": args.budget,
        "lr": args.lr,
    }
    over.update({k: v for k, v in simple.items() if v is not None})
    if args.out is not None:
        over["out_dir"] = str(args.out.expanduser().absolute())
    if args.resume is not None:
        over["resume"] = str(args.resume.expanduser().absolute())
    return over


def run_recalibrate(args: argparse.Namespace) -> int:
    import torch

    from lineguard.train.recalibrate import recalibrate
    from lineguard.train.train_config import DataConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    data = None
    if args.data:
        data = DataConfig.model_validate(data_override(args.data))
    calib = recalibrate(args.checkpoint, args.out, data, args.device)
    print(json.dumps(calib, indent=2))
    return 0


def data_override(paths: list[Path]) -> dict[str, Any]:
    """--data values as a `data:` section: MVTec roots, or ONE pack file."""
    paths = [p.expanduser().absolute() for p in paths]
    if len(paths) == 1 and paths[0].suffix == ".npz":
        return {"mvtec": [], "folders": [], "pack": str(paths[0])}
    for p in paths:
        if p.suffix == ".npz":
            from lineguard.runtime.errors import LineGuardError

            raise LineGuardError(f"--data: a pack ({p}) must be the only --data value")
    return {"mvtec": [{"root": str(p)} for p in paths], "folders": [], "pack": None}


def _default_config(args: argparse.Namespace):
    """The data- and device-chosen recipe, with the command line's overrides, saved as YAML."""
    import torch
    import yaml

    from lineguard.runtime.errors import LineGuardError
    from lineguard.train.auto_recipe import default_recipe
    from lineguard.train.train_config import DataConfig, TrainConfig, _merge

    if not args.data:
        raise LineGuardError("give --data (the images to train on) or a --config recipe")
    if args.resume is not None:
        raise LineGuardError("--resume needs the run's --config (or OUT/recipe.yaml)")
    over = overrides_from_args(args)
    cuda = args.device == "cuda" or (args.device != "cpu" and torch.cuda.is_available())
    out = Path(over.get("out_dir", "runs/train"))
    recipe, why = default_recipe(DataConfig.model_validate(over["data"]), cuda, out)
    cfg = TrainConfig.model_validate(_merge(recipe, over))
    if cfg.budget is not None and cfg.budget != recipe["budget"]:  # --budget replaced it
        why = why.rsplit(", budget ", 1)[0] + f", budget {cfg.budget / 60:g} min (--budget)"
    print(why, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(
        "# chosen by `lineguard train` from the data and the device\n# "
        + why
        + "\n"
        + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False),
        encoding="utf-8",
    )
    return cfg


def run_train(args: argparse.Namespace) -> int:
    from lineguard.runtime.errors import LineGuardError
    from lineguard.train.train_config import load_train_config

    if args.config is None:
        cfg = _default_config(args)
    elif not args.config.is_file():
        raise LineGuardError(f"training config {args.config} not found")
    else:
        cfg = load_train_config(args.config, overrides_from_args(args))
    from lineguard.train.cpu_parallel import launch, wants_processes

    if wants_processes(cfg):
        print(
            f"training in {cfg.processes} processes of {cfg.threads or 1} thread(s), "
            f"batch {cfg.batch_size} each",
            flush=True,
        )
        launch(cfg, train_and_report, not args.no_progress, args.stop_after)
    else:
        train_and_report(cfg, not args.no_progress, args.stop_after)
    return 0


def train_and_report(cfg: TrainConfig, progress: bool, stop_after: int | None = None) -> None:
    """Train ``cfg`` in this process (one rank of several, or alone); rank 0 prints a summary."""
    from lineguard.runtime.errors import LineGuardError
    from lineguard.train.backbone import BackboneError
    from lineguard.train.trainer import Trainer

    try:
        trainer = Trainer(cfg, progress=progress)
        final = trainer.fit(stop_epoch=stop_after)
    except BackboneError as exc:
        raise LineGuardError(str(exc)) from exc
    if trainer.dist.main:
        done = trainer.history[-1]["epoch"] if trainer.history else trainer.start_epoch
        finished = cfg.budget is not None or done == cfg.epochs
        summary = {
            "checkpoint": str(final if finished else Path(cfg.out_dir) / "last.pt"),
            "epochs": cfg.epochs if cfg.budget is None else done,
            "epochs_done": done,
            "classes": len(trainer.data.classes),
            "train_images": len(trainer.data.train),
            "val_images": len(trainer.data.val),
            "wall_time_s": round(trainer.wall_time, 1),
            "budget_s": cfg.budget,
            "processes": trainer.dist.world,
            "fusion_scale": trainer.calibration.get("fusion_scale"),
            **{k: v for k, v in trainer.metrics.items() if k.startswith("val_")},
        }
        print(json.dumps(summary, indent=2), flush=True)
