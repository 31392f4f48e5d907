"""What the study's runs say: T and the scale-free T of every run, the shrink diagnostics, the
verdicts on the paper's two findings under both metrics, the error of a fresh initialisation,
and the feature-based estimators' agreement.

Everything here is recomputed from the cached runs at every call (a ResNet-20 checkpoint is
measured in milliseconds), so a new diagnostic never needs a run to be redone.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from study.presets import Study, lr_wd_ratio, pretraining_budget
from study.runs import pretrained_tools

# The two metrics the findings are judged under: the paper's T, and T on tensors divided by
# their RMS (docs/metric.md), which pre-training's shrinking of the weights does not move.
METRICS = {"T": "T (the paper's)", "T_scale_free": "scale-free T"}
# Seeds of the fresh initialisations compared with the true theta_r (which pre-training drew
# with seed 0): what `cal_transferability.py -r random:1000 --random_draws 10` would draw.
DRAW_SEEDS = tuple(range(1000, 1010))


def layer_curve(run: dict, metric: str) -> list[float]:
    """Every point of the run's curve, head included where the network has one."""
    return run["layers"] if metric == "T" else run["layers_scale_free"]


def head_flags(run: dict) -> list[bool]:
    """Which points of the run's curve are heads (a ViT's curve has none). Runs measured before
    the flags were recorded: the head is the point without a shrink (shrink is per non-head point)."""
    if "is_head" in run:
        return list(run["is_head"])
    if "shrink" not in run:
        raise ValueError(f"run {run.get('name')}: no record of which points are heads")
    return [i >= len(run["shrink"]) for i in range(len(run["layers"]))]


def curve_body(run: dict, metric: str = "T") -> list[float]:
    """The run's curve without its head points."""
    return [v for v, head in zip(layer_curve(run, metric), head_flags(run), strict=True) if not head]


def body_names(run: dict) -> list[str]:
    """The names of the run's points that are not heads."""
    return [name for name, head in zip(run["layer_names"], head_flags(run), strict=True) if not head]


def finetuned_weights(run: dict, out: Path) -> dict:
    """theta_FB of one of the study's runs."""
    from utils import load_state_dict_safely

    return load_state_dict_safely(out / "finetune" / run["folder"] / "b.pth")


def measure_run(study: Study, pretrained: Path, run: dict, theta_b: dict, device: str) -> dict:
    """The run with everything measured from its fine-tuned weights ``theta_b``: T and the
    scale-free T per layer and overall, each layer's shrink and ft_move."""
    from metrics import HEAD

    meter, _ = pretrained_tools(study.arch, pretrained, device)
    result = meter(theta_b)
    return {**run, "T": result.overall, "T_scale_free": result.overall_scale_free,
            "layers": result.values, "layers_scale_free": result.values_scale_free,
            "layer_names": [layer.name for layer in result.layers],
            "is_head": [layer.status == HEAD for layer in result.layers],
            "shrink": [layer.shrink for layer in result.layers if layer.shrink is not None],
            "ft_move": [layer.ft_move for layer in result.layers if layer.ft_move is not None]}


def pretraining_diagnostics(study: Study, pretrained: Path, device: str, measured: list[dict]) -> dict:
    """How far pre-training moved each layer (d_init, cos_init), how much it shrank it (from
    the ``measured`` runs: shrink depends on theta_r and theta_A only), its lr x weight-decay
    budget and ratio, and the best source validation accuracy."""
    meter, _ = pretrained_tools(study.arch, pretrained, device)
    names = [group.name for group in meter.groups if not group.is_head]
    init = meter.init
    d_init = [init[name][0] for name in names]
    cos_init = [init[name][1] for name in names]
    history = [json.loads(line) for line in (pretrained / "a.log.jsonl").read_text().splitlines()]
    return {"names": names, "d_init": d_init, "cos_init": cos_init, "median_cos": statistics.median(cos_init),
            "shrink": measured[0]["shrink"], "budget": pretraining_budget(study), "lr_wd_ratio": lr_wd_ratio(study),
            "lr": study.pretrain_lr, "weight_decay": study.pretrain_weight_decay,
            "norm_weight_decay": study.pretrain_norm_weight_decay,
            "source_acc": max(entry["val_acc"] for entry in history)}


# ------------------------------------------------------------------------- what T measures


