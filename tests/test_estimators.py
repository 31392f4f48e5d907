"""The feature-based estimators (metrics/estimators.py) against answers built by hand, their
defining invariances, direct computations from the papers' formulas, and the CLI."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from metrics.estimators import agreement, estimate_all, hscore, knn, leep, logme, logme_fit, nce, softmax


DEMO_PRETRAINED = Path(__file__).resolve().parents[1] / "ckpt" / "demo_pretrained.pth"


def direct_log_evidence(features: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """The log evidence per sample of LogME's Bayesian linear model from its definition, with
    the full d x d matrices (no decomposition shared with the implementation)."""
    n, d = features.shape
    a = alpha * np.eye(d) + beta * features.T @ features
    m = beta * np.linalg.solve(a, features.T @ y)
    sign, log_det = np.linalg.slogdet(a)
    assert sign > 0
    value = (n * np.log(beta) + d * np.log(alpha) - n * np.log(2 * np.pi) - beta * np.sum((features @ m - y) ** 2)
             - alpha * m @ m - log_det) / 2
    return value / n


def evidence_by_definition(features: np.ndarray, y: np.ndarray):
    """The log evidence per sample as a function of (alpha, beta), from its definition:
    A = alpha I + beta F^T F applied in the eigenbasis of F^T F (all d eigenvalues, the zeros
    of a rank-deficient F included), m formed explicitly, ||F m - y||^2 computed by multiplying it out; nothing of
    the implementation's reduction (profile in alpha / beta, projections) is used."""
    n, d = features.shape
    eigenvalues, basis = np.linalg.eigh(features.T @ features)
    # eigenvalues at rounding level are zeros (of rank-deficient F^T F: fewer samples than dimensions)
    eigenvalues[eigenvalues < eigenvalues.max() * max(n, d) * np.finfo(np.float64).eps] = 0.0
    projected = basis.T @ (features.T @ y)

    def value(alpha: float, beta: float) -> float:
        m = beta * basis @ (projected / (alpha + beta * eigenvalues))
        return (n * np.log(beta) + d * np.log(alpha) - n * np.log(2 * np.pi) - beta * np.sum((features @ m - y) ** 2)
                - alpha * m @ m - np.sum(np.log(alpha + beta * eigenvalues))) / (2 * n)

    return value


def best_found_by_an_optimiser(evidence) -> float:
    """The largest evidence Nelder-Mead finds over (log alpha, log beta) from several starts."""
    starts = ((0.0, 0.0), (5.0, 1.0), (-3.0, 2.0), (12.0, 0.0), (40.0, 0.0))
    objective = lambda p: -evidence(*np.exp(np.clip(p, -230, 230)))  # noqa: E731
    return max(-minimize(objective, start, method="Nelder-Mead",
                         options={"xatol": 1e-10, "fatol": 1e-15, "maxiter": 4000}).fun for start in starts)


def check_logme_maximum(features: np.ndarray, labels: np.ndarray) -> None:
    """Per class: LogME's evidence is the definition's value at the returned alpha, beta, and
    no optimiser finds a larger one. A maximum at the boundary (alpha -> infinity: features
    that say nothing; beta -> infinity: an exact fit, fewer samples than dimensions) is a
    limit, which the definition cannot be evaluated at in floating point (beta times a
    rounded residual): there only the optimiser's value is compared."""
    fit = logme_fit(features, labels)
    for c in np.unique(labels):
        evidence = evidence_by_definition(features, (labels == c).astype(np.float64))
        if max(fit.alpha[c], fit.beta[c]) < 1e8:  # an interior maximum: the definition is accurate there
            assert fit.evidence[c] == pytest.approx(evidence(fit.alpha[c], fit.beta[c]), abs=1e-10)
        best = best_found_by_an_optimiser(evidence)
        assert best - 1e-10 <= fit.evidence[c] <= best + 1e-6
        if fit.alpha[c] < 1e6 and features.shape[1] <= 60:  # also through the full d x d matrices
            assert fit.evidence[c] == pytest.approx(direct_log_evidence(features, (labels == c).astype(float),
                                                                        fit.alpha[c], fit.beta[c]), abs=1e-10)


# ----------------------------------------------------------------------------- LogME


@pytest.mark.parametrize("n,d", [(12, 40), (8, 300), (40, 40), (150, 20)])
def test_logme_is_the_maximum_of_the_evidence_computed_directly(n, d):
    """Fewer samples than dimensions included (12 x 40, 8 x 300): the evidence at the returned
    alpha, beta and the best evidence a general optimiser finds both equal LogME's per class."""
    rng = np.random.default_rng(n * d)
    labels = np.arange(n) % 3
    features = rng.normal(size=(n, d)) + 2.0 * np.eye(3, d)[labels]
    check_logme_maximum(features, labels)
    assert logme(features, labels) == pytest.approx(logme_fit(features, labels).evidence.mean(), abs=1e-15)


