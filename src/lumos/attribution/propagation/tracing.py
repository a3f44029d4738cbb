"""Tracing a model with `torch.fx`, and, on request, keeping the trace between the calls of
one explainer.

A trace costs a few milliseconds (ResNet-18: 2 ms on the CPU, 5–6% of its gradient at batch 2
on 2 threads; more on larger models, and much more than a small batch's gradient on a GPU),
and every call of a propagation method needs one. An explainer built with
``reuse_trace=True`` (``DeepLift(model, reuse_trace=True)``) keeps its last trace in a
`TraceCache` and uses it again while `trace_key` — what the trace may have read — is
unchanged:

- the module tree: every module's path, identity and class, and the plain attributes of the
  modules fx calls rather than traces through (``stride``, ``p``, ``inplace``);
- for the modules whose forward fx runs (the model itself, and modules from outside
  ``torch.nn``, and `nn.Sequential`): train/eval mode, hooks and what they run, which
  parameters and buffers exist, and their attributes (containers by value, objects such as
  configs two levels down, callables by what they run, small NumPy arrays by their bytes);
- the code that runs: the classes' attributes and functions and, for those functions and the
  user functions they call (two levels), their defaults, closure contents, the global names
  they read and the attributes they name on user modules and classes (``config.SCALE``).

Parameter and buffer *values* are never part of a trace (the graph reads them when it runs),
so training the model or editing its weights in place needs no new trace. A trace that made
tensor constants (a forward that builds a tensor from Python values) is not kept. The key
cannot see everything Python code may read (a value three objects deep inside a global, a
helper three calls down, a mutable object held in a container of more than 10,000 items):
reuse a trace only where the model's code and settings stay as they are between calls, and
build a new explainer after changing them. Without ``reuse_trace`` (the default, and always
through `lumos.explain`) every call traces afresh.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from lumos.core.errors import UnsupportedModelError

_PLAIN_ARGS = (int, float, bool, str, type(None))
_MISSING = object()


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
    effects run twice). Where both succeed, the graphs are the same. Attributes that a
    forward sets on the modules it runs through (``self.features = h``) are put back as they
    were: during a trace they hold fx's proxies."""
    _check_forward(model)
    saved = [(m, dict(m.__dict__)) for m in model.modules() if m is model or not _is_leaf(m)]
    constants: dict[str, Any] = {}

    def attempt(tracer: fx.Tracer) -> fx.Graph:
        try:
            return tracer.trace(model)
        finally:
            for module, before in saved:
                now = module.__dict__
                for key in [k for k in now if k not in before]:
                    value = now.pop(key)
                    if module is model and key.startswith("_tensor_constant"):
                        constants[key] = value
                for key, value in before.items():
                    if now.get(key, _MISSING) is not value:
                        now[key] = value

    try:
        return attempt(_Tracer(autowrap_modules=(), autowrap_functions=())), constants
    except Exception:  # e.g. math.sqrt(x.shape[-1]) on a proxy
        constants.clear()
        return attempt(_Tracer()), constants


def _check_forward(model: nn.Module) -> None:
    """fx traces the forward of the model's *class*: a different forward set on the instance
    (``model.forward = ...``, as some libraries wrap it) would be silently ignored, so it is
    refused."""
    forward = model.__dict__.get("forward")
    if forward is None:
        return
    if getattr(forward, "__self__", None) is model and (
        getattr(forward, "__func__", None) is getattr(type(model), "forward", None)
    ):
        return  # the class's own forward, bound on the instance
    raise UnsupportedModelError(
        "The model's forward is replaced on the instance (model.forward = ...); propagation "
        "methods trace the forward of the model's class, so they would explain another "
        "function than model(x) runs. Define that forward in a subclass, or wrap the model "
        "in an nn.Module whose forward calls it."
    )


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
_PLAIN_TYPES = frozenset(_PLAIN)
_LIMIT = 10_000  # items of a container taken by value (a longer one: its identity and length)
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
_OPAQUE = (nn.Module, type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType)


