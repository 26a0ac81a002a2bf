"""Prompt match: a training-free, fine-grained comparison of the query with its golden sample.

The reconstruction transformer sees the image on the stride-16 token grid (8×8 at 128 px), so a
defect a few pixels wide is diluted before anything is learned. The backbone's early taps are
finer: at stride 4 and 8 they describe local structure at 4× the token resolution. For each
query position the prompt match is the smallest L2 distance between the query's stride-4
descriptor (stride-4 tap + upsampled stride-8 tap, 3×3 averaged, as PatchCore aggregates a
neighbourhood) and the prompt's descriptors within ``radius`` cells, which tolerates small
misplacement of the part. With ``match_zoom`` 2 the query and the prompt are upsampled 2×
before the backbone, which halves the match's stride in input pixels (small patches gain most).
Nothing here is trained; how much the final map trusts it
(``match_weight``, 0 = not used) is chosen after training on held-out validation defects
(:mod:`lineguard.train.judge_defects`), since it helps aligned parts and hurts free textures.

At a station the prompt's descriptors are computed once with its tokens: they travel packed
behind the prompt tokens (``B×(N+M)×D``), so the exported graphs and the runtime keep one
``prompt_tokens`` tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

MATCH_TAPS = (1, 2)  # indices of the stride-4 and stride-8 taps
MATCH_STRIDE = 4


def match_channels(tap_channels: Sequence[int]) -> int:
    return sum(int(tap_channels[i]) for i in MATCH_TAPS)


def match_token_count(tap_channels: Sequence[int], input_size: int, width: int) -> int:
    """Rows of width ``width`` that hold one image's packed descriptors."""
    g = input_size // MATCH_STRIDE
    return math.ceil(match_channels(tap_channels) * g * g / width)


def tap_pair_descriptors(taps: Sequence[torch.Tensor], pair: tuple[int, int]) -> torch.Tensor:
    """The finer tap of ``pair`` with the coarser one upsampled onto its grid, 3×3 averaged
    (PatchCore's neighbourhood aggregation): ``B×(C1+C2)×h×w`` at the finer tap's stride."""
    fine, coarse = taps[pair[0]], taps[pair[1]]
    coarse = F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=True)
    return F.avg_pool2d(torch.cat([fine, coarse], dim=1), 3, stride=1, padding=1)


def descriptors(taps: Sequence[torch.Tensor]) -> torch.Tensor:
    """``B×Cm×(H/4)×(W/4)``: stride-4 tap, stride-8 tap upsampled, 3×3 mean."""
    return tap_pair_descriptors(taps, MATCH_TAPS)


def pack(desc: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """``B×Cm×g×g`` -> ``B×rows×width`` (zero padded) to ride behind the prompt tokens."""
    flat = desc.flatten(1)
    flat = F.pad(flat, (0, rows * width - flat.shape[1]))
    return flat.reshape(desc.shape[0], rows, width)


def unpack(packed: torch.Tensor, channels: int, grid: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``B×rows×width`` -> ``B×Cm×g×g``."""
    flat = packed.reshape(packed.shape[0], -1)[:, : channels * grid * grid]
    return flat.reshape(packed.shape[0], channels, grid, grid)


def match_distance(query: torch.Tensor, prompt: torch.Tensor, radius: int) -> torch.Tensor:
    """``B×1×g×g``: min over the prompt's ``(2·radius+1)²`` window of ‖query − prompt‖₂.

    ``prompt`` is ``B×C×g×g`` or ``1×C×g×g``. The window is unrolled into shifted copies, a
    fixed number of elementwise ops that every exporter handles.
    """
    g = query.shape[-1]
    padded = F.pad(prompt, (radius, radius, radius, radius), mode="replicate")
    best: torch.Tensor | None = None
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            d = ((query - padded[:, :, dy : dy + g, dx : dx + g]) ** 2).sum(dim=1, keepdim=True)
            best = d if best is None else torch.minimum(best, d)
    assert best is not None
    return torch.sqrt(best.clamp_min(0.0))
