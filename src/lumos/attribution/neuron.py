"""Neuron attribution: which input features drive one unit (or one channel) of a hidden layer.

A neuron is addressed by `layer` and `neuron`: an int is a flat index into the layer's output of
one example (a unit of a Linear layer); a tuple indexes the output's dimensions after the batch —
``(channel, h, w)`` for one unit of a conv layer, ``(channel,)`` for a whole channel, explained
through its spatial mean; a callable maps the layer's output ``(B, ...)`` to one value per row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lumos.attribution.baselines import resolve_baselines
from lumos.attribution.gradient import _col, integration_rule
from lumos.attribution.layer import layer_pass, resolve_one_layer
from lumos.core.batching import chunks
from lumos.core.errors import GradientError, InputError
from lumos.core.explanation import Explanation
from lumos.core.inputs import InputsLike
from lumos.core.method import Attribution, Context, Method, example_rows
from lumos.core.registry import register
from lumos.core.targets import TargetLike

NeuronLike = int | tuple[int, ...] | Callable[[torch.Tensor], torch.Tensor]


def neuron_mask(neuron: NeuronLike, act: torch.Tensor, method: str) -> torch.Tensor | None:
    """Weights over one example's layer output whose weighted sum is the neuron's value
    (None for a callable neuron)."""
    if callable(neuron):
        return None
    shape = tuple(act.shape[1:])
    weights = torch.zeros(shape, dtype=act.dtype, device=act.device)
    if isinstance(neuron, int) and not isinstance(neuron, bool):
        if not 0 <= neuron < weights.numel():
            raise InputError(
                f"{method}: neuron={neuron} is out of range for a layer output of shape {shape} "
                f"({weights.numel()} units per example)."
            )
        weights.view(-1)[neuron] = 1
        return weights
    index = tuple(neuron) if isinstance(neuron, (tuple, list)) else None
    if (
        not index
        or len(index) > len(shape)
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in index)
        or any(not 0 <= i < size for i, size in zip(index, shape))
    ):
        raise InputError(
            f"{method}: neuron={neuron!r} does not address the layer output of shape {shape}; "
            "pass an int (flat index), a tuple such as (channel,) or (channel, h, w), or a "
            "callable from the layer output to one value per row."
        )
    part = weights[index]
    part.fill_(1 / max(part.numel(), 1))
    return weights


def neuron_value(neuron: NeuronLike, act: torch.Tensor, weights: torch.Tensor | None):
    """The neuron's value on every row of the layer output `act`."""
    if weights is None:
        value = neuron(act)
        if not isinstance(value, torch.Tensor) or value.shape != (act.shape[0],):
            raise InputError(
                "A callable neuron must map the layer output (B, ...) to a tensor of shape (B,)."
            )
        return value
    return (act * weights).flatten(1).sum(1)


class NeuronMethod(Method):
    """Base of neuron attribution methods.

    Options:
        layer: the layer holding the neuron (dotted module path or module).
        neuron: the neuron (see the module docstring): int, tuple or callable.
    """

    def __init__(
        self,
        model: Callable,
        *,
        layer: Any = None,
        neuron: NeuronLike | None = None,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(model, batch_size=batch_size)
        self.layer_name, self.module = resolve_one_layer(self, layer)
        if neuron is None:
            raise InputError(
                f"{self.name} explains one neuron: pass neuron=(channel,), (channel, h, w), a "
                "flat int index, or a callable on the layer output."
            )
        self.neuron = neuron

    def _config(self) -> dict[str, Any]:
        neuron = self.neuron if not callable(self.neuron) else getattr(self.neuron, "__name__", "")
        return {**super()._config(), "layer": self.layer_name, "neuron": neuron}

    def neuron_values(self, ctx: Context, xs) -> torch.Tensor:
        """The neuron's value on the rows `xs` (no grad; the forward stops at the layer)."""
        parts = []
        with torch.no_grad():
            for s in chunks(int(xs[0].shape[0]), self.batch_size):
                rows = [x[s] for x in xs]
                _, (act,) = layer_pass(self, [self.module], rows, ctx.structure, stop=True)
                parts.append(neuron_value(self.neuron, act, neuron_mask(self.neuron, act, "")))
        return torch.cat(parts)

    def neuron_gradients(self, make_rows, n_rows: int, example: torch.Tensor, ctx: Context):
        """Yields ``(slice, ∂neuron/∂rows, neuron values)`` chunk by chunk."""
        weights = None
        for s in chunks(n_rows, self.batch_size):
            rows = [r.detach().requires_grad_(True) for r in make_rows(s)]
            with torch.enable_grad():
                _, (act,) = layer_pass(self, [self.module], rows, ctx.structure)
                if weights is None:
                    weights = neuron_mask(self.neuron, act, self.name)
                value = neuron_value(self.neuron, act, weights)
                _check_differentiable(self.name, value)
                grads = torch.autograd.grad(value.sum(), rows, allow_unused=True)
            grads = tuple(torch.zeros_like(r) if g is None else g for r, g in zip(rows, grads))
            yield s, grads, value.detach()


def _check_differentiable(name: str, value: torch.Tensor) -> None:
    if not value.requires_grad:
        raise GradientError(
            f"{name} needs gradients, but the layer does not depend differentiably on the inputs."
        )


@register("neuron_gradient", family="neuron", needs={"gradients", "layer", "neuron"})
class NeuronGradient(NeuronMethod):
    """Neuron gradient: the gradient of one hidden neuron with respect to the input.

    Simonyan et al. (2014)'s saliency aimed at a hidden unit (Captum's NeuronGradient):
    ``attr = ∂n(x)/∂x`` for the neuron ``n`` addressed by `layer` and `neuron`. Independent of
    the target.
    """

    def attribute(self, ctx: Context) -> Attribution:
        grads = tuple(torch.empty_like(x) for x in ctx.inputs)
        index = torch.arange(ctx.n, device=ctx.device)
        for s, part, _ in self.neuron_gradients(
            lambda s: [x[s] for x in ctx.inputs], ctx.n, index, ctx
        ):
            for full, g in zip(grads, part):
                full[s] = g
        return Attribution(grads, extras={"layer": self.layer_name})


class _PathNeuronMethod(NeuronMethod):
    """Shared options of path methods: `n_steps` points of the `integration` rule and
    `baselines` at the call (None: zeros), as for `integrated_gradients`."""

    def __init__(
        self,
        model: Callable,
        *,
        layer: Any = None,
        neuron: NeuronLike | None = None,
        n_steps: int = 50,
        integration: str = "gauss_legendre",
        batch_size: int | None = None,
    ) -> None:
        super().__init__(model, layer=layer, neuron=neuron, batch_size=batch_size)
        self.points, self.weights = integration_rule(integration, n_steps)
        self.n_steps, self.integration = n_steps, integration

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "n_steps": self.n_steps, "integration": self.integration}

    def explain(
        self, inputs: InputsLike, target: TargetLike = "predicted", *, baselines: Any = None
    ) -> Explanation:
        return self._run(inputs, target, baselines=baselines)

    def path(self, ctx: Context, bases):
        """`(make_rows, example index, α per row, weight per row)` of the straight path."""
        n, device = ctx.n, ctx.device
        alphas = torch.as_tensor(self.points, device=device)
        weights = torch.as_tensor(self.weights, device=device)
        example = example_rows(n, self.n_steps, device)
        step = torch.arange(n * self.n_steps, device=device) // n

        def make_rows(s: slice) -> list[torch.Tensor]:
            e = example[s]
            return [
                b[e] + _col(alphas[step[s]], x) * (x[e] - b[e]) for x, b in zip(ctx.inputs, bases)
            ]

        return make_rows, example, weights[step]


