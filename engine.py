"""The one training loop that pre-training and fine-tuning share.

SGD with momentum and cross-entropy, validation after every epoch, the best-validation
weights kept: the paper's recipe. Around it: DistributedDataParallel under ``torchrun``
(NCCL on GPUs, gloo on CPUs; only rank 0 prints and writes), mixed precision,
channels-last, ``torch.compile``, and exact resumption.

Exact resumption. Per image, data loading only decodes and resizes (no randomness); each
batch's augmentation runs in the training process, drawn from a generator seeded by
(seed, epoch, step), and the sample order of an epoch by (seed, epoch), so neither depends
on the number of workers or on where a run was stopped. With ``--augment pil`` the seed's
per-image transforms run while loading instead, each sample's with torch's RNG seeded by
(seed, epoch, the sample's position in the epoch) (:class:`SeededSamples`): the same
independence. A checkpoint holds
everything else (weights, optimizer, scheduler, scaler, RNG states, the position inside the
epoch, the history). A run resumed from any checkpoint therefore ends with the same weights,
bit for bit on the CPU, as a run that was never stopped.

Files of a run whose best weights go to ``OUT.pth``: ``OUT.pth`` (plain state dict, written
on improvement), ``OUT.last.pth`` (full checkpoint, every epoch and on SIGTERM/SIGINT) and
``OUT.log.jsonl`` (one JSON object per epoch). All are written atomically.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from utils import UserError, check_writable, resolve_device, save_state_dict, write_atomically

CHECKPOINT_FORMAT = "transferability-train-1"


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Processes:
    """Where this process stands in a (possibly single-process) run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_processes(device_name: str) -> Processes:
    """Join the process group when started by ``torchrun`` (RANK/WORLD_SIZE set)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if world_size > 1 else (device.index or 0))
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fastest convolution algorithms for fixed input sizes
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(rank, world_size, local_rank, device)


def close_processes(procs: Processes) -> None:
    if procs.distributed and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- data order and seeds


_MASK64 = (1 << 64) - 1


def step_seed(seed: int, epoch: int, step: int) -> int:
    """A 63-bit seed for one training step's augmentation, from (run seed, epoch, step):
    the three are combined and scrambled with the SplitMix64 finaliser."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xD1B54A32D192ED03 + step * 0x8CB92BA72F3D8DD7 + 0x2545F4914F6CDD1D) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


class EpochSampler(Sampler):
    """Yields this rank's share of the epoch's sample indices.

    The order is a permutation seeded by (seed, epoch), padded (training) so every rank
    gets the same number of samples, as DistributedSampler does; ``skip`` drops the first
    samples of this rank's share (resuming inside an epoch). Without shuffling (validation)
    the shares are ``index % world_size == rank`` with no padding, so every sample is
    counted exactly once.

    With ``sample_seeds`` it yields ``(index, seed)`` pairs for :class:`SeededSamples`: the
    seed is :func:`step_seed` of (seed, epoch, the sample's position in the whole epoch's
    order, across all ranks), so it does not depend on the number of processes or workers,
    nor on ``skip``.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 sample_seeds: bool = False) -> None:
        self.size, self.seed, self.rank, self.world_size, self.shuffle = size, seed, rank, world_size, shuffle
        self.sample_seeds = sample_seeds
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _indices(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.rank, self.size, self.world_size))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        per_rank = math.ceil(self.size / self.world_size)
        order += order[: per_rank * self.world_size - self.size]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator:
        indices = self._indices()
        if not self.sample_seeds:
            return iter(indices[self.skip :])
        # this rank's i-th sample is at position rank + i * world_size of the epoch's order
        return ((index, step_seed(self.seed, self.epoch, self.rank + position * self.world_size))
                for position, index in enumerate(indices) if position >= self.skip)

    def __len__(self) -> int:
        return len(self._indices()) - self.skip


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
    from data import collate_skip_none

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
    sampler, batch size and :func:`collate_batch`, without reading a file."""

    def __init__(self, cache, sampler: Sampler, batch_size: int, pin_memory: bool) -> None:
        self.cache, self.sampler, self.batch_size, self.pin_memory = cache, sampler, batch_size, pin_memory

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self):
        indices = list(self.sampler)
        for start in range(0, len(indices), self.batch_size):
            images, labels, skipped = self.cache.batch(indices[start:start + self.batch_size])
            if self.pin_memory:
                images, labels = images.pin_memory(), labels.pin_memory()
            yield images, labels, skipped


