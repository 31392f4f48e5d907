"""Layer-wise transferability from parameter distances (the definitions: docs/metric.md).

    T_l = D(theta_r[l], theta_FB[l]) / D(theta_A[l], theta_FB[l])

D is the mean absolute difference of two weight tensors; a point made of several tensors
takes the mean of its tensors' distances on each side before the ratio. The overall
transferability is the mean of T_l over the points that are neither the head (1.0 by
definition: fine-tuning replaces it) nor frozen (D(theta_A, theta_FB) = 0, T = inf).

Beside T, never instead of it, the **scale-free T**: the same ratio after every tensor of
each checkpoint is divided by its own RMS, sqrt(mean(x^2)). A convolution followed by
BatchNorm computes the same function whatever its weights' scale, and weight decay shrinks
those weights during pre-training, so T partly measures that shrinkage; the scale-free T
does not. A tensor whose RMS is 0 in any of the three checkpoints is left out of it.

Diagnostics, per point: ``d_init`` = D(theta_r, theta_A), how far pre-training moved the
point, and ``cos_init`` = the cosine similarity of theta_r and theta_A (the mean over the
point's tensors); ``shrink`` = mean|theta_r| / mean|theta_A| (each side the mean over the
point's tensors), how much pre-training shrank the weights, and ``ft_move`` =
D(theta_A, theta_FB) / mean|theta_A|, how far fine-tuning moved them relative to their size.
Exactly, T = shrink / ft_move * D(theta_r, theta_FB) / mean|theta_r|. T compares
fine-tuning's end point with two starting points; when pre-training barely left the
initialisation (``cos_init`` near 1), theta_r and theta_A are nearly the same point and T
says little about what pre-training learned.

Everything here is a pure function of state dicts, computed in cache-sized chunks on the
CPU, so the cost is a pass over each file's bytes (two over a fine-tuned file: its RMS
first) and no full-size temporary is ever made. Each chunk's sums are taken in the inputs'
precision (float32 at least: a relative error of the order of 1e-7, the size of the rounding
of the differences themselves) and the chunks' sums added in float64.
"""
from __future__ import annotations

import math
import statistics
import warnings
from dataclasses import dataclass, replace
from typing import Mapping, NamedTuple, Sequence

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
    shrink: float | None = None  # mean|theta_r| / mean|theta_A| (each the mean over tensors); None for the head
    ft_move: float | None = None  # D(theta_A, theta_FB) / mean|theta_A|; None for the head
    # T on RMS-normalised tensors: 1.0 for the head, inf when the normalised theta_A and
    # theta_FB are equal, NaN when every tensor of the point has an RMS of 0 somewhere
    transferability_scale_free: float = math.nan
    d_random_scale_free: float | None = None  # D of the normalised theta_r and theta_FB; None: head or no tensor
    d_pretrained_scale_free: float | None = None  # D of the normalised theta_A and theta_FB; None: as above


@dataclass(frozen=True)
class Transferability:
    layers: tuple[LayerResult, ...]
    overall: float
    overall_scale_free: float = math.nan  # the mean of the scale-free T by the same rule as ``overall``

    @property
    def values(self) -> list[float]:
        return [layer.transferability for layer in self.layers]

    @property
    def values_scale_free(self) -> list[float]:
        """The scale-free T per point (the head 1.0, as in :attr:`values`)."""
        return [layer.transferability_scale_free for layer in self.layers]

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


def abs_diff_sums(target: torch.Tensor, references: Sequence[torch.Tensor], chunk: int,
                  scales: Sequence[float] | None = None) -> torch.Tensor:
    """``[sum |ref - target| for ref in references]`` as a float64 tensor on target's device,
    followed, when ``scales`` is given, by ``[sum |ref - c * target| for ref, c in zip(references,
    scales)]``.

    ``target`` is walked once, chunk by chunk, and compared with every reference while the
    chunk is in cache. Half-precision inputs are widened to float32 before subtracting. Each
    chunk's sum is taken in the chunk's precision (torch's pairwise summation: a relative error
    of the order of 1e-7, the size of the rounding of the differences themselves), a third
    faster than widening each chunk to float64; the chunks' sums are added in float64.
    """
    dtype = _compute_dtype(target, *references)
    flat_target = target.reshape(-1)
    flat_refs = [ref.reshape(-1) for ref in references]
    count = len(flat_refs)
    sums = torch.zeros(count * (1 if scales is None else 2), dtype=torch.float64, device=target.device)
    buffer = torch.empty(min(chunk, flat_target.numel()), dtype=dtype, device=target.device)
    for start in range(0, flat_target.numel(), chunk):
        piece = flat_target[start : start + chunk].to(dtype)
        diff = buffer[: piece.numel()]
        for i, ref in enumerate(flat_refs):
            ref_piece = ref[start : start + chunk].to(dtype)
            torch.sub(ref_piece, piece, out=diff)
            sums[i] += diff.abs_().sum()
            if scales is not None:
                torch.sub(ref_piece, piece, alpha=scales[i], out=diff)
                sums[count + i] += diff.abs_().sum()
    return sums


