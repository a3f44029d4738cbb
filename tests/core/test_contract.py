"""The core contract: errors that say what is wrong, layer addressing, targets, persistence."""

from __future__ import annotations

import pytest
import torch
from models import TwoInputModel, tiny_cnn

import lumos
from lumos.core.errors import (
    BaselineError,
    GradientError,
    InputError,
    LumosError,
    ModelCallError,
    TargetError,
    UnknownNameError,
)
from lumos.core.model import LayerRecorder, resolve_layer


@pytest.fixture
def model():
    return tiny_cnn()


def test_unknown_method_suggests_the_closest_name(model):
    with pytest.raises(UnknownNameError, match="integrated_gradients"):
        lumos.explain(model, torch.rand(1, 3, 16, 16), method="integrated_gradient")


def test_unknown_option_names_the_method_and_suggests(model):
    with pytest.raises(UnknownNameError, match="n_steps"):
        lumos.explain(model, torch.rand(1, 3, 16, 16), method="integrated_gradients", n_step=3)


def test_unknown_layer_suggests_the_closest_paths(model):
    with pytest.raises(UnknownNameError, match=r"block\.conv_a"):
        resolve_layer(model, "block.conva")
    assert resolve_layer(model, "block.conv_a") == ("block.conv_a", model.block.conv_a)
    assert resolve_layer(model, model.fc) == ("fc", model.fc)


@pytest.mark.parametrize(
    "inputs, message",
    [
        (torch.tensor(1.0), "scalar"),
        (torch.rand(0, 3, 16, 16), "empty batch"),
        ((torch.rand(2, 4), torch.rand(3, 2)), "batch size"),
        ("not a tensor", "must be a tensor"),
        ([1, 2], "must be a torch.Tensor"),
        (torch.full((1, 3, 16, 16), float("inf")), "NaN or inf"),
    ],
)
def test_bad_inputs_raise_input_errors(inputs, message):
    model = TwoInputModel() if isinstance(inputs, tuple) else tiny_cnn()
    with pytest.raises(InputError, match=message):
        lumos.explain(model, inputs, method="saliency", target=0)


def test_wrong_input_shape_for_the_model_says_which_shape(model):
    with pytest.raises(ModelCallError, match=r"\(2, 5\)"):
        lumos.explain(model, torch.rand(2, 5), method="saliency", target=0)


def test_integer_inputs_to_gradient_methods_point_to_layer_methods(model):
    with pytest.raises(InputError, match="layer_integrated_gradients"):
        lumos.explain(model, torch.ones(1, 3, 16, 16, dtype=torch.long), method="saliency")


@pytest.mark.parametrize(
    "target, message",
    [
        (4, "out of range"),
        (-1, "out of range"),
        ([0, 1, 2], "3 targets for 2 examples"),
        (torch.tensor([0.5, 1.0]), "integer"),
        ("best", "Unknown target"),
        (True, "bool"),
        (lambda out: out, "one scalar per example"),
    ],
)
def test_bad_targets_raise_target_errors(model, target, message):
    with pytest.raises(TargetError, match=message):
        lumos.explain(model, torch.rand(2, 3, 16, 16), method="saliency", target=target)


def test_target_none_on_a_classifier_asks_for_a_class(model):
    with pytest.raises(TargetError, match="target='predicted'"):
        lumos.explain(model, torch.rand(2, 3, 16, 16), method="saliency", target=None)


@pytest.mark.parametrize(
    "baselines", [torch.rand(3, 8, 8), torch.rand(5, 3, 16, 16), "fancy", True, object()]
)
def test_bad_baselines_raise_baseline_errors(model, baselines):
    with pytest.raises(BaselineError):
        lumos.explain(
            model, torch.rand(2, 3, 16, 16), method="integrated_gradients", baselines=baselines
        )


@pytest.mark.parametrize("name", ["zeros", "uniform", "blur", "mean"])
def test_named_baselines_are_complete(model, name):
    exp = lumos.explain(
        model, torch.rand(2, 3, 16, 16), method="integrated_gradients", baselines=name, n_steps=32
    )
    assert exp.delta.abs().max() < 1e-3


def test_models_that_detach_raise_gradient_errors():
    class Detaching(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x).detach()

    with pytest.raises(GradientError, match="differentiably"):
        lumos.explain(Detaching(), torch.rand(2, 3), method="saliency", target=0)


def test_plain_callables_work_as_models():
    weight = torch.tensor([[1.0, -2.0, 3.0]])
    exp = lumos.explain(
        lambda x: x @ weight.T, torch.rand(4, 3), method="saliency", target=0, abs=False
    )
    torch.testing.assert_close(exp.attributions, weight.expand(4, 3))


def test_non_callable_models_are_refused():
    with pytest.raises(InputError, match="callable"):
        lumos.explain(42, torch.rand(1, 3), method="saliency")


