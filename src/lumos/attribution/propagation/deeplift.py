"""DeepLIFT (Rescale and RevealCancel rules) and DeepLIFT-SHAP on the traced graph.

The model runs once on the inputs and their baselines stacked into one batch ``[x; x']``; linear
steps (layers, BatchNorm, sums, average pooling, reshapes) keep their gradient, which is exact
for differences, and every nonlinearity's backward uses the multiplier ``Δy/Δx`` between the two
halves instead of its derivative. Max pooling uses the DeepLIFT max-pool rule (as in Captum):
the output difference is split between the positions that win for the input and for the
baseline. The RevealCancel rule (`rule="reveal_cancel"`) runs ``[x'; Δ⁺; Δ⁻]`` instead and
keeps positive and negative differences apart through every linear step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from lumos.attribution.baselines import background_set, resolve_baselines
from lumos.attribution.propagation.canonizers import MergeBatchNorm
from lumos.attribution.propagation.graph import Graph, Layer, Step, Strategy, weighted_sum
from lumos.attribution.propagation.lrp import total
from lumos.core.batching import chunks
from lumos.core.errors import GradientError, UnsupportedModelError, unknown_name
from lumos.core.explanation import Explanation
from lumos.core.inputs import InputsLike, Structure
from lumos.core.method import Attribution, Context, Live, Method
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
            x1, x0 = x.chunk(2)
            dx = x1 - x0
            small = dx.abs() < EPS
            multiplier = (y.chunk(2)[0] - y.chunk(2)[1]) / dx.masked_fill(small, 1.0)
        if bool(small.any()):
            multiplier = torch.where(small, _vjp(fn, x1, torch.ones_like(x1)), multiplier)
        ctx.save_for_backward(multiplier)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        (multiplier,) = ctx.saved_tensors
        return _both_halves(grad, multiplier), None


class _MaxPoolRescale(torch.autograd.Function):
    """Max pooling on ``[x; x']``: ``Δy`` is split between the winners of x and of x'.

    The pooling runs once, with its own small autograd graph kept for the backward pass, which
    routes the shares (and, where ``Δx = 0``, the plain gradient) through it.
    """

    @staticmethod
    def forward(ctx, x: Tensor, fn: Callable) -> Tensor:
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            out = fn(leaf)
        ctx.leaf, ctx.out = leaf, out
        return out.detach()

    @staticmethod
    def backward(ctx, grad: Tensor):
        leaf, out = ctx.leaf, ctx.out
        x, y = leaf.detach(), out.detach()
        (y1, y0), (g1, g0), (x1, x0) = y.chunk(2), grad.chunk(2), x.chunk(2)
        y_top = torch.maximum(y1, y0)
        shares = torch.empty_like(grad)
        torch.mul(g1, y_top - y0, out=shares[: len(g1)])
        torch.mul(g0, y1 - y_top, out=shares[len(g1) :])
        dx = x1 - x0
        small = dx.abs() < EPS
        any_small = bool(small.any())
        (routed,) = torch.autograd.grad(out, leaf, shares, retain_graph=any_small)
        result = torch.empty_like(x)
        first = result[: len(x1)]
        torch.div(routed[: len(x1)] + routed[len(x1) :], dx.masked_fill_(small, 1.0), out=first)
        result[len(x1) :] = first
        if any_small:
            (plain,) = torch.autograd.grad(out, leaf, grad)
            result = torch.where(small.repeat(2, *([1] * (x.dim() - 1))), plain, result)
        del ctx.leaf, ctx.out
        return result, None


def _both_halves(grad: Tensor, multiplier: Tensor) -> Tensor:
    """``grad ⊙ [m; m]`` for a ``[x; x']`` batch without copying `m`."""
    return (grad.view(2, *multiplier.shape) * multiplier).view_as(grad)


def _vjp(fn: Callable, x: Tensor, grad: Tensor) -> Tensor:
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(leaf), leaf, grad)
    return g


class RescaleStrategy(Strategy):
    """DeepLIFT's Rescale rule: multipliers for nonlinearities, gradients for linear steps.

    Rows are ``[x; x']``; every row's output is a target (both halves carry the same
    multipliers), and the attribution is ``(x − x') ⊙ m`` on the first half.
    """

    copies = 2

    def rows(self, x: Tensor, ref: Tensor) -> Tensor:
        return torch.cat([x, ref])

    def seeded(self, values: Tensor, m: int) -> Tensor:
        return values.sum()

    def reference_values(self, values: Tensor, m: int) -> Tensor:
        return values[m:]

    def contributions(self, x: Tensor, ref: Tensor, grad: Tensor, m: int) -> Tensor:
        return (x - ref) * grad[:m]

    def activation(self, step: Step, fn: Callable, x: Tensor) -> Tensor:
        return _Rescale.apply(x, fn) if x.requires_grad else fn(x)

    def max_pool(self, step: Step, fn: Callable, x: Tensor) -> Tensor:
        return _MaxPoolRescale.apply(x, fn) if x.requires_grad else fn(x)


class _RevealCancel(torch.autograd.Function):
    """Elementwise ``f`` on ``[x'; Δ⁺; Δ⁻]``: the output's reference value and its positive and
    negative differences; backward multiplies by ``m⁺ = Δy⁺/Δx⁺`` and ``m⁻ = Δy⁻/Δx⁻``."""

    @staticmethod
    def forward(ctx, x: Tensor, fn: Callable) -> Tensor:
        with torch.no_grad():
            ref, pos, neg = x.chunk(3)
            y_ref, y_pos, y_neg, y_both = fn(ref), fn(ref + pos), fn(ref + neg), fn(ref + pos + neg)
            d_pos = 0.5 * (y_pos - y_ref) + 0.5 * (y_both - y_neg)
            d_neg = 0.5 * (y_neg - y_ref) + 0.5 * (y_both - y_pos)
        ctx.fn = fn
        ctx.save_for_backward(ref, pos, neg, d_pos, d_neg)
        return torch.cat([y_ref, d_pos, d_neg])

    @staticmethod
    def backward(ctx, grad: Tensor):
        ref, pos, neg, d_pos, d_neg = ctx.saved_tensors
        _, g_pos, g_neg = grad.chunk(3)
        slope = _vjp(ctx.fn, ref, torch.ones_like(ref))
        m_pos = torch.where(pos.abs() < EPS, slope, d_pos / torch.where(pos == 0, 1, pos))
        m_neg = torch.where(neg.abs() < EPS, slope, d_neg / torch.where(neg == 0, 1, neg))
        return torch.cat([torch.zeros_like(ref), g_pos * m_pos, g_neg * m_neg]), None


def _mix(pos: Tensor, neg: Tensor, up: Callable, down: Callable) -> tuple[Tensor, Tensor]:
    """Positive and negative parts through a linear map split into its positive (`up`) and
    negative (`down`) parts: ``(up Δ⁺ + down Δ⁻, down Δ⁺ + up Δ⁻)``."""
    return up(pos) + down(neg), down(pos) + up(neg)


class RevealCancelStrategy(RescaleStrategy):
    """DeepLIFT's RevealCancel rule: positive and negative differences travel separately.

    Rows are ``[x'; Δ⁺; Δ⁻]`` with ``Δ⁺ = max(x − x', 0)``, ``Δ⁻ = min(x − x', 0)``; linear
    steps send ``W⁺Δ⁺ + W⁻Δ⁻`` to the positive and ``W⁻Δ⁺ + W⁺Δ⁻`` to the negative part, and
    the attribution is ``Δ⁺ ⊙ m⁺ + Δ⁻ ⊙ m⁻``.
    """

    copies = 3

    def rows(self, x: Tensor, ref: Tensor) -> Tensor:
        delta = x - ref
        return torch.cat([ref, delta.clamp(min=0), delta.clamp(max=0)])

    def seeded(self, values: Tensor, m: int) -> Tensor:
        return values[m:].sum()

    def reference_values(self, values: Tensor, m: int) -> Tensor:
        return values[:m]

    def contributions(self, x: Tensor, ref: Tensor, grad: Tensor, m: int) -> Tensor:
        delta = x - ref
        return delta.clamp(min=0) * grad[m : 2 * m] + delta.clamp(max=0) * grad[2 * m :]

    def layer(self, step: Step, layer: Layer, x: Tensor) -> Tensor:
        ref, pos, neg = x.chunk(3)
        w = layer.weight

        def part(sign: int) -> Callable:
            weight = w.clamp(min=0) if sign > 0 else w.clamp(max=0)
            return lambda t: layer.fn(t, weight, None)

        return torch.cat([layer(ref), *_mix(pos, neg, part(1), part(-1))])

    def affine(self, step: Step, fn: Callable, x: Tensor) -> Tensor:
        ref, pos, neg = x.chunk(3)
        with torch.no_grad():
            slope = fn(torch.ones_like(ref)) - fn(torch.zeros_like(ref))
        up, down = slope.clamp(min=0), slope.clamp(max=0)
        return torch.cat([fn(ref), *_mix(pos, neg, lambda t: up * t, lambda t: down * t)])

    def avg_pool(self, step: Step, fn: Callable, x: Tensor) -> Tensor:
        return torch.cat([fn(t) for t in x.chunk(3)])

    def sum(self, step: Step, terms: list[Tensor], signs: list[float]) -> Tensor:
        parts = [t.chunk(3) for t in terms]
        ref = weighted_sum([p[0] for p in parts], signs)
        pos, neg = 0, 0
        for (_, p, q), sign in zip(parts, signs):
            up, down = max(sign, 0.0), min(sign, 0.0)
            pos, neg = pos + up * p + down * q, neg + down * p + up * q
        return torch.cat([ref, pos, neg])

    def activation(self, step: Step, fn: Callable, x: Tensor) -> Tensor:
        return _RevealCancel.apply(x, fn)

    def max_pool(self, step: Step, fn: Callable, x: Tensor) -> Tensor:
        raise UnsupportedModelError(
            f"DeepLIFT's RevealCancel rule is not defined for max pooling ('{step.path}'); use "
            "rule='rescale', which has the max-pool rule."
        )


RULES = {"rescale": RescaleStrategy, "reveal_cancel": RevealCancelStrategy}


class _DeepLiftBase(Method):
    """Shared options: `rule` (``rescale`` | ``reveal_cancel``) and `batch_size`."""

    def __init__(
        self, model: Callable, *, rule: str = "rescale", batch_size: int | None = None
    ) -> None:
        super().__init__(model, batch_size=batch_size)
        if rule not in RULES:
            raise unknown_name("DeepLIFT rule", rule, RULES)
        self.rule = rule

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "rule": self.rule}

    def multipliers(
        self, ctx: Context, graph: Graph, refs: tuple[Tensor, ...], example: Tensor,
        reference: Tensor, first: tuple[tuple[Tensor, ...], Tensor] | None = None,
    ) -> tuple[tuple[Tensor, ...], Tensor]:  # fmt: skip
        """DeepLIFT for the pairs (input row `example[i]`, reference row `reference[i]`), built
        chunk by chunk: the contributions ``(x − x') ⊙ m`` summed per input example, and the
        target's value at each pair's reference. `first` is the `(rows, output)` of the pass
        over all pairs when the pipeline already ran it (see `live_forward`)."""
        strategy = RULES[self.rule]()
        rows = int(example.shape[0])
        totals = tuple(torch.zeros_like(x) for x in ctx.inputs)
        f_ref = torch.empty(rows, dtype=torch.float64, device=ctx.device)
        step = None if self.batch_size is None else max(self.batch_size // strategy.copies, 1)
        for s in chunks(rows, step):
            m, e = s.stop - s.start, example[s]
            pairs = tuple((x[e], r[reference[s]]) for x, r in zip(ctx.inputs, refs))
            if first is None:
                xs, output = self.pass_over(graph, strategy, pairs, ctx.structure)
            else:
                (xs, output), first = first, None
            with torch.enable_grad():
                values = ctx.target.select(output, e.repeat(strategy.copies))
                if not values.requires_grad:
                    raise GradientError(
                        f"{self.name}: the model output does not depend on the inputs "
                        "through differentiable operations."
                    )
                seed = strategy.seeded(values, m)
                grads = torch.autograd.grad(seed, xs, allow_unused=True)
            for total_, g, (x, r) in zip(totals, grads, pairs):
                if g is not None:
                    total_.index_add_(0, e, strategy.contributions(x, r, g, m))
            f_ref[s] = strategy.reference_values(values.detach(), m).double()
        return totals, f_ref

    def pass_over(
        self, graph: Graph, strategy: Strategy, pairs: Sequence[tuple[Tensor, Tensor]],
        structure: Structure,
    ) -> tuple[tuple[Tensor, ...], Tensor]:  # fmt: skip
        """The traced model on the strategy's rows of (input, reference) pairs, with gradients:
        `(rows, output)`."""
        xs = tuple(strategy.rows(x, r).requires_grad_(True) for x, r in pairs)
        keys = structure.keys if structure.kind == "dict" else None
        with torch.enable_grad(), self.calling(xs):
            return xs, output_tensor(graph.run(strategy, xs, keys))

    def graph(self) -> Graph:
        """This call's traced copy of the model with BatchNorm merged (exact for differences;
        saves passes); the copy is dropped afterwards, so nothing needs undoing."""
        graph = Graph(self.model, self.name)
        MergeBatchNorm().apply(graph)
        return graph


@register("deeplift", family="propagation", needs={"gradients"})
class DeepLift(_DeepLiftBase):
    """DeepLIFT: contributions of input differences from a baseline (Rescale or RevealCancel).

    Shrikumar, Greenside & Kundaje (2017), "Learning Important Features Through Propagating
    Activation Differences". Every nonlinearity passes back ``m = Δy/Δx`` (its derivative where
    ``|Δx| < 1e-10``), linear layers their weights; ``attr = (x − x') ⊙ m``. Max pooling uses
    the max-pool rule; functional ReLUs, residual adds and reused modules are handled (the model
    is traced with torch.fx). Summation-to-delta: ``Σ attr = f_c(x) − f_c(x')``; `delta` is the
    error.

    Options:
        rule: ``rescale`` or ``reveal_cancel`` (Shrikumar et al. 2017, §3.5.3: positive and
            negative input differences propagate separately, each nonlinearity's multipliers
            ``m± = Δy±/Δx±`` averaging the orders in which they apply; no max-pooling rule).
        baselines (call): None (zeros), a number, a tensor of one example's shape or the
            batch's, or a name (``zeros``, ``uniform``, ``blur``, ``mean``).
    """

    def explain(
        self, inputs: InputsLike, target: TargetLike = "predicted", *, baselines: Any = None
    ) -> Explanation:
        return self._run(inputs, target, baselines=baselines)

    @property
    def single_pass(self) -> bool:  # the Rescale rows [x; x'] hold the outputs on x
        return self.rule == "rescale"

    def live_forward(
        self, xs: Sequence[Tensor], structure: Structure, baselines: Any = None
    ) -> Live | None:
        """The pass over ``[x; x']`` whose first half is the model's output on the inputs, so
        the pipeline needs no forward of its own; declined when the rows exceed `batch_size`."""
        n = int(xs[0].shape[0])
        if self.batch_size is not None and 2 * n > self.batch_size:
            return None
        graph = self.graph()
        refs = resolve_baselines(baselines, xs, structure)
        pairs = tuple(zip(xs, refs))
        rows, output = self.pass_over(graph, RescaleStrategy(), pairs, structure)
        return Live(rows, output[:n], (graph, refs, (rows, output)))

    def attribute(self, ctx: Context, baselines: Any = None) -> Attribution:
        live = ctx.take_live(self)
        if live is None:
            graph, first = self.graph(), None
            refs = resolve_baselines(baselines, ctx.inputs, ctx.structure)
        else:
            graph, refs, first = live.state
        index = torch.arange(ctx.n, device=ctx.device)
        attributions, f_ref = self.multipliers(ctx, graph, refs, index, index, first)
        delta = total(attributions) - (ctx.target_values().double() - f_ref)
        return Attribution(attributions, delta=delta)


@register("deeplift_shap", family="propagation", needs={"gradients", "baselines"})
class DeepLiftShap(_DeepLiftBase):
    """DeepLIFT-SHAP: DeepLIFT averaged over a background set of references.

    Lundberg & Lee (2017), "A Unified Approach to Interpreting Model Predictions" (DeepSHAP).
    ``attr = (1/K) Σ_k (x − b_k) ⊙ m(x, b_k)`` with the Rescale multipliers of `deeplift` for
    each of the K background rows. Summation-to-delta on average:
    ``Σ attr = f_c(x) − (1/K) Σ_k f_c(b_k)``; `delta` is the error.

    Options:
        rule: ``rescale`` or ``reveal_cancel``, as for `deeplift`.
        baselines (call): the background set, K reference examples (required).
    """

    def explain(
        self, inputs: InputsLike, target: TargetLike = "predicted", *, baselines: Any = None
    ) -> Explanation:
        return self._run(inputs, target, baselines=baselines)

    def attribute(self, ctx: Context, baselines: Any = None) -> Attribution:
        background = background_set(baselines, ctx.inputs, ctx.structure, self.name)
        graph = self.graph()
        n, k = ctx.n, int(background[0].shape[0])
        example = torch.arange(n, device=ctx.device).repeat_interleave(k)
        reference = torch.arange(k, device=ctx.device).repeat(n)
        sums, f_refs = self.multipliers(ctx, graph, background, example, reference)
        attributions = tuple(a / k for a in sums)
        f_bg = f_refs.view(n, k).mean(1)
        delta = total(attributions) - (ctx.target_values().double() - f_bg)
        return Attribution(attributions, delta=delta)
