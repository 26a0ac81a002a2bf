"""OneNIP as a pure, export-safe ``nn.Module`` (post-fix "v2" decoder, spec §4, §6, §8).

A frozen CNN gives multi-scale features; a transformer reconstructs the query's features while a
bidirectional decoder lets them talk to ONE normal prompt image; a small refiner sharpens the
error map. Training glue (optimizer, synthesis, data) lives elsewhere: this file only has what
the exported graphs and the loss need. Entry points:

* ``encode_prompt(images)`` -> prompt tokens (independent of any query: computed once per station),
* ``detect(images, prompt_tokens)`` -> (anomaly map, image score),
* ``forward_train(...)`` -> everything the losses need.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from lineguard.train import normal_stats as ns
from lineguard.train import prompt_match as pm
from lineguard.train.backbone import NECK_STRIDE, FrozenBackbone, neck
from lineguard.train.model_layers import (
    DecoderLayer,
    EncoderLayer,
    Refiner,
    feature_jitter,
    gaussian_matrix,
    neighbor_mask,
)

__all__ = [
    "CLOSING_BUFFERS",
    "OneNIP",
    "OneNIPConfig",
    "count_parameters",
    "gaussian_matrix",
    "neighbor_mask",
]

#: buffers the closing choices set after the last step (fusion scales, normal statistics)
CLOSING_BUFFERS = ("fusion_scale", "match_scale", "stats_scale", "stats_mean", "stats_precision")

#: maps ``B×1×h×w`` to ``B×1×H×W`` (the input size); default `bilinear_up`
Upsample = Callable[[torch.Tensor, int], torch.Tensor]


def bilinear_up(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear, ``align_corners=True`` (the spec's resize of both maps to the input)."""
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=True)


