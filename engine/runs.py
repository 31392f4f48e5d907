"""A whole training run as the two scripts (and reproduce.py) start it, from one settings
object (:class:`TrainJob`): check the outputs, build the data and the model, :func:`fit`.

    job = TrainJob(dataset="synthetic:classes=10", arch="resnet20", max_epoch=30, batch_size=128, lr=0.01)
    finetune(job, start="ckpt/demo_pretrained.pth", finetuned="out.pth")
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping

from torch import nn

from data.loading import build_train_val, default_workers
from engine.checkpoint import (
    check_outputs,
    check_resume,
    load_checkpoint,
    lock_outputs,
    run_files,
    seed_everything,
)
from engine.loop import fit
from engine.processes import barrier, join_process_group, leave_process_group, set_tf32
from engine.settings import TrainSettings
from utils import UserError, check_distinct_files, check_not_in_folder, check_weights_fit, same_file


# On a GPU, the loss is read (and stop requests and divergence checked) every this many steps:
# between two reads a training step never waits for the device. On the CPU there is nothing to
# wait for, and every step is checked.
GPU_CHECK_EVERY = 25


@dataclass
class TrainJob:
    """The settings of one training run: the training scripts' flags, by the same names."""

    dataset: str
    arch: str | None  # None: inferred from the starting weights (fine-tuning)
    max_epoch: int
    batch_size: int
    lr: float
    data_dir: str | None = None
    img_size: int | None = None  # None: the architecture's fixed input size, else the data set's (input_size)
    optimizer: str = "sgd"  # engine.optim.OPTIMIZERS
    momentum: float = 0.9
    warmup_epochs: int = 0
    weight_decay: float = 1e-4
    norm_weight_decay: float | None = None
    lr_step: int = 40  # pre-training's step schedule
    seed: int = 0
    color_jitter: float = 0.0
    augment: str = "batch"
    decode: str = "loader"  # data.device_decode.DECODE_MODES
    device: str = "auto"
    workers: int | None = None  # None: data.loading.default_workers
    cache: str = "auto"
    cache_dir: str = ".cache/images"  # data.cache.DEFAULT_CACHE_DIR
    amp: str = "off"
    tf32: bool = True  # TF32 convolutions and matmuls on GPUs (the seed's PyTorch 1.8 default)
    channels_last: bool = True
    compile: bool = False
    compile_mode: str = "default"  # engine.loop.COMPILE_MODES
    sync_bn: bool = False
    dist_timeout: float = 600.0  # seconds a process waits for the others under torchrun
    resume: str | None = None
    overwrite: bool = False
    skip_corrupt: bool = False
    progress: bool = True  # progress bars (on the main process)


def train_settings(job: TrainJob, device, *, schedule: str, label: str, outputs: list[str],
                   world_size: int = 1) -> TrainSettings:
    """The loop's settings; checkpoints record the job, the files it writes and the number of
    processes (a resumed run must have as many)."""
    recorded = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(job).items()}, "outputs": outputs,
                "world_size": world_size}
    return TrainSettings(
        epochs=job.max_epoch, batch_size=job.batch_size, lr=job.lr, weight_decay=job.weight_decay,
        norm_weight_decay=job.norm_weight_decay, momentum=job.momentum, schedule=schedule, step_size=job.lr_step,
        optimizer=job.optimizer, warmup_epochs=job.warmup_epochs,
        seed=job.seed, workers=job.workers if job.workers is not None else default_workers(device),
        amp=job.amp, channels_last=job.channels_last, compile=job.compile,
        compile_mode=job.compile_mode, sync_bn=job.sync_bn, cache=job.cache,
        cache_dir=str(job.cache_dir), dataset=job.dataset, data_dir=None if job.data_dir is None else str(job.data_dir),
        label=label, progress=job.progress, skip_corrupt=job.skip_corrupt, args=recorded,
        check_every=GPU_CHECK_EVERY if device.type == "cuda" else 1,
    )


def input_size(arch: str | None, requested: int | None, dataset: str) -> int:
    """The image size a model of ``arch`` is fed on ``dataset``: ``requested`` (--img_size)
    when given, else the architecture's fixed input size (``ARCHITECTURES[arch].input_size``,
    224 for the ViTs), else the data set's own (:func:`data.datasets.default_img_size`).

    Raises :class:`UserError` for a ``requested`` size an architecture with a fixed input
    size cannot take: call it before any file is written or image read. Training and
    ``analyze.py stats`` both decide the size here.
    """
    from data.datasets import default_img_size
    from models import ARCHITECTURES

    fixed = ARCHITECTURES[arch].input_size if arch in ARCHITECTURES else None
    if requested is None:
        return fixed if fixed is not None else default_img_size(dataset)
    if fixed is not None and requested != fixed:
        raise UserError(f"--img_size {requested}: {arch} takes {fixed}-px images only; "
                        f"leave --img_size out or give {fixed}")
    return requested


