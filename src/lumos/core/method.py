"""`Method`: the base class of every attribution method, and the shared pipeline behind it.

A method's constructor takes the model and its configuration (`batch_size` and method options);
`explain(inputs, target, **call_options)` takes the data. The pipeline normalizes inputs, moves
them to the model's device, runs one forward pass for the outputs and the targets, guards the
model's state, times the work and wraps everything into an `Explanation`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from lumos.core.batching import check_batch_size as _check_batch_size
from lumos.core.batching import chunks
from lumos.core.errors import GradientError, InputError, LumosError
from lumos.core.explanation import Explanation
from lumos.core.inputs import InputsLike, Structure, call_model, flatten_inputs, require_float
from lumos.core.model import check_model, model_device, preserved
from lumos.core.targets import Target, TargetLike, output_tensor, resolve_target


class Context:
    """What `attribute` receives: inputs on the model's device, the resolved target, and the
    model's outputs on the inputs (computed on first use when not given)."""

    def __init__(
        self,
        method: Method,
        inputs: tuple[torch.Tensor, ...],
        structure: Structure,
        target: Target,
        outputs: Any = None,
    ) -> None:
        self.method, self.inputs, self.structure, self.target = method, inputs, structure, target
        self.device = inputs[0].device
        self._outputs = outputs

    @property
    def n(self) -> int:
        return int(self.inputs[0].shape[0])

    @property
    def outputs(self) -> Any:
        if self._outputs is None:
            self._outputs = self.method.forward(self.inputs, self.structure)
        return self._outputs

    def target_values(self) -> torch.Tensor:
        """The target's value at every input example."""
        return self.target.select(self.outputs, torch.arange(self.n, device=self.device))


@dataclass
class Attribution:
    """What `compute` returns: attributions (one tensor per input unless `structure` says
    otherwise), the per-example identity error, and method-specific extras."""

    attributions: tuple[torch.Tensor, ...]
    delta: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    structure: Structure | None = None


