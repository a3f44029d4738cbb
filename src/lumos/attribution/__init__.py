"""Attribution methods. Every module in this package registers its methods on import; the
classes are re-exported here for the object API (`lumos.attribution.IntegratedGradients`)."""

from lumos.attribution.gradient import (
    ExpectedGradients,
    InputXGradient,
    IntegratedGradients,
    Saliency,
)
from lumos.attribution.guided import Deconvnet, GuidedBackprop
from lumos.attribution.noise_tunnel import NoiseTunnel, SmoothGrad, VarGrad

__all__ = [
    "Deconvnet",
    "ExpectedGradients",
    "GuidedBackprop",
    "InputXGradient",
    "IntegratedGradients",
    "NoiseTunnel",
    "Saliency",
    "SmoothGrad",
    "VarGrad",
]
