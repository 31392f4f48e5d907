"""What decides the study's numbers: the presets, the pre-training regimes, the targets.

A :class:`Study` holds every setting that changes a run's numbers; a run's cache key is built
from them (:mod:`study.runs`). A preset is one ``Study``; its ``regimes`` are further
pre-training recipes whose fine-tunings are compared with the main one's, run for run.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace

ARCH = "resnet20"

# Bumped whenever the training recipe changes the numbers a run produces (augmentation,
# head initialisation, ...): part of every run's cache key, so no stale run is reused.
RECIPE = "recipe-2"
# sum over pre-training steps of lr x weight decay for the seed's ImageNet run: 5005 steps per
# epoch (batch 256), 40 epochs each at lr 0.1, 0.01 and 0.001, weight decay 1e-4
IMAGENET_LR_WD_BUDGET = 5005 * 40 * (0.1 + 0.01 + 0.001) * 1e-4
# lr / weight decay of the seed's pre-training (0.1 / 1e-4): it sets the norm that the weights
# followed by BatchNorm settle at, and so how far weight decay shrinks each layer
SEED_LR_WD_RATIO = 0.1 / 1e-4


@dataclass(frozen=True)
class Regime:
    """Another pre-training recipe of the same source task: its lr and weight decays, and the
    knobs whose targets are fine-tuned from it (the lr knob is the fine-tuning's, not a data
    set property, so it is usually left to the main regime)."""

    name: str
    pretrain_lr: float
    pretrain_weight_decay: float
    pretrain_norm_weight_decay: float | None = None
    knobs: tuple = ("gap", "var", "n")
    seeds: tuple | None = None  # the seeds of its fine-tunings; None: the study's


@dataclass(frozen=True)
class Study:
    """Everything that decides the study's numbers (and so its cache keys)."""

    source: str  # synthetic source task options
    pretrain_epochs: int
    pretrain_lr_step: int
    target: dict  # base target task: classes, n, n_val, gap, var, size
    levels: dict  # knob -> the values it takes while the others stay at the base ("lr": fine-tuning lr)
    seeds: tuple  # one target task (its classes) and one fine-tuning seed each
    finetune_epochs: int
    pretrain_lr: float = 0.1
    pretrain_weight_decay: float = 1e-4
    pretrain_norm_weight_decay: float | None = None  # BatchNorm's scales and shifts; None: as the others
    finetune_lr: float = 0.01  # the seed's
    finetune_weight_decay: float = 1e-4  # the seed's
    batch_size: int = 128
    max_samples: int = 1000  # images per dataset for G and D
    arch: str = ARCH
    pretrain_optimizer: str = "sgd"  # engine.optim.OPTIMIZERS; fine-tuning always uses the seed's SGD
    pretrain_warmup_epochs: int = 0
    extra: dict = field(default_factory=dict)
    main_regime: str = "main"  # the name of this study's own pre-training recipe in the report
    regimes: tuple = ()  # further pre-training recipes (Regime), each compared with the main one

    def optimizer_text(self) -> str:
        """How pre-training updates the weights, in words, for the report."""
        warmup = f", {self.pretrain_warmup_epochs} epochs of linear warm-up" if self.pretrain_warmup_epochs else ""
        optimizer = "SGD, momentum 0.9" if self.pretrain_optimizer == "sgd" else "AdamW, betas 0.9 and 0.999"
        return optimizer + warmup

    def regime_study(self, regime: Regime) -> "Study":
        """The study of one further regime: its pre-training recipe, the knobs it runs, no
        further regimes of its own."""
        return replace(self, pretrain_lr=regime.pretrain_lr, pretrain_weight_decay=regime.pretrain_weight_decay,
                       pretrain_norm_weight_decay=regime.pretrain_norm_weight_decay, main_regime=regime.name,
                       levels={k: v for k, v in self.levels.items() if k in regime.knobs},
                       seeds=self.seeds if regime.seeds is None else regime.seeds, regimes=())

    def all_regimes(self) -> list[tuple[str, "Study"]]:
        """``(name, study)`` of the main regime and of every further one, main first."""
        return [(self.main_regime, self)] + [(r.name, self.regime_study(r)) for r in self.regimes]


