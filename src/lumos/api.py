"""The functional front door: `lumos.explain` and `lumos.methods`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lumos.core.errors import unknown_name
from lumos.core.explanation import Explanation
from lumos.core.inputs import InputsLike
from lumos.core.registry import get_method, method_options
from lumos.core.registry import methods as _methods
from lumos.core.targets import TargetLike


def explain(
    model: Callable,
    inputs: InputsLike,
    method: str = "integrated_gradients",
    target: TargetLike = "predicted",
    **options: Any,
) -> Explanation:
    """Explain `target` of `model` at `inputs` with a registered method.

    `options` are split between the method's constructor and its `explain` call, so
    ``lumos.explain(model, x, method="integrated_gradients", n_steps=64, baselines=b)`` equals
    ``IntegratedGradients(model, n_steps=64).explain(x, baselines=b)``. `lumos.methods()` lists
    every method with its options.
    """
    cls, init, call = _split(method, options)
    return cls(model, **init).explain(inputs, target, **call)


def _split(method: str, options: dict[str, Any]) -> tuple[type, dict, dict]:
    """The method's class and `options` split into constructor and call options."""
    cls = get_method(method)
    init_options, call_options = method_options(cls)
    unknown = set(options) - set(init_options) - set(call_options)
    if unknown:
        valid = {**init_options, **call_options}
        raise unknown_name(f"option of {method!r}", sorted(unknown)[0], valid)
    init = {k: v for k, v in options.items() if k in init_options}
    call = {k: v for k, v in options.items() if k in call_options}
    return cls, init, call


def explain_targets(
    model: Callable,
    inputs: InputsLike,
    targets: Sequence[TargetLike],
    method: str = "integrated_gradients",
    **options: Any,
) -> list[Explanation]:
    """Explain several targets for the same inputs in one batched run (one Explanation each)."""
    cls, init, call = _split(method, options)
    return cls(model, **init).explain_targets(inputs, targets, **call)


def methods(family: str | None = None):
    """The registry: every method's name, family, requirements, summary and options."""
    return _methods(family)
