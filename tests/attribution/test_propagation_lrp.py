"""LRP: conservation on functional CNNs, every rule against its matrix form, canonizers,
composites, Zennit reference relevances, and clear errors for what cannot be propagated."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from models import tiny_cnn
from torch import nn

import lumos
from lumos.attribution.propagation import (
    AlphaBeta,
    Epsilon,
    Flat,
    Gamma,
    MergeBatchNorm,
    WSquare,
    ZBox,
    ZPlus,
    register_op,
    tracing,
)
from lumos.attribution.propagation import graph as graph_module
from lumos.attribution.propagation.canonizers import canonized
from lumos.attribution.propagation.graph import Graph, Strategy
from lumos.attribution.propagation.rules import stabilize
from lumos.core.errors import InputError, UnknownNameError, UnsupportedModelError

ROOT = Path(__file__).resolve().parents[2]
PRESETS = [
    "epsilon",
    "epsilon_plus",
    "epsilon_gamma_box",
    "epsilon_alpha2_beta1",
    "epsilon_plus_flat",
    "epsilon_alpha2_beta1_flat",
]


class FunctionalNet(nn.Module):
    """Bias-free ReLU CNN written the way that breaks hook-based LRP: one ReLU module reused,
    F.relu / torch.relu / in-place ReLU, a residual `x + y`, F.max_pool2d, average pooling and
    torch.flatten."""

    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=bias)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=bias)
        self.conv3 = nn.Conv2d(6, 8, 3, padding=1, bias=bias)
        self.fc = nn.Linear(8 * 2 * 2, 5, bias=bias)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(self.act(self.conv1(x)), 2)
        h = torch.relu(h + F.relu(self.conv2(h), inplace=True))
        h = F.avg_pool2d(self.act(self.conv3(h)), 2)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 2), 1))


class ModuleNet(nn.Module):
    """The same function as `FunctionalNet` with one module per operation (what hooks see)."""

    def __init__(self, twin: FunctionalNet) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3, self.fc = twin.conv1, twin.conv2, twin.conv3, twin.fc
        self.relu1, self.relu2, self.relu3, self.relu4 = nn.ReLU(), nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.pool1, self.pool2, self.pool3 = (
            nn.MaxPool2d(2),
            nn.AvgPool2d(2),
            nn.AdaptiveAvgPool2d(2),
        )
        self.flatten = nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool1(self.relu1(self.conv1(x)))
        h = self.relu3(h + self.relu2(self.conv2(h)))
        h = self.pool2(self.relu4(self.conv3(h)))
        return self.fc(self.flatten(self.pool3(h)))


def functional_net(bias: bool = False) -> FunctionalNet:
    torch.manual_seed(0)
    return FunctionalNet(bias).double().eval()


def lrp(model, x, target, **options):
    return lumos.explain(model, x, method="lrp", target=target, **options)


def test_lrp_epsilon_conserves_the_logit_on_a_functional_bias_free_cnn():
    model = functional_net()
    x = torch.rand(4, 3, 16, 16, dtype=torch.float64)
    exp = lrp(model, x, [0, 1, 2, 3], composite="epsilon", epsilon=1e-9)
    logits = model(x).gather(1, torch.tensor([[0], [1], [2], [3]])).squeeze(1).detach()
    sums = exp.attributions.flatten(1).sum(1)
    assert torch.allclose(sums, logits, rtol=1e-4, atol=0)
    assert (exp.delta.abs() <= 1e-4 * logits.abs()).all()


@pytest.mark.parametrize("composite", ["epsilon", "epsilon_plus", "epsilon_alpha2_beta1"])
def test_lrp_of_functional_code_equals_lrp_of_its_module_twin(composite):
    functional = functional_net()
    twin = ModuleNet(functional).eval()
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64)
    a = lrp(functional, x, 2, composite=composite).attributions
    b = lrp(twin, x, 2, composite=composite).attributions
    assert torch.allclose(a, b, atol=1e-12)


def test_lrp_epsilon_plus_is_conserved_on_relu_nets_without_bias():
    model = functional_net()
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    exp = lrp(model, x, 1, composite="epsilon_plus")
    logit = model(x)[:, 1].detach()
    assert (exp.delta.abs() <= 1e-4 * logit.abs()).all()


# -- every rule against its matrix form ----------------------------------------------------------


def contributions(rule, x, w, b, z):
    """(c_j, bias term) of a rule for one output unit: R_j = c_j R / stab(Σ c + bias term)."""
    xp, xn, wp, wn = x.clamp(min=0), x.clamp(max=0), w.clamp(min=0), w.clamp(max=0)
    bp, bn = max(b, 0.0), min(b, 0.0)
    if isinstance(rule, Epsilon):
        return [(x * w, b, 1.0)], rule.epsilon
    if isinstance(rule, ZPlus):
        return [(xp * wp + xn * wn, bp, 1.0)], rule.stabilizer
    if isinstance(rule, AlphaBeta):
        return [
            (xp * wp + xn * wn, bp, rule.alpha),
            (xp * wn + xn * wp, bn, -rule.beta),
        ], rule.stabilizer
    if isinstance(rule, Gamma):
        g = rule.gamma
        if z > 0:
            return [(xp * (w + g * wp) + xn * (w + g * wn), b + g * bp, 1.0)], rule.stabilizer
        return [(xp * (w + g * wn) + xn * (w + g * wp), b + g * bn, 1.0)], rule.stabilizer
    if isinstance(rule, ZBox):
        return [(x * w - rule.low * wp - rule.high * wn, b - bp - bn, 1.0)], rule.stabilizer
    if isinstance(rule, Flat):
        return [((w != 0).to(x.dtype), 0.0, 1.0)], rule.stabilizer  # connected inputs
    if isinstance(rule, WSquare):
        return [(w * w, b * b, 1.0)], rule.stabilizer
    raise AssertionError(rule)


def matrix_rule(rule, x, weight, bias, k):
    """Relevance of the inputs for output unit k of ``z = W x + b`` with R_k = z_k."""
    w, b = weight[k].detach(), float(bias[k].detach())
    z = float(x @ w + b)
    parts, eps = contributions(rule, x, w, b, z)
    relevance = torch.zeros_like(x)
    for c, bias_term, coefficient in parts:
        relevance += coefficient * c * z / stabilize(float(c.sum() + bias_term), eps)
    return relevance


RULES = [
    Epsilon(0.0),
    Epsilon(0.3),
    ZPlus(),
    AlphaBeta(2.0, 1.0),
    AlphaBeta(1.0, 0.0),
    Gamma(0.25),
    ZBox(-1.0, 1.0),
    Flat(),
    WSquare(),
]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: repr(r))
def test_every_rule_matches_its_matrix_form_on_a_linear_layer(rule):
    torch.manual_seed(1)
    layer = nn.Linear(7, 4).double()
    x = torch.rand(3, 7, dtype=torch.float64) * 2 - 1
    exp = lrp(layer, x, 2, composite={nn.Linear: rule})
    expected = torch.stack([matrix_rule(rule, row, layer.weight, layer.bias, 2) for row in x])
    assert torch.allclose(exp.attributions, expected, atol=1e-10)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: repr(r))
def test_every_rule_matches_its_matrix_form_on_a_conv_layer(rule):
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    model = nn.Sequential(conv, nn.Flatten()).eval()
    x = torch.rand(2, 2, 4, 4, dtype=torch.float64) * 2 - 1
    # the conv as a dense matrix: columns are its responses to the basis images (bias removed)
    basis = torch.eye(32, dtype=torch.float64).view(32, 2, 4, 4)
    dense = (F.conv2d(basis, conv.weight, padding=1).flatten(1)).T
    bias = conv.bias.repeat_interleave(16)
    k = 21
    exp = lrp(model, x, k, composite={nn.Conv2d: rule})
    expected = torch.stack([matrix_rule(rule, row.flatten(), dense, bias, k) for row in x])
    assert torch.allclose(exp.attributions.flatten(1), expected, atol=1e-10)


def test_composite_keys_by_path_override_keys_by_type():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double().eval()
    x = torch.rand(2, 6, dtype=torch.float64)
    exp = lrp(model, x, 0, composite={"0": Flat(), nn.Linear: Epsilon()})
    assert exp.extras["rules"] == {"0": repr(Flat()), "1": "Pass()", "2": repr(Epsilon())}
    by_path = exp.attributions
    by_type = lrp(model, x, 0, composite={nn.Linear: Epsilon()}).attributions
    flat_first = lrp(model, x, 0, composite={"first": Flat(), nn.Linear: Epsilon()}).attributions
    assert torch.allclose(by_path, flat_first)
    assert not torch.allclose(by_path, by_type)
    assert torch.allclose(by_path[:, 1:], by_path[:, :1].expand(-1, 5))  # flat: uniform


# -- canonizers ----------------------------------------------------------------------------------


def test_merge_batchnorm_leaves_outputs_unchanged_and_is_undone():
    model = tiny_cnn().double()
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64)
    graph = Graph(model, "lrp")
    layers = dict(graph.layers)
    with canonized(graph, [MergeBatchNorm()]):
        assert graph.merged == {"bn1", "bn2", "block.bn_a", "block.bn_b"}
        merged = graph.run(Strategy(), (x,))
    assert torch.allclose(merged, model(x), atol=1e-12, rtol=0)
    assert graph.layers == layers and not graph.merged
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))


def test_batchnorm_feeding_two_layers_is_not_merged():
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            z = self.conv(x)
            return self.head((self.bn(z) + z).mean((2, 3)))

    model = Fork().double().eval()
    graph = Graph(model, "lrp")
    with canonized(graph, [MergeBatchNorm()]):
        assert not graph.merged


# -- zennit --------------------------------------------------------------------------------------


def _zennit_references():
    script = ROOT / "scripts" / "make_zennit_references.py"
    spec = importlib.util.spec_from_file_location("make_zennit_references", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data = np.load(ROOT / "tests/attribution/references/propagation/zennit.npz")
    return module, data


@pytest.mark.parametrize(
    "preset",
    [
        "epsilon_plus",
        "epsilon_gamma_box",
        "epsilon_alpha2_beta1",
        "epsilon_plus_flat",
        "epsilon_alpha2_beta1_flat",
    ],
)
def test_presets_match_zennit_reference_relevances(preset):
    references, data = _zennit_references()
    state = {k[len("state/") :]: data[k] for k in data.files if k.startswith("state/")}
    model = references.reference_model(state)
    x = torch.from_numpy(data["input"])
    options = {"low": 0.0, "high": 1.0} if preset == "epsilon_gamma_box" else {}
    exp = lrp(model, x, references.TARGET, composite=preset, **options)
    expected = torch.from_numpy(data[f"relevance/{preset}"])
    scale = expected.abs().max()
    assert (exp.attributions - expected).abs().max() <= 1e-4 * scale


@pytest.mark.parametrize("preset", ["epsilon_plus", "epsilon_gamma_box", "epsilon_plus_flat"])
def test_presets_match_zennit_live_when_it_is_installed(preset):
    pytest.importorskip("torchvision")
    pytest.importorskip("zennit")
    references, _ = _zennit_references()
    model = references.reference_model()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    expected = torch.from_numpy(references.zennit_relevance(model, x, preset))
    options = {"low": 0.0, "high": 1.0} if preset == "epsilon_gamma_box" else {}
    exp = lrp(model, x, references.TARGET, composite=preset, **options)
    assert (exp.attributions - expected).abs().max() <= 1e-4 * expected.abs().max()


# -- every preset runs on the zoo-like model; errors -----------------------------------------------


@pytest.mark.parametrize("composite", PRESETS)
def test_every_preset_runs_on_tiny_cnn_with_finite_relevance(composite):
    model = tiny_cnn()
    exp = lrp(model, torch.rand(2, 3, 16, 16), "predicted", composite=composite)
    assert torch.isfinite(exp.attributions).all() and exp.delta.shape == (2,)


def test_unknown_preset_suggests_the_closest_name():
    with pytest.raises(UnknownNameError, match="epsilon_plus"):
        lrp(tiny_cnn(), torch.rand(1, 3, 16, 16), 0, composite="epsilon_pluss")


def test_alpha_beta_must_conserve():
    with pytest.raises(InputError, match="alpha - beta = 1"):
        AlphaBeta(2.0, 2.0)


def test_a_layer_without_a_rule_is_named():
    with pytest.raises(UnsupportedModelError, match=r"'fc'.*composite="):
        lrp(tiny_cnn(), torch.rand(1, 3, 16, 16), 0, composite={nn.Conv2d: Epsilon()})


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc(x)
        return h * torch.sigmoid(h)


class Cumulative(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return torch.cumsum(self.fc(x), dim=1)


class Branching(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (Gated(), "gating product"),
        (Cumulative(), "cumsum.*register_op"),
        (Branching(), "torch.fx"),
        (nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=1)), "logits"),
    ],
)
@pytest.mark.parametrize("method", ["lrp", "deeplift", "excitation_backprop"])
def test_constructs_without_a_rule_raise_and_name_the_op(model, message, method):
    with pytest.raises(UnsupportedModelError, match=message):
        lumos.explain(model.eval(), torch.rand(2, 4), method=method, target=0)


def test_register_op_teaches_a_new_elementwise_activation(monkeypatch):
    monkeypatch.setattr(graph_module, "_EXTRA", {})

    class Square(nn.Module):
        def forward(self, x):
            return torch.nn.functional.softsign(x)

    model = nn.Sequential(nn.Linear(4, 3), Square(), nn.Linear(3, 2)).double().eval()
    x = torch.rand(2, 4, dtype=torch.float64)
    with pytest.raises(UnsupportedModelError, match="softsign"):
        lrp(model, x, 0)
    register_op(torch.nn.functional.softsign, "activation")
    assert torch.isfinite(lrp(model, x, 0).attributions).all()


@pytest.mark.parametrize("arch", ["resnet18", "vgg11_bn"])
def test_torchvision_models_match_zennit_with_its_canonizers(arch):
    """torchvision's ResNet (in-place residual adds, a reused ReLU, BatchNorm in every block,
    a downsampling shortcut) and VGG with BatchNorm, against Zennit's composites with its
    ResNet/VGG canonizers.

    BatchNorm's eps is (in effect) 0 here because Zennit's merge leaves the BatchNorm computing
    ``x / √(1 + eps)`` instead of the identity, so with eps > 0 its canonized model is not the
    original one (≈1e-5 per layer; 2e-3 relative on these relevances); lumos merges exactly.
    """
    torchvision = pytest.importorskip("torchvision")
    composites = pytest.importorskip("zennit.composites")
    canonizers = pytest.importorskip("zennit.torchvision")
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None).double().eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
            module.eps = 1e-30  # vanishes next to the variances in float64; torch wants > 0
    canonizer = canonizers.ResNetCanonizer if arch == "resnet18" else canonizers.VGGCanonizer
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    presets = {
        "epsilon_plus": "EpsilonPlus",
        "epsilon_alpha2_beta1": "EpsilonAlpha2Beta1",
        "epsilon_plus_flat": "EpsilonPlusFlat",
        "epsilon_gamma_box": "EpsilonGammaBox",
    }
    for preset, name in presets.items():
        options = {"low": 0.0, "high": 1.0} if preset == "epsilon_gamma_box" else {}
        composite = getattr(composites, name)(canonizers=[canonizer()], **options)
        rows = x.clone().requires_grad_(True)
        with composite.context(model) as modified:
            out = modified(rows)
            seed = torch.zeros_like(out)
            seed[:, 3] = out[:, 3]
            (expected,) = torch.autograd.grad(out, rows, seed)
        ours = lrp(model, x, 3, composite=preset, **options)
        error = (ours.attributions - expected).abs().max() / expected.abs().max()
        assert error < 1e-9, (preset, float(error))
        torch.testing.assert_close(ours.outputs, model(x).detach())


@pytest.mark.parametrize("method", ["lrp", "deeplift", "excitation_backprop"])
def test_dict_inputs_reach_the_forward_arguments_by_name(method):
    from models import TwoInputModel

    torch.manual_seed(0)
    model = TwoInputModel().double().eval()
    a, b = torch.rand(3, 4, dtype=torch.float64), torch.rand(3, 2, dtype=torch.float64)
    as_tuple = lumos.explain(model, (a, b), method=method, target=1).attributions
    as_dict = lumos.explain(model, {"b": b, "a": a}, method=method, target=1).attributions
    assert torch.allclose(as_tuple[0], as_dict["a"]) and torch.allclose(as_tuple[1], as_dict["b"])


def test_in_place_residual_add_on_a_reused_in_place_relu_is_conserved():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
            self.conv2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            out = self.relu(self.conv1(x))
            out = self.conv2(out)
            out += x  # torchvision's BasicBlock writes the residual this way
            return self.relu(out).mean((2, 3))

    torch.manual_seed(0)
    model = Block().double().eval()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    exp = lrp(model, x, 1, composite="epsilon", epsilon=1e-9)
    assert (exp.delta.abs() <= 1e-4 * model(x)[:, 1].detach().abs()).all()


def test_lrp_does_not_depend_on_batch_size():
    model = tiny_cnn().double()
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64)
    a = lrp(model, x, 2, composite="epsilon_gamma_box")
    b = lrp(model, x, 2, composite="epsilon_gamma_box", batch_size=2)
    assert torch.allclose(a.attributions, b.attributions, atol=1e-12)
    assert torch.allclose(a.delta, b.delta, atol=1e-12)


def test_batchnorm_over_positions_of_a_linear_is_refused_where_weights_would_merge_wrongly():
    """BatchNorm1d after a Linear on (N, L, F) normalises the L positions, not the Linear's
    output features: ε (which keeps the weights) handles it exactly; rules that modify the
    merged weights are refused instead of giving wrong numbers."""

    class PerPosition(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.bn = nn.Linear(3, 4), nn.BatchNorm1d(5)
            self.out = nn.Linear(20, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.bn(self.fc(x))).flatten(1))

    from lumos.attribution.propagation.rules import ZPlus

    torch.manual_seed(0)
    model = PerPosition().double().eval()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.bn.running_var.uniform_(0.5, 1.5)
    x = torch.rand(2, 5, 3, dtype=torch.float64)
    exp = lrp(model, x, 1, composite="epsilon")
    torch.testing.assert_close(exp.outputs, model(x).detach())
    with pytest.raises(lumos.LumosError, match="dim 1 of a Linear"):
        lrp(model, x, 1, composite={nn.Linear: ZPlus()})


class Stateful(nn.Module):
    """A model whose forward reads state that a trace bakes in: a plain flag, a private flag, a
    tensor attribute, a list and a global."""

    def __init__(self) -> None:
        super().__init__()
        self.skip, self._double = False, False
        self.shift, self.scales = torch.zeros(4, dtype=torch.float64), [1.0]
        self.hidden, self.out = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        x = (x - self.shift) * self.scales[0] * (2.0 if self._double else 1.0) * GLOBAL_GAIN[0]
        if not self.skip:
            x = F.relu(self.hidden(x))
        return self.out(x)


GLOBAL_GAIN = [1.0]


def test_every_call_sees_the_model_as_it_is_now():
    """The model is traced on every call: whatever its forward reads (attributes of any type, a
    global) is read afresh, so outputs and relevances never come from a stale trace."""
    torch.manual_seed(0)
    model = Stateful().double().eval()
    x = torch.rand(3, 4, dtype=torch.float64)

    def check():
        for method in ("lrp", "deeplift"):
            exp = lumos.explain(model, x, method=method, target=0)
            torch.testing.assert_close(exp.outputs, model(x).detach())

    check()
    for change in (
        lambda: setattr(model, "skip", True),
        lambda: setattr(model, "_double", True),
        lambda: setattr(model, "shift", torch.ones(4, dtype=torch.float64)),
        lambda: model.scales.__setitem__(0, 3.0),
        lambda: GLOBAL_GAIN.__setitem__(0, 0.5),
        lambda: setattr(model, "out", nn.Linear(4, 3).double()),
    ):
        change()
        check()
    GLOBAL_GAIN[0] = 1.0


class MathScaled(nn.Module):
    """`math` applied to a traced value (a shape): fx must wrap the `math` functions."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(F.relu(x)) / math.sqrt(x.shape[-1])


