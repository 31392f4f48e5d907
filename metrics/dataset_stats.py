"""Dataset statistics of the paper's Section 3 table: data amount N, domain gap G and
intraclass variance D, with the project's own definitions (the paper does not say how it
computed them).

All three are measured on features of the *training* images:

* ``N`` (data amount): the number of training images of the target task, always the full
  training set (even when the features below use a subset).
* ``G`` (domain gap): the Fréchet distance between Gaussian fits of the source and target
  features, divided by the feature dimension ``d``::

      G = ( ||mu_s - mu_t||^2 + tr(S_s + S_t - 2 (S_s^{1/2} S_t S_s^{1/2})^{1/2}) ) / d

* ``D`` (intraclass variance): the mean over classes of the mean squared Euclidean distance
  of a class's features to the class mean, divided by ``d``::

      D = (1 / C) sum_c (1 / n_c) sum_{i in c} ||x_i - mu_c||^2 / d

Dividing by ``d`` makes the numbers per feature dimension, so that feature spaces of
different widths (64 for a ResNet-20, 2048 for a ResNet-50) give numbers of one scale.

Features are the penultimate-layer features of a model (the input of its classifier head,
:class:`PenultimateFeatures`; the paper's theta_A by default) or, with no model at all,
average-pooled pixels (:class:`PixelFeatures`). Extracted features can be cached on disk
(:func:`cached_features`), one ``.npz`` per (extractor, dataset, split, subset).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from utils import UserError, load_state_dict_safely, write_atomically

__all__ = [
    "FeatureExtractor",
    "PenultimateFeatures",
    "PixelFeatures",
    "cached_features",
    "dataset_statistics",
    "domain_gap",
    "extract_features",
    "frechet_distance",
    "gaussian_fit",
    "intraclass_variance",
    "subset_indices",
]

# Bumped whenever what a cache file holds changes meaning; part of every cache key.
CACHE_FORMAT = "dataset-stats-features-1"
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


def domain_gap(source_features: np.ndarray, target_features: np.ndarray) -> float:
    """G: Fréchet distance between Gaussian fits of the two feature sets, divided by ``d``."""
    source = _as_matrix(source_features, "source_features")
    target = _as_matrix(target_features, "target_features")
    if source.shape[1] != target.shape[1]:
        raise ValueError(f"feature dimensions differ: source {source.shape[1]}, target {target.shape[1]}")
    return frechet_distance(*gaussian_fit(source), *gaussian_fit(target)) / source.shape[1]


def intraclass_variance(features: np.ndarray, labels: np.ndarray) -> float:
    """D: the mean over classes of ``mean_i ||x_i - mu_c||^2`` (the class's own samples,
    divided by their number ``n_c``), divided by the feature dimension ``d``.

    Every class present in ``labels`` counts once, whatever its size; a class with a single
    sample has no spread and contributes 0 (it still counts in the mean over classes).
    """
    x = _as_matrix(features)
    y = np.asarray(labels).reshape(-1)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"{x.shape[0]} feature rows but {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise ValueError("no samples")
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    sums = np.zeros((len(classes), x.shape[1]))
    np.add.at(sums, inverse, x)
    means = sums / counts[:, None]
    squared = ((x - means[inverse]) ** 2).sum(axis=1)
    per_class = np.bincount(inverse, weights=squared, minlength=len(classes)) / counts
    return float(per_class.mean() / x.shape[1])


# ------------------------------------------------------------------------- extractors


class FeatureExtractor:
    """What :func:`extract_features` needs: ``key`` (a stable string naming the features,
    used for caching), ``to(device)`` and ``__call__(images [B, 3, H, W]) -> [B, d]``."""

    key: str

    def to(self, device: torch.device | str) -> "FeatureExtractor":
        return self

    def __call__(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


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
        from models import ARCHITECTURES, build_model, check_architecture, infer_arch, num_classes_of

        if isinstance(checkpoint, Mapping):
            source, state_dict = "the given state dict", dict(checkpoint)
            digest = _state_dict_digest(state_dict)
        else:
            path = Path(checkpoint)
            source, state_dict = str(path), load_state_dict_safely(path)
            digest = _file_digest(path)
        if arch is None:
            arch = infer_arch(state_dict)
            if arch is None:
                raise UserError(f"{source}: cannot infer the architecture from its tensors; name it "
                                f"(one of {', '.join(ARCHITECTURES)})")
        elif arch not in ARCHITECTURES:
            raise UserError(f"architecture {arch!r} is unknown; known: {', '.join(ARCHITECTURES)}")
        problem = check_architecture(arch, state_dict)
        if problem is not None:
            found = infer_arch(state_dict)
            seen = f"it looks like a {found} checkpoint" if found else problem
            raise UserError(f"{source}: is not a {arch} checkpoint ({seen}); give a {arch} checkpoint "
                            "or the matching architecture")
        head_name = ARCHITECTURES[arch].head
        if f"{head_name}.weight" not in state_dict:
            raise UserError(f"{source}: has no classifier head ({head_name}.weight is missing)")
        model = build_model(arch, num_classes_of(arch, state_dict))
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

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        self._captured = None
        try:
            self.model(images)
            if self._captured is None:
                raise RuntimeError(f"the head of {self.arch} was not called in the forward pass")
            return self._captured.flatten(1)
        finally:
            self._captured = None


# ------------------------------------------------------------------- feature extraction


def subset_indices(size: int, max_samples: int | None, seed: int = 0) -> np.ndarray:
    """Indices of the samples used: all of them in order, or ``max_samples`` of them drawn
    without replacement by ``numpy.random.default_rng(seed)`` (the same on every machine),
    sorted."""
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be positive, got {max_samples}")
    if max_samples is None or max_samples >= size:
        return np.arange(size)
    return np.sort(np.random.default_rng(seed).choice(size, size=max_samples, replace=False))


def _collate(batch: list) -> Any:
    from data import collate_skip_none  # corrupt images skipped with skip_corrupt are None

    return collate_skip_none(batch)


def extract_features(dataset: Dataset, extractor: Callable[[torch.Tensor], torch.Tensor], *,
                     batch_size: int = 256, device: torch.device | str = "cpu", max_samples: int | None = None,
                     seed: int = 0, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Features ``[n, d]`` (float32) and labels ``[n]`` (int64) of ``dataset``'s items
    ``(image, label)``, in index order.

    ``max_samples`` takes a seeded random subset (:func:`subset_indices`). Runs in batches
    under ``torch.no_grad`` on ``device``; an extractor with a ``to`` method is moved there
    first. Samples a ``skip_corrupt`` dataset returns as ``None`` are left out.
    """
    device = torch.device(device)
    indices = subset_indices(len(dataset), max_samples, seed)
    if hasattr(extractor, "to"):
        extractor = extractor.to(device) or extractor
    loader = DataLoader(Subset(dataset, indices.tolist()), batch_size=batch_size, shuffle=False,
                        num_workers=0, collate_fn=_collate, pin_memory=device.type == "cuda")
    features: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    with torch.no_grad():
        for batch in tqdm(loader, desc="features", unit="batch", disable=not progress, leave=False):
            if batch is None:
                continue
            images, targets = batch
            output = extractor(images.to(device, non_blocking=True))
            features.append(output.flatten(1).float().cpu().numpy())
            labels.append(torch.as_tensor(targets).reshape(-1).cpu().numpy().astype(np.int64))
    if not features:
        raise UserError("no sample could be loaded to extract features from")
    return np.concatenate(features), np.concatenate(labels)


