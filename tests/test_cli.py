"""The command line end to end: methods, explain (TorchScript, factories, pickles), demo."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from models import tiny_cnn
from typer.testing import CliRunner

from lumos.cli import app

runner = CliRunner()


def factory():
    """A model factory reachable as tests.test_cli:factory-style specs (via tests/ on sys.path)."""
    return tiny_cnn()


def test_methods_lists_the_registry():
    result = runner.invoke(app, ["methods", "--family", "gradient"])
    assert result.exit_code == 0, result.output
    assert "integrated_gradients" in result.output and "n_steps" in result.output


def test_every_command_has_help():
    for command in ([], ["demo"], ["methods"], ["explain"]):
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output


def test_explain_a_torchscript_model_on_a_tensor_file(tmp_path):
    model = torch.jit.trace(tiny_cnn(), torch.rand(1, 3, 16, 16))
    model.save(str(tmp_path / "model.pt"))
    torch.save(torch.rand(2, 3, 16, 16), tmp_path / "x.pt")
    out = tmp_path / "fig.png"
    result = runner.invoke(
        app,
        [
            "explain",
            "--model",
            str(tmp_path / "model.pt"),
            "--input",
            str(tmp_path / "x.pt"),
            "--method",
            "integrated_gradients",
            "--target",
            "1",
            "-o",
            "n_steps=8",
            "--out",
            str(out),
            "--save",
            str(tmp_path / "run.lumos"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 1000 and (tmp_path / "run.lumos").exists()


def test_explain_an_image_with_a_model_factory(tmp_path):
    from skimage import io as skio

    image = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    skio.imsave(tmp_path / "x.png", image, check_contrast=False)
    result = runner.invoke(
        app,
        [
            "explain",
            "--model",
            "test_cli:factory",
            "--input",
            str(tmp_path / "x.png"),
            "--method",
            "saliency",
            "--out",
            str(tmp_path / "s.png"),
        ],
    )
    assert result.exit_code == 0, result.output


def test_pickled_models_are_refused_without_trust_pickle(tmp_path):
    torch.save(tiny_cnn(), tmp_path / "model.pt")
    torch.save(torch.rand(1, 3, 16, 16), tmp_path / "x.pt")
    args = [
        "explain",
        "--model",
        str(tmp_path / "model.pt"),
        "--input",
        str(tmp_path / "x.pt"),
        "--method",
        "saliency",
        "--out",
        str(tmp_path / "s.png"),
    ]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "--trust-pickle" in refused.output
    trusted = runner.invoke(app, [*args, "--trust-pickle"])
    assert trusted.exit_code == 0, trusted.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "nope"], "Cannot interpret model"),
        (["--model", "test_cli:missing"], "no attribute"),
        (["--model", "test_cli:factory", "--method", "salency"], "Did you mean 'saliency'"),
        (["--model", "test_cli:factory", "-o", "n_steps"], "key=value"),
    ],
)
def test_bad_explain_arguments_fail_with_a_message(tmp_path, args, message):
    torch.save(torch.rand(1, 3, 16, 16), tmp_path / "x.pt")
    result = runner.invoke(app, ["explain", "--input", str(tmp_path / "x.pt"), *args])
    assert result.exit_code == 2 and message in result.output


def test_evaluate_ranks_methods_on_a_users_model_and_data(tmp_path):
    torch.save(torch.rand(4, 3, 16, 16), tmp_path / "x.pt")
    torch.save(torch.tensor([0, 1, 2, 3]), tmp_path / "y.pt")
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--model",
            "test_cli:factory",
            "--data",
            str(tmp_path / "x.pt"),
            "--labels",
            str(tmp_path / "y.pt"),
            "--methods",
            "saliency,integrated_gradients",
            "--metrics",
            "deletion,sparseness",
            "--out",
            str(tmp_path / "eval"),
        ],
    )
    assert result.exit_code == 0, result.output
    page = (tmp_path / "eval" / "index.html").read_text()
    assert "saliency" in page and "deletion" in page and "mean_rank" in result.output


@pytest.mark.parametrize(
    "device, message",
    [
        ("gpu0", "cannot be used"),
        ("cuda", "no cuda device"),
        ("mps", "no mps device"),
        ("meta", "hold no values"),
        ("xpu", "cannot be used"),
        ("vulkan", "cannot be used"),
    ],
)
def test_explain_and_evaluate_say_which_devices_cannot_be_used(tmp_path, device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    xpu = getattr(torch, "xpu", None)
    if device == "xpu" and xpu is not None and xpu.is_available():
        pytest.skip("an XPU device is present")
    mps = getattr(torch.backends, "mps", None)
    if device == "mps" and mps is not None and mps.is_available():
        pytest.skip("an MPS device is present")
    torch.save(torch.rand(2, 3, 16, 16), tmp_path / "x.pt")
    for command in (
        ["explain", "--input", str(tmp_path / "x.pt"), "--out", str(tmp_path / "f.png")],
        ["evaluate", "--data", str(tmp_path / "x.pt"), "--out", str(tmp_path / "eval")],
    ):
        args = [*command, "--model", "test_cli:factory", "--device", device]
        result = runner.invoke(app, args)
        said = " ".join(result.output.split())  # (the console wraps long lines)
        assert result.exit_code == 2 and message in said, result.output


def test_explain_runs_on_the_device_it_is_given(tmp_path):
    torch.save(torch.rand(2, 3, 16, 16), tmp_path / "x.pt")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = runner.invoke(
        app,
        [
            "explain", "--model", "test_cli:factory", "--input", str(tmp_path / "x.pt"),
            "--method", "saliency", "--device", device, "--out", str(tmp_path / "f.png"),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "f.png").stat().st_size > 1000
