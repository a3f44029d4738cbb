"""Tracing a model with `torch.fx`, and keeping the trace between the calls of one explainer.

A trace costs a few milliseconds (ResNet-18: 2 ms, more than a tenth of its gradient at small
batches), and a propagation method needs one per call. An explainer object (``DeepLift(model)``,
``LRP(model)``) keeps its last trace in a `TraceCache` and uses it again only while everything
the trace may have read is unchanged (`trace_key`):

- the module tree: every module's path, identity and class;
- for each module fx traces *through* (those outside ``torch.nn``, whose Python `forward`
  runs on proxies, and containers): its train/eval mode, its hooks, the values of its plain
  attributes (numbers, strings, tuples, lists, dicts, the attributes of an object such as a
  config one level down), which parameters and buffers it has, and its forward;
- the code that runs while tracing: the class's attributes and functions, and, for those
  functions and the functions they call (two levels), their defaults, closure contents and
  the global names they read (plain values by value, everything else by identity);
- the global module hooks.

Parameter and buffer *values* are never part of a trace (they are read when the graph runs),
so training the model or editing its weights in place needs no new trace. A trace that made
tensor constants (a forward that builds a tensor from Python values) is not kept: the constants
may come from anything. A forward that depends on state none of the above reaches (a value
deep inside a global object) should be explained with a new explainer after that state
changes; `lumos.explain` builds one on every call and never reuses a trace.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from lumos.core.errors import UnsupportedModelError

_PLAIN_ARGS = (int, float, bool, str, type(None))


class _Tracer(fx.Tracer):
    """fx's tracer with shortcuts for what this package does not read (together a quarter of
    a trace's time):

    - the common arguments of a node (proxies, numbers, strings, tuples and keyword dicts of
      those) become node arguments directly: fx's general path checks each against
      parameters, buffers, modules and opaque types;
    - a node records only the path of the module whose forward created it (`meta["scope"]`),
      not fx's copied module stacks and scope tables;
    - a leaf module's call becomes its node without entering a scope (its node names it)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.scopes: list[str] = []

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        path = self.path_of_module(m)
        if self.is_leaf_module(m, path):
            return self.create_proxy("call_module", path, args, kwargs)
        self.scopes.append(path)
        try:
            return forward(*args, **kwargs)
        finally:
            self.scopes.pop()

    def create_node(
        self, kind: str, target: Any, args: tuple, kwargs: dict, name: str | None = None,
        type_expr: Any | None = None,
    ) -> fx.Node:  # fmt: skip
        node = self.graph.create_node(kind, target, args, kwargs, name, type_expr)
        if self.scopes:
            node.meta["scope"] = self.scopes[-1]
        return node

    def create_arg(self, a: Any) -> Any:
        kind = type(a)
        if kind is fx.Proxy:
            return a.node
        if kind in _PLAIN_ARGS:
            return a
        if kind is tuple:
            return tuple(self.create_arg(item) for item in a)
        if kind is dict and all(type(key) is str for key in a):
            return {key: self.create_arg(value) for key, value in a.items()}
        return super().create_arg(a)


def trace(model: nn.Module) -> tuple[fx.Graph, dict[str, Any]]:
    """The model's fx graph and the tensor constants its forward creates (fx would leave them
    on the model as `_tensor_constantN` attributes: they are taken off and kept here).

    fx's tracer runs first without wrapping the `math` module's functions (patching and
    unpatching them costs more than tracing a small model); a forward that applies one to a
    traced value fails there and is traced again with them wrapped (so its Python side
    effects run twice). Where both succeed, the graphs are the same."""
    before = set(model.__dict__)
    constants: dict[str, Any] = {}
    root = _traced_root(model)

    def attempt(tracer: fx.Tracer) -> fx.Graph:
        try:
            return tracer.trace(root)
        finally:
            for key in [k for k in model.__dict__ if k not in before]:
                constants[key] = model.__dict__.pop(key)

    try:
        return attempt(_Tracer(autowrap_modules=(), autowrap_functions=())), constants
    except Exception:  # e.g. math.sqrt(x.shape[-1]) on a proxy
        constants.clear()
        return attempt(_Tracer()), constants


