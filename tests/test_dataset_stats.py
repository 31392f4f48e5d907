"""Dataset statistics (N, G, D): known answers for the formulas, G free of the sample size
(same-distribution samples near 0, known distances recovered), per dimension of the whole
feature space and blind in no direction (a mean shift or a change of spread outside the k
principal directions), D unbiased on many-class
sets, the synthetic benchmark's knobs, penultimate features against a manual forward pass,
stratified seeded subsets and the cache."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from data import build_dataset, build_transform
from metrics.dataset_stats import (
    FeatureExtractor,
    PenultimateFeatures,
    PixelFeatures,
    cached_features,
    complement_gap,
    dataset_labels,
    dataset_statistics,
    domain_gap,
    extract_features,
    frechet_distance,
    frechet_distance_infinity,
    gap_estimate,
    gaussian_fit,
    intraclass_variance,
    principal_basis,
    principal_directions,
    stratified_indices,
    subset_indices,
)
from models import ARCHITECTURES, build_model
from utils import UserError


def correlated_samples(rng: np.random.Generator, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    mixing = rng.normal(size=(d, d))
    return rng.normal(size=(n, d)) @ mixing + shift


def random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def population_gap(basis: np.ndarray, further: np.ndarray, mu_s: np.ndarray, var_s: np.ndarray,
                   mu_t: np.ndarray, var_t: np.ndarray) -> tuple[float, float, float]:
    """What G's three parts (times d) are for the Gaussians N(mu_s, diag(var_s)) and
    N(mu_t, diag(var_t)), written out from their definitions: the Fréchet distance in the
    span of ``basis``; the squared mean difference outside it; the distance of the standard
    deviations along ``further`` and of the root total variance in the rest."""
    cov = lambda var, directions: directions.T @ (var[:, None] * directions)
    subspace = frechet_distance(basis.T @ mu_s, cov(var_s, basis), basis.T @ mu_t, cov(var_t, basis))
    delta = mu_s - mu_t
    mean = float(delta @ delta - np.sum((basis.T @ delta) ** 2))
    along_s, along_t = np.diag(cov(var_s, further)), np.diag(cov(var_t, further))
    rest_s = var_s.sum() - np.trace(cov(var_s, basis)) - along_s.sum()
    rest_t = var_t.sum() - np.trace(cov(var_t, basis)) - along_t.sum()
    spread = float(np.sum((np.sqrt(along_s) - np.sqrt(along_t)) ** 2) + (np.sqrt(rest_s) - np.sqrt(rest_t)) ** 2)
    return subspace, mean, spread


# ------------------------------------------------------------------ Gaussian fit, G


def test_gaussian_fit_is_mean_and_unbiased_covariance():
    x = correlated_samples(np.random.default_rng(0), 50, 4).astype(np.float32)
    mean, cov = gaussian_fit(x)
    assert mean.dtype == cov.dtype == np.float64
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x.astype(np.float64), rowvar=False, ddof=1), rtol=1e-10)


def test_identical_gaussians_have_zero_frechet_distance():
    x = correlated_samples(np.random.default_rng(1), 400, 12, shift=3.0)
    mu, cov = gaussian_fit(x)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    mu1, mu2 = np.array([1.0, -2.0, 0.5]), np.array([0.0, 1.0, 0.5])
    a, b = np.array([4.0, 1.0, 9.0]), np.array([1.0, 1.0, 0.25])
    # ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2 = (1 + 9 + 0) + (1 + 0 + 6.25)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(17.25, rel=1e-12)


def test_frechet_distance_of_singular_covariances_is_the_closed_form():
    mu1, mu2 = np.array([0.0, 0.0]), np.array([3.0, 4.0])
    zero = np.zeros((2, 2))
    assert frechet_distance(mu1, zero, mu2, zero) == pytest.approx(25.0, rel=1e-12)  # point masses
    # Supports on orthogonal axes: nothing in common, so the traces add up.
    assert frechet_distance(mu1, np.diag([2.0, 0.0]), mu1, np.diag([0.0, 3.0])) == pytest.approx(5.0, rel=1e-12)


def test_frechet_distance_of_full_covariances_matches_scipy_sqrtm():
    rng = np.random.default_rng(3)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    cov1, cov2 = random_spd(rng, d), random_spd(rng, d)
    # The classic formula, written independently: tr sqrtm(cov1 cov2) (a non-symmetric product).
    cross = scipy.linalg.sqrtm(cov1 @ cov2)
    expected = float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(cross).real)
    assert expected > 1.0
    assert frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu2, cov2, mu1, cov1) == pytest.approx(expected, rel=1e-8)


def test_gap_of_large_samples_approaches_the_known_value():
    rng = np.random.default_rng(4)
    d, n = 4, 40_000
    mu1, mu2 = np.array([0.0, 1.0, 0.0, -1.0]), np.array([1.0, 1.0, 0.5, -1.0])
    var1, var2 = np.array([1.0, 4.0, 0.25, 1.0]), np.array([2.25, 1.0, 0.25, 0.09])
    known = (np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)) / d  # 2.74 / 4
    # Rotate both by one orthogonal matrix: the distance is invariant, the covariances full.
    rotation, _ = np.linalg.qr(rng.normal(size=(d, d)))
    x1 = (mu1 + rng.normal(size=(n, d)) * np.sqrt(var1)) @ rotation.T
    x2 = (mu2 + rng.normal(size=(n, d)) * np.sqrt(var2)) @ rotation.T
    assert domain_gap(x1, x2) == pytest.approx(known, rel=0.03)


def test_gap_is_positive_and_nearly_symmetric_for_different_sets():
    rng = np.random.default_rng(2)
    a, b = correlated_samples(rng, 3000, 10), correlated_samples(rng, 2000, 10, shift=0.5)
    forward, backward = gap_estimate(a, b), gap_estimate(b, a)
    assert forward["samples"] == backward["samples"] == 2000 and forward["dims"] == 10
    assert forward["G"] > 1.0
    assert forward["G"] == pytest.approx(backward["G"], rel=0.05)


# G's bound, per dimension and unit variance: same-distribution samples come out within it
# at every sample size from 500 to 5,000 (at d = 2048 and n = 500 on every one of 40 seeds:
# see the test over seeds), and known distances (per dimension of the 64 they lie in).
GAP_BOUND = 0.01
GAP_SIZES = (500, 1000, 2000, 5000)


@pytest.mark.parametrize("d", [64, pytest.param(2048, marks=pytest.mark.slow)])  # 2048: about a minute
def test_same_distribution_gives_a_gap_near_zero_at_every_sample_size(d: int):
    rng = np.random.default_rng(d)
    basis_features = rng.normal(size=(1000, d)) if d > 64 else None  # source samples that only fit the basis
    for n in GAP_SIZES:
        source, target = rng.normal(size=(n, d)), rng.normal(size=(n, d))
        estimate = gap_estimate(source, target, basis_features=basis_features, seed=n)
        assert estimate["dims"] == 64 and estimate["samples"] == n
        assert abs(estimate["G"]) < GAP_BOUND, (n, estimate)
        # What the extrapolation removes: the plain distance of two samples in the k = 64
        # directions is k (k + 5) / (2 n), here divided by d like G.
        assert estimate["uncorrected"] == pytest.approx(64 * 69 / (2 * n * d), rel=0.15), (n, estimate)


def test_gap_compares_as_many_samples_of_each_side():
    rng = np.random.default_rng(8)
    source, target = rng.normal(size=(3000, 32)), rng.normal(size=(700, 32))
    estimate = gap_estimate(source, target, seed=1)
    assert estimate["samples"] == 700 and abs(estimate["G"]) < GAP_BOUND
    assert gap_estimate(source, target, samples=500)["samples"] == 500
    assert gap_estimate(source, target, seed=1) == estimate  # seeded
    # Fewer than 3 samples per dimension: k = n // 3, along the directions of basis_features.
    small = gap_estimate(source[:90], target[:90], basis_features=source[1000:1500])
    assert small["dims"] == 30 and small["samples"] == 90
    with pytest.raises(ValueError, match="basis_features"):
        gap_estimate(source[:90], target[:90])


def test_gap_is_not_clipped_at_zero():
    rng = np.random.default_rng(11)
    gaps = [domain_gap(rng.normal(size=(500, 16)), rng.normal(size=(500, 16)), seed=seed) for seed in range(8)]
    assert all(abs(g) < GAP_BOUND for g in gaps), gaps
    assert min(gaps) < 0 < max(gaps), gaps


@pytest.mark.parametrize("d", [64, pytest.param(2048, marks=pytest.mark.slow)])  # 2048: about a minute
def test_known_frechet_distance_is_recovered_at_every_sample_size(d: int):
    """Source N(0, diag(var)): variance 1 in 64 coordinates, 0.01 in the others; the target
    moves the mean (8 coordinates) and the spread (16 others) inside those 64. G is the
    distance per dimension of all d, so the bound is per dimension of the 64 the distance lies
    in (GAP_BOUND * 64 / d: the same error of the distance at both d; at d = 2048, G itself is
    0.0034, which GAP_BOUND alone would not test)."""
    rng = np.random.default_rng(100 + d)
    var_s = np.full(d, 0.01)
    var_s[:64] = 1.0
    shift = np.zeros(d)
    shift[:8] = 0.6
    scale = np.ones(d)
    scale[8:24] = 1.5
    var_t = var_s * scale**2
    closed_form = (shift @ shift + np.sum((np.sqrt(var_s) - np.sqrt(var_t)) ** 2)) / d  # (2.88 + 4) / d
    basis_features = None
    known = closed_form
    if d > 64:
        basis_features = rng.normal(size=(1000, d)) * np.sqrt(var_s)
        # What G measures between the two Gaussians, exactly: close to the distance inside the
        # 64 coordinates the basis estimates, plus the little that leaks outside it.
        known = sum(population_gap(*principal_directions(basis_features, 64), np.zeros(d), var_s, shift, var_t)) / d
        assert known == pytest.approx(closed_form, rel=0.05)
    for n in GAP_SIZES:
        # The bias is what the bound is about; one pair's sampling noise (about 0.3 of the
        # distance 6.88 at n = 500) is averaged over 4 independent pairs.
        gaps = [domain_gap(rng.normal(size=(n, d)) * np.sqrt(var_s), shift + rng.normal(size=(n, d)) * np.sqrt(var_t),
                           basis_features=basis_features, seed=draw) for draw in range(4)]
        assert abs(np.mean(gaps) - known) < GAP_BOUND * 64 / d, (n, known, gaps)


def test_a_basis_fitted_on_the_compared_sample_would_inflate_the_gap():
    rng = np.random.default_rng(5)
    source, target, other = (rng.normal(size=(500, 2048)) for _ in range(3))
    assert abs(domain_gap(source, target, basis_features=other)) < GAP_BOUND
    assert domain_gap(source, target, basis_features=source) > 50 * GAP_BOUND
    with pytest.raises(ValueError, match="basis_features"):
        domain_gap(source, target)


def test_principal_basis_finds_the_leading_directions():
    rng = np.random.default_rng(9)
    d = 40
    rotation, _ = np.linalg.qr(rng.normal(size=(d, d)))
    variances = np.concatenate([np.linspace(9.0, 4.0, 5), np.full(d - 5, 0.01)])
    x = (rng.normal(size=(2000, d)) * np.sqrt(variances)) @ rotation.T  # leading directions: rotation[:, :5]
    for rows in (2000, 30):  # more rows than dimensions (scatter matrix), fewer (Gram matrix)
        basis = principal_basis(x[:rows], dims=5)
        assert basis.shape == (d, 5)
        np.testing.assert_allclose(basis.T @ basis, np.eye(5), atol=1e-10)
        overlap = np.linalg.svd(rotation[:, :5].T @ basis, compute_uv=False)  # cosines of the angles
        assert overlap.min() > 0.98, (rows, overlap)
    assert principal_basis(x[:10], dims=64).shape == (d, 9)  # 10 centred rows span 9 dimensions
    flat = principal_basis(np.repeat(x[:3], 4, axis=0), dims=6)  # rank 2: completed to an orthonormal set
    np.testing.assert_allclose(flat.T @ flat, np.eye(6), atol=1e-10)


# --------------------------------------------------- G outside the principal directions

# Source variance 1 / i along coordinate i (so principal direction i is coordinate i, the
# spectrum falls off as in real features); the basis is fitted on a third, held-out sample.
SPECTRUM_SAMPLES = 1000


def spectrum_samples(rng: np.random.Generator, d: int, n: int = SPECTRUM_SAMPLES) -> np.ndarray:
    return rng.normal(size=(n, d)) / np.sqrt(np.arange(1, d + 1))


@pytest.mark.parametrize("d", [256, 2048])
def test_a_unit_mean_shift_counts_alike_in_any_direction(d: int):
    """A unit shift of the target's mean adds about 1 / d to G (per dimension of the whole
    feature space) along the first principal direction, along coordinate 200 (outside the 64
    directions, where the subspace part alone, the G before the complement, was blind) and
    along a random direction; no shift gives about 0. (d = 256 draws the samples of
    test_a_change_of_spread_outside_the_subspace_is_seen.)"""
    rng = np.random.default_rng(0)
    basis_features, source, target = (spectrum_samples(rng, d) for _ in range(3))
    random_direction = rng.normal(size=d)
    shifts = {"none": np.zeros(d), "PC1": np.eye(d)[0], "direction 200": np.eye(d)[199],
              "random": random_direction / np.linalg.norm(random_direction)}
    gaps = {name: gap_estimate(source, target + shift, basis_features=basis_features, seed=0)
            for name, shift in shifts.items()}
    assert all(g["dims"] == 64 for g in gaps.values())
    assert abs(gaps["none"]["G"]) < 0.05 / d, gaps["none"]
    pc1 = gaps["PC1"]["G"]
    assert pc1 == pytest.approx(1 / d, rel=0.3)
    assert gaps["PC1"]["complement_mean"] == pytest.approx(0.0, abs=0.01 / d)
    for gap in gaps.values():  # the parts add up to G
        assert gap["G"] == pytest.approx(gap["subspace"] + gap["complement_mean"] + gap["complement_spread"],
                                         rel=1e-12, abs=1e-15)
    inside = np.sum((principal_basis(basis_features).T @ shifts["random"]) ** 2)  # the random shift's share in P
    for name, outside in (("direction 200", 1.0), ("random", 1.0 - inside)):
        assert pc1 / 2 < gaps[name]["G"] < 2 * pc1, (name, gaps[name], pc1)
        assert gaps[name]["complement_mean"] == pytest.approx(outside / d, abs=0.1 / d), (name, gaps[name])
    # The subspace part alone (the old definition) barely sees the shift along coordinate 200.
    assert gaps["direction 200"]["subspace"] < pc1 / 10


def test_a_change_of_spread_outside_the_subspace_is_seen():
    """d = 256: a 3x scale of coordinates 150-159, and the variances of coordinates 64-95
    swapped with those of 224-255 (the total outside the subspace unchanged, which an
    isotropic term could not see). The subspace part sees neither; the complement's spread
    does, below the exact value (held-out directions that far down mix neighbouring
    coordinates) and, for the same distribution, is near 0."""
    d = 256
    rng = np.random.default_rng(0)
    basis_features, source, target = (spectrum_samples(rng, d) for _ in range(3))
    scale = np.ones(d)
    scale[149:159] = 3.0
    swap = np.arange(d)
    swap[64:96], swap[224:256] = np.arange(224, 256), np.arange(64, 96)
    variance = 1 / np.arange(1, d + 1)
    same = gap_estimate(source, target, basis_features=basis_features, seed=0)
    assert abs(same["complement_spread"]) < 0.002 / d and abs(same["G"]) < 0.05 / d, same
    for changed, target_variance in ((target * scale, variance * scale**2), (target[:, swap], variance[swap])):
        gap = gap_estimate(source, changed, basis_features=basis_features, seed=0)
        exact = np.sum((np.sqrt(variance) - np.sqrt(target_variance)) ** 2) / d
        assert abs(gap["subspace"]) < 0.05 / d and abs(gap["complement_mean"]) < 0.002 / d, gap
        assert 0.1 * exact < gap["complement_spread"] < exact, (gap, exact)
        assert gap["G"] > 10 * abs(same["G"]), (gap, same)


def test_same_distribution_gives_a_gap_near_zero_in_2048_dimensions_over_seeds():
    """n = 500 samples of N(0, I) in 2,048 dimensions, 40 seeds: |G| < 0.01 on every one,
    no bias, and the spread the complement's unbiased mean estimate cannot avoid,
    sqrt(8 (d - k)) / (n d) = 0.00012 (two sample means in d - k dimensions), beside the
    subspace's smaller one. (Divided by k instead of d, that spread was 0.0039 and 2 of
    these 40 seeds came out above 0.01.)"""
    d, n = 2048, 500
    parts = []
    for seed in range(40):
        rng = np.random.default_rng(1000 + seed)
        basis_features, source, target = (rng.normal(size=(n, d)) for _ in range(3))
        gap = gap_estimate(source, target, basis_features=basis_features, seed=seed)
        parts.append((gap["G"], gap["subspace"], gap["complement_mean"], gap["complement_spread"]))
    gaps, subspace, mean, spread = np.array(parts).T
    assert np.all(np.abs(gaps) < GAP_BOUND), gaps
    assert abs(gaps.mean()) < 1e-4 and abs(mean.mean()) < 1e-4 and abs(spread.mean()) < 3e-5, parts
    assert mean.std() == pytest.approx(np.sqrt(8 * (d - 64)) / (n * d), rel=0.4), mean
    assert gaps.std() < 2e-4 and subspace.std() < 1.25e-4 and spread.std() < 6e-5, parts


def test_where_k_is_d_g_is_the_extrapolated_distance_alone():
    """k = d (64-d features, n >= 192): nothing outside the subspace, G is FD_inf / d =
    FD_inf / k, the value of every earlier definition, to the last bit; where k < d the
    subspace part is the extrapolated distance in the k directions divided by d (not k)."""
    rng = np.random.default_rng(12)
    a, b = correlated_samples(rng, 300, 64), correlated_samples(rng, 300, 64, shift=0.2)
    gap = gap_estimate(a, b, seed=3)
    old = frechet_distance_infinity(a, b, seed=np.random.default_rng(3))[0] / 64
    assert gap["dims"] == 64 and gap["G"] == gap["subspace"] == old
    assert gap["complement_mean"] == gap["complement_spread"] == 0.0
    wide_a, wide_b, held_out = (correlated_samples(rng, 300, 96) for _ in range(3))
    basis = principal_basis(held_out, 64)
    gap = gap_estimate(wide_a, wide_b, basis_features=held_out, seed=3)
    extrapolated = frechet_distance_infinity(wide_a @ basis, wide_b @ basis, seed=np.random.default_rng(3))[0]
    assert gap["dims"] == 64 and gap["subspace"] == extrapolated / 96
    assert gap["G"] == pytest.approx(gap["subspace"] + gap["complement_mean"] + gap["complement_spread"], rel=1e-12)


def test_complement_estimates_are_unbiased_at_small_sample_sizes():
    """d = 12: the subspace coordinates 0-2, further directions 3-7, the rest 8-11 one
    block. Averaged over 3,000 pairs of samples, the mean part and the jackknifed spread
    come back at their exact values from 12 samples on; without the corrections they would
    be far off (the plain estimates are checked too)."""
    d = 12
    eye = np.eye(d)
    basis, further = eye[:, :3], eye[:, 3:8]
    var_s = np.array([1, 1, 1, 1.0, 0.5, 2.0, 1.0, 0.3, 0.2, 0.2, 0.2, 0.2])
    var_t = np.array([1, 1, 1, 4.0, 0.5, 0.5, 1.0, 0.3, 0.5, 0.5, 0.5, 0.5])
    delta = np.zeros(d)
    delta[[0, 5, 10]] = [5.0, 0.6, 0.5]  # the shift along coordinate 0 is inside the subspace: not counted
    _, exact_mean, exact_spread = population_gap(basis, further, np.zeros(d), var_s, delta, var_t)
    assert exact_mean == pytest.approx(0.61) and exact_spread == pytest.approx(1.7702, abs=1e-4)
    rng = np.random.default_rng(7)
    for n in (12, 30):
        estimates, plain = [], []
        for _ in range(3000):
            s = rng.normal(size=(n, d)) * np.sqrt(var_s)
            t = delta + rng.normal(size=(n, d)) * np.sqrt(var_t)
            estimates.append(complement_gap(s, t, basis, further))
            sd_s, sd_t = s.std(axis=0, ddof=1), t.std(axis=0, ddof=1)
            plain.append((np.sum((s.mean(axis=0) - t.mean(axis=0))[3:] ** 2),
                          np.sum((sd_s - sd_t)[3:8] ** 2) + (np.linalg.norm(sd_s[8:]) - np.linalg.norm(sd_t[8:])) ** 2))
        mean, spread = np.mean(estimates, axis=0)
        assert mean == pytest.approx(exact_mean, abs=0.04), (n, mean)
        assert spread == pytest.approx(exact_spread, abs=0.05), (n, spread)
        plain_mean, plain_spread = np.mean(plain, axis=0)
        assert plain_mean > exact_mean + 0.15 and plain_spread > exact_spread + 0.1, (n, plain_mean, plain_spread)


def test_complement_directions_are_orthonormal_and_follow_the_basis():
    rng = np.random.default_rng(13)
    x = rng.normal(size=(30, 50)) / np.sqrt(np.arange(1, 51))
    for rows in (30, 10):  # fewer rows than dimensions: at most rows - 1 - k further directions
        basis, further = principal_directions(x[:rows], 5)
        np.testing.assert_array_equal(basis, principal_basis(x[:rows], 5))
        both = np.concatenate([basis, further], axis=1)
        assert further.shape == (50, rows - 1 - 5)
        np.testing.assert_allclose(both.T @ both, np.eye(rows - 1), atol=1e-10)
        spread = np.var(x[:rows] @ both, axis=0)
        assert np.all(np.diff(spread) <= 1e-12)  # largest variance first
    long = rng.normal(size=(200, 8))
    basis, further = principal_directions(long, 3)
    assert further.shape == (8, 5)  # more rows than dimensions: every other direction


# ------------------------------------------------------------------------------- D


def test_intraclass_variance_of_hand_built_classes():
    d, s0, s1 = 3, 2.0, 0.5
    eye = np.eye(d)
    centre0, centre1, centre2 = np.array([5.0, 0.0, 1.0]), np.array([-3.0, 2.0, 2.0]), np.array([9.0, 9.0, 9.0])
    class0 = np.concatenate([centre0 + s0 * eye, centre0 - s0 * eye])  # 6 points, each s0 from the mean
    class1 = np.stack([centre1 + s1 * eye[0], centre1 - s1 * eye[0]])  # 2 points, each s1 from the mean
    features = np.concatenate([class0, class1])
    labels = np.array([0] * 6 + [1] * 2)
    order = np.random.default_rng(5).permutation(len(labels))  # classes need not be contiguous
    # Unbiased (ddof 1) per class, then the mean over classes (not over samples).
    known = (6 * s0**2 / 5 + 2 * s1**2 / 1) / 2 / d
    assert intraclass_variance(features[order], labels[order]) == pytest.approx(known, rel=1e-12)
    # A class with one sample has no measurable spread: it is left out.
    features3 = np.concatenate([features, centre2[None]])
    labels3 = np.concatenate([labels, [7]])
    assert intraclass_variance(features3, labels3) == pytest.approx(known, rel=1e-12)
    with pytest.raises(ValueError, match="two samples"):
        intraclass_variance(features[:3], np.arange(3))


def test_intraclass_variance_of_identical_points_is_zero():
    features = np.repeat(np.array([[1.0, 2.0], [-4.0, 0.5], [3.0, 3.0]]), 5, axis=0)
    labels = np.repeat(np.arange(3), 5)
    assert intraclass_variance(features, labels) == 0.0


def test_statistics_are_per_feature_dimension():
    rng = np.random.default_rng(6)
    a, b = correlated_samples(rng, 200, 5), correlated_samples(rng, 200, 5, shift=1.0)
    labels = rng.integers(0, 4, size=200)
    padded = lambda x: np.concatenate([x, np.zeros_like(x)], axis=1)  # twice d, same distances
    assert domain_gap(padded(a), padded(b)) == pytest.approx(domain_gap(a, b) / 2, rel=1e-9)
    assert intraclass_variance(padded(a), labels) == pytest.approx(intraclass_variance(a, labels) / 2, rel=1e-12)
    centred = a - a.mean(axis=0)
    assert intraclass_variance(a, np.zeros(200)) == pytest.approx(np.sum(centred**2) / 199 / 5, rel=1e-12)


class FeatureImages(Dataset):
    """Features of 48 numbers held as 3 x 4 x 4 images, which PixelFeatures(4) reads back;
    the labels are listed in ``targets``, as the project's datasets do."""

    def __init__(self, features: np.ndarray, labels: np.ndarray) -> None:
        self.images = torch.as_tensor(features, dtype=torch.float32).reshape(-1, 3, 4, 4)
        self.targets = [int(label) for label in labels]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.images[index], self.targets[index]


