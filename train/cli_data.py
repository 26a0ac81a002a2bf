"""`lineguard data pack` and `lineguard evaluate`.

Kept free of torch/cv2/sklearn imports at module level so `lineguard --help` stays fast and the
edge install (no torch) can still list the commands.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lineguard.runtime.errors import LineGuardError


def _folder_arg(text: str) -> tuple[str, str]:
    folder, sep, category = text.rpartition("=")
    if not sep or not folder or not category:
        raise argparse.ArgumentTypeError(f"expected DIR=CATEGORY, got {text!r}")
    return folder, category


def register(sub: argparse._SubParsersAction) -> None:
    """Register `data pack`, `data tile` and `evaluate`."""
    data = sub.add_parser(
        "data",
        help="prepare datasets (pack images at training resolution)",
        description="Dataset tools for training and evaluation.",
    )
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION")
    p = dsub.add_parser(
        "pack",
        help="write a compact .npz cache of a dataset at training resolution",
        description=(
            "Read MVTec-layout datasets (<category>/train/good, test/<defect>, "
            "ground_truth/<defect>/<stem>_mask.png) and/or plain folders of normal captures, "
            "resize every image (cv2 INTER_AREA) and mask (nearest) to --size, and store them "
            "losslessly in ONE .npz with the sample index and a content fingerprint. Training "
            "and evaluation accept the .npz wherever they accept --data; use it to move a "
            "dataset to a GPU machine."
        ),
    )
    p.add_argument(
        "--data",
        nargs="+",
        default=[],
        metavar="ROOT",
        help="MVTec-layout dataset root(s) or single category folder(s)",
    )
    p.add_argument("--categories", nargs="+", metavar="NAME", help="only these categories")
    p.add_argument(
        "--folder",
        action="append",
        type=_folder_arg,
        default=[],
        metavar="DIR=CATEGORY",
        help="a folder (recursive) of NORMAL station captures, as training images",
    )
    p.add_argument("--size", type=int, default=224, help="square side in pixels (default 224)")
    p.add_argument(
        "--codec",
        choices=["png", "webp"],
        default="png",
        help="lossless image codec: png (fast) or webp (smaller, slower)",
    )
    p.add_argument("--out", required=True, type=Path, help="output .npz file")
    p.set_defaults(handler=_pack)
    data.set_defaults(handler=lambda args: (data.print_help(), 2)[1])

    e = sub.add_parser(
        "evaluate",
        help="evaluate a checkpoint: per-class image/pixel AUROC, AP and AUPRO",
        description=(
            "Score every test image of --data with the checkpoint's model against a FIXED "
            "prompt per class (as a station does) and report per-class and mean image AUROC, "
            "image AP, pixel AUROC, pixel AP and AUPRO (FPR <= 0.3). Nothing is fitted on test "
            "images. Optional: mean ± std over random prompt draws, class-agnostic prompt "
            "retrieval, raw maps for other tools."
        ),
    )
    e.add_argument("--checkpoint", required=True, type=Path, help="training checkpoint (.pt)")
    e.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="ROOT",
        help="MVTec-layout root(s) or a .npz pack made at the model's input size",
    )
    e.add_argument("--categories", nargs="+", metavar="NAME", help="only these categories")
    e.add_argument(
        "--prompt",
        default="fixed",
        help="fixed (checkpoint's golden sample; default), first (first training "
        "image of the class), FILE (for every class) or CLASS=FILE[,...]",
    )
    e.add_argument(
        "--random-prompts",
        type=int,
        default=0,
        metavar="N",
        help="also report mean ± std over N random prompt draws (e.g. 5)",
    )
    e.add_argument(
        "--retrieval",
        action="store_true",
        help="also pick each image's prompt by pooled-feature cosine similarity and "
        "report how often it picks the right class",
    )
    e.add_argument("--out", type=Path, help="folder for metrics.json, metrics.md, <class>.png")
    e.add_argument(
        "--save-maps",
        type=Path,
        metavar="DIR",
        help="write DIR/<category>/<defect>/<stem>.npy and DIR/scores.csv (with --tile-scale "
        "the maps are at the ORIGINAL image size)",
    )
    add_tiling_args(e)
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--seed", type=int, default=0, help="seed of the random prompt draws")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.set_defaults(handler=_evaluate)

    t = dsub.add_parser(
        "tile",
        help="cut normal training images into tiles, one category per grid position",
        description=(
            "Training at the scale of the defect without a trainer change: every normal "
            "training image is cut with a tiled station's grid into OUT/<class>@r<row>c<col>/"
            "train/good, so the trainer pairs each query tile with the same-position tile of "
            "another normal image. Train on OUT at the tile size, evaluate with --tile-scale."
        ),
    )
    t.add_argument("--data", nargs="+", required=True, metavar="ROOT", help="MVTec-layout root(s)")
    t.add_argument("--categories", nargs="+", metavar="NAME", help="only these categories")
    t.add_argument("--tile", type=int, required=True, help="tile size = the model's input size")
    add_tiling_args(t)
    t.add_argument("--out", required=True, type=Path, help="output dataset folder")
    t.set_defaults(handler=_tile)


def add_tiling_args(p: argparse.ArgumentParser) -> None:
    """--tile-scale/--tile-overlap/--tile-prompt: the same grid as a station's `tiling`."""
    p.add_argument(
        "--tile-scale",
        type=float,
        default=None,
        metavar="S",
        help="tile at S image pixels per model pixel (1 = native) instead of a square resize",
    )
    p.add_argument("--tile-overlap", type=float, default=0.25, help="least tile overlap (0-0.75)")
    p.add_argument(
        "--tile-prompt",
        choices=["per-tile", "shared"],
        default="per-tile",
        help="prompt per grid position (default) or the centre tile for all (textures)",
    )


