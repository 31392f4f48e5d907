"""Shape statistics of layer-wise curves and the verdict rule of finding 2 (metrics/curve_shape.py)."""
from __future__ import annotations

import math

import pytest

from metrics.curve_shape import curve_shape, finding2, read_paper_curves

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
    assert verdict.supported
    assert not finding2([curve_shape([9, 8, 7, 6, 1.0])] * 3 + [curve_shape([1, 2, 3, 4, 1.0])] * 3).supported
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
