"""Layer-wise and overall transferability of a pre-trained network on downstream tasks.

    python cal_transferability.py -r random_init_model.pth -a pretrained.pth -b finetuned.pth [more.pth ...]

For every fine-tuned checkpoint B it prints T per layer and the overall mean (and the
scale-free T's mean, docs/metric.md), and it can write JSON, CSV and a figure. With
``-r random:SEED --random_draws K`` it measures against K fresh initialisations and reports
the mean and standard deviation over them. With no arguments it runs on the demo checkpoints
in ckpt/.
"""
from __future__ import annotations

import script_start  # noqa: F401  (first: how CPU threads wait, Ctrl-C while importing)

import argparse
import csv
import io
import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import torch
from tqdm import tqdm

from metrics import (HEAD, DrawSummary, FrozenLayerWarning, NonFiniteTensorError, Transferability, TransferabilityMeter,
                     mean_over_draws)
from metrics.diagnostics import Problem, finetuning_problems, pretraining_problems, saturation_problems
from models import ARCHITECTURES, GENERIC, fresh_initialisation, layer_groups, num_classes_of, resolve_arch
from plotting import layerwise_figure_bytes
from utils import (
    OneLineArgumentParser,
    Outputs,
    input_roles,
    UserError,
    add_device_flag,
    add_output_flags,
    load_state_dict_safely,
    positive_int,
    resolve_device,
    run_cli,
    run_files,
    same_file,
)