def test_a_forward_that_applies_math_to_traced_values_is_traced():
    torch.manual_seed(0)
    model = MathScaled().double().eval()
    x = torch.rand(3, 4, dtype=torch.float64)
    for method in ("lrp", "deeplift"):
        exp = lumos.explain(model, x, method=method, target=0)
        torch.testing.assert_close(exp.outputs, model(x).detach())


class Accumulating(nn.Module):
    """Forwards that change a tensor in place and read it again afterwards."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        if self.kind == "accumulator":
            acc = torch.zeros(x.shape)
            acc.add_(F.relu(self.a(x)))
            return self.b(acc + x)
        if self.kind == "discarded":
            h = F.relu(self.a(x))
            h.mul_(2.0)
            return self.b(h)
        identity = x  # "alias": the old name still points at the changed tensor
        out = self.a(x)
        out += identity
        return self.b(F.relu(out) + identity)


@pytest.mark.parametrize("kind", ["accumulator", "discarded"])
@pytest.mark.parametrize("method", ["lrp", "deeplift", "excitation_backprop"])
def test_a_tensor_changed_in_place_and_read_again_is_refused_by_name(kind, method):
    model = Accumulating(kind).eval()
    with pytest.raises(lumos.core.errors.UnsupportedModelError, match="in place"):
        lumos.explain(model, torch.rand(3, 6), method=method, target=0)


def test_an_in_place_update_whose_old_value_is_not_read_again_is_exact():
    torch.manual_seed(0)
    model = Accumulating("alias").double().eval()
    x = torch.rand(3, 6, dtype=torch.float64)
    for method in ("lrp", "deeplift"):
        exp = lumos.explain(model, x, method=method, target=0)
        torch.testing.assert_close(exp.outputs, model(x).detach())


class MakesConstants(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(F.relu(self.a(x)) * torch.tensor(2.0)) / math.sqrt(x.shape[-1])


def test_tracing_leaves_no_attributes_on_the_model():
    """fx stores tensor constants made in forward on the traced root; lumos keeps them aside."""
    model = MakesConstants().eval()
    before = dict(vars(model))
    for method in ("lrp", "deeplift"):
        exp = lumos.explain(model, torch.rand(2, 4), method=method, target=0)
        torch.testing.assert_close(exp.outputs, model(exp.inputs).detach())
    assert vars(model).keys() == before.keys()


class BatchCentred(nn.Module):
    def __init__(self, dim) -> None:
        super().__init__()
        self.dim = dim
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.a(x))
        if self.dim is None:
            return self.b(h - h.mean())
        return self.b(h - h.mean(self.dim, keepdim=True))


@pytest.mark.parametrize("dim", [0, (0, 1), None])
@pytest.mark.parametrize("method", ["lrp", "deeplift"])
def test_a_mean_over_the_batch_is_refused_by_name(dim, method):
    with pytest.raises(lumos.core.errors.UnsupportedModelError, match="batch dimension"):
        lumos.explain(BatchCentred(dim).eval(), torch.rand(3, 4), method=method, target=0)


def test_a_mean_over_the_features_propagates():
    torch.manual_seed(0)
    model = BatchCentred(-1).double().eval()
    x = torch.rand(3, 4, dtype=torch.float64)
    exp = lumos.explain(model, x, method="deeplift", target=0)
    torch.testing.assert_close(exp.outputs, model(x).detach())
    assert exp.delta.abs().max() < 1e-10


def test_the_graph_drops_each_value_after_its_last_reader():
    """Running the traced graph holds an intermediate value only until its last reader, as eager
    code would (DeepLIFT's peak memory on ResNet-18 fell by a third with this)."""
    import weakref

    model = nn.Sequential(
        nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)
    ).eval()
    seen: list = []

    class Watch(Strategy):
        def activation(self, step, fn, x):
            seen.append(weakref.ref(x))
            return fn(x)

        def layer(self, step, layer, x):
            if len(seen) == 2:  # the last layer: the first pre-activation is gone by now
                assert seen[0]() is None
            return layer(x)

    with torch.no_grad():
        out = Graph(model, "test").run(Watch(), [torch.rand(2, 4)])
    assert out.shape == (2, 3) and len(seen) == 2


