"""Canonizers: rewrite the traced graph into a form LRP rules understand, and undo it afterwards.

The traced graph already makes residual additions explicit (``x + y`` is a `Sum` step with the
`Norm` rule), and flatten/view/reshape, dropout and pooling are classified steps. What remains is
BatchNorm: a rule applied to a convolution followed by BatchNorm must see the *merged* affine map
``y = (s·W) x + (s·(b − μ) + β)`` with ``s = γ / √(σ² + ε)``, as Zennit's `MergeBatchNorm`
does. Canonizers work on the graph's own `Layer` table with new tensors — the user's parameters
are never written — and are reversible context managers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch.fx as fx
from torch import nn

from lumos.attribution.propagation.graph import Graph, Layer, batchnorm_affine

MERGEABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class Canonizer:
    """Base: `apply(graph)` rewrites the graph and returns a function that undoes it."""

    def apply(self, graph: Graph):
        raise NotImplementedError


class MergeBatchNorm(Canonizer):
    """Fold an eval-mode BatchNorm into the linear/conv layer that feeds only it."""

    def apply(self, graph: Graph):
        by_node = {s.node: s for s in graph.steps}
        before = dict(graph.layers), set(graph.merged)
        for step in graph.steps:
            if step.kind != "batchnorm":
                continue
            source = step.node.args[0]
            if not isinstance(source, fx.Node):
                continue
            producer = by_node[source]
            if (
                producer.kind != "linear"
                or not isinstance(producer.module, MERGEABLE)
                or len(source.users) != 1
            ):
                continue
            graph.layers[producer.path] = merge(graph.layers[producer.path], step.module)
            graph.merged.add(step.path)

        def undo() -> None:
            graph.layers.clear()
            graph.layers.update(before[0])
            graph.merged.clear()
            graph.merged.update(before[1])

        return undo


def merge(layer: Layer, bn: nn.Module) -> Layer:
    """A new `Layer` computing ``bn(layer(x))``: the layer's own parameters with the
    BatchNorm's scale ``s`` and shift; merged parameters ``s·W``, ``s·b + shift`` are built
    only if a rule asks for them."""
    scale, shift = batchnorm_affine(bn)
    weight = None if layer.raw is None else layer.raw.detach()
    bias = None if layer.raw_bias is None else layer.raw_bias.detach()
    return Layer(layer.fn, weight, bias, scale=scale, shift=shift, transpose=layer.transpose)


@contextlib.contextmanager
def canonized(graph: Graph, canonizers: Sequence[Canonizer]) -> Iterator[Graph]:
    """Apply `canonizers` to `graph` for the duration of the block, undoing them in reverse."""
    undos = []
    try:
        for canonizer in canonizers:
            undos.append(canonizer.apply(graph))
        yield graph
    finally:
        for undo in reversed(undos):
            undo()
