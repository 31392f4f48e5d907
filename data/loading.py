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

import datetime
import functools
import math
import os
import threading
import time
from queue import Full, Queue
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
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


def collate_batch(batch: Sequence, combine: Callable | None = None):
    """``(images, labels, dropped)``: the samples that loaded, combined by ``combine``
    (default: torch's ``default_collate``, which stacks them), and how many were None
    (corrupt images skipped with --skip_corrupt); a :class:`LoadFailure` passes through."""
    from torch.utils.data import default_collate

    failure = next((sample for sample in batch if isinstance(sample, LoadFailure)), None)
    if failure is not None:
        return failure
    kept = [sample for sample in batch if sample is not None]
    dropped = len(batch) - len(kept)
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), dropped
    images, labels = (combine or default_collate)(kept)
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


def fill_cache(dataset: Dataset, workers: int, desc: str, show: bool, stop_requested: Callable[[], bool],
               allocate: Callable | None = None):
    """Read every sample of ``dataset`` once (with ``workers`` loading processes) into an
    :class:`data.cache.ImageCache` (its images in ``allocate(shape)``'s tensor, default one in
    memory); None if its samples cannot be cached. Raises :class:`Interrupted` when
    ``stop_requested()`` turns true on the way."""
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

    return ImageCache.from_samples(samples(), len(dataset), allocate)


@dataclass
class CachePlan:
    """Where a job holds the decoded images (``kind``: a :data:`data.cache.CACHE_KINDS`) and,
    split name -> :class:`data.cache.StoredImages`, their places in ``--cache_dir``."""

    kind: str = "off"
    stored: dict = field(default_factory=dict)


def choose_kind(splits: Mapping[str, Dataset], stored: Mapping, settings, announce: Callable[[str], None]) -> str:
    """What ``settings.cache`` asks for ``splits`` on this node: off when the samples are not
    uint8 images of one size, else :func:`data.cache.cache_kind` of their size, except that a
    disk cache already written for every split is used by ``disk`` (without decoding even a
    probe) and by ``auto`` where memory is short (whatever the free space)."""
    from data.cache import available_memory, cache_kind, cacheable, free_space

    mode = settings.cache
    if mode == "disk" and all(entry.complete() for entry in stored.values()):
        return "disk"
    probes = [first_sample(data) for data in splits.values()]
    if not all(probe is None or cacheable(probe) for probe in probes):
        if mode != "auto":
            announce(f"--cache {mode}: the data set does not yield uint8 images of one size; reading it every epoch")
        return "off"
    needed = sum(len(data) * probe[0].numel() for data, probe in zip(splits.values(), probes) if probe is not None)
    kind = cache_kind(mode, needed, available_memory(), free_space(settings.cache_dir))
    return "disk" if kind == "off" and mode == "auto" and all(entry.complete() for entry in stored.values()) else kind


def cache_wanted(splits: Mapping[str, Dataset], settings, process, announce: Callable[[str], None]) -> CachePlan:
    """The job's :class:`CachePlan` under ``settings.cache``: each node's first process
    (``process``: an :class:`engine.processes.ProcessInfo`) chooses (:func:`choose_kind`), and
    the job takes the first of :data:`data.cache.CACHE_KINDS` any node chose. Every process
    of the job calls it."""
    from data.cache import CACHE_KINDS, stored_split

    if settings.cache == "off":
        return CachePlan()
    stored = {name: stored_split(settings.cache_dir, data, name, settings) for name, data in splits.items()}
    choice = len(CACHE_KINDS)  # the node's other processes leave the choice to its first
    if process.local_rank == 0:
        choice = CACHE_KINDS.index(choose_kind(splits, stored, settings, announce))
    agreed = int(process.all_reduce([float(choice)], op=dist.ReduceOp.MIN)[0])
    return CachePlan(CACHE_KINDS[agreed], stored)


@dataclass(frozen=True)
class Waiting:
    """The processes of a job as they wait for the first of their node to decode: its rank and
    local rank, and a gloo group of all of them whose timeout outlasts any decoding (the
    training's own group may give up sooner: NCCL's default is 10 minutes; ImageNet takes
    longer). ``all_reduce`` as :meth:`engine.processes.ProcessInfo.all_reduce`."""

    rank: int = 0
    local_rank: int = 0
    group: object = None  # None: a single process

    @classmethod
    def of(cls, process) -> "Waiting":
        """Every process of the job calls it (making the group is collective)."""
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=1)) if process.distributed else None
        return cls(process.rank, process.local_rank, group)

    def all_reduce(self, values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
        if self.group is None:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, op=op, group=self.group)
        return tensor.tolist()


