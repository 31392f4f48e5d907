"""The seed's training augmentation run per batch (data.transforms.BatchAugment): crops drawn
as torchvision's RandomResizedCrop draws them, resampled as torchvision's tensor
``resized_crop`` resamples them, and no colour change unless ``--color_jitter`` asks for one."""
from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms as transforms_v1
from PIL import Image
from scipy import stats
from torchvision.transforms import v2 as transforms
from torchvision.transforms.v2 import functional as F

from data.transforms import NORMALIZE_STD, BatchAugment, build_transform, crop_boxes, resized_crops

STD = NORMALIZE_STD[0]  # differences are given in normalised units: pixel values in [0, 1] / 0.225


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------- crop boxes


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


def torchvision_boxes(count: int, height: int, width: int, seed: int) -> torch.Tensor:
    """``count`` boxes ``(x1, y1, x2, y2)`` from torchvision's own ``RandomResizedCrop.get_params``
    (which draws on torch's global RNG, seeded here and restored afterwards)."""
    image = torch.empty(3, height, width)
    scale, ratio = [0.08, 1.0], [3 / 4, 4 / 3]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        params = [transforms_v1.RandomResizedCrop.get_params(image, scale, ratio) for _ in range(count)]
    return torch.tensor([[left, top, left + w, top + h] for top, left, h, w in params], dtype=torch.float32)


@pytest.mark.parametrize("height, width, fallback", [
    (224, 224, (0, 0, 224, 224)),
    (40, 30, (0, 0, 30, 40)),  # not square
    (4, 40, (17, 0, 22, 4)),  # so flat that no try fits about every other time: the centre crop 5 x 4
])
def test_crop_boxes_are_distributed_as_torchvisions(height, width, fallback):
    count = 20000
    ours = crop_boxes(count, height, width, generator(11)).float()
    theirs = torchvision_boxes(count, height, width, seed=12)

    def columns(boxes: torch.Tensor) -> dict[str, torch.Tensor]:
        left, top, right, bottom = boxes.unbind(1)
        return {"width": right - left, "height": bottom - top, "left": left, "top": top,
                "area": (right - left) * (bottom - top)}

    for name, column in columns(ours).items():
        result = stats.ks_2samp(column.numpy(), columns(theirs)[name].numpy())
        assert result.pvalue > 1e-3, (name, result)
    # how often the box is the fallback's centre crop (or a drawn box that happens to equal it)
    target = torch.tensor(fallback, dtype=torch.float32)
    ours_rate = (ours == target).all(1).double().mean().item()
    theirs_rate = (theirs == target).all(1).double().mean().item()
    pooled = (ours_rate + theirs_rate) / 2
    sigma = math.sqrt(max(pooled * (1 - pooled), 1 / count) * 2 / count)
    assert abs(ours_rate - theirs_rate) <= 5 * sigma, (ours_rate, theirs_rate)
    if height == 4:
        assert 0.4 < theirs_rate < 0.75  # the fallback is really exercised


# --------------------------------------------------------------- resampling the crops


