"""Measurements: transferability from parameter distances (more estimators join later)."""
from .transferability import (
    COS_INIT_WARNING,
    FROZEN,
    HEAD,
    LAYER,
    FrozenLayerWarning,
    LayerResult,
    NonFiniteTensorError,
    Transferability,
    TransferabilityMeter,
    abs_diff_sums,
    layerwise_transferability,
    overall_transferability,
)

__all__ = [
    "COS_INIT_WARNING",
    "FROZEN",
    "HEAD",
    "LAYER",
    "FrozenLayerWarning",
    "LayerResult",
    "NonFiniteTensorError",
    "Transferability",
    "TransferabilityMeter",
    "abs_diff_sums",
    "layerwise_transferability",
    "overall_transferability",
]
