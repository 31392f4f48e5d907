"""reproduce.py's command line: run (or read back) the study in every pre-training regime, then
write its table, summary, figures and report."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from models import ARCHITECTURES
from study.presets import DEFAULT_PRESET, KNOBS, PRESETS, RECIPE, Study, for_arch, knob_levels, ratio_text
from study.runs import StopSignals, StudyStopped, run_study
from utils import OneLineArgumentParser, add_device_flag, positive_int


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineArgumentParser(prog="reproduce.py",
                                   description="The paper's study end to end on the synthetic benchmark.")
    parser.add_argument("--out", help="where everything goes (default: runs/study, or runs/study-ARCH with --arch)")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), metavar="NAME",
                        help="run the preset's knobs and seeds for another registered architecture, with its own "
                        "pre-training recipe where it needs one (default: the preset's, resnet20; "
                        "docs/architectures.md)")
    parser.add_argument("--quick", action="store_true", help="the quick preset: a check of the pipeline in minutes")
    parser.add_argument("--preset", choices=list(PRESETS),
                        help=f"{DEFAULT_PRESET} (default: the paper's regime), quick, families (the paper's four networks "
                        "side by side, with --arch), or tiny (seconds; for tests)")
    parser.add_argument("--seeds", type=positive_int, help="number of seeds per target (default: the preset's)")
    parser.add_argument("--compare", nargs="+", metavar="DIR",
                        help="run nothing: put the studies in these folders (reproduce.py --arch ... --out DIR, "
                        "one per architecture) side by side with the paper's networks, into --out (default "
                        "runs/families): report.md, families.json, families_curves.png")
    parser.add_argument("--main_regime_only", action="store_true",
                        help="run only the preset's main pre-training regime, not the further ones it compares")
    add_device_flag(parser)
    args = parser.parse_args(argv)
    if args.quick and args.preset not in (None, "quick"):
        parser.error("--quick and --preset disagree; give one")
    args.preset = args.preset or ("quick" if args.quick else DEFAULT_PRESET)
    if args.compare and args.arch:
        parser.error("--compare reads finished studies; --arch runs one: give one of them")
    args.out = args.out or ("runs/families" if args.compare else "runs/study" if args.arch is None
                            else f"runs/study-{args.arch}")
    return args


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


def analyse_regime(name: str, study: Study, out: Path, device: str, stop: StopSignals) -> dict:
    """One regime's runs (run or read back), measured, judged and diagnosed."""
    from study import analysis

    pretrained, runs, stats = run_study(study, out, device, stop, label=name)
    finetuned = [analysis.finetuned_weights(run, out) for run in runs]  # each file read once
    runs = [analysis.measure_run(study, pretrained, run, theta_b, device) for run, theta_b in zip(runs, finetuned)]
    stop.check()
    diagnostics = analysis.pretraining_diagnostics(study, pretrained, device, runs)
    done = json.loads((pretrained / "done.json").read_text())
    return {
        "name": name, "study": study, "pretrained": pretrained.name, "runs": runs, "stats": stats,
        "diagnostics": diagnostics, "findings": analysis.findings(runs, stats),
        "shrink_summary": analysis.shrink_summary(runs, diagnostics),
        "draws": analysis.draw_bias(study, pretrained, runs, finetuned, device),
        "agreements": analysis.estimator_agreement(runs, stats),
        "timing": {"pretrain": f"{done['seconds'] / 60:.1f} min" if done.get("seconds") else "not recorded",
                   "pretrain_seconds": done.get("seconds") or 0.0,
                   "pretrain_resumed": done.get("resumed", True),  # not recorded by older studies: maybe
                   "finetune": sum(r.get("seconds", 0.0) for r in runs)},
    }


def regime_json(regime: dict) -> dict:
    """A regime's part of study.json: everything the report says about it."""
    findings = {metric: {"fit": f["fit_dict"], "finding1": f["finding1"], "finding2": f["finding2"],
                         "shapes": [shape.as_dict() for shape in f["shapes"]]}
                for metric, f in regime["findings"].items()}
    return {"name": regime["name"], "study": asdict(regime["study"]), "pretrained": regime["pretrained"],
            "diagnostics": regime["diagnostics"], "shrink": regime["shrink_summary"], "findings": findings,
            "random_draws": regime["draws"], "estimator_agreement": regime["agreements"], "timing": regime["timing"],
            "stats": regime["stats"], "runs": regime["runs"]}


def compare_studies(args: argparse.Namespace) -> int:
    """--compare: the finished studies side by side with the paper's networks."""
    from study.families import comparison_json, comparison_markdown, curves_figure_bytes, load_studies
    from utils import Outputs

    figure = "families_curves.png"
    outputs = Outputs({name: Path(args.out) / name for name in ("report.md", "families.json", figure)},
                      figures=(), flag="--out",
                      inputs=[(Path(folder) / "study.json", f"--compare {folder}") for folder in args.compare])
    studies = load_studies(args.compare)
    outputs.add("report.md", comparison_markdown(studies, figure))
    outputs.add("families.json", comparison_json(studies))
    outputs.add(figure, curves_figure_bytes(studies))
    outputs.commit(announce=lambda path: print(f"wrote {path}"))
    return 0