class _Interrupted(Exception):
    """A stop signal arrived while the images were being cached."""


def first_sample(dataset: Dataset):
    """The first sample that loads (None if every one was skipped as corrupt)."""
    for index in range(len(dataset)):
        sample = dataset[index]
        if sample is not None:
            return sample
    return None


def fill_cache(dataset: Dataset, workers: int, desc: str, show: bool, stop: "_StopRequests"):
    """Read every sample of ``dataset`` once (with ``workers`` loading processes) into an
    :class:`data.cache.ImageCache`; None if its samples cannot be cached."""
    from data.cache import ImageCache

    loader = DataLoader(ReportingFailures(dataset), batch_size=64, num_workers=workers, collate_fn=list)

    def samples():
        for chunk in tqdm(loader, desc=desc, leave=False, disable=not show or None):
            if stop.signum:
                raise _Interrupted
            for sample in chunk:
                if isinstance(sample, LoadFailure):
                    raise UserError(sample.message)
                yield sample

    return ImageCache.from_samples(samples(), len(dataset))


# --------------------------------------------------------------------------- settings


@dataclass
class TrainSettings:
    """What the loop needs from a script's arguments."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    momentum: float = 0.9
    norm_weight_decay: float | None = None  # for normalisation layers' parameters; None: weight_decay
    schedule: str = "cosine"  # "cosine" or "step"
    step_size: int = 40
    gamma: float = 0.1
    seed: int = 0
    workers: int = 2
    amp: str = "off"  # "off", "bf16", "fp16"
    channels_last: bool = True
    compile: bool = False
    sync_bn: bool = False
    cache: str = "auto"  # decoded images in memory: "auto", "on", "off" (data.cache)
    label: str = "train"
    args: dict = field(default_factory=dict)  # the script's arguments, stored in checkpoints


_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def parameter_groups(model: nn.Module, settings: TrainSettings) -> list[dict]:
    """The optimizer's parameter groups: every parameter with ``settings.weight_decay`` (the
    seed's recipe), or, with ``settings.norm_weight_decay``, the normalisation layers'
    parameters in a group of their own with that decay."""
    if settings.norm_weight_decay is None:
        return [{"params": list(model.parameters())}]
    norm = {id(p) for module in model.modules() if isinstance(module, _NORMS) for p in module.parameters(recurse=False)}
    others = [p for p in model.parameters() if id(p) not in norm]
    norms = [p for p in model.parameters() if id(p) in norm]
    return [{"params": others}, {"params": norms, "weight_decay": settings.norm_weight_decay}]


def add_training_arguments(parser, *, epochs: int, batch_size: int, lr: float) -> None:
    """The flags both scripts share, with each script's defaults."""
    parser.add_argument("--max_epoch", type=int, default=epochs, help="epochs (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=batch_size,
                        help="images per step and process (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=lr, help="initial learning rate (default: %(default)s)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: %(default)s)")
    parser.add_argument("--weight_decay", type=float, default=1e-4, help="(default: %(default)s)")
    parser.add_argument("--norm_weight_decay", type=float, metavar="WD",
                        help="weight decay of the normalisation layers' scales and shifts (BatchNorm, "
                        "LayerNorm, GroupNorm), as torchvision's reference scripts offer (default: "
                        "--weight_decay, every parameter decayed alike, as the seed does)")
    parser.add_argument("--seed", type=int, default=0, help="seeds initialisation, data order and augmentation")
    parser.add_argument("--color_jitter", type=float, default=0.0, metavar="S",
                        help="colour jitter of strength S in [0, 1]: brightness, contrast and saturation "
                        "factors drawn from [1-S, 1+S] (default: 0, none, as the seed's argument-less "
                        "ColorJitter(), which is the identity)")
    parser.add_argument("--augment", choices=["batch", "pil"], default="batch",
                        help="where the training augmentation runs: batch (default) resizes each image once "
                        "and crops, flips (and jitters) whole batches on the training device; pil runs the "
                        "seed's per-image torchvision pipeline while loading (Resize, RandomResizedCrop, "
                        "RandomHorizontalFlip, [ColorJitter], ToTensor, Normalize) on the PIL image, or on "
                        "the uint8 tensor the synthetic data set gives; the same distributions, and the "
                        "seed's uint8 rounding of each crop. pil reads every training image at every "
                        "epoch: --cache on is refused and auto caches the validation images only")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--workers", type=int,
                        help="data-loading processes per training process (default: 0 when training on "
                        "the CPU, whose cores the model already uses; min(8, CPU cores / GPUs) on GPUs)")
    parser.add_argument("--cache", choices=["auto", "on", "off"], default="auto",
                        help="hold the decoded, resized images in memory after reading them once (default: "
                        "auto, when both splits take at most a quarter of the available memory; same results; "
                        "with --augment pil only the validation images)")
    parser.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off",
                        help="mixed precision (default: off, which keeps fp32 results)")
    parser.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True,
                        help="channels-last memory layout (default: on; same maths, faster convolutions)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--sync_bn", action="store_true", help="synchronise BatchNorm across processes")
    parser.add_argument("--resume", metavar="PATH", help="continue from a checkpoint (the run's .last.pth)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--skip_corrupt", action="store_true",
                        help="skip (and count) unreadable images instead of stopping")


