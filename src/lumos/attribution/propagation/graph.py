"""The model as a graph of classified operations, traced with `torch.fx` and run with a strategy.

Hook-based propagation (Captum, Zennit) only sees `nn.Module` calls: a model written with
`F.relu`, `torch.relu`, `x + y` residuals, `F.max_pool2d` or one ReLU module reused in several
places silently gets wrong relevance. Here the model is traced symbolically into its operations
(the user's model is never modified; the trace shares its parameters read-only), every operation
on the path from the inputs to the output is classified — linear layer, BatchNorm, activation,
max pooling, averaging, sum, elementwise with a constant, or structural (reshape, cat, dropout) —
and the graph is then run with a *strategy* that decides what each kind does (LRP rules,
DeepLIFT multipliers, or the plain forward). An operation that no kind covers raises an
`UnsupportedModelError` naming the module path and op, before anything is computed;
`register_op` teaches the graph a new elementwise, pooling or structural op.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from lumos.attribution.propagation.tracing import TraceCache, trace
from lumos.core.errors import InputError, UnsupportedModelError
from lumos.core.method import Method
from lumos.core.model import is_scripted, unwrap_compiled

Tensor = torch.Tensor


class Sum:
    """Composite key for elementwise sums and differences of activations (residual adds)."""


class Affine:
    """Composite key for elementwise operations with constants (``x − mean``, ``x / std``)."""


# -- op tables -----------------------------------------------------------------------------------

ACTIVATION_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Softplus, nn.ReLU6, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.PReLU,
)  # fmt: skip
ACTIVATION_FUNCTIONS: set[Any] = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu,
    F.silu, F.mish, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.softplus, F.relu6,
    F.hardtanh, F.hardswish, F.hardsigmoid,
}  # fmt: skip
ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}
MAX_POOL_MODULES: tuple[type, ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip
MAX_POOL_FUNCTIONS: set[Any] = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
}  # fmt: skip
AVG_POOL_MODULES: tuple[type, ...] = (
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)  # fmt: skip
AVG_POOL_FUNCTIONS: dict[Any, type] = {
    F.avg_pool1d: nn.AvgPool1d, F.avg_pool2d: nn.AvgPool2d, F.avg_pool3d: nn.AvgPool3d,
    F.adaptive_avg_pool1d: nn.AdaptiveAvgPool1d, F.adaptive_avg_pool2d: nn.AdaptiveAvgPool2d,
    F.adaptive_avg_pool3d: nn.AdaptiveAvgPool3d, torch.mean: nn.AdaptiveAvgPool2d,
    torch.sum: nn.AdaptiveAvgPool2d,
}  # fmt: skip
AVG_POOL_METHODS = {"mean", "sum"}
LINEAR_MODULES: tuple[type, ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)  # fmt: skip
LINEAR_FUNCTIONS: dict[Any, type] = {
    F.linear: nn.Linear, F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d,
}  # fmt: skip
BATCHNORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
STRUCTURAL_MODULES: tuple[type, ...] = (
    nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.ZeroPad2d, nn.ConstantPad2d,
)  # fmt: skip
STRUCTURAL_FUNCTIONS: set[Any] = {
    torch.flatten, torch.reshape, torch.cat, torch.concat, torch.stack, torch.squeeze,
    torch.unsqueeze, torch.permute, torch.transpose, torch.chunk, torch.split, torch.narrow,
    torch.unbind, operator.getitem, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.alpha_dropout, F.pad, getattr,
}  # fmt: skip
STRUCTURAL_METHODS = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose",
    "contiguous", "squeeze", "unsqueeze", "chunk", "split", "size", "dim", "unbind", "clone",
    "to", "float", "double", "half", "type_as", "narrow", "expand", "expand_as", "repeat",
}  # fmt: skip
ADD = {operator.add, operator.iadd, torch.add, "add", "add_"}
SUB = {operator.sub, operator.isub, torch.sub, "sub", "sub_"}
MUL = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
DIV = {operator.truediv, operator.itruediv, torch.div, "div", "div_"}
NEG = {operator.neg, torch.neg, "neg"}
_INPLACE_TO_PLAIN = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, F.relu_: F.relu, torch.relu_: torch.relu,
}  # fmt: skip

SOFTMAX_FIX = (
    "Explain the logits instead: pass the model without its final softmax (relevance of a "
    "probability is not propagated by these rules)"
)

_EXTRA: dict[Any, str] = {}
KINDS = ("activation", "max_pool", "avg_pool", "structural")


def register_op(target: Any, kind: str) -> None:
    """Teach the propagation methods an op: `target` is a function, a method name or a module
    type; `kind` is ``activation`` (elementwise, monotone), ``max_pool``, ``avg_pool`` (a
    positive average of its input) or ``structural`` (moves or selects values)."""
    if kind not in KINDS:
        raise UnsupportedModelError(f"register_op: kind must be one of {KINDS}, got {kind!r}.")
    _EXTRA[target] = kind


# -- layers --------------------------------------------------------------------------------------


class Layer:
    """A linear layer as ``fn(x, weight, bias)`` with its (possibly canonized) parameters.

    A layer merged with the BatchNorm after it keeps its own weight and bias (`raw`,
    `raw_bias`) and the BatchNorm's per-channel `scale` and `shift`: its output is
    ``fn(x, raw, raw_bias)·scale + shift`` along dim 1 — exactly ``bn(layer(x))`` — which is how
    rules that leave the parameters alone (ε, LRP-0) and DeepLIFT evaluate it where the weights
    outweigh an input row. `weight` (``raw·scale``) and `bias` (``raw_bias·scale + shift``) are
    built on first use: for rules that modify the parameters, and where the weights are the
    smaller (`folds`: scaling them once costs less than a pass over the output), always with
    dim 1 the output features.
    """

    def __init__(
        self,
        fn: Callable[..., Tensor],
        weight: Tensor | None,
        bias: Tensor | None,
        scale: Tensor | None = None,
        shift: Tensor | None = None,
        transpose: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        self.fn, self.raw, self.raw_bias = fn, weight, bias
        self.scale, self.shift = scale, shift
        self.transpose = transpose  # (grad, x, weight) ↦ the input gradient of fn(·, weight)
        self._weight = None if scale is not None else weight
        self._bias = None if scale is not None else bias

    @property
    def weight(self) -> Tensor | None:
        if self._weight is None and self.raw is not None:
            self._weight = self.raw * self.scale.view((-1,) + (1,) * (self.raw.dim() - 1))
        return self._weight

    @property
    def bias(self) -> Tensor | None:
        if self._bias is None and self.scale is not None:
            if self.raw_bias is None:
                self._bias = self.shift
            else:
                self._bias = torch.addcmul(self.shift, self.raw_bias, self.scale)
        return self._bias

    def weight_for(self, x: Tensor, step: Step, method: str) -> Tensor | None:
        """`weight`, refused where a merged BatchNorm's channels (dim 1 of the output) are not
        the layer's output features: a Linear on inputs of more than two dimensions."""
        if self.scale is not None and self.raw is not None and self.raw.dim() == 2 and x.dim() > 2:
            raise UnsupportedModelError(
                f"{method}: the BatchNorm after '{step.path}' normalises dim 1 of a Linear "
                f"output of {x.dim()} dimensions, which is not the Linear's output features, so "
                "it cannot be merged into its weights for this rule. Use a rule that keeps the "
                "weights (ε) for this layer, or pass canonizers=[]."
            )
        return self.weight

    def scaled(self, x: Tensor, weight: Tensor | None, shift: Tensor | None) -> Tensor:
        """``fn(x, raw, raw_bias)·scale + shift`` along dim 1 (BatchNorm's channels); `weight`
        is ignored (the merged weight's stand-in) and a None `shift` drops both biases, as a
        rule without bias asks."""
        z = self.fn(x, self.raw, None if shift is None else self.raw_bias)
        shape = (1, -1) + (1,) * (z.dim() - 2)
        if shift is None:
            return z * self.scale.view(shape)
        return torch.addcmul(shift.view(shape), z, self.scale.view(shape))  # one pass

    def folds(self, x: Tensor) -> bool:
        """Whether a merged BatchNorm runs inside the layer's parameters (`weight`, `bias`)
        rather than as ``·scale + shift`` on its output: scaling the weights once costs less
        than a pass over the output each way where the weights are smaller than one row of
        the input (the decision does not depend on the number of rows, so a layer's forward
        and backward passes agree)."""
        return (
            self.scale is not None
            and self.raw is not None
            and (self.raw.dim() != 2 or x.dim() == 2)  # (dim 1 is the Linear's features)
            and self.raw.numel() <= x[0].numel()
        )

    def __call__(self, x: Tensor) -> Tensor:
        if self.scale is not None and not self.folds(x):
            return self.scaled(x, None, self.shift)
        return self.fn(x, self.weight, self.bias)

    def input_gradient(self, grad: Tensor, x: Tensor) -> Tensor:
        """The vector–Jacobian product of the layer at x (it is linear: x only gives the
        shape); needs `transpose`."""
        if self.scale is None or self.folds(x):
            return self.transpose(grad, x, self.weight)
        grad = grad * self.scale.view((1, -1) + (1,) * (grad.dim() - 2))
        return self.transpose(grad, x, self.raw)


