"""Gradient attribution: saliency, input × gradient, integrated gradients, expected gradients."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from lumos.attribution.baselines import background_set, resolve_baselines
from lumos.core.batching import check_count
from lumos.core.errors import InputError, unknown_name
from lumos.core.explanation import Explanation
from lumos.core.inputs import InputsLike
from lumos.core.method import Attribution, Context, Method, example_rows
from lumos.core.randomness import SeedLike, check_seed, make_generator
from lumos.core.registry import register
from lumos.core.targets import Target, TargetLike, output_tensor


class GradientMethod(Method):
    """Base of methods built on input gradients of the target.

    Subclasses implement `attribute_targets(ctx, targets, ...)`, so several targets share every
    forward pass (`explain_targets`); `attribute` is the one-target case.
    """

    def attribute(self, ctx: Context, **call_options: Any) -> Attribution:
        return self.attribute_targets(ctx, [ctx.target], **call_options)[0]

    def gradients(self, ctx: Context) -> tuple[torch.Tensor, ...]:
        """d target / d inputs at the inputs themselves, batched by `batch_size`."""
        return self.gradients_multi(ctx, [ctx.target])[0]

    def gradients_multi(
        self, ctx: Context, targets: Sequence[Target]
    ) -> list[tuple[torch.Tensor, ...]]:
        """`gradients` for several targets, sharing each forward pass."""
        index = torch.arange(ctx.n, device=ctx.device)
        live = ctx.take_live(self)
        if live is not None:  # the pipeline's forward already ran with gradients
            return self.target_gradients(live.rows, live.output, index, targets)[0]
        grads = [tuple(torch.empty_like(x) for x in ctx.inputs) for _ in targets]
        rows = self.input_gradients_multi(
            lambda s: [x[s] for x in ctx.inputs], ctx.n, index, targets, ctx.structure
        )
        for s, per_target, _ in rows:
            for full, part in zip(grads, per_target):
                for f, p in zip(full, part):
                    f[s] = p
        return grads


@register("saliency", family="gradient", needs={"gradients"})
class Saliency(GradientMethod):
    """Saliency: the gradient of the target with respect to the input.

    Simonyan, Vedaldi & Zisserman (2014), "Deep Inside Convolutional Networks".
    ``attr = |∂f_c(x)/∂x|`` (``abs=True``, as in the paper) or the signed gradient.
    """

    single_pass = True

    def __init__(self, model: Callable, *, abs: bool = True, batch_size: int | None = None):
        super().__init__(model, batch_size=batch_size)
        self.abs = abs

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "abs": self.abs}

    def attribute_targets(self, ctx: Context, targets: Sequence[Target]) -> list[Attribution]:
        return [
            Attribution(tuple(g.abs() for g in grads) if self.abs else grads)
            for grads in self.gradients_multi(ctx, targets)
        ]


@register("input_x_gradient", family="gradient", needs={"gradients"})
class InputXGradient(GradientMethod):
    """Input × gradient: the gradient scaled by the input.

    Shrikumar et al. (2016), "Not Just a Black Box". ``attr = x ⊙ ∂f_c(x)/∂x``; on a linear
    model with zero bias this sums to the output.
    """

    single_pass = True

    def attribute_targets(self, ctx: Context, targets: Sequence[Target]) -> list[Attribution]:
        return [
            Attribution(tuple(x * g for x, g in zip(ctx.inputs, grads)))
            for grads in self.gradients_multi(ctx, targets)
        ]


INTEGRATION = (
    "gauss_legendre",
    "riemann_left",
    "riemann_right",
    "riemann_middle",
    "riemann_trapezoid",
)


def integration_rule(name: str, n_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Points in [0, 1] and weights summing to 1 of a quadrature rule with `n_steps` points."""
    check_count(n_steps, "n_steps")
    k = np.arange(n_steps, dtype=np.float64)
    if name == "gauss_legendre":
        points, weights = np.polynomial.legendre.leggauss(n_steps)
        return (points + 1) / 2, weights / 2
    if name == "riemann_left":
        return k / n_steps, np.full(n_steps, 1 / n_steps)
    if name == "riemann_right":
        return (k + 1) / n_steps, np.full(n_steps, 1 / n_steps)
    if name == "riemann_middle":
        return (k + 0.5) / n_steps, np.full(n_steps, 1 / n_steps)
    if name == "riemann_trapezoid":
        if n_steps < 2:
            raise InputError("riemann_trapezoid needs n_steps >= 2.")
        weights = np.full(n_steps, 1 / (n_steps - 1))
        weights[[0, -1]] /= 2
        return k / (n_steps - 1), weights
    raise unknown_name("integration rule", name, INTEGRATION)