def _traced_root(model: nn.Module) -> nn.Module:
    """What fx traces: it runs the forward of the model's *class*, so a forward set on the
    instance (``model.forward = MethodType(fn, model)``, as some libraries wrap it) is traced
    on a stand-in of a subclass with that forward, sharing the model's attributes (nothing of
    the model changes); any other replacement is refused rather than silently ignored."""
    forward = model.__dict__.get("forward")
    if forward is None:
        return model
    fn = getattr(forward, "__func__", None)
    if getattr(forward, "__self__", None) is not model or not isinstance(fn, types.FunctionType):
        raise UnsupportedModelError(
            "The model's forward is replaced on the instance by something other than a method "
            "of the model; propagation methods trace the forward that model(x) runs and cannot "
            "see into it. Define that forward in a subclass (or a wrapper nn.Module)."
        )
    cls = type(model)
    stand_in = object.__new__(
        type(cls.__name__, (cls,), {"forward": fn, "__module__": cls.__module__})
    )
    object.__setattr__(stand_in, "__dict__", model.__dict__)  # the same attributes
    return stand_in


class TraceCache:
    """One explainer's last trace of its model, used again while `trace_key` is unchanged."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.trace: tuple[fx.Graph, dict[str, Any]] | None = None
        self.traced = 0  # traces made (for tests and benchmarks)

    def __call__(self, model: nn.Module) -> tuple[fx.Graph, dict[str, Any]]:
        try:
            key: tuple | None = trace_key(model)
        except Exception:  # an attribute that cannot be read or compared: trace every time
            key = None
        if key is not None and self.trace is not None and key == self.key:
            return self.trace
        self.key, self.trace = None, None
        graph, constants = trace(model)
        self.traced += 1
        if key is not None and not constants:
            self.key, self.trace = key, (graph, constants)
        return graph, constants

    def __getstate__(self) -> dict[str, Any]:  # a copy or a pickle starts empty
        return {"key": None, "trace": None, "traced": 0}


# -- what a trace may depend on ------------------------------------------------------------------


class _Same:
    """Compares by identity, and keeps the object alive so that its id is not reused."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __eq__(self, other: object) -> bool:
        return type(other) is _Same and other.obj is self.obj

    __hash__ = None  # type: ignore[assignment]


_PLAIN = (int, float, complex, bool, str, bytes, type(None))
_HOOKS = (
    "_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_hooks",
    "_backward_pre_hooks",
)  # fmt: skip
_GLOBAL_HOOKS = (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
    "_global_backward_pre_hooks", "_global_forward_hooks_always_called",
)  # fmt: skip
_SKIPPED = {"_modules", "_non_persistent_buffers_set", "_state_dict_hooks",
            "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
            "_load_state_dict_post_hooks"}  # fmt: skip


def _frozen(value: Any, depth: int = 0) -> Any:
    """A comparable snapshot: plain values and containers of them by value, tensors by
    identity, shape and dtype, an object with attributes by identity and (at the first level)
    its attributes, anything else by identity."""
    kind = type(value)
    if kind in _PLAIN:
        return value
    if depth < 4:
        if kind is tuple or kind is list:
            return (kind, tuple(_frozen(v, depth + 1) for v in value))
        if isinstance(value, dict):
            return (kind, tuple((_frozen(k, depth + 1), _frozen(v, depth + 1))
                                for k, v in value.items()))  # fmt: skip
        if (kind is set or kind is frozenset) and all(type(v) in _PLAIN for v in value):
            return (kind, frozenset(value))
    if isinstance(value, torch.Tensor):
        return (_Same(value), tuple(value.shape), value.dtype, value.device)
    if callable(getattr(value, "tobytes", None)) and getattr(value, "nbytes", 1 << 20) <= 1 << 16:
        return (_Same(value), value.tobytes())  # a small NumPy array, by value
    if (
        depth == 0
        and not isinstance(value, (nn.Module, type, types.ModuleType, types.FunctionType))
        and not callable(value)
        and isinstance(getattr(value, "__dict__", None), dict)
    ):
        return (_Same(value), _frozen(vars(value), depth + 1))
    return _Same(value)


