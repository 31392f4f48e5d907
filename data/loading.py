"""Feeding the training loop: sample order, per-sample seeds, the in-memory cache and loaders.

Exact resumption rests on two rules kept here. Per image, loading only decodes and resizes
(no randomness); each batch's augmentation runs in the training process from a generator
seeded by (seed, epoch, step) (:func:`step_seed`), and the order of an epoch's samples is
seeded by (seed, epoch) (:class:`EpochSampler`), so neither depends on the number of
loading workers or on where a run was stopped. With ``--augment pil`` the seed's per-image
transforms run while loading instead, each sample's seeded by its position in the epoch
(:class:`SeededSamples`): the same independence.

A corrupt image met in a loading worker comes back as a :class:`LoadFailure` (data, not an
exception), so that the main process can report it as one line.
"""
from __future__ import annotations

import math
import os
import threading
import time
from queue import Full, Queue
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from utils import UserError

_MASK64 = (1 << 64) - 1


def step_seed(seed: int, epoch: int, step: int) -> int:
    """A 63-bit seed for one training step's augmentation, from (run seed, epoch, step):
    the three are combined and scrambled with the SplitMix64 finaliser."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xD1B54A32D192ED03 + step * 0x8CB92BA72F3D8DD7 + 0x2545F4914F6CDD1D) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


class EpochSampler(DistributedSampler):
    """This rank's share of an epoch's sample indices, resumable inside the epoch.

    Training (``shuffle=True``): :class:`~torch.utils.data.distributed.DistributedSampler`'s
    permutation seeded by (seed, epoch) and padded so that every rank gets as many samples.
    Validation (``shuffle=False``): the shares are ``index % world_size == rank`` with no
    padding, so that every sample is counted once (DistributedSampler would pad).
    ``set_epoch(epoch, skip)`` drops the first ``skip`` samples of this rank's share, which
    DistributedSampler cannot do: that is what resuming inside an epoch needs.

    With ``sample_seeds`` it yields ``(index, seed)`` pairs for :class:`SeededSamples`: the
    seed is :func:`step_seed` of (seed, epoch, the sample's position in the whole epoch's
    order, across all ranks), so it depends neither on the number of processes or workers
    nor on ``skip``.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 sample_seeds: bool = False) -> None:
        # DistributedSampler seeds its permutation with seed + epoch
        super().__init__(range(size), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed * 100_003)
        self.size, self.run_seed, self.world_size, self.sample_seeds = size, seed, world_size, sample_seeds
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = skip

    def _indices(self) -> list[int]:
        if self.shuffle:
            return list(super().__iter__())
        return list(range(self.rank, self.size, self.world_size))

    def __iter__(self) -> Iterator:
        indices = self._indices()
        if not self.sample_seeds:
            return iter(indices[self.skip:])
        # this rank's i-th sample is at position rank + i * world_size of the epoch's order
        return ((index, step_seed(self.run_seed, self.epoch, self.rank + position * self.world_size))
                for position, index in enumerate(indices) if position >= self.skip)

    def __len__(self) -> int:
        # a run stopped after an epoch's last step resumes with nothing left of that epoch
        return max(0, len(self._indices()) - self.skip)


class SeededSamples(Dataset):
    """A data set whose transform draws on torch's global RNG (torchvision's per-image random
    transforms, ``--augment pil``), made reproducible: its items are addressed as ``(index,
    seed)``, as :class:`EpochSampler` yields them with ``sample_seeds``, and item ``(index,
    seed)`` is ``dataset[index]`` computed with torch's CPU generator seeded by ``seed``. The
    generator's state is restored afterwards, so a sample's augmentation depends on its seed
    only: not on the worker process that loads it nor on what was loaded before, and loading
    in the training process (``--workers 0``) leaves its random numbers untouched.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.classes = getattr(dataset, "classes", None)
        self.targets = getattr(dataset, "targets", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        # only the CPU generator: torch.manual_seed would also reseed (and not restore) CUDA's
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


@dataclass(frozen=True)
class LoadFailure:
    """A user error (e.g. a corrupt image) met while loading a sample, carried back to the
    main process as data: an exception raised in a DataLoader worker would arrive there as
    a generic error wrapped in the worker's traceback."""

    message: str


