"""The part of a network after a layer, run on its own: Ablation-CAM evaluates it once per
channel, so skipping the (unchanged) part before the layer is most of its cost.

With `torch.fx` the model is traced with the layer as a leaf; the nodes that depend on the layer
form the tail graph, and every other value the tail reads (a residual branch, an input) is
computed once per batch and cached (no extra pass when there is none, as in a plain stack). The
tail is checked against the model's own outputs; models that cannot be traced (data-dependent
control flow, keyword inputs), with forward hooks on modules the tracer steps into, or that fail
the check run the full model instead, with the layer's output replaced by the given activations.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from lumos.attribution.layer import layer_pass
from lumos.core.method import Context, Method


class Downstream:
    """``downstream(activations, example_index)`` is the model's output when the layer outputs
    `activations` (rows belong to examples `example_index`)."""

    def __init__(
        self,
        method: Method,
        name: str,
        module: nn.Module,
        ctx: Context,
        activations: torch.Tensor,
    ) -> None:
        self.method, self.module, self.ctx = method, module, ctx
        self.tail: fx.GraphModule | None = None
        self.upstream: list[tuple[Any, bool]] = []
        if ctx.structure.kind != "dict":
            self._build(name, activations)

    @property
    def short_circuits(self) -> bool:
        """Whether only the part after the layer runs."""
        return self.tail is not None

    def __call__(self, activations: torch.Tensor, example_index: torch.Tensor) -> Any:
        if self.tail is not None:
            values = [v[example_index] if batched else v for v, batched in self.upstream]
            return self.tail(activations, *values)
        rows = [x[example_index] for x in self.ctx.inputs]
        output, _ = layer_pass(
            self.method,
            [self.module],
            rows,
            self.ctx.structure,
            substitutes=[lambda _: activations],
        )
        return output

    def _build(self, name: str, activations: torch.Tensor) -> None:
        module, ctx = self.module, self.ctx

        class Tracer(fx.Tracer):
            def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
                return m is module or super().is_leaf_module(m, qualname)

        tracer = Tracer()
        # tracing runs the hooks of modules it steps into on proxies: such models take the
        # full path (hooks on leaf modules are fine, they run on tensors in the tail)
        if any(
            (m._forward_hooks or m._forward_pre_hooks) and not tracer.is_leaf_module(m, path)
            for path, m in self.method.model.named_modules()
        ):
            return
        try:
            graph = tracer.trace(self.method.model)
        except Exception:  # not traceable: fall back to full forwards
            return
        nodes = list(graph.nodes)
        starts = [n for n in nodes if n.op == "call_module" and n.target == name]
        if len(starts) != 1:
            return
        start = starts[0]
        after, from_inputs = {start}, set()
        for node in nodes:
            inputs = node.all_input_nodes
            if node.op == "placeholder" or any(a in from_inputs for a in inputs):
                from_inputs.add(node)
            if node is not start and any(a in after for a in inputs):
                after.add(node)
        if not any(n.op == "output" and n in after for n in nodes):
            return
        needed = []
        for node in nodes:
            if node in after and node is not start:
                needed += [a for a in node.all_input_nodes if a not in after and a not in needed]
        external = [a for a in needed if a.op != "get_attr"]
        tail = fx.Graph()
        env = {start: tail.placeholder("activation")}
        for i, node in enumerate(external):
            env[node] = tail.placeholder(f"upstream_{i}")
        for node in nodes:
            if node in after and node is not start:
                for a in node.all_input_nodes:
                    if a not in env:
                        env[a] = tail.node_copy(a)
                env[node] = tail.node_copy(node, lambda a: env[a])
        model = self.method.model
        values = _capture(fx.GraphModule(model, graph), external, ctx.inputs) if external else []
        if values is None:
            return
        upstream = []
        for node, value in zip(external, values):
            batched = node in from_inputs
            if batched and not (isinstance(value, torch.Tensor) and value.shape[:1] == (ctx.n,)):
                return
            upstream.append((value, batched))
        self.tail, self.upstream = fx.GraphModule(model, tail), upstream
        index = torch.arange(ctx.n, device=ctx.device)
        with torch.no_grad():
            check = ctx.target.select(self(activations, index), index)
        expected = ctx.target_values()
        if check.shape != expected.shape or not torch.allclose(
            check, expected, rtol=1e-4, atol=1e-5
        ):
            self.tail, self.upstream = None, []


def _capture(root: fx.GraphModule, wanted: list[fx.Node], inputs) -> list[Any] | None:
    """The values of `wanted` nodes in one run of `root` on `inputs` (None if it fails)."""
    store: dict[fx.Node, Any] = {}

    class Capture(fx.Interpreter):
        def run_node(self, node: fx.Node) -> Any:
            value = super().run_node(node)
            if node in wanted:
                store[node] = value
            return value

    try:
        with torch.no_grad():
            Capture(root).run(*inputs)
    except Exception:  # the traced graph does not run on these inputs: fall back
        return None
    return [store[node] for node in wanted]
