"""Gradient-weighted CAMs: each variant is the way it turns the target's gradients at the layer
into channel (or per-position) weights."""

from __future__ import annotations

import torch

from lumos.attribution.cam.base import CAMMethod, resize
from lumos.attribution.guided import GuidedBackprop
from lumos.core.errors import InputError
from lumos.core.method import Attribution, Context
from lumos.core.registry import register


@register("grad_cam", family="cam", needs={"gradients"})
class GradCAM(CAMMethod):
    """Grad-CAM: channels weighted by the spatial mean of the target's gradient.

    Selvaraju et al. (2017), "Grad-CAM: Visual Explanations from Deep Networks via
    Gradient-based Localization". ``w_k = mean_ij ∂f_c/∂A_k(i,j)``, map ``ReLU(Σ_k w_k A_k)``;
    equals Captum's LayerGradCam.
    """

    def weights(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        return grads.mean((2, 3), keepdim=True)


@register("grad_cam_plus_plus", family="cam", needs={"gradients"})
class GradCAMPlusPlus(CAMMethod):
    """Grad-CAM++: channel weights from positive gradients with per-position coefficients.

    Chattopadhay et al. (2018), "Grad-CAM++: Improved Visual Explanations for Deep
    Convolutional Networks". With ``g = ∂f_c/∂A``: ``α_kij = g² / (2g² + Σ_ab A_kab · g³)``
    (0 where g = 0), ``w_k = Σ_ij α_kij ReLU(g_kij)`` — the closed form for an exponential
    output, as in the paper and pytorch-grad-cam.
    """

    def weights(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        g2 = grads.pow(2)
        denominator = 2 * g2 + acts.sum((2, 3), keepdim=True) * g2 * grads + 1e-6
        alpha = torch.where(grads != 0, g2 / denominator, torch.zeros_like(grads))
        return (alpha * grads.clamp(min=0)).sum((2, 3), keepdim=True)


@register("xgrad_cam", family="cam", needs={"gradients"})
class XGradCAM(CAMMethod):
    """XGrad-CAM: gradients weighted by the normalized activations.

    Fu et al. (2020), "Axiom-based Grad-CAM". ``w_k = Σ_ij (A_kij / Σ_ab A_kab) ∂f_c/∂A_kij``,
    chosen to satisfy sensitivity and conservation for piecewise-linear heads.
    """

    def weights(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        mass = acts.sum((2, 3), keepdim=True) + 1e-7
        return (grads * acts / mass).sum((2, 3), keepdim=True)


@register("hires_cam", family="cam", needs={"gradients"})
class HiResCAM(CAMMethod):
    """HiResCAM: the gradient times the activation, summed over channels (no averaging).

    Draelos & Carin (2020), "Use HiResCAM instead of Grad-CAM for faithful explanations".
    ``map_ij = Σ_k ∂f_c/∂A_kij · A_kij``; for a head that is linear in A it sums to the
    output minus the bias (with relu=False, upsample=False).
    """

    def weights(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        return grads


@register("layer_cam", family="cam", needs={"gradients"})
class LayerCAM(CAMMethod):
    """LayerCAM: activations weighted by the positive gradient at each position.

    Jiang et al. (2021), "LayerCAM: Exploring Hierarchical Class Activation Maps for
    Localization". ``map_ij = Σ_k ReLU(∂f_c/∂A_kij) · A_kij``; sharp maps also at shallow layers,
    which is why it is often fused over several layers (``layer=[...]``).
    """

    def weights(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        return grads.clamp(min=0)


@register("guided_grad_cam", family="cam", needs={"gradients"})
class GuidedGradCAM(GradCAM):
    """Guided Grad-CAM: guided backpropagation multiplied by the upsampled Grad-CAM map.

    Selvaraju et al. (2017). ``attr = GuidedBackprop(x) ⊙ upsample(ReLU(Σ_k w_k A_k))``, with
    Grad-CAM's weights; the result has the inputs' shape (a pixel-level, class-discriminative
    map). Always upsampled, so `upsample` is ignored.
    """

    def attribute(self, ctx: Context) -> Attribution:
        cam = super().attribute(ctx)
        (maps,) = cam.attributions
        guided = GuidedBackprop(self.model, batch_size=self.batch_size).gradients(ctx)
        if any(g.dim() != 4 for g in guided):
            raise InputError(f"{self.name} needs image inputs (B, C, H, W).")
        attributions = tuple(g * resize(maps, tuple(g.shape[-2:])).to(g.dtype) for g in guided)
        return Attribution(attributions, extras=cam.extras)
