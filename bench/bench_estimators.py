"""Benchmark: the five feature-based estimators together (metrics/estimators.py) against a
straightforward implementation of the same formulas, on features of the size ImageNet models
give on a mid-sized target.

    python bench/bench_estimators.py [--samples 10000] [--dim 2048] [--classes 100] [--source_classes 1000]

Features are class means plus Gaussian noise (float32, as extracted), the source head's
logits are random with a bias towards one source class per target class, and the labels are
balanced. The straightforward side is what one writes from the papers with numpy in float64:

* LogME: per class, the eigendecomposition of F^T F and You et al.'s fixed-point iteration
  for alpha and beta until both change by less than 1e-10 (relative) or 1000 steps;
* LEEP: the joint P(y, z) accumulated class by class, then the expectation per sample;
* NCE: the joint counts of (y, z) from one pass over the samples;
* H-score: numpy's covariance of the features and of the class means, ``pinv`` and a trace;
* k-NN: the full n x n cosine similarity matrix and a sort of every row.

It prints the seconds of each estimator on each side, the total and the ratio, and the
largest difference between the two sides' values (the implementations share no code).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metrics.estimators import hscore, knn, leep, logme, nce  # noqa: E402

K = 5


def make_task(samples: int, dim: int, classes: int, source_classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.arange(samples) % classes
    rng.shuffle(labels)
    means = rng.normal(size=(classes, dim)).astype(np.float32) * 0.5
    features = means[labels] + rng.normal(size=(samples, dim)).astype(np.float32)
    logits = rng.normal(size=(samples, source_classes)).astype(np.float32)
    logits[np.arange(samples), (labels * 7) % source_classes] += 3.0
    return features, logits, labels


# ------------------------------------------------------------------ straightforward side


def plain_logme(features: np.ndarray, labels: np.ndarray) -> float:
    f = features.astype(np.float64)
    n, d = f.shape
    evidences = []
    for c in np.unique(labels):
        y = (labels == c).astype(np.float64)
        sigma, v = np.linalg.eigh(f.T @ f)  # once per class
        sigma = np.clip(sigma, 0, None)
        projected = v.T @ (f.T @ y)
        alpha, beta = 1.0, 1.0
        for _ in range(1000):
            gamma = np.sum(beta * sigma / (alpha + beta * sigma))
            m = v @ (beta * projected / (alpha + beta * sigma))
            new_alpha = gamma / (m @ m)
            new_beta = (n - gamma) / np.sum((f @ m - y) ** 2)
            done = abs(new_alpha / alpha - 1) < 1e-10 and abs(new_beta / beta - 1) < 1e-10
            alpha, beta = new_alpha, new_beta
            if done:
                break
        m = v @ (beta * projected / (alpha + beta * sigma))
        evidence = (n * math.log(beta) + d * math.log(alpha) - n * math.log(2 * math.pi)
                    - beta * np.sum((f @ m - y) ** 2) - alpha * m @ m - np.sum(np.log(alpha + beta * sigma))) / 2
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def plain_leep(probabilities: np.ndarray, labels: np.ndarray) -> float:
    n = len(labels)
    classes = np.unique(labels)
    joint = np.stack([probabilities[labels == c].sum(0) for c in classes]) / n
    conditional = joint / joint.sum(0)
    row = {c: i for i, c in enumerate(classes)}
    return float(np.mean([np.log(probabilities[i] @ conditional[row[labels[i]]]) for i in range(n)]))


def plain_nce(source_labels: np.ndarray, labels: np.ndarray) -> float:
    counts: dict[tuple[int, int], int] = {}
    for z, y in zip(source_labels.tolist(), labels.tolist()):
        counts[(y, z)] = counts.get((y, z), 0) + 1
    per_source: dict[int, int] = {}
    for (_, z), count in counts.items():
        per_source[z] = per_source.get(z, 0) + count
    n = len(labels)
    return float(sum(count / n * math.log(count / per_source[z]) for (_, z), count in counts.items()))


def plain_hscore(features: np.ndarray, labels: np.ndarray) -> float:
    f = features.astype(np.float64)
    means = {c: f[labels == c].mean(0) for c in np.unique(labels)}
    g = np.stack([means[c] for c in labels])
    return float(np.trace(np.linalg.pinv(np.cov(f, rowvar=False)) @ np.cov(g, rowvar=False)))


def plain_knn(features: np.ndarray, labels: np.ndarray, k: int) -> float:
    f = features.astype(np.float64)
    unit = f / np.linalg.norm(f, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    correct = 0
    for i in range(len(labels)):
        nearest = np.argsort(-similarity[i])[:k]
        votes: dict[int, list[float]] = {}
        for j in nearest:
            entry = votes.setdefault(int(labels[j]), [0, 0.0])
            entry[0] += 1
            entry[1] += similarity[i, j]
        predicted = max(sorted(votes), key=lambda c: (votes[c][0], votes[c][1]))
        correct += predicted == labels[i]
    return correct / len(labels)


# ----------------------------------------------------------------------------- timing


def on_device(device: str, **arrays: np.ndarray) -> dict:
    """The arrays as given (cpu), or as tensors on the GPU, copied there before any timing."""
    if device == "cpu":
        return arrays
    moved = {name: torch.from_numpy(array).to(device) for name, array in arrays.items()}
    torch.cuda.synchronize()
    return moved


def timed(function, *args) -> tuple[float, float]:
    tick = time.perf_counter()
    value = function(*args)  # a Python float: the device has finished
    return value, time.perf_counter() - tick


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--source_classes", type=int, default=1000)
    parser.add_argument("--device", default="cpu",
                        help="where our side computes: cpu (numpy inputs) or cuda (tensors given on the GPU; the "
                        "straightforward side stays on the CPU)")
    args = parser.parse_args()
    features, logits, labels = make_task(args.samples, args.dim, args.classes, args.source_classes)
    where = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(f"{args.samples:,} samples, {args.dim}-d float32 features, {args.classes} classes, "
          f"{args.source_classes} source classes; torch {torch.__version__}, ours on {args.device} ({where})")
    probabilities = torch.softmax(torch.from_numpy(logits).double(), 1).numpy()
    source_labels = logits.argmax(1)
    given = on_device(args.device, features=features, labels=labels, probabilities=probabilities,
                      source_labels=source_labels)
    ours = {
        "logme": lambda: logme(given["features"], given["labels"]),
        "leep": lambda: leep(given["probabilities"], given["labels"]),
        "nce": lambda: nce(given["source_labels"], given["labels"]),
        "hscore": lambda: hscore(given["features"], given["labels"]),
        "knn": lambda: knn(given["features"], given["labels"], K),
    }
    plain = {
        "logme": lambda: plain_logme(features, labels),
        "leep": lambda: plain_leep(probabilities, labels),
        "nce": lambda: plain_nce(source_labels, labels),
        "hscore": lambda: plain_hscore(features, labels),
        "knn": lambda: plain_knn(features, labels, K),
    }
    print(f"{'estimator':<9} {'ours (s)':>9} {'plain (s)':>10} {'ratio':>7}   {'ours':>14} {'plain':>14}")
    totals = [0.0, 0.0]
    worst = 0.0
    for name in ours:
        value, seconds = timed(ours[name])
        reference, plain_seconds = timed(plain[name])
        totals[0] += seconds
        totals[1] += plain_seconds
        worst = max(worst, abs(value - reference) / max(1.0, abs(reference)))
        print(f"{name:<9} {seconds:>9.2f} {plain_seconds:>10.2f} {plain_seconds / seconds:>6.1f}x   "
              f"{value:>14.8g} {reference:>14.8g}", flush=True)
    print(f"{'all five':<9} {totals[0]:>9.2f} {totals[1]:>10.2f} {totals[1] / totals[0]:>6.1f}x")
    print(f"largest difference between the two sides: {worst:.2g} (relative to max(1, |value|))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