def _user_code(obj: Any) -> bool:
    """Whether an object (a function, class or module) comes from outside torch and Python."""
    name = getattr(obj, "__module__", None) if not isinstance(obj, types.ModuleType) else None
    name = name or getattr(obj, "__name__", "") or ""
    root = name.split(".")[0]
    return root not in ("builtins", "torch", "typing", "functools", "math", "operator")


class _Key:
    """Builds the key of one model; shared functions are described once, at the shallowest
    depth they are met."""

    def __init__(self) -> None:
        self.functions: dict[int, int] = {}  # id → the depth it was described at
        self.classes: dict[type, tuple] = {}

    def frozen(self, value: Any, depth: int = 0) -> Any:
        """A comparable snapshot: plain values and containers of them by value, tensors by
        identity, shape and dtype, small arrays by their bytes, callables by what they run,
        other objects by identity and (two levels deep) their attributes."""
        kind = type(value)
        if kind in _PLAIN:
            return value
        if depth > 4:
            return _Same(value)
        if kind in (tuple, list, set, frozenset) or isinstance(value, dict):
            if len(value) > _LIMIT:
                return (kind, _Same(value), len(value))
            if isinstance(value, dict):
                items = tuple(
                    (self.frozen(k, depth + 1), self.frozen(v, depth + 1)) for k, v in value.items()
                )
                return (kind, items)
            if kind is set or kind is frozenset:
                return (kind, frozenset(v for v in value if type(v) in _PLAIN), _Same(value))
            return (kind, tuple(self.frozen(v, depth + 1) for v in value))
        if isinstance(value, torch.Tensor):
            return (_Same(value), tuple(value.shape), value.dtype, value.device)
        nbytes = getattr(value, "nbytes", None)
        if type(nbytes) is int and nbytes <= 1 << 20 and callable(getattr(value, "tobytes", None)):
            return (_Same(value), value.tobytes())  # a NumPy array or scalar, by value
        if isinstance(value, (types.FunctionType, types.MethodType, functools.partial)):
            return self.function(value, depth)
        if isinstance(value, _OPAQUE) or depth > 2:
            return _Same(value)
        state = self.attributes(value, depth + 1)
        if callable(value):
            state = (state, self.function(type(value).__call__, depth))
        return (_Same(value), state)

    def attributes(self, value: Any, depth: int) -> Any:
        """An object's attributes (its `__dict__`, or its `__slots__`)."""
        attributes = getattr(value, "__dict__", None)
        if isinstance(attributes, dict):
            return self.frozen(attributes, depth)
        slots = [n for c in type(value).__mro__ for n in getattr(c, "__slots__", ())]
        return tuple((n, self.frozen(getattr(value, n, None), depth)) for n in slots)

    def function(self, fn: Any, depth: int) -> Any:
        """What a callable runs: a function's code, defaults, closure contents, and the globals
        its code names — with the attributes it names on those that are user modules or
        classes, and the user functions among them followed to depth 2; a bound method's
        object; a partial's function and arguments. Library code is not followed."""
        if isinstance(fn, functools.partial):
            return ("partial", self.function(fn.func, depth), self.frozen(fn.args, depth + 1),
                    self.frozen(fn.keywords, depth + 1))  # fmt: skip
        if isinstance(fn, types.MethodType):
            owner = fn.__self__
            held = _Same(owner) if isinstance(owner, _OPAQUE) else self.frozen(owner, depth + 1)
            return ("method", held, self.function(fn.__func__, depth))
        if not isinstance(fn, types.FunctionType) or not _user_code(fn):
            return _Same(fn)
        if self.functions.get(id(fn), depth + 1) <= depth:
            return _Same(fn)
        self.functions[id(fn)] = depth
        state: list[Any] = [_Same(fn), _Same(fn.__code__), self.frozen(fn.__defaults__, 1),
                            self.frozen(fn.__kwdefaults__, 1)]  # fmt: skip
        for cell in fn.__closure__ or ():
            try:
                state.append(self.frozen(cell.cell_contents, 1))
            except ValueError:  # an empty cell
                state.append(None)
        names = _code_names(fn.__code__)
        namespace = fn.__globals__
        for name in sorted(names):
            if name not in namespace:
                continue
            value = namespace[name]
            state.append((name, self.frozen(value)))
            if isinstance(value, types.FunctionType) and depth < 2:
                state.append(self.function(value, depth + 1))
            elif isinstance(value, (type, types.ModuleType)) and _user_code(value):
                state.append(self.namespace(value, names, depth + 1))
        return tuple(state)

    def namespace(self, owner: Any, names: set[str], depth: int) -> tuple:
        """The attributes of a user module or class that a code names (``config.SCALE``)."""
        out = []
        for name in sorted(names):
            if isinstance(owner, type):
                found = next((vars(c)[name] for c in owner.__mro__ if name in vars(c)), _MISSING)
            else:
                found = vars(owner).get(name, _MISSING)
            if found is _MISSING:
                continue
            if isinstance(found, (staticmethod, classmethod)):
                found = found.__func__
            if isinstance(found, types.FunctionType):
                out.append((name, self.function(found, depth) if depth <= 2 else _Same(found)))
            else:
                out.append((name, self.frozen(found, 1)))
        return tuple(out)

    def cls(self, cls: type) -> tuple:
        """The attributes of a class and of its user-defined bases; its functions with
        `function`."""
        if cls not in self.classes:
            out = []
            for base in cls.__mro__:
                if not _user_code(base):
                    continue
                for name, value in vars(base).items():
                    if isinstance(value, (staticmethod, classmethod)):
                        value = value.__func__
                    if isinstance(value, property):
                        value = value.fget
                    if isinstance(value, types.FunctionType):
                        out.append((name, self.function(value, 0)))
                    elif name not in ("__dict__", "__weakref__", "__doc__"):
                        out.append((name, self.frozen(value, 1)))
            self.classes[cls] = tuple(out)
        return self.classes[cls]

    def module(self, module: nn.Module) -> tuple:
        """A traced-through module's own state: mode, hooks (and what they run), parameter and
        buffer names, attributes."""
        out = []
        for name, value in module.__dict__.items():
            if name in _SKIPPED:
                continue
            if name in ("_parameters", "_buffers"):
                out.append((name, tuple((k, v is None) for k, v in value.items())))
            elif name in _HOOKS:
                out.append((name, self.hooks(value)))
            else:
                out.append((name, self.frozen(value)))
        return tuple(out)

    def hooks(self, hooks: dict) -> tuple:
        return tuple((k, self.function(h, 0)) for k, h in hooks.items())


