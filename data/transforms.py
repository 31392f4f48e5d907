"""The seed's image transforms: resize to a square, then (training only) a random resized
crop, a horizontal flip and optionally colour jitter; normalised with a fixed mean/std."""
from __future__ import annotations

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
