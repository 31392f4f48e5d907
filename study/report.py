"""OUT/report.md, section by section. Every number in it is in OUT/study.json beside it."""
from __future__ import annotations

import json
import math
import statistics

from study.analysis import METRICS, curve_body, estimator_titles
from study.presets import IMAGENET_LR_WD_BUDGET, SEED_LR_WD_RATIO, Study, ratio_text

# A regime is "in the paper's regime" on this axis when pre-training took the median layer to a
# cosine of at most this with its initialisation (issue: the seed's 120 ImageNet epochs).
LEFT_INITIALISATION = 0.05


def spread(values: list[float], digits: int) -> str:
    """``mean ± sample std`` (just the value for one)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def group_runs(runs: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["name"], []).append(run)
    return groups


def _range(low: float | None, high: float | None, digits: int = 2, spec: str = "f") -> str:
    """``low-high`` in the format ``.{digits}{spec}``, one number when both print alike."""
    if low is None or high is None:
        return "-"
    a, b = f"{low:.{digits}{spec}}", f"{high:.{digits}{spec}}"
    return a if a == b else f"{a}-{b}"


def _percent(value: float) -> str:
    return f"{100 * value:+.2f} %"


def report_markdown(study: Study, preset: str, regimes: list[dict], paper: dict, figures: dict, timing: dict) -> str:
    main = regimes[0]
    return "\n".join([
        *report_header(study, preset, regimes, timing), *report_regimes(regimes),
        *report_shrink(regimes, figures), *report_table(regimes),
        *report_findings(study, regimes, paper, figures), *report_curves(regimes, paper, figures),
        *report_draws(regimes), *report_estimators(main)])


def report_header(study: Study, preset: str, regimes: list[dict], timing: dict) -> list[str]:
    """What ran, on what."""
    lines = [
        "# Transferability study on the synthetic benchmark", "",
        f"Preset `{preset}`: {study.arch} pre-trained on `synthetic:{study.source}` for {study.pretrain_epochs} "
        f"epochs ({study.optimizer_text()}, the lr divided by 10 every {study.pretrain_lr_step} epochs, batch "
        f"{study.batch_size}) in {len(regimes)} regime(s) of lr and weight decay (next section), fine-tuned with "
        f"the seed's recipe (SGD, cosine schedule, weight decay {study.finetune_weight_decay:g}, batch "
        f"{study.batch_size}) for {study.finetune_epochs} epochs on synthetic targets that vary one knob at a "
        f"time around `{json.dumps(study.target)}` at lr {study.finetune_lr:g}; seeds {list(study.seeds)} (each "
        "seed is another target task and another fine-tuning run). G and D use theta_A's penultimate features "
        f"of up to {study.max_samples} images per data set.", "",
        f"Run: {timing['machine']}. Compute in the cached runs: "
        + "; ".join(f"regime {r['name']}: pre-training {r['timing']['pretrain']}"
                    + (" (in the call that finished it: a stopped and resumed pre-training took longer)"
                       if r["timing"].get("pretrain_resumed", True) else "")
                    + f", fine-tuning {r['timing']['finetune'] / 60:.1f} min over {len(r['runs'])} runs"
                    for r in regimes) + ".", "",
    ]
    return lines


def report_regimes(regimes: list[dict]) -> list[str]:
    """The regimes side by side: recipe, how far pre-training left the initialisation, how much
    it shrank each layer."""
    lines = ["## Pre-training regimes: did pre-training leave the initialisation?", "",
             f"The seed's 120 ImageNet epochs apply a sum of lr x weight decay of {IMAGENET_LR_WD_BUDGET:.2f} at "
             f"lr / weight decay = {SEED_LR_WD_RATIO:,.0f}. The product sets how far the weights that BatchNorm "
             "follows turn away from their initialisation; the ratio sets the norm they settle at, and so how much "
             "weight decay shrinks each layer. A regime is in the paper's regime on this axis when the median "
             f"layer ends with a cosine similarity of at most {LEFT_INITIALISATION} with its initialisation.", "",
             "Regime | lr | weight decay (normalisation layers') | lr / wd | sum of lr x wd | median cos_init | "
             "best source val. acc. (%) | fine-tuned runs",
             "--- |:---:|:---:|:---:|:---:|:---:|:---:|:---:"]
    for regime in regimes:
        d = regime["diagnostics"]
        norm = "" if d["norm_weight_decay"] is None else f" ({d['norm_weight_decay']:g})"
        lines.append(f"{regime['name']} | {d['lr']:g} | {d['weight_decay']:g}{norm} | {ratio_text(d['lr_wd_ratio'])} | "
                     f"{d['budget']:.2f} | {d['median_cos']:.3f} | {d['source_acc']:.1f} | {len(regime['runs'])}")
    names = regimes[0]["diagnostics"]["names"]
    lines += ["", "Per layer: D(theta_r, theta_A) (`d_init`), the cosine similarity of theta_r and theta_A "
              "(`cos_init`), and `shrink` = mean|theta_r| / mean|theta_A| (docs/metric.md):", "",
              "regime | value | " + " | ".join(names), "--- | --- | " + " | ".join(":---:" for _ in names)]
    for regime in regimes:
        d = regime["diagnostics"]
        lines += [f"{regime['name']} | d_init | " + " | ".join(f"{v:.3g}" for v in d["d_init"]),
                  f"{regime['name']} | cos_init | " + " | ".join(f"{v:.3f}" for v in d["cos_init"]),
                  f"{regime['name']} | shrink | " + " | ".join(f"{v:.3g}" for v in d["shrink"])]
    lines.append("")
    for regime in regimes:
        d = regime["diagnostics"]
        if d["median_cos"] > LEFT_INITIALISATION:
            lines += [f"**Regime {regime['name']}: pre-training did not leave the initialisation far enough (median "
                      f"cosine {d['median_cos']:.3f} > {LEFT_INITIALISATION}): its verdicts are not evidence about "
                      "the paper.**", ""]
    return lines


def report_shrink(regimes: list[dict], figures: dict) -> list[str]:
    """How much of each curve the shrinking of the weights explains."""
    names = regimes[0]["diagnostics"]["names"]
    lines = ["## What T measures: the shrinking of the weights", "",
             "T = D(theta_r, theta_FB) / D(theta_A, theta_FB). A convolution followed by BatchNorm computes the same "
             "function at any scale of its weights, and fine-tuning moves each layer by a similar fraction of its "
             "own size (`ft_move` = D(theta_A, theta_FB) / mean|theta_A|) while D(theta_r, theta_FB) stays near "
             "mean|theta_r|; so T is close to shrink / ft_move, and a layer that pre-training shrank more gets a "
             "larger T whatever it learned. The scale-free T (each tensor divided by its RMS first; "
             "docs/metric.md) takes the scale out.", "",
             f"![regimes]({figures['regimes']})", "",
             "Pearson's r of ln T with ln shrink across the layers of each curve (median, range over the curves) and "
             "the share of the variance of ln T across layers that ln shrink alone accounts for (r², at the "
             "median r):", "",
             "Regime | metric | r(ln T, ln shrink): median (range) | r² at the median",
             "--- | --- |:---:|:---:"]
    for regime in regimes:
        for metric, title in METRICS.items():
            s = regime["shrink_summary"][metric]
            if s["median_r"] is None:
                lines.append(f"{regime['name']} | {title} | - | -")
                continue
            lines.append(f"{regime['name']} | {title} | {s['median_r']:+.3f} ({s['min_r']:+.3f} to {s['max_r']:+.3f}) | "
                         f"{s['median_r'] ** 2:.2f}")
    lines += ["", "Per layer, over the runs: T / shrink and `ft_move` (ranges):", "",
              "regime | value | " + " | ".join(names), "--- | --- | " + " | ".join(":---:" for _ in names)]
    for regime in regimes:
        s = regime["shrink_summary"]
        lines += [f"{regime['name']} | T / shrink | " + " | ".join(
                      _range(lo, hi, 3, "g") for lo, hi in zip(s["T"]["ratio_min"], s["T"]["ratio_max"])),
                  f"{regime['name']} | ft_move | " + " | ".join(
                      _range(lo, hi, 2, "g") for lo, hi in zip(s["ft_move_min"], s["ft_move_max"]))]
    lines.append("")
    for regime in regimes:
        t, sf = regime["shrink_summary"]["T"], regime["shrink_summary"]["T_scale_free"]
        if t["median_r"] is None:
            continue
        shrink = regime["diagnostics"]["shrink"]
        lines.append(
            f"In regime {regime['name']}, shrink spans {min(shrink):.3g} to {max(shrink):.3g} across the layers and "
            f"ln shrink alone accounts for {t['median_r'] ** 2:.0%} of the variation of ln T across the layers of "
            f"the median curve (r {t['median_r']:+.3f})"
            + (f"; for the scale-free T, {sf['median_r'] ** 2:.0%} (r {sf['median_r']:+.3f})."
               if sf["median_r"] is not None else "."))
    lines.append("")
    return lines


def report_table(regimes: list[dict]) -> list[str]:
    """The paper's Section 3 table per regime, mean ± std over seeds, and the saturation check."""
    lines = ["## Table (the paper's Section 3 format)", "",
             "Mean ± standard deviation over the seeds. Best validation accuracy: the fine-tuned run's best epoch "
             "(the weights T is measured on). G and D are measured with each regime's own theta_A.", ""]
    for regime in regimes:
        runs, stats = regime["runs"], regime["stats"]
        lines += [f"### Regime {regime['name']}", "",
                  "Target | lr | Domain gap G | Intraclass variance D | Data amount N | Transferability T | "
                  "Scale-free T | Best val. acc. (%)",
                  "--- |:---:|:---:|:---:|:---:|:---:|:---:|:---:"]
        for name, group in group_runs(runs).items():
            g = [stats[r["dataset"]]["G"] for r in group]
            d = [stats[r["dataset"]]["D"] for r in group]
            lines.append(f"{name} | {group[0]['lr']:g} | {spread(g, 3)} | {spread(d, 3)} | "
                         f"{stats[group[0]['dataset']]['N']:,} | {spread([r['T'] for r in group], 2)} | "
                         f"{spread([r['T_scale_free'] for r in group], 2)} | "
                         f"{spread([r['best_val_acc'] for r in group], 1)}")
        accs = [r["best_val_acc"] for r in runs]
        largest = max(v for r in runs for v in curve_body(r) if math.isfinite(v))
        lines += ["", f"Best validation accuracy over all runs: {min(accs):.1f} to {max(accs):.1f} % (a target "
                  f"that reaches about 95 % or more saturates: its best checkpoint is an early snapshot). "
                  f"Largest T of any layer in any run: {largest:.3g} (values of 1e4 or more mean a layer that "
                  "fine-tuning could not move, e.g. a block whose BatchNorm scales pre-training drove to zero).", ""]
    return lines


