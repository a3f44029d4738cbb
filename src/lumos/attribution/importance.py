"""Permutation feature importance: how much a dataset-level score drops when one feature (or
group of features) is shuffled across the examples."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lumos.attribution.blackbox import (
    as_tensor_model,
    make_players,
    masked_rows,
)
from lumos.core.batching import check_batch_size, check_count, chunks, rows_per_call
from lumos.core.errors import InputError, unknown_name
from lumos.core.inputs import call_model, flatten_inputs
from lumos.core.model import model_device, preserved
from lumos.core.targets import output_tensor


def _accuracy(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (outputs.argmax(-1) == labels.to(outputs.device)).double().mean()


def _neg_mse(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    n = labels.shape[0]
    diff = outputs.double().reshape(n, -1) - labels.to(outputs.device).double().reshape(n, -1)
    return -(diff**2).mean()


METRICS: dict[str, Callable] = {"accuracy": _accuracy, "neg_mse": _neg_mse}


@dataclass
class PermutationImportance:
    """`importances` (M, n_repeats): score drops per player and repeat; `mean`, `std` over
    repeats; `baseline_score` on the unshuffled data; `feature_mask` the players."""

    importances: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    baseline_score: float
    feature_mask: torch.Tensor


def permutation_importance(
    model: Callable,
    inputs: Any,
    labels: Any,
    *,
    metric: str | Callable = "accuracy",
    feature_mask: Any = None,
    n_repeats: int = 5,
    seed: int = 0,
    batch_size: int | None = None,
) -> PermutationImportance:
    """Permutation importance of every player on a dataset.

    Breiman (2001); Fisher, Rudin & Dominici (2019) ("model reliance").
    ``I_j = score(f(X), y) − score(f(X with player j's values permuted across rows), y)``,
    averaged over `n_repeats` seeded permutations; all permuted datasets are evaluated in large
    batches. `model` may be a torch module or any callable (NumPy ones too, e.g.
    ``clf.predict_proba``).

    Options:
        metric: ``accuracy`` (labels are class indices; outputs are scores per class),
            ``neg_mse`` (labels are regression targets of the outputs' shape), or a callable
            ``(outputs, labels) -> score`` (higher is better) on one dataset's outputs.
        feature_mask: players as for the Shapley methods (default every feature; an 8 × 8
            grid for images).
    """
    xs, structure = flatten_inputs(inputs)
    model = as_tensor_model(model)
    check_count(n_repeats, "n_repeats")
    batch_size = check_batch_size(batch_size)
    if isinstance(metric, str):
        if metric not in METRICS:
            raise unknown_name("metric", metric, METRICS)
        score_fn = METRICS[metric]
    elif callable(metric):
        score_fn = metric
    else:
        raise InputError(f"metric must be a name {sorted(METRICS)} or a callable, got {metric!r}.")
    device = model_device(model, xs[0].device)
    xs = tuple(x.detach().to(device) for x in xs)
    labels = torch.as_tensor(labels).to(device)
    n = int(xs[0].shape[0])
    if labels.shape[0] != n:
        raise InputError(f"Got {labels.shape[0]} labels for {n} examples.")
    players = make_players(xs, feature_mask)
    m = players.n_players
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    perms = torch.rand(n_repeats, m, n, generator=generator).argsort(2).to(device)
    step = rows_per_call(batch_size, xs)
    n_rows = n_repeats * m * n

    def rows(s: slice) -> list[torch.Tensor]:
        r = torch.arange(s.start, s.stop, device=device)
        rep, player, e = r // (m * n), (r // n) % m, r % n
        source = perms[rep, player, e]
        on = players.on_elements(torch.nn.functional.one_hot(player, m).bool(), e, n == 1)
        return [masked_rows(mask, x[source], x[e]) for x, mask in zip(xs, on)]

    with preserved(model), torch.no_grad():
        clean = output_tensor(call_model(model, xs, structure))
        baseline = float(score_fn(clean, labels))
        outputs = [
            output_tensor(call_model(model, rows(s), structure)) for s in chunks(n_rows, step)
        ]
    permuted = torch.cat(outputs).view(n_repeats * m, n, *clean.shape[1:])
    scores = torch.tensor([float(score_fn(o, labels)) for o in permuted], dtype=torch.float64)
    importances = (baseline - scores).view(n_repeats, m).T
    return PermutationImportance(
        importances=importances,
        mean=importances.mean(1),
        std=importances.std(1) if n_repeats > 1 else torch.zeros(m, dtype=torch.float64),
        baseline_score=baseline,
        feature_mask=players.masks[0],
    )
