"""The CAM pipeline: find the layer, record its activations (and the target's gradients there),
weigh the channels, sum, ReLU, upsample, fuse layers. Variants override only `weights` (or
`combine` when the map is not a channel-weighted sum). Everything stays in torch on the model's
device and runs batched across examples; normalization is a display option, not done here."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lumos.attribution.layer import (
    check_differentiable,
    layer_gradients,
    layer_pass,
    main_tensor,
    resolve_layers,
)
from lumos.core.batching import chunks
from lumos.core.errors import InputError, UnsupportedModelError
from lumos.core.explanation import Explanation
from lumos.core.inputs import InputsLike, Structure
from lumos.core.method import Attribution, Context, Live, Method
from lumos.core.model import hooks
from lumos.core.targets import TargetLike

CAM_MAPS = Structure("tensor", ("map",))
Reshape = Callable[[torch.Tensor], torch.Tensor]


def vit_reshape(tokens: torch.Tensor) -> torch.Tensor:
    """``(B, 1 + h·w, C)`` tokens → ``(B, C, h, w)``: drop the class token, fold a square grid."""
    if tokens.dim() != 3:
        raise UnsupportedModelError(
            f"reshape='vit' expects token activations (B, 1 + h·w, C), got {tuple(tokens.shape)}."
        )
    b, t, c = tokens.shape
    side = math.isqrt(t - 1)
    if t < 2 or side * side != t - 1:
        raise UnsupportedModelError(
            f"reshape='vit' needs 1 class token + a square grid of patch tokens, but the layer has "
            f"{t} tokens; pass reshape=<callable> that maps the layer output to (B, C, h, w)."
        )
    return tokens[:, 1:].reshape(b, side, side, c).permute(0, 3, 1, 2)


class CAMMethod(Method):
    """Base of the CAM family: a map ``Σ_k w_k A_k`` over the channels ``A_k`` of a layer.

    Options (shared by every CAM method):
        layer: dotted module path or module; a list fuses several layers (each map scaled to
            unit max |value| per example, then averaged). None finds the last module with a
            spatial ``(B, C, h, w)`` output, called once, by a recording forward pass; the choice
            is reported in ``Explanation.extras["layer"]``.
        relu: keep only positive evidence (default, as in the papers); False keeps the sign.
        upsample: maps at input resolution ``(B, 1, H, W)`` (bilinear); False keeps the layer's
            resolution ``(B, 1, h, w)``.
        reshape: None for ``(B, C, h, w)`` activations; ``"vit"`` for ``(B, 1 + h·w, C)`` tokens
            (class token dropped, patch tokens folded to h×w); or a callable to ``(B, C, h, w)``.
    Maps are returned unnormalized, with ``Structure("tensor", ("map",))``.
    """

    uses_gradients: ClassVar[bool] = True

    def __init__(
        self,
        model: Callable,
        *,
        layer: Any = None,
        relu: bool = True,
        upsample: bool = True,
        reshape: str | Reshape | None = None,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(model, batch_size=batch_size)
        if reshape is not None and reshape != "vit" and not callable(reshape):
            raise InputError(
                f"reshape must be None, 'vit' or a callable to (B, C, h, w), got {reshape!r}."
            )
        self.layers = None if layer is None else resolve_layers(self, layer)
        self.relu, self.upsample, self.reshape = bool(relu), bool(upsample), reshape
        self.single_pass = self.layers is not None  # see `live_forward`

    def _config(self) -> dict[str, Any]:
        reshape = self.reshape if not callable(self.reshape) else "callable"
        names = None if self.layers is None else [name for name, _ in self.layers]
        return {
            **super()._config(),
            "layer": names[0] if names and len(names) == 1 else names,
            "relu": self.relu,
            "upsample": self.upsample,
            "reshape": reshape,
        }

    def explain(self, inputs: InputsLike, target: TargetLike = "predicted") -> Explanation:
        return self._run(inputs, target)

    # -- the pipeline ----------------------------------------------------------------------
    def attribute(self, ctx: Context) -> Attribution:
        layers = self.layers or [find_layer(self, ctx)]
        return self.result(ctx, layers, self.layer_maps(ctx, [module for _, module in layers]))

    def result(
        self,
        ctx: Context,
        layers: list[tuple[str, nn.Module]],
        raws: list[torch.Tensor],
        delta: torch.Tensor | None = None,
    ) -> Attribution:
        """The finished map of the raw per-layer maps, with the layer names in `extras`."""
        names = [name for name, _ in layers]
        return Attribution(
            (self.finish(ctx, raws),),
            delta=delta,
            extras={"layer": names[0] if len(names) == 1 else names},
            structure=CAM_MAPS,
        )

    def layer_maps(self, ctx: Context, modules: list[nn.Module]) -> list[torch.Tensor]:
        """The raw map ``(B, h, w)`` of every layer (before ReLU and upsampling)."""
        acts, grads = self.record(ctx, modules)
        return [self.combine(ctx, module, a, g) for module, a, g in zip(modules, acts, grads)]

    def live_forward(self, xs: Sequence[torch.Tensor], structure: Structure, **_: Any) -> Live:
        """The pipeline's forward pass on the examples doubles as the recording pass (keeping
        the graph after the layers for gradient methods) when the layers are given and the
        examples fit in one batch: one forward pass fewer per explanation."""
        modules = [module for _, module in self.layers]
        with torch.set_grad_enabled(self.uses_gradients):
            output, acts = layer_pass(self, modules, xs, structure, leaf=self.uses_gradients)
        return Live(tuple(xs), output, acts)

    def raw_record(self, ctx: Context, modules: list[nn.Module]):
        """Activations (and, for gradient methods, target gradients) of every layer in the
        layer's own layout, batched over examples by `batch_size`."""
        live = ctx.take_live(self)
        if live is not None:
            output, acts = live.output, live.state
            if not self.uses_gradients:
                return [a.detach() for a in acts], [None] * len(acts)
            values = ctx.target.select(output, torch.arange(ctx.n, device=ctx.device))
            check_differentiable(self, values)
            grads = torch.autograd.grad(values.sum(), acts, allow_unused=True)
            grads = [torch.zeros_like(a) if g is None else g for a, g in zip(acts, grads)]
            return [a.detach() for a in acts], grads
        acts: list[list[torch.Tensor]] = [[] for _ in modules]
        grads: list[list[torch.Tensor]] = [[] for _ in modules]
        if self.uses_gradients:

            def rows(s: slice) -> list[torch.Tensor]:
                return [x[s] for x in ctx.inputs]

            index = torch.arange(ctx.n, device=ctx.device)
            parts = layer_gradients(self, modules, rows, ctx.n, index, ctx.target, ctx.structure)
            for _, a_chunk, g_chunk, _ in parts:
                for i, (a, g) in enumerate(zip(a_chunk, g_chunk)):
                    acts[i].append(a)
                    grads[i].append(g)
        else:
            with torch.no_grad():
                for s in chunks(ctx.n, self.batch_size):
                    _, a_chunk = layer_pass(
                        self, modules, [x[s] for x in ctx.inputs], ctx.structure
                    )
                    for i, a in enumerate(a_chunk):
                        acts[i].append(a)
        return [torch.cat(a) for a in acts], [torch.cat(g) if g else None for g in grads]

    def record(self, ctx: Context, modules: list[nn.Module]):
        """`raw_record` as maps ``(B, C, h, w)``."""
        acts, grads = self.raw_record(ctx, modules)
        return (
            [self.to_maps(a) for a in acts],
            [None if g is None else self.to_maps(g) for g in grads],
        )

    def combine(
        self, ctx: Context, module: nn.Module, acts: torch.Tensor, grads: torch.Tensor | None
    ) -> torch.Tensor:
        """The raw map ``Σ_k w_k ⊙ A_k`` of one layer, ``(B, h, w)``."""
        return (self.weights(acts, grads) * acts).sum(1)

    def weights(self, acts: torch.Tensor, grads: torch.Tensor | None) -> torch.Tensor:
        """Channel weights ``(B, C, 1, 1)``, or per-position weights ``(B, C, h, w)``."""
        raise NotImplementedError

    def to_maps(self, act: torch.Tensor) -> torch.Tensor:
        """A layer output as ``(B, C, h, w)`` maps (applying `reshape`)."""
        maps = act if self.reshape is None else self._reshape(act)
        if maps.dim() != 4:
            raise UnsupportedModelError(
                f"{self.name} needs a layer with (B, C, h, w) output, but it has shape "
                f"{tuple(act.shape)}. For token activations (B, 1 + h·w, C) pass reshape='vit' "
                "or reshape=<callable to (B, C, h, w)>."
            )
        return maps

    def _reshape(self, act: torch.Tensor) -> torch.Tensor:
        return vit_reshape(act) if self.reshape == "vit" else self.reshape(act)

    def finish(self, ctx: Context, raws: list[torch.Tensor]) -> torch.Tensor:
        """ReLU, upsample and (for several layers) fuse the raw maps into ``(B, 1, ·, ·)``."""
        maps = [(r.clamp(min=0) if self.relu else r).unsqueeze(1) for r in raws]
        if self.upsample:
            x = ctx.inputs[0]
            if x.dim() != 4:
                raise InputError(
                    f"upsample=True resizes maps to image inputs (B, C, H, W), but the input has "
                    f"shape {tuple(x.shape)}; pass upsample=False for maps at layer resolution."
                )
            size = tuple(x.shape[-2:])
        else:
            size = max((tuple(m.shape[-2:]) for m in maps), key=lambda hw: hw[0] * hw[1])
        maps = [resize(m, size) for m in maps]
        if len(maps) == 1:
            return maps[0]
        scaled = [m / m.abs().flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1) for m in maps]
        return torch.stack(scaled).mean(0)


