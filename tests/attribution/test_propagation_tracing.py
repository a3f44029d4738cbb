"""The trace an explainer keeps between its calls: used again while nothing the trace read has
changed, and traced again, with the right numbers, as soon as anything did."""

from __future__ import annotations

import copy
import functools
import pickle
import sys
import types

import pytest
import torch
from torch import nn

import lumos
from lumos.attribution.propagation.tracing import TraceCache, trace_key
from lumos.core.errors import UnsupportedModelError
from lumos.core.registry import get_method

FLAG = True  # a global the forward reads
SCALE = 2.0  # a global a helper of the forward reads
BOX = [1.0]  # a mutable global, read by value
settings = types.ModuleType("lumos_test_settings")  # a settings module, read by attribute
settings.SHIFT = 0.0


class Limits:  # a class used as a namespace of constants
    CEILING = 50.0


def _scaled(h):
    return h * SCALE


class Inner:
    def __init__(self) -> None:
        self.gain = 1.0


class Config:
    def __init__(self) -> None:
        self.residual = True
        self.inner = Inner()


class Scale:
    """A callable object held by the model."""

    def __init__(self, k: float) -> None:
        self.k = k

    def __call__(self, h):
        return h * self.k


def _times(h, k):
    return h * k


class Block(nn.Module):
    """A module fx traces through (its forward runs on proxies)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, h):
        return self.act(self.conv(h)) + h


class Net(nn.Module):
    offset = 0.1  # a class attribute the forward reads

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.block = Block()
        self.drop = nn.Dropout(0.0)
        self.head = nn.Linear(4 * 6 * 6, 3)
        self.config = Config()
        self.post = Scale(1.0)
        self.times = functools.partial(_times, k=1.0)
        self.gain = 1.0

    def forward(self, x):
        h = self.block(self.act(self.bn(self.conv(x))))
        if self.config.residual:
            h = h + x.mean(1, keepdim=True)
        if FLAG:
            h = torch.relu(h - self.offset - settings.SHIFT)
        h = _scaled(h) * self.gain * BOX[0] * self.config.inner.gain
        h = self.times(self.post(h))
        h = h - torch.relu(h - Limits.CEILING)  # min(h, ceiling)
        if self.drop.p > 0:
            h = h * 0.5
        if self.training:
            h = h * 3.0
        return self.head(self.drop(h).flatten(1))


def _net() -> Net:
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _set(name, value):
    def mutate(model, monkeypatch):
        monkeypatch.setattr(sys.modules[__name__], name, value)

    return mutate


def _hook_on_block(model, monkeypatch):
    model.block.register_forward_hook(lambda module, args, out: out * 2.0)


def _hook_contents(model, monkeypatch, explain):
    steer = {"scale": 1.0}
    model.block.register_forward_hook(lambda module, args, out: out * steer["scale"])
    explain()  # (the hook as it was, traced)
    steer["scale"] = 3.0


MUTATIONS = {
    "plain attribute": lambda m, mp: setattr(m, "gain", 3.0),
    "config attribute": lambda m, mp: setattr(m.config, "residual", False),
    "config attribute two levels down": lambda m, mp: setattr(m.config.inner, "gain", 2.0),
    "callable object's attribute": lambda m, mp: setattr(m.post, "k", 2.0),
    "partial's argument": lambda m, mp: m.times.keywords.__setitem__("k", 2.0),
    "global flag": _set("FLAG", False),
    "global a helper reads": _set("SCALE", 5.0),
    "mutable global": lambda m, mp: BOX.__setitem__(0, 4.0),
    "settings module attribute": lambda m, mp: mp.setattr(settings, "SHIFT", 0.5),
    "class attribute of a global class": lambda m, mp: mp.setattr(Limits, "CEILING", 0.05),
    "class attribute": lambda m, mp: mp.setattr(Net, "offset", 0.4),
    "attribute of a called module": lambda m, mp: setattr(m.drop, "p", 0.5),
    "train mode": lambda m, mp: (m.train(), m.bn.eval(), m.drop.eval()),
    "hook on a traced-through module": _hook_on_block,
    "what a hook reads": _hook_contents,
    "submodule replaced": lambda m, mp: setattr(m, "act", nn.Tanh()),
}


@pytest.fixture(autouse=True)
def _restore_box():
    yield
    BOX[0] = 1.0


@pytest.mark.parametrize("method", ["deeplift", "lrp", "excitation_backprop", "deeplift_shap"])
def test_an_unchanged_model_is_traced_once_and_gives_the_same_numbers(method):
    model, x = _net(), torch.rand(2, 3, 6, 6)
    options = {"baselines": torch.rand(3, 3, 6, 6)} if method == "deeplift_shap" else {}
    explainer = get_method(method)(model, reuse_trace=True)
    first = explainer.explain(x, target=1, **options)
    second = explainer.explain(x, target=1, **options)
    assert explainer.traces.traced == 1
    assert torch.equal(first.attributions, second.attributions)
    direct = lumos.explain(model, x, method=method, target=1, **options)
    assert torch.equal(first.attributions, direct.attributions)
    assert first.options["reuse_trace"] is True and direct.options["reuse_trace"] is False


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_any_change_the_trace_may_depend_on_traces_again(mutation, monkeypatch):
    model, x = _net(), torch.rand(2, 3, 6, 6)
    explainer = get_method("deeplift")(model, reuse_trace=True)
    before = explainer.explain(x, target=1).attributions
    traced = explainer.traces.traced
    mutate = MUTATIONS[mutation]
    if mutate is _hook_contents:
        mutate(model, monkeypatch, lambda: explainer.explain(x, target=1))
    else:
        mutate(model, monkeypatch)
    with torch.no_grad():
        output = model(x)  # the model itself changed: the explanation must follow it
    after = explainer.explain(x, target=1)
    fresh = get_method("deeplift")(model).explain(x, target=1)
    assert explainer.traces.traced > traced
    assert not torch.allclose(after.attributions, before, atol=1e-6)  # (the change mattered)
    assert torch.allclose(after.attributions, fresh.attributions, atol=1e-6)
    assert torch.allclose(after.outputs, output, atol=1e-5)
    assert after.delta.abs().max() < 1e-4


def test_weights_edited_in_place_need_no_new_trace():
    """Values are read when the graph runs, also after edits that autograd cannot see."""
    model, x = _net(), torch.rand(2, 3, 6, 6)
    explainer = get_method("deeplift")(model, reuse_trace=True)
    before = explainer.explain(x, target=1).attributions
    model.conv.weight.data.mul_(-2.0)
    model.bn.running_mean.numpy()[:] = 0.3
    after = explainer.explain(x, target=1).attributions
    assert explainer.traces.traced == 1
    assert not torch.allclose(after, before)
    assert torch.allclose(after, lumos.explain(model, x, method="deeplift", target=1).attributions)


def test_a_trace_that_made_tensor_constants_is_not_kept():
    class Constant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)
            self.weights = [1.0, 2.0, 3.0, 4.0]

        def forward(self, x):
            return self.fc(x * torch.tensor(self.weights))

    model, x = Constant(), torch.rand(3, 4)
    explainer = get_method("deeplift")(model, reuse_trace=True)
    explainer.explain(x, target=0)
    model.weights[0] = -5.0  # (also caught by value; the constant alone keeps it uncached)
    after = explainer.explain(x, target=0)
    assert explainer.traces.traced == 2 and explainer.traces.trace is None
    assert torch.allclose(
        after.attributions, lumos.explain(model, x, method="deeplift", target=0).attributions
    )


def test_the_key_sees_closures_and_numpy_arrays():
    import numpy as np

    box = np.array([1.0])
    scale = [2.0]

    class Closure(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x * scale[0] * float(box[0]))

    model = Closure()
    key = trace_key(model)
    assert trace_key(model) == key
    scale[0] = 3.0
    assert trace_key(model) != key
    key = trace_key(model)
    box[0] = 7.0
    assert trace_key(model) != key


def test_a_copied_or_pickled_explainer_starts_without_a_trace():
    model, x = _net(), torch.rand(2, 3, 6, 6)
    explainer = get_method("lrp")(model, reuse_trace=True)
    explainer.explain(x, target=0)
    assert explainer.traces.trace is not None
    for other in (copy.deepcopy(explainer.traces), pickle.loads(pickle.dumps(explainer.traces))):
        assert isinstance(other, TraceCache) and other.trace is None and other.key is None


@pytest.mark.parametrize("method", ["deeplift", "lrp", "excitation_backprop"])
def test_a_forward_set_on_the_instance_is_refused(method):
    """fx traces the forward of the model's class: another forward set on the instance (as
    some libraries wrap forward) would be silently ignored, so it is refused; the class's own
    forward bound on the instance is fine."""
    model, x = _net(), torch.rand(2, 3, 6, 6)
    plain = lumos.explain(model, x, method=method, target=1).attributions
    model.forward = types.MethodType(Net.forward, model)
    assert torch.equal(lumos.explain(model, x, method=method, target=1).attributions, plain)

    def forward(self, x):
        return self.head(torch.relu(self.block(self.act(self.conv(x)))).flatten(1))

    model.forward = types.MethodType(forward, model)
    with pytest.raises(UnsupportedModelError, match="replaced on the instance"):
        lumos.explain(model, x, method=method, target=1)
    assert type(model) is Net


def test_by_default_every_call_traces_afresh():
    model, x = _net(), torch.rand(2, 3, 6, 6)
    explainer = get_method("deeplift")(model)
    before = explainer.explain(x, target=1).attributions
    settings.SHIFT = 0.5
    try:
        after = explainer.explain(x, target=1).attributions
    finally:
        settings.SHIFT = 0.0
    assert explainer.traces is None and not torch.allclose(after, before)


class Keeping(Block):
    def forward(self, h):
        self.features = h  # (a forward that keeps what it saw)
        return super().forward(h)


def test_attributes_a_traced_forward_sets_are_put_back():
    """During a trace the forward runs on fx's proxies: what it stores on a module is undone."""
    model, x = _net(), torch.rand(2, 3, 6, 6)
    model.block = Keeping()
    model.block.features = "as it was"
    lumos.explain(model, x, method="deeplift", target=1)
    assert model.block.features == "as it was"
    del model.block.features
    lumos.explain(model, x, method="lrp", target=1)
    assert "features" not in model.block.__dict__


