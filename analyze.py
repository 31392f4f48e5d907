"""Analysis of the paper's Sections 3 and 4: dataset statistics, the regression, the figures.

    python analyze.py stats --dataset CIFAR-10 DTD --data_dir /data -a ImageNet_model.pth --source_dir /data/imagenet
    python analyze.py estimators --dataset CIFAR-10 --data_dir /data -a resnet50_a.pth resnet50_b.pth
    python analyze.py regress data/paper_table.csv --json fit.json
    python analyze.py figure results.json [more.json ...] --out Figs/layerwise.png

``stats`` measures N (training images), G (domain gap) and D (intraclass variance) of
downstream datasets against the pre-training data; ``estimators`` scores (and ranks)
pre-trained checkpoints on target datasets with LogME, LEEP, NCE, H-score and k-NN; ``regress`` fits
ln T = a G + b D + c ln N + d; ``figure`` draws layer-wise curves as a grid of panels.
"""
from __future__ import annotations

import script_start  # noqa: F401  (first: how CPU threads wait, Ctrl-C while importing)

import csv
import io
import json
import math
import os
import sys
from pathlib import Path

from metrics.estimators import DEFAULT_K, ESTIMATORS
from plotting import layerwise_grid_bytes
from utils import (
    OneLineArgumentParser,
    Outputs,
    input_roles,
    read_json,
    UserError,
    add_device_flag,
    add_output_flags,
    check_input_file,
    int_at_least,
    seed_int,
    positive_int,
    run_cli,
)

STATS_COLUMNS = ("dataset", "N", "G", "D", "T", "feature_dim", "samples", "features")


# ------------------------------------------------------------------------------ stats


def add_stats_parser(subparsers) -> None:
    from metrics.dataset_stats import GAP_MIN_SAMPLES

    parser = subparsers.add_parser("stats", help="N, G and D of downstream datasets (the paper's Section 3 table)")
    parser.add_argument("--dataset", nargs="+", required=True, metavar="NAME", help="one or more downstream datasets")
    parser.add_argument("--data_dir", help="folder of the downstream dataset(s) (layouts: docs/datasets.md)")
    parser.add_argument("-a", "--pretrained", help="theta_A, whose penultimate-layer features are used")
    parser.add_argument("--source", help="the data set -a was pre-trained on, as pretrain_on_ImageNet.py's --dataset "
                        "named it (the demo's: synthetic:source,classes=200,n=150,n_val=10,var=0.5); default: the "
                        "one recorded in the pre-training's A.last.pth beside -a, else imagenet")
    parser.add_argument("--source_dir", help="folder of the pre-training dataset (not needed for synthetic)")
    parser.add_argument("--labels", nargs="+", metavar="NAME",
                        help="a name per --dataset for the rows and for matching --transferability results "
                        "(default: the dataset's name; an imagefolder data set's folder name)")
    parser.add_argument("--features", choices=["penultimate", "pixels"], default="penultimate",
                        help="feature space: theta_A's penultimate layer (default) or pooled pixels (no model)")
    parser.add_argument("--pixel_size", type=positive_int, default=8, help="pixels: pool images to N x N (default: 8)")
    at_least_gap_samples = int_at_least(GAP_MIN_SAMPLES, f"G compares at least {GAP_MIN_SAMPLES} images of each side")
    parser.add_argument("--max_samples", type=at_least_gap_samples, default=2000,
                        help="images per dataset used for G and D (a seeded subset; default: %(default)s)")
    add_extraction_flags(parser, cached="features")
    parser.add_argument("--transferability", nargs="+", metavar="RESULT.json",
                        help="cal_transferability.py --json files: fills the T column with the overall value "
                        "of the result whose label is the dataset's name (use --labels there)")
    add_output_flags(parser, json="write the rows as JSON", csv="write the rows as CSV (ready for 'analyze.py regress')")
    parser.set_defaults(run=run_stats)


def add_extraction_flags(parser, cached: str) -> None:
    """The flags of a feature extraction (``stats``, ``estimators``): input size, batch,
    device, the cache of what is extracted (``cached``) and the seed."""
    parser.add_argument("--img_size", type=int_at_least(2),
                        help="input size (default: the model's for a ViT (224), else the dataset's)")
    parser.add_argument("--batch_size", type=positive_int, default=256)
    add_device_flag(parser)
    parser.add_argument("--cache_dir", default=".cache/features",
                        help=f"{cached} are cached here per (checkpoint, dataset, split) (default: %(default)s)")
    parser.add_argument("--seed", type=seed_int, default=0, help="the subsets and the seeded splits")


