"""Targets: which scalar of the model's output an explanation explains, one per example.

A target may be an int (the same class for every example), a per-example sequence or tensor of
ints, ``"predicted"`` (the argmax of the output on the inputs), ``None`` for models with one
output per example, or a callable ``output -> (n,)``. A callable may take a second argument, the
index of the original example of every row, which is what per-example segmentation masks or
detection boxes need when a method evaluates many perturbed rows per example.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from lumos.core.errors import TargetError

TargetLike = int | str | Sequence[int] | torch.Tensor | Callable | None


def output_tensor(output: Any) -> torch.Tensor:
    """The tensor inside a model's output: the output itself, or its ``logits`` (HF-style)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, np.ndarray):
        return torch.from_numpy(output)
    raise TargetError(
        f"The model returned {type(output).__name__}, not a tensor. Pass a callable target that "
        "picks one scalar per example from it, e.g. target=lambda out: out[0][:, 3]."
    )


class Target:
    """A resolved target: `select(outputs, example_index)` gives one scalar per row."""

    def __init__(
        self,
        indices: torch.Tensor | None = None,
        fn: Callable | None = None,
        example_map: torch.Tensor | None = None,
    ) -> None:
        self.indices = indices
        self.fn = fn
        self._fn_takes_index = fn is not None and _n_positional(fn) >= 2
        self._example_map = example_map
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def _indices_on(self, device: torch.device) -> torch.Tensor:
        """`indices` on `device`, copied once: a copy from host memory waits for the queue,
        which would stall every chunk of a method's model calls."""
        if self.indices.device == device:
            return self.indices
        if device not in self._on_device:
            self._on_device[device] = self.indices.to(device)
        return self._on_device[device]

    @property
    def is_callable(self) -> bool:
        return self.fn is not None

    def select(self, output: Any, example_index: torch.Tensor) -> torch.Tensor:
        """One scalar per row of `output`; row r belongs to example `example_index[r]`."""
        if self.fn is not None:
            if self._fn_takes_index:
                index = example_index
                if self._example_map is not None:
                    index = self._example_map.to(example_index.device)[example_index]
                value = self.fn(output, index)
            else:
                value = self.fn(output)
            return _check_callable_result(value, len(example_index))
        out = check_batch(output_tensor(output), len(example_index))
        if self.indices is None:
            return out.reshape(out.shape[0], -1)[:, 0] if out.dim() > 1 else out
        idx = self._indices_on(out.device)[example_index.to(out.device)]
        return out.gather(1, idx.unsqueeze(1)).squeeze(1)

    def expand(self, example_index: torch.Tensor) -> Target:
        """The target for a new batch whose example j is the old example `example_index[j]`."""
        indices = None if self.indices is None else self.indices[example_index.to("cpu")]
        mapping = example_index.cpu()
        if self._example_map is not None:
            mapping = self._example_map[mapping]
        return Target(indices, self.fn, mapping if self.fn is not None else None)

    def for_examples(self, n: int) -> torch.Tensor | None:
        """The class index per example (for the Explanation), or None for callable/scalar."""
        return None if self.indices is None else self.indices[:n].clone()


def resolve_target(target: TargetLike, outputs: Any, n_examples: int) -> Target:
    """Check `target` against the model's `outputs` on the inputs and resolve it to a `Target`."""
    if callable(target) and not isinstance(target, (torch.Tensor, np.ndarray)):
        return Target(fn=target)
    out = check_batch(output_tensor(outputs), n_examples)
    scalar_output = out.dim() == 1 or (out.dim() == 2 and out.shape[1] == 1)
    if out.dim() > 2:
        raise TargetError(
            f"The model output has shape {tuple(out.shape)}; an int target needs (batch, classes). "
            "For segmentation or detection pass a callable target, e.g. "
            "lumos.targets.segmentation(class_index, mask)."
        )
    n_classes = 1 if out.dim() == 1 else int(out.shape[1])
    if target is None or (isinstance(target, str) and target == "predicted" and scalar_output):
        if not scalar_output:
            raise TargetError(
                f"target=None needs a model with one output per example, but the output has "
                f"{n_classes} columns. Pass target='predicted', a class index, or one per example."
            )
        return Target(indices=None)
    if isinstance(target, str):
        if target != "predicted":
            raise TargetError(
                f"Unknown target {target!r}: use 'predicted', an int, a sequence of ints, "
                "or a callable."
            )
        return Target(indices=out.detach().argmax(dim=1).cpu())
    indices = _as_index_tensor(target, n_examples)
    if indices.numel() and (indices.min() < 0 or indices.max() >= n_classes):
        bad = indices[(indices < 0) | (indices >= n_classes)][0].item()
        raise TargetError(
            f"Target {bad} is out of range for a model with {n_classes} outputs "
            f"(valid: 0..{n_classes - 1})."
        )
    if out.dim() == 1:
        return Target(indices=None)
    return Target(indices=indices)


