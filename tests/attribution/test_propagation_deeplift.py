"""DeepLIFT and DeepLIFT-SHAP: summation-to-delta on functional CNNs, agreement with Captum on
models built from nn modules, and functional code equal to its module twin."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import tiny_cnn
from torch import nn

import lumos
from lumos.core.errors import InputError

pytestmark = pytest.mark.filterwarnings("ignore:.*:UserWarning")  # Captum's hook notices


def deeplift(model, x, target, **options):
    return lumos.explain(model, x, method="deeplift", target=target, **options)


@pytest.mark.parametrize("baseline", ["zeros", "random"])
def test_deeplift_sums_to_delta_on_tiny_cnn(baseline):
    model = tiny_cnn()
    x = torch.rand(4, 3, 16, 16)
    baselines = None if baseline == "zeros" else torch.rand(4, 3, 16, 16)
    exp = deeplift(model, x, [0, 1, 2, 3], baselines=baselines)
    ref = torch.zeros_like(x) if baselines is None else baselines
    index = torch.arange(4)
    difference = model(x)[index, index] - model(ref)[index, index]
    assert exp.delta.abs().max() < 1e-4
    assert torch.allclose(
        exp.attributions.flatten(1).sum(1).double(), difference.double(), atol=1e-4
    )


def test_deeplift_shap_sums_to_delta_against_the_background_mean():
    model = tiny_cnn()
    x, background = torch.rand(3, 3, 16, 16), torch.rand(5, 3, 16, 16)
    exp = lumos.explain(model, x, method="deeplift_shap", target=2, baselines=background)
    expected = model(x)[:, 2] - model(background)[:, 2].mean()
    assert exp.delta.abs().max() < 1e-4
    assert torch.allclose(exp.attributions.flatten(1).sum(1), expected.detach(), atol=1e-4)


def test_deeplift_shap_does_not_depend_on_batch_size():
    model = tiny_cnn().double()
    x, background = torch.rand(3, 3, 16, 16).double(), torch.rand(4, 3, 16, 16).double()
    options = {"method": "deeplift_shap", "target": 1, "baselines": background}
    a = lumos.explain(model, x, **options)
    b = lumos.explain(model, x, batch_size=3, **options)
    assert torch.allclose(a.attributions, b.attributions, atol=1e-12)
    assert torch.allclose(a.delta, b.delta, atol=1e-12)


def test_deeplift_shap_needs_a_background_set():
    with pytest.raises(InputError, match="background"):
        lumos.explain(tiny_cnn(), torch.rand(2, 3, 16, 16), method="deeplift_shap", target=0)


def test_deeplift_does_not_depend_on_batch_size():
    model = tiny_cnn().double()
    x = torch.rand(5, 3, 16, 16, dtype=torch.float64)
    a = deeplift(model, x, 1).attributions
    b = deeplift(model, x, 1, batch_size=2).attributions
    assert torch.allclose(a, b, atol=1e-12)


class ModulesOnly(nn.Module):
    """nn modules only, each used once, and no ReLU next to a max pooling (Captum's hooks lose
    summation-to-delta when the two are adjacent; see the test below)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.Conv2d(6, 8, 3, padding=1),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def modules_only() -> ModulesOnly:
    torch.manual_seed(0)
    model = ModulesOnly().double().eval()
    bn = model.features[1]
    bn.running_mean.uniform_(-0.2, 0.2)
    bn.running_var.uniform_(0.5, 1.5)
    return model


def test_deeplift_equals_captum_on_a_model_of_nn_modules():
    captum = pytest.importorskip("captum.attr")
    model = modules_only()
    x, ref = (
        torch.rand(3, 3, 16, 16, dtype=torch.float64),
        torch.rand(3, 3, 16, 16, dtype=torch.float64),
    )
    ours = deeplift(model, x, [0, 1, 3], baselines=ref).attributions
    theirs = captum.DeepLift(model).attribute(x, ref, target=[0, 1, 3])
    assert torch.allclose(ours, theirs, atol=1e-10)