def study_and_report(args: argparse.Namespace, stop: StopSignals, started: float) -> int:
    """Run (or read back) the study in every regime, then write its files."""
    if args.compare:
        return compare_studies(args)
    from metrics.regression import format_fit, partial_regression_figure
    from plotting import knob_panels_bytes
    from study.analysis import METRICS, body_names, curve_body, head_flags, paper_baseline
    from study.figures import regimes_figure_bytes
    from study.report import report_markdown
    from utils import Outputs, resolve_device

    study = PRESETS[args.preset]
    if args.arch is not None:
        study = for_arch(study, args.arch)
    if args.seeds is not None:
        study = replace(study, seeds=tuple(range(1, args.seeds + 1)))
    if args.main_regime_only:
        study = replace(study, regimes=())
    figures = {"regression": "regression.png", "layerwise": "layerwise_transferability.png", "regimes": "regimes.png"}
    files = ("study_table.csv", "study.json", *figures.values(), "report.md")
    outputs = Outputs({name: Path(args.out) / name for name in files}, figures=(), flag="--out")
    out, device = Path(args.out), str(resolve_device(args.device))
    regimes = [analyse_regime(name, regime_study, out, device, stop) for name, regime_study in study.all_regimes()]
    main_regime = regimes[0]
    paper = paper_baseline()
    timing = {"machine": machine_line(time.perf_counter() - started, device),
              "pretrain": main_regime["timing"]["pretrain"], "finetune": main_regime["timing"]["finetune"],
              "call_minutes": (time.perf_counter() - started) / 60,
              # the training of every regime, each run timed by the call that finished it
              "compute_minutes": sum(r["timing"]["pretrain_seconds"] + r["timing"]["finetune"] for r in regimes) / 60}
    report = report_markdown(study, args.preset, regimes, paper, figures, timing)
    main_t = main_regime["findings"]["T"]
    summary = {"preset": args.preset, "study": asdict(study), "recipe": RECIPE,
               # the main regime's T, as before the regimes existed
               "fit": main_t["fit_dict"], "findings": [main_t["finding1"], main_t["finding2"]],
               "paper_findings": [paper["finding1"], paper["finding2"]],
               "diagnostics": main_regime["diagnostics"], "stats": main_regime["stats"], "runs": main_regime["runs"],
               "estimator_agreement": main_regime["agreements"],
               "shapes": [shape.as_dict() for shape in main_t["shapes"]], "timing": timing,
               "regimes": [regime_json(regime) for regime in regimes],
               "paper_shapes": {name: shape.as_dict() for name, shape in paper["shapes"]},
               "paper_networks_finding2": paper["networks"]}
    first = main_regime["runs"][0]
    names, has_head = first["layer_names"], any(head_flags(first))
    curves = [{"name": r["name"], "shrink": r["diagnostics"]["shrink"],
               **{metric: [curve_body(run, metric) for run in r["runs"]] for metric in METRICS}} for r in regimes]
    outputs.add("study_table.csv", main_t["table"])
    outputs.add("study.json", json.dumps(summary, indent=2, default=list))
    outputs.add(figures["regression"], partial_regression_figure(main_t["rows"], main_t["fit"], colour_by="group"))
    outputs.add(figures["layerwise"], knob_panels_bytes(knob_panels(study, main_regime["runs"]), names,
                                                        has_head=has_head))
    outputs.add(figures["regimes"], regimes_figure_bytes(curves, body_names(first)))
    outputs.add("report.md", report)
    stop.check()  # the study's files are written whole or not at all
    outputs.commit(announce=lambda path: print(f"wrote {path}"))
    print(format_fit(main_t["fit"], title="ln T = a G + b D + c ln N + d"))
    for regime in regimes:
        d = regime["diagnostics"]
        print(f"regime {regime['name']}: lr/wd {ratio_text(d['lr_wd_ratio'])}, lr x wd budget {d['budget']:.2f}, median "
              f"cos(theta_r, theta_A) {d['median_cos']:.3f}, best source val acc {d['source_acc']:.1f} %, fine-tuned "
              f"{min(r['best_val_acc'] for r in regime['runs']):.1f}-{max(r['best_val_acc'] for r in regime['runs']):.1f} %")
        for metric, title in METRICS.items():
            f = regime["findings"][metric]
            print(f"  {title}: finding 1 {f['finding1']['verdict']}, finding 2 {f['finding2']['verdict']} "
                  f"({f['finding2']['evidence']})")
    print(f"on the paper's data: finding 1 {paper['finding1']['verdict']}, finding 2 {paper['finding2']['verdict']}")
    print("Kendall's tau against T / against the best validation accuracy: " + ", ".join(
        f"{row['title']} {format_tau(row['vs_T'])} / {format_tau(row['vs_accuracy'])}"
        for row in main_regime["agreements"]))
    return 0


def format_tau(result: dict | None) -> str:
    return "-" if result is None or result["kendall_tau"] is None else f"{result['kendall_tau']:+.2f}"
