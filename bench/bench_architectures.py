"""Benchmark: training speed of the registered CPU-scale architectures against ResNet-20, in
one run.

    python bench/bench_architectures.py [--arch resnet20 resnet29_bottleneck densenet63 vit_w96_p4]
                                        [--batch_size 128] [--steps 7]

Each architecture (10 classes, fp32, channels-last except the ViT) takes ``--steps`` SGD steps
(forward, cross-entropy, backward, update) on one random batch of 32-px images with torch's
default threads; the first step is a warm-up. It prints the parameters, the median images per
second and the ratio to the first architecture given (ResNet-20 by default).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import script_start  # noqa: E402,F401  (as the scripts: before torch)

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from models import ARCHITECTURES, build_model  # noqa: E402


def images_per_second(arch: str, batch_size: int, steps: int) -> tuple[float, int]:
    torch.manual_seed(0)
    model = build_model(arch, 10)
    params = sum(p.numel() for p in model.parameters())
    images = torch.randn(batch_size, 3, 32, 32)
    labels = torch.randint(0, 10, (batch_size,))
    if ARCHITECTURES[arch].family.name != "vit":
        model, images = model.to(memory_format=torch.channels_last), images.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times[1:]), params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=["resnet20", "resnet29_bottleneck", "densenet63", "vit_w96_p4"],
                        choices=[name for name, spec in ARCHITECTURES.items() if spec.input_size in (None, 32)])
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=7)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size} at 32 px, "
          f"median of {args.steps - 1} steps")
    baseline = None
    for arch in args.arch:
        speed, params = images_per_second(arch, args.batch_size, args.steps)
        baseline = baseline or speed
        print(f"{arch:22s} {params / 1e6:6.3f} M parameters  {speed:7.1f} images/s  {speed / baseline:5.2f}x of {args.arch[0]}")


if __name__ == "__main__":
    main()