def test_the_tracer_builds_fxs_own_graph():
    """lumos' tracer takes a shortcut for plain node arguments; the graph must be fx's."""
    import torch.fx as fx
    from models import tiny_cnn as cnn

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.register_buffer("scale", torch.ones(1, 4, 1, 1))

        def forward(self, x, gain: float = 2.0):
            h = F.max_pool2d(F.relu(self.conv(x)) * self.scale, kernel_size=(2, 2), stride=None)
            h = torch.cat([h, h.flip(1)], dim=1)[:, :4, ..., None]
            return h.flatten(1).sum(1, keepdim=True) * gain + self.conv.bias.sum()

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return F.relu(self.conv(x)) + x

    class Nested(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = Mixed()
            self.blocks = nn.Sequential(Block(), Block())

        def forward(self, x):
            return self.blocks(self.stem(x)[..., 0].unflatten(1, (4, 1, 1)).relu())

    for model in (cnn(), Mixed(), Nested()):
        ours = tracing.trace(model)[0]
        theirs = fx.Tracer(autowrap_modules=(), autowrap_functions=()).trace(model)
        assert str(ours) == str(theirs)
        # a functional node is named within the module whose forward made it, as fx's
        # module stack says
        for mine, fxs in zip(ours.nodes, theirs.nodes):
            stack = fxs.meta.get("nn_module_stack") or {}
            scope = next(reversed(stack.values()))[0] if stack else ""
            expected = f"{scope}.{fxs.name}" if scope else fxs.name
            if mine.op != "call_module":
                assert graph_module._path(mine) == expected
    paths = {graph_module._path(n) for n in tracing.trace(Nested())[0].nodes}
    assert {"blocks.0.relu_2", "blocks.1.add_2", "stem.mul", "relu_1", "unflatten"} <= paths


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.MaxPool2d(3, 2, 1), nn.AdaptiveMaxPool2d(5)])
@pytest.mark.parametrize("size", [6, 40])  # (the larger runs channels-last)
def test_the_indexed_max_pool_has_torchs_gradient(pool, size):
    """LRP passes the gradient through max pooling with `IndexedMaxPool`: the same winners
    as torch's own pooling, ties and overlapping windows included."""
    from lumos.attribution.propagation.graph import IndexedMaxPool, _pool_with_indices

    graph = Graph(nn.Sequential(pool), "test")
    step = next(s for s in graph.steps if s.kind == "max_pool")
    x = torch.randn(2, 64, size, size).round().requires_grad_(True)  # many ties
    with_indices = _pool_with_indices(step, x, (x,), {}, 0)
    ours = IndexedMaxPool.apply(x, with_indices)
    theirs = pool(x)
    g = torch.randn_like(theirs)
    assert torch.equal(ours, theirs)
    mine, torchs = torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(theirs, x, g)[0]
    assert torch.allclose(mine, torchs, rtol=0, atol=1e-6)  # (sums of overlaps: any order)