# A mean square below this (an RMS below 1e-15) is summed again in float64: float32 squares of
# such numbers lose digits (subnormal below 1.2e-38) or underflow to 0.
_TINY_MEAN_SQUARE = 1e-30


def _narrow_enough(square_sum: float, count: int) -> bool:
    """Whether a sum of squares taken in float32 can be trusted: finite, and not so small
    that the squares were subnormal (an all-zero tensor is also summed again: it is rare)."""
    return math.isfinite(square_sum) and square_sum / max(count, 1) >= _TINY_MEAN_SQUARE


def sum_of_squares(tensor: torch.Tensor, chunk: int) -> float:
    """``sum(x^2)`` over the tensor: each chunk's dot product in the tensor's precision
    (float32 at least; pairwise, a relative error of the order of 1e-7), the chunks' sums
    added in float64, no full-size copy. A sum that float32 cannot hold well (a square that
    overflows, |x| above about 1.8e19, or a mean square below _TINY_MEAN_SQUARE, where the
    squares lose digits or underflow) sends the tensor to float64."""
    dtype = _compute_dtype(tensor)
    flat = tensor.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=tensor.device)
    for start in range(0, flat.numel(), chunk):
        piece = flat[start : start + chunk].to(dtype)
        total += torch.dot(piece, piece)
    value = total.item()
    if dtype != torch.float64 and not _narrow_enough(value, flat.numel()) and torch.isfinite(tensor).all():
        return sum_of_squares(tensor.double(), chunk)
    return value


class _Pair(NamedTuple):
    """One tensor of theta_r and theta_A, measured once per meter."""

    d_init: float  # mean |a - r|
    cos_init: float  # <r, a> / (|r| |a|); NaN when either is 0
    abs_r: float  # mean |r|
    abs_a: float  # mean |a|
    rms_r: float  # sqrt(mean r^2)
    rms_a: float  # sqrt(mean a^2)


