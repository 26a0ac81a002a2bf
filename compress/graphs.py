"""The two exported graphs as thin `nn.Module` wrappers around a trained `OneNIP`.

Edge code hands the graphs camera pixels as they are: uint8 NHWC RGB. The cast, the /255 and the
NCHW permute live inside the graph (the ImageNet/Lite normalisation already lives in the model),
so no runtime can get preprocessing subtly wrong.

The graphs compute what `OneNIP.detect` computes, written in forms OpenVINO's CPU plugin runs
faster (profiled on the INT8 lite2 detector at 224 px, 2 threads; `benchmarks/edge_latency.py`):

* the two bilinear resizes of single-channel maps to the input size (an `Interpolate` on a
  1-channel tensor wastes the plugin's 16-channel blocked layout: ~1 ms, 8 % of the INT8 detector)
  become two small constant matrix products per map (`R · x · Rᵀ`, exactly the same weights);
* the image score's box mean pools along the channel axis (rows or columns moved into channels);
* attention is exported as plain linear projections and softmax(q·k + mask)·v in head-major
  layout, which drops most transposes of `nn.MultiheadAttention`'s exported (sequence-first)
  form; OpenVINO fuses it into one attention kernel.

None of it changes the model: the export parity gate compares every artifact against the
untouched `OneNIP.detect` / `encode_prompt` in PyTorch.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from lineguard.train.torch_model import OneNIP


def to_model_input(image: torch.Tensor) -> torch.Tensor:
    """uint8 B×H×W×3 RGB -> float32 B×3×H×W in [0, 1] (what `OneNIP` takes)."""
    return image.permute(0, 3, 1, 2).to(torch.float32) / 255.0


def bilinear_matrix(n_out: int, n_in: int) -> torch.Tensor:
    """`n_out × n_in` weights of a 1-D bilinear resize with ``align_corners=True``."""
    r = torch.zeros(n_out, n_in, dtype=torch.float64)
    if n_in == 1 or n_out == 1:
        r[:, 0] = 1.0
        return r.float()
    src = torch.arange(n_out, dtype=torch.float64) * (n_in - 1) / (n_out - 1)
    lo = src.floor().long().clamp(max=n_in - 2)
    frac = src - lo
    rows = torch.arange(n_out)
    r[rows, lo] += 1.0 - frac
    r[rows, lo + 1] += frac
    return r.float()


class MatrixUpsample(nn.Module):
    """Bilinear (align_corners) upsampling of ``B×C×h×w`` as ``R_h · x · R_wᵀ`` for the
    (input side, output side) pairs it is built for."""

    def __init__(self, pairs: list[tuple[int, int]]) -> None:
        super().__init__()
        for n, out in sorted(set(pairs)):
            self.register_buffer(f"r{n}_{out}", bilinear_matrix(out, n), persistent=False)

    def forward(self, x: torch.Tensor, size: int) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        if not hasattr(self, f"r{h}_{size}") or not hasattr(self, f"r{w}_{size}"):
            raise ValueError(f"not built for {h}x{w} -> {size} px")
        rh = getattr(self, f"r{h}_{size}")
        rw = getattr(self, f"r{w}_{size}")
        return rh @ x @ rw.transpose(0, 1)


def upsample_pairs(model: OneNIP) -> list[tuple[int, int]]:
    """Every resize the model's graphs make: both maps to the input, and with a zoomed prompt
    match the input up to the match's size and the match back down to the input; the normal
    statistics' stride-8 map to the input."""
    size, grid = model.cfg.input_size, model.cfg.grid
    pairs = [(grid, size), (4 * grid, size)]
    if model.uses_stats:
        pairs.append((2 * grid, size))
    if model.cfg.match_zoom > 1:
        pairs += [(size, model.match_size), (model.match_grid, size)]
    return pairs


def box_mean_max(amap: torch.Tensor, k: int) -> torch.Tensor:
    """max of the k×k mean (stride 1, no padding) of ``B×1×H×W`` maps -> ``B``.

    Identical to `OneNIP.image_score`. A k×k stride-1 pool costs k² adds per output; this pools
    k×1 then 1×k (2k adds) and moves the spatial axis that is not pooled into channels, so the
    plugin's vectorised channel blocks are full instead of 1/16 used.
    """
    k = min(k, amap.shape[-2], amap.shape[-1])
    rows_as_channels = amap.transpose(1, 2)  # B×H×1×W
    pooled_w = F.avg_pool2d(rows_as_channels, (1, k), stride=1)  # B×H×1×W'
    cols_as_channels = pooled_w.permute(0, 3, 1, 2)  # B×W'×H×1
    pooled = F.avg_pool2d(cols_as_channels, (k, 1), stride=1)  # B×W'×H'×1
    return pooled.amax(dim=(1, 2, 3))


class ExportAttention(nn.Module):
    """Same maths as the wrapped `nn.MultiheadAttention` (batch_first, eval), export-friendly.

    Projections are three `linear`s on the module's own weights, the 1/√d scale is folded into
    the query projection, keys are laid out head × dim × token by one permute (which OpenVINO
    folds into the attention kernel), then softmax(q·k + mask)·v.
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if not mha.batch_first or mha.in_proj_weight is None:
            raise ValueError("ExportAttention needs a batch_first MHA with a packed in_proj")
        self.mha = mha

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, None]:
        m = self.mha
        wq, wk, wv = m.in_proj_weight.chunk(3)
        bq, bk, bv = m.in_proj_bias.chunk(3)
        b, nq, d = query.shape
        h = m.num_heads
        scale = (d // h) ** -0.5

        def split(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            return F.linear(x, w, bias).view(b, x.shape[1], h, d // h)  # B×N×h×dh

        q = split(query, wq * scale, bq * scale).transpose(1, 2)  # B×h×Nq×dh
        k = split(key, wk, bk).permute(0, 2, 3, 1)  # B×h×dh×Nk
        scores = q @ k
        if attn_mask is not None:
            scores = scores + attn_mask
        o = scores.softmax(dim=-1) @ split(value, wv, bv).transpose(1, 2)
        return m.out_proj(o.transpose(1, 2).reshape(b, nq, d)), None


def export_copy(model: OneNIP) -> OneNIP:
    """An eval-mode deep copy of `model` with every attention swapped for `ExportAttention`."""
    out = copy.deepcopy(model).eval()
    for module in list(out.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.MultiheadAttention):
                setattr(module, name, ExportAttention(child))
    return out


class PromptEncoderGraph(nn.Module):
    """`image` u8 B×H×W×3 -> `prompt_tokens` f32 B×N×D."""

    def __init__(self, model: OneNIP) -> None:
        super().__init__()
        self.model = model
        self.upsample = MatrixUpsample(upsample_pairs(model))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.encode_prompt(to_model_input(image), upsample=self.upsample)


class DetectorGraph(nn.Module):
    """(`image` u8 B×H×W×3, `prompt_tokens` f32 1×N×D) -> (`anomaly_map`, `image_score`)."""

    def __init__(self, model: OneNIP) -> None:
        super().__init__()
        self.model = model
        self.upsample = MatrixUpsample(upsample_pairs(model))

    def forward(self, image: torch.Tensor, prompt_tokens: torch.Tensor):
        amap = self.model.anomaly_map(to_model_input(image), prompt_tokens, self.upsample)
        return amap, box_mean_max(amap, self.model.cfg.score_pool)
