"""DeepLIFT (Rescale and RevealCancel rules) and DeepLIFT-SHAP on the traced graph.

Rescale: the model runs on the inputs with gradients and, step by step alongside, on the
references without gradients (`Graph.run_lockstep`), keeping every nonlinearity's reference
input and output; each nonlinearity's backward uses the multiplier ``Δy/Δx`` against those
reference values instead of its derivative, while linear steps (layers, BatchNorm, sums,
average pooling, reshapes) keep their gradient, which is exact for differences. Only the inputs
are back-propagated (the references would carry the same multipliers), a baseline shared by all
examples (zeros, a number, one reference row) runs as one row, and a layer whose weights
outweigh its inputs runs once on inputs and references together: DeepLIFT costs about one
gradient plus a forward pass of the reference rows. Max pooling uses the DeepLIFT max-pool rule
(as in Captum): the output difference is split between the positions that win for the input
and for the reference; an activation read only by a max pooling (conv → ReLU → pool) takes both
rules at once at the pooled size. The RevealCancel rule (`rule="reveal_cancel"`) runs
``[x'; Δ⁺; Δ⁻]`` instead and keeps positive and negative differences apart through every
linear step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lumos.attribution.baselines import background_set, resolve_baselines
from lumos.attribution.propagation.canonizers import MergeBatchNorm
from lumos.attribution.propagation.graph import (
    Graph,
    GraphMethod,
    Layer,
    Step,
    Strategy,
    weighted_sum,
)
from lumos.attribution.propagation.lrp import total
from lumos.core.batching import chunks
from lumos.core.errors import GradientError, UnsupportedModelError, unknown_name
from lumos.core.explanation import Explanation
from lumos.core.inputs import InputsLike, Structure
from lumos.core.method import Attribution, Context, Live
from lumos.core.registry import register
from lumos.core.targets import TargetLike, output_tensor

Tensor = torch.Tensor
EPS = 1e-10  # |Δx| below which the multiplier is the derivative (Captum's threshold)


class _Rescale(torch.autograd.Function):
    """Elementwise ``y = f(x)``; backward multiplies by ``(y − y')/(x − x')`` against the
    reference values ``x', y'`` (the derivative at x where ``|x − x'| < EPS``)."""

    @staticmethod
    def forward(
        ctx, x: Tensor, fn: Callable, x_ref: Tensor, y_ref: Tensor, scratch: Scratch,
        relu: bool = False,
    ) -> Tensor:  # fmt: skip
        with torch.no_grad():
            y = fn(x)
            dx = torch.sub(x, x_ref, out=scratch.like(x))
            multiplier = (y - y_ref).div_(dx)  # where |Δx| < EPS replaced below
            size = dx.abs_()
            if relu and not _checks_on_host(x):  # the derivative is x > 0: masks, no read-back
                slope = (x > 0).to(x.dtype)
                multiplier = torch.where(size < EPS, slope, multiplier, out=multiplier)
                ctx.save_for_backward(multiplier)
                return y
        # the smallest |Δx| decides whether any element needs the derivative: two passes over
        # memory, where a boolean mask, a second pass of the function and `where` cost several
        # (and `where` is slow on the CPU)
        if bool(size.amin() < EPS):
            slope = _vjp(fn, x, torch.ones_like(x))
            multiplier = torch.where(size < EPS, slope, multiplier, out=multiplier)
        ctx.save_for_backward(multiplier)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        (multiplier,) = ctx.saved_tensors
        return grad * multiplier, None, None, None, None, None


class Scratch:
    """One reusable buffer for a pass's temporary tensors: on the CPU every fresh large tensor
    costs its page faults, often more than the arithmetic written into it."""

    def __init__(self) -> None:
        self.buffer: Tensor | None = None

    def like(self, x: Tensor) -> Tensor:
        """An uninitialised tensor of x's shape, dtype and device (valid until the next call)."""
        b = self.buffer
        if b is None or b.numel() < x.numel() or b.dtype != x.dtype or b.device != x.device:
            b = self.buffer = torch.empty(x.numel(), dtype=x.dtype, device=x.device)
        return b[: x.numel()].view(x.shape)


class _MaxPoolRescale(torch.autograd.Function):
    """Max pooling: ``Δy`` is split between the winners of the input and of the reference.

    With the output's upstream multipliers g, the input receives
    ``(J_xᵀ[g ⊙ (max(y, y') − y')] + J_x'ᵀ[g ⊙ (y − max(y, y'))]) / Δx``, where J are the
    pooling Jacobians (routing to each one's winners); the plain gradient where ``Δx = 0``. The
    input's pooling runs once, keeping its own small graph for the backward pass.
    """

    @staticmethod
    def forward(ctx, x: Tensor, fn: Callable, x_ref: Tensor, y_ref: Tensor) -> Tensor:
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            out = fn(leaf)
        ctx.leaf, ctx.out, ctx.fn = leaf, out, fn
        ctx.save_for_backward(x_ref, y_ref)
        return out.detach()

    @staticmethod
    def backward(ctx, grad: Tensor):
        leaf, out, fn = ctx.leaf, ctx.out, ctx.fn
        x_ref, y_ref = ctx.saved_tensors
        x, y = leaf.detach(), out.detach()
        y_top = torch.maximum(y, y_ref)
        dx = x - x_ref
        small = dx.abs() < EPS
        any_small = bool(small.any())
        (routed,) = torch.autograd.grad(out, leaf, grad * (y_top - y_ref), retain_graph=True)
        with torch.enable_grad():  # (batched gradients of a shared row loop over rows: slower)
            leaf_ref = x_ref.detach().expand_as(x).requires_grad_(True)
            (routed_ref,) = torch.autograd.grad(fn(leaf_ref), leaf_ref, grad * (y - y_top))
        result = (routed + routed_ref).div_(dx)  # where Δx ≈ 0 replaced below
        if any_small:
            (plain,) = torch.autograd.grad(out, leaf, grad, retain_graph=True)
            result = torch.where(small, plain, result, out=result)
        return result, None, None, None  # (the pooling graph lives as long as ctx)


class _IndexedMaxPoolRescale(torch.autograd.Function):
    """The max-pool rule of `_MaxPoolRescale` for standard pooling layers, from the winners'
    indices of the input and of the reference (recorded in the references' pass): every output
    position j sends ``g_j (max(y_j, y'_j) − y'_j) / Δx_i`` to the input's winner i and
    ``g_j (y_j − max(y_j, y'_j)) / Δx_i'`` to the reference's winner i' (the plain gradient
    ``g_j`` to i, and nothing to i', where that position's ``|Δx| < EPS``). All arithmetic is
    at the pooled size; the input-sized work is one scatter."""

    @staticmethod
    def forward(ctx, x: Tensor, pool: Callable, x_ref: Tensor, y_ref: Tensor, i_ref: Tensor):
        with torch.no_grad():
            y, i = pool(x)
        ctx.mark_non_differentiable(i)
        ctx.save_for_backward(x, y, i, x_ref, y_ref, i_ref)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, y, i, x_ref, y_ref, i_ref = ctx.saved_tensors
        n, c = x.shape[:2]
        flat = (n, c, -1)
        x_f, y_f, i_f, g = x.reshape(flat), y.reshape(flat), i.reshape(flat), grad.reshape(flat)
        xr_f = x_ref.reshape(x_ref.shape[0], c, -1).expand_as(x_f)
        ir_f = i_ref.reshape(i_ref.shape[0], c, -1).expand_as(i_f)
        yr_k = y_ref.reshape(y_ref.shape[0], c, -1)
        dx_won = y_f - xr_f.gather(2, i_f)  # Δx at the input's winners (y is x there)
        dx_lost = x_f.gather(2, ir_f).sub_(yr_k)  # Δx at the reference's winners
        result = _route(y_f - yr_k, g, dx_won, dx_lost, i_f, ir_f, x_f, lambda: 1.0)
        return result.view_as(x), None, None, None, None


class _RescaleMaxPool(torch.autograd.Function):
    """An activation f read only by a standard max pooling: the Rescale rule and the max-pool
    rule at once, at the pooled size.

    For pooled output j with upstream multiplier g_j, input winner i and reference winner i',
    and ``Δ = y_j − y'_j``: the max-pool rule sends ``g_j max(Δ, 0)`` to i and
    ``g_j min(Δ, 0)`` to i', each divided by that position's ``Δf``, and the activation
    multiplies by ``Δf/Δz`` there, so the pre-activation receives
    ``g_j max(Δ, 0)/(z_i − z'_i)`` at i and ``g_j min(Δ, 0)/(z_i' − z'_i')`` at i' — and, where
    ``|Δz| < EPS``, the derivative ``g_j f'(z_i)`` at i and nothing at i'. (`_Rescale`
    followed by `_IndexedMaxPoolRescale` gives the same wherever a vanishing difference is
    exactly zero, as ties between input and reference are; they differ below ``EPS·g/Δz``
    otherwise.) The activation's full-size multipliers are never formed, and its output is
    not kept. A ReLU (`relu`) is not even applied at full size: max pooling and ReLU commute,
    so the pooling runs on z and the ReLU on its maxima, whose z values are then at hand; the
    winners differ only in windows whose maximum is ≤ 0, where the input's winner receives
    nothing whichever position wins (Δ ≤ 0 there, and f' = 0).
    """

    @staticmethod
    def forward(ctx, z: Tensor, fn: Callable, pool: Callable, z_ref: Tensor, y_ref: Tensor,
                i_ref: Tensor, a: Tensor | None) -> Tensor:  # fmt: skip
        """`a` is the activation's output f(z), or None for a ReLU, pooled first."""
        with torch.no_grad():
            if a is None:
                z_won, i = pool(z)
                y = torch.relu(z_won)
            else:
                (y, i), z_won = pool(a), None
        ctx.fn = torch.relu if a is None else fn
        ctx.save_for_backward(z, y, i, z_ref, y_ref, i_ref, z_won)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, y, i, z_ref, y_ref, i_ref, z_won = ctx.saved_tensors
        n, c = z.shape[:2]
        flat = (n, c, -1)
        z_f, i_f, g = z.reshape(flat), i.reshape(flat), grad.reshape(flat)
        zr_k = z_ref.reshape(z_ref.shape[0], c, -1)  # one row when the reference is shared
        ir_k = i_ref.reshape(i_ref.shape[0], c, -1)
        ir_f = ir_k.expand_as(i_f)
        delta = y.reshape(flat) - y_ref.reshape(y_ref.shape[0], c, -1)
        # z' at the input's winners differs by row; at the reference's own winners it is the
        # reference's pooled pre-activation, gathered once per reference row
        z_won = z_f.gather(2, i_f) if z_won is None else z_won.reshape(flat)
        dz_won = zr_k.expand_as(z_f).gather(2, i_f).neg_().add_(z_won)
        dz_lost = z_f.gather(2, ir_f).sub_(zr_k.gather(2, ir_k))
        fn = ctx.fn

        def slope() -> Tensor:  # f' at the input's winners, taken in z's own layout
            if fn is torch.relu:  # (z > 0 there, at the pooled size)
                return (z_won > 0).to(z_won.dtype)
            return _vjp(fn, z, torch.ones_like(z)).reshape(flat).gather(2, i_f)

        result = _route(delta, g, dz_won, dz_lost, i_f, ir_f, z_f, slope)
        return result.view_as(z), None, None, None, None, None, None


_RELUS = {F.relu, F.relu_, torch.relu, torch.relu_, "relu", "relu_"}


def _is_relu(step: Step) -> bool:
    """Whether a step is exactly a ReLU (a module subclass may change its forward)."""
    if step.node.op == "call_module":
        return type(step.module) is nn.ReLU
    return step.node.target in _RELUS


def _hook_free(*modules: nn.Module | None) -> bool:
    """Whether no forward hook (global, or on these modules) would see the tensors."""
    for name in ("_global_forward_hooks", "_global_forward_pre_hooks"):
        if getattr(nn.modules.module, name, None):
            return False
    return all(m is None or not (m._forward_hooks or m._forward_pre_hooks) for m in modules)


def _route(
    delta: Tensor, g: Tensor, dx_won: Tensor, dx_lost: Tensor, won_at: Tensor, lost_at: Tensor,
    like: Tensor, slope: Callable[[], Tensor | float],
) -> Tensor:  # fmt: skip
    """The max-pool rule at the pooled size, as a tensor shaped `like` (N, C, L): each pooled
    output sends ``g·max(Δ, 0)/Δx`` to its input's winner (`won_at`) and ``g·min(Δ, 0)/Δx``
    to its reference's winner (`lost_at`), Δx taken there; where ``|Δx| < EPS``, ``g·slope``
    to the input's winner and nothing to the reference's. Float masks, not `where` (slow on
    the CPU); `delta` is consumed."""
    won = _share(delta.clamp(min=0).mul_(g), dx_won, g, slope)
    lost = _share(delta.clamp_(max=0).mul_(g), dx_lost, g, None)
    return torch.zeros_like(like).scatter_add_(2, won_at, won).scatter_add_(2, lost_at, lost)


def _share(part: Tensor, dx: Tensor, g: Tensor, slope: Callable[[], Tensor | float] | None
           ) -> Tensor:  # fmt: skip
    """``part / dx`` in place; where ``|dx| < EPS``, ``g·slope()`` (or 0 without `slope`). On
    an accelerator the masks apply whether needed or not (`_checks_on_host`)."""
    if _checks_on_host(dx) and not bool(dx.abs().amin() < EPS):
        return part.div_(dx)
    small = _below_eps(dx)  # 1 where |dx| < EPS, else 0: dx + small never vanishes
    part.mul_(1 - small).div_(dx.add_(small))
    if slope is not None:
        part.addcmul_(small, g * slope())
    return part


def _checks_on_host(t: Tensor) -> bool:
    """Whether to read back "is any |Δx| below EPS?" and skip the fix-up where none is: on the
    CPU the check is one reduction, but on an accelerator every read-back stalls the queue of
    kernels (the host waits for the device, then the device for the host), so there the fix-up
    runs with masks every time, for ReLUs and for the max-pool rules, whose derivatives are
    cheap."""
    return t.device.type == "cpu"


def _below_eps(t: Tensor) -> Tensor:
    """1.0 where ``|t| < EPS``, else 0.0 (t's dtype)."""
    return t.abs().neg_().add_(EPS).sign_().clamp_(min=0)


def _vjp(fn: Callable, x: Tensor, grad: Tensor) -> Tensor:
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(leaf), leaf, grad)
    return g


