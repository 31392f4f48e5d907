"""The flags the two training scripts share, and the :class:`engine.runs.TrainJob` they make."""
from __future__ import annotations

import argparse
from dataclasses import fields

from data.cache import CACHE_MODES, DEFAULT_CACHE_DIR
from data.device_decode import DECODE_MODES
from engine.loop import COMPILE_MODES
from engine.optim import OPTIMIZERS
from engine.runs import TrainJob
from utils import add_device_flag, float_in, non_negative_int, positive_int, seed_int


def add_training_arguments(parser, *, epochs: int, batch_size: int, lr: float) -> None:
    """The flags both scripts share, with each script's defaults."""
    parser.add_argument("--max_epoch", type=positive_int, default=epochs, help="epochs (default: %(default)s)")
    parser.add_argument("--batch_size", type=positive_int, default=batch_size,
                        help="images per step and process (default: %(default)s)")
    parser.add_argument("--lr", type=float_in(0, above=True), default=lr, help="initial learning rate (default: %(default)s)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd",
                        help="sgd (with --momentum, the seed's) or adamw (Adam with decoupled weight decay; betas "
                        "0.9, 0.999), e.g. for ViTs (default: %(default)s)")
    parser.add_argument("--momentum", type=float_in(0), default=0.9, help="SGD momentum (default: %(default)s)")
    parser.add_argument("--warmup_epochs", type=non_negative_int, default=0, metavar="N",
                        help="raise the lr linearly over the first N epochs, from lr / (N + 1), before the "
                        "schedule starts (default: 0, none, as the seed)")
    parser.add_argument("--weight_decay", type=float_in(0), default=1e-4, help="(default: %(default)s)")
    parser.add_argument("--norm_weight_decay", type=float_in(0), metavar="WD",
                        help="weight decay of the normalisation layers' scales and shifts (BatchNorm, "
                        "LayerNorm, GroupNorm), as torchvision's reference scripts offer (default: "
                        "--weight_decay, every parameter decayed alike, as the seed does)")
    parser.add_argument("--seed", type=seed_int, default=0, help="seeds initialisation, data order and augmentation")
    parser.add_argument("--color_jitter", type=float_in(0, 1), default=0.0, metavar="S",
                        help="colour jitter of strength S in [0, 1]: brightness, contrast and saturation "
                        "factors drawn from [1-S, 1+S] (default: 0, none, as the seed's argument-less "
                        "ColorJitter(), which is the identity)")
    parser.add_argument("--augment", choices=["batch", "pil"], default="batch",
                        help="where the training augmentation runs: batch (default) resizes each image once "
                        "and crops, flips (and jitters) whole batches on the training device; pil runs the "
                        "seed's per-image torchvision pipeline while loading (Resize, RandomResizedCrop, "
                        "RandomHorizontalFlip, [ColorJitter], ToTensor, Normalize) on the PIL image, or on "
                        "the uint8 tensor the synthetic data set gives; the same distributions, and the "
                        "seed's uint8 rounding of each crop. pil reads every training image at every "
                        "epoch: --cache on is refused and auto caches the validation images only")
    add_device_flag(parser)
    add_data_arguments(parser)
    parser.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off",
                        help="mixed precision (default: off: fp32 weights and activations; see --tf32)")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="on GPUs from Ampere on, TF32 convolutions and matrix products (default: on, as the "
                        "seed's PyTorch 1.8 had it; --no-tf32 computes in full fp32; no effect on the CPU)")
    parser.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True,
                        help="channels-last memory layout (default: on; same maths, faster convolutions)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model (full batches; a smaller last batch runs eagerly)")
    parser.add_argument("--compile_mode", choices=COMPILE_MODES, default="default",
                        help="torch.compile's mode, with --compile: reduce-overhead and max-autotune also record "
                        "CUDA graphs of the forward and backward passes on a GPU (far fewer kernel launches: for "
                        "small batches); max-autotune(-no-cudagraphs) tries more kernels while compiling "
                        "(default: %(default)s). Not yet measured on a GPU: docs/performance.md")
    parser.add_argument("--sync_bn", action="store_true", help="synchronise BatchNorm across processes")
    parser.add_argument("--dist_timeout", type=float_in(0, above=True), default=600.0, metavar="SECONDS",
                        help="under torchrun: how long a process waits for the others to join (and at each "
                        "later exchange) before it stops with an error (default: %(default)g)")
    parser.add_argument("--resume", metavar="PATH", help="continue from a checkpoint (the run's .last.pth)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--skip_corrupt", action="store_true",
                        help="skip (and count) unreadable images instead of stopping")


def add_data_arguments(parser) -> None:
    """Where the images are read, decoded and held: --workers, --cache, --decode, --cache_dir."""
    parser.add_argument("--workers", type=non_negative_int,
                        help="data-loading processes per training process (default: 0 when training on "
                        "the CPU, whose cores the model already uses; min(8, CPU cores / GPUs) on GPUs)")
    parser.add_argument("--cache", choices=CACHE_MODES, default="auto",
                        help="hold the decoded, resized images after reading them once: on, in memory (under "
                        "torchrun once per node, in shared memory); disk, in a memory-mapped file under "
                        "--cache_dir, written once and reused by later runs until a source file changes; auto "
                        "(default): memory when both splits take at most a quarter of the available memory, else "
                        "disk when it is already written or takes at most half of --cache_dir's free space, "
                        "else off (the files read every epoch). Same results either "
                        "way; with --augment pil only the validation images are cached")
    parser.add_argument("--decode", choices=DECODE_MODES, default="loader",
                        help="where the image files are decoded and resized: loader (default), by PIL in the "
                        "loading processes; device, their JPEGs on the training device (nvJPEG on a GPU) and "
                        "every image resized there, at every epoch (so with --cache off, which auto then "
                        "means; other files are decoded while loading). Not yet measured on a GPU: "
                        "docs/performance.md")
    parser.add_argument("--cache_dir", metavar="DIR", default=DEFAULT_CACHE_DIR,
                        help="where --cache disk (and auto, when memory is short) keeps the decoded images, "
                        "one folder per data set and split (default: %(default)s)")


def job_from_args(args: argparse.Namespace) -> TrainJob:
    """The :class:`TrainJob` of a training script's parsed flags (same names)."""
    return TrainJob(**{f.name: getattr(args, f.name) for f in fields(TrainJob) if hasattr(args, f.name)})
