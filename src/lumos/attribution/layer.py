"""Layer attribution: how much each unit of a hidden layer contributes to the target.

Attributions have the layer's shape (``(B, C, h, w)`` for a conv layer, ``(B, T, D)`` for an
embedding), so they come back with ``Structure("tensor", ("layer",))``. For text models explain
the embedding layer with integer token ids as inputs and sum over the last axis for one score per
token. The helpers here (tapping a layer, gradients w.r.t. it) are shared with the CAM family and
neuron attribution.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from lumos.attribution.baselines import resolve_baselines
from lumos.attribution.gradient import _col, integration_rule
from lumos.core.batching import chunks
from lumos.core.errors import GradientError, InputError, UnsupportedModelError
from lumos.core.explanation import Explanation
from lumos.core.inputs import InputsLike, Structure
from lumos.core.method import Attribution, Context, Method, example_rows
from lumos.core.model import LayerRecorder, resolve_layer
from lumos.core.registry import register
from lumos.core.targets import Target, TargetLike

LAYER_MAPS = Structure("tensor", ("layer",))
Substitute = Callable[[torch.Tensor], torch.Tensor]


def main_tensor(output: Any) -> torch.Tensor:
    """The tensor a layer produces: its output, or the first entry of a tuple output."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise UnsupportedModelError(
        f"The layer returns {type(output).__name__}; layer methods need a tensor (or a tuple "
        "whose first entry is a tensor). Pick the submodule that produces the tensor."
    )


