"""The shared engine of the model-agnostic (black-box) methods.

- Models: any `nn.Module`, or any callable on tensors *or NumPy arrays* (``clf.predict_proba``):
  `as_tensor_model` wraps plain callables so they take and return tensors; `numpy_model` forces
  the NumPy route.
- Players: a `feature_mask` groups input elements into players (features, superpixels, tokens,
  grid cells); `Players` spreads per-player values back onto the inputs.
- References: what a switched-off player is replaced with — one reference row or a background
  set of K rows averaged over (`references`).
- Evaluation: every perturbed row of every example is built as a tensor and evaluated in large
  batches on the model's device (`BlackBoxMethod.evaluate`, `BlackBoxMethod.coalition_values`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lumos.attribution.baselines import resolve_baselines
from lumos.core.batching import chunks, rows_per_call
from lumos.core.errors import BaselineError, InputError
from lumos.core.explanation import Explanation
from lumos.core.inputs import InputsLike
from lumos.core.method import Context, Method
from lumos.core.targets import TargetLike


class TensorCallable:
    """A plain callable made tensor-in/tensor-out.

    It is called with tensors first; if that fails (or returns a NumPy array or list), the
    inputs go in as NumPy arrays from then on. Outputs come back as tensors on the inputs'
    device. `numpy=True` skips the tensor attempt.
    """

    def __init__(self, fn: Callable, *, numpy: bool | None = None) -> None:
        self.fn = getattr(fn, "fn", fn) if isinstance(fn, TensorCallable) else fn
        self.numpy = numpy

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        device = next(
            (a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)),
            torch.device("cpu"),
        )
        if self.numpy is None:
            try:
                out = self.fn(*args, **kwargs)
            except Exception:  # NumPy-only callables fail on tensors in many ways
                self.numpy = True
            else:
                if isinstance(out, (np.ndarray, list, np.generic)):
                    self.numpy = True
                    return _to_tensor(out, device)
                self.numpy = False
                return out
        if not self.numpy:
            return self.fn(*args, **kwargs)
        out = self.fn(*(_to_numpy(a) for a in args), **{k: _to_numpy(v) for k, v in kwargs.items()})
        return _to_tensor(out, device)

    def __repr__(self) -> str:
        return f"TensorCallable({self.fn!r})"


def numpy_model(fn: Callable) -> TensorCallable:
    """Wrap a callable on NumPy arrays (e.g. ``clf.predict_proba``) into tensor-in/tensor-out."""
    return TensorCallable(fn, numpy=True)


def as_tensor_model(model: Callable) -> Callable:
    """`model` itself for torch modules; other callables wrapped in a `TensorCallable`."""
    if isinstance(model, (nn.Module, TensorCallable)):
        return model
    return TensorCallable(model)


def _to_numpy(value: Any) -> Any:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value


def _to_tensor(value: Any, device: torch.device) -> Any:
    if isinstance(value, (np.ndarray, np.generic, list)):
        return torch.from_numpy(np.ascontiguousarray(np.asarray(value))).to(device)
    return value


# -- players ------------------------------------------------------------------------------
@dataclass
class Players:
    """Input elements grouped into `n_players` players.

    `masks[i]` has the shape of input i's examples, with a leading dim of 1 (shared by all
    examples) or n (one mask per example); entries are player ids in ``0..n_players-1``, unique
    across inputs.
    """

    masks: tuple[torch.Tensor, ...]
    n_players: int
    # the same ids before broadcasting (e.g. (1, 1, H, W) for an image's superpixels): rows
    # are built from these, C times fewer elements to look up for C channels
    compact: tuple[torch.Tensor, ...] | None = None

    def spread(
        self, values: torch.Tensor, shapes: Sequence[torch.Size]
    ) -> tuple[torch.Tensor, ...]:
        """Per-player values (n, M) as per-element tensors of the inputs' shapes."""
        n = values.shape[0]
        out = []
        for mask, shape in zip(self.masks, shapes):
            flat = mask.reshape(mask.shape[0], -1).expand(n, -1)
            out.append(values.gather(1, flat).reshape(n, *shape[1:]))
        return tuple(out)

    def on_elements(
        self, on: torch.Tensor, example_index: torch.Tensor, single: bool | None = None
    ) -> tuple[torch.Tensor, ...]:
        """For rows with player states `on` (R, M) bool, which elements of each input are on:
        one bool tensor per input, (R, *mask dims) broadcastable to the input's rows (rows
        belonging to `example_index`; `single`: whether they all belong to one example, where
        the caller knows it — reading it off a device would wait for the queue). They may be
        transposed views: build rows with `masked_rows`, which writes them in the model's usual
        layout."""
        result = []
        first = example_index[:1]
        for mask in self.compact or self.masks:
            flat = mask.reshape(mask.shape[0], -1)
            if flat.shape[0] > 1 and single is None:
                single = bool((example_index == first).all())
            if flat.shape[0] == 1 or single:  # one mask for all rows: a cheap row lookup
                index = flat[first][0] if flat.shape[0] > 1 else flat[0]
                # rows of the (M, R) transpose, viewed back as (R, D): 25× faster than
                # index_select along dim 1 of a small bool matrix
                chosen = on.T.contiguous().index_select(0, index).T
            else:
                chosen = on.gather(1, flat[example_index])
            result.append(chosen.view(len(on), *mask.shape[1:]))
        return tuple(result)

    def sizes(self) -> torch.Tensor:
        """Elements per player (summed over inputs, for the first example's masks)."""
        counts = [torch.bincount(m[0].flatten(), minlength=self.n_players) for m in self.masks]
        return sum(counts)