def _pair_stats(r: torch.Tensor, a: torch.Tensor, chunk: int) -> _Pair:
    """Everything :class:`_Pair` holds, in one chunked pass over both tensors. These are
    diagnostics and the scale-free T's scales, not T itself, so each chunk's sums (|a - r|,
    the three dot products, |a| and |r|) are taken in the inputs' precision (float32 at
    least; pairwise, a relative error of the order of 1e-7) and only the chunks' sums are
    added in float64: about 40 % faster than widening every chunk. A float32 sum that
    overflows sends both tensors to float64."""
    dtype = _compute_dtype(r, a)
    flat_r, flat_a = r.reshape(-1), a.reshape(-1)
    sums = torch.zeros(6, dtype=torch.float64, device=a.device)
    # |a - r|, <a, r>, |a|^2, |r|^2, |a|, |r|
    buffer = torch.empty(min(chunk, flat_a.numel()), dtype=dtype, device=a.device)
    for start in range(0, flat_a.numel(), chunk):
        piece_r, piece_a = flat_r[start : start + chunk].to(dtype), flat_a[start : start + chunk].to(dtype)
        work = buffer[: piece_a.numel()]
        sums[0] += torch.sub(piece_a, piece_r, out=work).abs_().sum()  # 3x faster than torch.dist(p=1)
        sums[1] += torch.dot(piece_a, piece_r)
        sums[2] += torch.dot(piece_a, piece_a)
        sums[3] += torch.dot(piece_r, piece_r)
        sums[4] += torch.abs(piece_a, out=work).sum()
        sums[5] += torch.abs(piece_r, out=work).sum()
    moved, dot, square_a, square_r, abs_a, abs_r = sums.tolist()
    n = max(a.numel(), 1)
    if dtype != torch.float64 and not (all(map(math.isfinite, (moved, dot, abs_a, abs_r)))
                                       and _narrow_enough(square_a, n) and _narrow_enough(square_r, n)) \
            and torch.isfinite(r).all() and torch.isfinite(a).all():
        return _pair_stats(r.double(), a.double(), chunk)
    norms = math.sqrt(square_a) * math.sqrt(square_r)
    return _Pair(moved / n, dot / norms if norms > 0 else math.nan, abs_r / n, abs_a / n,
                 math.sqrt(square_r / n), math.sqrt(square_a / n))


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator; inf for x / 0 with x > 0, NaN for 0 / 0."""
    if denominator == 0.0:
        return math.inf if numerator > 0 else math.nan
    return numerator / denominator


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


class _Distances(NamedTuple):
    """One tensor of theta_FB against theta_r and theta_A."""

    d_random: float
    d_pretrained: float
    # the same on RMS-normalised tensors; None when an RMS is 0 (the tensor is left out)
    d_random_scale_free: float | None
    d_pretrained_scale_free: float | None


class TransferabilityMeter:
    """Measures T for many fine-tuned checkpoints against one (theta_r, theta_A) pair.

    theta_r and theta_A are validated and (on a GPU) moved to the device once; their own
    statistics (d_init, cos_init, mean|x|, RMS) are measured once, by the first call or by
    :attr:`init`. Each call then costs two passes over the fine-tuned weights: one for
    their RMS, one for the distances.
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
        self._pairs: dict[str, _Pair] = {}  # key -> theta_r's and theta_A's own statistics

    def _pair(self, key: str) -> _Pair:
        if key not in self._pairs:
            self._pairs[key] = _pair_stats(self.theta_r[key], self.theta_a[key], self.chunk)
        return self._pairs[key]

    @property
    def init(self) -> dict[str, tuple[float, float]]:
        """Point name -> (d_init, cos_init): D(theta_r, theta_A) and the cosine similarity of
        theta_r and theta_A, each the mean over the point's tensors."""
        return {group.name: (_mean([self._pair(k).d_init for k in group.keys]),
                             _mean([self._pair(k).cos_init for k in group.keys]))
                for group in self.groups if not group.is_head}

    def _distances(self, key: str, target: torch.Tensor) -> _Distances:
        pair = self._pair(key)
        refs = (self.theta_r[key], self.theta_a[key])
        n = max(target.numel(), 1)
        rms_t = math.sqrt(sum_of_squares(target, self.chunk) / n)
        # r/rms_r - t/rms_t = (r - (rms_r / rms_t) t) / rms_r, so one scaled subtraction per reference
        usable = all(math.isfinite(x) and x > 0 for x in (pair.rms_r, pair.rms_a, rms_t))
        scales = (pair.rms_r / rms_t, pair.rms_a / rms_t) if usable else None
        # a factor that float32 cannot hold (the RMS differ by more than its range): float64 at once
        limits = torch.finfo(_compute_dtype(target, *refs))
        narrow = scales is None or all(limits.tiny <= c <= limits.max for c in scales)
        sums = abs_diff_sums(target, refs, self.chunk, scales) if narrow else None
        if sums is None or not torch.isfinite(sums).all():
            for role, tensor in zip(ROLES, (*refs, target)):
                if not torch.isfinite(tensor).all():
                    raise NonFiniteTensorError(key, role)
            # All inputs finite, so a float32 difference overflowed: redo this tensor in float64.
            sums = abs_diff_sums(target.double(), [ref.double() for ref in refs], self.chunk, scales)
        values = sums.tolist()
        if scales is None:
            return _Distances(values[0] / n, values[1] / n, None, None)
        return _Distances(values[0] / n, values[1] / n, values[2] / n / pair.rms_r, values[3] / n / pair.rms_a)

    def _layer(self, group: LayerGroup, distance: Mapping[str, _Distances]) -> LayerResult:
        d_r = _mean([distance[k].d_random for k in group.keys])
        d_a = _mean([distance[k].d_pretrained for k in group.keys])
        pairs = [self._pair(k) for k in group.keys]
        abs_r, abs_a = _mean([p.abs_r for p in pairs]), _mean([p.abs_a for p in pairs])
        kept = [distance[k] for k in group.keys if distance[k].d_random_scale_free is not None]
        if kept:
            sf_r = _mean([d.d_random_scale_free for d in kept])
            sf_a = _mean([d.d_pretrained_scale_free for d in kept])
            t_sf = math.inf if sf_a == 0.0 else sf_r / sf_a
        else:
            sf_r = sf_a = None
            t_sf = math.nan
        frozen = d_a == 0.0
        return LayerResult(
            group.name, d_r, d_a, math.inf if frozen else d_r / d_a, FROZEN if frozen else LAYER,
            d_init=_mean([p.d_init for p in pairs]), cos_init=_mean([p.cos_init for p in pairs]),
            shrink=_ratio(abs_r, abs_a), ft_move=_ratio(d_a, abs_a),
            transferability_scale_free=t_sf, d_random_scale_free=sf_r, d_pretrained_scale_free=sf_a,
        )

    def __call__(self, theta_b: Mapping[str, torch.Tensor]) -> Transferability:
        distance = {}
        for key in self.keys:
            if key not in theta_b:
                raise KeyError(f"tensor {key} is missing from theta_finetuned")
            distance[key] = self._distances(key, theta_b[key].to(self.device, non_blocking=True))

        layers = []
        for group in self.groups:
            if group.is_head:
                layers.append(LayerResult(group.name, None, None, 1.0, HEAD, transferability_scale_free=1.0))
            else:
                layers.append(self._layer(group, distance))
        frozen = [layer.name for layer in layers if layer.status == FROZEN]
        if frozen:
            warnings.warn(
                f"{len(frozen)} layer(s) did not change during fine-tuning (D(theta_A, theta_FB) = 0): "
                f"{', '.join(frozen)}; their transferability is inf and they are left out of the mean",
                FrozenLayerWarning,
                stacklevel=2,
            )
        is_head = [layer.status == HEAD for layer in layers]
        return Transferability(
            tuple(layers),
            overall_transferability([layer.transferability for layer in layers], is_head),
            overall_transferability([layer.transferability_scale_free for layer in layers], is_head),
        )