class ReportingFailures(Dataset):
    """Wraps a dataset so that a :class:`UserError` while loading a sample (a corrupt
    image) comes back as a :class:`LoadFailure` instead of an exception."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except UserError as err:
            return LoadFailure(str(err))


def collate_batch(batch: Sequence):
    """``(images, labels, dropped)``: the samples that loaded, and how many were None
    (corrupt images skipped with --skip_corrupt); a :class:`LoadFailure` passes through."""
    from data.datasets import collate_skip_none

    failure = next((sample for sample in batch if isinstance(sample, LoadFailure)), None)
    if failure is not None:
        return failure
    collated = collate_skip_none(batch)
    dropped = sum(sample is None for sample in batch)
    if collated is None:
        return torch.empty(0), torch.empty(0, dtype=torch.long), dropped
    images, labels = collated
    return images, labels, dropped


def unpack_batch(batch) -> tuple[torch.Tensor, torch.Tensor, int]:
    if isinstance(batch, LoadFailure):
        raise UserError(batch.message)
    return batch


class CachedLoader:
    """Batches cut out of an :class:`data.cache.ImageCache` in the sampler's order: the same
    ``(images, labels, skipped)`` batches as a DataLoader over the data set with the same
    sampler, batch size and :func:`collate_batch`, without reading a file. A cache on the
    GPU gives batches already there; one in CPU memory, for a GPU (``pin_memory``), gives
    pinned batches cut ``prefetch`` batches ahead in a background thread."""

    def __init__(self, cache, sampler: EpochSampler, batch_size: int, pin_memory: bool, prefetch: int = 0) -> None:
        self.cache, self.sampler, self.batch_size, self.pin_memory = cache, sampler, batch_size, pin_memory
        self.prefetch = prefetch

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def _batches(self):
        indices = list(self.sampler)
        for start in range(0, len(indices), self.batch_size):
            images, labels, skipped = self.cache.batch(indices[start:start + self.batch_size])
            if self.pin_memory and images.device.type == "cpu":
                images, labels = images.pin_memory(), labels.pin_memory()
            yield images, labels, skipped

    def __iter__(self):
        return ahead(self._batches(), self.prefetch) if self.prefetch else self._batches()


def ahead(items: Iterator, depth: int) -> Iterator:
    """``items``, produced up to ``depth`` ahead in a background thread (which stops when the
    consumer does); an exception in the thread is raised in the consumer."""
    queue: Queue = Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def offer(item) -> bool:
        """Put ``item`` in the queue unless the consumer has stopped."""
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer(item):
                    return
            offer(done)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            offer(err)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := queue.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


class Interrupted(Exception):
    """A stop was requested while the images were being cached."""


def first_sample(dataset: Dataset):
    """The first sample that loads (None if every one was skipped as corrupt)."""
    for index in range(len(dataset)):
        sample = dataset[index]
        if sample is not None:
            return sample
    return None


def fill_cache(dataset: Dataset, workers: int, desc: str, show: bool, stop_requested: Callable[[], bool]):
    """Read every sample of ``dataset`` once (with ``workers`` loading processes) into an
    :class:`data.cache.ImageCache`; None if its samples cannot be cached. Raises
    :class:`Interrupted` when ``stop_requested()`` turns true on the way."""
    from data.cache import ImageCache

    loader = DataLoader(ReportingFailures(dataset), batch_size=64, num_workers=workers, collate_fn=list)

    def samples():
        for chunk in tqdm(loader, desc=desc, leave=False, disable=not show or None):
            if stop_requested():
                raise Interrupted
            for sample in chunk:
                if isinstance(sample, LoadFailure):
                    raise UserError(sample.message)
                yield sample

    return ImageCache.from_samples(samples(), len(dataset))


def cache_wanted(splits: Mapping[str, Dataset], mode: str, announce: Callable[[str], None]) -> bool:
    """Whether this process would hold ``splits`` in memory under ``--cache mode``: their
    samples are uint8 images of one size and (``auto``) fit the memory :mod:`data.cache`
    allows."""
    from data.cache import available_memory, cacheable, processes_on_node, should_cache

    if mode == "off":
        return False
    probes = [first_sample(data) for data in splits.values()]
    uniform = all(probe is None or cacheable(probe) for probe in probes)
    needed = sum(len(data) * probe[0].numel() for data, probe in zip(splits.values(), probes) if probe is not None)
    if mode == "on" and not uniform:
        announce("--cache on: the data set does not yield uint8 images of one size; reading it every epoch")
    return uniform and should_cache(mode, needed, processes_on_node(), available_memory())


def cache_splits(splits: Mapping[str, Dataset], workers: int, show: bool, stop_requested: Callable[[], bool],
                 announce: Callable[[str], None], per_sample: bool) -> dict:
    """Each split read once into memory (split name -> ImageCache), or {} when one of them
    cannot be cached."""
    tick = time.perf_counter()
    caches = [fill_cache(data, workers, f"  caching {name} images", show, stop_requested)
              for name, data in splits.items()]
    if any(cache is None for cache in caches):
        return {}
    held = " and ".join(f"{len(data)} {name}" for name, data in splits.items())
    announce(f"holding the {held} images in memory ({sum(c.nbytes for c in caches) / 2**20:.0f} MiB, "
             f"read in {time.perf_counter() - tick:.1f} s; --cache off reads the files every epoch"
             + ("; --augment pil reads and augments the training images at every step)" if per_sample else ")"))
    return dict(zip(splits, caches))


def place_caches(caches: dict, device: torch.device, announce: Callable[[str], None]) -> dict:
    """On a GPU, the caches moved to it when they fit (:func:`data.cache.fits_on_gpu`)."""
    from data.cache import fits_on_gpu

    if device.type != "cuda" or not caches or not fits_on_gpu(sum(c.nbytes for c in caches.values()), device):
        return caches
    announce(f"  the cached images are on {device} (at most a quarter of its free memory)")
    return {name: cache.to(device) for name, cache in caches.items()}


def make_loader(dataset: Dataset, sampler: EpochSampler, cache, *, batch_size: int, workers: int,
                generator: torch.Generator, pin_memory: bool):
    """Batches of ``(images, labels, skipped)`` in ``sampler``'s order: cut out of ``cache``
    when there is one (two batches ahead in a thread when pinning for a GPU), else read by a
    DataLoader that draws its workers' seeds from ``generator`` (a private one, so that
    loading never draws on the global RNG)."""
    if cache is not None:
        return CachedLoader(cache, sampler, batch_size, pin_memory, prefetch=2 if pin_memory else 0)
    return DataLoader(ReportingFailures(dataset), sampler=sampler, batch_size=batch_size, num_workers=workers,
                      pin_memory=pin_memory, persistent_workers=workers > 0, collate_fn=collate_batch,
                      drop_last=False, generator=generator)


def default_workers(device: torch.device) -> int:
    """Data-loading processes per training process when --workers is not given.

    On the CPU the model's own threads use every core, and loading in other processes only
    competes with them (measured by bench/bench_training.py). On GPUs the cores are free
    for loading: up to 8 per GPU of this node.
    """
    if device.type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 1) // max(torch.cuda.device_count(), 1)))


AUGMENT_MODES = ("batch", "pil")


def build_train_val(dataset: str, data_dir: str | None, img_size: int | None, color_jitter: float,
                    skip_corrupt: bool, seed: int,
                    augment: str = "batch") -> tuple[Dataset, Dataset, int, Callable | None]:
    """Both splits of ``dataset``, the image size, and the training augmentation.

    ``augment="batch"``: images of both splits are only resized per image (uint8); the
    seed's augmentation then runs on whole training batches on the device
    (:class:`data.transforms.BatchAugment`, returned). ``augment="pil"``: the training split
    runs the seed's per-image pipeline (:func:`data.transforms.build_transform` with
    ``train=True``) on each image as the data set gives it (a PIL image; the synthetic data
    set's uint8 tensor), wrapped in :class:`SeededSamples`; no batch augmentation (None is
    returned). Either way validation batches are normalised on the device
    (:func:`data.transforms.normalize_batch`), the same numbers as the seed's evaluation
    transform.
    """
    from data.datasets import build_dataset, default_img_size
    from data.transforms import BatchAugment, build_loading_transform, build_transform

    img_size = default_img_size(dataset) if img_size is None else img_size
    if img_size < 8:
        raise UserError(f"--img_size {img_size}: must be at least 8")
    if not 0.0 <= color_jitter <= 1.0:
        raise UserError(f"--color_jitter {color_jitter}: must be between 0 (none, the default) and 1")
    if augment not in AUGMENT_MODES:
        raise ValueError(f"augment must be one of {AUGMENT_MODES}, got {augment!r}")
    per_image = augment == "pil"
    train_transform = build_transform(True, img_size, color_jitter) if per_image else build_loading_transform(img_size)
    train = build_dataset(dataset, data_dir, "train", train_transform, skip_corrupt, seed)
    val = build_dataset(dataset, data_dir, "val", build_loading_transform(img_size), skip_corrupt, seed)
    if len(train) == 0 or len(val) == 0:
        raise UserError(f"--dataset {dataset}: the {'train' if len(train) == 0 else 'val'} split is empty")
    if per_image:
        return SeededSamples(train), val, img_size, None
    return train, val, img_size, BatchAugment(img_size, color_jitter)
