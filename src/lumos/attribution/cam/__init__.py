"""Class activation maps: one pipeline (`CAMMethod`) whose variants differ only in how they weigh
the channels of a layer's activations."""

from lumos.attribution.cam.activation import CAM, AblationCAM, EigenCAM, ScoreCAM
from lumos.attribution.cam.base import CAMMethod
from lumos.attribution.cam.gradient import (
    GradCAM,
    GradCAMPlusPlus,
    GuidedGradCAM,
    HiResCAM,
    LayerCAM,
    XGradCAM,
)

__all__ = [
    "CAM",
    "AblationCAM",
    "CAMMethod",
    "EigenCAM",
    "GradCAM",
    "GradCAMPlusPlus",
    "GuidedGradCAM",
    "HiResCAM",
    "LayerCAM",
    "ScoreCAM",
    "XGradCAM",
]