def _finding1_cell(verdict: dict) -> str:
    parts = []
    for c in verdict["comparisons"]:
        other = "z(ln N)" if c["other"] == "log_N" else f"z({c['other']})"
        parts.append(f"vs {other}: {c['difference']:+.3f}, p = {c['p']:.2g} ({c['outcome']})")
    signs = ""
    if verdict["sign_differences"]:
        names = ["ln N" if t == "log_N" else t for t in verdict["sign_differences"]]
        signs = f"; sign unlike the published equation: {', '.join(names)}"
    return "; ".join(parts) + signs


def report_findings(study: Study, regimes: list[dict], paper: dict, figures: dict) -> list[str]:
    """The regressions and both verdicts, per regime and metric, beside the paper's data."""
    from metrics.regression import format_equation, format_fit

    main = regimes[0]
    fit = main["findings"]["T"]["fit"]
    lines = ["## Regression", "",
             f"Ordinary least squares over the {fit.n} runs at the seed's fine-tuning lr {study.finetune_lr:g} of "
             f"regime {main['name']} (`study_table.csv`; `python analyze.py regress study_table.csv` gives the "
             "same; the runs of the lr knob are left out, since lr is not a data set property):", "", "```",
             format_fit(fit, title="ln T = a G + b D + c ln N + d"), "```", "",
             f"![partial regression]({figures['regression']})", "",
             "The standardised equation of every regime and metric, and the paper's (its table refitted, and the "
             "equation it publishes, `ln T = -0.26 G + 0.32 D - 0.61 ln N + 2.86`):", "", "```"]
    for regime in regimes:
        for metric, title in METRICS.items():
            f = regime["findings"][metric]["fit"]
            lines.append(f"{regime['name']:>12}, {title:<16} {format_equation(f.standardized, standardized=True, digits=3)}"
                         f"   (R² {f.r2:.2f}, n {f.n})")
    lines += [f"{'paper table':>12}, {'T':<16} {format_equation(paper['fit'].standardized, standardized=True, digits=3)}"
              f"   (R² {paper['fit'].r2:.2f}, n {paper['fit'].n})", "```", ""]
    lines += ["## The paper's findings", "",
              "Rules (docs/analysis.md): finding 1 compares |z(G)| with |z(D)| and with |z(ln N)| in the "
              "standardised regression by a Wald test of each difference: **supported** when G's effect is smaller "
              "than each with p < 0.05, **contradicted** when it is larger than either with p < 0.05, otherwise "
              "**undetermined**. Finding 2 counts the decreasing curves (Spearman correlation with depth <= -0.5 "
              "and the first layer ranked 1 or 2): **supported** when fewer than half are with a one-sided binomial "
              "p < 0.05, **contradicted** when more than half are with p < 0.05, otherwise **undetermined**.", "",
              "### Finding 1: domain gap has a smaller effect than intraclass variance and data amount", "",
              "Data | metric | verdict | |z(G)| - |z(other)|, Wald p",
              "--- | --- | --- | ---"]
    for regime in regimes:
        for metric, title in METRICS.items():
            verdict = regime["findings"][metric]["finding1"]
            lines.append(f"regime {regime['name']} | {title} | **{verdict['verdict']}** | {_finding1_cell(verdict)}")
    lines += [f"the paper's ResNet-50 table | T | **{paper['finding1']['verdict']}** | "
              f"{_finding1_cell(paper['finding1'])}", "",
              "### Finding 2: most layer-wise transferabilities are not decreasing", "",
              "Decreasing curves under the rule, under the rule without the first layer, and under the Spearman "
              "criterion alone (one-sided binomial p of the count: of at most as many, or of at least as many when more "
              "than half are decreasing), and the shape statistics: the position of the "
              "largest T as a fraction of depth and the mean T of the first third of the layers over that of the "
              "last third (median and range over the curves).", "",
              "Data | metric | rule | without the first layer | Spearman alone | peak position | first / last third",
              "--- | --- |:---:|:---:|:---:|:---:|:---:"]

    def row(label: str, second: dict) -> str:
        cells = []
        for name in ("rule", "without_first", "spearman"):
            v = second["variants"][name]
            more = v["decreasing"] > v["curves"] / 2  # the p of the side the count lies on
            p = v["p_value_more"] if more else v["p_value"]
            cells.append(f"**{v['verdict']}**: {v['decreasing']} of {v['curves']} "
                         f"(p{' of at least as many' if more else ''} = {p:.2g})")
        s = second["statistics"]
        return (f"{label} | " + " | ".join(cells) + f" | {s['median_peak_fraction']:.2f} "
                f"({_range(s['min_peak_fraction'], s['max_peak_fraction'])}) | {s['median_thirds_ratio']:.2f} "
                f"({_range(s['min_thirds_ratio'], s['max_thirds_ratio'])})")

    for regime in regimes:
        for metric, title in METRICS.items():
            lines.append(row(f"regime {regime['name']} | {title}", regime["findings"][metric]["finding2"]))
    lines += [row("the paper's 12 ResNet-50 curves | T", paper["finding2"])]
    for network, second in paper.get("networks", {}).items():
        lines.append(row(f"the paper's {second['statistics']['curves']} {network} curves | T", second))
    lines.append("")
    return lines


