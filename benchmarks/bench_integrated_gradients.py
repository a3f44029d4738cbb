"""Integrated gradients, 50 steps: lumos ÷ a bare batched forward+backward over the same
interpolated inputs, and ÷ Captum's IntegratedGradients — interleaved in one process — plus
peak memory at a given batch_size (each in a fresh subprocess).

Run: .venv/bin/python benchmarks/bench_integrated_gradients.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved, resnet18, save

import lumos
from lumos.attribution.gradient import integration_rule

N_STEPS = 50


def bare_ig(model, x, target, n_steps, batch_size):
    """The floor: the same interpolated rows through one forward+backward, nothing else."""
    points, weights = integration_rule("gauss_legendre", n_steps)
    alphas = torch.as_tensor(points, dtype=x.dtype)
    weights = torch.as_tensor(weights, dtype=x.dtype)
    rows = (alphas.view(-1, 1, 1, 1, 1) * x).reshape(-1, *x.shape[1:])
    targets = target.repeat(n_steps)
    grads = []
    for start in range(0, len(rows), batch_size or len(rows)):
        chunk = rows[start : start + (batch_size or len(rows))].requires_grad_(True)
        out = model(chunk).gather(1, targets[start : start + len(chunk), None]).sum()
        grads.append(torch.autograd.grad(out, chunk)[0])
    g = torch.cat(grads).reshape(n_steps, *x.shape)
    return x * (weights.view(-1, 1, 1, 1, 1) * g).sum(0)


def models():
    shapes = lumos.zoo.load("shapes")
    x, y, _ = shapes.test_batch(8)
    yield "shapes CNN, 8×3×64×64", shapes.model, x, y, None
    net = resnet18()
    x = torch.rand(2, 3, 128, 128)
    yield "ResNet-18, 2×3×128×128", net, x, torch.tensor([1, 2]), 50


def time_one(label, model, x, y, batch_size) -> dict:
    from captum.attr import IntegratedGradients as CaptumIG

    for p in model.parameters():
        p.requires_grad_(False)  # all three differentiate w.r.t. inputs only
    captum = CaptumIG(model)
    times = interleaved(
        {
            "lumos": lambda: lumos.explain(
                model,
                x,
                method="integrated_gradients",
                target=y,
                n_steps=N_STEPS,
                batch_size=batch_size,
            ),
            "bare": lambda: bare_ig(model, x, y, N_STEPS, batch_size),
            "captum": lambda: captum.attribute(
                x,
                target=y,
                n_steps=N_STEPS,
                method="gausslegendre",
                internal_batch_size=batch_size,
            ),
        },
        repeats=5,
    )
    return {
        "model": label,
        "batch_size": batch_size,
        **{f"{k}_s": v for k, v in times.items()},
        "lumos/bare": times["lumos"] / times["bare"],
        "lumos/captum": times["lumos"] / times["captum"],
    }


def memory(which: str) -> float:
    """Peak extra RSS (MiB) of one IG call on the ResNet at batch_size=50, in a fresh process."""
    code = f"""
import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
import torch, lumos
from common import resnet18, peak_rss_mb
from bench_integrated_gradients import bare_ig
torch.set_num_threads(2)
net = resnet18(); x = torch.rand(2, 3, 128, 128); y = torch.tensor([1, 2])
for p in net.parameters(): p.requires_grad_(False)
net(x[:1]); before = peak_rss_mb()
if {which!r} == "lumos":
    lumos.explain(net, x, method="integrated_gradients", target=y, n_steps=50, batch_size=50)
elif {which!r} == "bare":
    bare_ig(net, x, y, 50, 50)
else:
    from captum.attr import IntegratedGradients
    IntegratedGradients(net).attribute(x, target=y, n_steps=50, internal_batch_size=50)
print(peak_rss_mb() - before)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    torch.set_num_threads(2)
    mem = {which: memory(which) for which in ("lumos", "bare", "captum")}
    rows = [time_one(*case) for case in models()]
    lines = [
        "| model | batch_size | lumos s | bare fwd+bwd s | captum s | lumos ÷ bare "
        "| lumos ÷ captum |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {r['lumos_s']:.3f} | {r['bare_s']:.3f} | "
            f"{r['captum_s']:.3f} | {r['lumos/bare']:.3f} | {r['lumos/captum']:.3f} |"
        )
    lines += [
        "",
        "Peak extra memory, ResNet-18, 2 images × 50 steps, batch_size=50 (MiB of RSS): "
        + ", ".join(f"{k} {v:.0f}" for k, v in mem.items()),
        "",
    ]
    save("integrated_gradients", {"timing": rows, "peak_extra_rss_mib": mem}, "\n".join(lines))


if __name__ == "__main__":
    main()
