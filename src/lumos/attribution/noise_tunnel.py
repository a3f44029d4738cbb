"""Noise tunnel: SmoothGrad, SmoothGrad² and VarGrad around any registered method.

All noisy copies of all examples are attributed in one call of the base method, so its own
batching (`batch_size`) bounds memory and the model sees full batches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from lumos.core.errors import InputError, UnsupportedModelError, unknown_name
from lumos.core.explanation import Explanation
from lumos.core.inputs import InputsLike
from lumos.core.method import Attribution, Context, Method, example_rows
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
        seed: int = 0,
        base_options: Mapping[str, Any] | None = None,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(model, batch_size=batch_size)
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise InputError(f"n_samples must be a positive int, got {n_samples!r}.")
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
        self.base_name, self.n_samples, self.stdev, self.seed = base, n_samples, stdev, seed
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

    def explain_targets(
        self, inputs: InputsLike, targets: Sequence[TargetLike], **call_options: Any
    ) -> list[Explanation]:
        # the noise is drawn per call for the batch it sees, so targets run one by one to give
        # exactly what `explain(inputs, target)` gives
        return [self.explain(inputs, t, **call_options) for t in targets]

    def attribute(self, ctx: Context) -> Attribution:
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        example = example_rows(ctx.n, self.n_samples, ctx.device)
        noisy = []
        for x in ctx.inputs:
            if self.stdev is None:
                flat = x.flatten(1)
                scale = 0.15 * (flat.max(1).values - flat.min(1).values)
                scale = scale.view((-1,) + (1,) * (x.dim() - 1))[example]
            else:
                scale = torch.tensor(float(self.stdev), dtype=x.dtype, device=x.device)
            noise = torch.randn((len(example), *x.shape[1:]), generator=generator, dtype=x.dtype)
            noisy.append(x[example] + scale * noise.to(x.device))
        noisy_ctx = Context(self.base, tuple(noisy), ctx.structure, ctx.target.expand(example))
        maps = self.base.attribute(noisy_ctx, **self.base_call).attributions
        shaped = [m.reshape(self.n_samples, ctx.n, *m.shape[1:]) for m in maps]
        return Attribution(tuple(self.reduce(m) for m in shaped))

    def reduce(self, maps: torch.Tensor) -> torch.Tensor:
        """Combine the (n_samples, batch, ...) noisy maps into one map per example."""
        return maps.mean(0)


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
        seed: int = 0,
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

    def reduce(self, maps: torch.Tensor) -> torch.Tensor:
        return (maps**2).mean(0) if self.squared else maps.mean(0)


@register("vargrad", family="gradient", needs={"gradients"})
class VarGrad(NoiseTunnel):
    """VarGrad: the variance of a method's attributions over Gaussian-noised inputs.

    Adebayo et al. (2018), "Local Explanation Methods for Deep Neural Networks Lack
    Sensitivity to Parameter Values". ``attr = 1/n Σ_k A(x + ε_k)² − (1/n Σ_k A(x + ε_k))²``.
    """

    def reduce(self, maps: torch.Tensor) -> torch.Tensor:
        return maps.var(0, unbiased=False)