def settle(work: Callable | None, process):
    """``work()`` where given (None: this process only waits), then every process of the job
    learns whether it went well everywhere, so that none waits for one that gave up: a
    failure elsewhere raises here too (:class:`Interrupted` for a stop request, else a
    :class:`UserError` pointing at the other process's error). Returns what ``work`` did."""
    status, failure, result = 2.0, None, None
    if work is not None:
        try:
            result = work()
        except Interrupted as err:
            status, failure = 1.0, err
        except BaseException as err:  # noqa: BLE001 - raised again once the others know
            status, failure = 0.0, err
    worst = process.all_reduce([status], op=dist.ReduceOp.MIN)[0]
    if failure is not None:
        raise failure
    if worst == 1.0:
        raise Interrupted
    if worst == 0.0:
        raise UserError("another process of this run failed while caching the images; its error says why")
    return result


def node_caches(build: Callable[[], dict], follow: Callable[[], dict], process, phases: Sequence[Callable]) -> dict:
    """The caches of a node: in each phase, the processes ``phases[i](process)`` names (and
    that have none yet) ``build()`` them (or open what is there) while the others wait; then
    each process that built nothing maps what its node's builder wrote (``follow()``)."""
    caches = None
    for builds_here in phases:
        built = settle(build if caches is None and builds_here(process) else None, process)
        caches = built if built is not None else caches
    return caches if caches is not None else follow()


def open_or_build(places: Sequence, fill: Callable, fallback: Callable[[str], None] | None = None):
    """A split's images: mapped from the first of ``places`` (:class:`data.cache.StoredImages`)
    that holds them, else written by ``fill`` into the first whose folder takes them. When
    none does, ``fallback`` (--cache auto) is told and None returned (the files are read every
    epoch); without one, the folder's error is raised."""
    from data.cache import CacheFolderError

    for entry in places:
        cache = entry.open()
        if cache is not None:
            return cache
    failure = None
    for entry in places:
        try:
            return entry.build(fill)
        except CacheFolderError as err:
            failure = err
    if fallback is None:
        raise failure
    fallback(f"--cache auto: {failure}; reading the files every epoch")
    return None


def shared_memory_caches(splits: Mapping[str, Dataset], fills: Mapping[str, Callable], settings, process: Waiting,
                         fallback: Callable[[str], None] | None) -> dict:
    """The memory cache under torchrun: each node's first process decodes each split into a
    file of this job's in shared memory (``/dev/shm``; ``--cache_dir`` when that is missing or
    has no room), the node's other processes map it, and once all have mapped it the file is
    removed (the mappings stay valid), so nothing is left behind."""
    import random

    from data.cache import SHARED_MEMORY, stored_split

    token = int(process.all_reduce([float(random.getrandbits(48)) if process.rank == 0 else 0.0])[0])
    job = f"job{token:012x}-node{process.rank - process.local_rank}"
    roots = [SHARED_MEMORY / "transferability-images"] if SHARED_MEMORY.is_dir() else []
    roots.append(Path(settings.cache_dir))
    places = {name: [stored_split(root, data, name, settings, job) for root in roots] for name, data in splits.items()}

    def follow() -> dict:
        return {name: next((c for c in (entry.open(check=False) for entry in entries) if c is not None), None)
                for name, entries in places.items()}

    try:
        return node_caches(lambda: {name: open_or_build(entries, fills[name], fallback)
                                    for name, entries in places.items()},
                           follow, process, [lambda p: p.local_rank == 0])
    finally:
        settle(None, process)  # every process of the node has mapped the files
        if process.local_rank == 0:
            for entry in (entry for entries in places.values() for entry in entries):
                entry.remove()


