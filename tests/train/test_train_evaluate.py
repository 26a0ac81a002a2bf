"""Evaluation: fixed prompts through encode_prompt/detect only, reports, maps, random prompts,
retrieval; a stand-in detector on generated images, and the real OneNIP (tiny) end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from synthetic_parts import random_checkpoint
from torch import nn

from lineguard.runtime.errors import LineGuardError
from lineguard.train.evaluate import evaluate_checkpoint
from lineguard.train.pack import open_data

torch.set_num_threads(2)
SIZE = 32
COLOURS = {"blue": (40, 60, 200), "green": (50, 190, 70)}


def make_dataset(root: Path, n_train=4, n_good=3, n_bad=4, seed=0) -> Path:
    """Two classes of flat-coloured noisy parts; defects are white squares with exact masks."""
    rng = np.random.default_rng(seed)
    for cls, rgb in COLOURS.items():
        base = np.array(rgb[::-1], np.float32)  # stored as BGR by cv2

        def part(base=base):
            noise = rng.normal(0, 4, (48, 48, 3))
            return np.clip(base + noise, 0, 255).astype(np.uint8)

        def write(p: Path, img: np.ndarray):
            p.parent.mkdir(parents=True, exist_ok=True)
            assert cv2.imwrite(str(p), img)

        for i in range(n_train):
            write(root / cls / "train" / "good" / f"{i:03d}.png", part())
        for i in range(n_good):
            write(root / cls / "test" / "good" / f"{i:03d}.png", part())
        for i in range(n_bad):
            img, mask = part(), np.zeros((48, 48), np.uint8)
            y, x = rng.integers(4, 30, 2)
            s = 6 + 2 * i
            img[y : y + s, x : x + s] = 255
            mask[y : y + s, x : x + s] = 255
            write(root / cls / "test" / "scratch" / f"{i:03d}.png", img)
            write(root / cls / "ground_truth" / "scratch" / f"{i:03d}_mask.png", mask)
    return root


class StandIn(nn.Module):
    """A real, tiny detector with OneNIP's interface: colour distance to the prompt's patches.

    It records every prompt it encodes and every token tensor detect receives.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.encoded: list[np.ndarray] = []
        self.token_shapes: list[tuple[int, ...]] = []

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 4)

    def encode_prompt(self, x: torch.Tensor) -> torch.Tensor:
        self.encoded.append((x * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy())
        return self.features(x).flatten(2).transpose(1, 2)

    def detect(self, x: torch.Tensor, tokens: torch.Tensor):
        self.token_shapes.append(tuple(tokens.shape))
        f = self.features(x)
        _, c, h, w = f.shape
        p = tokens.transpose(1, 2).reshape(-1, c, h, w)
        d = ((f - p) ** 2).sum(1, keepdim=True).sqrt()
        # median-filter-free sharpening: the patch grid is coarse, so upsample bilinearly
        amap = F.interpolate(d, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return amap, amap.amax(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("eval") / "parts")


def test_fixed_prompt_metrics_maps_and_reports(dataset, tmp_path):
    model = StandIn()
    res = evaluate_checkpoint(
        None,
        dataset,
        model=model,
        input_size=SIZE,
        out_dir=tmp_path / "out",
        save_maps=tmp_path / "maps",
        device="cpu",
        batch_size=4,
        progress=False,
    )
    # one prompt per class, encoded once; every detect call got that single 1×N×D prompt
    assert len(model.encoded) == 2 and all(e.shape == (1, SIZE, SIZE, 3) for e in model.encoded)
    assert all(s[0] == 1 for s in model.token_shapes)
    # default prompt = first training image of the class in sorted order
    pack = open_data(dataset, SIZE, progress=False)
    first = {
        c: next(i for i, s in enumerate(pack.samples) if s.category == c and s.split == "train")
        for c in COLOURS
    }
    for enc, cls in zip(model.encoded, sorted(COLOURS), strict=True):
        np.testing.assert_array_equal(enc[0], pack.images[first[cls]])
    assert res["prompts"] == {c: pack.samples[first[c]].rel_path for c in COLOURS}
    # white squares on flat colour are easy: the detector must find them
    for cls in COLOURS:
        m = res["per_class"][cls]
        assert m["image_auroc"] == 1.0 and m["image_ap"] == 1.0
        assert m["pixel_auroc"] > 0.95 and m["aupro"] > 0.8
    assert res["mean"]["image_auroc"] == 1.0
    assert res["random_prompt"] is None and res["retrieval_accuracy"] is None

    # maps: one float32 map per test image at model input size, matching a fresh detect call
    with open(tmp_path / "maps" / "scores.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 7 and rows[0]["path"].startswith("blue/test/")
    sample = next(s for s in pack.samples if s.rel_path == "green/test/scratch/002.png")
    saved = np.load(tmp_path / "maps" / "green" / "scratch" / "002.npy")
    assert saved.shape == (SIZE, SIZE) and saved.dtype == np.float32
    i = pack.samples.index(sample)
    x = torch.from_numpy(pack.images[[i]]).permute(0, 3, 1, 2).float() / 255
    p = torch.from_numpy(pack.images[[first["green"]]]).permute(0, 3, 1, 2).float() / 255
    want, score = StandIn().detect(x, StandIn().encode_prompt(p))
    np.testing.assert_allclose(saved, want[0, 0].numpy(), rtol=1e-5, atol=1e-6)
    row = next(r for r in rows if r["path"] == sample.rel_path)
    assert float(row["score"]) == pytest.approx(float(score[0]), rel=1e-5)

    # reports
    js = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(js["mean"]) == {"image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro"}
    assert set(js["per_class"]) == set(COLOURS)
    md = (tmp_path / "out" / "metrics.md").read_text()
    assert "| blue |" in md and "**mean**" in md
    png = cv2.imread(str(tmp_path / "out" / "green.png"))
    # rows: 4 defective + 1 normal, each image | truth | overlay (enlarged for small inputs)
    assert png.shape[1] % (3 * SIZE) == 0 and png.shape[0] * 3 == png.shape[1] * 5


def test_classes_are_judged_independently(dataset):
    """No statistic is pooled over the test set: a class's figures do not depend on the others."""
    both = evaluate_checkpoint(
        None, dataset, model=StandIn(), input_size=SIZE, device="cpu", progress=False
    )
    one = evaluate_checkpoint(
        None,
        dataset,
        categories=["green"],
        model=StandIn(),
        input_size=SIZE,
        device="cpu",
        progress=False,
    )
    assert one["per_class"]["green"] == both["per_class"]["green"]
    assert list(one["per_class"]) == ["green"]


def test_wrong_prompt_hurts_and_named_prompt_is_used(dataset, tmp_path):
    green_prompt = dataset / "green" / "train" / "good" / "001.png"
    model = StandIn()
    res = evaluate_checkpoint(
        None,
        dataset,
        model=model,
        input_size=SIZE,
        device="cpu",
        prompt=str(green_prompt),
        progress=False,
    )
    assert res["prompts"]["blue"] == str(green_prompt)
    # every blue part differs from a green prompt everywhere: localisation gets clearly worse
    right = evaluate_checkpoint(
        None, dataset, model=StandIn(), input_size=SIZE, device="cpu", progress=False
    )
    assert res["per_class"]["blue"]["aupro"] < right["per_class"]["blue"]["aupro"] - 0.1
    assert (
        res["per_class"]["blue"]["pixel_auroc"] < right["per_class"]["blue"]["pixel_auroc"] - 0.05
    )
    assert res["per_class"]["green"]["pixel_auroc"] > 0.95
    res2 = evaluate_checkpoint(
        None,
        dataset,
        model=StandIn(),
        input_size=SIZE,
        device="cpu",
        prompt=f"blue={dataset / 'blue/train/good/003.png'}",
        progress=False,
    )
    assert res2["prompts"]["blue"].endswith("003.png")
    assert res2["prompts"]["green"] == "green/train/good/000.png"
    with pytest.raises(LineGuardError, match="not found"):
        evaluate_checkpoint(
            None,
            dataset,
            model=StandIn(),
            input_size=SIZE,
            device="cpu",
            prompt=str(tmp_path / "missing.png"),
            progress=False,
        )


def test_random_prompts_and_retrieval(dataset):
    model = StandIn()
    res = evaluate_checkpoint(
        None,
        dataset,
        model=model,
        input_size=SIZE,
        device="cpu",
        random_prompts=3,
        retrieval=True,
        seed=1,
        progress=False,
    )
    rp = res["random_prompt"]
    assert len(rp["draws"]) == 3 and len(rp["prompts"]) == 3
    for k, v in rp["mean"].items():
        assert v == pytest.approx(np.mean([d[k] for d in rp["draws"]]))
        assert rp["std"][k] == pytest.approx(np.std([d[k] for d in rp["draws"]]))
    # prompts drawn from each class's own training images, and not all draws identical
    assert all(p["blue"].startswith("blue/train/good/") for p in rp["prompts"])
    assert len({tuple(sorted(p.items())) for p in rp["prompts"]}) > 1
    # colours are distinct, so pooled-feature retrieval always picks the right class
    assert res["retrieval_accuracy"] == 1.0
    for cls in COLOURS:
        assert res["retrieval"]["per_class"][cls] == pytest.approx(res["per_class"][cls])


def test_cli_evaluate_real_onenip(dataset, tmp_path, capsys):
    """The real (untrained, tiny) OneNIP through a checkpoint and `lineguard evaluate`."""
    from lineguard.runtime.cli import main
    from lineguard.train.checkpoint import load_model

    pack = open_data(dataset, SIZE, progress=False)
    golden = next(i for i, s in enumerate(pack.samples) if s.rel_path == "blue/train/good/002.png")
    ckpt = random_checkpoint(
        tmp_path / "tiny.pt",
        SIZE,
        sorted(COLOURS),
        {"blue": {"path": "blue/train/good/002.png", "image": pack.images[golden]}},
    )
    rc = main(
        [
            "evaluate",
            "--checkpoint",
            str(ckpt),
            "--data",
            str(dataset),
            "--out",
            str(tmp_path / "out"),
            "--save-maps",
            str(tmp_path / "maps"),
            "--random-prompts",
            "2",
            "--retrieval",
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert rc == 0
    assert "| blue |" in capsys.readouterr().out
    js = json.loads((tmp_path / "out" / "metrics.json").read_text())
    # the checkpoint's golden sample is used for blue; green falls back to its first image
    assert js["prompts"] == {
        "blue": "checkpoint:blue/train/good/002.png",
        "green": "green/train/good/000.png",
    }
    for m in [js["mean"], js["random_prompt"]["mean"], *js["per_class"].values()]:
        assert all(0.0 <= v <= 1.0 for v in m.values())
    assert 0.0 <= js["retrieval_accuracy"] <= 1.0
    # saved maps are exactly the model's detect output against the golden prompt
    model, _ = load_model(ckpt)
    i = next(i for i, s in enumerate(pack.samples) if s.rel_path == "blue/test/scratch/001.png")
    with torch.no_grad():
        tok = model.encode_prompt(torch.from_numpy(pack.images[[golden]]).permute(0, 3, 1, 2) / 255)
        amap, _ = model.detect(torch.from_numpy(pack.images[[i]]).permute(0, 3, 1, 2) / 255, tok)
    saved = np.load(tmp_path / "maps" / "blue" / "scratch" / "001.npy")
    np.testing.assert_allclose(saved, amap[0, 0].numpy(), rtol=1e-4, atol=1e-5)
    assert (
        main(["evaluate", "--checkpoint", str(tmp_path / "none.pt"), "--data", str(dataset)]) == 1
    )