def test_attributions_keep_the_inputs_dtype(model):
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    exp = lumos.explain(model.double(), x, method="integrated_gradients", n_steps=8)
    assert exp.attributions.dtype == torch.float64 and exp.attributions.device == x.device


def test_explanation_records_method_options_outputs_and_timing(model):
    x = torch.rand(2, 3, 16, 16)
    exp = lumos.explain(
        model, x, method="integrated_gradients", target=1, n_steps=8, integration="riemann_middle"
    )
    assert exp.method == "integrated_gradients"
    assert exp.options["n_steps"] == 8 and exp.options["integration"] == "riemann_middle"
    assert exp.options["baselines"] is None and exp.options["batch_size"] is None
    torch.testing.assert_close(exp.outputs, model(x).detach())
    assert exp.timing["total"] >= exp.timing["attribution"] > 0
    assert torch.equal(exp.targets, torch.tensor([1, 1]))
    assert "integrated_gradients" in repr(exp)


@pytest.mark.parametrize("form", ["tensor", "dict"])
def test_save_and_load_round_trip(tmp_path, form):
    if form == "tensor":
        model, inputs = tiny_cnn(), torch.rand(2, 3, 16, 16)
    else:
        model, inputs = TwoInputModel(), {"a": torch.rand(2, 4), "b": torch.rand(2, 2)}
    exp = lumos.explain(
        model, inputs, method="integrated_gradients", target=1, n_steps=8, baselines=0.25
    )
    path = exp.save(tmp_path / "run.lumos")
    back = lumos.load_explanation(path)
    assert back.method == exp.method and back.options == exp.options
    assert back.structure == exp.structure
    for a, b in zip(back.attributions_flat, exp.attributions_flat):
        assert torch.equal(a, b)
    assert torch.equal(back.delta, exp.delta) and torch.equal(back.targets, exp.targets)
    if form == "dict":
        assert list(back.attributions) == ["a", "b"]


def test_loading_something_else_is_a_clear_error(tmp_path):
    path = tmp_path / "x.lumos"
    path.write_bytes(b"not safetensors")
    with pytest.raises(LumosError, match="not a lumos explanation"):
        lumos.load_explanation(path)
    with pytest.raises(LumosError, match="No such file"):
        lumos.load_explanation(tmp_path / "missing.lumos")


def test_registry_lists_every_method_with_family_needs_and_options():
    rows = {row.name: row for row in lumos.methods()}
    expected = {
        "saliency",
        "input_x_gradient",
        "integrated_gradients",
        "smoothgrad",
        "vargrad",
        "guided_backprop",
        "deconvnet",
        "expected_gradients",
    }
    assert expected <= set(rows)
    ig = rows["integrated_gradients"]
    assert ig.family == "gradient" and "gradients" in ig.needs
    assert {"n_steps", "integration", "batch_size", "baselines"} <= set(ig.options)
    assert all(r.family == "gradient" for r in lumos.methods(family="gradient"))


def test_layer_recorder_removes_its_hook_even_after_an_error(model):
    with pytest.raises(RuntimeError), LayerRecorder(model.conv2) as recorder:
        model(torch.rand(1, 3, 16, 16))
        assert recorder.output.shape == (1, 16, 8, 8)
        raise RuntimeError("boom")
    assert not model.conv2._forward_hooks


def test_explaining_under_no_grad_still_works(model):
    with torch.no_grad():
        exp = lumos.explain(model, torch.rand(1, 3, 16, 16), method="saliency")
    assert exp.attributions.abs().sum() > 0


def test_a_train_mode_model_gets_its_batchnorm_statistics_back_and_a_warning():
    model = tiny_cnn().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="train mode"):
        lumos.explain(model, torch.rand(4, 3, 16, 16), method="integrated_gradients", n_steps=4)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert model.training


class CountingModel(torch.nn.Module):
    """An eval-mode model that writes to its own buffer on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("last", torch.zeros(4))

    def forward(self, x):
        self.calls += 1
        self.last.copy_(x[0].detach())
        return self.linear(x)


class MixedBuffers(torch.nn.Module):
    """Buffers of several dtypes and a shared one; the forward changes an integer counter and
    one float element, and leaves the rest alone."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("scale", torch.ones(4, dtype=torch.float64))
        self.register_buffer("mask", torch.ones(4, dtype=torch.bool))
        self.register_buffer("offset", torch.zeros(2, 2))
        self.inner = torch.nn.Module()
        self.inner.register_buffer("offset", self.offset)  # the same tensor, twice

    def forward(self, x):
        self.steps += 1
        self.offset[1, 0] = 7.0
        return self.linear(x * self.scale.float() * self.mask)


