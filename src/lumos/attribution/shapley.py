"""Shapley values of players (features, grid cells, superpixels, tokens): exact enumeration,
KernelSHAP regression and antithetic permutation sampling, plus a waterfall figure.

The value of a coalition S is ``v(S) = E_k f(x_S, r^k_{∖S})``: players in S keep the input's
values, the others take the reference rows' (one reference, or a background set averaged over).
Efficiency ``Σ_i φ_i = v(N) − v(∅) = f(x) − E f(reference)`` is reported in `delta` (summed over
players: every element of a player carries the player's value φ_i, as in Captum and SHAP).
Per-player values, their standard errors and the base value ``v(∅)`` are in `extras`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lumos.attribution.blackbox import (
    PlayerMethod,
    Players,
    make_players,
    references,
)
from lumos.core.batching import check_count
from lumos.core.errors import InputError
from lumos.core.explanation import Explanation
from lumos.core.method import Attribution, Context
from lumos.core.registry import register

MAX_EXACT_PLAYERS = 20
# elements per example above which the default budget is the image one (every evaluation is
# then a CNN forward pass, and the demo must stay interactive)
_LARGE_INPUT = 1000


def default_budget(n_samples: int | None, ctx: Context, m: int) -> int:
    """`n_samples`, or when None: SHAP's default 2·M + 2048 for small inputs (tables, short
    token sequences), 512 for large ones (images)."""
    if n_samples is not None:
        return n_samples
    elements = sum(int(x[0].numel()) for x in ctx.inputs)
    return 512 if elements > _LARGE_INPUT else 2 * m + 2048


def check_budget(n_samples: int | None) -> int | None:
    return None if n_samples is None else check_count(n_samples, "n_samples")


class ShapleyMethod(PlayerMethod):
    """Base of the Shapley estimators.

    Call options:
        baselines: what absent players become — None (zeros), a number, a name (``mean``,
            ``blur``, ...), one reference shaped like an example, or a background set (K, ...)
            averaged over (each coalition then costs K model rows).
        feature_mask: int tensor grouping input elements into players, broadcastable to the
            input (one per input tensor for tuple inputs). Default: every feature for tabular
            inputs, every position for (B, L, E) sequences, and for images a coarse grid of
            `grid × grid` cells (channels together).
    """

    grid = 8

    def attribute(
        self, ctx: Context, baselines: Any = None, feature_mask: Any = None
    ) -> Attribution:
        players = make_players(ctx.inputs, feature_mask, grid=self.grid)
        refs = references(baselines, ctx.inputs, ctx.structure, seed=self.seed)
        m = players.n_players
        v0 = self.coalition_values(ctx, players, refs, torch.zeros(1, m, dtype=torch.bool))[:, 0]
        v1 = ctx.target_values().double()
        phi, stderr, extras = self.shapley_values(ctx, players, refs, v0, v1)
        delta = phi.sum(1) - (v1 - v0)
        attributions = players.spread(phi, [x.shape for x in ctx.inputs])
        extras = {
            "phi": phi,
            "stderr": stderr,
            "base_value": v0,
            "n_players": m,
            "feature_mask": players.masks[0],
            **extras,
        }
        return Attribution(attributions, delta=delta, extras=extras)

    def shapley_values(
        self,
        ctx: Context,
        players: Players,
        refs: Sequence[torch.Tensor],
        v0: torch.Tensor,
        v1: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Per-player values (n, M), their standard errors (n, M), and extras."""
        raise NotImplementedError

    def exact(
        self, ctx: Context, players: Players, refs: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Shapley values from all 2^M coalitions:
        ``φ_i = Σ_{S∋i} w₊(|S|) v(S) − Σ_{S∌i} w₋(|S|) v(S)`` with
        ``w₊(s) = (s−1)!(M−s)!/M!`` and ``w₋(s) = s!(M−s−1)!/M!``."""
        m = players.n_players
        if m > MAX_EXACT_PLAYERS:
            raise InputError(
                f"{self.name}: {m} players need 2^{m} coalitions; exact Shapley values allow at "
                f"most {MAX_EXACT_PLAYERS}. Group features with feature_mask, or use "
                "method='kernel_shap' or 'shapley_sampling'."
            )
        z = all_coalitions(m)
        values = self.coalition_values(ctx, players, refs, z)
        size = z.sum(1)
        w_plus, w_minus = _exact_weights(m, values.device)
        a, b = values * w_plus[size.to(values.device)], values * w_minus[size.to(values.device)]
        zf = z.to(values.device, torch.float64)
        phi = (a + b) @ zf - b.sum(1, keepdim=True)
        return phi, {"n_evaluations": int(z.shape[0]), "exact": True}


def all_coalitions(m: int) -> torch.Tensor:
    """All 2^m coalitions as a (2^m, m) bool matrix (row k holds the bits of k)."""
    codes = torch.arange(2**m, dtype=torch.long)
    return ((codes[:, None] >> torch.arange(m)) & 1).bool()


def _exact_weights(m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.arange(m + 1, dtype=torch.float64)
    log_m = math.lgamma(m + 1)
    plus = torch.exp(torch.lgamma(s.clamp(min=1)) + torch.lgamma(m - s + 1) - log_m)
    minus = torch.exp(torch.lgamma(s + 1) + torch.lgamma((m - s).clamp(min=1)) - log_m)
    plus[0], minus[m] = 0.0, 0.0
    return plus.to(device), minus.to(device)


@register("exact_shapley", family="shapley", needs={"black_box"})
class ExactShapley(ShapleyMethod):
    """Exact Shapley values by evaluating every coalition of players.

    Shapley (1953); as feature attribution Štrumbelj & Kononenko (2014), Lundberg & Lee (2017).
    ``φ_i = Σ_{S ⊆ N∖{i}} |S|!(M−|S|−1)!/M! · (v(S ∪ {i}) − v(S))`` over all 2^M coalitions, so
    at most 20 players; for images the default players are a coarse 3 × 3 grid. Efficiency
    ``Σ φ = f(x) − v(∅)`` holds to float rounding (`delta`).
    """

    grid = 3

    def shapley_values(self, ctx, players, refs, v0, v1):
        phi, extras = self.exact(ctx, players, refs)
        return phi, torch.zeros_like(phi), extras


@register("kernel_shap", family="shapley", needs={"black_box"})
class KernelShap(ShapleyMethod):
    """KernelSHAP: Shapley values as the solution of a weighted least-squares problem.

    Lundberg & Lee (2017); sampling as improved by Covert & Lee (2021, paired complements,
    standard errors, convergence stop) and Musco & Witter (2025, Leverage SHAP: coalition sizes
    drawn uniformly, i.e. by leverage score, and re-weighted).
    ``φ = argmin Σ_z μ(z) (v(z) − v(∅) − zᵀφ)²  s.t.  1ᵀφ = v(N) − v(∅)`` with the Shapley
    kernel ``μ(z) = (M−1) / (C(M,|z|) |z| (M−|z|))``. When the budget covers all 2^M − 2
    coalitions the values are exact; otherwise the smallest and largest coalition sizes are
    enumerated while the budget allows (as in SHAP), the rest is sampled in complementary pairs
    with importance weights, and the constrained problem is solved exactly, so efficiency holds
    to float rounding (`delta`). ``extras["stderr"]`` is a bootstrap standard error over the
    sampled pairs.

    Options:
        n_samples: coalitions evaluated per example besides the empty and full ones (the
            budget; with a background set of K rows each costs K model rows). None: SHAP's
            2·M + 2048 for inputs of at most 1,000 elements per example, 512 for larger ones
            (images, where each evaluation is a CNN forward pass).
        tol: stop early once every example's largest standard error is below `tol` × the
            range of its values (Covert & Lee use 0.01); None uses the whole budget.
        n_bootstrap: bootstrap replicates for the standard errors.
    """

    def __init__(
        self,
        model: Callable,
        *,
        n_samples: int | None = None,
        tol: float | None = None,
        n_bootstrap: int = 32,
        seed: int = 0,
        progress: bool = False,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(model, seed=seed, progress=progress, batch_size=batch_size)
        self.n_samples = check_budget(n_samples)
        self.n_bootstrap = check_count(n_bootstrap, "n_bootstrap", 2)
        if tol is not None and not (isinstance(tol, (int, float)) and tol > 0):
            raise InputError(f"tol must be a positive number or None, got {tol!r}.")
        self.tol = tol

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "n_samples": self.n_samples, "tol": self.tol}

    def shapley_values(self, ctx, players, refs, v0, v1):
        m = players.n_players
        budget = default_budget(self.n_samples, ctx, m)
        if m <= MAX_EXACT_PLAYERS and 2**m - 2 <= budget:
            phi, extras = self.exact(ctx, players, refs)
            return phi, torch.zeros_like(phi), extras
        device = ctx.device
        plan = coalition_plan(m, budget, self.generator())
        total = v1 - v0
        a_enum = torch.zeros(m, m, dtype=torch.float64, device=device)
        b_enum = torch.zeros(ctx.n, m, dtype=torch.float64, device=device)
        if len(plan.enumerated):
            z = plan.enumerated.to(device, torch.float64)
            y = self.coalition_values(ctx, players, refs, plan.enumerated) - v0[:, None]
            w = plan.enumerated_weights.to(device)
            a_enum, b_enum = (z * w[:, None]).T @ z, (y * w) @ z
        pairs = plan.sampled.shape[0] // 2
        rounds = 1 if self.tol is None else min(8, max(pairs, 1))
        bounds = [pairs * (r + 1) // rounds for r in range(rounds)]
        done, ys = 0, []
        phi = stderr = None
        for bound in bounds:
            if bound > done:
                z_new = plan.sampled[2 * done : 2 * bound]
                ys.append(self.coalition_values(ctx, players, refs, z_new) - v0[:, None])
                done = bound
            z = plan.sampled[: 2 * done].to(device, torch.float64)
            y = (
                torch.cat(ys, 1)
                if ys
                else torch.zeros(ctx.n, 0, dtype=torch.float64, device=device)
            )
            w = plan.sampled_weights[: 2 * done].to(device) / max(2 * done, 1)
            phi = solve_efficient(a_enum + (z * w[:, None]).T @ z, b_enum + (y * w) @ z, total)
            stderr = self.bootstrap(a_enum, b_enum, z, w, y, total)
            spread = phi.max(1).values - phi.min(1).values
            if self.tol is not None and bool((stderr.max(1).values <= self.tol * spread).all()):
                break
        extras = {"n_evaluations": len(plan.enumerated) + 2 * done, "exact": False}
        return phi, stderr, extras

    def bootstrap(self, a_enum, b_enum, z, w, y, total) -> torch.Tensor:
        """Standard errors from re-solving with the sampled pairs resampled with replacement
        (all replicates in one batched solve)."""
        pairs = z.shape[0] // 2
        if pairs < 2:
            return torch.full_like(b_enum, float("nan"))
        generator = torch.Generator(device="cpu").manual_seed(int(self.seed) + 1)
        picks = torch.randint(pairs, (self.n_bootstrap, pairs), generator=generator)
        counts = torch.zeros(self.n_bootstrap, pairs, dtype=torch.float64)
        counts.scatter_add_(1, picks, torch.ones_like(counts))
        wb = w * counts.to(z.device).repeat_interleave(2, dim=1)  # (B, T)
        a = a_enum + (z.T[None] * wb[:, None, :]) @ z
        b = b_enum + (y[None] * wb[:, None, :]) @ z
        return solve_efficient(a, b, total).std(0)


class CoalitionPlan:
    """Which coalitions KernelSHAP evaluates: `enumerated` (all of the smallest and largest
    sizes, with their exact kernel weights) and `sampled` (complementary pairs, adjacent rows,
    with importance weights to be divided by the number of samples used)."""

    def __init__(self, enumerated, enumerated_weights, sampled, sampled_weights) -> None:
        self.enumerated, self.enumerated_weights = enumerated, enumerated_weights
        self.sampled, self.sampled_weights = sampled, sampled_weights


def coalition_plan(m: int, budget: int, generator: torch.Generator) -> CoalitionPlan:
    """Enumerate size pairs (s, M−s) from the outside in while the budget's kernel-weighted
    share covers them (SHAP's rule); sample the remaining sizes uniformly (leverage scores) in
    complementary pairs, weighted by ``μ(z)/q(z)``."""
    sizes = torch.arange(1, m, dtype=torch.float64)
    mass = (m - 1) / (sizes * (m - sizes))  # kernel mass of each size: C(M,s)·μ(z)
    remaining, remaining_mass = budget, float(mass.sum())
    enumerated, weights, left = [], [], list(range(1, m))
    for s in range(1, m // 2 + 1):
        pair = [s] if s == m - s else [s, m - s]
        count = sum(math.comb(m, k) for k in pair)
        pair_mass = float(sum(mass[k - 1] for k in pair))
        if count > remaining or count > remaining * pair_mass / remaining_mass + 1e-9:
            break
        for k in pair:
            subsets = _subsets_of_size(m, k)
            enumerated.append(subsets)
            weights.append(torch.full((len(subsets),), float(mass[k - 1]) / math.comb(m, k)))
            left.remove(k)
        remaining -= count
        remaining_mass -= pair_mass
    if enumerated:
        z_enum, w_enum = torch.cat(enumerated), torch.cat(weights).double()
    else:
        z_enum, w_enum = torch.zeros(0, m, dtype=torch.bool), torch.zeros(0, dtype=torch.float64)
    n_pairs = remaining // 2 if left else 0
    left_t = torch.tensor(left, dtype=torch.long)
    size = left_t[torch.randint(len(left), (n_pairs,), generator=generator)] if left else left_t
    order = torch.rand(n_pairs, m, generator=generator).argsort(1)
    ranks = order.argsort(1)
    first = ranks < size[:, None]
    sampled = torch.stack([first, ~first], 1).reshape(2 * n_pairs, m)
    s = sampled.sum(1).double()
    # μ(z)/q(z) with q(z) = 1/(len(left)·C(M,s)); sizes in `left` are symmetric, so a pair's
    # two halves carry the same weight
    w_samp = (m - 1) / (s * (m - s)) * len(left)
    return CoalitionPlan(z_enum, w_enum, sampled, w_samp)


def _subsets_of_size(m: int, k: int) -> torch.Tensor:
    """All C(m, k) coalitions of size k as (C(m, k), m) bool (only called within the budget)."""
    combos = torch.tensor(list(itertools.combinations(range(m), k)), dtype=torch.long)
    z = torch.zeros(len(combos), m, dtype=torch.bool)
    return z.scatter_(1, combos.view(len(combos), k), True) if k else z


def solve_efficient(a: torch.Tensor, b: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``argmin φᵀAφ − 2bᵀφ  s.t. 1ᵀφ = total`` for every example via the KKT system; a tiny
    ridge keeps it solvable when the samples leave A singular. a (..., M, M), b (..., n, M),
    total (n,) → (..., n, M)."""
    m = a.shape[-1]
    ridge = 1e-9 * (a.diagonal(dim1=-2, dim2=-1).mean(-1).abs() + 1e-12)
    eye = torch.eye(m, dtype=torch.float64, device=a.device)
    kkt = torch.zeros(*a.shape[:-2], m + 1, m + 1, dtype=torch.float64, device=a.device)
    kkt[..., :m, :m] = a + ridge[..., None, None] * eye
    kkt[..., :m, m] = 1.0
    kkt[..., m, :m] = 1.0
    rhs = torch.cat([b, total.expand(*b.shape[:-1])[..., None]], -1).transpose(-1, -2)
    return torch.linalg.solve(kkt, rhs)[..., :m, :].transpose(-1, -2)


@register("shapley_sampling", family="shapley", needs={"black_box"})
class ShapleySampling(ShapleyMethod):
    """Shapley value sampling with antithetic permutations.

    Castro, Gómez & Tejada (2009); Štrumbelj & Kononenko (2014); antithetic pairs (each
    permutation and its reverse) as in Mitchell et al. (2022). ``φ_i = E_π [v(Pre_π(i) ∪ {i})
    − v(Pre_π(i))]`` over random orders π of the players; every permutation's contributions
    telescope to ``v(N) − v(∅)``, so efficiency holds exactly (`delta`). ``extras["stderr"]``
    is the standard error over antithetic pairs.

    Options:
        n_samples: model evaluations per example (the budget): ``n_samples // (M − 1)``
            permutations, rounded down to pairs (at least one pair). None: as `kernel_shap`
            (2·M + 2048 for small inputs, 512 for images).
    """

    def __init__(
        self,
        model: Callable,
        *,
        n_samples: int | None = None,
        seed: int = 0,
        progress: bool = False,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(model, seed=seed, progress=progress, batch_size=batch_size)
        self.n_samples = check_budget(n_samples)

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "n_samples": self.n_samples}

    def shapley_values(self, ctx, players, refs, v0, v1):
        m, n = players.n_players, ctx.n
        budget = default_budget(self.n_samples, ctx, m)
        n_perm = max(2, 2 * (budget // (2 * max(m - 1, 1))))
        forward = torch.rand(n_perm // 2, m, generator=self.generator()).argsort(1)
        perms = torch.stack([forward, forward.flip(1)], 1).reshape(n_perm, m)
        ranks = perms.argsort(1)
        steps = torch.arange(1, m)
        prefixes = ranks[:, None, :] < steps[None, :, None]  # (P, M-1, M)
        values = self.coalition_values(ctx, players, refs, prefixes.reshape(-1, m))
        chain = torch.cat(
            [
                v0[:, None, None].expand(n, n_perm, 1),
                values.view(n, n_perm, m - 1),
                v1[:, None, None].expand(n, n_perm, 1),
            ],
            2,
        )
        marginal = chain.diff(dim=2)  # contribution of the player at each position
        index = perms.to(ctx.device)[None].expand(n, -1, -1)
        per_perm = torch.zeros_like(marginal).scatter_(2, index, marginal)
        per_pair = per_perm.view(n, n_perm // 2, 2, m).mean(2)
        phi = per_pair.mean(1)
        pairs = per_pair.shape[1]
        stderr = (
            per_pair.std(1) / math.sqrt(pairs) if pairs > 1 else torch.full_like(phi, float("nan"))
        )
        return phi, stderr, {"n_evaluations": n_perm * (m - 1), "n_permutations": n_perm}


def waterfall_figure(
    explanation: Explanation,
    feature_names: Sequence[str] | None = None,
    index: int = 0,
    max_display: int = 12,
):
    """A SHAP-style waterfall of one example's Shapley values: from the base value E f(reference)
    to the output, the largest contributions first (the rest summed into one bar).

    Works for any explanation with per-player values (`extras["phi"]`) or flat attributions.
    Returns a matplotlib `Figure` (no pyplot, so it works under any backend).
    """
    from matplotlib.figure import Figure

    phi = explanation.extras.get("phi")
    values = (phi if phi is not None else explanation.attributions_flat[0].flatten(1))[index]
    values = values.detach().double().cpu()
    m = values.numel()
    names = list(feature_names) if feature_names is not None else [f"x{i}" for i in range(m)]
    if len(names) != m:
        raise InputError(f"Got {len(names)} feature names for {m} players.")
    base = explanation.extras.get("base_value")
    base = float(base[index]) if base is not None else 0.0
    order = values.abs().argsort(descending=True).tolist()
    shown, rest = order[: max_display - 1] if m > max_display else order, order[max_display - 1 :]
    labels = [names[i] for i in shown]
    contributions = [float(values[i]) for i in shown]
    if m > max_display:
        labels.append(f"{len(rest)} other features")
        contributions.append(float(values[rest].sum()))
    fig = Figure(figsize=(7, 0.45 * len(labels) + 1.4))
    ax = fig.add_subplot(1, 1, 1)
    start = base + sum(contributions)
    y_positions = list(range(len(labels)))
    for y, value in zip(y_positions, contributions):
        start -= value
        color = "#d62728" if value >= 0 else "#1f77b4"
        ax.barh(y, value, left=start, color=color, height=0.6)
        right = max(start, start + value)
        ax.text(right, y, f" {value:+.3g}", va="center", ha="left", fontsize=8)
    ax.margins(x=0.12)
    ax.set_yticks(y_positions)
    ax.set_yticklabels(labels)
    ax.invert_yaxis()
    total = base + sum(contributions)
    ax.axvline(base, color="grey", lw=0.8, ls="--")
    ax.axvline(total, color="black", lw=0.8)
    ax.set_xlabel(f"E f(reference) = {base:.3g}   →   f(x) = {total:.3g}")
    ax.set_title(f"{explanation.method}: example {index}")
    fig.tight_layout()
    return fig