def run_training(job: TrainJob, *, best_path: str | os.PathLike, outputs: Mapping[Path, str], schedule: str,
                 label: str, init_model: Callable[[nn.Module, bool, bool], None],
                 announce: Callable[[str], None] | None = None) -> int:
    """What both scripts do around :func:`fit`; returns the exit status (128 + the signal
    number when a stop signal ended the run).

    ``outputs`` maps every file the run writes to the flag that names it.
    ``init_model(model, resuming, is_main)`` runs on every process once all of them have
    checked the outputs, so that nothing is written before every check passed.
    """
    from data.datasets import small_images_note
    from models import ARCHITECTURES, build_model

    process = join_process_group(job.device, job.dist_timeout, announce)
    if process.device.type == "cuda":
        set_tf32(job.tf32)
    announce = process.printer(announce)
    lock = None
    try:
        size_given = job.img_size is not None
        job.img_size = input_size(job.arch, job.img_size, job.dataset)
        if job.augment == "pil" and job.cache == "on":
            raise UserError("--cache on: --augment pil reads and augments every training image at every "
                            "step, so the training images are never held in memory; use --cache auto (which "
                            "holds the validation images when they fit) or off, or --augment batch")
        if job.compile_mode != "default" and not job.compile:
            raise UserError(f"--compile_mode {job.compile_mode}: is torch.compile's mode; add --compile")
        if job.decode == "device":
            if job.cache in ("on", "disk"):
                raise UserError(f"--cache {job.cache}: --decode device decodes the files at every epoch, so "
                                "nothing is cached; use --cache off (or auto), or --decode loader")
            job.cache = "off"
        check_outputs(outputs, job.overwrite, job.resume is not None)
        check_not_in_folder([(path, f"{flag} {path}") for path, flag in outputs.items()], *data_folder(job))
        lock = lock_outputs(outputs, process)
        resume = None
        if job.resume:
            resume = load_checkpoint(job.resume)
            check_resume(resume, job, process.world_size)
        train, val, job.img_size, augment = build_train_val(
            job.dataset, job.data_dir, job.img_size, job.color_jitter, job.skip_corrupt, job.seed, job.augment,
            job.decode)
        if not size_given and not (job.arch in ARCHITECTURES and ARCHITECTURES[job.arch].input_size):
            note = small_images_note(train, job.img_size)
            if note:
                announce(note)
        seed_everything(job.seed)
        model = build_model(job.arch, num_classes=len(train.classes))
        barrier(process)
        init_model(model, resume is not None, process.is_main)
        settings = train_settings(job, process.device, schedule=schedule, label=label, world_size=process.world_size,
                                  outputs=[str(path) for path in outputs])
        result = fit(model, train, val, settings, process, best_path, resume, announce, augment)
    finally:
        if lock is not None:
            lock.release()
        leave_process_group(process)
    if result.stopped_by:
        return 128 + result.stopped_by
    announce(final_line(result, Path(best_path), job.resume))
    return 0


def final_line(result, best_path: Path, resume: str | None) -> str:
    """The run's last line: where its best weights are, naming only a file that holds them."""
    best = f"best val acc {result.best_acc:.2f}% at epoch {result.best_epoch}"
    if result.wrote_best:
        return f"{best}; weights in {best_path}"
    if result.finished_before:
        head = f"--resume {resume}: the run had already finished; nothing was trained or written. {best}"
    else:
        head = f"{best}, before --resume {resume}; this run did not improve on it and did not write {best_path}"
    if best_path.exists() and resume is not None and same_file(resume, run_files(best_path)[1]):
        return f"{head} ({best_path} holds them, written before the resume)"
    return f"{head}; those weights went to the best-weights file of the run that wrote {resume}"


