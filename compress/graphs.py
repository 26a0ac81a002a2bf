"""The two exported graphs as thin `nn.Module` wrappers around a trained `OneNIP`.

Edge code hands the graphs camera pixels as they are: uint8 NHWC RGB. The cast, the /255 and the
NCHW permute live inside the graph (the ImageNet/Lite normalisation already lives in the model),
so no runtime can get preprocessing subtly wrong.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lineguard.train.torch_model import OneNIP


def to_model_input(image: torch.Tensor) -> torch.Tensor:
    """uint8 B×H×W×3 RGB -> float32 B×3×H×W in [0, 1] (what `OneNIP` takes)."""
    return image.permute(0, 3, 1, 2).to(torch.float32) / 255.0


def separable_box_max(amap: torch.Tensor, k: int) -> torch.Tensor:
    """max of the k×k mean (stride 1, no padding) computed as a k×1 then 1×k mean.

    Mathematically identical to `avg_pool2d(amap, k, stride=1).amax()`; the 2-D stride-1 pool
    costs k² adds per output in OpenVINO's CPU kernel (several ms at 224 px, a fifth of the INT8
    detector), the separable form 2k. The parity gate checks the score against `OneNIP.detect`.
    """
    k = min(k, amap.shape[-2], amap.shape[-1])
    rows = F.avg_pool2d(amap, (k, 1), stride=1)
    return F.avg_pool2d(rows, (1, k), stride=1).amax(dim=(1, 2, 3))


class PromptEncoderGraph(nn.Module):
    """`image` u8 B×H×W×3 -> `prompt_tokens` f32 B×N×D."""

    def __init__(self, model: OneNIP) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.encode_prompt(to_model_input(image))


class DetectorGraph(nn.Module):
    """(`image` u8 B×H×W×3, `prompt_tokens` f32 1×N×D) -> (`anomaly_map`, `image_score`)."""

    def __init__(self, model: OneNIP, separable_score: bool = True) -> None:
        super().__init__()
        self.model = model
        self.separable_score = separable_score

    def forward(self, image: torch.Tensor, prompt_tokens: torch.Tensor):
        amap, score = self.model.detect(to_model_input(image), prompt_tokens)
        if self.separable_score:
            score = separable_box_max(amap, self.model.cfg.score_pool)
        return amap, score