@register("integrated_gradients", family="gradient", needs={"gradients"})
class IntegratedGradients(GradientMethod):
    """Integrated gradients: the path integral of gradients from a baseline to the input.

    Sundararajan, Taly & Yan (2017), "Axiomatic Attribution for Deep Networks".
    ``attr_i = (x_i − x'_i) · ∫₀¹ ∂f_c(x' + α(x − x'))/∂x_i dα``, approximated with `n_steps`
    points of the `integration` rule (Gauss–Legendre by default: exact for polynomial paths of
    degree < 2·n_steps). Completeness: ``Σ attr = f_c(x) − f_c(x')``; the error is `delta`.

    Options:
        n_steps: quadrature points along the path.
        integration: ``gauss_legendre`` | ``riemann_left`` | ``riemann_right`` |
            ``riemann_middle`` | ``riemann_trapezoid``.
        baselines (call): None (zeros), a number, a tensor, or ``zeros``/``uniform``/``blur``/
            ``mean`` (see `lumos.attribution.baselines`).
    """

    def __init__(
        self,
        model: Callable,
        *,
        n_steps: int = 50,
        integration: str = "gauss_legendre",
        batch_size: int | None = None,
    ) -> None:
        super().__init__(model, batch_size=batch_size)
        self.points, self.weights = integration_rule(integration, n_steps)
        self.n_steps, self.integration = n_steps, integration

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "n_steps": self.n_steps, "integration": self.integration}

    def explain(
        self, inputs: InputsLike, target: TargetLike = "predicted", *, baselines: Any = None
    ) -> Explanation:
        return self._run(inputs, target, baselines=baselines)

    def attribute_targets(
        self, ctx: Context, targets: Sequence[Target], baselines: Any = None
    ) -> list[Attribution]:
        bases = resolve_baselines(baselines, ctx.inputs, ctx.structure)
        n, device = ctx.n, ctx.device
        diffs = tuple(x - b for x, b in zip(ctx.inputs, bases))
        alphas = torch.as_tensor(self.points, device=device)
        weights = torch.as_tensor(self.weights, device=device)
        example = example_rows(n, self.n_steps, device)

        def aligned(s: slice) -> bool:  # the chunk holds whole steps (always, unless batch_size
            return s.start % n == 0 and s.stop % n == 0  # splits a step across two chunks)

        def make_rows(s: slice) -> list[torch.Tensor]:
            if aligned(s):  # broadcast instead of gathering rows
                a = alphas[s.start // n : s.stop // n]
                return [
                    torch.addcmul(b.unsqueeze(0), _col(a, d.unsqueeze(0)), d.unsqueeze(0)).flatten(
                        0, 1
                    )
                    for b, d in zip(bases, diffs)
                ]
            step = torch.arange(s.start, s.stop, device=device) // n
            e = example[s]
            return [torch.addcmul(b[e], _col(alphas[step], d), d[e]) for b, d in zip(bases, diffs)]

        totals = [tuple(torch.zeros_like(x) for x in ctx.inputs) for _ in targets]
        rows = self.input_gradients_multi(
            make_rows, n * self.n_steps, example, targets, ctx.structure
        )
        for s, per_target, _ in rows:
            for total, grads in zip(totals, per_target):
                for t, g in zip(total, grads):
                    if aligned(s):
                        w = weights[s.start // n : s.stop // n].to(g.dtype)
                        t.add_(torch.tensordot(w, g.view(len(w), n, *g.shape[1:]), dims=1))
                    else:
                        w = weights[torch.arange(s.start, s.stop, device=device) // n]
                        t.index_add_(0, example[s], g * _col(w, g))
        base_outputs = self.forward(bases, ctx.structure)
        results = []
        for target, total in zip(targets, totals):
            attributions = tuple(d * t for d, t in zip(diffs, total))
            index = torch.arange(n, device=device)
            gap = target.select(ctx.outputs, index) - target.select(base_outputs, index)
            summed = sum(a.flatten(1).sum(1) for a in attributions)
            results.append(Attribution(attributions, delta=summed - gap.to(summed.dtype)))
        return results


@register("expected_gradients", family="gradient", needs={"gradients", "baselines"})
class ExpectedGradients(GradientMethod):
    """Expected gradients (GradientSHAP): integrated gradients averaged over a background set.

    Erion et al. (2021), "Improving performance of deep learning models with axiomatic
    attribution priors and expected gradients"; Lundberg & Lee (2017) for GradientSHAP.
    ``attr = E_{x'∼D, α∼U(0,1)} [(x − x') ⊙ ∂f_c(x' + α(x − x'))/∂x]``, estimated with
    `n_samples` draws per example. In expectation ``Σ attr = f_c(x) − E_D f_c(x')``; `delta`
    reports the sampling error of that identity.

    Options:
        n_samples: draws of (reference, α) per example.
        seed: seeds the draws (same seed, same result).
        baselines (call): the background set, K reference examples.
    """

    def __init__(
        self,
        model: Callable,
        *,
        n_samples: int = 64,
        seed: SeedLike = 0,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(model, batch_size=batch_size)
        check_count(n_samples, "n_samples")
        self.n_samples, self.seed = n_samples, check_seed(seed)

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "n_samples": self.n_samples, "seed": self.seed}

    def explain(
        self, inputs: InputsLike, target: TargetLike = "predicted", *, baselines: Any = None
    ) -> Explanation:
        return self._run(inputs, target, baselines=baselines)

    def attribute_targets(
        self, ctx: Context, targets: Sequence[Target], baselines: Any = None
    ) -> list[Attribution]:
        background = background_set(baselines, ctx.inputs, ctx.structure, self.name)
        n, device, k = ctx.n, ctx.device, int(background[0].shape[0])
        generator = make_generator(self.seed)
        refs = torch.randint(k, (n * self.n_samples,), generator=generator).to(device)
        alphas = torch.rand(n * self.n_samples, generator=generator, dtype=torch.float64)
        alphas = alphas.to(device)
        example = example_rows(n, self.n_samples, device)

        def make_rows(s: slice) -> list[torch.Tensor]:
            e, r = example[s], refs[s]
            return [
                bg[r] + _col(alphas[s], x) * (x[e] - bg[r]) for x, bg in zip(ctx.inputs, background)
            ]

        totals = [tuple(torch.zeros_like(x) for x in ctx.inputs) for _ in targets]
        rows = self.input_gradients_multi(
            make_rows, n * self.n_samples, example, targets, ctx.structure
        )
        for s, per_target, _ in rows:
            e, r = example[s], refs[s]
            for total, grads in zip(totals, per_target):
                for t, g, x, bg in zip(total, grads, ctx.inputs, background):
                    t.index_add_(0, e, (x[e] - bg[r]) * g)
        # E_D f(x') per example: every (example, reference) pair, one target read each
        bg_outputs = self.forward(background, ctx.structure)
        pairs_example = torch.arange(n, device=device).repeat_interleave(k)
        pairs_ref = torch.arange(k, device=device).repeat(n)
        results = []
        for target, total in zip(targets, totals):
            attributions = tuple(t / self.n_samples for t in total)
            f_bg = _take_rows(bg_outputs, pairs_ref)
            expected = target.select(f_bg, pairs_example).view(n, k).mean(1)
            summed = sum(a.flatten(1).sum(1) for a in attributions)
            gap = target.select(ctx.outputs, torch.arange(n, device=device)) - expected
            results.append(Attribution(attributions, delta=summed - gap.to(summed.dtype)))
        return results


def _take_rows(outputs: Any, rows: torch.Tensor) -> Any:
    """Rows of a model output (a tensor, or the `logits` of a structured output)."""
    return output_tensor(outputs)[rows]


def _col(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`values` (rows,) shaped to broadcast against `like` (rows, ...)."""
    return values.view((-1,) + (1,) * (like.dim() - 1)).to(like.dtype)
