"""Excitation backprop and its contrastive variant, as LRP-z⁺ without biases from probability 1."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lumos.attribution.propagation.canonizers import MergeBatchNorm, canonized
from lumos.attribution.propagation.composites import BASE, Composite
from lumos.attribution.propagation.graph import LINEAR_MODULES, Graph
from lumos.attribution.propagation.lrp import RuleStrategy, relevance_pass, total
from lumos.attribution.propagation.rules import Branch, ZPlus
from lumos.core.errors import UnsupportedModelError
from lumos.core.explanation import Explanation
from lumos.core.inputs import InputsLike
from lumos.core.method import Attribution, Context, Method
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


@register("excitation_backprop", family="propagation", needs={"gradients"})
class ExcitationBackprop(Method):
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
    """

    def __init__(
        self, model: Callable, *, contrastive: bool = False, batch_size: int | None = None
    ) -> None:
        super().__init__(model, batch_size=batch_size)
        self.contrastive = bool(contrastive)

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "contrastive": self.contrastive}

    def explain(self, inputs: InputsLike, target: TargetLike = "predicted") -> Explanation:
        return self._run(inputs, target)

    def attribute(self, ctx: Context) -> Attribution:
        graph = Graph(self.model, self.name)
        rule = ZPlus(bias=False)
        composite = Composite(((LINEAR_MODULES, rule), *BASE))
        with canonized(graph, (MergeBatchNorm(),)):
            maps, _ = relevance_pass(
                self, ctx, graph, RuleStrategy(composite, self.name), scale_by_output=False
            )
            if not self.contrastive:
                return Attribution(maps, delta=total(maps) - 1.0)
            top = [s.path for s in graph.steps if s.output_layer]
            if not top:
                raise UnsupportedModelError(
                    "contrastive excitation backprop negates the output layer's weights, but the "
                    "model's output is not produced by a linear layer."
                )
            dual = Composite(tuple((path, _DualZPlus(bias=False)) for path in top))
            dual_composite = Composite(dual.entries + composite.entries)
            duals, _ = relevance_pass(
                self, ctx, graph, RuleStrategy(dual_composite, self.name), scale_by_output=False
            )
        return Attribution(tuple((m - d).clamp(min=0) for m, d in zip(maps, duals)))
