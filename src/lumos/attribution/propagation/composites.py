"""Composites: which LRP rule applies to which layer, by module path or by type, and presets.

A composite is an ordered mapping. Keys are module paths (``"features.0"``, shell patterns like
``"layer4.*"``), module types (``nn.Conv2d``, a tuple of types), `Sum` (residual adds) or
`Affine` (elementwise operations with constants); the string ``"first"`` names the layer that
first sees the input. Paths win over ``"first"``, which wins over types; among keys of the same
sort the first match wins. Every composite ends with the base map: activations, constant shifts
and scalings pass relevance through (`Pass`), sums and average pooling normalize (`Norm`),
max pooling sends it to the maximum (its gradient).

Presets follow Zennit (Anders et al. 2021) and Kohlbrenner et al. (2020):

=============================  ===============  ============  ================
preset                         first layer      convolutions  dense layers
=============================  ===============  ============  ================
epsilon                        ε                ε             ε
epsilon_plus                   z⁺               z⁺            ε
epsilon_gamma_box              zᴮ(low, high)    γ             ε
epsilon_alpha2_beta1           α2β1             α2β1          ε
epsilon_plus_flat              flat             z⁺            ε
epsilon_alpha2_beta1_flat      flat             α2β1          ε
=============================  ===============  ============  ================
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from lumos.attribution.propagation.graph import (
    ACTIVATION_MODULES,
    AVG_POOL_MODULES,
    BATCHNORM_MODULES,
    Affine,
    Step,
    Sum,
)
from lumos.attribution.propagation.rules import (
    AlphaBeta,
    Epsilon,
    Flat,
    Gamma,
    Norm,
    Pass,
    Rule,
    ZBox,
    ZPlus,
)
from lumos.core.errors import InputError, UnsupportedModelError, unknown_name

CONVOLUTIONS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
PRESETS = (
    "epsilon",
    "epsilon_plus",
    "epsilon_gamma_box",
    "epsilon_alpha2_beta1",
    "epsilon_plus_flat",
    "epsilon_alpha2_beta1_flat",
)


@dataclass(frozen=True)
class Composite:
    """An ordered list of ``(key, rule)`` pairs; `rule_for(step)` finds the rule of a step."""

    entries: tuple[tuple[Any, Rule], ...]

    def rule_for(self, step: Step, key: Any = None) -> Rule | None:
        key = key or step.key
        for pattern, rule in self.entries:
            if (
                isinstance(pattern, str)
                and pattern != "first"
                and (pattern == step.path or fnmatch.fnmatchcase(step.path, pattern))
            ):
                return rule
        if step.first:
            for pattern, rule in self.entries:
                if pattern == "first":
                    return rule
        for pattern, rule in self.entries:
            if isinstance(pattern, (type, tuple)) and key is not None:
                types = pattern if isinstance(pattern, tuple) else (pattern,)
                if any(isinstance(t, type) and issubclass(key, t) for t in types):
                    return rule
        return None


BASE: tuple[tuple[Any, Rule], ...] = (
    (ACTIVATION_MODULES, Pass()),
    (Affine, Pass()),
    (BATCHNORM_MODULES, Pass()),
    (Sum, Norm()),
    (AVG_POOL_MODULES, Norm()),
)


def preset(
    name: str,
    *,
    epsilon: float = 1e-6,
    gamma: float = 0.25,
    low: Any = None,
    high: Any = None,
) -> Composite:
    """The named preset composite with its parameters."""
    dense = (nn.Linear, Epsilon(epsilon))
    table: dict[str, list[tuple[Any, Rule]]] = {
        "epsilon": [(CONVOLUTIONS, Epsilon(epsilon)), dense],
        "epsilon_plus": [(CONVOLUTIONS, ZPlus()), dense],
        "epsilon_gamma_box": [("first", ZBox(low, high)), (CONVOLUTIONS, Gamma(gamma)), dense],
        "epsilon_alpha2_beta1": [(CONVOLUTIONS, AlphaBeta(2.0, 1.0)), dense],
        "epsilon_plus_flat": [("first", Flat()), (CONVOLUTIONS, ZPlus()), dense],
        "epsilon_alpha2_beta1_flat": [
            ("first", Flat()),
            (CONVOLUTIONS, AlphaBeta(2.0, 1.0)),
            dense,
        ],
    }
    if name not in table:
        raise unknown_name("composite", name, PRESETS)
    return Composite(tuple(table[name]) + BASE)


def resolve_composite(composite: Any, **params: Any) -> Composite:
    """A preset name, a `Composite`, or a user mapping ``{key: rule}`` / list of pairs (to which
    the base map is appended)."""
    if isinstance(composite, str):
        return preset(composite, **params)
    if isinstance(composite, Composite):
        return composite
    if isinstance(composite, Mapping):
        pairs = list(composite.items())
    elif isinstance(composite, Sequence):
        pairs = list(composite)
    else:
        raise InputError(
            f"composite must be a preset name {PRESETS}, a Composite, or a mapping from module "
            f"paths/types to rules, got {type(composite).__name__}."
        )
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[1], Rule)):
            raise InputError(
                "composite entries must be (key, rule) pairs with a rule from "
                "lumos.attribution.propagation.rules, e.g. {nn.Conv2d: Gamma(0.25)}."
            )
    return Composite(tuple(pairs) + BASE)


def require_rule(composite: Composite, step: Step, method: str, key: Any = None) -> Rule:
    """The rule for a linear layer, or an error saying how to map one."""
    rule = composite.rule_for(step, key)
    if rule is None:
        kind = (key or step.key or type(None)).__name__
        raise UnsupportedModelError(
            f"{method}: the composite has no rule for the {kind} layer '{step.path}'. Add one, "
            f"e.g. composite={{'{step.path}': Epsilon()}} or {{nn.{kind}: Epsilon()}}."
        )
    return rule