def pretrain(job: TrainJob, random_init: str | os.PathLike, pretrained: str | os.PathLike,
             announce: Callable[[str], None] | None = None) -> int:
    """Pre-train from a fresh initialisation (saved to ``random_init``, theta_r) to the
    best-validation weights ``pretrained`` (theta_A), with the step schedule."""
    from utils import save_state_dict

    best, last, log = run_files(pretrained)
    check_distinct_files([(Path(random_init), f"-r {random_init}"), *run_file_roles(pretrained, "-a")],
                         inputs=resume_input(job, last))
    say = announce or (lambda text: print(text, flush=True))

    def save_initialisation(model: nn.Module, resuming: bool, is_main: bool) -> None:
        if not resuming and is_main:
            save_state_dict(model.state_dict(), random_init)
            say(f"wrote theta_r to {random_init}")

    return run_training(job, best_path=pretrained, outputs={Path(random_init): "-r", best: "-a", last: "-a", log: "-a"},
                        schedule="step", label="pre-train", init_model=save_initialisation, announce=announce)


def finetune(job: TrainJob, start: str | os.PathLike, finetuned: str | os.PathLike, *, start_flag: str = "-a",
             announce: Callable[[str], None] | None = None) -> int:
    """Fine-tune the weights at ``start`` (theta_A; theta_r for the from-scratch baseline,
    named by ``start_flag``) to the best-validation weights ``finetuned`` (theta_FB), with
    the cosine schedule. The classifier head is a new ``nn.Linear`` in PyTorch's default
    initialisation, for every architecture, as the seed does. ``job.arch`` None: inferred
    from the weights."""
    from models import ARCHITECTURES, fresh_head, resolve_arch
    from utils import load_state_dict_safely

    best, last, log = run_files(finetuned)
    check_distinct_files(run_file_roles(finetuned, "-b"),
                         inputs=[(Path(start), f"{start_flag} {start}"), *resume_input(job, last)])
    state_dict = load_state_dict_safely(start)
    job.arch = resolve_arch(state_dict, job.arch, f"{start_flag} {start}")

    def load_start(model: nn.Module, resuming: bool, is_main: bool) -> None:
        fresh_head(model, job.arch)
        load_backbone(model, state_dict, ARCHITECTURES[job.arch].head, f"{start_flag} {start}")

    return run_training(job, best_path=finetuned, outputs={best: "-b", last: "-b", log: "-b"}, schedule="cosine",
                        label="fine-tune", init_model=load_start, announce=announce)


def data_folder(job: TrainJob) -> tuple[str | None, str]:
    """The folder the run's data set reads, and how an error names it (None: made in memory)."""
    from data.datasets import imagefolder_path

    own = imagefolder_path(job.dataset)
    if own is not None:
        return own, f"--dataset {job.dataset}"
    return (None if job.data_dir is None else os.path.expanduser(job.data_dir)), f"--data_dir {job.data_dir}"


def resume_input(job: TrainJob, last: Path) -> list[tuple[Path, str]]:
    """``--resume`` as an input the run must not write over, unless it is the run's own
    ``.last.pth``, which resuming reads and then carries on writing."""
    if job.resume is None or same_file(job.resume, last):
        return []
    return [(Path(job.resume), f"--resume {job.resume}")]


def run_file_roles(best: str | os.PathLike, flag: str) -> list[tuple[Path, str]]:
    """The files a run whose best weights are ``best`` (given to ``flag``) writes, each with
    how an error names it: ``-a a.pth``, ``-a a.pth (its a.last.pth)``."""
    paths = run_files(best)
    return [(paths[0], f"{flag} {best}"), *((path, f"{flag} {best} (its {path.name})") for path in paths[1:])]


def load_backbone(model: nn.Module, state_dict: Mapping, head: str, source: str) -> None:
    """Load every weight but the classifier ``head`` from ``state_dict`` into ``model``;
    every non-head tensor of the model must be there with the same shape (``source`` names
    the file and flag in the error)."""
    own = model.state_dict()
    prefix = head + "."
    for key, tensor in own.items():
        if key.startswith(prefix):
            continue
        if key not in state_dict:
            raise UserError(f"{source}: tensor {key} is missing; is it a checkpoint of this --arch?")
        if state_dict[key].shape != tensor.shape:
            raise UserError(f"{source}: tensor {key} has shape {list(state_dict[key].shape)}, the model "
                            f"expects {list(tensor.shape)}; is it a checkpoint of this --arch?")
    check_weights_fit(state_dict, {k: v for k, v in own.items() if not k.startswith(prefix)}, source)
    missing, _ = model.load_state_dict(
        {k: v for k, v in state_dict.items() if not k.startswith(prefix) and k in own}, strict=False)
    assert all(k.startswith(prefix) for k in missing), missing
