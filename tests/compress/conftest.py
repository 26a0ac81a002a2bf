"""Fixtures for the compress tests: a tiny MVTec-layout dataset and a tiny OneNIP checkpoint.

The checkpoint is built the way the trainer writes one (same keys, calibration measured with the
train stage's `calibrate` on NORMAL validation images) but without training: a random-head tiny
OneNIP on the pretrained Lite0 backbone. Export and quantization only need a fixed function to
reproduce, and synthetic/drawn defects still change its maps.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from synthetic_parts import tiny_model_config

from lineguard.train.calibration import calibrate
from lineguard.train.checkpoint import checkpoint_payload, save_checkpoint
from lineguard.train.torch_model import OneNIP
from lineguard.train.train_config import DataConfig, MvtecSource, TrainConfig
from lineguard.train.train_data import load_training_data

torch.set_num_threads(2)

SIZE = 64
CLASSES = ("disc", "stripe")


def _normal(cls: str, rng: np.random.Generator, px: int = 80) -> np.ndarray:
    """A class-typical RGB image with mild random variation (BGR for cv2.imwrite)."""
    yy, xx = np.mgrid[0:px, 0:px].astype(np.float32)
    if cls == "disc":
        r = np.hypot(yy - px / 2 + rng.normal(0, 1), xx - px / 2 + rng.normal(0, 1))
        base = np.where(r < px * 0.3, 170, 70).astype(np.float32)
        img = np.stack([base, base * 0.8, base * 0.6], -1)
    else:
        phase = rng.uniform(0, 0.5)
        base = 110 + 60 * np.sin(xx / 4.0 + phase)
        img = np.stack([base * 0.6, base, base * 0.9], -1)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _defect(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    out = img.copy()
    px = img.shape[0]
    c = (int(rng.integers(15, px - 15)), int(rng.integers(15, px - 15)))
    axes = (int(rng.integers(5, 12)), int(rng.integers(3, 8)))
    colour = tuple(int(v) for v in rng.integers(0, 255, 3))
    cv2.ellipse(out, c, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
    mask = (np.abs(out.astype(int) - img.astype(int)).max(-1) > 0).astype(np.uint8) * 255
    return out, mask


def make_dataset(
    root: Path, n_train: int = 12, n_good: int = 3, n_bad: int = 5, seed: int = 0
) -> Path:
    """MVTec layout: <cls>/train/good, <cls>/test/{good,spot}, <cls>/ground_truth/spot."""
    rng = np.random.default_rng(seed)
    for cls in CLASSES:
        for sub in ("train/good", "test/good", "test/spot", "ground_truth/spot"):
            (root / cls / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n_train):
            cv2.imwrite(str(root / cls / "train/good" / f"{i:03d}.png"), _normal(cls, rng))
        for i in range(n_good):
            cv2.imwrite(str(root / cls / "test/good" / f"{i:03d}.png"), _normal(cls, rng))
        for i in range(n_bad):
            img, mask = _defect(_normal(cls, rng), rng)
            cv2.imwrite(str(root / cls / "test/spot" / f"{i:03d}.png"), img)
            cv2.imwrite(str(root / cls / "ground_truth/spot" / f"{i:03d}_mask.png"), mask)
    return root


def make_checkpoint(path: Path, data_root: Path, seed: int = 0) -> Path:
    """A `lineguard-onenip/1` checkpoint of a tiny random-head OneNIP, calibrated like training."""
    torch.manual_seed(seed)
    cfg = TrainConfig(
        data=DataConfig(mvtec=[MvtecSource(root=data_root)]),
        model=tiny_model_config(SIZE),
        epochs=1,
        val_fraction=0.25,
        seed=seed,
        device="cpu",
        num_workers=0,
    )
    model = OneNIP(cfg.model, pretrained=True).eval()
    data = load_training_data(cfg.data, SIZE, cfg.val_fraction, cfg.seed, progress=False)
    calib = calibrate(model, data.val_images, data.val_labels, data.prompt_images(), "cpu", "val")
    save_checkpoint(path, checkpoint_payload(model, cfg, data, calib))
    return path


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "widgets")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, dataset) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", dataset)


@pytest.fixture(scope="session")
def artifact(tmp_path_factory, checkpoint) -> Path:
    """An FP32 artifact exported (and parity-gated) once for the whole session."""
    from lineguard.compress.export import ExportOptions, export_artifact

    out = tmp_path_factory.mktemp("artifact") / "tiny"
    export_artifact(ExportOptions(checkpoint=checkpoint, out=out))
    return out


#: The fixture model has a RANDOM transformer head (no training in unit tests), so its maps carry
#: little signal and a handful of gate images swing AUROC by several points under any
#: perturbation. Tests of the INT8 artifact itself open the budgets on purpose; the gate's refusal
#: is tested with a deliberately broken INT8 model.
OPEN_BUDGET = {
    k: 1.0
    for k in (
        "image_auroc",
        "pixel_ap",
        "aupro",
        "class_image_auroc",
        "class_pixel_ap",
        "class_aupro",
    )
}


@pytest.fixture
def open_budget():
    """Accuracy budgets wide open: for tests of INT8 artifacts themselves, not of the gate."""
    from lineguard.compress.gates import AccuracyBudget

    return AccuracyBudget(**OPEN_BUDGET)


@pytest.fixture(scope="session")
def int8_artifact(tmp_path_factory, artifact) -> Path:
    """A copy of `artifact` with the INT8 detector added."""
    from lineguard.compress.gates import AccuracyBudget
    from lineguard.compress.quantize import QuantizeOptions, quantize_artifact

    out = tmp_path_factory.mktemp("int8") / "tiny"
    shutil.copytree(artifact, out)
    budget = AccuracyBudget(**OPEN_BUDGET)
    quantize_artifact(QuantizeOptions(artifact=out, calib_images=16, budget=budget))
    return out
