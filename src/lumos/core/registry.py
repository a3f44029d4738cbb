"""The method registry: `@register` a `Method` subclass and it is listed by `lumos.methods()`,
reachable by name from `lumos.explain`, the CLI, the report and the test suite."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any

from lumos.core.errors import unknown_name

_REGISTRY: dict[str, type] = {}
FAMILIES = ("gradient", "propagation", "cam", "layer", "neuron", "perturbation", "shapley")
NEEDS = ("gradients", "layer", "black_box", "neuron", "baselines")


def register(name: str, *, family: str, needs: set[str] | frozenset[str] = frozenset()):
    """Class decorator that registers a method under `name` with its family and requirements.

    `needs` says what the method requires: ``gradients`` (a differentiable torch model),
    ``layer`` (a `layer=` option), ``neuron`` (a `neuron=` option), ``baselines`` (a background
    set), or ``black_box`` (only the model's outputs, so any callable works).
    """
    unknown = set(needs) - set(NEEDS)
    if unknown:
        raise ValueError(f"unknown needs {sorted(unknown)} for {name}; use {NEEDS}")

    def decorate(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method name {name!r} is registered twice")
        cls.name = name
        cls.family = family
        cls.needs = frozenset(needs)
        _REGISTRY[name] = cls
        return cls

    return decorate


_LOADED: list[bool] = []


def _load_all() -> None:
    """Import every method module so that its `@register` decorators run (once: walking the
    package costs directory listings)."""
    if _LOADED:
        return
    import importlib
    import pkgutil

    import lumos.attribution as package

    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(info.name)
    _LOADED.append(True)


def get_method(name: str) -> type:
    """The registered class for `name`, or an `UnknownNameError` with the closest names."""
    if isinstance(name, str) and name in _REGISTRY:
        return _REGISTRY[name]
    _load_all()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise unknown_name("method", str(name), _REGISTRY)
    return _REGISTRY[name]


@dataclass(frozen=True)
class MethodInfo:
    """One row of `lumos.methods()`."""

    name: str
    family: str
    needs: frozenset[str]
    summary: str
    options: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        needs = ",".join(sorted(self.needs)) or "-"
        return f"{self.name:<28} {self.family:<13} {needs:<20} {self.summary}"


def method_options(cls: type) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keyword options of the constructor and of `explain`, with their defaults."""
    init, call = _signature_options(cls, cls.__init__, cls.explain)
    return dict(init), dict(call)


@functools.lru_cache(maxsize=256)
def _signature_options(cls: type, init: Any, explain: Any) -> tuple[dict, dict]:
    """`method_options`, read once per class and pair of functions (signatures are slow)."""
    return (
        _keywords(cls, "__init__", {"self", "model"}),
        _keywords(cls, "explain", {"self", "inputs", "target"}),
    )


def _keywords(cls: type, name: str, skip: set[str]) -> dict[str, Any]:
    """Keyword parameters of `cls.<name>` with their defaults; where it also takes ``**kwargs``
    (a subclass passing options on to its parent), the parents' keywords as well."""
    options: dict[str, Any] = {}
    for klass in cls.__mro__:
        fn = klass.__dict__.get(name)
        if fn is None:
            continue
        params = inspect.signature(fn).parameters.values()
        for p in params:
            if p.name not in skip and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
                default = None if p.default is inspect.Parameter.empty else p.default
                options.setdefault(p.name, default)
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return options


class MethodTable(list):
    """A list of `MethodInfo` rows that prints as a table (and renders as one in notebooks)."""

    def __repr__(self) -> str:
        header = f"{'name':<28} {'family':<13} {'needs':<20} summary"
        return "\n".join([header, *(repr(row) for row in self)])

    def names(self) -> list[str]:
        return [row.name for row in self]

    def _repr_html_(self) -> str:
        import html

        cells = "".join(
            f"<tr><td>{html.escape(r.name)}</td><td>{html.escape(r.family)}</td>"
            f"<td>{html.escape(', '.join(sorted(r.needs)))}</td>"
            f"<td>{html.escape(r.summary)}</td></tr>"
            for r in self
        )
        head = "<tr><th>name</th><th>family</th><th>needs</th><th>summary</th></tr>"
        return f"<table>{head}{cells}</table>"


def methods(family: str | None = None) -> MethodTable:
    """Every registered method (optionally of one family), sorted by family then name."""
    _load_all()
    rows = []
    for name, cls in _REGISTRY.items():
        if family is not None and cls.family != family:
            continue
        init_options, call_options = method_options(cls)
        summary = (inspect.getdoc(cls) or "").strip().splitlines()
        rows.append(
            MethodInfo(
                name=name,
                family=cls.family,
                needs=cls.needs,
                summary=summary[0] if summary else "",
                options={**init_options, **call_options},
            )
        )
    order = {f: i for i, f in enumerate(FAMILIES)}
    return MethodTable(sorted(rows, key=lambda r: (order.get(r.family, len(order)), r.name)))
