"""The paper's study end to end, offline, on the embedded synthetic benchmark.

    python reproduce.py                 # the default study (about half an hour on a 2-core CPU)
    python reproduce.py --quick         # a smaller one, about 5 minutes on a 2-core CPU (293 s alone)
    python reproduce.py --device cuda --out runs/gpu_study

It pre-trains a ResNet-20 on the synthetic source task, fine-tunes it on a grid of synthetic
targets that vary domain gap, intraclass variance and data amount one at a time (several
levels each, several seeds), measures T for each, and N, G, D for each target, fits the
regression, draws the figures, and writes ``OUT/report.md``: the table in the paper's
format, the fitted equation, the figures, and a verdict on each of the paper's two findings.

Every finished run is cached under OUT by a hash of its configuration: a killed study
resumes where it stopped (an interrupted training run continues from its checkpoint), and a
second call only redoes what changed. SIGINT (Ctrl-C) or SIGTERM stops the study with one
line and exit status 128 + the signal number (130, 143); running it again resumes it.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import math
import os
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from utils import OneLineArgumentParser, UserError, add_device_flag, positive_int, run_cli, write_atomically

ARCH = "resnet20"


# Bumped whenever the training recipe changes the numbers a run produces (augmentation,
# head initialisation, ...): part of every run's cache key, so no stale run is reused.
RECIPE = "recipe-2"
# sum over pre-training steps of lr x weight decay for the seed's ImageNet run: 5005 steps per
# epoch (batch 256), 40 epochs each at lr 0.1, 0.01 and 0.001, weight decay 1e-4
IMAGENET_LR_WD_BUDGET = 5005 * 40 * (0.1 + 0.01 + 0.001) * 1e-4


@dataclass(frozen=True)
class Study:
    """Everything that decides the study's numbers (and so its cache keys)."""

    source: str  # synthetic source task options
    pretrain_epochs: int
    pretrain_lr_step: int
    target: dict  # base target task: classes, n, n_val, gap, var, size
    levels: dict  # knob -> the values it takes while the others stay at the base ("lr": fine-tuning lr)
    seeds: tuple  # one target task (its classes) and one fine-tuning seed each
    finetune_epochs: int
    pretrain_lr: float = 0.1
    pretrain_weight_decay: float = 1e-4
    pretrain_norm_weight_decay: float | None = None  # BatchNorm's scales and shifts; None: as the others
    finetune_lr: float = 0.01  # the seed's
    finetune_weight_decay: float = 1e-4  # the seed's
    batch_size: int = 128
    max_samples: int = 1000  # images per dataset for G and D
    arch: str = ARCH
    extra: dict = field(default_factory=dict)


PRESETS = {
    # The paper's regime: pre-training that leaves the initialisation (a lr x weight-decay
    # budget close to 120 ImageNet epochs), a source task harder than the targets, targets
    # that do not saturate, the seed's fine-tuning recipe at several learning rates.
    "paper": Study(
        source="source,classes=200,n=150,n_val=10,var=0.5", pretrain_epochs=36, pretrain_lr_step=12,
        pretrain_weight_decay=7e-3, pretrain_norm_weight_decay=1e-4,
        target={"classes": 20, "n": 100, "n_val": 50, "gap": 0.5, "var": 1.0, "size": 32},
        levels={"gap": (0.0, 0.5, 1.0), "var": (0.8, 1.0, 1.4), "n": (50, 100, 200), "lr": (0.003, 0.01, 0.03)},
        seeds=(1, 2, 3), finetune_epochs=30),
    # A check of the whole pipeline in minutes; its pre-training is far shorter than the
    # paper's, so its verdicts are not evidence.
    "quick": Study(
        source="source,classes=50,n=100,n_val=10,var=0.5", pretrain_epochs=12, pretrain_lr_step=4,
        pretrain_weight_decay=7e-3, pretrain_norm_weight_decay=1e-4,
        target={"classes": 10, "n": 60, "n_val": 30, "gap": 0.5, "var": 1.0, "size": 32},
        levels={"gap": (0.0, 1.0), "var": (0.8, 1.4), "n": (30, 120), "lr": (0.003, 0.03)},
        seeds=(1, 2), finetune_epochs=10, max_samples=500),
    # A few seconds: for the test suite, not for conclusions.
    "tiny": Study(
        source="source,classes=6,n=12,n_val=4,size=16", pretrain_epochs=1, pretrain_lr_step=1,
        target={"classes": 3, "n": 8, "n_val": 4, "gap": 0.5, "var": 0.3, "size": 16},
        levels={"gap": (0.0, 1.0), "var": (0.1, 1.0), "n": (4, 16), "lr": (0.003,)},
        seeds=(1,), finetune_epochs=1, batch_size=16, max_samples=64),
}
DEFAULT_PRESET = "paper"
KNOBS = {"gap": "domain gap", "var": "intraclass variance", "n": "images per class", "lr": "fine-tuning lr"}


