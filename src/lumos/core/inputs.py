"""One place that turns a tensor, a tuple of tensors or a dict of keyword tensors into a flat tuple
of batch-first tensors, and turns per-input results back into the user's structure."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lumos.core.errors import InputError

InputsLike = torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Structure:
    """How the user passed inputs: ``"tensor"``, ``"tuple"`` (or list) or ``"dict"`` with keys."""

    kind: str
    keys: tuple[str, ...] = ()

    def restore(self, tensors: Sequence[Any]) -> Any:
        """Put per-input results back into the structure the inputs came in."""
        if self.kind == "tensor":
            return tensors[0]
        if self.kind == "dict":
            return dict(zip(self.keys, tensors))
        return tuple(tensors)

    def flatten(self, value: Any, what: str = "value") -> tuple[Any, ...]:
        """The reverse of `restore` for a user-supplied value in the same structure (baselines)."""
        if self.kind == "tensor":
            return (value,)
        if self.kind == "dict":
            if not isinstance(value, Mapping) or set(value) != set(self.keys):
                raise InputError(
                    f"{what} must be a dict with the same keys as the inputs {list(self.keys)}."
                )
            return tuple(value[k] for k in self.keys)
        if not isinstance(value, (tuple, list)) or len(value) != len(self.keys):
            raise InputError(
                f"{what} must be a tuple of {len(self.keys)} entries, one per input tensor."
            )
        return tuple(value)

    def to_json(self) -> dict:
        return {"kind": self.kind, "keys": list(self.keys)}

    @classmethod
    def from_json(cls, data: Mapping) -> Structure:
        return cls(data["kind"], tuple(data["keys"]))


def as_tensor(value: Any, what: str = "inputs") -> torch.Tensor:
    """A tensor from a tensor or a NumPy array; anything else is an `InputError`."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    raise InputError(
        f"{what} must be a torch.Tensor (or a NumPy array), got {type(value).__name__}."
    )


def flatten_inputs(
    inputs: InputsLike, what: str = "inputs"
) -> tuple[tuple[torch.Tensor, ...], Structure]:
    """Normalize `inputs` to a tuple of tensors sharing the batch size, plus its `Structure`;
    `what` names them in error messages (e.g. ``attributions``)."""
    if isinstance(inputs, (torch.Tensor, np.ndarray)):
        tensors, structure = (as_tensor(inputs, what),), Structure("tensor", ("input",))
    elif isinstance(inputs, Mapping):
        if not inputs:
            raise InputError(f"{what} is an empty dict; pass at least one tensor.")
        keys = tuple(str(k) for k in inputs)
        tensors = tuple(as_tensor(v, f"{what}[{k!r}]") for k, v in inputs.items())
        structure = Structure("dict", keys)
    elif isinstance(inputs, (tuple, list)):
        if not inputs:
            raise InputError(f"{what} is an empty sequence; pass at least one tensor.")
        tensors = tuple(as_tensor(v, f"{what}[{i}]") for i, v in enumerate(inputs))
        structure = Structure("tuple", tuple(str(i) for i in range(len(tensors))))
    else:
        raise InputError(
            f"{what} must be a tensor, a tuple of tensors or a dict of keyword tensors "
            f"(batch first), got {type(inputs).__name__}."
        )
    validate_inputs(tensors, structure, what)
    return tensors, structure


def all_finite(t: torch.Tensor) -> bool:
    """True when a tensor holds no NaN or inf (non-float tensors always do).

    One reduction: a finite sum means every entry is finite; only a non-finite sum (a NaN or
    inf inside, or an overflow of finite values) pays for the elementwise check.
    """
    if not t.is_floating_point() and not t.is_complex():
        return True
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def validate_inputs(
    tensors: Sequence[torch.Tensor], structure: Structure, what: str = "inputs"
) -> None:
    """Batch-first tensors of one batch size, without NaN or inf."""
    names = [input_name(structure, i, what) for i in range(len(tensors))]
    for name, t in zip(names, tensors):
        if t.dim() == 0:
            raise InputError(
                f"{name} is a scalar; inputs are batch-first, e.g. x.unsqueeze(0) for one example."
            )
        if t.shape[0] == 0:
            raise InputError(f"{name} has an empty batch (shape {tuple(t.shape)}).")
        if not all_finite(t):
            raise InputError(f"{name} contains NaN or inf values; clean the data first.")
    sizes = {int(t.shape[0]) for t in tensors}
    if len(sizes) > 1:
        shapes = ", ".join(f"{n}: {tuple(t.shape)}" for n, t in zip(names, tensors))
        raise InputError(f"{what} disagree on the batch size (first dimension): {shapes}.")


def require_float(tensors: Sequence[torch.Tensor], structure: Structure, method: str) -> None:
    """Gradient methods need floating-point inputs; token ids go through an embedding layer."""
    for i, t in enumerate(tensors):
        if not t.is_floating_point():
            raise InputError(
                f"{method} differentiates the output with respect to the inputs, but "
                f"{input_name(structure, i)} has dtype {t.dtype}. Pass floating-point inputs, or "
                "for token ids explain the embedding layer with "
                "method='layer_integrated_gradients', layer='<embedding module path>'."
            )


def call_model(model: Callable, tensors: Sequence[torch.Tensor], structure: Structure) -> Any:
    """Call `model` the way the user's inputs imply: model(x), model(*xs) or model(**kw)."""
    if structure.kind == "dict":
        return model(**dict(zip(structure.keys, tensors)))
    return model(*tensors)


def batch_size_of(tensors: Sequence[torch.Tensor]) -> int:
    return int(tensors[0].shape[0])


def input_name(structure: Structure, i: int, what: str = "inputs") -> str:
    """How messages name tensor `i`: ``inputs``, ``inputs[1]`` or ``inputs['image']``."""
    if structure.kind == "tensor":
        return what
    if structure.kind == "dict":
        return f"{what}[{structure.keys[i]!r}]"
    return f"{what}[{i}]"
