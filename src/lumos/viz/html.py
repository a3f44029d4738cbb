"""Self-contained HTML fragments: figures embedded as base64 PNG, no CDN, no scripts."""

from __future__ import annotations

import base64
import html
import io
from typing import Any


def figure_to_data_uri(fig, dpi: int = 110) -> str:
    """A PNG data URI of a matplotlib figure."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def figure_html(fig, alt: str = "figure", dpi: int = 110) -> str:
    return f'<img alt="{html.escape(alt)}" src="{figure_to_data_uri(fig, dpi)}"/>'


def table_html(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A plain HTML table of dict rows (values escaped)."""
    if not rows:
        return "<p><em>nothing to show</em></p>"
    columns = columns or list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(row.get(c, '')))}</td>" for c in columns) + "</tr>"
        for row in rows
    )
    return f'<table class="lumos"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def explanation_html(explanation: Any, **figure_options: Any) -> str:
    """A notebook-ready summary: method, options, identity error, timing and the figure."""
    from lumos.viz.figures import explanation_figure

    delta = explanation.delta
    rows = [
        {"": "method", "value": explanation.method},
        {"": "examples", "value": len(explanation)},
        {"": "options", "value": ", ".join(f"{k}={v!r}" for k, v in explanation.options.items())},
        {"": "max |delta|", "value": "n/a" if delta is None else float(delta.abs().max())},
        {"": "time (s)", "value": float(explanation.timing.get("total", float("nan")))},
    ]
    fig = explanation_figure(explanation, **figure_options)
    body = table_html(rows) + figure_html(fig, explanation.method)
    return f'<div class="lumos-explanation">{body}</div>'
