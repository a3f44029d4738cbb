"""CAM benchmark: Grad-CAM, Score-CAM and Ablation-CAM on a ResNet-18-sized plain-torch CNN.

For each method and batch size: lumos time ÷ pytorch-grad-cam (when it imports; it needs
torchvision only for image utilities and detection targets, which are stubbed here so its CAM
classes can be timed without installing torchvision), ÷ a straightforward per-channel reference
in torch, and ÷ the bare forwards/backwards the method needs. Also the top-k Score-CAM variant:
its time and its agreement (Spearman rank correlation of the maps) with full Score-CAM.
Measured interleaved in one process, the fastest of repeats, CPU with 2 threads (or
`--device cuda`). Score-CAM's
straightforward reference runs only when pytorch-grad-cam is missing (it is the same loop).

    PYTHONPATH=src .venv/bin/python benchmarks/bench_cam.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

import lumos

sys.path.insert(0, str(Path(__file__).parent))
from common import ResNet18, add_device_option, describe, result_name, setup_device, timed

RESULTS = Path(__file__).parent / "results"


# -- references: per-channel loops in torch, the pytorch-grad-cam algorithms ----------------
def capture(model, layer, x, grad=False):
    store = {}

    def hook(module, args, out):
        store["a"] = out

    handle = layer.register_forward_hook(hook)
    try:
        with torch.set_grad_enabled(grad):
            out = model(x)
    finally:
        handle.remove()
    return out, store["a"]


def reference_grad_cam(model, layer, x, y):
    out, a = capture(model, layer, x, grad=True)
    (g,) = torch.autograd.grad(out[torch.arange(len(x)), y].sum(), a)
    cam = (g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True).clamp(min=0)
    return F.interpolate(cam.detach(), size=x.shape[-2:], mode="bilinear")


def reference_score_cam(model, layer, x, y, batch_size=64):
    _, a = capture(model, layer, x)
    maps = []
    for i in range(len(x)):
        up = F.interpolate(a[i : i + 1].transpose(0, 1), size=x.shape[-2:], mode="bilinear")
        low = up.flatten(1).amin(1).view(-1, 1, 1, 1)
        high = up.flatten(1).amax(1).view(-1, 1, 1, 1)
        masks = (up - low) / (high - low + 1e-8)
        scores = []
        with torch.no_grad():
            for k in range(0, len(masks), batch_size):
                scores.append(model(x[i : i + 1] * masks[k : k + batch_size])[:, y[i]])
        w = torch.softmax(torch.cat(scores), 0)
        maps.append((w[:, None, None] * a[i]).sum(0))
    cam = torch.stack(maps).unsqueeze(1).clamp(min=0)
    return F.interpolate(cam, size=x.shape[-2:], mode="bilinear")


def reference_ablation_cam(model, layer, x, y, batch_size=64):
    with torch.no_grad():
        out, a = capture(model, layer, x)
        base = out[torch.arange(len(x)), y]
        c = a.shape[1]
        maps = []
        for i in range(len(x)):
            drops = []
            for k in range(0, c, batch_size):
                channels = torch.arange(k, min(k + batch_size, c))

                def ablate(module, args, output, channels=channels):
                    output = output.repeat(len(channels), 1, 1, 1)
                    output[torch.arange(len(channels)), channels] = 0
                    return output

                handle = layer.register_forward_hook(ablate)
                try:
                    drops.append(model(x[i : i + 1])[:, y[i]])
                finally:
                    handle.remove()
            w = (base[i] - torch.cat(drops)) / base[i].abs()
            maps.append((w[:, None, None] * a[i]).sum(0))
    cam = torch.stack(maps).unsqueeze(1).clamp(min=0)
    return F.interpolate(cam, size=x.shape[-2:], mode="bilinear")


# -- bare work each method needs ----------------------------------------------------------
def bare_grad_cam(model, layer, x, y):
    """One forward, one backward to the layer."""
    out, a = capture(model, layer, x, grad=True)
    torch.autograd.grad(out[torch.arange(len(x)), y].sum(), a)


def bare_score_cam(model, layer, x, y, masked):
    """One forward for the activations, then one forward per channel (prebuilt masked rows)."""
    capture(model, layer, x)
    with torch.no_grad():
        for k in range(0, len(masked), 64):
            model(masked[k : k + 64])


def bare_ablation_cam(model, layer, x, y, tail, ablated):
    """One forward for the activations, then the network after the layer once per channel."""
    capture(model, layer, x)
    with torch.no_grad():
        for k in range(0, len(ablated), 64):
            tail(ablated[k : k + 64])


def pytorch_grad_cam():
    """The pytorch-grad-cam module, with torchvision stubbed if only that is missing."""
    try:
        import pytorch_grad_cam as module

        return module
    except ModuleNotFoundError as exc:
        if "torchvision" not in str(exc):
            return None
    tv = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    for name in ("Compose", "Normalize", "ToTensor"):
        setattr(transforms, name, object)
    functional.resize = None
    tv.transforms, transforms.functional = transforms, functional
    sys.modules.update(
        {
            "torchvision": tv,
            "torchvision.transforms": transforms,
            "torchvision.transforms.functional": functional,
        }
    )
    try:
        import pytorch_grad_cam as module

        return module
    except ImportError:
        return None


def peer(cls, model, layer, x, targets, batch_size=None):
    """One pytorch-grad-cam call; its hooks are removed afterwards, so they never slow the
    other contestants down."""
    with cls(model=model, target_layers=[layer]) as cam:
        if batch_size is not None:
            cam.batch_size = batch_size
        return cam(input_tensor=x, targets=targets)


def best_times(fns: dict, repeats: int) -> tuple[dict, dict]:
    """The fastest of `repeats` interleaved runs of every function (robust to other load on
    the machine), and each function's last result."""
    times, results = {k: [] for k in fns}, {}
    for _ in range(repeats):
        for name, fn in fns.items():
            results[name], seconds = timed(fn)
            times[name].append(seconds)
    return {k: min(v) for k, v in times.items()}, results


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.flatten().argsort().argsort().double()
    rb = b.flatten().argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    parser.add_argument("--size", type=int, help="image side (default 96; 64 with --quick)")
    add_device_option(parser)
    args = parser.parse_args()
    device = setup_device(args.device)
    torch.manual_seed(0)
    size = args.size or (64 if args.quick else 96)
    model = ResNet18(n_classes=10).eval().to(device)
    gc = pytorch_grad_cam()
    rows = []
    for n in (1, 2) if args.quick else (1, 2, 8):
        rows += bench_batch(model, gc, n, size, args.quick)
    save(rows, size, gc is not None, device)