def source_images(study: Study) -> int:
    from data.synthetic import parse_options

    config = parse_options(study.source)
    return config.classes * config.n


def pretraining_budget(study: Study) -> float:
    """sum over pre-training steps of lr x weight decay of the weights (the step schedule
    divides the lr by 10 every ``pretrain_lr_step`` epochs). The weights that BatchNorm
    follows are scale-invariant: weight decay only shrinks their norm, which speeds up their
    change of direction; this budget is what sets how far that goes."""
    steps = math.ceil(source_images(study) / study.batch_size)
    return steps * study.pretrain_weight_decay * sum(
        study.pretrain_lr * 0.1 ** (epoch // study.pretrain_lr_step) for epoch in range(study.pretrain_epochs))


def digest(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Target:
    """One point of the grid: a target task and the fine-tuning learning rate."""

    name: str  # "base", or the knob that differs from the base and its value, e.g. "gap=0.25"
    knob: str | None  # None for the base
    options: dict  # synthetic target options
    lr: float


def target_configs(study: Study) -> list[Target]:
    """The base target and every level of every knob, once each.

    The base (the study's target at its fine-tuning lr) comes first, named ``base``; the
    others are named by the knob that differs from it, e.g. ``gap=0.25`` or ``lr=0.003``.
    """
    base = Target("base", None, dict(study.target), study.finetune_lr)
    targets = {json.dumps([base.options, base.lr], sort_keys=True): base}
    for knob, values in study.levels.items():
        for value in values:
            options = dict(study.target) if knob == "lr" else {**study.target, knob: value}
            lr = float(value) if knob == "lr" else study.finetune_lr
            targets.setdefault(json.dumps([options, lr], sort_keys=True), Target(f"{knob}={value}", knob, options, lr))
    return list(targets.values())


def knob_levels(study: Study, knob: str) -> list[Target]:
    """The targets of one knob's panel, in the order of its levels (the base among them)."""
    base = target_configs(study)[0]
    value_of = {"lr": lambda t: t.lr}.get(knob, lambda t: t.options[knob])
    by_value = {value_of(t): t for t in target_configs(study) if t.knob in (None, knob)}
    return [by_value[v] if v in by_value else base for v in study.levels[knob]]


def dataset_option(options: dict, seed: int) -> str:
    return "synthetic:" + ",".join(f"{k}={v}" for k, v in sorted({**options, "seed": seed}.items()))


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
    run = out / f"pretrain-{digest(key)}"
    done = run / "done.json"
    if done.exists():
        return run
    run.mkdir(parents=True, exist_ok=True)
    job = training_job(study, f"synthetic:{study.source}", run / "a.last.pth", device, seed=0,
                       max_epoch=study.pretrain_epochs, lr_step=study.pretrain_lr_step, lr=study.pretrain_lr,
                       weight_decay=study.pretrain_weight_decay, norm_weight_decay=study.pretrain_norm_weight_decay)
    tick = time.perf_counter()
    with training_log(run / "train.out") as announce:
        status = engine.pretrain(job, run / "r.pth", run / "a.pth", announce=announce)
    if status != 0:
        raise stopped_or_failed(status, "pre-training stopped")
    seconds = time.perf_counter() - tick  # of the call that finished it (a resumed run: its last part)
    write_atomically(done, lambda f: f.write(json.dumps({"study": asdict(study), "seconds": seconds}, default=list)), "w")
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


@functools.lru_cache(maxsize=1)
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
        return json.loads(result_path.read_text())
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
    return result


def measure_dataset(study: Study, pretrained: Path, options: dict, seed: int, out: Path, device: str) -> dict:
    """N, G and D of one target task (features of theta_A, cached under OUT/cache)."""
    from data import build_dataset, build_transform
    from metrics.dataset_stats import dataset_statistics
    from utils import resolve_device

    _, extractor = pretrained_tools(study.arch, pretrained, device)
    dataset = dataset_option(options, seed)
    size = options["size"]
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


# ----------------------------------------------------------------------- the findings


SIGNIFICANCE = 0.05


def finding1(fit) -> dict:
    """Verdict on "domain gap has a smaller effect than intraclass variance and data amount",
    from the standardised coefficients of ln T and their p values. A G whose coefficient is
    not significant is reported as "no detectable effect of G", not as support; a G that is
    significant and the smallest of the three in magnitude supports the claim."""
    std = fit.standardized.coefficients
    p = fit.standardized.p_values
    gap, var, amount = abs(std["G"]), abs(std["D"]), abs(std["log_N"])
    smallest = gap < var and gap < amount
    if p["G"] >= SIGNIFICANCE:
        verdict = "no detectable effect of G"
    else:
        verdict = "supported" if smallest else "not supported"
    return {
        "claim": "Domain gap has a smaller effect on transferability than the downstream intraclass "
                 "variance and data amount.",
        "verdict": verdict,
        "evidence": (f"standardised coefficients of ln T: G {std['G']:+.3f} (p = {p['G']:.2g}), "
                     f"D {std['D']:+.3f} (p = {p['D']:.2g}), ln N {std['log_N']:+.3f} (p = {p['log_N']:.2g}); "
                     f"|G| is {'the smallest' if smallest else 'not the smallest'}; R^2 = {fit.r2:.2f}, n = {fit.n}"),
    }


def finding2_verdict(runs: list[dict]) -> tuple[dict, list]:
    from metrics.curve_shape import curve_shape, finding2

    shapes = [curve_shape(run["layers"]) for run in runs]
    verdict = finding2(shapes)
    return {
        "claim": "Most of the layer-wise transferabilities are not decreasing with depth.",
        "verdict": "supported" if verdict.supported else "not supported",
        "evidence": verdict.summary(),
        "statistics": verdict.as_dict(),
    }, shapes


def paper_baseline() -> dict:
    """The same two verdicts on the paper's own data: its ResNet-50 table (finding 1) and
    its ResNet-50 layer-wise curves (finding 2)."""
    from metrics.curve_shape import finding2, read_paper_curves, shape_table
    from metrics.regression import fit_log_transferability, read_table

    fit = fit_log_transferability(read_table(Path(__file__).resolve().parent / "data" / "paper_table.csv"))
    shapes = shape_table(read_paper_curves())
    verdict = finding2(shape for _, shape in shapes)
    return {"fit": fit, "finding1": finding1(fit), "shapes": shapes,
            "finding2": {"verdict": "supported" if verdict.supported else "not supported",
                         "evidence": verdict.summary(), "statistics": verdict.as_dict()}}


# --------------------------------------------------------------------------- the report


def spread(values: list[float], digits: int) -> str:
    """``mean ± sample std`` (just the value for one)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def machine_line(elapsed: float, device: str) -> str:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    where = torch.cuda.get_device_name() if device.startswith("cuda") else f"{cpu}, {os.cpu_count()} cores"
    return (f"torch {torch.__version__}, Python {platform.python_version()}, {device} ({where}); "
            f"this call {elapsed / 60:.1f} min")


def report_markdown(study: Study, preset: str, runs: list[dict], stats: dict, fit, verdicts: list[dict],
                    shapes: list, paper: dict, diagnostics: dict, figures: dict, timing: dict,
                    agreements: list[dict]) -> str:
    """OUT/report.md, section by section."""
    return "\n".join([*report_header(study, preset, runs, diagnostics, timing), *report_table(runs, stats),
                      *report_findings(study, fit, verdicts, paper, figures),
                      *report_curves(runs, shapes, paper, figures), *report_estimators(runs, stats, agreements)])


def report_header(study: Study, preset: str, runs: list[dict], diagnostics: dict, timing: dict) -> list[str]:
    """What ran, on what, and how far pre-training moved each layer."""
    from metrics import COS_INIT_WARNING

    lines = [
        "# Transferability study on the synthetic benchmark", "",
        f"Preset `{preset}`: {study.arch} pre-trained on `synthetic:{study.source}` for {study.pretrain_epochs} "
        f"epochs (SGD, lr {study.pretrain_lr:g} divided by 10 every {study.pretrain_lr_step} epochs, weight decay "
        f"{study.pretrain_weight_decay:g}"
        + (f" (BatchNorm's parameters: {study.pretrain_norm_weight_decay:g})"
           if study.pretrain_norm_weight_decay is not None else "")
        + f", batch {study.batch_size}), fine-tuned with the seed's recipe (SGD, cosine "
        f"schedule, weight decay {study.finetune_weight_decay:g}, batch {study.batch_size}) for "
        f"{study.finetune_epochs} epochs on synthetic targets that vary one knob at a time around "
        f"`{json.dumps(study.target)}` at lr {study.finetune_lr:g}; seeds {list(study.seeds)} (each seed is "
        f"another target task and another fine-tuning run). G and D use theta_A's penultimate features "
        f"of up to {study.max_samples} images per data set.", "",
        f"Run: {timing['machine']}; compute in the cached runs: pre-training {timing['pretrain']}, fine-tuning "
        f"{timing['finetune'] / 60:.1f} min over {len(runs)} runs.", "",
        "## Did pre-training leave the initialisation?", "",
        f"sum of lr x weight decay over pre-training: {diagnostics['budget']:.2f} (the seed's 120 ImageNet epochs: "
        f"{IMAGENET_LR_WD_BUDGET:.2f}); best source validation accuracy {diagnostics['source_acc']:.1f} %. "
        f"Per layer, D(theta_r, theta_A) and the cosine similarity of theta_r and theta_A (median "
        f"{diagnostics['median_cos']:.3f}; 1 would mean pre-training did not move the weights' direction):", "",
        "layer | " + " | ".join(diagnostics["names"]),
        "--- | " + " | ".join(":---:" for _ in diagnostics["names"]),
        "d_init | " + " | ".join(f"{v:.3g}" for v in diagnostics["d_init"]),
        "cos_init | " + " | ".join(f"{v:.3f}" for v in diagnostics["cos_init"]), "",
        *([f"**Pre-training barely left the initialisation (median cosine {diagnostics['median_cos']:.2f} > "
           f"{COS_INIT_WARNING}): T compares two nearly equal starting points, so the verdicts below are not "
           "evidence about the paper.**", ""] if diagnostics["median_cos"] > COS_INIT_WARNING else []),
    ]
    return lines


def report_table(runs: list[dict], stats: dict) -> list[str]:
    """The paper's Section 3 table, mean ± std over seeds, and the saturation check."""
    lines = [
        "## Table (the paper's Section 3 format)", "",
        "Mean ± standard deviation over the seeds. Best validation accuracy: the fine-tuned run's best epoch "
        "(the weights T is measured on).", "",
        "Target | lr | Domain gap G | Intraclass variance D | Data amount N | Transferability T | Best val. acc. (%)",
        "--- |:---:|:---:|:---:|:---:|:---:|:---:",
    ]
    for name, group in group_runs(runs).items():
        g = [stats[r["dataset"]]["G"] for r in group]
        d = [stats[r["dataset"]]["D"] for r in group]
        lines.append(f"{name} | {group[0]['lr']:g} | {spread(g, 3)} | {spread(d, 3)} | "
                     f"{stats[group[0]['dataset']]['N']:,} | {spread([r['T'] for r in group], 2)} | "
                     f"{spread([r['best_val_acc'] for r in group], 1)}")
    accs = [r["best_val_acc"] for r in runs]
    largest = max(v for r in runs for v in r["layers"][:-1] if math.isfinite(v))
    lines += ["", f"Best validation accuracy over all runs: {min(accs):.1f} to {max(accs):.1f} % (a target "
              f"that reaches about 95 % or more saturates: its best checkpoint is an early snapshot). "
              f"Largest T of any layer in any run: {largest:.3g} (values of 1e4 or more mean a layer that "
              "fine-tuning could not move, e.g. a block whose BatchNorm scales pre-training drove to zero).", ""]
    return lines


def report_findings(study: Study, fit, verdicts: list[dict], paper: dict, figures: dict) -> list[str]:
    """The regression and both verdicts beside the same verdicts on the paper's data."""
    from metrics.regression import format_fit

    lines: list[str] = []
    lines += ["## Regression", "",
              f"Ordinary least squares over the {fit.n} runs at the seed's fine-tuning lr {study.finetune_lr:g} "
              "(`study_table.csv`; `python analyze.py regress study_table.csv` gives the same; the runs of the "
              "lr knob are left out, since lr is not a data set property):", "", "```",
              format_fit(fit, title="ln T = a G + b D + c ln N + d"), "```", "",
              f"![partial regression]({figures['regression']})", "",
              "## The paper's findings", "",
              "Each verdict is decided by the rule docs/analysis.md defines, applied the same way to this study and to "
              "the paper's own data (its ResNet-50 table for finding 1, its twelve ResNet-50 layer-wise curves "
              "for finding 2).", "",
              "Finding | This study | The paper's data", "--- | --- | ---"]
    for number, (verdict, on_paper) in enumerate(zip(verdicts, (paper["finding1"], paper["finding2"])), 1):
        lines.append(f"{number}. {verdict['claim']} | **{verdict['verdict']}**: {verdict['evidence']} | "
                     f"**{on_paper['verdict']}**: {on_paper['evidence']}")
    return lines


def report_curves(runs: list[dict], shapes: list, paper: dict, figures: dict) -> list[str]:
    """The layer-wise figure and every curve's shape statistics, the study's and the paper's."""
    lines: list[str] = []
    lines += ["", "## Layer-wise curves", "",
              f"![layer-wise transferability]({figures['layerwise']})", "",
              "Shape statistics per curve (non-head points): Spearman correlation of T with depth (p), position of "
              "the largest T, rank of the first layer (1 = the most transferable), share of steps where T rises; "
              "decreasing = Spearman <= -0.5 and the first layer ranks 1 or 2.", "",
              "Curve | Spearman (p) | argmax | rank of first | rising steps | decreasing",
              "--- |:---:|:---:|:---:|:---:|:---:"]
    rows = [(f"{r['name']} seed {r['seed']}", shape) for r, shape in zip(runs, shapes)]
    rows += [(f"paper: {name}", shape) for name, shape in paper["shapes"]]
    for label, shape in rows:
        lines.append(f"{label} | {shape.spearman:+.2f} ({shape.spearman_p:.2g}) | {shape.argmax}/{shape.points} | "
                     f"{shape.first_rank} | {shape.increasing_steps:.2f} | {'yes' if shape.decreasing else 'no'}")
    lines.append("")
    return lines


def estimator_titles() -> dict[str, str]:
    from metrics.estimators import DEFAULT_K, ESTIMATORS

    return {**ESTIMATORS, "knn": f"{ESTIMATORS['knn']} (k = {DEFAULT_K})"}


def estimator_agreement(runs: list[dict], stats: dict) -> list[dict]:
    """For every estimator (and T itself): Kendall's tau and Pearson's r against T and against
    the best validation accuracy, across the runs at the seed's fine-tuning lr (an estimator
    sees the target's images, not the fine-tuning lr)."""
    from metrics.estimators import agreement

    at_base_lr = [r for r in runs if r["knob"] != "lr"]
    accuracy = [r["best_val_acc"] for r in at_base_lr]
    transfer = [r["T"] for r in at_base_lr]
    rows = []
    for key, title in estimator_titles().items():
        scores = [stats[r["dataset"]]["estimators"][key] for r in at_base_lr]
        rows.append({"estimator": key, "title": title, "vs_T": agreement(scores, transfer),
                     "vs_accuracy": agreement(scores, accuracy)})
    rows.append({"estimator": "T", "title": "T (parameter space, after fine-tuning)", "vs_T": None,
                 "vs_accuracy": agreement(transfer, accuracy)})
    return rows


def report_estimators(runs: list[dict], stats: dict, agreements: list[dict]) -> list[str]:
    """The feature-based estimators per target and how each agrees with T and with accuracy."""

    def cell(result: dict | None, key: str) -> str:
        if result is None:
            return "-"
        value, p = result[key], result[key.split("_")[0] + "_p"]
        return "undefined" if value is None else f"{value:+.2f} (p = {p:.2g})"

    n = agreements[0]["vs_T"]["n"]
    titles = estimator_titles()
    lines = ["## Feature-based estimators", "",
             "theta_A's scores on every training image of each target, before any fine-tuning (definitions: "
             "docs/estimators.md; higher = more transferable), mean ± standard deviation over the seeds:", "",
             "Target | " + " | ".join(titles.values()), "--- | " + " | ".join(":---:" for _ in titles)]
    for name, group in group_runs([r for r in runs if r["knob"] != "lr"]).items():
        lines.append(f"{name} | " + " | ".join(
            spread([stats[r["dataset"]]["estimators"][key] for r in group], 3) for key in titles))
    lines += ["", f"Agreement across the {n} runs at the seed's fine-tuning lr (the lr knob's runs are left out: "
              "an estimator does not see the lr). Kendall's tau-b and Pearson's r, two-sided p values; the last "
              "row is the paper's T against accuracy, for comparison:", "",
              "Estimator | tau vs T | r vs T | tau vs best val. acc. | r vs best val. acc.", "--- |:---:|:---:|:---:|:---:"]
    for row in agreements:
        lines.append(f"{row['title']} | {cell(row['vs_T'], 'kendall_tau')} | {cell(row['vs_T'], 'pearson_r')} | "
                     f"{cell(row['vs_accuracy'], 'kendall_tau')} | {cell(row['vs_accuracy'], 'pearson_r')}")
    lines.append("")
    return lines


def group_runs(runs: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["name"], []).append(run)
    return groups


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description="The paper's study end to end on the synthetic benchmark.")
    parser.add_argument("--out", default="runs/study", help="where everything goes (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="the quick preset: about 5 minutes on a 2-core CPU (293 s alone; up to 20 on shared cores)")
    parser.add_argument("--preset", choices=list(PRESETS),
                        help=f"{DEFAULT_PRESET} (default: the paper's regime), quick, or tiny (seconds; for tests)")
    parser.add_argument("--seeds", type=positive_int, help="number of seeds per target (default: the preset's)")
    add_device_flag(parser)
    args = parser.parse_args(argv)
    if args.quick and args.preset not in (None, "quick"):
        parser.error("--quick and --preset disagree; give one")
    args.preset = args.preset or ("quick" if args.quick else DEFAULT_PRESET)
    return args


def pretraining_diagnostics(study: Study, pretrained: Path, device: str) -> dict:
    meter, _ = pretrained_tools(study.arch, pretrained, device)
    names = [group.name for group in meter.groups if not group.is_head]
    d_init = [meter.init[name][0] for name in names]
    cos_init = [meter.init[name][1] for name in names]
    history = [json.loads(line) for line in (pretrained / "a.log.jsonl").read_text().splitlines()]
    return {"names": names, "d_init": d_init, "cos_init": cos_init, "median_cos": statistics.median(cos_init),
            "budget": pretraining_budget(study), "source_acc": max(entry["val_acc"] for entry in history)}


def regression_rows(runs: list[dict], stats: dict) -> tuple[list[dict], str]:
    """The regression's rows (data set properties and T of the runs at the seed's fine-tuning
    lr: the lr knob is not a data set property) and the same as ``study_table.csv``."""
    at_base_lr = [r for r in runs if r["knob"] != "lr"]
    rows = [{"dataset": r["name"], "group": r["knob"] or "base", "G": stats[r["dataset"]]["G"],
             "D": stats[r["dataset"]]["D"], "N": stats[r["dataset"]]["N"], "T": r["T"]} for r in at_base_lr]
    table = "dataset,seed,G,D,N,T\n" + "".join(
        f"{r['name']},{r['seed']},{row['G']!r},{row['D']!r},{row['N']},{row['T']!r}\n" for r, row in zip(at_base_lr, rows))
    return rows, table


def knob_panels(study: Study, runs: list[dict]) -> list:
    """The layer-wise figure's panels: per knob, each level's curves (one per seed)."""
    panels = []
    for knob in study.levels:
        levels = []
        for target in knob_levels(study, knob):
            curves = [r["layers"] for r in runs if r["name"] == target.name]
            value = target.lr if knob == "lr" else target.options[knob]
            levels.append((f"{knob}={value:g}" + (" (base)" if target.knob is None else ""), curves))
        panels.append((f"{knob}: {KNOBS.get(knob, knob)}", levels))
    return panels


def run_study(study: Study, out: Path, device: str, stop: StopSignals) -> tuple[Path, list[dict], dict]:
    """Pre-train, fine-tune and measure every target of ``study`` (cached runs are read
    back); returns the pre-training run's folder, the runs and N, G, D per data set. A stop
    signal is checked before and after every run."""
    jobs = [(target, seed) for target in target_configs(study) for seed in study.seeds]
    progress = tqdm(total=1 + len(jobs), desc="study", unit="run")
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


def main(argv: list[str] | None = None) -> int:
    """The study; a stop signal ends it with one line and exit status 128 + its number."""
    started = time.perf_counter()
    args = parse_args(argv)
    try:
        with StopSignals() as stop:
            return study_and_report(args, stop, started)
    except (StudyStopped, KeyboardInterrupt) as err:
        signum = err.signum if isinstance(err, StudyStopped) else int(signal.SIGINT)
        print(f"reproduce.py: stopped by {signal.Signals(signum).name} (exit status {128 + signum}); the finished "
              f"runs are kept under {args.out}: run reproduce.py again with the same flags to resume the study",
              file=sys.stderr)
        return 128 + signum


def study_and_report(args: argparse.Namespace, stop: StopSignals, started: float) -> int:
    """Run (or read back) the study, then write its table, summary, figures and report."""
    from metrics.regression import fit_log_transferability, fit_to_dict, format_fit, partial_regression_figure
    from plotting import knob_panels_bytes
    from utils import Outputs, resolve_device

    study = PRESETS[args.preset]
    if args.seeds is not None:
        study = replace(study, seeds=tuple(range(1, args.seeds + 1)))
    figures = {"regression": "regression.png", "layerwise": "layerwise_transferability.png"}
    files = ("study_table.csv", "study.json", *figures.values(), "report.md")
    outputs = Outputs({name: Path(args.out) / name for name in files}, figures=(), flag="--out")
    out, device = Path(args.out), str(resolve_device(args.device))
    pretrained, runs, stats = run_study(study, out, device, stop)

    rows, table = regression_rows(runs, stats)
    fit = fit_log_transferability(rows)
    second, shapes = finding2_verdict(runs)
    verdicts = [finding1(fit), second]
    paper = paper_baseline()
    diagnostics = pretraining_diagnostics(study, pretrained, device)
    done = json.loads((pretrained / "done.json").read_text())
    timing = {"machine": machine_line(time.perf_counter() - started, device),
              "pretrain": f"{done['seconds'] / 60:.1f} min" if done.get("seconds") else "not recorded",
              "finetune": sum(r.get("seconds", 0.0) for r in runs)}
    agreements = estimator_agreement(runs, stats)
    report = report_markdown(study, args.preset, runs, stats, fit, verdicts, shapes, paper, diagnostics, figures,
                             timing, agreements)
    summary = {"preset": args.preset, "study": asdict(study), "recipe": RECIPE, "fit": fit_to_dict(fit),
               "findings": verdicts, "paper_findings": [paper["finding1"], paper["finding2"]],
               "diagnostics": diagnostics, "stats": stats, "runs": runs, "estimator_agreement": agreements,
               "shapes": [shape.as_dict() for shape in shapes], "timing": timing}
    outputs.add("study_table.csv", table)
    outputs.add("study.json", json.dumps(summary, indent=2, default=list))
    outputs.add(figures["regression"], partial_regression_figure(rows, fit, colour_by="group"))
    outputs.add(figures["layerwise"], knob_panels_bytes(knob_panels(study, runs), runs[0]["layer_names"]))
    outputs.add("report.md", report)
    stop.check()  # the study's files are written whole or not at all
    outputs.commit(announce=lambda path: print(f"wrote {path}"))
    print(format_fit(fit, title="ln T = a G + b D + c ln N + d"))
    print(f"pre-training: median cos(theta_r, theta_A) {diagnostics['median_cos']:.3f}, lr x wd budget "
          f"{diagnostics['budget']:.2f}; best val acc of the fine-tuned runs "
          f"{min(r['best_val_acc'] for r in runs):.1f}-{max(r['best_val_acc'] for r in runs):.1f} %")
    for number, (verdict, on_paper) in enumerate(zip(verdicts, (paper["finding1"], paper["finding2"])), 1):
        print(f"finding {number}: {verdict['verdict']} ({verdict['evidence']}); on the paper's data: "
              f"{on_paper['verdict']} ({on_paper['evidence']})")
    print("Kendall's tau against T / against the best validation accuracy: " + ", ".join(
        f"{row['title']} {format_tau(row['vs_T'])} / {format_tau(row['vs_accuracy'])}" for row in agreements))
    return 0


def format_tau(result: dict | None) -> str:
    return "-" if result is None or result["kendall_tau"] is None else f"{result['kendall_tau']:+.2f}"


if __name__ == "__main__":
    sys.exit(run_cli(main))
