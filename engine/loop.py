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

import os
import re
import time
import warnings
from contextlib import contextmanager
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
    place_caches,
    step_seed,
    unpack_batch,
)
from data.datasets import ignored_files_notice
from data.device_decode import EncodedBatch, decoding_ahead
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
    wrote_best: bool = False  # whether this run wrote the best weights (a resumed one may never improve)
    finished_before: bool = False  # a finished run resumed: nothing was trained


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
    overflow_steps: int = 0  # steps skipped because the fp16 loss overflowed (their samples are not in ``seen``)

    def partial(self) -> dict:
        """The totals as a checkpoint stores them (``partial``)."""
        return {"loss": self.loss, "correct": self.correct, "seen": self.seen, "skipped": self.skipped,
                "time": self.seconds, "overflow_steps": self.overflow_steps}

    @classmethod
    def resumed(cls, progress: RunProgress) -> "EpochStats":
        """The totals of the epoch a checkpoint stopped inside (fresh ones at an epoch's start)."""
        if not progress.step:
            return cls()
        part = progress.partial
        return cls(part["loss"], part["correct"], part["seen"], part["skipped"], part["time"], progress.step,
                   overflow_steps=part.get("overflow_steps", 0))


MAX_OVERFLOW_STEPS = 20
"""With ``--amp fp16``, the number of steps in a row whose loss is not finite that ends the
run (:class:`Diverged`). Before that, such a step is skipped the way GradScaler skips one
whose gradients are not finite: no update, and the scale times its backoff factor (halved).
A forward pass in fp16 can overflow on an unusual batch while the next one fits; but the
scale only guards the backward pass, and a scale that started at 65536 and was halved 19
times (to 1/8) guards nothing: twenty overflows in a row mean the weights themselves no
longer fit in fp16. Without fp16 a non-finite loss ends the run at once."""

_MAX_INPUT_DIMS = 8  # the most dimensions of an input batch that :func:`_agreed_input_shape` exchanges


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

    if isinstance(images, EncodedBatch):  # --decode device: JPEGs decoded and resized here
        images = images.decode(device)
    images = images.to(device, non_blocking=True)
    if seed is not None:
        images = augment(images, torch.Generator().manual_seed(seed))
    elif images.dtype == torch.uint8:
        images = normalize_batch(images)
    if channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


def _agreed_input_shape(images: torch.Tensor | None, process: ProcessInfo) -> tuple[int, ...] | None:
    """The shape of one sample as the model takes it, agreed by every process from the
    batches they have (``images``; None where every image was skipped): None while no
    process has any. Every process calls this at the same steps, until it gives a shape."""
    dims = [] if images is None else [images.dim(), *images.shape[1:]]
    if len(dims) > _MAX_INPUT_DIMS:
        raise ValueError(f"inputs of at most {_MAX_INPUT_DIMS} dimensions, got {tuple(images.shape)}")
    found = [int(d) for d in process.all_reduce(dims + [0] * (_MAX_INPUT_DIMS - len(dims)), op=dist.ReduceOp.MAX)]
    return (1, *found[1:found[0]]) if found[0] else None


@contextmanager
def _running_statistics_kept(model: nn.Module):
    """The BatchNorm layers in eval mode: they normalise with their running statistics and
    leave them as they are. SyncBatchNorm stays in training mode, since its forward pass is
    an exchange that every process joins (its statistics, the same on every process, then
    count the stand-in sample too)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and not isinstance(m, nn.SyncBatchNorm) and m.training]
    for module in norms:
        module.train(False)
    try:
        yield
    finally:
        for module in norms:
            module.train(True)


def _forward(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             optimization: Optimization) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, mean loss), in the autocast precision."""
    with torch.autocast(images.device.type, dtype=optimization.amp_dtype, enabled=optimization.amp_dtype is not None):
        logits = model(images)
        loss = nn.functional.cross_entropy(logits.float(), labels)
    return logits, loss


def _stand_in_loss(model: nn.Module, shape: tuple[int, ...], optimization: Optimization, process: ProcessInfo,
                   channels_last: bool) -> torch.Tensor:
    """The loss of a zero-weight step, for a process whose every image of this batch was
    skipped while the others train: one image of zeros through the model, the loss times 0.
    The process so joins DistributedDataParallel's exchanges (buffers before the forward
    pass, gradients during the backward pass) with zero gradients, and then the same update
    as the others; its BatchNorm statistics stay as they were."""
    images, labels = prepare_batch(torch.zeros(shape), torch.zeros(1, dtype=torch.long), process.device,
                                   channels_last)
    with _running_statistics_kept(model):
        return _forward(model, images, labels, optimization)[1] * 0