def test_logme_at_an_interior_maximum_satisfies_the_fixed_point_equations():
    rng = np.random.default_rng(3)
    labels = np.arange(60) % 2
    features = rng.normal(size=(60, 10)) + 1.5 * np.eye(2, 10)[labels]
    fit = logme_fit(features, labels)
    values, vectors = np.linalg.eigh(features.T @ features)
    for c in range(2):
        y = (labels == c).astype(np.float64)
        alpha, beta = fit.alpha[c], fit.beta[c]
        m = beta * np.linalg.solve(alpha * np.eye(10) + beta * features.T @ features, features.T @ y)
        gamma = np.sum(beta * values / (alpha + beta * values))
        assert alpha == pytest.approx(gamma / (m @ m), rel=1e-7)
        assert beta == pytest.approx((60 - gamma) / np.sum((features @ m - y) ** 2), rel=1e-7)


def test_logme_of_features_that_carry_nothing_is_the_noise_only_evidence():
    """F = 0: the model is y = noise, whose evidence per sample is 1/2 (log(n / n_c) - log 2 pi - 1)."""
    labels = np.array([0, 0, 0, 1, 2, 2])
    fit = logme_fit(np.zeros((6, 4)), labels)
    expected = [0.5 * (math.log(6 / count) - math.log(2 * math.pi) - 1) for count in (3, 1, 2)]
    np.testing.assert_allclose(fit.evidence, expected, rtol=1e-12)


def test_logme_ranks_informative_features_above_noise_and_takes_a_single_class():
    rng = np.random.default_rng(0)
    labels = np.arange(200) % 4
    noise = rng.normal(size=(200, 16))
    informative = noise + 4.0 * np.eye(4, 16)[labels]
    assert logme(informative, labels) > logme(noise, labels) + 0.1
    assert math.isfinite(logme(noise, np.zeros(200, dtype=int)))


@pytest.mark.slow  # about 17 s
def test_logme_takes_a_thousand_dimensions_and_ten_samples_without_error():
    """Fewer samples than dimensions: the log determinant of alpha I + beta F^T F has d terms,
    of which only n carry an eigenvalue of F^T F; an implementation that sums log(alpha +
    beta s_i) over the n singular values only (a known failure) is off by (d - n)/2 log
    alpha per class. The value must stay the maximum of the evidence by its definition."""
    rng = np.random.default_rng(7)
    labels = np.array([0, 1] * 5)
    features = rng.normal(size=(10, 1000)) * 1e3
    assert np.isfinite(logme_fit(features, labels).evidence).all()
    check_logme_maximum(features, labels)


# -------------------------------------------------------------------------- LEEP, NCE


def test_leep_by_hand():
    """Two source classes, two target classes; P(y, z), P(y | z) and the expectation worked out on paper."""
    theta = np.array([[0.8, 0.2], [0.6, 0.4], [0.1, 0.9], [0.3, 0.7]])
    labels = np.array([0, 0, 1, 1])
    joint = np.array([[1.4, 0.6], [0.4, 1.6]]) / 4  # rows y, columns z
    conditional = joint / joint.sum(0)
    expected = np.mean([np.log(theta[i] @ conditional[labels[i]]) for i in range(4)])
    assert leep(theta, labels) == pytest.approx(expected, abs=1e-14)


def test_leep_is_zero_when_the_source_head_determines_the_target_and_minus_entropy_when_it_says_nothing():
    labels = np.array([0, 1, 2, 2, 1, 0, 0])
    assert leep(np.eye(3)[(labels + 1) % 3], labels) == pytest.approx(0.0, abs=1e-15)
    constant = np.tile([0.2, 0.5, 0.3], (7, 1))
    p = np.bincount(labels) / 7
    assert leep(constant, labels) == pytest.approx(float(np.sum(p * np.log(p))), abs=1e-14)
    assert leep(softmax(np.random.default_rng(0).normal(size=(7, 4))), np.zeros(7, dtype=int)) == pytest.approx(0.0)


