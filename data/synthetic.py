"""The embedded synthetic benchmark: procedural images, no files, fully deterministic.

Every image is a few Gabor patches (oriented sine gratings under Gaussian envelopes) on a
coloured background. A class is a prototype (positions, orientations, frequencies, phases,
colours); a sample is its prototype jittered. Random numbers come from numpy's PCG64 seeded
by (world seed, task, split, class), drawn one sample after another, so sample i of a class
is the same whatever the number of samples asked for and on every machine.

A *source* task (many classes) stands in for ImageNet. A *target* task has classes of its
own (new prototypes) and three knobs, one per factor of the paper:

* ``gap`` (domain gap, 0..1): the target domain's style moves away from the source's.
  Colours (which lean towards a warm palette in the source) rotate about the grey axis by
  up to 120 degrees, gratings get up to twice as fine, and a fixed texture (the same for
  every class) is laid over the image with weight up to 0.4. ``gap=0`` is the source style.
* ``var`` (intraclass variance, >= 0): how far samples stray from their class prototype
  (every prototype parameter is jittered in proportion, plus pixel noise).
* ``n`` (data amount): training samples per class. The validation split has ``n_val`` per
  class, independent of ``n``.

Options are given as ``synthetic:key=value,...``, e.g.
``synthetic:classes=10,n=200,gap=0.5,var=0.3,seed=1``; ``synthetic:source`` (or
``task=source``) selects the source task. See :data:`DEFAULTS`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch.utils.data import Dataset

from utils import UserError

COMPONENTS = 3  # Gabor patches per image
WORLD_SEED = 20231126  # fixes what "the source style" and "the target style" look like
_TASK_IDS = {"source": 0, "target": 1}
_SPLIT_IDS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class SyntheticConfig:
    task: str = "target"
    classes: int = 10
    n: int = 100
    n_val: int = 50
    gap: float = 0.0
    var: float = 0.3
    seed: int = 0
    size: int = 32


DEFAULTS = {
    "source": SyntheticConfig(task="source", classes=100, n=300, n_val=20, gap=0.0, var=0.3),
    "target": SyntheticConfig(),
}


def parse_options(options: str) -> SyntheticConfig:
    """``"classes=10,n=200,gap=0.5"`` (or ``"source"`` / ``"task=source,..."``) -> config."""
    items = [item.strip() for item in options.split(",") if item.strip()]
    values: dict[str, str] = {}
    for item in items:
        if item in _TASK_IDS:
            values["task"] = item
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--dataset synthetic:{options}: expected key=value, got {item!r}")
        values[key.strip()] = value.strip()
    task = values.get("task", "target")
    if task not in _TASK_IDS:
        raise UserError(f"--dataset synthetic:{options}: task must be source or target, not {task!r}")
    config = DEFAULTS[task]
    types = {f.name: f.type for f in fields(SyntheticConfig)}
    for key, value in values.items():
        if key not in types:
            raise UserError(f"--dataset synthetic:{options}: unknown option {key!r}; "
                            f"known: {', '.join(types)}")
        try:
            parsed = {"int": int, "float": float, "str": str}[types[key]](value)
        except ValueError:
            noun = {"int": "an integer", "float": "a number", "str": "a word"}[types[key]]
            raise UserError(f"--dataset synthetic:{options}: {key}={value} must be {noun}") from None
        config = replace(config, **{key: parsed})
    problems = [
        config.classes < 2 and "classes must be at least 2",
        config.n < 1 and "n must be at least 1",
        config.n_val < 1 and "n_val must be at least 1",
        not 0.0 <= config.gap <= 1.0 and "gap must be in [0, 1]",
        config.var < 0 and "var must be >= 0",
        config.size < 8 and "size must be at least 8",
        config.task == "source" and config.gap != 0.0 and "the source task has no gap",
        not math.isfinite(config.var) and "var must be a finite number",
        not 0 <= config.seed < 2**32 and "seed must be from 0 to 2**32 - 1",
        _bytes_of(config) > _memory_bytes() and (
            f"{config.classes} classes x {config.n + config.n_val} images of {config.size} px would take "
            f"{_bytes_of(config) / 2**30:.3g} GiB, more than this machine's memory; give fewer or smaller images"),
    ]
    problem = next((p for p in problems if p), None)
    if problem:
        raise UserError(f"--dataset synthetic:{options}: {problem}")
    return config


def _bytes_of(config: SyntheticConfig) -> int:
    """The bytes of all of a configuration's images as uint8 pixels (what a cache holds)."""
    return config.classes * (config.n + config.n_val) * 3 * config.size ** 2


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**40


