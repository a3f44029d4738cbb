"""What every metric shares: the metric registry, attribution maps, ranks, and a model runner
that scores many perturbed rows per example in big batched forwards on the model's device."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lumos.attribution.baselines import resolve_baselines
from lumos.core.batching import check_batch_size, chunks
from lumos.core.errors import InputError, unknown_name
from lumos.core.inputs import Structure, call_model, flatten_inputs
from lumos.core.model import check_model, model_device, preserved
from lumos.core.targets import Target, TargetLike, output_tensor, resolve_target

FAMILIES = (
    "faithfulness",
    "robustness",
    "localisation",
    "complexity",
    "randomisation",
    "axiomatic",
)
#: What a metric needs besides the attributions: ``model`` (it runs the model), ``masks``
#: (ground-truth masks), ``explainer`` (it re-explains perturbed inputs or models, so it needs
#: the method, not just its attributions).
NEEDS = ("model", "masks", "explainer")
_METRICS: dict[str, MetricInfo] = {}
_TENSOR = Structure("tensor", ("input",))


@dataclass(frozen=True)
class MetricInfo:
    """One registered metric: its function, family, direction, requirements and paper."""

    name: str
    fn: Callable
    family: str
    direction: str
    needs: frozenset[str]
    paper: str
    curve: bool = False

    @property
    def higher_is_better(self) -> bool:
        return self.direction == "higher"

    @property
    def summary(self) -> str:
        doc = (inspect.getdoc(self.fn) or "").strip().splitlines()
        return doc[0] if doc else ""

    def __repr__(self) -> str:
        needs = ",".join(sorted(self.needs)) or "-"
        return f"{self.name:<26} {self.family:<14} {self.direction:<7} {needs:<16} {self.summary}"


def register_metric(
    name: str,
    *,
    family: str,
    direction: str,
    paper: str,
    needs: set[str] | frozenset[str] = frozenset(),
    curve: bool = False,
) -> Callable[[Callable], Callable]:
    """Register a metric function under `name`; `direction` is ``higher`` or ``lower`` (better)."""
    if direction not in ("higher", "lower") or family not in FAMILIES:
        raise ValueError(f"bad direction {direction!r} or family {family!r} for metric {name}")
    if set(needs) - set(NEEDS):
        raise ValueError(f"unknown needs {sorted(set(needs) - set(NEEDS))} for metric {name}")

    def decorate(fn: Callable) -> Callable:
        _METRICS[name] = MetricInfo(name, fn, family, direction, frozenset(needs), paper, curve)
        fn.metric_name = name
        return fn

    return decorate


def get_metric(name: str) -> MetricInfo:
    """The registered metric `name`, or an `UnknownNameError` with the closest names."""
    if name not in _METRICS:
        raise unknown_name("metric", str(name), _METRICS)
    return _METRICS[name]


def metrics(family: str | None = None) -> list[MetricInfo]:
    """Every registered metric (optionally of one family), sorted by family then name."""
    order = {f: i for i, f in enumerate(FAMILIES)}
    rows = [m for m in _METRICS.values() if family is None or m.family == family]
    return sorted(rows, key=lambda m: (order[m.family], m.name))


# -- attributions and masks ---------------------------------------------------------------------
def as_batch(value: Any, what: str) -> torch.Tensor:
    """A single batch-first tensor from a tensor, an array or an `Explanation`."""
    flat = getattr(value, "attributions_flat", None)
    if flat is not None:
        if len(flat) != 1:
            raise InputError(f"{what}: metrics take one attribution tensor, got {len(flat)}.")
        value = flat[0]
    tensors, structure = flatten_inputs(value)
    if structure.kind != "tensor":
        raise InputError(f"{what} must be one tensor (batch first), not a {structure.kind}.")
    return tensors[0]


def attribution_map(attributions: Any, reduce: str = "sum") -> torch.Tensor:
    """One relevance value per pixel (images) or per feature: ``(B, H, W)`` or the input's shape.

    Images ``(B, C, H, W)`` are reduced over channels with `reduce`: ``sum`` (signed, the
    default: relevance of a pixel is the sum over its colour channels), ``abs_sum`` or
    ``max_abs``. CAM maps ``(B, 1, H, W)`` lose their channel axis; other shapes stay.
    """
    a = as_batch(attributions, "attributions").detach()
    if not a.is_floating_point():
        a = a.float()
    if a.dim() != 4:
        return a
    if reduce == "sum":
        return a.sum(1)
    if reduce == "abs_sum":
        return a.abs().sum(1)
    if reduce == "max_abs":
        return a.abs().amax(1)
    raise unknown_name("channel reduction", reduce, ("sum", "abs_sum", "max_abs"))


def as_masks(masks: Any, like: torch.Tensor) -> torch.Tensor:
    """Boolean ground-truth masks with the shape of the map `like` (``(B,1,H,W)`` → ``(B,H,W)``)."""
    if masks is None:
        raise InputError(
            "This localisation metric needs ground-truth masks: pass masks=<(B, H, W) or "
            "(B, 1, H, W) bool tensor> marking the object that should be relevant."
        )
    m = as_batch(masks, "masks")
    if m.dim() == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.shape != like.shape:
        raise InputError(
            f"masks have shape {tuple(m.shape)} but the attribution maps have shape "
            f"{tuple(like.shape)}; pass one mask per example at the maps' resolution."
        )
    m = m.to(like.device).bool()
    if not m.flatten(1).any(1).all():
        raise InputError("Every example needs a non-empty ground-truth mask.")
    return m


def ranks(values: torch.Tensor) -> torch.Tensor:
    """Row-wise ranks (1..F) of a ``(B, F)`` tensor, ties getting their average rank.

    One sort per row; tied runs are found with running max/min over the sorted positions.
    """
    ordered, order = values.sort(dim=1)
    f = values.shape[1]
    position = torch.arange(f, device=values.device).expand_as(order)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    first = torch.where(starts, position, 0).cummax(1).values
    last = torch.where(ends, position, f).flip(1).cummin(1).values.flip(1)
    average = (first + last).to(torch.float64) / 2 + 1
    return torch.empty_like(average).scatter_(1, order, average)


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Pearson correlation of two ``(B, F)`` tensors (0 where either is constant)."""
    a = a.double() - a.double().mean(1, keepdim=True)
    b = b.double() - b.double().mean(1, keepdim=True)
    denom = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(denom > 0, (a * b).sum(1) / denom.clamp_min(1e-300), 0.0)


