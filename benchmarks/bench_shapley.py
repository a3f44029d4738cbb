"""KernelSHAP vs exact Shapley values at equal model-evaluation budgets: lumos (with and
without its James–Stein shrinkage), shap's KernelExplainer (default l1_reg and l1_reg=False)
and Captum's KernelShap, on an MLP with 14 features. Prints a table, writes
benchmarks/results/shapley.{json,md}.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_shapley.py
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import lumos

sys.path.insert(0, str(Path(__file__).parent))
from common import timed

RESULTS = Path(__file__).parent / "results"
N_FEATURES, N_EXAMPLES, TARGET = 14, 16, 1
SEEDS = range(10)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(N_FEATURES, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)
    ).eval()


def relative_error(estimate: np.ndarray, exact: np.ndarray) -> float:
    """Mean over examples of ‖φ̂ − φ‖² / ‖φ‖²."""
    return float(np.mean(((estimate - exact) ** 2).sum(1) / (exact**2).sum(1)))


def compare(model, x, reference, phi, budget, f_numpy) -> list[dict]:
    """Every estimator at one budget, interleaved seed by seed."""
    import shap
    from captum.attr import KernelShap

    explainer = shap.KernelExplainer(f_numpy, reference.numpy())
    captum = KernelShap(model)
    names = (
        "lumos kernel_shap",
        "lumos kernel_shap (shrink=False)",
        "shap KernelExplainer (default l1_reg)",
        "shap KernelExplainer (l1_reg=False)",
        "captum KernelShap",
    )
    errors = {name: [] for name in names}
    seconds = {name: [] for name in names}
    stderr, actual, delta = [], [], []
    for seed in SEEDS:
        for name, shrink in ((names[0], True), (names[1], False)):
            exp, t = timed(
                lambda seed=seed, shrink=shrink: lumos.explain(
                    model,
                    x,
                    method="kernel_shap",
                    target=TARGET,
                    baselines=reference,
                    n_samples=budget,
                    seed=seed,
                    shrink=shrink,
                )
            )
            estimate = exp.extras["phi"].numpy()
            errors[name].append(relative_error(estimate, phi))
            seconds[name].append(t)
            if shrink:
                stderr.append(float(exp.extras["stderr"].pow(2).mean().sqrt()))
                actual.append(float(np.sqrt(((estimate - phi) ** 2).mean())))
                delta.append(float(exp.delta.abs().max()))
        for name, l1_reg in ((names[2], "num_features(10)"), (names[3], False)):
            np.random.seed(seed)
            values, t = timed(
                lambda l1_reg=l1_reg: explainer.shap_values(
                    x.numpy(), nsamples=budget, silent=True, l1_reg=l1_reg
                )
            )
            errors[name].append(relative_error(np.asarray(values), phi))
            seconds[name].append(t)
        torch.manual_seed(seed)
        values, t = timed(
            lambda: torch.cat(
                [
                    captum.attribute(
                        x[i : i + 1],
                        baselines=reference,
                        target=TARGET,
                        n_samples=budget,
                        perturbations_per_eval=budget,
                    )
                    for i in range(N_EXAMPLES)
                ]
            ).numpy()
        )
        errors[names[4]].append(relative_error(values, phi))
        seconds[names[4]].append(t)
    rows = [
        {
            "budget": budget,
            "method": name,
            "relative_sq_error": float(np.mean(errors[name])),
            "relative_sq_error_sem": float(np.std(errors[name]) / np.sqrt(len(SEEDS))),
            "seconds": float(np.median(seconds[name])),
        }
        for name in names
    ]
    rows[0].update(
        stderr_rms=float(np.mean(stderr)),
        actual_rms_error=float(np.mean(actual)),
        max_abs_efficiency_delta=max(delta),
    )
    return rows


def main() -> None:
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    model = mlp()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(N_EXAMPLES, N_FEATURES, generator=generator)
    reference = torch.randn(200, N_FEATURES, generator=generator).mean(0, keepdim=True)
    exact = lumos.explain(model, x, method="exact_shapley", target=TARGET, baselines=reference)
    phi = exact.extras["phi"].numpy()

    def f_numpy(rows: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.as_tensor(rows, dtype=torch.float32))[:, TARGET].double().numpy()

    rows = []
    for budget in (8 * N_FEATURES, 2 * N_FEATURES + 2048):
        rows += compare(model, x, reference, phi, budget, f_numpy)
    by_budget = {}
    for row in rows:
        by_budget.setdefault(row["budget"], {})[row["method"]] = row
    for group in by_budget.values():
        ours = group["lumos kernel_shap"]
        for row in group.values():
            row["error_ratio_lumos_over_this"] = (
                ours["relative_sq_error"] / row["relative_sq_error"]
            )
            row["time_ratio_lumos_over_this"] = ours["seconds"] / row["seconds"]
    lines = [
        f"KernelSHAP vs exact Shapley: MLP with {N_FEATURES} features, {N_EXAMPLES} examples, "
        f"one reference row; error = mean ‖φ̂ − φ‖²/‖φ‖² (lower is better), averaged over "
        f"{len(SEEDS)} seeds; seconds = one run over all examples (median over the seeds).",
        "",
        "| budget | method | rel. sq. error | seconds | lumos ÷ this (error) "
        "| lumos ÷ this (time) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['budget']} | {row['method']} | {row['relative_sq_error']:.2e} | "
            f"{row['seconds']:.3f} | {row['error_ratio_lumos_over_this']:.3f} | "
            f"{row['time_ratio_lumos_over_this']:.3f} |"
        )
    lines.append("")
    for row in rows:
        if "stderr_rms" in row:
            lines.append(
                f"lumos at budget {row['budget']}: reported stderr (rms) "
                f"{row['stderr_rms']:.2e} vs actual rms error {row['actual_rms_error']:.2e}; "
                f"max |efficiency delta| {row['max_abs_efficiency_delta']:.1e}."
            )
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "shapley.json").write_text(json.dumps(rows, indent=2))
    (RESULTS / "shapley.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
