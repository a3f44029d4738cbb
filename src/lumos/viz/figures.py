"""Matplotlib figures of explanations: input, signed map, absolute map and overlay for images;
bar charts for tabular and token attributions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lumos.viz.maps import absolute_scale, display_images, image_maps, is_image, signed_scale

PANELS = ("input", "signed", "absolute", "overlay")


def new_figure(n_rows: int, n_cols: int, figsize: tuple[float, float]):
    """A figure and its axes grid without pyplot's global state (safe in servers and threads;
    notebooks still display the returned Figure)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(n_rows, n_cols, squeeze=False)


def explanation_figure(
    explanation: Any,
    *,
    examples: Sequence[int] | int | None = None,
    panels: Sequence[str] = PANELS,
    reduce: str = "sum",
    percentile: float = 99.0,
    input_index: int = 0,
    feature_names: Sequence[str] | None = None,
    cmap: str = "RdBu_r",
    title: str | None = None,
):
    """A figure with one row per example.

    Images: `panels` out of ``input`` (the image), ``signed`` (diverging map, red supports the
    target, blue opposes it), ``absolute`` (magnitude), ``overlay`` (magnitude over the image).
    Channels are combined with `reduce` (``sum`` keeps the sign; ``abs_sum``, ``max_abs``,
    ``norm`` measure magnitude); each map is scaled by its `percentile` of |values|.
    Tabular and token attributions are drawn as signed bar charts.
    """
    attributions = explanation.attributions_flat
    attr = attributions[min(input_index, len(attributions) - 1)]
    x = explanation.inputs_flat[min(input_index, len(explanation.inputs_flat) - 1)]
    if examples is None:
        examples = list(range(min(4, attr.shape[0])))
    elif isinstance(examples, int):
        examples = [examples]
    title = title or explanation.method
    if is_image(x) and attr.dim() == 4:
        return _image_figure(
            explanation, x, attr, examples, panels, reduce, percentile, cmap, title
        )
    return _bar_figure(explanation, attr, examples, feature_names, title)


def _image_figure(explanation, x, attr, examples, panels, reduce, percentile, cmap, title):
    unknown = [p for p in panels if p not in PANELS]
    if unknown:
        from lumos.core.errors import InputError

        raise InputError(f"Unknown panels {unknown}; choose from {PANELS}.")
    index = torch.as_tensor(list(examples))
    images = display_images(x[index])
    maps = image_maps(attr[index], tuple(x.shape[-2:]), reduce)
    signed, magnitude = signed_scale(maps, percentile), absolute_scale(maps, percentile)
    fig, axes = new_figure(len(examples), len(panels), (2.2 * len(panels), 2.2 * len(examples)))
    targets = explanation.targets
    for row, example in enumerate(examples):
        for col, panel in enumerate(panels):
            ax = axes[row, col]
            ax.set_axis_off()
            if panel == "input":
                ax.imshow(images[row])
                label = f"#{example}"
                if targets is not None:
                    label += f" target {int(targets[example])}"
                ax.set_title(label, fontsize=8)
            elif panel == "signed":
                ax.imshow(signed[row], cmap=cmap, vmin=-1, vmax=1)
                ax.set_title("signed", fontsize=8)
            elif panel == "absolute":
                ax.imshow(magnitude[row], cmap="magma", vmin=0, vmax=1)
                ax.set_title("absolute", fontsize=8)
            else:
                ax.imshow(images[row].mean(-1), cmap="gray", vmin=0, vmax=1)
                ax.imshow(magnitude[row], cmap="jet", alpha=0.45, vmin=0, vmax=1)
                ax.set_title("overlay", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _bar_figure(explanation, attr, examples, feature_names, title):
    values = attr.detach().float().cpu()
    if values.dim() > 2:
        values = values.flatten(2).sum(-1) if values.dim() > 3 else values.sum(-1)
    values = values.reshape(values.shape[0], -1).numpy()
    n_features = values.shape[1]
    names = (
        list(feature_names) if feature_names is not None else [str(i) for i in range(n_features)]
    )
    shown = min(n_features, 20)
    fig, axes = new_figure(len(examples), 1, (6, 0.25 * shown * len(examples) + 1))
    for row, example in enumerate(examples):
        v = values[example]
        order = np.argsort(-np.abs(v))[:shown][::-1]
        ax = axes[row, 0]
        ax.barh(
            [names[i] for i in order], v[order], color=np.where(v[order] >= 0, "#c0392b", "#2e86c1")
        )
        ax.axvline(0, color="black", linewidth=0.5)
        ax.tick_params(labelsize=7)
        ax.set_title(f"#{example}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
