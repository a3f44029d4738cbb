"""`Method`: the base class of every attribution method, and the shared pipeline behind it.

A method's constructor takes the model and its configuration (`batch_size` and method options);
`explain(inputs, target, **call_options)` takes the data. The pipeline normalizes inputs, moves
them to the model's device, runs one forward pass for the outputs and the targets, guards the
model's state, times the work and wraps everything into an `Explanation`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from lumos.core.batching import check_batch_size as _check_batch_size
from lumos.core.batching import chunks
from lumos.core.errors import (
    GradientError,
    InputError,
    LumosError,
    ModelCallError,
    OutOfMemory,
)
from lumos.core.explanation import Explanation
from lumos.core.inputs import (
    InputsLike,
    Structure,
    all_finite,
    call_model,
    flatten_inputs,
    require_float,
)
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
        self.live: Live | None = None

    def take_live(self, method: Method) -> Live | None:
        """The pipeline's forward pass with gradients on the inputs, if it ran one for `method`
        (see `Method.single_pass`); it is handed out once, to the method's first pass."""
        if self.live is None or method is not self.method:
            return None
        live, self.live = self.live, None
        return live

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
class Live:
    """A forward pass on the inputs themselves that kept its autograd graph: `rows` are the
    inputs (requiring grad), `output` the model's output, `state` what the method's
    `live_forward` needs again (e.g. a traced graph)."""

    rows: tuple[torch.Tensor, ...]
    output: Any
    state: Any = None


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
        batch_size: the maximum number of rows in one forward/backward pass. None runs each
            gradient step in one pass, and sends the rows a black-box method generates in
            calls sized for the device (`lumos.core.batching.rows_per_call`). Results do not
            depend on it (up to float rounding).
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    #: True for methods whose own first pass is a forward pass on the inputs themselves
    #: (saliency, LRP, CAM methods with a given layer): when the inputs fit in one pass, the
    #: pipeline runs that forward (`live_forward`, with gradients where the method needs them)
    #: and takes the outputs and targets from it, instead of paying for a separate forward.
    #: An instance may set it where it depends on the options.
    single_pass: bool = False

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
        """Explain several targets for the same inputs, sharing the work that can be shared.

        Returns one Explanation per target, each equal to `explain(inputs, target)`. All methods
        share the forward pass on the inputs; gradient methods also share every forward pass on
        generated rows (one forward, one backward per target).
        """
        if len(targets) == 0:
            raise InputError("targets is empty; pass at least one target.")
        return self._run_many(inputs, list(targets), call_options)

    def attribute(self, ctx: Context, **call_options: Any) -> Attribution:
        """The method itself: attributions for the examples in `ctx` (subclasses implement)."""
        raise NotImplementedError

    def attribute_targets(
        self, ctx: Context, targets: Sequence[Target], **call_options: Any
    ) -> list[Attribution]:
        """`attribute` for several targets; overridden where more work can be shared."""
        results = []
        for target in targets:
            ctx.target = target
            results.append(self.attribute(ctx, **call_options))
        return results

    def _config(self) -> dict[str, Any]:
        """The constructor options recorded in the Explanation (overridden to add more)."""
        return {"batch_size": self.batch_size}

    # -- the pipeline ----------------------------------------------------------------------
    def _run(self, inputs: InputsLike, target: TargetLike, **call_options: Any) -> Explanation:
        """Normalize, guard, resolve the target, call `attribute`, and wrap the result."""
        return self._run_many(inputs, [target], call_options)[0]

    def _run_many(
        self, inputs: InputsLike, targets: list[TargetLike], call_options: dict[str, Any]
    ) -> list[Explanation]:
        start = time.perf_counter()
        xs, structure = flatten_inputs(inputs)
        if "gradients" in self.needs:
            require_float(xs, structure, self.name)
        if torch.is_inference_mode_enabled():
            raise GradientError(
                "lumos was called under torch.inference_mode(), whose tensors cannot take part "
                "in autograd; call it outside that block (torch.no_grad() is fine)."
            )
        n = int(xs[0].shape[0])
        device = model_device(self.model, xs[0].device)
        xs_model = tuple(x.detach().to(device) for x in xs)
        fused = self.single_pass and (self.batch_size is None or n <= self.batch_size)
        with preserved(self.model):
            live = self.live_forward(xs_model, structure, **call_options) if fused else None
            if live is None:
                outputs = self.forward(xs_model, structure)
            else:
                outputs = live.output.detach() if torch.is_tensor(live.output) else live.output
            _check_finite_outputs(outputs)
            with torch.no_grad():
                resolved = [resolve_target(t, outputs, n) for t in targets]
            ready = time.perf_counter()
            ctx = Context(self, xs_model, structure, resolved[0], outputs)
            ctx.live = live
            if len(resolved) == 1:
                results = [self.attribute(ctx, **call_options)]
            else:
                results = self.attribute_targets(ctx, resolved, **call_options)
        for result in results:
            if any(not all_finite(a) for a in result.attributions):
                raise LumosError(
                    f"{self.name} produced NaN or inf attributions (a numerical overflow or a "
                    "division by zero inside the method); try float64 inputs and model, or "
                    "another method, and please report it."
                )
        end = time.perf_counter()
        try:
            out_tensor = output_tensor(outputs).detach()
        except LumosError:
            out_tensor = None
        timing = {"forward": ready - start, "attribution": end - ready, "total": end - start}
        return [
            Explanation(
                attributions_flat=_to_inputs(result, xs),
                inputs_flat=tuple(x.detach() for x in xs),
                structure=structure,
                attribution_structure=result.structure,
                method=self.name,
                options={**self._config(), **call_options},
                targets=target.for_examples(n),
                outputs=out_tensor,
                delta=None if result.delta is None else result.delta.detach(),
                timing=dict(timing),
                extras=result.extras,
            )
            for result, target in zip(results, resolved)
        ]

    def forward(
        self, xs: Sequence[torch.Tensor], structure: Structure, *, grad: bool = False
    ) -> Any:
        """The model's outputs on `xs`, in chunks of `batch_size` rows, concatenated."""
        parts = []
        with torch.set_grad_enabled(grad):
            for s in chunks(int(xs[0].shape[0]), self.batch_size):
                parts.append(self.call([x[s] for x in xs], structure))
        return parts[0] if len(parts) == 1 else _concat(parts)

    def live_forward(
        self, xs: Sequence[torch.Tensor], structure: Structure, **call_options: Any
    ) -> Live | None:
        """The forward pass on the inputs with gradients, for `single_pass` methods; methods that
        run a modified model (LRP's traced graph) override it, and may return None to decline
        (the pipeline then runs its own forward)."""
        rows = tuple(x.detach().requires_grad_(True) for x in xs)
        with torch.enable_grad():
            return Live(rows, self.call(rows, structure))

    def call(self, xs: Sequence[torch.Tensor], structure: Structure) -> Any:
        """One model call; a failure inside the model says which input shapes caused it."""
        with self.calling(xs):
            return call_model(self.model, xs, structure)

    def calling(self, xs: Sequence[torch.Tensor]) -> contextlib.AbstractContextManager:
        """Turns an error raised inside the model on `xs` into a `LumosError` naming the shapes
        (see `model_errors`); for methods that run the model their own way."""
        return model_errors(self.name, xs)

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
        for s, grads, values in self.input_gradients_multi(
            make_rows, n_rows, example_index, [target], structure
        ):
            yield s, grads[0], values[0]

    def input_gradients_multi(
        self,
        make_rows: Callable[[slice], Sequence[torch.Tensor]],
        n_rows: int,
        example_index: torch.Tensor,
        targets: Sequence[Target],
        structure: Structure,
    ) -> Iterator[tuple[slice, list[tuple[torch.Tensor, ...]], list[torch.Tensor]]]:
        """`input_gradients` for several targets: one forward per chunk, one backward per
        target. Yields `(slice, [gradients per target], [target values per target])`."""
        for s in chunks(n_rows, self.batch_size):
            rows = tuple(r.detach().requires_grad_(True) for r in make_rows(s))
            with torch.enable_grad():
                output = self.call(rows, structure)
            yield s, *self.target_gradients(rows, output, example_index[s], targets)

    def target_gradients(
        self,
        rows: Sequence[torch.Tensor],
        output: Any,
        example_index: torch.Tensor,
        targets: Sequence[Target],
    ) -> tuple[list[tuple[torch.Tensor, ...]], list[torch.Tensor]]:
        """Gradients of each target w.r.t. `rows` from one forward pass (`output`), one backward
        per target; returns `([gradients per target], [target values per target])`."""
        grads_per_target, values_per_target = [], []
        with torch.enable_grad():
            for i, target in enumerate(targets):
                values = target.select(output, example_index)
                if not values.requires_grad:
                    raise GradientError(
                        f"{self.name} needs gradients, but the model output does not depend "
                        "differentiably on the inputs (does the model detach, use NumPy, "
                        "round or run under torch.no_grad?). Use a black-box method such "
                        "as 'occlusion' or 'kernel_shap' instead."
                    )
                grads = torch.autograd.grad(
                    values.sum(), rows, allow_unused=True, retain_graph=i < len(targets) - 1
                )
                if all(g is None for g in grads):
                    raise GradientError(
                        f"{self.name}: the target does not depend on any input tensor; "
                        "check the target and the model's forward."
                    )
                grads_per_target.append(
                    tuple(torch.zeros_like(r) if g is None else g for r, g in zip(rows, grads))
                )
                values_per_target.append(values.detach())
        return grads_per_target, values_per_target


