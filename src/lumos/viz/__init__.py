"""Static visualization: matplotlib figures and self-contained HTML fragments."""

from lumos.viz.figures import explanation_figure
from lumos.viz.html import explanation_html, figure_html, figure_to_data_uri, table_html
from lumos.viz.maps import reduce_channels

__all__ = [
    "explanation_figure",
    "explanation_html",
    "figure_html",
    "figure_to_data_uri",
    "reduce_channels",
    "table_html",
]
