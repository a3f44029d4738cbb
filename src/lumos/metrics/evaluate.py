"""`lumos.evaluate`: a grid of methods × metrics on one batch, with per-example scores, means,
95% confidence intervals, curves, and a ranking that answers "which method should I trust?"."""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lumos.core.errors import InputError, LumosError, require, unknown_name
from lumos.core.inputs import flatten_inputs
from lumos.core.registry import get_method, method_options
from lumos.core.targets import TargetLike
from lumos.metrics.base import (
    ModelRunner,
    as_batch,
    attribution_parts,
    call_with,
    explainer_for,
    get_metric,
    metrics,
)

#: What `evaluate` runs when no `metrics` are named: every family, without the slowest variants.
DEFAULT_METRICS = (
    "deletion",
    "insertion",
    "faithfulness_correlation",
    "infidelity",
    "max_sensitivity",
    "model_randomisation",
    "random_logit",
    "pointing_game",
    "energy_pointing_game",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "attribution_auc",
    "sparseness",
    "complexity",
)
#: Families whose methods give input-space maps that the metrics can score.
INPUT_FAMILIES = ("gradient", "propagation", "cam", "perturbation", "shapley")


@dataclass
class EvaluationResult:
    """Scores of every method × metric: `scores[(method, metric)]` is a ``(B,)`` tensor,
    `curves[(method, metric)]` a `Curve` where the metric has one, and `not_applicable[(method,
    metric)]` (or `method_errors[method]`) says why a cell is empty."""

    methods: list[str]
    metrics: list[str]
    scores: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    curves: dict[tuple[str, str], Any] = field(default_factory=dict)
    not_applicable: dict[tuple[str, str], str] = field(default_factory=dict)
    method_errors: dict[str, str] = field(default_factory=dict)
    #: each method's attributions on the CPU, in the structure of its explanation
    attributions: dict[str, Any] = field(default_factory=dict)
    #: the inputs on the CPU, in the user's structure (a tensor, a tuple or a dict)
    inputs: Any = None
    masks: torch.Tensor | None = None
    seconds: dict[tuple[str, str], float] = field(default_factory=dict)

    def summary(self, method: str, metric: str) -> dict[str, float] | None:
        """Mean and 95% confidence interval (Student t) of one cell, or None when empty."""
        values = self.scores.get((method, metric))
        if values is None:
            return None
        return mean_ci(values)

    def to_records(self) -> list[dict[str, Any]]:
        """One dict per method × metric: mean, CI, n, direction, or the reason it is empty."""
        records = []
        for method in self.methods:
            for name in self.metrics:
                info = get_metric(name)
                row: dict[str, Any] = {
                    "method": method,
                    "metric": name,
                    "family": info.family,
                    "direction": info.direction,
                }
                stats = self.summary(method, name)
                if stats is not None:
                    row.update(stats, status="ok")
                else:
                    reason = self.method_errors.get(method) or self.not_applicable.get(
                        (method, name), "not run"
                    )
                    row.update(status="not applicable", reason=reason)
                records.append(row)
        return records

    def to_pandas(self):
        """The records as a `pandas.DataFrame` (pandas is optional)."""
        pandas = require("pandas")
        return pandas.DataFrame(self.to_records())

    def ranking(self) -> list[dict[str, Any]]:
        """Which method should I trust? Methods ranked per metric (1 = best, respecting each
        metric's direction, ties share the mean rank) and overall by their mean rank over the
        metrics that scored them; best first."""
        per_metric: dict[str, dict[str, float]] = {}
        for name in self.metrics:
            sign = 1.0 if get_metric(name).higher_is_better else -1.0
            means = {
                m: -sign * float(self.scores[(m, name)].double().mean())
                for m in self.methods
                if (m, name) in self.scores
            }
            means = {m: v for m, v in means.items() if math.isfinite(v)}
            if len(means) >= 2:
                per_metric[name] = _rank(means)
        rows = []
        for method in self.methods:
            ranks = {name: r[method] for name, r in per_metric.items() if method in r}
            if not ranks:
                continue
            mean_rank = sum(ranks.values()) / len(ranks)
            rows.append(
                {"method": method, "mean_rank": mean_rank, "n_metrics": len(ranks), **ranks}
            )
        rows.sort(key=lambda r: r["mean_rank"])
        for i, row in enumerate(rows):
            row["overall_rank"] = i + 1
        return rows

    def figure(self):
        """Mean ± 95% CI per method, one panel per metric (matplotlib, Agg-safe)."""
        from lumos.metrics.html import scores_figure

        return scores_figure(self)

    def plot(self):
        """Draw `figure()` and return it (shown inline in notebooks)."""
        return self.figure()

    def curves_figure(self):
        """The mean curve per method for every metric that has curves, or None."""
        from lumos.metrics.html import curves_figure

        return curves_figure(self)

    def to_html(self, title: str = "Which explanation method should I trust?", *, full=True):
        """A self-contained HTML page (or, with ``full=False``, a section to embed): ranking,
        table of means with CIs, figures as base64 PNG, example maps; no scripts, no CDN."""
        from lumos.metrics.html import evaluation_html

        return evaluation_html(self, title, full=full)

    def _repr_html_(self) -> str:
        return self.to_html(full=False)

    def __repr__(self) -> str:
        filled = len(self.scores)
        total = len(self.methods) * len(self.metrics)
        return (
            f"EvaluationResult({len(self.methods)} methods × {len(self.metrics)} metrics, "
            f"{filled}/{total} scored)"
        )


