"""What the throughput rows replay: camera frames, their thresholds and the INT8 artifact.

Why a module of its own: runtime_throughput.py measures the service; how the replayed parts,
their drawn defects, the thresholds that separate them and the random-head artifact are made
is the setup of every row, kept apart from the measurement (edge_latency_tiled.py reuses
`model_config` for its tiny model).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np


def scene(rng: np.random.Generator, h: int, w: int, defect: bool) -> np.ndarray:
    """A smooth textured part with sensor noise (BGR uint8), optionally with a drawn defect."""
    low = rng.integers(60, 200, (max(2, h // 48), max(2, w // 48), 3)).astype(np.uint8)
    img = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    if defect:
        c = (int(rng.integers(w // 5, 4 * w // 5)), int(rng.integers(h // 5, 4 * h // 5)))
        axes = (int(rng.integers(w // 40, w // 12)), int(rng.integers(h // 40, h // 12)))
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        cv2.ellipse(img, c, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
    return img


def write_frames(folder: Path, n: int, w: int, h: int, ext: str, event_rate: float) -> Path:
    """`n` camera frames, round(event_rate·n) of them (spread evenly) with a drawn defect, and
    `golden.png` (a normal part, the prompt). The same seed for every rate: same parts."""
    folder.mkdir(parents=True, exist_ok=True)
    n_bad = round(event_rate * n)
    bad = {int(i * n / n_bad) for i in range(n_bad)} if n_bad else set()
    rng = np.random.default_rng(7)
    golden = scene(rng, h, w, defect=False)
    for i in range(n):
        name = f"frame_{i:03d}{'_bad' if i in bad else ''}.{ext}"
        cv2.imwrite(str(folder / name), part(golden, rng, defect=i in bad))
    cv2.imwrite(str(folder.parent / "golden.png"), golden)
    return folder.parent / "golden.png"


def part(golden: np.ndarray, rng: np.random.Generator, defect: bool) -> np.ndarray:
    """The golden part with fresh sensor noise; a defect is a large high-contrast striped patch
    (about 2/3 of the part): big enough that even the benchmark's random-head model scores it
    above every normal frame (a small blob does not separate there)."""
    img = np.clip(golden + rng.normal(0, 3, golden.shape), 0, 255).astype(np.uint8)
    if defect:
        h, w = img.shape[:2]
        ph, pw = int(h * 0.8), int(w * 0.8)
        y, x = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        stripes = (np.arange(pw) // 8 % 2 * 255).astype(np.uint8)
        img[y : y + ph, x : x + pw] = stripes[None, :, None]
    return img


def choose_thresholds(artifact: Path, frames: Path, golden: Path) -> tuple[dict, str]:
    """Thresholds (all > 0) that make exactly the drawn-defect frames defective, from the INT8
    engine's own normalised scores on these frames (the station's pipeline, this prompt)."""
    from lineguard.runtime.engine import load_engine
    from lineguard.runtime.pipeline import Pipeline, Thresholds

    engine = load_engine(artifact, backend="openvino", precision="int8", threads=1)
    prompt = cv2.cvtColor(cv2.imread(str(golden)), cv2.COLOR_BGR2RGB)
    pipe = Pipeline(engine, prompt, thresholds=Thresholds(1.0, 1.0, 1))
    normal, bad, bad_max = [], [], []
    for f in sorted(frames.iterdir()):
        rgb = cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)
        d = pipe.process(rgb)
        is_bad = "_bad." in f.name
        (bad if is_bad else normal).append(d.image_score)
        if is_bad:
            bad_max.append(float(d.score_map.max()))
    engine.close()
    tiny = 1.0e-6  # the lowest value a threshold may take
    if not bad:
        return {"image": 1000.0, "pixel": 1000.0, "min_area_px": 1}, "no defective frame"
    lo = min(bad)
    hi = max(normal) if normal else -np.inf
    image = (max(hi, 0.0) + lo) / 2 if normal else lo - 0.01 * abs(lo)  # in (max(hi, 0), lo)
    pixel = min(bad_max) - 0.01 * abs(min(bad_max))
    how = f"image scores normal <= {hi:.3f}, defective >= {lo:.3f}"
    if not hi < lo or image <= 0 or pixel <= 0:
        how += "; NOT separable with thresholds > 0: the measured event share will differ"
    return {"image": max(tiny, image), "pixel": max(tiny, pixel), "min_area_px": 1}, how


def model_config(tiny: bool):
    from lineguard.train.torch_model import OneNIPConfig

    if not tiny:  # the shipped lite2 configuration: 224 px, hidden 256, 4+4 layers
        return OneNIPConfig(input_size=224)
    return OneNIPConfig(
        backbone="tf_efficientnet_lite0",
        input_size=64,
        hidden_dim=32,
        nhead=4,
        dim_feedforward=64,
        num_encoder_layers=1,
        num_decoder_layers=1,
        refiner_channels=16,
    )


def build_artifact(work: Path, tiny: bool) -> Path:
    """Random-head OneNIP (pretrained backbone) -> checkpoint -> `export` -> `quantize` (INT8).

    Throughput does not depend on the head's values, so no training; the artifact goes through
    the compress stage's real export and NNCF quantization (gates opened: the head is random).
    """
    import torch

    from lineguard.compress.export import ExportOptions, export_artifact
    from lineguard.compress.gates import AccuracyBudget
    from lineguard.compress.quantize import QuantizeOptions, quantize_artifact
    from lineguard.train.calibration import calibrate
    from lineguard.train.checkpoint import checkpoint_payload, save_checkpoint
    from lineguard.train.torch_model import OneNIP
    from lineguard.train.train_config import DataConfig, FolderSource, TrainConfig
    from lineguard.train.train_data import load_training_data

    torch.set_num_threads(2)
    torch.manual_seed(0)
    normals = work / "normal"
    normals.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    px = 80 if tiny else 256
    for i in range(16):
        cv2.imwrite(str(normals / f"{i:03d}.png"), scene(rng, px, px, defect=False))
    cfg = TrainConfig(
        data=DataConfig(folders=[FolderSource(path=normals, category="part")]),
        model=model_config(tiny),
        epochs=1,
        val_fraction=0.25,
        seed=0,
        device="cpu",
        num_workers=0,
    )
    model = OneNIP(cfg.model, pretrained=True).eval()
    size = cfg.model.input_size
    data = load_training_data(cfg.data, size, cfg.val_fraction, cfg.seed, progress=False)
    calib = calibrate(model, data.val_images, data.val_labels, data.prompt_images(), "cpu", "val")
    ckpt = work / "random_head.pt"
    save_checkpoint(ckpt, checkpoint_payload(model, cfg, data, calib))
    art = work / "artifact"
    export_artifact(ExportOptions(checkpoint=ckpt, out=art, force=True))
    open_budget = AccuracyBudget(image_auroc=1.0, pixel_ap=1.0, aupro=1.0)
    quantize_artifact(QuantizeOptions(artifact=art, calib_images=16, budget=open_budget))
    return art


def has_int8(artifact: Path) -> bool:
    card = artifact / "model.json"
    return card.is_file() and "int8" in json.loads(card.read_text()).get("precisions", {})
