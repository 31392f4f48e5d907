"""Benchmark: training throughput on one GPU, the project's loop against a loop written like
the seed's finetune.py and against a ceiling with no data loading, all in this one run.

    python bench/bench_gpu.py [--configs cifar,jpeg,embedded] [--json OUT.json] [--keep]
    python bench/bench_gpu.py --tiny --device cpu        # the test suite's run: seconds

Three configurations, each on data this script writes into a temporary folder (or
--data_root; removed at the end unless --keep):

* cifar:    ResNet-50 at 32 px, batch 18 (the seed's CIFAR-10 fine-tuning), random images in
            CIFAR-10's official pickle layout (``cifar-10-batches-py``);
* jpeg:     ResNet-50 at 224 px, batch 256, random JPEGs of 256-500 px in the ``imagefolder``
            layout (``DIR/CLASS/*.jpg``, the registry's seeded 80/20 split);
* embedded: ResNet-20 at 32 px, batch 128, the study's synthetic data set (no files); its
            2,000 training images end in a batch of 80, as in the study, so the compiled
            project row recompiles once for a dynamic batch size and runs that graph from then
            on (the ceiling's batch never changes).

and five rows each, in training images/s after warm-up steps that are not timed (the device
is synchronised only at the timing boundaries):

* seed-style:  written out here as the seed's finetune.py trains: torchvision's data set
               (ImageFolder / CIFAR-10) with the seed's per-image PIL transforms
               (``data.transforms.build_transform(True, size)``), a DataLoader with
               num_workers=0, fp32, NCHW, eager, SGD with momentum, ``loss.item()`` every step;
* project:     ``engine.fit`` with the project's defaults (fp32, channels-last, the images held
               in memory when they fit, the augmentation per batch on the device); one warm-up
               epoch, then the epochs' own ``images_per_s`` (an epoch's clock waits for the
               device at its end);
* project, ``--amp bf16 --compile``; cifar only, also with ``--compile_mode reduce-overhead``
  (CUDA graphs of the forward and backward passes: at batch 18 a step is bound by kernel
  launches);
* jpeg only, the project's defaults but for where the images come from: ``--cache disk`` (a
  memory-mapped file of decoded images, as for a data set too big for memory), ``--cache off``
  (every file decoded at every epoch by the loading processes, PIL), and ``--cache off
  --decode device`` (the JPEGs decoded and resized on the device, nvJPEG on a GPU); two timed
  epochs each;
* the ceilings of both: the same model, optimizer and precision stepping on random tensors
  already on the device, no data loading at all (project / ceiling = what the data path costs).

TF32 is on for every row (the project's default, and the seed's PyTorch 1.8 default);
cuDNN's autotuner is on for the project's rows and the ceilings (``engine.processes`` turns it
on) and off for the seed-style loop (PyTorch's default). Sizes are flags (``--cifar_epochs``
...); with their defaults the seed-style rows take about 10 s each on an H100, the faster rows
time as many images as the project's epochs, and the whole run, compiles included, is meant to
stay under 8 minutes (not yet checked with the rows added since its last GPU run: see
docs/performance.md). A row that fails (``torch.compile`` on a machine without a working
compiler, say) is reported in one line and the others go on. The last thing printed is a JSON
summary (also written to --json, and there after each configuration as well, marked
``"partial": true``, so that a time limit keeps what was measured).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import itertools
import json
import os
import pickle
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engine.loop  # noqa: E402
from data.datasets import VAL_FRACTION, CIFAR10Files, build_dataset  # noqa: E402
from data.loading import build_train_val, default_workers  # noqa: E402
from data.synthetic import parse_options  # noqa: E402
from data.transforms import build_transform  # noqa: E402
from engine.checkpoint import run_files  # noqa: E402
from engine.optim import build_optimization  # noqa: E402
from engine.processes import join_process_group, set_tf32  # noqa: E402
from engine.settings import TrainSettings  # noqa: E402
from models import build_model  # noqa: E402
from utils import resolve_device  # noqa: E402

LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 1e-4  # finetune.py's defaults, the seed's recipe
JSON_MARKER = "--- JSON summary ---"
DEFAULT_BACKEND = "inductor"


@dataclasses.dataclass(frozen=True)
class Config:
    """One configuration. The written data sets hold ``epoch_steps`` full batches of training
    images (no partial batch: with --compile a smaller last batch would recompile)."""

    name: str
    letter: str  # the configuration's letter in the targets: a, b, c
    source: str  # what the data are
    arch: str
    img_size: int
    batch: int
    epoch_steps: int  # training steps per epoch of the written data (cifar, jpeg)
    epochs: int  # the project's timed epochs, after one warm-up epoch; the ceilings time as many images
    seed_steps: int  # the seed-style loop's timed steps
    synthetic: str = ""  # embedded: the data set
    file_px: tuple[int, int] = (256, 500)  # jpeg: the files' sides, drawn in this range
    classes: int = 8  # jpeg: class folders

    @property
    def title(self) -> str:
        return f"({self.letter}) {self.arch}, {self.img_size} px, batch {self.batch}, {self.source}"


CONFIGS = {
    "cifar": Config("cifar", "a", "random images in CIFAR-10's pickles", "resnet50", 32, 18,
                    epoch_steps=222, epochs=3, seed_steps=600),
    "jpeg": Config("jpeg", "b", "random JPEGs in an image folder", "resnet50", 224, 256,
                   epoch_steps=10, epochs=6, seed_steps=10),
    "embedded": Config("embedded", "c", "the embedded study's synthetic set", "resnet20", 32, 128,
                       epoch_steps=0, epochs=20, seed_steps=300,
                       synthetic="synthetic:classes=20,n=100,n_val=50,size=32"),
}
TINY = {  # --tiny: ResNet-20, small images and batches, a few steps (the CPU test)
    "cifar": dict(arch="resnet20", batch=4, epoch_steps=2, epochs=1, seed_steps=2),
    "jpeg": dict(arch="resnet20", img_size=32, batch=4, epoch_steps=2, epochs=1, seed_steps=2, file_px=(40, 64),
                 classes=2),
    "embedded": dict(batch=8, epochs=1, seed_steps=2, synthetic="synthetic:classes=4,n=4,n_val=2,size=16",
                     img_size=16),
}
SIZE_FLAGS = ("epoch_steps", "epochs", "seed_steps")


@dataclasses.dataclass(frozen=True)
class Row:
    key: str
    label: str
    kind: str  # "seed", "project" or "ceiling"
    amp: str = "off"
    compile: bool = False
    cache: str = "auto"  # project rows: --cache
    decode: str = "loader"  # project rows: --decode
    compile_mode: str = "default"  # project rows: --compile_mode
    configs: tuple[str, ...] = ()  # the configurations it runs in (empty: all)
    epochs: int | None = None  # project rows: timed epochs, when fewer than the configuration's


ROWS = (
    Row("seed_style", "seed-style: fp32 NCHW eager, PIL per image, 0 workers", "seed"),
    Row("project_default", "project: defaults (fp32, channels-last, cache)", "project"),
    Row("ceiling_default", "ceiling of the defaults: tensors on the device", "ceiling"),
    Row("project_bf16_compile", "project: --amp bf16 --compile", "project", "bf16", True),
    Row("project_bf16_graphs", "project: bf16, --compile_mode reduce-overhead", "project", "bf16", True,
        compile_mode="reduce-overhead", configs=("cifar",)),
    Row("ceiling_bf16_compile", "ceiling of bf16+compile: tensors on the device", "ceiling", "bf16", True),
    Row("project_disk", "project: --cache disk (memory-mapped file)", "project", cache="disk", configs=("jpeg",),
        epochs=2),
    Row("project_files", "project: --cache off (decoded while loading)", "project", cache="off", configs=("jpeg",),
        epochs=2),
    Row("project_decode_device", "project: --cache off --decode device", "project", cache="off", decode="device",
        configs=("jpeg",), epochs=2),
)
PROJECT_ROWS = [row.key for row in ROWS if row.kind == "project"]
# name: (numerator row, denominator row, what it says); "best" is the faster project row
RATIOS = {
    "default_vs_seed": ("project_default", "seed_style", "project defaults / seed-style"),
    "best_vs_seed": ("best", "seed_style", "best project row / seed-style"),
    "default_vs_ceiling": ("project_default", "ceiling_default", "project defaults / its ceiling"),
    "bf16_compile_vs_ceiling": ("project_bf16_compile", "ceiling_bf16_compile", "project bf16+compile / its ceiling"),
    "disk_vs_ceiling": ("project_disk", "ceiling_default", "project --cache disk / the defaults' ceiling"),
    "files_vs_ceiling": ("project_files", "ceiling_default", "project --cache off / the defaults' ceiling"),
    "decode_device_vs_files": ("project_decode_device", "project_files",
                               "--decode device / decoding while loading (both --cache off)"),
}
TARGETS = {  # the targets, by configuration: ratio -> at least
    "cifar": {"best_vs_seed": 4.0},
    "jpeg": {"default_vs_ceiling": 0.85, "bf16_compile_vs_ceiling": 0.85, "best_vs_seed": 2.5},
}


@dataclasses.dataclass(frozen=True)
class Data:
    """A configuration's data: what the project's loop is given, and its training split."""

    dataset: str
    data_dir: str | None
    train_images: int
    classes: int


# ------------------------------------------------------------------------ writing the data


def write_cifar10(folder: Path, train: int, test: int, seed: int = 0) -> None:
    """Random 32x32 images in torchvision's CIFAR-10 python layout: ``data_batch_1..5`` (the
    ``train`` images split among them), ``test_batch`` and ``batches.meta``."""
    base = folder / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    counts = [len(part) for part in np.array_split(np.arange(train), 5)] + [test]
    for name, count in zip(names, counts):
        entry = {"batch_label": name, "labels": rng.integers(0, 10, count).tolist(),
                 "data": rng.integers(0, 256, (count, 3 * 32 * 32), dtype=np.uint8),
                 "filenames": [f"{name}_{i:05d}.png" for i in range(count)]}
        (base / name).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {"label_names": [f"class_{i}" for i in range(10)], "num_cases_per_batch": counts[0], "num_vis": 3072}
    (base / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))


def files_for(train: int) -> int:
    """How many images a class folder needs for the registry's seeded split to keep ``train``
    of them for training (the most such: the largest validation share)."""
    n = train
    while n + 1 - int(VAL_FRACTION * (n + 1)) <= train:
        n += 1
    return n


def write_jpeg(path: Path, index: int, px: tuple[int, int], texture: Image.Image) -> None:
    """A smooth random colour field with a little texture, ``px`` pixels a side, as a JPEG
    (about 45 KB at 400 px: the size of a photograph)."""
    rng = np.random.default_rng(index)
    width, height = (int(v) for v in rng.integers(px[0], px[1] + 1, size=2))
    field = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((width, height), Image.BILINEAR)
    left, top = (int(v) for v in rng.integers(0, texture.width - width + 1, size=2))
    Image.blend(field, texture.crop((left, top, left + width, top + height)), 0.1).save(path, quality=90)


def write_jpeg_folder(folder: Path, classes: int, train: int, px: tuple[int, int]) -> None:
    """``classes`` class folders whose seeded split keeps ``train`` training images in all."""
    texture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (px[1], px[1], 3), dtype=np.uint8))
    jobs = []
    for label in range(classes):
        (folder / f"class_{label:02d}").mkdir(parents=True, exist_ok=True)
        count = files_for(train // classes + (label < train % classes))
        jobs += [folder / f"class_{label:02d}" / f"{len(jobs) + i:05d}.jpg" for i in range(count)]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # PIL lets go of the GIL while it works
        list(pool.map(lambda job: write_jpeg(job[1], job[0], px, texture), enumerate(jobs)))


def prepare_data(config: Config, root: Path) -> Data:
    train = config.batch * config.epoch_steps
    if config.name == "cifar":
        write_cifar10(root / "cifar10", train, test=max(config.batch, train // 10))
        return Data("cifar10", str(root / "cifar10"), train, 10)
    if config.name == "jpeg":
        write_jpeg_folder(root / "jpeg", config.classes, train, config.file_px)
        return Data("imagefolder", str(root / "jpeg"), train, config.classes)
    options = parse_options(config.synthetic.partition(":")[2])
    return Data(config.synthetic, None, options.classes * options.n, options.classes)


# ------------------------------------------------------------------------------ timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[object], int], batches: Iterator, warmup: int, steps: int, device: torch.device) -> dict:
    """Run ``step`` (which returns its batch's size) on ``warmup`` batches, then time it on
    ``steps`` more, with the device synchronised at both ends only."""
    for _ in range(warmup):
        step(next(batches))
    synchronize(device)
    start, images = time.perf_counter(), 0
    for _ in range(steps):
        images += step(next(batches))
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"images_per_s": images / seconds, "images": images, "seconds": seconds}


def endless(loader: DataLoader) -> Iterator:
    while True:
        yield from loader


def seed_dataset(data: Data, transform: Callable) -> Dataset:
    """The training images as the seed read them: torchvision's data sets (the project's
    CIFAR-10 class only skips the MD5 check, which random files fail)."""
    if data.dataset == "cifar10":
        return CIFAR10Files(data.data_dir, train=True, transform=transform, download=False)
    if data.dataset == "imagefolder":
        return ImageFolder(data.data_dir, transform)
    return build_dataset(data.dataset, None, "train", transform)


def seed_style_row(config: Config, data: Data, device: torch.device, warmup: int) -> dict:
    """The seed's loop: per-image PIL transforms in the training process, fp32, NCHW, eager."""
    loader = DataLoader(seed_dataset(data, build_transform(True, config.img_size)), batch_size=config.batch,
                        shuffle=True, num_workers=0)
    torch.manual_seed(0)
    model = build_model(config.arch, data.classes).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    def step(batch) -> int:
        images, labels = batch[0].to(device), batch[1].to(device)
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()  # the seed logs the running loss every step
        return len(labels)

    autotune = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False  # PyTorch's default, which the seed kept
    try:
        return timed(step, endless(loader), warmup, config.seed_steps, device)
    finally:
        torch.backends.cudnn.benchmark = autotune


