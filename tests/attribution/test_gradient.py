"""The gradient family against closed forms, axioms and Captum."""

from __future__ import annotations

import pytest
import torch
from models import TwoInputModel, linear_model, plain_cnn, tiny_cnn

import lumos
from lumos.attribution import (
    ExpectedGradients,
    IntegratedGradients,
    Saliency,
)
from lumos.attribution.gradient import INTEGRATION, integration_rule


def test_saliency_on_a_linear_model_is_the_absolute_weight_row():
    model = linear_model()
    x = torch.randn(4, 5)
    exp = lumos.explain(model, x, method="saliency", target=[0, 1, 2, 1])
    expected = model.weight.detach()[[0, 1, 2, 1]].abs()
    torch.testing.assert_close(exp.attributions, expected)
    signed = lumos.explain(model, x, method="saliency", target=2, abs=False)
    torch.testing.assert_close(signed.attributions, model.weight.detach()[2].expand(4, 5))


def test_integrated_gradients_with_zero_baseline_is_input_times_weight_on_a_linear_model():
    model = linear_model(bias=True)
    x = torch.randn(6, 5, dtype=torch.float64)
    model = model.double()
    ig = lumos.explain(model, x, method="integrated_gradients", target=1, n_steps=3)
    ixg = lumos.explain(model, x, method="input_x_gradient", target=1)
    expected = x * model.weight.detach()[1]
    torch.testing.assert_close(ig.attributions, expected)
    torch.testing.assert_close(ixg.attributions, expected)
    torch.testing.assert_close(ig.delta, torch.zeros(6, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("integration", INTEGRATION)
def test_integration_rules_integrate_polynomials(integration):
    points, weights = integration_rule(integration, 64)
    assert weights.sum() == pytest.approx(1.0)
    # ∫₀¹ 3α² dα = 1; Gauss–Legendre is exact, the Riemann rules within O(1/n)
    assert (weights * 3 * points**2).sum() == pytest.approx(1.0, abs=3e-2)


def test_integrated_gradients_is_complete_on_a_cnn_with_batchnorm_residual_and_functional_relus():
    model = tiny_cnn()
    x = torch.rand(5, 3, 16, 16)
    exp = lumos.explain(model, x, method="integrated_gradients", n_steps=64)
    with torch.no_grad():
        out, base = model(x), model(torch.zeros_like(x))
    idx = out.argmax(1)
    gap = (out - base).gather(1, idx[:, None]).squeeze(1)
    total = exp.attributions.flatten(1).sum(1)
    assert ((total - gap).abs() <= 0.01 * gap.abs().clamp_min(1e-3)).all()
    torch.testing.assert_close(exp.delta, total - gap, atol=1e-5, rtol=1e-4)
    assert torch.equal(exp.targets, idx)


@pytest.mark.parametrize(
    "name, options",
    [
        ("saliency", {}),
        ("input_x_gradient", {}),
        ("integrated_gradients", {"n_steps": 8}),
        ("guided_backprop", {}),
        ("deconvnet", {}),
        ("smoothgrad", {"n_samples": 3}),
        ("vargrad", {"n_samples": 3}),
        ("expected_gradients", {"n_samples": 5, "baselines": torch.rand(4, 3, 16, 16)}),
    ],
)
def test_results_do_not_depend_on_batch_size(name, options):
    model, x = tiny_cnn(), torch.rand(5, 3, 16, 16)
    full = lumos.explain(model, x, method=name, **options)
    for batch_size in (1, 3):
        part = lumos.explain(model, x, method=name, batch_size=batch_size, **options)
        torch.testing.assert_close(part.attributions, full.attributions, atol=1e-5, rtol=1e-4)


def test_function_and_object_forms_give_the_same_result():
    model, x = tiny_cnn(), torch.rand(3, 3, 16, 16)
    base = torch.rand(3, 16, 16)
    a = lumos.explain(model, x, method="integrated_gradients", target=2, n_steps=16, baselines=base)
    b = IntegratedGradients(model, n_steps=16).explain(x, target=2, baselines=base)
    torch.testing.assert_close(a.attributions, b.attributions)
    assert a.options == b.options


@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_tuple_and_dict_inputs_come_back_in_their_structure(form):
    model = TwoInputModel().eval()
    a, b = torch.randn(3, 4), torch.randn(3, 2)
    inputs = (a, b) if form == "tuple" else {"a": a, "b": b}
    exp = lumos.explain(model, inputs, method="integrated_gradients", target=0, n_steps=32)
    attr_a, attr_b = exp.attributions if form == "tuple" else exp.attributions.values()
    if form == "dict":
        assert list(exp.attributions) == ["a", "b"]
    torch.testing.assert_close(attr_a, a * model.a.weight.detach()[0])
    assert attr_b.shape == b.shape
    assert exp.delta.abs().max() < 1e-5


def test_every_target_form_selects_the_same_scalar():
    model, x = tiny_cnn(), torch.rand(3, 3, 16, 16)
    forms = [2, [2, 2, 2], torch.tensor([2, 2, 2]), lambda out: out[:, 2]]
    maps = [lumos.explain(model, x, method="saliency", target=t).attributions for t in forms]
    for m in maps[1:]:
        torch.testing.assert_close(m, maps[0])
    with torch.no_grad():
        predicted = model(x).argmax(1)
    exp = lumos.explain(model, x, method="saliency", target="predicted")
    torch.testing.assert_close(
        exp.attributions, lumos.explain(model, x, method="saliency", target=predicted).attributions
    )


def test_callable_targets_can_see_which_example_a_row_belongs_to():
    model, x = tiny_cnn(), torch.rand(3, 3, 16, 16)
    classes = torch.tensor([0, 3, 1])
    exp = lumos.explain(
        model,
        x,
        method="integrated_gradients",
        n_steps=8,
        target=lambda out, example: out.gather(1, classes[example][:, None]).squeeze(1),
    )
    ref = lumos.explain(model, x, method="integrated_gradients", n_steps=8, target=classes)
    torch.testing.assert_close(exp.attributions, ref.attributions)


def test_scalar_output_models_need_no_target():
    model = torch.nn.Sequential(torch.nn.Linear(3, 1), torch.nn.Flatten(0)).eval()
    x = torch.randn(4, 3)
    exp = lumos.explain(model, x, method="input_x_gradient", target=None)
    torch.testing.assert_close(exp.attributions, x * model[0].weight.detach()[0])


def test_expected_gradients_is_complete_in_expectation():
    model = tiny_cnn()
    x, background = torch.rand(3, 3, 16, 16), torch.rand(8, 3, 16, 16)
    exp = ExpectedGradients(model, n_samples=512, seed=1).explain(x, baselines=background)
    with torch.no_grad():
        out = model(x)
        target = out.argmax(1)
        gap = out.gather(1, target[:, None]).squeeze(1) - model(background)[:, target].mean(0)
    assert (exp.delta.abs() < 0.1 * gap.abs() + 1e-3).all()


def test_same_seed_same_result_and_different_seed_different_result():
    model, x = tiny_cnn(), torch.rand(2, 3, 16, 16)
    a = lumos.explain(model, x, method="smoothgrad", n_samples=4, seed=3).attributions
    b = lumos.explain(model, x, method="smoothgrad", n_samples=4, seed=3).attributions
    c = lumos.explain(model, x, method="smoothgrad", n_samples=4, seed=4).attributions
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_smoothgrad_squared_and_vargrad_relate_like_moments():
    model, x = tiny_cnn(), torch.rand(2, 3, 16, 16)
    options = {"n_samples": 6, "seed": 0, "base_options": {"abs": False}}
    mean = lumos.explain(model, x, method="smoothgrad", **options).attributions
    square = lumos.explain(model, x, method="smoothgrad", squared=True, **options).attributions
    var = lumos.explain(model, x, method="vargrad", **options).attributions
    torch.testing.assert_close(var, square - mean**2, atol=1e-6, rtol=1e-4)


def test_smoothgrad_wraps_integrated_gradients_with_its_options():
    model, x = tiny_cnn(), torch.rand(2, 3, 16, 16)
    exp = lumos.explain(
        model,
        x,
        method="smoothgrad",
        base="integrated_gradients",
        n_samples=2,
        stdev=0.0,
        base_options={"n_steps": 8, "baselines": 0.5},
    )
    ig = lumos.explain(model, x, method="integrated_gradients", n_steps=8, baselines=0.5)
    torch.testing.assert_close(exp.attributions, ig.attributions, atol=1e-6, rtol=1e-5)


def test_guided_backprop_is_the_same_for_relu_modules_functional_and_inplace_relus():
    torch.manual_seed(0)
    conv, fc = torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4 * 14 * 14, 3)

    class Net(torch.nn.Module):
        def __init__(self, style):
            super().__init__()
            self.conv, self.fc, self.style, self.relu = conv, fc, style, torch.nn.ReLU()

        def forward(self, x):
            h = self.conv(x)
            h = {
                "module": lambda t: self.relu(t),
                "functional": lambda t: torch.nn.functional.relu(t),
                "inplace": lambda t: torch.nn.functional.relu(t, inplace=True),
                "method": lambda t: t.relu(),
                "clamp": lambda t: t.clamp(min=0),
            }[self.style](h)
            return self.fc(h.flatten(1))

    x = torch.rand(2, 3, 16, 16)
    maps = [
        lumos.explain(Net(s).eval(), x, method="guided_backprop", target=1).attributions
        for s in ("module", "functional", "inplace", "method", "clamp")
    ]
    for m in maps[1:]:
        torch.testing.assert_close(m, maps[0])
    saliency = lumos.explain(Net("module"), x, method="saliency", target=1, abs=False)
    assert not torch.allclose(maps[0], saliency.attributions)


@pytest.mark.parametrize(
    "gate, message",
    [
        (torch.nn.ReLU6(), "hardtanh"),
        (torch.nn.GELU(), "gelu"),
        (lambda h: torch.maximum(h, torch.zeros(())), "maximum"),
        (lambda h: h.clamp(min=torch.zeros(())), "tensor bounds"),
        (torch.jit.script(torch.nn.ReLU()), "TorchScript"),
    ],
)
def test_guided_backprop_refuses_gates_it_has_no_rule_for(gate, message):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.relu = (
                torch.nn.Linear(3, 4),
                torch.nn.Linear(4, 2),
                torch.nn.ReLU(),
            )
            self.gate = gate if isinstance(gate, torch.nn.Module) else None

        def forward(self, x):
            h = self.relu(self.a(x))  # a real ReLU too: the refusal must not rely on counting
            return self.b(self.gate(h) if self.gate is not None else gate(h))

    with pytest.raises(lumos.core.errors.UnsupportedModelError, match=message):
        lumos.explain(Net(), torch.rand(2, 3), method="guided_backprop", target=0)


def test_guided_backprop_refuses_models_without_relu_or_with_other_activations():
    gelu = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.GELU(), torch.nn.Linear(4, 2))
    with pytest.raises(lumos.core.errors.UnsupportedModelError, match="gelu"):
        lumos.explain(gelu, torch.rand(2, 3), method="guided_backprop", target=0)
    linear = torch.nn.Linear(3, 2)
    with pytest.raises(lumos.core.errors.UnsupportedModelError, match="no ReLU"):
        lumos.explain(linear, torch.rand(2, 3), method="deconvnet", target=0)