def _with_main(output: Any, value: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return value
    return type(output)((value, *output[1:]))


def layer_pass(
    method: Method,
    modules: Sequence[nn.Module],
    rows: Sequence[torch.Tensor],
    structure: Structure,
    *,
    substitutes: Sequence[Substitute | None] | None = None,
    leaf: bool = False,
    stop: bool = False,
) -> tuple[Any, list[torch.Tensor]]:
    """One model call on `rows`; returns the output and the activation of every module.

    `substitutes[i](activation)` is what the rest of the network sees instead of module i's
    activation (and what is returned). With `leaf`, an activation without a graph becomes a
    leaf that requires grad, so gradients w.r.t. the layer need no gradients through the part
    before it (and work for integer inputs); downstream in-place operations act on a copy.
    With `stop` (one module), the forward pass ends at the layer and the output is None.
    """
    seen: list[list[torch.Tensor]] = [[] for _ in modules]
    recorders = []
    for i, module in enumerate(modules):
        substitute = None if substitutes is None else substitutes[i]

        def replace(output: Any, i: int = i, substitute: Substitute | None = substitute) -> Any:
            act = main_tensor(output)
            new = act if substitute is None else substitute(act)
            if leaf:
                # a layer behind another tapped layer keeps its graph, so gradients reach both
                new = new if new.requires_grad else new.detach().requires_grad_(True)
                seen[i].append(new)
                return _with_main(output, new.clone())
            seen[i].append(new)
            if stop:
                raise _Stop
            return _with_main(output, new)

        recorders.append(LayerRecorder(module, replace=replace))
    output = None
    try:
        for recorder in recorders:
            recorder.__enter__()
        output = method.call(rows, structure)
    except _Stop:
        pass
    finally:
        for recorder in recorders:
            recorder.__exit__(None, None, None)
    for acts in seen:
        if len(acts) != 1:
            raise UnsupportedModelError(
                f"{method.name}: the layer ran {len(acts)} times in one forward pass; layer "
                "methods need a module that runs exactly once (a reused nn.ReLU does not). "
                "Pick the module before it, or give the model a separate module per use."
            )
    return output, [acts[0] for acts in seen]


def check_differentiable(method: Method, values: torch.Tensor) -> None:
    """Target values must carry a graph back to the tapped layer."""
    if not values.requires_grad:
        raise GradientError(
            f"{method.name} needs gradients of the target w.r.t. the layer, but the output does "
            "not depend differentiably on it (does the model detach or run under "
            "torch.no_grad after the layer?)."
        )


class _Stop(Exception):
    """Raised inside a hook to end a forward pass once the layer has been seen."""


def layer_gradients(
    method: Method,
    modules: Sequence[nn.Module],
    make_rows: Callable[[slice], Sequence[torch.Tensor]],
    n_rows: int,
    example_index: torch.Tensor,
    target: Target,
    structure: Structure,
    substitutes: Callable[[slice], Sequence[Substitute | None]] | None = None,
) -> Iterator[tuple[slice, list[torch.Tensor], list[torch.Tensor], torch.Tensor]]:
    """Activations and target gradients w.r.t. `modules`, chunk by chunk of `batch_size` rows.

    Yields ``(slice, activations, gradients, target values)``; `substitutes(s)` gives the values
    the layers take for the rows of `s` (None: their own outputs).
    """
    for s in chunks_of(method, n_rows):
        with torch.enable_grad():
            output, acts = layer_pass(
                method,
                modules,
                make_rows(s),
                structure,
                substitutes=None if substitutes is None else substitutes(s),
                leaf=True,
            )
            values = target.select(output, example_index[s])
            check_differentiable(method, values)
            grads = torch.autograd.grad(values.sum(), acts, allow_unused=True)
        grads = [torch.zeros_like(a) if g is None else g for a, g in zip(acts, grads)]
        yield s, [a.detach() for a in acts], grads, values.detach()


def chunks_of(method: Method, n_rows: int) -> Iterator[slice]:
    """Row slices of at most the method's `batch_size` rows."""
    return chunks(n_rows, method.batch_size)


def resolve_layers(method: Method, layer: Any) -> list[tuple[str, nn.Module]]:
    """`(path, module)` for a layer or a list of layers; None is an actionable error."""
    if layer is None:
        raise InputError(
            f"{method.name} explains a layer: pass layer='<dotted module path>' (e.g. "
            "layer='layer4' or layer='embeddings'); print(model) lists the paths."
        )
    layers = list(layer) if isinstance(layer, (list, tuple)) else [layer]
    if not layers:
        raise InputError(f"{method.name}: layer is an empty list.")
    return [resolve_layer(method.model, one) for one in layers]


def resolve_one_layer(method: Method, layer: Any) -> tuple[str, nn.Module]:
    """`(path, module)` of the single layer a layer or neuron method explains."""
    if isinstance(layer, (list, tuple)):
        raise InputError(
            f"{method.name} explains one layer; got {len(layer)}. Fusing several layers is "
            "a CAM option (e.g. method='layer_cam', layer=[...])."
        )
    return resolve_layers(method, layer)[0]


class LayerMethod(Method):
    """Base of layer attribution methods.

    Options:
        layer: the layer to explain, as a dotted module path ("layer4.1.conv2") or the module;
            its output (or the first entry of a tuple output) is what is attributed.
    """

    def __init__(self, model: Callable, *, layer: Any = None, batch_size: int | None = None):
        super().__init__(model, batch_size=batch_size)
        self.layer = layer
        self.layer_name, self.module = resolve_one_layer(self, layer)

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "layer": self.layer_name}

    def activations(
        self, ctx: Context, inputs: Sequence[torch.Tensor] | None = None, *, stop: bool = True
    ) -> torch.Tensor:
        """The layer's activations on `inputs` (default: the examples), batched, no grad; with
        `stop` the forward pass ends at the layer."""
        xs = ctx.inputs if inputs is None else inputs
        parts = []
        with torch.no_grad():
            for s in chunks_of(self, ctx.n):
                rows = [x[s] for x in xs]
                parts.append(layer_pass(self, [self.module], rows, ctx.structure, stop=stop)[1][0])
        return torch.cat(parts)

    def result(self, ctx: Context, attribution: torch.Tensor, delta=None) -> Attribution:
        return Attribution(
            (attribution,), delta=delta, extras={"layer": self.layer_name}, structure=LAYER_MAPS
        )


@register("layer_activation", family="layer", needs={"layer"})
class LayerActivation(LayerMethod):
    """Layer activation: the layer's output itself (what the network computed there).

    No paper of its own; the basis of the other layer methods. ``attr = a(x)``, the activation
    of every unit of `layer`. Independent of the target.
    """

    def attribute(self, ctx: Context) -> Attribution:
        # a full pass: the model is run end to end (and checked) as by every other method
        return self.result(ctx, self.activations(ctx, stop=False))


