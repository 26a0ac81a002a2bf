"""Re-choose a trained checkpoint's post-training settings without training (`lineguard
recalibrate`).

The choices made after training — the map smoothing (validation proxy), the prompt-match share
(held-out judge defects), the fusion scales and the score normalisation — change when their rule
changes; re-running them on the checkpoint's own validation split brings an existing model up
to date in a minute instead of a new 30-minute training.
"""

from __future__ import annotations

from pathlib import Path

from lineguard.runtime.errors import LineGuardError
from lineguard.train.calibration import calibrate
from lineguard.train.checkpoint import read_checkpoint, save_checkpoint
from lineguard.train.normal_stats import fit_model
from lineguard.train.proxy import (
    choose_map_blur,
    choose_match_weight,
    choose_stats_weight,
    judge_validation,
    synthetic_validation,
)
from lineguard.train.torch_model import CLOSING_BUFFERS
from lineguard.train.train_config import DataConfig, TrainConfig
from lineguard.train.train_data import load_training_data_for, make_synthesizer


def recalibrate(
    path: str | Path,
    out: str | Path | None = None,
    data: DataConfig | None = None,
    device: str = "cpu",
    progress: bool = True,
    choose_blur: bool = True,
) -> dict:
    """Re-choose a checkpoint's map smoothing and prompt-match share and re-measure its fusion
    scales and score normalisation (no training).

    For checkpoints written by an older calibration rule, or after changing it. The normal
    validation split is rebuilt from the checkpoint's own recipe (``data`` overrides where the
    images are now) and must give the same data fingerprint. Returns the new calibration.
    """
    from lineguard.train.checkpoint import load_model, prompt_images

    ckpt = read_checkpoint(path)
    cfg = TrainConfig.model_validate(ckpt["train_config"])
    td = load_training_data_for(cfg, progress=progress, data=data)
    if td.fingerprint != ckpt["data_fingerprint"]:
        raise LineGuardError(f"{path}: the data found now is not the data it was trained on")
    if td.classes != list(ckpt["classes"]):
        raise LineGuardError(f"{path}: classes {ckpt['classes']} but the data has {td.classes}")
    model, _ = load_model(path, device)
    stored = prompt_images(ckpt)
    prompts = [stored[c] for c in td.classes]
    images, labels, source = td.val_images, td.val_labels, "val"
    if len(images) == 0:
        images, labels, source = td.train_images, td.train_labels, "train"
    ckpt["metrics"] = {**ckpt["metrics"], "recalibrated_from": str(path)}
    if source == "val" and choose_blur:
        model.cfg.stats_weight = 0.0  # blur and match are chosen before the statistics
        defects = synthetic_validation(td, make_synthesizer(td, cfg.synthesis), cfg.seed)
        # the record training keeps, so recipe_score reads the smoothed proxy
        ckpt["metrics"]["map_blur"], _ = choose_map_blur(model, td, defects, device)
        judge = judge_validation(td, cfg.seed)
        ckpt["metrics"]["prompt_match"], calib, amap = choose_match_weight(model, td, device, judge)
        if cfg.normal_stats:  # fitted again on the training split, then their share chosen
            fit_model(model, td.train_images, device)
            ckpt["metrics"]["normal_stats"], calib = choose_stats_weight(
                model, td, device, judge, amap
            )
        chosen = {
            k: getattr(model.cfg, k)
            for k in ("map_blur_sigma", "match_weight", "match_zoom", "stats_weight")
        }
        ckpt["model_config"] = {**ckpt["model_config"], **chosen}
        ckpt["train_config"]["model"] = {**ckpt["train_config"]["model"], **chosen}
    else:
        calib = calibrate(model, images, labels, prompts, device, source)
    ckpt["calibration"] = calib
    for name in CLOSING_BUFFERS:
        ckpt["state_dict"][name] = getattr(model, name).detach().cpu().clone()
    save_checkpoint(out or path, ckpt)
    return calib
