"""OneNIP losses (spec §7): feature MSE over the 2B batch + 0.5 × Dice on the refiner.

The weights reproduce the official code, not paper Eq. 8: MSE averages normal and synthetic
halves together and the Dice has no factor 2 in the numerator, so seg:rec is effectively 1:1.
Losses are computed in float32 even under bf16 autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MSE_WEIGHT = 1.0
DICE_WEIGHT = 0.5


def feature_mse(rec: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every element of the whole (2B) batch."""
    return F.mse_loss(rec.float(), target.float())


def dice_loss(logit: torch.Tensor, mask: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Per-sample 1 − (Σp·t + s) / (Σp² + Σt² + s), p = sigmoid(logit), averaged over samples."""
    p = torch.sigmoid(logit.float()).flatten(1)
    t = mask.float().flatten(1)
    inter = (p * t).sum(1)
    denom = (p * p).sum(1) + (t * t).sum(1)
    return (1.0 - (inter + smooth) / (denom + smooth)).mean()


def onenip_loss(
    out: dict[str, torch.Tensor],
    synthetic_mask: torch.Tensor,
    mse_weight: float = MSE_WEIGHT,
    dice_weight: float = DICE_WEIGHT,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its parts from :meth:`OneNIP.forward_train` output.

    ``synthetic_mask`` is the defect mask of the synthetic half (``B×1×H×W`` or ``B×H×W``, values
    in {0, 1}); the normal half's target is all zeros. Parts are detached, for logging.
    """
    logit = out["ref_logit"]
    mask = synthetic_mask.reshape(synthetic_mask.shape[0], 1, *logit.shape[-2:]).to(logit.device)
    if 2 * mask.shape[0] != logit.shape[0]:
        raise ValueError(
            f"synthetic_mask has {mask.shape[0]} samples, expected half of {logit.shape[0]}"
        )
    target = torch.cat([torch.zeros_like(mask, dtype=torch.float32), mask.float()], dim=0)
    mse = feature_mse(out["rec_feat"], out["target_feat"])
    dice = dice_loss(logit, target)
    total = mse_weight * mse + dice_weight * dice
    return total, {"mse": mse.detach(), "dice": dice.detach(), "total": total.detach()}