def _update(loss: torch.Tensor, optimization: Optimization, overflowed: bool, trained: bool,
            stats: EpochStats) -> None:
    """The backward pass, then the optimizer step that every process takes or skips
    together: skipped when the (fp16) loss overflowed on any process, as GradScaler skips
    a step whose gradients are not finite (counted in ``stats.overflow_steps``), and when no
    process had images (stand-in losses only)."""
    scaler = optimization.scaler
    scaler.scale(loss).backward()
    if overflowed:  # the scale lowered as GradScaler.update does after inf/NaN gradients
        state = scaler.state_dict()
        scaler.load_state_dict({**state, "scale": state["scale"] * state["backoff_factor"], "_growth_tracker": 0})
        stats.overflow_steps += 1
    elif trained:
        scaler.step(optimization.optimizer)
        scaler.update()


class _DeviceTotals:
    """An epoch's running sums kept on the training device (no host synchronisation per
    step) and read in one copy at check steps: the summed loss (float64, as the host would
    sum it), correct predictions and samples of the steps whose loss was finite, and the
    first step (with its value) whose loss was not."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, seen
        self._no_bad = torch.full((2,), -1.0, dtype=torch.float64, device=device)  # first bad step (-1: none), its loss
        self.bad = self._no_bad.clone()

    def add(self, loss: torch.Tensor, logits: torch.Tensor | None, labels: torch.Tensor, step: int) -> None:
        """Count a step's loss (and, for a batch with images, its predictions): device work only."""
        value = loss.detach().double()
        finite = torch.isfinite(value)
        if logits is not None:
            self.sums[0] += torch.where(finite, value * len(labels), 0.0)
            self.sums[1] += torch.where(finite, (logits.argmax(1) == labels).sum().double(), 0.0)
            self.sums[2] += torch.where(finite, float(len(labels)), 0.0)
        first = ~finite & (self.bad[0] < 0)
        self.bad = torch.where(first, torch.stack([torch.full_like(value, step), value]), self.bad)

    def read(self, stats: EpochStats) -> tuple[int, float]:
        """Add the sums to ``stats`` and start them again (one copy from the device);
        returns (the first step whose loss was not finite, or -1; that loss)."""
        loss, correct, seen, bad_step, bad_value = torch.cat([self.sums, self.bad]).tolist()
        stats.loss += loss
        stats.correct += int(correct)
        stats.seen += int(seen)
        self.sums.zero_()
        self.bad = self._no_bad.clone()
        return int(bad_step), bad_value


def _check_interval(settings: TrainSettings, process: ProcessInfo) -> int:
    """Steps between two reads of the totals and two exchanges between processes: every
    step with fp16 (an overflow decides that step's update) and in a distributed run that
    may meet batches without images (all must know whether any process had some);
    otherwise ``settings.check_every``."""
    if settings.amp == "fp16" or (process.distributed and settings.skip_corrupt):
        return 1
    return max(1, settings.check_every)


