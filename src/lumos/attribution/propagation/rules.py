"""LRP rules: small declarative objects saying how relevance flows through one linear layer.

A rule is a list of *branches* and a *weighting*, as in Zennit (Anders et al. 2021). Branch i
evaluates the layer on a modified input ``x_i`` with modified parameters ``(W_i, b_i)``, giving
``z_i``; the weighting maps the relevance arriving at the layer's output to one coefficient
tensor ``m_i`` per branch; and the relevance of the layer's input is
``R_in = Σ_i x_i ⊙ J_iᵀ m_i`` with ``J_i = ∂z_i/∂x_i``. For the ε-rule, one unmodified branch and
``m = R_out / (z + ε·sign z)`` give ``R_j = Σ_k x_j w_jk R_k / (z_k + ε·sign z_k)``.

`propagate` implements a rule as part of *one* forward/backward pass (the gradient trick): the
forward value is the layer's ordinary output, and autograd's backward carries relevance, so
explaining costs about one forward and one backward pass, not a pass per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lumos.core.errors import InputError

Tensor = torch.Tensor
Modifier = Callable[[Tensor], Tensor]


def stabilize(z: Tensor | float, epsilon: float) -> Tensor | float:
    """``z + ε·sign(z)`` with sign(+0) = +1: keeps every denominator at least ε away from zero.

    Computed as ``(|z| + ε)`` carrying z's sign bit, in place on one new tensor: several times
    faster than `torch.where` on large activations (a −0.0 gets −ε, equally far from zero).
    """
    if not isinstance(z, Tensor):
        return z + epsilon if z >= 0 else z - epsilon
    return z.abs().add_(epsilon).copysign_(z)


def _positive(t: Tensor) -> Tensor:
    return t.clamp(min=0)


def _negative(t: Tensor) -> Tensor:
    return t.clamp(max=0)


@dataclass(frozen=True)
class Branch:
    """One evaluation of the layer: ``z_i = layer(inputs(x); params(W), params(b) or 0)``.

    `inputs` and `params` are None for "unchanged"; `sign` says whether the modified input is
    all non-negative (+1) or non-positive (−1), which lets a branch be skipped when its input is
    identically zero (``x⁻`` after a ReLU) and it has no bias.
    """

    inputs: Modifier | None = None
    params: Modifier | None = None
    bias: bool = True
    sign: int = 0


class Rule:
    """Base class of LRP rules: `branches()` and `weigh(relevance, outputs, output)`.

    `outputs` holds each branch's ``z_i`` (the float 0.0 for a skipped branch) and `output` the
    layer's ordinary output; `weigh` returns one coefficient tensor per branch.
    """

    def branches(self) -> tuple[Branch, ...]:
        raise NotImplementedError

    def weigh(
        self, relevance: Tensor, outputs: Sequence[Tensor | float], output: Tensor
    ) -> tuple[Tensor | float, ...]:
        raise NotImplementedError


@dataclass(frozen=True)
class Epsilon(Rule):
    """LRP-ε (Bach et al. 2015): ``R_j = Σ_k x_j w_jk R_k / (z_k + ε·sign z_k)``; ε = 0 is LRP-0."""

    epsilon: float = 1e-6

    def branches(self) -> tuple[Branch, ...]:
        return (Branch(),)

    def weigh(self, relevance, outputs, output):
        denominator = stabilize(outputs[0], self.epsilon)
        if (
            isinstance(denominator, Tensor)
            and denominator.shape == relevance.shape
            and denominator.dtype == relevance.dtype
        ):
            return (torch.div(relevance, denominator, out=denominator),)  # no new tensor
        return (relevance / denominator,)


@dataclass(frozen=True)
class Norm(Epsilon):
    """Normalize by the output (sums, average pooling): LRP-ε with ε only a stabilizer."""


@dataclass(frozen=True)
class ZPlus(Rule):
    """LRP-z⁺ (Montavon et al. 2017): only positive contributions ``(x_j w_jk)⁺`` count.

    ``R_j = Σ_k (x_j⁺ w_jk⁺ + x_j⁻ w_jk⁻) R_k / Σ_j' (x_j'⁺ w_j'k⁺ + x_j'⁻ w_j'k⁻ + b_k⁺)``, the
    bias term dropped with ``bias=False`` (excitation backprop).
    """

    stabilizer: float = 1e-6
    bias: bool = True

    def branches(self) -> tuple[Branch, ...]:
        return (
            Branch(_positive, _positive, bias=self.bias, sign=1),
            Branch(_negative, _negative, bias=False, sign=-1),
        )

    def weigh(self, relevance, outputs, output):
        scaled = relevance / stabilize(outputs[0] + outputs[1], self.stabilizer)
        return (scaled, scaled)


@dataclass(frozen=True)
class AlphaBeta(Rule):
    """LRP-αβ (Bach et al. 2015), α − β = 1: positive parts weighted α, negative parts β.

    ``R_j = Σ_k (α (x_j w_jk)⁺ / z_k⁺ − β (x_j w_jk)⁻ / z_k⁻) R_k``.
    """

    alpha: float = 2.0
    beta: float = 1.0
    stabilizer: float = 1e-6

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.beta < 0 or abs(self.alpha - self.beta - 1) > 1e-12:
            raise InputError(
                f"AlphaBeta needs alpha, beta >= 0 with alpha - beta = 1 (conservation), got "
                f"alpha={self.alpha}, beta={self.beta}."
            )

    def branches(self) -> tuple[Branch, ...]:
        return (
            Branch(_positive, _positive, sign=1),
            Branch(_negative, _negative, bias=False, sign=-1),
            Branch(_positive, _negative, sign=1),
            Branch(_negative, _positive, bias=False, sign=-1),
        )

    def weigh(self, relevance, outputs, output):
        pos = self.alpha * relevance / stabilize(outputs[0] + outputs[1], self.stabilizer)
        neg = -self.beta * relevance / stabilize(outputs[2] + outputs[3], self.stabilizer)
        return (pos, pos, neg, neg)


@dataclass(frozen=True)
class Gamma(Rule):
    """LRP-γ (Montavon et al. 2019), generalized to signed inputs (Andéol et al. 2021).

    Contributions that agree in sign with the output are boosted: with ``w + γw⁺`` for positive
    outputs, ``R_j = Σ_k x_j (w_jk + γ w_jk⁺) R_k / Σ_j' x_j' (w_j'k + γ w_j'k⁺)`` (and
    ``w + γw⁻`` for negative outputs, mirrored for negative inputs).
    """

    gamma: float = 0.25
    stabilizer: float = 1e-6

    def branches(self) -> tuple[Branch, ...]:
        up, down = self._boost(_positive), self._boost(_negative)
        return (
            Branch(_positive, up, sign=1),
            Branch(_negative, down, bias=False, sign=-1),
            Branch(_positive, down, sign=1),
            Branch(_negative, up, bias=False, sign=-1),
        )

    def _boost(self, part: Modifier) -> Modifier:
        gamma = self.gamma
        return lambda p: p + gamma * part(p)

    def weigh(self, relevance, outputs, output):
        pos = (output > 0).to(relevance.dtype) * relevance
        neg = (output < 0).to(relevance.dtype) * relevance
        pos = pos / stabilize(outputs[0] + outputs[1], self.stabilizer)
        neg = neg / stabilize(outputs[2] + outputs[3], self.stabilizer)
        return (pos, pos, neg, neg)


@dataclass(frozen=True)
class ZBox(Rule):
    """LRP-zᴮ (Montavon et al. 2017) for inputs bounded by ``low ≤ x ≤ high`` (the first layer).

    ``R_j = Σ_k (x_j w_jk − l_j w_jk⁺ − h_j w_jk⁻) R_k / Σ_j' (x_j' w_j'k − l_j' w_j'k⁺ −
    h_j' w_j'k⁻)``; `low`/`high` are numbers or tensors broadcastable to one example, or None
    for each example's minimum/maximum.
    """

    low: Any = None
    high: Any = None
    stabilizer: float = 1e-6

    def branches(self) -> tuple[Branch, ...]:
        low, high = self.low, self.high
        return (
            Branch(),
            Branch(lambda x: _bound(low, x, torch.amin), _positive),
            Branch(lambda x: _bound(high, x, torch.amax), _negative),
        )

    def weigh(self, relevance, outputs, output):
        scaled = relevance / stabilize(outputs[0] - outputs[1] - outputs[2], self.stabilizer)
        return (scaled, -scaled, -scaled)


def _bound(value: Any, x: Tensor, extreme: Callable) -> Tensor:
    if value is None:
        per_example = extreme(x.flatten(1), dim=1)
        return per_example.view((-1,) + (1,) * (x.dim() - 1)).expand_as(x)
    return torch.as_tensor(value, dtype=x.dtype, device=x.device).expand_as(x)


def _ones(t: Tensor) -> Tensor:
    return torch.ones_like(t)


def _square(t: Tensor) -> Tensor:
    return t * t


@dataclass(frozen=True)
class Flat(Rule):
    """LRP-flat (Lapuschkin et al. 2019): relevance spread uniformly over the receptive field.

    ``R_j = Σ_k R_k / Σ_j' 1`` over the inputs j' connected to output k.
    """

    stabilizer: float = 1e-6

    def branches(self) -> tuple[Branch, ...]:
        return (Branch(_ones, _ones, bias=False),)

    def weigh(self, relevance, outputs, output):
        return (relevance / stabilize(outputs[0], self.stabilizer),)


@dataclass(frozen=True)
class WSquare(Rule):
    """LRP-w² (Montavon et al. 2017): ``R_j = Σ_k w_jk² R_k / Σ_j' w_j'k²`` (unbounded inputs)."""

    stabilizer: float = 1e-6

    def branches(self) -> tuple[Branch, ...]:
        return (Branch(_ones, _square),)

    def weigh(self, relevance, outputs, output):
        return (relevance / stabilize(outputs[0], self.stabilizer),)


@dataclass(frozen=True)
class Pass(Rule):
    """Pass relevance through unchanged, position by position (activations, constant shifts)."""


# -- the gradient trick --------------------------------------------------------------------------


class _TimesInput(torch.autograd.Function):
    """Forward: the branch input `value`; backward: the incoming signal times `value`, routed to
    the layer input `carrier` (so relevance flows to x, whatever the branch did to it)."""

    @staticmethod
    def forward(ctx, carrier: Tensor, value: Tensor) -> Tensor:
        ctx.save_for_backward(value)
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (value,) = ctx.saved_tensors
        return grad * value, None


class _Weigh(torch.autograd.Function):
    """Forward: the layer's ordinary output; backward: the rule's coefficients per branch."""

    @staticmethod
    def forward(ctx, output: Tensor, weigh: Callable, n: int, live: tuple[int, ...], *outputs):
        ctx.weigh, ctx.n, ctx.live = weigh, n, live
        ctx.save_for_backward(output, *outputs)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, relevance: Tensor):
        output, *outputs = ctx.saved_tensors
        full: list[Tensor | float] = [0.0] * ctx.n  # skipped branches contribute z = 0
        for i, z in zip(ctx.live, outputs):
            full[i] = z
        coefficients = ctx.weigh(relevance, full, output)
        return (None, None, None, None, *(coefficients[i] for i in ctx.live))


class _PassThrough(torch.autograd.Function):
    """Forward: `value`; backward: the incoming relevance unchanged to `carrier`."""

    @staticmethod
    def forward(ctx, carrier: Tensor, value: Tensor) -> Tensor:
        return value.view_as(value)

    @staticmethod
    def backward(ctx, relevance: Tensor):
        return relevance, None


def pass_through(x: Tensor, value: Tensor) -> Tensor:
    """`value` (an elementwise function of `x`) with relevance passed back to `x` unchanged."""
    if not x.requires_grad:
        return value
    if value.shape != x.shape:
        value = value.expand_as(x) if value.dim() <= x.dim() else value
    if value.shape != x.shape:
        raise InputError(
            f"An elementwise operation changed the shape {tuple(x.shape)} -> "
            f"{tuple(value.shape)}; relevance cannot pass through it position by position."
        )
    return _PassThrough.apply(x, value)


LayerFn = Callable[..., Tensor]


def propagate(
    rule: Rule,
    fn: LayerFn,
    xs: Sequence[Tensor],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """``fn(*xs, weight, bias)`` whose backward pass applies `rule` to the incoming relevance.

    `xs` are the layer's inputs (several for sums); the result's value is the ordinary output.
    """
    if isinstance(rule, Pass):
        if len(xs) != 1:
            raise InputError("The Pass rule applies to elementwise operations of one input.")
        with torch.no_grad():
            value = fn(*xs, weight, bias)
        return pass_through(xs[0], value)
    if not any(x.requires_grad for x in xs):
        return fn(*xs, weight, bias)
    outputs: list[Tensor] = []
    live: list[int] = []
    exact = None
    branches = rule.branches()
    for i, branch in enumerate(branches):
        if branch.sign and not branch.bias and _vanishes(xs, branch.sign):
            continue
        values = tuple(
            x.detach() if branch.inputs is None else branch.inputs(x.detach()) for x in xs
        )
        w = weight if branch.params is None or weight is None else branch.params(weight)
        b = None if bias is None or not branch.bias else bias
        if b is not None and branch.params is not None:
            b = branch.params(b)
        carried = tuple(_TimesInput.apply(x, v) for x, v in zip(xs, values))
        z = fn(*carried, w, b)
        if branch == Branch() and exact is None:
            exact = z.detach()
        outputs.append(z)
        live.append(i)
    if exact is None:
        with torch.no_grad():
            exact = fn(*(x.detach() for x in xs), weight, bias)
    return _Weigh.apply(exact, rule.weigh, len(branches), tuple(live), *outputs)


def _vanishes(xs: Sequence[Tensor], sign: int) -> bool:
    """True when every input's part of this sign is zero (then the branch contributes nothing)."""
    if sign > 0:
        return all(bool((x <= 0).all()) for x in xs)
    return all(bool((x >= 0).all()) for x in xs)