class _PairedLayer(torch.autograd.Function):
    """A linear layer on the inputs and the references in one call (one pass over its
    weights); the backward pass differentiates the inputs' rows alone."""

    @staticmethod
    def forward(ctx, x: Tensor, x_ref: Tensor, layer: Layer) -> tuple[Tensor, Tensor]:
        n = x.shape[0]
        both = layer(torch.cat([x, x_ref]))
        # (the references' rows are copied out: the records keep them for later chunks, and a
        # view would keep this chunk's rows alive with them)
        y, y_ref = both[:n], both[n:].clone()
        ctx.layer = layer
        ctx.save_for_backward(x)
        ctx.mark_non_differentiable(y_ref)
        return y, y_ref

    @staticmethod
    def backward(ctx, grad: Tensor, _: Tensor):
        (x,) = ctx.saved_tensors
        return ctx.layer.input_gradient(grad, x), None, None


def _worth_pairing(layer: Layer, x: Tensor) -> bool:
    """Whether a layer's weights outweigh its inputs, so that one pass over the weights saved
    pays for copying the inputs next to the references."""
    return layer.raw.numel() >= x.numel()


class _RecordReferences(Strategy):
    """The plain forward pass of the references, keeping every nonlinearity's input and output
    by graph node."""

    def __init__(self) -> None:
        self.records: dict[Any, tuple[Tensor, ...]] = {}  # (x, y[, indices])

    def activation(self, step: Step, fn: Callable, x: Tensor) -> Tensor:
        y = fn(x)
        self.records[step.node] = (x, y)
        return y

    def max_pool(self, step: Step, fn: Callable, x: Tensor) -> Tensor:
        """Also the winners' indices, where the pooling is a standard one."""
        indexed = getattr(fn, "with_indices", None)
        if indexed is None:
            return self.activation(step, fn, x)
        y, indices = indexed(x)
        self.records[step.node] = (x, y, indices)
        return y