@pytest.mark.parametrize("classes, smallest, largest", [(10, 100, 600), (200, 3, 60), (345, 3, 60)])
def test_true_intraclass_variance_of_one_is_recovered(classes: int, smallest: int, largest: int):
    """Unit variance in every dimension around each class mean (true D = 1), classes of
    unequal sizes; the default 2,000 images leave about 6 per class at 345 classes."""
    rng = np.random.default_rng(classes)
    sizes = rng.integers(smallest, largest + 1, size=classes)
    labels = rng.permutation(np.repeat(np.arange(classes), sizes))
    features = 3.0 * rng.normal(size=(classes, 48))[labels] + rng.normal(size=(len(labels), 48))
    target = FeatureImages(features, labels)
    source = FeatureImages(rng.normal(size=(4000, 48)), np.zeros(4000))
    stats = dataset_statistics(target, source, PixelFeatures(4), max_samples=2000, progress=False)
    assert stats["N"] == len(labels) > 2000 and stats["samples"] == 2000 and stats["D_classes"] == classes
    assert stats["D"] == pytest.approx(1.0, rel=0.02)


# ---------------------------------------------------------------- stratified subsets


def test_stratified_subset_gives_each_class_its_share_and_at_least_two():
    counts = [400, 200, 100, 40, 7, 2, 1]  # 750 samples
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(7) * 3, counts))  # any label values
    chosen = stratified_indices(labels, 75, seed=0)
    assert len(chosen) == 75 and np.all(np.diff(chosen) > 0)
    # Shares 40, 20, 10, 4, 0.7, 0.2, 0.1: the last three get their minimum (2, 2, 1); the other
    # 70 go to the first four in proportion (37.8, 18.9, 9.5, 3.8), largest remainders rounded up.
    assert [int(np.sum(labels[chosen] == 3 * c)) for c in range(7)] == [38, 19, 9, 4, 2, 2, 1]
    np.testing.assert_array_equal(stratified_indices(labels, 75, seed=0), chosen)  # seeded
    assert set(stratified_indices(labels, 75, seed=1)) != set(chosen)
    np.testing.assert_array_equal(subset_indices(750, 75, seed=0, labels=labels), chosen)
    np.testing.assert_array_equal(stratified_indices(labels, 750), np.arange(750))
    np.testing.assert_array_equal(stratified_indices(labels, None), np.arange(750))