# -- running the model --------------------------------------------------------------------------
class ModelRunner:
    """Scores rows built from the inputs with the model, `batch_size` rows per forward.

    The inputs go to the model's device once; `target` is resolved once on the inputs, so every
    perturbed row of example i is scored on example i's target class. `probability` scores the
    softmax probability of the target (Petsiuk et al.'s curves) instead of its logit.
    """

    def __init__(
        self,
        model: Callable,
        inputs: Any,
        target: TargetLike = "predicted",
        *,
        batch_size: int | None = None,
        probability: bool = False,
    ) -> None:
        check_model(model)
        self.model, self.probability = model, probability
        self.batch_size = check_batch_size(batch_size)
        x = as_batch(inputs, "inputs")
        self.device = model_device(model, x.device)
        self.x = x.detach().to(self.device)
        self.n = int(self.x.shape[0])
        with preserved(model), torch.no_grad():
            parts = [call_model(model, (self.x[s],), _TENSOR) for s in chunks(self.n, batch_size)]
        outputs = parts[0] if len(parts) == 1 else torch.cat([output_tensor(p) for p in parts])
        self.target: Target = resolve_target(target, outputs, self.n)
        #: the number of classes for class-index targets (None for callable or scalar targets)
        self.n_classes = None
        if self.target.indices is not None:
            self.n_classes = int(output_tensor(outputs).shape[1])
        self.index = torch.arange(self.n, device=self.device)
        self.values = self._select(outputs, self.index)

    def _select(self, outputs: Any, example_index: torch.Tensor) -> torch.Tensor:
        if self.probability and not self.target.is_callable:
            out = output_tensor(outputs)
            if out.dim() == 2 and out.shape[1] > 1:
                outputs = out.softmax(1)
        return self.target.select(outputs, example_index).detach()

    def score(
        self, make_rows: Callable[[slice], torch.Tensor], n_rows: int, example_index: torch.Tensor
    ) -> torch.Tensor:
        """The target score of `n_rows` generated rows; row r belongs to `example_index[r]`."""
        out = torch.empty(n_rows, device=self.device, dtype=torch.float64)
        with preserved(self.model), torch.no_grad():
            for s in chunks(n_rows, self.batch_size):
                rows = make_rows(s)
                outputs = call_model(self.model, (rows,), _TENSOR)
                out[s] = self._select(outputs, example_index[s]).double()
        return out

    def target_argument(self) -> Any:
        """The resolved target in a form `lumos.explain` takes (class indices or callable)."""
        if self.target.indices is not None:
            return self.target.indices.clone()
        return self.target.fn


def fill_values(x: torch.Tensor, baseline: Any, seed: int = 0) -> torch.Tensor:
    """What removed features are replaced by: a number, a tensor, or a name (``zeros``,
    ``uniform`` (seeded noise in each example's range), ``blur``, ``mean``) as for baselines."""
    if not x.is_floating_point():
        if isinstance(baseline, int) and not isinstance(baseline, bool):
            return torch.full_like(x, baseline)
        raise InputError(
            "Integer inputs (token ids) are perturbed by replacing them with a token: pass "
            "baseline=<int token id>, e.g. the padding or [MASK] id."
        )
    return resolve_baselines(baseline, (x,), _TENSOR, seed=seed)[0]