def test_a_shared_baseline_runs_once_and_equals_captum():
    """Zeros (or any baseline equal on every row) run as one reference row."""
    captum = pytest.importorskip("captum.attr")
    model = modules_only()
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64)
    for baselines, ref in [(None, torch.zeros_like(x)), (0.25, torch.full_like(x, 0.25))]:
        ours = deeplift(model, x, [2, 0, 1], baselines=baselines)
        theirs = captum.DeepLift(model).attribute(x, ref, target=[2, 0, 1])
        assert torch.allclose(ours.attributions, theirs, atol=1e-10)
        assert ours.delta.abs().max() < 1e-10


def test_per_example_baselines_pair_with_their_own_example():
    model = tiny_cnn().double()
    x = torch.rand(4, 3, 16, 16, dtype=torch.float64)
    refs = torch.rand(4, 3, 16, 16, dtype=torch.float64)
    together = deeplift(model, x, 1, baselines=refs)
    for batch_size in (None, 3):
        chunked = deeplift(model, x, 1, baselines=refs, batch_size=batch_size)
        assert torch.allclose(chunked.attributions, together.attributions, atol=1e-12)
    for i in range(4):
        alone = deeplift(model, x[i : i + 1], 1, baselines=refs[i : i + 1])
        assert torch.allclose(alone.attributions[0], together.attributions[i], atol=1e-12)
        assert torch.allclose(alone.delta, together.delta[i : i + 1], atol=1e-12)


def test_deeplift_shap_equals_captum_on_a_model_of_nn_modules():
    captum = pytest.importorskip("captum.attr")
    model = modules_only()
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    background = torch.rand(4, 3, 16, 16, dtype=torch.float64)
    ours = lumos.explain(model, x, method="deeplift_shap", target=1, baselines=background)
    theirs = captum.DeepLiftShap(model).attribute(x, background, target=1)
    assert torch.allclose(ours.attributions, theirs, atol=1e-10)


def test_deeplift_sums_to_delta_where_relu_feeds_max_pooling():
    """ReLU next to max pooling is where Captum's hooks lose summation-to-delta (captum 0.9:
    errors of 1e-2 here); ours keeps it."""
    model = (
        nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(256, 3),
        )
        .double()
        .eval()
    )
    x, ref = (
        torch.rand(2, 3, 16, 16, dtype=torch.float64),
        torch.rand(2, 3, 16, 16, dtype=torch.float64),
    )
    exp = deeplift(model, x, [0, 2], baselines=ref)
    assert exp.delta.abs().max() < 1e-10


def reference_case(kind: str, shape: tuple, background: int) -> tuple[str, torch.Tensor | None]:
    """The method and references of a test case for 3 inputs of `shape`: zero references, one
    random reference per input, or a random background set for DeepLIFT-SHAP."""
    if kind == "zeros":
        return "deeplift", None
    if kind == "per example":
        return "deeplift", torch.rand(3, *shape, dtype=torch.float64)
    return "deeplift_shap", torch.rand(background, *shape, dtype=torch.float64)


