"""Layer-wise relevance propagation on the traced graph, in one modified backward pass."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from lumos.attribution.propagation.canonizers import Canonizer, MergeBatchNorm
from lumos.attribution.propagation.composites import (
    PRESETS,
    Composite,
    require_rule,
    resolve_composite,
)
from lumos.attribution.propagation.graph import (
    Graph,
    GraphMethod,
    IndexedMaxPool,
    Layer,
    Step,
    Strategy,
    Sum,
    weighted_sum,
)
from lumos.attribution.propagation.rules import Norm, Pass, propagate
from lumos.core.batching import chunks
from lumos.core.errors import GradientError
from lumos.core.explanation import Explanation
from lumos.core.inputs import InputsLike, Structure
from lumos.core.method import Attribution, Context, Live, Method
from lumos.core.registry import register
from lumos.core.targets import TargetLike, output_tensor

Tensor = torch.Tensor


class RuleStrategy(Strategy):
    """Runs every step with the rule its composite assigns, so autograd carries relevance."""

    def __init__(self, composite: Composite, method: str) -> None:
        self.composite, self.method = composite, method
        self.applied: dict[str, str] = {}  # module path -> rule, for Explanation.extras

    def _record(self, step: Step, rule: Any) -> Any:
        self.applied[step.path] = "gradient" if rule is None else repr(rule)
        return rule

    def layer(self, step: Step, layer: Layer, x: Tensor) -> Tensor:
        rule = self._record(step, require_rule(self.composite, step, self.method))
        if layer.scale is not None and _keeps_params(rule) and not layer.folds(x):
            return propagate(rule, layer.scaled, (x,), layer.raw, layer.shift)
        return propagate(rule, layer.fn, (x,), layer.weight_for(x, step, self.method), layer.bias)

    def _elementwise(self, step: Step, fn: Callable, x: Tensor, default) -> Tensor:
        rule = self._record(step, self.composite.rule_for(step) or default)
        if rule is None:
            return fn(x)
        return propagate(rule, lambda t, w, b: fn(t), (x,))

    def affine(self, step, fn, x):
        return self._elementwise(step, fn, x, Pass())

    def activation(self, step, fn, x):
        return self._elementwise(step, fn, x, Pass())

    def max_pool(self, step, fn, x):
        pool = getattr(fn, "with_indices", None)
        if (
            pool is not None
            and x.requires_grad
            and x.device.type == "cpu"  # (on a GPU torch's own pooling is the faster)
            and self.composite.rule_for(step) is None
        ):
            self._record(step, None)  # the gradient, through the faster indexed pooling
            return IndexedMaxPool.apply(x, pool)
        return self._elementwise(step, fn, x, None)

    def avg_pool(self, step, fn, x):
        return self._elementwise(step, fn, x, Norm())

    def sum(self, step: Step, terms: list[Tensor], signs: list[float]) -> Tensor:
        rule = self._record(step, self.composite.rule_for(step, Sum) or Norm())
        return propagate(rule, lambda *a: weighted_sum(a[:-2], signs), terms)


def _keeps_params(rule: Any) -> bool:
    """True when every branch of `rule` uses the layer's parameters unmodified."""
    return not isinstance(rule, Pass) and all(b.params is None for b in rule.branches())


def graph_forward(
    method: Method, graph: Graph, strategy: Strategy, xs: Sequence[Tensor], structure: Structure
) -> Live:
    """The traced graph's forward pass on `xs` (made to require grad) under `strategy`."""
    rows = tuple(x.detach().requires_grad_(True) for x in xs)
    keys = structure.keys if structure.kind == "dict" else None  # called as model(**inputs)
    with torch.enable_grad(), method.calling(rows):
        return Live(rows, graph.run(strategy, rows, keys), (graph, strategy))


def relevance_pass(
    method: Method,
    ctx: Context,
    graph: Graph,
    strategy: Strategy,
    *,
    scale_by_output: bool = True,
    live: Live | None = None,
) -> tuple[tuple[Tensor, ...], Tensor]:
    """Input relevance for the target, chunked by `batch_size`.

    The output relevance is ``f_c(x)`` at the target (``scale_by_output``) or 1. `live` is the
    pipeline's forward pass through `graph` when it already ran one on all inputs. Returns the
    relevance per input and the target values.
    """
    parts: list[tuple[Tensor, ...]] = []
    values = []
    index = torch.arange(ctx.n, device=ctx.device)
    for s in chunks(ctx.n, method.batch_size):
        if live is None:
            rows = [x[s] for x in ctx.inputs]
            live_s = graph_forward(method, graph, strategy, rows, ctx.structure)
        else:
            live_s, live = live, None
        xs = live_s.rows
        with torch.enable_grad():
            out = output_tensor(live_s.output)
            leaf = out.detach().requires_grad_(True)
            selected = ctx.target.select(leaf, index[s])
            (onehot,) = torch.autograd.grad(selected.sum(), leaf)
            seed = onehot * leaf.detach() if scale_by_output else onehot
            if not out.requires_grad:
                raise GradientError(
                    f"{method.name}: the model output does not depend on the inputs through "
                    "differentiable operations."
                )
            grads = torch.autograd.grad(out, xs, seed, allow_unused=True)
        parts.append(tuple(torch.zeros_like(x) if g is None else g for x, g in zip(xs, grads)))
        values.append(selected.detach().double())
    if len(parts) == 1:
        return parts[0], values[0]
    return tuple(torch.cat(p) for p in zip(*parts)), torch.cat(values)


