"""The paper's study end to end, offline, on the embedded synthetic benchmark.

    python reproduce.py                 # the default study (about half an hour on a 2-core CPU)
    python reproduce.py --quick         # a smaller one, under 10 minutes on a 2-core CPU
    python reproduce.py --device cuda --out runs/gpu_study

It pre-trains a ResNet-20 on the synthetic source task, fine-tunes it on a grid of synthetic
targets that vary domain gap, intraclass variance and data amount one at a time (several
levels each, several seeds), measures T for each, and N, G, D for each target, fits the
regression, draws the figures, and writes ``OUT/report.md``: the table in the paper's
format, the fitted equation, the figures, and a verdict on each of the paper's two findings.

Every finished run is cached under OUT by a hash of its configuration: a killed study
resumes where it stopped (an interrupted training run continues from its checkpoint), and a
second call only redoes what changed.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from utils import UserError, run_cli, write_atomically

ARCH = "resnet20"


@dataclass(frozen=True)
class Study:
    """Everything that decides the study's numbers (and so its cache keys)."""

    source: str  # synthetic source task options
    pretrain_epochs: int
    pretrain_lr_step: int
    target: dict  # base target task: classes, n, n_val, gap, var, size
    levels: dict  # knob -> the values it takes while the others stay at the base
    seeds: tuple  # one target task (its classes) and one fine-tuning seed each
    finetune_epochs: int
    pretrain_lr: float = 0.1
    finetune_lr: float = 0.01
    batch_size: int = 128
    max_samples: int = 1000  # images per dataset for G and D
    arch: str = ARCH
    extra: dict = field(default_factory=dict)


PRESETS = {
    "default": Study(
        source="source,classes=100,n=100,n_val=10", pretrain_epochs=20, pretrain_lr_step=8,
        target={"classes": 10, "n": 100, "n_val": 50, "gap": 0.5, "var": 0.3, "size": 32},
        levels={"gap": (0.0, 0.25, 0.5, 0.75, 1.0), "var": (0.1, 0.3, 0.6, 1.0), "n": (25, 50, 100, 200)},
        seeds=(1, 2, 3), finetune_epochs=30),
    "quick": Study(
        source="source,classes=30,n=100,n_val=10", pretrain_epochs=10, pretrain_lr_step=4,
        target={"classes": 10, "n": 50, "n_val": 30, "gap": 0.5, "var": 0.3, "size": 32},
        levels={"gap": (0.0, 0.5, 1.0), "var": (0.1, 0.3, 1.0), "n": (20, 50, 120)},
        seeds=(1, 2, 3), finetune_epochs=10, max_samples=500),
    # A few seconds: for the test suite, not for conclusions.
    "tiny": Study(
        source="source,classes=6,n=12,n_val=4,size=16", pretrain_epochs=1, pretrain_lr_step=1,
        target={"classes": 3, "n": 8, "n_val": 4, "gap": 0.5, "var": 0.3, "size": 16},
        levels={"gap": (0.0, 1.0), "var": (0.1, 1.0), "n": (4, 16)},
        seeds=(1,), finetune_epochs=1, batch_size=16, max_samples=64),
}