class Pools(nn.Module):
    """Every standard max pooling the indexed rule handles: overlapping windows with padding,
    ceil mode on an odd size, adaptive, functional, 1-d and 3-d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.overlap = nn.MaxPool2d(3, stride=2, padding=1)
        self.adaptive = nn.AdaptiveMaxPool2d(3)
        self.pool3d = nn.MaxPool3d((1, 2, 2), ceil_mode=True)
        self.fc = nn.Linear(4 * 9 + 4 * 3 + 4 * 2 * 2, 3)

    def forward(self, x):
        h = F.relu(self.conv(x))  # (N, 4, 15, 15)
        a = self.overlap(h)  # (N, 4, 8, 8)
        b = F.max_pool2d(a, 2, 2, 0, 1, True)  # ceil mode: (N, 4, 4, 4)
        c = self.adaptive(a).flatten(1)  # (N, 36)
        d = F.max_pool1d(b.flatten(2), kernel_size=6, stride=5)  # (N, 4, 3)
        e = self.pool3d(b.unsqueeze(2)).flatten(1)  # (N, 4·1·2·2)
        return self.fc(torch.cat([c, d.flatten(1), e], 1))


@pytest.mark.parametrize("baselines", ["zeros", "per example", "background"])
def test_the_pooling_rules_agree_with_the_general_one(baselines, monkeypatch):
    """Standard pooling layers route DeepLIFT's max-pool rule by the winners' indices of the
    input and the reference, and a ReLU read only by a pooling is applied with it at the
    pooled size; both must agree with the general rule (differentiating the pooling twice
    after a full-size Rescale)."""
    from lumos.attribution.propagation import deeplift as module
    from lumos.attribution.propagation import graph

    torch.manual_seed(0)
    model = Pools().double().eval()
    x = torch.rand(3, 3, 15, 15, dtype=torch.float64)
    x[0, :, :4, :4] = 0.0  # ties between input and reference (Δx = 0 at some winners)
    method, refs = reference_case(baselines, (3, 15, 15), background=4)
    calls = {"indexed": 0, "fused": 0}

    def counted(cls, key):
        apply = cls.apply

        def wrapper(*args):
            calls[key] += 1
            return apply(*args)

        monkeypatch.setattr(cls, "apply", wrapper)

    counted(module._IndexedMaxPoolRescale, "indexed")
    counted(module._RescaleMaxPool, "fused")

    def explain():
        return lumos.explain(model, x, method=method, target=[0, 1, 2], baselines=refs)

    fused = explain()
    assert calls == {"indexed": 4, "fused": 1}  # the ReLU's pooling took both rules at once
    monkeypatch.setattr(graph.Graph, "_mark_pooled_activations", lambda self: None)
    indexed = explain()
    assert calls == {"indexed": 9, "fused": 1}  # now every pooling took the indexed rule
    monkeypatch.setattr(graph, "_pool_with_indices", lambda *a: None)
    general = explain()
    assert calls == {"indexed": 9, "fused": 1}
    for exp in (fused, indexed):
        torch.testing.assert_close(exp.attributions, general.attributions, rtol=1e-12, atol=1e-14)
        assert exp.delta.abs().max() < 1e-10


@pytest.mark.parametrize("activation", [nn.Sigmoid, nn.Tanh, nn.ELU])
def test_a_vanishing_difference_takes_the_derivative_whatever_the_batch(activation):
    """Where |Δx| < 1e-10, Δy/Δx is rounding noise: the derivative replaces it (as in Captum),
    for each element on its own, whatever else is in the batch."""
    from captum.attr import DeepLift as CaptumDeepLift

    first = nn.Linear(2, 1).double()
    last = nn.Linear(1, 1).double()
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.0, -1.0]]))
        first.bias.fill_(1.0)
        last.weight.fill_(1000.0)
        last.bias.zero_()
    model = nn.Sequential(first, activation(), last).eval()
    tiny = torch.tensor([[0.5 + 2**-52, 0.5]], dtype=torch.float64)  # Δz = 2.2e-16
    exact = torch.tensor([[0.5, 0.5]], dtype=torch.float64)  # Δz = 0
    expected = CaptumDeepLift(model).attribute(tiny, torch.zeros_like(tiny), target=0)
    alone = deeplift(model, tiny, 0).attributions
    batched = deeplift(model, torch.cat([tiny, exact]), 0).attributions[:1]
    torch.testing.assert_close(alone, expected.detach(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(batched, alone, rtol=1e-12, atol=1e-12)


class StraddlingReLU(nn.Module):
    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.first, self.last = nn.Linear(1, 1).double(), nn.Linear(1, 1).double()
        self.relu = F.relu if functional else nn.ReLU()
        with torch.no_grad():
            self.first.weight.fill_(1.0)
            self.first.bias.zero_()
            self.last.weight.fill_(1000.0)
            self.last.bias.zero_()

    def forward(self, x):
        return self.last(self.relu(self.first(x)))


@pytest.mark.parametrize("functional", [False, True])
def test_relu_inputs_straddling_zero_closer_than_eps_take_the_derivative(functional):
    """x = 1e-12 against x' = −1e-12: Δy/Δx = 0.5, the derivative (and Captum) 1."""
    from captum.attr import DeepLift as CaptumDeepLift

    model = StraddlingReLU(functional).eval()
    x = torch.tensor([[1e-12], [0.5]], dtype=torch.float64)
    ref = torch.tensor([[-1e-12]], dtype=torch.float64)
    ours = deeplift(model, x, 0, baselines=ref).attributions
    torch.testing.assert_close(ours[:, 0], torch.tensor([2e-9, 500.0], dtype=torch.float64))
    if not functional:
        expected = CaptumDeepLift(model).attribute(x, ref.expand_as(x), target=0)
        torch.testing.assert_close(ours, expected.detach(), rtol=1e-9, atol=1e-15)


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 5, 3, padding=1), nn.Conv2d(5, 5, 3, padding=1)
        self.fc = nn.Linear(5, 3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        h = F.max_pool2d(self.act(self.conv1(x)), 2)
        h = self.act(h + F.relu(self.conv2(h), inplace=True))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


class Modules(nn.Module):
    def __init__(self, twin: Functional) -> None:
        super().__init__()
        self.conv1, self.conv2, self.fc = twin.conv1, twin.conv2, twin.fc
        self.r1, self.r2, self.r3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.pool, self.gap, self.flat = nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten()

    def forward(self, x):
        h = self.pool(self.r1(self.conv1(x)))
        h = self.r3(h + self.r2(self.conv2(h)))
        return self.fc(self.flat(self.gap(h)))


def test_deeplift_of_functional_code_equals_deeplift_of_its_module_twin():
    torch.manual_seed(0)
    functional = Functional().double().eval()
    twin = Modules(functional).eval()
    x = torch.rand(3, 3, 12, 12, dtype=torch.float64)
    ref = torch.rand(3, 12, 12, dtype=torch.float64)
    a = deeplift(functional, x, 2, baselines=ref).attributions
    b = deeplift(twin, x, 2, baselines=ref).attributions
    assert torch.allclose(a, b, atol=1e-12)


class Layers(nn.Module):
    """Every layer the lockstep pass runs on inputs and references at once (strided, dilated
    and grouped convolutions in 1, 2 and 3 dimensions, a merged BatchNorm, a Linear on
    positions), and convolutions it leaves to their own autograd (reflect padding,
    ``padding='same'``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1, dilation=1)
        self.bn = nn.BatchNorm2d(6)
        self.grouped = nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=3)
        self.reflect = nn.Conv2d(6, 4, 3, padding=1, padding_mode="reflect")
        self.same = nn.Conv2d(4, 4, 4, padding="same")
        self.conv1d = nn.Conv1d(4, 4, 3, padding=1)
        self.conv3d = nn.Conv3d(1, 2, (1, 3, 3), padding=(0, 1, 1))
        self.positions = nn.Linear(4, 5)
        self.fc = nn.Linear(16 * 5 + 2 * 4 * 4 * 4, 3)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))  # (N, 6, 4, 4)
        h = torch.sigmoid(self.reflect(F.elu(self.grouped(h))))
        h = torch.tanh(self.same(h))  # (N, 4, 4, 4)
        seq = F.relu(self.conv1d(h.flatten(2)))  # (N, 4, 16)
        a = F.relu(self.positions(seq.transpose(1, 2)))  # (N, 16, 5)
        b = F.relu(self.conv3d(seq.unsqueeze(1).unflatten(-1, (4, 4)).transpose(2, 3)))
        return self.fc(torch.cat([a.flatten(1), b.flatten(1)], 1))


@pytest.mark.parametrize("baselines", ["zeros", "per example", "background"])
def test_the_lockstep_pass_equals_separate_reference_passes(baselines, monkeypatch):
    """Inputs and references share each linear layer's call (the references ride along, the
    backward pass differentiates the inputs' rows alone); the same numbers as running the
    references on their own first, for every kind of layer, and summation-to-delta holds."""
    from lumos.attribution.propagation import deeplift as module

    torch.manual_seed(0)
    model = Layers().double().eval()
    model.bn.running_mean.uniform_(-0.3, 0.3)
    model.bn.running_var.uniform_(0.5, 1.5)
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    method, refs = reference_case(baselines, (3, 8, 8), background=2)
    paired = []
    apply = module._PairedLayer.apply
    monkeypatch.setattr(module._PairedLayer, "apply", lambda *a: paired.append(1) or apply(*a))

    def explain(**options):
        return lumos.explain(model, x, method=method, target=[0, 2, 1], baselines=refs, **options)

    by_default = explain()  # pairs where the weights outweigh the inputs
    assert len(paired) < 6 and (len(paired) > 0 or baselines == "background")
    monkeypatch.setattr(module, "_worth_pairing", lambda layer, x: True)
    paired.clear()
    together = explain()
    assert len(paired) == 6  # all but the reflect-padded and 'same' convolutions
    bounded = explain(batch_size=2)  # chunks of 2 rows cannot carry the references too
    assert len(paired) == 6
    monkeypatch.setattr(module.RescaleStrategy, "paired_layer", lambda *a: None)
    apart = explain()
    for exp in (by_default, together, bounded):
        torch.testing.assert_close(exp.attributions, apart.attributions, rtol=1e-10, atol=1e-13)
        assert exp.delta.abs().max() < 1e-10


@pytest.mark.parametrize("host_checks", [True, False])
@pytest.mark.parametrize("activation", [nn.ReLU, nn.PReLU, nn.Sigmoid, nn.ELU])
def test_any_activation_read_by_a_max_pooling_takes_both_rules_at_once(
    activation, host_checks, monkeypatch
):
    """The pooled-size rule (`_RescaleMaxPool`) holds for any elementwise activation, channel
    parameters included, ties with the reference included; a ReLU pools its input first (the
    winners differ in windows whose maximum is ≤ 0, which receive nothing either way). Also
    with the accelerators' fix-up by masks, without reading back whether it is needed
    (`host_checks=False`)."""
    from lumos.attribution.propagation import deeplift as module
    from lumos.attribution.propagation import graph

    if not host_checks:
        monkeypatch.setattr(module, "_checks_on_host", lambda t: False)

    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), activation(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64, 3),
    ).double().eval()  # fmt: skip
    if activation is nn.PReLU:
        model[1] = nn.PReLU(4, init=0.1).double()
    with torch.no_grad():  # channels 0, 1 compute x₀ − x₁ ± 0.1: Δz = 0 wherever the two are
        for c, bias in ((0, 0.1), (1, -0.1)):  # equal, while Δx is not, so the derivative there
            model[0].weight[c] = 0.0  # (f' > 0 and, for a ReLU, f' = 0) reaches the input
            model[0].weight[c, 0, 1, 1], model[0].weight[c, 1, 1, 1] = 1.0, -1.0
            model[0].bias[c] = bias
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64) - 0.5
    x[0, 1] = x[0, 0]
    x[1, :, :4, :4] = 0.0  # and ties with the reference
    fused = deeplift(model, x, [0, 1, 2])
    monkeypatch.setattr(graph.Graph, "_mark_pooled_activations", lambda self: None)
    apart = deeplift(model, x, [0, 1, 2])  # the indexed max-pool rule after a Rescale
    monkeypatch.setattr(graph, "_pool_with_indices", lambda *a: None)
    general = deeplift(model, x, [0, 1, 2])  # the pooling differentiated twice
    for exp in (fused, apart):
        torch.testing.assert_close(exp.attributions, general.attributions, rtol=1e-12, atol=1e-14)
    assert fused.delta.abs().max() < 1e-10


class Floored(nn.Module):
    """A registered activation whose bound argument has the layout of its input (a per-channel
    floor of shape (1, C, 1, 1)), read only by a max pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("floor", torch.linspace(-0.5, 0.5, 4).view(1, 4, 1, 1))
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 9, 2)

    def forward(self, x):
        return self.fc(self.pool(torch.clamp(self.conv(x), min=self.floor)).flatten(1))


