"""Benchmark: reading an epoch of batches from a JPEG folder, from the disk cache and from the
memory cache (``--cache off``, ``disk``, ``on``), to choose ``--cache auto``'s fallback.

    python bench/bench_disk_cache.py [--images 2000] [--img_size 224] [--batch_size 64] [--repeats 3]

It writes ImageNet-like JPEGs (about 500x375 px, quality 90, smooth content with some noise)
in the ``imagefolder`` layout to a temporary folder, builds the training split at
``--img_size`` (each image decoded and resized to a square, uint8) and reports, in images/s,
one epoch of ``(images, labels, skipped)`` batches in a shuffled order as training reads them:

* files: a DataLoader decoding and resizing every file (``--cache off``), with no loading
  process (the CPU default) and with as many as there are cores; and ``--decode device`` on
  the CPU (the loader reads the bytes, the training process decodes each batch's JPEGs with
  torchvision's libjpeg-turbo decoder and resizes them as tensors);
* disk: batches cut out of the memory-mapped cache file, once with the file in the page cache
  (warm) and once after the kernel was told to drop it (``posix_fadvise(DONTNEED)``, cold;
  on a virtual machine the host may still hold it);
* memory: batches cut out of the decoded images in memory.

and the one-off cost of each cache: decoding every image into memory, or into the file. The
median of ``--repeats`` epochs is reported, and each mode's speed against reading the files.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.cache import stored_split  # noqa: E402
from data.datasets import build_dataset  # noqa: E402
from data.device_decode import DeviceDecoded, EncodedBatch  # noqa: E402
from data.loading import EpochSampler, fill_cache, make_loader  # noqa: E402
from data.transforms import build_loading_transform  # noqa: E402

CLASSES = 10


def write_jpegs(root: Path, count: int, seed: int = 0) -> int:
    """``count`` training images (and the imagefolder split's validation share) as JPEGs;
    returns their total size in bytes."""
    rng = np.random.default_rng(seed)
    per_class = round(count / 0.8 / CLASSES)  # imagefolder keeps 80 % of each class for training
    total = 0
    for c in range(CLASSES):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            width, height = int(rng.integers(400, 600)), int(rng.integers(300, 450))
            coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height),
                                                                                              Image.BICUBIC)
            pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
            path = root / f"class_{c}" / f"{i:04d}.jpg"
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
            total += path.stat().st_size
    return total


def drop_from_page_cache(paths) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cold_open(entry):
    """The disk cache mapped afresh once the kernel was told to drop the file from its page cache."""
    gc.collect()  # the previous mapping goes
    drop_from_page_cache([entry.folder / "images.u8"])
    return entry.open()


def epoch_rate(loader, sampler: EpochSampler, epoch: int, before=None) -> float:
    """Images/s of reading one epoch of ``loader``'s batches (``before()`` runs untimed first)."""
    sampler.set_epoch(epoch)
    if before is not None:
        before()
    seen, start = 0, time.perf_counter()
    for images, labels, skipped in loader:
        if isinstance(images, EncodedBatch):  # --decode device: decoded here, as the training step does
            images = images.decode(torch.device("cpu"))
        seen += len(labels)
    return seen / (time.perf_counter() - start)


def median_rate(loader, sampler, repeats: int, before=None) -> float:
    return statistics.median(epoch_rate(loader, sampler, epoch, before) for epoch in range(repeats))


def measure(root: Path, args) -> dict:
    dataset = build_dataset("imagefolder", root / "data", "train", build_loading_transform(args.img_size))
    sampler = EpochSampler(len(dataset), seed=0)
    loader = lambda cache, workers=0: make_loader(dataset, sampler, cache, batch_size=args.batch_size,  # noqa: E731
                                                  workers=workers, generator=torch.Generator(), pin_memory=False)
    files = [path for path, _ in dataset.samples]
    rates, once = {}, {}
    rates["files, no loading process"] = median_rate(loader(None), sampler, args.repeats)
    cores = os.cpu_count() or 1
    rates[f"files, {cores} loading processes"] = median_rate(loader(None, cores), sampler, args.repeats)
    rates["files, cold page cache"] = median_rate(loader(None), sampler, args.repeats,
                                                  lambda: drop_from_page_cache(files))
    encoded = DeviceDecoded(build_dataset("imagefolder", root / "data", "train"), args.img_size)
    rates["files, --decode device (CPU), no loading process"] = median_rate(
        make_loader(encoded, sampler, None, batch_size=args.batch_size, workers=0, generator=torch.Generator(),
                    pin_memory=False), sampler, args.repeats)
    start = time.perf_counter()
    memory = fill_cache(dataset, 0, "", False, lambda: False)
    once["decode into memory"] = time.perf_counter() - start
    settings = SimpleNamespace(dataset="imagefolder", data_dir=str(root / "data"), seed=0)
    entry = stored_split(root / "cache", dataset, "training", settings)
    start = time.perf_counter()
    entry.build(lambda allocate: fill_cache(dataset, 0, "", False, lambda: False, allocate))
    once["decode into the disk cache"] = time.perf_counter() - start
    start = time.perf_counter()
    disk = stored_split(root / "cache", dataset, "training", settings).open()  # as a later run does
    once["open the disk cache (its key: a stat of every file)"] = time.perf_counter() - start
    rates["disk cache, warm page cache"] = median_rate(loader(disk), sampler, args.repeats)
    del disk  # pages mapped by a process stay in the page cache: each cold epoch maps the file again
    rates["disk cache, cold page cache"] = statistics.median(
        epoch_rate(loader(cold_open(entry)), sampler, epoch) for epoch in range(args.repeats))
    rates["memory cache"] = median_rate(loader(memory), sampler, args.repeats)
    return {"images": len(dataset), "cache_mib": memory.nbytes / 2**20, "rates": rates, "once": once}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="training images (default: %(default)s)")
    parser.add_argument("--img_size", type=int, default=224, help="(default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=64, help="(default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="epochs per mode; the median is reported")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        size = write_jpegs(root / "data", args.images)
        result = measure(root, args)
    print(f"{result['images']} training JPEGs ({size / 2**20:.0f} MiB with the validation share), read at "
          f"{args.img_size} px: {result['cache_mib']:.0f} MiB decoded; torch {torch.__version__}, "
          f"{os.cpu_count()} cores, {torch.get_num_threads()} threads")
    files = result["rates"]["files, no loading process"]
    print("| mode | images/s | vs. files |\n|---|---|---|")
    for name, rate in result["rates"].items():
        print(f"| {name} | {rate:,.0f} | {rate / files:.1f}x |")
    for name, seconds in result["once"].items():
        print(f"once: {name}: {seconds:.2f} s")


if __name__ == "__main__":
    main()