def test_stratified_subset_keeps_two_of_every_class_when_there_are_many_classes():
    labels = np.repeat(np.arange(40), 10)
    chosen = stratified_indices(labels, 50, seed=3)
    assert len(chosen) == 80 and np.all(np.bincount(labels[chosen]) == 2)
    # Negative labels (unreadable samples) are never chosen.
    marked = labels.copy()
    marked[::7] = -1
    assert np.all(marked[stratified_indices(marked, 100, seed=3)] >= 0)
    assert np.all(marked[stratified_indices(marked, None)] >= 0)


class IndexImages(Dataset):
    """Image i is filled with the value i, so 1x1 pixel features read back the index."""

    def __init__(self, size: int = 30) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        return torch.full((3, 4, 4), float(index)), index % 3


class ListedSamples(IndexImages):
    """Labels listed as (path, label) pairs in ``samples`` only."""

    def __init__(self, size: int = 30) -> None:
        super().__init__(size)
        self.samples = [(f"image{i}.png", i % 3) for i in range(size)]


class UnreadableSome(IndexImages):
    def __getitem__(self, index: int):
        return None if index == 4 else super().__getitem__(index)


def test_dataset_labels_are_read_without_images_where_the_dataset_lists_them(monkeypatch):
    expected = np.arange(30) % 3
    np.testing.assert_array_equal(dataset_labels(IndexImages(30)), expected)  # read through the items
    listed = ListedSamples(30)
    monkeypatch.setattr(ListedSamples, "__getitem__", lambda self, index: pytest.fail("decoded an image"))
    np.testing.assert_array_equal(dataset_labels(listed), expected)
    np.testing.assert_array_equal(dataset_labels(Subset(listed, [5, 1, 2])), [2, 1, 2])
    features = np.zeros((6, 48))
    np.testing.assert_array_equal(dataset_labels(FeatureImages(features, [4, 0, 4, 1, 1, 9])), [4, 0, 4, 1, 1, 9])
    tensors = TensorDataset(torch.zeros(4, 3, 2, 2), torch.tensor([3, 1, 3, 0]))
    np.testing.assert_array_equal(dataset_labels(tensors), [3, 1, 3, 0])
    assert dataset_labels(UnreadableSome(6)).tolist() == [0, 1, 2, 0, -1, 2]
    synthetic = build_dataset("synthetic:classes=4,n=3", None, "train", None)
    np.testing.assert_array_equal(dataset_labels(synthetic), np.repeat(np.arange(4), 3))