def test_a_pooled_activation_that_depends_on_its_layout_takes_its_derivative_in_place(
    monkeypatch,
):
    """Vanishing differences at the winners take the activation's derivative, computed on the
    activation's own input (not on the gathered winners, whose layout it may not accept)."""
    from lumos.attribution.propagation import graph

    monkeypatch.setitem(graph._EXTRA, torch.clamp, "activation")
    torch.manual_seed(0)
    model = Floored().double().eval()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    ref = x.clone()
    ref[1], ref[2, :, 3:] = 0.0, 0.0  # row 0 equals its baseline; row 2 half of it
    exp = deeplift(model, x, [0, 1, 1], baselines=ref)
    rows = torch.arange(3)
    expected = model(x)[rows, [0, 1, 1]] - model(ref)[rows, [0, 1, 1]]
    torch.testing.assert_close(exp.attributions.flatten(1).sum(1), expected.detach())
    assert exp.delta.abs().max() < 1e-10


def test_hooks_around_a_pooled_relu_see_what_the_model_computes():
    """A ReLU read by a max pooling is applied after it only where no hook would notice: a
    hook on the pooling sees the ReLU's output, and the ReLU never runs on pooled values."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(4 * 16, 3),
    ).double().eval()  # fmt: skip
    seen = {"relu": [], "pool": []}
    model[1].register_forward_pre_hook(lambda m, a: seen["relu"].append(tuple(a[0].shape)))
    model[2].register_forward_pre_hook(lambda m, a: seen["pool"].append(float(a[0].min())))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    exp = deeplift(model, x, [0, 2])
    assert seen["relu"] and all(shape[1:] == (4, 8, 8) for shape in seen["relu"])
    assert seen["pool"] and min(seen["pool"]) >= 0.0
    assert exp.delta.abs().max() < 1e-10


def test_a_functional_layer_whose_path_is_a_modules_uses_its_own_weights():
    """`F.linear(x, self.w)` inside a block that also holds a module named `linear` traces to
    the same path as that module; each must keep its own weights."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 6))
            self.linear = nn.Linear(6, 6)

        def forward(self, x):
            return self.linear(F.relu(F.linear(x, self.w)))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block, self.out = Block(), nn.Linear(6, 2)

        def forward(self, x):
            return self.out(F.relu(self.block(x)))

    torch.manual_seed(0)
    model = Net().double().eval()
    x = torch.randn(3, 6, dtype=torch.float64)
    rows, target = torch.arange(3), [0, 1, 0]
    expected = model(x)[rows, target] - model(torch.zeros_like(x))[rows, target]
    for method in ("deeplift", "lrp"):
        options = {"composite": "epsilon", "epsilon": 1e-12} if method == "lrp" else {}
        exp = lumos.explain(model, x, method=method, target=target, **options)
        if method == "deeplift":
            total = exp.attributions.sum(1)
            torch.testing.assert_close(total, expected.detach())
        else:  # bias-free check is not possible here; outputs must be the model's own
            torch.testing.assert_close(exp.outputs, model(x).detach())


