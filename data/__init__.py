"""Datasets: the registry (:func:`build_dataset`), image transforms and image loading.

The synthetic benchmark lives in ``data.synthetic`` and is imported only when a
``synthetic`` dataset is built.
"""
from data.datasets import (
    DATASETS,
    DatasetSpec,
    build_dataset,
    canonical_name,
    collate_skip_none,
    dataset_names,
    default_img_size,
    seeded_split,
)
from data.image_io import CorruptImageError, load_rgb
from data.transforms import NORMALIZE_MEAN, NORMALIZE_STD, build_transform

__all__ = [
    "DATASETS",
    "NORMALIZE_MEAN",
    "NORMALIZE_STD",
    "CorruptImageError",
    "DatasetSpec",
    "build_dataset",
    "build_transform",
    "canonical_name",
    "collate_skip_none",
    "dataset_names",
    "default_img_size",
    "load_rgb",
    "seeded_split",
]
