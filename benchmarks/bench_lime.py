"""LIME on 64×64 images of the zoo `shapes` CNN: lumos vs the `lime` package at equal
num_samples and the same SLIC segmentation and hide colour, against the bare forwards the
samples need; plus the spread of the coefficients across seeds. Prints a table, writes
benchmarks/results/lime.{json,md}.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_lime.py
"""

from __future__ import annotations

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
from common import timed

RESULTS = Path(__file__).parent / "results"
N_IMAGES, N_SAMPLES, SEEDS, REPEATS = 2, 500, range(3), 3


def main() -> None:
    from lime import lime_image

    torch.set_num_threads(2)
    bundle = lumos.zoo.load("shapes")
    model = nn.Sequential(bundle.model, nn.Softmax(1)).eval()
    x, y = bundle.test_batch(N_IMAGES)[:2]
    segments = superpixels(x, "slic")  # (n, H, W), the same for both libraries
    images = x.permute(0, 2, 3, 1).double().numpy()

    def classifier(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            rows = torch.from_numpy(batch).permute(0, 3, 1, 2).float()
            return model(rows).numpy()

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
                segmentation_fn=lambda image, i=i: segments[i].numpy(),
                random_seed=seed,
            )
            weights = dict(explanation.local_exp[int(y[i])])
            coefficients.append(np.array([weights[k] for k in sorted(weights)]))
        return coefficients

    # the perturbed rows the method needs, built once outside the timing: each superpixel kept
    # or replaced by its mean colour with probability 1/2 (forward time depends a little on
    # the data, so repeated copies of the inputs would flatter the bare loop by about 4%)
    generator = torch.Generator().manual_seed(0)
    parts = []
    for i in range(N_IMAGES):
        seg = segments[i]
        n_seg = int(seg.max()) + 1
        means = torch.stack([x[i][:, seg == k].mean(1) for k in range(n_seg)])  # (S, C)
        hidden = means.T[:, seg]  # (C, H, W)
        keep = torch.rand(N_SAMPLES, n_seg, generator=generator) < 0.5
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
    lumos_runs = [run_lumos(seed).extras["coefficients"].numpy() for seed in SEEDS]
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
        f"LIME, zoo `shapes` CNN, {N_IMAGES} images 64×64, {N_SAMPLES} samples each, the same "
        "SLIC superpixels and hide colour (segment means); CPU, 2 threads; median of "
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
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lime.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "lime.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