def resize(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``(N, 1, h, w)`` maps (a no-op at the same size)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def find_layer(method: CAMMethod, ctx: Context) -> tuple[str, nn.Module]:
    """The last module (in call order) that runs once and whose output is a spatial map."""
    model = method.model
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"{method.name} needs a torch.nn.Module to find its layers.")
    calls: list[tuple[str, Any]] = []

    def recorder(name: str):
        return lambda module, args, output: calls.append((name, output))

    modules = [(name, m) for name, m in model.named_modules() if name]
    factories = [
        (lambda m=m, name=name: m.register_forward_hook(recorder(name))) for name, m in modules
    ]
    with hooks(*factories), torch.no_grad():
        method.call([x[:1] for x in ctx.inputs], ctx.structure)
    counts: dict[str, int] = {}
    for name, _ in calls:
        counts[name] = counts.get(name, 0) + 1
    by_name = dict(modules)
    for name, output in reversed(calls):
        if counts[name] == 1 and _is_spatial(method, output):
            return name, by_name[name]
    raise UnsupportedModelError(
        f"{method.name} found no layer with a spatial (B, C, h, w) output (h·w > 1); pass "
        "layer='<dotted path>', and reshape= for token-shaped activations."
    )


def _is_spatial(method: CAMMethod, output: Any) -> bool:
    try:
        maps = method.to_maps(main_tensor(output))
    except Exception:  # any layer whose output cannot be read as maps is simply not a candidate
        return False
    return maps.dim() == 4 and maps.shape[-1] * maps.shape[-2] > 1 and maps.is_floating_point()