def train_one_epoch(model: nn.Module, loader, optimization: Optimization, process: ProcessInfo,
                    settings: TrainSettings, epoch: int, stats: EpochStats, augment: Augment | None,
                    stop: StopRequests) -> EpochStats:
    """Steps over ``loader`` (which already skips the steps ``stats`` has done), adding to
    ``stats``. The loss and accuracy are summed on the device and read at check steps
    (:func:`_check_interval`; always the epoch's last step), where every process takes part
    in one exchange that tells whether any of them diverged (:class:`Diverged`; with fp16,
    after :data:`MAX_OVERFLOW_STEPS` overflows in a row) or was asked to stop
    (``stats.stopped_by``), so that they all leave the loop at the same step and no
    checkpoint ever holds weights updated by a non-finite loss. In a distributed run, a
    process whose every image of a batch was skipped takes a zero-weight step
    (:func:`_stand_in_loss`) in the shape the processes agree on at their first step (or the
    first at which any has images)."""
    device, every = process.device, _check_interval(settings, process)
    model.train()
    tick = time.perf_counter()
    batches = tqdm(loader, desc=f"  epoch {epoch + 1}", leave=False, disable=not shows_progress(settings, process) or None)
    shape, overflows, totals, last = None, 0, _DeviceTotals(device), stats.step + len(loader) - 1
    for batch in batches:
        images, labels, skipped = unpack_batch(batch)
        stats.skipped += skipped
        logits, loss = None, None
        if len(labels):  # else every image of this batch was skipped as corrupt
            seed = step_seed(settings.seed, epoch, stats.step) if augment is not None else None
            images, labels = prepare_batch(images, labels, device, settings.channels_last, augment, seed)
        if process.distributed and shape is None:
            shape = _agreed_input_shape(images if len(labels) else None, process)
        if len(labels):
            logits, loss = _forward(model, images, labels, optimization)
        elif shape is not None:
            loss = _stand_in_loss(model, shape, optimization, process, settings.channels_last)
        if loss is not None:
            totals.add(loss, logits, labels, stats.step)
        bad, signum, trained = 0, 0, logits is not None
        if every == 1 or (stats.step + 1) % every == 0 or stats.step == last:
            bad_step, bad_value = totals.read(stats)
            bad, signum, trained = process.all_reduce([float(bad_step >= 0), float(stop.signum), float(trained)],
                                                      op=dist.ReduceOp.MAX)
            overflows = overflows + 1 if bad else 0
            if bad and (not optimization.scaler.is_enabled() or overflows >= MAX_OVERFLOW_STEPS):
                raise Diverged(bad_value if bad_step >= 0 else "NaN/Inf on another process", epoch,
                               bad_step if bad_step >= 0 else stats.step)
            if stats.seen and shows_progress(settings, process):
                batches.set_postfix(loss=f"{stats.loss / stats.seen:.3f}", acc=f"{100 * stats.correct / stats.seen:.1f}")
        optimization.optimizer.zero_grad(set_to_none=True)
        if loss is not None:
            _update(loss, optimization, bool(bad), bool(trained), stats)
        stats.step += 1
        if signum:
            stats.stopped_by = int(signum)
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the epoch's time includes its last step's work on the device
    stats.seconds += time.perf_counter() - tick
    return stats


def evaluate(model: nn.Module, loader, process: ProcessInfo, channels_last: bool,
             amp_dtype: torch.dtype | None, show: bool = True) -> tuple[float, float]:
    """(mean loss, accuracy in %) over every process's share of the validation set."""
    return validate(model, loader, process, channels_last, amp_dtype, show)[:2]