def test_the_models_own_hooks_run_once_per_pass_and_may_not_replace_values():
    model, x = _net(), torch.rand(2, 3, 6, 6)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append("pre"))
    model.register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape)))
    plain = lumos.explain(_net(), x, method="lrp", target=0)
    assert torch.equal(
        lumos.explain(model, x, method="lrp", target=0).attributions, plain.attributions
    )
    assert seen == ["pre", (2, 3)]
    model.register_forward_hook(lambda module, args, out: out)  # returns it: allowed
    lumos.explain(model, x, method="deeplift", target=0)
    model.register_forward_hook(lambda module, args, out: out.softmax(1))
    for method in ("lrp", "deeplift"):
        with pytest.raises(UnsupportedModelError, match="forward hook on 'the model'"):
            lumos.explain(model, x, method=method, target=0)


def test_a_pre_hook_that_shifts_the_inputs_is_explained_through():
    """The model's own pre-hooks may replace its inputs, as in a call of the model: DeepLIFT
    of the shifted copy at shifted inputs and references is DeepLIFT of the model itself."""
    import lumos.metrics as M

    model, x, b = _net(), torch.rand(2, 3, 6, 6), torch.rand(1, 3, 6, 6)
    shifted = copy.deepcopy(model)
    shifted.register_forward_pre_hook(lambda module, args: (args[0] - 1.0,))
    ours = lumos.explain(shifted, x + 1.0, method="deeplift", target=1, baselines=b + 1.0)
    plain = lumos.explain(model, x, method="deeplift", target=1, baselines=b)
    torch.testing.assert_close(ours.attributions, plain.attributions, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.outputs, plain.outputs, atol=1e-5, rtol=1e-4)
    assert ours.delta.abs().max() < 1e-4
    for method in ("lrp", "deeplift", "excitation_backprop"):  # (its copy shifts by a hook)
        assert torch.isfinite(M.input_invariance(model, x, method, target=1)).all()
    shifted.register_forward_pre_hook(lambda module, args: (args[0], args[0]))
    with pytest.raises(UnsupportedModelError, match="changes which inputs"):
        lumos.explain(shifted, x, method="lrp", target=1)


