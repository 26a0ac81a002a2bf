"""Frozen backbone: packaged ImageNet weights, no download, taps, eval-mode lock and the neck."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from lineguard.train.backbone import (
    BackboneError,
    FrozenBackbone,
    load_weights,
    neck,
    package_weights_path,
    read_state_dict,
)
from lineguard.train.torch_model import OneNIP, OneNIPConfig

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def lite0() -> FrozenBackbone:
    return FrozenBackbone("tf_efficientnet_lite0")


def test_packaged_weights_are_loaded_tensor_for_tensor(lite0):
    package = read_state_dict(package_weights_path("tf_efficientnet_lite0"))
    timm_keys = list(timm.create_model("tf_efficientnet_lite0").state_dict())
    by_timm_key = dict(zip(timm_keys, package.values(), strict=True))
    loaded = lite0.body.model.state_dict()
    assert len(loaded) > 100  # the pruned body (stem + 5 stages) still holds most tensors
    for key, tensor in loaded.items():
        assert torch.equal(tensor, by_timm_key[key]), key
    # Not a fresh random init: a random model differs from the package almost everywhere.
    fresh = timm.create_model("tf_efficientnet_lite0").state_dict()
    assert not torch.equal(fresh["blocks.1.0.conv_pw.weight"], loaded["blocks.1.0.conv_pw.weight"])


def test_packaged_weights_classify_a_natural_image():
    """The position mapping is semantically right: ImageNet labels for a known photo."""
    mpl = pytest.importorskip("matplotlib")
    cv2 = pytest.importorskip("cv2")
    path = Path(mpl.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not path.is_file():
        pytest.skip("matplotlib sample image not installed")
    img = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    h, w = img.shape[:2]
    s = min(h, w)
    img = img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    img = cv2.resize(img, (224, 224), interpolation=cv2.INTER_AREA)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    model = timm.create_model("tf_efficientnet_lite0").eval()
    load_weights(model, "tf_efficientnet_lite0", None)
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        top5 = model((x - mean) / std).topk(5).indices[0].tolist()
    # 652 military uniform, 834 suit, 906 Windsor tie, 457 bow tie
    assert {652, 834, 906, 457} & set(top5), top5


def test_frozen_and_in_eval_even_after_parent_train():
    m = OneNIP(
        OneNIPConfig(
            backbone="tf_efficientnet_lite0",
            input_size=64,
            hidden_dim=32,
            nhead=4,
            dim_feedforward=64,
            num_encoder_layers=1,
            num_decoder_layers=1,
        ),
        pretrained=False,
    )
    m.train()
    assert m.training
    assert not m.backbone.training
    assert all(not mod.training for mod in m.backbone.modules())
    assert all(not p.requires_grad for p in m.backbone.parameters())
    assert all(p.requires_grad for n, p in m.named_parameters() if not n.startswith("backbone"))
    # BN running stats do not move in a training-mode forward.
    before = {k: v.clone() for k, v in m.backbone.state_dict().items()}
    m.features(torch.rand(2, 3, 64, 64))
    after = m.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    ("name", "channels"),
    [("tf_efficientnet_lite0", [16, 24, 40, 112]), ("tf_efficientnet_lite2", [16, 24, 48, 120])],
)
def test_taps_are_the_last_block_of_the_stride_2_4_8_16_stages(name, channels):
    bb = FrozenBackbone(name, pretrained=False)
    assert bb.channels == channels
    assert bb.strides == [2, 4, 8, 16]
    with torch.no_grad():
        taps = bb(torch.rand(1, 3, 224, 224))
    assert [tuple(t.shape) for t in taps] == [
        (1, c, 224 // s, 224 // s) for c, s in zip(channels, (2, 4, 8, 16), strict=True)
    ]
    # The /32 stages and the classifier head are pruned away (never computed).
    assert len(bb.body.model.blocks) == 5


def test_b4_taps_match_the_paper_layout():
    bb = FrozenBackbone("tf_efficientnet_b4", pretrained=False)
    assert bb.channels == [24, 32, 56, 160]  # spec §2: blocks 1, 5, 9, 21


def test_local_weights_file_pth_and_safetensors(tmp_path):
    src = timm.create_model("tf_efficientnet_lite0")
    state = {k: v.clone() for k, v in src.state_dict().items()}
    pth = tmp_path / "w.pth"
    torch.save({"state_dict": state}, pth)
    bb = FrozenBackbone("tf_efficientnet_lite0", weights=pth)
    assert bb.weights_path == pth
    key = "blocks.2.0.conv_dw.weight"
    assert torch.equal(bb.body.model.state_dict()[key], state[key])
    safetensors = pytest.importorskip("safetensors.torch")
    st = tmp_path / "w.safetensors"
    safetensors.save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    bb2 = FrozenBackbone("tf_efficientnet_lite0", weights=st)
    assert torch.equal(bb2.body.model.state_dict()[key], state[key])


def test_wrong_or_missing_weights_fail_clearly(tmp_path):
    with pytest.raises(BackboneError, match="not found"):
        FrozenBackbone("tf_efficientnet_lite0", weights=tmp_path / "nope.pth")
    with pytest.raises(BackboneError, match=r"lite1.*tensors|does not match"):
        FrozenBackbone(
            "tf_efficientnet_lite0", weights=package_weights_path("tf_efficientnet_lite1")
        )
    with pytest.raises(BackboneError, match="no packaged weights"):
        FrozenBackbone("resnet18")
    with pytest.raises(BackboneError, match="unknown timm backbone"):
        FrozenBackbone("no_such_model_xyz", pretrained=False)


def test_building_never_touches_the_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access during backbone construction")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    bb = FrozenBackbone("tf_efficientnet_lite1")
    assert bb.weights_path == package_weights_path("tf_efficientnet_lite1")


def test_neck_resizes_with_align_corners_and_concatenates():
    g = torch.Generator().manual_seed(0)
    taps = [
        torch.randn(1, c, 224 // s, 224 // s, generator=g) for c, s in [(2, 2), (3, 8), (4, 16)]
    ]
    out = neck(taps, (14, 14))
    assert out.shape == (1, 9, 14, 14)
    torch.testing.assert_close(out[:, 5:], taps[2])  # the /16 tap passes unchanged
    # align_corners=True keeps the corners of every tap exactly.
    for sl, t in ((slice(0, 2), taps[0]), (slice(2, 5), taps[1])):
        for y, x in ((0, 0), (-1, -1), (0, -1)):
            torch.testing.assert_close(out[0, sl, y, x], t[0, :, y, x])
    expected = F.interpolate(taps[0], size=(14, 14), mode="bilinear", align_corners=True)
    torch.testing.assert_close(out[:, :2], expected)
    # 112 -> 14 samples at i·111/13: not an average pool.
    pooled = F.adaptive_avg_pool2d(taps[0], 14)
    assert not np.allclose(out[:, :2].numpy(), pooled.numpy(), atol=1e-3)


def test_model_normalises_with_the_backbone_statistics():
    m = OneNIP(OneNIPConfig(backbone="tf_efficientnet_lite0", input_size=64), pretrained=False)
    cfg = timm.create_model("tf_efficientnet_lite0").pretrained_cfg
    assert m.mean.flatten().tolist() == pytest.approx(list(cfg["mean"]))
    assert m.std.flatten().tolist() == pytest.approx(list(cfg["std"]))
    assert "mean" not in m.state_dict()  # derived from the backbone, not a learned/saved value
