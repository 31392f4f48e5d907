"""Feature-based transferability estimators: scores of a pre-trained model on a target task
computed from one forward pass over the target's training images, without fine-tuning.

Every estimator follows one convention: higher = more transferable. Inputs are numpy
arrays or torch tensors (any float dtype, any device); the arithmetic is float64 on the
device of the first tensor given (the CPU for numpy inputs), and each returns a Python
float. Labels are any integers: they are renumbered 0..C-1 in sorted order first.

* :func:`logme` (You et al., "LogME: Practical Assessment of Pre-trained Models for
  Transfer Learning", ICML 2021): for each class c, a Bayesian linear regression of the
  class's 0/1 indicator y_c on the features F (n x d), with prior w ~ N(0, 1/alpha) and
  noise N(0, 1/beta); its log evidence, maximised over alpha and beta (at a fixed point of
  You et al.'s iteration, found by a one-dimensional search: :func:`logme_fit`), divided by
  n; LogME is the mean over classes.
* :func:`leep` (Nguyen et al., "LEEP: A New Measure to Evaluate Transferability of Learned
  Representations", ICML 2020): theta_i(z), the source head's softmax, defines the
  empirical joint P(y, z) = (1/n) sum_{i: y_i = y} theta_i(z) and P(y | z) =
  P(y, z) / P(z); LEEP = (1/n) sum_i log sum_z P(y_i | z) theta_i(z).
* :func:`nce` (Tran et al., "Transferability and Hardness of Supervised Classification
  Tasks", ICCV 2019): the negative conditional entropy -H(Y | Z) of the target label Y
  given Z, the source head's arg-max label, from their empirical joint distribution.
* :func:`hscore` (Bao et al., "An Information-Theoretic Approach to Transferability in
  Task Transfer Learning", ICIP 2019): tr(cov(f)^+ cov(E[f | y])), the between-class
  covariance measured in the metric of the pseudo-inverse of the total covariance.
* :func:`knn` : the leave-one-out accuracy of a k-nearest-neighbour classifier under cosine
  similarity (each sample is classified by the k others most similar to it; the class with
  the most votes wins, ties go to the larger summed similarity, then to the smaller label).

LogME and the H-score both need the spectrum of a Gram matrix: it is decomposed once (the
d x d matrix F^T F, or the n x n matrix F F^T when there are fewer samples than
dimensions), not once per class, and every class is then handled at once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["DEFAULT_K", "ESTIMATORS", "LogMEFit", "agreement", "estimate_all", "hscore", "knn", "leep", "logme", "logme_fit", "nce",
           "softmax"]

# name -> the title reports print; every score: higher = more transferable
ESTIMATORS = {"logme": "LogME", "leep": "LEEP", "nce": "NCE", "hscore": "H-score", "knn": "kNN"}
DEFAULT_K = 5  # neighbours of the kNN estimator
# LogME's search over log(alpha / beta): grid step, reach beyond the spectrum, golden-section steps
LOGME_STEP, LOGME_MARGIN, LOGME_GOLDEN_STEPS = 0.5, 40.0, 64
KNN_BLOCK = 1024  # rows of the similarity matrix held at once


# ----------------------------------------------------------------------------- inputs


def _device_of(*arrays: Any) -> torch.device:
    return next((a.device for a in arrays if isinstance(a, torch.Tensor)), torch.device("cpu"))


def _float64(values: Any, device: torch.device, name: str, dims: int) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values)
    tensor = tensor.to(device=device, dtype=torch.float64)
    if tensor.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return tensor


def _class_indices(labels: Any, device: torch.device, size: int | None,
                   name: str = "labels") -> tuple[torch.Tensor, int]:
    """Labels renumbered 0..C-1 (sorted order) and C; ``size``: the number there must be."""
    tensor = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        if not (tensor.is_floating_point() and torch.equal(tensor, tensor.round())):
            raise ValueError(f"{name} must be integers, got {tensor.dtype}")
    tensor = tensor.reshape(-1).to(device=device, dtype=torch.int64)
    if size is not None and tensor.numel() != size:
        raise ValueError(f"{size} samples but {tensor.numel()} {name}")
    if tensor.numel() == 0:
        raise ValueError("no samples")
    classes, index = torch.unique(tensor, sorted=True, return_inverse=True)
    return index, int(classes.numel())


def _one_hot(index: torch.Tensor, classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(index, classes).to(torch.float64)


def _features_and_labels(features: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
    device = _device_of(features, labels)
    f = _float64(features, device, "features", 2)
    index, classes = _class_indices(labels, device, f.shape[0])
    return f, index, classes


# ------------------------------------------------------------------ spectral projection


def _spectral_projection(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For X (n x d) and Y (n x C): the non-zero eigenvalues s_i of X^T X (equal to those of
    X X^T), the squared coordinates u_ic^2 of Y's columns along the matching left singular
    vectors of X, and ||y_c - P y_c||^2, the part of each column outside X's column space.

    One symmetric eigendecomposition of the smaller Gram matrix. With n >= d: X^T X = V S V^T
    and u = S^{-1/2} V^T X^T Y; with n < d: X X^T = U S U^T and u = U^T Y, whose directions
    of zero eigenvalue are exactly the part outside the column space (no subtraction)."""
    n, d = x.shape
    if n >= d:
        values, vectors = torch.linalg.eigh(x.T @ x)
        keep = values > values.max().clamp(min=0) * max(n, d) * torch.finfo(torch.float64).eps
        values = values[keep]
        u2 = (vectors[:, keep].T @ (x.T @ y)) ** 2 / values[:, None]
        outside = ((y * y).sum(0) - u2.sum(0)).clamp(min=0)
    else:
        values, vectors = torch.linalg.eigh(x @ x.T)
        keep = values > values.max().clamp(min=0) * max(n, d) * torch.finfo(torch.float64).eps
        coordinates = (vectors.T @ y) ** 2
        values, u2, outside = values[keep], coordinates[keep], coordinates[~keep].sum(0)
    return values, u2, outside


