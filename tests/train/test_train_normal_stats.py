"""Normal statistics: the Gaussian fit is exact, flags what the normal images never showed, is
fused by the documented rule, survives a checkpoint and exports as one graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic_parts import export_detector, tiny_model_config

from lineguard.train import normal_stats as ns
from lineguard.train.torch_model import OneNIP

SIZE = 64


def _parts(n: int, seed: int = 0) -> np.ndarray:
    """uint8 ``n×SIZE×SIZE×3`` good parts: a gradient with mild noise (the normal spread)."""
    rng = np.random.default_rng(seed)
    base = np.linspace(60, 190, SIZE)[None, :, None] * np.ones((SIZE, 1, 3))
    noise = rng.normal(0, 6, (n, SIZE, SIZE, 3))
    return np.clip(base[None] + noise, 0, 255).astype(np.uint8)


def _fitted(weight: float = 0.5) -> OneNIP:
    torch.manual_seed(0)
    model = OneNIP(tiny_model_config(SIZE, stats_weight=weight)).eval()
    ns.fit_model(model, _parts(240), "cpu")  # more images than the 152 channels
    model.stats_scale.fill_(2.0)
    return model


def test_fit_gives_each_positions_mean_and_shrunk_inverse_covariance() -> None:
    g = torch.Generator().manual_seed(0)
    feats = (
        torch.randn(40, 3, 2, 2, generator=g) * torch.tensor([1.0, 2.0, 0.5])[None, :, None, None]
    )
    images = np.zeros((40, 4, 4, 3), np.uint8)
    calls = iter(feats.split(16))
    mean, precision = ns.fit(lambda x: next(calls), images, "cpu", batch_size=16)
    assert mean.shape == (4, 3) and precision.shape == (4, 3, 3)
    x = feats.flatten(2).permute(2, 0, 1).double()  # P×N×C
    torch.testing.assert_close(mean.double(), x.mean(1), rtol=1e-5, atol=1e-6)
    cov = torch.stack([torch.cov(p.T) for p in x])
    ridge = ns.SHRINKAGE * cov.diagonal(dim1=1, dim2=2).mean(-1)
    cov = cov + ridge[:, None, None] * torch.eye(3, dtype=cov.dtype)
    torch.testing.assert_close(precision.double(), torch.linalg.inv(cov), rtol=1e-4, atol=1e-4)
    # the distance of each position's mean to its own Gaussian is zero
    at_mean = mean.T.reshape(1, 3, 2, 2)
    assert float(ns.mahalanobis(at_mean, mean, precision).max()) < 1e-3


def test_the_statistics_map_flags_a_change_the_normal_images_never_showed() -> None:
    model = _fitted()
    query = _parts(1, seed=9)
    query[0, 24:40, 24:40] = 255 - query[0, 24:40, 24:40]  # a local defect
    with torch.no_grad():
        x = torch.from_numpy(query).permute(0, 3, 1, 2).float() / 255
        good = torch.from_numpy(_parts(1, seed=10)).permute(0, 3, 1, 2).float() / 255
        bad_map, good_map = model.stats_map(model.taps(x)), model.stats_map(model.taps(good))
    # on a 64-px image the stride-16 tap sees most of it: the change spreads, peaking inside
    inside, corner = bad_map[0, 0, 26:38, 26:38].mean(), bad_map[0, 0, :12, :12].mean()
    assert float(inside) > 2 * float(corner)
    assert float(bad_map.max()) > 5 * float(good_map.max())
    assert float(good_map.max()) < 2 * float(good_map.min())  # another good part: flat


def test_fused_map_follows_the_documented_rule() -> None:
    model = _fitted(0.5)
    x = torch.from_numpy(_parts(2, seed=3)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        tokens = model.encode_prompt(x[:1])
        amap, _ = model.detect(x, tokens)
        s_rec, m_hat, _ = model.detect_parts(x, tokens)
        g = model.stats_map(model.taps(x))
    a = model.cfg.fusion_alpha
    learned = (1 - a) * s_rec + a * model.fusion_scale * m_hat
    torch.testing.assert_close(amap, 0.5 * learned + 0.5 * 2.0 * g)


def test_statistics_travel_in_the_checkpoint_and_older_ones_still_load() -> None:
    model = _fitted()
    fresh = OneNIP(tiny_model_config(SIZE, stats_weight=0.5), pretrained=False)
    fresh.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(fresh.stats_precision, model.stats_precision)
    assert fresh.uses_stats and float(fresh.stats_scale) == 2.0
    state = model.state_dict()
    for key in ("stats_mean", "stats_precision", "stats_scale"):
        del state[key]
    old = OneNIP(tiny_model_config(SIZE, stats_weight=0.5), pretrained=False)
    old.load_state_dict(state, strict=True)
    assert not old.has_stats and not old.uses_stats  # nothing to fuse: the learned map alone


def test_onnx_export_carries_the_statistics_as_constants(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    from lineguard.compress.graphs import to_model_input

    model = _fitted(0.5)
    x = torch.from_numpy(_parts(2, seed=5))
    with torch.no_grad():
        tokens = model.encode_prompt(to_model_input(x[:1]))
        amap, score = model.detect(to_model_input(x), tokens)
    det = export_detector(model, x, tokens, tmp_path / "det.onnx")
    d = ort.InferenceSession(str(det), providers=["CPUExecutionProvider"])
    amap_o, score_o = d.run(None, {"image": x.numpy(), "prompt_tokens": tokens.numpy()})
    np.testing.assert_allclose(amap_o, amap.numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(score_o, score.numpy(), rtol=1e-3, atol=1e-3)
    # INT8 leaves the quadratic form (one MatMul with the 3-D precision constant) float
    ov = pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from lineguard.compress.schemes import SCHEMES, ignored_scope, stats_matmuls

    graph = ov.Core().read_model(str(det))
    found = stats_matmuls(graph)
    assert len(found) == 1
    for scheme in SCHEMES:
        assert set(found) <= set(ignored_scope(graph, scheme).names)


def test_recipe_score_judges_the_map_after_the_statistics() -> None:
    from lineguard.train.proxy import recipe_score

    metrics = {
        "map_blur": {"val_proxy": {"val_proxy": 0.74}},
        "prompt_match": {"weight": 0.0, "zoom": 1, "tried": {"1": {"0": {"val_proxy": 0.50}}}},
        "normal_stats": {
            "weight": 0.5,
            "tried": {"0": {"val_proxy": 0.5}, "0.5": {"val_proxy": 0.6}},
        },
    }
    assert recipe_score(metrics) == pytest.approx({"proxy": 0.74, "judge": 0.6, "score": 0.67})