# --------------------------------------------------------------------------- outputs


def default_workers(device: torch.device) -> int:
    """Data-loading processes per training process when --workers is not given.

    On the CPU the model's own threads use every core, and loading in other processes only
    competes with them (measured by bench/bench_training.py). On GPUs the cores are free
    for loading: up to 8 per GPU of this node.
    """
    if device.type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 1) // max(torch.cuda.device_count(), 1)))


def run_files(best_path: str | os.PathLike) -> tuple[Path, Path, Path]:
    """``OUT.pth`` -> (``OUT.pth``, ``OUT.last.pth``, ``OUT.log.jsonl``)."""
    best = Path(best_path)
    stem = best.with_suffix("") if best.suffix else best
    return best, stem.with_name(stem.name + ".last.pth"), stem.with_name(stem.name + ".log.jsonl")


def check_outputs(outputs: Mapping[Path, str], overwrite: bool, resume: bool) -> None:
    """Refuse to replace a file unless --overwrite or --resume; fail early on unwritable
    paths. ``outputs`` maps each file to the flag that names it."""
    for path, flag in outputs.items():
        check_writable(path, flag)
        if path.exists() and not (overwrite or resume):
            raise UserError(f"{flag} {path}: exists; pass --overwrite to replace it or --resume to continue its run")


def _rng_state() -> dict:
    keys, pos, has_gauss, cached = np.random.get_state()[1:]
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": list(random.getstate()[1]),
    }


