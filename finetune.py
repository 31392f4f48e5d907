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

import script_start  # noqa: F401  (first: how CPU threads wait, Ctrl-C while importing)

import argparse
import sys

import engine
from models import ARCHITECTURES
from utils import OneLineArgumentParser, int_at_least, run_cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description="Fine-tune theta_A -> theta_FB (SGD, cosine schedule).")
    parser.add_argument("--dataset", required=True, help="a dataset of the registry (docs/datasets.md), e.g. CIFAR-10")
    parser.add_argument("--data_dir", help="the dataset's folder (layouts: docs/datasets.md)")
    parser.add_argument("-a", "--pretrained", help="theta_A, the pre-trained weights to start from")
    parser.add_argument("-b", "--finetuned", required=True, help="where theta_FB, the best-validation weights, goes")
    parser.add_argument("--from_scratch", metavar="R.pth", help="start from this theta_r instead of -a")
    parser.add_argument("--arch", choices=list(ARCHITECTURES), help="(default: inferred from -a)")
    parser.add_argument("--img_size", type=int_at_least(8), help="input size (default: 224 for the ViTs, which take no other; else the dataset's: 32 for CIFAR, else 224)")
    engine.add_training_arguments(parser, epochs=100, batch_size=128, lr=0.01)
    args = parser.parse_args(argv)
    if (args.pretrained is None) == (args.from_scratch is None):
        parser.error("give -a (fine-tune theta_A) or --from_scratch R.pth (train from theta_r), not both or neither")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    flag, start = ("-a", args.pretrained) if args.pretrained else ("--from_scratch", args.from_scratch)
    return engine.finetune(engine.job_from_args(args), start, args.finetuned, start_flag=flag)


if __name__ == "__main__":
    sys.exit(run_cli(main))