def keys_of(ctx: Context) -> tuple[str, ...] | None:
    """Keyword names for dict inputs (the model is called as ``model(**inputs)``)."""
    return ctx.structure.keys if ctx.structure.kind == "dict" else None


def total(attributions: Sequence[Tensor]) -> Tensor:
    """Σ attributions per example, in float64."""
    return sum(a.double().flatten(1).sum(1) for a in attributions)


@register("lrp", family="propagation", needs={"gradients"})
class LRP(GraphMethod):
    """Layer-wise relevance propagation: the target's value redistributed layer by layer.

    Bach et al. (2015), "On Pixel-Wise Explanations for Non-Linear Classifier Decisions by
    Layer-Wise Relevance Propagation"; Montavon et al. (2019), "Layer-Wise Relevance Propagation:
    An Overview"; rules and composites as in Zennit (Anders et al. 2021). Each linear layer
    redistributes relevance by its rule, e.g. LRP-ε ``R_j = Σ_k x_j w_jk R_k / (z_k + ε sign
    z_k)``; sums and average pooling by ``R_j = x_j R_k / z_k``; activations pass it through;
    max pooling gives it to the maximum. The model is traced with torch.fx, so functional ReLUs,
    residual adds and reused modules are handled; BatchNorm is merged into the layer before it.

    Conservation: the output relevance ``f_c(x)`` is redistributed, so Σ attr = f_c(x) up to
    what biases and stabilizers absorb (exact for bias-free ReLU networks as ε → 0); `delta` is
    ``Σ attr − f_c(x)``.

    Options:
        composite: a preset name (``epsilon``, ``epsilon_plus``, ``epsilon_gamma_box``,
            ``epsilon_alpha2_beta1``, ``epsilon_plus_flat``, ``epsilon_alpha2_beta1_flat``), a
            `Composite`, or a mapping ``{module path | type: rule}`` (see `composites`).
        epsilon, gamma: parameters of the presets' ε and γ rules.
        low, high: input bounds of the zᴮ rule (``epsilon_gamma_box``), numbers or tensors
            broadcastable to one example of the first layer's input; None uses each example's
            min/max.
        canonizers: graph rewrites applied first; None merges BatchNorm (`MergeBatchNorm`).
        reuse_trace: keep the model's torch.fx trace between calls of this explainer while
            nothing it read has changed (saves a trace per call: 2 ms on ResNet-18); only for
            a model whose code and settings stay as they are (see `tracing`).
    """

    single_pass = True

    def __init__(
        self,
        model: Callable,
        *,
        composite: Any = "epsilon_plus",
        epsilon: float = 1e-6,
        gamma: float = 0.25,
        low: Any = None,
        high: Any = None,
        canonizers: Sequence[Canonizer] | None = None,
        batch_size: int | None = None,
        reuse_trace: bool = False,
    ) -> None:
        super().__init__(model, batch_size=batch_size, reuse_trace=reuse_trace)
        params = {"epsilon": epsilon, "gamma": gamma, "low": low, "high": high}
        self.composite = resolve_composite(composite, **params)
        self.composite_name = composite if isinstance(composite, str) else "custom"
        self.params = params
        self.canonizers = (MergeBatchNorm(),) if canonizers is None else tuple(canonizers)

    def _config(self) -> dict[str, Any]:
        params = {k: v for k, v in self.params.items() if not isinstance(v, torch.Tensor)}
        return {**super()._config(), "composite": self.composite_name, **params}

    def explain(self, inputs: InputsLike, target: TargetLike = "predicted") -> Explanation:
        return self._run(inputs, target)

    def live_forward(self, xs: Sequence[Tensor], structure: Structure, **_: Any) -> Live:
        return graph_forward(self, *self._graph(), xs, structure)

    def _graph(self) -> tuple[Graph, RuleStrategy]:
        """This call's traced copy of the model, canonized (the copy is dropped afterwards, so
        the canonizers need no undoing), and the strategy applying the composite's rules."""
        graph = self.traced()
        for canonizer in self.canonizers:
            canonizer.apply(graph)
        return graph, RuleStrategy(self.composite, self.name)

    def attribute(self, ctx: Context) -> Attribution:
        live = ctx.take_live(self)
        graph, strategy = self._graph() if live is None else live.state
        relevance, values = relevance_pass(self, ctx, graph, strategy, live=live)
        merged = sorted(graph.merged)
        extras = {"rules": strategy.applied, "merged_batchnorm": merged}
        return Attribution(relevance, delta=total(relevance) - values, extras=extras)


__all__ = ["LRP", "PRESETS", "RuleStrategy", "graph_forward", "relevance_pass"]