def _set_rng_state(state: Mapping) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached"]))
    random.setstate((3, tuple(state["python"]), None))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A training checkpoint written by :func:`fit`, read with ``weights_only=True``."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--resume {path}: no such file; give the run's .last.pth checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to read is the user's file
        raise UserError(f"--resume {path}: not a readable training checkpoint ({str(err).splitlines()[0][:120]})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"--resume {path}: not a training checkpoint of this project (no '{CHECKPOINT_FORMAT}' "
                        "format tag); give the run's .last.pth file")
    return checkpoint


# ------------------------------------------------------------------------- the loop


class _StopRequests:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "_StopRequests":
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


@dataclass
class FitResult:
    best_acc: float
    best_epoch: int
    history: list[dict]
    stopped_by: int = 0  # the signal number when SIGTERM/SIGINT ended the run early


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DistributedDataParallel
    return getattr(model, "_orig_mod", model)  # torch.compile


def _state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies in the standard (contiguous) layout, whatever the model's memory format."""
    return {k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
            for k, v in _unwrap(model).state_dict().items()}


def _fresh_stats() -> dict:
    return {"loss": 0.0, "correct": 0, "seen": 0, "skipped": 0, "time": 0.0}


def fit(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    settings: TrainSettings,
    procs: Processes,
    best_path: str | os.PathLike,
    resume: Mapping | None = None,
    announce: Callable[[str], None] | None = None,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
) -> FitResult:
    """Train ``model`` and keep its best-validation weights at ``best_path``.

    ``resume`` is a checkpoint from :func:`load_checkpoint`. ``augment`` (e.g.
    :class:`data.transforms.BatchAugment`) turns each training batch, on the device, into the
    model's input, with random numbers from a generator seeded by (seed, epoch, step). A
    ``train_set`` wrapped in :class:`SeededSamples` augments each sample while loading
    instead (``--augment pil``; then ``augment`` is None), seeded by the sample's position.
    Raises :class:`UserError` when the loss becomes NaN/Inf (the files of the last good epoch
    are left as they were).
    """
    from data.transforms import normalize_batch

    best_path, last_path, log_path = run_files(best_path)
    say = announce or (lambda text: print(text, flush=True))
    say = say if procs.is_main else (lambda text: None)
    device = procs.device

    if settings.sync_bn and procs.distributed:
        if device.type != "cuda":
            raise UserError("--sync_bn: PyTorch's SyncBatchNorm runs on CUDA devices only; drop it on the CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(parameter_groups(model, settings), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    if settings.schedule == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, settings.step_size, settings.gamma)
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(settings.epochs, 1))
    use_scaler = settings.amp == "fp16"
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.amp)

    start_epoch, start_step, best_acc, best_epoch, history = 0, 0, -1.0, -1, []
    if resume is not None:
        _unwrap(model).load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if use_scaler and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        start_epoch, start_step = resume["epoch"], resume["step"]
        best_acc, best_epoch, history = resume["best_acc"], resume["best_epoch"], list(resume["history"])
        _set_rng_state(resume["rng"])
        say(f"resumed at epoch {start_epoch + 1} step {start_step} (best val acc {best_acc:.2f}%)")

    train_model = model
    if procs.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if settings.compile:
        train_model = torch.compile(train_model)

    # --augment pil: the training set augments per sample, seeded by the sample's position
    per_sample = isinstance(train_set, SeededSamples)
    train_sampler = EpochSampler(len(train_set), settings.seed, procs.rank, procs.world_size, shuffle=True,
                                 sample_seeds=per_sample)
    val_sampler = EpochSampler(len(val_set), settings.seed, procs.rank, procs.world_size, shuffle=False)
    pin_memory = device.type == "cuda"

    def make_loaders(stop: _StopRequests):
        """The training and validation batches: cut out of the decoded images in memory
        when --cache allows (:mod:`data.cache`), else read by DataLoaders. A training set
        augmented per sample (--augment pil) is never cached: its images differ at every step."""
        from data.cache import available_memory, cacheable, processes_on_node, should_cache

        splits = {"validation": val_set} if per_sample else {"training": train_set, "validation": val_set}
        cached = {}
        if settings.cache != "off":
            probes = [first_sample(data) for data in splits.values()]
            uniform = all(probe is None or cacheable(probe) for probe in probes)
            needed = sum(len(data) * probe[0].numel() for data, probe in zip(splits.values(), probes)
                         if probe is not None)
            chosen = uniform and should_cache(settings.cache, needed, processes_on_node(), available_memory())
            if settings.cache == "on" and not uniform:
                say("--cache on: the data set does not yield uint8 images of one size; reading it every epoch")
            if all_reduce([float(chosen)], op=dist.ReduceOp.MIN)[0]:
                tick = time.perf_counter()
                caches = [fill_cache(data, settings.workers, f"  caching {name} images", procs.is_main, stop)
                          for name, data in splits.items()]
                if all(cache is not None for cache in caches):
                    cached = dict(zip(splits, caches))
                    held = " and ".join(f"{len(data)} {name}" for name, data in splits.items())
                    say(f"holding the {held} images in memory ({sum(c.nbytes for c in caches) / 2**20:.0f} MiB, "
                        f"read in {time.perf_counter() - tick:.1f} s; --cache off reads the files every epoch"
                        + ("; --augment pil reads and augments the training images at every step)" if per_sample
                           else ")"))
        # A private generator keeps the loaders from drawing on the global RNG.
        options = dict(batch_size=settings.batch_size, num_workers=settings.workers, pin_memory=pin_memory,
                       persistent_workers=settings.workers > 0, collate_fn=collate_batch,
                       generator=torch.Generator().manual_seed(settings.seed))
        if "training" in cached:
            train_loader = CachedLoader(cached["training"], train_sampler, settings.batch_size, pin_memory)
        else:
            train_loader = DataLoader(ReportingFailures(train_set), sampler=train_sampler, drop_last=False, **options)
        if "validation" in cached:
            val_loader = CachedLoader(cached["validation"], val_sampler, settings.batch_size, pin_memory)
        else:
            val_loader = DataLoader(ReportingFailures(val_set), sampler=val_sampler, **options)
        return train_loader, val_loader

    def to_device(images: torch.Tensor, labels: torch.Tensor,
                  augment_seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(device, non_blocking=True)
        if augment_seed is not None:
            images = augment(images, torch.Generator().manual_seed(augment_seed))
        elif images.dtype == torch.uint8:  # validation images, resized only
            images = normalize_batch(images)
        if settings.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.to(device, non_blocking=True)

    def all_reduce(values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
        if not procs.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=op)
        return tensor.tolist()

    def checkpoint(epoch: int, step: int, partial_stats: dict) -> dict:
        return {
            "format": CHECKPOINT_FORMAT, "model": _state_dict(model), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if use_scaler else None,
            "epoch": epoch, "step": step, "best_acc": best_acc, "best_epoch": best_epoch,
            "history": history, "partial": partial_stats, "rng": _rng_state(), "args": settings.args,
        }

    def write_checkpoint(state: dict) -> None:
        write_atomically(last_path, lambda handle: torch.save(state, handle))
        text = "".join(json.dumps(entry) + "\n" for entry in history)
        write_atomically(log_path, lambda handle: handle.write(text), mode="w")

    @torch.no_grad()
    def evaluate() -> tuple[float, float]:
        model.eval()
        loss_sum, correct, seen = 0.0, 0, 0
        for batch in tqdm(val_loader, desc="  val", leave=False, disable=not procs.is_main or None):
            images, labels, _ = unpack_batch(batch)
            if not len(labels):
                continue
            images, labels = to_device(images, labels)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(images)
            loss_sum += nn.functional.cross_entropy(logits.float(), labels, reduction="sum").item()
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
        loss_sum, correct, seen = all_reduce([loss_sum, correct, seen])
        return loss_sum / max(seen, 1), 100.0 * correct / max(seen, 1)

    stopped_by = 0
    with _StopRequests() as stop:
        try:
            train_loader, val_loader = make_loaders(stop)
        except _Interrupted:
            say(f"stopped by signal {stop.signum} while reading the images; the run's files are as they were")
            return FitResult(best_acc, best_epoch, history, stop.signum)
        epochs = tqdm(range(start_epoch, settings.epochs), desc=settings.label, initial=start_epoch,
                      total=settings.epochs, disable=not procs.is_main or None)
        for epoch in epochs:
            skip = start_step * settings.batch_size if epoch == start_epoch else 0
            train_sampler.set_epoch(epoch, skip)
            step = start_step if epoch == start_epoch else 0
            resuming_inside = resume is not None and epoch == start_epoch and start_step > 0
            stats = dict(resume["partial"]) if resuming_inside else _fresh_stats()
            model.train()
            tick = time.perf_counter()
            batches = tqdm(train_loader, desc=f"  epoch {epoch + 1}", leave=False, disable=not procs.is_main or None)
            for batch in batches:
                images, labels, skipped = unpack_batch(batch)
                stats["skipped"] += skipped
                if len(labels):
                    seed = step_seed(settings.seed, epoch, step) if augment is not None else None
                    images, labels = to_device(images, labels, seed)
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        logits = train_model(images)
                        loss = nn.functional.cross_entropy(logits.float(), labels)
                    loss_value = loss.item()
                else:  # every image of this batch was skipped as corrupt
                    logits, loss, loss_value = None, None, 0.0
                # One exchange per step tells every process whether any of them diverged or was
                # asked to stop, so that they all leave the loop at the same step.
                diverged, signum = all_reduce([float(not math.isfinite(loss_value)), float(stop.signum)],
                                              op=dist.ReduceOp.MAX)
                if diverged:
                    value = loss_value if not math.isfinite(loss_value) else "NaN/Inf on another process"
                    raise UserError(
                        f"the training loss became {value} at epoch {epoch + 1} step {step + 1}; stopped. The files "
                        f"of the last finished epoch are kept ({last_path}); try a lower --lr or --amp off")
                optimizer.zero_grad(set_to_none=True)
                if loss is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    stats["loss"] += loss_value * len(labels)
                    stats["correct"] += (logits.argmax(1) == labels).sum().item()
                    stats["seen"] += len(labels)
                step += 1
                if procs.is_main and stats["seen"]:
                    batches.set_postfix(loss=f"{stats['loss'] / stats['seen']:.3f}",
                                        acc=f"{100 * stats['correct'] / stats['seen']:.1f}")
                if signum:
                    stats["time"] += time.perf_counter() - tick
                    stopped_by = int(signum)
                    if procs.is_main:
                        write_checkpoint(checkpoint(epoch, step, stats))
                    say(f"stopped by signal {stopped_by} at epoch {epoch + 1} step {step}; "
                        f"continue with --resume {last_path}")
                    return FitResult(best_acc, best_epoch, history, stopped_by)
            stats["time"] += time.perf_counter() - tick
            scheduler_lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            loss_sum, correct, seen, skipped = all_reduce([stats["loss"], stats["correct"], stats["seen"], stats["skipped"]])
            val_loss, val_acc = evaluate()
            entry = {
                "epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_acc": 100 * correct / max(seen, 1),
                "val_loss": val_loss, "val_acc": val_acc, "lr": scheduler_lr,
                "images_per_s": seen / max(stats["time"], 1e-9), "skipped_images": int(skipped),
            }
            history.append(entry)
            improved = val_acc > best_acc
            if improved:
                best_acc, best_epoch = val_acc, epoch + 1
                if procs.is_main:
                    save_state_dict(_state_dict(model), best_path)
            if procs.is_main:
                write_checkpoint(checkpoint(epoch + 1, 0, {}))
            say(f"epoch {epoch + 1}/{settings.epochs}  train loss {entry['train_loss']:.4f} acc {entry['train_acc']:.2f}%  "
                f"val loss {val_loss:.4f} acc {val_acc:.2f}%  lr {scheduler_lr:.3g}  "
                f"{entry['images_per_s']:.0f} img/s" + ("  *best" if improved else "")
                + (f"  ({int(skipped)} corrupt images skipped)" if skipped else ""))
    return FitResult(best_acc, best_epoch, history, stopped_by)


def load_backbone(model: nn.Module, state_dict: Mapping[str, torch.Tensor], head: str, path: str) -> None:
    """Load every weight but the classifier ``head`` from ``state_dict`` into ``model``.

    Every non-head tensor of the model must be present with the same shape.
    """
    own = model.state_dict()
    prefix = head + "."
    for key, tensor in own.items():
        if key.startswith(prefix):
            continue
        if key not in state_dict:
            raise UserError(f"{path}: tensor {key} is missing; is it a checkpoint of this --arch?")
        if state_dict[key].shape != tensor.shape:
            raise UserError(f"{path}: tensor {key} has shape {list(state_dict[key].shape)}, the model "
                            f"expects {list(tensor.shape)}; is it a checkpoint of this --arch?")
    missing, unexpected = model.load_state_dict(
        {k: v for k, v in state_dict.items() if not k.startswith(prefix) and k in own}, strict=False)
    assert all(k.startswith(prefix) for k in missing), missing
    del unexpected




# ------------------------------------------------------------------- script plumbing


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
    from data import build_dataset, default_img_size
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


# What a resumed run must share with the run that wrote its checkpoint.
RESUME_KEYS = ("arch", "dataset", "augment", "color_jitter")


def check_resume(checkpoint: Mapping, args, keys: Sequence[str] = RESUME_KEYS) -> None:
    """A resume checkpoint must come from a run of the same architecture, dataset and
    training augmentation (``--augment``, ``--color_jitter``)."""
    saved = checkpoint.get("args", {})
    for key in keys:
        if key not in saved:
            raise UserError(f"--resume {args.resume}: was written by an older version that did not record "
                            f"--{key}; start a new run")
        if saved[key] != getattr(args, key):
            raise UserError(f"--resume {args.resume}: was written by a run with --{key} {saved[key]}, "
                            f"not {getattr(args, key)}; resume with the same --{key} or start a new run")


def settings_from_args(args, device: torch.device, *, schedule: str, label: str) -> TrainSettings:
    return TrainSettings(
        epochs=args.max_epoch, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        norm_weight_decay=args.norm_weight_decay, momentum=args.momentum, schedule=schedule, step_size=getattr(args, "lr_step", 40), seed=args.seed,
        workers=args.workers if args.workers is not None else default_workers(device),
        amp=args.amp, channels_last=args.channels_last, compile=args.compile,
        sync_bn=args.sync_bn, cache=args.cache, label=label,
        args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    )


def run_training(args, *, best_path: str, outputs: Mapping[Path, str], schedule: str, label: str,
                 init_model: Callable[[nn.Module, bool, bool], None]) -> int:
    """What both scripts do around :func:`fit`; returns the exit status.

    ``outputs`` maps every file the run writes to the flag that names it.
    ``init_model(model, resuming, is_main)`` runs on every process once all of them have
    checked the outputs, so that nothing is written before every check passed.
    """
    from models import build_model

    procs = init_processes(args.device)
    try:
        if args.augment == "pil" and args.cache == "on":
            raise UserError("--cache on: --augment pil reads and augments every training image at every "
                            "step, so the training images are never held in memory; use --cache auto (which "
                            "holds the validation images when they fit) or off, or --augment batch")
        check_outputs(outputs, args.overwrite, args.resume is not None)
        resume = None
        if args.resume:
            resume = load_checkpoint(args.resume)
            check_resume(resume, args)
        train, val, args.img_size, augment = build_train_val(
            args.dataset, args.data_dir, args.img_size, args.color_jitter, args.skip_corrupt, args.seed,
            args.augment)
        seed_everything(args.seed)
        model = build_model(args.arch, num_classes=len(train.classes))
        if procs.distributed:
            dist.barrier()
        init_model(model, resume is not None, procs.is_main)
        result = fit(model, train, val, settings_from_args(args, procs.device, schedule=schedule, label=label),
                     procs, best_path, resume, augment=augment)
    finally:
        close_processes(procs)
    if result.stopped_by:
        return 128 + result.stopped_by
    if procs.is_main:
        print(f"best val acc {result.best_acc:.2f}% at epoch {result.best_epoch}; weights in {best_path}")
    return 0
