"""Excitation backprop and its contrastive variant, as LRP-z⁺ without biases from probability 1."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from lumos.attribution.propagation.canonizers import MergeBatchNorm
from lumos.attribution.propagation.composites import BASE, Composite
from lumos.attribution.propagation.graph import LINEAR_MODULES, Graph, GraphMethod
from lumos.attribution.propagation.lrp import RuleStrategy, graph_forward, relevance_pass, total
from lumos.attribution.propagation.rules import Branch, ZPlus
from lumos.core.errors import UnsupportedModelError
from lumos.core.explanation import Explanation
from lumos.core.inputs import InputsLike, Structure
from lumos.core.method import Attribution, Context, Live
from lumos.core.registry import register
from lumos.core.targets import TargetLike


@dataclass(frozen=True)
class _DualZPlus(ZPlus):
    """z⁺ for the dual output unit, whose weights are the negated weights of the target unit."""

    def branches(self) -> tuple[Branch, ...]:
        return (
            Branch(lambda x: x.clamp(min=0), lambda p: (-p).clamp(min=0), bias=False, sign=1),
            Branch(lambda x: x.clamp(max=0), lambda p: (-p).clamp(max=0), bias=False, sign=-1),
        )


_COMPOSITE = Composite(((LINEAR_MODULES, ZPlus(bias=False)), *BASE))


@register("excitation_backprop", family="propagation", needs={"gradients"})
class ExcitationBackprop(GraphMethod):
    """Excitation backprop: the marginal winning probability of each input, top-down.

    Zhang, Bargal, Lin, Brandt, Shen & Sclaroff (2016), "Top-down Neural Attention by Excitation
    Backprop". Starting from probability 1 at the target, each layer passes it to its inputs in
    proportion to their excitatory contributions, ``P(a_j) = Σ_i a_j w_ji⁺ / (Σ_j' a_j' w_j'i⁺)
    P(a_i)`` (LRP-z⁺ without biases; sums and average pooling split in proportion to their
    inputs, max pooling gives it to the maximum, activations pass it through). Probability is
    conserved: Σ attr = 1 up to mass stopped where no input excites a unit; `delta` is
    ``Σ attr − 1``.

    Options:
        contrastive: the contrastive map (c-MWP): the winning probability of the target minus
            that of its dual unit (the output layer's target weights negated), truncated at
            zero; `delta` is then None.
        reuse_trace: keep the model's torch.fx trace between calls of this explainer while
            nothing it read has changed (saves a trace per call: 2 ms on ResNet-18); only for
            a model whose code and settings stay as they are (see `tracing`).
    """

    single_pass = True

    def __init__(
        self, model: Callable, *, contrastive: bool = False, batch_size: int | None = None,
        reuse_trace: bool = False,
    ) -> None:  # fmt: skip
        super().__init__(model, batch_size=batch_size, reuse_trace=reuse_trace)
        self.contrastive = bool(contrastive)

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "contrastive": self.contrastive}

    def explain(self, inputs: InputsLike, target: TargetLike = "predicted") -> Explanation:
        return self._run(inputs, target)

    def live_forward(self, xs: Sequence[Tensor], structure: Structure, **_: Any) -> Live:
        return graph_forward(self, *self._graph(), xs, structure)

    def _graph(self) -> tuple[Graph, RuleStrategy]:
        """This call's traced, BatchNorm-merged copy of the model and the z⁺ strategy."""
        graph = self.traced()
        MergeBatchNorm().apply(graph)  # the copy is dropped afterwards: nothing to undo
        return graph, RuleStrategy(_COMPOSITE, self.name)

    def attribute(self, ctx: Context) -> Attribution:
        live = ctx.take_live(self)
        graph, strategy = self._graph() if live is None else live.state
        maps, _ = relevance_pass(self, ctx, graph, strategy, scale_by_output=False, live=live)
        if not self.contrastive:
            return Attribution(maps, delta=total(maps) - 1.0)
        top = [s.path for s in graph.steps if s.output_layer]
        if not top:
            raise UnsupportedModelError(
                "contrastive excitation backprop negates the output layer's weights, but the "
                "model's output is not produced by a linear layer."
            )
        dual = Composite(tuple((path, _DualZPlus(bias=False)) for path in top))
        dual_composite = Composite(dual.entries + _COMPOSITE.entries)
        duals, _ = relevance_pass(
            self, ctx, graph, RuleStrategy(dual_composite, self.name), scale_by_output=False
        )
        return Attribution(tuple((m - d).clamp(min=0) for m, d in zip(maps, duals)))
