"""The study's runs: pre-training, fine-tuning with T, the data set statistics; each cached
under OUT by a hash of everything that changes its numbers, and resumable.

SIGINT or SIGTERM stop the study at safe points (:class:`StopSignals`); a training run
stopped in the middle continues from its checkpoint at the next call.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import time
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from study.presets import RECIPE, Study, Target, dataset_option, digest, target_configs
from utils import UserError, write_atomically


@contextlib.contextmanager
def training_log(path: Path):
    """An ``announce`` function that appends a training run's lines to its own log file
    instead of the console."""
    with open(path, "a") as handle:
        yield lambda text: print(text, file=handle, flush=True)


def training_job(study: Study, dataset: str, last: Path, device: str, **settings):
    """The settings of one of the study's training runs; it resumes from ``last`` when a
    stopped run left it."""
    import engine

    return engine.TrainJob(dataset=dataset, arch=study.arch, batch_size=study.batch_size, device=device,
                           resume=str(last) if last.exists() else None, overwrite=not last.exists(), progress=False,
                           **settings)


# ------------------------------------------------------------------------ stop signals

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StudyStopped(Exception):
    """SIGINT or SIGTERM stopped the study; the exit status is 128 + ``signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by signal {signum}")
        self.signum = int(signum)


class StopSignals:
    """SIGINT and SIGTERM for the whole study, seen at safe points (:meth:`check`, between
    and after runs) as :class:`StudyStopped`.

    A training run installs its own handler (it saves its checkpoint and returns 128 +
    the signal), and one that arrives during its last validation is not returned as a
    status; so every signal is also written to a pipe (``signal.set_wakeup_fd``, which the
    interpreter does whatever Python handler is installed) that :meth:`check` reads."""

    def __enter__(self) -> "StopSignals":
        self.signum = 0
        self._read, self._write = os.pipe()
        for fd in (self._read, self._write):
            os.set_blocking(fd, False)
        self._handlers = {signum: signal.signal(signum, self._record) for signum in STOP_SIGNALS}
        self._wakeup = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        return self

    def _record(self, signum, frame) -> None:
        self.signum = self.signum or signum

    def check(self) -> None:
        """Raise :class:`StudyStopped` when a stop signal arrived since the study began."""
        with contextlib.suppress(BlockingIOError):
            while data := os.read(self._read, 512):
                self.signum = self.signum or next((b for b in data if b in STOP_SIGNALS), 0)
        if self.signum:
            raise StudyStopped(self.signum)

    def __exit__(self, *exc) -> None:
        signal.set_wakeup_fd(self._wakeup)
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        os.close(self._read)
        os.close(self._write)


def _no_wakeup_fd_in_children() -> None:
    """A forked loading worker must not write its own signals (a worker's shutdown SIGTERM)
    into the study's pipe."""
    with contextlib.suppress(ValueError, OSError):
        signal.set_wakeup_fd(-1)


os.register_at_fork(after_in_child=_no_wakeup_fd_in_children)


def stopped_or_failed(status: int, message: str) -> Exception:
    """What a training run's non-zero exit status means for the study."""
    if status - 128 in STOP_SIGNALS:
        return StudyStopped(status - 128)
    return UserError(f"{message} (status {status}); run reproduce.py again to resume it")


# --------------------------------------------------------------------------- the runs


def pretrain(study: Study, out: Path, device: str) -> Path:
    import engine

    key = [RECIPE, study.source, study.pretrain_epochs, study.pretrain_lr_step, study.pretrain_lr,
           study.pretrain_weight_decay, study.pretrain_norm_weight_decay, study.batch_size, study.arch,
           device_kind(device)]
    if (study.pretrain_optimizer, study.pretrain_warmup_epochs) != ("sgd", 0):  # the older keys stay as they were
        key += [study.pretrain_optimizer, study.pretrain_warmup_epochs]
    run = out / f"pretrain-{digest(key)}"
    done = run / "done.json"
    if done.exists():
        return run
    run.mkdir(parents=True, exist_ok=True)
    job = training_job(study, f"synthetic:{study.source}", run / "a.last.pth", device, seed=0,
                       max_epoch=study.pretrain_epochs, lr_step=study.pretrain_lr_step, lr=study.pretrain_lr,
                       weight_decay=study.pretrain_weight_decay, norm_weight_decay=study.pretrain_norm_weight_decay,
                       optimizer=study.pretrain_optimizer, warmup_epochs=study.pretrain_warmup_epochs)
    tick = time.perf_counter()
    with training_log(run / "train.out") as announce:
        status = engine.pretrain(job, run / "r.pth", run / "a.pth", announce=announce)
    if status != 0:
        raise stopped_or_failed(status, "pre-training stopped")
    seconds = time.perf_counter() - tick  # of the call that finished it (a resumed run: its last part)
    record = {"study": asdict(study), "seconds": seconds, "resumed": job.resume is not None}
    write_atomically(done, lambda f: f.write(json.dumps(record, default=list)), "w")
    return run


# The training precision the study uses on a GPU (engine.TrainJob's defaults: no autocast, TF32 on).
GPU_PRECISION = "amp-off/tf32-on"


def device_kind(device: str) -> str:
    """What of the device changes a run's numbers: its type (cpu or cuda), not its index, and
    on a GPU the precision it trains in (the CPU's runs have no precision choice)."""
    kind = str(device).split(":")[0]
    return kind if kind == "cpu" else f"{kind}/{GPU_PRECISION}"


@functools.lru_cache(maxsize=2)
def source_split(source: str, size: int):
    """The source task's training images, generated once per process (every run needs them)."""
    from data import build_dataset, build_transform

    return build_dataset(f"synthetic:{source}", None, "train", build_transform(False, size))


