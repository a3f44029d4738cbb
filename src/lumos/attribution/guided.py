"""Guided backpropagation and deconvnet: gradients with a modified ReLU backward pass.

Other libraries swap the backward of `nn.ReLU` modules with hooks, which silently misses
`F.relu`, `torch.relu`, `x.relu()`, in-place ReLUs and modules reused in several places. Here a
`TorchFunctionMode` intercepts every ReLU *call* during the forward pass, whatever wrote it, and
routes it through an autograd function with the method's backward rule. Activations for which
these methods have no rule (GELU, SiLU, ELU, …) raise an `UnsupportedModelError`, as does a model
in which no ReLU was found (its map would silently equal the plain gradient).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from lumos.attribution.gradient import GradientMethod
from lumos.core.errors import UnsupportedModelError
from lumos.core.inputs import Structure
from lumos.core.method import Attribution, Context
from lumos.core.model import is_scripted, unwrap_compiled
from lumos.core.registry import register
from lumos.core.targets import Target


class _GuidedReLU(torch.autograd.Function):
    """ReLU forward; backward passes only positive gradients through positive inputs."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clamp(min=0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        return grad.clamp(min=0) * (out > 0).to(grad.dtype)


class _DeconvReLU(torch.autograd.Function):
    """ReLU forward; backward applies ReLU to the gradient, ignoring the forward input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.clamp(min=0)


_RELU = {F.relu, torch.relu, torch.Tensor.relu}
_RELU_INPLACE = {F.relu_, torch.relu_, torch.Tensor.relu_}
_CLAMP = {torch.clamp, torch.Tensor.clamp, torch.clamp_min, torch.Tensor.clamp_min}
_CLAMP_INPLACE = {torch.clamp_, torch.Tensor.clamp_, torch.clamp_min_, torch.Tensor.clamp_min_}
_NO_RULE = {
    F.gelu: "gelu",
    F.silu: "silu",
    F.elu: "elu",
    F.selu: "selu",
    F.celu: "celu",
    F.leaky_relu: "leaky_relu",
    F.mish: "mish",
    F.hardswish: "hardswish",
    F.softplus: "softplus",
    F.relu6: "relu6",
    F.prelu: "prelu",
    F.rrelu: "rrelu",
    F.hardtanh: "hardtanh (ReLU6)",
    F.threshold: "threshold",
    F.hardsigmoid: "hardsigmoid",
    torch.maximum: "torch.maximum",
    torch.fmax: "torch.fmax",
    torch.Tensor.maximum: "Tensor.maximum",
}


class _ReLUOverride(TorchFunctionMode):
    """Routes every ReLU call through `rule`; counts them; refuses activations without a rule."""

    def __init__(self, rule: type[torch.autograd.Function], method: str) -> None:
        super().__init__()
        self.rule, self.method, self.count = rule, method, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _NO_RULE.get(func) or _unsupported_gate(func, args, kwargs)
        if name:
            raise UnsupportedModelError(
                f"{self.method} defines its backward rule for ReLU only, but the model calls "
                f"{name}. Use 'saliency', 'integrated_gradients' or 'smoothgrad', which are "
                "defined for any activation, or write the gate as torch.relu."
            )
        inplace = func in _RELU_INPLACE or (func is F.relu and _arg(args, kwargs, 1, "inplace"))
        if func in _RELU or func in _RELU_INPLACE or _is_relu_clamp(func, args, kwargs):
            inplace = inplace or func in _CLAMP_INPLACE
            x = args[0]
            out = self.rule.apply(x)
            self.count += 1
            if inplace and not x.is_leaf:
                # keep in-place semantics (and the rule's graph) for code that reads `x` again
                return x.copy_(out)
            return out
        return func(*args, **kwargs)


def _arg(args: Sequence, kwargs: dict, position: int, name: str, default: Any = False) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else default


def _unsupported_gate(func, args: Sequence, kwargs: dict) -> str | None:
    """Element-wise max/clamp against tensors: gates this method has no rule for."""
    if (
        func in (torch.max, torch.Tensor.max)
        and len(args) > 1
        and isinstance(args[1], torch.Tensor)
    ):
        return "torch.max(a, b)"
    if func in _CLAMP or func in _CLAMP_INPLACE:
        bounds = (_arg(args, kwargs, 1, "min", None), _arg(args, kwargs, 2, "max", None))
        if any(isinstance(b, torch.Tensor) for b in bounds):
            return "clamp with tensor bounds"
    return None


def _is_relu_clamp(func, args: Sequence, kwargs: dict) -> bool:
    """`clamp(min=0)` with no upper bound is a ReLU written another way."""
    if func not in _CLAMP and func not in _CLAMP_INPLACE:
        return False
    low = _arg(args, kwargs, 1, "min", None)
    high = _arg(args, kwargs, 2, "max", None)
    return high is None and isinstance(low, (int, float)) and low == 0


class _ModifiedReLUMethod(GradientMethod):
    rule: type[torch.autograd.Function]
    single_pass = True

    def call(self, xs: Sequence[torch.Tensor], structure: Structure) -> Any:
        modules = self.model.modules() if isinstance(self.model, torch.nn.Module) else []
        if is_scripted(self.model) or any(is_scripted(m) for m in modules):
            raise UnsupportedModelError(
                f"{self.name} cannot see inside TorchScript (the model or one of its "
                "submodules is scripted); pass the eager nn.Module."
            )
        model, self.model = self.model, unwrap_compiled(self.model)
        mode = _ReLUOverride(self.rule, self.name)
        try:
            with mode:
                output = super().call(xs, structure)
        finally:
            self.model = model
        if mode.count == 0:
            raise UnsupportedModelError(
                f"{self.name} found no ReLU in the model's forward pass, so it would equal the "
                "plain gradient. If the model gates with another construct (x * (x > 0), "
                "torch.where), rewrite it with torch.relu; otherwise use 'saliency'."
            )
        return output

    def attribute_targets(self, ctx: Context, targets: Sequence[Target]) -> list[Attribution]:
        return [Attribution(grads) for grads in self.gradients_multi(ctx, targets)]


@register("guided_backprop", family="gradient", needs={"gradients"})
class GuidedBackprop(_ModifiedReLUMethod):
    """Guided backpropagation: gradients where every ReLU passes back only positive signal.

    Springenberg et al. (2015), "Striving for Simplicity: The All Convolutional Net".
    At each ReLU ``R_in = 1[x > 0] · max(R_out, 0)``. Handles ReLU modules, functional and
    in-place ReLUs, reused modules and ``clamp(min=0)``.
    """

    rule = _GuidedReLU


@register("deconvnet", family="gradient", needs={"gradients"})
class Deconvnet(_ModifiedReLUMethod):
    """Deconvnet: gradients where every ReLU applies ReLU to the backward signal instead.

    Zeiler & Fergus (2014), "Visualizing and Understanding Convolutional Networks".
    At each ReLU ``R_in = max(R_out, 0)``, independent of the forward input.
    """

    rule = _DeconvReLU
