"""CAM family: closed forms, cross-checks with Captum and naive loops, batching, ViT tokens,
segmentation/detection targets, and the pointing game on the `shapes` zoo model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import plain_cnn, tiny_cnn
from torch import nn

import lumos
from lumos.attribution.cam import GradCAM, ScoreCAM
from lumos.core.errors import InputError, TargetError, UnsupportedModelError
from lumos.core.targets import detection, segmentation

CAMS = [
    "cam",
    "grad_cam",
    "grad_cam_plus_plus",
    "xgrad_cam",
    "hires_cam",
    "layer_cam",
    "score_cam",
    "ablation_cam",
    "eigen_cam",
]


def conv2_acts_and_grads(model, x, target):
    """conv2's activations and the target's gradient there, by hand with a hook."""
    store = {}

    def hook(module, args, output):
        output.retain_grad()
        store["a"] = output

    handle = model.conv2.register_forward_hook(hook)
    x = x.clone().requires_grad_(True)
    out = model(x)
    out[torch.arange(len(x)), target].sum().backward()
    handle.remove()
    return store["a"].detach(), store["a"].grad.detach()


def raw_map(name, model, x, target, **options):
    options = {"layer": "conv2", "relu": False, "upsample": False, **options}
    return lumos.explain(model, x, method=name, target=target, **options).attributions[:, 0]


class GapLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def test_cam_equals_the_closed_form_on_a_gap_linear_model():
    torch.manual_seed(0)
    model, x = GapLinear().eval(), torch.rand(3, 3, 8, 8)
    target = torch.tensor([0, 2, 3])
    exp = lumos.explain(
        model, x, method="cam", target=target, layer="features", relu=False, upsample=False
    )
    acts = model.features(x)
    expected = torch.einsum("bk,bkhw->bhw", model.fc.weight[target], acts)
    torch.testing.assert_close(exp.attributions[:, 0], expected)
    assert exp.delta.abs().max() < 1e-5  # mean of the map + bias = the logit


def test_cam_rejects_callable_targets_and_non_gap_heads():
    model, x = GapLinear().eval(), torch.rand(2, 3, 8, 8)
    with pytest.raises(TargetError, match="grad_cam"):
        lumos.explain(model, x, method="cam", target=lambda out: out[:, 0], layer="features")
    with pytest.raises(UnsupportedModelError, match="global average pooling"):
        lumos.explain(tiny_cnn(), torch.rand(2, 3, 16, 16), method="cam", layer="block")


def test_grad_cam_equals_captum_layer_grad_cam_at_layer_resolution():
    captum = pytest.importorskip("captum.attr")
    model, x, target = tiny_cnn(), torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    ours = lumos.explain(model, x, method="grad_cam", target=target, layer="conv2", upsample=False)
    theirs = captum.LayerGradCam(model, model.conv2).attribute(
        x, target=target, relu_attributions=True
    )
    assert ours.attributions.shape == (4, 1, 8, 8)
    torch.testing.assert_close(ours.attributions, theirs.detach(), rtol=1e-5, atol=1e-6)


def test_gradient_cams_equal_hand_computed_values():
    model, x, target = tiny_cnn(), torch.rand(3, 3, 16, 16), torch.tensor([1, 0, 3])
    a, g = conv2_acts_and_grads(model, x, target)
    mass = a.sum((2, 3), keepdim=True)
    alpha = torch.where(g != 0, g**2 / (2 * g**2 + mass * g**3 + 1e-6), torch.zeros_like(g))
    expected = {
        "grad_cam": (g.mean((2, 3), keepdim=True) * a).sum(1),
        "grad_cam_plus_plus": ((alpha * g.clamp(min=0)).sum((2, 3), keepdim=True) * a).sum(1),
        "xgrad_cam": ((g * a / (mass + 1e-7)).sum((2, 3), keepdim=True) * a).sum(1),
        "hires_cam": (g * a).sum(1),
        "layer_cam": (g.clamp(min=0) * a).sum(1),
    }
    for name, value in expected.items():
        torch.testing.assert_close(raw_map(name, model, x, target), value, msg=name)


def test_relu_and_upsample_options():
    model, x = tiny_cnn(), torch.rand(2, 3, 16, 16)
    raw = raw_map("grad_cam", model, x, 1)
    assert (raw < 0).any()
    relu = lumos.explain(model, x, method="grad_cam", target=1, layer="conv2", upsample=False)
    torch.testing.assert_close(relu.attributions[:, 0], raw.clamp(min=0))
    up = lumos.explain(model, x, method="grad_cam", target=1, layer="conv2")
    expected = F.interpolate(raw.clamp(min=0)[:, None], size=(16, 16), mode="bilinear")
    torch.testing.assert_close(up.attributions, expected)
    assert up.attribution_structure.keys == ("map",)


def test_default_layer_is_the_last_spatial_layer_and_is_reported():
    exp = lumos.explain(plain_cnn(), torch.rand(2, 3, 16, 16), method="grad_cam", target=0)
    assert exp.extras["layer"] == "features"  # ends in AdaptiveAvgPool2d(2): the last 2×2 map
    exp = lumos.explain(tiny_cnn(), torch.rand(2, 3, 16, 16), method="grad_cam", target=0)
    assert exp.extras["layer"] == "bn2"  # the reused ReLU runs twice, so it is skipped


def score_cam_by_hand(model, x, target, layer):
    acts = {}
    handle = layer.register_forward_hook(lambda m, a, out: acts.__setitem__("a", out))
    with torch.no_grad():
        model(x)
    handle.remove()
    a = acts["a"]
    maps = []
    for i in range(len(x)):
        scores = []
        for k in range(a.shape[1]):
            m = F.interpolate(a[i : i + 1, k : k + 1], size=x.shape[-2:], mode="bilinear")
            m = (m - m.min()) / (m.max() - m.min() + 1e-8)
            with torch.no_grad():
                scores.append(model(x[i : i + 1] * m)[0, target[i]])
        w = torch.softmax(torch.stack(scores), 0)
        maps.append((w[:, None, None] * a[i]).sum(0))
    return torch.stack(maps)


def test_score_cam_equals_a_naive_per_channel_loop_for_any_batch_size():
    model, x, target = tiny_cnn(), torch.rand(3, 3, 16, 16), torch.tensor([0, 1, 2])
    expected = score_cam_by_hand(model, x, target, model.conv2)
    for batch_size in (None, 7):
        ours = raw_map("score_cam", model, x, target, batch_size=batch_size)
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def test_score_cam_scores_constant_channels_with_one_blank_forward():
    model, x, target = tiny_cnn(), torch.rand(2, 3, 16, 16), torch.tensor([0, 3])
    with torch.no_grad():  # channels 0-5 of the block output are all zero after its ReLU
        model.block.bn_b.weight[:6] = 0
        model.block.bn_b.bias[:6] = -100.0
        model.conv1.bias[:6] = -100.0
    expected = score_cam_by_hand(model, x, target, model.block)
    ours = raw_map("score_cam", model, x, target, layer="block", batch_size=5)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def test_score_cam_top_k_scores_only_the_strongest_channels():
    model, x = tiny_cnn(), torch.rand(2, 3, 16, 16)
    full = raw_map("score_cam", model, x, 1)
    torch.testing.assert_close(raw_map("score_cam", model, x, 1, top_k=16), full)
    fast = raw_map("score_cam", model, x, 1, top_k=4)
    assert fast.shape == full.shape and not torch.allclose(fast, full)
    with pytest.raises(InputError, match="top_k"):
        ScoreCAM(model, top_k=0)


def ablation_cam_by_hand(model, x, target, layer):
    with torch.no_grad():
        base = model(x)[torch.arange(len(x)), target]
        acts = {}
        handle = layer.register_forward_hook(lambda m, a, out: acts.__setitem__("a", out))
        model(x)
        handle.remove()
        a = acts["a"]
        weights = torch.empty(a.shape[:2])
        for k in range(a.shape[1]):

            def ablate(m, args, out, k=k):
                out = out.clone()
                out[:, k] = 0
                return out

            handle = layer.register_forward_hook(ablate)
            drop = model(x)[torch.arange(len(x)), target]
            handle.remove()
            weights[:, k] = (base - drop) / base.abs()
    return (weights[:, :, None, None] * a).sum(1)


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so the full model is re-run."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_cnn()

    def forward(self, x):
        if x.sum() > -1e9:
            return self.net(x)
        return -self.net(x)


def test_ablation_cam_equals_a_naive_per_channel_loop():
    model, x, target = tiny_cnn(), torch.rand(3, 3, 16, 16), torch.tensor([2, 1, 0])
    expected = ablation_cam_by_hand(model, x, target, model.conv2)
    exp = lumos.explain(
        model,
        x,
        method="ablation_cam",
        target=target,
        layer="conv2",
        relu=False,
        upsample=False,
        batch_size=5,
    )
    assert exp.extras["short_circuit"]
    torch.testing.assert_close(exp.attributions[:, 0], expected, rtol=1e-4, atol=1e-5)
    wrapped = Untraceable()
    slow = lumos.explain(
        wrapped,
        x,
        method="ablation_cam",
        target=target,
        layer="net.conv2",
        relu=False,
        upsample=False,
    )
    assert not slow.extras["short_circuit"]
    torch.testing.assert_close(slow.attributions[:, 0], expected, rtol=1e-4, atol=1e-5)


def test_ablation_cam_never_runs_user_hooks_on_traced_proxies():
    model, x = tiny_cnn(), torch.rand(2, 3, 16, 16)
    seen = []
    record = lambda m, args, out: seen.append(type(out))  # noqa: E731
    handle = model.fc.register_forward_hook(record)  # a leaf: the tail runs it on tensors
    exp = lumos.explain(model, x, method="ablation_cam", target=1, layer="conv2")
    assert exp.extras["short_circuit"]
    handle.remove()
    handle = model.block.register_forward_hook(record)  # traced through: full forwards instead
    exp = lumos.explain(model, x, method="ablation_cam", target=1, layer="conv2")
    handle.remove()
    assert not exp.extras["short_circuit"] and set(seen) == {torch.Tensor}


def test_ablation_cam_short_circuits_around_a_residual_block():
    model, x, target = tiny_cnn(), torch.rand(2, 3, 16, 16), torch.tensor([0, 3])
    expected = ablation_cam_by_hand(model, x, target, model.block)
    exp = lumos.explain(
        model, x, method="ablation_cam", target=target, layer="block", relu=False, upsample=False
    )
    assert exp.extras["short_circuit"]
    torch.testing.assert_close(exp.attributions[:, 0], expected, rtol=1e-4, atol=1e-5)


def test_eigen_cam_is_the_first_principal_component_of_the_activations():
    model, x = tiny_cnn(), torch.rand(2, 3, 16, 16)
    a, _ = conv2_acts_and_grads(model, x, torch.tensor([0, 0]))
    ours = raw_map("eigen_cam", model, x, 0)
    for i in range(2):
        flat = a[i].flatten(1).T
        centred = flat - flat.mean(0)
        v = torch.linalg.svd(centred, full_matrices=False).Vh[0]
        expected = (centred @ v).view(8, 8)
        sign = 1 if (expected.flatten() * centred.sum(1)).sum() >= 0 else -1
        torch.testing.assert_close(ours[i], sign * expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", CAMS)
def test_batched_maps_equal_per_example_maps(name):
    model, x, target = tiny_cnn(), torch.rand(3, 3, 16, 16), torch.tensor([3, 0, 1])
    batched = lumos.explain(model, x, method=name, target=target, layer="conv2", batch_size=2)
    for i in range(3):
        one = lumos.explain(model, x[i : i + 1], method=name, target=int(target[i]), layer="conv2")
        torch.testing.assert_close(
            batched.attributions[i], one.attributions[0], rtol=1e-4, atol=1e-5
        )


def test_guided_grad_cam_is_guided_backprop_times_the_upsampled_map():
    model, x = tiny_cnn(), torch.rand(2, 3, 16, 16)
    ours = lumos.explain(model, x, method="guided_grad_cam", target=2, layer="conv2")
    guided = lumos.explain(model, x, method="guided_backprop", target=2).attributions
    cam = lumos.explain(model, x, method="grad_cam", target=2, layer="conv2").attributions
    assert ours.attributions.shape == x.shape
    torch.testing.assert_close(ours.attributions, guided * cam)


def test_several_layers_are_fused_after_scaling_each_to_unit_maximum():
    model, x = tiny_cnn(), torch.rand(2, 3, 16, 16)
    fused = lumos.explain(model, x, method="layer_cam", target=1, layer=["block", "conv2"])
    maps = [
        lumos.explain(model, x, method="layer_cam", target=1, layer=name).attributions
        for name in ("block", "conv2")
    ]
    scaled = [m / m.flatten(1).abs().amax(1).view(-1, 1, 1, 1) for m in maps]
    torch.testing.assert_close(fused.attributions, (scaled[0] + scaled[1]) / 2)
    assert fused.extras["layer"] == ["block", "conv2"]


class TinyViT(nn.Module):
    """Patch embedding, a class token and one attention block; logits from the class token."""

    def __init__(self, dim: int = 8, n_classes: int = 3) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.attention = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU())
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], 1)
        tokens = self.norm(tokens)
        tokens = tokens + self.attention(tokens, tokens, tokens, need_weights=False)[0]
        return self.head(self.mlp(tokens)[:, 0])


def test_vit_tokens_are_folded_to_a_grid_with_reshape_vit():
    torch.manual_seed(0)
    model, x = TinyViT().eval(), torch.rand(2, 3, 16, 16)
    exp = lumos.explain(
        model,
        x,
        method="grad_cam",
        target=1,
        layer="norm",
        reshape="vit",
        relu=False,
        upsample=False,
    )
    tokens = {}
    handle = model.norm.register_forward_hook(lambda m, a, out: tokens.__setitem__("t", out))
    out = model(x)
    handle.remove()
    (g,) = torch.autograd.grad(out[:, 1].sum(), tokens["t"])
    a = tokens["t"][:, 1:].detach().reshape(2, 4, 4, 8).permute(0, 3, 1, 2)
    g = g[:, 1:].reshape(2, 4, 4, 8).permute(0, 3, 1, 2)
    expected = (g.mean((2, 3), keepdim=True) * a).sum(1)
    torch.testing.assert_close(exp.attributions[:, 0], expected)
    auto = lumos.explain(model, x, method="score_cam", target=1, reshape="vit")
    assert auto.attributions.shape == (2, 1, 16, 16)
    ablation = lumos.explain(model, x, method="ablation_cam", target=1, layer="norm", reshape="vit")
    assert torch.isfinite(ablation.attributions).all()


def test_token_layers_without_reshape_explain_how_to_fix_it():
    model, x = TinyViT().eval(), torch.rand(1, 3, 16, 16)
    with pytest.raises(UnsupportedModelError, match="reshape='vit'"):
        lumos.explain(model, x, method="grad_cam", layer="norm")
    with pytest.raises(InputError, match="reshape"):
        GradCAM(model, reshape="swin")
    with pytest.raises(UnsupportedModelError, match="square grid"):  # 3 × 4 patches
        lumos.explain(
            model, torch.rand(1, 3, 12, 16), method="grad_cam", layer="norm", reshape="vit"
        )


class TinySegmenter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.decoder = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return F.interpolate(self.decoder(self.encoder(x)), scale_factor=2.0)


def test_segmentation_and_detection_targets_work_through_callables():
    torch.manual_seed(0)
    model, x = TinySegmenter().eval(), torch.rand(2, 3, 8, 8)
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[0, :4, :4], mask[1, 4:, 4:] = True, True
    target = segmentation(1, mask)
    for name in ("grad_cam", "score_cam", "ablation_cam"):
        batched = lumos.explain(model, x, method=name, target=target, layer="encoder", batch_size=3)
        for i in range(2):
            one = lumos.explain(
                model,
                x[i : i + 1],
                method=name,
                target=segmentation(1, mask[i : i + 1]),
                layer="encoder",
            )
            torch.testing.assert_close(
                batched.attributions[i], one.attributions[0], rtol=1e-4, atol=1e-5
            )
    boxes = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    boxes(x)
    detector = nn.Sequential(boxes, nn.Unflatten(1, (5, 2))).eval()
    exp = lumos.explain(detector, x, method="grad_cam", target=detection(3, 1), layer="0.1")
    assert exp.attributions.shape == (2, 1, 8, 8)


def test_shapes_zoo_grad_cam_hits_the_object_on_90_percent_of_images():
    zoo = pytest.importorskip("lumos.zoo")
    pointing_game = pytest.importorskip("lumos.metrics.localisation").pointing_game
    bundle = zoo.load("shapes")
    x, y, masks = bundle.test_batch(64, seed=0)
    exp = lumos.explain(bundle.model, x, method="grad_cam", target=y, layer=bundle.default_layer)
    # Strict: the map's maximum lies inside the object's mask. For reference, ±2 px as well
    # (Zhang et al. (2016) allow 15 px at 224 px, ≈ 4 px at 64 px).
    strict = pointing_game(exp.attributions, masks).mean().item()
    tolerant = pointing_game(exp.attributions, masks, tolerance=2).mean().item()
    print(
        f"pointing game, grad_cam on shapes (64 images): {strict:.1%} strict, {tolerant:.1%} ±2 px"
    )
    assert strict >= 0.9
