"""Decoded images held in memory or on disk, so that training reads and resizes every file once.

Training images are only resized per image (the augmentation runs per batch on the device,
see :class:`data.transforms.BatchAugment`), so what a data set yields for image ``i`` is the
same every epoch: a ``uint8`` tensor ``[3, s, s]``. :class:`ImageCache` keeps all of them in
one tensor and cuts batches out of it by index, which costs microseconds per batch instead
of decoding, resizing and collating every image again. The batches are the very tensors the
data loader would have built, so training gives the same numbers with or without the cache.
With ``--augment pil`` each training image is augmented as it is read (the seed's per-image
pipeline), different at every step, so only the validation images are cached.

``--cache disk`` keeps them in files instead (:class:`StoredImages`): one uint8 file per split,
memory-mapped, under ``--cache_dir`` (default ``.cache/images``), written once and read by later
runs and by every process; its name and key say what decides its bytes (data set, folder,
split, loading transform, split seed, and the size and time of every source file), so a changed
source folder is read again. Under ``torchrun`` one process per node decodes (data.loading),
into such a file in shared memory (``/dev/shm``) for the memory cache, which the node's other
processes map.

``--cache auto`` (the default) holds them in memory when the decoded images of both splits take
at most a quarter of the memory that is available (held once per node, however many processes
share it); else on disk when a disk cache is already written for both splits or they take at
most half of the cache folder's free space; else it reads the files every epoch.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from functools import cached_property
from math import prod
from pathlib import Path

import numpy as np
import psutil
import torch

from data.image_io import DECODING_VERSION
from utils import UserError

CACHE_MODES = ("auto", "on", "off", "disk")
# Where the images of a run go, in the order a job settles on one: the first any node chose.
CACHE_KINDS = ("off", "disk", "memory")
DEFAULT_CACHE_DIR = ".cache/images"
# The node's shared memory: under torchrun, where the memory cache is written once per node.
SHARED_MEMORY = Path("/dev/shm")
# --cache auto writes a disk cache that takes at most this share of the cache folder's free space.
AUTO_DISK_SHARE = 0.5
DISK_FORMAT = 1  # the layout of a cache folder; another value is never read
# On a GPU, the cached images move to the GPU when they take at most this share of its free memory.
GPU_MEMORY_SHARE = 0.25
# --cache auto uses at most this share of the available memory (all processes of a node together).
AUTO_MEMORY_SHARE = 0.25


def available_memory() -> int:
    """Bytes of memory available to new allocations without swapping (Linux: MemAvailable)."""
    return psutil.virtual_memory().available


def processes_on_node() -> int:
    """How many training processes share this machine (torchrun's LOCAL_WORLD_SIZE)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def should_cache(mode: str, needed_bytes: int, processes: int = 1, available: int | None = None) -> bool:
    """Whether to hold ``needed_bytes`` of decoded images in memory under ``--cache mode``,
    ``processes`` times (the cache is held once per node, so :func:`cache_kind` passes 1)."""
    if mode not in CACHE_MODES:
        raise ValueError(f"cache mode must be one of {CACHE_MODES}, got {mode!r}")
    if mode != "auto":
        return mode == "on"
    if available is None:
        return False
    return needed_bytes * processes <= AUTO_MEMORY_SHARE * available


def free_space(folder: str | os.PathLike) -> int | None:
    """Bytes free on the file system that holds ``folder`` (or will, once it is made)."""
    path = Path(folder).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def cache_kind(mode: str, needed_bytes: int, available: int | None = None, free_disk: int | None = None) -> str:
    """Where ``--cache mode`` holds ``needed_bytes`` of decoded images: "memory", "disk" or
    "off" (read the files every epoch). ``auto``: memory when :func:`should_cache`, else disk
    when they take at most :data:`AUTO_DISK_SHARE` of the ``free_disk`` bytes of the cache
    folder. (A disk cache already written is used where memory is short: data.loading checks.)"""
    if mode != "auto":
        should_cache(mode, needed_bytes)  # checks the mode
        return {"on": "memory"}.get(mode, mode)
    if should_cache(mode, needed_bytes, available=available):
        return "memory"
    return "disk" if free_disk is not None and needed_bytes <= AUTO_DISK_SHARE * free_disk else "off"


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
    def from_samples(cls, samples: Iterable, count: int,
                     allocate: Callable[[tuple], torch.Tensor] | None = None) -> "ImageCache | None":
        """Fill a cache from the data set's ``count`` samples in index order (``None`` for a
        skipped image). Returns None, leaving the data set to be read as usual, if a sample
        is not a uint8 image of the same shape as the first (images not resized to one size).
        ``allocate(shape)`` gives the uint8 tensor the images are written into (default: one
        in memory; :class:`StoredImages` gives a memory-mapped file)."""
        allocate = allocate or (lambda shape: torch.empty(shape, dtype=torch.uint8))
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
                images = allocate((count, *shape))
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


# ----------------------------------------------------------------------------- in files


class CacheFolderError(UserError):
    """A cache folder cannot take the images (not writable, no room): named by ``--cache_dir``."""


@contextmanager
def _writing(root: Path):
    """Turns an OSError while writing under ``root`` into a :class:`CacheFolderError`."""
    try:
        yield
    except OSError as err:
        raise CacheFolderError(f"--cache_dir {root}: cannot write the decoded images there ({err.strerror}); "
                               "give a writable folder with room for them, or --cache on or off") from None


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def source_files(dataset) -> list[tuple[str, object]]:
    """``(path, label)`` of the files a data set reads: its ``samples`` (the folder data
    sets), else the files of a torchvision ``root/base_folder`` (CIFAR's batches), else none
    (a data set made in memory, such as the synthetic one, which its name and options fix)."""
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        return [(str(path), label) for path, label in samples]
    base = getattr(dataset, "base_folder", None)
    if base and getattr(dataset, "root", None):
        return [(str(path), "") for path in sorted(Path(dataset.root, base).iterdir()) if path.is_file()]
    return []


def fingerprint(dataset, data_dir: str | os.PathLike | None) -> str:
    """sha256 of (path relative to ``data_dir``, label, size, mtime_ns) of every file the data
    set reads, in its order: a file added, removed, replaced or touched changes it."""
    digest = hashlib.sha256()
    base = os.path.abspath(os.path.expanduser(data_dir)) if data_dir else None
    for path, label in source_files(dataset):
        try:
            stat = os.stat(path)
            size, mtime = stat.st_size, stat.st_mtime_ns
        except OSError:
            size, mtime = -1, -1  # loading will say what is wrong with it
        where = os.path.relpath(path, base) if base else path
        digest.update(f"{where}\0{label}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _map(path: Path, shape: tuple) -> torch.Tensor:
    """The uint8 file at ``path`` as a tensor of ``shape``, memory-mapped copy-on-write."""
    if prod(shape) == 0:  # every image was skipped: no file
        return torch.empty(shape, dtype=torch.uint8)
    return torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c", shape=shape))


def _allocate(path: Path, shape: tuple, mapped: list) -> torch.Tensor:
    """A new uint8 file of ``shape`` at ``path``, its space reserved up front (a full disk is
    an error here, not a crash when a page is written), memory-mapped for writing."""
    with _writing(path.parent.parent), open(path, "xb") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, prod(shape))
        except OSError as err:
            raise OSError(err.errno, f"{err.strerror}; {prod(shape) / 2**30:.2f} GiB needed") from None
    mapped.append(np.memmap(path, dtype=np.uint8, mode="r+", shape=shape))
    return torch.from_numpy(mapped[-1])


def _remove_dead_builds(root: Path) -> None:
    """Folders of builds on this machine whose process is gone (killed while writing)."""
    for path in root.glob(f"*.partial-{socket.gethostname()}-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


class StoredImages:
    """One split's decoded images in ``root/name/``: ``images.u8`` (uint8 ``[N, C, H, W]``,
    memory-mapped), ``labels.pt`` (labels and which images loaded) and ``manifest.json``
    (format, key, count, shape, the identity in words), written last.

    ``identity`` names what decides the bytes besides the source files, whose
    ``fingerprint()`` is taken only when the key is needed. A build is written to a
    ``.partial-<host>-<pid>`` folder and renamed into place when complete, so a build that
    fails or is killed is never read (a later build on the machine removes what a killed one
    left); a new build first removes an older folder (its readers keep their mapping)."""

    def __init__(self, root: str | os.PathLike, name: str, identity: dict, fingerprint: Callable[[], str] = str,
                 allow_skipped: bool = False) -> None:
        self.root = Path(root).expanduser()
        self.folder = self.root / name
        self.identity, self._fingerprint, self.allow_skipped = identity, fingerprint, allow_skipped

    @cached_property
    def key(self) -> str:
        return _digest({"format": DISK_FORMAT, "decoding": DECODING_VERSION, "identity": self.identity,
                        "source files": self._fingerprint()})

    def manifest(self) -> dict | None:
        try:
            manifest = json.loads((self.folder / "manifest.json").read_text())
        except (OSError, ValueError):
            return None
        return manifest if isinstance(manifest, dict) and manifest.get("format") == DISK_FORMAT else None

    def complete(self) -> bool:
        """Written for these sources (with no skipped image, unless skipping is allowed)."""
        manifest = self.manifest()
        return (manifest is not None and manifest.get("key") == self.key
                and (self.allow_skipped or manifest.get("skipped") == 0))

    def open(self, check: bool = True) -> ImageCache | None:
        """The images, memory-mapped; None when not :meth:`complete` (``check=False``: when
        there is no folder, for a process that waited for its node's builder)."""
        manifest = self.manifest()
        if manifest is None or (check and not self.complete()):
            return None
        index = torch.load(self.folder / "labels.pt", weights_only=True)
        shape = (manifest["count"], *manifest["shape"])
        return ImageCache(_map(self.folder / "images.u8", shape), index["labels"], index["loaded"])

    def build(self, fill: Callable[[Callable], ImageCache | None]) -> ImageCache | None:
        """Write the images ``fill(allocate)`` reads (:meth:`ImageCache.from_samples`) and map
        them; None when they cannot be cached. What the folder held before (not
        :meth:`complete`, or this would not be called) is removed first, whatever happens."""
        scratch = self.folder.with_name(f"{self.folder.name}.partial-{socket.gethostname()}-{os.getpid()}")
        mapped: list = []
        try:
            self.remove()
            with _writing(self.root):
                scratch.mkdir(parents=True)
                _remove_dead_builds(self.root)
            cache = fill(lambda shape: _allocate(scratch / "images.u8", shape, mapped))
            if cache is None:
                return None
            with _writing(self.root):
                self._finish(scratch, cache, mapped)
                self._publish(scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return self.open(check=False)

    def _finish(self, scratch: Path, cache: ImageCache, mapped: list) -> None:
        for array in mapped:
            array.flush()
        torch.save({"labels": cache.labels, "loaded": cache.loaded}, scratch / "labels.pt")
        manifest = {"format": DISK_FORMAT, "key": self.key, "count": len(cache), "shape": list(cache.images.shape[1:]),
                    "skipped": int((~cache.loaded).sum()), "identity": self.identity}
        (scratch / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))

    def _publish(self, scratch: Path) -> None:
        try:
            os.rename(scratch, self.folder)
        except OSError:
            if not self.complete():  # not another run's copy of the same images
                raise

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def stored_split(root: str | os.PathLike, dataset, split: str, settings, job: str = "") -> StoredImages:
    """Where ``split`` of ``dataset`` goes under ``root``: a folder named by the data set,
    split and a hash of its identity (``settings``' dataset, data_dir resolved and seed, the
    data set's type, length and loading transform, and ``job``, which makes a job's own
    folder), keyed also by the source files' :func:`fingerprint`."""
    data_dir = str(Path(settings.data_dir).expanduser().resolve()) if settings.data_dir else None
    identity = {"dataset": settings.dataset, "data_dir": data_dir, "split": split, "seed": settings.seed,
                "type": type(dataset).__qualname__, "count": len(dataset),
                "transform": repr(getattr(dataset, "transform", None)), "job": job}
    label = "".join(c if c.isalnum() or c in "._" else "_" for c in settings.dataset or type(dataset).__name__)[:40]
    name = "-".join(part for part in (label, split, job, _digest(identity)[:16]) if part)
    return StoredImages(root, name, identity, lambda: fingerprint(dataset, settings.data_dir),
                        allow_skipped=bool(getattr(dataset, "skip_corrupt", False)))
