"""Synthetic defects: masks match the changed pixels, sizes and mix follow the spec, seeded."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from lineguard.train.perlin import fade, perlin_mask, perlin_noise
from lineguard.train.synthesis import (
    DefectSynthesizer,
    SynthesisConfig,
    color_jitter,
    cutpaste,
    cutpaste_scar,
    perlin_blend,
)
from lineguard.train.textures import (
    TextureSource,
    augment_texture,
    procedural_texture,
)

S = 96


def textured(seed: int, size: int = S) -> np.ndarray:
    """A normal-looking part: smooth colour noise plus fine grain (no flat regions)."""
    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(rng.random((size, size, 3)).astype(np.float32), (0, 0), 3.0)
    base = (base - base.min()) / (base.max() - base.min())
    img = 40 + 170 * base + rng.normal(0, 6, base.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def changed(a: np.ndarray, b: np.ndarray, delta: int = 1) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=-1) >= delta


@pytest.mark.parametrize("kind", ["perlin", "cutpaste", "scar"])
@pytest.mark.parametrize("textures", ["procedural", "images"])
def test_mask_matches_changed_pixels(kind: str, textures: str) -> None:
    pool = np.stack([textured(100 + i) for i in range(4)])
    synth = DefectSynthesizer(
        SynthesisConfig(textures=textures), TextureSource(textures, pool, [0, 0, 1, 1])
    )
    for seed in range(25):
        img = textured(seed)
        out, mask = synth.draw(img, np.random.default_rng(seed), kind, label=0)
        assert out.dtype == np.uint8 and out.shape == img.shape
        assert mask.dtype == np.float32 and mask.shape == img.shape[:2]
        assert set(np.unique(mask)) <= {0.0, 1.0}
        assert mask.sum() > 0, f"{kind} seed {seed}: empty mask"
        # outside the mask: bit-identical; inside: most pixels visibly changed
        assert np.array_equal(out[mask == 0], img[mask == 0]), f"{kind} seed {seed}"
        inside = changed(out, img)[mask > 0].mean()
        assert inside > 0.5, f"{kind} seed {seed}: only {inside:.2f} of the mask changed"


def test_synthesizer_output_contract_and_visibility() -> None:
    synth = DefectSynthesizer(SynthesisConfig(), TextureSource("procedural"))
    fractions = []
    for seed in range(60):
        img = textured(seed)
        out, mask = synth(img, np.random.default_rng(seed))
        assert np.array_equal(out[mask == 0], img[mask == 0])
        fractions.append(changed(out, img, 3)[mask > 0].mean())
    assert np.mean(fractions) > 0.8
    assert min(fractions) >= 0.5  # faint draws are redrawn (min_visible)


def test_flat_image_faint_cutpaste_is_redrawn_or_best_kept() -> None:
    """On a flat image a pasted patch is only visible through its colour jitter."""
    flat = np.full((S, S, 3), 128, np.uint8)
    synth = DefectSynthesizer(SynthesisConfig(perlin_prob=0.0), TextureSource("procedural"))
    for seed in range(10):
        out, mask = synth(flat, np.random.default_rng(seed))
        assert np.array_equal(out[mask == 0], flat[mask == 0])
        assert synth.visible_fraction(flat, out, mask) >= 0.5


def test_seeded_and_reproducible() -> None:
    img = textured(1)
    synth = DefectSynthesizer()
    a = synth(img, np.random.default_rng([7, 3, 11]))
    b = synth(img, np.random.default_rng([7, 3, 11]))
    c = synth(img, np.random.default_rng([7, 3, 12]))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_mix_probabilities() -> None:
    synth = DefectSynthesizer()
    rng = np.random.default_rng(0)
    kinds = [synth.kind(rng) for _ in range(8000)]
    share = {k: kinds.count(k) / len(kinds) for k in ("perlin", "cutpaste", "scar")}
    assert abs(share["perlin"] - 0.5) < 0.03
    assert abs(share["cutpaste"] - 0.25) < 0.03
    assert abs(share["scar"] - 0.25) < 0.03


def test_cutpaste_rectangle_area() -> None:
    cfg = SynthesisConfig()
    for seed in range(40):
        _, mask = cutpaste(textured(seed), np.random.default_rng(seed), cfg)
        ys, xs = np.nonzero(mask)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        assert box == mask.sum()  # one full rectangle
        # int() truncation of the sides and clipping to the image only shrink the area
        assert mask.sum() <= cfg.area_max * S * S + 1
        assert mask.sum() >= 0.5 * cfg.area_min * S * S


def test_scar_is_thin_and_small() -> None:
    cfg = SynthesisConfig()
    for seed in range(40):
        _, mask = cutpaste_scar(textured(seed), np.random.default_rng(seed), cfg)
        assert 0 < mask.sum() <= 16 * 25 + 16 + 25  # rotation with nearest neighbour adds edges
        # thin: the largest inscribed distance is at most half the max width (plus rounding)
        dist = cv2.distanceTransform((mask > 0).astype(np.uint8), cv2.DIST_L2, 5)
        assert dist.max() <= 16 / 2 + 1.5


def test_perlin_blend_beta_zero_pastes_texture_exactly() -> None:
    img, tex = textured(3), procedural_texture((S, S), np.random.default_rng(5))
    out, mask = perlin_blend(img, tex, np.random.default_rng(1), SynthesisConfig(beta_max=0.0))
    m = mask > 0
    assert np.array_equal(out[m], tex[m])
    assert np.array_equal(out[~m], img[~m])


def test_fade_is_quintic_smoothstep() -> None:
    t = np.linspace(0, 1, 101)
    assert fade(np.array(0.0)) == 0.0 and fade(np.array(1.0)) == 1.0
    np.testing.assert_allclose(fade(t), 6 * t**5 - 15 * t**4 + 10 * t**3)
    d = np.gradient(fade(t), t)
    assert abs(d[0]) < 1e-2 and abs(d[-1]) < 1e-2 and abs(d[50] - 1.875) < 1e-2


def test_perlin_noise_scales_and_seeding() -> None:
    def crossings(res: int) -> int:
        n = perlin_noise((128, 128), (res, res), np.random.default_rng(0))
        return int((np.diff(np.sign(n), axis=1) != 0).sum())

    low, high = crossings(2), crossings(32)
    assert high > 4 * low  # finer lattice -> more structure
    a = perlin_noise((64, 80), (4, 8), np.random.default_rng(1))
    b = perlin_noise((64, 80), (4, 8), np.random.default_rng(1))
    assert a.shape == (64, 80) and np.array_equal(a, b)
    assert np.abs(a).max() <= 1.0 + 1e-5 and a.std() > 0.05


def test_perlin_mask_never_empty_and_binary() -> None:
    for seed in range(30):
        m = perlin_mask((S, S), np.random.default_rng(seed))
        assert m.sum() > 0 and set(np.unique(m)) <= {0.0, 1.0}


def test_image_textures_prefer_other_classes() -> None:
    pool = np.stack([np.full((8, 8, 3), v, np.uint8) for v in (10, 20, 200, 210)])
    src = TextureSource("images", pool, [0, 0, 1, 1])
    rng = np.random.default_rng(0)
    picked = {int(src.pick_image(0, rng)[0, 0, 0]) for _ in range(50)}
    assert picked == {200, 210}
    alone = TextureSource("images", pool[:2], [0, 0])  # one class: fall back to its images
    assert int(alone.pick_image(0, rng)[0, 0, 0]) in (10, 20)
    with pytest.raises(ValueError):
        TextureSource("images")


def test_textures_are_uint8_varied_and_seeded() -> None:
    for seed in range(20):
        t = procedural_texture((S, S), np.random.default_rng(seed))
        assert t.dtype == np.uint8 and t.shape == (S, S, 3)
        a = augment_texture(t, np.random.default_rng(seed))
        b = augment_texture(t, np.random.default_rng(seed))
        assert a.shape == t.shape and np.array_equal(a, b)


def test_color_jitter_identity_and_change() -> None:
    patch = textured(4)[:20, :30]
    same = color_jitter(patch, np.random.default_rng(0), 0.0, 0.0, 0.0, 0.0)
    assert np.abs(same.astype(int) - patch.astype(int)).max() <= 1
    diffs = [
        np.abs(color_jitter(patch, np.random.default_rng(s)).astype(int) - patch).mean()
        for s in range(20)
    ]
    assert np.mean(diffs) > 5
