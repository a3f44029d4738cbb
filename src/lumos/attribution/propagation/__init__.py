"""The propagation family: LRP, DeepLIFT, DeepLIFT-SHAP and excitation backprop.

All of them run on the model traced with torch.fx (`graph.Graph`), so functional code is
propagated correctly; LRP's rules, composites and canonizers are in their own modules.
"""

from lumos.attribution.propagation.canonizers import Canonizer, MergeBatchNorm
from lumos.attribution.propagation.composites import PRESETS, Composite
from lumos.attribution.propagation.graph import Affine, Sum, register_op
from lumos.attribution.propagation.rules import (
    AlphaBeta,
    Epsilon,
    Flat,
    Gamma,
    Norm,
    Pass,
    Rule,
    WSquare,
    ZBox,
    ZPlus,
)

__all__ = [
    "PRESETS",
    "Affine",
    "AlphaBeta",
    "Canonizer",
    "Composite",
    "Epsilon",
    "Flat",
    "Gamma",
    "MergeBatchNorm",
    "Norm",
    "Pass",
    "Rule",
    "Sum",
    "WSquare",
    "ZBox",
    "ZPlus",
    "register_op",
]
