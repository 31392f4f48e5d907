"""The seed's image transforms: resize to a square, then (training only) a random resized
crop, a horizontal flip and optionally colour jitter; normalised with a fixed mean/std."""
from __future__ import annotations

import functools

import math

import torch
from torchvision.transforms import v2 as transforms

# The seed's normalisation constants (not ImageNet's per-channel statistics).
NORMALIZE_MEAN = (0.5, 0.5, 0.5)
NORMALIZE_STD = (0.225, 0.225, 0.225)


def build_transform(train: bool, img_size: int, color_jitter: float = 0.0) -> transforms.Compose:
    """PIL image or uint8 image tensor -> normalised ``3 x img_size x img_size`` float tensor.

    train: Resize((s, s)), RandomResizedCrop(s), RandomHorizontalFlip, [ColorJitter(j, j, j)
    when ``color_jitter`` j > 0], to float in [0, 1], Normalize. val: Resize((s, s)), to float,
    Normalize. (torchvision's v2 transforms: the same operations on PIL images and on tensors.)
    The seed's pre-training writes ``ColorJitter()`` with no arguments, which changes nothing:
    the default here is no jitter.
    """
    if img_size < 1:
        raise ValueError(f"img_size must be positive, got {img_size}")
    steps: list = [transforms.Resize((img_size, img_size))]
    if train:
        steps += [transforms.RandomResizedCrop(img_size), transforms.RandomHorizontalFlip()]
        if color_jitter:
            s = float(color_jitter)
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
    so the same numbers; the constants are made once per device, so no copy per batch)."""
    from torchvision.transforms.v2 import functional as F

    mean, std = normalisation_constants(images.device)
    return F.to_dtype(images, torch.float32, scale=True).sub_(mean[0]).div_(std[0])


@functools.lru_cache(maxsize=None)
def normalisation_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed's mean and std as ``[1, 3, 1, 1]`` float32 tensors on ``device`` (made once)."""
    shape = (1, 3, 1, 1)
    return (torch.tensor(NORMALIZE_MEAN).view(shape).to(device), torch.tensor(NORMALIZE_STD).view(shape).to(device))


