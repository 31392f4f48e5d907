"""The one training loop that pre-training and fine-tuning share.

SGD with momentum and cross-entropy, validation after every epoch, the best-validation
weights kept: the paper's recipe. Around it: DistributedDataParallel under ``torchrun``
(:mod:`engine.processes`), mixed precision, channels-last, ``torch.compile``, and exact
resumption (:mod:`engine.checkpoint`, :mod:`data.loading`).

:func:`fit` reads top to bottom: build the optimizer (:mod:`engine.optim`), restore a
checkpoint, build the loaders, then per epoch :func:`train_one_epoch`, :func:`evaluate`
and the checkpointer.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from data.loading import (
    EpochSampler,
    Interrupted,
    SeededSamples,
    cache_splits,
    cache_wanted,
    make_loader,
    step_seed,
    unpack_batch,
)
from engine.checkpoint import Checkpointer, RunProgress, StopRequests
from engine.optim import Optimization, build_optimization
from engine.processes import ProcessInfo
from engine.settings import TrainSettings
from utils import UserError

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class FitResult:
    best_acc: float
    best_epoch: int
    history: list[dict]
    stopped_by: int = 0  # the signal number when SIGTERM/SIGINT ended the run early


@dataclass
class EpochStats:
    """One process's running totals over a training epoch, and where the epoch stands."""

    loss: float = 0.0  # sum of per-sample losses
    correct: int = 0
    seen: int = 0
    skipped: int = 0  # corrupt images skipped (--skip_corrupt)
    seconds: float = 0.0
    step: int = 0  # steps done in this epoch
    stopped_by: int = 0  # a stop signal ended the epoch early

    def partial(self) -> dict:
        """The totals as a checkpoint stores them (``partial``)."""
        return {"loss": self.loss, "correct": self.correct, "seen": self.seen, "skipped": self.skipped,
                "time": self.seconds}

    @classmethod
    def resumed(cls, progress: RunProgress) -> "EpochStats":
        """The totals of the epoch a checkpoint stopped inside (fresh ones at an epoch's start)."""
        if not progress.step:
            return cls()
        part = progress.partial
        return cls(part["loss"], part["correct"], part["seen"], part["skipped"], part["time"], progress.step)


class Diverged(Exception):
    """The training loss became NaN/Inf (on this process or another)."""

    def __init__(self, value: float | str, epoch: int, step: int) -> None:
        super().__init__(value, epoch, step)
        self.value, self.epoch, self.step = value, epoch, step


def shows_progress(settings: TrainSettings, process: ProcessInfo) -> bool:
    return settings.progress and process.is_main