def check_batch(out: torch.Tensor, n_rows: int) -> torch.Tensor:
    """The model must return one row of outputs per input row."""
    if out.dim() == 0 or out.shape[0] != n_rows:
        raise TargetError(
            f"The model returned shape {tuple(out.shape)} for a batch of {n_rows}; it must return "
            "one output row per example (batch first). A model that reduces over the batch "
            "(e.g. .sum() or .mean(0)) cannot be explained per example; a single example needs "
            "a batch axis: x.unsqueeze(0)."
        )
    return out


def _as_index_tensor(target: Any, n_examples: int) -> torch.Tensor:
    if isinstance(target, (bool, np.bool_)):
        raise TargetError(f"target must be an int class index, got a bool ({target}).")
    if isinstance(target, (int, np.integer)):
        return torch.full((n_examples,), int(target), dtype=torch.long)
    if isinstance(target, np.ndarray):
        target = torch.from_numpy(target)
    if isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TargetError(
                f"target tensors must hold integer class indices, got {target.dtype}."
            )
        if target.dim() == 0:
            return torch.full((n_examples,), int(target.item()), dtype=torch.long)
        values = target.detach().cpu().long().reshape(-1)
    elif isinstance(target, (list, tuple)):
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in target):
            raise TargetError("A target sequence must hold one int class index per example.")
        values = torch.tensor([int(t) for t in target], dtype=torch.long)
    else:
        raise TargetError(
            f"target must be an int, a sequence of ints, a tensor, 'predicted', None or a "
            f"callable, got {type(target).__name__}."
        )
    if values.numel() != n_examples:
        raise TargetError(
            f"Got {values.numel()} targets for {n_examples} examples; pass one per example or a "
            "single int."
        )
    return values


def _check_callable_result(value: Any, n_rows: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TargetError(
            f"A callable target must return a tensor of one scalar per example, got "
            f"{type(value).__name__}."
        )
    if value.dim() == 2 and value.shape[1] == 1:
        value = value[:, 0]
    if value.dim() != 1 or value.shape[0] != n_rows:
        raise TargetError(
            f"A callable target must return shape ({n_rows},), one scalar per example, got "
            f"{tuple(value.shape)}. Reduce the output per example, e.g. out[:, c].sum() -> "
            "out[:, c].flatten(1).sum(1)."
        )
    return value


def _n_positional(fn: Callable) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 1
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params):
        return 2
    return sum(1 for p in params if p.kind in kinds)


def segmentation(class_index: int, mask: torch.Tensor | None = None) -> Callable:
    """Target for segmentation models: the sum of class `class_index`'s logits over `mask`.

    `mask` is ``(H, W)`` for all examples or ``(B, H, W)`` per example (None: the whole image).
    """

    def select(output: torch.Tensor, example_index: torch.Tensor) -> torch.Tensor:
        scores = output_tensor(output)[:, class_index]
        if mask is None:
            return scores.flatten(1).sum(1)
        m = mask.to(scores.device, scores.dtype)
        m = m[example_index] if m.dim() == 3 else m.expand_as(scores)
        return (scores * m).flatten(1).sum(1)

    return select


def detection(box_index: int, class_index: int, score: Callable | None = None) -> Callable:
    """Target for detection models: the score of box `box_index` for class `class_index`.

    By default the output is taken as ``(B, n_boxes, n_classes)`` scores; pass `score` to read
    another layout: ``score(output) -> (B, n_boxes, n_classes)``.
    """

    def select(output: Any) -> torch.Tensor:
        scores = score(output) if score is not None else output_tensor(output)
        return scores[:, box_index, class_index]

    return select
