"""Shape statistics of layer-wise curves and the verdict rule of finding 2 (metrics/curve_shape.py)."""
from __future__ import annotations

import math

import pytest

from metrics.curve_shape import RULES, curve_shape, finding2, finding2_variants, read_paper_curves

# The seed's printed CIFAR-10 curve (ResNet-50, 17 blocks and the head).
SEED_CIFAR10 = [3.44, 7.76, 8.59, 7.3, 5.42, 9.2, 6.1, 5.52, 4.23, 7.65, 8.3, 8.32, 8.86, 8.88, 5.96, 13.0, 13.81, 1.0]


def test_statistics_of_hand_built_curves():
    falling = curve_shape([9, 8, 7, 6, 5, 1.0])
    assert falling.points == 5 and falling.spearman == pytest.approx(-1.0)
    assert falling.argmax == 1 and falling.first_rank == 1 and falling.increasing_steps == 0.0
    assert falling.decreasing
    rising = curve_shape([1, 2, 3, 4, 1.0])
    assert rising.spearman == pytest.approx(1.0) and rising.argmax == 4 and rising.first_rank == 4
    assert rising.increasing_steps == 1.0 and not rising.decreasing
    # the paper's typical shape: low stem, early peak, long decline
    peaked = curve_shape([4, 12, 11, 10, 9, 8, 7, 6, 5, 3, 2, 1.0])
    assert peaked.spearman < -0.5 and peaked.argmax == 2 and peaked.first_rank == 9
    assert not peaked.decreasing  # the first layer is not among the most transferable
    # falling, but the first layer second best: still decreasing
    assert curve_shape([8, 9, 7, 6, 5, 4, 1.0]).decreasing


def test_head_and_frozen_points_are_left_out():
    assert curve_shape([3, 2, 1, 50.0]).points == 3  # the last point is the head
    assert curve_shape([3, 2, 1], has_head=False).spearman == pytest.approx(-1.0)
    shape = curve_shape([5, math.inf, 4, 3, 1.0])
    assert shape.points == 3 and shape.decreasing
    with pytest.raises(ValueError, match="at least 3"):
        curve_shape([1, 2, 1.0])
    flat = curve_shape([2, 2, 2, 2, 1.0])
    assert flat.spearman == 0.0 and flat.spearman_p == 1.0 and not flat.decreasing


def test_seed_cifar10_curve_is_not_decreasing():
    shape = curve_shape(SEED_CIFAR10)
    assert shape.points == 17 and shape.argmax == 17 and shape.first_rank == 17
    assert shape.spearman > 0 and not shape.decreasing


def test_finding2_counts_and_binomial_p():
    shapes = [curve_shape([9, 8, 7, 6, 1.0])] * 2 + [curve_shape([1, 2, 3, 4, 1.0])] * 8
    verdict = finding2(shapes)
    assert (verdict.curves, verdict.decreasing, verdict.share) == (10, 2, 0.2)
    assert verdict.p_value == pytest.approx(56 / 1024)  # P(X <= 2), X ~ Binomial(10, 1/2)
    # fewer than half, but p = 0.055: a share alone is not a finding
    assert not verdict.supported and not verdict.contradicted and verdict.verdict == "undetermined"
    one = finding2([curve_shape([9, 8, 7, 6, 1.0])] + [curve_shape([1, 2, 3, 4, 1.0])] * 9)
    assert one.p_value == pytest.approx(11 / 1024) and one.verdict == "supported"
    nine = finding2([curve_shape([9, 8, 7, 6, 1.0])] * 9 + [curve_shape([1, 2, 3, 4, 1.0])])
    assert nine.p_value_more == pytest.approx(11 / 1024) and nine.verdict == "contradicted"
    assert nine.as_dict()["verdict"] == "contradicted"
    half = finding2([curve_shape([9, 8, 7, 6, 1.0])] * 3 + [curve_shape([1, 2, 3, 4, 1.0])] * 3)
    assert half.verdict == "undetermined"
    # three curves can never decide: 0 of 3 has p = 1/8
    assert finding2([curve_shape([1, 2, 3, 4, 1.0])] * 3).verdict == "undetermined"
    with pytest.raises(ValueError):
        finding2([])


def test_the_papers_own_curves_pass_the_rule():
    """The verdict rule must not call the paper's own ResNet-50 curves decreasing: finding 2
    has to hold on the data it was drawn from."""
    curves = read_paper_curves()
    assert len(curves) == 12 and all(len(values) == 18 for values in curves.values())
    assert curves["CIFAR-10"] == SEED_CIFAR10
    shapes = {name: curve_shape(values) for name, values in curves.items()}
    assert not any(shape.decreasing for shape in shapes.values())
    assert finding2(shapes.values()).supported
    # ... although several of them fall with depth after an early peak (the old rule's trap)
    assert sum(shape.spearman <= -0.5 for shape in shapes.values()) >= 5


