"""CAMs weighted without gradients: the classifier's weights (CAM), the activations' principal
component (Eigen-CAM), the score of masked inputs (Score-CAM), the drop when a channel is ablated
(Ablation-CAM)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lumos.attribution.cam.base import CAMMethod, Reshape, find_layer, resize
from lumos.attribution.cam.downstream import Downstream
from lumos.attribution.layer import resolve_layers
from lumos.core.batching import chunks, rows_per_call
from lumos.core.errors import InputError, TargetError, UnsupportedModelError
from lumos.core.method import Attribution, Context
from lumos.core.model import hooks
from lumos.core.registry import register


@register("cam", family="cam")
class CAM(CAMMethod):
    """CAM: the classifier's weights of the target class applied to the last conv maps.

    Zhou et al. (2016), "Learning Deep Features for Discriminative Localization". For a network
    ending in global average pooling and a linear layer ``f_c = Σ_k w_ck · mean_ij A_kij + b_c``:
    ``map = Σ_k w_ck A_k``. Identity: ``mean_ij map + b_c = f_c`` (error in `delta`, computed
    before ReLU and upsampling; non-zero when the head is not GAP + linear).

    Options:
        fc: the final linear layer (dotted path or module); None takes the last nn.Linear called.
    """

    uses_gradients = False

    def __init__(
        self,
        model: Callable,
        *,
        layer: Any = None,
        fc: Any = None,
        relu: bool = True,
        upsample: bool = True,
        reshape: str | Reshape | None = None,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(
            model,
            layer=layer,
            relu=relu,
            upsample=upsample,
            reshape=reshape,
            batch_size=batch_size,
        )
        self.fc = None if fc is None else resolve_layers(self, fc)[0]

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "fc": None if self.fc is None else self.fc[0]}

    def attribute(self, ctx: Context) -> Attribution:
        if ctx.target.is_callable or ctx.target.indices is None:
            raise TargetError(
                f"{self.name} uses the classifier's row of the target class: pass an int class "
                "(or 'predicted'); for callable targets use 'grad_cam'."
            )
        layers = self.layers or [find_layer(self, ctx)]
        fc = self.fc[1] if self.fc is not None else _last_linear(self, ctx)
        classes = ctx.target.indices.to(ctx.device)[: ctx.n]
        acts, _ = self.record(ctx, [module for _, module in layers])
        raws = [_class_map(fc, a, classes) for a in acts]
        delta = None
        if len(raws) == 1:
            bias = 0 if fc.bias is None else fc.bias[classes]
            delta = raws[0].flatten(1).mean(1) + bias - ctx.target_values()
        return self.result(ctx, layers, raws, delta)


def _class_map(fc: nn.Linear, acts: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    if not isinstance(fc, nn.Linear) or fc.in_features != acts.shape[1]:
        raise UnsupportedModelError(
            f"cam needs global average pooling and one nn.Linear after `layer`, with as many "
            f"inputs as the layer has channels ({acts.shape[1]}). Pass layer= (the maps before "
            "pooling) and fc=, or use 'grad_cam'."
        )
    weights = fc.weight[classes].to(acts.dtype)
    return (weights[:, :, None, None] * acts).sum(1)


def _last_linear(method: CAMMethod, ctx: Context) -> nn.Linear:
    linears: list[nn.Linear] = []
    factories = [
        (lambda m=m: m.register_forward_hook(lambda mod, args, out: linears.append(mod)))
        for m in method.model.modules()
        if isinstance(m, nn.Linear)
    ]
    with hooks(*factories), torch.no_grad():
        method.call([x[:1] for x in ctx.inputs], ctx.structure)
    if not linears:
        raise UnsupportedModelError("cam needs a final nn.Linear layer; pass fc= or use grad_cam.")
    return linears[-1]


@register("eigen_cam", family="cam")
class EigenCAM(CAMMethod):
    """Eigen-CAM: the projection of the activations on their first principal component.

    Muhammad & Yeasin (2020), "Eigen-CAM: Class Activation Map using Principal Components".
    With ``Ā`` the ``(h·w, C)`` activations centred over positions and ``v`` its first right
    singular vector: ``map = Ā v``. Class-agnostic (the target is not used); the sign of ``v``
    is chosen so that the map correlates positively with the total activation.
    """

    uses_gradients = False

    def combine(self, ctx: Context, module: nn.Module, acts: torch.Tensor, grads: Any):
        b, _, h, w = acts.shape
        flat = acts.flatten(2).transpose(1, 2)
        centred = flat - flat.mean(1, keepdim=True)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        projection = centred @ vh[:, 0, :].unsqueeze(2)
        total = centred.sum(2, keepdim=True)
        sign = torch.where((projection * total).sum((1, 2)) < 0, -1.0, 1.0).to(acts.dtype)
        return (projection.squeeze(2) * sign[:, None]).view(b, h, w)


class _PerChannelCAM(CAMMethod):
    """A CAM that runs the model once per channel, `batch_size` rows at a time (default 64)."""

    uses_gradients = False

    def __init__(
        self,
        model: Callable,
        *,
        layer: Any = None,
        relu: bool = True,
        upsample: bool = True,
        reshape: str | Reshape | None = None,
        batch_size: int | None = 64,
    ) -> None:
        super().__init__(
            model,
            layer=layer,
            relu=relu,
            upsample=upsample,
            reshape=reshape,
            batch_size=batch_size,
        )


@register("score_cam", family="cam")
class ScoreCAM(_PerChannelCAM):
    """Score-CAM: channels weighted by the target score of the input masked by each channel.

    Wang et al. (2020), "Score-CAM: Score-Weighted Visual Explanations for Convolutional Neural
    Networks". ``M_k`` = channel k upsampled to the input and min-max scaled to [0, 1];
    ``w = softmax_k(f_c(x ⊙ M_k))``; ``map = Σ_k w_k A_k``. One forward per channel and example,
    batched by `batch_size` on the model's device (channels that are constant, e.g. all zero
    after a ReLU, share one forward of the blank input). With several inputs, the first is
    masked.

    Options:
        top_k: only the k channels with the largest activation mass per example are scored
            (the others get weight 0): k forwards instead of C, the documented fast variant.
    """

    def __init__(
        self,
        model: Callable,
        *,
        layer: Any = None,
        top_k: int | None = None,
        relu: bool = True,
        upsample: bool = True,
        reshape: str | Reshape | None = None,
        batch_size: int | None = 64,
    ) -> None:
        super().__init__(
            model,
            layer=layer,
            relu=relu,
            upsample=upsample,
            reshape=reshape,
            batch_size=batch_size,
        )
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
            raise InputError(f"top_k must be a positive int or None, got {top_k!r}.")
        if top_k is not None and top_k < 1:
            raise InputError(f"top_k must be a positive int or None, got {top_k!r}.")
        self.top_k = top_k

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "top_k": self.top_k}

    def combine(self, ctx: Context, module: nn.Module, acts: torch.Tensor, grads: Any):
        image = ctx.inputs[0]
        if image.dim() != 4 or not image.is_floating_point():
            raise InputError(
                f"{self.name} masks an image input (B, C, H, W) of floats; the first input has "
                f"shape {tuple(image.shape)} and dtype {image.dtype}."
            )
        n, c, h, w = acts.shape
        if self.top_k is None:
            channels = torch.arange(c, device=acts.device).expand(n, c)
        else:
            channels = acts.flatten(2).sum(2).topk(min(self.top_k, c), dim=1).indices
        k = channels.shape[1]
        example = torch.arange(n, device=acts.device).repeat_interleave(k)
        channel = channels.reshape(-1)
        scores = torch.empty(n * k, device=acts.device, dtype=acts.dtype)
        # a constant channel's mask is 0 everywhere: its score is that of the blank input,
        # computed once per example instead of once per such channel
        constant = (acts.amax((2, 3)) == acts.amin((2, 3))).gather(1, channels).reshape(-1)
        live = (~constant).nonzero().squeeze(1)
        with torch.no_grad():
            if constant.any():
                blank = torch.empty(n, device=acts.device, dtype=acts.dtype)
                for s in chunks(n, self.batch_size):
                    rows = [torch.zeros_like(image[s]), *(x[s] for x in ctx.inputs[1:])]
                    index = torch.arange(s.start, s.stop, device=acts.device)
                    output = self.call(rows, ctx.structure)
                    blank[s] = ctx.target.select(output, index).to(acts.dtype)
                scores[constant] = blank[example[constant]]
            for s in chunks(len(live), rows_per_call(self.batch_size, ctx.inputs)):
                e, c = example[live[s]], channel[live[s]]
                masks = resize(acts[e, c].unsqueeze(1), tuple(image.shape[-2:]))
                low = masks.flatten(1).amin(1).view(-1, 1, 1, 1)
                high = masks.flatten(1).amax(1).view(-1, 1, 1, 1)
                masks = ((masks - low) / (high - low + 1e-8)).to(image.dtype)
                rows = [image[e] * masks, *(x[e] for x in ctx.inputs[1:])]
                output = self.call(rows, ctx.structure)
                scores[live[s]] = ctx.target.select(output, e).to(acts.dtype)
        weights = torch.softmax(scores.view(n, k), dim=1)
        chosen = acts.gather(1, channels[:, :, None, None].expand(n, k, h, w))
        return (weights[:, :, None, None] * chosen).sum(1)


@register("ablation_cam", family="cam")
class AblationCAM(_PerChannelCAM):
    """Ablation-CAM: channels weighted by how much the target drops when the channel is zeroed.

    Desai & Ramaswamy (2020), "Ablation-CAM: Visual Explanations for Deep Convolutional Network
    via Gradient-free Localization". ``w_k = (f_c − f_c^{(A_k = 0)}) / |f_c|`` (the paper divides
    by ``f_c``; the absolute value keeps a negative score from flipping the map);
    ``map = Σ_k w_k A_k``. Only the part of the network after the layer is re-run, once per
    channel and example, when the model traces with torch.fx (`extras["short_circuit"]`);
    otherwise the whole model runs with the layer's output replaced.
    """

    def layer_maps(self, ctx: Context, modules: list[nn.Module]) -> list[torch.Tensor]:
        if callable(self.reshape):
            raise UnsupportedModelError(
                f"{self.name} zeroes channels in the layer's own layout; it supports "
                "reshape=None or 'vit', not a callable."
            )
        names = {id(m): name for name, m in self.model.named_modules()}
        raws, _ = self.raw_record(ctx, modules)
        self._short = []
        return [self._one_layer(ctx, names[id(m)], m, raw) for m, raw in zip(modules, raws)]

    def attribute(self, ctx: Context) -> Attribution:
        result = super().attribute(ctx)
        result.extras["short_circuit"] = all(self._short)
        return result

    def _one_layer(
        self, ctx: Context, name: str, module: nn.Module, raw: torch.Tensor
    ) -> torch.Tensor:
        acts = self.to_maps(raw)
        n, c = acts.shape[:2]
        downstream = Downstream(self, name, module, ctx, raw)
        self._short.append(downstream.short_circuits)
        example = torch.arange(n, device=raw.device).repeat_interleave(c)
        channel = torch.arange(c, device=raw.device).repeat(n)
        scores = torch.empty(n * c, device=raw.device, dtype=acts.dtype)
        with torch.no_grad():
            for s in chunks(n * c, self.batch_size):
                e, rows = example[s], torch.arange(s.stop - s.start, device=raw.device)
                ablated = raw[e].clone()
                if self.reshape is None:
                    ablated[rows, channel[s]] = 0
                else:
                    ablated[rows, 1:, channel[s]] = 0
                scores[s] = ctx.target.select(downstream(ablated, e), e).to(acts.dtype)
        base = ctx.target_values().to(acts.dtype)
        weights = (base[:, None] - scores.view(n, c)) / base.abs().clamp_min(1e-12)[:, None]
        return (weights[:, :, None, None] * acts).sum(1)