# ----------------------------------------------------------------------------- LogME


@dataclass(frozen=True)
class LogMEFit:
    """Per class: the maximised log evidence divided by n, and the prior and noise
    precisions alpha and beta at the maximum (numpy arrays of length C)."""

    evidence: np.ndarray
    alpha: np.ndarray
    beta: np.ndarray

    @property
    def score(self) -> float:
        return float(self.evidence.mean())


def logme_fit(features: Any, labels: Any) -> LogMEFit:
    """LogME's per-class evidence at its maximum over alpha and beta (see :func:`logme`).

    With s_i the non-zero eigenvalues of F^T F, u_i the coordinates of the class indicator y
    along the matching left singular vectors and r0 = ||y outside F's column space||^2, the
    log evidence of the model is

        n/2 log beta + d/2 log alpha - n/2 log 2 pi - beta/2 ||F m - y||^2 - alpha/2 m^T m
        - 1/2 log |alpha I + beta F^T F|,   m = beta (alpha I + beta F^T F)^{-1} F^T y.

    Written in lambda = alpha / beta, beta's maximum is closed-form, beta = n / E(lambda)
    with E(lambda) = ||F m - y||^2 + lambda m^T m = r0 + sum_i u_i^2 lambda / (lambda + s_i),
    and what is left to maximise is one smooth function of log lambda:

        evidence / n = 1/2 (log(n / E) - log 2 pi - 1) - 1/(2n) sum_i log(1 + s_i / lambda)

    Its stationary points are those of You et al.'s fixed-point iteration (alpha = gamma /
    m^T m, beta = (n - gamma) / ||F m - y||^2, gamma = sum_i beta s_i / (alpha + beta s_i));
    instead of iterating, which takes thousands of steps when the maximum lies at lambda ->
    infinity (features that say nothing about the class) or lambda -> 0 (an exact fit with
    fewer samples than dimensions), every class's maximum is bracketed on a grid of log
    lambda (steps of 1/2, 40 beyond the spectrum on each side) and refined by golden-section
    search to a relative width below 1e-12. Every term is a sum of non-negative parts, so
    the evidence stays accurate with fewer samples than dimensions, where r0 = 0."""
    f, index, classes = _features_and_labels(features, labels)
    n = f.shape[0]
    values, u2, outside = _spectral_projection(f, _one_hot(index, classes))
    s = values[:, None]

    def evidence(log_lambda: torch.Tensor) -> torch.Tensor:  # per sample, one value per class
        lam = log_lambda.exp()
        fitted = outside + (u2 * (lam / (lam + s))).sum(0)
        return 0.5 * ((n / fitted).log() - math.log(2 * math.pi) - 1) - torch.log1p(s / lam).sum(0) / (2 * n)

    low, high = (values.log().min().item(), values.log().max().item()) if values.numel() else (0.0, 0.0)
    grid = torch.arange(low - LOGME_MARGIN, high + LOGME_MARGIN + LOGME_STEP, LOGME_STEP, dtype=torch.float64,
                        device=f.device)
    scores = torch.stack([evidence(x.expand(classes)) for x in grid])  # grid x classes
    best = scores.argmax(0)
    left = grid[(best - 1).clamp(min=0)]
    right = grid[(best + 1).clamp(max=grid.numel() - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    a, b = right - ratio * (right - left), left + ratio * (right - left)
    fa, fb = evidence(a), evidence(b)
    for _ in range(LOGME_GOLDEN_STEPS):
        keep_left = fa >= fb  # the maximum lies in [left, b]: b becomes the bracket's right end
        right, left = torch.where(keep_left, b, right), torch.where(keep_left, left, a)
        point = torch.where(keep_left, right - ratio * (right - left), left + ratio * (right - left))
        value = evidence(point)
        a, b, fa, fb = (torch.where(keep_left, point, b), torch.where(keep_left, a, point),
                        torch.where(keep_left, value, fb), torch.where(keep_left, fa, value))
    refined = (left + right) / 2
    at_refined, at_grid = evidence(refined), scores.max(0).values
    log_lambda = torch.where(at_refined >= at_grid, refined, grid[best])
    current = torch.maximum(at_refined, at_grid)
    lam = log_lambda.exp()
    beta = n / (outside + (u2 * (lam / (lam + s))).sum(0))
    return LogMEFit(current.cpu().numpy(), (lam * beta).cpu().numpy(), beta.cpu().numpy())


def logme(features: Any, labels: Any) -> float:
    """LogME: the mean over classes of the maximised log evidence per sample of a Bayesian
    linear model of the class indicator on the features (You et al., ICML 2021). Higher =
    more transferable. Features are used as given (no centring or scaling)."""
    return logme_fit(features, labels).score


# ----------------------------------------------------------------------------- H-score


def hscore(features: Any, labels: Any) -> float:
    """H-score: tr(cov(f)^+ cov(E[f | y])) (Bao et al., ICIP 2019), with the Moore-Penrose
    pseudo-inverse (eigenvalues below n d eps of the largest count as zero). Higher = more
    transferable; between 0 and the number of classes minus one.

    With F_c the centred features (thin SVD U S V^T) and e_c class c's indicator, the
    covariances' normalisations cancel and the score is sum_c ||U^T e_c||^2 / n_c, computed
    from one decomposition of the smaller Gram matrix of F_c."""
    f, index, classes = _features_and_labels(features, labels)
    centred = f - f.mean(0)
    indicators = _one_hot(index, classes)
    _, u2, _ = _spectral_projection(centred, indicators)
    return float((u2.sum(0) / indicators.sum(0)).sum())


# -------------------------------------------------------------------------- LEEP, NCE


def softmax(logits: Any) -> torch.Tensor:
    """Softmax over the last dimension in float64 (for :func:`leep` from a head's logits)."""
    return torch.softmax(_float64(logits, _device_of(logits), "logits", 2), dim=1)


def leep(source_probs: Any, labels: Any) -> float:
    """LEEP: the mean log of the expected empirical prediction (Nguyen et al., ICML 2020).
    ``source_probs`` (n x Z) are the source head's softmax outputs, rows summing to 1.
    Higher = more transferable; at most 0."""
    device = _device_of(source_probs, labels)
    theta = _float64(source_probs, device, "source_probs", 2)
    if (theta < 0).any() or not torch.allclose(theta.sum(1), torch.ones_like(theta[:, 0]), atol=1e-4):
        raise ValueError("source_probs must be probabilities (non-negative rows summing to 1); "
                         "apply softmax() to logits")
    index, classes = _class_indices(labels, device, theta.shape[0])
    joint = torch.zeros(classes, theta.shape[1], dtype=torch.float64, device=device)
    joint.index_add_(0, index, theta).div_(theta.shape[0])  # P(y, z), C x Z
    marginal = joint.sum(0)
    conditional = torch.where(marginal > 0, joint / marginal.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
    expected = (theta * conditional[index]).sum(1)  # sum_z P(y_i | z) theta_i(z)
    return float(expected.log().mean())


def nce(source_labels: Any, labels: Any) -> float:
    """NCE: -H(Y | Z), Z the source head's arg-max label of each sample (Tran et al., ICCV
    2019), from the empirical joint distribution, in nats. Higher = more transferable; at
    most 0 (0 when Z determines Y)."""
    device = _device_of(source_labels, labels)
    y, classes = _class_indices(labels, device, None)
    z, sources = _class_indices(source_labels, device, y.numel(), "source_labels")
    joint = torch.zeros(classes, sources, dtype=torch.float64, device=device)
    joint.index_put_((y, z), torch.ones_like(y, dtype=torch.float64), accumulate=True)
    joint /= z.numel()
    conditional = joint / joint.sum(0, keepdim=True)
    present = joint > 0
    return float((joint[present] * conditional[present].log()).sum())


# ------------------------------------------------------------------------------ k-NN


def knn(features: Any, labels: Any, k: int = DEFAULT_K) -> float:
    """Leave-one-out k-NN accuracy under cosine similarity: each sample is predicted from the
    ``k`` most similar other samples (``k`` is capped at n - 1) by majority vote, ties broken
    by the larger summed similarity, then by the smaller label. A zero feature vector has
    similarity 0 to everything. Higher = more transferable; between 0 and 1."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    f, index, classes = _features_and_labels(features, labels)
    n = f.shape[0]
    if n < 2:
        raise ValueError("k-NN needs at least two samples")
    k = min(k, n - 1)
    unit = f / f.norm(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    correct = 0
    for start in range(0, n, KNN_BLOCK):
        rows = torch.arange(start, min(start + KNN_BLOCK, n), device=f.device)
        similarity = unit[rows] @ unit.T
        similarity[torch.arange(rows.numel(), device=f.device), rows] = -math.inf  # leave the sample out
        nearest, which = similarity.topk(k, dim=1)
        neighbour_labels = index[which]
        votes = torch.zeros(rows.numel(), classes, dtype=torch.float64, device=f.device)
        votes.scatter_add_(1, neighbour_labels, torch.ones_like(nearest))
        summed = torch.zeros_like(votes).scatter_add_(1, neighbour_labels, nearest)
        leading = votes == votes.max(1, keepdim=True).values
        predicted = torch.where(leading, summed, -math.inf).argmax(1)
        correct += int((predicted == index[rows]).sum())
    return correct / n


# ------------------------------------------------------------------------------- all


def estimate_all(features: Any, logits: Any, labels: Any, k: int = DEFAULT_K) -> dict[str, float]:
    """Every estimator of :data:`ESTIMATORS` from penultimate features, the source head's
    logits (softmax for LEEP, arg-max for NCE) and the target labels."""
    logits = _float64(logits, _device_of(logits), "logits", 2)
    return {
        "logme": logme(features, labels),
        "leep": leep(torch.softmax(logits, dim=1), labels),
        "nce": nce(logits.argmax(1), labels),
        "hscore": hscore(features, labels),
        "knn": knn(features, labels, k),
    }


def agreement(scores: Any, reference: Any) -> dict[str, float | int | None]:
    """How ``scores`` agree with ``reference`` across tasks (one value each): Kendall's tau-b
    and Pearson's r with their two-sided p values, and n. A coefficient is None where it is
    undefined (fewer than three pairs, or a side that takes a single value: one whose spread
    is below 1e-9 of its magnitude, i.e. equal values up to rounding)."""
    from scipy import stats

    x = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(reference, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"{x.size} scores but {y.size} reference values")
    result: dict[str, float | int | None] = {"n": int(x.size), "kendall_tau": None, "kendall_p": None,
                                             "pearson_r": None, "pearson_p": None}
    if x.size < 3 or not (np.isfinite(x).all() and np.isfinite(y).all()) or _constant(x) or _constant(y):
        return result
    tau = stats.kendalltau(x, y)
    r = stats.pearsonr(x, y)
    result.update(kendall_tau=float(tau.statistic), kendall_p=float(tau.pvalue), pearson_r=float(r.statistic),
                  pearson_p=float(r.pvalue))
    return result


def _constant(values: np.ndarray) -> bool:
    return bool(np.ptp(values) <= 1e-9 * max(1.0, float(np.abs(values).max())))