@register("layer_gradient_x_activation", family="layer", needs={"layer"})
class LayerGradientXActivation(LayerMethod):
    """Layer gradient × activation: each unit's activation times the target's gradient there.

    Shrikumar et al. (2016) applied to a hidden layer (Captum's LayerGradientXActivation).
    ``attr = a(x) ⊙ ∂f_c/∂a``; with a linear head after the layer it sums to the output minus
    the bias.
    """

    def attribute(self, ctx: Context) -> Attribution:
        index = torch.arange(ctx.n, device=ctx.device)
        parts = []
        rows = layer_gradients(
            self,
            [self.module],
            lambda s: [x[s] for x in ctx.inputs],
            ctx.n,
            index,
            ctx.target,
            ctx.structure,
        )
        for _, acts, grads, _ in rows:
            parts.append(acts[0] * grads[0])
        return self.result(ctx, torch.cat(parts))


class _PathLayerMethod(LayerMethod):
    """Shared options of path methods: `n_steps` points of the `integration` rule (see
    `integrated_gradients`), and `baselines` at the call (None: zeros)."""

    default_integration = "gauss_legendre"

    def __init__(
        self,
        model: Callable,
        *,
        layer: Any = None,
        n_steps: int = 50,
        integration: str | None = None,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(model, layer=layer, batch_size=batch_size)
        integration = integration or self.default_integration
        self.points, self.weights = integration_rule(integration, n_steps)
        self.n_steps, self.integration = n_steps, integration

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "n_steps": self.n_steps, "integration": self.integration}

    def explain(
        self, inputs: InputsLike, target: TargetLike = "predicted", *, baselines: Any = None
    ) -> Explanation:
        return self._run(inputs, target, baselines=baselines)


@register("layer_integrated_gradients", family="layer", needs={"layer"})
class LayerIntegratedGradients(_PathLayerMethod):
    """Layer integrated gradients: integrated gradients on a path in the layer's activations.

    Sundararajan et al. (2017) applied at a hidden layer (Captum's LayerIntegratedGradients).
    With ``a = a(x)`` and baseline activation ``a'``: ``attr = (a − a') ⊙ ∫₀¹ ∂f_c/∂a
    (a' + α(a − a')) dα``, where the rest of the network sees the interpolated activation.
    Completeness at the layer: ``Σ attr = f_c(x; a) − f_c(x; a')`` (equal to f(x) − f(x') when
    nothing bypasses the layer); the error is `delta`. Works on embedding layers with integer
    token ids as inputs.

    Options:
        baselines (call): None for zero activations at the layer, or baseline *inputs* (a number,
            a tensor, a name as for `integrated_gradients`; token ids for text) whose layer
            activation is the baseline.
    """

    def attribute(self, ctx: Context, baselines: Any = None) -> Attribution:
        acts = self.activations(ctx)
        if baselines is None:
            base = torch.zeros_like(acts)
        else:
            base = self.activations(ctx, resolve_baselines(baselines, ctx.inputs, ctx.structure))
        n, device = ctx.n, ctx.device
        diff = acts - base
        alphas = torch.as_tensor(self.points, device=device)
        weights = torch.as_tensor(self.weights, device=device)
        example = example_rows(n, self.n_steps, device)

        def substitutes(s: slice) -> list[Substitute]:
            step, e = torch.arange(s.start, s.stop, device=device) // n, example[s]
            return [lambda _: base[e] + _col(alphas[step], diff) * diff[e]]

        total = torch.zeros_like(acts)
        rows = layer_gradients(
            self,
            [self.module],
            lambda s: [x[example[s]] for x in ctx.inputs],
            n * self.n_steps,
            example,
            ctx.target,
            ctx.structure,
            substitutes,
        )
        for s, _, grads, _ in rows:
            step = torch.arange(s.start, s.stop, device=device) // n
            total.index_add_(0, example[s], grads[0] * _col(weights[step], grads[0]))
        attribution = diff * total
        ends = [lambda _: acts, lambda _: base]
        f_ends = []
        with torch.no_grad():
            for substitute in ends:
                out, _ = layer_pass(
                    self, [self.module], ctx.inputs, ctx.structure, substitutes=[substitute]
                )
                f_ends.append(ctx.target.select(out, torch.arange(n, device=device)))
        delta = attribution.flatten(1).sum(1) - (f_ends[0] - f_ends[1]).to(attribution.dtype)
        return self.result(ctx, attribution, delta)


