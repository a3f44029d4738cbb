"""Propagation methods: LRP and DeepLIFT time ÷ one plain gradient of the same batch (a bare
forward+backward), and ÷ Captum's LRP / DeepLift on the same model, interleaved in one process.

LRP runs as one forward pass plus one modified backward pass, so its floor is the plain
gradient. DeepLIFT runs its (zero, shared) baseline once as one row without gradients and then
the inputs with gradients, so its floor is also about one plain gradient; Captum's runs the
inputs and baselines as one batch of twice the rows, so a gradient of that doubled batch is
reported too. `lumos` timings include everything
`lumos.explain` does (input checks, the forward pass for the target, tracing with torch.fx), so
they are also compared with `lumos.explain(method="saliency")`, which has the same overhead.
"Reused" times call one explainer object built with `reuse_trace=True` again and again
(`DeepLift(model, reuse_trace=True).explain`), as the Captum objects are used here: it keeps
the model's torch.fx trace between calls while nothing the trace read has changed, so those
times are the method's own cost without the trace.
On the CPU, times are the minimum over interleaved repeats of CPU seconds of this process
(`time.process_time`): the benchmark machine is shared, and wall-clock times there move with
other people's load (the wall-clock minima are saved in the JSON too). Every timed call comes
right after an untimed call of the same candidate (see `interleaved`). On a GPU, process time
does not see the device's work, so times are wall-clock with queued work synchronized, and each
model also runs on a larger batch so that the GPU has real work.

Run: PYTHONPATH=src .venv/bin/python benchmarks/bench_propagation.py [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    BasicBlock,
    add_device_option,
    describe,
    resnet18,
    result_name,
    save,
    setup_device,
    timed,
)

import lumos
from lumos.attribution import LRP, DeepLift

warnings.filterwarnings("ignore")


class PlainCNN(nn.Module):
    """A plain_cnn-like model of nn modules only (each used once), which Captum handles."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(nn.Linear(1024, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class DistinctReLUBlock(BasicBlock):
    """The ResNet block with one ReLU module per use (Captum's hooks reject a reused module)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu_a(self.bn1(self.conv1(x)))
        return self.relu_b(self.bn2(self.conv2(out)) + identity)


def resnet18_for_captum() -> nn.Module:
    model = resnet18()
    model.relu = nn.ReLU()
    for block in model.modules():
        if isinstance(block, BasicBlock):
            block.__class__ = DistinctReLUBlock
            block.relu_a, block.relu_b = nn.ReLU(), nn.ReLU()
    return model.eval()


def models(device: torch.device):
    """(label, model, inputs) on `device`: on the CPU also ResNet-18 at batch 8 (DeepLIFT's
    one-row reference pass is a third of the rows at batch 2); on a GPU a larger batch for
    each model."""
    torch.manual_seed(0)
    plain_cnn, plain_x = PlainCNN().eval(), torch.rand(16, 3, 64, 64)
    resnet, resnet_x = resnet18_for_captum(), torch.rand(2, 3, 112, 112)
    batches = [("plain CNN", plain_cnn, plain_x), ("ResNet-18", resnet, resnet_x)]
    if device.type == "cpu":
        batches.append(("ResNet-18", resnet, torch.rand(8, 3, 112, 112)))
    else:
        batches += [
            ("plain CNN", plain_cnn, torch.rand(256, 3, 64, 64)),
            ("ResNet-18", resnet, torch.rand(64, 3, 224, 224)),
        ]
    for name, model, x in batches:
        yield f"{name}, {'×'.join(map(str, x.shape))}", model.to(device), x.to(device)


def interleaved(candidates: dict, repeats: int = 5) -> tuple[dict, dict]:
    """Minimum CPU and wall seconds (queued GPU work included) of each candidate, run
    round-robin; each timed call follows an untimed call of the same candidate, so that what
    the candidate before it left behind in the allocator does not land on its time (glibc
    hands large freed blocks back to the system, and the next candidate pays page faults to
    get them again: up to 12,000 per call here, about 25 ms, depending on which candidate ran
    before). Each time is thus one call of a method used in a loop."""
    cpu: dict[str, list[float]] = {name: [] for name in candidates}
    wall: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            fn()
            start = time.process_time()
            wall[name].append(timed(fn)[1])
            cpu[name].append(time.process_time() - start)
    return {k: min(v) for k, v in cpu.items()}, {k: min(v) for k, v in wall.items()}


def gradient(model, x, target):
    rows = x.detach().requires_grad_(True)
    out = model(rows).gather(1, target[:, None]).sum()
    return torch.autograd.grad(out, rows)[0]


def time_one(label: str, model: nn.Module, x: torch.Tensor, on_cpu: bool) -> dict:
    """Seconds of every candidate on one batch, and their ratios: CPU seconds on the CPU,
    wall seconds on a GPU (where process time misses the device's work)."""
    from captum.attr import LRP as CaptumLRP
    from captum.attr import DeepLift as CaptumDeepLift

    for p in model.parameters():
        p.requires_grad_(False)
    target = model(x).argmax(1)
    doubled, doubled_target = torch.cat([x, torch.zeros_like(x)]), target.repeat(2)
    captum_lrp, captum_dl = CaptumLRP(model), CaptumDeepLift(model)
    lrp_explainer = LRP(model, composite="epsilon", reuse_trace=True)
    dl_explainer = DeepLift(model, reuse_trace=True)
    candidates = {
        "gradient": lambda: gradient(model, x, target),
        "gradient (2× rows)": lambda: gradient(model, doubled, doubled_target),
        "lumos saliency": lambda: lumos.explain(model, x, method="saliency", target=target),
        "lumos lrp epsilon": lambda: lumos.explain(
            model, x, method="lrp", target=target, composite="epsilon"
        ),
        "lumos lrp epsilon_plus": lambda: lumos.explain(model, x, method="lrp", target=target),
        "lumos lrp epsilon (reused)": lambda: lrp_explainer.explain(x, target=target),
        "captum lrp": lambda: captum_lrp.attribute(x, target=target),
        "lumos deeplift": lambda: lumos.explain(model, x, method="deeplift", target=target),
        "lumos deeplift (reused)": lambda: dl_explainer.explain(x, target=target),
        "captum deeplift": lambda: captum_dl.attribute(x, torch.zeros_like(x), target=target),
    }
    try:
        candidates["captum lrp"]()
    except Exception as exc:  # Captum's LRP rejects some layer types
        print(f"{label}: captum LRP failed ({exc}); left out")
        del candidates["captum lrp"]
    cpu, wall = interleaved(candidates, repeats=7)
    times = cpu if on_cpu else wall
    print(label, {k: round(v, 5) for k, v in times.items()}, flush=True)
    g, g2 = times["gradient"], times["gradient (2× rows)"]
    row = {"model": label, "cpu_seconds": cpu, "wall_seconds": wall}
    if not on_cpu:
        del row["cpu_seconds"]
    row["lrp_epsilon_over_gradient"] = times["lumos lrp epsilon"] / g
    row["lrp_epsilon_reused_over_gradient"] = times["lumos lrp epsilon (reused)"] / g
    row["lrp_epsilon_plus_over_gradient"] = times["lumos lrp epsilon_plus"] / g
    row["lrp_epsilon_over_lumos_saliency"] = times["lumos lrp epsilon"] / times["lumos saliency"]
    row["deeplift_over_gradient"] = times["lumos deeplift"] / g
    row["deeplift_reused_over_gradient"] = times["lumos deeplift (reused)"] / g
    row["deeplift_over_gradient_2x"] = times["lumos deeplift"] / g2
    row["deeplift_over_captum"] = times["lumos deeplift"] / times["captum deeplift"]
    row["deeplift_reused_over_captum"] = times["lumos deeplift (reused)"] / times["captum deeplift"]
    if "captum lrp" in times:
        row["lrp_epsilon_over_captum"] = times["lumos lrp epsilon"] / times["captum lrp"]
        row["lrp_epsilon_reused_over_captum"] = (
            times["lumos lrp epsilon (reused)"] / times["captum lrp"]
        )
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    add_device_option(parser)
    device = setup_device(parser.parse_args().device)
    on_cpu = device.type == "cpu"
    clock, unit, scale = ("cpu_seconds", "CPU s", 1) if on_cpu else ("wall_seconds", "ms", 1e3)
    rows = [time_one(label, model, x, on_cpu) for label, model, x in models(device)]
    how = "CPU seconds of this process" if on_cpu else "wall-clock, GPU work synchronized"
    lines = [
        f"Propagation methods on {describe(device)}; minimum of 7 interleaved repeats (each "
        f"after an untimed call of the same candidate), {how}.",
        "",
        f"| model | gradient {unit} | LRP-ε {unit} | ÷ gradient | reused ÷ gradient "
        f"| ÷ lumos saliency | ÷ Captum LRP | reused ÷ Captum LRP | LRP ε/z⁺ ÷ gradient "
        f"| DeepLIFT {unit} | ÷ gradient | reused ÷ gradient | ÷ gradient of 2× rows "
        "| ÷ Captum DeepLift | reused ÷ Captum DeepLift |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = {name: seconds * scale for name, seconds in r[clock].items()}
        captum_lrp = r.get("lrp_epsilon_over_captum")
        captum_lrp_reused = r.get("lrp_epsilon_reused_over_captum")
        lines.append(
            f"| {r['model']} | {t['gradient']:.3f} | {t['lumos lrp epsilon']:.3f} "
            f"| {r['lrp_epsilon_over_gradient']:.2f} "
            f"| {r['lrp_epsilon_reused_over_gradient']:.2f} "
            f"| {r['lrp_epsilon_over_lumos_saliency']:.2f} "
            f"| {'n/a' if captum_lrp is None else f'{captum_lrp:.2f}'} "
            f"| {'n/a' if captum_lrp_reused is None else f'{captum_lrp_reused:.2f}'} "
            f"| {r['lrp_epsilon_plus_over_gradient']:.2f} | {t['lumos deeplift']:.3f} "
            f"| {r['deeplift_over_gradient']:.2f} | {r['deeplift_reused_over_gradient']:.2f} "
            f"| {r['deeplift_over_gradient_2x']:.2f} | {r['deeplift_over_captum']:.2f} "
            f"| {r['deeplift_reused_over_captum']:.2f} |"
        )
    table = "\n".join(lines) + "\n"
    data = {"rows": rows, "device": describe(device), "threads": torch.get_num_threads()}
    data["clock"] = "process_time" if on_cpu else "perf_counter, GPU synchronized"
    save(result_name("propagation", device), data, table)


if __name__ == "__main__":
    main()
