"""The default recipe, chosen from the data and the device when `lineguard train` has no --config.

A new user's first model must be the one that wins, not a smoke test, so the rule below is the
recipe measured best on VALIDATION data (the proxy of :mod:`lineguard.train.proxy`) within a
30-minute budget on a 2-core CPU, and the spec's architecture on a GPU. The rule (also in
docs/training.md):

* CPU: EfficientNet-Lite0, transformer D 128 with 2+2 layers and no dropout, batch 8
  per step, bf16 autocast where the CPU has native bf16; on 2 or more cores the step's batch is
  split over 2 data-parallel processes of 4 (:func:`cpu_hardware`). Input 224 px (score pool
  14) where the median short side is 224 px or more, 192 px (score pool 12) where it is 192 px
  or more, else 160 px (score pool 10). Within a fixed
  budget, optimizer steps matter more than width: batch 16 did not beat batch 8, no dropout beat
  0.1, peak lr 4e-4 beat 1e-4 and 1.5e-3, and in 5 minutes 128 px beat 160 px
  (``benchmarks/results/recipe_search_mtd*``). In full 30-minute two-process runs the larger
  input ranked first by :func:`lineguard.train.proxy.recipe_score` each time although it makes
  fewer steps: on mtd (median short side 256 px) 160 over 128 px 0.653 vs 0.647 (proxy 0.751 vs
  0.754, held-out judge 0.556 vs 0.540; ``benchmarks/results/input160_mtd``), then 192 over
  160 px 0.671 vs 0.652 (proxy 0.738 vs 0.751, judge 0.604 vs 0.553, 3 740 steps vs 5 253;
  ``benchmarks/results/input192_mtd``, registered before it ran); and, registered before it
  ran, on piped's 128-px patches upsampled to 160: 0.707 vs 0.703
  (proxy 0.821 vs 0.800, judge 0.594 vs 0.605); then, registered before it ran, mtd at 224
  over 192 px 0.6830 vs 0.6794 (proxy 0.745 vs 0.747, judge 0.621 vs 0.611, 4 179 steps vs
  5 656; the 224-px run is ``benchmarks/results/train_mtd.json``). More tokens (10x10
  instead of 8x8) give finer maps. Frames far larger, with small defects, are a case for
  tiling (the station's ``tiling`` setting), not for a larger square input; tiles cut by
  ``lineguard data tile`` are trained at their own size on either device, because stations
  cut tiles at the model's input size.
* GPU: EfficientNet-Lite2, the spec's D 256 with 4+4 layers, batch 16, bf16; input 224 px, or
  256 px when the median short side is 256 px or more.
* Either device: a 30-minute budget, peak lr ``PEAK_LR`` with 5 % warm-up and cosine decay,
  gradient clip 0.1, validation max(10 %, 8) images per class.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from lineguard.train.train_config import DataConfig

DEFAULT_BUDGET_S = 1800.0
PEAK_LR = 4e-4
#: CPU inputs, largest first: the first whose size the median short side reaches (else 160)
CPU_INPUTS = (224, 192)
_SIZE_SAMPLE = 64  # images read (headers decoded) to estimate the typical size


def median_short_side(data: DataConfig) -> tuple[int, int, bool]:
    """(median short side in pixels, number of normal training images, whether they are tiles
    cut by ``lineguard data tile``) of the data sources."""
    import cv2

    from lineguard.train.data import scan_folder, scan_mvtec
    from lineguard.train.pack import load_pack
    from lineguard.train.tiles import is_tile_class

    if data.pack is not None:
        pack = load_pack(data.pack, progress=False)
        normal = pack.select(lambda s: s.split == "train" and s.label == 0)
        return int(pack.size), len(normal), any(is_tile_class(s.category) for s in normal.samples)
    samples = []
    for src in data.mvtec:
        samples += [s for s in scan_mvtec(src.root, src.categories) if s.split == "train"]
    for src in data.folders:
        samples += scan_folder(src.path, src.category)
    if not samples:
        return 0, 0, False
    step = max(1, len(samples) // _SIZE_SAMPLE)
    sides = []
    for s in samples[::step]:
        img = cv2.imread(str(s.path), cv2.IMREAD_UNCHANGED)
        if img is not None:
            sides.append(min(img.shape[:2]))
    tiles = any(is_tile_class(s.category) for s in samples)
    return (int(np.median(sides)) if sides else 0), len(samples), tiles


def cpu_hardware(cores: int) -> dict[str, Any]:
    """Processes, threads, synthesis workers and per-process batch for a CPU of ``cores``.

    The step's batch stays 8 (the recipe chosen on validation). On 2 or more cores it is split
    over 2 data-parallel processes of batch 4: the CPU recipe's small matrices gain nothing from
    a second thread in one process (0.299 vs 0.312 s per step) but two one-thread processes run
    side by side at full speed (batch 4: 0.154 s per step): in a 4-minute mtd budget 692 steps
    against 518 for one process and a better validation proxy, 0.645 vs 0.609
    (``benchmarks/results/train_processes_mtd.json``; 2-core AVX2, fp32); 7 564 vs 5 178 steps
    in 30 minutes. Synthesis runs in each process (4 images take ~18 ms) until there are cores
    to spare for workers. Measured on 2 cores only; the rule for more cores is a guess that
    keeps the cores busy without oversubscribing them.
    """
    if cores < 2:
        return {"device": "cpu", "batch_size": 8, "num_workers": 0, "threads": 1, "processes": 1}
    workers = 0 if cores <= 4 else max(1, cores // 8)
    return {
        "device": "cpu",
        "batch_size": 4,
        "num_workers": workers,
        "threads": max(1, (cores - 2 * workers) // 2),
        "processes": 2,
    }


def default_recipe(
    data: DataConfig, cuda: bool, out_dir: Path | None = None
) -> tuple[dict[str, Any], str]:
    """(recipe as TrainConfig keys, why in one line) for ``data`` on this device."""
    side, count, tiles = median_short_side(data)
    large = side >= 256
    # tiles: the model's input IS the tile (stations and `evaluate --tile-scale` cut at it)
    tile = side if tiles and side > 0 else None
    cpu_input = tile or next((s for s in CPU_INPUTS if side >= s), 160)
    if cuda:
        model = {
            "backbone": "tf_efficientnet_lite2",
            "input_size": tile or (256 if large else 224),
            "hidden_dim": 256,
            "nhead": 8,
            "dim_feedforward": 1024,
            "num_encoder_layers": 4,
            "num_decoder_layers": 4,
            "refiner_channels": 128,
            "score_pool": max(1, tile // 16) if tile else 16,
        }
        hardware = {"device": "cuda", "batch_size": 16, "num_workers": 8}
    else:
        model = {
            "backbone": "tf_efficientnet_lite0",
            "input_size": cpu_input,
            "hidden_dim": 128,
            "nhead": 4,
            "dim_feedforward": 512,
            "num_encoder_layers": 2,
            "num_decoder_layers": 2,
            "refiner_channels": 64,
            "score_pool": max(1, cpu_input // 16),
            "dropout": 0.0,
        }
        hardware = cpu_hardware(os.cpu_count() or 1)
    recipe: dict[str, Any] = {
        "data": data.model_dump(mode="json"),
        "model": model,
        "budget": DEFAULT_BUDGET_S,
        "lr": PEAK_LR,
        "warmup_fraction": 0.05,
        "min_lr_fraction": 0.02,
        "grad_clip": 0.1,
        "val_fraction": 0.1,
        "val_min": 8,
        "bf16": True,
        **hardware,
    }
    if out_dir is not None:
        recipe["out_dir"] = str(out_dir)
    why = (
        f"default recipe for {count} normal {'tiles' if tile else 'images'}, median short side "
        f"{side} px, on "
        f"{'cuda' if cuda else 'cpu'}: {model['backbone']} at {model['input_size']} px, "
        f"D {model['hidden_dim']}, {model['num_encoder_layers']}+{model['num_decoder_layers']} "
        f"layers, budget {DEFAULT_BUDGET_S / 60:.0f} min"
    )
    return recipe, why
