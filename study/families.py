"""The paper's four networks side by side: each architecture's study (reproduce.py --arch,
the same preset) beside the paper's equation and curves of its family.

The paper reports ResNet-50, ResNet-34, DenseNet-121 and ViT-small; the registered CPU-scale
architectures map onto them by family and block (:func:`paper_network`). The report reads
only each study's ``study.json`` (and ``data/``), so it is recomputed from the files beside it.
"""
from __future__ import annotations

import io
import json
import math
import statistics
from pathlib import Path

from utils import UserError

PREDICTORS = ("G", "D", "log_N")
NAMES = {"G": "G", "D": "D", "log_N": "ln N"}


def paper_network(arch: str) -> str:
    """The paper's network of ``arch``'s family: a bottleneck ResNet is ResNet-50's, a ResNet of
    basic blocks ResNet-34's, a DenseNet DenseNet-121's, a ViT ViT-small's."""
    from models import ARCHITECTURES

    spec = ARCHITECTURES[arch]
    family = spec.family.name
    if family == "resnet":
        return "ResNet-50" if spec.fingerprint[1] else "ResNet-34"
    return {"densenet": "DenseNet-121", "vit": "ViT-small"}[family]


def paper_curve_network(network: str) -> str:
    """Whose published curves stand for ``network``'s: the paper draws none for ResNet-34, so
    ResNet-50's (the same family)."""
    return "ResNet-50" if network == "ResNet-34" else network


def load_studies(folders: list[str | Path]) -> list[dict]:
    """Each folder's study.json with its folder; one line naming the folder when one is missing."""
    from utils import read_json

    studies = []
    for folder in folders:
        path = Path(folder) / "study.json"
        if not path.is_file():
            raise UserError(f"--compare {folder}: no study.json there; give folders written by reproduce.py --out")
        summary = read_json(path, "a study.json written by reproduce.py")
        if not isinstance(summary, dict) or "regimes" not in summary or "study" not in summary:
            raise UserError(f"--compare {folder}: {path} is not a reproduce.py study.json")
        studies.append({**summary, "folder": Path(folder)})
    arches = [s["study"]["arch"] for s in studies]
    if len(set(arches)) != len(arches):
        raise UserError(f"--compare: an architecture is given twice ({', '.join(arches)}); give each study once")
    return studies


def paper_table_standardised() -> dict:
    """The standardised coefficients (and p values) of the regression refitted on the paper's
    ResNet-50 table, the only table it publishes. Its printed equations cannot be standardised:
    there is no table for the other three networks, and the ResNet-50 table's D is not on the
    scale its equation uses (docs/analysis.md)."""
    from metrics.regression import fit_log_transferability, fit_to_dict, read_table

    fit = fit_log_transferability(read_table(Path(__file__).resolve().parent.parent / "data" / "paper_table.csv"))
    return fit_to_dict(fit)["standardized"]


def _sign(value: float) -> str:
    return "+" if value > 0 else "-" if value < 0 else "0"


def _p(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.2g}"


def _finding1_text(finding: dict) -> str:
    parts = [f"vs {NAMES.get(c['other'], c['other'])} {c['outcome']} (p = {_p(c['p'])})" for c in finding["comparisons"]]
    return f"**{finding['verdict']}** ({'; '.join(parts)})"


def _finding2_text(finding: dict, rule: str = "rule") -> str:
    v = finding["variants"][rule]
    more = v["decreasing"] > v["curves"] / 2
    p = v.get("p_value_more", math.nan) if more else v["p_value"]
    return f"**{v['verdict']}**: {v['decreasing']} of {v['curves']} (p = {_p(p)})"