def module_layer(module: nn.Module) -> Layer:
    """The `Layer` of a linear/conv module (weights read, never written)."""
    if isinstance(module, nn.Linear):
        return Layer(_linear, module.weight, module.bias, transpose=_linear_transpose)
    if isinstance(module, _CONVOLUTIONS):
        return Layer(
            module._conv_forward, module.weight, module.bias, transpose=_conv_transpose(module)
        )

    def call(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
        if module.bias is not None and bias is None:
            params["bias"] = torch.zeros_like(module.bias)
        return torch.func.functional_call(module, params, (x,))

    return Layer(call, module.weight, module.bias)


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x, weight, bias)


def _linear_transpose(grad: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    return grad.matmul(weight)


_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _conv_transpose(module: nn.Module) -> Callable[[Tensor, Tensor, Tensor], Tensor] | None:
    """The input gradient of a convolution with zero padding given as numbers (None for
    padding modes or ``padding='same'``, which the convolution's own autograd handles). The
    input itself is passed, as autograd does (a stand-in of its shape alone makes the kernel
    copy it, at twice the cost)."""
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        return None
    stride, padding, dilation, groups = (
        list(module.stride), list(module.padding), list(module.dilation), module.groups
    )  # fmt: skip
    output_padding = [0] * len(stride)

    def transpose(grad: Tensor, x: Tensor, weight: Tensor) -> Tensor:
        return torch.ops.aten.convolution_backward(
            grad, x, weight, None, stride, padding, dilation, False, output_padding, groups,
            (True, False, False),
        )[0]  # fmt: skip

    return transpose


def batchnorm_affine(module: nn.Module) -> tuple[Tensor, Tensor]:
    """The per-channel scale and shift of an eval-mode BatchNorm: ``y = scale·x + shift``."""
    with torch.no_grad():
        scale = torch.add(module.running_var, module.eps).rsqrt_()
        if module.weight is not None:
            scale.mul_(module.weight)
        if module.bias is not None:
            return scale, torch.addcmul(module.bias, module.running_mean, scale, value=-1)
        return scale, module.running_mean * -scale


# -- the graph -----------------------------------------------------------------------------------


@dataclass
class Step:
    """One classified node: its kind, a readable path, the module type used by composites."""

    node: fx.Node
    kind: str
    path: str
    key: type | None = None
    module: nn.Module | None = None
    first: bool = False
    output_layer: bool = False
    pooled_by: Step | None = None  # an activation read only by this max pooling


_REDUCTIONS = {torch.mean, torch.sum, "mean", "sum"}


def _reduces_batch(x: Tensor, args: tuple, kwargs: dict) -> bool:
    """Whether a mean/sum step reduces dimension 0 (no `dim`: all of them)."""
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if dim is None:
        return True
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    return any(int(d) % max(x.dim(), 1) == 0 for d in dims)


_INPLACE_FUNCTIONS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, F.relu_, torch.relu_,
}  # fmt: skip