def _code_names(code: types.CodeType) -> set[str]:
    """The global (and attribute) names a code object and the functions nested in it read."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _leaf(module: nn.Module) -> tuple:
    """A module fx calls rather than traces through: what a parent's forward may read of it
    (its mode and plain attributes: `stride`, `p`, `inplace`)."""
    plain = _PLAIN_TYPES
    return tuple([
        (k, v) for k, v in module.__dict__.items()
        if type(v) in plain or (type(v) is tuple and all(type(i) in plain for i in v))
    ])  # fmt: skip


_LEAF_RULE = fx.Tracer()


def _is_leaf(module: nn.Module) -> bool:
    """Whether fx calls the module rather than tracing through it (fx's own rule, which
    `_Tracer` keeps: modules from torch.nn, but Sequential)."""
    return _LEAF_RULE.is_leaf_module(module, "")


def trace_key(model: nn.Module) -> tuple:
    """Everything a trace of `model` may read (see the module docstring)."""
    key = _Key()
    hooks = nn.modules.module
    parts: list[Any] = [tuple((n, key.hooks(getattr(hooks, n, {}))) for n in _GLOBAL_HOOKS)]
    for path, module in model.named_modules():
        cls = type(module)
        if module is not model and _is_leaf(module):
            parts.append((path, _Same(module), cls, _leaf(module)))
        else:
            parts.append((path, _Same(module), cls, key.cls(cls), key.module(module)))
    return tuple(parts)


__all__ = ["TraceCache", "trace", "trace_key"]