def bench_batch(model, gc, n: int, size: int, quick: bool) -> list[dict]:
    """Every method on a batch of `n` random images."""
    layer, rows = model.layer4, []
    device = next(model.parameters()).device
    x = torch.rand(n, 3, size, size).to(device)
    with torch.no_grad():
        y = model(x).argmax(1)
    targets = None
    if gc is not None:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        targets = [ClassifierOutputTarget(int(c)) for c in y]

    fns = {
        "lumos": lambda: lumos.explain(model, x, method="grad_cam", target=y, layer="layer4"),
        "bare": lambda: bare_grad_cam(model, layer, x, y),
        "reference": lambda: reference_grad_cam(model, layer, x, y),
    }
    if gc is not None:
        fns["pytorch-grad-cam"] = lambda: peer(gc.GradCAM, model, layer, x, targets)
    rows.append(record("grad_cam", n, size, best_times(fns, 3 if quick else 15)[0]))
    if n == 8:  # the per-channel methods cost one forward per channel and example
        return rows

    _, a = capture(model, layer, x)
    up = F.interpolate(a.flatten(0, 1)[:, None], size=(size, size), mode="bilinear")
    masked = x.repeat_interleave(a.shape[1], 0) * up
    fns = {
        "lumos": lambda: lumos.explain(
            model, x, method="score_cam", target=y, layer="layer4", upsample=False
        ),
        "bare": lambda: bare_score_cam(model, layer, x, y, masked),
        "lumos top_k=64": lambda: lumos.explain(
            model, x, method="score_cam", target=y, layer="layer4", upsample=False, top_k=64
        ),
    }
    if gc is not None:
        fns["pytorch-grad-cam"] = lambda: peer(gc.ScoreCAM, model, layer, x, targets, 64)
    else:
        fns["reference"] = lambda: reference_score_cam(model, layer, x, y)
    times, results = best_times(fns, 1 if quick else 2)
    row = record("score_cam", n, size, times)
    full = results["lumos"].attributions
    for k in (32, 64, 128):
        fast = results.get(f"lumos top_k={k}") or lumos.explain(
            model, x, method="score_cam", target=y, layer="layer4", upsample=False, top_k=k
        )
        agreement = [spearman(f, g) for f, g in zip(full, fast.attributions)]
        row[f"top_k={k} spearman"] = round(statistics.mean(agreement), 3)
    rows.append(row)

    ablated = a.repeat_interleave(a.shape[1], 0)
    ablated[torch.arange(len(ablated)), torch.arange(a.shape[1]).repeat(n).to(device)] = 0

    def tail(rows):
        return model.fc(torch.flatten(model.avgpool(rows), 1))

    fns = {
        "lumos": lambda: lumos.explain(model, x, method="ablation_cam", target=y, layer="layer4"),
        "bare": lambda: bare_ablation_cam(model, layer, x, y, tail, ablated),
        "reference": lambda: reference_ablation_cam(model, layer, x, y),
    }
    if gc is not None:
        fns["pytorch-grad-cam"] = lambda: peer(gc.AblationCAM, model, layer, x, targets, 64)
    rows.append(record("ablation_cam", n, size, best_times(fns, 1 if quick else 2)[0]))
    return rows


