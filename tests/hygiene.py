"""Shared by the suites that run every registered method: quick options per method and a
snapshot of everything about a model that a method must leave as it was."""

from __future__ import annotations

import torch

import lumos

ALL = [info.name for info in lumos.methods()]
FAST = {"n_steps": 4, "n_samples": 4, "n_masks": 8}


def options_for(name: str, x: torch.Tensor) -> dict:
    """Options that let `name` run quickly on `tiny_cnn` and `x`."""
    info = {i.name: i for i in lumos.methods()}[name]
    options = {k: v for k, v in FAST.items() if k in info.options}
    if "layer" in info.needs or "layer" in info.options:
        options.setdefault("layer", "conv2")
    if "neuron" in info.needs:
        options["neuron"] = (0,)
    if "baselines" in info.needs:
        options["baselines"] = torch.rand(3, *x.shape[1:], dtype=x.dtype).to(x.device)
    return options


def snapshot(model: torch.nn.Module) -> dict:
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "flags": [p.requires_grad for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "modes": [m.training for m in model.modules()],
        "hooks": [
            tuple(
                len(getattr(m, name))
                for name in (
                    "_forward_hooks",
                    "_forward_pre_hooks",
                    "_backward_hooks",
                    "_backward_pre_hooks",
                    "_forward_hooks_with_kwargs",
                    "_forward_pre_hooks_with_kwargs",
                )
            )
            for m in model.modules()
        ],
        "buffers": [b.clone() for b in model.buffers()],
    }


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    for key in ("flags", "modes", "hooks"):
        assert after[key] == before[key], key
    for a, b in zip(after["params"] + after["buffers"], before["params"] + before["buffers"]):
        assert torch.equal(a, b)
    for a, b in zip(after["grads"], before["grads"]):
        assert (a is None and b is None) or torch.equal(a, b)
