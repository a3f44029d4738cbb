"""Every method and metric on an accelerator (CUDA or Apple's MPS) gives the CPU's numbers, keeps
its results on the model's device and leaves the model as it was. Skipped on machines without
one (CI); run it where a GPU is available: `pytest tests/test_devices.py`."""

from __future__ import annotations

import os

import pytest
import torch
from hygiene import ALL, assert_unchanged, options_for, snapshot
from models import tiny_cnn

import lumos
import lumos.metrics as M


def accelerator() -> torch.device | None:
    """CUDA or MPS when present; `LUMOS_TEST_DEVICE` names another (e.g. `cpu` for a dry run)."""
    if os.environ.get("LUMOS_TEST_DEVICE"):
        return torch.device(os.environ["LUMOS_TEST_DEVICE"])
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return None


DEVICE = accelerator()
pytestmark = pytest.mark.skipif(DEVICE is None, reason="no CUDA or MPS device")
# float64 where the device has it, so that CPU and device agree to rounding; MPS has no float64
DTYPE = torch.float32 if DEVICE is not None and DEVICE.type == "mps" else torch.float64
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5} if torch.float32 == DTYPE else {"rtol": 1e-7, "atol": 1e-9}


@pytest.fixture(autouse=True)
def _exact_convolutions():
    """cuDNN's TF32 convolutions round to 10 mantissa bits; the comparison wants IEEE math."""
    if DEVICE is None or DEVICE.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def both(x_cpu: torch.Tensor):
    """The same model and inputs on the CPU and on the device."""
    model = tiny_cnn().to(DTYPE)
    return (model, x_cpu), (tiny_cnn().to(DTYPE).to(DEVICE), x_cpu.to(DEVICE))


def assert_same(on_device, on_cpu, what: str, tolerance: dict = TOLERANCE) -> None:
    assert on_device.device.type == DEVICE.type, f"{what} left the device: {on_device.device}"
    torch.testing.assert_close(on_device.cpu(), on_cpu, **tolerance, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", ALL)
def test_method_on_the_device_equals_the_cpu(name):
    x = torch.rand(2, 3, 16, 16, dtype=DTYPE)
    (cpu_model, x_cpu), (model, x_dev) = both(x)
    options = options_for(name, x_cpu)
    if name == "kernel_shap":  # a determined design (16 players, 200 coalitions): with fewer
        # samples than players the solve is singular and rounding decides the result
        options.update(
            feature_mask=torch.arange(16)
            .view(1, 1, 4, 4)
            .repeat_interleave(4, 2)
            .repeat_interleave(4, 3),
            n_samples=200,
        )
    moved = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in options.items()}
    before = snapshot(model)
    on_device = lumos.explain(model, x_dev, method=name, target=1, **moved)
    assert_unchanged(model, before)
    on_cpu = lumos.explain(cpu_model, x_cpu, method=name, target=1, **options)
    assert_same(on_device.attributions, on_cpu.attributions, f"{name} attributions")
    if on_cpu.outputs is not None:
        assert_same(on_device.outputs, on_cpu.outputs, f"{name} outputs")
    if isinstance(on_cpu.delta, torch.Tensor):
        assert_same(on_device.delta, on_cpu.delta, f"{name} delta")


def test_baselines_on_the_cpu_are_moved_to_the_model_device():
    x = torch.rand(2, 3, 16, 16, dtype=DTYPE)
    (cpu_model, x_cpu), (model, x_dev) = both(x)
    baselines = torch.rand(3, 3, 16, 16, dtype=DTYPE)
    on_device = lumos.explain(model, x_dev, method="deeplift_shap", target=1, baselines=baselines)
    on_cpu = lumos.explain(cpu_model, x_cpu, method="deeplift_shap", target=1, baselines=baselines)
    assert_same(on_device.attributions, on_cpu.attributions, "deeplift_shap")


def test_metrics_on_the_device_equal_the_cpu():
    x = torch.rand(4, 3, 16, 16, dtype=DTYPE)
    masks = torch.zeros(4, 1, 16, 16, dtype=torch.bool)
    masks[..., 4:12, 4:12] = True
    (cpu_model, x_cpu), (model, x_dev) = both(x)
    options = {
        "methods": ["saliency", "integrated_gradients", "grad_cam"],
        "metrics": [info.name for info in M.metrics()],
        "layer": "conv2",
        "method_options": {"integrated_gradients": {"n_steps": 8}},
        "seed": 0,
    }
    before = snapshot(model)
    on_device = lumos.evaluate(model, x_dev, "predicted", masks=masks.to(DEVICE), **options)
    assert_unchanged(model, before)
    on_cpu = lumos.evaluate(cpu_model, x_cpu, "predicted", masks=masks, **options)
    assert on_device.not_applicable == on_cpu.not_applicable
    assert set(on_device.scores) == set(on_cpu.scores)
    for key, scores in on_cpu.scores.items():
        torch.testing.assert_close(
            on_device.scores[key].cpu().to(scores.dtype),
            scores,
            rtol=1e-4,  # some scores are float32, and rank statistics order the near-ties of
            atol=1e-5,  # ReLU-clipped maps by their rounding
            msg=lambda m, key=key: f"{key}: {m}",
        )


def test_results_on_the_device_render_and_save(tmp_path):
    """Figures, HTML and saved files read device tensors back themselves."""
    import matplotlib

    matplotlib.use("Agg")
    x = torch.rand(2, 3, 16, 16, dtype=DTYPE)
    _, (model, x_dev) = both(x)
    exp = lumos.explain(model, x_dev, method="integrated_gradients", target=1, n_steps=4)
    exp.figure()
    exp._repr_html_()
    exp.save(tmp_path / "exp.lumos")
    loaded = lumos.load_explanation(tmp_path / "exp.lumos")
    torch.testing.assert_close(loaded.attributions, exp.attributions.cpu())
    masks = torch.zeros(2, 1, 16, 16, dtype=torch.bool, device=DEVICE)
    masks[..., 4:12, 4:12] = True
    result = lumos.evaluate(
        model, x_dev, "predicted", methods=["saliency", "grad_cam"],
        metrics=["deletion", "pointing_game", "sparseness"], masks=masks, layer="conv2",
    )  # fmt: skip
    assert "<" in result.to_html()
    result.figure()
    result.curves_figure()