def to_device_at_once(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Small CPU tensors as float32 on ``device``: on a GPU packed into one pinned buffer and
    sent in one asynchronous copy (no host synchronisation), instead of one blocking copy each."""
    if device.type != "cuda":
        return [t.to(device, torch.float32) for t in tensors]
    packed = torch.cat([t.to(torch.float32).reshape(-1) for t in tensors]).pin_memory()
    parts = packed.to(device, non_blocking=True).split([t.numel() for t in tensors])
    return [part.view(t.shape) for part, t in zip(parts, tensors)]


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


def _resample_weights(starts: torch.Tensor, lengths: torch.Tensor, full: int, size: int) -> torch.Tensor:
    """``[count, size, full]`` weights that resample the segment ``[start, start + length)`` of
    an axis of ``full`` pixels to ``size`` pixels, one row per output pixel, as torchvision's
    bilinear resize with ``antialias=True`` does (PyTorch's ``_upsample_bilinear2d_aa``): a
    triangle filter centred on the output pixel's source position, widened by the scale when
    shrinking, cut to the segment and normalised to sum 1. When enlarging this is plain
    bilinear interpolation (``align_corners=False``) with positions clamped to the segment.
    Pixels outside the segment get weight 0, so the crop never reads past its own edge."""
    starts = starts.to(torch.float64)[:, None, None]
    lengths = lengths.to(torch.float64)[:, None, None]
    scale = lengths / size
    support = torch.clamp(scale, min=1.0)  # the filter's half-width in input pixels
    arange = functools.partial(torch.arange, dtype=torch.float64, device=starts.device)
    centre = scale * (arange(size)[None, :, None] + 0.5)  # in the segment
    local = arange(full)[None, None, :] - starts  # input pixel in the segment
    # PyTorch takes the taps [trunc(centre - support + 0.5), trunc(centre + support + 0.5)) cut to the segment
    low = torch.clamp(torch.trunc(centre - support + 0.5), min=0.0)
    high = torch.minimum(torch.trunc(centre + support + 0.5), lengths)
    weights = torch.clamp(1.0 - torch.abs((local - centre + 0.5) / support), min=0.0)
    weights = torch.where((local >= low) & (local < high), weights, torch.zeros_like(weights))
    return weights / weights.sum(dim=2, keepdim=True)


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop ``boxes[i] = (x1, y1, x2, y2)`` (whole pixels) out of ``images[i]`` and resize each
    crop to ``size x size``: the numbers of torchvision's ``F.resized_crop(image, y1, x1,
    y2 - y1, x2 - x1, [size, size], antialias=True)`` on float images, for a whole batch at
    once on the images' device (two batched matrix products with per-image resampling
    weights, :func:`_resample_weights`). ``images`` ``[B, C, H, W]`` float; returns float32."""
    (boxes,) = to_device_at_once([boxes], images.device)
    return apply_crops(images, *crop_weights(images.shape, boxes, size))


def crop_weights(shape: torch.Size, boxes: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The row and column resampling weights of :func:`resized_crops`, computed in float64
    on the boxes' device (whole-pixel boxes: exact in float32 too), returned as float32."""
    _, _, height, width = shape
    boxes = boxes.to(torch.float64)
    return (_resample_weights(boxes[:, 1], boxes[:, 3] - boxes[:, 1], height, size).float(),
            _resample_weights(boxes[:, 0], boxes[:, 2] - boxes[:, 0], width, size).float())


def apply_crops(images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """out[b, c, i, j] = sum_{y, x} rows[b, i, y] images[b, c, y, x] cols[b, j, x] (float32)."""
    out = torch.matmul(rows[:, None], images.float())
    return torch.matmul(out, cols[:, None].transpose(-1, -2))


class BatchAugment:
    """The seed's training augmentation applied to a whole batch at once, on its device.

    uint8 images ``[B, 3, H, W]`` -> normalised float ``[B, 3, size, size]``: a random
    resized crop per image (boxes from :func:`crop_boxes`, resampled as torchvision's
    tensor ``resized_crop`` does, :func:`resized_crops`), a horizontal flip with probability
    0.5, optionally colour jitter (brightness, contrast and saturation factors drawn
    uniformly from ``[1 - jitter, 1 + jitter]``, applied in that order; the seed's
    ``ColorJitter()`` has no arguments and is the identity, so the default is 0: none),
    then the seed's normalisation. All random numbers come from ``generator`` (a CPU
    generator), so a batch's augmentation is fixed by the generator's seed.
    """

    def __init__(self, size: int, color_jitter: float = 0.0, scale: tuple[float, float] = CROP_SCALE,
                 ratio: tuple[float, float] = CROP_RATIO) -> None:
        if not 0.0 <= float(color_jitter) <= 1.0:
            raise ValueError(f"color_jitter must be in [0, 1], got {color_jitter}")
        self.size, self.color_jitter, self.scale, self.ratio = size, float(color_jitter), scale, ratio

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        count, _, height, width = images.shape
        boxes = crop_boxes(count, height, width, generator, self.scale, self.ratio)
        flips = torch.rand(count, generator=generator) < 0.5
        if self.color_jitter:
            s = self.color_jitter
            factors = torch.empty(count, 3).uniform_(1 - s, 1 + s, generator=generator)
        device = images.device
        # every random number of the batch goes to the device in one copy; the resampling weights are made there
        boxes, flips, *jitter = to_device_at_once([boxes, flips, *([factors] if self.color_jitter else [])], device)
        out = apply_crops(images.float().div_(255), *crop_weights(images.shape, boxes, self.size))
        out = torch.where(flips[:, None, None, None] > 0.5, out.flip(-1), out)
        if self.color_jitter:
            out = _jitter(out, jitter[0])
        mean, std = normalisation_constants(device)
        return (out - mean) / std


@functools.lru_cache(maxsize=None)
def _grey_weights(device: torch.device) -> torch.Tensor:
    return torch.tensor([0.299, 0.587, 0.114])[None, :, None, None].to(device)


def _jitter(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and saturation, each a per-image factor, as torchvision defines them."""
    weights = _grey_weights(images.device)
    brightness, contrast, saturation = (factors[:, i, None, None, None] for i in range(3))
    images = (images * brightness).clamp_(0, 1)
    grey_mean = (images * weights).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
    images = ((images - grey_mean) * contrast + grey_mean).clamp_(0, 1)
    grey = (images * weights).sum(1, keepdim=True)
    return ((images - grey) * saturation + grey).clamp_(0, 1)