def test_nce_by_hand_and_its_bounds():
    # z = 0: y = (0, 0, 1); z = 1: y = (1, 1, 1, 1)  -> H(Y|Z) = 3/7 H(1/3, 2/3)
    z = np.array([0, 0, 0, 1, 1, 1, 1])
    y = np.array([0, 0, 1, 1, 1, 1, 1])
    expected = 3 / 7 * (1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3))
    assert nce(z, y) == pytest.approx(expected, abs=1e-14)
    assert nce(y + 5, y) == pytest.approx(0.0, abs=1e-15)  # Z determines Y
    assert nce(z, np.zeros(7, dtype=int)) == pytest.approx(0.0, abs=1e-15)  # a single class
    # labels independent of the source labels (a balanced 2 x 2 design): -H(Y) = -log 2
    assert nce([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-math.log(2), abs=1e-14)


def test_nce_is_invariant_under_relabelling_either_side():
    rng = np.random.default_rng(1)
    z, y = rng.integers(0, 6, 300), rng.integers(0, 4, 300)
    value = nce(z, y)
    assert nce(np.array([9, 3, 7, 1, 0, 4])[z], np.array([2, 0, 3, 1])[y] * 10) == pytest.approx(value, abs=1e-13)


# ----------------------------------------------------------------------------- H-score


def straightforward_hscore(features: np.ndarray, labels: np.ndarray) -> float:
    """Bao et al.'s formula as written: tr(pinv(cov(f)) cov(g)), g the class means per sample."""
    means = {c: features[labels == c].mean(0) for c in np.unique(labels)}
    g = np.stack([means[c] for c in labels])
    return float(np.trace(np.linalg.pinv(np.cov(features, rowvar=False), hermitian=True) @ np.cov(g, rowvar=False)))


@pytest.mark.parametrize("n,d", [(300, 12), (40, 60)])
def test_hscore_equals_the_formula_and_is_invariant_under_an_invertible_linear_map(n, d):
    rng = np.random.default_rng(n)
    labels = np.arange(n) % 5
    features = rng.normal(size=(n, d)) + np.eye(5, d)[labels]
    value = hscore(features, labels)
    assert value == pytest.approx(straightforward_hscore(features, labels), rel=1e-8)
    mixing = rng.normal(size=(d, d)) + 3 * np.eye(d)  # invertible, condition number in the tens
    assert hscore(features @ mixing + rng.normal(size=d), labels) == pytest.approx(value, rel=1e-7)


def test_hscore_known_answers():
    labels = np.arange(30) % 3
    # no more samples than dimensions plus one: the pseudo-inverse whitens every direction the
    # samples span, and any features score the maximum C - 1 (a regime where H-score says nothing)
    assert hscore(np.random.default_rng(1).normal(size=(30, 29)), labels) == pytest.approx(2.0, abs=1e-8)
    assert hscore(np.random.default_rng(1).normal(size=(30, 4)), labels) < 1.0
    # no spread within a class: the between-class covariance is all there is, tr(S^+ S) = rank = C - 1
    assert hscore(np.eye(3, 8)[labels] * 5.0, labels) == pytest.approx(2.0, abs=1e-10)
    assert hscore(np.random.default_rng(0).normal(size=(30, 4)), np.zeros(30, dtype=int)) == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------------------- k-NN


def test_knn_by_hand():
    # two tight pairs and one outlier of a third class: the outlier's neighbours are all others
    features = np.array([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99], [-1.0, -0.2]])
    labels = np.array([0, 0, 1, 1, 2])
    assert knn(features, labels, k=1) == pytest.approx(4 / 5)
    # every sample alone in its class: leave-one-out can never be right
    assert knn(np.eye(4), np.arange(4), k=1) == 0.0
    # cosine similarity ignores the length of a vector
    assert knn(features * np.array([[1], [5], [0.1], [3], [2]]), labels, k=1) == pytest.approx(4 / 5)


def test_knn_breaks_a_tied_vote_by_summed_similarity_and_caps_k():
    # samples 0 and 1 (class 2): one neighbour of each class, a 1:1 vote that the closer one
    # (class 2) wins, where the smaller label would pick class 1; sample 2's neighbours are both class 2
    features = np.array([[1.0, 0.0, 0.0], [0.99, 0.141, 0.0], [0.9, 0.0, 0.436]])
    labels = np.array([2, 2, 1])
    assert knn(features, labels, k=2) == pytest.approx(2 / 3)
    assert knn(features, labels, k=50) == knn(features, labels, k=2)


def test_knn_is_perfect_on_separated_clusters():
    rng = np.random.default_rng(2)
    labels = np.arange(90) % 3
    features = 10 * np.eye(3, 6)[labels] + 0.1 * rng.normal(size=(90, 6))
    assert knn(features, labels, k=7) == 1.0


# ------------------------------------------------------------------- inputs and paths


