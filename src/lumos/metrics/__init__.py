"""Trust metrics: is an explanation faithful, robust, localised, simple, sensitive to the model?

Every metric is a plain function on tensors that returns one score per example, registered under
its name with its direction (`lumos.metrics.metrics()` lists them)::

    lumos.metrics.deletion(model, x, attributions, target=y)          # (B,) AUCs, lower better
    lumos.metrics.pointing_game(attributions, masks)                  # (B,) hits, higher better
    lumos.metrics.max_sensitivity(model, x, "saliency", target=y)     # re-explains, lower better
    result = lumos.evaluate(model, x, y, methods=["saliency", "grad_cam"], masks=masks,
                            layer="features.block3")
    result.ranking(); result.to_html()

Metrics that run the model take inputs as the methods do — a tensor, a tuple or a dict of
tensors — with attributions (or the `Explanation`) in the same structure::

    lumos.metrics.deletion(model, {"image": x, "table": t}, exp, target=y)
"""

from lumos.metrics.axiomatic import completeness, input_invariance, non_sensitivity
from lumos.metrics.base import MetricInfo, get_metric, metrics
from lumos.metrics.complexity import complexity, effective_complexity, sparseness
from lumos.metrics.evaluate import (
    DEFAULT_METRICS,
    EvaluationResult,
    applicable_methods,
    evaluate,
    metric_table,
    trust_report,
)
from lumos.metrics.faithfulness import (
    Curve,
    comprehensiveness,
    deletion,
    faithfulness_correlation,
    infidelity,
    insertion,
    pixel_flipping,
    region_perturbation,
    road,
    sufficiency,
)
from lumos.metrics.localisation import (
    attribution_auc,
    energy_pointing_game,
    pointing_game,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    top_k_intersection,
)
from lumos.metrics.randomisation import (
    SanityCheck,
    model_randomisation,
    random_logit,
    randomise,
    sanity_check,
)
from lumos.metrics.robustness import avg_sensitivity, local_lipschitz, max_sensitivity

__all__ = [
    "DEFAULT_METRICS",
    "Curve",
    "EvaluationResult",
    "MetricInfo",
    "SanityCheck",
    "applicable_methods",
    "attribution_auc",
    "avg_sensitivity",
    "completeness",
    "complexity",
    "comprehensiveness",
    "deletion",
    "effective_complexity",
    "energy_pointing_game",
    "evaluate",
    "faithfulness_correlation",
    "get_metric",
    "infidelity",
    "input_invariance",
    "insertion",
    "local_lipschitz",
    "max_sensitivity",
    "metric_table",
    "metrics",
    "model_randomisation",
    "non_sensitivity",
    "pixel_flipping",
    "pointing_game",
    "random_logit",
    "randomise",
    "region_perturbation",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "road",
    "sanity_check",
    "sparseness",
    "sufficiency",
    "top_k_intersection",
    "trust_report",
]
