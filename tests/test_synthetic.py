"""The synthetic benchmark: deterministic, and each knob moves what it names."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data.synthetic import SyntheticDataset, build_synthetic, describe, parse_options
from utils import UserError


def pixel_features(dataset: SyntheticDataset) -> np.ndarray:
    """Images averaged over 4x4 pixel cells: 8x8x3 = 192 numbers per 32x32 image."""
    images = dataset.images.float() / 255
    return torch.nn.functional.avg_pool2d(images, 4).flatten(1).double().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Between Gaussian fits of two samples (rows); written out with eigh, no scipy."""

    def sqrt_psd(m):
        w, v = np.linalg.eigh(m)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = sqrt_psd(cov_a)
    cross = np.trace(sqrt_psd(root_a @ cov_b @ root_a))
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def test_same_options_give_identical_images_and_labels():
    a = build_synthetic("classes=4,n=5,gap=0.3,var=0.5,seed=3", "train")
    b = build_synthetic("classes=4,n=5,gap=0.3,var=0.5,seed=3", "train")
    assert torch.equal(a.images, b.images) and a.targets == b.targets
    assert a.images.shape == (20, 3, 32, 32) and a.images.dtype == torch.uint8
    assert a.targets == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5 and a.classes == ["t3_000", "t3_001", "t3_002", "t3_003"]


def test_sample_i_does_not_depend_on_the_number_of_samples():
    small = build_synthetic("classes=3,n=4", "train").images.view(3, 4, 3, 32, 32)
    large = build_synthetic("classes=3,n=9", "train").images.view(3, 9, 3, 32, 32)
    assert torch.equal(small, large[:, :4])


def test_splits_tasks_and_sizes_differ():
    train = build_synthetic("classes=3,n=4,n_val=4", "train")
    val = build_synthetic("classes=3,n=4,n_val=4", "val")
    other_task = build_synthetic("classes=3,n=4,seed=1", "train")
    source = build_synthetic("source,classes=3,n=4", "train")
    for other in (val, other_task, source):
        assert not torch.equal(train.images, other.images)
    assert len(build_synthetic("classes=3,n=4,n_val=7", "val")) == 21
    assert build_synthetic("classes=2,n=1,size=48", "train").images.shape == (2, 3, 48, 48)


def test_transform_is_applied():
    dataset = build_synthetic("classes=2,n=2", "train", transform=lambda img: img.float() / 255)
    image, label = dataset[3]
    assert image.dtype == torch.float32 and label == 1
    assert torch.equal(image, dataset.images[3].float() / 255)


def test_gap_moves_the_target_away_from_the_source():
    """Fréchet distance (pixel features) from the source task rises with every step of gap."""
    source = pixel_features(SyntheticDataset(parse_options("source,classes=40,n=20"), "train"))
    for seed in (0, 1):
        distances = [
            frechet_distance(source, pixel_features(build_synthetic(f"classes=10,n=60,gap={gap},seed={seed}", "train")))
            for gap in (0.0, 0.25, 0.5, 0.75, 1.0)
        ]
        assert all(b > a for a, b in zip(distances, distances[1:])), distances
        assert distances[-1] > 3 * distances[0]


def test_var_widens_the_classes():
    """Mean squared distance of a sample to its class mean rises with var (and is ~0 at var=0)."""
    spreads = []
    for var in (0.0, 0.25, 0.5, 1.0, 2.0):
        features = pixel_features(build_synthetic(f"classes=10,n=30,var={var}", "train")).reshape(10, 30, -1)
        spreads.append(((features - features.mean(1, keepdims=True)) ** 2).sum(-1).mean())
    assert all(b > 1.5 * a for a, b in zip(spreads, spreads[1:])), spreads
    assert spreads[0] < 0.01 * spreads[2]


def test_more_data_gives_a_more_accurate_model():
    """A 1-nearest-neighbour classifier on pixel features gets better with n per class."""
    for seed in (0, 1):
        accuracies = []
        for n in (1, 8, 64):
            options = f"classes=10,n={n},n_val=100,var=0.6,seed={seed}"
            train, val = build_synthetic(options, "train"), build_synthetic(options, "val")
            x, y = pixel_features(train), pixel_features(val)
            nearest = ((y[:, None] - x[None]) ** 2).sum(-1).argmin(1)
            accuracies.append((np.array(train.targets)[nearest] == np.array(val.targets)).mean())
        assert all(b > a + 0.03 for a, b in zip(accuracies, accuracies[1:])), accuracies


def test_options_round_trip_and_defaults():
    config = parse_options("classes=7,n=20,gap=0.5,var=0.1,seed=2")
    assert (config.classes, config.n, config.gap, config.var, config.seed) == (7, 20, 0.5, 0.1, 2)
    assert parse_options(describe(config).split(":", 1)[1]) == config
    assert parse_options("source").task == "source" and parse_options("source").classes == 100
    assert parse_options("").task == "target"


@pytest.mark.parametrize("options, message", [
    ("classes=1", "classes must be at least 2"),
    ("gap=1.5", "gap must be in"),
    ("var=-1", "var must be"),
    ("n=abc", "n=abc must be an integer"),
    ("colour=3", "unknown option 'colour'"),
    ("classes", "expected key=value"),
    ("source,gap=0.2", "the source task has no gap"),
])
def test_bad_options_are_user_errors(options, message):
    with pytest.raises(UserError, match=message):
        parse_options(options)
