"""Fine-tune pre-trained weights theta_A on a downstream dataset to theta_FB.

    python finetune.py --dataset CIFAR-10 --data_dir /data -a ImageNet_model.pth -b cifar10_model.pth
    python finetune.py --dataset synthetic:classes=10,n=100,gap=0.5 -a ckpt/demo_pretrained.pth -b out.pth

The classifier head is replaced by a new ``nn.Linear`` for the dataset's classes, in
PyTorch's default initialisation, for every architecture (as the seed does for ResNet-50). ``-b`` receives the
best-validation weights (a plain state dict); the last epoch's weights are in the run's
``.last.pth`` checkpoint. ``--from_scratch R.pth`` starts from theta_r instead of theta_A,
the baseline the paper's intuition compares against.
"""
from __future__ import annotations

import argparse
import sys

import engine
from models import ARCHITECTURES, check_architecture, fresh_head, infer_arch
from utils import UserError, load_state_dict_safely, run_cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fine-tune theta_A -> theta_FB (SGD, cosine schedule).")
    parser.add_argument("--dataset", required=True, help="a dataset of the registry (see README), e.g. CIFAR-10")
    parser.add_argument("--data_dir", help="the dataset's folder (see README for each layout)")
    parser.add_argument("-a", "--pretrained", help="theta_A, the pre-trained weights to start from")
    parser.add_argument("-b", "--finetuned", required=True, help="where theta_FB, the best-validation weights, goes")
    parser.add_argument("--from_scratch", metavar="R.pth", help="start from this theta_r instead of -a")
    parser.add_argument("--arch", choices=list(ARCHITECTURES), help="(default: inferred from -a)")
    parser.add_argument("--img_size", type=int, help="input size (default: the dataset's: 32 for CIFAR, else 224)")
    engine.add_training_arguments(parser, epochs=100, batch_size=128, lr=0.01)
    args = parser.parse_args(argv)
    if (args.pretrained is None) == (args.from_scratch is None):
        parser.error("give -a (fine-tune theta_A) or --from_scratch R.pth (train from theta_r), not both or neither")
    return args


def starting_weights(args: argparse.Namespace) -> tuple[str, dict, str]:
    """(flag, state dict, architecture) of the weights fine-tuning starts from."""
    flag, path = ("-a", args.pretrained) if args.pretrained else ("--from_scratch", args.from_scratch)
    state_dict = load_state_dict_safely(path)
    if args.arch is None:
        arch = infer_arch(state_dict)
        if arch is None:
            raise UserError(f"{flag} {path}: cannot infer its architecture; pass --arch NAME")
        return flag, state_dict, arch
    problem = check_architecture(args.arch, state_dict)
    if problem:
        found = infer_arch(state_dict)
        raise UserError(f"{flag} {path}: is not a {args.arch} checkpoint "
                        f"({'it is ' + found if found else problem}); fix --arch or {flag}")
    return flag, state_dict, args.arch


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    best, last, log = engine.run_files(args.finetuned)
    flag, start, args.arch = starting_weights(args)

    def load_start(model, resuming: bool, is_main: bool) -> None:
        fresh_head(model, args.arch)  # the seed's new nn.Linear, whatever torchvision's own head init
        engine.load_backbone(model, start, ARCHITECTURES[args.arch].head,
                             f"{flag} {args.pretrained or args.from_scratch}")

    return engine.run_training(
        args, best_path=args.finetuned, outputs={best: "-b", last: "-b", log: "-b"},
        schedule="cosine", label="fine-tune", init_model=load_start)


if __name__ == "__main__":
    sys.exit(run_cli(main))
