"""Layer-wise transferability from parameter distances (DESIGN.md section 1).

    T_l = D(theta_r[l], theta_FB[l]) / D(theta_A[l], theta_FB[l])

D is the mean absolute difference of two weight tensors; a point made of several tensors
takes the mean of its tensors' distances on each side before the ratio. The overall
transferability is the mean of T_l over the points that are neither the head (1.0 by
definition: fine-tuning replaces it) nor frozen (D(theta_A, theta_FB) = 0, T = inf).

Diagnostics of pre-training, per point: ``d_init`` = D(theta_r, theta_A), how far
pre-training moved the point, and ``cos_init`` = the cosine similarity of theta_r and
theta_A (the mean over the point's tensors). T compares fine-tuning's end point with two
starting points; when pre-training barely left the initialisation (``cos_init`` near 1),
theta_r and theta_A are nearly the same point and T says little about what pre-training
learned.

Everything here is a pure function of state dicts. Sums of absolute differences are
accumulated in float64, in cache-sized chunks on the CPU, so the cost is one pass over
each file's bytes and no full-size temporary is ever made.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from models.layer_maps import LayerGroup

HEAD, LAYER, FROZEN = "head", "layer", "frozen"
ROLES = ("random", "pretrained", "finetuned")  # theta_r, theta_A, theta_FB

# Elements per chunk: 256 KiB of float32 stays in the CPU's L2 cache; a GPU only chunks
# tensors large enough for a full-size temporary to matter.
_CHUNK = {"cpu": 1 << 16, "cuda": 1 << 26}


class FrozenLayerWarning(UserWarning):
    """A point did not move during fine-tuning, so its transferability is infinite."""


class NonFiniteTensorError(ValueError):
    """A tensor used by the measurement holds NaN or Inf."""

    def __init__(self, key: str, role: str) -> None:
        super().__init__(f"tensor {key} of theta_{role} holds NaN or Inf")
        self.key, self.role = key, role


@dataclass(frozen=True)
class LayerResult:
    name: str
    d_random: float | None  # D(theta_r, theta_FB); None for the head
    d_pretrained: float | None  # D(theta_A, theta_FB); None for the head
    transferability: float
    status: str  # "layer", "head" or "frozen"
    d_init: float | None = None  # D(theta_r, theta_A): how far pre-training moved it; None for the head
    cos_init: float | None = None  # cosine similarity of theta_r and theta_A (mean over tensors); None for the head


@dataclass(frozen=True)
class Transferability:
    layers: tuple[LayerResult, ...]
    overall: float

    @property
    def values(self) -> list[float]:
        return [layer.transferability for layer in self.layers]

    @property
    def median_cos_init(self) -> float:
        """Median over the non-head points of ``cos_init`` (NaN when there is none)."""
        values = sorted(layer.cos_init for layer in self.layers
                        if layer.cos_init is not None and math.isfinite(layer.cos_init))
        if not values:
            return math.nan
        middle = len(values) // 2
        return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """<a, b> / (|a| |b|) of two flattened tensors, accumulated in float64; NaN when either is 0."""
    a64, b64 = a.reshape(-1).to(torch.float64), b.reshape(-1).to(torch.float64)
    norms = float(a64.norm()) * float(b64.norm())
    return float(a64 @ b64) / norms if norms > 0 else math.nan


def overall_transferability(values: Sequence[float], is_head: Sequence[bool]) -> float:
    """Mean of the finite values that are not the head; NaN when there is none."""
    kept = [v for v, head in zip(values, is_head) if not head and math.isfinite(v)]
    return math.fsum(kept) / len(kept) if kept else math.nan


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def abs_diff_sums(target: torch.Tensor, references: Sequence[torch.Tensor], chunk: int) -> torch.Tensor:
    """``[sum |ref - target| for ref in references]`` as a float64 tensor on target's device.

    ``target`` is walked once, chunk by chunk, and compared with every reference while the
    chunk is in cache. Half-precision inputs are widened to float32 before subtracting.
    """
    dtype = _compute_dtype(target, *references)
    flat_target = target.reshape(-1)
    flat_refs = [ref.reshape(-1) for ref in references]
    sums = torch.zeros(len(references), dtype=torch.float64, device=target.device)
    buffer = torch.empty(min(chunk, flat_target.numel()), dtype=dtype, device=target.device)
    for start in range(0, flat_target.numel(), chunk):
        piece = flat_target[start : start + chunk].to(dtype)
        diff = buffer[: piece.numel()]
        for i, ref in enumerate(flat_refs):
            torch.sub(ref[start : start + chunk].to(dtype), piece, out=diff)
            sums[i] += diff.abs_().sum(dtype=torch.float64)
    return sums


class TransferabilityMeter:
    """Measures T for many fine-tuned checkpoints against one (theta_r, theta_A) pair.

    theta_r and theta_A are validated and (on a GPU) moved to the device once; each call
    then costs one pass over the fine-tuned weights.
    """

    def __init__(
        self,
        groups: Sequence[LayerGroup],
        theta_r: Mapping[str, torch.Tensor],
        theta_a: Mapping[str, torch.Tensor],
        device: str | torch.device = "cpu",
    ) -> None:
        self.groups = list(groups)
        self.device = torch.device(device)
        self.chunk = _CHUNK.get(self.device.type, _CHUNK["cuda"])
        self.keys = [key for group in self.groups if not group.is_head for key in group.keys]
        for key in self.keys:
            for role, theta in zip(ROLES, (theta_r, theta_a)):
                if key not in theta:
                    raise KeyError(f"tensor {key} is missing from theta_{role}")
        self.theta_r = {k: theta_r[k].to(self.device, non_blocking=True) for k in self.keys}
        self.theta_a = {k: theta_a[k].to(self.device, non_blocking=True) for k in self.keys}
        self.init = {group.name: self._pretraining_moved(group) for group in self.groups if not group.is_head}

    def _pretraining_moved(self, group: LayerGroup) -> tuple[float, float]:
        """(D(theta_r, theta_A), mean cosine similarity of theta_r and theta_A) of one point."""
        distances, cosines = [], []
        for key in group.keys:
            r, a = self.theta_r[key], self.theta_a[key]
            distances.append(float(abs_diff_sums(a, [r], self.chunk)[0]) / max(a.numel(), 1))
            cosines.append(cosine_similarity(r, a))
        return math.fsum(distances) / len(distances), math.fsum(cosines) / len(cosines)

    def _sums(self, key: str, target: torch.Tensor) -> torch.Tensor:
        refs = (self.theta_r[key], self.theta_a[key])
        sums = abs_diff_sums(target, refs, self.chunk)
        if torch.isfinite(sums).all():
            return sums
        for role, tensor in zip(ROLES, (*refs, target)):
            if not torch.isfinite(tensor).all():
                raise NonFiniteTensorError(key, role)
        # All inputs finite, so a float32 difference overflowed: redo this tensor in float64.
        return abs_diff_sums(target.double(), [ref.double() for ref in refs], self.chunk)

    def __call__(self, theta_b: Mapping[str, torch.Tensor]) -> Transferability:
        sums = {}
        for key in self.keys:
            if key not in theta_b:
                raise KeyError(f"tensor {key} is missing from theta_finetuned")
            target = theta_b[key].to(self.device, non_blocking=True)
            sums[key] = self._sums(key, target) / target.numel()
        table = torch.stack(list(sums.values())).cpu().tolist() if sums else []
        distance = dict(zip(sums, table))  # key -> [D(r, B), D(A, B)] per tensor

        layers = []
        for group in self.groups:
            if group.is_head:
                layers.append(LayerResult(group.name, None, None, 1.0, HEAD))
                continue
            d_r = math.fsum(distance[k][0] for k in group.keys) / len(group.keys)
            d_a = math.fsum(distance[k][1] for k in group.keys) / len(group.keys)
            d_init, cos_init = self.init[group.name]
            if d_a == 0.0:
                layers.append(LayerResult(group.name, d_r, d_a, math.inf, FROZEN, d_init, cos_init))
            else:
                layers.append(LayerResult(group.name, d_r, d_a, d_r / d_a, LAYER, d_init, cos_init))
        frozen = [layer.name for layer in layers if layer.status == FROZEN]
        if frozen:
            warnings.warn(
                f"{len(frozen)} layer(s) did not change during fine-tuning (D(theta_A, theta_FB) = 0): "
                f"{', '.join(frozen)}; their transferability is inf and they are left out of the mean",
                FrozenLayerWarning,
                stacklevel=2,
            )
        overall = overall_transferability(
            [layer.transferability for layer in layers], [layer.status == HEAD for layer in layers]
        )
        return Transferability(tuple(layers), overall)


def layerwise_transferability(
    groups: Sequence[LayerGroup],
    theta_r: Mapping[str, torch.Tensor],
    theta_a: Mapping[str, torch.Tensor],
    theta_b: Mapping[str, torch.Tensor],
    device: str | torch.device = "cpu",
) -> Transferability:
    """T per point and overall for one trio; see :class:`TransferabilityMeter` for many."""
    return TransferabilityMeter(groups, theta_r, theta_a, device)(theta_b)
