"""Single-pass methods take the outputs and the targets from their own forward pass with
gradients: one model call instead of two, and the same results as the two-pass route."""

from __future__ import annotations

import inspect

import pytest
import torch
from models import tiny_cnn

import lumos
from lumos.core.registry import get_method


def _single_pass(name: str) -> bool:
    """True where the class says so, or decides it per instance (a property)."""
    flag = inspect.getattr_static(get_method(name), "single_pass")
    return flag is True or isinstance(flag, property)


SINGLE_PASS = [info.name for info in lumos.methods() if _single_pass(info.name)]


def test_the_single_pass_methods_are_the_one_pass_ones():
    assert set(SINGLE_PASS) == {
        "saliency",
        "input_x_gradient",
        "guided_backprop",
        "deconvnet",
        "lrp",
        "excitation_backprop",
        "deeplift",
    }


def _calls(model: torch.nn.Module) -> dict:
    calls = {"n": 0}

    def count(module, args, output):
        calls["n"] += 1

    model.fc.register_forward_hook(count)
    return calls


@pytest.mark.parametrize("name", SINGLE_PASS)
def test_one_model_pass_when_the_inputs_fit_in_one_batch(name):
    torch.manual_seed(0)
    model, x = tiny_cnn(), torch.rand(3, 3, 16, 16)
    calls = _calls(model)
    references = 1 if name == "deeplift" else 0  # DeepLIFT runs its zero baseline once
    lumos.explain(model, x, method=name)
    assert calls["n"] == 1 + references
    calls["n"] = 0
    lumos.explain(model, x, method=name, batch_size=2)  # chunked: a separate forward first
    assert calls["n"] == 2 + references + 2


@pytest.mark.parametrize("name", SINGLE_PASS)
def test_fused_and_chunked_passes_agree(name):
    torch.manual_seed(1)
    model, x = tiny_cnn().double(), torch.rand(4, 3, 16, 16, dtype=torch.float64)
    fused = lumos.explain(model, x, method=name)
    chunked = lumos.explain(model, x, method=name, batch_size=3)
    torch.testing.assert_close(fused.attributions, chunked.attributions)
    torch.testing.assert_close(fused.outputs, chunked.outputs)
    torch.testing.assert_close(fused.outputs, model(x).detach())
    assert torch.equal(fused.targets, model(x).argmax(1))
    assert not fused.outputs.requires_grad


def test_several_targets_share_the_one_forward():
    torch.manual_seed(2)
    model, x = tiny_cnn(), torch.rand(2, 3, 16, 16)
    calls = _calls(model)
    many = lumos.explain_targets(model, x, [0, 1, 3], method="saliency")
    assert calls["n"] == 1
    for target, exp in zip([0, 1, 3], many):
        alone = lumos.explain(model, x, method="saliency", target=target)
        torch.testing.assert_close(exp.attributions, alone.attributions)


def test_a_borrowed_forward_is_not_used_by_another_method():
    """Guided Grad-CAM runs guided backprop inside its own pipeline: the forward pass it needs
    is guided backprop's, never the one its host method ran."""
    torch.manual_seed(3)
    model, x = tiny_cnn(), torch.rand(2, 3, 16, 16)
    fused = lumos.explain(model, x, method="guided_grad_cam", layer="conv2", target=1)
    chunked = lumos.explain(
        model, x, method="guided_grad_cam", layer="conv2", target=1, batch_size=1
    )
    torch.testing.assert_close(fused.attributions, chunked.attributions)


@pytest.mark.parametrize("name", ["grad_cam", "score_cam", "layer_cam"])
def test_cam_methods_with_a_given_layer_record_in_the_pipelines_forward(name):
    torch.manual_seed(4)
    model, x = tiny_cnn(), torch.rand(3, 3, 16, 16)
    calls = _calls(model)
    fused = lumos.explain(model, x, method=name, layer="conv2", target=2)
    n_calls = calls["n"]
    chunked = lumos.explain(model, x, method=name, layer="conv2", target=2, batch_size=2)
    assert n_calls < calls["n"] - n_calls  # the chunked run pays a separate forward
    torch.testing.assert_close(fused.attributions, chunked.attributions)