# ------------------------------------------------------ shape statistics and the rule's variants


def test_peak_fraction_and_thirds_ratio_of_hand_made_curves():
    peaked = curve_shape([4, 12, 11, 10, 9, 8, 7, 6, 5, 3, 2, 1.0])  # 11 points, thirds of 3
    assert peaked.peak_fraction == pytest.approx(2 / 11)
    assert peaked.thirds_ratio == pytest.approx(((4 + 12 + 11) / 3) / ((5 + 3 + 2) / 3))  # 2.7
    rising = curve_shape([1, 2, 3, 4, 5, 6, 50.0])  # 6 points, thirds of 2; the head (50) left out
    assert rising.peak_fraction == 1.0 and rising.thirds_ratio == pytest.approx(1.5 / 5.5)
    # 5 points: a third is 5 // 3 = 1 point
    short = curve_shape([2, 8, 3, 4, 6], has_head=False)
    assert short.peak_fraction == pytest.approx(2 / 5) and short.thirds_ratio == pytest.approx(2 / 6)
    # 3 points: a third is still 1 point; a tie for the largest T counts the first of them
    tiny = curve_shape([5, 5, 2], has_head=False)
    assert tiny.peak_fraction == pytest.approx(1 / 3) and tiny.thirds_ratio == pytest.approx(2.5)
    # frozen layers are not points
    frozen = curve_shape([6, math.inf, 4, 3, 1.0])
    assert frozen.points == 3 and frozen.peak_fraction == pytest.approx(1 / 3)
    assert frozen.thirds_ratio == pytest.approx(2.0)
    assert set(frozen.as_dict()) >= {"peak_fraction", "thirds_ratio", "decreasing_without_first",
                                     "decreasing_spearman"}


def test_a_curve_decreasing_only_because_of_its_first_point():
    values = [10, 2, 3, 1, 2.5, 1.5, 1.0]  # a high stem, then flat
    shape = curve_shape(values)
    assert shape.spearman <= -0.5 and shape.first_rank == 1
    assert shape.is_decreasing("rule") and shape.decreasing
    assert shape.is_decreasing("without_first") is False and shape.decreasing_without_first is False
    assert shape.is_decreasing("spearman")
    # dropping the first point is the same as judging the rest of the curve by the rule
    rest = curve_shape(values[1:])
    assert rest.spearman > -0.5 and rest.first_rank == 3 and not rest.decreasing
    # a curve that falls from its second point on stays decreasing without its first
    assert curve_shape([3, 9, 8, 7, 6, 5, 1.0]).is_decreasing("without_first")


def test_a_curve_decreasing_by_spearman_alone_but_not_by_the_rule():
    shape = curve_shape([4, 12, 11, 10, 9, 8, 7, 6, 5, 3, 2, 1.0])  # low stem, early peak, decline
    assert shape.spearman <= -0.5 and shape.first_rank == 9
    assert shape.is_decreasing("spearman") and shape.decreasing_spearman
    assert not shape.is_decreasing("rule")
    assert shape.is_decreasing("without_first")  # without the stem it does fall from its start
    assert not curve_shape([1, 2, 3, 4, 1.0]).is_decreasing("spearman")
    with pytest.raises(ValueError, match="rule must be one of"):
        shape.is_decreasing("mean")


def test_finding2_under_each_rule_and_its_shape_statistics():
    stem_only = curve_shape([10, 2, 3, 1, 2.5, 1.5, 1.0])  # rule, spearman
    late_fall = curve_shape([4, 12, 11, 10, 9, 8, 7, 6, 5, 3, 2, 1.0])  # spearman, without_first
    rising = curve_shape([1, 2, 3, 4, 5, 6, 1.0])  # none
    shapes = [stem_only, late_fall, rising, rising]
    variants = finding2_variants(shapes)
    assert list(variants) == list(RULES) == ["rule", "without_first", "spearman"]
    assert [variants[rule].decreasing for rule in RULES] == [1, 1, 2]
    assert [variants[rule].rule for rule in RULES] == list(RULES)
    assert variants["spearman"].p_value == pytest.approx(11 / 16) and variants["spearman"].verdict == "undetermined"
    assert variants["rule"].p_value == pytest.approx(5 / 16) and variants["rule"].verdict == "undetermined"
    assert variants["rule"] == finding2(shapes)  # the default is the rule
    assert finding2(shapes, rule="spearman") == variants["spearman"]
    verdict = variants["rule"]
    peaks = [stem_only.peak_fraction, late_fall.peak_fraction, 1.0, 1.0]
    assert peaks == pytest.approx([1 / 6, 2 / 11, 1.0, 1.0])
    assert verdict.median_peak_fraction == pytest.approx((2 / 11 + 1.0) / 2)
    assert (verdict.min_peak_fraction, verdict.max_peak_fraction) == pytest.approx((1 / 6, 1.0))
    thirds = sorted(s.thirds_ratio for s in shapes)  # rising 1.5 / 5.5 twice, late_fall 9 / (10/3), stem_only 6 / 2
    assert thirds == pytest.approx([3 / 11, 3 / 11, 2.7, 3.0])
    assert verdict.median_thirds_ratio == pytest.approx((3 / 11 + 2.7) / 2)
    assert (verdict.min_thirds_ratio, verdict.max_thirds_ratio) == pytest.approx((3 / 11, 3.0))
    assert "median 0.59 of depth (0.17-1.00)" in verdict.shape_summary()
    assert "rule variant spearman" in variants["spearman"].summary()
    assert "rule variant" not in verdict.summary()
    with pytest.raises(ValueError, match="rule must be one of"):
        finding2(shapes, rule="mean")
    # without its first point a 3-point curve has no trend to judge
    three = curve_shape([3, 2, 1], has_head=False)
    assert three.is_decreasing("without_first") is None
    with pytest.raises(ValueError, match="at least 4 points"):
        finding2([three], rule="without_first")
    assert finding2([three]).decreasing == 1