class Features:
    """The features a perturbation metric removes: pixels (or `patch_size` patches) of images,
    else every element of an example. `scores` has one attribution score per feature."""

    def __init__(self, x: torch.Tensor, attributions: Any, patch_size: int = 1, reduce="sum"):
        a = as_batch(attributions, "attributions").to(x.device)
        if a.shape[0] != x.shape[0]:
            raise InputError(f"Got attributions for {a.shape[0]} examples but {x.shape[0]} inputs.")
        self.image = x.dim() == 4 and a.dim() == 4 and a.shape[-2:] == x.shape[-2:]
        self.shape = x.shape
        self.patch = int(patch_size)
        if self.image:
            m = attribution_map(a, reduce).unsqueeze(1)
            if self.patch > 1:
                m = F.avg_pool2d(m, self.patch, ceil_mode=True) * self.patch**2
            self.grid = m.shape[-2:]
            self.scores = m.flatten(1)
        elif a.shape == x.shape:
            self.scores = a.detach().float().flatten(1)
        else:
            raise InputError(
                f"attributions of shape {tuple(a.shape)} do not match the inputs "
                f"{tuple(x.shape)}: pass attributions with the inputs' shape, or (B, 1, H, W) "
                "maps at the images' resolution."
            )
        self.count = int(self.scores.shape[1])

    def expand(self, selected: torch.Tensor) -> torch.Tensor:
        """A ``(R, F)`` bool feature selection as a mask broadcastable to rows of the inputs."""
        if not self.image:
            return selected.view(-1, *self.shape[1:])
        m = selected.view(-1, 1, *self.grid)
        if self.patch > 1:
            m = m.repeat_interleave(self.patch, 2).repeat_interleave(self.patch, 3)
            m = m[..., : self.shape[-2], : self.shape[-1]]
        return m

    def order(self, order: str, seed: int = 0) -> torch.Tensor:
        """Each feature's position in the removal order (0 = removed first), ``(B, F)``.

        ``morf``: most relevant first; ``lerf``: least relevant first; ``random``: seeded.
        """
        if order == "random":
            generator = torch.Generator(device="cpu").manual_seed(seed)
            keys = torch.rand(self.scores.shape, generator=generator).to(self.scores.device)
        elif order in ("morf", "lerf"):
            keys = -self.scores if order == "morf" else self.scores
        else:
            raise unknown_name("removal order", order, ("morf", "lerf", "random"))
        idx = keys.argsort(dim=1, stable=True)
        position = torch.empty_like(idx)
        position.scatter_(1, idx, torch.arange(self.count, device=idx.device).expand_as(idx))
        return position


def batched_rows(n: int, repeats: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(example, repeat) of each of ``n * repeats`` rows, example-major."""
    rows = torch.arange(n * repeats, device=device)
    return rows // repeats, rows % repeats


def call_with(fn: Callable, available: dict[str, Any], options: dict[str, Any]) -> Any:
    """Call `fn` with the `available` keywords it accepts plus the user's `options`."""
    params = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in available.items() if k in params and k not in options}
    unknown = set(options) - set(params)
    if unknown:
        raise unknown_name(f"option of metric {fn.metric_name!r}", sorted(unknown)[0], params)
    return fn(**kwargs, **options)


def explainer_for(method: Any, options: dict[str, Any] | None = None) -> Callable:
    """A function ``(model, inputs, target) -> attribution tensor`` from a method name (with its
    options) or a callable with that signature."""
    if callable(method) and not isinstance(method, str):
        return method
    if not isinstance(method, str):
        raise InputError(
            f"explainer must be a method name or a callable (model, inputs, target) -> "
            f"attributions, got {type(method).__name__}."
        )
    from lumos.api import explain

    options = dict(options or {})

    def run(model: Callable, inputs: torch.Tensor, target: Any) -> torch.Tensor:
        return as_batch(explain(model, inputs, method=method, target=target, **options), method)

    return run


def explain_rows(
    explainer: Callable,
    model: Callable,
    make_rows: Callable[[slice], torch.Tensor],
    n_rows: int,
    targets: Any,
    example_index: torch.Tensor,
    batch_size: int | None,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Explanations of generated rows, `batch_size` rows per call, each on its example's target."""
    for s in chunks(n_rows, batch_size):
        target = targets[example_index[s].cpu()] if isinstance(targets, torch.Tensor) else targets
        yield s, explainer(model, make_rows(s), target).detach().to(example_index.device)
