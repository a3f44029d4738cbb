"""DeepLIFT (Rescale rule) and DeepLIFT-SHAP on the traced graph.

The model runs once on the inputs and their baselines stacked into one batch ``[x; x']``; linear
steps (layers, BatchNorm, sums, average pooling, reshapes) keep their gradient, which is exact
for differences, and every nonlinearity's backward uses the multiplier ``Δy/Δx`` between the two
halves instead of its derivative. Max pooling uses the DeepLIFT max-pool rule (as in Captum):
the output difference is split between the positions that win for the input and for the
baseline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lumos.attribution.baselines import background_set, resolve_baselines
from lumos.attribution.propagation.graph import Graph, Step, Strategy
from lumos.attribution.propagation.lrp import total
from lumos.core.batching import chunks
from lumos.core.errors import GradientError
from lumos.core.explanation import Explanation
from lumos.core.inputs import InputsLike
from lumos.core.method import Attribution, Context, Method
from lumos.core.registry import register
from lumos.core.targets import TargetLike, output_tensor

Tensor = torch.Tensor
EPS = 1e-10  # |Δx| below which the multiplier is the derivative (Captum's threshold)


class _Rescale(torch.autograd.Function):
    """Elementwise ``y = f(x)`` on ``[x; x']``; backward multiplies by ``Δy/Δx``."""

    @staticmethod
    def forward(ctx, x: Tensor, fn: Callable) -> Tensor:
        with torch.no_grad():
            y = fn(x)
        ctx.fn = fn
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, y = ctx.saved_tensors
        n = x.shape[0] // 2
        dx = (x[:n] - x[n:]).repeat(2, *([1] * (x.dim() - 1)))
        dy = (y[:n] - y[n:]).repeat(2, *([1] * (x.dim() - 1)))
        small = dx.abs() < EPS
        ratio = grad * dy / torch.where(small, torch.ones_like(dx), dx)
        if bool(small.any()):
            ratio = torch.where(small, _vjp(ctx.fn, x, grad), ratio)
        return ratio, None


class _MaxPoolRescale(torch.autograd.Function):
    """Max pooling on ``[x; x']``: ``Δy`` is split between the winners of x and of x'."""

    @staticmethod
    def forward(ctx, x: Tensor, fn: Callable) -> Tensor:
        with torch.no_grad():
            y = fn(x)
        ctx.fn = fn
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, y = ctx.saved_tensors
        n = x.shape[0] // 2
        y_top = torch.maximum(y[:n], y[n:])
        shares = torch.cat([grad[:n] * (y_top - y[n:]), grad[n:] * (y[:n] - y_top)])
        routed = _vjp(ctx.fn, x, shares)
        contribution = (routed[:n] + routed[n:]).repeat(2, *([1] * (x.dim() - 1)))
        dx = (x[:n] - x[n:]).repeat(2, *([1] * (x.dim() - 1)))
        small = dx.abs() < EPS
        multiplier = contribution / torch.where(small, torch.ones_like(dx), dx)
        if bool(small.any()):
            multiplier = torch.where(small, _vjp(ctx.fn, x, grad), multiplier)
        return multiplier, None


def _vjp(fn: Callable, x: Tensor, grad: Tensor) -> Tensor:
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(leaf), leaf, grad)
    return g


class RescaleStrategy(Strategy):
    """DeepLIFT's Rescale rule: multipliers for nonlinearities, gradients for linear steps."""

    def activation(self, step: Step, fn: Callable, x: Tensor) -> Tensor:
        return _Rescale.apply(x, fn) if x.requires_grad else fn(x)

    def max_pool(self, step: Step, fn: Callable, x: Tensor) -> Tensor:
        return _MaxPoolRescale.apply(x, fn) if x.requires_grad else fn(x)