def test_the_papers_curves_under_each_rule():
    """Measured on data/paper_curves.csv: 0 of 12 curves decreasing by the rule, 0 of 12
    without the first point, 7 of 12 by the Spearman correlation alone (Caltech-101, CUB-200,
    Aircraft, DTD and the three DomainNet sets); T peaks at point 6 of 17 in nine curves
    (CUB-200: 3; CIFAR-10 and POCUS: 17), and the mean of the first third over that of the last
    third ranges from 0.60 (POCUS) to 2.15 (DomainNet-p), median 1.31."""
    shapes = {name: curve_shape(values) for name, values in read_paper_curves().items()}
    variants = finding2_variants(shapes.values())
    assert {rule: f.decreasing for rule, f in variants.items()} == {"rule": 0, "without_first": 0, "spearman": 7}
    assert variants["rule"].supported and variants["without_first"].supported
    assert variants["spearman"].verdict == "undetermined"
    assert variants["spearman"].p_value == pytest.approx(3302 / 4096)  # P(X <= 7), X ~ Binomial(12, 1/2)
    assert sorted(n for n, s in shapes.items() if s.decreasing_spearman) == sorted(
        ["Caltech-101", "CUB-200", "Aircraft", "DTD", "DomainNet-r", "DomainNet-p", "DomainNet-c"])
    assert sorted(s.argmax for s in shapes.values()) == [3] + [6] * 9 + [17] * 2
    verdict = variants["rule"]
    assert verdict.median_peak_fraction == pytest.approx(6 / 17)
    assert (verdict.min_peak_fraction, verdict.max_peak_fraction) == pytest.approx((3 / 17, 1.0))
    assert round(verdict.min_thirds_ratio, 4) == 0.5993 and shapes["POCUS"].thirds_ratio == verdict.min_thirds_ratio
    assert round(verdict.max_thirds_ratio, 4) == 2.1457 and shapes["DomainNet-p"].thirds_ratio == verdict.max_thirds_ratio
    assert round(verdict.median_thirds_ratio, 4) == 1.3118
    assert sum(s.thirds_ratio > 1 for s in shapes.values()) == 9  # below 1: CIFAR-10, CIFAR-100, POCUS
    # the statistics of the whole curves do not depend on the rule
    assert all(f.median_thirds_ratio == verdict.median_thirds_ratio for f in variants.values())


def test_the_paper_networks_curves_under_each_rule():
    """DenseNet-121's and ViT-small's published curves (three each, digitised): none decreasing
    by the rule; ViT-small's CIFAR-100 and Land Use fall after a peak at block 3 (Spearman alone
    calls them decreasing) while block 1 ranks 7th; three curves can never decide."""
    from study.analysis import paper_networks

    networks = paper_networks()
    assert list(networks) == ["ResNet-50", "DenseNet-121", "ViT-small"]
    counts = {net: {rule: v.decreasing for rule, v in r["variants"].items()} for net, r in networks.items()}
    assert counts == {"ResNet-50": {"rule": 0, "without_first": 0, "spearman": 7},
                      "DenseNet-121": {"rule": 0, "without_first": 0, "spearman": 0},
                      "ViT-small": {"rule": 0, "without_first": 1, "spearman": 2}}
    for net in ("DenseNet-121", "ViT-small"):
        assert {v.verdict for v in networks[net]["variants"].values()} == {"undetermined"}
    vit = networks["ViT-small"]["shapes"]
    assert vit["CIFAR-100"].points == 12 and vit["CIFAR-100"].argmax == 3 and vit["CIFAR-100"].first_rank == 7
    assert vit["Land-Use"].decreasing_without_first and not vit["CIFAR-100"].decreasing_without_first
    dense = networks["DenseNet-121"]["shapes"]
    assert [s.points for s in dense.values()] == [62] * 3 and {s.argmax for s in dense.values()} == {9}