def _module_state(module: nn.Module, seen: dict[int, Any]) -> tuple:
    """A traced-through module's own state: mode, hooks, parameter and buffer names, plain
    attributes."""
    out = []
    for name, value in module.__dict__.items():
        if name in _SKIPPED:
            continue
        if name in ("_parameters", "_buffers"):
            out.append((name, tuple((k, v is None) for k, v in value.items())))
        elif name in _HOOKS:
            out.append((name, tuple(value)))
        elif isinstance(value, (types.FunctionType, types.MethodType)):  # e.g. a forward
            out.append((name, _function_state(value, seen, 0)))
        else:
            out.append((name, _frozen(value)))
    return tuple(out)


def _code_names(code: types.CodeType) -> set[str]:
    """The global (and attribute) names a code object and the functions nested in it read."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _function_state(fn: Any, seen: dict[int, Any], depth: int) -> Any:
    """A Python function's code, defaults, closure contents and the globals it names (the
    functions among those followed to `depth` 2); library code (torch) is not followed."""
    fn = getattr(fn, "__func__", fn)
    if not isinstance(fn, types.FunctionType):
        return _Same(fn)
    if id(fn) in seen:
        return _Same(fn)
    seen[id(fn)] = fn
    state: list[Any] = [_Same(fn), _Same(fn.__code__), _frozen(fn.__defaults__),
                        _frozen(fn.__kwdefaults__)]  # fmt: skip
    for cell in fn.__closure__ or ():
        try:
            state.append(_frozen(cell.cell_contents))
        except ValueError:  # an empty cell
            state.append(None)
    namespace = fn.__globals__
    for name in sorted(_code_names(fn.__code__)):
        if name not in namespace:
            continue
        value = namespace[name]
        state.append((name, _frozen(value)))
        if depth < 2 and isinstance(value, types.FunctionType) and _user_code(value):
            state.append(_function_state(value, seen, depth + 1))
    return tuple(state)


def _user_code(obj: Any) -> bool:
    module = getattr(obj, "__module__", None) or ""
    return module not in ("builtins", "torch") and not module.startswith(("torch.", "typing"))


def _class_state(cls: type, seen: dict[int, Any]) -> tuple:
    """The attributes of a class and of its user-defined bases; its functions with
    `_function_state`."""
    out = []
    for base in cls.__mro__:
        if not _user_code(base):
            continue
        for name, value in vars(base).items():
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if isinstance(value, types.FunctionType):
                out.append((name, _function_state(value, seen, 0)))
            elif isinstance(value, property):
                out.append((name, _function_state(value.fget, seen, 0)))
            elif name not in ("__dict__", "__weakref__", "__doc__"):
                out.append((name, _frozen(value)))
    return tuple(out)


def _is_leaf(module: nn.Module) -> bool:
    """fx's own rule: modules from torch.nn are called, not traced through (but Sequential)."""
    name = type(module).__module__
    return name.startswith(("torch.nn", "torch.ao.nn")) and not isinstance(module, nn.Sequential)


def trace_key(model: nn.Module) -> tuple:
    """Everything a trace of `model` may depend on (see the module docstring)."""
    seen: dict[int, Any] = {}
    classes: dict[type, tuple] = {}
    hooks = nn.modules.module
    key: list[Any] = [tuple((name, tuple(getattr(hooks, name, {}))) for name in _GLOBAL_HOOKS)]
    for path, module in model.named_modules():
        cls = type(module)
        if _is_leaf(module):
            key.append((path, _Same(module), cls))
            continue
        if cls not in classes:
            classes[cls] = _class_state(cls, seen)
        key.append((path, _Same(module), cls, classes[cls], _module_state(module, seen)))
    return tuple(key)


__all__ = ["TraceCache", "trace", "trace_key"]
