"""The training-free prompt match: exact packing, shift tolerance, fused and exported as one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic_parts import export_detector, tiny_model_config

from lineguard.train import prompt_match as pm
from lineguard.train.torch_model import OneNIP

SIZE = 64


def _model(weight: float, zoom: int = 1) -> OneNIP:
    torch.manual_seed(0)
    model = OneNIP(tiny_model_config(SIZE, match_weight=weight, match_zoom=zoom)).eval()
    model.match_scale.fill_(2.0)
    return model


def _part(seed: int = 0) -> torch.Tensor:
    """A smooth generated part: blobs on a gradient (structure for the early taps)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.linspace(0.2, 0.8, SIZE)[None, :].expand(SIZE, SIZE)
    img = base[None].repeat(3, 1, 1).clone()
    for _ in range(6):
        y, x = (torch.randint(8, SIZE - 8, (2,), generator=g)).tolist()
        img[:, y - 4 : y + 4, x - 4 : x + 4] = torch.rand(3, 1, 1, generator=g)
    return img[None]


def test_pack_and_unpack_are_exact_inverses() -> None:
    desc = torch.randn(2, 7, 5, 5)
    rows = pm.match_token_count([3, 4, 3, 9], 20, 6)  # 7 channels at 20/4 = 5 cells, width 6
    packed = pm.pack(desc, rows, 6)
    assert packed.shape == (2, rows, 6) and rows * 6 >= 7 * 25
    torch.testing.assert_close(pm.unpack(packed, 7, 5), desc)


def test_match_distance_tolerates_shifts_within_its_radius_only() -> None:
    g = torch.Generator().manual_seed(1)
    prompt = torch.randn(1, 4, 12, 12, generator=g)
    shifted = torch.roll(prompt, shifts=(1, 2), dims=(2, 3))
    inner = (slice(None), slice(None), slice(3, 9), slice(3, 9))
    assert float(pm.match_distance(shifted, prompt, 2)[inner].max()) < 1e-5
    assert float(pm.match_distance(shifted, prompt, 1)[inner].min()) > 0.1
    assert float(pm.match_distance(prompt, prompt, 0).max()) < 1e-5


@pytest.mark.parametrize("zoom", [1, 2])
def test_tokens_carry_the_descriptors_only_when_the_match_is_used(zoom: int) -> None:
    off, on = _model(0.0), _model(0.5, zoom)
    n = (SIZE // 16) ** 2
    with torch.no_grad():
        assert off.encode_prompt(_part()).shape[1] == n == off.prompt_token_count
        tokens = on.encode_prompt(_part())
    assert tokens.shape[1] == on.prompt_token_count == n + on.match_rows
    # a zoomed match describes the input upsampled: zoom² as many descriptors
    assert on.match_grid == SIZE * zoom // pm.MATCH_STRIDE
    # the learned tokens are the same: the descriptors ride behind them
    torch.testing.assert_close(tokens[:, :n], off.encode_prompt(_part()))


@pytest.mark.parametrize("zoom", [1, 2])
def test_fused_map_follows_the_documented_rule_and_finds_a_local_change(zoom: int) -> None:
    model = _model(0.5, zoom)
    prompt, query = _part(), _part().clone()
    query[:, :, 30:36, 40:46] = 1.0 - query[:, :, 30:36, 40:46]  # a local defect
    with torch.no_grad():
        tokens = model.encode_prompt(prompt)
        amap, _ = model.detect(query, tokens)
        s_rec, m_hat, match = model.detect_parts(query, tokens)
        same = model.detect_parts(prompt, tokens)[2]
    assert match is not None and same is not None
    a = model.cfg.fusion_alpha
    learned = (1 - a) * s_rec + a * model.fusion_scale * m_hat
    torch.testing.assert_close(amap, 0.5 * learned + 0.5 * 2.0 * match)
    assert float(same.max()) < 1e-3  # the golden sample matches itself everywhere
    inside, outside = match[0, 0, 30:36, 40:46].mean(), match[0, 0, :, :20].mean()
    assert float(inside) > 10 * float(outside)
    with pytest.raises(ValueError, match="prompt match"):
        model.detect(query, tokens[:, : (SIZE // 16) ** 2])


def test_checkpoints_from_before_the_match_still_load() -> None:
    state = _model(0.0).state_dict()
    del state["match_scale"]
    fresh = OneNIP(tiny_model_config(SIZE), pretrained=False)
    fresh.load_state_dict(state, strict=True)
    assert float(fresh.match_scale) == 1.0


@pytest.mark.parametrize("zoom", [1, 2])
def test_onnx_export_of_the_fused_map_matches_torch(tmp_path, zoom: int) -> None:
    ort = pytest.importorskip("onnxruntime")
    from lineguard.compress.graphs import PromptEncoderGraph, to_model_input

    model = _model(0.5, zoom)

    def u8(t: torch.Tensor) -> torch.Tensor:
        return (t * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()

    x, p = u8(_part(3)), u8(_part(4))
    with torch.no_grad():
        tokens = model.encode_prompt(to_model_input(p))
        amap, score = model.detect(to_model_input(x), tokens)
    enc, det = tmp_path / "enc.onnx", tmp_path / "det.onnx"
    kw = dict(opset_version=17, dynamo=False)
    torch.onnx.export(
        PromptEncoderGraph(model),
        (p,),
        str(enc),
        input_names=["image"],
        output_names=["prompt_tokens"],
        **kw,
    )
    export_detector(model, x, tokens, det)
    e = ort.InferenceSession(str(enc), providers=["CPUExecutionProvider"])
    d = ort.InferenceSession(str(det), providers=["CPUExecutionProvider"])
    (tok,) = e.run(None, {"image": p.numpy()})
    np.testing.assert_allclose(tok, tokens.numpy(), rtol=1e-4, atol=1e-4)
    amap_o, score_o = d.run(None, {"image": x.numpy(), "prompt_tokens": tok})
    np.testing.assert_allclose(amap_o, amap.numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(score_o, score.numpy(), rtol=1e-3, atol=1e-3)


def test_recipe_score_averages_the_kept_proxy_and_the_judge_of_the_shipped_map() -> None:
    from lineguard.train.proxy import recipe_score

    tried = {
        "1": {"0": {"val_proxy": 0.50}, "0.25": {"val_proxy": 0.56}},
        "2": {"0.25": {"val_proxy": 0.58}},
    }
    metrics = {
        "val_proxy": 0.70,
        "map_blur": {"val_proxy": {"val_proxy": 0.74}},
        "prompt_match": {"weight": 0.25, "zoom": 2, "tried": tried},
    }
    assert recipe_score(metrics) == pytest.approx({"proxy": 0.74, "judge": 0.58, "score": 0.66})
    # the learned map alone (w = 0) is judged once, at the first zoom
    learned = {**metrics, "prompt_match": {"weight": 0.0, "zoom": 1, "tried": tried}}
    assert recipe_score(learned)["judge"] == 0.50
    # no judge (an older checkpoint): no score, so nothing is ranked on half the evidence
    assert recipe_score({"val_proxy": 0.7})["score"] is None