def data_folders(args) -> list[tuple[str | None, str]]:
    """The data sets' folders a subcommand reads, each with how an error names it."""
    from data.datasets import imagefolder_path

    folders = [(getattr(args, flag), f"--{flag} {getattr(args, flag)}") for flag in ("data_dir", "source_dir")
               if getattr(args, flag, None)]
    for flag in ("dataset", "source"):
        given = getattr(args, flag, None)
        for name in ([given] if isinstance(given, str) else given or []):
            if imagefolder_path(name) is not None:
                folders.append((imagefolder_path(name), f"--{flag} {name}"))
    return [(os.path.expanduser(folder), role) for folder, role in folders]


def validation_split(name: str, data_dir: str | None, split: str, img_size: int | None, arch: str | None = None,
                     seed: int = 0):
    """A split with the evaluation transform (resize, normalise; no augmentation), at
    ``img_size`` (--img_size) or by default the input size of ``arch`` (the extractor's
    model; None: no model), else the data set's (:func:`engine.runs.input_size`, which
    refuses a size ``arch`` cannot take). ``seed`` picks the seeded splits (imagefolder,
    Caltech-101, ...) as fine-tuning with that --seed does."""
    from data import build_dataset, build_transform
    from engine.runs import input_size

    return build_dataset(name, data_dir, split, build_transform(False, input_size(arch, img_size, name)), seed=seed)


def features_key(name: str, data_dir: str | None, seed: int) -> str:
    """The feature cache's name of a data set: a seeded split's images depend on --seed."""
    return f"{name}@{data_dir}" + (f"@split-seed={seed}" if seed else "")


def make_extractor(args):
    from metrics.dataset_stats import PenultimateFeatures, PixelFeatures

    if args.features == "pixels":
        return PixelFeatures(size=args.pixel_size)
    if not args.pretrained:
        raise UserError("stats: -a is required for --features penultimate (or use --features pixels)")
    return PenultimateFeatures(None, args.pretrained)


PAPER_SOURCE = "imagenet"  # the paper's pre-training set: --source when nothing says otherwise


def source_of(args) -> str:
    """--source, else the data set the pre-training of -a recorded in its ``A.last.pth``
    (said on stderr), else the paper's ImageNet."""
    if args.source:
        return args.source
    if args.pretrained and args.features == "penultimate":
        from engine.checkpoint import load_checkpoint, run_files

        last = run_files(args.pretrained)[1]
        try:
            recorded = load_checkpoint(last).get("args", {}).get("dataset") if last.is_file() else None
        except UserError:  # not a training checkpoint of this project: fall back to the default
            recorded = None
        if isinstance(recorded, str) and recorded:
            print(f"note: --source {recorded} (what {last} records -a was pre-trained on)", file=sys.stderr)
            return recorded
    return PAPER_SOURCE


def source_split(name: str, args, arch: str | None):
    """The pre-training set's images; its errors name --source and --source_dir, the flags
    that give it."""
    from data import canonical_name
    from data.datasets import imagefolder_path

    try:
        canonical_name(name)
    except UserError:
        raise UserError(f"--source {name}: unknown dataset; give the data set -a was pre-trained on, as "
                        f"pretrain_on_ImageNet.py --dataset named it") from None
    if not args.source_dir and canonical_name(name) != "synthetic" and imagefolder_path(name) is None:
        given = "--source imagenet (the default: the paper's pre-training set)" if not args.source else f"--source {name}"
        raise UserError(f"{given}: needs --source_dir, the folder of its images; or give --source the data set -a "
                        f"was pre-trained on (the demo's: --source synthetic:source,classes=200,n=150,n_val=10,"
                        f"var=0.5)")
    try:
        return validation_split(name, args.source_dir, "train", args.img_size, arch, args.seed)
    except UserError as err:  # the registry names the target's flag; here the folder came from --source_dir
        message = str(err)
        if message.startswith("--data_dir "):
            raise UserError("--source_dir " + message[len("--data_dir "):]) from None
        raise


