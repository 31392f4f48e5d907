"""A training run's files, written atomically, and resuming from them.

Files of a run whose best weights go to ``OUT.pth``: ``OUT.pth`` (plain state dict, written
on improvement), ``OUT.last.pth`` (full checkpoint: weights, optimizer, scheduler, scaler,
RNG states, the position inside the epoch and the history; every epoch and on
SIGTERM/SIGINT) and ``OUT.log.jsonl`` (one JSON object per epoch). Together with the
seeding rules of :mod:`data.loading`, a run resumed from any ``.last.pth`` ends with the
same weights, bit for bit on the CPU, as a run that was never stopped.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from engine.optim import Optimization
from engine.processes import ProcessInfo
from utils import (UserError, check_input_file, check_weights_fit, check_writable, check_zip_checksums, run_files,
                   torch_load_file, write_atomically)

CHECKPOINT_FORMAT = "transferability-train-1"

# What a resumed run must share with the run that wrote its checkpoint: refused when missing
# (a checkpoint of an older version) or different.
RESUME_KEYS = ("arch", "dataset", "augment", "color_jitter")
# What it must share as well, compared where the checkpoint records it: another schedule, batch
# size, seed or number of processes would resume a different run (a cosine schedule climbing
# back up, the wrong samples skipped).
SAME_WHEN_RESUMING = ("max_epoch", "batch_size", "lr", "momentum", "weight_decay", "norm_weight_decay", "lr_step",
                      "seed", "amp", "decode", "world_size", "optimizer", "warmup_epochs")

def check_outputs(outputs: Mapping[Path, str], overwrite: bool, resume: bool) -> None:
    """Refuse to replace a file unless --overwrite or --resume; fail early on unwritable
    paths. ``outputs`` maps each file to the flag that names it."""
    for path, flag in outputs.items():
        check_writable(path, flag)
        if path.exists() and not (overwrite or resume):
            raise UserError(f"{flag} {path}: exists; pass --overwrite to replace it or --resume to continue its run")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(process: ProcessInfo) -> dict:
    """The global generators' states (torch's CPU generator, numpy, Python, and on a GPU
    every rank's own CUDA generator, listed by rank), as tensors and numbers that
    ``torch.load(weights_only=True)`` reads back. A CPU run never touches CUDA."""
    keys, pos, has_gauss, cached = np.random.get_state()[1:]
    cuda_by_rank = []
    if process.device.type == "cuda":
        own = torch.cuda.get_rng_state(process.device)
        cuda_by_rank = [own]
        if process.distributed:  # every rank calls save_last at the same step
            cuda_by_rank = [None] * process.world_size
            dist.all_gather_object(cuda_by_rank, own)
    return {
        "torch": torch.get_rng_state(),
        "cuda_by_rank": cuda_by_rank,
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": list(random.getstate()[1]),
    }


def set_rng_state(state: Mapping, process: ProcessInfo) -> str | None:
    """Restore :func:`rng_state`; this rank takes its own CUDA state. Returns a note when
    the CUDA states cannot be restored (another number of processes wrote them); no
    registered architecture draws on them (no dropout), so the results are unaffected."""
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached"]))
    random.setstate((3, tuple(state["python"]), None))
    if process.device.type != "cuda":
        return None
    by_rank = state.get("cuda_by_rank", [])  # older checkpoints: "cuda", rank 0's devices; not restored
    if len(by_rank) != process.world_size:
        return (f"the CUDA random state of the {len(by_rank)} process(es) that wrote the checkpoint is not "
                f"restored in a run of {process.world_size}; the registered architectures do not use it")
    torch.cuda.set_rng_state(by_rank[process.rank], process.device)
    return None


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A training checkpoint written by :class:`Checkpointer`, read with ``weights_only=True``."""
    try:  # a named pipe would block torch.load forever; a link loop is no missing file
        path = check_input_file(path, "the run's .last.pth checkpoint")
    except UserError as err:
        raise UserError(f"--resume {err}") from None
    check_zip_checksums(path, "--resume")
    try:
        checkpoint = torch_load_file(path)
    except Exception as err:  # noqa: BLE001 - any failure to read is the user's file
        raise UserError(f"--resume {path}: not a readable training checkpoint ({str(err).splitlines()[0][:120]})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"--resume {path}: not a training checkpoint of this project (no '{CHECKPOINT_FORMAT}' "
                        "format tag); give the run's .last.pth file")
    checkpoint["path"] = str(path)  # for the messages of what is done with it
    return checkpoint


def check_resume(checkpoint: Mapping, settings, world_size: int = 1) -> None:
    """A resume checkpoint must come from a run with the same architecture, data set,
    augmentation (:data:`RESUME_KEYS`), schedule, batch size, seed, precision and number of
    processes (:data:`SAME_WHEN_RESUMING`); ``settings`` has these as attributes (a
    :class:`engine.runs.TrainJob`), and ``resume``, the checkpoint's path."""
    saved = checkpoint.get("args", {})
    current = {key: getattr(settings, key, None) for key in (*RESUME_KEYS, *SAME_WHEN_RESUMING)}
    current["world_size"] = world_size
    for key in RESUME_KEYS:
        if key not in saved:
            raise UserError(f"--resume {settings.resume}: was written by an older version that did not record "
                            f"--{key}; start a new run")
    for key in (*RESUME_KEYS, *SAME_WHEN_RESUMING):
        if key not in saved or saved[key] == current[key]:
            continue
        if key == "world_size":
            raise UserError(f"--resume {settings.resume}: was written by a run of {saved[key]} process(es), not "
                            f"{world_size}; resume with as many processes (torchrun --nproc_per_node ...)")
        raise UserError(f"--resume {settings.resume}: was written by a run with --{key} {saved[key]}, "
                        f"not {current[key]}; resume with the same --{key} or start a new run")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel and torch.compile wrappers."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return getattr(model, "_orig_mod", model)  # torch.compile


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies in the standard (contiguous) layout, whatever the model's memory format."""
    return {k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
            for k, v in unwrap(model).state_dict().items()}


def lock_file(path: str | os.PathLike) -> Path:
    """The lock file of an output: ``.NAME.lock`` in the output's folder, with symbolic links
    in the folder's path resolved, so that every spelling of one output has one lock file (a
    name too long to take the suffix is shortened and made unique by a hash)."""
    path = Path(path)
    name = path.name
    if len(os.fsencode(name)) > 200:
        name = os.fsdecode(os.fsencode(name)[:160]) + "-" + hashlib.sha1(os.fsencode(name)).hexdigest()[:16]
    return Path(os.path.realpath(path.parent)) / f".{name}.lock"


class RunLock:
    """Locks on every file a run writes (``.NAME.lock`` beside each, :func:`lock_file`), held
    while the run writes them: a second run that would write any of the same files (``-b x.pth``
    and ``-b x.pt`` share ``x.last.pth``) is refused instead of mixing its files with the first's.

    Each is an advisory ``flock``, which the operating system releases when the holding process
    ends in any way: a lock left by a dead process never blocks (the file holds the last
    holder's pid, host and start time, for the message). A lock counts only while its file is
    still the one at the path (checked after locking), so removing the file at release cannot
    let two processes hold the lock at once.
    """

    def __init__(self, outputs: Mapping[Path, str]) -> None:
        by_lock = {lock_file(path): (path, flag) for path, flag in outputs.items()}
        self.files = sorted(by_lock.items())  # one order for every run
        self.handles: list[tuple[Path, object]] = []

    def acquire(self) -> None:
        try:
            for lock_path, (path, flag) in self.files:
                self.handles.append((lock_path, self._lock(lock_path, path, flag)))
        except BaseException:
            self.release()
            raise

    @staticmethod
    def _lock(lock_path: Path, path: Path, flag: str):
        import fcntl
        import socket
        import time

        lock_path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            handle = open(lock_path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise UserError(f"{flag} {path}: another run is writing this file ({holder}); wait for it to end "
                                f"or stop it, or choose other output paths") from None
            try:
                same = os.path.samestat(os.fstat(handle.fileno()), os.stat(lock_path))
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()  # the holder removed it between our open and our lock: take the new one
        else:
            raise UserError(f"{flag} {path}: its lock file {lock_path} keeps changing; is another run starting?")
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        return handle

    def release(self) -> None:
        while self.handles:
            lock_path, handle = self.handles.pop()
            with contextlib.suppress(OSError):
                lock_path.unlink(missing_ok=True)  # before closing: a waiter then finds the file gone
            handle.close()  # closing releases the flock


def lock_outputs(outputs: Mapping[Path, str], process: ProcessInfo) -> RunLock:
    """The run's :class:`RunLock` on ``outputs`` (file: the flag that names it), taken by the main
    process (the one that writes); every process raises the refusal, so that none goes on alone."""
    lock, refused = RunLock(outputs), None
    if process.is_main:
        try:
            lock.acquire()
        except UserError as err:
            refused = err
    if process.all_reduce([float(refused is not None)], op=dist.ReduceOp.MAX)[0]:
        raise refused or UserError(f"{', '.join(map(str, outputs))}: another run is writing these files; "
                                   "wait for it to end")
    return lock


@dataclass
class RunProgress:
    """Where a run stands: finished epochs, steps done in the next one and its statistics
    so far (``partial``), the best validation accuracy and the per-epoch history."""

    epoch: int = 0
    step: int = 0
    best_acc: float = -1.0
    best_epoch: int = -1
    history: list[dict] = field(default_factory=list)
    partial: dict = field(default_factory=dict)


class Checkpointer:
    """Owns the best / last / log files of a run whose best weights go to ``best_path``.

    Only the main process writes; every write is atomic, so a crash leaves the previous
    files whole. Every process calls :meth:`save_last` at the same step (it gathers the
    ranks' CUDA random states on a GPU).
    """

    def __init__(self, best_path: str | os.PathLike, process: ProcessInfo) -> None:
        self.best_path, self.last_path, self.log_path = run_files(best_path)
        self.process = process
        self.wrote_best = False  # whether this run has written best_path

    def _unchanged(self) -> str:
        """What a failed write leaves: the end of its one-line message."""
        on_disk = [str(path) for path in (self.best_path, self.last_path, self.log_path) if path.exists()]
        kept = f"the run's files on disk are as they were: {', '.join(on_disk)}" if on_disk else "no file of the run exists yet"
        return f"the run stopped here; {kept}"

    def save_best(self, model: nn.Module) -> None:
        if self.process.is_main:
            state = model_state(model)
            write_atomically(self.best_path, lambda handle: torch.save(state, handle), unchanged=self._unchanged())
        self.wrote_best = True

    def save_last(self, model: nn.Module, optimization: Optimization, progress: RunProgress, args: dict) -> None:
        """The full checkpoint (``.last.pth``) and the log of finished epochs."""
        rng = rng_state(self.process)
        if not self.process.is_main:
            return
        state = {
            "format": CHECKPOINT_FORMAT, "model": model_state(model), **optimization.state_dicts(),
            "epoch": progress.epoch, "step": progress.step, "best_acc": progress.best_acc,
            "best_epoch": progress.best_epoch, "history": progress.history, "partial": progress.partial,
            "rng": rng, "args": args,
        }
        write_atomically(self.last_path, lambda handle: torch.save(state, handle), unchanged=self._unchanged())
        text = "".join(json.dumps(entry) + "\n" for entry in progress.history)
        write_atomically(self.log_path, lambda handle: handle.write(text), mode="w", unchanged=self._unchanged())

    def restore(self, checkpoint: Mapping, model: nn.Module, optimization: Optimization) -> tuple[RunProgress, str | None]:
        """Load a checkpoint from :func:`load_checkpoint` into the model, the optimizer,
        scheduler and scaler, and the global RNGs; return where the run stood, and a note
        when a random state could not be restored."""
        check_weights_fit(checkpoint["model"], unwrap(model).state_dict(), f"--resume {checkpoint.get('path', '')}")
        unwrap(model).load_state_dict(checkpoint["model"])
        optimization.load_state_dicts(checkpoint)
        note = set_rng_state(checkpoint["rng"], self.process)
        progress = RunProgress(checkpoint["epoch"], checkpoint["step"], checkpoint["best_acc"],
                               checkpoint["best_epoch"], list(checkpoint["history"]),
                               dict(checkpoint.get("partial") or {}))
        return progress, note


class StopRequests:
    """Turns SIGTERM/SIGINT into a flag (``signum``) that the loop checks after each step."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequests":
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def requested(self) -> bool:
        return bool(self.signum)

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