def test_numpy_and_tensor_inputs_agree():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 4, 120)
    features = (rng.normal(size=(120, 24)) + np.eye(4, 24)[labels]).astype(np.float32)
    logits = rng.normal(size=(120, 9)).astype(np.float32)
    from_numpy = estimate_all(features, logits, labels.astype(np.int32), k=3)
    from_tensors = estimate_all(torch.from_numpy(features), torch.from_numpy(logits), torch.from_numpy(labels), k=3)
    from_strided = estimate_all(torch.from_numpy(features.T.copy()).T, torch.from_numpy(logits).double(),
                                torch.from_numpy(labels).float(), k=3)
    for key, value in from_numpy.items():
        assert from_tensors[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
        assert from_strided[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert from_numpy["leep"] == pytest.approx(leep(softmax(logits), labels))
    assert from_numpy["nce"] == pytest.approx(nce(logits.argmax(1), labels))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="3 samples but 2 labels"):
        logme(np.zeros((3, 2)), [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        hscore(np.array([[0.0, math.nan], [1.0, 2.0]]), [0, 1])
    with pytest.raises(ValueError, match="probabilities"):
        leep(np.array([[0.5, 0.6], [0.5, 0.5]]), [0, 1])
    with pytest.raises(ValueError, match="integers"):
        nce([0, 1], [0.5, 1.0])
    with pytest.raises(ValueError, match="at least two samples"):
        knn(np.ones((1, 3)), [0])


def test_agreement_known_answers():
    result = agreement([1, 2, 3, 4], [10, 20, 30, 45])
    assert result["kendall_tau"] == pytest.approx(1.0) and result["pearson_r"] > 0.98 and result["n"] == 4
    assert agreement([4, 3, 2, 1], [1, 2, 3, 4])["kendall_tau"] == pytest.approx(-1.0)
    assert agreement([1, 1, 1], [1, 2, 3])["kendall_tau"] is None
    assert agreement([2.0, 2.0 + 1e-15, 2.0 - 1e-15], [1, 2, 3])["pearson_r"] is None  # equal up to rounding


# ------------------------------------------------------------------------------- CLI


def test_analyze_estimators_scores_and_ranks_several_checkpoints(tmp_path, capsys):
    import analyze
    from models import build_model

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = tmp_path / f"a{seed}.pth"
        torch.save(build_model("resnet20", 7).state_dict(), path)
        paths.append(str(path))
    out = tmp_path / "scores.json"
    argv = ["estimators", "--dataset", "synthetic:classes=3,n=10,size=16", "-a", *paths, "--cache_dir",
            str(tmp_path / "cache"), "--k", "3", "--json", str(out), "--csv", str(tmp_path / "scores.csv")]
    assert analyze.main(argv) == 0
    printed = capsys.readouterr().out
    assert "ranking (1 = most transferable)" in printed and "LogME" in printed
    rows = json.loads(out.read_text())
    assert [row["checkpoint"] for row in rows] == paths
    assert all(row["samples"] == 30 and row["classes"] == 3 and row["source_classes"] == 7 and row["k"] == 3
               for row in rows)
    for key in ("logme", "leep", "nce", "hscore", "knn"):
        better = max(rows, key=lambda row: row[key])
        assert better[f"rank_{key}"] == 1 and sorted(row[f"rank_{key}"] for row in rows)[-1] in (1, 2)
    # a second call reads features and logits back from the cache and gives the same scores
    assert analyze.main(argv) == 0
    assert json.loads(out.read_text()) == rows
    cached = list((tmp_path / "cache").glob("*.npz"))
    assert len(cached) == 2 and all("logits" in np.load(path).files for path in cached)


def test_analyze_estimators_refuses_one_checkpoint_given_twice(tmp_path):
    import analyze
    from models import build_model
    from utils import UserError

    path = tmp_path / "a.pth"
    torch.save(build_model("resnet20", 4).state_dict(), path)
    with pytest.raises(UserError, match="one file"):
        analyze.main(["estimators", "--dataset", "synthetic", "-a", str(path), str(tmp_path / "." / "a.pth"),
                      "--json", str(tmp_path / "s.json")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pth"]


def test_analyze_estimators_refuses_a_target_with_fewer_than_two_readable_images(tmp_path, monkeypatch):
    import analyze
    import metrics.dataset_stats
    from metrics.dataset_stats import Extracted
    from utils import UserError

    one = Extracted(np.ones((1, 64), np.float32), np.zeros(1, np.int64), np.zeros((1, 200), np.float32))
    monkeypatch.setattr(metrics.dataset_stats, "cached_outputs", lambda *args, **kwargs: one)  # all others corrupt
    with pytest.raises(UserError, match=r"--dataset synthetic: 1 readable training image\(s\)"):
        analyze.main(["estimators", "--dataset", "synthetic", "-a", str(DEMO_PRETRAINED),
                      "--csv", str(tmp_path / "s.csv")])
    assert list(tmp_path.iterdir()) == []


def test_the_benchmark_runs_at_a_tiny_size_and_both_sides_agree():
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "bench/bench_estimators.py", "--samples", "300", "--dim", "40",
                           "--classes", "4", "--source_classes", "12"], cwd=repo, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines[2:7]] == ["logme", "leep", "nce", "hscore", "knn"]
    assert float(lines[-1].split(":")[1].split()[0]) < 1e-9  # the largest difference between the two sides
