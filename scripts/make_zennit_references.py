"""Regenerate the Zennit reference relevances that tests/attribution/test_propagation_lrp.py
checks lumos's LRP presets against.

Zennit needs torchvision at import time (only for its ResNet canonizer), which lumos does not
install. Run it from an unpacked wheel with a stub torchvision module::

    pip download zennit==0.5.1 --no-deps -d /tmp/zennit && cd /tmp/zennit && unzip -q *.whl
    PYTHONPATH=src:/tmp/zennit python scripts/make_zennit_references.py

The models below are built from nn modules only (what Zennit's hooks see correctly), with
BatchNorm after convolutions (merged by Zennit's canonizer) and a residual sum written with a
`StackSum` module that Zennit's `Norm` rule is mapped to. Weights and inputs are stored with the
relevances, so the test does not depend on torch's random streams.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

OUT = Path(__file__).resolve().parents[1] / "tests/attribution/references/propagation/zennit.npz"
PRESETS = {
    "epsilon_plus": "EpsilonPlus",
    "epsilon_gamma_box": "EpsilonGammaBox",
    "epsilon_alpha2_beta1": "EpsilonAlpha2Beta1",
    "epsilon_plus_flat": "EpsilonPlusFlat",
    "epsilon_alpha2_beta1_flat": "EpsilonAlpha2Beta1Flat",
}
TARGET = 2


class StackSum(nn.Module):
    """``x.sum(-1)`` of stacked branches: a residual sum as a module (Zennit's `layer.Sum`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sum(x, dim=-1)


class ReferenceNet(nn.Module):
    """Conv-BN-ReLU, max pool, a residual conv block summed by `StackSum`, average pooling,
    a dense ReLU layer and a dense output."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.branch = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU())
        self.sum = StackSum()
        self.head = nn.Sequential(
            nn.Conv2d(6, 8, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * 2 * 2, 16),
            nn.ReLU(),
            nn.Linear(16, 5),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.stem(x))
        h = self.sum(torch.stack([h, self.branch(h)], dim=-1))
        return self.head(h)


def reference_model(state: dict[str, np.ndarray] | None = None) -> ReferenceNet:
    """The reference architecture in float64, with stored weights (or seeded new ones)."""
    torch.manual_seed(0)
    model = ReferenceNet().double()
    if state is None:
        bn = model.stem[1]
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    else:
        model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    return model.eval()


def zennit_relevance(model: nn.Module, x: torch.Tensor, preset: str) -> np.ndarray:
    """Zennit's input relevance for `TARGET`, starting from the target logit."""
    import zennit.composites
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.rules import Norm

    cls = getattr(zennit.composites, PRESETS[preset])
    kwargs = {"low": 0.0, "high": 1.0} if preset == "epsilon_gamma_box" else {}
    composite = cls(
        layer_map=[(StackSum, Norm())], canonizers=[SequentialMergeBatchNorm()], **kwargs
    )
    x = x.clone().requires_grad_(True)
    with composite.context(model) as modified:
        out = modified(x)
        seed = torch.zeros_like(out)
        seed[:, TARGET] = out[:, TARGET]
        (relevance,) = torch.autograd.grad(out, x, seed)
    return relevance.detach().numpy()


def main() -> None:
    sys.modules.setdefault("torchvision", _stub_torchvision())
    import zennit

    model = reference_model()
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 8, 8, generator=generator, dtype=torch.float64)
    arrays = {f"state/{k}": v.numpy() for k, v in model.state_dict().items()}
    arrays["input"] = x.numpy()
    for preset in PRESETS:
        arrays[f"relevance/{preset}"] = zennit_relevance(model, x, preset)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} with zennit {getattr(zennit, '__version__', '0.5.1')}")


def _stub_torchvision() -> types.ModuleType:
    """Just enough of torchvision for `import zennit` (its ResNet canonizer is not used)."""
    torchvision = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")
    resnet = types.ModuleType("torchvision.models.resnet")
    resnet.Bottleneck = type("Bottleneck", (nn.Module,), {})
    resnet.BasicBlock = type("BasicBlock", (nn.Module,), {})
    torchvision.models, models.resnet = models, resnet
    sys.modules.update({"torchvision.models": models, "torchvision.models.resnet": resnet})
    return torchvision


if __name__ == "__main__":
    main()
