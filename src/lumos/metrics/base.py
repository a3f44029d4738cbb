"""What every metric shares: the metric registry, attribution maps, ranks, and a model runner
that scores many perturbed rows per example in big batched forwards on the model's device.

Inputs may be a tensor, a tuple or a dict of tensors, as for the attribution methods: they are
flattened once (`lumos.core.inputs.flatten_inputs`) into one tensor per input, rows are built
per input, and the model is called in the inputs' structure (`call_model`). Attributions then
come in the same structure, and metrics that rank features rank those of all inputs jointly.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lumos.core.batching import check_batch_size, chunks, rows_per_call
from lumos.core.errors import InputError, unknown_name
from lumos.core.inputs import (
    Structure,
    as_tensor,
    batch_size_of,
    call_model,
    flatten_inputs,
    input_name,
)
from lumos.core.method import model_errors
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
#: One tensor per model input, in the inputs' order (see `lumos.core.inputs.flatten_inputs`).
Tensors = tuple[torch.Tensor, ...]


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
#: What to do with the attributions of a multi-input model where one map is scored.
ONE_MAP = (
    " This metric scores one map: pass one input's attributions, e.g. exp.attributions[0] "
    "(tuple inputs) or exp.attributions['image'] (dict inputs)."
)


def as_batch(value: Any, what: str, hint: str = "") -> torch.Tensor:
    """A single batch-first tensor from a tensor, an array or an `Explanation` of one tensor;
    `hint` tells what to pass instead of several tensors."""
    flat = getattr(value, "attributions_flat", None)
    if flat is not None:
        if len(flat) != 1:
            raise InputError(
                f"{what}: the explanation holds {len(flat)} tensors (one per model input), "
                f"but this takes one.{hint}"
            )
        value = flat[0]
    tensors, structure = flatten_inputs(value, what)
    if structure.kind != "tensor":
        raise InputError(
            f"{what} must be one tensor (batch first), not a {structure.kind} of "
            f"{len(tensors)} tensors.{hint}"
        )
    return tensors[0]


def attribution_parts(
    value: Any, n: int | None = None, what: str = "attributions"
) -> tuple[Tensors, Structure]:
    """The tensors of attributions in any structure (an `Explanation`, a tensor, a tuple or a
    dict), sharing one batch size (`n` rows when given), and that structure — for metrics that
    compare two explanations with each other rather than with the inputs."""
    if hasattr(value, "attributions_flat"):
        value = value.attributions
    try:
        parts, structure = flatten_inputs(value)
    except InputError as exc:
        raise InputError(f"{what}: {exc}") from None
    if n is not None:
        _check_rows(parts, structure, n, what)
    return parts, structure


def as_attributions(
    value: Any, structure: Structure, n: int, what: str = "attributions"
) -> Tensors:
    """Attributions in the structure `structure` (the inputs', usually) as one tensor per
    input in its order, each with a batch of `n` rows; an `Explanation` gives its attributions.

    A dict is matched by keys, so its order does not matter; a mismatch is an `InputError`
    that says what to pass.
    """
    if hasattr(value, "attributions_flat"):
        value = value.attributions
    if structure.kind == "tensor":
        if isinstance(value, (Mapping, tuple, list)):
            raise InputError(
                f"The inputs are one tensor, so {what} must be one tensor of their shape, "
                f"not a {type(value).__name__}."
            )
        parts = (as_batch(value, what),)
    else:
        if isinstance(value, (torch.Tensor, np.ndarray)):
            raise InputError(
                f"The inputs are a {structure.kind} of {len(structure.keys)} tensors, so {what} "
                f"must be a {structure.kind} with one attribution tensor per input, e.g. "
                "exp.attributions of lumos.explain on these inputs; got a single tensor."
            )
        parts = tuple(
            as_tensor(v, f"{what} for {input_name(structure, i)}")
            for i, v in enumerate(structure.flatten(value, what))
        )
    _check_rows(parts, structure, n, what)
    return parts


def _check_rows(parts: Tensors, structure: Structure, n: int, what: str) -> None:
    for i, a in enumerate(parts):
        if a.dim() == 0 or a.shape[0] != n:
            where = "" if structure.kind == "tensor" else f" for {input_name(structure, i)}"
            raise InputError(
                f"{what}{where} have shape {tuple(a.shape)}: pass one row per example, {n} "
                "rows (batch first)."
            )


def same_shapes(expected: Tensors, got: Tensors, what: str) -> None:
    """Two explanations of the same inputs must have tensors of the same shapes to compare."""
    shapes = [tuple(t.shape[1:]) for t in expected]
    if [tuple(t.shape[1:]) for t in got] != shapes:
        found = [tuple(t.shape[1:]) for t in got]
        raise InputError(
            f"{what} have per-example shapes {found}, but the explanation they are compared "
            f"with has {shapes}: given attributions must come from the same method on the "
            "same inputs."
        )


def joined(tensors: Tensors) -> torch.Tensor:
    """``(B, F)``: the elements of every tensor of an example side by side, in input order."""
    if len(tensors) == 1:
        return tensors[0].flatten(1)
    return torch.cat([t.flatten(1) for t in tensors], 1)


def attribution_map(attributions: Any, reduce: str = "sum") -> torch.Tensor:
    """One relevance value per pixel (images) or per feature: ``(B, H, W)`` or the input's shape.

    Images ``(B, C, H, W)`` are reduced over channels with `reduce`: ``sum`` (signed, the
    default: relevance of a pixel is the sum over its colour channels), ``abs_sum`` or
    ``max_abs``. CAM maps ``(B, 1, H, W)`` lose their channel axis; other shapes stay.
    """
    a = as_batch(attributions, "attributions", ONE_MAP).detach()
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

    One sort per row; each value's tied run spans the positions between its left and right
    insertion points in the sorted row, so its average rank is ``(left + right + 1) / 2``.
    """
    ordered = values.sort(dim=1).values
    left = torch.searchsorted(ordered, values, side="left")
    right = torch.searchsorted(ordered, values, side="right")
    return (left + right + 1).to(torch.float64) / 2


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Pearson correlation of two ``(B, F)`` tensors (0 where either is constant)."""
    a = a.double() - a.double().mean(1, keepdim=True)
    b = b.double() - b.double().mean(1, keepdim=True)
    denom = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(denom > 0, (a * b).sum(1) / denom.clamp_min(1e-300), 0.0)


# -- running the model --------------------------------------------------------------------------
class ModelRunner:
    """Scores rows built from the inputs with the model, `batch_size` rows per forward.

    The inputs (a tensor, a tuple or a dict of tensors, as the model takes them) go to the
    model's device once as `xs`, one tensor per input; rows are tuples in the same order, and
    the model is called as the inputs imply (`call_model`). `target` is resolved once on the
    inputs, so every perturbed row of example i is scored on example i's target class.
    `probability` scores the softmax probability of the target (Petsiuk et al.'s curves)
    instead of its logit.
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
        tensors, self.structure = flatten_inputs(inputs)
        self.device = model_device(model, tensors[0].device)
        self.xs: Tensors = tuple(x.detach().to(self.device) for x in tensors)
        self.n = batch_size_of(self.xs)
        with preserved(model), torch.no_grad():
            parts = [self.call(self.rows(s)) for s in chunks(self.n, batch_size)]
        outputs = parts[0] if len(parts) == 1 else torch.cat([output_tensor(p) for p in parts])
        self.target: Target = resolve_target(target, outputs, self.n)
        #: the number of classes for class-index targets (None for callable or scalar targets)
        self.n_classes = None
        if self.target.indices is not None:
            self.n_classes = int(output_tensor(outputs).shape[1])
        self.index = torch.arange(self.n, device=self.device)
        self.values = self._select(outputs, self.index)

    @property
    def inputs(self) -> Any:
        """The inputs on the model's device, in the user's structure (what explainers take)."""
        return self.structure.restore(self.xs)

    def rows(self, index: Any) -> Tensors:
        """Rows `index` (a slice or example indices) of every input."""
        return tuple(x[index] for x in self.xs)

    def call(self, rows: Tensors) -> Any:
        """One model call; a failure inside the model says which row shapes caused it."""
        with model_errors("the metric", rows):
            return call_model(self.model, rows, self.structure)

    def attributions(self, value: Any, what: str = "attributions") -> Tensors:
        """Attributions in the inputs' structure, one tensor per input on the model's device."""
        parts = as_attributions(value, self.structure, self.n, what)
        return tuple(a.detach().to(self.device) for a in parts)

    def _select(self, outputs: Any, example_index: torch.Tensor) -> torch.Tensor:
        if self.probability and not self.target.is_callable:
            out = output_tensor(outputs)
            if out.dim() == 2 and out.shape[1] > 1:
                outputs = out.softmax(1)
        return self.target.select(outputs, example_index).detach()

    def score(
        self, make_rows: Callable[[slice], Tensors], n_rows: int, example_index: torch.Tensor
    ) -> torch.Tensor:
        """The target score of `n_rows` generated rows (one tensor per input); row r belongs
        to `example_index[r]`."""
        out = torch.empty(n_rows, device=self.device, dtype=torch.float64)
        with preserved(self.model), torch.no_grad():
            for s in chunks(n_rows, rows_per_call(self.batch_size, self.xs)):
                outputs = self.call(make_rows(s))
                out[s] = self._select(outputs, example_index[s]).double()
        return out

    def target_argument(self) -> Any:
        """The resolved target in a form `lumos.explain` takes (class indices or callable)."""
        if self.target.indices is not None:
            return self.target.indices.clone()
        return self.target.fn


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
    """A function ``(model, inputs, target) -> attributions`` from a method name (with its
    options) or a callable with that signature. Inputs come in the user's structure (a tensor,
    a tuple or a dict); attributions go back in it (or as an `Explanation`)."""
    if callable(method) and not isinstance(method, str):
        return method
    if not isinstance(method, str):
        raise InputError(
            f"explainer must be a method name or a callable (model, inputs, target) -> "
            f"attributions, got {type(method).__name__}."
        )
    from lumos.api import explain

    options = dict(options or {})

    def run(model: Callable, inputs: Any, target: Any) -> Any:
        return explain(model, inputs, method=method, target=target, **options).attributions

    return run


def explain_rows(
    explainer: Callable,
    runner: ModelRunner,
    make_rows: Callable[[slice], Tensors],
    n_rows: int,
    structure: Structure,
    example_index: torch.Tensor,
    batch_size: int | None,
) -> Iterator[tuple[slice, Tensors]]:
    """Explanations of generated rows, `batch_size` rows per call, each on its example's target
    and flattened from `structure` (that of the unperturbed inputs' explanation)."""
    targets = runner.target_argument()
    for s in chunks(n_rows, batch_size):
        target = targets[example_index[s].cpu()] if isinstance(targets, torch.Tensor) else targets
        rows = runner.structure.restore(make_rows(s))
        value = explainer(runner.model, rows, target)
        parts = as_attributions(value, structure, s.stop - s.start, "the explainer's attributions")
        yield s, tuple(a.detach().to(runner.device) for a in parts)
