from __future__ import annotations

import json

import pytest
import torch

from lumos import zoo
from lumos.core.errors import InputError, LumosError, ModelLoadError
from lumos.zoo.cache import default_cache_dir
from lumos.zoo.catalog import ENTRIES

MIN_ACCURACY = {"digits": 0.95, "shapes": 0.95, "tabular": 0.93}


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_names_lists_every_model():
    assert zoo.names() == ["digits", "shapes", "tabular"]


def test_unknown_model_name_raises_with_a_suggestion():
    with pytest.raises(LumosError, match="'shapes'"):
        zoo.load("shape")


def test_model_is_in_eval_mode_float32_on_cpu_with_trainable_parameters(bundle):
    assert not any(module.training for module in bundle.model.modules())
    for parameter in bundle.model.parameters():
        assert parameter.dtype == torch.float32
        assert parameter.device.type == "cpu"
        assert parameter.requires_grad


def test_measured_test_accuracy_meets_the_bar(bundle):
    x, y = bundle.test_set()[:2]
    with torch.no_grad():
        predicted = torch.cat([bundle.model(chunk).argmax(dim=1) for chunk in x.split(250)])
    measured = (predicted == y).float().mean().item()
    assert measured == pytest.approx(bundle.accuracy, abs=1e-6)
    assert measured >= MIN_ACCURACY[bundle.name]


def test_test_batch_has_the_declared_shapes_and_dtypes(bundle):
    batch = bundle.test_batch(5)
    x, y = batch[:2]
    assert x.dtype == torch.float32 and x.shape == (5, *bundle.input_shape)
    assert y.dtype == torch.long and y.shape == (5,)
    assert int(y.min()) >= 0 and int(y.max()) < len(bundle.class_names)
    assert bundle.model(x).shape == (5, len(bundle.class_names))
    assert len(batch) == (3 if bundle.name == "shapes" else 2)


def test_test_batch_is_reproducible_per_seed(bundle):
    first, again, other = (bundle.test_batch(8, seed=s)[0] for s in (0, 0, 1))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_test_batch_rejects_an_impossible_size(bundle):
    with pytest.raises(InputError):
        bundle.test_batch(0)
    with pytest.raises(InputError):
        bundle.test_batch(len(bundle.test_set()[1]) + 1)


def test_returned_data_are_copies(bundle):
    x = bundle.test_set()[0]
    x.fill_(-1.0)
    assert float(bundle.test_set()[0].min()) >= 0.0  # images and the table are non-negative


@pytest.mark.parametrize("name", ["digits", "shapes"])
def test_images_are_in_the_unit_range_and_have_a_last_conv_block(load_zoo, name):
    bundle = load_zoo(name)
    x = bundle.train_set()[0]
    assert bundle.task == "image"
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    layer = bundle.model.get_submodule(bundle.default_layer)
    assert layer is bundle.model.features[-1]
    assert isinstance(layer.conv, torch.nn.Conv2d)


def test_shapes_masks_mark_one_uniformly_coloured_object(load_zoo):
    x, _, masks = load_zoo("shapes").test_set()
    assert masks.dtype == torch.bool and masks.shape == (len(x), 1, 64, 64)
    area = masks.float().mean(dim=(1, 2, 3))
    assert float(area.min()) > 0.01 and float(area.max()) < 0.15
    # The object is one flat colour; the background is smooth but never flat.
    for image, mask in zip(x[:50], masks[:50, 0]):
        assert float(image[:, mask].std(dim=1).max()) < 1e-6
        assert float(image[:, ~mask].std(dim=1).max()) > 0.01


def test_shapes_background_carries_no_class_signal(load_zoo):
    x, y, masks = load_zoo("shapes").test_set()
    background = (x * ~masks).sum(dim=(2, 3)) / (~masks).sum(dim=(2, 3))
    class_means = torch.stack([background[y == c].mean(dim=0) for c in range(4)])
    assert float((class_means - class_means.mean(dim=0)).abs().max()) < 0.05
    assert torch.bincount(y).min() > 0.2 * len(y)


def test_tabular_inputs_are_raw_features_with_names(load_zoo):
    bundle = load_zoo("tabular")
    x = bundle.train_set()[0]
    assert bundle.task == "tabular" and bundle.default_layer is None
    assert bundle.input_shape == (30,) and len(bundle.feature_names) == 30
    assert float(x[:, bundle.feature_names.index("mean area")].mean()) > 100
    assert bundle.class_names == ["malignant", "benign"]


def test_training_is_deterministic_and_depends_on_the_seed(tmp_path):
    first = zoo.load("tabular", cache_dir=tmp_path / "a")
    second = zoo.load("tabular", cache_dir=tmp_path / "b")
    other = zoo.load("tabular", cache_dir=tmp_path / "c", seed=1)
    assert _same_state(first.model, second.model)
    assert not _same_state(first.model, other.model)


def test_cache_reload_gives_the_trained_weights(tmp_path):
    trained = zoo.load("tabular", cache_dir=tmp_path)
    reloaded = zoo.load("tabular", cache_dir=tmp_path)
    assert _same_state(trained.model, reloaded.model)
    assert reloaded.accuracy == trained.accuracy
    (weights,) = tmp_path.glob("tabular-v*-seed0.safetensors")
    metadata = json.loads(weights.with_suffix(".json").read_text())
    assert metadata["accuracy"] == trained.accuracy and metadata["seed"] == 0


def test_session_models_reload_identically_from_the_cache(bundle, zoo_cache):
    reloaded = zoo.load(bundle.name, cache_dir=zoo_cache)
    assert _same_state(bundle.model, reloaded.model)


def test_training_leaves_the_global_random_state_and_thread_count_alone(tmp_path):
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    zoo.load("tabular", cache_dir=tmp_path)
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads


def test_an_unreadable_cache_entry_raises_until_retrained(tmp_path):
    weights = tmp_path / f"tabular-{ENTRIES['tabular'].version}-seed0.safetensors"
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="retrain=True"):
        zoo.load("tabular", cache_dir=tmp_path)
    assert zoo.load("tabular", cache_dir=tmp_path, retrain=True).accuracy >= 0.93
    assert zoo.load("tabular", cache_dir=tmp_path).accuracy >= 0.93


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LUMOS_CACHE_DIR", str(tmp_path / "lumos"))
    assert default_cache_dir() == tmp_path / "lumos" / "zoo"
    monkeypatch.delenv("LUMOS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "lumos" / "zoo"


@pytest.mark.parametrize("name", zoo.images())
def test_image_is_a_float_rgb_tensor_in_the_unit_range(name):
    picture = zoo.image(name)
    assert picture.dtype == torch.float32 and picture.ndim == 3 and picture.shape[0] == 3
    assert float(picture.min()) >= 0.0 and float(picture.max()) <= 1.0


def test_image_resizes_to_a_square_or_a_given_shape():
    assert zoo.image("chelsea", size=64).shape == (3, 64, 64)
    resized = zoo.image("camera", size=(32, 48))
    assert resized.shape == (3, 32, 48)
    assert torch.equal(resized[0], resized[2])
    assert float(resized.min()) >= 0.0 and float(resized.max()) <= 1.0


def test_unknown_image_name_raises_with_a_suggestion():
    with pytest.raises(LumosError, match="'chelsea'"):
        zoo.image("chelsae")


@pytest.mark.parametrize("size", [0, (32, -1), 2.5])
def test_image_rejects_a_bad_size(size):
    with pytest.raises(InputError):
        zoo.image("coffee", size=size)