def test_a_keyword_pre_hook_on_a_model_called_with_a_dict_of_inputs():
    """Dict inputs reach the model as keyword arguments: a kwargs pre-hook sees them by name
    and may replace them, as in ``model(**inputs)``."""

    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(2, 3)

        def forward(self, a, b):
            return torch.relu(self.a(a)) + torch.relu(self.b(b))

    torch.manual_seed(0)
    model = TwoInputs().eval()
    inputs = {"a": torch.rand(3, 4), "b": torch.rand(3, 2)}
    seen = []

    def shift_back(module, args, kwargs):
        seen.append((args, sorted(kwargs)))
        return args, {k: v - 1.0 for k, v in kwargs.items()}

    shifted = copy.deepcopy(model)
    shifted.register_forward_pre_hook(shift_back, with_kwargs=True)
    moved = {k: v + 1.0 for k, v in inputs.items()}
    baselines = {k: torch.zeros_like(v) for k, v in inputs.items()}
    moved_baselines = {k: v + 1.0 for k, v in baselines.items()}
    ours = lumos.explain(shifted, moved, method="deeplift", target=0, baselines=moved_baselines)
    plain = lumos.explain(model, inputs, method="deeplift", target=0, baselines=baselines)
    assert seen and all(args == () and names == ["a", "b"] for args, names in seen)
    for key in inputs:
        torch.testing.assert_close(ours.attributions[key], plain.attributions[key])
    torch.testing.assert_close(ours.outputs, shifted(**moved))


@pytest.mark.parametrize("method", ["deeplift", "deeplift_shap", "lrp", "excitation_backprop"])
def test_reuse_trace_must_be_a_bool(method):
    from lumos.core.errors import InputError

    with pytest.raises(InputError, match="reuse_trace must be True or False"):
        get_method(method)(_net(), reuse_trace="no")
    with pytest.raises(InputError, match="reuse_trace"):
        lumos.explain(_net(), torch.rand(2, 3, 6, 6), method=method, reuse_trace=1)
