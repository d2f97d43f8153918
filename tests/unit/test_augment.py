"""ADA pipeline and controller, DiffAugment."""

from __future__ import annotations

import pytest
import torch

from gan_models.augment import BGC, AdaptiveAugment, diff_augment


def images(n=16, c=3, size=16, seed=0):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def only(name: str, p: float = 1.0) -> AdaptiveAugment:
    return AdaptiveAugment(p=p, probs={name: 1.0})


def test_p_zero_is_identity():
    x = images()
    assert torch.equal(AdaptiveAugment(p=0.0)(x), x)


def test_xflip_with_p1_flips_about_half():
    x = images(n=32)
    y = only("xflip")(x, generator=torch.Generator().manual_seed(0))
    same = (y - x).abs().flatten(1).max(dim=1).values < 1e-5
    flipped = (y - x.flip(-1)).abs().flatten(1).max(dim=1).values < 1e-5
    assert (same | flipped).all()  # pixel-exact: grid_sample at pixel centres
    assert 4 <= flipped.sum() <= 28


def test_rotate90_gives_quarter_turns():
    x = images(n=16)
    y = only("rotate90")(x, generator=torch.Generator().manual_seed(1))
    for xi, yi in zip(x, y):
        assert any(torch.allclose(yi, torch.rot90(xi, k, dims=(1, 2)), atol=1e-5) for k in range(4))


def test_integer_translation_shifts_whole_pixels():
    x = images(n=8, size=32)
    y = only("xint")(x, generator=torch.Generator().manual_seed(2))
    for xi, yi in zip(x, y):
        # Some shift (dy, dx) within ±4 px reproduces the interior exactly (the border is reflected).
        found = any(
            torch.allclose(yi[:, 6:-6, 6:-6], torch.roll(xi, (dy, dx), dims=(1, 2))[:, 6:-6, 6:-6], atol=1e-5)
            for dy in range(-4, 5)
            for dx in range(-4, 5)
        )
        assert found


@pytest.mark.parametrize("name", ["brightness", "contrast", "hue", "saturation", "lumaflip"])
def test_colour_transforms_keep_shape_and_scale(name):
    x = images(n=16)
    y = only(name)(x, generator=torch.Generator().manual_seed(3))
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert y.abs().max() < 8  # range-ish: a few σ of brightness/contrast/saturation at most
    assert not torch.allclose(y, x)


def test_brightness_adds_one_offset_per_image():
    x = images(n=8)
    y = only("brightness")(x, generator=torch.Generator().manual_seed(4))
    d = (y - x).flatten(1)
    assert torch.allclose(d, d[:, :1].expand_as(d), atol=1e-5)


def test_hue_rotation_keeps_grey_and_luma():
    grey = torch.full((4, 3, 8, 8), 0.3)
    assert torch.allclose(only("hue")(grey, generator=torch.Generator().manual_seed(5)), grey, atol=1e-5)
    x = images(n=8)
    y = only("hue")(x, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(y.mean(dim=1), x.mean(dim=1), atol=1e-5)  # rotation about the luma axis


def test_full_pipeline_grey_images_and_gradients():
    x = images(n=8, c=1).requires_grad_(True)
    y = AdaptiveAugment(p=0.8)(x, generator=torch.Generator().manual_seed(6))
    assert y.shape == x.shape and torch.isfinite(y).all()
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)  # differentiable twice (R1 through ADA)
    g.square().sum().backward()
    assert torch.isfinite(x.grad).all()


def test_same_seed_same_augmentation():
    x = images()
    ada = AdaptiveAugment(p=0.7)
    a = ada(x, generator=torch.Generator().manual_seed(9))
    b = ada(x, generator=torch.Generator().manual_seed(9))
    c = ada(x, generator=torch.Generator().manual_seed(10))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_p_moves_with_real_sign_toward_target():
    ada = AdaptiveAugment(p=0.0, target=0.6, ada_kimg=500)
    step = 64 * 4 / (500 * 1000)
    assert ada.update(0.9, 64 * 4) == pytest.approx(step)  # D overconfident on reals → more augmentation
    assert ada.update(0.9, 64 * 4) == pytest.approx(2 * step)
    assert ada.update(0.1, 64 * 4) == pytest.approx(step)  # D unsure → less
    assert ada.update(-1.0, 64 * 4) == pytest.approx(0.0)
    assert ada.update(-1.0, 64 * 4) == 0.0  # clamped at 0
    assert ada.update(0.6, 64 * 4) == 0.0  # on target: no move
    fixed = AdaptiveAugment(p=0.3, target=None)
    assert fixed.update(1.0, 1000) == pytest.approx(0.3)


def test_p_is_a_checkpointed_buffer():
    ada = AdaptiveAugment(p=0.25)
    assert "p" in ada.state_dict()
    other = AdaptiveAugment(p=0.0)
    other.load_state_dict(ada.state_dict())
    assert float(other.p) == 0.25


def test_bad_ada_arguments():
    with pytest.raises(ValueError, match="unknown ADA transform"):
        AdaptiveAugment(probs={"blur": 1})
    assert set(BGC) >= {"xflip", "rotate90", "xint", "scale", "rotate", "brightness", "contrast", "hue", "saturation"}


# ---------------------------------------------------------------------------------------------------------------------
# DiffAugment


def test_diffaugment_shapes_and_determinism():
    x = images(n=8, size=32)
    a = diff_augment(x, generator=torch.Generator().manual_seed(0))
    b = diff_augment(x, generator=torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, x)
    with pytest.raises(ValueError, match="unknown DiffAugment policy"):
        diff_augment(x, "color,zoom")


def test_diffaugment_translation_moves_content():
    x = torch.zeros(16, 1, 32, 32)
    x[:, :, 16, 16] = 1.0
    y = diff_augment(x, "translation", generator=torch.Generator().manual_seed(1))
    assert torch.allclose(y.sum(dim=[1, 2, 3]), torch.ones(16))  # shifted by at most 4 px: never leaves the image
    pos = y[:, 0].flatten(1).argmax(dim=1)
    dy, dx = pos // 32 - 16, pos % 32 - 16
    assert dy.abs().max() <= 4 and dx.abs().max() <= 4
    assert ((dy != 0) | (dx != 0)).any()


def test_diffaugment_cutout_zeroes_a_square():
    x = torch.ones(8, 3, 16, 16)
    y = diff_augment(x, "cutout", generator=torch.Generator().manual_seed(2))
    zeros = (y == 0).all(dim=1).flatten(1).sum(dim=1)
    assert (zeros > 0).all() and (zeros <= 8 * 8).all()


def test_diffaugment_color_changes_per_image_statistics():
    x = images(n=8)
    y = diff_augment(x, "color", generator=torch.Generator().manual_seed(3))
    assert y.shape == x.shape and not torch.allclose(y.mean(dim=[1, 2, 3]), x.mean(dim=[1, 2, 3]))
