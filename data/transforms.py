"""The seed's image transforms: resize to a square, then (training only) a random resized
crop, a horizontal flip and optionally colour jitter; normalised with a fixed mean/std."""
from __future__ import annotations

import math

import torch
from torchvision.transforms import v2 as transforms

# The seed's normalisation constants (not ImageNet's per-channel statistics).
NORMALIZE_MEAN = (0.5, 0.5, 0.5)
NORMALIZE_STD = (0.225, 0.225, 0.225)
# Brightness, contrast and saturation factors of the optional colour jitter.
COLOR_JITTER_STRENGTH = 0.4


def build_transform(train: bool, img_size: int, color_jitter: bool = False) -> transforms.Compose:
    """PIL image or uint8 image tensor -> normalised ``3 x img_size x img_size`` float tensor.

    train: Resize((s, s)), RandomResizedCrop(s), RandomHorizontalFlip, [ColorJitter(0.4, 0.4,
    0.4) when ``color_jitter``], to float in [0, 1], Normalize. val: Resize((s, s)), to float, Normalize.
    (torchvision's v2 transforms: the same operations on PIL images and on tensors.)
    """
    if img_size < 1:
        raise ValueError(f"img_size must be positive, got {img_size}")
    steps: list = [transforms.Resize((img_size, img_size))]
    if train:
        steps += [transforms.RandomResizedCrop(img_size), transforms.RandomHorizontalFlip()]
        if color_jitter:
            s = COLOR_JITTER_STRENGTH
            steps.append(transforms.ColorJitter(brightness=s, contrast=s, saturation=s))
    # ToPureTensor: a plain tensor, not a tv_tensors.Image, whose __torch_function__ would
    # slow down collation and every operation of the model on the batch.
    steps += [transforms.ToImage(), transforms.ToDtype(torch.float32, scale=True),
              transforms.Normalize(NORMALIZE_MEAN, NORMALIZE_STD), transforms.ToPureTensor()]
    return transforms.Compose(steps)


def normalize_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 images ``[..., 3, H, W]`` -> float, scaled to [0, 1] and normalised with the seed's
    constants, on the images' device: the last steps of the evaluation transform, for a whole
    batch at once (the same operations as ``build_transform(False, ...)`` applies per image,
    so the same numbers)."""
    from torchvision.transforms.v2 import functional as F

    return F.normalize(F.to_dtype(images, torch.float32, scale=True), list(NORMALIZE_MEAN), list(NORMALIZE_STD))


# ------------------------------------------------------------- batched augmentation

# RandomResizedCrop's defaults: the crop covers 8-100 % of the image, aspect ratio 3/4-4/3.
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
_CROP_TRIES = 10


def build_loading_transform(img_size: int) -> transforms.Compose:
    """What is done per image when the augmentation runs per batch (:class:`BatchAugment`):
    resize to ``img_size`` square and keep the uint8 pixels."""
    return transforms.Compose([transforms.Resize((img_size, img_size)), transforms.ToImage(),
                               transforms.ToPureTensor()])


def crop_boxes(count: int, height: int, width: int, generator: torch.Generator,
               scale: tuple[float, float] = CROP_SCALE, ratio: tuple[float, float] = CROP_RATIO) -> torch.Tensor:
    """Random resized crops for ``count`` images, as torchvision's RandomResizedCrop draws
    them: up to 10 tries of (area, log-uniform aspect ratio) per image, the first that fits
    wins, else a centre crop clamped to the ratio range. Returns ``[count, 4]`` boxes
    ``(x1, y1, x2, y2)`` in pixels (float)."""
    area = height * width
    target = area * torch.empty(count, _CROP_TRIES).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(count, _CROP_TRIES).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.float().argmax(dim=1)  # index of the first try that fits (0 when none does)
    rows = torch.arange(count)
    w, h, found = w[rows, first], h[rows, first], fits.any(dim=1)
    # the fallback of RandomResizedCrop: the whole image, clamped to the ratio range
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fallback_w, fallback_h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fallback_w, fallback_h = round(height * ratio[1]), height
    else:
        fallback_w, fallback_h = width, height
    w = torch.where(found, w, torch.full_like(w, fallback_w))
    h = torch.where(found, h, torch.full_like(h, fallback_h))
    offsets = torch.rand(count, 2, generator=generator)
    top = torch.where(found, torch.floor(offsets[:, 0] * (height - h + 1)), (height - h) // 2)
    left = torch.where(found, torch.floor(offsets[:, 1] * (width - w + 1)), (width - w) // 2)
    return torch.stack([left, top, left + w, top + h], dim=1)


class BatchAugment:
    """The seed's training augmentation applied to a whole batch at once, on its device.

    uint8 images ``[B, 3, H, W]`` -> normalised float ``[B, 3, size, size]``: a random
    resized crop per image (boxes from :func:`crop_boxes`; the crop is resampled bilinearly,
    averaging over each output pixel's footprint, by ``torchvision.ops.roi_align``), a
    horizontal flip with probability 0.5, optionally colour jitter (brightness, contrast and
    saturation factors in [0.6, 1.4], applied in that order), then the seed's normalisation.
    All random numbers come from ``generator`` (a CPU generator), so a batch's augmentation is
    fixed by the generator's seed.
    """

    def __init__(self, size: int, color_jitter: bool = False, scale: tuple[float, float] = CROP_SCALE,
                 ratio: tuple[float, float] = CROP_RATIO) -> None:
        self.size, self.color_jitter, self.scale, self.ratio = size, color_jitter, scale, ratio

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        from torchvision.ops import roi_align

        count, _, height, width = images.shape
        boxes = crop_boxes(count, height, width, generator, self.scale, self.ratio)
        flips = torch.rand(count, generator=generator) < 0.5
        if self.color_jitter:
            s = COLOR_JITTER_STRENGTH
            factors = torch.empty(count, 3).uniform_(1 - s, 1 + s, generator=generator)
        device = images.device
        indexed = torch.cat([torch.arange(count, dtype=boxes.dtype)[:, None], boxes], dim=1).to(device)
        pixels = images.float().div_(255)
        out = roi_align(pixels, indexed, output_size=(self.size, self.size), spatial_scale=1.0,
                        sampling_ratio=-1, aligned=True)
        out = torch.where(flips.to(device)[:, None, None, None], out.flip(-1), out)
        if self.color_jitter:
            out = _jitter(out, factors.to(device))
        mean = torch.tensor(NORMALIZE_MEAN, device=device)[None, :, None, None]
        std = torch.tensor(NORMALIZE_STD, device=device)[None, :, None, None]
        return (out - mean) / std


def _jitter(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and saturation, each a per-image factor, as torchvision defines them."""
    weights = torch.tensor([0.299, 0.587, 0.114], device=images.device)[None, :, None, None]
    brightness, contrast, saturation = (factors[:, i, None, None, None] for i in range(3))
    images = (images * brightness).clamp_(0, 1)
    grey_mean = (images * weights).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
    images = ((images - grey_mean) * contrast + grey_mean).clamp_(0, 1)
    grey = (images * weights).sum(1, keepdim=True)
    return ((images - grey) * saturation + grey).clamp_(0, 1)