@torch.no_grad()
def validate(model: nn.Module, loader, process: ProcessInfo, channels_last: bool,
             amp_dtype: torch.dtype | None, show: bool = True) -> tuple[float, float, int]:
    """(mean loss, accuracy in %, corrupt images skipped) over every process's share of the
    validation set; the loss and accuracy are over the images that loaded."""
    model.eval()
    device = process.device
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, correct: summed on the device
    seen, skipped_total = 0, 0
    for batch in tqdm(loader, desc="  val", leave=False, disable=not (show and process.is_main) or None):
        images, labels, skipped = unpack_batch(batch)
        skipped_total += skipped
        if not len(labels):
            continue
        images, labels = prepare_batch(images, labels, device, channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        sums[0] += nn.functional.cross_entropy(logits.float(), labels, reduction="sum").double()
        sums[1] += (logits.argmax(1) == labels).sum()
        seen += len(labels)
    loss_sum, correct = sums.tolist()
    loss_sum, correct, seen, skipped_total = process.all_reduce([loss_sum, correct, seen, skipped_total])
    return loss_sum / max(seen, 1), 100.0 * correct / max(seen, 1), int(skipped_total)


def build_loaders(train_set: Dataset, val_set: Dataset, samplers: tuple[EpochSampler, EpochSampler],
                  settings: TrainSettings, process: ProcessInfo, stop: StopRequests,
                  announce: Callable[[str], None]) -> tuple:
    """The training and validation batches: cut out of the decoded images, in memory or in
    a memory-mapped file, when ``settings.cache`` allows on every node (:mod:`data.cache`;
    one process per node decodes), else read by DataLoaders. A training set augmented per
    sample (--augment pil) is never cached: its images differ at every step. Raises
    :class:`data.loading.Interrupted` on a stop request while caching."""
    per_sample = isinstance(train_set, SeededSamples)
    splits = {"validation": val_set} if per_sample else {"training": train_set, "validation": val_set}
    plan = cache_wanted(splits, settings, process, announce)
    cached = cache_splits(splits, plan, settings, process, shows_progress(settings, process), stop.requested,
                          announce, per_sample)
    cached = place_caches(cached, process.device, announce)
    generator = torch.Generator().manual_seed(settings.seed)  # shared: the workers' seeds come from it
    return tuple(
        decoding_ahead(make_loader(data, sampler, cached.get(name), batch_size=settings.batch_size,
                                   workers=settings.workers, generator=generator,
                                   pin_memory=process.device.type == "cuda"), data, process.device)
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


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""``torch.compile``'s modes (``--compile_mode``)."""
GRAPHED_MODES = ("reduce-overhead", "max-autotune")  # the modes that record CUDA graphs on a GPU


class StaticShapes:
    """A model called through ``torch.compile`` (in ``mode``, one of :data:`COMPILE_MODES`)
    with static shapes for full batches and eagerly for any other batch size (an epoch's
    smaller last batch, a batch that lost corrupt images, the one-image stand-in step): one
    compiled graph, never a recompilation. Without ``compile`` every call is eager.
    ``train``/``eval``/``modules`` act on the eager module.

    In a mode that records CUDA graphs, each compiled call starts a new step for them
    (``torch.compiler.cudagraph_mark_step_begin``): the previous step's outputs, which
    replaying the graph overwrites, are no longer used by then (the loop reads a step's
    logits and loss within the step)."""

    def __init__(self, module: nn.Module, batch_size: int, compile: bool, mode: str = "default") -> None:
        if mode not in COMPILE_MODES:
            raise ValueError(f"mode must be one of {COMPILE_MODES}, got {mode!r}")
        self.module, self.batch_size, self.graphed = module, batch_size, compile and mode in GRAPHED_MODES
        self.compiled = (torch.compile(module, dynamic=False, mode=None if mode == "default" else mode)
                         if compile else None)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None and images.shape[0] == self.batch_size:
            if self.graphed:
                torch.compiler.cudagraph_mark_step_begin()
            return self.compiled(images)
        return self.module(images)

    def train(self, mode: bool = True) -> "StaticShapes":
        self.module.train(mode)
        return self

    def eval(self) -> "StaticShapes":
        return self.train(False)

    def modules(self):
        return self.module.modules()


def training_model(model: nn.Module, settings: TrainSettings, process: ProcessInfo) -> StaticShapes:
    """What the training steps call: the model wrapped in DDP (several processes), compiled
    for full batches with ``--compile`` (:class:`StaticShapes`)."""
    if process.distributed:
        device = process.device
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return StaticShapes(model, settings.batch_size, settings.compile, settings.compile_mode)


def close_epoch(eval_model: StaticShapes, val_loader, stats: EpochStats, optimization: Optimization,
                process: ProcessInfo, settings: TrainSettings, epoch: int, progress: RunProgress) -> tuple[dict, bool]:
    """Step the schedule, validate, and record the epoch in ``progress``; returns the
    history entry and whether the validation accuracy improved."""
    lr = optimization.lr
    with warnings.catch_warnings():  # resumed after an epoch's last step: the optimizer has not stepped since
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
        optimization.scheduler.step()
    loss_sum, correct, seen, skipped, overflows = process.all_reduce(
        [stats.loss, stats.correct, stats.seen, stats.skipped, stats.overflow_steps])
    val_loss, val_acc, val_skipped = validate(eval_model, val_loader, process, settings.channels_last,
                                              optimization.amp_dtype, settings.progress)
    entry = {
        "epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_acc": 100 * correct / max(seen, 1),
        "val_loss": val_loss, "val_acc": val_acc, "lr": lr,
        "images_per_s": seen / max(stats.seconds, 1e-9), "skipped_images": int(skipped),
        "overflow_steps": int(overflows) // process.world_size,  # every process counts each step it skipped
        "skipped_val_images": val_skipped,  # corrupt validation images: val_loss/val_acc are over the rest
    }
    progress.history.append(entry)
    improved = val_acc > progress.best_acc
    if improved:
        progress.best_acc, progress.best_epoch = val_acc, epoch + 1
    progress.epoch, progress.step, progress.partial = epoch + 1, 0, {}
    return entry, improved


def _images(count: int) -> str:
    return f"{count} corrupt image{'' if count == 1 else 's'}"


def epoch_line(entry: dict, epochs: int, improved: bool) -> str:
    """The line that reports an epoch; corrupt images skipped in training and in validation
    (whose loss and accuracy are then over the rest) are named apart."""
    skipped = [f"{_images(entry['skipped_images'])} skipped in training"] if entry["skipped_images"] else []
    if entry.get("skipped_val_images"):
        skipped.append(f"{_images(entry['skipped_val_images'])} left out of validation")
    return (f"epoch {entry['epoch']}/{epochs}  train loss {entry['train_loss']:.4f} acc {entry['train_acc']:.2f}%  "
            f"val loss {entry['val_loss']:.4f} acc {entry['val_acc']:.2f}%  lr {entry['lr']:.3g}  "
            f"{entry['images_per_s']:.0f} img/s" + ("  *best" if improved else "")
            + (f"  ({'; '.join(skipped)})" if skipped else ""))


def divergence_message(err: Diverged, files: Checkpointer, settings: TrainSettings) -> str:
    kept = (f"the files of the last finished epoch are kept ({files.last_path})" if files.last_path.exists()
            else "no epoch had finished, so no checkpoint was written")
    advice = "try a lower --lr" + (f" or --amp off (it was {settings.amp})" if settings.amp != "off" else "")
    return (f"the training loss became {err.value} at epoch {err.epoch + 1} step {err.step + 1}; stopped: {kept}; "
            f"{advice}")


def restore(files: Checkpointer, resume: Mapping | None, model: nn.Module, optimization: Optimization,
            settings: TrainSettings, announce: Callable[[str], None]) -> RunProgress:
    """Where the run stands: from the checkpoint ``resume`` (loaded into the model and the
    optimizer, and announced), else at its start."""
    if resume is None:
        return RunProgress()
    progress, note = files.restore(resume, model, optimization)
    if note:
        announce(note)
    if progress.epoch >= settings.epochs:
        announce(f"the run in {settings.args.get('resume') or files.last_path} is finished ({progress.epoch} of "
                 f"{settings.epochs} epochs); nothing to do (best val acc {progress.best_acc:.2f}%)")
    else:
        announce(f"resumed at epoch {progress.epoch + 1} step {progress.step} (best val acc {progress.best_acc:.2f}%)")
    return progress


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
    files = Checkpointer(best_path, process)
    model = place_model(model, settings, process)
    optimization = build_optimization(model, settings, process.device)
    progress = restore(files, resume, model, optimization, settings, announce)
    if progress.epoch >= settings.epochs:  # a finished run resumed: nothing is trained, read or written
        return FitResult(progress.best_acc, progress.best_epoch, progress.history, finished_before=True)
    notice = ignored_files_notice(train_set, val_set)
    if notice:
        announce(notice)
    train_model = training_model(model, settings, process)
    eval_model = StaticShapes(model, settings.batch_size, settings.compile, settings.compile_mode)  # its own graph
    per_sample = isinstance(train_set, SeededSamples)
    samplers = (EpochSampler(len(train_set), settings.seed, process.rank, process.world_size, sample_seeds=per_sample),
                EpochSampler(len(val_set), settings.seed, process.rank, process.world_size, shuffle=False))
    with StopRequests() as stop:
        try:
            train_loader, val_loader = build_loaders(train_set, val_set, samplers, settings, process, stop, announce)
        except Interrupted:
            announce(f"stopped by signal {stop.signum} while reading the images; the run's files are as they were")
            return FitResult(progress.best_acc, progress.best_epoch, progress.history, stop.signum, files.wrote_best)
        for epoch in tqdm(range(progress.epoch, settings.epochs), desc=settings.label, initial=progress.epoch,
                          total=settings.epochs, disable=not shows_progress(settings, process) or None):
            samplers[0].set_epoch(epoch, skip=progress.step * settings.batch_size)
            try:
                stats = train_one_epoch(train_model, train_loader, optimization, process, settings, epoch,
                                        EpochStats.resumed(progress), augment, stop)
            except Diverged as err:
                raise UserError(divergence_message(err, files, settings)) from None
            if stats.stopped_by:
                progress.step, progress.partial = stats.step, stats.partial()
                files.save_last(model, optimization, progress, settings.args)
                announce(f"stopped by signal {stats.stopped_by} at epoch {epoch + 1} step {stats.step}; "
                         f"continue with --resume {files.last_path}")
                return FitResult(progress.best_acc, progress.best_epoch, progress.history, stats.stopped_by)
            entry, improved = close_epoch(eval_model, val_loader, stats, optimization, process, settings, epoch,
                                          progress)
            if improved:
                files.save_best(model)
            files.save_last(model, optimization, progress, settings.args)
            announce(epoch_line(entry, settings.epochs, improved))
    if stop.signum:  # it arrived during the last validation: the run is complete, but the caller is told
        announce(f"stopped by signal {stop.signum} after the last epoch; the run is complete ({files.last_path})")
    return FitResult(progress.best_acc, progress.best_epoch, progress.history, stop.signum, files.wrote_best)