class TestAgainstCaptum:
    captum = pytest.importorskip("captum.attr")

    def test_saliency_and_input_x_gradient(self):
        model, x = tiny_cnn(), torch.rand(3, 3, 16, 16)
        ours = Saliency(model).explain(x, target=1).attributions
        theirs = self.captum.Saliency(model).attribute(x, target=1, abs=True)
        torch.testing.assert_close(ours, theirs)
        ours = lumos.explain(model, x, method="input_x_gradient", target=1).attributions
        theirs = self.captum.InputXGradient(model).attribute(x, target=1)
        torch.testing.assert_close(ours, theirs)

    @pytest.mark.parametrize(
        "ours, theirs", [("gauss_legendre", "gausslegendre"), ("riemann_left", "riemann_left")]
    )
    def test_integrated_gradients(self, ours, theirs):
        model, x = tiny_cnn(), torch.rand(3, 3, 16, 16)
        baseline = torch.rand(1, 3, 16, 16)
        a = IntegratedGradients(model, n_steps=20, integration=ours).explain(
            x, target=2, baselines=baseline
        )
        b = self.captum.IntegratedGradients(model).attribute(
            x, baselines=baseline, target=2, n_steps=20, method=theirs
        )
        torch.testing.assert_close(a.attributions, b, atol=1e-6, rtol=1e-4)

    def test_trapezoid_weights_sum_to_one_unlike_captums(self):
        # Captum halves the end weights of 1/n steps, so its weights sum to 1 - 1/n; ours use
        # steps of 1/(n-1) and sum to 1: the two differ by exactly the factor n/(n-1).
        model = tiny_cnn().double()
        x, baseline = torch.rand(2, 3, 16, 16).double(), torch.rand(1, 3, 16, 16).double()
        n = 20
        a = IntegratedGradients(model, n_steps=n, integration="riemann_trapezoid").explain(
            x, target=2, baselines=baseline
        )
        b = self.captum.IntegratedGradients(model).attribute(
            x, baselines=baseline, target=2, n_steps=n, method="riemann_trapezoid"
        )
        torch.testing.assert_close(a.attributions, b * n / (n - 1))

    @pytest.mark.parametrize(
        "name, cls", [("guided_backprop", "GuidedBackprop"), ("deconvnet", "Deconvolution")]
    )
    def test_guided_methods_on_a_model_of_fresh_relu_modules(self, name, cls):
        model, x = plain_cnn(), torch.rand(3, 3, 16, 16)
        ours = lumos.explain(model, x, method=name, target=3).attributions
        theirs = getattr(self.captum, cls)(model).attribute(x, target=3)
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("name", ["saliency", "integrated_gradients", "smoothgrad"])
def test_several_targets_in_one_run_equal_one_run_per_target(name):
    model, x = tiny_cnn(), torch.rand(3, 3, 16, 16)
    options = {"n_steps": 8} if name == "integrated_gradients" else {}
    if name == "smoothgrad":
        options = {"n_samples": 3}
    together = lumos.explain_targets(model, x, [0, 2, "predicted"], method=name, **options)
    for target, exp in zip([0, 2, "predicted"], together):
        alone = lumos.explain(model, x, method=name, target=target, **options)
        torch.testing.assert_close(exp.attributions, alone.attributions, atol=1e-6, rtol=1e-5)
        assert torch.equal(exp.targets, alone.targets) and exp.inputs.shape == x.shape