def describe(config: SyntheticConfig) -> str:
    """The option string that rebuilds ``config``."""
    return "synthetic:" + ",".join(f"{f.name}={getattr(config, f.name)}" for f in fields(SyntheticConfig))


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([WORLD_SEED, *key])))


_PALETTE = np.array([0.9, 0.3, -0.6])  # the source domain's colour bias (warm)

# Per component: x, y, orientation, log-frequency, phase, log-envelope, log-amplitude, rgb.
_PARAMS_PER_COMPONENT = 10


def _prototypes(config: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
    """Class prototypes: components ``[classes, COMPONENTS, 10]`` and backgrounds ``[classes, 3]``."""
    rng = _rng(_TASK_IDS[config.task], config.seed if config.task == "target" else 0, 99)
    comps = np.empty((config.classes, COMPONENTS, _PARAMS_PER_COMPONENT))
    comps[..., 0:2] = rng.uniform(-0.55, 0.55, (config.classes, COMPONENTS, 2))
    comps[..., 2] = rng.uniform(0, math.pi, (config.classes, COMPONENTS))
    comps[..., 3] = np.log(rng.uniform(1.0, 3.0, (config.classes, COMPONENTS)))
    comps[..., 4] = rng.uniform(0, 2 * math.pi, (config.classes, COMPONENTS))
    comps[..., 5] = np.log(rng.uniform(0.25, 0.5, (config.classes, COMPONENTS)))
    comps[..., 6] = np.log(rng.uniform(0.6, 1.0, (config.classes, COMPONENTS)))
    # Colours lean towards a fixed palette, so a rotation of hue is a real shift of the
    # colour distribution (an isotropic one would look the same after rotating).
    colours = rng.normal(size=(config.classes, COMPONENTS, 3)) + _PALETTE
    comps[..., 7:10] = colours / np.linalg.norm(colours, axis=-1, keepdims=True)
    backgrounds = rng.normal(0, 0.3, (config.classes, 3)) + 0.5 * _PALETTE
    return comps, backgrounds


# How far each parameter strays per unit of ``var`` (x, y, angle, log f, phase, log sigma,
# log amplitude, r, g, b) and the background.
_JITTER = np.array([0.15, 0.15, 0.35, 0.2, 1.2, 0.15, 0.25, 0.4, 0.4, 0.4])
_BACKGROUND_JITTER = 0.2
_PIXEL_NOISE = 0.05


def _samples(config: SyntheticConfig, split: str, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Jittered parameters and pixel noise for ``count`` samples of every class, class-major."""
    protos, backgrounds = _prototypes(config)
    comps = np.empty((config.classes, count, COMPONENTS, _PARAMS_PER_COMPONENT))
    bgs = np.empty((config.classes, count, 3))
    noise = np.empty((config.classes, count, 3, config.size, config.size), dtype=np.float32)
    for c in range(config.classes):
        rng = _rng(_TASK_IDS[config.task], config.seed, _SPLIT_IDS[split], c)
        for i in range(count):  # one sample at a time: sample i never depends on count
            draws = rng.normal(size=_PARAMS_PER_COMPONENT * COMPONENTS + 3)
            comps[c, i] = protos[c] + draws[:-3].reshape(COMPONENTS, -1) * _JITTER * config.var
            bgs[c, i] = backgrounds[c] + draws[-3:] * _BACKGROUND_JITTER * config.var
            noise[c, i] = rng.standard_normal(size=(3, config.size, config.size), dtype=np.float32)
    flat = config.classes * count
    return comps.reshape(flat, COMPONENTS, -1), bgs.reshape(flat, 3), noise.reshape(flat, 3, config.size, config.size)


def _hue_rotation(angle: float) -> torch.Tensor:
    """3x3 rotation about the grey axis (1, 1, 1) / sqrt(3) by ``angle`` (Rodrigues)."""
    axis = torch.full((3,), 1 / math.sqrt(3), dtype=torch.float64)
    cross = torch.tensor([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]],
                         dtype=torch.float64)
    return (math.cos(angle) * torch.eye(3, dtype=torch.float64) + math.sin(angle) * cross
            + (1 - math.cos(angle)) * torch.outer(axis, axis))


def _style_texture(size: int) -> torch.Tensor:
    """The target domain's fixed overlay: a sum of random gratings, ``[3, size, size]``."""
    rng = _rng(7, 7, 7)
    grid = torch.linspace(-1, 1, size, dtype=torch.float64)
    y, x = torch.meshgrid(grid, grid, indexing="ij")
    texture = torch.zeros(3, size, size, dtype=torch.float64)
    for _ in range(6):
        angle, freq, phase = rng.uniform(0, math.pi), rng.uniform(3, 7), rng.uniform(0, 2 * math.pi)
        colour = torch.from_numpy(rng.normal(size=3))
        wave = torch.cos(2 * math.pi * freq * (x * math.cos(angle) + y * math.sin(angle)) + phase)
        texture += colour[:, None, None] * wave
    return texture / texture.std()


def render(config: SyntheticConfig, comps: np.ndarray, bgs: np.ndarray, noise: np.ndarray,
           batch: int = 2048) -> torch.Tensor:
    """Images ``[N, 3, size, size]`` as uint8, in the domain style that ``config.gap`` sets."""
    size, gap = config.size, config.gap
    grid = torch.linspace(-1, 1, size, dtype=torch.float64)
    rotation = _hue_rotation(gap * 2 * math.pi / 3)
    texture = _style_texture(size) if gap > 0 else None
    out = torch.empty(len(comps), 3, size, size, dtype=torch.uint8)
    for start in range(0, len(comps), batch):
        p = torch.from_numpy(comps[start : start + batch])  # [B, K, 10]
        cx, cy, angle = p[..., 0, None], p[..., 1, None], p[..., 2, None]
        freq = torch.exp(p[..., 3, None]) * (1 + gap)
        phase, sigma, amp = p[..., 4, None], torch.exp(p[..., 5, None]), torch.exp(p[..., 6, None])
        dx, dy = grid - cx, grid - cy  # [B, K, S]
        # A Gabor patch is separable: envelope(x) envelope(y) cos(kx x + ky y + phase)
        #   = ex(x) ey(y) [cos(kx x + phase) cos(ky y) - sin(kx x + phase) sin(ky y)].
        ex, ey = amp * torch.exp(-dx**2 / (2 * sigma**2)), torch.exp(-dy**2 / (2 * sigma**2))
        kx, ky = 2 * math.pi * freq * torch.cos(angle), 2 * math.pi * freq * torch.sin(angle)
        colours = p[..., 7:10] @ rotation.T  # [B, K, 3]
        image = torch.einsum("bkc,bkh,bkw->bchw", colours, ey * torch.cos(ky * dy), ex * torch.cos(kx * dx + phase))
        image -= torch.einsum("bkc,bkh,bkw->bchw", colours, ey * torch.sin(ky * dy), ex * torch.sin(kx * dx + phase))
        image += (torch.from_numpy(bgs[start : start + batch]) @ rotation.T)[..., None, None]
        if texture is not None:
            image += 0.4 * gap * texture
        image += torch.from_numpy(noise[start : start + batch]) * (_PIXEL_NOISE * (1 + config.var))
        out[start : start + batch] = (0.5 + 0.3 * image).clamp(0, 1).mul(255).round().to(torch.uint8)
    return out


class SyntheticDataset(Dataset):
    """One split of a synthetic task; images are generated once, at construction.

    ``images`` is a uint8 tensor ``[N, 3, size, size]``; ``__getitem__`` returns
    ``(transform(image), label)`` with the uint8 image when no transform is given.
    """

    def __init__(self, config: SyntheticConfig, split: str, transform=None) -> None:
        if split not in _SPLIT_IDS:
            raise ValueError(f"split must be train or val, not {split!r}")
        self.config, self.split, self.transform = config, split, transform
        count = config.n if split == "train" else config.n_val
        self.images = render(config, *_samples(config, split, count))
        self.targets = [c for c in range(config.classes) for _ in range(count)]
        prefix = "s" if config.task == "source" else f"t{config.seed}_"
        self.classes = [f"{prefix}{c:03d}" for c in range(config.classes)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = self.images[index]
        return (self.transform(image) if self.transform is not None else image), self.targets[index]


def build_synthetic(options: str, split: str, transform=None, seed: int = 0) -> SyntheticDataset:
    """Entry point of the dataset registry (``--dataset synthetic:OPTIONS``).

    ``seed`` is the registry's split seed; synthetic splits are generated, not drawn, so
    the task's own ``seed=`` option is what selects a different task.
    """
    del seed
    return SyntheticDataset(parse_options(options), split, transform)