def record(method: str, n: int, size: int, times: dict) -> dict:
    row = {"method": method, "batch": n, "image": size}
    row.update({f"{k} s": round(v, 4) for k, v in times.items()})
    if "reference" in times:
        row["÷ reference"] = round(times["lumos"] / times["reference"], 3)
    row["÷ bare"] = round(times["lumos"] / times["bare"], 3)
    if "pytorch-grad-cam" in times:
        row["÷ pytorch-grad-cam"] = round(times["lumos"] / times["pytorch-grad-cam"], 3)
    if "lumos top_k=64" in times:
        row["top_k=64 ÷ full"] = round(times["lumos top_k=64"] / times["lumos"], 3)
    print(row, flush=True)
    return row


def save(rows: list[dict], size: int, with_peer: bool, device: torch.device) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": f"ResNet-18 (plain torch), layer4 (512 channels), {size}×{size} inputs",
        "device": describe(device),
        "pytorch-grad-cam": with_peer,
        "torch": torch.__version__,
        "load average": [round(v, 1) for v in os.getloadavg()],
    }
    name = result_name("cam", device)
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    keys = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    lines = [
        f"CAM family — {meta['model']}, {meta['device']}; fastest of interleaved repeats.",
        "",
        "| " + " | ".join(keys) + " |",
        "|" + "---|" * len(keys),
    ]
    lines += ["| " + " | ".join(str(row.get(k, "")) for k in keys) + " |" for row in rows]
    lines += [
        "",
        f"Load average during the run: {meta['load average']}; with other jobs running on the",
        "CPU single timings vary by ±50%, so read ratios near 1 as equal. What each runs, n images",
        "and C = 512 channels: Grad-CAM — lumos, bare and the peer one forward + one backward to",
        "the layer; Score-CAM — n + n·C forwards for all three (lumos: constant channels share one",
        "forward); Ablation-CAM — lumos one forward + n·C runs of the part after the layer",
        "(torch.fx tail), the peer and the reference n + n·C full forwards. Spearman: rank",
        "correlation of top-k Score-CAM maps with full Score-CAM at layer resolution.",
    ]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
