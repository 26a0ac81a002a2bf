"""OneNIP module invariants (spec §14.1) on a tiny CPU configuration, plus losses and export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from synthetic_parts import tiny_model_config

from lineguard.train.losses import dice_loss, feature_mse, onenip_loss
from lineguard.train.torch_model import OneNIP, OneNIPConfig, count_parameters, neighbor_mask

torch.set_num_threads(2)

SIZE = 64


def tiny_cfg(**kw) -> OneNIPConfig:
    return tiny_model_config(SIZE, **kw)


@pytest.fixture(scope="module")
def model() -> OneNIP:
    torch.manual_seed(0)
    return OneNIP(tiny_cfg()).eval()


def images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, SIZE, SIZE, generator=g)


# ------------------------------------------------------------------ config
def test_config_defaults_follow_spec():
    cfg = OneNIPConfig()
    assert cfg.backbone == "tf_efficientnet_lite2"
    assert (cfg.input_size, cfg.hidden_dim, cfg.nhead, cfg.dim_feedforward) == (224, 256, 8, 1024)
    assert cfg.neighbor_size == 7  # feature_size // 2 at 224
    assert OneNIPConfig(input_size=256).neighbor_size == 8
    assert OneNIPConfig(input_size=320).neighbor_size == 10
    with pytest.raises(ValidationError):
        OneNIPConfig(input_size=100)  # not a multiple of 16
    with pytest.raises(ValidationError):
        OneNIPConfig(hidden_dim=100, nhead=8)
    with pytest.raises(ValidationError):
        OneNIPConfig(typo_field=1)
    with pytest.raises(ValidationError):
        OneNIPConfig(input_size=64, neighbor_size=8)  # window would hide the whole 4x4 grid


# ------------------------------------------------------------------ neighbour mask
def test_neighbor_mask_hides_exactly_the_window_at_224():
    cfg = OneNIPConfig()
    mask = neighbor_mask(cfg.grid, cfg.grid, cfg.neighbor_size // 2)
    assert mask.shape == (196, 196)
    hidden = torch.isinf(mask) & (mask < 0)
    assert set(mask[~hidden].unique().tolist()) == {0.0}
    assert hidden[7 * 14 + 7].sum() == 49  # centre: full 7x7 window incl. itself
    assert hidden[0].sum() == 16  # corner: 4x4 after clipping
    assert bool(hidden.diagonal().all())  # the token hides itself
    row = hidden[7 * 14 + 7].reshape(14, 14)
    assert bool(row[4:11, 4:11].all()) and int(row.sum()) == 49
    assert torch.equal(hidden, hidden.T)


def test_model_uses_the_mask_in_encoder_and_decoder(model):
    k = model.cfg.neighbor_size // 2
    assert torch.equal(model.attn_mask, neighbor_mask(model.grid, model.grid, k))
    # Masked attention: a token's encoder output ignores the values inside its own window.
    m = OneNIP(tiny_cfg(dropout=0.0, jitter_scale=0.0), pretrained=False).eval()
    raw = torch.randn(1, m.grid * m.grid, m.feat_channels)
    with torch.no_grad():
        layer = m.encoder[0]
        pos = m.pos_embed()
        s = m.input_proj(raw)
        base = layer.self_attn(s + pos, s + pos, s, attn_mask=m.attn_mask)[0]
        s2 = s.clone()
        s2[0, 0] += 5.0  # perturb token 0 only as a VALUE (keys too, but it is hidden from 0)
        out = layer.self_attn(s + pos, s2 + pos, s2, attn_mask=m.attn_mask)[0]
    assert torch.allclose(out[0, 0], base[0, 0], atol=1e-5)  # token 0 cannot see itself
    far = m.grid * m.grid - 1  # opposite corner sees token 0
    assert not torch.allclose(out[0, far], base[0, far], atol=1e-5)


# ------------------------------------------------------------------ shapes and outputs
def test_detect_shapes_ranges_and_parts(model):
    x, p = images(2, 1), images(1, 2)
    with torch.no_grad():
        tokens = model.encode_prompt(p)
        amap, score = model.detect(x, tokens)
        s_rec, m_hat, match = model.detect_parts(x, tokens)
    assert match is None  # the prompt match is off by default: tokens carry no descriptors
    n = (SIZE // 16) ** 2
    assert tokens.shape == (1, n, 32)
    assert amap.shape == (2, 1, SIZE, SIZE) and amap.dtype == torch.float32
    assert score.shape == (2,)
    assert bool((amap >= 0).all())
    assert bool((m_hat >= 0).all() and (m_hat <= 1).all())
    a = model.cfg.fusion_alpha
    torch.testing.assert_close(amap, (1 - a) * s_rec + a * model.fusion_scale * m_hat)
    pool = torch.nn.functional.avg_pool2d(amap, min(16, SIZE), stride=1)
    torch.testing.assert_close(score, pool.flatten(1).max(1).values)


def test_fusion_scale_is_a_saved_buffer(model):
    assert "fusion_scale" in model.state_dict()
    assert float(model.fusion_scale) == 1.0


def test_forward_train_shapes_and_clean_targets():
    torch.manual_seed(0)
    m = OneNIP(tiny_cfg(), pretrained=False).train()
    x, xa, p = images(2, 3), images(2, 4), images(2, 5)
    out = m.forward_train(x, xa, p)
    h = SIZE // 16
    c = m.feat_channels
    for key in ("rec_feat", "target_feat", "query_feat"):
        assert out[key].shape == (4, c, h, h)
    assert out["ref_logit"].shape == (4, 1, SIZE, SIZE)
    with torch.no_grad():
        f_n, f_a = m.features(x), m.features(xa)
    # Targets are the CLEAN normal features (no jitter), for both halves.
    torch.testing.assert_close(out["target_feat"], torch.cat([f_n, f_n]))
    torch.testing.assert_close(out["query_feat"], torch.cat([f_n, f_a]))
    # Gradients reach the head but never the frozen backbone.
    total, _ = onenip_loss(out, torch.zeros(2, 1, SIZE, SIZE))
    total.backward()
    assert m.input_proj.weight.grad is not None and m.refiner.predict.weight.grad is not None
    assert all(p.grad is None for p in m.backbone.parameters())


def test_cached_features_give_the_same_result():
    torch.manual_seed(0)
    m = OneNIP(tiny_cfg(), pretrained=False).eval()
    x, xa, p = images(2, 6), images(2, 7), images(2, 8)
    with torch.no_grad():
        a = m.forward_train(x, xa, p)
        b = m.forward_train(synthetic=xa, image_feats=m.features(x), prompt_feats=m.features(p))
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_prompt_is_encoded_once_and_shared_by_both_halves():
    torch.manual_seed(0)
    m = OneNIP(tiny_cfg(dropout=0.0), pretrained=False).eval()
    x, p = images(2, 9), images(2, 10)
    with torch.no_grad():
        out = m.forward_train(x, x, p)  # synthetic == normal => both halves identical
        tokens = m.encode_prompt(p)
        amap_rec = m.reconstruct(m.encode(m.tokens(m.features(x))), tokens)
    torch.testing.assert_close(out["rec_feat"][:2], out["rec_feat"][2:])
    torch.testing.assert_close(out["rec_feat"][:2], amap_rec)


def test_trainable_parameter_count_matches_the_official_model():
    """With the paper's b4 taps (272 ch) at 224 the head has exactly the spec's 8,372,625."""
    m = OneNIP(OneNIPConfig(backbone="tf_efficientnet_b4"), pretrained=False)
    assert m.feat_channels == 272
    assert count_parameters(m) == 8_372_625
    assert count_parameters(m.refiner) == 592_769


def test_forward_train_under_bf16_autocast():
    torch.manual_seed(0)
    m = OneNIP(tiny_cfg(), pretrained=False).train()
    mask = torch.zeros(2, 1, SIZE, SIZE)
    mask[:, :, 8:24, 8:24] = 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.forward_train(images(2, 20), images(2, 21), images(2, 22))
    total, _ = onenip_loss(out, mask)
    assert total.dtype == torch.float32 and bool(torch.isfinite(total))
    total.backward()
    assert bool(torch.isfinite(m.input_proj.weight.grad).all())


# ------------------------------------------------------------------ jitter and prompt independence
def test_jitter_only_in_training():
    torch.manual_seed(0)
    m = OneNIP(tiny_cfg(dropout=0.0), pretrained=False)
    x, p = images(1, 11), images(1, 12)
    m.eval()
    with torch.no_grad():
        e1, e2 = m.encode_prompt(p), m.encode_prompt(p)
        d1, d2 = m.detect(x, e1), m.detect(x, e2)
    torch.testing.assert_close(e1, e2)
    torch.testing.assert_close(d1[0], d2[0])
    m.train()  # dropout is 0, so only the jitter can change the result
    with torch.no_grad():
        t1, t2 = m.encode_prompt(p), m.encode_prompt(p)
        raw = m.tokens(m.features(p))
        jittered = m.jitter(raw)
    assert not torch.allclose(t1, t2)
    assert not torch.allclose(t1, e1)
    rel = ((jittered - raw).norm(dim=-1) / raw.norm(dim=-1)).mean()
    expected = m.cfg.jitter_scale / m.feat_channels**0.5  # E‖ε‖·‖f‖/C·scale ≈ √C/C·scale
    assert 0.8 * expected < rel < 1.2 * expected
    m.eval()
    assert torch.equal(m.jitter(raw), raw)


def test_prompt_tokens_do_not_depend_on_the_query(model):
    p = images(1, 13)
    with torch.no_grad():
        alone = model.encode_prompt(p)
        model.detect(images(2, 14), alone)  # a detection in between changes nothing
        again = model.encode_prompt(p)
        batched = model.encode_prompt(torch.cat([p, images(1, 15)]))[:1]
    torch.testing.assert_close(alone, again)
    torch.testing.assert_close(alone, batched, atol=1e-4, rtol=1e-4)  # batched kernels differ
    # ... and the detection depends on the prompt.
    x = images(1, 16)
    with torch.no_grad():
        a = model.detect(x, alone)[0]
        b = model.detect(x, model.encode_prompt(images(1, 17)))[0]
    assert not torch.allclose(a, b)


# ------------------------------------------------------------------ losses
def test_losses_match_hand_computed_values():
    rec = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    tgt = torch.tensor([[0.0, 2.0], [3.0, 2.0]])
    assert feature_mse(rec, tgt).item() == pytest.approx((1 + 0 + 0 + 4) / 4)
    # logits 0 -> p = 0.5 everywhere; 4 pixels, mask with 2 ones.
    logit = torch.zeros(1, 1, 2, 2)
    mask = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    # 1 - (Σpt + 1)/(Σp² + Σt² + 1) = 1 - (1 + 1)/(1 + 2 + 1) = 0.5
    assert dice_loss(logit, mask).item() == pytest.approx(0.5)
    # empty mask: 1 - 1/(Σp² + 1) = 1 - 1/2
    assert dice_loss(logit, torch.zeros_like(mask)).item() == pytest.approx(0.5)
    big = torch.full((1, 1, 2, 2), 50.0)
    # p ≈ 1 everywhere, mask 2 ones: 1 - 3/(4 + 2 + 1)
    assert dice_loss(big, mask).item() == pytest.approx(1 - 3 / 7, abs=1e-6)


def test_onenip_loss_combines_parts_with_spec_weights():
    g = torch.Generator().manual_seed(0)
    out = {
        "rec_feat": torch.randn(4, 3, 2, 2, generator=g),
        "target_feat": torch.randn(4, 3, 2, 2, generator=g),
        "ref_logit": torch.randn(4, 1, 8, 8, generator=g),
    }
    mask = (torch.rand(2, 8, 8, generator=g) > 0.5).float()
    total, parts = onenip_loss(out, mask)
    target = torch.cat([torch.zeros(2, 1, 8, 8), mask[:, None]])
    mse = ((out["rec_feat"] - out["target_feat"]) ** 2).mean()
    p = torch.sigmoid(out["ref_logit"])
    per = 1 - ((p * target).sum((1, 2, 3)) + 1) / (
        (p**2).sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1
    )
    torch.testing.assert_close(parts["mse"], mse)
    torch.testing.assert_close(parts["dice"], per.mean())
    torch.testing.assert_close(total, mse + 0.5 * per.mean())
    with pytest.raises(ValueError):
        onenip_loss(out, mask[:1])


# ------------------------------------------------------------------ export
class _PromptGraph(torch.nn.Module):
    def __init__(self, m: OneNIP) -> None:
        super().__init__()
        self.m = m

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.m.encode_prompt(image)


class _DetectGraph(torch.nn.Module):
    def __init__(self, m: OneNIP) -> None:
        super().__init__()
        self.m = m

    def forward(self, image: torch.Tensor, tokens: torch.Tensor):
        return self.m.detect(image, tokens)


def test_onnx_export_matches_torch(model, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    x, p = images(1, 18), images(1, 19)
    with torch.no_grad():
        tokens = model.encode_prompt(p)
        amap, score = model.detect(x, tokens)
    enc_path, det_path = tmp_path / "enc.onnx", tmp_path / "det.onnx"
    torch.onnx.export(
        _PromptGraph(model),
        (p,),
        str(enc_path),
        opset_version=17,
        input_names=["image"],
        output_names=["prompt_tokens"],
        dynamo=False,
    )
    torch.onnx.export(
        _DetectGraph(model),
        (x, tokens),
        str(det_path),
        opset_version=17,
        input_names=["image", "prompt_tokens"],
        output_names=["anomaly_map", "image_score"],
        dynamo=False,
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    enc = ort.InferenceSession(str(enc_path), opts, providers=["CPUExecutionProvider"])
    det = ort.InferenceSession(str(det_path), opts, providers=["CPUExecutionProvider"])
    (tok_o,) = enc.run(None, {"image": p.numpy()})
    np.testing.assert_allclose(tok_o, tokens.numpy(), rtol=1e-4, atol=1e-4)
    amap_o, score_o = det.run(None, {"image": x.numpy(), "prompt_tokens": tok_o})
    np.testing.assert_allclose(amap_o, amap.numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(score_o, score.numpy(), rtol=1e-3, atol=1e-3)