def tiling_of(args: argparse.Namespace, default_scale: float | None = None):
    """A `TilingConfig` from the flags, or None (no --tile-scale: today's square resize)."""
    scale = args.tile_scale if args.tile_scale is not None else default_scale
    if scale is None:
        return None
    from lineguard.runtime.tiling import TilingConfig

    return TilingConfig(
        scale=scale, overlap=args.tile_overlap, prompt=args.tile_prompt, max_tiles=4096
    )


def _tile(args: argparse.Namespace) -> int:
    from lineguard.train.tiles import tile_dataset

    tiling = tiling_of(args, default_scale=1.0)
    counts = tile_dataset(args.data, args.out, args.tile, tiling, args.categories)
    print(
        f"wrote {sum(counts.values())} tiles of {args.tile} px in {len(counts)} position "
        f"categories (scale {tiling.scale:g}) into {args.out}"
    )
    return 0


def _pack(args: argparse.Namespace) -> int:
    from lineguard.train.pack import open_data, save_pack

    if not args.data and not args.folder:
        raise LineGuardError("nothing to pack: give --data ROOT and/or --folder DIR=CATEGORY")
    if args.size < 16:
        raise LineGuardError(f"--size {args.size} is too small")
    pack = open_data(args.data, args.size, args.categories, folders=args.folder)
    out = save_pack(pack, args.out, codec=args.codec)
    n_test = sum(s.split == "test" for s in pack.samples)
    cats = sorted({s.category for s in pack.samples})
    print(
        f"packed {len(pack)} images ({len(pack) - n_test} train, {n_test} test) of "
        f"{len(cats)} categories at {args.size}x{args.size} px into {out} "
        f"({out.stat().st_size / 1e6:.1f} MB, fingerprint {pack.fingerprint[:16]})"
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    from lineguard.train.evaluate import evaluate_checkpoint
    from lineguard.train.report import markdown_table

    data = args.data[0] if len(args.data) == 1 else args.data
    with torch.no_grad():  # scoped: a process-wide switch would leak into later callers
        results = evaluate_checkpoint(
            args.checkpoint,
            data,
            categories=args.categories,
            prompt=args.prompt,
            random_prompts=args.random_prompts,
            retrieval=args.retrieval,
            out_dir=args.out,
            save_maps=args.save_maps,
            device=args.device,
            batch_size=args.batch_size,
            seed=args.seed,
            progress=not args.no_progress,
            tiling=tiling_of(args),
        )
    print(markdown_table(results))
    if args.out:
        print(f"wrote {args.out / 'metrics.json'}, {args.out / 'metrics.md'} and class PNGs")
    return 0
