"""A training checkpoint (`lineguard-onenip/1`, docs/architecture.md) as compress sees it.

The checkpoint carries everything an artifact needs: the full state dict (frozen backbone too, so
nothing downloads), the architecture, the recipe, the classes, one golden prompt image per class
and the score normalisation measured on NORMAL validation images. Reading is the train stage's
(`lineguard.train.checkpoint`); this module checks the parts compress relies on and names the
file and the missing piece when one is unusable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lineguard.runtime.errors import LineGuardError
from lineguard.train.checkpoint import read_checkpoint
from lineguard.train.data import resize_rgb
from lineguard.train.torch_model import OneNIP, OneNIPConfig


@dataclass
class Checkpoint:
    """What compress uses from a training checkpoint."""

    path: Path
    model_config: OneNIPConfig
    state_dict: dict[str, torch.Tensor]
    classes: list[str]
    prompts: dict[str, np.ndarray]  # class -> RGB uint8 S×S×3 golden sample at input size
    prompt_sources: dict[str, str]  # class -> where the golden sample came from
    calibration: dict[str, Any]
    train_config: dict[str, Any] = field(default_factory=dict)
    data_fingerprint: Any = None
    trained_file_keys: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    epoch: int | None = None

    @property
    def input_size(self) -> int:
        return int(self.model_config.input_size)

    def build_model(self) -> OneNIP:
        """Eval-mode float32 OneNIP with the checkpoint's weights (backbone included)."""
        model = OneNIP(self.model_config, pretrained=False)
        try:
            model.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as exc:
            raise LineGuardError(f"{self.path}: state_dict does not fit the model: {exc}") from exc
        return model.float().eval()


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint and check what export needs (prompts, calibration, config)."""
    path = Path(path)
    raw = read_checkpoint(path)
    try:
        cfg = OneNIPConfig.model_validate(raw["model_config"])
    except ValueError as exc:
        raise LineGuardError(f"{path}: invalid model_config: {exc}") from exc
    classes = [str(c) for c in raw["classes"]]
    if not classes:
        raise LineGuardError(f"{path}: checkpoint lists no classes")
    for cls in classes:
        if not cls or "/" in cls or "\\" in cls or cls.startswith("."):
            raise LineGuardError(f"{path}: class name {cls!r} cannot name a prompt file")
    prompts, sources = _prompts(path, raw["prompts"], classes, cfg.input_size)
    calib = dict(raw["calibration"])
    for key in ("image", "pixel"):
        part = calib.get(key)
        if not isinstance(part, dict) or {"center", "scale"} - set(part):
            raise LineGuardError(f"{path}: calibration.{key} needs 'center' and 'scale'")
        if not float(part["scale"]) > 0:
            raise LineGuardError(f"{path}: calibration.{key}.scale must be > 0")
    return Checkpoint(
        path=path,
        model_config=cfg,
        state_dict=raw["state_dict"],
        classes=classes,
        prompts=prompts,
        prompt_sources=sources,
        calibration=calib,
        train_config=dict(raw.get("train_config") or {}),
        data_fingerprint=raw.get("data_fingerprint"),
        trained_file_keys=[str(k) for k in raw.get("trained_file_keys") or []],
        metrics=dict(raw.get("metrics") or {}),
        epoch=raw.get("epoch"),
    )


def _prompts(
    path: Path, prompts: dict[str, Any], classes: list[str], size: int
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    images: dict[str, np.ndarray] = {}
    sources: dict[str, str] = {}
    for cls in classes:
        entry = prompts.get(cls)
        if not isinstance(entry, dict) or "image" not in entry:
            raise LineGuardError(f"{path}: no golden prompt image for class {cls!r}")
        img = entry["image"]
        img = img.numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise LineGuardError(
                f"{path}: prompt of {cls!r} must be RGB uint8 H×W×3, got {img.dtype} {img.shape}"
            )
        images[cls] = resize_rgb(img, size) if img.shape[:2] != (size, size) else img
        sources[cls] = str(entry.get("path", ""))
    return images, sources