def ceiling_row(config: Config, data: Data, device: torch.device, row: Row, warmup: int) -> dict:
    """The project's step (same model, optimizer, precision, channels-last, compile) on one
    batch of random tensors already on the device: no data loading, no augmentation."""
    settings = TrainSettings(epochs=1, batch_size=config.batch, lr=LR, weight_decay=WEIGHT_DECAY, amp=row.amp,
                             compile=row.compile)
    torch.manual_seed(0)
    model = build_model(config.arch, data.classes).to(device, memory_format=torch.channels_last).train()
    optimization = build_optimization(model, settings, device)
    forward = torch.compile(model) if row.compile else model
    shape = (config.batch, 3, config.img_size, config.img_size)
    images = torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, data.classes, (config.batch,), device=device)
    amp_dtype = optimization.amp_dtype

    def step(_) -> int:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = nn.functional.cross_entropy(forward(images).float(), labels)
        optimization.optimizer.zero_grad(set_to_none=True)
        optimization.scaler.scale(loss).backward()
        optimization.scaler.step(optimization.optimizer)
        optimization.scaler.update()
        return config.batch

    steps = max(1, round(config.epochs * data.train_images / config.batch))
    return timed(step, itertools.repeat(None), warmup, steps, device)


def project_row(config: Config, data: Data, splits: Callable[[str], tuple], device_name: str, row: Row,
                workdir: Path) -> dict:
    """``engine.fit`` as finetune.py runs it on ``splits(row.decode)``
    (:func:`data.loading.build_train_val`'s answer): one warm-up epoch (which writes the
    disk cache of ``--cache disk``), then ``config.epochs`` timed ones (their training phases
    only: validation and checkpoints are not timed)."""
    train, val, _, augment = splits(row.decode)
    process = join_process_group(device_name)
    torch.manual_seed(0)
    model = build_model(config.arch, len(train.classes))
    timed = min(config.epochs, row.epochs or config.epochs)
    settings = TrainSettings(epochs=1 + timed, batch_size=config.batch, lr=LR, weight_decay=WEIGHT_DECAY,
                             workers=default_workers(process.device), amp=row.amp, compile=row.compile,
                             compile_mode=row.compile_mode,
                             cache=row.cache, cache_dir=str(workdir / "image_cache"), dataset=data.dataset,
                             data_dir=data.data_dir, label=f"bench {config.name}", progress=False)
    notes: list[str] = []
    best = workdir / f"{config.name}_{row.key}.pth"
    try:
        result = engine.loop.fit(model, train, val, settings, process, best, announce=notes.append, augment=augment)
    finally:
        for path in run_files(best):
            path.unlink(missing_ok=True)
    if result.stopped_by:  # fit turned SIGTERM/SIGINT (a time limit, Ctrl-C) into a stop: end the benchmark too
        raise SystemExit(128 + result.stopped_by)
    epochs = result.history[1:]
    if not epochs:
        raise RuntimeError(f"engine.fit stopped after {len(result.history)} epoch(s): {notes[-1:]}")
    seconds = sum(len(train) / entry["images_per_s"] for entry in epochs)
    return {"images_per_s": len(train) * len(epochs) / seconds, "images": len(train) * len(epochs),
            "seconds": seconds, "warmup_epoch_s": len(train) / result.history[0]["images_per_s"],
            "cache": next(("disk" if "memory-mapped" in note else "memory" for note in notes if "holding the" in note),
                          "off")}