# The seed's lr / weight decay of 1,000 at the main regimes' sum of lr x weight decay: the same
# steps, so the same lr x wd per step (0.1 x 7e-3 = 7e-4 against 0.84 x 8.4e-4 = 7.06e-4).
# Two seeds of each data set knob's targets (14 fine-tunings) keep the whole study within two
# hours on a 2-core CPU.
SEED_RATIO_REGIME = Regime("lr/wd 1,000", 0.84, 8.4e-4, 1e-4, seeds=(1, 2))


PRESETS = {
    # The paper's regime: pre-training that leaves the initialisation (a lr x weight-decay
    # budget close to 120 ImageNet epochs), a source task harder than the targets, targets
    # that do not saturate, the seed's fine-tuning recipe at several learning rates. A second
    # pre-training has the seed's lr / weight decay ratio at the same budget.
    "paper": Study(
        source="source,classes=200,n=150,n_val=10,var=0.5", pretrain_epochs=36, pretrain_lr_step=12,
        pretrain_weight_decay=7e-3, pretrain_norm_weight_decay=1e-4,
        target={"classes": 20, "n": 100, "n_val": 50, "gap": 0.5, "var": 1.0, "size": 32},
        levels={"gap": (0.0, 0.5, 1.0), "var": (0.8, 1.0, 1.4), "n": (50, 100, 200), "lr": (0.003, 0.01, 0.03)},
        seeds=(1, 2, 3), finetune_epochs=30, main_regime="lr/wd 14",
        regimes=(SEED_RATIO_REGIME,)),
    # A check of the whole pipeline in minutes; its pre-training is far shorter than the
    # paper's, so its verdicts are not evidence.
    "quick": Study(
        source="source,classes=50,n=100,n_val=10,var=0.5", pretrain_epochs=12, pretrain_lr_step=4,
        pretrain_weight_decay=7e-3, pretrain_norm_weight_decay=1e-4,
        target={"classes": 10, "n": 60, "n_val": 30, "gap": 0.5, "var": 1.0, "size": 32},
        levels={"gap": (0.0, 1.0), "var": (0.8, 1.4), "n": (30, 120), "lr": (0.003, 0.03)},
        seeds=(1, 2), finetune_epochs=10, max_samples=500, main_regime="lr/wd 14",
        regimes=(SEED_RATIO_REGIME,)),
    # The paper's four networks side by side (reproduce.py --preset families --arch NAME, one
    # study per architecture, each within two hours on a 2-core CPU): the README walkthrough's
    # pre-training (a source task of 10,000 images, 30 epochs, weight decay 1e-2 and 1e-4 for
    # BatchNorm), which leaves ResNet-20's initialisation (median cos_init 0.03); the quick
    # preset's targets and knobs with three seeds; the main regime only.
    "families": Study(
        source="source,classes=100,n=100,n_val=10,var=0.5", pretrain_epochs=30, pretrain_lr_step=10,
        pretrain_weight_decay=1e-2, pretrain_norm_weight_decay=1e-4,
        target={"classes": 10, "n": 60, "n_val": 30, "gap": 0.5, "var": 1.0, "size": 32},
        levels={"gap": (0.0, 1.0), "var": (0.8, 1.4), "n": (30, 120), "lr": (0.003, 0.03)},
        seeds=(1, 2, 3), finetune_epochs=15, max_samples=500, main_regime="lr/wd 10"),
    # A few seconds: for the test suite, not for conclusions.
    "tiny": Study(
        source="source,classes=6,n=12,n_val=4,size=16", pretrain_epochs=1, pretrain_lr_step=1,
        target={"classes": 3, "n": 8, "n_val": 4, "gap": 0.5, "var": 0.3, "size": 16},
        levels={"gap": (0.0, 1.0), "var": (0.1, 1.0), "n": (4, 16), "lr": (0.003,)},
        seeds=(1,), finetune_epochs=1, batch_size=16, max_samples=64,
        main_regime="lr/wd 1,000", regimes=(Regime("lr/wd 100", 0.1, 1e-3),)),
}
# The recipe an architecture's pre-training needs beyond the preset's (docs/architectures.md):
# applied by reproduce.py --arch. Each entry is the reason it differs from the seed's SGD.
ARCH_RECIPES: dict[str, dict] = {
    # The seed's SGD leaves a ViT where it started (lr 0.1, weight decay 7e-3, 12 epochs of the
    # quick source: 90.8 % source accuracy at median cos_init 0.97), and AdamW at DeiT's weight
    # decay 0.05 is no better in this few steps (0.96 after the warm-up). DeiT's ImageNet recipe
    # applies a sum of lr x weight decay of about 9.4 (lr 1e-3, wd 0.05, 300 epochs of 1,251
    # steps, cosine); this recipe applies the same budget, 9.9, in the preset's 2,370 steps.
    "vit_w96_p4": {"pretrain_optimizer": "adamw", "pretrain_lr": 2e-3, "pretrain_weight_decay": 5.0,
                   "pretrain_norm_weight_decay": 0.0, "pretrain_warmup_epochs": 3, "main_regime": "AdamW, wd 5"},
}


