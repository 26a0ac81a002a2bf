"""Normal statistics: a per-position Gaussian of the backbone's descriptors over the NORMAL
training images, a third map beside the learned map and the prompt match.

Why: the learned map compares the query with ONE golden sample, so it must tell a defect from
the ordinary spread between two good parts (on mtd, seven exposures of a textured tile). The
training images show that spread; a Gaussian per position of their stride-8 descriptors (the
stride-8 tap and the upsampled stride-16 tap, 3×3 averaged) scores how far a query descriptor
lies from it, in units of that spread (Mahalanobis distance, as PaDiM does with a ResNet). It
needs no training, only one backbone pass over the training images after the last step. On the
session-11 mtd model its share 0.5, chosen on held-out validation defects, lifted the held-out
judge's figure from 0.603 to 0.614 (docs/benchmarks.md).

The statistics pool every class of the training data (one mean and one precision matrix per
grid position, not per class): they are model constants, carried inside the exported detector,
so stations and the prompt contract stay as they are. How much the final map trusts them
(``stats_weight``, 0 = not used) is chosen like the prompt match's share, on the judge defects.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lineguard.train.prompt_match import tap_pair_descriptors

STATS_TAPS = (2, 3)  # indices of the stride-8 and stride-16 taps
#: shrinkage of each position's covariance towards its mean variance (keeps it invertible)
SHRINKAGE = 0.01


def descriptors(taps: Sequence[torch.Tensor]) -> torch.Tensor:
    """``B×C×(H/8)×(W/8)``: stride-8 tap, stride-16 tap upsampled, 3×3 mean."""
    return tap_pair_descriptors(taps, STATS_TAPS)


def mahalanobis(desc: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """``B×1×g×g`` distance of ``desc`` (``B×C×g×g``) to each position's Gaussian
    (``mean`` ``P×C``, ``precision`` ``P×C×C``, P = g·g row-major); one batched matmul."""
    b, _, g, _ = desc.shape
    v = desc.flatten(2).permute(2, 0, 1) - mean.unsqueeze(1)  # P×B×C
    d = (torch.bmm(v, precision) * v).sum(dim=-1)  # P×B
    return torch.sqrt(d.clamp_min(0.0)).transpose(0, 1).reshape(b, 1, g, g)


@torch.no_grad()
def fit(
    describe,
    images: np.ndarray,
    device: torch.device | str,
    batch_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean ``P×C``, precision ``P×C×C``) of ``describe(batch)`` over uint8 ``N×H×W×3``
    images; sums accumulate in float64, so memory does not grow with N."""
    from lineguard.train.calibration import to_tensor

    total: torch.Tensor | None = None
    outer: torch.Tensor | None = None
    n = 0
    for start in range(0, len(images), batch_size):
        d = describe(to_tensor(images[start : start + batch_size], device)).double()
        v = d.flatten(2).permute(2, 0, 1)  # P×B×C
        s, o = v.sum(dim=1), torch.bmm(v.transpose(1, 2), v)
        total = s if total is None else total + s
        outer = o if outer is None else outer + o
        n += v.shape[1]
    if total is None or outer is None or n < 2:
        raise ValueError("the normal statistics need at least two training images")
    mean = total / n
    cov = (outer - n * mean.unsqueeze(2) * mean.unsqueeze(1)) / (n - 1)
    c = cov.shape[-1]
    ridge = SHRINKAGE * cov.diagonal(dim1=1, dim2=2).mean(dim=-1).clamp_min(1e-12)
    cov = cov + ridge[:, None, None] * torch.eye(c, dtype=cov.dtype, device=cov.device)
    # numpy: torch's batched LU on CPU failed for 144 matrices of 192² in float64 (oneMKL)
    precision = torch.from_numpy(np.linalg.inv(cov.cpu().numpy()))
    return mean.float().cpu(), precision.float()


def fit_backbone(
    model, images: np.ndarray, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, precision) of ``model``'s frozen-backbone descriptors over the NORMAL ``images``
    (the training split). The backbone never trains, so the fit is the same before the first
    step as after the last one."""
    was_training = model.training
    model.eval()
    try:
        return fit(lambda x: descriptors(model.taps(x)), images, device)
    finally:
        model.train(was_training)


def fit_model(model, images: np.ndarray, device: torch.device | str) -> None:
    """Fit ``model``'s normal statistics on the NORMAL ``images`` (the training split) and keep
    them in it (:meth:`OneNIP.set_normal_stats`)."""
    model.set_normal_stats(*fit_backbone(model, images, device))
