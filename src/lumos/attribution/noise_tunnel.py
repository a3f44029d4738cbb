"""Noise tunnel: SmoothGrad, SmoothGrad² and VarGrad around any registered method.

All noisy copies of all examples are attributed in one call of the base method, so its own
batching (`batch_size`) bounds memory and the model sees full batches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from lumos.core.batching import check_count
from lumos.core.errors import InputError, UnsupportedModelError, unknown_name
from lumos.core.explanation import Explanation
from lumos.core.inputs import InputsLike
from lumos.core.method import Attribution, Context, Method, example_rows
from lumos.core.randomness import SeedLike, check_seed, make_generator
from lumos.core.registry import get_method, method_options, register
from lumos.core.targets import TargetLike


class NoiseTunnel(Method):
    """Average a base method's attributions over noisy copies of the input.

    Options:
        base: the registered method to smooth (default ``saliency``).
        n_samples: noisy copies per example.
        stdev: the noise's standard deviation; None uses 15% of each example's value range
            (max − min), the setting Smilkov et al. recommend.
        seed: seeds the noise (same seed, same result).
        base_options: options of the base method (constructor and call), e.g.
            ``{"abs": False}`` or ``{"n_steps": 16, "baselines": "blur"}``.
    """

    reduction = "mean"

    def __init__(
        self,
        model: Callable,
        *,
        base: str = "saliency",
        n_samples: int = 32,
        stdev: float | None = None,
        seed: SeedLike = 0,
        base_options: Mapping[str, Any] | None = None,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(model, batch_size=batch_size)
        check_count(n_samples, "n_samples")
        if stdev is not None and (not isinstance(stdev, (int, float)) or stdev < 0):
            raise InputError(f"stdev must be a non-negative number or None, got {stdev!r}.")
        cls = get_method(base)
        if issubclass(cls, NoiseTunnel):
            raise InputError(f"{self.name} cannot wrap another noise tunnel ({base!r}).")
        if "layer" in cls.needs or cls.family in ("cam", "layer", "neuron"):
            raise UnsupportedModelError(
                f"{self.name} smooths input attributions; {base!r} explains a layer."
            )
        base_options = dict(base_options or {})
        init_names, call_names = method_options(cls)
        unknown = set(base_options) - set(init_names) - set(call_names) - {"batch_size"}
        if unknown:
            raise unknown_name(
                f"option of {base!r}", sorted(unknown)[0], {**init_names, **call_names}
            )
        init = {k: v for k, v in base_options.items() if k in init_names}
        init.setdefault("batch_size", batch_size)
        self.base = cls(model, **init)
        self.base_call = {k: v for k, v in base_options.items() if k in call_names}
        self.needs = cls.needs
        self.base_name, self.n_samples, self.stdev = base, n_samples, stdev
        self.seed = check_seed(seed)
        self.base_options = base_options

    def _config(self) -> dict[str, Any]:
        return {
            **super()._config(),
            "base": self.base_name,
            "n_samples": self.n_samples,
            "stdev": self.stdev,
            "seed": self.seed,
            "base_options": self.base_options,
        }

    def explain(self, inputs: InputsLike, target: TargetLike = "predicted") -> Explanation:
        return self._run(inputs, target)

    def attribute(self, ctx: Context) -> Attribution:
        # Noise is drawn sample by sample in a fixed order, and samples are attributed in groups
        # of about `batch_size` rows, so memory stays bounded and results do not depend on it.
        generator = make_generator(self.seed)
        group = self.n_samples if self.batch_size is None else max(1, self.batch_size // ctx.n)
        scales = [self._scale(x) for x in ctx.inputs]
        total = total_sq = None
        for start in range(0, self.n_samples, group):
            k = min(group, self.n_samples - start)
            draws = [
                [torch.randn(x.shape, generator=generator, dtype=x.dtype) for x in ctx.inputs]
                for _ in range(k)
            ]
            example = example_rows(ctx.n, k, ctx.device)
            noisy = tuple(
                x[example]
                + (scale if scale.dim() == 0 else scale[example])
                * torch.cat([d[i] for d in draws]).to(x.device)
                for i, (x, scale) in enumerate(zip(ctx.inputs, scales))
            )
            noisy_ctx = Context(self.base, noisy, ctx.structure, ctx.target.expand(example))
            call = self._per_row_options(ctx, example)
            maps = self.base.attribute(noisy_ctx, **call).attributions
            shaped = [m.reshape(k, ctx.n, *m.shape[1:]) for m in maps]
            sums = [m.sum(0) for m in shaped]
            squares = [(m * m).sum(0) for m in shaped]
            total = sums if total is None else [t + m for t, m in zip(total, sums)]
            total_sq = squares if total_sq is None else [t + m for t, m in zip(total_sq, squares)]
        return Attribution(
            tuple(
                self.reduce(t / self.n_samples, q / self.n_samples) for t, q in zip(total, total_sq)
            )
        )

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        if self.stdev is not None:
            return torch.tensor(float(self.stdev), dtype=x.dtype, device=x.device)
        flat = x.flatten(1)
        scale = 0.15 * (flat.max(1).values - flat.min(1).values)
        return scale.view((-1,) + (1,) * (x.dim() - 1))

    def _per_row_options(self, ctx: Context, example: torch.Tensor) -> dict[str, Any]:
        """Per-example baselines of the base method, repeated for the noisy copies."""
        call = dict(self.base_call)
        baselines = call.get("baselines")
        if baselines is None or "baselines" in self.base.needs:  # background sets stay whole
            return call
        structure = ctx.structure
        if isinstance(baselines, torch.Tensor) and structure.kind != "tensor":
            return call  # resolve_baselines reports the structure mismatch
        if isinstance(baselines, (int, float, str)):
            return call
        entries = structure.flatten(baselines, "baselines")
        expanded = [
            b[example.to(b.device)]
            if isinstance(b, torch.Tensor) and b.shape == x.shape and ctx.n > 1
            else b
            for b, x in zip(entries, ctx.inputs)
        ]
        call["baselines"] = structure.restore(expanded)
        return call

    def reduce(self, mean: torch.Tensor, mean_square: torch.Tensor) -> torch.Tensor:
        """One map per example from the first two moments of the noisy maps."""
        return mean


@register("smoothgrad", family="gradient", needs={"gradients"})
class SmoothGrad(NoiseTunnel):
    """SmoothGrad: a method's attributions averaged over Gaussian-noised inputs.

    Smilkov et al. (2017), "SmoothGrad: removing noise by adding noise".
    ``attr = 1/n Σ_k A(x + ε_k)``, ``ε_k ∼ N(0, σ²)``; with ``squared=True`` SmoothGrad²
    (Hooker et al. 2019) averages ``A(x + ε_k)²``.
    """

    def __init__(
        self,
        model: Callable,
        *,
        base: str = "saliency",
        n_samples: int = 32,
        stdev: float | None = None,
        seed: SeedLike = 0,
        squared: bool = False,
        base_options: Mapping[str, Any] | None = None,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(
            model,
            base=base,
            n_samples=n_samples,
            stdev=stdev,
            seed=seed,
            base_options=base_options,
            batch_size=batch_size,
        )
        self.squared = squared

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "squared": self.squared}

    def reduce(self, mean: torch.Tensor, mean_square: torch.Tensor) -> torch.Tensor:
        return mean_square if self.squared else mean


@register("vargrad", family="gradient", needs={"gradients"})
class VarGrad(NoiseTunnel):
    """VarGrad: the variance of a method's attributions over Gaussian-noised inputs.

    Adebayo et al. (2018), "Local Explanation Methods for Deep Neural Networks Lack
    Sensitivity to Parameter Values". ``attr = 1/n Σ_k A(x + ε_k)² − (1/n Σ_k A(x + ε_k))²``.
    """

    def reduce(self, mean: torch.Tensor, mean_square: torch.Tensor) -> torch.Tensor:
        return (mean_square - mean * mean).clamp_min(0)
