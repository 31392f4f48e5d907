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
falls. **Finding 2 is supported** when fewer than half of the curves are decreasing and the
one-sided binomial probability of seeing at most that many decreasing curves, if each were
decreasing with probability 1/2, is below 0.05; **contradicted** when more than half are and
the probability of at least that many is below 0.05; **undetermined** otherwise (three curves
can never decide: 0 of 3 has p = 0.125). Curves that share a pre-training run are not
independent, so p describes the count more than it tests independent trials.

Two variants of that rule show how much the verdict rests on its details (``RULES``):

* ``without_first``: the same rule applied to the curve with its first point dropped (the stem
  is often the least transferable layer; this asks whether the rest falls from its start);
* ``spearman``: the trend condition alone (Spearman at most ``-0.5``), this project's earlier
  rule, which calls a curve with a low stem and an early peak decreasing when it falls after
  the peak.

Beside the verdict, two statistics describe where a curve's mass lies: ``peak_fraction``, the
position of the largest T as a fraction of depth (``argmax / points``; 1.0 = the last layer),
and ``thirds_ratio``, the mean T of the first third of the points over that of the last third
(a third is ``max(1, points // 3)`` points; above 1: the early layers are the more
transferable).

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
SIGNIFICANCE = 0.05  # a verdict other than "undetermined" needs a one-sided binomial p below this
# The verdict rule and its variants (see the module docstring), in report order.
RULES = ("rule", "without_first", "spearman")
RULE_DESCRIPTIONS = {
    "rule": f"Spearman <= {SPEARMAN_DECREASING} and the first point ranks 1 or 2",
    "without_first": "the same rule on the curve without its first point",
    "spearman": f"Spearman <= {SPEARMAN_DECREASING} alone",
}

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
    peak_fraction: float = math.nan  # argmax / points: where the largest T lies, as a fraction of depth
    thirds_ratio: float = math.nan  # mean T of the first third of the points / mean T of the last third
    decreasing_without_first: bool | None = None  # the rule without the first point (None: under 3 points left)
    decreasing_spearman: bool = False  # Spearman <= -0.5 alone

    def as_dict(self) -> dict:
        return asdict(self)

    def is_decreasing(self, rule: str = "rule") -> bool | None:
        """Whether the curve is decreasing under ``rule`` (one of :data:`RULES`); ``None`` for
        ``without_first`` on a curve of 3 points (2 left: no trend to judge)."""
        if rule == "rule":
            return self.decreasing
        if rule == "without_first":
            return self.decreasing_without_first
        if rule == "spearman":
            return self.decreasing_spearman
        raise ValueError(f"rule must be one of {', '.join(RULES)}, not {rule!r}")


def _body(values: Sequence[float], has_head: bool) -> list[float]:
    body = list(values[:-1] if has_head else values)
    return [v for v in body if v is not None and math.isfinite(v)]


def _trend(points: Sequence[float]) -> tuple[float, float]:
    """Spearman's correlation of ``points`` with their position, and its two-sided p value."""
    from scipy.stats import spearmanr

    if max(points) == min(points):  # a constant curve has no trend
        return 0.0, 1.0
    result = spearmanr(range(len(points)), points)
    return float(result.statistic), float(result.pvalue)


def _first_rank(points: Sequence[float]) -> int:
    return 1 + sum(v > points[0] for v in points[1:])


def _rule(rho: float, first_rank: int) -> bool:
    return rho <= SPEARMAN_DECREASING and first_rank <= FIRST_RANK_DECREASING


def _thirds_ratio(points: Sequence[float]) -> float:
    third = max(1, len(points) // 3)
    first, last = statistics.fmean(points[:third]), statistics.fmean(points[-third:])
    if last == 0:
        return math.nan if first == 0 else math.copysign(math.inf, first)
    return first / last


def curve_shape(values: Sequence[float], has_head: bool = True) -> CurveShape:
    """Shape statistics of one curve (``values`` in forward order; the last one is the head
    unless ``has_head`` is False). Needs at least 3 finite non-head points."""
    points = _body(values, has_head)
    if len(points) < 3:
        raise ValueError(f"a curve needs at least 3 finite non-head points, got {len(points)}")
    rho, p = _trend(points)
    argmax = max(range(len(points)), key=lambda i: (points[i], -i)) + 1
    first_rank = _first_rank(points)
    rising = sum(b > a for a, b in zip(points, points[1:])) / (len(points) - 1)
    rest = points[1:]
    without_first = _rule(_trend(rest)[0], _first_rank(rest)) if len(rest) >= 3 else None
    return CurveShape(len(points), rho, p, argmax, first_rank, rising, _rule(rho, first_rank),
                      peak_fraction=argmax / len(points), thirds_ratio=_thirds_ratio(points),
                      decreasing_without_first=without_first, decreasing_spearman=rho <= SPEARMAN_DECREASING)


@dataclass(frozen=True)
class Finding2:
    curves: int
    decreasing: int
    share: float
    p_value: float  # P(at most `decreasing` of `curves` | each decreasing with probability 1/2)
    median_spearman: float
    median_first_rank: float
    supported: bool  # fewer than half decreasing, p_value < SIGNIFICANCE
    # The rule the curves were judged by (one of RULES) and, whatever the rule, the shape
    # statistics of the whole curves: where the peak lies and how the first third compares
    # with the last.
    rule: str = "rule"
    median_peak_fraction: float = math.nan
    min_peak_fraction: float = math.nan
    max_peak_fraction: float = math.nan
    median_thirds_ratio: float = math.nan
    min_thirds_ratio: float = math.nan
    max_thirds_ratio: float = math.nan
    # P(at least `decreasing` of `curves` | each decreasing with probability 1/2)
    p_value_more: float = math.nan
    contradicted: bool = False  # more than half decreasing, p_value_more < SIGNIFICANCE

    def as_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict}

    @property
    def verdict(self) -> str:
        """``supported`` (fewer than half of the curves decreasing, binomial p < 0.05),
        ``contradicted`` (more than half, p < 0.05) or ``undetermined``."""
        return "supported" if self.supported else "contradicted" if self.contradicted else "undetermined"

    def summary(self) -> str:
        rule = "" if self.rule == "rule" else f"; rule variant {self.rule}: {RULE_DESCRIPTIONS[self.rule]}"
        more = self.decreasing > self.curves / 2  # the p of the side the count lies on
        p = (f"binomial p of at least as many = {self.p_value_more:.2g}" if more
             else f"binomial p = {self.p_value:.2g}")
        return (f"{self.decreasing} of {self.curves} curves decreasing ({self.share:.0%}; {p}), median Spearman {self.median_spearman:+.2f}, median rank of the "
                f"first layer {self.median_first_rank:g}{rule}")

    def shape_summary(self) -> str:
        """Where the curves peak and how their first third compares with their last."""
        return (f"peak at a median {self.median_peak_fraction:.2f} of depth ({self.min_peak_fraction:.2f}-"
                f"{self.max_peak_fraction:.2f}); mean T of the first third / last third: median "
                f"{self.median_thirds_ratio:.2f} ({self.min_thirds_ratio:.2f}-{self.max_thirds_ratio:.2f})")


def finding2(shapes: Iterable[CurveShape], rule: str = "rule") -> Finding2:
    """The verdict on "most layer-wise transferabilities are not decreasing" over ``shapes``,
    a curve counting as decreasing by ``rule`` (one of :data:`RULES`; the default is the
    verdict rule of the module docstring). ``without_first`` needs curves of at least 4 points."""
    from scipy.stats import binomtest

    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}, not {rule!r}")
    shapes = list(shapes)
    if not shapes:
        raise ValueError("no curve to judge")
    judged = [s.is_decreasing(rule) for s in shapes]
    if None in judged:
        raise ValueError(f"rule {rule!r} needs curves of at least 4 points; one has {shapes[judged.index(None)].points}")
    decreasing = sum(bool(d) for d in judged)
    p = float(binomtest(decreasing, len(shapes), 0.5, alternative="less").pvalue)
    p_more = float(binomtest(decreasing, len(shapes), 0.5, alternative="greater").pvalue)
    peaks = [s.peak_fraction for s in shapes]
    thirds = [s.thirds_ratio for s in shapes]
    return Finding2(len(shapes), decreasing, decreasing / len(shapes), p,
                    statistics.median(s.spearman for s in shapes), statistics.median(s.first_rank for s in shapes),
                    decreasing < len(shapes) / 2 and p < SIGNIFICANCE, rule=rule,
                    median_peak_fraction=statistics.median(peaks), min_peak_fraction=min(peaks),
                    max_peak_fraction=max(peaks), median_thirds_ratio=statistics.median(thirds),
                    min_thirds_ratio=min(thirds), max_thirds_ratio=max(thirds), p_value_more=p_more,
                    contradicted=decreasing > len(shapes) / 2 and p_more < SIGNIFICANCE)