def for_arch(study: Study, arch: str) -> Study:
    """``study`` for another registered architecture: the same knobs, seeds and targets, with
    that architecture's pre-training recipe (:data:`ARCH_RECIPES`) where it has one. Further
    regimes are dropped for an architecture with a recipe of its own (they vary SGD's lr and
    weight decay)."""
    recipe = ARCH_RECIPES.get(arch, {})
    return replace(study, arch=arch, **recipe, **({"regimes": ()} if recipe else {}))


DEFAULT_PRESET = "paper"
KNOBS = {"gap": "domain gap", "var": "intraclass variance", "n": "images per class", "lr": "fine-tuning lr"}


def source_images(study: Study) -> int:
    from data.synthetic import parse_options

    config = parse_options(study.source)
    return config.classes * config.n


def pretraining_budget(study: Study) -> float:
    """sum over pre-training steps of lr x weight decay of the weights (after
    ``pretrain_warmup_epochs`` of linear warm-up, the step schedule divides the lr by 10 every
    ``pretrain_lr_step`` epochs). The weights that BatchNorm
    follows are scale-invariant: weight decay only shrinks their norm, which speeds up their
    change of direction; this budget is what sets how far that goes."""
    steps = math.ceil(source_images(study) / study.batch_size)
    warmup = study.pretrain_warmup_epochs  # the lr rises to its value over these, then the steps count
    rates = [study.pretrain_lr * (1 + epoch) / (warmup + 1) if epoch < warmup
             else study.pretrain_lr * 0.1 ** ((epoch - warmup) // study.pretrain_lr_step)
             for epoch in range(study.pretrain_epochs)]
    return steps * study.pretrain_weight_decay * sum(rates)


def ratio_text(ratio: float) -> str:
    """lr / weight decay for a table: whole numbers with thousands separators, or two
    significant digits below 10 (AdamW's ratios are far below 1)."""
    return f"{ratio:,.0f}" if ratio >= 10 else f"{ratio:.2g}"


def lr_wd_ratio(study: Study) -> float:
    """lr / weight decay of the weights in pre-training (the seed's: 1,000)."""
    return study.pretrain_lr / study.pretrain_weight_decay


def digest(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Target:
    """One point of the grid: a target task and the fine-tuning learning rate."""

    name: str  # "base", or the knob that differs from the base and its value, e.g. "gap=0.25"
    knob: str | None  # None for the base
    options: dict  # synthetic target options
    lr: float


def target_configs(study: Study) -> list[Target]:
    """The base target and every level of every knob, once each.

    The base (the study's target at its fine-tuning lr) comes first, named ``base``; the
    others are named by the knob that differs from it, e.g. ``gap=0.25`` or ``lr=0.003``.
    """
    base = Target("base", None, dict(study.target), study.finetune_lr)
    targets = {json.dumps([base.options, base.lr], sort_keys=True): base}
    for knob, values in study.levels.items():
        for value in values:
            options = dict(study.target) if knob == "lr" else {**study.target, knob: value}
            lr = float(value) if knob == "lr" else study.finetune_lr
            targets.setdefault(json.dumps([options, lr], sort_keys=True), Target(f"{knob}={value}", knob, options, lr))
    return list(targets.values())


def knob_levels(study: Study, knob: str) -> list[Target]:
    """The targets of one knob's panel, in the order of its levels (the base among them)."""
    base = target_configs(study)[0]
    value_of = {"lr": lambda t: t.lr}.get(knob, lambda t: t.options[knob])
    by_value = {value_of(t): t for t in target_configs(study) if t.knob in (None, knob)}
    return [by_value[v] if v in by_value else base for v in study.levels[knob]]


def dataset_option(options: dict, seed: int) -> str:
    return "synthetic:" + ",".join(f"{k}={v}" for k, v in sorted({**options, "seed": seed}.items()))