def pearson(x: list[float], y: list[float]) -> float | None:
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    from scipy.stats import pearsonr

    return float(pearsonr(x, y).statistic)


def shrink_correlation(run: dict, metric: str) -> float | None:
    """Pearson's r of ln T_l with ln shrink_l over the run's non-head layers with a finite,
    positive T."""
    pairs = [(math.log(t), math.log(s)) for t, s in zip(curve_body(run, metric), run["shrink"], strict=True)
             if t is not None and math.isfinite(t) and t > 0 and s > 0]
    return pearson([p[0] for p in pairs], [p[1] for p in pairs])


def shrink_summary(runs: list[dict], diagnostics: dict) -> dict:
    """Per metric, r(ln T, ln shrink) over the curves (median, range) and per layer the range of
    T / shrink over the runs: how much of each curve the shrinking of the weights explains."""
    summary = {}
    for metric in METRICS:
        rs = [r for r in (shrink_correlation(run, metric) for run in runs) if r is not None]
        bodies = [curve_body(run, metric) for run in runs]
        ratios = [[body[i] / s for body in bodies if math.isfinite(body[i])] for i, s in enumerate(diagnostics["shrink"])]
        summary[metric] = {"r": rs, "median_r": statistics.median(rs) if rs else None,
                           "min_r": min(rs) if rs else None, "max_r": max(rs) if rs else None,
                           "ratio_min": [min(v) if v else None for v in ratios],
                           "ratio_max": [max(v) if v else None for v in ratios]}
    ft_move = [[run["ft_move"][i] for run in runs] for i in range(len(diagnostics["shrink"]))]
    summary["ft_move_min"] = [min(v) for v in ft_move]
    summary["ft_move_max"] = [max(v) for v in ft_move]
    return summary


# ----------------------------------------------------------------------------- the findings


def regression_rows(runs: list[dict], stats: dict, metric: str = "T") -> tuple[list[dict], str]:
    """The regression's rows (data set properties and T, or the scale-free T, of the runs at the
    seed's fine-tuning lr: the lr knob is not a data set property) and the same as CSV."""
    at_base_lr = [r for r in runs if r["knob"] != "lr"]
    rows = [{"dataset": r["name"], "group": r["knob"] or "base", "G": stats[r["dataset"]]["G"],
             "D": stats[r["dataset"]]["D"], "N": stats[r["dataset"]]["N"], "T": r[metric]} for r in at_base_lr]
    table = "dataset,seed,G,D,N,T\n" + "".join(
        f"{r['name']},{r['seed']},{row['G']!r},{row['D']!r},{row['N']},{row['T']!r}\n" for r, row in zip(at_base_lr, rows))
    return rows, table


def finding2_of(curves: list[list[float]], has_head: bool = True) -> tuple[dict, list]:
    """Finding 2 over ``curves`` under the rule and its variants, and each curve's shape."""
    from metrics.curve_shape import curve_shape, finding2_variants

    shapes = [curve_shape(values, has_head=has_head) for values in curves]
    variants = finding2_variants(shapes)
    rule = variants["rule"]
    return {
        "claim": "Most of the layer-wise transferabilities are not decreasing with depth.",
        "verdict": rule.verdict,
        "evidence": rule.summary(),
        "shape": rule.shape_summary(),
        "statistics": rule.as_dict(),
        "variants": {name: {"verdict": v.verdict, "decreasing": v.decreasing, "curves": v.curves,
                            "p_value": v.p_value, "p_value_more": v.p_value_more} for name, v in variants.items()},
    }, shapes


def findings(runs: list[dict], stats: dict) -> dict:
    """Per metric: the regression, finding 1 (paired Wald tests of the standardised effects) and
    finding 2 (the rule and its variants) with every curve's shape."""
    from metrics.regression import finding1, fit_log_transferability, fit_to_dict

    result = {}
    for metric in METRICS:
        rows, table = regression_rows(runs, stats, metric)
        fit = fit_log_transferability(rows)
        second, shapes = finding2_of([curve_body(run, metric) for run in runs], has_head=False)
        result[metric] = {"rows": rows, "table": table, "fit": fit, "fit_dict": fit_to_dict(fit),
                          "finding1": finding1(fit), "finding2": second, "shapes": shapes}
    return result