def prepare_batch(images: torch.Tensor, labels: torch.Tensor, device: torch.device, channels_last: bool,
                  augment: Augment | None = None, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch on ``device`` as the model takes it: augmented with a generator seeded by
    ``seed`` (training), or normalised (validation images, which are only resized)."""
    from data.transforms import normalize_batch

    images = images.to(device, non_blocking=True)
    if seed is not None:
        images = augment(images, torch.Generator().manual_seed(seed))
    elif images.dtype == torch.uint8:
        images = normalize_batch(images)
    if channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


def train_one_epoch(model: nn.Module, loader, optimization: Optimization, process: ProcessInfo,
                    settings: TrainSettings, epoch: int, stats: EpochStats, augment: Augment | None,
                    stop: StopRequests) -> EpochStats:
    """Steps over ``loader`` (which already skips the steps ``stats`` has done), adding to
    ``stats``. Every process takes part in one exchange per step that tells whether any of
    them diverged (:class:`Diverged` is raised) or was asked to stop (``stats.stopped_by``),
    so that they all leave the loop at the same step."""
    device, scaler = process.device, optimization.scaler
    model.train()
    tick = time.perf_counter()
    batches = tqdm(loader, desc=f"  epoch {epoch + 1}", leave=False, disable=not shows_progress(settings, process) or None)
    for batch in batches:
        images, labels, skipped = unpack_batch(batch)
        stats.skipped += skipped
        loss, loss_value = None, 0.0
        if len(labels):  # else every image of this batch was skipped as corrupt
            seed = step_seed(settings.seed, epoch, stats.step) if augment is not None else None
            images, labels = prepare_batch(images, labels, device, settings.channels_last, augment, seed)
            with torch.autocast(device.type, dtype=optimization.amp_dtype, enabled=optimization.amp_dtype is not None):
                logits = model(images)
                loss = nn.functional.cross_entropy(logits.float(), labels)
            loss_value = loss.item()
        diverged, signum = process.all_reduce([float(not math.isfinite(loss_value)), float(stop.signum)],
                                              op=dist.ReduceOp.MAX)
        if diverged:
            raise Diverged(loss_value if not math.isfinite(loss_value) else "NaN/Inf on another process",
                           epoch, stats.step)
        optimization.optimizer.zero_grad(set_to_none=True)
        if loss is not None:
            scaler.scale(loss).backward()
            scaler.step(optimization.optimizer)
            scaler.update()
            stats.loss += loss_value * len(labels)
            stats.correct += (logits.argmax(1) == labels).sum().item()
            stats.seen += len(labels)
        stats.step += 1
        if process.is_main and stats.seen:
            batches.set_postfix(loss=f"{stats.loss / stats.seen:.3f}", acc=f"{100 * stats.correct / stats.seen:.1f}")
        if signum:
            stats.stopped_by = int(signum)
            break
    stats.seconds += time.perf_counter() - tick
    return stats


@torch.no_grad()
def evaluate(model: nn.Module, loader, process: ProcessInfo, channels_last: bool,
             amp_dtype: torch.dtype | None, show: bool = True) -> tuple[float, float]:
    """(mean loss, accuracy in %) over every process's share of the validation set."""
    model.eval()
    device = process.device
    loss_sum, correct, seen = 0.0, 0, 0
    for batch in tqdm(loader, desc="  val", leave=False, disable=not (show and process.is_main) or None):
        images, labels, _ = unpack_batch(batch)
        if not len(labels):
            continue
        images, labels = prepare_batch(images, labels, device, channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        loss_sum += nn.functional.cross_entropy(logits.float(), labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
    loss_sum, correct, seen = process.all_reduce([loss_sum, correct, seen])
    return loss_sum / max(seen, 1), 100.0 * correct / max(seen, 1)


def build_loaders(train_set: Dataset, val_set: Dataset, samplers: tuple[EpochSampler, EpochSampler],
                  settings: TrainSettings, process: ProcessInfo, stop: StopRequests,
                  announce: Callable[[str], None]) -> tuple:
    """The training and validation batches: cut out of the decoded images in memory when
    ``settings.cache`` allows on every process (:mod:`data.cache`), else read by
    DataLoaders. A training set augmented per sample (--augment pil) is never cached: its
    images differ at every step. Raises :class:`data.loading.Interrupted` on a stop request
    while caching."""
    per_sample = isinstance(train_set, SeededSamples)
    splits = {"validation": val_set} if per_sample else {"training": train_set, "validation": val_set}
    cached = {}
    if process.all_reduce([float(cache_wanted(splits, settings.cache, announce))], op=dist.ReduceOp.MIN)[0]:
        cached = cache_splits(splits, settings.workers, shows_progress(settings, process), stop.requested, announce,
                              per_sample)
    generator = torch.Generator().manual_seed(settings.seed)  # shared: the workers' seeds come from it
    return tuple(
        make_loader(data, sampler, cached.get(name), batch_size=settings.batch_size, workers=settings.workers,
                    generator=generator, pin_memory=process.device.type == "cuda")
        for name, data, sampler in (("training", train_set, samplers[0]), ("validation", val_set, samplers[1])))


def place_model(model: nn.Module, settings: TrainSettings, process: ProcessInfo) -> nn.Module:
    """The model on its device, in its memory format, with SyncBatchNorm if asked."""
    if settings.sync_bn and process.distributed:
        if process.device.type != "cuda":
            raise UserError("--sync_bn: PyTorch's SyncBatchNorm runs on CUDA devices only; drop it on the CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(process.device)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def training_model(model: nn.Module, settings: TrainSettings, process: ProcessInfo) -> nn.Module:
    """What the training steps call: the model wrapped in DDP (several processes) and
    compiled (``--compile``)."""
    if process.distributed:
        device = process.device
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if settings.compile else model


def close_epoch(model: nn.Module, val_loader, stats: EpochStats, optimization: Optimization,
                process: ProcessInfo, settings: TrainSettings, epoch: int, progress: RunProgress) -> tuple[dict, bool]:
    """Step the schedule, validate, and record the epoch in ``progress``; returns the
    history entry and whether the validation accuracy improved."""
    lr = optimization.lr
    optimization.scheduler.step()
    loss_sum, correct, seen, skipped = process.all_reduce([stats.loss, stats.correct, stats.seen, stats.skipped])
    val_loss, val_acc = evaluate(model, val_loader, process, settings.channels_last, optimization.amp_dtype,
                                 settings.progress)
    entry = {
        "epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_acc": 100 * correct / max(seen, 1),
        "val_loss": val_loss, "val_acc": val_acc, "lr": lr,
        "images_per_s": seen / max(stats.seconds, 1e-9), "skipped_images": int(skipped),
    }
    progress.history.append(entry)
    improved = val_acc > progress.best_acc
    if improved:
        progress.best_acc, progress.best_epoch = val_acc, epoch + 1
    progress.epoch, progress.step, progress.partial = epoch + 1, 0, {}
    return entry, improved


def epoch_line(entry: dict, epochs: int, improved: bool) -> str:
    return (f"epoch {entry['epoch']}/{epochs}  train loss {entry['train_loss']:.4f} acc {entry['train_acc']:.2f}%  "
            f"val loss {entry['val_loss']:.4f} acc {entry['val_acc']:.2f}%  lr {entry['lr']:.3g}  "
            f"{entry['images_per_s']:.0f} img/s" + ("  *best" if improved else "")
            + (f"  ({entry['skipped_images']} corrupt images skipped)" if entry["skipped_images"] else ""))


def fit(model: nn.Module, train_set: Dataset, val_set: Dataset, settings: TrainSettings, process: ProcessInfo,
        best_path: str | os.PathLike, resume: Mapping | None = None, announce: Callable[[str], None] | None = None,
        augment: Augment | None = None) -> FitResult:
    """Train ``model`` and keep its best-validation weights at ``best_path``.

    ``resume`` is a checkpoint from :func:`engine.checkpoint.load_checkpoint`. ``augment``
    (e.g. :class:`data.transforms.BatchAugment`) turns each training batch, on the device,
    into the model's input, with random numbers from a generator seeded by (seed, epoch,
    step). A ``train_set`` wrapped in :class:`data.loading.SeededSamples` augments each
    sample while loading instead (``--augment pil``; then ``augment`` is None). Raises
    :class:`UserError` when the loss becomes NaN/Inf (the files of the last good epoch are
    left as they were).
    """
    announce = process.printer(announce)
    files = Checkpointer(best_path, process.is_main)
    model = place_model(model, settings, process)
    optimization = build_optimization(model, settings, process.device)
    progress = RunProgress()
    if resume is not None:
        progress = files.restore(resume, model, optimization)
        announce(f"resumed at epoch {progress.epoch + 1} step {progress.step} (best val acc {progress.best_acc:.2f}%)")
    train_model = training_model(model, settings, process)
    per_sample = isinstance(train_set, SeededSamples)
    samplers = (EpochSampler(len(train_set), settings.seed, process.rank, process.world_size, sample_seeds=per_sample),
                EpochSampler(len(val_set), settings.seed, process.rank, process.world_size, shuffle=False))
    with StopRequests() as stop:
        try:
            train_loader, val_loader = build_loaders(train_set, val_set, samplers, settings, process, stop, announce)
        except Interrupted:
            announce(f"stopped by signal {stop.signum} while reading the images; the run's files are as they were")
            return FitResult(progress.best_acc, progress.best_epoch, progress.history, stop.signum)
        for epoch in tqdm(range(progress.epoch, settings.epochs), desc=settings.label, initial=progress.epoch,
                          total=settings.epochs, disable=not shows_progress(settings, process) or None):
            samplers[0].set_epoch(epoch, skip=progress.step * settings.batch_size)
            try:
                stats = train_one_epoch(train_model, train_loader, optimization, process, settings, epoch,
                                        EpochStats.resumed(progress), augment, stop)
            except Diverged as err:
                raise UserError(
                    f"the training loss became {err.value} at epoch {epoch + 1} step {err.step + 1}; stopped. The "
                    f"files of the last finished epoch are kept ({files.last_path}); try a lower --lr or --amp off"
                ) from None
            if stats.stopped_by:
                progress.step, progress.partial = stats.step, stats.partial()
                files.save_last(model, optimization, progress, settings.args)
                announce(f"stopped by signal {stats.stopped_by} at epoch {epoch + 1} step {stats.step}; "
                         f"continue with --resume {files.last_path}")
                return FitResult(progress.best_acc, progress.best_epoch, progress.history, stats.stopped_by)
            entry, improved = close_epoch(model, val_loader, stats, optimization, process, settings, epoch, progress)
            if improved:
                files.save_best(model)
            files.save_last(model, optimization, progress, settings.args)
            announce(epoch_line(entry, settings.epochs, improved))
    return FitResult(progress.best_acc, progress.best_epoch, progress.history)