class _DeepLiftBase(Method):
    def multipliers(
        self, ctx: Context, graph: Graph, pairs: tuple[Tensor, ...], refs: tuple[Tensor, ...],
        example: Tensor,
    ) -> tuple[Tensor, ...]:  # fmt: skip
        """``(x − x') ⊙ m`` for each (input row, reference row) pair, in chunks."""
        rows = int(pairs[0].shape[0])
        out = tuple(torch.empty_like(p) for p in pairs)
        step = None if self.batch_size is None else max(self.batch_size // 2, 1)
        strategy = RescaleStrategy()
        for s in chunks(rows, step):
            xs = tuple(
                torch.cat([p[s], r[s]]).detach().requires_grad_(True) for p, r in zip(pairs, refs)
            )
            index = torch.cat([example[s], example[s]])
            with torch.enable_grad():
                output = output_tensor(graph.run(strategy, xs))
                values = ctx.target.select(output, index)
                if not values.requires_grad:
                    raise GradientError(
                        f"{self.name}: the model output does not depend on the inputs through "
                        "differentiable operations."
                    )
                grads = torch.autograd.grad(values.sum(), xs, allow_unused=True)
            m = s.stop - s.start
            for full, g, p, r in zip(out, grads, pairs, refs):
                full[s] = 0 if g is None else (p[s] - r[s]) * g[:m]
        return out


@register("deeplift", family="propagation", needs={"gradients"})
class DeepLift(_DeepLiftBase):
    """DeepLIFT: contributions of input differences from a baseline, by the Rescale rule.

    Shrikumar, Greenside & Kundaje (2017), "Learning Important Features Through Propagating
    Activation Differences". Every nonlinearity passes back ``m = Δy/Δx`` (its derivative where
    ``|Δx| < 1e-10``), linear layers their weights; ``attr = (x − x') ⊙ m``. Max pooling uses
    the max-pool rule; functional ReLUs, residual adds and reused modules are handled (the model
    is traced with torch.fx). Summation-to-delta: ``Σ attr = f_c(x) − f_c(x')``; `delta` is the
    error.

    Options:
        baselines (call): None (zeros), a number, a tensor of one example's shape or the
            batch's, or a name (``zeros``, ``uniform``, ``blur``, ``mean``).
    """

    def explain(
        self, inputs: InputsLike, target: TargetLike = "predicted", *, baselines: Any = None
    ) -> Explanation:
        return self._run(inputs, target, baselines=baselines)

    def attribute(self, ctx: Context, baselines: Any = None) -> Attribution:
        graph = Graph(self.model, self.name)
        refs = resolve_baselines(baselines, ctx.inputs, ctx.structure)
        index = torch.arange(ctx.n, device=ctx.device)
        attributions = self.multipliers(ctx, graph, ctx.inputs, refs, index)
        f_ref = ctx.target.select(self.forward(refs, ctx.structure), index)
        delta = total(attributions) - (ctx.target_values() - f_ref).double()
        return Attribution(attributions, delta=delta)


@register("deeplift_shap", family="propagation", needs={"gradients", "baselines"})
class DeepLiftShap(_DeepLiftBase):
    """DeepLIFT-SHAP: DeepLIFT averaged over a background set of references.

    Lundberg & Lee (2017), "A Unified Approach to Interpreting Model Predictions" (DeepSHAP).
    ``attr = (1/K) Σ_k (x − b_k) ⊙ m(x, b_k)`` with the Rescale multipliers of `deeplift` for
    each of the K background rows. Summation-to-delta on average:
    ``Σ attr = f_c(x) − (1/K) Σ_k f_c(b_k)``; `delta` is the error.

    Options:
        baselines (call): the background set, K reference examples (required).
    """

    def explain(
        self, inputs: InputsLike, target: TargetLike = "predicted", *, baselines: Any = None
    ) -> Explanation:
        return self._run(inputs, target, baselines=baselines)

    def attribute(self, ctx: Context, baselines: Any = None) -> Attribution:
        background = background_set(baselines, ctx.inputs, ctx.structure, self.name)
        graph = Graph(self.model, self.name)
        n, k = ctx.n, int(background[0].shape[0])
        example = torch.arange(n, device=ctx.device).repeat_interleave(k)
        reference = torch.arange(k, device=ctx.device).repeat(n)
        pairs = tuple(x[example] for x in ctx.inputs)
        refs = tuple(b[reference] for b in background)
        per_pair = self.multipliers(ctx, graph, pairs, refs, example)
        attributions = tuple(a.view(n, k, *a.shape[1:]).mean(1) for a in per_pair)
        bg_out = output_tensor(self.forward(background, ctx.structure))
        f_bg = ctx.target.select(bg_out[reference], example).view(n, k).mean(1)
        delta = total(attributions) - (ctx.target_values() - f_bg).double()
        return Attribution(attributions, delta=delta)