def report_curves(regimes: list[dict], paper: dict, figures: dict) -> list[str]:
    """The layer-wise figure and every curve's shape statistics, the study's and the paper's."""
    lines = ["## Layer-wise curves", "",
             f"![layer-wise transferability]({figures['layerwise']})", "",
             "Shape statistics per curve (non-head points), for T and for the scale-free T: Spearman correlation "
             "with depth, rank of the first layer (1 = the most transferable), peak position as a fraction of depth, "
             "first-third / last-third ratio, and whether the curve is decreasing under the rule / without the first "
             "layer / by Spearman alone (y = yes, n = no).", "",
             "Curve | T: Spearman | first | peak | thirds | decreasing | scale-free: Spearman | first | peak | thirds "
             "| decreasing",
             "--- |:---:|:---:|:---:|:---:|:---:|:---:|:---:|:---:|:---:|:---:"]

    def cells(shape) -> str:
        flags = "/".join("-" if v is None else ("y" if v else "n")
                         for v in (shape.decreasing, shape.decreasing_without_first, shape.decreasing_spearman))
        return (f"{shape.spearman:+.2f} | {shape.first_rank} | {shape.peak_fraction:.2f} | {shape.thirds_ratio:.2f} | "
                f"{flags}")

    for regime in regimes:
        shapes_t, shapes_sf = regime["findings"]["T"]["shapes"], regime["findings"]["T_scale_free"]["shapes"]
        for run, t, sf in zip(regime["runs"], shapes_t, shapes_sf):
            lines.append(f"{regime['name']}: {run['name']} seed {run['seed']} | {cells(t)} | {cells(sf)}")
    for name, shape in paper["shapes"]:
        lines.append(f"paper: {name} | {cells(shape)} | - | - | - | - | -")
    lines.append("")
    return lines


