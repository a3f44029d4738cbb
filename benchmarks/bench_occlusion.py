"""Occlusion on 64×64 images of the zoo `shapes` CNN: lumos vs Captum's `Occlusion` with the
same windows (8×8, stride 4: 225 windows), each against the bare forwards it needs. Prints a
table, writes benchmarks/results/occlusion.{json,md}.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_occlusion.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

import lumos
from lumos.core.batching import rows_per_call

sys.path.insert(0, str(Path(__file__).parent))
from common import add_device_option, describe, result_name, setup_device, timed

RESULTS = Path(__file__).parent / "results"
N_IMAGES, WINDOW, STRIDE, REPEATS = 8, 8, 4, 3


def main() -> None:
    from captum.attr import Occlusion

    parser = argparse.ArgumentParser()
    add_device_option(parser)
    device = setup_device(parser.parse_args().device)
    bundle = lumos.zoo.load("shapes")
    model = bundle.model.to(device)
    x, y = (t.to(device) for t in bundle.test_batch(N_IMAGES)[:2])
    positions = ((64 - WINDOW) // STRIDE + 1) ** 2

    def run_lumos():
        return lumos.explain(
            model, x, method="occlusion", target=y, window=WINDOW, stride=STRIDE
        ).attributions

    def run_captum(per_eval: int):
        return Occlusion(model).attribute(
            x,
            sliding_window_shapes=(3, WINDOW, WINDOW),
            strides=(3, STRIDE, STRIDE),
            target=y,
            baselines=0.0,
            perturbations_per_eval=per_eval,
        )

    def bare_forwards() -> None:
        rows = x.repeat_interleave(positions, 0)
        with torch.no_grad():
            model(x)
            step = rows_per_call(None, (x,))  # lumos' default chunk on this device
            for start in range(0, len(rows), step):
                model(rows[start : start + step])

    ours, captum = run_lumos(), run_captum(1)
    max_difference = float((ours - captum).abs().max())
    runs = {
        "lumos": run_lumos,
        "captum (perturbations_per_eval=1, default)": lambda: run_captum(1),
        "captum (perturbations_per_eval=64)": lambda: run_captum(64),
        "bare forwards": bare_forwards,
    }
    times = {name: [] for name in runs}
    for _ in range(REPEATS):  # interleaved
        for name, fn in runs.items():
            times[name].append(timed(fn)[1])
    seconds = {name: float(np.median(t)) for name, t in times.items()}
    bare = seconds["bare forwards"]
    rows = [
        {
            "method": name,
            "seconds": s,
            "lumos_over_this": seconds["lumos"] / s,
            "this_over_bare_forwards": s / bare,
        }
        for name, s in seconds.items()
    ]
    result = {
        "device": describe(device),
        "images": N_IMAGES,
        "windows_per_image": positions,
        "max_abs_difference_lumos_vs_captum": max_difference,
        "rows": rows,
    }
    lines = [
        f"Occlusion, zoo `shapes` CNN, {N_IMAGES} images 64×64, window {WINDOW}, stride "
        f"{STRIDE} ({positions} windows per image); {describe(device)}; median of {REPEATS} "
        f"interleaved runs. Max |lumos − captum| = {max_difference:.1e}.",
        "",
        "| | seconds | lumos ÷ this | ÷ bare forwards |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['seconds']:.2f} | {row['lumos_over_this']:.2f} | "
            f"{row['this_over_bare_forwards']:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    name = result_name("occlusion", device)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"{name}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
