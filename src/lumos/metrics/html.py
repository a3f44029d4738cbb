"""Figures and the self-contained HTML page of an `EvaluationResult` (base64 PNG, no CDN)."""

from __future__ import annotations

import html
import math
from typing import Any

import torch

from lumos.metrics.base import get_metric
from lumos.viz.html import figure_html, table_html

_STYLE = """<style>
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table.lumos{border-collapse:collapse;margin:1em 0;font-size:13px}
table.lumos td,table.lumos th{border:1px solid #ccc;padding:3px 8px;text-align:right}
table.lumos th{background:#f3f3f3}
td.best{font-weight:bold;background:#e8f5e9} td.na{color:#999}
</style>"""


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def scores_figure(result: Any):
    """Mean ± 95% CI per method, one panel per metric that scored something."""
    names = [m for m in result.metrics if any((k, m) in result.scores for k in result.methods)]
    columns = min(4, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / columns))
    fig = _new_figure(3.4 * columns, 2.6 * rows)
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, columns, i + 1)
        methods = [m for m in result.methods if (m, name) in result.scores]
        stats = [result.summary(m, name) for m in methods]
        means = [s["mean"] for s in stats]
        errors = [
            [s["mean"] - s["ci_low"] for s in stats],
            [s["ci_high"] - s["mean"] for s in stats],
        ]
        ax.barh(range(len(methods)), means, xerr=errors, color="#4c72b0", alpha=0.85)
        ax.set_yticks(range(len(methods)), methods, fontsize=7)
        ax.invert_yaxis()
        arrow = "↑" if get_metric(name).higher_is_better else "↓"
        ax.set_title(f"{name} {arrow}", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    return fig


def curves_figure(result: Any):
    """Mean curve per method for each metric with curves (deletion, insertion, ...), or None."""
    names = [m for m in result.metrics if any((k, m) in result.curves for k in result.methods)]
    if not names:
        return None
    fig = _new_figure(4.0 * len(names), 3.0)
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        for method in result.methods:
            curve = result.curves.get((method, name))
            if curve is not None:
                x_values, y_values = curve.x.cpu().numpy(), curve.y.mean(0).cpu().numpy()
                ax.plot(x_values, y_values, label=method, lw=1.2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(curve.x_label if curve else "", fontsize=8)
        ax.set_ylabel(curve.y_label if curve else "", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.axes[-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def maps_figure(result: Any, n_examples: int = 4):
    """The first examples and every method's map (one image input only), or None."""
    from lumos.viz.maps import display_images, image_maps, signed_scale

    x = result.inputs
    methods = [m for m in result.methods if m in result.attributions]
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not methods:
        return None
    n = min(n_examples, int(x.shape[0]))
    fig = _new_figure(1.6 * (len(methods) + 1), 1.6 * n)
    images = display_images(x[:n])
    for row in range(n):
        ax = fig.add_subplot(n, len(methods) + 1, row * (len(methods) + 1) + 1)
        ax.imshow(images[row])
        if result.masks is not None:
            mask = result.masks[row].reshape(x.shape[-2:]).float().cpu().numpy()
            ax.contour(mask, levels=[0.5], colors="lime", linewidths=0.8)
        ax.set_axis_off()
        if row == 0:
            ax.set_title("input", fontsize=7)
    for j, method in enumerate(methods):
        a = result.attributions[method]
        if not isinstance(a, torch.Tensor) or a.dim() != 4:
            continue
        a = a[:n]
        maps = signed_scale(image_maps(a, tuple(x.shape[-2:]), "sum"))
        for row in range(n):
            ax = fig.add_subplot(n, len(methods) + 1, row * (len(methods) + 1) + j + 2)
            ax.imshow(maps[row], cmap="bwr", vmin=-1, vmax=1)
            ax.set_axis_off()
            if row == 0:
                ax.set_title(method, fontsize=7)
    fig.tight_layout()
    return fig


def _cell(result: Any, method: str, name: str, best: dict[str, str]) -> str:
    stats = result.summary(method, name)
    if stats is None:
        reason = result.method_errors.get(method) or result.not_applicable.get((method, name), "")
        return f'<td class="na" title="{html.escape(reason)}">n/a</td>'
    cls = ' class="best"' if best.get(name) == method else ""
    text = f"{stats['mean']:.3g} [{stats['ci_low']:.3g}, {stats['ci_high']:.3g}]"
    return f"<td{cls}>{html.escape(text)}</td>"


def scores_table(result: Any) -> str:
    """Methods × metrics: mean [95% CI], the best per metric in bold, n/a with its reason."""
    best = {}
    for name in result.metrics:
        higher = get_metric(name).higher_is_better
        scored = {
            m: result.summary(m, name)["mean"] for m in result.methods if (m, name) in result.scores
        }
        scored = {m: v for m, v in scored.items() if math.isfinite(v)}
        if scored:
            best[name] = (max if higher else min)(scored, key=scored.get)
    head = "".join(
        f"<th>{html.escape(n)} {'↑' if get_metric(n).higher_is_better else '↓'}</th>"
        for n in result.metrics
    )
    body = "".join(
        f"<tr><th>{html.escape(m)}</th>"
        + "".join(_cell(result, m, n, best) for n in result.metrics)
        + "</tr>"
        for m in result.methods
    )
    return (
        f'<table class="lumos"><thead><tr><th>method</th>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table>"
    )


def evaluation_html(result: Any, title: str, *, full: bool = True) -> str:
    """The ranking, the score table, the reasons for empty cells and the figures."""
    parts = [f"<h2>{html.escape(title)}</h2>"]
    ranking = result.ranking()
    if ranking:
        columns = ["overall_rank", "method", "mean_rank", "n_metrics"]
        columns += [m for m in result.metrics if any(m in r for r in ranking)]
        parts.append("<h3>Ranking (1 = most trustworthy; per metric and overall)</h3>")
        parts.append(table_html(ranking, columns))
    parts.append("<h3>Scores: mean [95% CI] over examples (↑/↓: higher/lower is better)</h3>")
    parts.append(scores_table(result))
    reasons = sorted(
        {
            *result.method_errors.items(),
            *((f"{m} × {n}", r) for (m, n), r in result.not_applicable.items()),
        }
    )
    if reasons:
        items = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in reasons)
        parts.append(
            f"<details><summary>Not applicable ({len(reasons)})</summary><ul>{items}</ul></details>"
        )
    for label, fig in (
        ("scores", scores_figure(result) if result.scores else None),
        ("curves", curves_figure(result)),
        ("example maps", maps_figure(result)),
    ):
        if fig is not None:
            parts.append(f"<h3>{label.capitalize()}</h3>" + figure_html(fig, label))
    papers = "".join(
        f"<li><b>{html.escape(n)}</b> — {html.escape(get_metric(n).paper)}</li>"
        for n in result.metrics
    )
    parts.append(f"<details><summary>Metrics and papers</summary><ul>{papers}</ul></details>")
    section = f'<section class="lumos-evaluation">{"".join(parts)}</section>'
    if not full:
        return section
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title>{_STYLE}</head><body>{section}</body></html>"
    )
