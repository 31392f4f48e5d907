"""Layer-wise and overall transferability of a pre-trained network on downstream tasks.

    python cal_transferability.py -r random_init_model.pth -a pretrained.pth -b finetuned.pth [more.pth ...]

For every fine-tuned checkpoint B it prints T per layer and the overall mean, and it can
write JSON, CSV and a figure. With no arguments it runs on the demo checkpoints in ckpt/.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from tqdm import tqdm

from metrics import COS_INIT_WARNING, NonFiniteTensorError, Transferability, TransferabilityMeter
from models import ARCHITECTURES, GENERIC, build_model, layer_groups, num_classes_of, resolve_arch
from plotting import layerwise_figure_bytes
from utils import (
    OneLineArgumentParser,
    Outputs,
    UserError,
    add_device_flag,
    add_output_flags,
    load_state_dict_safely,
    resolve_device,
    run_cli,
    same_file,
)

CKPT_DIR = Path(__file__).resolve().parent / "ckpt"
DEMO_RANDOM = CKPT_DIR / "demo_random_init.pth"
DEMO_PRETRAINED = CKPT_DIR / "demo_pretrained.pth"
DEMO_FINETUNED_GLOB = "demo_finetuned_*.pth"
RANDOM_PREFIX = "random:"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineArgumentParser(
        description="Layer-wise transferability T = D(theta_r, theta_FB) / D(theta_A, theta_FB) "
        "of pre-trained weights theta_A on downstream tasks (D: mean absolute weight difference).",
        epilog="With no -r/-a/-b it runs on the demo checkpoints shipped in ckpt/.",
    )
    parser.add_argument("-r", "--random_init", metavar="PATH",
                        help="theta_r: the random initialisation pre-training started from, or "
                        "'random:SEED' to draw a fresh one (an approximation; see docs/metric.md)")
    parser.add_argument("-a", "--pretrained", metavar="PATH", help="theta_A: the pre-trained weights")
    parser.add_argument("-b", "--finetuned", metavar="PATH", nargs="+", action="extend",
                        help="theta_FB: one or more fine-tuned checkpoints")
    parser.add_argument("--arch", choices=[*ARCHITECTURES, GENERIC],
                        help="architecture (default: inferred from the checkpoints); 'generic' groups "
                        "any model's weights by numbered block")
    parser.add_argument("--labels", nargs="+", metavar="NAME",
                        help="a label per -b file for the printout, JSON/CSV and legend (default: file names)")
    add_device_flag(parser, default="cpu")  # a ResNet-50 trio takes ~66 ms here; CUDA's start-up costs more
    add_output_flags(parser, json="write the results as JSON", csv="write the results as CSV, one row per layer",
                     fig="Figs/transferability.png", fig_help="figure of T per layer")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also print a table per layer: D(theta_r, theta_FB), D(theta_A, theta_FB), T, and "
                        "how far pre-training moved it, D(theta_r, theta_A) and the cosine similarity of theta_r "
                        "and theta_A")
    args = parser.parse_args(argv)
    if args.random_init is None and args.pretrained is None and args.finetuned is None:
        # the training runs' own .last.pth checkpoints lie beside the demo weights
        demo_finetuned = sorted(p for p in CKPT_DIR.glob(DEMO_FINETUNED_GLOB) if not p.name.endswith(".last.pth"))
        if not (DEMO_RANDOM.exists() and DEMO_PRETRAINED.exists() and demo_finetuned):
            parser.print_usage(sys.stderr)
            raise UserError("no checkpoints given and no demo checkpoints in ckpt/; pass -r, -a and -b")
        args.random_init, args.pretrained = str(DEMO_RANDOM), str(DEMO_PRETRAINED)
        args.finetuned = [str(path) for path in demo_finetuned]
    for flag, value in (("-r", args.random_init), ("-a", args.pretrained), ("-b", args.finetuned)):
        if value is None:
            raise UserError(f"{flag} is required (give -r, -a and -b together, or none for the demo)")
    if args.labels is not None and len(args.labels) != len(args.finetuned):
        raise UserError(f"--labels: got {len(args.labels)} labels for {len(args.finetuned)} -b files; give one each")
    if args.random_init.startswith(RANDOM_PREFIX):
        random_seed(args.random_init)  # refused before any checkpoint is read
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
    theta_r: Mapping[str, torch.Tensor]
    theta_a: Mapping[str, torch.Tensor]
    finetuned: list[tuple[str, Mapping[str, torch.Tensor]]]


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
    if not -2**63 <= seed < 2**64:
        raise UserError(f"-r {spec}: the seed must be an integer from -2**63 to 2**64 - 1, as in -r random:0")
    return seed


def _random_init(spec: str, arch: str, theta_a: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    seed = random_seed(spec)
    if arch == GENERIC:
        raise UserError(f"-r {spec}: drawing an initialisation needs a known --arch, not {GENERIC}")
    warnings.warn(f"-r {spec} draws a fresh initialisation of {arch}; the paper measures against the "
                  "initialisation pre-training actually started from, so T is only an approximation")
    torch.manual_seed(seed)
    return build_model(arch, num_classes_of(arch, theta_a)).state_dict()


def load_inputs(args: argparse.Namespace) -> Inputs:
    """Read every checkpoint once and check that they belong together."""
    theta_a = load_state_dict_safely(args.pretrained)
    arch = resolve_arch(theta_a, args.arch, args.pretrained, allow_generic=True)
    keys = [k for g in layer_groups(arch, theta_a) if not g.is_head for k in g.keys]
    if not keys:
        raise UserError(f"{args.pretrained}: holds no weight tensors to compare")
    _check_same_tensors(args.pretrained, theta_a, args.pretrained, theta_a, keys)

    others: list[tuple[str, Mapping[str, torch.Tensor]]] = []
    if args.random_init.startswith(RANDOM_PREFIX):
        theta_r = _random_init(args.random_init, arch, theta_a)
    else:
        theta_r = load_state_dict_safely(args.random_init)
        others.append((args.random_init, theta_r))
    finetuned = [(path, load_state_dict_safely(path)) for path in args.finetuned]
    for path, state_dict in others + finetuned:
        if arch != GENERIC:
            resolve_arch(state_dict, arch, path, reference=args.pretrained)
        _check_same_tensors(path, state_dict, args.pretrained, theta_a, keys)
    return Inputs(arch, theta_r, theta_a, finetuned)


def _fmt(value: float) -> float:
    return round(value, 2) if math.isfinite(value) else value


def _number(value: float | None) -> float | None:
    """JSON has no inf/nan: undefined numbers are written as null."""
    return value if value is not None and math.isfinite(value) else None


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report(result: Transferability, verbose: bool) -> None:
    if verbose:
        print(f"{'#':>3}  {'layer':<36} {'D(r,FB)':>12} {'D(A,FB)':>12} {'T':>8}  {'D(r,A)':>12} "
              f"{'cos(r,A)':>8}  status")
        for i, layer in enumerate(result.layers, 1):
            print(f"{i:>3}  {layer.name:<36} {_cell(layer.d_random, '.6g'):>12} "
                  f"{_cell(layer.d_pretrained, '.6g'):>12} {layer.transferability:>8.2f}  "
                  f"{_cell(layer.d_init, '.6g'):>12} {_cell(layer.cos_init, '.3f'):>8}  {layer.status}")
    print("Layer-wise transferability: ", [_fmt(v) for v in result.values])
    print(f"Overall transferability: {result.overall:.2f}")


def warn_if_pretraining_stayed_home(result: Transferability) -> None:
    """One line on stderr when theta_A is still close to theta_r (docs/metric.md: when T means something)."""
    median = result.median_cos_init
    if math.isfinite(median) and median > COS_INIT_WARNING:
        print(f"note: theta_A is still close to theta_r (median cosine similarity {median:.2f} over the "
              f"layers, cos_init with -v); T is only meaningful when pre-training left the initialisation",
              file=sys.stderr)


def results_json(args: argparse.Namespace, arch: str, results: list[tuple[str, str, Transferability]]) -> dict:
    return {
        "arch": arch,
        "random_init": args.random_init,
        "pretrained": args.pretrained,
        "results": [
            {
                "finetuned": path,
                "label": label,
                "overall": _number(result.overall),
                "layers": [
                    {
                        "name": layer.name,
                        "transferability": _number(layer.transferability),
                        "d_random": _number(layer.d_random),
                        "d_pretrained": _number(layer.d_pretrained),
                        "d_init": _number(layer.d_init),
                        "cos_init": _number(layer.cos_init),
                        "status": layer.status,
                    }
                    for layer in result.layers
                ],
            }
            for path, label, result in results
        ],
    }


def results_csv(results: list[tuple[str, str, Transferability]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["finetuned", "label", "overall", "index", "layer", "transferability",
                     "d_random", "d_pretrained", "d_init", "cos_init", "status"])
    optional = lambda value: "" if value is None else repr(value)  # noqa: E731
    for path, label, result in results:
        for i, layer in enumerate(result.layers, 1):
            writer.writerow([path, label, repr(result.overall), i, layer.name, repr(layer.transferability),
                             optional(layer.d_random), optional(layer.d_pretrained), optional(layer.d_init),
                             optional(layer.cos_init), layer.status])
    return out.getvalue()


def default_labels(paths: list[str]) -> list[str]:
    names = [Path(p).name for p in paths]
    return names if len(set(names)) == len(names) else list(paths)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    outputs = Outputs.of(args, "--json", "--csv", "--fig")
    device = resolve_device(args.device)
    inputs = load_inputs(args)
    meter = TransferabilityMeter(layer_groups(inputs.arch, inputs.theta_a), inputs.theta_r, inputs.theta_a, device)

    labels = args.labels or default_labels(args.finetuned)
    results = []
    for (path, theta_b), label in zip(tqdm(inputs.finetuned, desc="fine-tuned", disable=None, leave=False), labels):
        print(f"theta_FB: {label}", flush=True)
        try:
            result = meter(theta_b)
        except NonFiniteTensorError as err:
            where = {"random": args.random_init, "pretrained": args.pretrained, "finetuned": path}[err.role]
            raise UserError(f"{where}: tensor {err.key} holds NaN or Inf; the checkpoint is broken") from None
        report(result, args.verbose)
        results.append((path, label, result))
    if results:
        warn_if_pretraining_stayed_home(results[0][2])  # theta_r and theta_A are the same for every -b

    if "--json" in outputs:
        outputs.add("--json", json.dumps(results_json(args, inputs.arch, results), indent=2, allow_nan=False) + "\n")
    if "--csv" in outputs:
        outputs.add("--csv", results_csv(results))
    if "--fig" in outputs:
        spec = ARCHITECTURES.get(inputs.arch)
        xlabel = "block" if spec and spec.family.name == "vit" else "layer"
        outputs.add("--fig", layerwise_figure_bytes([(label, r.values, r.overall) for _, label, r in results],
                                                    outputs.image_format("--fig"), xlabel))
    outputs.commit()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