def _joined(parts: Sequence[dict[Any, tuple[Tensor, ...]]]) -> dict[Any, tuple[Tensor, ...]]:
    """Records of consecutive chunks of reference rows, as one."""
    if len(parts) == 1:
        return parts[0]
    return {
        node: tuple(torch.cat(values) for values in zip(*(part[node] for part in parts)))
        for node in parts[0]
    }


class RescaleStrategy(Strategy):
    """DeepLIFT's Rescale rule on the input rows: multipliers for nonlinearities against the
    recorded reference values (row `index[r]` of the references for input row r, or the single
    shared reference row), gradients for linear steps."""

    def __init__(self, references: dict[Any, tuple[Tensor, ...]]) -> None:
        self.references = references
        self.index: Tensor | None = None  # reference row of each input row; None: shared row
        self.rows = 0  # input rows of the current pass
        self.scratch = Scratch()
        self.deferred: dict[Any, tuple] = {}  # pooling → (y, x, fn, references, relu)

    def _paired(self, step: Step, x: Tensor) -> tuple[Tensor, ...]:
        recorded = self.references[step.node]
        x_ref = recorded[0]
        if x.dim() == 0 or x.shape[0] != self.rows or x.shape[1:] != x_ref.shape[1:]:
            raise UnsupportedModelError(
                f"DeepLIFT pairs every row with its reference row along the batch dimension, "
                f"but '{step.path}' runs on a tensor of shape {tuple(x.shape)} for a pass of "
                f"{self.rows} rows (the batch is no longer the first dimension there). Keep "
                "the batch first through the model's nonlinearities, or use "
                "'integrated_gradients'."
            )
        if self.index is None:
            return recorded
        return tuple(r[self.index] for r in recorded)

    def activation(self, step: Step, fn: Callable, x: Tensor) -> Tensor:
        if not x.requires_grad:
            return fn(x)
        paired = self._paired(step, x)
        if step.pooled_by is not None:  # the pooling applies both rules (`_RescaleMaxPool`)
            # a ReLU is applied after the pooling there, and x stands in for its output
            # meanwhile: only the pooling reads it, where no hook is there to see it
            relu = _is_relu(step) and _hook_free(step.module, step.pooled_by.module)
            if relu:
                y = x
            else:
                with torch.no_grad():
                    y = fn(x)
            self.deferred[step.pooled_by.node] = (y, x, fn, paired, relu)
            return y
        return _Rescale.apply(x, fn, *paired, self.scratch, _is_relu(step))

    def paired_layer(
        self, step: Step, layer: Layer, x: Tensor, x_ref: Tensor
    ) -> tuple[Tensor, Tensor] | None:
        """Inputs and references through a linear layer in one call, where its input gradient
        is known and pairing pays (`_worth_pairing`: the deep layers of a small batch); linear
        steps are exact for differences, so the references only ride along."""
        if (
            layer.transpose is None
            or not x.requires_grad
            or x_ref.requires_grad
            or x.dim() < 2
            or x.shape[1:] != x_ref.shape[1:]
            or x.dtype != x_ref.dtype
            or not _worth_pairing(layer, x)
        ):
            return None
        return _PairedLayer.apply(x, x_ref, layer)

    def max_pool(self, step: Step, fn: Callable, x: Tensor) -> Tensor:
        indexed = getattr(fn, "with_indices", None)
        deferred = self.deferred.pop(step.node, None)
        if deferred is not None and deferred[0] is x:  # the activation before it, not applied
            a, z, activation, (z_ref, _), relu = deferred
            paired = self._paired(step, z)
            if indexed is not None and len(paired) == 3:
                a = None if relu else a
                return _RescaleMaxPool.apply(z, activation, indexed, z_ref, *paired[1:], a)
            x = _Rescale.apply(z, activation, *deferred[3], self.scratch, relu)
        if not x.requires_grad:
            return fn(x)
        paired = self._paired(step, x)
        if indexed is not None and len(paired) == 3:
            return _IndexedMaxPoolRescale.apply(x, indexed, *paired)
        return _MaxPoolRescale.apply(x, fn, *paired[:2])


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


