"""What the training loop needs to know, as one settings object."""
from __future__ import annotations

from dataclasses import dataclass, field

from data.cache import DEFAULT_CACHE_DIR


@dataclass
class TrainSettings:
    """The loop's settings (the scripts build them from their flags: engine.runs)."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    momentum: float = 0.9  # SGD's
    optimizer: str = "sgd"  # "sgd" or "adamw" (engine.optim)
    warmup_epochs: int = 0  # linear warm-up before the schedule
    norm_weight_decay: float | None = None  # for normalisation layers' parameters; None: weight_decay
    schedule: str = "cosine"  # "cosine" or "step"
    step_size: int = 40
    gamma: float = 0.1
    seed: int = 0
    workers: int = 2
    amp: str = "off"  # "off", "bf16", "fp16"
    channels_last: bool = True
    compile: bool = False
    compile_mode: str = "default"  # torch.compile's mode (engine.loop.COMPILE_MODES)
    sync_bn: bool = False
    cache: str = "auto"  # decoded images in memory or on disk: "auto", "on", "off", "disk" (data.cache)
    cache_dir: str = DEFAULT_CACHE_DIR  # where --cache disk (and auto, when memory is short) writes them
    dataset: str = ""  # the --dataset and --data_dir the images come from: part of the disk cache's key
    data_dir: str | None = None
    label: str = "train"
    progress: bool = True  # progress bars on the main process
    check_every: int = 1  # steps between reads of the loss and stop/divergence checks (engine.loop)
    skip_corrupt: bool = False  # batches may lack images (corrupt ones skipped)
    args: dict = field(default_factory=dict)  # the run's settings as flags, stored in checkpoints