def cache_splits(splits: Mapping[str, Dataset], plan: CachePlan, settings, process, show: bool,
                 stop_requested: Callable[[], bool], announce: Callable[[str], None], per_sample: bool) -> dict:
    """Each split read once into the cache ``plan`` chose (split name -> ImageCache), or {}
    when one of them cannot be cached (or the plan is off). Every process of the job calls
    it: in memory, each process alone (one process) or one per node (:func:`shared_memory_caches`);
    on disk, the job's first process opens or writes the files, then the first process of
    each other node (which finds them there when --cache_dir is shared), then the rest map them."""
    from data.cache import processes_on_node

    if plan.kind == "off":
        return {}
    tick = time.perf_counter()
    workers = settings.workers * (processes_on_node() if process.distributed else 1)  # the node's others wait
    fills = {name: functools.partial(fill_cache, data, workers, f"  caching {name} images", show, stop_requested)
             for name, data in splits.items()}
    fallback = announce if settings.cache == "auto" else None
    if plan.kind == "memory" and not process.distributed:
        caches = {name: fill() for name, fill in fills.items()}
    elif plan.kind == "memory":
        caches = shared_memory_caches(splits, fills, settings, Waiting.of(process), fallback)
    else:
        first_of_job, first_of_other_nodes = (lambda p: p.rank == 0), (lambda p: p.local_rank == 0 and p.rank != 0)
        caches = node_caches(lambda: {name: open_or_build([entry], fills[name], fallback)
                                      for name, entry in plan.stored.items()},
                             lambda: {name: entry.open(check=False) for name, entry in plan.stored.items()},
                             Waiting.of(process), [first_of_job, first_of_other_nodes])
    if any(cache is None for cache in caches.values()):
        return {}
    announce(cache_line(splits, caches, plan.kind, settings.cache_dir, time.perf_counter() - tick, per_sample))
    return caches


def cache_line(splits: Mapping[str, Dataset], caches: Mapping, kind: str, cache_dir: str, seconds: float,
               per_sample: bool) -> str:
    """What :func:`cache_splits` tells: how many readable images of each split it holds
    (those skipped as corrupt are not held), where, and what --cache off would do instead."""
    from data.datasets import reads_files

    held = " and ".join(f"{int(caches[name].loaded.sum())} {name}" for name in splits)
    where = f"in {cache_dir} (memory-mapped)" if kind == "disk" else "in memory"
    instead = ("reads the files every epoch" if all(reads_files(data) for data in splits.values())
               else "prepares them again every epoch")
    return (f"holding the {held} images {where} ({sum(c.nbytes for c in caches.values()) / 2**20:.0f} MiB, "
            f"ready in {seconds:.1f} s; --cache off {instead}"
            + ("; --augment pil reads and augments the training images at every step)" if per_sample else ")"))


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
    collate = getattr(dataset, "collate", collate_batch)  # data.device_decode.DeviceDecoded has its own
    return DataLoader(ReportingFailures(dataset), sampler=sampler, batch_size=batch_size, num_workers=workers,
                      pin_memory=pin_memory, persistent_workers=workers > 0, collate_fn=collate,
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
                    skip_corrupt: bool, seed: int, augment: str = "batch",
                    decode: str = "loader") -> tuple[Dataset, Dataset, int, Callable | None]:
    """Both splits of ``dataset``, the image size, and the training augmentation.

    ``augment="batch"``: images of both splits are only resized per image (uint8); the
    seed's augmentation then runs on whole training batches on the device
    (:class:`data.transforms.BatchAugment`, returned). ``augment="pil"``: the training split
    runs the seed's per-image pipeline (:func:`data.transforms.build_transform` with
    ``train=True``) on each image as the data set gives it (a PIL image; the synthetic data
    set's uint8 tensor), wrapped in :class:`SeededSamples`; no batch augmentation (None is
    returned). Either way validation batches are normalised on the device
    (:func:`data.transforms.normalize_batch`), the same numbers as the seed's evaluation
    transform. ``decode="device"`` (with ``augment="batch"``): the files' JPEGs are decoded
    and resized on the training device instead (:mod:`data.device_decode`).
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
    per_image, on_device = augment == "pil", decode == "device"
    if per_image and on_device:
        raise UserError("--decode device: --augment pil transforms each image while loading, before the device "
                        "sees it; use --augment batch (the default) or --decode loader")
    if on_device:  # the data sets give the files' images as they are; data.device_decode reads the JPEGs
        train_transform = val_transform = None
    else:
        train_transform = (build_transform(True, img_size, color_jitter) if per_image
                           else build_loading_transform(img_size))
        val_transform = build_loading_transform(img_size)
    train = build_dataset(dataset, data_dir, "train", train_transform, skip_corrupt, seed)
    val = build_dataset(dataset, data_dir, "val", val_transform, skip_corrupt, seed)
    if on_device:
        from data.device_decode import device_decoded

        train, val = (device_decoded(split, img_size, dataset) for split in (train, val))
    if len(train) == 0 or len(val) == 0:
        raise UserError(f"--dataset {dataset}: the {'train' if len(train) == 0 else 'val'} split is empty")
    if per_image:
        return SeededSamples(train), val, img_size, None
    return train, val, img_size, BatchAugment(img_size, color_jitter)

