"""Contextual Importance and Utility (CIU): how much the output can move when one player sweeps
its range, and how favourable the current value is within that movement."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lumos.attribution.blackbox import BlackBoxMethod, make_players
from lumos.core.batching import check_count
from lumos.core.errors import InputError
from lumos.core.explanation import Explanation
from lumos.core.inputs import InputsLike
from lumos.core.method import Attribution, Context
from lumos.core.registry import register
from lumos.core.targets import TargetLike


@register("ciu", family="perturbation", needs={"black_box"})
class ContextualImportanceUtility(BlackBoxMethod):
    """Contextual Importance and Utility of every player.

    Främling (1996, 2020), "Decision Theory Meets Explainable AI". Player i sweeps its range
    with the other players fixed at x: ``x_i(t) = low_i + t (high_i − low_i)``, t on `n_samples`
    evenly spaced points in [0, 1] (a player of several elements moves them together). With
    ``Cmin, Cmax`` the smallest and largest target seen during the sweep (and at x):
    ``CI_i = (Cmax − Cmin) / (absmax − absmin)`` and ``CU_i = (f(x) − Cmin) / (Cmax − Cmin)``
    (0.5 where the output does not move). Attributions are ``CI · (CU − 0.5)``: positive when
    the current value is more favourable than the middle of what the player can reach, scaled
    by how much it matters; CI and CU are in ``extras["ci"]``, ``extras["cu"]`` (n, M).

    Options:
        n_samples: points of every player's sweep (model evaluations per player).
        output_range: ``(absmin, absmax)`` of the target, e.g. (0, 1) for probabilities;
            None uses the smallest and largest target seen over all sweeps of the example.
        ranges (call): ``(low, high)``, each a number or a tensor broadcastable to one
            example. None: the per-element min and max of `baselines` when it is a background
            set (K, ...), else each input's overall min and max (pixel range for images).
        feature_mask (call): players, as for the Shapley methods (default: features; an
            8 × 8 grid for images).
    """

    def __init__(
        self,
        model: Callable,
        *,
        n_samples: int = 8,
        output_range: tuple[float, float] | None = None,
        progress: bool = False,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(model, progress=progress, batch_size=batch_size)
        self.n_samples = check_count(n_samples, "n_samples", 2)
        if output_range is not None and (
            len(output_range) != 2 or not float(output_range[1]) > float(output_range[0])
        ):
            raise InputError(
                f"output_range must be (absmin, absmax) with absmin < absmax, got {output_range!r}."
            )
        self.output_range = output_range

    def _config(self) -> dict[str, Any]:
        config = {**super()._config(), "n_samples": self.n_samples}
        config["output_range"] = self.output_range
        config.pop("seed")
        return config

    def explain(
        self,
        inputs: InputsLike,
        target: TargetLike = "predicted",
        *,
        ranges: Any = None,
        baselines: Any = None,
        feature_mask: Any = None,
    ) -> Explanation:
        return self._run(
            inputs, target, ranges=ranges, baselines=baselines, feature_mask=feature_mask
        )

    def attribute(
        self, ctx: Context, ranges: Any = None, baselines: Any = None, feature_mask: Any = None
    ) -> Attribution:
        if len(ctx.inputs) != 1 or not ctx.inputs[0].is_floating_point():
            raise InputError("ciu sweeps values, so it needs one floating-point input tensor.")
        x = ctx.inputs[0]
        low, high = _ranges(ranges, baselines, x)
        players = make_players(ctx.inputs, feature_mask)
        m, s, n = players.n_players, self.n_samples, ctx.n
        steps = torch.linspace(0, 1, s, device=x.device, dtype=x.dtype)
        mask = players.masks[0]
        example = torch.arange(n, device=x.device).repeat_interleave(m * s)

        def make_rows(sl: slice) -> list[torch.Tensor]:
            r = torch.arange(sl.start, sl.stop, device=x.device)
            e, player, t = r // (m * s), (r // s) % m, steps[r % s]
            own = mask[e if mask.shape[0] > 1 else torch.zeros_like(e)] == player.view(
                (-1,) + (1,) * (x.dim() - 1)
            )
            shape = (-1,) + (1,) * (x.dim() - 1)
            swept = low + t.view(shape) * (high - low)
            return [torch.where(own, swept, x[e])]

        values = self.evaluate(ctx, make_rows, example).double().view(n, m, s)
        f_x = ctx.target_values().double()
        c_min = torch.minimum(values.min(2).values, f_x[:, None])
        c_max = torch.maximum(values.max(2).values, f_x[:, None])
        if self.output_range is None:
            abs_min, abs_max = c_min.min(1).values[:, None], c_max.max(1).values[:, None]
        else:
            abs_min, abs_max = (float(v) for v in self.output_range)
        span = c_max - c_min
        ci = span / torch.as_tensor(abs_max - abs_min).clamp(min=1e-12)
        cu = torch.where(span > 1e-12, (f_x[:, None] - c_min) / span.clamp(min=1e-12), 0.5)
        attributions = players.spread(ci * (cu - 0.5), [x.shape])
        return Attribution(
            attributions, extras={"ci": ci, "cu": cu, "feature_mask": players.masks[0]}
        )


def _ranges(ranges: Any, baselines: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) broadcastable to one example."""
    if ranges is not None:
        if not isinstance(ranges, (tuple, list)) or len(ranges) != 2:
            raise InputError("ranges must be (low, high): numbers or tensors like one example.")
        low, high = (torch.as_tensor(v, dtype=x.dtype, device=x.device) for v in ranges)
    elif isinstance(baselines, torch.Tensor) and baselines.dim() == x.dim():
        background = baselines.to(device=x.device, dtype=x.dtype)
        low, high = background.min(0).values, background.max(0).values
    elif baselines is not None:
        raise InputError("ciu takes a background set (K, ...) as baselines to find the ranges.")
    else:
        low, high = x.min(), x.max()
    try:
        torch.broadcast_shapes(low.shape, x.shape[1:])
        torch.broadcast_shapes(high.shape, x.shape[1:])
    except RuntimeError as exc:
        raise InputError(
            f"ranges of shapes {tuple(low.shape)}, {tuple(high.shape)} do not broadcast to one "
            f"example of shape {tuple(x.shape[1:])}."
        ) from exc
    return low, high