def run_stats(args) -> int:
    from metrics.dataset_stats import dataset_statistics
    from utils import resolve_device

    from data.datasets import dataset_label

    outputs = Outputs.of(args, "--json", "--csv",
                         inputs=input_roles("-a", args.pretrained) + input_roles("--transferability", args.transferability),
                         folders=data_folders(args))
    device = resolve_device(args.device)
    if args.labels is not None and len(args.labels) != len(args.dataset):
        raise UserError(f"--labels: got {len(args.labels)} names for {len(args.dataset)} --dataset entries; "
                        f"give one each")
    labels = args.labels or [dataset_label(name, args.data_dir) for name in args.dataset]
    if len(set(labels)) < len(labels):
        twice = next(label for label in labels if labels.count(label) > 1)
        raise UserError(f"--dataset: two data sets are both called {twice!r}; tell them apart with --labels "
                        f"(one name per --dataset)")
    overall = {label: value for path in args.transferability or [] for label, value in read_overall(path).items()}
    missing = [label for label in labels if overall and label not in overall]
    if missing:
        raise UserError(f"--transferability: no result labelled {missing[0]!r} in "
                        f"{', '.join(args.transferability)}; label the results with the dataset names "
                        f"(cal_transferability.py --labels {' '.join(labels)}) or leave --transferability out")
    extractor = make_extractor(args)
    source_name = source_of(args)
    source = source_split(source_name, args, extractor.arch)
    rows = []
    for name, label in zip(args.dataset, labels):
        target = validation_split(name, args.data_dir, "train", args.img_size, extractor.arch, args.seed)
        stats = dataset_statistics(
            target, source, extractor, max_samples=args.max_samples, cache_dir=args.cache_dir,
            target_key=features_key(name, args.data_dir, args.seed),
            source_key=features_key(source_name, args.source_dir, args.seed),
            device=device, seed=args.seed, batch_size=args.batch_size)
        rows.append({"dataset": label, **{k: stats[k] for k in ("N", "G", "D")}, "T": overall.get(label),
                     "feature_dim": stats["feature_dim"], "samples": stats["samples"], "features": args.features})
        print(f"{label:<28} N {stats['N']:>9,}  G {stats['G']:.4g}  D {stats['D']:.4g}  "
              + (f"T {overall[label]:.2f}  " if overall.get(label) is not None else "") +
              f"({stats['samples']} images, {stats['feature_dim']}-d {args.features} features)", flush=True)
    write_rows(outputs, rows, STATS_COLUMNS)
    return 0


def write_rows(outputs: Outputs, rows: list[dict], columns) -> None:
    if "--json" in outputs:
        outputs.add("--json", json.dumps(rows, indent=2) + "\n")
    if "--csv" in outputs:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        outputs.add("--csv", buffer.getvalue())
    outputs.commit()


# ------------------------------------------------------------------------- estimators

ESTIMATOR_COLUMNS = ("dataset", "checkpoint", "arch", *ESTIMATORS, *(f"rank_{name}" for name in ESTIMATORS),
                     "samples", "N", "classes", "feature_dim", "source_classes", "k")


def add_estimators_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "estimators", help="LogME, LEEP, NCE, H-score and k-NN of pre-trained checkpoints on target datasets; "
        "several checkpoints are ranked")
    parser.add_argument("--dataset", nargs="+", required=True, metavar="NAME", help="one or more target datasets")
    parser.add_argument("--data_dir", help="folder of the target dataset(s) (layouts: docs/datasets.md)")
    parser.add_argument("-a", "--pretrained", nargs="+", required=True, metavar="A.pth",
                        help="one or more pre-trained checkpoints (theta_A) with their source classifier heads")
    parser.add_argument("--max_samples", type=int_at_least(2, "k-NN leaves one image out"), default=10000,
                        help="training images used per dataset (a seeded class-stratified subset; default: %(default)s)")
    parser.add_argument("--k", type=positive_int, default=DEFAULT_K, help="neighbours of the k-NN estimator (default: %(default)s)")
    add_extraction_flags(parser, cached="features and logits")
    add_output_flags(parser, json="write the scores and ranks as JSON", csv="write the scores and ranks as CSV")
    parser.set_defaults(run=run_estimators)


