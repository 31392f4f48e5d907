"""Layer-wise transferability from parameter distances (the definitions: docs/metric.md).

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
import statistics
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from models.layer_maps import LayerGroup

HEAD, LAYER, FROZEN = "head", "layer", "frozen"
# Above this median cos_init, pre-training has barely left the initialisation and T compares
# two nearly equal starting points (cal_transferability.py's note, reproduce.py's report).
COS_INIT_WARNING = 0.5
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
        values = [layer.cos_init for layer in self.layers
                  if layer.cos_init is not None and math.isfinite(layer.cos_init)]
        return statistics.median(values) if values else math.nan


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


def _moved(total: float, dot: float, norm_a: float, norm_r: float, numel: int) -> tuple[float, float]:
    norms = math.sqrt(norm_a) * math.sqrt(norm_r)
    return total / max(numel, 1), (dot / norms if norms > 0 else math.nan)


def _first_pass(target: torch.Tensor, r: torch.Tensor, a: torch.Tensor,
                chunk: int) -> tuple[torch.Tensor, tuple[float, float]]:
    """:func:`abs_diff_sums` of ``target`` against (r, a), and in the same walk over the
    chunks (each in cache once) :func:`_distance_and_cosine` of r and a."""
    dtype = _compute_dtype(target, r, a)
    flat_t, flat_r, flat_a = target.reshape(-1), r.reshape(-1), a.reshape(-1)
    sums = torch.zeros(6, dtype=torch.float64, device=target.device)  # |r-t|, |a-t|, |a-r|, <a,r>, |a|^2, |r|^2
    for start in range(0, flat_t.numel(), chunk):
        piece_t = flat_t[start : start + chunk].to(dtype)
        piece_r, piece_a = flat_r[start : start + chunk].to(dtype), flat_a[start : start + chunk].to(dtype)
        sums[0] += (piece_r - piece_t).abs_().sum(dtype=torch.float64)
        sums[1] += (piece_a - piece_t).abs_().sum(dtype=torch.float64)
        sums[2] += (piece_a - piece_r).abs_().sum(dtype=torch.float64)
        sums[3] += torch.dot(piece_a, piece_r)
        sums[4] += torch.dot(piece_a, piece_a)
        sums[5] += torch.dot(piece_r, piece_r)
    return sums[:2], _moved(*sums[2:].tolist(), a.numel())


def _distance_and_cosine(r: torch.Tensor, a: torch.Tensor, chunk: int) -> tuple[float, float]:
    """(mean |a - r|, cosine of a and r) in one chunked pass over both tensors: each chunk
    is compared in the inputs' precision (float32 at least), the chunks' sums added in
    float64, no full-size temporary."""
    dtype = _compute_dtype(r, a)
    flat_r, flat_a = r.reshape(-1), a.reshape(-1)
    sums = torch.zeros(4, dtype=torch.float64, device=a.device)  # sum |a - r|, <a, r>, |a|^2, |r|^2
    for start in range(0, flat_a.numel(), chunk):
        piece_r, piece_a = flat_r[start : start + chunk].to(dtype), flat_a[start : start + chunk].to(dtype)
        sums[0] += (piece_a - piece_r).abs_().sum(dtype=torch.float64)
        sums[1] += torch.dot(piece_a, piece_r)  # a chunk's dot products in its own precision
        sums[2] += torch.dot(piece_a, piece_a)
        sums[3] += torch.dot(piece_r, piece_r)
    return _moved(*sums.tolist(), a.numel())


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
        # key -> (D(theta_r, theta_A), cosine) of the tensor: measured during the first call,
        # while theta_r's and theta_A's chunks are in cache anyway (no pass of their own)
        self._moved: dict[str, tuple[float, float]] = {}

    @property
    def init(self) -> dict[str, tuple[float, float]]:
        """Point name -> (d_init, cos_init): D(theta_r, theta_A) and the cosine similarity of
        theta_r and theta_A, each the mean over the point's tensors."""
        for key in self.keys:
            if key not in self._moved:
                self._moved[key] = _distance_and_cosine(self.theta_r[key], self.theta_a[key], self.chunk)
        return {group.name: (math.fsum(self._moved[k][0] for k in group.keys) / len(group.keys),
                             math.fsum(self._moved[k][1] for k in group.keys) / len(group.keys))
                for group in self.groups if not group.is_head}

    def _sums(self, key: str, target: torch.Tensor) -> torch.Tensor:
        refs = (self.theta_r[key], self.theta_a[key])
        if key in self._moved:
            sums = abs_diff_sums(target, refs, self.chunk)
        else:
            sums, moved = _first_pass(target, *refs, self.chunk)
            if torch.isfinite(sums).all():
                self._moved[key] = moved
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
        init = self.init

        layers = []
        for group in self.groups:
            if group.is_head:
                layers.append(LayerResult(group.name, None, None, 1.0, HEAD))
                continue
            d_r = math.fsum(distance[k][0] for k in group.keys) / len(group.keys)
            d_a = math.fsum(distance[k][1] for k in group.keys) / len(group.keys)
            d_init, cos_init = init[group.name]
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
