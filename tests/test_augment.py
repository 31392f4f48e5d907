"""The seed's training augmentation run per batch (data.transforms.BatchAugment)."""
from __future__ import annotations

import math

import pytest
import torch

from data.transforms import BatchAugment, build_transform, crop_boxes


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_crop_boxes_follow_random_resized_crop():
    boxes = crop_boxes(20000, 40, 30, generator(0))
    left, top, right, bottom = boxes.unbind(1)
    width, height = right - left, bottom - top
    assert (left >= 0).all() and (top >= 0).all() and (right <= 30).all() and (bottom <= 40).all()
    assert (width >= 1).all() and (height >= 1).all()
    area = width * height / (40 * 30)
    assert area.min() >= 0.06 and area.max() <= 1.0  # 8 % to 100 %, up to rounding
    aspect = width / height
    assert aspect.min() >= 0.6 and aspect.max() <= 1.6  # 3/4 to 4/3, up to rounding of small crops
    assert 0.4 < area.mean() < 0.6  # uniform area in [0.08, 1]: mean 0.54
    assert torch.equal(crop_boxes(50, 40, 30, generator(1)), crop_boxes(50, 40, 30, generator(1)))
    assert not torch.equal(crop_boxes(50, 40, 30, generator(1)), crop_boxes(50, 40, 30, generator(2)))


def test_crop_boxes_fall_back_to_a_centre_crop():
    # no area can be drawn that fits: RandomResizedCrop's fallback, the whole image clamped to the ratio range
    assert crop_boxes(3, 20, 20, generator(0), scale=(2.0, 3.0)).tolist() == [[0, 0, 20, 20]] * 3
    wide = crop_boxes(2, 10, 40, generator(0), scale=(2.0, 3.0))  # 4:1 image, clamped to 4/3
    assert wide.tolist() == [[13, 0, 13 + 13, 10]] * 2  # width round(10 * 4/3) = 13, centred


def test_full_crop_is_the_evaluation_transform_or_its_mirror():
    images = torch.randint(0, 256, (64, 3, 12, 12), dtype=torch.uint8)
    augment = BatchAugment(12, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    out = augment(images, generator(3))
    evaluation = build_transform(False, 12)
    flipped = 0
    for image, result in zip(images, out):
        plain = evaluation(image)
        if torch.allclose(result, plain, atol=1e-5):
            continue
        assert torch.allclose(result, plain.flip(-1), atol=1e-5)
        flipped += 1
    assert 16 < flipped < 48  # a flip with probability 0.5


def test_same_seed_same_batch_and_jitter_changes_colours():
    images = torch.randint(0, 256, (8, 3, 20, 20), dtype=torch.uint8)
    plain = BatchAugment(16)
    assert torch.equal(plain(images, generator(7)), plain(images, generator(7)))
    assert not torch.equal(plain(images, generator(7)), plain(images, generator(8)))
    out = BatchAugment(16, color_jitter=True)(images, generator(7))
    assert out.shape == (8, 3, 16, 16) and out.dtype == torch.float32 and torch.isfinite(out).all()
    # the same crops and flips (drawn first), different colours
    assert not torch.allclose(out, plain(images, generator(7)))
    low, high = (0 - 0.5) / 0.225, (1 - 0.5) / 0.225
    assert out.min() >= low - 1e-5 and out.max() <= high + 1e-5


@pytest.mark.parametrize("size", [8, 24])
def test_output_size_is_the_requested_one(size):
    out = BatchAugment(size)(torch.zeros(5, 3, 16, 16, dtype=torch.uint8), generator(0))
    assert out.shape == (5, 3, size, size)
    assert torch.allclose(out, torch.full_like(out, -0.5 / 0.225))
    assert math.isclose(out[0, 0, 0, 0].item(), -0.5 / 0.225, rel_tol=1e-6)