class OneNIPConfig(BaseModel):
    """Architecture of one OneNIP model (saved in checkpoints and model cards)."""

    model_config = ConfigDict(extra="forbid")

    backbone: str = Field("tf_efficientnet_lite2", title="timm backbone name")
    weights: Path | None = Field(
        None, title="local backbone weights file (.pth/.safetensors); None = packaged weights"
    )
    input_size: int = Field(224, ge=32, title="square input size in pixels (multiple of 16)")
    hidden_dim: int = Field(256, ge=8, title="transformer width D")
    nhead: int = Field(8, ge=1, title="attention heads")
    dim_feedforward: int = Field(1024, ge=8, title="FFN / MLP hidden width")
    num_encoder_layers: int = Field(4, ge=1, title="encoder layers")
    num_decoder_layers: int = Field(4, ge=1, title="bidirectional decoder layers")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, title="dropout (attention, residual)")
    jitter_scale: float = Field(20.0, ge=0.0, title="feature jitter scale (training only)")
    jitter_prob: float = Field(1.0, ge=0.0, le=1.0, title="probability of jittering a batch")
    neighbor_size: int | None = Field(
        None, ge=1, title="neighbour mask size; window half-width is neighbor_size//2"
    )
    refiner_channels: int = Field(128, ge=1, title="refiner width")
    fusion_alpha: float = Field(0.5, ge=0.0, le=1.0, title="weight of the refiner map in fusion")
    score_pool: int = Field(16, ge=1, title="average-pool size before the image-score max")
    map_blur_sigma: float = Field(
        0.0,
        ge=0.0,
        title="Gaussian σ (input pixels) smoothing both maps; 0 = none",
        description="Chosen after training on the validation proxy (train/proxy.py), like the "
        "fusion scale; inside the exported detector it is two constant matrix products.",
    )
    match_weight: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        title="share of the training-free prompt-match map in the final map; 0 = not used",
        description="Chosen after training on held-out validation defects (train/prompt_match.py)",
    )
    match_radius: int = Field(
        2, ge=0, le=4, title="prompt-match search radius, stride-4 cells of the unzoomed input"
    )
    match_zoom: int = Field(
        1,
        ge=1,
        le=2,
        title="the prompt match compares the input upsampled by this factor (1 = as is)",
        description="2 halves the match's stride in input pixels for one more backbone pass on "
        "the upsampled image; the radius keeps its reach in input pixels. Chosen with "
        "match_weight on held-out validation defects.",
    )

    stats_weight: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        title="share of the normal-statistics map in the final map; 0 = not used",
        description="A per-position Gaussian of the training images' descriptors "
        "(train/normal_stats.py); its share is chosen after training on held-out validation "
        "defects, like match_weight.",
    )

    @model_validator(mode="after")
    def _check(self) -> OneNIPConfig:
        if self.input_size % NECK_STRIDE:
            raise ValueError(f"input_size {self.input_size} must be a multiple of {NECK_STRIDE}")
        if self.hidden_dim % self.nhead or self.hidden_dim % 2:
            raise ValueError(f"hidden_dim {self.hidden_dim} must be even and divisible by nhead")
        grid = self.input_size // NECK_STRIDE
        if self.neighbor_size is None:
            self.neighbor_size = max(1, grid // 2)  # spec §4.1: feature_size // 2
        if min(2 * (self.neighbor_size // 2) + 1, grid) ** 2 >= grid * grid:
            raise ValueError(
                f"neighbor_size {self.neighbor_size} hides the whole {grid}x{grid} token grid"
            )
        return self

    @property
    def grid(self) -> int:
        return self.input_size // NECK_STRIDE


class OneNIP(nn.Module):
    """OneNIP: frozen backbone + neck + reconstruction transformer + refiner.

    Inputs are float ``B×3×H×W`` RGB in [0, 1]; normalisation is inside (buffers), so exported
    graphs carry it. ``pretrained=False`` skips reading backbone weights (use it before
    ``load_state_dict`` of a checkpoint, which holds the backbone too).
    """

    def __init__(self, cfg: OneNIPConfig, pretrained: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = FrozenBackbone(cfg.backbone, cfg.weights, pretrained=pretrained)
        self.register_buffer("mean", torch.tensor(self.backbone.mean).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(self.backbone.std).view(1, 3, 1, 1), False)
        c = sum(self.backbone.channels)
        d, h = cfg.hidden_dim, cfg.grid
        self.feat_channels, self.grid = c, h
        self.input_proj = nn.Linear(c, d)
        self.output_proj = nn.Linear(d, c)
        self.encoder = nn.ModuleList(
            EncoderLayer(d, cfg.nhead, cfg.dim_feedforward, cfg.dropout)
            for _ in range(cfg.num_encoder_layers)
        )
        self.decoder = nn.ModuleList(
            DecoderLayer(d, cfg.nhead, cfg.dim_feedforward, cfg.dropout)
            for _ in range(cfg.num_decoder_layers)
        )
        self.final_attn = nn.MultiheadAttention(d, cfg.nhead, dropout=cfg.dropout, batch_first=True)
        self.final_dropout = nn.Dropout(cfg.dropout)
        self.decoder_norm = nn.LayerNorm(d)
        self.refiner = Refiner(c, cfg.refiner_channels)
        self.row_embed = nn.Embedding(h, d // 2)
        self.col_embed = nn.Embedding(h, d // 2)
        assert cfg.neighbor_size is not None
        self.register_buffer("attn_mask", neighbor_mask(h, h, cfg.neighbor_size // 2), False)
        # c in (1-α)·S_rec + α·c·M̂; set by the trainer from NORMAL validation images.
        self.register_buffer("fusion_scale", torch.tensor(1.0))
        # k in (1-w)·A + w·k·H: H's spread matched to the learned map A's on normal validation
        self.register_buffer("match_scale", torch.tensor(1.0))
        # the normal statistics (empty until fitted) and k_g, their spread matched like k's
        self.register_buffer("stats_mean", torch.zeros(0))
        self.register_buffer("stats_precision", torch.zeros(0))
        self.register_buffer("stats_scale", torch.tensor(1.0))
        self.match_channels = pm.match_channels(self.backbone.channels)
        self.set_map_blur(cfg.map_blur_sigma)
        self._init_weights()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # checkpoints from before the prompt match have no k: 1.0 (unused while its weight is 0)
        state_dict.setdefault(prefix + "match_scale", torch.ones(()))
        # ... nor normal statistics, whose shapes are only known once fitted
        for name in ("stats_mean", "stats_precision"):
            value = state_dict.setdefault(prefix + name, torch.zeros(0))
            setattr(self, name, torch.empty_like(value, device=self.stats_scale.device))
        state_dict.setdefault(prefix + "stats_scale", torch.ones(()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_normal_stats(self, mean: torch.Tensor, precision: torch.Tensor) -> None:
        """Keep the fitted per-position Gaussian (:func:`normal_stats.fit`) as model constants."""
        device = self.stats_scale.device
        self.stats_mean = mean.to(device, torch.float32)
        self.stats_precision = precision.to(device, torch.float32)

    def set_map_blur(self, sigma: float) -> None:
        """Smooth both maps with a Gaussian of ``sigma`` input pixels from now on (0 = off);
        recorded in ``cfg`` so checkpoints and exported graphs carry it."""
        self.cfg.map_blur_sigma = float(sigma)
        g = gaussian_matrix(self.cfg.input_size, sigma) if sigma > 0 else None
        if g is not None and hasattr(self, "fusion_scale"):
            g = g.to(self.fusion_scale.device)
        self.register_buffer("blur_matrix", g, persistent=False)

    def smooth(self, amap: torch.Tensor) -> torch.Tensor:
        """``B×1×S×S`` map smoothed by :meth:`set_map_blur`'s Gaussian (identity when off)."""
        if self.blur_matrix is None:
            return amap
        g = self.blur_matrix.to(amap.dtype)
        return g @ amap @ g.transpose(0, 1)

    def _init_weights(self) -> None:
        """xavier_uniform on every conv/linear of the head, zero bias; embeddings U[0, 1)."""
        for name, m in self.named_modules():
            if name.startswith("backbone"):
                continue
            if isinstance(m, nn.Conv2d | nn.Linear | nn.ConvTranspose2d):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    # ---------------------------------------------------------------- building blocks
    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> the backbone's ImageNet-normalised input."""
        return (images - self.mean) / self.std

    def taps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The frozen backbone's /2, /4, /8, /16 taps of normalised images."""
        return self.backbone(self.normalise(images))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen backbone + neck: ``B×C×h×w`` (deterministic, so it can be cached)."""
        return neck(self.taps(images), (self.grid, self.grid))

    @property
    def uses_match(self) -> bool:
        return self.cfg.match_weight > 0.0

    @property
    def has_stats(self) -> bool:
        return self.stats_mean.numel() > 0

    @property
    def uses_stats(self) -> bool:
        return self.cfg.stats_weight > 0.0 and self.has_stats

    def stats_map(self, taps: list[torch.Tensor], upsample: Upsample = bilinear_up) -> torch.Tensor:
        """G: the Mahalanobis distance to the normal statistics, ``B×1×H×W``, smoothed."""
        if not self.has_stats:
            raise ValueError("this model has no normal statistics: fit them first")
        dist = ns.mahalanobis(ns.descriptors(taps), self.stats_mean, self.stats_precision)
        return self.smooth(upsample(dist, self.cfg.input_size))

    @property
    def match_size(self) -> int:
        """Side of the image the prompt match describes (the input times ``match_zoom``)."""
        return self.cfg.input_size * self.cfg.match_zoom

    @property
    def match_grid(self) -> int:
        return self.match_size // pm.MATCH_STRIDE

    @property
    def match_rows(self) -> int:
        """Token rows that carry one prompt's packed match descriptors."""
        return pm.match_token_count(self.backbone.channels, self.match_size, self.cfg.hidden_dim)

    def match_descriptors(
        self, images: torch.Tensor, taps: list[torch.Tensor], upsample: Upsample = bilinear_up
    ) -> torch.Tensor:
        """The prompt match's descriptors; from the upsampled image when ``match_zoom`` > 1."""
        if self.cfg.match_zoom > 1:
            # normalise, then upsample (the same, as the resize is linear with unit weights): a
            # resize followed by the mean's subtraction reads as a biased MatMul to INT8 tools
            taps = self.backbone(upsample(self.normalise(images), self.match_size))
        return pm.descriptors(taps)

    @property
    def prompt_token_count(self) -> int:
        """Rows of the prompt tokens: the grid's tokens, plus the packed match descriptors."""
        return self.grid * self.grid + (self.match_rows if self.uses_match else 0)

    def pos_embed(self) -> torch.Tensor:
        """Learned 2-D embedding, ``1×(h·w)×D``: first half column (x), second half row (y)."""
        h = self.grid
        col = self.col_embed.weight.unsqueeze(0).expand(h, h, -1)
        row = self.row_embed.weight.unsqueeze(1).expand(h, h, -1)
        return torch.cat([col, row], dim=-1).reshape(1, h * h, -1)

    def tokens(self, feats: torch.Tensor) -> torch.Tensor:
        """``B×C×h×w`` -> raw tokens ``B×(h·w)×C``, row-major."""
        return feats.flatten(2).transpose(1, 2)

    def jitter(self, raw: torch.Tensor) -> torch.Tensor:
        """Feature jitter on raw tokens, in training mode only."""
        cfg = self.cfg
        if not self.training or cfg.jitter_scale <= 0 or cfg.jitter_prob <= 0:
            return raw
        if cfg.jitter_prob < 1.0 and torch.rand(()).item() >= cfg.jitter_prob:
            return raw
        return feature_jitter(raw, cfg.jitter_scale)

    def encode(self, raw: torch.Tensor) -> torch.Tensor:
        """input_proj + masked encoder on raw tokens ``B×N×C`` -> ``B×N×D``."""
        s, pos = self.input_proj(raw), self.pos_embed()
        for layer in self.encoder:
            s = layer(s, pos, self.attn_mask)
        return s

    def reconstruct(self, query: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """Decoder + final cross-attention: encoded query/prompt tokens -> ``B×C×h×w``."""
        pos = self.pos_embed()
        p, x = prompt.expand(query.shape[0], -1, -1), query
        for layer in self.decoder:
            p, x = layer(p, x, pos, self.attn_mask)
        a = self.final_attn(p + pos, x + pos, x, need_weights=False)[0]
        out = self.output_proj(self.decoder_norm(p + self.final_dropout(a)))
        h = self.grid
        return out.transpose(1, 2).reshape(out.shape[0], -1, h, h)

    def refine_logit(self, err: torch.Tensor, upsample: Upsample = bilinear_up) -> torch.Tensor:
        """Refiner logit at full input resolution from the C-channel error."""
        return upsample(self.refiner(err), self.cfg.input_size)

    def rec_map(
        self, rec: torch.Tensor, feats: torch.Tensor, upsample: Upsample = bilinear_up
    ) -> torch.Tensor:
        """S_rec: channel-L2 error upsampled to the input (align_corners=True)."""
        s = torch.sqrt(((rec - feats) ** 2).sum(dim=1, keepdim=True))
        return upsample(s, self.cfg.input_size)

    # ---------------------------------------------------------------- entry points
    def encode_prompt(
        self,
        images: torch.Tensor,
        with_match: bool | None = None,
        upsample: Upsample = bilinear_up,
    ) -> torch.Tensor:
        """Prompt images ``B×3×H×W`` -> tokens ``B×(h·w)×D`` (no query involved), followed by
        the packed prompt-match descriptors when the match is used (or ``with_match``)."""
        taps = self.taps(images)
        tokens = self.encode(self.jitter(self.tokens(neck(taps, (self.grid, self.grid)))))
        if self.uses_match if with_match is None else with_match:
            d = self.cfg.hidden_dim
            desc = self.match_descriptors(images, taps, upsample)
            packed = pm.pack(desc, self.match_rows, d).to(tokens.dtype)
            tokens = torch.cat([tokens, packed], dim=1)
        return tokens

    def detect_parts(
        self,
        images: torch.Tensor,
        prompt_tokens: torch.Tensor,
        upsample: Upsample = bilinear_up,
        taps: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(S_rec, M̂, H), each ``B×1×H×W``; H (the prompt match) only when the tokens carry
        the prompt's descriptors, else None. The trainer measures the fusion scales from these.
        ``taps`` of ``images`` when already computed.
        """
        taps = self.taps(images) if taps is None else taps
        feats = neck(taps, (self.grid, self.grid))
        n = self.grid * self.grid
        rec = self.reconstruct(self.encode(self.tokens(feats)), prompt_tokens[:, :n])
        m_hat = torch.sigmoid(self.refine_logit((rec - feats).abs(), upsample))
        match = None
        if prompt_tokens.shape[1] > n:
            ref = pm.unpack(prompt_tokens[:, n:], self.match_channels, self.match_grid)
            query = self.match_descriptors(images, taps, upsample)
            radius = self.cfg.match_radius * self.cfg.match_zoom  # same reach in input pixels
            dist = pm.match_distance(query, ref.to(query.dtype), radius)
            match = self.smooth(upsample(dist, self.cfg.input_size))
        return self.smooth(self.rec_map(rec, feats, upsample)), self.smooth(m_hat), match

    def anomaly_map(
        self, images: torch.Tensor, prompt_tokens: torch.Tensor, upsample: Upsample = bilinear_up
    ) -> torch.Tensor:
        """Fused map ``(1-w)·((1-α)·S_rec + α·c·M̂) + w·k·H``, ``B×1×H×W`` (w = match_weight,
        0 by default), then ``(1-w_g)·that + w_g·k_g·G`` when the normal statistics are used;
        `upsample` lets export swap the resize for one that compiles faster."""
        taps = self.taps(images)
        s_rec, m_hat, match = self.detect_parts(images, prompt_tokens, upsample, taps)
        alpha = self.cfg.fusion_alpha
        amap = (1.0 - alpha) * s_rec + alpha * self.fusion_scale * m_hat
        if self.uses_match:
            if match is None:
                raise ValueError("this model fuses the prompt match: encode the prompt with it")
            w = self.cfg.match_weight
            amap = (1.0 - w) * amap + w * self.match_scale * match
        if self.uses_stats:
            wg = self.cfg.stats_weight
            amap = (1.0 - wg) * amap + wg * self.stats_scale * self.stats_map(taps, upsample)
        return amap

    def detect(
        self, images: torch.Tensor, prompt_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(anomaly_map ``B×1×H×W``, image_score ``B``) against encoded prompt tokens.

        ``prompt_tokens`` is ``B×N×D`` or ``1×N×D`` (one golden sample for the whole batch).
        """
        amap = self.anomaly_map(images, prompt_tokens)
        return amap, self.image_score(amap)

    def image_score(self, amap: torch.Tensor) -> torch.Tensor:
        """Max of the ``score_pool``² average-pooled map (stride 1, no padding)."""
        k = min(self.cfg.score_pool, self.cfg.input_size)  # static: no shape-dependent trace
        return F.avg_pool2d(amap, k, stride=1).amax(dim=(1, 2, 3))

    def forward_train(
        self,
        image: torch.Tensor | None = None,
        synthetic: torch.Tensor | None = None,
        prompt: torch.Tensor | None = None,
        *,
        image_feats: torch.Tensor | None = None,
        synthetic_feats: torch.Tensor | None = None,
        prompt_feats: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Training pass on normal ``image``, its ``synthetic`` defect copy and a ``prompt``.

        Any ``*_feats`` (from :meth:`features`, e.g. cached) replaces the matching image. The
        prompt is encoded once and shared by both halves; jitter touches raw tokens only, targets
        stay clean. Returns ``rec_feat``, ``target_feat``, ``query_feat`` (``2B×C×h×w``) and
        ``ref_logit`` (``2B×1×H×W``).
        """
        f_n, f_a, f_p = self._train_feats(
            [
                (image, image_feats, "image"),
                (synthetic, synthetic_feats, "synthetic"),
                (prompt, prompt_feats, "prompt"),
            ]
        )
        query = torch.cat([f_n, f_a], dim=0)
        n = query.shape[0]
        raw = self.jitter(self.tokens(torch.cat([query, f_p], dim=0)))
        enc = self.encode(raw)
        q_tok, p_tok = enc[:n], enc[n:]
        if p_tok.shape[0] != 1:
            p_tok = p_tok.repeat(2, 1, 1)
        rec = self.reconstruct(q_tok, p_tok)
        return {
            "rec_feat": rec,
            "target_feat": torch.cat([f_n, f_n], dim=0),
            "query_feat": query,
            "ref_logit": self.refine_logit((rec - query).abs()),
        }

    def _train_feats(
        self, items: list[tuple[torch.Tensor | None, torch.Tensor | None, str]]
    ) -> list[torch.Tensor]:
        """Features for each (images, cached feats, name); missing ones in ONE backbone pass."""
        for imgs, feats, what in items:
            if feats is None and imgs is None:
                raise ValueError(f"forward_train needs {what} or {what}_feats")
        todo = [imgs for imgs, feats, _ in items if feats is None]
        computed: list[torch.Tensor] = []
        if todo:
            with torch.no_grad():
                computed = list(self.features(torch.cat(todo)).split([t.shape[0] for t in todo]))
        return [feats if feats is not None else computed.pop(0) for _, feats, _ in items]

    def forward(
        self, images: torch.Tensor, prompt_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.detect(images, prompt_tokens)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