def paper_baseline() -> dict:
    """The same two verdicts on the paper's own data: its ResNet-50 table (finding 1) and
    its ResNet-50 layer-wise curves (finding 2)."""
    from metrics.curve_shape import paper_architectures, paper_curves_have_head, read_paper_curves
    from metrics.regression import finding1, fit_log_transferability, read_table

    fit = fit_log_transferability(read_table(Path(__file__).resolve().parent.parent / "data" / "paper_table.csv"))
    curves = read_paper_curves()
    second, shapes = finding2_of(list(curves.values()))
    # finding 2 on the published curves of the paper's other networks (no table for finding 1)
    others = {network: finding2_of(list(read_paper_curves(architecture=network).values()),
                                   has_head=paper_curves_have_head(network))[0]
              for network in paper_architectures() if network != "ResNet-50"}
    return {"fit": fit, "finding1": finding1(fit), "finding2": second, "shapes": list(zip(curves, shapes)),
            "networks": others}


def paper_networks() -> dict[str, dict]:
    """Finding 2 on the published curves of each network of data/paper_curves.csv (ResNet-50's
    twelve, DenseNet-121's and ViT-small's three): per network, the verdict under each rule and
    each curve's shape. ViT-small's curves have no head point."""
    from metrics.curve_shape import (curve_shape, finding2_variants, paper_architectures, paper_curves_have_head,
                                     read_paper_curves)

    result = {}
    for network in paper_architectures():
        curves = read_paper_curves(architecture=network)
        has_head = paper_curves_have_head(network)
        shapes = {name: curve_shape(values, has_head=has_head) for name, values in curves.items()}
        result[network] = {"variants": finding2_variants(shapes.values()), "shapes": shapes}
    return result


# ------------------------------------------------------------- a fresh initialisation's error


def draw_bias(study: Study, pretrained: Path, runs: list[dict], finetuned: list[dict], device: str,
              seeds: tuple = DRAW_SEEDS) -> dict:
    """What `-r random:SEED` costs: T of every run measured against fresh initialisations of
    the architecture (``seeds``) instead of the true theta_r, relative to the true T
    (``finetuned``: each run's theta_FB, in the order of ``runs``).

    Returns, over the runs: the relative error of the overall T (mean over the draws; its
    mean, range, and the mean sd over the draws) and per layer the mean relative error; and
    whether a draw with the pre-training's own seed (0) reproduces theta_r exactly."""
    import torch

    from metrics import TransferabilityMeter
    from models import fresh_initialisation, layer_groups, num_classes_of
    from utils import load_state_dict_safely, resolve_device

    theta_r = load_state_dict_safely(pretrained / "r.pth")
    theta_a = load_state_dict_safely(pretrained / "a.pth")
    classes = num_classes_of(study.arch, theta_a)
    own = fresh_initialisation(study.arch, classes, 0)
    reproduces = set(own) == set(theta_r) and all(torch.equal(own[k], theta_r[k]) for k in theta_r)
    groups = layer_groups(study.arch, theta_a)
    meters = [TransferabilityMeter(groups, fresh_initialisation(study.arch, classes, seed), theta_a,
                                   resolve_device(device)) for seed in seeds]
    overall, overall_sd, per_layer = [], [], []
    for run, theta_b in zip(runs, finetuned):
        drawn = [meter(theta_b) for meter in meters]
        errors = [d.overall / run["T"] - 1 for d in drawn]
        overall.append(statistics.fmean(errors))
        overall_sd.append(statistics.stdev(errors) if len(errors) > 1 else 0.0)
        per_layer.append([statistics.fmean(d.values[i] for d in drawn) / run["layers"][i] - 1
                          for i, head in enumerate(head_flags(run)) if not head])
    layers = [statistics.fmean(run_errors[i] for run_errors in per_layer) for i in range(len(per_layer[0]))]
    return {"seeds": list(seeds), "reproduces_theta_r": reproduces, "runs": len(runs),
            "overall_mean": statistics.fmean(overall), "overall_min": min(overall), "overall_max": max(overall),
            "overall_sd_over_draws": statistics.fmean(overall_sd), "layers": layers,
            "layers_min": [min(e[i] for e in per_layer) for i in range(len(layers))],
            "layers_max": [max(e[i] for e in per_layer) for i in range(len(layers))]}


# ------------------------------------------------------------------------------ estimators


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
