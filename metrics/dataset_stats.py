"""Dataset statistics of the paper's Section 3 table: data amount N, domain gap G and
intraclass variance D, with the project's own definitions (the paper does not say how it
computed them).

All three are measured on features of the *training* images:

* ``N`` (data amount): the number of training images of the target task, always the full
  training set (even when the features below use a subset).
* ``G`` (domain gap): the Fréchet distance between source and target features in the
  whole feature space, extrapolated or corrected to infinitely many samples, per dimension
  of that space (divided by its dimension ``d``; :func:`gap_estimate`). The feature space
  is split into the ``k = min(d, 64, n // 3)`` leading principal directions P of *source*
  features that take no other part, and the complement Q of the other ``d - k``
  dimensions::

      FD(a, b) = ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^{1/2} S_b S_a^{1/2})^{1/2})
      G = (FD_inf + M_Q + C_Q) / d

  ``FD_inf`` is the Fréchet distance in P, ``M_Q`` the squared mean difference in Q and
  ``C_Q`` a change of spread in Q. Where ``k = d`` (64-d ResNet-20 features, n >= 192) Q is
  empty and ``G = FD_inf / d = FD_inf / k``, bit for bit the value of the earlier
  definitions (which divided by ``k``).

  The plain sample Fréchet distance grows as samples shrink: two samples of n points of
  one distribution are about ``(d + 5) / (2 n)`` apart per dimension and unit variance
  when n > d (0.51 at d = 2048, n = 2000), which would tie G to the data set's size. So:
  (1) the same number ``n`` of source and target samples is compared; (2) P is fitted on
  source features that are not compared (a basis fitted on the compared samples themselves
  would inflate their variance along it; ``n // 3`` only binds below 192 samples, where
  the extrapolation would otherwise fail); (3) in P the distance is computed on random
  subsets of ``m`` = n/2 .. n samples of each side, ``FD(m) = FD_inf + b / m`` is fitted by
  least squares and its intercept ``FD_inf`` is kept (the extrapolation of Chong & Forsyth's
  "FID infinity", 2020); (4) in Q, where d - k can be far more than n, no covariance is
  fitted: ``M_Q = ||Q^T (xbar_s - xbar_t)||^2 - tr(S_s,Q) / n - tr(S_t,Q) / n`` is exactly
  unbiased, and ``C_Q = sum_j (sigma_s,j - sigma_t,j)^2 + (sqrt(tr_s,R) - sqrt(tr_t,R))^2``,
  the standard deviations along the further principal directions ``u_j`` of the same
  held-out source features plus the rest R of Q they do not span (fewer held-out samples
  than dimensions) as one isotropic block, jackknifed (:func:`complement_gap`).
  ``C_Q`` is the Fréchet distance between Gaussian fits whose covariance in Q is diagonal
  along the ``u_j`` (isotropic in R): it sees a change of the variance along any ``u_j``
  and of the total variance in R, not a change that keeps all of those (variance moved
  within R, other correlations within Q, correlations between P and Q). At the population
  level each part is at most the corresponding part of the whole-space Fréchet distance,
  so ``d G`` is a lower bound of it.

  Dividing by ``d`` (not ``k``): a unit mean shift adds ``1 / d`` wherever it lies, and
  the noise of the unbiased mean estimate in Q (two sample means in d - k dimensions, a
  standard deviation of about ``sqrt(8 tr(Sigma_Q^2)) / (n d)``, at most
  ``sqrt(8 / d) / n`` per unit variance, falling as 1 / n) is spread over the d dimensions
  it comes from instead of being charged to k of them, so it stays far below a gap of the
  whole space (a shift of 0.1 in every dimension of unit-variance features gives G = 0.01).
  Against one unit shift the noise is ``sqrt(8 (d - k)) / n`` of it either way (0.25 at
  d = 2048, n = 500): the price of an unbiased estimate. Divided by ``k`` (the definition
  before this one), two samples of N(0, I) at d = 2048, n = 500 gave G with mean -0.0001
  and spread 0.0044 over 40 seeds, 2 of them above 0.01 (largest 0.0107); divided by ``d``
  they give mean -0.000004, spread 0.00014, largest 0.00033, all 40 within 0.01
  (docs/analysis.md names the command). At d = 256, n = 1,000 (source variance ``1 / i`` along coordinate i,
  seed 0 of the tests) a unit mean shift along PC 1 gives G 0.0035, along coordinate 200
  0.0039, a 3x scale of coordinates 150-159 0.00017 (below the exact 0.0010: held-out
  principal directions that far down mix neighbouring coordinates); divided by ``k`` these
  were 0.0138, 0.0156 and 0.0007, and without Q (the subspace part alone) 0.0138, 0.0002
  and 0.0000. Tests:
  ``test_a_unit_mean_shift_counts_alike_in_any_direction``,
  ``test_a_change_of_spread_outside_the_subspace_is_seen``,
  ``test_same_distribution_gives_a_gap_near_zero_in_2048_dimensions_over_seeds``.

  Two samples of one distribution give ``|G| < 0.01`` per unit variance for n from 500 to
  5,000 at d = 64 and d = 2048. A known distance is recovered within 0.01 per dimension of
  the 64 it lies in. G is not clipped: a gap near 0 may come out slightly negative, and
  clipping would bias small gaps upwards.
* ``D`` (intraclass variance): the mean over classes of the unbiased (ddof 1) variance of
  a class's features around the class mean, summed over dimensions and divided by ``d``::

      D = (1 / C) sum_c (1 / (n_c - 1)) sum_{i in c} ||x_i - mu_c||^2 / d

  over the ``C`` classes with at least two samples (a single sample says nothing about a
  spread; such classes are left out). The subset of target images is class-stratified
  (:func:`stratified_indices`): every class gets its proportional share, and at least two.

Dividing by ``d`` makes both numbers per feature dimension, so that feature
spaces of different widths (64 for a ResNet-20, 2048 for a ResNet-50) give numbers of one
scale.

Features are the penultimate-layer features of a model (the input of its classifier head,
:class:`PenultimateFeatures`; the paper's theta_A by default) or, with no model at all,
average-pooled pixels (:class:`PixelFeatures`). Extracted features can be cached on disk
(:func:`cached_features`), one ``.npz`` per (extractor, dataset, transform, split, subset).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from tqdm import tqdm

from data.image_io import DECODING_VERSION
from utils import UserError, check_weights_fit, load_state_dict_safely, write_atomically

__all__ = [
    "Extracted",
    "FeatureExtractor",
    "PenultimateFeatures",
    "PixelFeatures",
    "cached_features",
    "cached_outputs",
    "complement_gap",
    "dataset_labels",
    "dataset_statistics",
    "domain_gap",
    "extract_features",
    "extract_outputs",
    "frechet_distance",
    "frechet_distance_infinity",
    "gap_estimate",
    "gaussian_fit",
    "intraclass_variance",
    "principal_basis",
    "principal_directions",
    "stratified_indices",
    "subset_indices",
]

# Bumped whenever what a cache file holds changes meaning; part of every cache key.
CACHE_FORMAT = "dataset-stats-features-2"
_HASH_CHUNK = 1 << 20


# ------------------------------------------------------------------------- statistics


def _as_matrix(features: np.ndarray, name: str = "features") -> np.ndarray:
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [n, d], got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} hold NaN or infinite values")
    return array


def gaussian_fit(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[d]`` and covariance ``[d, d]`` (unbiased, ddof=1) of ``features [n, d]``, float64.

    Needs at least two samples.
    """
    x = _as_matrix(features)
    if x.shape[0] < 2:
        raise ValueError(f"a Gaussian fit needs at least 2 samples, got {x.shape[0]}")
    mean = x.mean(axis=0)
    centred = x - mean
    cov = centred.T @ centred / (x.shape[0] - 1)
    return mean, (cov + cov.T) / 2


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix; tiny negative eigenvalues (rounding
    errors) are clipped to 0."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    root = np.sqrt(np.clip(eigenvalues, 0.0, None))
    return (eigenvectors * root) @ eigenvectors.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Fréchet (2-Wasserstein squared) distance between N(mu1, cov1) and N(mu2, cov2)::

        ||mu1 - mu2||^2 + tr(cov1) + tr(cov2) - 2 tr((cov1^{1/2} cov2 cov1^{1/2})^{1/2})

    ``cov1^{1/2}`` is the symmetric PSD square root (eigh); ``cov1^{1/2} cov2 cov1^{1/2}`` is
    then symmetric PSD too, so the trace of its square root is the sum of the square roots
    of its eigenvalues (eigvalsh, tiny negative ones clipped to 0). This holds for singular
    covariances (fewer samples than dimensions) and never produces complex numbers. The
    result, which rounding could push slightly below 0 for equal Gaussians, is clipped at 0.
    """
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    cov1, cov2 = np.asarray(cov1, dtype=np.float64), np.asarray(cov2, dtype=np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(f"shapes do not match: mu {mu1.shape}, {mu2.shape}; cov {cov1.shape}, {cov2.shape}")
    root1 = _psd_sqrt(cov1)
    product = root1 @ cov2 @ root1
    eigenvalues = np.linalg.eigvalsh((product + product.T) / 2)
    trace_root = float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())
    diff = mu1 - mu2
    distance = float(diff @ diff) + float(np.trace(cov1)) + float(np.trace(cov2)) - 2.0 * trace_root
    return max(distance, 0.0)


# The domain gap's settings (see the module docstring); dataset_statistics reports them.
GAP_DIMS = 64  # k: G is measured along at most this many principal directions of the source
GAP_SIZES = 8  # subset sizes of the extrapolation, n/2 .. n evenly spaced in 1/m
GAP_DRAWS = 4  # random subsets of each side per size
GAP_MIN_SAMPLES = 4  # the smallest subsets then hold 2 samples, the least a covariance needs
GAP_SAMPLES_PER_DIM = 3  # k is at most n // 3: below ~2 samples per dimension the extrapolation fails


def principal_basis(features: np.ndarray, dims: int = GAP_DIMS) -> np.ndarray:
    """The leading principal directions of ``features [m, d]``: an orthonormal matrix
    ``[d, min(dims, d, m - 1)]``, largest variance first (signs arbitrary).

    Exact eigendecomposition (eigh) of the scatter matrix of the centred rows, or of their
    Gram matrix when there are fewer rows than dimensions (the same directions, cheaper);
    directions of zero variance (rows that span less than ``m - 1`` dimensions) are
    completed to an orthonormal set by a QR decomposition.
    """
    return principal_directions(features, dims)[0]


# A further principal direction counts as one of nonzero variance above this fraction of the largest variance.
_VARIANCE_FLOOR = 1e-9


def principal_directions(features: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """``(basis, further)``: ``basis`` is :func:`principal_basis`; ``further [d, r]`` are the
    next principal directions of ``features``, largest variance first, those of nonzero
    variance only (above ``_VARIANCE_FLOOR`` times the largest; orthonormal, orthogonal to
    ``basis``; at most ``m - 1 - k`` of them when there are fewer rows than dimensions). The
    one eigendecomposition :func:`principal_basis` needs gives both."""
    x = _as_matrix(features, "basis features")
    m, d = x.shape
    if dims < 1:
        raise ValueError(f"dims must be positive, got {dims}")
    if m < 2:
        raise ValueError(f"principal directions need at least 2 samples, got {m}")
    k = min(dims, d, m - 1)
    centred = x - x.mean(axis=0)
    if m < d:
        gram = centred @ centred.T
        values, vectors = np.linalg.eigh((gram + gram.T) / 2)
        values, vectors = values[::-1], vectors[:, ::-1]
        basis, _ = np.linalg.qr(centred.T @ vectors[:, :k])
        # For the Gram matrix's eigenpair (value, v), centred.T v / sqrt(value) is a unit
        # principal direction of the rows.
        kept = values[k:] > _VARIANCE_FLOOR * max(values[0], 0.0)
        further = (centred.T @ vectors[:, k:][:, kept]) / np.sqrt(values[k:][kept])
        return basis, further
    scatter = centred.T @ centred
    values, vectors = np.linalg.eigh((scatter + scatter.T) / 2)
    values, vectors = values[::-1], vectors[:, ::-1]
    kept = values[k:] > _VARIANCE_FLOOR * max(values[0], 0.0)
    return np.ascontiguousarray(vectors[:, :k]), np.ascontiguousarray(vectors[:, k:][:, kept])


def frechet_distance_infinity(a: np.ndarray, b: np.ndarray, *, seed: int | np.random.Generator = 0,
                              sizes: int = GAP_SIZES, draws: int = GAP_DRAWS) -> tuple[float, float]:
    """The Fréchet distance between the distributions behind samples ``a [n_a, k]`` and
    ``b [n_b, k]``, extrapolated to infinitely many samples: ``(FD_inf, slope)``.

    With ``n = min(n_a, n_b)``: for ``sizes`` subset sizes ``m`` from ``n`` down to ``n / 2``
    (evenly spaced in ``1 / m``), ``draws`` times each, ``m`` rows of ``a`` and ``m`` of ``b``
    are drawn without replacement (``numpy.random.default_rng(seed)``) and the Fréchet
    distance of their Gaussian fits computed; ``FD(m) = FD_inf + slope / m`` is then fitted
    by least squares. A random subset of an i.i.d. sample is an i.i.d. sample, so every
    point has the expectation of a fresh sample of size ``m``, whose leading bias term is
    ``slope / m``. ``FD_inf`` is not clipped: it can be slightly negative.
    """
    a, b = _as_matrix(a, "a"), _as_matrix(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} and {b.shape[1]}")
    n = min(a.shape[0], b.shape[0])
    if n < GAP_MIN_SAMPLES:
        raise ValueError(f"the extrapolation needs at least {GAP_MIN_SAMPLES} samples of each side, got {n}")
    if sizes < 2 or draws < 1:
        raise ValueError(f"need at least 2 sizes and 1 draw, got {sizes} and {draws}")
    rng = np.random.default_rng(seed)
    subset_sizes = np.rint(1.0 / np.linspace(1.0 / n, 2.0 / n, sizes)).astype(int)
    inverse_sizes, distances = [], []
    for m in subset_sizes:
        for _ in range(draws):
            rows_a = rng.choice(a.shape[0], size=m, replace=False)
            rows_b = rng.choice(b.shape[0], size=m, replace=False)
            distances.append(frechet_distance(*gaussian_fit(a[rows_a]), *gaussian_fit(b[rows_b])))
            inverse_sizes.append(1.0 / m)
    design = np.stack([np.ones(len(inverse_sizes)), inverse_sizes], axis=1)
    (intercept, slope), *_ = np.linalg.lstsq(design, np.asarray(distances), rcond=None)
    return float(intercept), float(slope)


def _spread_squares(features: np.ndarray, basis: np.ndarray, further: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, float]:
    """Of one side's samples in the complement of ``basis``: the mean (in the full space,
    its part along ``basis`` removed), each sample's squared deviation from the mean along
    every direction of ``further`` and, as one more column where ``further`` leaves part of
    the complement uncovered, in that remaining block; and the trace of the complement's
    covariance (ddof 1)."""
    mean = features.mean(axis=0)
    residual = features - mean
    residual -= (residual @ basis) @ basis.T
    along = residual @ further
    squares = along**2
    lengths = np.einsum("ij,ij->i", residual, residual)
    if basis.shape[1] + further.shape[1] < features.shape[1]:
        block = np.clip(lengths - squares.sum(axis=1), 0.0, None)
        squares = np.concatenate([squares, block[:, None]], axis=1)
    return mean - basis @ (basis.T @ mean), squares, float(lengths.sum()) / (features.shape[0] - 1)


def _jackknifed_spread(squares_a: np.ndarray, squares_b: np.ndarray) -> float:
    """``sum_j (sqrt(var_a,j) - sqrt(var_b,j))^2`` over the columns of per-sample squared
    deviations (variances ddof 1), its O(1/n) bias removed by the two-sample jackknife: the
    variance without sample i is ``(SS - n / (n - 1) dev_i^2) / (n - 2)`` in closed form."""
    def variances(squares: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
        n = squares.shape[0]
        total = squares.sum(axis=0)
        without_one = np.clip(total - n / (n - 1) * squares, 0.0, None) / (n - 2)
        return n, total / (n - 1), without_one

    n_a, var_a, loo_a = variances(squares_a)
    n_b, var_b, loo_b = variances(squares_b)
    root_a, root_b = np.sqrt(var_a), np.sqrt(var_b)
    plain = (root_a - root_b) ** 2
    # Per column: the mean over left-out samples minus the full-sample value.
    shift_a = ((np.sqrt(loo_a) - root_b) ** 2).mean(axis=0) - plain
    shift_b = ((root_a - np.sqrt(loo_b)) ** 2).mean(axis=0) - plain
    return float(np.sum(plain - (n_a - 1) * shift_a - (n_b - 1) * shift_b))


def complement_gap(source: np.ndarray, target: np.ndarray, basis: np.ndarray, further: np.ndarray
                   ) -> tuple[float, float]:
    """The part of the squared Fréchet distance outside the span of ``basis [d, k]``
    (orthonormal), in the complement Q: ``(mean, spread)``.

    * ``mean``: ``||Q^T (mu_s - mu_t)||^2``, estimated without bias as
      ``||Q^T (xbar_s - xbar_t)||^2 - tr(Q^T S_s Q) / n_s - tr(Q^T S_t Q) / n_t`` (S ddof 1;
      the squared distance of two sample means exceeds the true one by exactly the two
      traces over n on average).
    * ``spread``: the Fréchet distance between the two sides' Gaussian fits with a
      covariance diagonal along ``further [d, r]`` (orthonormal directions in Q, in
      :func:`gap_estimate` the source basis features' next principal directions) and
      isotropic in the rest R of Q: ``sum_j (sigma_s,j - sigma_t,j)^2 + (sqrt(tr_s,R) -
      sqrt(tr_t,R))^2``, the standard deviations from unbiased variances, the sum's O(1/n)
      bias removed by the jackknife (:func:`_jackknifed_spread`). It is at most the
      covariance part of the Fréchet distance in Q (a coupling of the two Gaussians couples
      their parts along each ``u_j`` and in R, and the squared distance adds up over them)
      and at least the isotropic ``(sqrt(tr S_s,Q) - sqrt(tr S_t,Q))^2`` (reverse triangle
      inequality); it sees a change of variance along a ``u_j`` or of the total in R, not
      one that keeps all of those.

    Neither is clipped at 0. Needs at least 3 samples of each side; costs two
    ``[n, d] x [d, r]`` products.
    """
    source, target = _as_matrix(source, "source"), _as_matrix(target, "target")
    if min(source.shape[0], target.shape[0]) < 3:
        raise ValueError("the complement's jackknife needs at least 3 samples of each side")
    mean_s, squares_s, trace_s = _spread_squares(source, basis, further)
    mean_t, squares_t, trace_t = _spread_squares(target, basis, further)
    difference = mean_s - mean_t
    mean = float(difference @ difference) - trace_s / source.shape[0] - trace_t / target.shape[0]
    return mean, _jackknifed_spread(squares_s, squares_t)


def gap_estimate(source_features: np.ndarray, target_features: np.ndarray, *,
                 basis_features: np.ndarray | None = None, dims: int = GAP_DIMS, samples: int | None = None,
                 seed: int | np.random.Generator = 0) -> dict[str, Any]:
    """G and how it was measured: ``{"G", "dims" (k), "samples" (n, per side),
    "subspace" (FD_inf / d, the part in the k principal directions), "complement_mean",
    "complement_spread" (the two parts outside them, / d; 0 where k = d), "uncorrected"
    (the plain Fréchet distance of the n samples in the k directions, before the
    extrapolation and without the complement, also / d so that it compares with G)}``;
    ``subspace + complement_mean + complement_spread`` is G up to rounding.

    ``n = min(len(source), len(target), samples)`` rows of each side are compared (a seeded
    random subset where a side has more), in ``k = min(d, dims, n // GAP_SAMPLES_PER_DIM)``
    principal directions: the extrapolation needs a few samples per dimension (with fewer
    than two it fails, the Gaussian fits being singular), so only sets of fewer than
    ``GAP_SAMPLES_PER_DIM * dims`` images get a smaller ``k``. Where ``k < d`` these are the
    ``k`` leading principal directions of ``basis_features`` (:func:`principal_basis`, which
    also keeps ``k`` below their number of rows): source features *disjoint* from
    ``source_features``, as a basis fitted on the compared sample inflates its variance
    along the basis. In them the Fréchet distance is extrapolated to infinitely many samples
    (:func:`frechet_distance_infinity`, ``FD_inf``); in the other ``d - k`` dimensions the
    mean difference and the spread are estimated without the small-sample bias
    (:func:`complement_gap`, along the further principal directions of
    ``basis_features``). Then ``G = (FD_inf + mean + spread) / d``: per dimension of the
    whole feature space, so that a unit mean shift adds ``1 / d`` wherever it lies, and
    where ``k = d`` G is ``FD_inf / d = FD_inf / k`` alone (bit for bit the earlier value).
    ``seed`` (or a ``numpy.random.Generator``) fixes the subsets.
    """
    source = _as_matrix(source_features, "source_features")
    target = _as_matrix(target_features, "target_features")
    d = source.shape[1]
    if target.shape[1] != d:
        raise ValueError(f"feature dimensions differ: source {d}, target {target.shape[1]}")
    if dims < 1:
        raise ValueError(f"dims must be positive, got {dims}")
    n = min(source.shape[0], target.shape[0], samples if samples is not None else source.shape[0])
    if n < GAP_MIN_SAMPLES:
        raise ValueError(f"G needs at least {GAP_MIN_SAMPLES} samples of each side, got {n}")
    rng = np.random.default_rng(seed)
    if source.shape[0] > n:
        source = source[np.sort(rng.choice(source.shape[0], size=n, replace=False))]
    if target.shape[0] > n:
        target = target[np.sort(rng.choice(target.shape[0], size=n, replace=False))]
    k = min(d, dims, max(n // GAP_SAMPLES_PER_DIM, 1))
    mean = spread = 0.0
    if k < d:
        if basis_features is None:
            raise ValueError(f"{d}-d features need basis_features (source features disjoint from "
                             f"source_features) to reduce them to {k} dimensions")
        if np.shape(basis_features)[-1] != d:
            raise ValueError(f"basis_features have {np.shape(basis_features)[-1]} dimensions, the features {d}")
        basis, further = principal_directions(basis_features, k)
        mean, spread = complement_gap(source, target, basis, further)
        source, target = source @ basis, target @ basis
        k = basis.shape[1]
    extrapolated, _ = frechet_distance_infinity(source, target, seed=rng)
    uncorrected = frechet_distance(*gaussian_fit(source), *gaussian_fit(target))
    # Per dimension of the whole feature space (d, not k): where k = d this is FD_inf / k as before.
    return {"G": (extrapolated + mean + spread) / d, "dims": k, "samples": n, "subspace": extrapolated / d,
            "complement_mean": mean / d, "complement_spread": spread / d, "uncorrected": uncorrected / d}


def domain_gap(source_features: np.ndarray, target_features: np.ndarray, **kwargs: Any) -> float:
    """G alone: ``gap_estimate(source_features, target_features, **kwargs)["G"]``."""
    return gap_estimate(source_features, target_features, **kwargs)["G"]


def intraclass_variance(features: np.ndarray, labels: np.ndarray) -> float:
    """D: the mean over classes of ``sum_i ||x_i - mu_c||^2 / (n_c - 1)`` (the unbiased
    variance of the class's own samples, summed over dimensions), divided by the feature
    dimension ``d``.

    Every class with at least two samples counts once, whatever its size; a class with a
    single sample has no measurable spread and is left out. Raises ``ValueError`` when no
    class has two samples.
    """
    x = _as_matrix(features)
    y = np.asarray(labels).reshape(-1)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"{x.shape[0]} feature rows but {y.shape[0]} labels")
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    kept = counts >= 2
    if not kept.any():
        raise ValueError("D needs a class with at least two samples")
    sums = np.zeros((len(classes), x.shape[1]))
    np.add.at(sums, inverse, x)
    means = sums / counts[:, None]
    squared = ((x - means[inverse]) ** 2).sum(axis=1)
    per_class = np.bincount(inverse, weights=squared, minlength=len(classes))[kept] / (counts[kept] - 1)
    return float(per_class.mean() / x.shape[1])


# ------------------------------------------------------------------------- extractors


class FeatureExtractor:
    """What :func:`extract_features` needs: ``key`` (a stable string naming the features,
    used for caching), ``to(device)`` and ``__call__(images [B, 3, H, W]) -> [B, d]``;
    ``arch`` names the model's architecture, whose fixed input size (if any) the images
    must have (None: no model, any size)."""

    key: str
    arch: str | None = None

    def to(self, device: torch.device | str) -> "FeatureExtractor":
        return self

    def __call__(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features ``[B, d]`` and the model's logits ``[B, classes]`` (None: no model)."""
        return self(images), None


class PixelFeatures(FeatureExtractor):
    """Images average-pooled to ``size x size`` per channel and flattened (``3 size^2``
    dims); needs no model. Key: ``pixels:SIZE``."""

    def __init__(self, size: int = 8) -> None:
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        self.size = size
        self.key = f"pixels:{size}"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(images.float(), self.size).flatten(1)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _state_dict_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the tensors, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class PenultimateFeatures(FeatureExtractor):
    """The input of a model's classifier head (``ARCHITECTURES[arch].head``), flattened.

    ``checkpoint`` is a checkpoint file (read with :func:`utils.load_state_dict_safely`) or
    a state dict. The model is built with as many classes as the checkpoint's head has and
    the weights are loaded strictly. ``arch=None`` infers the architecture from the tensors.
    A forward pre-hook on the head module captures its input; the model always runs in
    eval mode (BatchNorm running statistics, no dropout).

    Key: ``penultimate:ARCH:HASH``, HASH the first 16 hex digits of the sha256 of the
    checkpoint file's bytes (of the tensors' names, shapes and bytes for a state dict).
    Raises :class:`UserError` naming the file when it is missing, unreadable, or not a
    checkpoint of ``arch``.
    """

    def __init__(self, arch: str | None, checkpoint: str | os.PathLike | Mapping[str, torch.Tensor]) -> None:
        from models import ARCHITECTURES, build_model, num_classes_of, resolve_arch

        if isinstance(checkpoint, Mapping):
            source, state_dict = "the given state dict", dict(checkpoint)
            digest = _state_dict_digest(state_dict)
        else:
            path = Path(checkpoint)
            source, state_dict = str(path), load_state_dict_safely(path)
            digest = _file_digest(path)
        arch = resolve_arch(state_dict, arch, source, flag=None if arch is None else "arch")
        head_name = ARCHITECTURES[arch].head
        if f"{head_name}.weight" not in state_dict:
            raise UserError(f"{source}: has no classifier head ({head_name}.weight is missing)")
        model = build_model(arch, num_classes_of(arch, state_dict))
        check_weights_fit(state_dict, model.state_dict(), source)
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as err:
            detail = " ".join(str(err).split())[:300]
            raise UserError(f"{source}: does not load into {arch} ({detail})") from None
        self.arch, self.model = arch, model.eval()
        self.key = f"penultimate:{arch}:{digest[:16]}"
        self._captured: torch.Tensor | None = None
        model.get_submodule(head_name).register_forward_pre_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple) -> None:
        self._captured = args[0]

    def to(self, device: torch.device | str) -> "PenultimateFeatures":
        self.model.to(device)
        return self

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.outputs(images)[0]

    @torch.no_grad()
    def outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's input (flattened) and its output, the source task's logits, of one pass."""
        self.model.eval()
        self._captured = None
        try:
            logits = self.model(images)
            if self._captured is None:
                raise RuntimeError(f"the head of {self.arch} was not called in the forward pass")
            return self._captured.flatten(1), logits.flatten(1)
        finally:
            self._captured = None


# ------------------------------------------------------------------- feature extraction


def stratified_indices(labels: np.ndarray, max_samples: int | None, seed: int = 0) -> np.ndarray:
    """Indices (sorted) of a class-stratified subset of ``max_samples`` samples with these
    ``labels``; all samples when ``max_samples`` is ``None`` or at least their number.

    Proportional allocation with a minimum: every class gets at least ``min(n_c, 2)``
    samples (the least D can use); a class whose proportional share ``max_samples * n_c /
    n`` falls below that gets its minimum, and the rest of the budget is shared in
    proportion to size among the other classes (repeated until no share falls below its
    minimum), rounded down, then one more sample for the classes with the largest
    remainders (ties: the smaller label) until the total is ``max_samples``. Only where two
    of every class exceed ``max_samples`` is the subset larger: two of every class (one of
    a class of one). Within a class the samples are drawn without replacement by one
    ``numpy.random.default_rng(seed)``, class after class in label order: integer
    arithmetic and a fixed generator give the same subset on every machine. Negative labels
    (samples whose label could not be read) are never chosen.
    """
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be positive, got {max_samples}")
    candidates = np.flatnonzero(y >= 0)
    if max_samples is None or max_samples >= len(candidates):
        return candidates
    _, inverse, counts = np.unique(y[candidates], return_inverse=True, return_counts=True)
    least = np.minimum(counts, 2)
    fixed = np.zeros(len(counts), dtype=bool)  # classes held at their minimum
    while True:
        budget = max_samples - int(least[fixed].sum())
        free = ~fixed
        share, remainder = np.divmod(max(budget, 0) * counts, max(int(counts[free].sum()), 1))
        below = free & (share < least)
        if not below.any():
            break
        fixed |= below
    take = np.where(fixed, least, share)
    if free.any():  # the remainders add up to fewer than one sample per free class
        order = np.lexsort((np.arange(len(counts)), -remainder))
        order = order[free[order]]
        take[order[: budget - int(share[free].sum())]] += 1
    rng = np.random.default_rng(seed)
    members = np.split(candidates[np.argsort(inverse, kind="stable")], np.cumsum(counts)[:-1])
    chosen = [rng.choice(group, size=int(count), replace=False) for group, count in zip(members, take)]
    return np.sort(np.concatenate(chosen))


def subset_indices(size: int, max_samples: int | None, seed: int = 0,
                   labels: np.ndarray | None = None) -> np.ndarray:
    """Indices of the samples used: all of them in order, or (sorted) ``max_samples`` of
    them drawn without replacement by ``numpy.random.default_rng(seed)`` (the same on every
    machine); with ``labels`` (one per sample) a class-stratified subset instead
    (:func:`stratified_indices`)."""
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be positive, got {max_samples}")
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if labels.shape[0] != size:
            raise ValueError(f"{size} samples but {labels.shape[0]} labels")
        return stratified_indices(labels, max_samples, seed)
    if max_samples is None or max_samples >= size:
        return np.arange(size)
    return np.sort(np.random.default_rng(seed).choice(size, size=max_samples, replace=False))


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """Every sample's label (int64 ``[len(dataset)]``), read without decoding images where
    the dataset lists them: its ``targets`` (the project's image-file datasets, torchvision's
    CIFAR, DTD and FGVC-Aircraft, the synthetic tasks), its ``samples`` as (path, label)
    pairs, a ``Subset`` of such a dataset, or a ``TensorDataset`` of (images, labels).
    Otherwise every item is read (slow: each image is decoded); an item that comes back as
    ``None`` (a corrupt image skipped with ``skip_corrupt``) gets the label -1.
    """
    size = len(dataset)
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return dataset.tensors[1].reshape(-1).cpu().numpy().astype(np.int64)
    listed = getattr(dataset, "targets", None)
    if listed is None and isinstance(getattr(dataset, "samples", None), (list, tuple)):
        listed = [entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None
                  for entry in dataset.samples]
    if listed is not None:
        try:
            labels = np.asarray(listed.cpu() if isinstance(listed, torch.Tensor) else listed).reshape(-1)
        except (TypeError, ValueError):
            labels = np.empty(0)
        if labels.shape[0] == size and np.issubdtype(labels.dtype, np.integer):
            return labels.astype(np.int64)
    labels = np.empty(size, dtype=np.int64)
    for index in range(size):
        item = dataset[index]
        labels[index] = -1 if item is None else int(item[1])
    return labels


def _transform_text(dataset: Dataset) -> str | None:
    """``repr`` of the transform the dataset (or the one a ``Subset`` wraps) applies: it
    names the input size and normalisation, which change the features."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    transform = getattr(dataset, "transform", None)
    return None if transform is None else repr(transform)


def _collate(batch: list) -> Any:
    from data import collate_skip_none  # corrupt images skipped with skip_corrupt are None

    return collate_skip_none(batch)


FEATURE_FLUSH = 32  # batches of features kept on the device before one copy back to the host


class Extracted(NamedTuple):
    """What :func:`extract_outputs` returns: features ``[n, d]`` (float32), labels ``[n]``
    (int64) and, when asked for, the model's logits ``[n, classes]`` (float32; else None)."""

    features: np.ndarray
    labels: np.ndarray
    logits: np.ndarray | None = None


def extract_features(dataset: Dataset, extractor: Callable[[torch.Tensor], torch.Tensor], **kwargs: Any
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Features ``[n, d]`` (float32) and labels ``[n]`` (int64) of ``dataset``'s items
    ``(image, label)``, in index order (:func:`extract_outputs` without logits)."""
    extracted = extract_outputs(dataset, extractor, **kwargs)
    return extracted.features, extracted.labels


def extract_outputs(dataset: Dataset, extractor: Callable[[torch.Tensor], torch.Tensor], *,
                    batch_size: int = 256, device: torch.device | str = "cpu", max_samples: int | None = None,
                    seed: int = 0, stratify: bool = False, progress: bool = True, logits: bool = False) -> Extracted:
    """Features, labels and (``logits=True``: from the same forward pass, through the
    extractor's ``outputs`` method) the model's logits of ``dataset``'s items ``(image,
    label)``, in index order.

    ``max_samples`` takes a seeded random subset, class-stratified with ``stratify``
    (:func:`subset_indices`; the labels come from :func:`dataset_labels`). Runs in batches
    under ``torch.no_grad`` on ``device``; an extractor with a ``to`` method is moved there
    first. Samples a ``skip_corrupt`` dataset returns as ``None`` are left out.
    """
    device = torch.device(device)
    size = len(dataset)
    subsetting = max_samples is not None and max_samples < size
    labels_before = dataset_labels(dataset) if stratify and subsetting else None
    indices = subset_indices(size, max_samples, seed, labels_before)
    if hasattr(extractor, "to"):
        extractor = extractor.to(device) or extractor
    if logits and not hasattr(extractor, "outputs"):
        raise TypeError("logits=True needs an extractor with an outputs() method (PenultimateFeatures)")
    from data.loading import default_workers

    loader = DataLoader(Subset(dataset, indices.tolist()), batch_size=batch_size, shuffle=False,
                        num_workers=default_workers(device), collate_fn=_collate, pin_memory=device.type == "cuda")
    arrays: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])  # features, logits
    labels: list[np.ndarray] = []
    pending: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])  # on the device, copied back in groups
    with torch.no_grad():
        for batch in tqdm(loader, desc="features", unit="batch", disable=not progress, leave=False):
            if batch is None:
                continue
            images, targets = batch
            images = images.to(device, non_blocking=True)
            features, scores = extractor.outputs(images) if logits else (extractor(images), None)
            pending[0].append(features.flatten(1).float())
            if logits:
                if scores is None:
                    raise TypeError(f"{type(extractor).__name__} has no logits (it runs no model)")
                pending[1].append(scores.flatten(1).float())
            labels.append(torch.as_tensor(targets).reshape(-1).numpy().astype(np.int64))
            if len(pending[0]) == FEATURE_FLUSH:
                _flush(pending, arrays)
    _flush(pending, arrays)
    if not arrays[0]:
        raise UserError("no sample could be loaded to extract features from")
    return Extracted(np.concatenate(arrays[0]), np.concatenate(labels),
                     np.concatenate(arrays[1]) if logits else None)


def _flush(pending: tuple[list[torch.Tensor], ...], arrays: tuple[list[np.ndarray], ...]) -> None:
    """One copy back to the host of each kind of pending output (one per FEATURE_FLUSH batches, not per batch)."""
    for waiting, done in zip(pending, arrays):
        if waiting:
            done.append(torch.cat(waiting).cpu().numpy())
            waiting.clear()


# ------------------------------------------------------------------------------ cache


def _cache_path(cache_dir: Path, meta: Mapping[str, Any]) -> Path:
    text = json.dumps(meta, sort_keys=True)
    return cache_dir / f"features-{hashlib.sha256(text.encode()).hexdigest()[:24]}.npz"


def _read_cache(path: Path, meta_text: str) -> Extracted | None:
    """The cached arrays, or ``None`` when the file is missing, unreadable or for other
    arguments (then it is recomputed and replaced)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            if str(archive["meta"]) != meta_text:
                return None
            logits = archive["logits"] if "logits" in archive.files else None
            return Extracted(archive["features"], archive["labels"], logits)
    except (OSError, ValueError, KeyError, EOFError):
        return None


def cached_features(cache_dir: str | os.PathLike, extractor: FeatureExtractor, dataset_key: str, split: str,
                    dataset: Dataset, **extract_kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels through the disk cache (:func:`cached_outputs` without logits)."""
    extracted = cached_outputs(cache_dir, extractor, dataset_key, split, dataset, **extract_kwargs)
    return extracted.features, extracted.labels


def cached_outputs(cache_dir: str | os.PathLike, extractor: FeatureExtractor, dataset_key: str, split: str,
                   dataset: Dataset, **extract_kwargs: Any) -> Extracted:
    """:func:`extract_outputs` with a disk cache: one ``.npz`` in ``cache_dir`` per
    (cache format, extractor key, dataset key, the dataset's transform, split, dataset
    length, for a subset max_samples, seed and stratify, and whether logits are kept),
    written atomically. ``dataset_key`` names the dataset (e.g. the --dataset string and
    its --data_dir); the transform (its ``repr``: input size, normalisation) is read from
    the dataset. A file whose arguments do not match, or that cannot be read, is
    recomputed. ``batch_size``, ``device`` and ``progress`` are not part of the key.
    """
    max_samples = extract_kwargs.get("max_samples")
    if max_samples is not None and max_samples >= len(dataset):
        max_samples = None  # the whole set either way: one cache entry
    subset = max_samples is not None
    meta = {
        "format": CACHE_FORMAT,
        "decoding": DECODING_VERSION,
        "extractor": extractor.key,
        "dataset": str(dataset_key),
        "transform": _transform_text(dataset),
        "split": str(split),
        "length": len(dataset),
        "max_samples": max_samples,
        "seed": int(extract_kwargs.get("seed", 0)) if subset else None,
        "stratify": bool(extract_kwargs.get("stratify", False)) if subset else None,
    }
    if extract_kwargs.get("logits"):
        meta["logits"] = True  # (absent otherwise: the entries written before logits were kept stay valid)
    meta_text = json.dumps(meta, sort_keys=True)
    cache_dir = Path(cache_dir)
    path = _cache_path(cache_dir, meta)
    cached = _read_cache(path, meta_text)
    if cached is not None:
        return cached
    extracted = extract_outputs(dataset, extractor, **extract_kwargs)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{cache_dir}: cannot create the feature cache folder ({err.strerror})") from None
    arrays = {"features": extracted.features, "labels": extracted.labels}
    if extracted.logits is not None:
        arrays["logits"] = extracted.logits
    write_atomically(path, lambda handle: np.savez(handle, **arrays, meta=np.array(meta_text)))
    return extracted


# ------------------------------------------------------------------------- statistics


def _check_enough_images(target_features: np.ndarray, target_labels: np.ndarray, source_features: np.ndarray,
                         compared_part: np.ndarray) -> np.ndarray:
    """Refuse sets too small for G or D; returns the target's images per class."""
    if min(target_features.shape[0], compared_part.shape[0]) < GAP_MIN_SAMPLES:
        raise UserError(f"G needs at least {GAP_MIN_SAMPLES} target and {2 * GAP_MIN_SAMPLES} source images; "
                        f"got {target_features.shape[0]} and {source_features.shape[0]}")
    _, counts = np.unique(target_labels, return_counts=True)
    if not (counts >= 2).any():
        raise UserError(f"D needs a class with at least two images; the {target_features.shape[0]} target "
                        "images used have one per class")
    return counts


def dataset_statistics(target_train: Dataset, source_train: Dataset, extractor: FeatureExtractor, *,
                       max_samples: int | None = 2000, cache_dir: str | os.PathLike | None = None,
                       target_key: str | None = None, source_key: str | None = None,
                       device: torch.device | str = "cpu", seed: int = 0, batch_size: int = 256,
                       progress: bool = True, gap_dims: int = GAP_DIMS) -> dict[str, Any]:
    """N, G and D of a target task against a source task (training splits of both).

    Features are extracted, through the cache in ``cache_dir`` when given (then
    ``target_key`` and ``source_key`` name the two datasets), of

    * a class-stratified subset of ``max_samples`` target images (:func:`stratified_indices`;
      more only where the dataset has over ``max_samples / 2`` classes): D uses all of them;
    * a random subset of ``2 * max_samples`` source images, split at random into two
      halves: one only fits the principal directions G is measured along (where ``k < d``:
      the k leading ones, and the further ones its complement part uses), the other is
      compared with the target.

    G compares ``n = min(max_samples, target images, source images / 2)`` images of each
    side in ``k = min(d, gap_dims, n // 3)`` dimensions (:func:`gap_estimate`).
    ``max_samples=None`` uses every image. ``seed`` fixes every random choice. Returns
    ``{"N": len(target_train), "G", "D", "feature_dim": d, "samples": target images
    extracted, "source_samples": source images extracted, "gap_dims": k, "gap_samples": n,
    "gap_basis_samples": source images the directions were fitted on (0: no reduction),
    "G_uncorrected": the plain Fréchet distance of the n samples in the k directions before
    the extrapolation (no complement part), / d like G, "G_subspace": the part of G in the k
    directions, "G_complement": the part outside them (0 where k = d), the sum of
    "G_complement_mean" (mean shift) and "G_complement_spread" (change of spread), all / d,
    "D_classes": classes D averages over}`` (G is ``G_subspace + G_complement`` up to
    rounding). Raises :class:`UserError` when the sets are
    too small (G needs 4 target and 8 source images, D a class with 2 images).
    """
    if max_samples is not None and max_samples < 1:
        raise UserError(f"max_samples must be positive, got {max_samples}")
    kwargs = dict(batch_size=batch_size, device=device, seed=seed, progress=progress)

    def features_of(dataset: Dataset, key: str | None, name: str, **subset: Any):
        if cache_dir is None:
            return extract_features(dataset, extractor, **kwargs, **subset)
        if key is None:
            raise ValueError(f"cache_dir needs {name}_key, a string that names the {name} dataset")
        return cached_features(cache_dir, extractor, key, "train", dataset, **kwargs, **subset)

    target_features, target_labels = features_of(target_train, target_key, "target", max_samples=max_samples,
                                                 stratify=True)
    source_features, _ = features_of(source_train, source_key, "source",
                                     max_samples=None if max_samples is None else 2 * max_samples)
    rng = np.random.default_rng(seed)
    order = rng.permutation(source_features.shape[0])
    basis_part = source_features[np.sort(order[: len(order) // 2])]
    compared_part = source_features[np.sort(order[len(order) // 2 :])]
    counts = _check_enough_images(target_features, target_labels, source_features, compared_part)
    gap = gap_estimate(compared_part, target_features, basis_features=basis_part, dims=gap_dims,
                       samples=max_samples, seed=rng)
    d = int(target_features.shape[1])
    return {
        "N": len(target_train),
        "G": gap["G"],
        "D": intraclass_variance(target_features, target_labels),
        "feature_dim": d,
        "samples": int(target_features.shape[0]),
        "source_samples": int(source_features.shape[0]),
        "gap_dims": gap["dims"],
        "gap_samples": gap["samples"],
        "gap_basis_samples": int(basis_part.shape[0]) if gap["dims"] < d else 0,
        "G_uncorrected": gap["uncorrected"],
        "G_subspace": gap["subspace"],
        "G_complement": gap["complement_mean"] + gap["complement_spread"],
        "G_complement_mean": gap["complement_mean"],
        "G_complement_spread": gap["complement_spread"],
        "D_classes": int((counts >= 2).sum()),
    }