@functools.lru_cache(maxsize=4)
def pretrained_tools(arch: str, pretrained: Path, device: str):
    """The T meter (theta_r and theta_A read once) and theta_A's feature extractor, shared
    by every fine-tuned run of the study."""
    from metrics import TransferabilityMeter
    from metrics.dataset_stats import PenultimateFeatures
    from models import layer_groups
    from utils import load_state_dict_safely, resolve_device

    theta_r, theta_a = load_state_dict_safely(pretrained / "r.pth"), load_state_dict_safely(pretrained / "a.pth")
    meter = TransferabilityMeter(layer_groups(arch, theta_a), theta_r, theta_a, resolve_device(device))
    return meter, PenultimateFeatures(arch, pretrained / "a.pth")


def finetune_and_measure(study: Study, pretrained: Path, target: Target, seed: int, out: Path, device: str) -> dict:
    """Fine-tune one target with one seed, then measure T; cached in the run's result.json."""
    import engine
    from utils import load_state_dict_safely

    dataset = dataset_option(target.options, seed)
    key = digest([RECIPE, pretrained.name, dataset, study.finetune_epochs, target.lr, study.finetune_weight_decay,
                  study.batch_size, seed, device_kind(device), "amp-off"])
    run = out / "finetune" / f"{target.name}-seed{seed}-{key}"
    result_path = run / "result.json"
    if result_path.exists():
        return {**json.loads(result_path.read_text()), "folder": run.name}
    run.mkdir(parents=True, exist_ok=True)
    b = run / "b.pth"
    job = training_job(study, dataset, run / "b.last.pth", device, seed=seed, max_epoch=study.finetune_epochs,
                       lr=target.lr, weight_decay=study.finetune_weight_decay)
    tick = time.perf_counter()
    with training_log(run / "train.out") as announce:
        status = engine.finetune(job, pretrained / "a.pth", b, announce=announce)
    if status != 0:
        raise stopped_or_failed(status, f"fine-tuning {target.name} (seed {seed}) stopped")
    seconds = time.perf_counter() - tick
    meter, _ = pretrained_tools(study.arch, pretrained, device)
    transfer = meter(load_state_dict_safely(b))
    history = [json.loads(line) for line in (run / "b.log.jsonl").read_text().splitlines()]
    best = max(history, key=lambda entry: entry["val_acc"])
    result = {
        "name": target.name, "knob": target.knob, "seed": seed, "dataset": dataset, "options": target.options,
        "lr": target.lr, "T": transfer.overall,
        "layers": [layer.transferability for layer in transfer.layers],
        "layer_names": [layer.name for layer in transfer.layers],
        "best_val_acc": best["val_acc"], "best_epoch": best["epoch"], "final_train_acc": history[-1]["train_acc"],
        "seconds": seconds,
    }
    write_atomically(result_path, lambda f: f.write(json.dumps(result, indent=2)), "w")
    return {**result, "folder": run.name}


def measure_dataset(study: Study, pretrained: Path, options: dict, seed: int, out: Path, device: str) -> dict:
    """N, G and D of one target task (features of theta_A, cached under OUT/cache)."""
    from data import build_dataset, build_transform
    from metrics.dataset_stats import dataset_statistics
    from engine.runs import input_size
    from utils import resolve_device

    _, extractor = pretrained_tools(study.arch, pretrained, device)
    dataset = dataset_option(options, seed)
    size = input_size(study.arch, None, dataset)  # the size training fed the network (a ViT: its own)
    target = build_dataset(dataset, None, "train", build_transform(False, size))
    stats = dataset_statistics(target, source_split(study.source, size), extractor, max_samples=study.max_samples,
                               cache_dir=out / "cache", target_key=dataset, source_key=f"synthetic:{study.source}",
                               device=resolve_device(device), seed=0, progress=False)
    return {**stats, "estimators": measure_estimators(extractor, target, dataset, out, device)}


def measure_estimators(extractor, target, dataset: str, out: Path, device: str) -> dict:
    """LogME, LEEP, NCE, H-score and k-NN of theta_A on every training image of one target
    (features and the source head's logits of one pass, cached under OUT/cache)."""
    from metrics.dataset_stats import cached_outputs
    from metrics.estimators import estimate_all
    from utils import resolve_device

    extracted = cached_outputs(out / "cache", extractor, dataset, "train", target, device=resolve_device(device),
                               progress=False, logits=True)
    return estimate_all(extracted.features, extracted.logits, extracted.labels)


def run_study(study: Study, out: Path, device: str, stop: StopSignals,
              label: str = "study") -> tuple[Path, list[dict], dict]:
    """Pre-train, fine-tune and measure every target of ``study`` (cached runs are read
    back); returns the pre-training run's folder, the runs and N, G, D per data set. A stop
    signal is checked before and after every run."""
    jobs = [(target, seed) for target in target_configs(study) for seed in study.seeds]
    progress = tqdm(total=1 + len(jobs), desc=label, unit="run")
    try:
        progress.set_postfix_str("pre-training")
        stop.check()
        pretrained = pretrain(study, out, device)
        progress.update()
        runs = []
        for target, seed in jobs:
            stop.check()
            progress.set_postfix_str(f"{target.name} seed {seed}")
            runs.append(finetune_and_measure(study, pretrained, target, seed, out, device))
            progress.update()
    finally:
        progress.close()
    datasets = {run["dataset"]: (run["options"], run["seed"]) for run in runs}
    stats = {}
    for name, (options, seed) in datasets.items():
        stop.check()
        stats[name] = measure_dataset(study, pretrained, options, seed, out, device)
    stop.check()
    return pretrained, runs, stats


