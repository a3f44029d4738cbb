"""One hygiene and error suite over every registered method: a new method is covered the moment
it registers. Per-family options that a method needs to run come from `options_for`."""

from __future__ import annotations

import pytest
import torch
from hygiene import ALL, assert_unchanged, options_for, snapshot
from models import tiny_cnn

import lumos
from lumos.core.errors import (
    InputError,
    LumosError,
    TargetError,
    UnknownNameError,
    UnsupportedModelError,
)


@pytest.fixture
def model():
    m = tiny_cnn()
    m.conv1.weight.requires_grad_(False)  # a user's frozen layer must stay frozen
    m.fc.weight.grad = torch.ones_like(m.fc.weight)  # and stale .grad must survive
    return m


@pytest.mark.parametrize("name", ALL)
def test_method_leaves_the_model_as_it_was(name, model):
    x = torch.rand(2, 3, 16, 16)
    before = snapshot(model)
    exp = lumos.explain(model, x, method=name, target=1, **options_for(name, x))
    assert_unchanged(model, before)
    assert exp.method == name
    for a in exp.attributions_flat:
        assert torch.isfinite(a).all()
    if exp.attribution_structure is None:
        assert exp.attributions.shape == x.shape and exp.attributions.dtype == x.dtype


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("failing_call", [1, 2, 3])
def test_method_restores_the_model_after_an_exception(name, failing_call, model):
    x = torch.rand(2, 3, 16, 16)
    calls = {"n": 0}

    def fail(module, args, output):
        calls["n"] += 1
        if calls["n"] == failing_call:
            raise RuntimeError("injected failure")

    handle = model.fc.register_forward_hook(fail)
    before = snapshot(model)
    if failing_call == 1:  # the first model call is lumos's own: the error names the shapes
        # (DeepLIFT's first pass runs its shared zero baseline: 1 row)
        with pytest.raises(LumosError, match=r"\([12], 3, 16, 16\).*injected failure"):
            lumos.explain(model, x, method=name, target=1, **options_for(name, x))
    else:  # later calls may happen anywhere inside a method
        try:
            lumos.explain(model, x, method=name, target=1, **options_for(name, x))
        except (LumosError, RuntimeError) as exc:
            assert "injected failure" in str(exc)
    assert_unchanged(model, before)
    handle.remove()


@pytest.mark.parametrize("name", ALL)
def test_method_leaves_a_train_mode_model_as_it_was(name):
    model = tiny_cnn().train()
    x = torch.rand(2, 3, 16, 16)
    before = snapshot(model)
    with pytest.warns(UserWarning, match="train mode"):
        try:
            lumos.explain(model, x, method=name, target=1, **options_for(name, x))
        except UnsupportedModelError as exc:  # methods with no rule for batch statistics
            assert "eval()" in str(exc)
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", ALL)
def test_method_rejects_nan_inputs(name, model):
    x = torch.rand(2, 3, 16, 16)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        lumos.explain(
            model, x, method=name, target=1, **options_for(name, torch.rand(2, 3, 16, 16))
        )


@pytest.mark.parametrize("name", ALL)
def test_method_rejects_targets_out_of_range(name, model):
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(TargetError, match="out of range"):
        lumos.explain(model, x, method=name, target=7, **options_for(name, x))


@pytest.mark.parametrize("name", ALL)
def test_method_rejects_unknown_options_with_a_suggestion(name, model):
    with pytest.raises(UnknownNameError, match="batch_size"):
        lumos.explain(model, torch.rand(2, 3, 16, 16), method=name, batch_sise=2)


@pytest.mark.parametrize("name", ALL)
def test_method_is_documented_with_its_paper_or_formula(name):
    cls = lumos.core.registry.get_method(name)
    doc = cls.__doc__ or ""
    assert len(doc.splitlines()) >= 3, f"{name} needs a docstring: summary, paper, formula"


def test_every_registered_method_is_exported_for_the_object_api():
    exported = {getattr(lumos.attribution, name) for name in lumos.attribution.__all__}
    missing = [n for n in ALL if lumos.core.registry.get_method(n) not in exported]
    assert not missing, f"add {missing} to lumos.attribution.__all__"