CKPT_DIR = Path(__file__).resolve().parent / "ckpt"
DEMO_RANDOM = CKPT_DIR / "demo_random_init.pth"
DEMO_PRETRAINED = CKPT_DIR / "demo_pretrained.pth"
DEMO_FINETUNED_GLOB = "demo_finetuned_*.pth"
RANDOM_PREFIX = "random:"
METRIC_THREADS = 1  # --threads' default (docs/performance.md, "A busy machine")
SEED_RANGE = (-2**63, 2**64)  # what torch's generator accepts: [low, high)
FIG_METRICS = {  # --fig_metric: (y label, title)
    "T": ("transferability T", "Transferability"),
    "scale_free": ("scale-free transferability T_sf", "Scale-free transferability"),
    "both": ("T (solid), scale-free T_sf (dashed)", "Transferability (solid) and scale-free (dashed)"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineArgumentParser(
        description="Layer-wise transferability T = D(theta_r, theta_FB) / D(theta_A, theta_FB) "
        "of pre-trained weights theta_A on downstream tasks (D: mean absolute weight difference).",
        epilog="With no -r/-a/-b it runs on the demo checkpoints shipped in ckpt/.",
    )
    parser.add_argument("-r", "--random_init", metavar="PATH",
                        help="theta_r: the random initialisation pre-training started from, or "
                        "'random:SEED' to draw a fresh one with that seed (the very theta_r when pre-training "
                        "started from that seed in this project, else an approximation; see docs/metric.md)")
    parser.add_argument("--random_draws", type=positive_int, metavar="K",
                        help="with -r random:SEED: measure against K fresh initialisations (seeds SEED ... "
                        "SEED+K-1) and report the mean and sample standard deviation of T over them (default: 1)")
    parser.add_argument("-a", "--pretrained", metavar="PATH", help="theta_A: the pre-trained weights")
    parser.add_argument("-b", "--finetuned", metavar="PATH", nargs="+", action="extend",
                        help="theta_FB: one or more fine-tuned checkpoints")
    parser.add_argument("--arch", choices=[*ARCHITECTURES, GENERIC],
                        help="architecture (default: inferred from the checkpoints); 'generic' groups "
                        "any model's weights by numbered block")
    parser.add_argument("--labels", nargs="+", metavar="NAME",
                        help="a label per -b file for the printout, JSON/CSV and legend (default: file names)")
    add_device_flag(parser, default="cpu")  # a ResNet-50 trio takes ~66 ms here; CUDA's start-up costs more
    parser.add_argument("--threads", type=positive_int, default=METRIC_THREADS, metavar="N",
                        help="CPU threads for reading and measuring (default: %(default)s: the work is bound by "
                        "memory, not arithmetic, and one thread keeps its speed when other processes busy the "
                        "cores, where several wait on each other; docs/performance.md)")
    add_output_flags(parser, json="write the results as JSON", csv="write the results as CSV, one row per layer",
                     fig="Figs/transferability.png", fig_help="figure of T per layer")
    parser.add_argument("--fig_metric", choices=list(FIG_METRICS), default="T",
                        help="what the figure draws: T (default), the scale-free T, or both (T solid, "
                        "scale-free dashed, one colour per fine-tuned checkpoint)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also print a table per layer: D(theta_r, theta_FB), D(theta_A, theta_FB), T, "
                        "how far pre-training moved it, D(theta_r, theta_A) and the cosine similarity of theta_r "
                        "and theta_A, how much it shrank the weights (shrink) and the scale-free T (T_sf)")
    args = parser.parse_args(argv)
    args.legends = None  # the figure's legend: the labels, or for the demo what each target is
    if args.random_init is None and args.pretrained is None and args.finetuned is None:
        # the training runs' own .last.pth checkpoints lie beside the demo weights
        demo_finetuned = sorted(p for p in CKPT_DIR.glob(DEMO_FINETUNED_GLOB) if not p.name.endswith(".last.pth"))
        if not (DEMO_RANDOM.exists() and DEMO_PRETRAINED.exists() and demo_finetuned):
            parser.print_usage(sys.stderr)
            raise UserError("no checkpoints given and no demo checkpoints in ckpt/; pass -r, -a and -b")
        args.random_init, args.pretrained = str(DEMO_RANDOM), str(DEMO_PRETRAINED)
        args.finetuned = [str(path) for path in demo_finetuned]
        args.legends = [demo_legend(path) for path in args.finetuned]
    for flag, value in (("-r", args.random_init), ("-a", args.pretrained), ("-b", args.finetuned)):
        if value is None:
            raise UserError(f"{flag} is required (give -r, -a and -b together, or none for the demo)")
    if args.labels is not None and len(args.labels) != len(args.finetuned):
        raise UserError(f"--labels: got {len(args.labels)} labels for {len(args.finetuned)} -b files; give one each")
    if args.random_init.startswith(RANDOM_PREFIX):
        seed = random_seed(args.random_init)  # refused before any checkpoint is read
        draws = args.random_draws or 1
        if seed + draws > SEED_RANGE[1]:
            raise UserError(f"--random_draws {draws}: the seeds {seed} ... {seed + draws - 1} go past "
                            f"2**64 - 1; start from a smaller -r random:SEED")
    elif args.random_draws is not None:
        raise UserError(f"--random_draws {args.random_draws}: needs -r random:SEED (it draws K fresh "
                        f"initialisations); -r {args.random_init} is one fixed theta_r, so drop the flag")
    args.random_draws = args.random_draws or 1
    check_roles_differ(args)
    return args


# Why two roles cannot share a file: T = D(theta_r, theta_FB) / D(theta_A, theta_FB).
SAME_FILE_PROBLEMS = {
    ("-r", "-a"): "T is then 1 for every layer by definition; give -r the initialisation pre-training "
                  "started from and -a the weights it ended with",
    ("-a", "-b"): "D(theta_A, theta_FB) is then 0 and T undefined; give -b the fine-tuned weights",
    ("-r", "-b"): "D(theta_r, theta_FB) is then 0 and T 0 for every layer; give -b the fine-tuned weights",
}


def check_roles_differ(args: argparse.Namespace) -> None:
    """Refuse one file in two roles (also through a symbolic or hard link): T would be 1, 0
    or undefined by construction, never a measurement."""
    roles = [("-a", args.pretrained)] + [("-b", path) for path in args.finetuned]
    if not args.random_init.startswith(RANDOM_PREFIX):
        roles.insert(0, ("-r", args.random_init))
    for i, (flag, path) in enumerate(roles):
        for other_flag, other in roles[i + 1:]:
            if flag != other_flag and same_file(path, other):
                raise UserError(f"{flag} {path} and {other_flag} {other} name the same file: "
                                f"{SAME_FILE_PROBLEMS[flag, other_flag]}")


@dataclass
class Inputs:
    arch: str
    theta_r: Mapping[str, torch.Tensor] | None  # None with -r random:SEED (see seeds)
    theta_a: Mapping[str, torch.Tensor]
    finetuned: list[tuple[str, Mapping[str, torch.Tensor]]]
    seeds: list[int] | None = None  # -r random:SEED --random_draws K: SEED ... SEED+K-1

    def random_inits(self) -> Iterator[Mapping[str, torch.Tensor]]:
        """theta_r, or one fresh initialisation per seed, one at a time."""
        if self.seeds is None:
            yield self.theta_r
            return
        classes = num_classes_of(self.arch, self.theta_a)
        for seed in self.seeds:
            yield fresh_initialisation(self.arch, classes, seed)


def _check_same_tensors(path: str, state_dict: Mapping[str, torch.Tensor], reference_path: str,
                        reference: Mapping[str, torch.Tensor], keys: list[str]) -> None:
    for key in keys:
        if key not in state_dict:
            raise UserError(f"{path}: tensor {key} is missing (it is in {reference_path}); "
                            "all three checkpoints must be of the same architecture")
        if state_dict[key].shape != reference[key].shape:
            raise UserError(f"{path}: tensor {key} has shape {list(state_dict[key].shape)} but "
                            f"{list(reference[key].shape)} in {reference_path}; "
                            "all three checkpoints must be of the same architecture")
        if not state_dict[key].is_floating_point():
            raise UserError(f"{path}: tensor {key} is {state_dict[key].dtype}, not a floating-point weight")


def random_seed(spec: str) -> int:
    """The SEED of ``-r random:SEED``: an integer that ``torch.manual_seed`` takes."""
    try:
        seed = int(spec[len(RANDOM_PREFIX):])
    except ValueError:
        raise UserError(f"-r {spec}: the seed must be an integer, as in -r random:0") from None
    if not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
        raise UserError(f"-r {spec}: the seed must be an integer from -2**63 to 2**64 - 1, as in -r random:0")
    return seed


def _random_seeds(spec: str, arch: str, draws: int) -> list[int]:
    seed = random_seed(spec)
    if arch == GENERIC:
        raise UserError(f"-r {spec}: drawing an initialisation needs a known --arch, not {GENERIC}")
    if draws == 1:
        what, exact = "a fresh initialisation", f"this very draw (this project's pre-training with --seed {seed})"
    else:
        what = f"{draws} fresh initialisations (seeds {seed} ... {seed + draws - 1})"
        exact = "one of these draws"
    warnings.warn(f"-r {spec} draws {what} of {arch}; the paper measures against the initialisation "
                  f"pre-training actually started from, so T is only an approximation unless pre-training "
                  f"started from {exact}")
    return list(range(seed, seed + draws))


def load_inputs(args: argparse.Namespace) -> Inputs:
    """Read every checkpoint once and check that they belong together."""
    theta_a = load_state_dict_safely(args.pretrained)
    arch = resolve_arch(theta_a, args.arch, args.pretrained, allow_generic=True)
    keys = [k for g in layer_groups(arch, theta_a) if not g.is_head for k in g.keys]
    if not keys:
        raise UserError(f"{args.pretrained}: holds no weight tensors to compare")
    _check_same_tensors(args.pretrained, theta_a, args.pretrained, theta_a, keys)

    others: list[tuple[str, Mapping[str, torch.Tensor]]] = []
    theta_r, seeds = None, None
    if args.random_init.startswith(RANDOM_PREFIX):
        seeds = _random_seeds(args.random_init, arch, args.random_draws)
    else:
        theta_r = load_state_dict_safely(args.random_init)
        others.append((args.random_init, theta_r))
    finetuned = [(path, load_state_dict_safely(path)) for path in args.finetuned]
    for path, state_dict in others + finetuned:
        if arch != GENERIC:
            resolve_arch(state_dict, arch, path, reference=args.pretrained)
        _check_same_tensors(path, state_dict, args.pretrained, theta_a, keys)
    roles = [("-a", args.pretrained, theta_a)] + [("-b", path, state_dict) for path, state_dict in finetuned]
    if theta_r is not None:
        roles.insert(0, ("-r", args.random_init, theta_r))
    check_not_copies(roles, keys)
    return Inputs(arch, theta_r, theta_a, finetuned, seeds)


def check_not_copies(roles: list[tuple[str, str, Mapping[str, torch.Tensor]]], keys: list[str]) -> None:
    """Refuse two files in two roles (``(flag, path, state dict)``) that hold the same weights in
    every compared tensor: a copy is one file in two roles (check_roles_differ), by content. One
    equal layer is legitimate (a layer fine-tuning froze) and is warned about in the results."""
    for i, (flag, path, weights) in enumerate(roles):
        for other_flag, other, other_weights in roles[i + 1:]:
            if flag != other_flag and all(torch.equal(weights[key], other_weights[key]) for key in keys):
                raise UserError(f"{other_flag} {other} holds the same weights as {flag} {path} in every layer "
                                f"(a copy?): {SAME_FILE_PROBLEMS[flag, other_flag]}")


def _fmt(value: float) -> float:
    return round(value, 2) if math.isfinite(value) else value


def _number(value: float | None) -> float | None:
    """JSON has no inf/nan: undefined numbers are written as null."""
    return value if value is not None and math.isfinite(value) else None


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


@dataclass
class Measured:
    """What one fine-tuned checkpoint gave: ``result`` is, with several draws of theta_r,
    the mean over them (``draws`` holds the spread; None when -r is a file)."""

    path: str
    label: str
    result: Transferability
    draws: DrawSummary | None = None
    problems: tuple[Problem, ...] = ()  # why this measurement may not mean what it seems to


def with_problems(measured: Measured) -> Measured:
    """``measured`` with the problems of its fine-tuning (metrics/diagnostics.py)."""
    problems = finetuning_problems(measured.result) + saturation_problems(run_files(measured.path)[2])
    return Measured(measured.path, measured.label, measured.result, measured.draws, tuple(problems))


def report(measured: Measured, verbose: bool) -> None:
    result, draws = measured.result, measured.draws
    spread = draws is not None and draws.draws > 1
    if verbose:
        print(f"{'#':>3}  {'layer':<36} {'D(r,FB)':>12} {'D(A,FB)':>12} {'T':>8}  {'D(r,A)':>12} "
              f"{'cos(r,A)':>8} {'shrink':>7} {'T_sf':>8}{'  sd(T)' if spread else ''}  status")
        for i, layer in enumerate(result.layers, 1):
            sd = f"  {draws.sd[i - 1]:>5.2f}" if spread else ""
            print(f"{i:>3}  {layer.name:<36} {_cell(layer.d_random, '.6g'):>12} "
                  f"{_cell(layer.d_pretrained, '.6g'):>12} {layer.transferability:>8.2f}  "
                  f"{_cell(layer.d_init, '.6g'):>12} {_cell(layer.cos_init, '.3f'):>8} "
                  f"{_cell(layer.shrink, '.3f'):>7} {layer.transferability_scale_free:>8.2f}{sd}  {layer.status}")
    print("Layer-wise transferability: ", [_fmt(v) for v in result.values])
    print(f"Overall transferability: {result.overall:.2f}")
    print(f"Overall scale-free transferability: {result.overall_scale_free:.2f}")
    if spread:
        print(f"Overall transferability over {draws.draws} fresh initialisations: "
              f"{draws.mean.overall:.2f} ± {draws.overall_sd:.2f}")
    for problem in measured.problems:
        print(f"warning: {problem.message}")


def print_pretraining_notes(problems: list[Problem]) -> None:
    """One line on stderr per problem of the pre-training itself (docs/metric.md: when T means something)."""
    for problem in problems:
        print(f"note: {problem.message}", file=sys.stderr)


def draws_json(draws: DrawSummary | None, seeds: list[int] | None) -> dict | None:
    if draws is None:
        return None
    return {
        "k": draws.draws,
        "seeds": seeds,
        "overall_mean": _number(draws.mean.overall),
        "overall_sd": _number(draws.overall_sd),
        "layers": [{"name": layer.name, "mean": _number(layer.transferability), "sd": _number(sd)}
                   for layer, sd in zip(draws.mean.layers, draws.sd)],
    }


def results_json(args: argparse.Namespace, inputs: Inputs, results: list[Measured],
                 pretraining: list[Problem]) -> dict:
    return {
        "arch": inputs.arch,
        "random_init": args.random_init,
        "pretrained": args.pretrained,
        "warnings": [problem.as_json() for problem in pretraining],
        "results": [
            {
                "finetuned": m.path,
                "label": m.label,
                "overall": _number(m.result.overall),
                "overall_scale_free": _number(m.result.overall_scale_free),
                "warnings": [problem.as_json() for problem in m.problems],
                "random_draws": draws_json(m.draws, inputs.seeds),
                "layers": [
                    {
                        "name": layer.name,
                        "transferability": _number(layer.transferability),
                        "d_random": _number(layer.d_random),
                        "d_pretrained": _number(layer.d_pretrained),
                        "d_init": _number(layer.d_init),
                        "cos_init": _number(layer.cos_init),
                        "shrink": _number(layer.shrink),
                        "ft_move": _number(layer.ft_move),
                        "transferability_scale_free": _number(layer.transferability_scale_free),
                        "status": layer.status,
                    }
                    for layer in m.result.layers
                ],
            }
            for m in results
        ],
    }


CSV_COLUMNS = ["finetuned", "label", "overall", "overall_scale_free", "index", "layer", "transferability",
               "d_random", "d_pretrained", "d_init", "cos_init", "shrink", "ft_move", "transferability_scale_free",
               "status"]


def results_csv(results: list[Measured]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    optional = lambda value: "" if value is None else repr(value)  # noqa: E731
    for m in results:
        for i, layer in enumerate(m.result.layers, 1):
            writer.writerow([m.path, m.label, repr(m.result.overall), repr(m.result.overall_scale_free), i,
                             layer.name, repr(layer.transferability), optional(layer.d_random),
                             optional(layer.d_pretrained), optional(layer.d_init), optional(layer.cos_init),
                             optional(layer.shrink), optional(layer.ft_move),
                             repr(layer.transferability_scale_free), layer.status])
    return out.getvalue()


def figure(results: list[Measured], metric: str, fmt: str, xlabel: str, legends: list[str] | None = None) -> bytes:
    """The --fig image: T, the scale-free T, or both (scale-free dashed, in T's colour), with
    the layers named, the head drawn apart and T = 1 marked; ``legends`` replaces the labels
    in the legend."""
    ylabel, title = FIG_METRICS[metric]
    names = legends or [m.label for m in results]
    plain = [(name, m.result.values, m.result.overall) for name, m in zip(names, results)]
    scale_free = [(name, m.result.values_scale_free, m.result.overall_scale_free) for name, m in zip(names, results)]
    layers = results[0].result.layers
    where = dict(layer_names=[layer.name for layer in layers], is_head=[layer.status == HEAD for layer in layers])
    if metric == "T":
        return layerwise_figure_bytes(plain, fmt, xlabel, ylabel=ylabel, title=title, **where)
    if metric == "scale_free":
        return layerwise_figure_bytes(scale_free, fmt, xlabel, ylabel=ylabel, title=title, **where)
    return layerwise_figure_bytes(plain, fmt, xlabel, ylabel=ylabel, title=title, dashed=scale_free, **where)


def demo_legend(path: str) -> str:
    """What a demo checkpoint is, for the figure's legend: ``demo_finetuned_gap0.0.pth`` ->
    ``target at domain gap 0.0 (demo_finetuned_gap0.0.pth)``."""
    name = Path(path).name
    gap = name[len("demo_finetuned_gap"):-len(".pth")] if name.startswith("demo_finetuned_gap") else None
    return f"target at domain gap {gap} ({name})" if gap else name


def default_labels(paths: list[str]) -> list[str]:
    names = [Path(p).name for p in paths]
    return names if len(set(names)) == len(names) else list(paths)


def measure(meter: TransferabilityMeter, args: argparse.Namespace, path: str,
            theta_b: Mapping[str, torch.Tensor]) -> Transferability:
    try:
        return meter(theta_b)
    except NonFiniteTensorError as err:
        where = {"random": args.random_init, "pretrained": args.pretrained, "finetuned": path}[err.role]
        raise UserError(f"{where}: tensor {err.key} holds NaN or Inf; the checkpoint is broken") from None


def measure_all(args: argparse.Namespace, inputs: Inputs, device: torch.device) -> list[Measured]:
    """Every -b file against theta_r (or each draw of it), printing as it goes."""
    groups = layer_groups(inputs.arch, inputs.theta_a)
    labels = args.labels or default_labels(args.finetuned)
    progress = lambda: tqdm(inputs.finetuned, desc="fine-tuned", disable=None, leave=False)  # noqa: E731
    if inputs.seeds is None or len(inputs.seeds) == 1:
        [theta_r] = inputs.random_inits()
        meter = TransferabilityMeter(groups, theta_r, inputs.theta_a, device)
        results = []
        for (path, theta_b), label in zip(progress(), labels):
            print(f"theta_FB: {label}", flush=True)
            result = measure(meter, args, path, theta_b)
            draws = None if inputs.seeds is None else mean_over_draws([result])
            results.append(with_problems(Measured(path, label, result, draws)))
            report(results[-1], args.verbose)
        return results

    per_draw: list[list[Transferability]] = []  # [draw][-b file]; one theta_r in memory at a time
    for i, theta_r in enumerate(tqdm(inputs.random_inits(), total=len(inputs.seeds), desc="draws",
                                     disable=None, leave=False)):
        meter = TransferabilityMeter(groups, theta_r, inputs.theta_a, device)
        with warnings.catch_warnings():
            if i:  # a frozen layer is frozen against every draw: say so once
                warnings.simplefilter("ignore", FrozenLayerWarning)
            per_draw.append([measure(meter, args, path, theta_b) for path, theta_b in inputs.finetuned])
    results = []
    for j, ((path, _), label) in enumerate(zip(inputs.finetuned, labels)):
        summary = mean_over_draws([draw[j] for draw in per_draw])
        results.append(with_problems(Measured(path, label, summary.mean, summary)))
        print(f"theta_FB: {label}", flush=True)
        report(results[-1], args.verbose)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    random_file = [] if args.random_init.startswith(RANDOM_PREFIX) else input_roles("-r", args.random_init)
    outputs = Outputs.of(args, "--json", "--csv", "--fig",
                         inputs=random_file + input_roles("-a", args.pretrained) + input_roles("-b", args.finetuned))
    device = resolve_device(args.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        inputs = load_inputs(args)
        results = measure_all(args, inputs, device)
    finally:
        torch.set_num_threads(threads)
    # theta_r and theta_A are the same for every -b
    pretraining = pretraining_problems(results[0].result) if results else []
    print_pretraining_notes(pretraining)

    if "--json" in outputs:
        outputs.add("--json", json.dumps(results_json(args, inputs, results, pretraining), indent=2,
                                         allow_nan=False) + "\n")
    if "--csv" in outputs:
        outputs.add("--csv", results_csv(results))
    if "--fig" in outputs:
        spec = ARCHITECTURES.get(inputs.arch)
        xlabel = "block" if spec and spec.family.name == "vit" else "layer"
        outputs.add("--fig", figure(results, args.fig_metric, outputs.image_format("--fig"), xlabel,
                                    None if args.labels else args.legends))
    outputs.commit()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