# -------------------------------------------------------------- synthetic benchmark


@pytest.fixture(scope="module")
def synthetic_source():
    return build_dataset("synthetic:source,classes=20,n=20", None, "train", build_transform(False, 32))


def _target(options: str):
    return build_dataset(f"synthetic:classes=10,n=30,{options}", None, "train", build_transform(False, 32))


def test_pixel_gap_rises_with_the_gap_knob(synthetic_source):
    stats = [dataset_statistics(_target(f"gap={gap}"), synthetic_source, PixelFeatures(8), progress=False)
             for gap in (0.0, 0.5, 1.0)]
    gaps = [s["G"] for s in stats]
    assert gaps[0] < gaps[1] < gaps[2], gaps
    assert gaps[2] > 3 * gaps[0], gaps
    # 192-d pixels, 64 directions: part of the gap lies outside them.
    assert all(s["gap_dims"] == 64 and s["G"] == pytest.approx(s["G_subspace"] + s["G_complement"], rel=1e-12)
               for s in stats)
    assert stats[2]["G_complement"] > stats[0]["G_complement"], stats
    assert all(s["N"] == 300 and s["samples"] == 300 and s["feature_dim"] == 192 for s in stats)


def test_pixel_intraclass_variance_rises_with_the_var_knob(synthetic_source):
    spreads = [dataset_statistics(_target(f"var={var}"), synthetic_source, PixelFeatures(8), progress=False)["D"]
               for var in (0.1, 0.5, 1.0)]
    assert spreads[0] < spreads[1] < spreads[2], spreads
    assert spreads[2] > 5 * spreads[0], spreads


