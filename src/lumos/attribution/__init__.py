"""Attribution methods. Every module in this package registers its methods on import; the
classes are re-exported here for the object API (`lumos.attribution.IntegratedGradients`)."""

from lumos.attribution.blackbox import numpy_model
from lumos.attribution.cam import (
    CAM,
    AblationCAM,
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    GuidedGradCAM,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)
from lumos.attribution.ciu import ContextualImportanceUtility
from lumos.attribution.gradient import (
    ExpectedGradients,
    InputXGradient,
    IntegratedGradients,
    Saliency,
)
from lumos.attribution.guided import Deconvnet, GuidedBackprop
from lumos.attribution.importance import PermutationImportance, permutation_importance
from lumos.attribution.layer import (
    InternalInfluence,
    LayerActivation,
    LayerConductance,
    LayerGradientXActivation,
    LayerIntegratedGradients,
)
from lumos.attribution.lime import Lime
from lumos.attribution.neuron import NeuronConductance, NeuronGradient, NeuronIntegratedGradients
from lumos.attribution.noise_tunnel import NoiseTunnel, SmoothGrad, VarGrad
from lumos.attribution.perturbation import FeatureAblation, Occlusion, Rise
from lumos.attribution.propagation.deeplift import DeepLift, DeepLiftShap
from lumos.attribution.propagation.excitation import ExcitationBackprop
from lumos.attribution.propagation.lrp import LRP
from lumos.attribution.shapley import ExactShapley, KernelShap, ShapleySampling, waterfall_figure

__all__ = [
    "CAM",
    "LRP",
    "AblationCAM",
    "ContextualImportanceUtility",
    "Deconvnet",
    "DeepLift",
    "DeepLiftShap",
    "EigenCAM",
    "ExactShapley",
    "ExcitationBackprop",
    "ExpectedGradients",
    "FeatureAblation",
    "GradCAM",
    "GradCAMPlusPlus",
    "GuidedBackprop",
    "GuidedGradCAM",
    "HiResCAM",
    "InputXGradient",
    "IntegratedGradients",
    "InternalInfluence",
    "KernelShap",
    "LayerActivation",
    "LayerCAM",
    "LayerConductance",
    "LayerGradientXActivation",
    "LayerIntegratedGradients",
    "Lime",
    "NeuronConductance",
    "NeuronGradient",
    "NeuronIntegratedGradients",
    "NoiseTunnel",
    "Occlusion",
    "PermutationImportance",
    "Rise",
    "Saliency",
    "ScoreCAM",
    "ShapleySampling",
    "SmoothGrad",
    "VarGrad",
    "XGradCAM",
    "numpy_model",
    "permutation_importance",
    "waterfall_figure",
]