@register("neuron_integrated_gradients", family="neuron", needs={"gradients", "layer", "neuron"})
class NeuronIntegratedGradients(_PathNeuronMethod):
    """Neuron integrated gradients: integrated gradients of one hidden neuron.

    Sundararajan et al. (2017) with the neuron as the output (Captum's
    NeuronIntegratedGradients): ``attr_i = (x_i − x'_i) ∫₀¹ ∂n(x' + α(x − x'))/∂x_i dα``.
    Completeness: ``Σ attr = n(x) − n(x')``; the error is `delta`.
    """

    def attribute(self, ctx: Context, baselines: Any = None) -> Attribution:
        bases = resolve_baselines(baselines, ctx.inputs, ctx.structure)
        make_rows, example, row_weights = self.path(ctx, bases)
        totals = tuple(torch.zeros_like(x) for x in ctx.inputs)
        for s, grads, _ in self.neuron_gradients(make_rows, len(example), example, ctx):
            for total, g in zip(totals, grads):
                total.index_add_(0, example[s], g * _col(row_weights[s], g))
        attributions = tuple((x - b) * t for x, b, t in zip(ctx.inputs, bases, totals))
        total = sum(a.flatten(1).sum(1) for a in attributions)
        change = self.neuron_values(ctx, ctx.inputs) - self.neuron_values(ctx, bases)
        delta = total - change.to(total.dtype)
        return Attribution(attributions, delta=delta, extras={"layer": self.layer_name})


@register("neuron_conductance", family="neuron", needs={"gradients", "layer", "neuron"})
class NeuronConductance(_PathNeuronMethod):
    """Neuron conductance: the part of the target's integrated gradients that flows through a
    neuron.

    Dhamdhere, Sundararajan & Yan (2018), "How Important Is a Neuron?" (Captum's
    NeuronConductance): ``attr_i = (x_i − x'_i) ∫₀¹ ∂f_c/∂n · ∂n/∂x_i dα`` along
    ``x' + α(x − x')``. For a channel (or any group of units) it is the sum of its units'
    conductances; summed over all units of a layer every path runs through, it is integrated
    gradients. A callable neuron is not supported (conductance needs units, not a function).
    """

    def attribute(self, ctx: Context, baselines: Any = None) -> Attribution:
        if callable(self.neuron):
            raise InputError(f"{self.name} needs neuron as an int or a tuple index.")
        bases = resolve_baselines(baselines, ctx.inputs, ctx.structure)
        make_rows, example, row_weights = self.path(ctx, bases)
        totals = tuple(torch.zeros_like(x) for x in ctx.inputs)
        for s in chunks(len(example), self.batch_size):
            rows = [r.detach().requires_grad_(True) for r in make_rows(s)]
            with torch.enable_grad():
                output, (act,) = layer_pass(self, [self.module], rows, ctx.structure)
                members = (neuron_mask(self.neuron, act, self.name) > 0).to(act.dtype)
                values = ctx.target.select(output, example[s])
                _check_differentiable(self.name, values)
                (g_layer,) = torch.autograd.grad(values.sum(), act, retain_graph=True)
                flow = (g_layer.detach() * members * act).sum()
                grads = torch.autograd.grad(flow, rows, allow_unused=True)
            for total, g in zip(totals, grads):
                if g is not None:
                    total.index_add_(0, example[s], g * _col(row_weights[s], g))
        attributions = tuple((x - b) * t for x, b, t in zip(ctx.inputs, bases, totals))
        return Attribution(attributions, extras={"layer": self.layer_name})