def mean_ci(values: torch.Tensor, level: float = 0.95) -> dict[str, float]:
    """Mean and Student-t confidence interval of per-example scores (NaNs dropped)."""
    v = values.double().flatten()
    v = v[torch.isfinite(v)]
    n = int(v.numel())
    if n == 0:
        return {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
    mean = float(v.mean())
    if n == 1:
        return {"mean": mean, "ci_low": mean, "ci_high": mean, "n": 1}
    from scipy.stats import t

    half = float(t.ppf(0.5 + level / 2, n - 1)) * float(v.std()) / math.sqrt(n)
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": n}


def _rank(values: dict[str, float]) -> dict[str, float]:
    """Ranks 1..n of ascending values, ties sharing their mean rank."""
    ordered = sorted(values.values())
    return {
        k: (ordered.index(v) + 1 + len(ordered) - ordered[::-1].index(v)) / 2
        for k, v in values.items()
    }


def _method_setup(
    name: str,
    options: dict[str, Any],
    layer: Any,
    batch_size: int | None,
    seed: int,
) -> dict[str, Any]:
    """The options to run method `name` with, or a `LumosError` saying why it cannot run."""
    cls = get_method(name)
    init, call = method_options(cls)
    accepted = {**init, **call}
    options = dict(options)
    if "neuron" in cls.needs:
        raise InputError(f"{name} explains one neuron, not the target: it is not evaluated.")
    if "layer" not in options and layer is not None and "layer" in accepted:
        options["layer"] = layer
    if "layer" in cls.needs and "layer" not in options:
        raise InputError(f"{name} needs a layer: pass layer='<module path>'.")
    if "baselines" in cls.needs and "baselines" not in options:
        raise InputError(
            f"{name} needs a background set: pass method_options={{{name!r}: "
            "{'baselines': <K reference inputs>}}."
        )
    if "batch_size" in accepted and batch_size is not None:
        options.setdefault("batch_size", batch_size)
    if "seed" in accepted:
        options.setdefault("seed", seed)
    return options


def evaluate(
    model: Callable,
    inputs: Any,
    targets: TargetLike = "predicted",
    *,
    methods: Sequence[str] | None = None,
    explanations: Sequence[Any] | None = None,
    metrics: Sequence[str] | None = None,
    masks: Any = None,
    layer: Any = None,
    batch_size: int | None = None,
    seed: int = 0,
    method_options: dict[str, dict[str, Any]] | None = None,
    metric_options: dict[str, dict[str, Any]] | None = None,
) -> EvaluationResult:
    """Score explanation methods with trust metrics on `model` and `inputs`.

    Pass `methods` (registered names; `method_options={name: {...}}` configures each, `layer`
    is given to methods that need one) or ready `explanations` (`Explanation` objects; metrics
    that must re-explain perturbed inputs are then "not applicable"). `metrics` are registered
    metric names (default: `DEFAULT_METRICS`; `lumos.metrics.metrics()` lists all) and
    `metric_options={name: {...}}` configures each. `targets` is resolved once on the inputs
    ("predicted" → the predicted classes), so every method and metric explains the same class.
    A metric that does not apply (no `masks`, no gradients, a map of the wrong shape) records
    its reason instead of failing. `batch_size` bounds every forward; `seed` fixes every draw.

    `inputs` may be a tuple or dict of tensors for a model that takes several inputs
    (``model(*inputs)`` or ``model(**inputs)``): methods explain all of them, and the metrics
    that run the model score the attributions of all inputs together (see each metric).
    Localisation and complexity metrics score one map, so they are "not applicable" to
    multi-input attributions; call them on one input's attributions instead.
    """
    if (methods is None) == (explanations is None):
        raise InputError("Pass either methods=[names] or explanations=[Explanation, ...].")
    tensors, structure = flatten_inputs(inputs)
    x = structure.restore(tensors)
    runner = ModelRunner(model, x, targets)
    target = runner.target_argument()
    names = list(metrics) if metrics is not None else list(DEFAULT_METRICS)
    infos = [get_metric(name) for name in names]
    metric_options = metric_options or {}
    unknown = set(metric_options) - set(names)
    if unknown:
        raise InputError(f"metric_options for {sorted(unknown)}, which are not in metrics.")
    for info in infos:
        accepted = inspect.signature(info.fn).parameters
        for option in metric_options.get(info.name, {}):
            if option not in accepted:
                raise unknown_name(f"option of metric {info.name!r}", option, accepted)
    mask_tensor = None if masks is None else as_batch(masks, "masks")
    on_cpu = structure.restore([t.detach().cpu() for t in tensors])
    result = EvaluationResult(methods=[], metrics=names, inputs=on_cpu, masks=mask_tensor)

    runs: list[tuple[str, Any, Callable | None]] = []
    for name in methods or ():
        result.methods.append(name)
        try:
            options = _method_setup(
                name, (method_options or {}).get(name, {}), layer, batch_size, seed
            )
            explain = explainer_for(name, options)
            runs.append((name, _detached(explain(model, x, target), runner.n), explain))
        except LumosError as exc:
            result.method_errors[name] = str(exc)
    for exp in explanations or ():
        label = _unique(getattr(exp, "method", "explanation"), result.methods)
        result.methods.append(label)
        runs.append((label, _detached(exp, runner.n, label), None))

    for label, a, explain in runs:
        result.attributions[label] = _detached(a, runner.n, label, cpu=True)
        available = {
            "model": model,
            "inputs": x,
            "attributions": a,
            "target": target,
            "masks": masks,
            "explainer": explain,
            "seed": seed,
        }
        if batch_size is not None:
            available["batch_size"] = batch_size
        for info in infos:
            key = (label, info.name)
            if "masks" in info.needs and masks is None:
                result.not_applicable[key] = "needs ground-truth masks (pass masks=...)"
                continue
            if "explainer" in info.needs and explain is None:
                result.not_applicable[key] = (
                    "re-explains perturbed inputs or models: pass methods=[...] to evaluate it"
                )
                continue
            options = dict(metric_options.get(info.name, {}))
            if info.curve:
                options["return_curve"] = True
            start = time.perf_counter()
            try:
                value = call_with(info.fn, available, options)
            except LumosError as exc:
                result.not_applicable[key] = str(exc)
                continue
            result.seconds[key] = time.perf_counter() - start
            if info.curve:
                result.curves[key] = value
                value = value.scores
            result.scores[key] = value.detach().cpu()
    return result


def _detached(value: Any, n: int, what: str = "attributions", cpu: bool = False) -> Any:
    """Attributions (an `Explanation`, a tensor, a tuple or a dict of `n` rows) detached, on
    the CPU with `cpu`, in their structure."""
    parts, structure = attribution_parts(value, n, what)
    return structure.restore([t.detach().cpu() if cpu else t.detach() for t in parts])


def _unique(name: str, taken: list[str]) -> str:
    label, i = name, 2
    while label in taken:
        label, i = f"{name}#{i}", i + 1
    return label


#: Black-box methods cheap enough to run by default (others: name them in `methods`).
DEFAULT_BLACK_BOX = ("occlusion", "rise")


def applicable_methods(layer: Any = None) -> list[str]:
    """The registered methods `trust_report` runs by default: every gradient, propagation and
    CAM method that gives input-space maps for a class target (methods that need a `layer` only
    when one is given), plus the cheap black-box methods `DEFAULT_BLACK_BOX`. Methods that need
    a background set are included; without ``method_options={name: {"baselines": ...}}`` they
    are reported as not applicable."""
    from lumos.api import methods as registered

    rows = []
    for info in registered():
        if info.family not in INPUT_FAMILIES or "neuron" in info.needs:
            continue
        if "layer" in info.needs and layer is None:
            continue
        if "black_box" in info.needs and info.name not in DEFAULT_BLACK_BOX:
            continue
        rows.append(info.name)
    return rows


def trust_report(
    model: Callable,
    inputs: Any,
    targets: TargetLike = "predicted",
    *,
    masks: Any = None,
    methods: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    layer: Any = None,
    batch_size: int | None = None,
    seed: int = 0,
    method_options: dict[str, dict[str, Any]] | None = None,
    metric_options: dict[str, dict[str, Any]] | None = None,
) -> EvaluationResult:
    """ "Which method should I trust?" on the user's model and data: every applicable method
    (or `methods`) × the default metrics (or `metrics`), localisation metrics when `masks` are
    given. Returns the `EvaluationResult`; `.ranking()` and `.to_html()` answer the question.
    """
    names = list(methods) if methods is not None else applicable_methods(layer)
    return evaluate(
        model,
        inputs,
        targets,
        methods=names,
        metrics=metrics,
        masks=masks,
        layer=layer,
        batch_size=batch_size,
        seed=seed,
        method_options=method_options,
        metric_options=metric_options,
    )


def metric_table() -> list[dict[str, str]]:
    """Every registered metric as a row: name, family, direction, needs, paper, summary."""
    return [
        {
            "name": m.name,
            "family": m.family,
            "direction": f"{m.direction} is better",
            "needs": ", ".join(sorted(m.needs)) or "-",
            "paper": m.paper,
            "summary": m.summary,
        }
        for m in metrics()
    ]