def row_of(study: dict) -> dict:
    """What the README's table and the report's first table say about one study (main regime)."""
    regime = study["regimes"][0]
    d = regime["diagnostics"]
    accuracies = [run["best_val_acc"] for run in regime["runs"]]
    findings = regime["findings"]
    return {"arch": study["study"]["arch"], "network": paper_network(study["study"]["arch"]),
            "median_cos": d["median_cos"], "source_acc": d["source_acc"], "target_acc": (min(accuracies), max(accuracies)),
            "runs": len(regime["runs"]), "finding1": findings["T"]["finding1"], "finding2": findings["T"]["finding2"],
            "finding1_sf": findings["T_scale_free"]["finding1"], "finding2_sf": findings["T_scale_free"]["finding2"],
            "wall": study.get("timing", {}).get("call_minutes"),
            "compute": study.get("timing", {}).get("compute_minutes")}


def comparison_markdown(studies: list[dict], figure: str) -> str:
    """The side-by-side report: regime and verdicts, then one section per comparison."""
    rows = [row_of(s) for s in studies]
    preset = {s["preset"] for s in studies}
    lines = ["# The paper's four networks side by side", "",
             f"Studies of preset `{', '.join(sorted(preset))}` for {', '.join(r['arch'] for r in rows)} "
             "(`reproduce.py --arch`: the same source task, targets, knobs and seeds; each architecture's own "
             "pre-training recipe where it needs one), each beside the paper's network of its family. Each "
             "study's own report is `report.md` in its folder; every number here is in its `study.json`.", "",
             "## Regime and verdicts (main regime)", "",
             "A study is in the paper's regime on the pre-training axis when the median layer's cosine similarity "
             "with its initialisation is at most 0.05. Finding 1: Wald tests of |z(G)| - |z(D)| and |z(G)| - "
             "|z(ln N)|; finding 2: decreasing curves by the rule (Spearman <= -0.5 and the first layer ranked 1 "
             "or 2), supported or contradicted only with a one-sided binomial p < 0.05 (docs/analysis.md).", "",
             "architecture | paper's network | median cos_init | best source acc. (%) | best target acc. (%) | "
             "finding 1, T | finding 2, T | finding 1, scale-free T | finding 2, scale-free T | training time, "
             "all calls (the last call's wall time)",
             "--- | --- |:---:|:---:|:---:| --- | --- | --- | --- |:---:"]
    for r in rows:
        in_regime = "" if r["median_cos"] <= 0.05 else " (out of regime)"
        wall = "-" if r["wall"] is None else f"{r['compute']:.0f} min ({r['wall']:.0f} min)"
        lines.append(f"{r['arch']} | {r['network']} | {r['median_cos']:.3f}{in_regime} | {r['source_acc']:.1f} | "
                     f"{r['target_acc'][0]:.1f}-{r['target_acc'][1]:.1f} | {_finding1_text(r['finding1'])} | "
                     f"{_finding2_text(r['finding2'])} | {_finding1_text(r['finding1_sf'])} | "
                     f"{_finding2_text(r['finding2_sf'])} | {wall}")
    lines += _regression_section(studies, rows) + _curves_section(studies, rows, figure)
    lines += _shrink_section(studies, rows) + _estimators_section(studies, rows)
    lines.append("")
    return "\n".join(lines)