@register("layer_conductance", family="layer", needs={"layer", "gradients"})
class LayerConductance(_PathLayerMethod):
    """Layer conductance: the flow of integrated gradients through each unit of a layer.

    Dhamdhere, Sundararajan & Yan (2018), "How Important Is a Neuron?".
    ``cond_j = ∫₀¹ ∂f_c/∂a_j · ∂a_j/∂α dα`` along the input path ``x' + α(x − x')``,
    discretized as ``Σ_k ∂f_c/∂a_j(α_k) · (a_j(α_{k+1}) − a_j(α_k))`` over ``n_steps + 1``
    points of the `integration` rule (exactly Captum's LayerConductance). With the default
    ``riemann_trapezoid`` the points include both ends, so summed over the layer it approximates
    ``f_c(x) − f_c(x')`` (completeness, error in `delta`) when every path runs through the layer.
    """

    default_integration = "riemann_trapezoid"

    def attribute(self, ctx: Context, baselines: Any = None) -> Attribution:
        bases = resolve_baselines(baselines, ctx.inputs, ctx.structure)
        n, device, steps = ctx.n, ctx.device, self.n_steps + 1
        points, _ = integration_rule(self.integration, steps)
        alphas = torch.as_tensor(points, device=device)
        example = example_rows(n, steps, device)

        def make_rows(s: slice) -> list[torch.Tensor]:
            step, e = torch.arange(s.start, s.stop, device=device) // n, example[s]
            return [b[e] + _col(alphas[step], x) * (x[e] - b[e]) for x, b in zip(ctx.inputs, bases)]

        acts, grads = [], []
        rows = layer_gradients(
            self, [self.module], make_rows, n * steps, example, ctx.target, ctx.structure
        )
        for _, a, g, _ in rows:
            acts.append(a[0])
            grads.append(g[0])
        acts_all, grads_all = torch.cat(acts), torch.cat(grads)
        products = (acts_all[n:] - acts_all[:-n]) * grads_all[:-n]
        attribution = products.view(self.n_steps, n, *products.shape[1:]).sum(0)
        index = torch.arange(n, device=device)
        f_base = ctx.target.select(self.forward(bases, ctx.structure), index)
        delta = attribution.flatten(1).sum(1) - (ctx.target_values() - f_base).to(products.dtype)
        return self.result(ctx, attribution, delta)


@register("internal_influence", family="layer", needs={"layer", "gradients"})
class InternalInfluence(_PathLayerMethod):
    """Internal influence: the target's gradient w.r.t. a layer, integrated along the input path.

    Leino et al. (2018), "Influence-Directed Explanations for Deep Convolutional Networks".
    ``infl_j = ∫₀¹ ∂f_c/∂a_j (x' + α(x − x')) dα`` with `n_steps` points of the `integration`
    rule (Captum's InternalInfluence). No completeness identity.
    """

    def attribute(self, ctx: Context, baselines: Any = None) -> Attribution:
        bases = resolve_baselines(baselines, ctx.inputs, ctx.structure)
        n, device = ctx.n, ctx.device
        alphas = torch.as_tensor(self.points, device=device)
        weights = torch.as_tensor(self.weights, device=device)
        example = example_rows(n, self.n_steps, device)

        def make_rows(s: slice) -> list[torch.Tensor]:
            step, e = torch.arange(s.start, s.stop, device=device) // n, example[s]
            return [b[e] + _col(alphas[step], x) * (x[e] - b[e]) for x, b in zip(ctx.inputs, bases)]

        total = None
        rows = layer_gradients(
            self, [self.module], make_rows, n * self.n_steps, example, ctx.target, ctx.structure
        )
        for s, _, grads, _ in rows:
            g = grads[0]
            if total is None:
                total = torch.zeros((n, *g.shape[1:]), dtype=g.dtype, device=device)
            step = torch.arange(s.start, s.stop, device=device) // n
            total.index_add_(0, example[s], g * _col(weights[step], g))
        return self.result(ctx, total)
