"""Trust metrics: lumos vs Quantus (and a per-instance reference loop) on a batch of images.

Three workloads on the zoo's `shapes` model (64×64 RGB, a small residual CNN), saliency maps:
  * pixel flipping / deletion: 32 removal steps per image (lumos `pixel_flipping`, Quantus
    `PixelFlipping(features_in_step=…)`, and a straightforward per-image, per-step loop);
  * max-sensitivity: 10 uniform perturbations in an L∞ ball of 0.02, each re-explained;
  * model parameter randomisation: cascading, every layer, re-explained after each.
Each is also divided by the bare forwards (or forward + backward passes) it needs, run as
plain batched calls. Timings are interleaved in one process (median of `--repeats`), wall-clock
with queued GPU work synchronized. `--device cuda` runs every contestant's model on the GPU
(Quantus still takes its batches as NumPy arrays) and writes results/metrics_cuda.{json,md}.

    PYTHONPATH=src python benchmarks/bench_metrics.py [--n 64] [--repeats 3] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

import lumos
import lumos.metrics as M
from lumos.metrics.randomisation import parameter_layers

sys.path.insert(0, str(Path(__file__).parent))
from common import add_device_option, describe, result_name, save, setup_device, timed

STEPS, SAMPLES, RADIUS = 32, 10, 0.02


def bare_forwards(model, x: torch.Tensor, rows: int, batch_size: int) -> None:
    """`rows` forward rows in batches, no metric logic."""
    with torch.no_grad():
        for start in range(0, rows, batch_size):
            n = min(batch_size, rows - start)
            index = torch.arange(start, start + n, device=x.device) % len(x)
            model(x[index])


def bare_gradients(model, x: torch.Tensor, rows: int, batch_size: int) -> None:
    """`rows` forward + backward rows (what saliency needs), in batches."""
    for start in range(0, rows, batch_size):
        n = min(batch_size, rows - start)
        index = torch.arange(start, start + n, device=x.device) % len(x)
        xs = x[index].clone().requires_grad_(True)
        torch.autograd.grad(model(xs)[:, 0].sum(), xs)


def reference_pixel_flipping(model, x, maps, y) -> np.ndarray:
    """A per-image, per-step loop: the shape of most reference implementations."""
    curves = []
    for i in range(len(x)):
        order = maps[i].sum(0).flatten().argsort(descending=True)
        row = []
        for k in range(STEPS + 1):
            xi = x[i].clone().view(x.shape[1], -1)
            xi[:, order[: round(k / STEPS * order.numel())]] = 0.0
            with torch.no_grad():
                row.append(model(xi.view(1, *x.shape[1:]))[0, y[i]].item())
        curves.append(row)
    return np.asarray(curves)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    add_device_option(parser)
    args = parser.parse_args()
    device = setup_device(args.device)
    warnings.filterwarnings("ignore")
    bundle = lumos.zoo.load("shapes")
    model = bundle.model.eval().to(device)
    x, y, _ = bundle.test_batch(args.n, seed=0)
    x, y = x.to(device), y.to(device)
    saliency = lumos.explain(model, x, method="saliency", target=y).attributions
    n_layers = len(parameter_layers(model, x))
    pixels = x.shape[-1] * x.shape[-2]
    batch = 256
    try:
        import quantus
    except ImportError:
        quantus = None

    def quantus_explain(model, inputs, targets, **kwargs):
        """Saliency for Quantus: NumPy batches in and out, the model's work on `device`."""
        xs = torch.as_tensor(inputs, device=device).requires_grad_(True)
        rows = torch.arange(len(xs), device=device)
        out = model(xs)[rows, torch.as_tensor(targets, device=device)]
        return torch.autograd.grad(out.sum(), xs)[0].abs().sum(1, keepdim=True).cpu().numpy()

    # Quantus takes NumPy arrays on the host and one relevance per pixel: (B, 1, H, W)
    xn, yn = x.cpu().numpy(), y.cpu().numpy()
    an = saliency.sum(1, keepdim=True).cpu().numpy()
    # what every Quantus metric is called with
    on_batch = {"model": model, "x_batch": xn, "y_batch": yn, "a_batch": an}
    on_batch |= {"device": str(device), "batch_size": batch}
    workloads = {
        "pixel_flipping": {
            "lumos": lambda: M.pixel_flipping(
                model, x, saliency, target=y, n_steps=STEPS, batch_size=batch
            ),
            "reference loop": lambda: reference_pixel_flipping(model, x, saliency, y),
            "quantus": quantus
            and (
                lambda: quantus.PixelFlipping(
                    features_in_step=pixels // STEPS,
                    perturb_baseline="black",
                    normalise=False,
                    return_auc_per_sample=False,
                    disable_warnings=True,
                )(**on_batch, softmax=False)
            ),
            "bare": lambda: bare_forwards(model, x, args.n * (STEPS + 1), batch),
            "passes": f"{args.n * (STEPS + 1)} forward rows",
        },
        "max_sensitivity": {
            "lumos": lambda: M.max_sensitivity(
                model,
                x,
                "saliency",
                target=y,
                attributions=saliency,
                n_samples=SAMPLES,
                radius=RADIUS,
                batch_size=batch,
            ),
            "quantus": quantus
            and (
                lambda: quantus.MaxSensitivity(
                    nr_samples=SAMPLES,
                    lower_bound=RADIUS,
                    disable_warnings=True,
                )(**on_batch, explain_func=quantus_explain)
            ),
            "bare": lambda: bare_gradients(model, x, args.n * SAMPLES, batch),
            "passes": f"{args.n * SAMPLES} forward+backward rows",
        },
        "model_randomisation": {
            # Quantus's MPRT compares |maps| by Spearman correlation only; so does this run
            "lumos": lambda: M.sanity_check(
                model, x, y, methods=["saliency"], measures=("spearman_abs",)
            ),
            "quantus": quantus
            and (
                lambda: quantus.MPRT(disable_warnings=True, return_average_correlation=False)(
                    **on_batch, explain_func=quantus_explain
                )
            ),
            "bare": lambda: bare_gradients(model, x, args.n * (n_layers + 1), batch),
            "passes": f"{args.n * (n_layers + 1)} forward+backward rows ({n_layers} layers)",
        },
    }
    rows = []
    for name, work in workloads.items():
        contenders = {k: v for k, v in work.items() if k != "passes" and v}
        seconds = {k: [] for k in contenders}
        for _ in range(args.repeats):  # interleaved
            for key, fn in contenders.items():
                seconds[key].append(timed(fn)[1])
        median = {k: statistics.median(v) for k, v in seconds.items()}
        row = {"metric": name, "n_images": args.n, "passes": work["passes"]}
        row.update({f"{k} s": round(v, 4) for k, v in median.items()})
        row["lumos / bare"] = round(median["lumos"] / median["bare"], 2)
        for peer in ("quantus", "reference loop"):
            if peer in median:
                row[f"{peer} / lumos"] = round(median[peer] / median["lumos"], 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    write(rows, args, quantus, device)


def write(rows, args, quantus, device: torch.device) -> None:
    meta = {
        "device": describe(device),
        "torch": torch.__version__,
        "quantus": getattr(quantus, "__version__", None),
        "model": "zoo shapes (SmallCNN, 64×64 RGB)",
        "repeats": args.repeats,
    }
    columns = ["metric", "n_images", "passes", "lumos s", "bare s", "lumos / bare"]
    columns += [
        c
        for c in ("quantus s", "quantus / lumos", "reference loop s", "reference loop / lumos")
        if any(c in r for r in rows)
    ]
    lines = [
        f"Trust metrics on {args.n} images ({meta['model']}, {meta['device']}, Quantus "
        f"{meta['quantus']}). `x / lumos` > 1: lumos is faster.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    save(result_name("metrics", device), {"meta": meta, "rows": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