def rank_rows(rows: list[dict]) -> None:
    """``rank_NAME`` of every row: 1 for the highest score of NAME (ties share the better rank)."""
    for name in ESTIMATORS:
        for row in rows:
            row[f"rank_{name}"] = 1 + sum(other[name] > row[name] for other in rows)


def print_estimators(name: str, rows: list[dict]) -> None:
    first = rows[0]
    print(f"{name}: {first['samples']:,} of {first['N']:,} training images, {first['classes']} classes, "
          f"k = {first['k']}")
    width = max(len("checkpoint"), *(len(row["checkpoint"]) for row in rows))
    print(f"  {'checkpoint':<{width}}" + "".join(f"{title:>10}" for title in ESTIMATORS.values()))
    for row in rows:
        print(f"  {row['checkpoint']:<{width}}" + "".join(f"{row[key]:>10.4g}" for key in ESTIMATORS))
    if len(rows) > 1:
        print("  ranking (1 = most transferable):")
        for key, title in ESTIMATORS.items():
            order = sorted(rows, key=lambda row: row[f"rank_{key}"])
            text = f"{order[0]['checkpoint']} ({order[0][f'rank_{key}']})"
            for before, row in zip(order, order[1:]):
                tie = row[f"rank_{key}"] == before[f"rank_{key}"]
                text += f" {'=' if tie else '>'} {row['checkpoint']} ({row[f'rank_{key}']})"
            print(f"    {title:<8} {text}")


def run_estimators(args) -> int:
    from metrics.dataset_stats import PenultimateFeatures, cached_outputs
    from metrics.estimators import estimate_all
    from utils import resolve_device, same_file

    outputs = Outputs.of(args, "--json", "--csv", inputs=input_roles("-a", args.pretrained), folders=data_folders(args))
    for index, path in enumerate(args.pretrained):
        twin = next((other for other in args.pretrained[:index] if same_file(other, path)), None)
        if twin is not None:
            raise UserError(f"-a: {path} and {twin} are one file; give each checkpoint once")
    device = resolve_device(args.device)
    extractors = [PenultimateFeatures(None, path) for path in args.pretrained]
    rows = []
    for name in args.dataset:
        group = []
        for path, extractor in zip(args.pretrained, extractors):
            target = validation_split(name, args.data_dir, "train", args.img_size, extractor.arch, args.seed)
            extracted = cached_outputs(args.cache_dir, extractor, features_key(name, args.data_dir, args.seed),
                                       "train", target, batch_size=args.batch_size, device=device,
                                       max_samples=args.max_samples, seed=args.seed, stratify=True, logits=True)
            if extracted.labels.size < 2:
                raise UserError(f"--dataset {name}: {extracted.labels.size} readable training image(s); the "
                                "estimators need at least two (kNN leaves one out)")
            scores = estimate_all(extracted.features, extracted.logits, extracted.labels, k=args.k)
            group.append({"dataset": name, "checkpoint": path, "arch": extractor.arch, **scores,
                          "samples": int(extracted.labels.size), "N": len(target),
                          "classes": int(len(set(extracted.labels.tolist()))),
                          "feature_dim": int(extracted.features.shape[1]),
                          "source_classes": int(extracted.logits.shape[1]), "k": min(args.k, extracted.labels.size - 1)})
        rank_rows(group)
        print_estimators(name, group)
        rows += group
    write_rows(outputs, rows, ESTIMATOR_COLUMNS)
    return 0


# ---------------------------------------------------------------------------- regress


def add_regress_parser(subparsers) -> None:
    parser = subparsers.add_parser("regress", help="fit ln T = a G + b D + c ln N + d by least squares")
    parser.add_argument("table", help="CSV with columns dataset, G, D, N, T (others are ignored)")
    add_output_flags(parser, json="write the fit as JSON", fig="Figs/regression.png", fig_help="partial-regression figure")
    parser.set_defaults(run=run_regress)