def test_several_targets_share_forward_passes():
    model, x = tiny_cnn(), torch.rand(3, 3, 16, 16)
    rows = []
    handle = model.fc.register_forward_hook(lambda m, a, out: rows.append(out.shape[0]))
    lumos.explain_targets(model, x, [0, 1, 2], method="integrated_gradients", n_steps=8)
    shared = sum(rows)
    rows.clear()
    lumos.explain(model, x, method="integrated_gradients", n_steps=8, target=0)
    handle.remove()
    assert shared == sum(rows)  # inputs + interpolated rows + baselines, once for 3 targets


def test_per_example_baselines_work_with_several_targets_and_inside_smoothgrad():
    model, x, base = tiny_cnn(), torch.rand(3, 3, 16, 16), torch.rand(3, 3, 16, 16)
    many = lumos.explain_targets(
        model, x, [0, 1], method="integrated_gradients", n_steps=8, baselines=base
    )
    alone = lumos.explain(
        model, x, method="integrated_gradients", n_steps=8, target=1, baselines=base
    )
    torch.testing.assert_close(many[1].attributions, alone.attributions)
    smooth = lumos.explain(
        model,
        x,
        method="smoothgrad",
        base="integrated_gradients",
        n_samples=2,
        stdev=0.0,
        base_options={"n_steps": 8, "baselines": base},
        target=1,
    )
    torch.testing.assert_close(smooth.attributions, alone.attributions, atol=1e-6, rtol=1e-5)