# ------------------------------------------------------------------------------ cache


def _cache_path(cache_dir: Path, meta: Mapping[str, Any]) -> Path:
    text = json.dumps(meta, sort_keys=True)
    return cache_dir / f"features-{hashlib.sha256(text.encode()).hexdigest()[:24]}.npz"


def _read_cache(path: Path, meta_text: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached arrays, or ``None`` when the file is missing, unreadable or for other
    arguments (then it is recomputed and replaced)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            if str(archive["meta"]) != meta_text:
                return None
            return archive["features"], archive["labels"]
    except (OSError, ValueError, KeyError, EOFError):
        return None


def cached_features(cache_dir: str | os.PathLike, extractor: FeatureExtractor, dataset_key: str, split: str,
                    dataset: Dataset, **extract_kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    """:func:`extract_features` with a disk cache: one ``.npz`` in ``cache_dir`` per
    (extractor key, dataset key, split, dataset length, max_samples, seed), written
    atomically. ``dataset_key`` names the dataset (e.g. the --dataset string and its
    --data_dir); a file whose arguments do not match, or that cannot be read, is recomputed.
    ``batch_size``, ``device`` and ``progress`` are not part of the key.
    """
    max_samples = extract_kwargs.get("max_samples")
    if max_samples is not None and max_samples >= len(dataset):
        max_samples = None  # the whole set either way: one cache entry
    meta = {
        "format": CACHE_FORMAT,
        "extractor": extractor.key,
        "dataset": str(dataset_key),
        "split": str(split),
        "length": len(dataset),
        "max_samples": max_samples,
        "seed": int(extract_kwargs.get("seed", 0)) if max_samples is not None else None,
    }
    meta_text = json.dumps(meta, sort_keys=True)
    cache_dir = Path(cache_dir)
    path = _cache_path(cache_dir, meta)
    cached = _read_cache(path, meta_text)
    if cached is not None:
        return cached
    features, labels = extract_features(dataset, extractor, **extract_kwargs)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{cache_dir}: cannot create the feature cache folder ({err.strerror})") from None
    write_atomically(path, lambda handle: np.savez(handle, features=features, labels=labels,
                                                   meta=np.array(meta_text)))
    return features, labels


# ------------------------------------------------------------------------- statistics


def dataset_statistics(target_train: Dataset, source_train: Dataset, extractor: FeatureExtractor, *,
                       max_samples: int | None = 2000, cache_dir: str | os.PathLike | None = None,
                       target_key: str | None = None, source_key: str | None = None,
                       device: torch.device | str = "cpu", seed: int = 0, batch_size: int = 256,
                       progress: bool = True) -> dict[str, Any]:
    """N, G and D of a target task against a source task (training splits of both).

    Features of at most ``max_samples`` images of each set (the same seeded subset rule)
    are extracted, through the cache in ``cache_dir`` when given (then ``target_key`` and
    ``source_key`` name the two datasets). Returns ``{"N": len(target_train), "G": ...,
    "D": ..., "feature_dim": d, "samples": target samples used, "source_samples": source
    samples used}``.
    """
    kwargs = dict(batch_size=batch_size, device=device, max_samples=max_samples, seed=seed, progress=progress)

    def features_of(dataset: Dataset, key: str | None, name: str) -> tuple[np.ndarray, np.ndarray]:
        if cache_dir is None:
            return extract_features(dataset, extractor, **kwargs)
        if key is None:
            raise ValueError(f"cache_dir needs {name}_key, a string that names the {name} dataset")
        return cached_features(cache_dir, extractor, key, "train", dataset, **kwargs)

    target_features, target_labels = features_of(target_train, target_key, "target")
    source_features, _ = features_of(source_train, source_key, "source")
    return {
        "N": len(target_train),
        "G": domain_gap(source_features, target_features),
        "D": intraclass_variance(target_features, target_labels),
        "feature_dim": int(target_features.shape[1]),
        "samples": int(target_features.shape[0]),
        "source_samples": int(source_features.shape[0]),
    }