def test_a_max_pooling_that_returns_its_indices_is_refused_by_name():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2, return_indices=True))
    with pytest.raises(lumos.LumosError, match="return_indices"):
        deeplift(model, torch.rand(1, 3, 8, 8), 0)


# -- RevealCancel --------------------------------------------------------------------------------


def reveal_cancel_by_hand(first: nn.Linear, second: nn.Linear, x, ref, k):
    """RevealCancel on ``w_k · relu(W x + b)`` (Shrikumar et al. 2017, §3.5.3)."""
    w, b, v = first.weight.detach(), first.bias.detach(), second.weight[k].detach()
    d = x - ref
    dp, dn = d.clamp(min=0), d.clamp(max=0)
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    z0 = w @ ref + b
    zp, zn = wp @ dp + wn @ dn, wn @ dp + wp @ dn
    f = torch.relu
    yp = 0.5 * (f(z0 + zp) - f(z0)) + 0.5 * (f(z0 + zn + zp) - f(z0 + zn))
    yn = 0.5 * (f(z0 + zn) - f(z0)) + 0.5 * (f(z0 + zp + zn) - f(z0 + zp))
    mp, mn = v * yp / zp, v * yn / zn
    return dp * (wp.T @ mp + wn.T @ mn) + dn * (wn.T @ mp + wp.T @ mn)


