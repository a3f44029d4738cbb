"""lumos — explain and visualize neural networks.

The public surface is deliberately small::

    import lumos
    exp = lumos.explain(model, x, method="integrated_gradients", target=y)
    lumos.methods()          # every registered method
    lumos.load_explanation("run.lumos")
"""

from __future__ import annotations

from lumos import metrics, zoo
from lumos.api import explain, explain_targets, methods
from lumos.core.errors import LumosError
from lumos.core.explanation import Explanation, load_explanation
from lumos.metrics import evaluate

__version__ = "0.1.0"

__all__ = [
    "Explanation",
    "LumosError",
    "__version__",
    "evaluate",
    "explain",
    "explain_targets",
    "load_explanation",
    "methods",
    "metrics",
    "zoo",
]
