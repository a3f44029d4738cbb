"""LIME on images: lumos vs the `lime` package at equal num_samples and the same SLIC
segmentation and hide colour, against the bare forwards the samples need; plus the spread of
the coefficients across seeds. Two models: the zoo `shapes` CNN on 2 of its 64×64 images
(default), or `--model resnet18`, a ResNet-18 (plain torch, random weights) on 2 of
scikit-image's photos at 224×224, where the per-sample work around the model grows with the
image. `--device cuda` runs every contestant's model calls on the GPU. Prints a table, writes
benchmarks/results/lime[_resnet18][_cuda].{json,md}.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_lime.py [--model resnet18] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

import lumos
from lumos.attribution.lime import superpixels
from lumos.core.batching import rows_per_call

sys.path.insert(0, str(Path(__file__).parent))
from common import add_device_option, describe, resnet18, result_name, setup_device, timed

RESULTS = Path(__file__).parent / "results"
N_IMAGES, N_SAMPLES, SEEDS, REPEATS = 2, 500, range(3), 3


def load(model_name: str, device: torch.device):
    """(softmax model, images (n, 3, H, W), classes, label) on `device`."""
    if model_name == "shapes":
        bundle = lumos.zoo.load("shapes")
        x, y = bundle.test_batch(N_IMAGES)[:2]
        model = nn.Sequential(bundle.model, nn.Softmax(1)).eval().to(device)
        return model, x.to(device), y.to(device), "zoo `shapes` CNN, 64×64 images"
    model = nn.Sequential(resnet18(), nn.Softmax(1)).eval().to(device)
    x = torch.stack([lumos.zoo.image(name, 224) for name in ("astronaut", "chelsea")])
    x = x[:N_IMAGES].to(device)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y, "ResNet-18 (random weights), 224×224 photos"


def main() -> None:
    from lime import lime_image

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("shapes", "resnet18"), default="shapes")
    add_device_option(parser)
    args = parser.parse_args()
    device = setup_device(args.device)
    model, x, y, label = load(args.model, device)
    segments = superpixels(x, "slic")  # (n, H, W), the same for both libraries
    images = x.permute(0, 2, 3, 1).double().cpu().numpy()

    def classifier(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            rows = torch.from_numpy(batch).permute(0, 3, 1, 2).float().to(device)
            return model(rows).cpu().numpy()

    def run_lumos(seed: int = 0):
        return lumos.explain(
            model,
            x,
            method="lime",
            target=y,
            feature_mask=segments.unsqueeze(1),
            n_samples=N_SAMPLES,
            seed=seed,
        )

    def run_lime(seed: int = 0) -> list[np.ndarray]:
        explainer = lime_image.LimeImageExplainer(random_state=seed)
        coefficients = []
        for i in range(N_IMAGES):
            explanation = explainer.explain_instance(
                images[i],
                classifier,
                labels=(int(y[i]),),
                top_labels=None,
                hide_color=None,
                num_samples=N_SAMPLES,
                segmentation_fn=lambda image, i=i: segments[i].cpu().numpy(),
                random_seed=seed,
            )
            weights = dict(explanation.local_exp[int(y[i])])
            coefficients.append(np.array([weights[k] for k in sorted(weights)]))
        return coefficients

    # the perturbed rows the method needs, built once outside the timing: each superpixel kept
    # or replaced by its mean colour with probability 1/2 (forward time depends a little on
    # the data, so repeated copies of the inputs would flatter the bare loop by about 4%)
    generator = torch.Generator().manual_seed(0)  # on the CPU, as lumos draws
    parts = []
    for i in range(N_IMAGES):
        seg = segments[i]
        n_seg = int(seg.max()) + 1
        means = torch.stack([x[i][:, seg == k].mean(1) for k in range(n_seg)])  # (S, C)
        hidden = means.T[:, seg]  # (C, H, W)
        keep = (torch.rand(N_SAMPLES, n_seg, generator=generator) < 0.5).to(device)
        parts.append(torch.where(keep[:, seg].unsqueeze(1), x[i], hidden))
    perturbed = torch.cat(parts)

    def bare_forwards() -> None:
        rows = perturbed
        with torch.no_grad():
            model(x)  # the outputs on the inputs (the target), which every explanation needs
            step = rows_per_call(None, (x,))  # lumos' default chunk on this device
            for start in range(0, len(rows), step):
                model(rows[start : start + step])

    run_lumos(), bare_forwards()  # warm-up
    times = {"lumos": [], "lime": [], "bare": []}
    for _ in range(REPEATS):  # interleaved
        times["lumos"].append(timed(run_lumos)[1])
        times["lime"].append(timed(run_lime)[1])
        times["bare"].append(timed(bare_forwards)[1])
    seconds = {k: float(np.median(v)) for k, v in times.items()}

    # stability: spread of each segment's coefficient across seeds, relative to its size
    lumos_runs = [run_lumos(seed).extras["coefficients"].cpu().numpy() for seed in SEEDS]
    lime_runs = [run_lime(seed) for seed in SEEDS]

    def spread(runs_per_image: list[np.ndarray]) -> float:
        values = []
        for stack in runs_per_image:
            values.append(stack.std(0).mean() / np.abs(stack.mean(0)).mean())
        return float(np.mean(values))

    lumos_stack = [
        np.stack([run[i, : int(segments[i].max()) + 1] for run in lumos_runs])
        for i in range(N_IMAGES)
    ]
    lime_stack = [np.stack([run[i] for run in lime_runs]) for i in range(N_IMAGES)]
    agreement = float(
        np.mean([np.corrcoef(a.mean(0), b.mean(0))[0, 1] for a, b in zip(lumos_stack, lime_stack)])
    )
    same_seed = bool(torch.equal(run_lumos(3).attributions, run_lumos(3).attributions))
    result = {
        "model": label,
        "device": describe(device),
        "images": N_IMAGES,
        "num_samples": N_SAMPLES,
        "segments_per_image": [int(s.max()) + 1 for s in segments],
        "seconds": seconds,
        "lumos_over_lime": seconds["lumos"] / seconds["lime"],
        "lumos_over_bare_forwards": seconds["lumos"] / seconds["bare"],
        "lime_over_bare_forwards": seconds["lime"] / seconds["bare"],
        "relative_spread_across_seeds": {
            "lumos": spread(lumos_stack),
            "lime": spread(lime_stack),
        },
        "correlation_of_mean_coefficients_lumos_vs_lime": agreement,
        "same_seed_same_result_lumos": same_seed,
    }
    lines = [
        f"LIME, {label}, {N_IMAGES} images, {N_SAMPLES} samples each, the same SLIC "
        f"superpixels and hide colour (segment means); {describe(device)}; median of "
        f"{REPEATS} interleaved runs.",
        "",
        "| | lumos | lime | bare forwards |",
        "|---|---:|---:|---:|",
        f"| seconds | {seconds['lumos']:.2f} | {seconds['lime']:.2f} | {seconds['bare']:.2f} |",
        f"| ÷ bare forwards | {result['lumos_over_bare_forwards']:.2f} | "
        f"{result['lime_over_bare_forwards']:.2f} | 1.00 |",
        f"| relative spread across {len(SEEDS)} seeds | "
        f"{result['relative_spread_across_seeds']['lumos']:.3f} | "
        f"{result['relative_spread_across_seeds']['lime']:.3f} | |",
        "",
        f"lumos ÷ lime time: {result['lumos_over_lime']:.2f}. Mean coefficients agree "
        f"(correlation {agreement:.3f}); lumos: same seed → identical result: {same_seed}.",
    ]
    table = "\n".join(lines)
    print(table)
    name = result_name("lime" if args.model == "shapes" else f"lime_{args.model}", device)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"{name}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