def run_regress(args) -> int:
    from metrics.regression import (finding1, fit_log_transferability, fit_to_dict, format_finding1, format_fit,
                                    partial_regression_figure, read_table)

    outputs = Outputs.of(args, "--json", "--fig", inputs=input_roles("table", args.table))
    rows = read_table(args.table)
    fit = fit_log_transferability(rows)
    verdict = finding1(fit)
    print(format_fit(fit, title=f"{args.table}: {len(rows)} datasets"))
    print()
    print(format_finding1(verdict, fit.log_label))
    if "--json" in outputs:
        outputs.add("--json", json.dumps({**fit_to_dict(fit), "finding1": verdict}, indent=2) + "\n")
    if "--fig" in outputs:
        outputs.add("--fig", partial_regression_figure(rows, fit, outputs.image_format("--fig")))
    outputs.commit()
    return 0


# ----------------------------------------------------------------------------- figure


def add_figure_parser(subparsers) -> None:
    parser = subparsers.add_parser("figure", help="layer-wise curves of many fine-tuned checkpoints, one panel each")
    parser.add_argument("results", nargs="+", metavar="RESULT.json",
                        help="files written by cal_transferability.py --json")
    parser.add_argument("--out", default="Figs/layerwise_transferability.png",
                        help="the figure (default: %(default)s)")
    parser.add_argument("--columns", type=positive_int, default=6, help="panels per row (default: %(default)s)")
    parser.set_defaults(run=run_figure)


def _load_results(path: str) -> dict:
    return read_json(path, "the --json output of cal_transferability.py")


def _short_label(result: dict) -> str:
    """The result's label as text (a number is written as one; none: the -b file's name)."""
    label = result.get("label")
    label = Path(str(result["finetuned"])).name if label is None or label == "" else str(label)
    return Path(label).stem if label.endswith((".pth", ".pt")) else label


def read_overall(path: str) -> dict[str, float | None]:
    """``{label: overall T}`` of a cal_transferability JSON (labels without .pth)."""
    document = _load_results(path)
    try:
        overall = {_short_label(result): result["overall"] for result in document["results"]}
    except (KeyError, TypeError):
        raise UserError(f"{path}: not a cal_transferability.py result (expected results[].overall)") from None
    for label, value in overall.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise UserError(f"{path}: result {label!r} has overall {json.dumps(value)[:40]}, not a number or null; "
                            "give the --json output of cal_transferability.py")
    return overall


def _transferability(path: str, value: object) -> float:
    """One layer's T from a results JSON: a number, or null (inf: a frozen layer)."""
    if value is None:
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{path}: a layer's transferability is {json.dumps(value)[:40]}, not a number or null; "
                        "give the --json output of cal_transferability.py")
    return float(value)


def read_results(path: str) -> list[tuple[str, list[float]]]:
    """``(label, T per point)`` for every fine-tuned checkpoint in a cal_transferability JSON."""
    document = _load_results(path)
    try:
        panels = []
        for result in document["results"]:
            values = [_transferability(path, layer["transferability"]) for layer in result["layers"]]
            panels.append((_short_label(result), values))
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}: not a cal_transferability.py result (expected results[].layers[].transferability)") from None
    if not panels:
        raise UserError(f"{path}: holds no results")
    return panels


def drawable_panels(paths: list[str]) -> list[tuple[str, list[float]]]:
    """The panels of every result that has a finite T somewhere; a result whose every layer
    is null (all frozen or undefined) would be an empty panel: it is skipped with a note, and
    nothing at all to draw is refused."""
    panels = []
    for path in paths:
        for label, values in read_results(path):
            if any(math.isfinite(v) for v in values):
                panels.append((label, values))
            else:
                print(f"note: {path}: result {label!r} has no finite transferability (every layer is null); "
                      "skipped", file=sys.stderr)
    if not panels:
        raise UserError(f"{', '.join(paths)}: no result has a finite transferability in any layer; nothing to draw")
    return panels


def run_figure(args) -> int:
    outputs = Outputs({"--out": args.out}, figures=("--out",), inputs=input_roles("RESULT.json", args.results))
    panels = drawable_panels(args.results)
    outputs.add("--out", layerwise_grid_bytes(panels, outputs.image_format("--out"), columns=args.columns))
    outputs.commit(announce=lambda path: print(f"wrote {path} ({len(panels)} panels)"))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_stats_parser(subparsers)
    add_estimators_parser(subparsers)
    add_regress_parser(subparsers)
    add_figure_parser(subparsers)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