def digest(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()[:10]


def target_configs(study: Study) -> list[tuple[str, dict]]:
    """``(name, options)`` for the base target and every level of every knob, once each.

    The base target comes first, named ``base``; the others are named by the knob that
    differs from it, e.g. ``gap=0.25``.
    """
    configs: dict[str, tuple[str, dict]] = {json.dumps(study.target, sort_keys=True): ("base", dict(study.target))}
    for knob, values in study.levels.items():
        for value in values:
            options = {**study.target, knob: value}
            configs.setdefault(json.dumps(options, sort_keys=True), (f"{knob}={value}", options))
    return list(configs.values())


def dataset_option(options: dict, seed: int) -> str:
    return "synthetic:" + ",".join(f"{k}={v}" for k, v in sorted({**options, "seed": seed}.items()))


def quiet(path: Path):
    """Send a training run's printout to its own log file instead of the console."""
    handle = open(path, "a")
    stack = contextlib.ExitStack()
    stack.enter_context(handle)
    stack.enter_context(contextlib.redirect_stdout(handle))
    stack.enter_context(contextlib.redirect_stderr(handle))
    return stack


# --------------------------------------------------------------------------- the runs


def pretrain(study: Study, out: Path, device: str) -> Path:
    import pretrain_on_ImageNet

    run = out / f"pretrain-{digest([study.source, study.pretrain_epochs, study.pretrain_lr_step, study.pretrain_lr, study.batch_size, study.arch])}"
    done = run / "done.json"
    if done.exists():
        return run
    run.mkdir(parents=True, exist_ok=True)
    last = run / "a.last.pth"
    argv = ["--dataset", f"synthetic:{study.source}", "--arch", study.arch, "--max_epoch", str(study.pretrain_epochs),
            "--lr_step", str(study.pretrain_lr_step), "--lr", str(study.pretrain_lr), "--batch_size", str(study.batch_size),
            "--seed", "0", "--device", device, "-r", str(run / "r.pth"), "-a", str(run / "a.pth")]
    argv += ["--resume", str(last)] if last.exists() else ["--overwrite"]
    with quiet(run / "train.out"):
        status = pretrain_on_ImageNet.main(argv)
    if status != 0:
        raise UserError(f"pre-training stopped (status {status}); run reproduce.py again to resume it")
    write_atomically(done, lambda f: f.write(json.dumps({"study": asdict(study)}, default=list)), "w")
    return run


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


def finetune_and_measure(study: Study, pretrained: Path, name: str, options: dict, seed: int, out: Path,
                         device: str) -> dict:
    """Fine-tune one target, then measure T and N, G, D; cached in the run's result.json."""
    import finetune
    from data import build_dataset, build_transform
    from metrics.dataset_stats import dataset_statistics
    from utils import load_state_dict_safely, resolve_device

    dataset = dataset_option(options, seed)
    key = digest([pretrained.name, dataset, study.finetune_epochs, study.finetune_lr, study.batch_size,
                  study.max_samples, seed])
    run = out / "finetune" / f"{name}-seed{seed}-{key}"
    result_path = run / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    run.mkdir(parents=True, exist_ok=True)
    b, last = run / "b.pth", run / "b.last.pth"
    argv = ["--dataset", dataset, "-a", str(pretrained / "a.pth"), "-b", str(b), "--arch", study.arch,
            "--max_epoch", str(study.finetune_epochs), "--lr", str(study.finetune_lr),
            "--batch_size", str(study.batch_size), "--seed", str(seed), "--device", device]
    argv += ["--resume", str(last)] if last.exists() else ["--overwrite"]
    with quiet(run / "train.out"):
        status = finetune.main(argv)
    if status != 0:
        raise UserError(f"fine-tuning {name} (seed {seed}) stopped (status {status}); run reproduce.py again to resume")

    meter, extractor = pretrained_tools(study.arch, pretrained, device)
    transfer = meter(load_state_dict_safely(b))
    size = options["size"]
    target = build_dataset(dataset, None, "train", build_transform(False, size))
    stats = dataset_statistics(target, source_split(study.source, size), extractor,
                               max_samples=study.max_samples, cache_dir=out / "cache", target_key=dataset,
                               source_key=f"synthetic:{study.source}", device=resolve_device(device), seed=0,
                               progress=False)
    history = [json.loads(line) for line in (run / "b.log.jsonl").read_text().splitlines()]
    result = {
        "name": name, "seed": seed, "dataset": dataset, "options": options,
        "N": stats["N"], "G": stats["G"], "D": stats["D"], "T": transfer.overall,
        "layers": [layer.transferability for layer in transfer.layers],
        "layer_names": [layer.name for layer in transfer.layers],
        "best_val_acc": max(entry["val_acc"] for entry in history),
    }
    write_atomically(result_path, lambda f: f.write(json.dumps(result, indent=2)), "w")
    return result


# ----------------------------------------------------------------------- the findings


def depth_trend(values: list[float]) -> float:
    """Spearman rank correlation of T with depth over the non-head points (head: the last,
    1.0 by definition). Negative: T falls with depth, as the consensus the paper questions says."""
    from scipy.stats import spearmanr

    points = [v for v in values[:-1] if math.isfinite(v)]
    if len(points) < 3:
        return math.nan
    return float(spearmanr(range(len(points)), points).statistic)


DECREASING = -0.5  # a curve counts as decreasing when its depth trend is at most this


def findings(fit, runs: list[dict]) -> list[dict]:
    """The paper's two findings, each with a verdict for this study and the numbers behind it."""
    std = fit.standardized.coefficients
    p = fit.standardized.p_values
    gap, var, amount = abs(std["G"]), abs(std["D"]), abs(std["log_N"])
    first = {
        "claim": "Domain gap has a smaller effect on transferability than the downstream intraclass "
                 "variance and data amount.",
        "supported": gap < var and gap < amount,
        "evidence": (f"standardised coefficients of ln T: G {std['G']:+.3f} (p = {p['G']:.3g}), "
                     f"D {std['D']:+.3f} (p = {p['D']:.3g}), ln N {std['log_N']:+.3f} (p = {p['log_N']:.3g}); "
                     f"|G| = {gap:.3f} is {'the smallest' if gap < var and gap < amount else 'not the smallest'}"),
    }
    trends = [depth_trend(run["layers"]) for run in runs]
    trends = [t for t in trends if math.isfinite(t)]
    decreasing = sum(t <= DECREASING for t in trends)
    share = decreasing / len(trends) if trends else math.nan
    second = {
        "claim": "Most of the layer-wise transferabilities are not decreasing with depth.",
        "supported": bool(trends) and share < 0.5,
        "evidence": (f"{decreasing} of {len(trends)} fine-tuned runs ({share:.0%}) have a decreasing curve "
                     f"(Spearman correlation of T with depth <= {DECREASING}); median correlation "
                     f"{statistics.median(trends):+.2f}" if trends else "no curve with 3 or more points"),
    }
    return [first, second]


# --------------------------------------------------------------------------- the report


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def report_markdown(study: Study, preset: str, runs: list[dict], fit, verdicts: list[dict], figures: dict) -> str:
    from metrics.regression import format_fit

    lines = [
        "# Transferability study on the synthetic benchmark", "",
        f"Preset `{preset}`: {study.arch} pre-trained on `synthetic:{study.source}` for {study.pretrain_epochs} "
        f"epochs, fine-tuned for {study.finetune_epochs} epochs on synthetic targets that vary one knob at a time "
        f"around {json.dumps(study.target)}, seeds {list(study.seeds)}. "
        f"G and D use theta_A's penultimate features of up to {study.max_samples} images per dataset.", "",
        "## Table (the paper's Section 3 format)", "",
        "Dataset | Domain gap G | Intraclass variance D | Data amount N | Transferability T (mean ± std over seeds)",
        "--- |:---:|:---:|:---:|:---:",
    ]
    by_name: dict[str, list[dict]] = {}
    for run in runs:
        by_name.setdefault(run["name"], []).append(run)
    for name, group in by_name.items():
        lines.append(f"{name} | {statistics.mean(r['G'] for r in group):.4g} | "
                     f"{statistics.mean(r['D'] for r in group):.4g} | {group[0]['N']:,} | "
                     f"{mean_std([r['T'] for r in group])}")
    lines += ["", "## Regression", "",
              f"Ordinary least squares over all {fit.n} fine-tuned runs (`study_table.csv`; "
              "`python analyze.py regress study_table.csv` gives the same):", "", "```",
              format_fit(fit, title="ln T = a G + b D + c ln N + d"), "```", "",
              f"![partial regression]({figures['regression']})", "",
              "## The paper's findings", ""]
    for number, verdict in enumerate(verdicts, 1):
        word = "supported" if verdict["supported"] else "not supported"
        lines += [f"{number}. {verdict['claim']} **This run: {word}.** {verdict['evidence']}.", ""]
    lines += ["## Layer-wise transferability (mean over seeds)", "",
              f"![layer-wise transferability]({figures['layerwise']})", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The paper's study end to end on the synthetic benchmark.")
    parser.add_argument("--out", default="runs/study", help="where everything goes (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="the quick preset: under 10 minutes on a 2-core CPU")
    parser.add_argument("--preset", choices=list(PRESETS), help="default, quick, or tiny (seconds; for tests)")
    parser.add_argument("--seeds", type=int, help="number of seeds per target (default: the preset's)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    if args.quick and args.preset not in (None, "quick"):
        parser.error("--quick and --preset disagree; give one")
    args.preset = args.preset or ("quick" if args.quick else "default")
    return args


def main(argv: list[str] | None = None) -> int:
    from metrics.regression import fit_log_transferability, fit_to_dict, partial_regression_figure
    from plotting import layerwise_grid_bytes
    from utils import check_writable, resolve_device

    args = parse_args(argv)
    study = PRESETS[args.preset]
    if args.seeds is not None:
        if args.seeds < 1:
            raise UserError(f"--seeds {args.seeds}: must be at least 1")
        study = replace(study, seeds=tuple(range(1, args.seeds + 1)))
    out = check_writable(Path(args.out) / "report.md", "--out").parent
    device = str(resolve_device(args.device))

    configs = target_configs(study)
    jobs = [(name, options, seed) for name, options in configs for seed in study.seeds]
    progress = tqdm(total=1 + len(jobs), desc="study", unit="run")
    progress.set_postfix_str("pre-training")
    pretrained = pretrain(study, out, device)
    progress.update()
    runs = []
    for name, options, seed in jobs:
        progress.set_postfix_str(f"{name} seed {seed}")
        runs.append(finetune_and_measure(study, pretrained, name, options, seed, out, device))
        progress.update()
    progress.close()

    table = "dataset,seed,G,D,N,T\n" + "".join(
        f"{r['name']},{r['seed']},{r['G']!r},{r['D']!r},{r['N']},{r['T']!r}\n" for r in runs)
    rows = [{"dataset": r["name"], "G": r["G"], "D": r["D"], "N": r["N"], "T": r["T"]} for r in runs]
    fit = fit_log_transferability(rows)
    verdicts = findings(fit, runs)
    panels = []
    for name, _ in configs:
        curves = [r["layers"] for r in runs if r["name"] == name]
        panels.append((name, [statistics.mean(values) for values in zip(*curves)]))
    figures = {"regression": "regression.png", "layerwise": "layerwise_transferability.png"}
    report = report_markdown(study, args.preset, runs, fit, verdicts, figures)
    summary = {"preset": args.preset, "study": asdict(study), "fit": fit_to_dict(fit), "findings": verdicts, "runs": runs}
    from utils import commit_outputs

    commit_outputs([
        (out / "study_table.csv", lambda f: f.write(table), "w"),
        (out / "study.json", lambda f: f.write(json.dumps(summary, indent=2, default=list)), "w"),
        (out / figures["regression"], lambda f: f.write(partial_regression_figure(rows, fit)), "wb"),
        (out / figures["layerwise"], lambda f: f.write(layerwise_grid_bytes(panels, columns=6)), "wb"),
        (out / "report.md", lambda f: f.write(report), "w"),
    ])
    print(report.split("## Regression")[0].strip())
    for number, verdict in enumerate(verdicts, 1):
        print(f"finding {number}: {'supported' if verdict['supported'] else 'not supported'} ({verdict['evidence']})")
    print(f"wrote {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