def report_draws(regimes: list[dict]) -> list[str]:
    """The error of T measured against a fresh initialisation instead of the true theta_r."""
    names = regimes[0]["diagnostics"]["names"]
    lines = ["## A fresh initialisation instead of theta_r", "",
             "For public weights the initialisation pre-training started from is unknown; "
             "`cal_transferability.py -r random:SEED --random_draws K` draws K fresh ones of exactly the "
             "architecture's scheme. Here every run is measured against the "
             f"{len(regimes[0]['draws']['seeds'])} fresh initialisations with seeds "
             f"{regimes[0]['draws']['seeds'][0]}-{regimes[0]['draws']['seeds'][-1]} instead of the true theta_r; the "
             "relative error of T (mean over the draws, then over the runs), per layer beside cos_init:", "",
             "Regime | draw with seed 0 is theta_r | overall T: mean error (range over runs) | sd over draws",
             "--- |:---:|:---:|:---:"]
    for regime in regimes:
        d = regime["draws"]
        lines.append(f"{regime['name']} | {'yes, exactly' if d['reproduces_theta_r'] else 'no'} | "
                     f"{_percent(d['overall_mean'])} ({_percent(d['overall_min'])} to {_percent(d['overall_max'])}) | "
                     f"{100 * d['overall_sd_over_draws']:.2f} %")
    lines += ["", "regime | value | " + " | ".join(names), "--- | --- | " + " | ".join(":---:" for _ in names)]
    for regime in regimes:
        d = regime["draws"]
        lines += [f"{regime['name']} | error of T | " + " | ".join(f"{100 * v:+.1f} %" for v in d["layers"]),
                  f"{regime['name']} | cos_init | " + " | ".join(f"{v:.3f}" for v in regime["diagnostics"]["cos_init"])]
    lines.append("")
    return lines


def report_estimators(regime: dict) -> list[str]:
    """The feature-based estimators per target and how each agrees with T and with accuracy."""
    runs, stats, agreements = regime["runs"], regime["stats"], regime["agreements"]

    def cell(result: dict | None, key: str) -> str:
        if result is None:
            return "-"
        value, p = result[key], result[key.split("_")[0] + "_p"]
        return "undefined" if value is None else f"{value:+.2f} (p = {p:.2g})"

    n = agreements[0]["vs_T"]["n"]
    titles = estimator_titles()
    lines = ["## Feature-based estimators", "",
             f"Regime {regime['name']}: theta_A's scores on every training image of each target, before any "
             "fine-tuning (definitions: docs/estimators.md; higher = more transferable), mean ± standard deviation "
             "over the seeds:", "",
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