class BatchStatistics(torch.nn.Module):
    """An eval-mode layer that normalises with batch statistics and updates its running ones
    (a fused kernel: the buffers change without a version bump)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("var", torch.ones(4))

    def forward(self, x):
        x = torch.nn.functional.batch_norm(x, self.mean, self.var, training=True)
        return self.linear(x)


class ReshapingBuffers(torch.nn.Module):
    """A forward that resizes one buffer in place, replaces another and registers a third."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.register_buffer("grown", torch.tensor([2.0]))
        self.register_buffer("swapped", torch.zeros(3))

    def forward(self, x):
        self.grown.resize_(4).fill_(1.0)
        self.swapped = torch.ones(5)
        self.register_buffer("extra", torch.ones(2))
        return self.linear(x)


@pytest.mark.parametrize(
    "model_class", [CountingModel, MixedBuffers, BatchStatistics, ReshapingBuffers]
)
def test_buffers_an_eval_mode_model_writes_to_are_restored(model_class):
    model = model_class().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    objects = [id(b) for b in model.buffers()]
    for method in ("saliency", "integrated_gradients", "occlusion"):
        lumos.explain(model, torch.rand(3, 4), method=method, target=0)
        after = model.state_dict()
        assert after.keys() == before.keys(), method
        for key, value in after.items():
            assert torch.equal(value, before[key]), (method, key)
        assert [id(b) for b in model.buffers()] == objects
        assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    "forward, message",
    [
        (lambda x: x.sum(1).sum(), "for a batch of 3"),
        (lambda x: x.mean(0, keepdim=True), "for a batch of 3"),
    ],
)
def test_models_that_reduce_over_the_batch_are_refused(forward, message):
    with pytest.raises(TargetError, match=message):
        lumos.explain(forward, torch.rand(3, 4), method="saliency", target=None)


def test_a_single_baseline_tensor_for_tuple_inputs_is_refused():
    inputs = (torch.rand(2, 4), torch.rand(2, 2))
    with pytest.raises(BaselineError, match="one per input"):
        lumos.explain(
            TwoInputModel(),
            inputs,
            method="integrated_gradients",
            target=0,
            baselines=torch.zeros(2, 4),
        )


def test_nan_baselines_are_refused(model):
    with pytest.raises(BaselineError, match="NaN"):
        lumos.explain(
            model,
            torch.rand(1, 3, 16, 16),
            method="integrated_gradients",
            baselines=torch.full((3, 16, 16), float("nan")),
        )


def test_inference_mode_is_explained_not_obscure(model):
    with torch.inference_mode(), pytest.raises(GradientError, match="inference_mode"):
        lumos.explain(model, torch.rand(1, 3, 16, 16), method="saliency")


def test_blur_baseline_on_a_one_pixel_high_image():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 1 * 8, 2))
    exp = lumos.explain(
        model, torch.rand(2, 3, 1, 8), method="integrated_gradients", baselines="blur", target=0
    )
    assert exp.delta.abs().max() < 1e-5


def test_seeds_may_be_generators(model):
    x = torch.rand(2, 3, 16, 16)
    a = lumos.explain(
        model, x, method="smoothgrad", n_samples=2, seed=torch.Generator().manual_seed(5)
    ).attributions
    b = lumos.explain(model, x, method="smoothgrad", n_samples=2, seed=5).attributions
    assert torch.equal(a, b)
    with pytest.raises(InputError, match="seed"):
        lumos.explain(model, x, method="smoothgrad", seed="five")


def test_models_that_return_nan_are_refused():
    with pytest.raises(ModelCallError, match="NaN or inf"):
        lumos.explain(lambda x: x.log(), -torch.rand(2, 3) - 1, method="saliency", target=0)


def test_a_registered_subclass_passing_options_on_keeps_its_parents_options():
    from lumos.attribution.gradient import Saliency
    from lumos.core.registry import _REGISTRY, method_options, register

    @register("scaled_saliency_test", family="gradient", needs={"gradients"})
    class ScaledSaliency(Saliency):
        """Saliency with one more option, passing the rest on to its parent.

        A test-only subclass (the option is only recorded).
        """

        def __init__(self, model, *, scale: float = 2.0, **options):
            super().__init__(model, **options)
            self.scale = scale

    try:
        init, _ = method_options(ScaledSaliency)
        assert {"scale", "batch_size"} <= set(init) and init["scale"] == 2.0
        init["scale"] = 5.0  # the caller's copy: the next call is unaffected
        assert method_options(ScaledSaliency)[0]["scale"] == 2.0
        model, x = tiny_cnn(), torch.rand(2, 3, 16, 16)
        exp = lumos.explain(model, x, method="scaled_saliency_test", batch_size=1, scale=3.0)
        assert exp.options["batch_size"] == 1
    finally:
        del _REGISTRY["scaled_saliency_test"]
