"""Generated parts shared by the learning test and the end-to-end line test.

Two "products" (oriented stripes; blurred grain) a tiny OneNIP can learn in seconds on a CPU,
the training recipe for that tiny model, and an untrained (random-head) tiny checkpoint for the
tests that check wiring, not accuracy.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from lineguard.train.torch_model import OneNIPConfig
from lineguard.train.train_config import TrainConfig

SIZE = 96
CLASSES = ("stripes", "grain")
# One intra-op thread: on a busy 2-core box OpenMP threads spin against other processes and
# run ~10x slower than one thread (benchmarks/results/train_cpu_speed.json).
THREADS = int(os.environ.get("LINEGUARD_TEST_THREADS", "1"))


def normal_image(cls: int, rng: np.random.Generator, s: int = SIZE) -> np.ndarray:
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    if cls == 0:
        v = 0.5 + 0.35 * np.sin(2 * np.pi * (0.8 * xx + 0.6 * yy) / 10 + rng.uniform(0, 2 * np.pi))
        base = np.stack([v * 200 + 30, v * 120 + 60, v * 60 + 80], -1)
    else:
        n = cv2.GaussianBlur(rng.random((s, s)).astype(np.float32), (0, 0), 2.0)
        n = (n - n.min()) / (n.max() - n.min())
        base = np.stack([90 + 80 * n, 140 + 60 * n, 70 + 40 * n], -1)
    base += rng.normal(0, 4, base.shape)
    return np.clip(base, 0, 255).astype(np.uint8)


def tiny_model_config(input_size: int = 64, **kw) -> OneNIPConfig:
    """The smallest OneNIP the export/model tests use (random head; seconds on a CPU)."""
    base = dict(
        backbone="tf_efficientnet_lite0",
        input_size=input_size,
        hidden_dim=32,
        nhead=4,
        dim_feedforward=64,
        num_encoder_layers=1,
        num_decoder_layers=1,
        refiner_channels=16,
    )
    base.update(kw)
    return OneNIPConfig(**base)


def random_checkpoint(path: Path, input_size: int, classes: list[str], prompts: dict) -> Path:
    """A `lineguard-onenip/1` checkpoint of a narrower tiny OneNIP with a random head (seed 0),
    identity calibration and no training recipe; `prompts` maps class -> {path, image}."""
    import torch

    from lineguard.train.checkpoint import save_checkpoint
    from lineguard.train.torch_model import OneNIP

    cfg = tiny_model_config(
        input_size, hidden_dim=16, nhead=2, dim_feedforward=32, refiner_channels=4
    )
    torch.manual_seed(0)
    model = OneNIP(cfg).eval()
    return save_checkpoint(
        path,
        {
            "format": "lineguard-onenip/1",
            "model_config": cfg.model_dump(mode="json"),
            "state_dict": model.state_dict(),
            "train_config": {},
            "classes": classes,
            "prompts": prompts,
            "calibration": {
                "image": {"center": 0.0, "scale": 1.0},
                "pixel": {"center": 0.0, "scale": 1.0},
                "count": 0,
            },
            "data_fingerprint": "test",
            "metrics": {},
            "epoch": 0,
        },
    )


def export_detector(model, image_u8, tokens, path: Path) -> Path:
    """The model's detector graph as ONNX (legacy exporter, opset 17) with the artifact's I/O
    names: what the export-parity tests compare with PyTorch."""
    import torch

    from lineguard.compress.graphs import DetectorGraph

    torch.onnx.export(
        DetectorGraph(model),
        (image_u8, tokens),
        str(path),
        input_names=["image", "prompt_tokens"],
        output_names=["anomaly_map", "image_score"],
        opset_version=17,
        dynamo=False,
    )
    return path


def write_rgb(path: Path, rgb: np.ndarray) -> None:
    """Write an RGB image (as cv2's BGR), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def tiny_config(data: dict, out: Path, **kw) -> TrainConfig:
    """A model that trains in seconds on one CPU thread (lr raised for the tiny width)."""
    base = dict(
        data=data,
        model=dict(
            backbone="tf_efficientnet_lite0",
            input_size=SIZE,
            hidden_dim=64,
            nhead=4,
            dim_feedforward=128,
            num_encoder_layers=1,
            num_decoder_layers=1,
            refiner_channels=32,
            score_pool=8,
            dropout=0.0,
        ),
        epochs=20,
        batch_size=8,
        lr=1e-3,
        val_fraction=0.125,
        val_min=1,
        device="cpu",
        num_workers=0,
        threads=THREADS,
        checkpoint_every=0,
        out_dir=str(out),
        seed=0,
    )
    base.update(kw)
    return TrainConfig.model_validate(base)