class RevealCancelStrategy(Strategy):
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
        w = layer.weight_for(ref, step, "deeplift")

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


RULES = ("rescale", "reveal_cancel")


class References:
    """The references' forward pass: every nonlinearity's recorded input and output, the model
    outputs at the references, and whether one row stands for all of them (`shared`)."""

    def __init__(self, records: dict, outputs: Tensor, shared: bool) -> None:
        self.records, self.outputs, self.shared = records, outputs, shared

    def rows(self, refs: Sequence[Tensor], index: Tensor) -> tuple[Tensor, ...]:
        """The reference row of each pair."""
        return tuple(r[:1] if self.shared else r[index] for r in refs)

    def values(self, target: Any, index: Tensor, example: Tensor) -> Tensor:
        """The target at the reference of each pair."""
        outputs = self.outputs
        rows = outputs.expand(len(index), *outputs.shape[1:]) if self.shared else outputs[index]
        return target.select(rows, example)


class _DeepLiftBase(GraphMethod):
    """Shared options: `rule` (``rescale`` | ``reveal_cancel``) and `batch_size`."""

    def __init__(
        self, model: Callable, *, rule: str = "rescale", batch_size: int | None = None,
        reuse_trace: bool = False,
    ) -> None:  # fmt: skip
        super().__init__(model, batch_size=batch_size, reuse_trace=reuse_trace)
        if rule not in RULES:
            raise unknown_name("DeepLIFT rule", rule, RULES)
        self.rule = rule

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "rule": self.rule}

    def graph(self) -> Graph:
        """This call's traced copy of the model with BatchNorm merged (exact for differences;
        saves passes); the copy is dropped afterwards, so nothing needs undoing."""
        graph = self.traced()
        MergeBatchNorm().apply(graph)
        return graph

    def run_graph(
        self, graph: Graph, strategy: Strategy, xs: Sequence[Tensor], structure: Structure,
        grad: bool,
    ) -> Tensor:  # fmt: skip
        """The traced model on `xs` under `strategy`, model errors named with the shapes."""
        keys = structure.keys if structure.kind == "dict" else None
        with torch.set_grad_enabled(grad), self.calling(xs):
            return output_tensor(graph.run(strategy, xs, keys))

    def references(
        self, graph: Graph, rows: Sequence[Tensor], shared: bool, structure: Structure
    ) -> References:
        """Run the reference rows on their own, without gradients, chunk by chunk, recording
        every nonlinearity."""
        parts, outputs = [], []
        for s in chunks(int(rows[0].shape[0]), self.batch_size):
            recorder = _RecordReferences()
            chunk = [r[s] for r in rows]
            outputs.append(self.run_graph(graph, recorder, chunk, structure, grad=False))
            parts.append(recorder.records)
        return References(_joined(parts), torch.cat(outputs), shared)

    def first_pass(
        self, graph: Graph, refs: Sequence[Tensor], structure: Structure,
        xs: Sequence[Tensor], reference: Tensor,
    ) -> tuple[References, RescaleStrategy, Tensor]:  # fmt: skip
        """The references' pass and the first pass of input rows `xs` (requiring grad), whose
        row i pairs with reference row `reference[i]`; returns the references, the Rescale
        strategy (reusable for more input rows) and the model output on `xs`.

        A reference equal on every row (zeros, a number, one row) runs as that one row. Where
        the reference rows fit in one call with `xs` (`batch_size`), the two passes run in
        lockstep and every linear layer runs once on both; otherwise the references run first,
        on their own."""
        shared = all(bool((r == r[:1]).all()) for r in refs)
        rows = tuple(r[:1] for r in refs) if shared else tuple(refs)
        strategy = RescaleStrategy({})
        strategy.index, strategy.rows = (None if shared else reference), int(xs[0].shape[0])
        k = int(rows[0].shape[0])
        if self.batch_size is None or strategy.rows + k <= self.batch_size:
            recorder = _RecordReferences()
            strategy.references = recorder.records  # filled step by step, just in time
            keys = structure.keys if structure.kind == "dict" else None
            with torch.enable_grad(), self.calling(xs):
                output, ref_output = graph.run_lockstep(strategy, recorder, xs, rows, keys)
            ready = References(recorder.records, output_tensor(ref_output), shared)
            return ready, strategy, output_tensor(output)
        ready = self.references(graph, rows, shared, structure)
        strategy.references = ready.records
        return ready, strategy, self.run_graph(graph, strategy, xs, structure, grad=True)

    def multipliers(
        self, ctx: Context, graph: Graph, refs: tuple[Tensor, ...], example: Tensor,
        reference: Tensor, first: tuple | None = None,
    ) -> tuple[tuple[Tensor, ...], Tensor]:  # fmt: skip
        """DeepLIFT for the pairs (input row `example[i]`, reference row `reference[i]`), built
        chunk by chunk of `batch_size` input rows: the contributions ``(x − x') ⊙ m`` summed
        per input example, and the target's value at each pair's reference. `first` is the
        `(References, RescaleStrategy, rows, output)` of the pipeline's pass when it already
        ran one (see `live_forward`)."""
        if self.rule == "reveal_cancel":
            return self._reveal_cancel(ctx, graph, refs, example, reference)
        pairs = int(example.shape[0])
        totals = tuple(torch.zeros_like(x) for x in ctx.inputs)
        f_ref = torch.empty(pairs, dtype=torch.float64, device=ctx.device)
        ready: References | None = None
        if first is not None:
            ready, strategy, xs, output = first
        for s in chunks(pairs, self.batch_size):
            e, r = example[s], reference[s]
            if first is not None:
                first = None  # the pipeline's pass is this first chunk
            else:
                xs = tuple(x[e].detach().requires_grad_(True) for x in ctx.inputs)
                if ready is None:
                    ready, strategy, output = self.first_pass(graph, refs, ctx.structure, xs, r)
                else:
                    strategy.index, strategy.rows = (None if ready.shared else r), len(e)
                    output = self.run_graph(graph, strategy, xs, ctx.structure, grad=True)
            with torch.enable_grad():
                values = ctx.target.select(output, e)
                if not values.requires_grad:
                    raise GradientError(
                        f"{self.name}: the model output does not depend on the inputs "
                        "through differentiable operations."
                    )
                grads = torch.autograd.grad(values.sum(), xs, allow_unused=True)
            for total_, g, x, ref in zip(totals, grads, xs, ready.rows(refs, r)):
                if g is not None:
                    total_.index_add_(0, e, (x.detach() - ref) * g)
            f_ref[s] = ready.values(ctx.target, r, e).double()
        return totals, f_ref

    def _reveal_cancel(
        self, ctx: Context, graph: Graph, refs: tuple[Tensor, ...], example: Tensor,
        reference: Tensor,
    ) -> tuple[tuple[Tensor, ...], Tensor]:  # fmt: skip
        """`multipliers` with the RevealCancel rule: rows ``[x'; Δ⁺; Δ⁻]`` per chunk."""
        strategy = RevealCancelStrategy()
        pairs = int(example.shape[0])
        totals = tuple(torch.zeros_like(x) for x in ctx.inputs)
        f_ref = torch.empty(pairs, dtype=torch.float64, device=ctx.device)
        step = None if self.batch_size is None else max(self.batch_size // strategy.copies, 1)
        for s in chunks(pairs, step):
            m, e = s.stop - s.start, example[s]
            pairs_s = tuple((x[e], r[reference[s]]) for x, r in zip(ctx.inputs, refs))
            xs = tuple(strategy.rows(x, r).requires_grad_(True) for x, r in pairs_s)
            output = self.run_graph(graph, strategy, xs, ctx.structure, grad=True)
            with torch.enable_grad():
                values = ctx.target.select(output, e.repeat(strategy.copies))
                if not values.requires_grad:
                    raise GradientError(
                        f"{self.name}: the model output does not depend on the inputs "
                        "through differentiable operations."
                    )
                grads = torch.autograd.grad(strategy.seeded(values, m), xs, allow_unused=True)
            for total_, g, (x, r) in zip(totals, grads, pairs_s):
                if g is not None:
                    total_.index_add_(0, e, strategy.contributions(x, r, g, m))
            f_ref[s] = strategy.reference_values(values.detach(), m).double()
        return totals, f_ref


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
        reuse_trace: keep the model's torch.fx trace between calls of this explainer while
            nothing it read has changed (saves a trace per call: 2 ms on ResNet-18); only for
            a model whose code and settings stay as they are (see `tracing`).
    """

    def explain(
        self, inputs: InputsLike, target: TargetLike = "predicted", *, baselines: Any = None
    ) -> Explanation:
        return self._run(inputs, target, baselines=baselines)

    @property
    def single_pass(self) -> bool:  # the Rescale pass over the inputs gives their outputs
        return self.rule == "rescale"

    def live_forward(
        self, xs: Sequence[Tensor], structure: Structure, baselines: Any = None
    ) -> Live:
        """The references' pass and the inputs' pass with gradients, whose output is the
        model's output on the inputs, so the pipeline needs no forward pass of its own."""
        graph = self.graph()
        refs = resolve_baselines(baselines, xs, structure)
        rows = tuple(x.detach().requires_grad_(True) for x in xs)
        index = torch.arange(int(xs[0].shape[0]), device=xs[0].device)
        ready, strategy, output = self.first_pass(graph, refs, structure, rows, index)
        return Live(rows, output, (graph, refs, (ready, strategy, rows, output)))

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
        reuse_trace: as for `deeplift`.
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
