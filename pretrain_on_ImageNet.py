"""Pre-train a network from a saved random initialisation theta_r to theta_A.

    python pretrain_on_ImageNet.py --data_dir /data/imagenet -r random_init_model.pth -a ImageNet_model.pth
    python pretrain_on_ImageNet.py --dataset synthetic --arch resnet20 --max_epoch 30   # offline

theta_r (``-r``) is written before the first step: exactly the weights training starts from.
theta_A (``-a``) is the best-validation weights. Both are plain state dicts that
cal_transferability.py reads. Runs on several GPUs or nodes under torchrun (docs/cli.md).
"""
from __future__ import annotations

import script_start  # noqa: F401  (first: how CPU threads wait, Ctrl-C while importing)

import argparse
import sys

import engine
from models import ARCHITECTURES
from utils import OneLineArgumentParser, int_at_least, run_cli, positive_int


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description="Pre-train theta_r -> theta_A (SGD, step schedule).")
    parser.add_argument("--arch", default="resnet50", choices=list(ARCHITECTURES), help="(default: %(default)s)")
    parser.add_argument("--dataset", default="imagenet",
                        help="imagenet (default), or synthetic[:OPTIONS] for the embedded source task")
    parser.add_argument("--data_dir", help="the dataset's folder (layouts: docs/datasets.md)")
    parser.add_argument("--img_size", type=int_at_least(8), help="input size (default: 224 for the ViTs, which take no other; else the dataset's, 224 for ImageNet)")
    parser.add_argument("-r", "--random_init", default="random_init_model.pth",
                        help="where theta_r goes (default: %(default)s)")
    parser.add_argument("-a", "--pretrained", default="ImageNet_model.pth",
                        help="where theta_A, the best-validation weights, goes (default: %(default)s)")
    parser.add_argument("--lr_step", type=positive_int, default=40, help="divide the lr by 10 every N epochs (default: 40)")
    engine.add_training_arguments(parser, epochs=120, batch_size=256, lr=0.1)
    args = parser.parse_args(argv)
    if args.dataset.partition(":")[0].strip().lower() == "synthetic":
        args.dataset = source_task(args.dataset)
    return args


def source_task(dataset: str) -> str:
    """``synthetic[:OPTIONS]`` means the synthetic *source* task unless OPTIONS say otherwise."""
    options = [o.strip() for o in dataset.partition(":")[2].split(",") if o.strip()]
    if not any(o in ("source", "target") or o.startswith("task=") for o in options):
        options.insert(0, "source")
    return "synthetic:" + ",".join(options)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return engine.pretrain(engine.job_from_args(args), args.random_init, args.pretrained)


if __name__ == "__main__":
    sys.exit(run_cli(main))
