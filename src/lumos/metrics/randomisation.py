"""Randomisation (sanity checks, Adebayo et al. 2018): an explanation that does not change when
the model's weights are randomised cannot be explaining what the model learned.

Randomisation always works on a `copy.deepcopy` of the model: the user's model is never changed.
A layer is a module with parameters of its own; layers are ordered as the forward pass runs
them, and "cascading" randomises them from the output (top) down.

Inputs may be a tuple or dict of tensors (as the model takes them): the explainer gets them in
their structure, and two explanations are compared over the maps of all their tensors side by
side (image attributions reduced over channels), which needs the same structure and shapes.
"""

from __future__ import annotations

import copy
import html
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lumos.core.errors import (
    InputError,
    LumosError,
    TargetError,
    UnsupportedModelError,
    unknown_name,
)
from lumos.core.inputs import Structure, call_model, flatten_inputs
from lumos.core.targets import TargetLike
from lumos.metrics.base import (
    ModelRunner,
    Tensors,
    as_attributions,
    attribution_map,
    attribution_parts,
    explainer_for,
    joined,
    pearson,
    ranks,
    register_metric,
    same_shapes,
)

MEASURES = ("spearman_abs", "spearman", "ssim")


def parameter_layers(model: nn.Module, inputs: Any) -> list[str]:
    """Dotted paths of the modules with parameters of their own, in forward execution order
    (`inputs`: a tensor, a tuple or a dict of tensors, as the model takes them)."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError("Model randomisation needs a torch.nn.Module with parameters.")
    owners = {
        name: module
        for name, module in model.named_modules()
        if any(True for _ in module.parameters(recurse=False))
    }
    seen: list[str] = []
    probe = copy.deepcopy(model)
    modules = dict(probe.named_modules())

    def record(name: str) -> Callable:
        def hook(module: nn.Module, args: Any) -> None:
            if name not in seen:
                seen.append(name)

        return hook

    for name in owners:
        modules[name].register_forward_pre_hook(record(name))
    tensors, structure = flatten_inputs(inputs)
    with torch.no_grad():
        probe.eval()
        call_model(probe, tuple(x[:1] for x in tensors), structure)
    return seen + [name for name in owners if name not in seen]


def randomise(model: nn.Module, layers: Sequence[str], seed: int = 0) -> nn.Module:
    """A deep copy of `model` whose `layers` have fresh random parameters.

    Each parameter tensor is redrawn from a normal distribution with its own mean and standard
    deviation (seeded), which keeps the scale of every layer and destroys what it learned.
    """
    copied = copy.deepcopy(model)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    modules = dict(copied.named_modules())
    for name in layers:
        _redraw(modules, name, generator)
    return copied


def _redraw(modules: dict[str, nn.Module], name: str, generator: torch.Generator) -> None:
    if name not in modules:
        raise unknown_name("layer", name, [k for k in modules if k])
    with torch.no_grad():
        for p in modules[name].parameters(recurse=False):
            mean = p.mean()
            std = p.std() if p.numel() > 1 else p.new_zeros(())
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
            p.copy_(mean + torch.nan_to_num(std) * noise)


def randomised_models(
    model: nn.Module, layers: Sequence[str], mode: str = "cascading", seed: int = 0
) -> Iterator[nn.Module]:
    """One randomised copy per step: cascading randomises `layers[:j+1]` (one copy, redrawn
    step by step, equal to `randomise(model, layers[:j+1], seed)`); independent only
    `layers[j]`. Only one copy is alive at a time."""
    if mode == "cascading":
        current = copy.deepcopy(model)
        modules = dict(current.named_modules())
        generator = torch.Generator(device="cpu").manual_seed(seed)
        for name in layers:
            _redraw(modules, name, generator)
            yield current
    elif mode == "independent":
        for name in layers:
            yield randomise(model, [name], seed)
    else:
        raise unknown_name("randomisation mode", mode, ("cascading", "independent"))


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7) -> torch.Tensor:
    """Mean structural similarity of two batches of 2-D maps ``(B, H, W)``, each min–max scaled.

    Wang et al. (2004) with a uniform `window` and sample covariances, as scikit-image's default.
    """
    if a.dim() != 3:
        raise InputError("SSIM compares 2-D maps (B, H, W); use similarity='spearman'.")

    def scaled(m: torch.Tensor) -> torch.Tensor:
        m = m.double()
        low = m.flatten(1).amin(1).view(-1, 1, 1)
        high = m.flatten(1).amax(1).view(-1, 1, 1)
        return ((m - low) / (high - low).clamp_min(1e-30)).unsqueeze(1)

    x, y = scaled(a), scaled(b)
    w = min(window, x.shape[-1], x.shape[-2])
    w -= 1 - w % 2
    cov = w * w / (w * w - 1)

    def mean(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, w, stride=1)

    mx, my = mean(x), mean(y)
    vx, vy = cov * (mean(x * x) - mx**2), cov * (mean(y * y) - my**2)
    vxy = cov * (mean(x * y) - mx * my)
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def similarity(a: Any, b: Any, kind: str = "spearman_abs") -> torch.Tensor:
    """Per-example similarity of two attribution batches in the same structure (a tensor, or a
    tuple or dict of tensors, compared over all of them).

    ``spearman_abs``: rank correlation of the magnitude maps (image channels reduced by
    summing |a|, as saliency maps are shown); ``spearman``: of the signed maps (channels
    summed); ``ssim``: structural similarity of the magnitude maps (one 2-D map each).
    """
    if kind not in MEASURES:
        raise unknown_name("similarity", kind, MEASURES)
    after, structure = attribution_parts(b)
    return _Maps(_aligned(a, after, structure), (kind,)).similarity(_Maps(after, (kind,)), kind)


def _aligned(value: Any, like: Tensors, structure: Structure) -> Tensors:
    """`value` in `structure`, that of the explanation `like` it is compared with."""
    parts = as_attributions(value, structure, int(like[0].shape[0]))
    same_shapes(like, parts, "attributions")
    return tuple(a.detach() for a in parts)


class _Maps:
    """The reduced forms of one explanation (one tensor per input) that the similarity
    measures compare, with their ranks computed once (a trained model's maps are compared at
    every step); the maps of several inputs lie side by side."""

    def __init__(self, attributions: Tensors, kinds: Sequence[str]) -> None:
        signed = [attribution_map(a) for a in attributions] if "spearman" in kinds else None
        self.signed = None if signed is None else joined(signed)
        maps = [attribution_map(a, "abs_sum").abs() for a in attributions]
        magnitude = joined(maps)
        self.magnitude = maps[0] if len(maps) == 1 and maps[0].dim() == 3 else None
        self.ranks = {
            "spearman": None if self.signed is None else ranks(self.signed),
            "spearman_abs": ranks(magnitude) if "spearman_abs" in kinds else None,
        }

    def similarity(self, other: _Maps, kind: str) -> torch.Tensor:
        if kind == "ssim":
            if self.magnitude is None or other.magnitude is None:
                raise InputError(
                    "SSIM compares one 2-D map (B, H, W) per example; use "
                    "similarity='spearman' (or 'spearman_abs'), which also compares the maps "
                    "of several inputs."
                )
            return ssim(self.magnitude, other.magnitude)
        return pearson(self.ranks[kind], other.ranks[kind])


@register_metric(
    "model_randomisation",
    family="randomisation",
    direction="lower",
    needs={"model", "explainer"},
    paper="Adebayo et al. (2018), Sanity Checks for Saliency Maps",
)
def model_randomisation(
    model: nn.Module,
    inputs: Any,
    explainer: Any,
    target: TargetLike = "predicted",
    *,
    attributions: Any = None,
    similarity_measure: str = "spearman_abs",
    seed: int = 0,
    method_options: dict | None = None,
) -> torch.Tensor:
    """Model parameter randomisation: similarity of the maps before and after randomisation.

    All parameters of a seeded copy are randomised (the end of Adebayo et al.'s cascade).

    ``score = sim(Φ(f, x), Φ(f_random, x))`` with `similarity_measure` ``spearman_abs`` (rank
    correlation of absolute maps, the default), ``spearman`` or ``ssim``; the randomised model is
    a seeded copy. An explanation that depends on the model scores near 0: lower is better.
    """
    runner = ModelRunner(model, inputs, target)
    explain = explainer_for(explainer, method_options)
    targets = runner.target_argument()
    if attributions is None:
        attributions = explain(model, runner.inputs, targets)
    random_model = randomise(model, parameter_layers(model, runner.inputs)[::-1], seed)
    after = explain(random_model, runner.inputs, targets)
    return similarity(attributions, after, similarity_measure).float()


@register_metric(
    "random_logit",
    family="randomisation",
    direction="lower",
    needs={"model", "explainer"},
    paper="Sixt, Granz & Landgraf (2020), When Explanations Lie: Why Many Modified BP "
    "Attributions Fail",
)
def random_logit(
    model: Callable,
    inputs: Any,
    explainer: Any,
    target: TargetLike = "predicted",
    *,
    attributions: Any = None,
    similarity_measure: str | None = None,
    seed: int = 0,
    method_options: dict | None = None,
) -> torch.Tensor:
    """Random logit test: similarity of the maps for the target and for a random other class.

    ``score = sim(Φ_c(x), Φ_{c'}(x))`` with c' drawn uniformly from the other classes (seeded)
    and `similarity_measure` ``ssim`` (the default for one image input), ``spearman_abs`` (the
    default otherwise) or ``spearman``. A class-sensitive explanation scores low: lower is
    better.
    """
    runner = ModelRunner(model, inputs, target)
    explain = explainer_for(explainer, method_options)
    if runner.n_classes is None or runner.n_classes < 2:
        raise TargetError("random_logit needs a classifier and class-index targets.")
    classes = runner.target.indices
    if attributions is None:
        attributions = explain(model, runner.inputs, classes.clone())
    generator = torch.Generator(device="cpu").manual_seed(seed)
    shift = torch.randint(1, runner.n_classes, (runner.n,), generator=generator)
    other = (classes + shift) % runner.n_classes
    if similarity_measure is None:
        similarity_measure = "ssim" if _one_image(runner) else "spearman_abs"
    after = explain(model, runner.inputs, other)
    return similarity(attributions, after, similarity_measure).float()


def _one_image(runner: ModelRunner) -> bool:
    return len(runner.xs) == 1 and runner.xs[0].dim() == 4


@dataclass
class SanityCheck:
    """Similarities of each method's maps with the trained model's maps as layers are
    randomised: ``scores[method][measure]`` is ``(L + 1, B)``, row 0 the trained model and row j
    after randomising `layers[:j]` (cascading, from the top) or only `layers[j-1]` (independent).
    """

    layers: list[str]
    mode: str
    scores: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def mean(self, method: str, measure: str = "spearman_abs") -> torch.Tensor:
        """The mean over examples per randomisation step, ``(L + 1,)``."""
        return self.scores[method][measure].mean(1)

    def to_records(self) -> list[dict[str, Any]]:
        """One dict per method × step × measure, with the mean over examples."""
        records = []
        for method, measures in self.scores.items():
            for measure, values in measures.items():
                for step, row in enumerate(values):
                    layer = "(trained)" if step == 0 else self.layers[step - 1]
                    records.append(
                        {
                            "method": method,
                            "measure": measure,
                            "step": step,
                            "layer": layer,
                            "mean": float(row.mean()),
                        }
                    )
        return records

    def figure(self, measure: str = "spearman_abs"):
        """Mean similarity per randomised layer, one line per method (matplotlib)."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(max(6.0, 0.45 * len(self.layers) + 3), 4.0))
        ax = fig.add_subplot(1, 1, 1)
        labels = ["trained", *self.layers]
        for method in self.scores:
            ax.plot(
                range(len(labels)), self.mean(method, measure).cpu().numpy(), "o-", label=method
            )
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel(
            {"spearman_abs": "Spearman ρ (|maps|)", "spearman": "Spearman ρ", "ssim": "SSIM"}[
                measure
            ]
        )
        ax.set_title(f"Sanity check: {self.mode} randomisation (top → bottom)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        return fig

    def final(self, measure: str = "spearman_abs") -> dict[str, float]:
        """Each method's mean similarity after the last step (the fully randomised model)."""
        return {m: float(self.mean(m, measure)[-1]) for m in self.scores}

    def to_html(self, title: str = "Sanity check (Adebayo et al. 2018)") -> str:
        """A self-contained HTML section: the figure (base64 PNG) and the final similarities."""
        from lumos.viz.html import figure_html, table_html

        rows = [
            {"method": m, **{k: float(v[-1].mean()) for k, v in measures.items()}}
            for m, measures in self.scores.items()
        ]
        errors = "".join(
            f"<li>{html.escape(m)}: {html.escape(e)}</li>" for m, e in self.errors.items()
        )
        return (
            f'<section class="lumos-sanity"><h3>{html.escape(title)}</h3>'
            f"<p>Similarity of each method's maps with the trained model's as layers are "
            f"randomised ({self.mode}, top to bottom). A method that explains the model falls "
            f"towards 0; one that stays high ignores the weights.</p>"
            f"{figure_html(self.figure(), 'sanity check')}"
            f"<p>After randomising all {len(self.layers)} layers:</p>{table_html(rows)}"
            + (f"<ul>{errors}</ul>" if errors else "")
            + "</section>"
        )


def sanity_check(
    model: nn.Module,
    inputs: Any,
    target: TargetLike = "predicted",
    *,
    methods: Sequence[str] = ("saliency", "guided_backprop", "integrated_gradients"),
    mode: str = "cascading",
    layers: Sequence[str] | None = None,
    seed: int = 0,
    method_options: dict[str, dict] | None = None,
    measures: Sequence[str] = MEASURES,
) -> SanityCheck:
    """Adebayo et al. (2018)'s model parameter randomisation test for several methods.

    For every step (cascading: the top j layers randomised; independent: layer j alone) each
    method re-explains the inputs on a seeded randomised copy of the model, and its maps are
    compared with the trained model's by the similarity `measures`: Spearman rank correlation
    of absolute (``spearman_abs``) and of signed maps (``spearman``), and SSIM (``ssim``, for
    one 2-D map per example). `layers` defaults to every module with parameters, top first.
    A method whose maps stay similar while the model is destroyed fails the check. Methods
    that cannot run record their error in `errors`.
    """
    if mode not in ("cascading", "independent"):
        raise unknown_name("randomisation mode", mode, ("cascading", "independent"))
    for kind in measures:
        if kind not in MEASURES:
            raise unknown_name("similarity", kind, MEASURES)
    runner = ModelRunner(model, inputs, target)
    targets = runner.target_argument()
    order = list(layers) if layers is not None else parameter_layers(model, runner.inputs)[::-1]
    result = SanityCheck(layers=order, mode=mode)
    options = method_options or {}
    explainers = {method: explainer_for(method, options.get(method)) for method in methods}
    maps: dict[str, list[Tensors]] = {}
    structures: dict[str, Structure] = {}
    for method, explain in explainers.items():
        try:
            parts, structures[method] = attribution_parts(explain(model, runner.inputs, targets))
            maps[method] = [tuple(a.detach() for a in parts)]
        except LumosError as exc:
            result.errors[method] = str(exc)
    for randomised in randomised_models(model, order, mode, seed):
        for method in list(maps):
            try:
                after = explainers[method](randomised, runner.inputs, targets)
                maps[method].append(_aligned(after, maps[method][0], structures[method]))
            except LumosError as exc:
                result.errors[method] = str(exc)
                del maps[method]
    for method, steps in maps.items():
        image_map = _one_image(runner) and len(steps[0]) == 1 and steps[0][0].dim() == 4
        kinds = [k for k in measures if k != "ssim" or image_map]
        prepared = [_Maps(a, kinds) for a in steps]
        result.scores[method] = {
            kind: torch.stack([prepared[0].similarity(m, kind) for m in prepared]).float()
            for kind in kinds
        }
    return result
