"""Dataset reading, validation split, image/mask loading and the data pack, on generated images."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from lineguard.runtime.errors import LineGuardError
from lineguard.train.data import (
    load_image,
    load_mask,
    scan_folder,
    scan_mvtec,
    split_validation,
)
from lineguard.train.pack import build_pack, load_pack, open_data, save_pack


def _write(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)


def make_mvtec(root: Path, cats=("bottle", "tile"), n_train=10, seed=0) -> Path:
    """A small MVTec-layout dataset: colour PNG `bottle`, grayscale JPEG/BMP `tile`."""
    rng = np.random.default_rng(seed)
    for c in cats:
        gray = c == "tile"
        shape = (40, 52) if gray else (32, 32, 3)
        ext = ".jpg" if gray else ".png"
        for i in range(n_train):
            _write(
                root / c / "train" / "good" / f"{i:03d}{ext}", rng.integers(0, 255, shape, np.uint8)
            )
        for i in range(2):
            _write(
                root / c / "test" / "good" / f"{i:03d}{ext}", rng.integers(0, 255, shape, np.uint8)
            )
        for defect in ("crack", "hole"):
            for i in range(2):
                img = rng.integers(0, 255, shape, np.uint8)
                _write(root / c / "test" / defect / f"{i:03d}{ext}", img)
                mask = np.zeros(shape[:2], np.uint8)
                mask[4:12, 6:14] = 255
                mext = ".bmp" if gray else ".png"
                _write(root / c / "ground_truth" / defect / f"{i:03d}_mask{mext}", mask)
    return root


def test_scan_mvtec_counts_labels_and_paths(tmp_path):
    root = make_mvtec(tmp_path / "ds")
    samples = scan_mvtec(root)
    assert len(samples) == 2 * (10 + 2 + 4)
    train = [s for s in samples if s.split == "train"]
    assert len(train) == 20 and all(s.label == 0 and s.defect == "good" for s in train)
    bad = [s for s in samples if s.label == 1]
    assert len(bad) == 8 and {s.defect for s in bad} == {"crack", "hole"}
    assert all(s.mask_path is not None and s.mask_path.is_file() for s in bad)
    assert all(s.mask_path is None for s in samples if s.label == 0)
    s = next(s for s in bad if s.category == "tile")
    assert s.rel_path == "tile/test/crack/000.jpg" and s.mask_path.name == "000_mask.bmp"
    assert s.dataset == "ds" and (root / s.rel_path).resolve() == s.path
    assert samples == sorted(samples, key=lambda x: (x.dataset, x.category, x.split, x.rel_path))
    assert [x.category for x in scan_mvtec(root, ["tile"])] == ["tile"] * 16


def test_scan_single_category_and_several_roots(tmp_path):
    a = make_mvtec(tmp_path / "a", cats=("bottle",))
    b = make_mvtec(tmp_path / "b", cats=("tile",), seed=1)
    one = scan_mvtec(a / "bottle")
    assert len(one) == 16 and one[0].rel_path.startswith("bottle/") and one[0].dataset == "a"
    both = scan_mvtec([a, b])
    assert {(s.dataset, s.category) for s in both} == {("a", "bottle"), ("b", "tile")}


def test_scan_errors_are_clear(tmp_path):
    with pytest.raises(LineGuardError, match="does not exist"):
        scan_mvtec(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LineGuardError, match="no category folders"):
        scan_mvtec(tmp_path / "empty")
    root = make_mvtec(tmp_path / "ds")
    with pytest.raises(LineGuardError, match="screw"):
        scan_mvtec(root, ["bottle", "screw"])
    (root / "bottle" / "ground_truth" / "hole" / "001_mask.png").unlink()
    with pytest.raises(LineGuardError, match=r"no mask.*bottle/test/hole/001.png"):
        scan_mvtec(root)


def test_scan_folder_recursive(tmp_path):
    for i, sub in enumerate(["", "day2/", "day2/cam1/"]):
        _write(tmp_path / "caps" / f"{sub}img{i}.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "caps" / "notes.txt").write_text("not an image")
    samples = scan_folder(tmp_path / "caps", "widget")
    assert [s.rel_path for s in samples] == ["day2/cam1/img2.png", "day2/img1.png", "img0.png"]
    assert all(s.split == "train" and s.label == 0 and s.category == "widget" for s in samples)
    with pytest.raises(LineGuardError):
        scan_folder(tmp_path / "missing", "widget")


def test_split_validation_deterministic_per_category(tmp_path):
    samples = scan_mvtec(make_mvtec(tmp_path / "ds", n_train=20))
    train, val = split_validation(samples, 0.1, seed=0)
    assert all(s.split == "train" for s in train + val)
    # max(10 %, 8) per class: 8 of 20 each
    assert len(val) == 16 and {s.category for s in val} == {"bottle", "tile"}
    assert not set(train) & set(val) and len(train) + len(val) == 40
    assert split_validation(samples, 0.1, seed=0) == (train, val)
    assert split_validation(samples, 0.1, seed=1)[1] != val
    # a category's split does not depend on which other categories are present
    only_tile = [s for s in samples if s.category == "tile"]
    assert split_validation(only_tile, 0.1, 0)[1] == [s for s in val if s.category == "tile"]
    # tiny classes still get one validation image and keep one training image
    tiny = [s for s in samples if s.category == "bottle" and s.split == "train"][:2]
    tr, va = split_validation(tiny, 0.1, 0)
    assert len(tr) == 1 and len(va) == 1
    with pytest.raises(LineGuardError):
        split_validation(samples, 1.0)


def test_load_image_rgb_gray_and_area_resize(tmp_path):
    bgr = np.zeros((20, 30, 3), np.uint8)
    bgr[..., 2] = 200  # red in OpenCV's BGR order
    _write(tmp_path / "red.png", bgr)
    img = load_image(tmp_path / "red.png", 16)
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8
    assert (img[..., 0] == 200).all() and (img[..., 1:] == 0).all()
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 255, (37, 53), np.uint8)
    _write(tmp_path / "g.png", gray)
    out = load_image(tmp_path / "g.png", 24)
    want = cv2.resize(gray, (24, 24), interpolation=cv2.INTER_AREA)
    for ch in range(3):
        np.testing.assert_array_equal(out[..., ch], want)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(LineGuardError, match=r"broken\.png"):
        load_image(tmp_path / "broken.png", 8)


def test_load_mask_nearest_binary(tmp_path):
    m = np.zeros((8, 8), np.uint8)
    m[:4, :4] = 255
    m[6, 6] = 1  # any nonzero value is defect (nearest samples rows/cols 0, 2, 4, 6)
    _write(tmp_path / "m.png", m)
    out = load_mask(tmp_path / "m.png", 4)
    assert out.dtype == np.uint8 and set(np.unique(out)) == {0, 1}
    np.testing.assert_array_equal(out[:2, :2], 1)
    assert out.sum() == 5
    assert load_mask(None, 4).sum() == 0 and load_mask(None, 4).shape == (4, 4)


@pytest.mark.parametrize("codec", ["png", "webp"])
def test_pack_roundtrip_is_lossless(tmp_path, codec):
    root = make_mvtec(tmp_path / "ds")
    samples = scan_mvtec(root)
    pack = build_pack(samples, 24, progress=False)
    out = save_pack(pack, tmp_path / "p", codec=codec, progress=False)
    assert out.name == "p.npz"
    back = load_pack(out, progress=False)
    assert back.samples == samples and back.size == 24
    np.testing.assert_array_equal(back.images, pack.images)
    np.testing.assert_array_equal(back.masks, pack.masks)
    i = next(i for i, s in enumerate(samples) if s.label == 1)
    np.testing.assert_array_equal(back.images[i], load_image(samples[i].path, 24))
    np.testing.assert_array_equal(back.masks[i], load_mask(samples[i].mask_path, 24))
    assert back.masks[i].any()
    assert back.fingerprint == pack.fingerprint


def test_open_data_pack_or_root_and_fingerprint(tmp_path):
    root = make_mvtec(tmp_path / "ds")
    out = save_pack(
        build_pack(scan_mvtec(root), 16, progress=False), tmp_path / "p.npz", progress=False
    )
    from_pack = open_data(out, 16, ["tile"], progress=False)
    from_root = open_data(root, 16, ["tile"], progress=False)
    assert from_pack.samples == from_root.samples
    assert from_pack.fingerprint == from_root.fingerprint
    np.testing.assert_array_equal(from_pack.images, from_root.images)
    # content changes change the fingerprint
    victim = root / "tile" / "train" / "good" / "000.jpg"
    _write(victim, np.full((40, 52), 7, np.uint8))
    assert open_data(root, 16, ["tile"], progress=False).fingerprint != from_root.fingerprint
    with pytest.raises(LineGuardError, match="re-pack"):
        open_data(out, 8, progress=False)
    # a small pack feeds a larger model input: resized as the loader resizes the originals
    bigger = open_data(out, 32, ["bottle"], progress=False)
    direct = open_data(root, 32, ["bottle"], progress=False)
    assert bigger.size == 32 and bigger.samples == direct.samples
    small = open_data(out, 16, ["bottle"], progress=False)
    expect = np.stack(
        [cv2.resize(im, (32, 32), interpolation=cv2.INTER_AREA) for im in small.images]
    )
    np.testing.assert_array_equal(bigger.images, expect)
    with pytest.raises(LineGuardError, match="screw"):
        open_data(out, 16, ["screw"], progress=False)
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(LineGuardError):
        open_data(tmp_path / "junk.npz", 16, progress=False)


def test_cli_data_pack(tmp_path, capsys):
    from lineguard.runtime.cli import main

    root = make_mvtec(tmp_path / "ds")
    out = tmp_path / "packs" / "ds.npz"
    rc = main(
        [
            "data",
            "pack",
            "--data",
            str(root),
            "--categories",
            "bottle",
            "--size",
            "16",
            "--out",
            str(out),
        ]
    )
    assert rc == 0 and out.is_file()
    pack = load_pack(out, progress=False)
    assert len(pack) == 16 and {s.category for s in pack.samples} == {"bottle"}
    assert "16" in capsys.readouterr().out
    assert main(["data", "pack", "--data", str(tmp_path / "nope"), "--out", str(out)]) == 1
