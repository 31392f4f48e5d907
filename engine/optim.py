"""The optimizer, the learning-rate schedule and the gradient scaler, built from the settings.

The paper's recipe: SGD with momentum; a step schedule (lr / 10 every ``step_size`` epochs)
for pre-training and cosine annealing over all epochs for fine-tuning. Beyond the seed, for
networks its recipe does not train away from their initialisation (ViTs): AdamW instead of
SGD, and a linear warm-up of ``warmup_epochs`` before either schedule (the step schedule then
counts its epochs from the warm-up's end; cosine anneals over the remaining epochs). This is
the one place where the optimizer and the schedule are chosen.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.settings import TrainSettings

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
OPTIMIZERS = ("sgd", "adamw")


def parameter_groups(model: nn.Module, settings: TrainSettings) -> list[dict]:
    """The optimizer's parameter groups: every parameter with ``settings.weight_decay`` (the
    seed's recipe), or, with ``settings.norm_weight_decay``, the normalisation layers'
    parameters in a group of their own with that decay."""
    if settings.norm_weight_decay is None:
        return [{"params": list(model.parameters())}]
    norm = {id(p) for module in model.modules() if isinstance(module, _NORMS) for p in module.parameters(recurse=False)}
    others = [p for p in model.parameters() if id(p) not in norm]
    norms = [p for p in model.parameters() if id(p) in norm]
    return [{"params": others}, {"params": norms, "weight_decay": settings.norm_weight_decay}]


@dataclass
class Optimization:
    """Everything that updates the weights, and the autocast precision of the forward pass."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None  # None: fp32

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dicts(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}

    def load_state_dicts(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def build_optimization(model: nn.Module, settings: TrainSettings, device: torch.device) -> Optimization:
    """The optimizer ``settings.optimizer`` over ``model``'s parameters (SGD with momentum, or
    AdamW), the schedule ``settings.schedule`` ("step" or "cosine") after ``warmup_epochs`` of
    linear warm-up, and a GradScaler that is active with ``--amp fp16`` only. The schedule is
    stepped once per epoch."""
    groups = parameter_groups(model, settings)
    if settings.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum,
                                    weight_decay=settings.weight_decay)
    elif settings.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)
    else:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {settings.optimizer!r}")
    warmup = min(settings.warmup_epochs, max(settings.epochs - 1, 0))
    if settings.schedule == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, settings.step_size, settings.gamma)
    elif settings.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(settings.epochs - warmup, 1))
    else:
        raise ValueError(f"schedule must be 'step' or 'cosine', got {settings.schedule!r}")
    if warmup > 0:
        rise = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / (warmup + 1), total_iters=warmup)
        scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [rise, scheduler], milestones=[warmup])
    scaler = torch.amp.GradScaler(device.type, enabled=settings.amp == "fp16")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.amp)
    return Optimization(optimizer, scheduler, scaler, amp_dtype)
