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

    Lundberg & Lee (2017). ``φ = argmin Σ_z μ(z) (v(z) − v(∅) − zᵀφ)²  s.t.  1ᵀφ = v(N) − v(∅)``
    with the Shapley kernel ``μ(z) = (M−1) / (C(M,|z|) |z| (M−|z|))``; the constrained problem is
    solved exactly, so efficiency holds to float rounding (`delta`). When the budget covers all
    2^M − 2 coalitions the values are exact. Otherwise:

    - Enumeration: the smallest and largest sizes are evaluated in full, from the outside in,
      while the budget's kernel-weighted share covers them (SHAP's rule).
    - Sampling: the other sizes, in complementary pairs (Covert & Lee 2021), which makes the
      estimate exact for every game whose interactions involve at most two players. Every
      size gets the same share of pairs, i.e. coalitions are drawn by leverage score (Musco &
      Witter 2025, Leverage SHAP); on the benchmark MLPs each size contributes about equally
      to the variance, so this is also Neyman's optimal allocation. The sizes are strata:
      the shares are rounded by systematic sampling instead of drawing a size per pair, pairs
      are drawn without replacement within a size (as Leverage SHAP), and each size's
      coalitions share its exact kernel mass, so neither duplicates nor random counts per
      size add noise.
    - Shrinkage (``shrink=True``): the enumerated sizes alone give a second estimate φ₀, also
      exact for games of degree two, with a bias but no sampling noise. The result is the
      positive-part James–Stein combination (James & Stein 1961; Efron & Morris 1973)
      ``φ₀ + c (φ̂ − φ₀)``, ``c = max(0, 1 − (p−2)/p · tr Var φ̂ / ‖φ̂ − φ₀‖²)`` over the
      p = M − 1 free coordinates, the variance from the bootstrap below. Both estimates are
      efficient, so the combination is; c → 1 as the budget grows. On the benchmark MLP
      (14 features, budget 8·M) it lowers the error by about 15%; with nothing enumerated
      there is nothing to shrink towards.

    ``extras["stderr"]`` is a bootstrap standard error of the unshrunk φ̂: pairs resampled
    within their sizes with Rao & Wu's (1988) rescaling for sampling without replacement
    (sizes holding a single pair pooled). With shrinkage it errs on the safe side.

    Options:
        n_samples: coalitions evaluated per example besides the empty and full ones (the
            budget; with a background set of K rows each costs K model rows). None: SHAP's
            2·M + 2048 for inputs of at most 1,000 elements per example, 512 for larger ones
            (images, where each evaluation is a CNN forward pass).
        tol: stop early once every example's largest standard error is below `tol` × the
            range of its values (Covert & Lee use 0.01); None uses the whole budget. The
            sampled pairs are ordered so that every prefix is spread over the sizes.
        n_bootstrap: bootstrap replicates for the standard errors (and the shrinkage).
        shrink: James–Stein shrinkage towards the enumerated sizes' estimate.
    """

    def __init__(
        self,
        model: Callable,
        *,
        n_samples: int | None = None,
        tol: float | None = None,
        n_bootstrap: int = 32,
        shrink: bool = True,
        seed: int = 0,
        progress: bool = False,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(model, seed=seed, progress=progress, batch_size=batch_size)
        self.n_samples = check_budget(n_samples)
        self.n_bootstrap = check_count(n_bootstrap, "n_bootstrap", 2)
        if tol is not None and not (isinstance(tol, (int, float)) and tol > 0):
            raise InputError(f"tol must be a positive number or None, got {tol!r}.")
        if not isinstance(shrink, bool):
            raise InputError(f"shrink must be True or False, got {shrink!r}.")
        self.tol, self.shrink = tol, shrink

    def _config(self) -> dict[str, Any]:
        return {
            **super()._config(),
            "n_samples": self.n_samples,
            "tol": self.tol,
            "shrink": self.shrink,
        }

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
        pairs = len(plan.strata)
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
            w = plan.weights(done).to(device)
            phi = solve_efficient(a_enum + (z * w[:, None]).T @ z, b_enum + (y * w) @ z, total)
            stderr = self.bootstrap(a_enum, b_enum, z, w, y, total, plan, done)
            spread = phi.max(1).values - phi.min(1).values
            if self.tol is not None and bool((stderr.max(1).values <= self.tol * spread).all()):
                break
        if self.shrink and len(plan.enumerated) and done >= 2:
            phi = shrink_towards(phi, solve_efficient(a_enum, b_enum, total), stderr)
        extras = {"n_evaluations": len(plan.enumerated) + 2 * done, "exact": False}
        return phi, stderr, extras

    def bootstrap(self, a_enum, b_enum, z, w, y, total, plan, pairs) -> torch.Tensor:
        """Standard errors from re-solving with the first `pairs` sampled pairs resampled within
        their strata, Rao–Wu rescaled (all replicates in one batched solve)."""
        if pairs < 2:
            return torch.full_like(b_enum, float("nan"))
        generator = torch.Generator(device="cpu").manual_seed(int(self.seed) + 1)
        multiplier = rescaled_bootstrap(
            plan.strata[:pairs], plan.population, self.n_bootstrap, generator
        )
        wb = w * multiplier.to(z.device).repeat_interleave(2, dim=1)  # (B, T)
        a = a_enum + (z.T[None] * wb[:, None, :]) @ z
        b = b_enum + (y[None] * wb[:, None, :]) @ z
        return solve_efficient(a, b, total).std(0)


def shrink_towards(phi: torch.Tensor, target: torch.Tensor, stderr: torch.Tensor) -> torch.Tensor:
    """Positive-part James–Stein: ``target + c (φ − target)``, ``c = max(0, 1 − (p−2)/p · V /
    ‖φ − target‖²)`` per example, V the summed variance of φ over its p = M − 1 free
    coordinates (one is fixed by efficiency). No shrinkage for p ≤ 2."""
    p = phi.shape[1] - 1
    if p <= 2:
        return phi
    distance = (phi - target).pow(2).sum(1)
    variance = stderr.pow(2).sum(1)
    c = (1 - (p - 2) / p * variance / distance.clamp(min=1e-300)).clamp(0, 1)
    c = torch.where(distance > 0, c, torch.ones_like(c))
    return target + c[:, None] * (phi - target)


def rescaled_bootstrap(
    strata: torch.Tensor, population: torch.Tensor, n_bootstrap: int, generator: torch.Generator
) -> torch.Tensor:
    """Rao–Wu (1988) bootstrap multipliers (B, P) for P units sampled without replacement
    within strata: c − 1 draws with replacement among a stratum's c units, multiplier
    ``1 − λ + λ·c/(c−1)·count`` with ``λ = √(1 − c/population)``. Strata holding a single
    unit are pooled into one (collapsed strata), taken as an infinite population."""
    counts = torch.bincount(strata, minlength=len(population))
    lonely = counts[strata] == 1
    group = torch.where(lonely, torch.full_like(strata, len(population)), strata)
    sizes = torch.bincount(group, minlength=len(population) + 1)
    pool = torch.cat([population.double(), torch.tensor([math.inf], dtype=torch.float64)])
    order = group.argsort(stable=True)
    start = sizes.cumsum(0) - sizes
    draws = (sizes - 1).clamp(min=0)
    slot = torch.repeat_interleave(torch.arange(len(sizes)), draws)
    u = torch.rand(n_bootstrap, len(slot), generator=generator, dtype=torch.float64)
    picks = order[start[slot] + (u * sizes[slot]).long().clamp(max=sizes[slot] - 1)]
    hits = torch.zeros(n_bootstrap, len(strata), dtype=torch.float64)
    hits.scatter_add_(1, picks, torch.ones_like(u))
    c = sizes[group].double()
    lam = (1 - c / pool[group]).clamp(min=0).sqrt()
    multiplier = 1 - lam + lam * c / (c - 1).clamp(min=1) * hits
    return torch.where(c > 1, multiplier, torch.ones_like(hits))


class CoalitionPlan:
    """Which coalitions KernelSHAP evaluates: `enumerated` (all of the smallest and largest
    sizes, with their exact kernel weights `enumerated_weights`) and `sampled` (complementary
    pairs in adjacent rows; pair k belongs to stratum `strata[k]`, a size s ≤ M/2 and its
    complement M − s, of kernel mass `mass[j]` and `population[j]` pairs in all)."""

    def __init__(self, enumerated, enumerated_weights, sampled, strata, mass, population) -> None:
        self.enumerated, self.enumerated_weights = enumerated, enumerated_weights
        self.sampled, self.strata = sampled, strata
        self.mass, self.population = mass, population

    def weights(self, pairs: int) -> torch.Tensor:
        """Kernel weights of the first `pairs` sampled pairs (2·pairs rows): each stratum's
        mass shared evenly by its sampled coalitions."""
        strata = self.strata[:pairs]
        counts = torch.bincount(strata, minlength=len(self.mass)).double()
        return (self.mass[strata] / (2 * counts[strata])).repeat_interleave(2)


def coalition_plan(m: int, budget: int, generator: torch.Generator) -> CoalitionPlan:
    """Enumerate size pairs (s, M−s) from the outside in while the budget's kernel-weighted
    share covers them (SHAP's rule); share the remaining pairs equally among the remaining
    sizes (leverage scores), capped at each size's population, round the shares by
    systematic sampling and draw each size's pairs without replacement."""
    sizes = torch.arange(1, m, dtype=torch.float64)
    size_mass = (m - 1) / (sizes * (m - sizes))  # kernel mass of each size: C(M,s)·μ(z)
    remaining, remaining_mass = budget, float(size_mass.sum())
    enumerated, weights, first = [], [], 1
    for s in range(1, m // 2 + 1):
        pair = [s] if s == m - s else [s, m - s]
        count = sum(math.comb(m, k) for k in pair)
        pair_mass = float(sum(size_mass[k - 1] for k in pair))
        if count > remaining or count > remaining * pair_mass / remaining_mass + 1e-9:
            break
        for k in pair:
            subsets = _subsets_of_size(m, k)
            enumerated.append(subsets)
            weights.append(torch.full((len(subsets),), float(size_mass[k - 1]) / math.comb(m, k)))
        remaining -= count
        remaining_mass -= pair_mass
        first = s + 1
    if enumerated:
        z_enum, w_enum = torch.cat(enumerated), torch.cat(weights).double()
    else:
        z_enum, w_enum = torch.zeros(0, m, dtype=torch.bool), torch.zeros(0, dtype=torch.float64)
    strata = list(range(first, m // 2 + 1))
    middle = [2 * s == m for s in strata]
    mass = torch.tensor(
        [float(size_mass[s - 1]) * (1 if mid else 2) for s, mid in zip(strata, middle)],
        dtype=torch.float64,
    )
    population = torch.tensor(
        [math.comb(m, s) // (2 if mid else 1) for s, mid in zip(strata, middle)],
        dtype=torch.float64,
    )
    share = torch.tensor([1.0 if mid else 2.0 for mid in middle], dtype=torch.float64)
    n_pairs = remaining // 2 if strata else 0
    allocation = _water_fill(float(n_pairs), share, population)
    # systematic sampling: pair k lies at k + u on the cumulated allocations
    ends = allocation.cumsum(0)
    offset = torch.rand(1, generator=generator, dtype=torch.float64)
    at = torch.arange(n_pairs, dtype=torch.float64) + offset
    label = torch.searchsorted(ends, at, right=True).clamp(max=max(len(strata) - 1, 0))
    label = label[_spread_order(n_pairs)]
    sampled = torch.zeros(2 * n_pairs, m, dtype=torch.bool)
    for j, s in enumerate(strata):
        rows = (label == j).nonzero()[:, 0]
        if len(rows):
            half = _distinct_subsets(m, s, len(rows), generator)
            sampled[2 * rows], sampled[2 * rows + 1] = half, ~half
    return CoalitionPlan(z_enum, w_enum, sampled, label, mass, population)


def _water_fill(total: float, share: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    """`total` split in proportion to `share`, no part above its `cap` (the excess goes to the
    others in proportion); assumes ``total ≤ Σ cap``."""
    allocation = torch.zeros_like(share)
    free = torch.ones_like(share, dtype=torch.bool)
    while bool(free.any()):
        part = total * share / share[free].sum()
        full = free & (part >= cap)
        if not bool(full.any()):
            return torch.where(free, part, allocation)
        allocation[full] = cap[full]
        total -= float(cap[full].sum())
        free &= ~full
    return allocation


def _spread_order(n: int) -> torch.Tensor:
    """0..n−1 in bit-reversed (van der Corput) order, so every prefix is spread evenly."""
    bits = max(1, (n - 1).bit_length())
    codes = torch.arange(2**bits)
    reversed_codes = torch.zeros_like(codes)
    for b in range(bits):
        reversed_codes |= ((codes >> b) & 1) << (bits - 1 - b)
    return reversed_codes[reversed_codes < n]


def _distinct_subsets(m: int, s: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` distinct random coalitions of size s, as (count, m) bool, in random order. For
    s = M/2 a coalition and its complement count as one (the canonical one holds player 0)."""
    middle = 2 * s == m
    population = math.comb(m - 1, s - 1) if middle else math.comb(m, s)
    if population <= 2 * count:  # few enough to list (at most twice the budget)
        if middle:
            rest = _subsets_of_size(m - 1, s - 1)
            every = torch.cat([torch.ones(len(rest), 1, dtype=torch.bool), rest], 1)
        else:
            every = _subsets_of_size(m, s)
        return every[torch.randperm(population, generator=generator)[:count]]
    z = _random_subsets(m, s, count, generator)
    index = torch.arange(count)
    while True:
        key = torch.where(z[:, :1], z, ~z) if middle else z
        inverse = torch.unique(key, dim=0, return_inverse=True)[1]
        first = torch.full((count,), count).scatter_reduce(0, inverse, index, "amin")
        repeat = first[inverse] != index
        if not bool(repeat.any()):
            return z
        z[repeat] = _random_subsets(m, s, int(repeat.sum()), generator)


def _random_subsets(m: int, s: int, count: int, generator: torch.Generator) -> torch.Tensor:
    ranks = torch.rand(count, m, generator=generator).argsort(1).argsort(1)
    return ranks < s


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