# ----------------------------------------------------------------------------- the run


@contextlib.contextmanager
def compile_backend(backend: str):
    """``torch.compile`` with ``backend`` for the duration (the project's loop calls it with
    the default backend, inductor). Only for machines where inductor cannot or should not
    compile: --tiny on the CPU uses "eager", which still traces every step with Dynamo."""
    original = torch.compile
    if backend != DEFAULT_BACKEND:
        torch.compile = functools.partial(original, backend=backend)
    try:
        yield
    finally:
        torch.compile = original


def one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"


def measure(row: Row, run: Callable[[], dict], device: torch.device) -> dict:
    """``run()``'s measurement, or its error in one line; printed either way."""
    try:
        result = run()
    except Exception as err:  # noqa: BLE001 - e.g. torch.compile failing: reported, the other rows go on
        result = {"error": one_line(err)}
    finally:
        if row.compile:
            torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "error" in result:
        print(f"  {row.label:<54} FAILED: {result['error']}", flush=True)
    else:
        extra = f"; warm-up epoch {result['warmup_epoch_s']:.1f} s" if "warmup_epoch_s" in result else ""
        extra += f"; images held: {result['cache']}" if "cache" in result else ""
        print(f"  {row.label:<54} {result['images_per_s']:9.1f} img/s  ({result['images']} images in "
              f"{result['seconds']:.1f} s{extra})", flush=True)
    return result


