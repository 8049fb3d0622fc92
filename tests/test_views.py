"""SimCLR views, probe views and plain views: shapes, determinism, and each augmentation's effect."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from sim.data.datasets import DATASETS, DatasetInfo, dataset_info
from sim.data.views import SimCLRViews, _grid, plain_views, probe_views

NATIVE = {"fashion_mnist": 28, "cifar10": 32, "stl10": 96, "tiny_imagenet": 64, "synthetic": 32,
          "synthetic_gray": 32, "synthetic_96": 96}
OFF = dict(flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0)  # every random augmentation off


def _images(info: DatasetInfo, batch: int = 4, seed: int = 0) -> torch.Tensor:
    side = NATIVE[info.name]
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, info.channels, side, side), dtype=torch.uint8, generator=g)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", sorted(NATIVE))
def test_views_have_the_encoder_shape_and_are_deterministic(name: str) -> None:
    info = dataset_info(name)
    images = _images(info, batch=3)
    views = SimCLRViews(info)
    out = views(images, _gen(7))
    side = info.image_size
    assert out.shape == (6, info.channels, side, side) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert torch.equal(out, views(images, _gen(7)))  # same generator state, same views
    assert not torch.allclose(out, views(images, _gen(8)))
    assert not torch.allclose(out[:3], out[3:])  # the two views of an image differ


def test_all_augmentation_off_gives_the_plain_image() -> None:
    for name in ("cifar10", "fashion_mnist"):  # fashion_mnist also checks the 28 -> 32 resize
        info = dataset_info(name)
        images = _images(info)
        out = SimCLRViews(info, crop_scale=(1.0, 1.0), **OFF)(images, _gen(0))
        plain = plain_views(images, info)
        assert plain.shape == (4, info.channels, 32, 32)
        torch.testing.assert_close(out, torch.cat([plain, plain]), atol=1e-5, rtol=0)


def test_forced_flip_mirrors_left_and_right() -> None:
    info = dataset_info("cifar10")
    images = _images(info)
    out = SimCLRViews(info, crop_scale=(1.0, 1.0), **{**OFF, "flip_p": 1.0})(images, _gen(0))
    torch.testing.assert_close(out[:4], plain_views(images, info).flip(-1), atol=1e-5, rtol=0)


def test_crops_stay_inside_and_cover_the_scale_range() -> None:
    views = SimCLRViews(dataset_info("stl10"))  # crop_scale (0.08, 1)
    u = torch.rand(4000, 23, generator=_gen(0))
    theta = views._crop_flip(u[:, :10], u[:, 10:20], u[:, 20:22], u[:, 22])  # (n, 2, 3)
    w, h = theta[:, 0, 0].abs(), theta[:, 1, 1]  # half-sides in [-1, 1] units = side fractions
    assert (theta[:, 0, 2].abs() + w <= 1 + 1e-6).all() and (theta[:, 1, 2].abs() + h <= 1 + 1e-6).all()
    area = w * h
    assert area.min() >= 0.08 - 1e-6 and area.max() <= 1 + 1e-6 and area.min() < 0.1
    assert ((w / h >= 3 / 4 - 1e-5) & (w / h <= 4 / 3 + 1e-5) | (area > 1 - 1e-6)).all()
    assert 0.4 < (theta[:, 0, 0] < 0).float().mean() < 0.6  # flipped half the time


def test_grid_matches_affine_grid() -> None:
    u = torch.rand(5, 4, generator=_gen(1))
    theta = torch.zeros(5, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = u[:, 0] * torch.tensor([1, -1, 1, -1, 1.0]), u[:, 1]
    theta[:, 0, 2], theta[:, 1, 2] = u[:, 2] - 0.5, u[:, 3] - 0.5
    expected = F.affine_grid(theta, [5, 3, 12, 12], align_corners=False)
    torch.testing.assert_close(_grid(theta, 12), expected, atol=1e-6, rtol=0)


def test_colour_jitter_matches_torchvision_without_hue() -> None:
    views = SimCLRViews(dataset_info("cifar10"))
    x = torch.rand(3, 3, 8, 8, generator=_gen(2))
    factors = torch.tensor([[1.5, 0.4, 1.7, 0.0], [0.3, 1.8, 0.2, 0.0], [1.0, 1.0, 1.0, 0.0]])
    out = views._colour_jitter(x.clone(), factors)
    for i, (b, c, s, _) in enumerate(factors.tolist()):
        ref = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x[i], b), c), s)
        # torchvision's luma weights are 0.2989, 0.587, 0.114; ours 0.299: a 1e-5 difference.
        torch.testing.assert_close(out[i], ref, atol=1e-4, rtol=0)


def test_hue_rotation_keeps_luma_and_moves_colour() -> None:
    views = SimCLRViews(dataset_info("cifar10"))
    x = torch.tensor([0.6, 0.4, 0.45]).view(1, 3, 1, 1).expand(2, 3, 4, 4).clone()  # a muted pink
    out = views._colour_jitter(x.clone(), torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.2]]))
    torch.testing.assert_close(out[0], x[0], atol=1e-5, rtol=0)  # hue 0 is the identity
    luma = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    torch.testing.assert_close((out[1] * luma).sum(0), (x[1] * luma).sum(0), atol=1e-4, rtol=0)
    assert (out[1] - x[1]).abs().max() > 0.05


def test_grayscale_makes_channels_equal() -> None:
    info = dataset_info("cifar10")
    out = SimCLRViews(info, crop_scale=(1.0, 1.0), **{**OFF, "gray_p": 1.0})(_images(info), _gen(0))
    pixels = out * torch.tensor(info.std).view(1, 3, 1, 1) + torch.tensor(info.mean).view(1, 3, 1, 1)
    torch.testing.assert_close(pixels[:, 0], pixels[:, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(pixels[:, 0], pixels[:, 2], atol=1e-5, rtol=0)


def test_blur_removes_high_frequencies() -> None:
    info = dataset_info("cifar10")
    checker = ((torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 255).to(torch.uint8)
    images = checker.expand(2, 3, 32, 32).contiguous()
    sharp = SimCLRViews(info, crop_scale=(1.0, 1.0), **OFF)(images, _gen(0))
    blurred = SimCLRViews(info, crop_scale=(1.0, 1.0), **{**OFF, "blur_p": 1.0})(images, _gen(0))
    energy = lambda v: (v[..., 1:] - v[..., :-1]).pow(2).mean()  # noqa: E731  neighbour differences
    assert energy(blurred) < 0.5 * energy(sharp)
    torch.testing.assert_close(blurred.mean(), sharp.mean(), atol=0.02, rtol=0)  # kernels sum to 1


def test_one_channel_jitter_uses_brightness_and_contrast_only() -> None:
    info = dataset_info("fashion_mnist")
    views = SimCLRViews(info, crop_scale=(1.0, 1.0), **{**OFF, "jitter_p": 1.0, "gray_p": 1.0})
    out = views(_images(info), _gen(3))
    assert out.shape == (8, 1, 32, 32) and torch.isfinite(out).all()
    x = torch.rand(1, 1, 6, 6, generator=_gen(4))
    changed = views._colour_jitter(x.clone(), torch.tensor([[1.0, 1.0, 0.2, 0.2]]))
    torch.testing.assert_close(changed, x)  # saturation and hue have no meaning in gray


@pytest.mark.parametrize("name", ["cifar10", "fashion_mnist"])
def test_dataset_mean_image_normalises_to_zero(name: str) -> None:
    info = dataset_info(name)
    level = (torch.tensor(info.mean) * 255).view(1, -1, 1, 1)
    images = level.round().to(torch.uint8).expand(2, info.channels, NATIVE[name], NATIVE[name])
    assert plain_views(images, info).abs().max() < 0.01
    no_colour = SimCLRViews(info, jitter_p=0.0, gray_p=0.0)(images.contiguous(), _gen(0))
    assert no_colour.mean().abs() < 0.01  # crops, flips and blur of a flat image stay flat


def test_probe_views_are_padded_shifted_and_flipped_crops() -> None:
    info = dataset_info("cifar10")
    images = _images(info, batch=6)
    out = probe_views(images, info, _gen(5))
    assert out.shape == (6, 3, 32, 32) and out.dtype == torch.float32
    assert torch.equal(out, probe_views(images, info, _gen(5)))
    padded = F.pad(plain_views(images, info), [4] * 4, value=0.0)  # padding in normalised units
    black = plain_views(torch.zeros(1, 3, 1, 1, dtype=torch.uint8).expand(1, 3, 32, 32), info)
    padded = torch.where(F.pad(torch.ones(6, 3, 32, 32), [4] * 4) > 0, padded, black[:, :, :1, :1])
    for i in range(6):
        windows = [padded[i, :, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        candidates = windows + [w.flip(-1) for w in windows]
        assert any(torch.allclose(out[i], c, atol=1e-6) for c in candidates), f"row {i}"


def test_plain_views_resize_bilinear() -> None:
    info = dataset_info("fashion_mnist")
    images = _images(info)
    expected = F.interpolate(images.float() / 255, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(plain_views(images, info), (expected - 0.2860) / 0.3530)


def test_bad_inputs_are_rejected_with_the_expected_shape() -> None:
    info = dataset_info("cifar10")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        SimCLRViews(info)(torch.zeros(2, 1, 32, 32, dtype=torch.uint8), _gen(0))
    with pytest.raises(ValueError, match="uint8"):
        plain_views(torch.zeros(2, 3, 32, 32), info)
    with pytest.raises(ValueError, match="probability"):
        SimCLRViews(info, blur_p=1.5)
    assert set(NATIVE) == set(DATASETS) and math.isclose(SimCLRViews(info).blur_kernel, 3)
    assert SimCLRViews(dataset_info("stl10")).blur_kernel == 9