def reference_crops(images: torch.Tensor, boxes: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    """torchvision's functional ``resized_crop`` (antialiased bilinear), image by image, in ``dtype``."""
    return torch.stack([
        F.resized_crop(image.to(dtype), int(y1), int(x1), int(y2 - y1), int(x2 - x1), [size, size], antialias=True)
        for image, (x1, y1, x2, y2) in zip(images, boxes.tolist())])


def crop_errors(images: torch.Tensor, boxes: torch.Tensor, size: int) -> tuple[float, float]:
    """max |resized_crops - torchvision| in normalised units, against torchvision run in
    float32 and in float64."""
    ours = resized_crops(images, boxes, size)
    assert ours.shape == (len(images), images.shape[1], size, size) and ours.dtype == torch.float32
    float32 = (ours - reference_crops(images, boxes, size, torch.float32)).abs().max().item() / STD
    float64 = (ours.double() - reference_crops(images, boxes, size, torch.float64)).abs().max().item() / STD
    return float32, float64


def edge_boxes(height: int, width: int) -> torch.Tensor:
    """Hand-drawn crops ``(x1, y1, x2, y2)`` of an image ``height x width``."""
    h, w = height, width
    return torch.tensor([
        [0, 0, 1, 1], [w - 1, h - 1, w, h], [w // 2, h // 3, w // 2 + 1, h // 3 + 1],  # single pixels
        [0, 0, w, h],  # the whole image
        [w // 3, 0, w // 3 + 1, h], [0, h // 2, w, h // 2 + 1],  # one-pixel strips, full length
        [0, 1, w // 2, h - 1], [w // 2, 1, w, h - 2],  # touching the left / right edge
        [1, 0, w - 1, h // 2], [2, h // 2, w - 3, h],  # touching the top / bottom edge
        [0, 0, w // 2, h // 3], [w - w // 3, h - h // 4, w, h],  # in the top-left / bottom-right corner
        [0, 0, 2, 3], [w - 3, h - 2, w, h],  # a few pixels in opposite corners
    ], dtype=torch.float64)


def uint8_images(count: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Random images as BatchAugment sees them: uint8 pixels scaled to [0, 1]. Noise has the
    largest pixel-to-pixel steps, so it shows resampling differences at their largest."""
    return torch.randint(0, 256, (count, 3, height, width), generator=generator(seed)).float() / 255


@pytest.mark.parametrize("height, width", [
    (32, 32),  # as in training: the image resized to the output size, every crop enlarged
    (29, 40),  # not square
    (97, 130),  # larger than the output: whole-image crops shrink, and the antialiasing counts
])
def test_crops_equal_torchvision_resized_crop_at_32_px(height, width):
    drawn = crop_boxes(300, height, width, generator(height))
    boxes = torch.cat([drawn.double(), edge_boxes(height, width)])
    float32, float64 = crop_errors(uint8_images(len(boxes), height, width, seed=width), boxes, 32)
    assert float32 <= 1e-4 and float64 <= 2e-6, (float32, float64)


@pytest.mark.parametrize("height, width, drawn", [(224, 224, 12), (300, 256, 4)])
def test_crops_equal_torchvision_resized_crop_at_224_px(height, width, drawn):
    boxes = torch.cat([crop_boxes(drawn, height, width, generator(height)).double(), edge_boxes(height, width)])
    float32, float64 = crop_errors(uint8_images(len(boxes), height, width, seed=width), boxes, 224)
    # torchvision computes its resampling weights in float32; the float64 run shows that the
    # batched crop itself is exact up to float32 rounding of its output
    assert float32 <= 1e-4 and float64 <= 2e-6, (float32, float64)


def test_batch_augment_crops_are_the_drawn_boxes_resampled():
    """BatchAugment draws the boxes first and resamples with resized_crops: the same generator
    state gives the same boxes, and unflipped images are torchvision's resized_crop of them."""
    images = torch.randint(0, 256, (16, 3, 20, 20), dtype=torch.uint8, generator=generator(5))
    out = BatchAugment(20)(images, generator(6))
    draw = generator(6)
    boxes = crop_boxes(16, 20, 20, draw)
    flips = torch.rand(16, generator=draw) < 0.5
    expected = (reference_crops(images.float() / 255, boxes, 20, torch.float64) - 0.5) / STD
    expected = torch.where(flips[:, None, None, None], expected.flip(-1), expected)
    assert (out.double() - expected).abs().max().item() <= 2e-6


# ----------------------------------------------------------------- flips and colours


def test_full_crop_is_the_evaluation_transform_or_its_mirror():
    images = torch.randint(0, 256, (64, 3, 12, 12), dtype=torch.uint8)
    augment = BatchAugment(12, scale=(1.0, 1.0), ratio=(1.0, 1.0))  # the default: no colour jitter
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


@pytest.mark.parametrize("kind", ["tensor", "pil"])
def test_per_image_training_transform_has_no_colour_change_by_default(kind):
    """build_transform(True, s), the per-image pipeline of --augment pil: Resize,
    RandomResizedCrop, RandomHorizontalFlip, to float, Normalize; the seed's ColorJitter()
    changes nothing, so there is none. With its crop pinned to the whole image, every output
    is the evaluation transform's or its mirror."""
    train = build_transform(True, 12)
    assert [type(step) for step in train.transforms[:3]] == [
        transforms.Resize, transforms.RandomResizedCrop, transforms.RandomHorizontalFlip]
    assert not any(isinstance(step, transforms.ColorJitter) for step in train.transforms)
    pinned = transforms.Compose([
        transforms.RandomResizedCrop(12, scale=(1.0, 1.0), ratio=(1.0, 1.0))
        if isinstance(step, transforms.RandomResizedCrop) else step for step in train.transforms])
    evaluation = build_transform(False, 12)
    images = torch.randint(0, 256, (40, 3, 15, 17), dtype=torch.uint8, generator=generator(4))
    if kind == "pil":
        images = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
    flipped = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for image in images:
            result, plain = pinned(image), evaluation(image)
            assert result.shape == (3, 12, 12) and type(result) is torch.Tensor
            if torch.equal(result, plain):
                continue
            assert torch.equal(result, plain.flip(-1))
            flipped += 1
    assert 8 < flipped < 32


def test_same_seed_same_batch_and_jitter_changes_colours():
    images = torch.randint(0, 256, (8, 3, 20, 20), dtype=torch.uint8)
    plain = BatchAugment(16)
    assert plain.color_jitter == 0.0
    assert torch.equal(plain(images, generator(7)), plain(images, generator(7)))
    assert not torch.equal(plain(images, generator(7)), plain(images, generator(8)))
    out = BatchAugment(16, color_jitter=0.4)(images, generator(7))  # opt-in: --color_jitter 0.4
    assert out.shape == (8, 3, 16, 16) and out.dtype == torch.float32 and torch.isfinite(out).all()
    # the same crops and flips (drawn first), different colours
    assert not torch.allclose(out, plain(images, generator(7)))
    low, high = (0 - 0.5) / 0.225, (1 - 0.5) / 0.225
    assert out.min() >= low - 1e-5 and out.max() <= high + 1e-5
    for strength in (-0.1, 1.5):
        with pytest.raises(ValueError, match="color_jitter"):
            BatchAugment(16, color_jitter=strength)


@pytest.mark.parametrize("size", [8, 24])
def test_output_size_is_the_requested_one(size):
    out = BatchAugment(size)(torch.zeros(5, 3, 16, 16, dtype=torch.uint8), generator(0))
    assert out.shape == (5, 3, size, size)
    assert torch.allclose(out, torch.full_like(out, -0.5 / 0.225))
    assert math.isclose(out[0, 0, 0, 0].item(), -0.5 / 0.225, rel_tol=1e-6)