def ratios(rows: dict) -> dict:
    rates = {key: row.get("images_per_s") for key, row in rows.items()}
    project = {key: rates[key] for key in PROJECT_ROWS if rates.get(key)}
    best = max(project, key=project.get) if project else None
    rates["best"] = project.get(best)
    out = {name: (rates[top] / rates[bottom] if rates.get(top) and rates.get(bottom) else None)
           for name, (top, bottom, _) in RATIOS.items() if top in rates and bottom in rates}
    return {**out, "best_row": best}


def run_config(config: Config, args: argparse.Namespace, device: torch.device, root: Path) -> dict:
    tick = time.perf_counter()
    data = prepare_data(config, root)
    print(f"{config.title}: {data.train_images} training images (data ready in "
          f"{time.perf_counter() - tick:.1f} s)", flush=True)
    splits = functools.cache(lambda decode: build_train_val(data.dataset, data.data_dir, config.img_size, 0.0, False, 0,
                                                            decode=decode))
    runners = {
        "seed": lambda row: seed_style_row(config, data, device, args.warmup),
        "project": lambda row: project_row(config, data, splits, args.device, row, root),
        "ceiling": lambda row: ceiling_row(config, data, device, row, args.warmup),
    }
    rows = {row.key: measure(row, functools.partial(runners[row.kind], row), device) for row in ROWS
            if not row.configs or config.name in row.configs}
    return {"title": config.title, "arch": config.arch, "img_size": config.img_size, "batch": config.batch,
            "train_images": data.train_images, "sizes": {flag: getattr(config, flag) for flag in SIZE_FLAGS},
            "rows": rows, "ratios": ratios(rows), "targets": TARGETS.get(config.name, {}),
            "seconds": time.perf_counter() - tick}


