"""`lumos demo`: explain the `shapes` zoo model with every applicable registered method and write
a self-contained HTML report."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import lumos
from lumos.core.errors import LumosError
from lumos.core.registry import MethodInfo
from lumos.report.page import Page, paragraph
from lumos.viz.figures import new_figure
from lumos.viz.html import figure_html, table_html
from lumos.viz.maps import display_images, image_maps, signed_scale

# families whose maps live in input space, in report order
INPUT_FAMILIES = ("gradient", "propagation", "cam", "perturbation", "shapley")
# the methods' own defaults are sized for a demo; integrated gradients needs fewer steps here
DEMO_BUDGETS = {"n_steps": 32}
# one or two methods of each family for the trust ranking (every method × metric is minutes)
TRUST_METHODS = (
    "saliency",
    "integrated_gradients",
    "smoothgrad",
    "guided_backprop",
    "deeplift",
    "lrp",
    "grad_cam",
    "score_cam",
    "occlusion",
    "rise",
)


@dataclass
class DemoRun:
    """What the demo computed: explanations per method, failures, and the report's path."""

    path: Path
    explanations: dict[str, Any] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def demo_methods(only: Sequence[str] | None = None) -> list[MethodInfo]:
    """The registered methods that produce input-space maps (or just `only`, in that order)."""
    rows = [m for m in lumos.methods() if m.family in INPUT_FAMILIES and "neuron" not in m.needs]
    if only:
        by_name = {m.name: m for m in lumos.methods()}
        missing = [name for name in only if name not in by_name]
        if missing:
            from lumos.core.errors import unknown_name

            raise unknown_name("method", missing[0], by_name)
        return [by_name[name] for name in only]
    return rows


def method_options(info: MethodInfo, bundle: Any, background: torch.Tensor) -> dict[str, Any]:
    """Options that let `info` run on the zoo model: its layer, background, demo budgets."""
    options = {k: v for k, v in DEMO_BUDGETS.items() if k in info.options}
    if "layer" in info.needs:
        options["layer"] = bundle.default_layer
    if "baselines" in info.needs:
        options["baselines"] = background
    return options


