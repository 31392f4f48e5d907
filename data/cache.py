"""Decoded images held in memory, so that training reads and resizes every file once.

Training images are only resized per image (the augmentation runs per batch on the device,
see :class:`data.transforms.BatchAugment`), so what a data set yields for image ``i`` is the
same every epoch: a ``uint8`` tensor ``[3, s, s]``. :class:`ImageCache` keeps all of them in
one tensor and cuts batches out of it by index, which costs microseconds per batch instead
of decoding, resizing and collating every image again. The batches are the very tensors the
data loader would have built, so training gives the same numbers with or without the cache.
With ``--augment pil`` each training image is augmented as it is read (the seed's per-image
pipeline), different at every step, so only the validation images are cached.

``--cache auto`` (the default) caches when the decoded images of both splits take at most a
quarter of the memory that is available, shared among the processes on the node.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import psutil
import torch

CACHE_MODES = ("auto", "on", "off")
# On a GPU, the cached images move to the GPU when they take at most this share of its free memory.
GPU_MEMORY_SHARE = 0.25
# --cache auto uses at most this share of the available memory (all processes of a node together).
AUTO_MEMORY_SHARE = 0.25


def available_memory() -> int:
    """Bytes of memory available to new allocations without swapping (Linux: MemAvailable)."""
    return psutil.virtual_memory().available


def processes_on_node() -> int:
    """How many training processes share this machine's memory (torchrun's LOCAL_WORLD_SIZE)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def should_cache(mode: str, needed_bytes: int, processes: int = 1, available: int | None = None) -> bool:
    """Whether to cache ``needed_bytes`` of decoded images per process under ``--cache mode``."""
    if mode not in CACHE_MODES:
        raise ValueError(f"cache mode must be one of {CACHE_MODES}, got {mode!r}")
    if mode != "auto":
        return mode == "on"
    if available is None:
        return False
    return needed_bytes * processes <= AUTO_MEMORY_SHARE * available


def cacheable(sample) -> bool:
    """A sample the cache can hold: ``(uint8 image tensor [C, H, W], integer label)``."""
    return (isinstance(sample, (tuple, list)) and len(sample) == 2 and isinstance(sample[0], torch.Tensor)
            and sample[0].dtype == torch.uint8 and sample[0].dim() == 3)


class ImageCache:
    """Every sample of a data set, decoded: ``images`` (uint8 ``[N, C, H, W]``), ``labels``
    (int64 ``[N]``) and ``loaded`` (bool ``[N]``, False where the image was skipped as corrupt)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, loaded: torch.Tensor) -> None:
        self.images, self.labels, self.loaded = images, labels, loaded

    @classmethod
    def from_samples(cls, samples: Iterable, count: int) -> "ImageCache | None":
        """Fill a cache from the data set's ``count`` samples in index order (``None`` for a
        skipped image). Returns None, leaving the data set to be read as usual, if a sample
        is not a uint8 image of the same shape as the first (images not resized to one size)."""
        images, shape = None, None
        labels = torch.zeros(count, dtype=torch.long)
        loaded = torch.zeros(count, dtype=torch.bool)
        index = -1
        for index, sample in enumerate(samples):
            if index >= count:
                raise ValueError(f"the data set yielded more than its {count} samples")
            if sample is None:
                continue
            if not cacheable(sample):
                return None
            if images is None:
                shape = tuple(sample[0].shape)
                images = torch.empty((count, *shape), dtype=torch.uint8)
            elif tuple(sample[0].shape) != shape:
                return None
            images[index] = sample[0]
            labels[index] = int(sample[1])
            loaded[index] = True
        if index + 1 != count:
            raise ValueError(f"the data set yielded {index + 1} of its {count} samples")
        if images is None:  # every image was skipped
            images = torch.empty((count, 0, 0, 0), dtype=torch.uint8)
        return cls(images, labels, loaded)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size()

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device) -> "ImageCache":
        """The images and labels on ``device``; which samples loaded stays on the CPU, so that
        cutting a batch never waits for the device."""
        return ImageCache(self.images.to(device), self.labels.to(device), self.loaded)

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(images, labels, skipped)`` for the samples at ``indices``, in that order, less
        the skipped ones: what the data loader's collation gives for the same indices. On a
        GPU the indices go over in one asynchronous copy and the batch is gathered there."""
        index = torch.as_tensor(indices, dtype=torch.long)
        keep = self.loaded[index]
        skipped = len(index) - int(keep.sum())
        if skipped:
            index = index[keep]
        if self.device.type == "cuda":
            index = index.pin_memory().to(self.device, non_blocking=True)
        return self.images[index], self.labels[index], skipped


def fits_on_gpu(nbytes: int, device: torch.device) -> bool:
    """Whether ``nbytes`` of cached images take at most :data:`GPU_MEMORY_SHARE` of the
    GPU's free memory."""
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= GPU_MEMORY_SHARE * free
