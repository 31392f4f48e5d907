"""Benchmark: training throughput of finetune.py's loop (engine.fit) against a loop written
like the seed's, and against a ceiling with no data loading, all in this one run.

    python bench/bench_training.py [--arch resnet20] [--img_size 32] [--batch_size 128] [--epochs 3]

The data are real image files: the synthetic benchmark's images written as PNGs in the
``imagefolder`` layout, so both loops decode files. Reported, in training images/s:

* seed-style: fp32, NCHW, eager, torchvision's v1 per-image PIL transforms, num_workers=0;
* ours:       finetune.py's data path and engine.fit with the project's defaults (images
              decoded and resized once and held in memory (--cache auto), the augmentation
              per batch, channels-last, no loading processes on the CPU), the training phase
              only (the log's images_per_s); the one-off reading of the files is reported
              separately;
* ours, --cache off: the same, reading and resizing every file every epoch;
* ceiling:    the same model and step on one fixed batch already in memory (no loading,
              no augmentation), and again with the batch augmentation of every step (what the
              augmentation costs, apart from the loop's own work);
* and ours and the ceiling again with ``--amp bf16`` (bfloat16 autocast: faster where the
  CPU has bf16 instructions, but not the same numbers as fp32).

Every loop runs the same model, batch size and augmentation recipe; the first epoch warms up
and the last is reported.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import script_start  # noqa: E402,F401  (as the scripts: how CPU threads wait, before torch)

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torchvision import transforms as v1  # noqa: E402
from torchvision.datasets import ImageFolder  # noqa: E402

import engine  # noqa: E402
from data.loading import build_train_val, default_workers  # noqa: E402
from engine.processes import join_process_group  # noqa: E402
from data import NORMALIZE_MEAN, NORMALIZE_STD  # noqa: E402
from data.synthetic import build_synthetic  # noqa: E402
from models import build_model  # noqa: E402


def write_image_folder(root: Path, classes: int, per_class: int, size: int) -> None:
    from torchvision.transforms.functional import to_pil_image

    dataset = build_synthetic(f"classes={classes},n={per_class},size={size}", "train")
    for i, (image, label) in enumerate(zip(dataset.images, dataset.targets)):
        folder = root / f"class_{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        to_pil_image(image).save(folder / f"{i:05d}.png")


def seed_style(root: Path, arch: str, img_size: int, batch_size: int, epochs: int, classes: int) -> float:
    """The seed's way: PIL transforms per image, no workers, fp32 NCHW eager."""
    transform = v1.Compose([v1.Resize((img_size, img_size)), v1.RandomResizedCrop(img_size),
                            v1.RandomHorizontalFlip(), v1.ToTensor(), v1.Normalize(NORMALIZE_MEAN, NORMALIZE_STD)])
    loader = torch.utils.data.DataLoader(ImageFolder(str(root), transform), batch_size=batch_size,
                                         shuffle=True, num_workers=0)
    torch.manual_seed(0)
    model = build_model(arch, classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    rate = 0.0
    for _ in range(epochs):
        model.train()
        seen, start = 0, time.perf_counter()
        for images, labels in loader:
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(labels)
        rate = seen / (time.perf_counter() - start)
    return rate


def ours(root: Path, arch: str, img_size: int, batch_size: int, epochs: int, classes: int, workers: int,
         out: Path, amp: str = "off", cache: str = "auto") -> tuple[float, float | str | None]:
    """Training images/s of the last epoch, and the seconds spent reading the files into
    memory before the first (when the images were not held: the loop's line about them, or None)."""
    train, val, _, augment = build_train_val("imagefolder", str(root), img_size, False, False, 0)
    torch.manual_seed(0)
    model = build_model(arch, classes)
    settings = engine.TrainSettings(epochs=epochs, batch_size=batch_size, lr=0.01, weight_decay=1e-4,
                                    workers=workers, amp=amp, cache=cache, label="bench")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
        result = engine.fit(model, train, val, settings, join_process_group("cpu"),
                            out / f"bench_{amp}_{cache}.pth", augment=augment)
    # the loop's line on the cache: "holding the N training and M validation images in memory (X MiB,
    # ready in S s; ...)", or in a folder (--cache disk), or why it does not hold them
    said = next((line for line in printed.getvalue().splitlines()
                 if line.startswith("holding") or ("cache" in line and not line.startswith("epoch"))), "")
    held = re.search(r"^holding the .* ready in ([0-9.]+) s", said)
    # engine.fit trains on the 80 % train split; images/s counts only what it trained on.
    return result.history[-1]["images_per_s"], float(held.group(1)) if held else said or None


def ceiling(arch: str, img_size: int, batch_size: int, classes: int, amp: bool = False, steps: int = 30,
            augment=None) -> float:
    """Images/s of the model's training step on one fixed batch already in memory; with
    ``augment`` (the loop's batch augmentation), the fixed batch is a uint8 one that each step
    augments and normalises first, as the loop's steps do."""
    from data.loading import step_seed
    from engine.loop import prepare_batch

    torch.manual_seed(0)
    model = build_model(arch, classes).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    images = torch.randn(batch_size, 3, img_size, img_size).contiguous(memory_format=torch.channels_last)
    stored = torch.randint(0, 256, (batch_size, 3, img_size, img_size), dtype=torch.uint8)
    labels = torch.randint(0, classes, (batch_size,))
    times = []
    for step in range(steps + 2):
        start = time.perf_counter()
        if augment is not None:
            images, _ = prepare_batch(stored, labels, torch.device("cpu"), True, augment, step_seed(0, 0, step))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = nn.functional.cross_entropy(model(images).float(), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return batch_size / (sum(times[2:]) / steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--img_size", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per_class", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=default_workers(torch.device("cpu")))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        write_image_folder(root, args.classes, args.per_class, args.img_size)
        print(f"{args.arch}, {args.img_size}x{args.img_size} PNG files, batch {args.batch_size}, "
              f"{args.classes * args.per_class} images, torch {torch.__version__}, {torch.get_num_threads()} threads")
        common = (root, args.arch, args.img_size, args.batch_size, args.epochs, args.classes, args.workers, Path(tmp))
        base = seed_style(root, args.arch, args.img_size, args.batch_size, args.epochs, args.classes)
        mine, reading = ours(*common)
        uncached, _ = ours(*common, cache="off")
        top = ceiling(args.arch, args.img_size, args.batch_size, args.classes)
        augment = build_train_val("imagefolder", str(root), args.img_size, False, False, 0)[3]
        top_augmented = ceiling(args.arch, args.img_size, args.batch_size, args.classes, augment=augment)
        mine_bf16, _ = ours(*common, amp="bf16")
        top_bf16 = ceiling(args.arch, args.img_size, args.batch_size, args.classes, amp=True)
    print(f"seed-style loop (fp32)                  {base:8.1f} images/s   1.00x")
    print(f"finetune.py's loop (defaults, fp32)     {mine:8.1f} images/s   {mine / base:5.2f}x of seed-style")
    if isinstance(reading, float):
        print(f"  (reading the files once, before epoch 1: {reading:.2f} s)")
    else:  # what the loop said instead, word for word
        print(f"  (--cache auto did not hold the images; the loop said: {reading or 'nothing about them'})")
    print(f"finetune.py's loop, --cache off (fp32)  {uncached:8.1f} images/s   {uncached / base:5.2f}x")
    print(f"ceiling, fp32 (no loading)              {top:8.1f} images/s   {top / base:5.2f}x; ours is {mine / top:.0%} of it")
    print(f"ceiling + the batch augmentation, fp32  {top_augmented:8.1f} images/s   {top_augmented / base:5.2f}x; "
          f"ours is {mine / top_augmented:.0%} of it (the rest of the gap: the loop's own work)")
    print(f"finetune.py's loop, --amp bf16          {mine_bf16:8.1f} images/s   {mine_bf16 / base:5.2f}x of seed-style"
          " (target >= 2x)")
    print(f"ceiling, bf16 (no loading)              {top_bf16:8.1f} images/s   {top_bf16 / base:5.2f}x; ours is "
          f"{mine_bf16 / top_bf16:.0%} of it")


if __name__ == "__main__":
    main()