def print_ratios(summary: dict) -> None:
    print("ratios (target: at least)")
    for name, result in summary["configs"].items():
        print(f"  {result['title']}")
        for ratio, (_, _, what) in RATIOS.items():
            if ratio not in result["ratios"]:
                continue  # a row this configuration does not run
            value, target = result["ratios"][ratio], result["targets"].get(ratio)
            text = "n/a (a row failed)" if value is None else f"{value:6.2f}x"
            if ratio == "best_vs_seed" and result["ratios"]["best_row"]:
                what += f" ({result['ratios']['best_row']})"
            if target is not None:
                text += f"   target {target:g}x: " + ("met" if value is not None and value >= target else "NOT met")
            print(f"    {what:<58} {text}")


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu (default: auto)")
    parser.add_argument("--tiny", action="store_true", help="ResNet-20, small images and batches, a few steps")
    parser.add_argument("--configs", default="cifar,jpeg,embedded", help="which configurations, comma-separated")
    parser.add_argument("--warmup", type=int, help="untimed steps before the seed-style and ceiling rows "
                                                   "(default: 3; 1 with --tiny)")
    parser.add_argument("--compile_backend", help=f"torch.compile's backend (default: {DEFAULT_BACKEND}; "
                                                  "eager with --tiny on the CPU)")
    for name, config in CONFIGS.items():
        if name != "embedded":
            parser.add_argument(f"--{name}_epoch_steps", type=int,
                                help=f"batches in the written training split (default {config.epoch_steps})")
        parser.add_argument(f"--{name}_epochs", type=int,
                            help=f"timed epochs of the project's loop (default {config.epochs})")
        parser.add_argument(f"--{name}_seed_steps", type=int,
                            help=f"timed steps of the seed-style loop (default {config.seed_steps})")
    parser.add_argument("--synthetic", help=f"the embedded configuration's data set (default "
                                            f"{CONFIGS['embedded'].synthetic})")
    parser.add_argument("--json", type=Path, help="also write the JSON summary here")
    parser.add_argument("--data_root", type=Path, help="write the data here (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the written data")
    args = parser.parse_args(argv)
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        parser.error(f"--configs: unknown {', '.join(sorted(unknown))}; choose from {', '.join(CONFIGS)}")
    return args