def test_reveal_cancel_matches_its_definition_on_a_small_network():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).double().eval()
    x, ref = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    exp = deeplift(model, x, 2, baselines=ref, rule="reveal_cancel")
    expected = torch.stack(
        [reveal_cancel_by_hand(model[0], model[2], a, r, 2) for a, r in zip(x, ref)]
    )
    assert torch.allclose(exp.attributions, expected, atol=1e-10)
    assert exp.delta.abs().max() < 1e-10


def test_reveal_cancel_sums_to_delta_on_a_cnn_with_batchnorm_and_residual_add():
    torch.manual_seed(5)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.conv2, self.fc = nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 3)

        def forward(self, x):
            h = F.relu(self.bn(self.conv(x)))
            h = torch.tanh(h - self.conv2(h))
            return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))

    model = Net().double().eval()
    x, ref = (
        torch.rand(2, 3, 8, 8, dtype=torch.float64),
        torch.rand(2, 3, 8, 8, dtype=torch.float64),
    )
    exp = deeplift(model, x, 0, baselines=ref, rule="reveal_cancel")
    assert exp.delta.abs().max() < 1e-10


def test_reveal_cancel_refuses_max_pooling_and_unknown_rules_are_named():
    from lumos.core.errors import UnknownNameError, UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="max pooling"):
        deeplift(tiny_cnn(), torch.rand(1, 3, 16, 16), 0, rule="reveal_cancel")
    with pytest.raises(UnknownNameError, match="reveal_cancel"):
        deeplift(tiny_cnn(), torch.rand(1, 3, 16, 16), 0, rule="reveal_cancell")


