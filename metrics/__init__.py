"""Measurements: transferability from parameter distances (here); the data set statistics,
the regression, curve shapes and the feature-based estimators are in their own modules."""
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