def _regression_section(studies: list[dict], rows: list[dict]) -> list[str]:
    """Each regression beside the equation the paper prints for its family."""
    from metrics.regression import published_regressions

    equations = published_regressions()
    table = paper_table_standardised()
    lines = ["", "## The regression beside the paper's equation of the family", "",
              "Standardised coefficients of ln T (the change of ln T per standard deviation of each predictor over "
              "the study's runs at the seed's fine-tuning lr) with their p values, beside the equation the paper "
              "prints for the network of the family (data/paper_regressions.csv; `!` marks a sign that differs from "
              "it). The printed equations cannot be put on the same scale (no table is published for three of the "
              "networks, and the ResNet-50 table's D is not on its equation's scale), so sizes are compared with the "
              "ResNet-50 table refitted, the last row.", "",
              "architecture | metric | z(G) | z(D) | z(ln N) | R² (n) | the paper's equation: G, D, ln N",
              "--- | --- |:---:|:---:|:---:|:---:| ---"]
    for study, r in zip(studies, rows):
        equation = equations[r["network"]]
        for metric, title in (("T", "T"), ("T_scale_free", "scale-free T")):
            fit = study["regimes"][0]["findings"][metric]["fit"]
            z = fit["standardized"]
            cells = []
            for term in PREDICTORS:
                value = z["coefficients"][term]
                mark = "" if _sign(value) == _sign(equation[term]) else " !"
                cells.append(f"{value:+.3f} (p = {_p(z['p_values'][term])}){mark}")
            lines.append(f"{r['arch']} | {title} | " + " | ".join(cells) + f" | {fit['r2']:.2f} ({fit['n']}) | "
                         f"{r['network']}: " + ", ".join(f"{equation[t]:+.2f}" for t in PREDICTORS))
    lines.append("the paper's ResNet-50 table, refitted | T | " + " | ".join(
        f"{table['coefficients'][t]:+.3f} (p = {_p(table['p_values'][t])})" for t in PREDICTORS)
        + " | - (12) | ResNet-50: " + ", ".join(f"{equations['ResNet-50'][t]:+.2f}" for t in PREDICTORS))
    return lines


def _curves_section(studies: list[dict], rows: list[dict], figure: str) -> list[str]:
    """Finding 2 on each study's curves beside the paper's curves of the family."""
    from metrics.curve_shape import RULE_DESCRIPTIONS
    from study.analysis import paper_networks

    published = paper_networks()
    lines = ["", "## Layer-wise curves beside the paper's", "",
              f"![layer-wise curves beside the paper's]({figure})", "",
              "Finding 2 on each study's curves and on the paper's curves of the family, under the rule and its two "
              f"variants ({'; '.join(f'{k}: {v}' for k, v in RULE_DESCRIPTIONS.items())}), with where the curves "
              "peak (fraction of depth) and the mean T of the first third over the last third (medians):", "",
              "curves | rule | without the first layer | Spearman alone | peak at | first / last third",
              "--- | --- | --- | --- |:---:|:---:"]
    for study, r in zip(studies, rows):
        for metric, title in (("T", "T"), ("T_scale_free", "scale-free T")):
            second = study["regimes"][0]["findings"][metric]["finding2"]
            s = second["statistics"]
            lines.append(f"{r['arch']}, {title} ({r['runs']}) | " + " | ".join(
                _finding2_text(second, rule) for rule in ("rule", "without_first", "spearman"))
                + f" | {s['median_peak_fraction']:.2f} | {s['median_thirds_ratio']:.2f}")
    for network in dict.fromkeys(paper_curve_network(r["network"]) for r in rows):
        variants = published[network]["variants"]
        shapes = list(published[network]["shapes"].values())
        cells = []
        for rule in ("rule", "without_first", "spearman"):
            v = variants[rule]
            p = v.p_value_more if v.decreasing > v.curves / 2 else v.p_value
            cells.append(f"**{v.verdict}**: {v.decreasing} of {v.curves} (p = {_p(p)})")
        lines.append(f"the paper's {network} ({len(shapes)}) | " + " | ".join(cells)
                     + f" | {statistics.median(s.peak_fraction for s in shapes):.2f} | "
                     f"{statistics.median(s.thirds_ratio for s in shapes):.2f}")
    return lines


def _shrink_section(studies: list[dict], rows: list[dict]) -> list[str]:
    """r(ln T, ln shrink) per architecture, and the range of shrink."""
    lines = ["", "## What else explains the curves: shrinking", "",
              "Pearson's r of ln T with ln shrink (mean|theta_r| / mean|theta_A|) across the layers of each curve "
              "(median and range over the curves), and the range of shrink over the layers:", "",
              "architecture | r(ln T, ln shrink) | r(ln scale-free T, ln shrink) | shrink over the layers",
              "--- |:---:|:---:|:---:"]
    for study, r in zip(studies, rows):
        regime = study["regimes"][0]
        shrink = [v for v in regime["diagnostics"]["shrink"] if v is not None and math.isfinite(v)]
        cells = []
        for metric in ("T", "T_scale_free"):
            summary = regime["shrink"][metric]
            cells.append("-" if summary["median_r"] is None else
                         f"{summary['median_r']:+.2f} ({summary['min_r']:+.2f} to {summary['max_r']:+.2f})")
        lines.append(f"{r['arch']} | {cells[0]} | {cells[1]} | {min(shrink):.3g}-{max(shrink):.3g}")
    return lines