class Method:
    """Base class of attribution methods.

    Shared options:
        batch_size: the maximum number of rows in one forward/backward pass; None runs each
            step in one pass. Results do not depend on it (up to float rounding).
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, model: Callable, *, batch_size: int | None = None) -> None:
        check_model(model)
        self.model = model
        self.batch_size = _check_batch_size(batch_size)

    def explain(self, inputs: InputsLike, target: TargetLike = "predicted") -> Explanation:
        """Explain `target` of the model at `inputs`."""
        return self._run(inputs, target)

    def explain_targets(
        self, inputs: InputsLike, targets: Sequence[TargetLike], **call_options: Any
    ) -> list[Explanation]:
        """Explain several targets for the same inputs in one batched run.

        Every (target, example) pair becomes a row of one call, so the model sees full batches
        (bounded by `batch_size`) instead of one pass per target. Returns one Explanation per
        target, each as `explain(inputs, target)` would give it.
        """
        xs, structure = flatten_inputs(inputs)
        n, k = int(xs[0].shape[0]), len(targets)
        if k == 0:
            raise InputError("targets is empty; pass at least one target.")
        device = model_device(self.model, xs[0].device)
        with preserved(self.model):
            outputs = self.forward(tuple(x.detach().to(device) for x in xs), structure)
        resolved = [resolve_target(t, outputs, n) for t in targets]
        if any(r.is_callable for r in resolved) or any(r.indices is None for r in resolved):
            return [self.explain(inputs, t, **call_options) for t in targets]
        stacked = torch.cat([r.indices for r in resolved])
        repeated = structure.restore([x.repeat(k, *([1] * (x.dim() - 1))) for x in xs])
        joint = self.explain(repeated, stacked, **call_options)
        return [joint.select(slice(i * n, (i + 1) * n), xs) for i in range(k)]

    def attribute(self, ctx: Context, **call_options: Any) -> Attribution:
        """The method itself: attributions for the examples in `ctx` (subclasses implement)."""
        raise NotImplementedError

    def _config(self) -> dict[str, Any]:
        """The constructor options recorded in the Explanation (overridden to add more)."""
        return {"batch_size": self.batch_size}

    # -- the pipeline ----------------------------------------------------------------------
    def _run(self, inputs: InputsLike, target: TargetLike, **call_options: Any) -> Explanation:
        """Normalize, guard, resolve the target, call `attribute`, and wrap the result."""
        start = time.perf_counter()
        xs, structure = flatten_inputs(inputs)
        if "gradients" in self.needs:
            require_float(xs, structure, self.name)
        device = model_device(self.model, xs[0].device)
        xs_model = tuple(x.detach().to(device) for x in xs)
        with preserved(self.model):
            outputs = self.forward(xs_model, structure)
            resolved = resolve_target(target, outputs, int(xs[0].shape[0]))
            ready = time.perf_counter()
            result = self.attribute(
                Context(self, xs_model, structure, resolved, outputs), **call_options
            )
        attributions = result.attributions
        if result.structure is None:
            attributions = tuple(
                a.detach().to(device=x.device, dtype=x.dtype if x.is_floating_point() else None)
                for a, x in zip(attributions, xs)
            )
        else:
            attributions = tuple(a.detach().to(xs[0].device) for a in attributions)
        end = time.perf_counter()
        try:
            out_tensor = output_tensor(outputs).detach()
        except LumosError:
            out_tensor = None
        return Explanation(
            attributions_flat=attributions,
            inputs_flat=tuple(x.detach() for x in xs),
            structure=structure,
            attribution_structure=result.structure,
            method=self.name,
            options={**self._config(), **call_options},
            targets=resolved.for_examples(len(xs[0])),
            outputs=out_tensor,
            delta=None if result.delta is None else result.delta.detach().cpu(),
            timing={"forward": ready - start, "attribution": end - ready, "total": end - start},
            extras=result.extras,
        )

    def forward(
        self, xs: Sequence[torch.Tensor], structure: Structure, *, grad: bool = False
    ) -> Any:
        """The model's outputs on `xs`, in chunks of `batch_size` rows, concatenated."""
        parts = []
        with torch.set_grad_enabled(grad):
            for s in chunks(int(xs[0].shape[0]), self.batch_size):
                parts.append(self.call([x[s] for x in xs], structure))
        return parts[0] if len(parts) == 1 else _concat(parts)

    def call(self, xs: Sequence[torch.Tensor], structure: Structure) -> Any:
        """One model call; a failure inside the model says which input shapes caused it."""
        try:
            return call_model(self.model, xs, structure)
        except LumosError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            shapes = ", ".join(f"{tuple(x.shape)} {x.dtype}" for x in xs)
            raise InputError(
                f"The model failed on inputs of shape {shapes}: {exc}. Check that the inputs "
                "are batch-first with the shape and dtype the model expects."
            ) from exc

    def input_gradients(
        self,
        make_rows: Callable[[slice], Sequence[torch.Tensor]],
        n_rows: int,
        example_index: torch.Tensor,
        target: Target,
        structure: Structure,
    ) -> Iterator[tuple[slice, tuple[torch.Tensor, ...], torch.Tensor]]:
        """Gradients of the target w.r.t. generated rows, chunk by chunk.

        `make_rows(s)` builds the rows of slice `s` (e.g. interpolated or noisy inputs); row r
        belongs to example `example_index[r]`. Yields `(slice, gradients, target values)`.
        Rows are independent, so the sum of the per-row targets has the per-row gradients.
        """
        for s in chunks(n_rows, self.batch_size):
            rows = tuple(r.detach().requires_grad_(True) for r in make_rows(s))
            with torch.enable_grad():
                output = self.call(rows, structure)
                values = target.select(output, example_index[s])
                if not values.requires_grad:
                    raise GradientError(
                        f"{self.name} needs gradients, but the model output does not depend "
                        "differentiably on the inputs (does the model detach, use NumPy, round "
                        "or run under torch.no_grad?). Use a black-box method such as "
                        "'occlusion' or 'kernel_shap' instead."
                    )
                grads = torch.autograd.grad(values.sum(), rows, allow_unused=True)
            if all(g is None for g in grads):
                raise GradientError(
                    f"{self.name}: the target does not depend on any input tensor; check the "
                    "target and the model's forward."
                )
            grads = tuple(torch.zeros_like(r) if g is None else g for r, g in zip(rows, grads))
            yield s, grads, values.detach()


def _concat(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, (tuple, list)):
        return type(first)(_concat([p[i] for p in parts]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _concat([p[k] for p in parts]) for k in first}
    logits = getattr(first, "logits", None)
    if isinstance(logits, torch.Tensor):
        return torch.cat([p.logits for p in parts])
    raise InputError(
        f"Cannot join model outputs of type {type(first).__name__} across batches; "
        "pass batch_size=None or make the model return tensors."
    )


def example_rows(n_examples: int, repeats: int, device: torch.device) -> torch.Tensor:
    """The example index of each row when every example is repeated `repeats` times
    step-major: rows [k*n, (k+1)*n) are repeat k of examples 0..n-1."""
    return torch.arange(n_examples, device=device).repeat(repeats)
