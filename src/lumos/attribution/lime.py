"""LIME for images (superpixels), text (token ids) and tables, with the weighted surrogate fit
in torch: all perturbed samples of all examples are built as tensors and evaluated in large
batches, and the same seed gives the same explanation."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from lumos.attribution.blackbox import (
    BlackBoxMethod,
    Players,
    make_players,
    references,
)
from lumos.core.batching import check_count
from lumos.core.errors import InputError, require, unknown_name
from lumos.core.explanation import Explanation
from lumos.core.inputs import InputsLike
from lumos.core.method import Attribution, Context
from lumos.core.registry import register
from lumos.core.targets import TargetLike

SEGMENTATIONS = {
    "slic": {"n_segments": 50, "compactness": 10.0, "start_label": 0},
    "quickshift": {"kernel_size": 4, "max_dist": 200.0, "ratio": 0.2},
    "felzenszwalb": {"scale": 100.0, "sigma": 0.5, "min_size": 50},
}


def superpixels(
    images: torch.Tensor, method: str | Callable = "slic", options: Mapping | None = None
) -> torch.Tensor:
    """(B, H, W) long superpixel ids (0..k−1 per image) of (B, C, H, W) images, computed with
    scikit-image's ``slic``, ``quickshift`` or ``felzenszwalb`` (or a callable on one (H, W, C)
    NumPy image)."""
    if callable(method):
        fn, kwargs = method, dict(options or {})
    else:
        if method not in SEGMENTATIONS:
            raise unknown_name("segmentation", str(method), SEGMENTATIONS)
        segmentation = require("skimage.segmentation", "lime")
        fn = getattr(segmentation, method)
        kwargs = {**SEGMENTATIONS[method], **dict(options or {})}
        channels = images.shape[1]
        if method == "slic":
            kwargs.setdefault("channel_axis", -1)
            kwargs.setdefault("convert2lab", channels == 3)
        elif method == "quickshift" and channels != 3:
            kwargs.setdefault("convert2lab", False)
        elif method == "felzenszwalb":
            kwargs.setdefault("channel_axis", -1)
    labels = []
    for image in images.detach().cpu().double().permute(0, 2, 3, 1).numpy():
        segments = np.asarray(fn(image, **kwargs))
        labels.append(
            torch.from_numpy(np.unique(segments, return_inverse=True)[1].reshape(segments.shape))
        )
    return torch.stack(labels).long().to(images.device)


@register("lime", family="perturbation", needs={"black_box"})
class Lime(BlackBoxMethod):
    """LIME: a weighted linear surrogate of the model around each example.

    Ribeiro, Singh & Guestrin (2016), "Why Should I Trust You?". Samples z of an interpretable
    representation, weights them with the exponential kernel ``π(z) = exp(−d(z)² / (2σ²))``
    (σ = `kernel_width`) and fits ``g(z) = b + zᵀβ`` by weighted ridge regression
    ``min Σ π(z)(f(z) − g(z))² + α‖β‖²``; the attributions are β (each player's coefficient on
    all its elements). No summation identity holds; ``extras`` carries the fit's weighted R²
    (`score`), `intercept`, the surrogate's `local_prediction` at the example, and `coefficients`.

    Modes (picked from the inputs and call options):
        images (B, C, H, W): players are superpixels (`segmentation`) or a `feature_mask`;
            samples switch players on/off with probability 1/2; off players take the baselines
            (default: each superpixel's mean colour, as the `lime` package); cosine distance to
            the all-on sample, σ = 0.25.
        text (integer token ids): every token is a player (or a `feature_mask`); off tokens
            become `mask_token`. Sampled as the `lime` package's LimeTextExplainer does: each
            sample after the first removes k players, k uniform on 1..d (d players), chosen
            uniformly, so sparse and dense samples are equally common (switching each token
            with probability 1/2 would put nearly all samples near d/2 removed); cosine
            distance, σ = 0.25 (lime's width 25 on distances × 100).
        tabular with `train_data` (B, F): samples from the training data's per-feature
            mean and standard deviation, surrogate on standardized features, euclidean
            distance, σ = 0.75·√F (as the `lime` package); with ``discretize=True`` features
            are drawn from the training values and the surrogate sees "same quartile as x".
        anything else: players from `feature_mask` (default every feature) switched between
            the input and the baselines, as for images.

    Options:
        n_samples: perturbed samples per example (model evaluations), the first being x
            (the `lime` package uses 1000; 500 keeps the demo interactive).
        kernel_width: σ of the kernel; None uses the mode's default above.
        alpha: ridge penalty of the surrogate (1.0 as in the `lime` package).
        segmentation: ``slic`` | ``quickshift`` | ``felzenszwalb`` or a callable on one
            (H, W, C) NumPy image; `segmentation_options` go to it.
        discretize: quartile discretization for tabular data.
    """

    def __init__(
        self,
        model: Callable,
        *,
        n_samples: int = 500,
        kernel_width: float | None = None,
        alpha: float = 1.0,
        segmentation: str | Callable = "slic",
        segmentation_options: Mapping | None = None,
        discretize: bool = False,
        seed: int = 0,
        progress: bool = False,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(model, seed=seed, progress=progress, batch_size=batch_size)
        self.n_samples = check_count(n_samples, "n_samples", 2)
        if kernel_width is not None and not (
            isinstance(kernel_width, (int, float)) and kernel_width > 0
        ):
            raise InputError(
                f"kernel_width must be a positive number or None, got {kernel_width!r}."
            )
        if not (isinstance(alpha, (int, float)) and alpha >= 0):
            raise InputError(f"alpha must be a non-negative number, got {alpha!r}.")
        if not callable(segmentation) and segmentation not in SEGMENTATIONS:
            raise unknown_name("segmentation", str(segmentation), SEGMENTATIONS)
        self.kernel_width, self.alpha = kernel_width, float(alpha)
        self.segmentation, self.segmentation_options = segmentation, segmentation_options
        self.discretize = bool(discretize)

    def _config(self) -> dict[str, Any]:
        return {
            **super()._config(),
            "n_samples": self.n_samples,
            "kernel_width": self.kernel_width,
            "alpha": self.alpha,
            "segmentation": self.segmentation,
            "discretize": self.discretize,
        }

    def explain(
        self,
        inputs: InputsLike,
        target: TargetLike = "predicted",
        *,
        baselines: Any = None,
        feature_mask: Any = None,
        train_data: Any = None,
        mask_token: int = 0,
    ) -> Explanation:
        return self._run(
            inputs,
            target,
            baselines=baselines,
            feature_mask=feature_mask,
            train_data=train_data,
            mask_token=mask_token,
        )

    def attribute(
        self,
        ctx: Context,
        baselines: Any = None,
        feature_mask: Any = None,
        train_data: Any = None,
        mask_token: int = 0,
    ) -> Attribution:
        if train_data is not None:
            return self.tabular(ctx, train_data)
        x = ctx.inputs[0]
        image = len(ctx.inputs) == 1 and x.dim() == 4 and x.is_floating_point()
        if image and feature_mask is None:
            feature_mask = superpixels(x, self.segmentation, self.segmentation_options).unsqueeze(1)
        players = make_players(ctx.inputs, feature_mask)
        if baselines is None and image:
            refs = (superpixel_means(x, players.masks[0]).unsqueeze(1),)
        elif baselines is None and not x.is_floating_point():
            refs = tuple(torch.full_like(t, mask_token).unsqueeze(1) for t in ctx.inputs)
        else:
            refs = references(baselines, ctx.inputs, ctx.structure, seed=self.seed)
        text = not image and all(not t.is_floating_point() for t in ctx.inputs)
        return self.binary(ctx, players, refs, text=text)

    def binary(self, ctx: Context, players: Players, refs, text: bool = False) -> Attribution:
        """Players switched on/off (the first sample all on): each with probability 1/2, or for
        `text` a uniform number 1..d of them off, chosen uniformly."""
        m, generator = players.n_players, self.generator()
        if text:
            removed = torch.randint(1, m + 1, (self.n_samples, 1), generator=generator)
            ranks = torch.rand(self.n_samples, m, generator=generator).argsort(1).argsort(1)
            z = ranks >= removed
        else:
            z = torch.rand(self.n_samples, m, generator=generator) < 0.5
        z[0] = True
        values = self.coalition_values(ctx, players, refs, z)
        zf = z.to(values.device, torch.float64)
        # cosine distance to the all-on sample, as the lime package
        cosine = zf.sum(1) / (zf.norm(dim=1) * math.sqrt(m)).clamp(min=1e-12)
        distance = 1 - cosine
        weights = kernel(distance, self.kernel_width or 0.25)
        fit = weighted_ridge(zf[None], values, weights[None], self.alpha)
        coefficients, intercept, score = fit
        local = intercept + coefficients.sum(1)
        attributions = players.spread(coefficients, [t.shape for t in ctx.inputs])
        return Attribution(
            attributions,
            extras={
                "score": score,
                "intercept": intercept,
                "local_prediction": local,
                "coefficients": coefficients,
                "feature_mask": players.masks[0],
            },
        )

    def tabular(self, ctx: Context, train_data: Any) -> Attribution:
        """LIME's tabular sampler: from the training statistics, one player per feature."""
        x = ctx.inputs[0]
        if len(ctx.inputs) != 1 or x.dim() != 2 or not x.is_floating_point():
            raise InputError(
                "train_data selects tabular LIME, which needs one float input of shape "
                f"(batch, features); got {[tuple(t.shape) for t in ctx.inputs]}."
            )
        train = torch.as_tensor(train_data).to(x.device, torch.float64)
        if train.dim() != 2 or train.shape[1] != x.shape[1] or train.shape[0] < 2:
            raise InputError(
                f"train_data must have shape (rows >= 2, {x.shape[1]}), got {tuple(train.shape)}."
            )
        n, f, s = ctx.n, x.shape[1], self.n_samples
        generator = self.generator()
        mean, std = train.mean(0), train.std(0).clamp(min=1e-12)
        xd = x.double()
        if self.discretize:
            edges = torch.quantile(
                train, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64, device=x.device), dim=0
            ).T
            rows = torch.randint(train.shape[0], (s, f), generator=generator).to(x.device)
            samples = train[rows, torch.arange(f, device=x.device)]  # (S, F) marginal draws
            bins = _bucket(samples, edges)[None]  # (1, S, F)
            own = _bucket(xd, edges)[:, None]  # (n, 1, F)
            design = (bins == own).double()
            design[:, 0] = 1.0
            distance = (design - 1).norm(dim=2)
        else:
            noise = torch.randn(s, f, generator=generator, dtype=torch.float64).to(x.device)
            samples = noise * std + mean
            design = ((samples - mean) / std)[None].repeat(n, 1, 1)
            design[:, 0] = (xd - mean) / std
            distance = (design - design[:, :1]).norm(dim=2)
        rows_all = samples[None].repeat(n, 1, 1)
        rows_all[:, 0] = xd
        rows_all = rows_all.to(x.dtype)
        example = torch.arange(n, device=x.device).repeat_interleave(s)
        flat = rows_all.reshape(n * s, f)
        values = self.evaluate(ctx, lambda sl: [flat[sl]], example).double().view(n, s)
        weights = kernel(distance, self.kernel_width or 0.75 * math.sqrt(f))
        coefficients, intercept, score = weighted_ridge(design, values, weights, self.alpha)
        local = intercept + (design[:, 0] * coefficients).sum(1)
        return Attribution(
            (coefficients,),
            extras={
                "score": score,
                "intercept": intercept,
                "local_prediction": local,
                "coefficients": coefficients,
            },
        )


def _bucket(values: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Quartile index (0..3) of every value; `edges` is (F, 3)."""
    return (values.unsqueeze(-1) > edges).sum(-1)


def kernel(distance: torch.Tensor, width: float) -> torch.Tensor:
    """LIME's exponential kernel ``sqrt(exp(−d²/σ²)) = exp(−d²/(2σ²))``."""
    return torch.exp(-(distance**2) / (2 * width**2))


def superpixel_means(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Every pixel replaced by its superpixel's mean colour; `mask` (1 or B, C, H, W) ids."""
    n, c = x.shape[:2]
    ids = mask.expand(n, -1, -1, -1)[:, 0].reshape(n, -1)  # (n, HW)
    m = int(ids.max()) + 1
    flat = x.reshape(n, c, -1).double()
    sums = torch.zeros(n, c, m, dtype=torch.float64, device=x.device)
    sums.scatter_add_(2, ids[:, None].expand(-1, c, -1), flat)
    counts = torch.zeros(n, m, dtype=torch.float64, device=x.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float64))
    means = sums / counts.clamp(min=1)[:, None]
    return means.gather(2, ids[:, None].expand(-1, c, -1)).view_as(x).to(x.dtype)


def weighted_ridge(
    design: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted ridge with an unpenalized intercept, per example (as scikit-learn's `Ridge`).

    design (1 or n, S, M), y (n, S), weights (1 or n, S) → coefficients (n, M), intercept (n,),
    weighted R² (n,).
    """
    n = y.shape[0]
    design = design.expand(n, -1, -1)
    weights = weights.expand(n, -1)
    total = weights.sum(1, keepdim=True)
    x_mean = (weights[:, :, None] * design).sum(1) / total
    y_mean = (weights * y).sum(1, keepdim=True) / total
    xc, yc = design - x_mean[:, None], y - y_mean
    xw = xc * weights[:, :, None]
    gram = xw.transpose(1, 2) @ xc
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    rhs = (xw.transpose(1, 2) @ yc[:, :, None])[:, :, 0]
    coefficients = torch.linalg.solve(gram + (alpha + 1e-10) * eye, rhs)
    intercept = y_mean[:, 0] - (x_mean * coefficients).sum(1)
    residual = yc - (xc * coefficients[:, None]).sum(2)
    ss_res = (weights * residual**2).sum(1)
    ss_tot = (weights * yc**2).sum(1).clamp(min=1e-300)
    return coefficients, intercept, 1 - ss_res / ss_tot
