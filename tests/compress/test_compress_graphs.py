"""The export graphs' faster forms compute what the trained model computes (in PyTorch)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from synthetic_parts import tiny_model_config
from torch import nn

from lineguard.compress.graphs import (
    DetectorGraph,
    ExportAttention,
    MatrixUpsample,
    PromptEncoderGraph,
    bilinear_matrix,
    box_mean_max,
    export_copy,
    to_model_input,
)
from lineguard.train.torch_model import OneNIP


@pytest.mark.parametrize(("n_in", "n_out"), [(4, 64), (14, 224), (56, 224), (16, 256), (1, 8)])
def test_bilinear_matrix_is_align_corners_interpolation(n_in, n_out):
    x = torch.randn(2, 3, n_in, n_in)
    up = MatrixUpsample([(n_in, n_out)])(x, n_out)
    ref = F.interpolate(x, size=(n_out, n_out), mode="bilinear", align_corners=True)
    assert up.shape == ref.shape
    torch.testing.assert_close(up, ref, atol=5e-5, rtol=1e-5)  # f32 rounding of the weights
    r = bilinear_matrix(n_out, n_in)
    torch.testing.assert_close(r.sum(1), torch.ones(n_out))  # weights of each output sum to 1
    assert (r > 0).sum(1).max() <= 2  # at most two neighbours per output


def test_matrix_upsample_refuses_a_resize_it_was_not_built_for():
    with pytest.raises(ValueError, match="not built for 4x4 -> 32"):
        MatrixUpsample([(4, 64)])(torch.zeros(1, 1, 4, 4), 32)


@pytest.mark.parametrize(("size", "k"), [(64, 16), (40, 7), (12, 16), (33, 1)])
def test_box_mean_max_equals_the_2d_pool(size, k):
    amap = torch.rand(3, 1, size, size)
    amap[1, 0, 2:6, 3:7] += 4.0  # a bright spot in one map
    kk = min(k, size)
    ref = F.avg_pool2d(amap, kk, stride=1).amax(dim=(1, 2, 3))
    torch.testing.assert_close(box_mean_max(amap, k), ref, atol=1e-6, rtol=1e-5)


def test_export_attention_matches_multihead_attention():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    q, kv = torch.randn(2, 10, 32), torch.randn(2, 12, 32)
    mask = torch.zeros(10, 12)
    mask[torch.arange(10), torch.arange(10)] = float("-inf")
    ref = mha(q, kv, kv, attn_mask=mask, need_weights=False)[0]
    out, weights = ExportAttention(mha)(q, kv, kv, attn_mask=mask)
    assert weights is None
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_export_graphs_reproduce_detect_and_leave_the_model_alone():
    torch.manual_seed(0)
    model = OneNIP(tiny_model_config(), pretrained=False).eval()
    with torch.no_grad():
        model.fusion_scale.fill_(2.5)  # a trained model's constant, not the default 1
    fast = export_copy(model)
    assert not any(isinstance(m, ExportAttention) for m in model.modules())
    assert sum(isinstance(m, ExportAttention) for m in fast.modules()) == 4  # enc, 2 dec, final
    size = model.cfg.input_size
    images = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8)
    with torch.no_grad():
        tokens = model.encode_prompt(to_model_input(images[:1]))
        ref_map, ref_score = model.detect(to_model_input(images), tokens)
        torch.testing.assert_close(PromptEncoderGraph(fast)(images[:1]), tokens, atol=1e-5, rtol=0)
        amap, score = DetectorGraph(fast)(images, tokens)
    torch.testing.assert_close(amap, ref_map, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(score, ref_score, atol=1e-5, rtol=1e-4)