def _changed_in_place(node: fx.Node, modules: dict[str, nn.Module]) -> Any:
    """The argument an in-place operation changes (its first), or None."""
    if not node.args:
        return None
    if node.op == "call_method":
        name = str(node.target)
        inplace = name.endswith("_") and not name.startswith("_") and name != "requires_grad_"
    elif node.op == "call_function":
        inplace = node.target in _INPLACE_FUNCTIONS or node.kwargs.get("inplace") is True
    elif node.op == "call_module":
        inplace = getattr(modules.get(str(node.target)), "inplace", False) is True
    else:
        inplace = False
    return node.args[0] if inplace else None


_METADATA_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_cuda"}
_METADATA_METHODS = {"size", "dim", "numel", "nelement", "ndimension", "get_device"}


def _metadata(node: fx.Node) -> bool:
    """Whether the node reads a tensor's metadata (its shape, dtype, device): a number, not a
    value that relevance flows through, so what is computed from it is a constant."""
    if node.op == "call_method":
        return node.target in _METADATA_METHODS
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in _METADATA_ATTRIBUTES
    return False


class Graph:
    """A traced model whose operations on the input→output path are classified.

    `layers` maps linear steps to their `Layer`; canonizers replace entries (and BatchNorm steps
    merged into a layer become identities) and restore them afterwards.
    """

    def __init__(self, model: Any, method: str, traces: TraceCache | None = None) -> None:
        model = unwrap_compiled(model)
        if is_scripted(model) or not isinstance(model, nn.Module):
            raise UnsupportedModelError(
                f"{method} propagates through the model's layers and needs an eager "
                "torch.nn.Module (not a TorchScript model or a plain function)."
            )
        try:
            # the graph alone: the model itself stands in for the GraphModule that
            # `fx.symbolic_trace` would also build (its code generation costs more than the
            # trace); an explainer's `traces` give its last trace again while nothing the
            # trace may have read has changed (`tracing.trace_key`)
            self.graph, self.constants = (trace if traces is None else traces)(model)
        except UnsupportedModelError:
            raise
        except Exception as exc:  # fx raises many types for untraceable code
            raise UnsupportedModelError(
                f"{method} traces the model with torch.fx to see every operation (functional "
                f"ReLUs, residual adds), and tracing failed: {exc}. Data-dependent control flow "
                "cannot be traced; move it out of forward() or use 'integrated_gradients'."
            ) from exc
        self.module = model
        self.method = method
        self.modules = dict(model.named_modules())
        self.steps: list[Step] = []
        self.layers: dict[str, Layer] = {}
        self.merged: set[str] = set()
        self.carries: dict[fx.Node, bool] = {}
        self._classify()

    # classification
    def _classify(self) -> None:
        carries = self.carries
        first_seen = False
        for node in self.graph.nodes:
            inputs = node.all_input_nodes
            carrying = node.op == "placeholder" or any(carries.get(n, False) for n in inputs)
            carrying = carrying and not _metadata(node)
            carries[node] = carrying
            step = Step(node, "constant", _path(node))
            if node.op in ("placeholder", "output", "get_attr"):
                step.kind = node.op
            elif carrying:
                self._classify_call(step, carries)
            if step.kind == "linear" and not first_seen:
                step.first, first_seen = True, True
            self.steps.append(step)
        self._refuse_lost_mutations()
        self._mark_output_layer()
        self._mark_pooled_activations()
        self.last_uses = _last_uses(self.graph)
        self._named = {  # the forward's named parameters (not *args, **kwargs)
            str(n.target)
            for n in self.graph.nodes
            if n.op == "placeholder" and not str(n.target).startswith("*")
        }

    def _refuse_lost_mutations(self) -> None:
        """Every operation runs out of place here, which is exact where the tensor an in-place
        operation changes is not read again afterwards (``out += x; out = relu(out)``). Where
        it is read again, that read would see the old value: refused, by name."""
        order = {node: i for i, node in enumerate(self.graph.nodes)}
        for node in self.graph.nodes:
            changed = _changed_in_place(node, self.modules)
            if not isinstance(changed, fx.Node):
                continue
            later = [u for u in changed.users if u is not node and order[u] > order[node]]
            if later:
                raise UnsupportedModelError(
                    f"{self.method}: '{_path(node)}' changes '{changed.name}' in place "
                    f"({_name(node.target)}) and '{later[0].name}' reads it afterwards; "
                    "lumos runs every operation out of place, so that read would see the old "
                    "value. Write it out of place, e.g. `a = a + b` instead of `a.add_(b)`."
                )

    def _classify_call(self, step: Step, carries: dict[fx.Node, bool]) -> None:
        node = step.node
        target = node.target
        if node.op == "call_module":
            module = self.modules[target]
            step.module, step.key = module, type(module)
            kind = _EXTRA.get(type(module))
            if kind:
                step.kind = kind
            elif isinstance(module, LINEAR_MODULES):
                step.kind = "linear"
                self.layers[step.path] = module_layer(module)
            elif isinstance(module, BATCHNORM_MODULES):
                if module.training and module.track_running_stats:
                    raise self._unsupported(
                        step, "a BatchNorm in training mode (its output depends on the batch)",
                        "call model.eval() first",
                    )  # fmt: skip
                step.kind = "batchnorm"
            elif isinstance(module, ACTIVATION_MODULES):
                step.kind = "activation"
            elif isinstance(module, MAX_POOL_MODULES):
                if getattr(module, "return_indices", False):
                    raise self._unsupported(
                        step, "a max pooling that returns its indices (return_indices=True)",
                        "Return the pooled values alone for the explanation (e.g. a flag "
                        "that turns return_indices off), or use 'integrated_gradients'",
                    )  # fmt: skip
                step.kind = "max_pool"
            elif isinstance(module, AVG_POOL_MODULES):
                step.kind = "avg_pool"
            elif isinstance(module, STRUCTURAL_MODULES):
                step.kind = "structural"
            elif isinstance(module, (nn.Softmax, nn.LogSoftmax)):
                raise self._unsupported(step, "softmax", SOFTMAX_FIX)
            else:
                raise self._unsupported(step, f"the module {type(module).__name__}")
            return
        name = target
        arg_carries = [isinstance(a, fx.Node) and carries.get(a, False) for a in node.args]
        if name in _EXTRA:
            step.kind = _EXTRA[name]
        elif name in LINEAR_FUNCTIONS and node.op == "call_function":
            if any(arg_carries[1:]) or any(
                isinstance(v, fx.Node) and carries.get(v, False) for v in node.kwargs.values()
            ):
                raise self._unsupported(step, f"{_name(target)} with input-dependent weights")
            step.kind, step.key = "linear", LINEAR_FUNCTIONS[name]
        elif name in ACTIVATION_FUNCTIONS or name in ACTIVATION_METHODS:
            step.kind, step.key = "activation", nn.ReLU
        elif name in MAX_POOL_FUNCTIONS:
            step.kind, step.key = "max_pool", nn.MaxPool2d
        elif name in AVG_POOL_FUNCTIONS or name in AVG_POOL_METHODS:
            step.kind, step.key = "avg_pool", AVG_POOL_FUNCTIONS.get(name, nn.AdaptiveAvgPool2d)
        elif name in STRUCTURAL_FUNCTIONS or name in STRUCTURAL_METHODS:
            step.kind = "structural"
        elif name in ADD or name in SUB or name in MUL or name in DIV or name in NEG:
            step.kind, step.key = "arithmetic", Affine
        elif name is F.batch_norm:
            if node.kwargs.get("training", node.args[5] if len(node.args) > 5 else False):
                raise self._unsupported(step, "batch_norm in training mode", "call model.eval()")
            step.kind, step.key = "affine", Affine
        elif name in (F.softmax, F.log_softmax, torch.softmax, "softmax", "log_softmax"):
            raise self._unsupported(step, "softmax", SOFTMAX_FIX)
        else:
            raise self._unsupported(step, f"the operation {_name(target)}")

    def _mark_output_layer(self) -> None:
        """The linear layer that produces the output (through structural steps only)."""
        by_node = {s.node: s for s in self.steps}
        output = next(s for s in self.steps if s.kind == "output")
        frontier = list(output.node.all_input_nodes)
        while frontier:
            step = by_node[frontier.pop()]
            if step.kind == "linear":
                step.output_layer = True
            elif step.kind in ("structural", "batchnorm"):
                frontier.extend(step.node.all_input_nodes)

    def _module_layer(self, step: Step) -> Layer | None:
        """The (canonized) `Layer` of a linear module's step; None for functional layers,
        whose weights are arguments (a functional step's path may equal a module's)."""
        if step.kind != "linear" or step.node.op != "call_module":
            return None
        return self.layers.get(step.path)

    def _mark_pooled_activations(self) -> None:
        """Activations whose only reader is a max pooling, as its pooled input (DeepLIFT
        applies the two rules at once, at the pooled size)."""
        by_node = {s.node: s for s in self.steps}
        for step in self.steps:
            users = list(step.node.users)
            if step.kind != "activation" or len(users) != 1:
                continue
            pool = by_node[users[0]]
            if pool.kind == "max_pool" and pool.node.args and pool.node.args[0] is step.node:
                step.pooled_by = pool

    def _unsupported(self, step: Step, what: str, fix: str | None = None) -> UnsupportedModelError:
        fix = fix or (
            "Rewrite it with supported operations, or declare it with "
            "lumos.attribution.propagation.register_op(op, kind) if it is elementwise "
            "('activation'), a pooling ('max_pool', 'avg_pool') or moves values ('structural')"
        )
        return UnsupportedModelError(
            f"{self.method} has no propagation rule for {what} at '{step.path}' (traced node "
            f"'{step.node.name}'). {fix}."
        )

    def _carrying_tensors(self, node: fx.Node, args: tuple) -> list[int]:
        return [
            i
            for i, (a, n) in enumerate(zip(args, node.args))
            if isinstance(a, Tensor) and isinstance(n, fx.Node) and self.carries.get(n, False)
        ]

    def _carrying_position(self, node: fx.Node, args: tuple) -> int:
        positions = self._carrying_tensors(node, args)
        return positions[0] if positions else 0

    def _arithmetic_kind(self, step: Step, args: tuple) -> str:
        """``+ − × ÷``: a sum of activations, an affine op with a constant, or shape arithmetic."""
        n = len(self._carrying_tensors(step.node, args))
        if n == 0:
            return "constant"
        if n == 1:
            return "affine"
        if step.node.target in ADD or step.node.target in SUB:
            return "sum"
        raise self._unsupported(
            step, f"{_name(step.node.target)} of two activations (a gating product)"
        )

    # running
    def run(
        self, strategy: Strategy, inputs: Sequence[Tensor], keys: Sequence[str] | None = None
    ) -> Any:
        """Evaluate the graph on `inputs` (positional, or keyword arguments named by `keys`),
        letting `strategy` compute every classified step."""
        env: dict[fx.Node, Any] = {}
        inputs = self._root_inputs(inputs, keys)
        positional = iter(inputs)
        named = dict(zip(keys, inputs)) if keys is not None else None
        for step in self.steps:
            node = step.node
            if node.op == "placeholder":
                env[node] = self._placeholder(node, positional, named)
                continue
            if node.op == "output":
                return self._root_output(
                    inputs, keys, fx.node.map_arg(node.args[0], lambda n: env[n])
                )
            args = fx.node.map_arg(node.args, lambda n: env[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
            env[node] = self._evaluate(step, strategy, args, kwargs)
            for done in self.last_uses.get(node, ()):
                del env[done]  # (as eager code would drop it: peak memory)
        raise UnsupportedModelError("The traced model has no output.")

    def run_lockstep(
        self,
        strategy: Strategy,
        reference: Strategy,
        inputs: Sequence[Tensor],
        references: Sequence[Tensor],
        keys: Sequence[str] | None = None,
    ) -> tuple[Any, Any]:
        """`run` on `inputs` with `strategy` and on `references` (without gradients) with
        `reference`, step by step and the references first, so that each step of the inputs
        finds what `reference` kept of the same step. A linear step runs both in one call
        where `strategy.paired_layer` can: one pass over its weights instead of two."""
        env: dict[fx.Node, Any] = {}
        env_ref: dict[fx.Node, Any] = {}
        references = self._root_inputs(references, keys)
        inputs = self._root_inputs(inputs, keys)
        positional, positional_ref = iter(inputs), iter(references)
        named = dict(zip(keys, inputs)) if keys is not None else None
        named_ref = dict(zip(keys, references)) if keys is not None else None
        for step in self.steps:
            node = step.node
            if node.op == "placeholder":
                env[node] = self._placeholder(node, positional, named)
                env_ref[node] = self._placeholder(node, positional_ref, named_ref)
                continue
            if node.op == "output":
                return (
                    self._root_output(
                        inputs, keys, fx.node.map_arg(node.args[0], lambda n: env[n])
                    ),
                    self._root_output(
                        references, keys, fx.node.map_arg(node.args[0], lambda n: env_ref[n])
                    ),
                )
            args = fx.node.map_arg(node.args, lambda n: env[n])
            args_ref = fx.node.map_arg(node.args, lambda n: env_ref[n])
            layer = self._module_layer(step)
            module = step.module
            if (
                layer is not None
                and not node.kwargs
                and (module is None or not (module._forward_pre_hooks or module._forward_hooks))
            ):
                pair = strategy.paired_layer(step, layer, args[0], args_ref[0])
            else:
                pair = None
            if pair is not None:
                env[node], env_ref[node] = pair
            else:
                kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
                kwargs_ref = fx.node.map_arg(node.kwargs, lambda n: env_ref[n])
                with torch.no_grad():
                    env_ref[node] = self._evaluate(step, reference, args_ref, kwargs_ref)
                env[node] = self._evaluate(step, strategy, args, kwargs)
            for done in self.last_uses.get(node, ()):
                del env[done], env_ref[done]
        raise UnsupportedModelError("The traced model has no output.")

    def _root_inputs(
        self, inputs: Sequence[Tensor], keys: Sequence[str] | None
    ) -> Sequence[Tensor]:
        """The inputs after the model's own forward pre-hooks, which fx does not trace (it
        traces the forward, not the call): they run here, once per pass, and may replace the
        inputs as in a call of the model (e.g. a shift; autograd follows what they compute)."""
        module = self.module
        if not module._forward_pre_hooks:
            return inputs
        args = tuple(inputs) if keys is None else ()
        kwargs = {} if keys is None else dict(zip(keys, inputs))
        for key, hook in list(module._forward_pre_hooks.items()):
            if key in module._forward_pre_hooks_with_kwargs:
                result = hook(module, args, kwargs)
                if result is not None:
                    if not (isinstance(result, tuple) and len(result) == 2):
                        raise UnsupportedModelError(
                            "A forward pre-hook with kwargs on the model must return None or "
                            f"(args, kwargs), as torch requires; it returned {type(result)}."
                        )
                    args, kwargs = tuple(result[0]), dict(result[1])
            else:
                result = hook(module, args)
                if result is not None:
                    args = result if isinstance(result, tuple) else (result,)
        if keys is None:
            changed = bool(kwargs) or len(args) != len(inputs)
        else:
            changed = bool(args) or set(kwargs) != set(keys)
        if changed:
            raise UnsupportedModelError(
                "A forward pre-hook on the model changes which inputs it receives; propagation "
                "methods need the inputs they were given, one for one. Remove the hook."
            )
        return list(args) if keys is None else [kwargs[k] for k in keys]

    def _root_output(
        self, inputs: Sequence[Tensor], keys: Sequence[str] | None, output: Any
    ) -> Any:
        """The model's own forward hooks, run once per pass on the graph's output; one that
        replaces the output is refused (the methods' rules would not reach into it)."""
        module = self.module
        if module._forward_hooks:
            args = tuple(inputs) if keys is None else ()
            _post_hooks(module, args, output, "the model")
        return output

    def _placeholder(self, node: fx.Node, positional, named: dict | None) -> Any:
        target = str(node.target)
        if target.startswith("**"):  # forward(..., **options): the inputs given no parameter
            return {} if named is None else {k: v for k, v in named.items() if k not in self._named}
        if target.startswith("*"):  # forward(x, *rest): the remaining positional inputs
            return () if named is not None else tuple(positional)
        if named is not None and node.target in named:
            return named[node.target]
        if named is None:
            value = next(positional, None)
            if value is not None:
                return value
        if node.args:
            return node.args[0]  # the argument's default
        raise UnsupportedModelError(
            f"{self.method}: the model's forward() needs the argument '{node.target}', which "
            "the inputs do not provide."
        )

    def _evaluate(self, step: Step, strategy: Strategy, args: tuple, kwargs: dict) -> Any:
        node, module = step.node, step.module
        kind = step.kind
        if module is not None and (module._forward_pre_hooks or module._forward_hooks):
            _pre_hooks(module, args, step.path)
        if kind == "arithmetic":
            kind = self._arithmetic_kind(step, args)
        if kind == "get_attr":
            target = node.target
            out = self.constants[target] if target in self.constants else _attr(self.module, target)
        elif kind in ("constant", "structural"):
            out = _call(node, self.module, args, kwargs)
        elif kind == "linear":
            layer = self._module_layer(step)
            if layer is None:
                layer = _functional_layer(node.target, args, kwargs)
            out = strategy.layer(step, layer, args[0])
        elif kind == "batchnorm":
            x = args[0]
            out = x if step.path in self.merged else strategy.affine(step, _bn_fn(module), x)
        elif kind == "sum":
            out = strategy.sum(step, *_sum_terms(node, args))
        else:
            position = self._carrying_position(node, args)
            x = args[position]
            fn = _with_input(node, self.module, args, kwargs, position)
            if kind == "max_pool":
                fn.with_indices = _pool_with_indices(step, x, args, kwargs, position)
            reduction = kind == "avg_pool" and node.target in _REDUCTIONS
            if reduction and _reduces_batch(x, args, kwargs):
                raise self._unsupported(
                    step, f"{_name(node.target)} over the batch dimension (it mixes examples)",
                    "reduce over the other dimensions only (e.g. x.mean((2, 3)))",
                )  # fmt: skip
            handler = {
                "activation": strategy.activation,
                "max_pool": strategy.max_pool,
                "avg_pool": strategy.avg_pool,
                "affine": strategy.affine,
            }[kind]
            out = handler(step, fn, x)
        if module is not None and module._forward_hooks:
            _post_hooks(module, args, out, step.path)
        return out


def _last_uses(graph: fx.Graph) -> dict[fx.Node, list[fx.Node]]:
    """For each node, the earlier nodes whose value no later node reads (the output node
    keeps what it returns)."""
    order = list(graph.nodes)
    last: dict[fx.Node, fx.Node] = {}
    for node in order:
        for used in node.all_input_nodes:
            last[used] = node
    out: dict[fx.Node, list[fx.Node]] = {}
    for used, user in last.items():
        if user.op != "output":
            out.setdefault(user, []).append(used)
    return out


def _attr(root: nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _path(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    scope = node.meta.get("scope")
    return f"{scope}.{node.name}" if scope else node.name


def _name(target: Any) -> str:
    if isinstance(target, str):
        return f"Tensor.{target}"
    return getattr(target, "__name__", repr(target))


def _call(node: fx.Node, root: nn.Module, args: tuple, kwargs: dict) -> Any:
    if "inplace" in kwargs:
        kwargs = {**kwargs, "inplace": False}
    if node.op == "call_module":
        module = _attr(root, node.target)
        if getattr(module, "inplace", False) and args and isinstance(args[0], Tensor):
            args = (args[0].clone(), *args[1:])  # the input may be saved for the backward pass
        # (its forward alone: the step runs the module's hooks once, with what it computes)
        return module.forward(*args, **kwargs)
    if node.op == "call_method":
        name = node.target[:-1] if node.target.endswith("_") else node.target
        return getattr(args[0], name)(*args[1:], **kwargs)
    target = _INPLACE_TO_PLAIN.get(node.target, node.target)
    if target is F.relu and len(args) > 1:
        args = args[:1]
    return target(*args, **kwargs)


def _with_input(node: fx.Node, root: nn.Module, args: tuple, kwargs: dict, position: int):
    """The step as a function of its carrying input alone (the other arguments bound)."""

    def fn(x: Tensor) -> Tensor:
        new_args = (*args[:position], x, *args[position + 1 :])
        return _call(node, root, new_args, kwargs)

    return fn


_POOLS_WITH_INDICES: dict[Any, tuple[Callable, int, int]] = {
    # pooling → (its function, spatial dims, position of `return_indices` after the input)
    nn.MaxPool1d: (F.max_pool1d, 1, 5), nn.MaxPool2d: (F.max_pool2d, 2, 5),
    nn.MaxPool3d: (F.max_pool3d, 3, 5), nn.AdaptiveMaxPool1d: (F.adaptive_max_pool1d, 1, 1),
    nn.AdaptiveMaxPool2d: (F.adaptive_max_pool2d, 2, 1),
    nn.AdaptiveMaxPool3d: (F.adaptive_max_pool3d, 3, 1),
}  # fmt: skip
_POOLS_WITH_INDICES.update({v[0]: v for v in list(_POOLS_WITH_INDICES.values())})


def _pool_with_indices(
    step: Step, x: Tensor, args: tuple, kwargs: dict, position: int
) -> Callable[[Tensor], tuple[Tensor, Tensor]] | None:
    """``x ↦ (y, indices)`` for a standard max pooling of a batched (N, C, *spatial) input —
    the indices flat over the spatial dims, as torch returns them — or None (other layouts,
    input-dependent options, or a pooling that already returns its indices)."""
    module = step.module
    if module is not None:
        spec = _POOLS_WITH_INDICES.get(type(module))
        if spec is None or getattr(module, "return_indices", False):
            return None
        fn, dims, at = spec
        kwargs = {}
        if at == 1:  # adaptive pooling: (output_size, return_indices)
            options: tuple = (module.output_size,)
        else:
            options = (
                module.kernel_size, module.stride, module.padding, module.dilation,
                module.ceil_mode,
            )  # fmt: skip
    else:
        spec = _POOLS_WITH_INDICES.get(step.node.target)
        if spec is None or position != 0 or step.node.op != "call_function":
            return None
        fn, dims, at = spec
        options, kwargs = tuple(args[1:]), dict(kwargs)
        if len(options) > at:
            if options[at]:
                return None
            options = options[:at]
        if kwargs.pop("return_indices", False):
            return None
        if any(isinstance(v, Tensor) for v in (*options, *kwargs.values())):
            return None
    if x.dim() != dims + 2:
        return None
    if dims == 2:
        return lambda t: _pool_2d(fn, t, options, kwargs)
    return lambda t: fn(t, *options, **kwargs, return_indices=True)


class IndexedMaxPool(torch.autograd.Function):
    """A standard max pooling through its `with_indices` form (channels-last on the CPU,
    `_pool_2d`); its gradient goes to each output's winner, as torch's own does (the same
    winners, overlapping windows adding up). Used on the CPU only, where it is the faster."""

    @staticmethod
    def forward(ctx, x: Tensor, pool: Callable[[Tensor], tuple[Tensor, Tensor]]) -> Tensor:
        with torch.no_grad():
            y, indices = pool(x)
        ctx.save_for_backward(indices)
        ctx.shape = x.shape
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        (indices,) = ctx.saved_tensors
        n, c = ctx.shape[:2]
        out = grad.new_zeros(ctx.shape).view(n, c, -1)
        out.scatter_add_(2, indices.reshape(n, c, -1), grad.reshape(n, c, -1))
        return out.view(ctx.shape), None


def _pool_2d(fn: Callable, x: Tensor, options: tuple, kwargs: dict) -> tuple[Tensor, Tensor]:
    """A 2-d max pooling with its indices, run in the channels-last layout where the input is
    large and on the CPU: torch's CPU kernel for that layout is vectorised and its NCHW one is
    not, so it is two to six times as fast even with both conversions (values, indices and ties
    are the same). On a GPU the NCHW kernel is the faster, and the only one that picks a
    window's first element where all of it is -inf."""
    if (
        x.device.type != "cpu"
        or x.numel() < 1 << 16
        or x.is_contiguous(memory_format=torch.channels_last)
    ):
        return fn(x, *options, **kwargs, return_indices=True)
    y, indices = fn(
        x.contiguous(memory_format=torch.channels_last), *options, **kwargs, return_indices=True
    )
    return y.contiguous(), indices.contiguous()


def _functional_layer(target: Any, args: tuple, kwargs: dict) -> Layer:
    rest, options = args[3:], {k: v for k, v in kwargs.items() if k not in ("weight", "bias")}
    weight = kwargs.get("weight", args[1] if len(args) > 1 else None)
    bias = kwargs.get("bias", args[2] if len(args) > 2 else None)

    def fn(x: Tensor, w: Tensor | None, b: Tensor | None) -> Tensor:
        return target(x, w, b, *rest, **options)

    return Layer(fn, weight, bias)


def _bn_fn(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """The eval-mode BatchNorm as one fused call."""
    mean, var, weight, bias = module.running_mean, module.running_var, module.weight, module.bias
    return lambda x: F.batch_norm(x, mean, var, weight, bias, False, 0.0, module.eps)


def _sum_terms(node: fx.Node, args: tuple) -> tuple[list[Tensor], list[float]]:
    """Operands and signs of ``a + b``, ``a - b``, ``torch.add(a, b, alpha=k)``."""
    a, b = args[0], args[1]
    alpha = float(node.kwargs.get("alpha", 1.0))
    sign = -alpha if node.target in SUB else alpha
    return [a, b], [1.0, sign]


def _pre_hooks(module: nn.Module, args: tuple, path: str) -> None:
    for key, hook in list(module._forward_pre_hooks.items()):
        if key in module._forward_pre_hooks_with_kwargs:
            result = hook(module, args, {})
        else:
            result = hook(module, args)
        if result is not None:
            raise UnsupportedModelError(
                f"A forward pre-hook on '{path}' replaces the module's input; propagation "
                "methods compute their own layer outputs and cannot honour it. Remove the hook."
            )


def _post_hooks(module: nn.Module, args: tuple, out: Any, path: str) -> None:
    for key, hook in list(module._forward_hooks.items()):
        if key in module._forward_hooks_with_kwargs:
            result = hook(module, args, {}, out)
        else:
            result = hook(module, args, out)
        if result is not None and result is not out:
            raise UnsupportedModelError(
                f"A forward hook on '{path}' replaces the module's output; propagation methods "
                "compute their own layer outputs and cannot honour it. Remove the hook."
            )


class GraphMethod(Method):
    """A method that runs the model's traced graph (LRP, DeepLIFT, excitation backprop), with
    the shared option `reuse_trace`: keep the trace between calls of this explainer while
    nothing it read has changed (see `tracing`)."""

    def __init__(
        self, model: Callable, *, batch_size: int | None = None, reuse_trace: bool = False
    ) -> None:
        super().__init__(model, batch_size=batch_size)
        if not isinstance(reuse_trace, bool):
            raise InputError(f"reuse_trace must be True or False, got {reuse_trace!r}.")
        self.reuse_trace = reuse_trace
        self.traces = TraceCache() if reuse_trace else None

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "reuse_trace": self.reuse_trace}

    def traced(self) -> Graph:
        """This call's graph of the model (traced now, or the explainer's kept trace)."""
        return Graph(self.model, self.name, self.traces)


class Strategy:
    """What each kind of step computes; the base class is the plain forward pass."""

    def layer(self, step: Step, layer: Layer, x: Tensor) -> Tensor:
        return layer(x)

    def paired_layer(
        self, step: Step, layer: Layer, x: Tensor, x_ref: Tensor
    ) -> tuple[Tensor, Tensor] | None:
        """`layer` on the inputs and the references together (see `Graph.run_lockstep`), or
        None to run them apart."""
        return None

    def affine(self, step: Step, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        return fn(x)

    def activation(self, step: Step, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        return fn(x)

    def max_pool(self, step: Step, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        return fn(x)

    def avg_pool(self, step: Step, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        return fn(x)

    def sum(self, step: Step, terms: list[Tensor], signs: list[float]) -> Tensor:
        return weighted_sum(terms, signs)


def weighted_sum(terms: Sequence[Tensor], signs: Sequence[float]) -> Tensor:
    out = terms[0] * signs[0] if signs[0] != 1.0 else terms[0]
    for t, s in zip(terms[1:], signs[1:]):
        out = out + (t if s == 1.0 else t * s)
    return out