def layerwise_transferability(
    groups: Sequence[LayerGroup],
    theta_r: Mapping[str, torch.Tensor],
    theta_a: Mapping[str, torch.Tensor],
    theta_b: Mapping[str, torch.Tensor],
    device: str | torch.device = "cpu",
) -> Transferability:
    """T per point and overall for one trio; see :class:`TransferabilityMeter` for many."""
    return TransferabilityMeter(groups, theta_r, theta_a, device)(theta_b)


# ------------------------------------------------------------ several draws of theta_r


@dataclass(frozen=True)
class DrawSummary:
    """T of one theta_FB measured against K draws of theta_r (``-r random:SEED --random_draws K``).

    ``mean`` holds, per point, the mean over the draws of every number (T, the scale-free T,
    the distances and diagnostics), and as ``overall`` the mean of the draws' overall values;
    ``sd`` and ``overall_sd`` are the sample standard deviations of T over the draws (NaN for
    one draw, or where a draw's T is not finite).
    """

    mean: Transferability
    sd: tuple[float, ...]
    overall_sd: float
    draws: int


def _mean_of(values: Sequence[float | None]) -> float | None:
    if any(v is None for v in values):
        return None
    if all(math.isfinite(v) for v in values):
        return math.fsum(values) / len(values)
    return sum(values) / len(values)  # inf stays inf, NaN stays NaN


def _sd_of(values: Sequence[float]) -> float:
    if len(values) < 2 or not all(math.isfinite(v) for v in values):
        return math.nan
    return statistics.stdev(values)


def mean_over_draws(results: Sequence[Transferability]) -> DrawSummary:
    """Combine the results of one theta_FB against several theta_r (same points, same theta_A)."""
    if not results:
        raise ValueError("no results to combine")
    layers = []
    for draws in zip(*(result.layers for result in results)):
        first = draws[0]
        numbers = {field: _mean_of([getattr(layer, field) for layer in draws])
                   for field in ("d_random", "d_pretrained", "transferability", "d_init", "cos_init", "shrink",
                                 "ft_move", "transferability_scale_free", "d_random_scale_free",
                                 "d_pretrained_scale_free")}
        layers.append(replace(first, **numbers))
    mean = Transferability(tuple(layers), _mean_of([r.overall for r in results]),
                           _mean_of([r.overall_scale_free for r in results]))
    sd = tuple(_sd_of(values) for values in zip(*(result.values for result in results)))
    return DrawSummary(mean, sd, _sd_of([r.overall for r in results]), len(results))