# ------------------------------------------------------------- penultimate features


def _perturb_batch_norm(model: torch.nn.Module, seed: int) -> None:
    """Running statistics far from (0, 1), so eval mode and train mode differ."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(0.3 * torch.randn(module.num_features, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=generator))


def test_penultimate_features_of_resnet20_equal_a_manual_forward(tmp_path: Path):
    torch.manual_seed(0)
    model = build_model("resnet20", 10)
    _perturb_batch_norm(model, 1)
    path = tmp_path / "theta_a.pth"
    torch.save(model.state_dict(), path)
    images = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(10) % 4
    extractor = PenultimateFeatures("resnet20", path)
    features, got_labels = extract_features(TensorDataset(images, labels), extractor, batch_size=4, progress=False)

    model.eval()
    with torch.no_grad():
        x = model.relu(model.bn1(model.conv1(images)))
        x = model.layer3(model.layer2(model.layer1(x)))
        expected = torch.flatten(model.avgpool(x), 1).numpy()
    assert features.shape == (10, 64)
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got_labels, labels.numpy())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert extractor.key == f"penultimate:resnet20:{digest}"
    assert PenultimateFeatures(None, path).key == extractor.key  # architecture inferred


@pytest.mark.parametrize("arch, dim, size", [("resnet50", 2048, 32), ("densenet121", 1024, 32), ("vit_s16", 384, 224)])
def test_penultimate_features_are_the_input_of_the_head(arch: str, dim: int, size: int):
    torch.manual_seed(0)
    model = build_model(arch, 5).eval()
    extractor = PenultimateFeatures(arch, model.state_dict())
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        features = extractor(images)
        logits = model(images)
        from_features = model.get_submodule(ARCHITECTURES[arch].head)(features)
    assert features.shape == (2, dim)
    torch.testing.assert_close(from_features, logits, rtol=1e-4, atol=1e-5)
    assert extractor.key.startswith(f"penultimate:{arch}:")


def test_penultimate_features_refuse_another_architecture_or_a_missing_file(tmp_path: Path):
    other = tmp_path / "resnet32.pth"
    torch.save(build_model("resnet32", 10).state_dict(), other)
    with pytest.raises(UserError, match="resnet32.pth"):
        PenultimateFeatures("resnet20", other)
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(UserError, match="nowhere.pth"):
        PenultimateFeatures("resnet20", missing)


# -------------------------------------------------------------- subsets and the cache


def _indices(features: np.ndarray) -> np.ndarray:
    return np.rint(features[:, 0]).astype(int)


def test_max_samples_takes_a_seeded_subset_and_n_stays_the_full_length():
    dataset = IndexImages(30)
    run = lambda seed: extract_features(dataset, PixelFeatures(1), batch_size=4, max_samples=7, seed=seed,
                                        progress=False)
    first, labels = run(0)
    again, _ = run(0)
    other, _ = run(1)
    chosen = _indices(first)
    assert len(set(chosen)) == 7
    np.testing.assert_array_equal(labels, chosen % 3)
    np.testing.assert_array_equal(first, again)
    assert set(chosen) != set(_indices(other))
    assert set(chosen) == set(np.random.default_rng(0).choice(30, size=7, replace=False))  # any machine
    everything, _ = extract_features(dataset, PixelFeatures(1), max_samples=None, progress=False)
    np.testing.assert_array_equal(_indices(everything), np.arange(30))

    # Stratified: 7 of three classes of 10 give 2.33 each, rounded to 3, 2, 2.
    stratified, labels = extract_features(dataset, PixelFeatures(1), max_samples=7, stratify=True, progress=False)
    assert np.bincount(labels).tolist() == [3, 2, 2]
    np.testing.assert_array_equal(_indices(stratified), stratified_indices(np.arange(30) % 3, 7))

    # The target's subset is stratified, the source's twice as large (half fits the basis).
    stats = dataset_statistics(dataset, IndexImages(20), PixelFeatures(1), max_samples=7, progress=False)
    assert stats["N"] == 30 and stats["samples"] == 7 and stats["source_samples"] == 14
    # 7 samples of each side leave k = 7 // 3 = 2 of the 3 dimensions, along directions of the other 7.
    assert stats["gap_samples"] == 7 and stats["gap_dims"] == 2 and stats["gap_basis_samples"] == 7


class CountingPixels(FeatureExtractor):
    key = "counting-pixels:2"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return PixelFeatures(2)(images)


def test_cached_features_are_read_back_without_running_the_extractor(tmp_path: Path):
    dataset, extractor, cache = IndexImages(30), CountingPixels(), tmp_path / "cache"
    first = cached_features(cache, extractor, "index:30", "train", dataset, batch_size=8, max_samples=10,
                            progress=False)
    calls = extractor.calls
    assert calls == 2  # 10 samples in batches of 8
    second = cached_features(cache, extractor, "index:30", "train", dataset, batch_size=5, max_samples=10,
                             progress=False)
    assert extractor.calls == calls
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    assert len(list(cache.iterdir())) == 1

    cached_features(cache, extractor, "index:30", "train", dataset, max_samples=12, progress=False)
    assert extractor.calls == calls + 1
    cached_features(cache, extractor, "index:30", "val", dataset, max_samples=10, progress=False)
    assert extractor.calls == calls + 2
    cached_features(cache, extractor, "index:30", "train", dataset, max_samples=10, seed=1, progress=False)
    assert extractor.calls == calls + 3
    cached_features(cache, extractor, "index:30", "train", dataset, max_samples=10, stratify=True, progress=False)
    assert extractor.calls == calls + 4
    resized = IndexImages(30)
    resized.transform = build_transform(False, 8)  # another input size: other features
    cached_features(cache, extractor, "index:30", "train", resized, max_samples=10, progress=False)
    assert extractor.calls == calls + 5
    files = sorted(cache.iterdir())
    assert len(files) == 6 and all(f.suffix == ".npz" for f in files)  # no temporary files left

    # A damaged cache file is recomputed, not trusted.
    for f in files:
        f.write_bytes(b"not an npz")
    again = cached_features(cache, extractor, "index:30", "train", dataset, max_samples=10, progress=False)
    assert extractor.calls == calls + 6
    np.testing.assert_array_equal(again[0], first[0])


def test_dataset_statistics_use_the_cache(tmp_path: Path):
    target, source, extractor = IndexImages(30), IndexImages(20), CountingPixels()
    kwargs = dict(cache_dir=tmp_path, target_key="t", source_key="s", max_samples=None, progress=False)
    first = dataset_statistics(target, source, extractor, **kwargs)
    calls = extractor.calls
    assert calls > 0
    assert dataset_statistics(target, source, extractor, **kwargs) == first
    assert extractor.calls == calls
    assert first["samples"] == 30 and first["source_samples"] == 20 and first["D_classes"] == 3
    # Target 0..29 (the same value in every dimension), three classes i % 3: D known exactly.
    t = np.arange(30.0)
    assert first["D"] == pytest.approx(np.mean([np.var(t[t % 3 == c], ddof=1) for c in range(3)]), rel=1e-6)
    # G: a seeded random half of the source against as many target samples, in k = 10 // 3
    # dimensions along the principal directions of the other half.
    assert first["gap_samples"] == 10 and first["gap_dims"] == 3 and first["gap_basis_samples"] == 10
    rng = np.random.default_rng(0)
    order = rng.permutation(20)
    as_features = lambda values: np.repeat(np.asarray(values, dtype=float)[:, None], 12, axis=1)
    expected = gap_estimate(as_features(np.sort(order[10:])), as_features(t),
                            basis_features=as_features(np.sort(order[:10])), seed=rng)
    assert first["G"] == pytest.approx(expected["G"], rel=1e-6)
    assert first["G_uncorrected"] == pytest.approx(expected["uncorrected"], rel=1e-6)
    # Its parts: in the 3 directions, and outside them (the mean shift and the spread).
    assert first["G_subspace"] == pytest.approx(expected["subspace"], rel=1e-6)
    for key in ("mean", "spread"):
        assert first[f"G_complement_{key}"] == pytest.approx(expected[f"complement_{key}"], rel=1e-6, abs=1e-9)
    assert first["G_complement"] == first["G_complement_mean"] + first["G_complement_spread"]
    assert first["G"] == pytest.approx(first["G_subspace"] + first["G_complement"], rel=1e-12, abs=1e-12)