def finding2_variants(shapes: Iterable[CurveShape]) -> dict[str, Finding2]:
    """:func:`finding2` under each rule of :data:`RULES`, ``{rule: Finding2}`` in that order."""
    shapes = list(shapes)
    return {rule: finding2(shapes, rule) for rule in RULES}


def read_paper_curves(path: str | Path = PAPER_CURVES, architecture: str = "ResNet-50") -> dict[str, list[float]]:
    """The paper's layer-wise curves of one network, ``{dataset: [T of point 1..n]}`` in the
    paper's order of points, from ``data/paper_curves.csv`` (see data/paper_curves.md for
    their origin): ResNet-50's twelve (18 points, the last the head), DenseNet-121's and
    ViT-small's three (63 points, the last the head; 12 blocks, no head)."""
    curves: dict[str, dict[int, float]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            if row["architecture"] == architecture:
                curves.setdefault(row["dataset"], {})[int(row["point"])] = float(row["transferability"])
    if not curves:
        raise KeyError(f"no curves of {architecture!r} in {path}")
    return {name: [points[i] for i in sorted(points)] for name, points in curves.items()}


# The paper's networks whose published curves end without a head point (ViT-small's figure
# shows its 12 blocks only; the others' curves end with the head at 1).
PAPER_CURVES_WITHOUT_HEAD = frozenset({"ViT-small"})


def paper_curves_have_head(architecture: str) -> bool:
    """Whether the paper's curves of ``architecture`` end with a head point."""
    return architecture not in PAPER_CURVES_WITHOUT_HEAD


def paper_architectures(path: str | Path = PAPER_CURVES) -> list[str]:
    """The networks whose curves ``data/paper_curves.csv`` holds, in the file's order."""
    with open(path, newline="") as handle:
        return list(dict.fromkeys(row["architecture"] for row in csv.DictReader(handle)))


def shape_table(curves: Mapping[str, Sequence[float]]) -> list[tuple[str, CurveShape]]:
    return [(name, curve_shape(values)) for name, values in curves.items()]