def masked_rows(on: torch.Tensor, kept: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """Rows taking `kept` where `on` and `removed` elsewhere (all three broadcast to the rows'
    shape), written contiguously whatever the layout of `on`."""
    shape = torch.broadcast_shapes(on.shape, kept.shape, removed.shape)
    dtype = torch.promote_types(kept.dtype, removed.dtype)
    out = torch.empty(shape, dtype=dtype, device=kept.device)
    return torch.where(on, kept, removed, out=out)


def grid_mask(shape: Sequence[int], cells: int, device: torch.device) -> torch.Tensor:
    """A (1, 1, H, W) mask of `cells × cells` rectangular cells (fewer on smaller images)."""
    h, w = int(shape[-2]), int(shape[-1])
    rows = torch.arange(h, device=device) * min(cells, h) // h
    cols = torch.arange(w, device=device) * min(cells, w) // w
    return (rows[:, None] * min(cells, w) + cols[None, :]).view(1, 1, h, w)


def default_mask(x: torch.Tensor, grid: int) -> torch.Tensor:
    """The default players of one input: images (B, C, H, W) a `grid × grid` grid of cells with
    channels together; sequences (B, L, E) one player per position; otherwise every feature."""
    if x.dim() == 4:
        return grid_mask(x.shape, grid, x.device)
    if x.dim() == 3:
        return torch.arange(x.shape[1], device=x.device).view(1, -1, 1)
    return torch.arange(max(x[0].numel(), 1), device=x.device).view(1, *x.shape[1:])


def make_players(xs: Sequence[torch.Tensor], feature_mask: Any = None, *, grid: int = 8) -> Players:
    """Players from a user `feature_mask` (a tensor broadcastable to the input, or one per input
    tensor) or the default of `default_mask`; ids are relabelled to ``0..M-1``."""
    if feature_mask is None:
        raw = _offset([_broadcast_mask(default_mask(x, grid), x, i) for i, x in enumerate(xs)])
    else:
        per_input = (
            list(feature_mask) if isinstance(feature_mask, (tuple, list)) else [feature_mask]
        )
        if len(per_input) != len(xs):
            raise InputError(
                f"feature_mask needs one mask per input tensor ({len(xs)}), got {len(per_input)}."
            )
        raw = [_broadcast_mask(m, x, i) for i, (m, x) in enumerate(zip(per_input, xs))]
        raw = _offset(raw) if len(raw) > 1 else raw
    ids = torch.cat([m.flatten() for m in raw])
    unique, inverse = torch.unique(ids, return_inverse=True)
    compact, start = [], 0
    for m in raw:
        compact.append(inverse[start : start + m.numel()].view(m.shape))
        start += m.numel()
    masks = [c.expand(c.shape[0], *x.shape[1:]).contiguous() for c, x in zip(compact, xs)]
    return Players(tuple(masks), int(unique.numel()), tuple(compact))


def _broadcast_mask(mask: Any, x: torch.Tensor, i: int) -> torch.Tensor:
    mask = torch.as_tensor(mask, device=x.device)
    if mask.is_floating_point() or mask.dtype == torch.bool:
        raise InputError(f"feature_mask must hold integer player ids, got {mask.dtype}.")
    mask = mask.long()
    if mask.dim() < x.dim():
        mask = mask.view((1,) * (x.dim() - mask.dim()) + tuple(mask.shape))
    if mask.dim() != x.dim() or mask.shape[0] not in (1, x.shape[0]):
        raise InputError(
            f"feature_mask {i} has shape {tuple(mask.shape)}, which does not broadcast to the "
            f"input of shape {tuple(x.shape)}; pass e.g. {tuple(x.shape[1:])} or {tuple(x.shape)}."
        )
    try:
        mask.expand(mask.shape[0], *x.shape[1:])
        return mask
    except RuntimeError as exc:
        raise InputError(
            f"feature_mask {i} of shape {tuple(mask.shape)} does not broadcast to the input of "
            f"shape {tuple(x.shape)}."
        ) from exc


def _offset(masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Make ids of different inputs distinct (a player never spans two inputs)."""
    out, offset = [], 0
    for m in masks:
        m = m - m.min()
        out.append(m + offset)
        offset += int(m.max()) + 1
    return out


# -- references ---------------------------------------------------------------------------
def references(
    baselines: Any, xs: Sequence[torch.Tensor], structure: Any, *, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """What switched-off elements become: one tensor per input of shape (1 or n, K, ...).

    None: zeros. A number or a name (``zeros``, ``uniform``, ``blur``, ``mean``; see
    `lumos.attribution.baselines`): one reference per example. A tensor shaped like one example:
    one reference for all. A tensor (K, ...): a background set every example is averaged over.
    """
    if baselines is None or isinstance(baselines, (int, float, str)):
        return tuple(b.unsqueeze(1) for b in resolve_baselines(baselines, xs, structure, seed=seed))
    if isinstance(baselines, (torch.Tensor, np.ndarray)):
        per_input = [baselines]
    else:
        per_input = list(structure.flatten(baselines, "baselines"))
    result = []
    for i, (b, x) in enumerate(zip(per_input, xs)):
        if isinstance(b, (int, float, str)) or b is None:
            result.append(resolve_baselines(b, [x], _single(), seed=seed)[0].unsqueeze(1))
            continue
        b = torch.as_tensor(b).to(device=x.device, dtype=x.dtype)
        if b.shape == x.shape[1:]:
            b = b.unsqueeze(0)
        if b.dim() != x.dim() or b.shape[1:] != x.shape[1:]:
            raise BaselineError(
                f"baselines for input {i} have shape {tuple(b.shape)}; pass one reference of "
                f"shape {tuple(x.shape[1:])}, a background set (K, "
                f"{', '.join(map(str, x.shape[1:]))}), a number or a name."
            )
        result.append(b.unsqueeze(0))
    if len({int(r.shape[1]) for r in result}) > 1:
        raise BaselineError("Every input's background set must hold the same number of rows.")
    return tuple(result)


def _single():
    from lumos.core.inputs import Structure

    return Structure("tensor", ("input",))


# -- the engine ---------------------------------------------------------------------------
class BlackBoxMethod(Method):
    """Base of methods that only evaluate the model (occlusion, LIME, Shapley values, ...).

    Shared options:
        batch_size: rows per model call; None uses calls of about 8M input elements.
        seed: seeds the sampling (same seed, same result).
        progress: show a tqdm progress bar over model calls.
    """

    def __init__(
        self,
        model: Callable,
        *,
        seed: int = 0,
        progress: bool = False,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(as_tensor_model(model), batch_size=batch_size)
        self.seed, self.progress = seed, progress

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "seed": self.seed}

    def generator(self) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(int(self.seed))

    def evaluate(
        self,
        ctx: Context,
        make_rows: Callable[[slice], Sequence[torch.Tensor]],
        example_index: torch.Tensor,
    ) -> torch.Tensor:
        """The target at `len(example_index)` generated rows, built and evaluated chunk by chunk
        (`make_rows(s)` builds rows `s`; row r belongs to example `example_index[r]`)."""
        n_rows = len(example_index)
        size = rows_per_call(self.batch_size, ctx.inputs)
        parts = list(chunks(n_rows, size))
        if self.progress:
            from tqdm.auto import tqdm

            parts = tqdm(parts, desc=self.name, unit="batch")
        values = []
        with torch.no_grad():
            for s in parts:
                out = self.call(list(make_rows(s)), ctx.structure)
                values.append(ctx.target.select(out, example_index[s]).detach())
        return torch.cat(values) if values else torch.empty(0, device=ctx.device)

    def coalition_values(
        self,
        ctx: Context,
        players: Players,
        refs: Sequence[torch.Tensor],
        coalitions: torch.Tensor,
    ) -> torch.Tensor:
        """v(S) for every example and coalition: the target when the players in S keep their
        values and the others take the references' (averaged over the K reference rows).

        `coalitions` is (S, M) bool, shared by all examples; returns (n, S) in float64.
        """
        n, n_coal, k = ctx.n, int(coalitions.shape[0]), int(refs[0].shape[1])
        coalitions = coalitions.to(ctx.device)
        example = torch.arange(n, device=ctx.device).repeat_interleave(n_coal * k)

        def make_rows(s: slice) -> list[torch.Tensor]:
            r = torch.arange(s.start, s.stop, device=ctx.device)
            e, c, j = r // (n_coal * k), (r // k) % n_coal, r % k
            # a chunk inside one example (and one shared reference) needs no row copies
            first, last = s.start // (n_coal * k), (s.stop - 1) // (n_coal * k)
            single = first == last
            on = players.on_elements(coalitions[c], e, single)
            rows = []
            for x, ref, mask in zip(ctx.inputs, refs, on):
                x_rows = x[first : first + 1].expand(len(r), *x.shape[1:]) if single else x[e]
                if k == 1 and (ref.shape[0] == 1 or single):
                    ref_rows = ref[first if ref.shape[0] > 1 else 0, :1]
                    ref_rows = ref_rows.expand(len(r), *x.shape[1:])
                else:
                    ref_rows = ref[e if ref.shape[0] > 1 else torch.zeros_like(e), j]
                rows.append(masked_rows(mask, x_rows, ref_rows))
            return rows

        values = self.evaluate(ctx, make_rows, example)
        return values.double().view(n, n_coal, k).mean(2)


class PlayerMethod(BlackBoxMethod):
    """Call options shared by player-based methods:

    baselines: what removed players become — None (zeros), a number, a name (``mean``,
        ``blur``, ``uniform``), one reference shaped like an example, or a background set
        (K, ...) averaged over.
    feature_mask: int tensor grouping input elements into players, broadcastable to the input
        (one per input tensor for tuple inputs). Default: every feature for tabular inputs,
        every position for (B, L, E) sequences, an 8 × 8 grid of cells for images.
    """

    def explain(
        self,
        inputs: InputsLike,
        target: TargetLike = "predicted",
        *,
        baselines: Any = None,
        feature_mask: Any = None,
    ) -> Explanation:
        return self._run(inputs, target, baselines=baselines, feature_mask=feature_mask)
