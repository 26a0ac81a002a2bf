"""OneNIP's building blocks: masked encoder/decoder layers, the refiner, jitter and smoothing.

Kept apart from :mod:`lineguard.train.torch_model` (which wires them into the model and its
entry points) so each file stays readable; export code swaps their attention modules for
export-friendly ones (``compress/graphs.py``) without touching these definitions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gaussian_matrix(n: int, sigma: float) -> torch.Tensor:
    """``n×n`` matrix G with ``G @ x @ G.T`` = Gaussian smoothing of an n×n map (σ in pixels).

    Truncated at 4σ and each row renormalised, so borders are not darkened and a constant map
    stays constant. Linear: smoothing the two maps then fusing equals smoothing the fused map.
    """
    idx = torch.arange(n, dtype=torch.float64)
    d = idx[:, None] - idx[None, :]
    w = torch.exp(-0.5 * (d / sigma) ** 2) * (d.abs() <= 4.0 * sigma)
    return (w / w.sum(dim=1, keepdim=True)).float()


def neighbor_mask(h: int, w: int, k: int) -> torch.Tensor:
    """Additive (h·w)×(h·w) mask: -inf where the key lies in the query's (2k+1)² window.

    The window includes the token itself (UniAD neighbour-masked attention), clipped at borders.
    """
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    near = ((ys[:, None] - ys[None, :]).abs() <= k) & ((xs[:, None] - xs[None, :]).abs() <= k)
    mask = torch.zeros(h * w, h * w)
    mask[near] = float("-inf")
    return mask


def feature_jitter(tokens: torch.Tensor, scale: float) -> torch.Tensor:
    """UniAD jitter: f + ε·‖f‖₂/C·scale, ε ~ N(0, I), per token (last dim = C)."""
    c = tokens.shape[-1]
    norm = tokens.norm(dim=-1, keepdim=True) / c
    return tokens + torch.randn_like(tokens) * norm * scale


class EncoderLayer(nn.Module):
    """DETR post-norm encoder layer; positions on q and k only."""

    def __init__(self, d: int, nhead: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d, ff)
        self.linear2 = nn.Linear(ff, d)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, s: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = s + pos
        a = self.self_attn(q, q, s, attn_mask=mask, need_weights=False)[0]
        s = self.norm1(s + self.dropout1(a))
        f = self.linear2(self.dropout(F.relu(self.linear1(s))))
        return self.norm2(s + self.dropout2(f))


class DecoderLayer(nn.Module):
    """Bidirectional layer (post-fix): prompt attends to image, MLP, image attends to prompt."""

    def __init__(self, d: int, nhead: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.cross_attn_prompt_to_image = nn.MultiheadAttention(
            d, nhead, dropout=dropout, batch_first=True
        )
        self.mlp = nn.Sequential(nn.Linear(d, ff), nn.ReLU(), nn.Linear(ff, d))
        self.cross_attn_image_to_prompt = nn.MultiheadAttention(
            d, nhead, dropout=dropout, batch_first=True
        )
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)
        self.norm3 = nn.LayerNorm(d)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(
        self, p: torch.Tensor, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.cross_attn_prompt_to_image(p + pos, x + pos, x, attn_mask=mask, need_weights=False)
        p = self.norm1(p + self.dropout1(a[0]))
        p = self.norm2(p + self.dropout2(self.mlp(p)))
        b = self.cross_attn_image_to_prompt(x + pos, p + pos, p, attn_mask=mask, need_weights=False)
        x = self.norm3(x + self.dropout3(b[0]))
        return p, x


class Refiner(nn.Module):
    """|F̂ − F| (C ch, h×w) -> logit at 4h×4w: [conv3 -> BN -> ReLU -> ConvT×2] ×2 -> 1×1."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(2):
            layers += [
                nn.Conv2d(c, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.ConvTranspose2d(width, width, 2, stride=2),
            ]
            c = width
        self.blocks = nn.Sequential(*layers)
        self.predict = nn.Conv2d(width, 1, 1)

    def forward(self, err: torch.Tensor) -> torch.Tensor:
        return self.predict(self.blocks(err))
