"""The error hierarchy: every problem a user can cause is a `LumosError` that says what is wrong
and how to fix it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LumosError(Exception):
    """Base class of every error lumos raises on purpose."""


class InputError(LumosError, ValueError):
    """Inputs of the wrong type, shape, dtype, or with NaN/inf values."""


class BaselineError(InputError):
    """Baselines that cannot be broadcast to the inputs."""


class TargetError(LumosError, ValueError):
    """A target that does not fit the model's output."""


class GradientError(LumosError, RuntimeError):
    """The model output does not depend differentiably on the inputs."""


class UnsupportedModelError(LumosError, RuntimeError):
    """A construct in the model that a method cannot handle correctly."""


class ModelCallError(LumosError, RuntimeError):
    """The model raised an exception while lumos called it."""


class OutOfMemory(LumosError, MemoryError):
    """A pass did not fit in memory; a smaller `batch_size` bounds it."""


class ModelLoadError(LumosError, RuntimeError):
    """A model could not be loaded (or loading it would be unsafe)."""


class DependencyError(LumosError, ImportError):
    """An optional dependency is missing."""


class UnknownNameError(LumosError, LookupError):
    """An unknown method, layer, option, metric or dataset name."""

    def __str__(self) -> str:  # LookupError would quote the message like a KeyError
        return str(self.args[0]) if self.args else ""


def suggest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """A ' Did you mean ...?' suffix listing the closest names, or '' when none is close."""
    close = difflib.get_close_matches(str(name), list(choices), n=n, cutoff=0.5)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"


def unknown_name(kind: str, name: str, choices: Iterable[str]) -> UnknownNameError:
    """An `UnknownNameError` for `name` with the closest valid names and where to list them all."""
    choices = sorted(choices)
    hint = suggest(name, choices)
    listing = ", ".join(choices[:12]) + (", ..." if len(choices) > 12 else "")
    return UnknownNameError(f"Unknown {kind} {name!r}.{hint} Valid {kind}s: {listing}.")


def require(module: str, extra: str | None = None):
    """Import an optional dependency or raise a `DependencyError` saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        how = f"pip install 'lumos[{extra}]'" if extra else f"pip install {module.split('.')[0]}"
        raise DependencyError(f"This feature needs the optional package {module!r}: {how}") from exc