def _estimators_section(studies: list[dict], rows: list[dict]) -> list[str]:
    """Kendall's tau of each estimator and of T against T and against accuracy."""
    lines = ["", "## The estimators against T and against accuracy", "",
              "Kendall's tau across the runs at the seed's fine-tuning lr, of each estimator (computed with theta_A's "
              "features before fine-tuning) and of T, against T and against the best validation accuracy:", "",
              "architecture | " + " | ".join(e["title"] for e in studies[0]["regimes"][0]["estimator_agreement"]),
              "--- | " + " | ".join(":---:" for _ in studies[0]["regimes"][0]["estimator_agreement"])]
    for study, r in zip(studies, rows):
        cells = []
        for e in study["regimes"][0]["estimator_agreement"]:
            vs_t = e["vs_T"]["kendall_tau"] if e["vs_T"] else None
            vs_acc = e["vs_accuracy"]["kendall_tau"]
            cells.append(f"{'-' if vs_t is None else f'{vs_t:+.2f}'} / {'-' if vs_acc is None else f'{vs_acc:+.2f}'}")
        lines.append(f"{r['arch']} (vs T / vs accuracy) | " + " | ".join(cells))
    return lines


def curves_figure_bytes(studies: list[dict]) -> bytes:
    """One row per architecture: the study's T curves (each run thin, the median bold) and the
    paper's curves of the family, both against the position of the point as a fraction of
    depth (head left out), T on a log scale."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from metrics.curve_shape import paper_curves_have_head, read_paper_curves
    from plotting import plain_text
    from study.analysis import curve_body

    figure = Figure(figsize=(10, 2.6 * len(studies)), layout="constrained")
    axes = figure.subplots(len(studies), 2, squeeze=False)
    for (left, right), study in zip(axes, studies):
        arch = study["study"]["arch"]
        runs = study["regimes"][0]["runs"]
        curves = [curve_body(run) for run in runs]
        depth = [(i + 1) / len(curves[0]) for i in range(len(curves[0]))]
        for curve in curves:
            left.plot(depth, curve, color="0.75", linewidth=0.6)
        median = [statistics.median(c[i] for c in curves) for i in range(len(depth))]
        left.plot(depth, median, color="C0", linewidth=2, marker="o", markersize=3, label="median")
        left.set_yscale("log")
        left.set_title(plain_text(f"{arch}: T of {len(runs)} runs"), fontsize=9)
        network = paper_curve_network(paper_network(arch))
        for name, values in read_paper_curves(architecture=network).items():
            body = values[:-1] if paper_curves_have_head(network) else values
            right.plot([(i + 1) / len(body) for i in range(len(body))], body, marker=".", markersize=3,
                       linewidth=0.8, label=plain_text(name))
        right.set_yscale("log")
        right.set_title(plain_text(f"the paper's {network}"), fontsize=9)
        right.legend(fontsize=6, ncol=2)
        for ax in (left, right):
            ax.set_xlabel("position of the point (fraction of depth)", fontsize=8)
            ax.set_ylabel("T", fontsize=8)
            ax.tick_params(labelsize=7)
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()


def comparison_json(studies: list[dict]) -> str:
    rows = [row_of(s) for s in studies]
    return json.dumps({"studies": [str(s["folder"]) for s in studies], "rows": rows,
                       "paper_table_standardised": paper_table_standardised()}, indent=2, default=list)