def run_demo(
    out_dir: str | Path = "lumos-report",
    *,
    n_images: int = 6,
    methods: Sequence[str] | None = None,
    seed: int = 0,
    evaluation: bool = True,
    tabular: bool = True,
    log: Callable[[str], None] = print,
) -> DemoRun:
    """Train (or load) the `shapes` model, explain test images with every applicable method,
    rank the methods with the trust metrics, run the sanity check, explain the `tabular` model
    with Shapley values, and write `index.html`."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    log("loading the zoo model 'shapes' (trained on first use, then cached)")
    bundle = lumos.zoo.load("shapes")
    x, y, masks = bundle.test_batch(n_images, seed=seed)
    background = bundle.train_set()[0][:16]
    run = DemoRun(path=out_dir / "index.html")
    for info in demo_methods(methods):
        log(f"explaining with {info.name}")
        try:
            run.explanations[info.name] = lumos.explain(
                bundle.model,
                x,
                method=info.name,
                target=y,
                **method_options(info, bundle, background),
            )
        except LumosError as exc:
            run.failures[info.name] = str(exc)
            log(f"  {info.name} failed: {exc}")
    page = Page("lumos demo — what does the shapes model look at?")
    page.add("Model", _model_section(bundle, n_images))
    page.add("Attributions", _attribution_section(run, x, y, masks, bundle))
    if evaluation:
        log("which method should I trust? (metrics × methods)")
        page.add("Which method should I trust?", _trust_section(bundle, x, y, masks, methods))
        log("sanity check: cascading parameter randomisation")
        page.add("Sanity check", _sanity_section(bundle, x, y, methods))
    if tabular:
        log("Shapley values of the tabular model")
        page.add("Tabular Shapley values", _tabular_section(seed))
    log("writing the report")
    run.seconds = time.perf_counter() - start
    page.add("Run", paragraph(f"Report generated in {run.seconds:.1f} s on {_device()}."))
    page.write(run.path)
    return run


def _model_section(bundle: Any, n_images: int) -> str:
    rows = [
        {"": "model", "value": f"zoo:{bundle.name} ({type(bundle.model).__name__})"},
        {"": "parameters", "value": sum(p.numel() for p in bundle.model.parameters())},
        {"": "classes", "value": ", ".join(bundle.class_names)},
        {"": "test accuracy", "value": f"{bundle.accuracy:.1%}"},
        {"": "default layer (CAM)", "value": bundle.default_layer},
        {"": "images explained", "value": n_images},
    ]
    text = (
        "Synthetic 64×64 images whose class is decided by one object on a textured background; "
        "every image comes with the object's ground-truth mask, so we can see whether an "
        "explanation points at the right pixels."
    )
    return paragraph(text) + table_html(rows)


def _attribution_section(run: DemoRun, x, y, masks, bundle) -> str:
    rows = []
    for name, exp in run.explanations.items():
        info = {m.name: m for m in lumos.methods()}[name]
        rows.append(
            {
                "method": name,
                "family": info.family,
                "seconds": round(exp.timing["total"], 3),
                "max |delta|": "n/a" if exp.delta is None else float(exp.delta.abs().max()),
                "object hit (argmax in mask)": _hits(exp, masks),
                "summary": info.summary,
            }
        )
    parts = [
        paragraph(
            "Each map shows the signed attribution summed over colour channels (red supports "
            "the true class, blue opposes it), scaled per image by its 99th percentile. "
            "'delta' is the method's identity error where one exists (completeness, "
            "conservation, efficiency)."
        ),
        table_html(rows),
    ]
    for family in INPUT_FAMILIES:
        names = [n for n in run.explanations if _family(n) == family]
        if names:
            parts.append(f"<h3>{family}</h3>")
            fig = _grid(names, run.explanations, x, y, masks, bundle.class_names)
            parts.append(figure_html(fig, f"{family} attributions", dpi=90))
    if run.failures:
        parts.append("<h3>Methods that did not run</h3>")
        parts.append(table_html([{"method": k, "reason": v} for k, v in run.failures.items()]))
    return "".join(parts)


def _trust_section(bundle, x, y, masks, methods) -> str:
    from lumos.metrics import trust_report

    result = trust_report(
        bundle.model,
        x,
        y,
        masks=masks,
        layer=bundle.default_layer,
        methods=methods,
        method_options={"integrated_gradients": {"n_steps": 32}},
    )
    intro = paragraph(
        "Every applicable method scored by faithfulness (deletion, insertion), robustness, "
        "complexity and — with the ground-truth masks — localisation metrics, then ranked per "
        "metric (best first, respecting each metric's direction)."
    )
    return intro + result.to_html(full=False)


def _sanity_section(bundle, x, y, methods) -> str:
    from lumos.metrics import sanity_check

    chosen = [m for m in ("saliency", "guided_backprop", "grad_cam") if not methods or m in methods]
    if not chosen:
        return paragraph("No method of the sanity check was selected.", "note")
    check = sanity_check(
        bundle.model,
        x,
        y,
        methods=chosen,
        method_options={"grad_cam": {"layer": bundle.default_layer}},
    )
    return check.to_html()


def _tabular_section(seed: int) -> str:
    from lumos.attribution.shapley import waterfall_figure

    bundle = lumos.zoo.load("tabular")
    x, y = bundle.test_batch(2, seed=seed)
    background = bundle.train_set()[0][:50]
    exp = lumos.explain(
        bundle.model, x, method="kernel_shap", target=y, baselines=background, seed=seed
    )
    parts = [
        paragraph(
            f"KernelSHAP values of the breast-cancer MLP (test accuracy {bundle.accuracy:.1%}) "
            "for two test patients, against 50 training rows as background: from the average "
            "output E f(background) to this patient's output. Efficiency error "
            f"max |delta| = {float(exp.delta.abs().max()):.2g}."
        )
    ]
    for index in range(len(x)):
        fig = waterfall_figure(exp, bundle.feature_names, index=index)
        parts.append(figure_html(fig, f"waterfall {index}", dpi=90))
    return "".join(parts)


def _family(name: str) -> str:
    return {m.name: m.family for m in lumos.methods()}[name]


def _hits(exp: Any, masks: torch.Tensor) -> str:
    maps = image_maps(exp.attributions_flat[0], tuple(masks.shape[-2:]), "sum")
    flat = maps.reshape(maps.shape[0], -1).argmax(1)
    inside = masks.reshape(masks.shape[0], -1).numpy()[np.arange(len(flat)), flat]
    return f"{int(inside.sum())}/{len(inside)}"


def _grid(names, explanations, x, y, masks, class_names):
    """Rows: the input (object outlined) and one row per method; columns: examples."""
    n = x.shape[0]
    fig, axes = new_figure(len(names) + 1, n, (1.6 * n, 1.6 * (len(names) + 1)))
    images = display_images(x)
    for col in range(n):
        ax = axes[0, col]
        ax.imshow(images[col])
        ax.contour(masks[col, 0].numpy(), levels=[0.5], colors="yellow", linewidths=0.8)
        ax.set_title(class_names[int(y[col])], fontsize=8)
    for row, name in enumerate(names, start=1):
        maps = signed_scale(
            image_maps(explanations[name].attributions_flat[0], x.shape[-2:], "sum")
        )
        for col in range(n):
            axes[row, col].imshow(maps[col], cmap="RdBu_r", vmin=-1, vmax=1)
        axes[row, 0].set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def _device() -> str:
    return f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
