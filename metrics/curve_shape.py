"""The shape of a layer-wise transferability curve, and the verdict on the paper's finding 2.

The consensus the paper questions says that transferability *decreases with depth*: the
lowest layers learn the most general features, so they should be the most transferable,
and T should fall from there. The paper's finding 2 is that most layer-wise curves are
*not* like that. A curve therefore counts as **decreasing** here when both hold:

* its trend with depth is clearly negative: Spearman's rank correlation of T with the
  point's position is at most ``-0.5``; and
* its first point is among its most transferable: rank 1 or 2 of the non-head points
  (rank 1 = the largest T).

A curve whose first layer ranks low (the paper's typical shape: low at the stem, a peak in
the early or middle blocks, a decline after) is not decreasing even when its second half
falls. **Finding 2 is supported** when fewer than half of the curves are decreasing; the
p value is the one-sided binomial probability of seeing at most that many decreasing curves
if each were decreasing with probability 1/2 (curves that share a pre-training run are not
independent, so it is a descriptive number, not a test of independent trials).

Every statistic ignores the head (the last point, 1.0 by definition) and non-finite values
(frozen layers).
"""
from __future__ import annotations

import csv
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

SPEARMAN_DECREASING = -0.5  # a trend at most this negative counts as falling with depth
FIRST_RANK_DECREASING = 2  # ... and the first point must rank this high or higher (1 = largest T)

PAPER_CURVES = Path(__file__).resolve().parent.parent / "data" / "paper_curves.csv"


@dataclass(frozen=True)
class CurveShape:
    points: int  # finite non-head points
    spearman: float  # rank correlation of T with depth
    spearman_p: float  # its two-sided p value
    argmax: int  # 1-based position of the largest T among the points
    first_rank: int  # rank of the first point (1 = the most transferable)
    increasing_steps: float  # share of consecutive steps where T goes up
    decreasing: bool  # the verdict rule of the module docstring

    def as_dict(self) -> dict:
        return asdict(self)


def _body(values: Sequence[float], has_head: bool) -> list[float]:
    body = list(values[:-1] if has_head else values)
    return [v for v in body if v is not None and math.isfinite(v)]


def curve_shape(values: Sequence[float], has_head: bool = True) -> CurveShape:
    """Shape statistics of one curve (``values`` in forward order; the last one is the head
    unless ``has_head`` is False). Needs at least 3 finite non-head points."""
    from scipy.stats import spearmanr

    points = _body(values, has_head)
    if len(points) < 3:
        raise ValueError(f"a curve needs at least 3 finite non-head points, got {len(points)}")
    if max(points) == min(points):  # a constant curve has no trend
        rho, p = 0.0, 1.0
    else:
        result = spearmanr(range(len(points)), points)
        rho, p = float(result.statistic), float(result.pvalue)
    argmax = max(range(len(points)), key=lambda i: (points[i], -i)) + 1
    first_rank = 1 + sum(v > points[0] for v in points[1:])
    rising = sum(b > a for a, b in zip(points, points[1:])) / (len(points) - 1)
    decreasing = rho <= SPEARMAN_DECREASING and first_rank <= FIRST_RANK_DECREASING
    return CurveShape(len(points), rho, p, argmax, first_rank, rising, decreasing)


@dataclass(frozen=True)
class Finding2:
    curves: int
    decreasing: int
    share: float
    p_value: float  # P(at most `decreasing` of `curves` | each decreasing with probability 1/2)
    median_spearman: float
    median_first_rank: float
    supported: bool

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"{self.decreasing} of {self.curves} curves decreasing ({self.share:.0%}; binomial p = "
                f"{self.p_value:.2g}), median Spearman {self.median_spearman:+.2f}, median rank of the "
                f"first layer {self.median_first_rank:g}")


def finding2(shapes: Iterable[CurveShape]) -> Finding2:
    """The verdict on "most layer-wise transferabilities are not decreasing" over ``shapes``."""
    from scipy.stats import binomtest

    shapes = list(shapes)
    if not shapes:
        raise ValueError("no curve to judge")
    decreasing = sum(s.decreasing for s in shapes)
    p = float(binomtest(decreasing, len(shapes), 0.5, alternative="less").pvalue)
    return Finding2(len(shapes), decreasing, decreasing / len(shapes), p,
                    statistics.median(s.spearman for s in shapes), statistics.median(s.first_rank for s in shapes),
                    decreasing < len(shapes) / 2)


def read_paper_curves(path: str | Path = PAPER_CURVES) -> dict[str, list[float]]:
    """The paper's ResNet-50 layer-wise curves, ``{dataset: [T of point 1..18]}`` (the last is
    the head), from ``data/paper_curves.csv`` (see data/paper_curves.md for their origin)."""
    curves: dict[str, dict[int, float]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            curves.setdefault(row["dataset"], {})[int(row["point"])] = float(row["transferability"])
    return {name: [points[i] for i in sorted(points)] for name, points in curves.items()}


def shape_table(curves: Mapping[str, Sequence[float]]) -> list[tuple[str, CurveShape]]:
    return [(name, curve_shape(values)) for name, values in curves.items()]