@contextlib.contextmanager
def model_errors(who: str, xs: Sequence[torch.Tensor]) -> Iterator[None]:
    """Turns an error raised inside the model on `xs` into a `ModelCallError` naming the input
    shapes, and running out of memory into `OutOfMemory`; `who` is the method or metric."""
    try:
        yield
    except LumosError:
        raise
    except torch.OutOfMemoryError as exc:
        raise OutOfMemory(
            f"{who} ran out of memory in a pass of {int(xs[0].shape[0])} rows; pass a "
            "smaller batch_size (it bounds the rows of every forward/backward)."
        ) from exc
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        shapes = ", ".join(f"{tuple(x.shape)} {x.dtype}" for x in xs)
        raise ModelCallError(
            f"The model raised {type(exc).__name__} on inputs of shape {shapes}: {exc}. "
            "If these are not the shapes and dtypes the model expects, fix the inputs "
            "(batch first)."
        ) from exc


def _check_finite_outputs(outputs: Any) -> None:
    """A model that returns NaN or inf on valid inputs cannot be explained meaningfully."""
    try:
        out = output_tensor(outputs)
    except LumosError:
        return  # structured outputs: a callable target reads them
    if not all_finite(out):
        raise ModelCallError(
            "The model's outputs contain NaN or inf on these inputs, so no explanation of them "
            "would mean anything; check the inputs' range and the model."
        )


def _to_inputs(result: Attribution, xs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Attributions on the inputs' device, and in their dtype when they share their shape."""
    if result.structure is not None:
        return tuple(a.detach().to(xs[0].device) for a in result.attributions)
    return tuple(
        a.detach().to(device=x.device, dtype=x.dtype if x.is_floating_point() else None)
        for a, x in zip(result.attributions, xs)
    )


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