def test_a_nonlinearity_off_the_batch_dimension_is_refused_by_name():
    class Flattened(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(x.reshape(-1)).reshape(x.shape[0], 6))

    with pytest.raises(lumos.LumosError, match=r"batch dimension.*relu"):
        deeplift(Flattened(), torch.randn(3, 6), 0)


@pytest.mark.parametrize("method", ["deeplift", "lrp"])
def test_module_hooks_fire_once_per_pass(method):
    """Forward hooks on the modules of a traced model fire once for each pass over them (the
    inputs, and DeepLIFT's references), with the tensors the model computes there."""
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(4 * 16, 3),
    ).double().eval()  # fmt: skip
    calls = {"relu pre": 0, "relu": 0, "pool": 0, "pool kwargs": 0}

    def count(key):
        def hook(*args):
            calls[key] += 1

        return hook

    model[1].register_forward_pre_hook(count("relu pre"))
    model[1].register_forward_hook(count("relu"))
    model[2].register_forward_hook(count("pool"))
    model[2].register_forward_pre_hook(count("pool kwargs"), with_kwargs=True)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    lumos.explain(model, x, method=method, target=[0, 2])
    passes = 2 if method == "deeplift" else 1
    assert calls == dict.fromkeys(calls, passes)


@pytest.mark.parametrize(
    "pool",
    [
        nn.MaxPool2d(2),
        nn.MaxPool2d(3, 2, 1),
        nn.MaxPool2d(3, 2, 1, dilation=2, ceil_mode=True),
        nn.AdaptiveMaxPool2d((5, 3)),
    ],
)
def test_large_poolings_run_channels_last_with_the_same_winners(pool):
    """The indexed pooling switches large inputs to the channels-last kernel; values, indices
    and the winner among ties must be those of torch's own (NCHW) pooling."""
    from lumos.attribution.propagation.graph import Graph, Step, _pool_with_indices

    graph = Graph(nn.Sequential(pool), "test")
    step = next(s for s in graph.steps if s.kind == "max_pool")
    x = torch.randn(2, 64, 40, 36).round()  # many ties
    with_indices = _pool_with_indices(step, x, (x,), {}, 0)
    assert isinstance(step, Step) and with_indices is not None
    y, indices = with_indices(x)
    y_torch, indices_torch = type(pool)(**_pool_options(pool), return_indices=True)(x)
    assert y.is_contiguous() and indices.is_contiguous()
    assert torch.equal(y, y_torch) and torch.equal(indices, indices_torch)


