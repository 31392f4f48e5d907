"""Dataset statistics (N, G, D): known answers for the formulas, the synthetic benchmark's
knobs, penultimate features against a manual forward pass, seeded subsets and the cache."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch.utils.data import Dataset, TensorDataset

from data import build_dataset, build_transform
from metrics.dataset_stats import (
    FeatureExtractor,
    PenultimateFeatures,
    PixelFeatures,
    cached_features,
    dataset_statistics,
    domain_gap,
    extract_features,
    frechet_distance,
    gaussian_fit,
    intraclass_variance,
)
from models import ARCHITECTURES, build_model
from utils import UserError


def correlated_samples(rng: np.random.Generator, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    mixing = rng.normal(size=(d, d))
    return rng.normal(size=(n, d)) @ mixing + shift


def random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


# ------------------------------------------------------------------ Gaussian fit, G


def test_gaussian_fit_is_mean_and_unbiased_covariance():
    x = correlated_samples(np.random.default_rng(0), 50, 4).astype(np.float32)
    mean, cov = gaussian_fit(x)
    assert mean.dtype == cov.dtype == np.float64
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x.astype(np.float64), rowvar=False, ddof=1), rtol=1e-10)


def test_identical_feature_sets_have_zero_gap():
    x = correlated_samples(np.random.default_rng(1), 400, 12, shift=3.0)
    assert domain_gap(x, x.copy()) == pytest.approx(0.0, abs=1e-9)
    mu, cov = gaussian_fit(x)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-9)


def test_gap_is_symmetric_and_positive_for_different_sets():
    rng = np.random.default_rng(2)
    a, b = correlated_samples(rng, 300, 10), correlated_samples(rng, 200, 10, shift=0.5)
    forward, backward = domain_gap(a, b), domain_gap(b, a)
    assert forward > 0.1
    assert forward == pytest.approx(backward, rel=1e-9)


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
    # Mean over classes (not over samples, which would give (6 s0^2 + 2 s1^2) / 8 / d).
    assert intraclass_variance(features[order], labels[order]) == pytest.approx((s0**2 + s1**2) / 2 / d, rel=1e-12)
    # A class with one sample has no spread: it contributes 0 but counts as a class.
    features3 = np.concatenate([features, centre2[None]])
    labels3 = np.concatenate([labels, [7]])
    assert intraclass_variance(features3, labels3) == pytest.approx((s0**2 + s1**2) / 3 / d, rel=1e-12)


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
    assert intraclass_variance(a, np.zeros(200)) == pytest.approx(np.sum(centred**2) / 200 / 5, rel=1e-12)


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


class IndexImages(Dataset):
    """Image i is filled with the value i, so 1x1 pixel features read back the index."""

    def __init__(self, size: int = 30) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        return torch.full((3, 4, 4), float(index)), index % 3


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

    stats = dataset_statistics(dataset, IndexImages(20), PixelFeatures(1), max_samples=7, progress=False)
    assert stats["N"] == 30 and stats["samples"] == 7 and stats["source_samples"] == 7


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
    files = sorted(cache.iterdir())
    assert len(files) == 4 and all(f.suffix == ".npz" for f in files)  # no temporary files left

    # A damaged cache file is recomputed, not trusted.
    for f in files:
        f.write_bytes(b"not an npz")
    again = cached_features(cache, extractor, "index:30", "train", dataset, max_samples=10, progress=False)
    assert extractor.calls == calls + 4
    np.testing.assert_array_equal(again[0], first[0])


def test_dataset_statistics_use_the_cache(tmp_path: Path):
    target, source, extractor = IndexImages(30), IndexImages(20), CountingPixels()
    kwargs = dict(cache_dir=tmp_path, target_key="t", source_key="s", max_samples=None, progress=False)
    first = dataset_statistics(target, source, extractor, **kwargs)
    calls = extractor.calls
    assert calls > 0
    assert dataset_statistics(target, source, extractor, **kwargs) == first
    assert extractor.calls == calls
    # Target 0..29 vs source 0..19 (the same value in every dimension): exact known answers.
    t, s = np.arange(30.0), np.arange(20.0)
    known_gap = (t.mean() - s.mean()) ** 2 + (t.std(ddof=1) - s.std(ddof=1)) ** 2
    assert first["G"] == pytest.approx(known_gap, rel=1e-6)
    known_spread = np.mean([np.var(t[t % 3 == c]) for c in range(3)])
    assert first["D"] == pytest.approx(known_spread, rel=1e-6)