def chosen_configs(args: argparse.Namespace) -> list[Config]:
    configs = []
    for name in args.configs.split(","):
        config = dataclasses.replace(CONFIGS[name], **(TINY[name] if args.tiny else {}))
        given = {flag: getattr(args, f"{name}_{flag}", None) for flag in SIZE_FLAGS}
        if name == "embedded" and args.synthetic:
            given["synthetic"] = args.synthetic
        configs.append(dataclasses.replace(config, **{k: v for k, v in given.items() if v is not None}))
    return configs


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    backend = args.compile_backend or ("eager" if args.tiny and device.type == "cpu" else DEFAULT_BACKEND)
    summary = {"device": device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
               "tiny": args.tiny, "compile_backend": backend, "configs": {}}
    print(f"{summary['device']}, torch {torch.__version__}, {os.cpu_count()} CPU cores, compile backend {backend}",
          flush=True)
    if device.type == "cuda":
        set_tf32(True)
        torch.backends.cudnn.benchmark = True  # as engine.processes.join_process_group sets it
    start = time.perf_counter()
    root = args.data_root or Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    root = root / "bench_gpu_data" if args.data_root else root
    try:
        with compile_backend(backend):
            for config in chosen_configs(args):
                summary["configs"][config.name] = run_config(config, args, device, root)
                if args.json:  # what is measured so far survives a time limit that ends the run
                    args.json.write_text(json.dumps({**summary, "partial": True}, indent=1) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    summary["seconds"] = time.perf_counter() - start
    print_ratios(summary)
    print(f"total {summary['seconds']:.0f} s" + (f"; data kept in {root}" if args.keep else ""))
    text = json.dumps(summary, indent=1)
    print(JSON_MARKER, text, sep="\n", flush=True)
    if args.json:
        args.json.write_text(text + "\n")
    failed = [key for result in summary["configs"].values() for key, row in result["rows"].items()
              if "error" in row and "compile" not in key]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