def _pool_options(pool):
    if isinstance(pool, nn.AdaptiveMaxPool2d):
        return {"output_size": pool.output_size}
    names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
    return {name: getattr(pool, name) for name in names}


@pytest.mark.parametrize("method", ["deeplift", "lrp", "excitation_backprop"])
def test_a_forward_with_star_args_and_keyword_options(method):
    """``forward(self, x, *rest, scale=1.0, **options)``: the unused *rest and **options
    receive nothing, and the keyword default is used."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x, *rest, scale=2.0, **options):
            return torch.relu(self.fc(x)) * scale

    model, x = Net().eval(), torch.rand(3, 4)
    exp = lumos.explain(model, x, method=method, target=0)
    torch.testing.assert_close(exp.outputs, model(x))


@pytest.mark.parametrize("baselines", ["zeros", "example"])
def test_the_fix_up_by_masks_equals_the_read_back_check(baselines, monkeypatch):
    """On an accelerator a ReLU's multipliers take the derivative (x > 0) where |Δx| < EPS by
    masks, without reading back whether any is: the same numbers as the CPU's check, also
    where differences vanish and the derivative is 0 or 1."""
    from lumos.attribution.propagation import deeplift as module

    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 36, 3),
    ).double().eval()  # fmt: skip
    with torch.no_grad():  # x₀ − x₁ ± 0.1: Δz = 0 where the two are equal, on both sides of 0
        for c, bias in ((0, 0.1), (1, -0.1)):
            model[0].weight[c] = 0.0
            model[0].weight[c, 0, 1, 1], model[0].weight[c, 1, 1, 1] = 1.0, -1.0
            model[0].bias[c] = bias
    x = torch.rand(3, 3, 6, 6, dtype=torch.float64) - 0.5
    x[:, 1] = x[:, 0]
    refs = None if baselines == "zeros" else x[2:3].clone()
    x[0, :, :3] = 0.0 if refs is None else refs[0, :, :3]  # ties with the reference
    checked = deeplift(model, x, [0, 1, 2], baselines=refs)
    monkeypatch.setattr(module, "_checks_on_host", lambda t: False)
    masked = deeplift(model, x, [0, 1, 2], baselines=refs)
    torch.testing.assert_close(masked.attributions, checked.attributions, rtol=1e-12, atol=1e-14)
    assert masked.delta.abs().max() < 1e-10
