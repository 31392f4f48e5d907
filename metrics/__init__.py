"""Measurements: transferability from parameter distances (more estimators join later)."""
from .transferability import (
    FROZEN,
    HEAD,
    LAYER,
    FrozenLayerWarning,
    LayerResult,
    NonFiniteTensorError,
    Transferability,
    TransferabilityMeter,
    abs_diff_sums,
    cosine_similarity,
    layerwise_transferability,
    overall_transferability,
)

__all__ = [
    "FROZEN",
    "HEAD",
    "LAYER",
    "FrozenLayerWarning",
    "LayerResult",
    "NonFiniteTensorError",
    "Transferability",
    "TransferabilityMeter",
    "abs_diff_sums",
    "cosine_similarity",
    "layerwise_transferability",
    "overall_transferability",
]
