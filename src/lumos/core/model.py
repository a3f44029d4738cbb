"""Models: addressing layers by dotted path, registering hooks that always go away, and leaving
the user's model exactly as it was handed to us."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from lumos.core.errors import InputError, UnsupportedModelError, unknown_name

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


def check_model(model: Any) -> None:
    """A model is an `nn.Module` or any callable from a batch to outputs."""
    if not callable(model):
        raise InputError(
            f"model must be a torch.nn.Module or a callable from a batch to outputs, got "
            f"{type(model).__name__}."
        )


def resolve_layer(model: Any, layer: str | nn.Module) -> tuple[str, nn.Module]:
    """`(dotted path, module)` for a layer given by path ("layer4.1.conv2") or module object."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            "Layer methods need a torch.nn.Module; a plain callable has no layers."
        )
    names = {name: module for name, module in model.named_modules() if name}
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer:
                return name, module
        raise InputError(
            f"The layer {type(layer).__name__} given as a module object is not part of the model."
        )
    if not isinstance(layer, str):
        raise InputError(
            f"layer must be a dotted module path or a module, got {type(layer).__name__}."
        )
    if layer in names:
        return layer, names[layer]
    raise unknown_name("layer", layer, names)


@contextlib.contextmanager
def hooks(*handles_factories: Callable[[], Any]) -> Iterator[list]:
    """Register hooks from factories (each returns a handle) and remove them all on exit."""
    handles: list = []
    try:
        for factory in handles_factories:
            handles.append(factory())
        yield handles
    finally:
        for handle in handles:
            handle.remove()


def _layout(t: torch.Tensor) -> tuple:
    return t.shape, t.device, t.dtype


class _BufferValues:
    """Every buffer's values, compared by value: fused kernels (BatchNorm, quantization
    observers) update buffers without bumping their version. One flat copy per device and
    dtype, compared back in one operation per group and read back from the device once (a
    clone and a `torch.equal` per buffer cost a few microseconds each, and waited for the
    device every time)."""

    def __init__(self, buffers: list[torch.Tensor]) -> None:
        self.buffers = buffers
        self.layout = [_layout(b) for b in buffers]
        groups: dict[tuple, list[int]] = {}
        for i, b in enumerate(buffers):
            groups.setdefault((b.device, b.dtype), []).append(i)
        self.groups = [
            (members, torch.cat([buffers[i].detach().reshape(-1) for i in members]))
            for members in groups.values()
        ]  # (cat copies)

    def _saved(self, members: list[int], flat: torch.Tensor) -> dict[int, torch.Tensor]:
        values, start = {}, 0
        for i in members:
            shape = self.layout[i][0]
            values[i] = flat[start : start + shape.numel()].view(shape)
            start += shape.numel()
        return values

    def changed(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(buffer, saved values) for every buffer whose values, shape, device or dtype
        changed. (``b != s`` is false for -0.0 against 0.0, which `state_dict` ignores too.)"""
        if not self.buffers:
            return []
        suspects: list[tuple[list[int], torch.Tensor]] = []
        flags = []
        device = self.layout[0][1]
        for members, flat in self.groups:
            if any(_layout(self.buffers[i]) != self.layout[i] for i in members):
                suspects.append((members, flat))  # compared buffer by buffer below
                continue
            now = torch.cat([self.buffers[i].detach().reshape(-1) for i in members])
            flags.append(((now != flat).any().to(device), members, flat))
        if flags:
            read = torch.stack([f for f, _, _ in flags]).tolist()
            suspects += [(members, flat) for hit, (_, members, flat) in zip(read, flags) if hit]
        out = []
        for members, flat in suspects:
            for i, saved in self._saved(members, flat).items():
                b = self.buffers[i]
                same = (b.shape, b.device, b.dtype) == (saved.shape, saved.device, saved.dtype)
                if not same or bool((b != saved).any()):
                    out.append((b, saved))
        return out


def _members(model: nn.Module, modules: list[nn.Module], attr: str) -> list[torch.Tensor]:
    """`model.parameters()` (`attr` ``_parameters``) or `model.buffers()` (``_buffers``) from
    the modules already listed: each walk of the module tree costs a tenth of a millisecond
    on a ResNet."""
    if not all(isinstance(getattr(m, attr, None), dict) for m in modules):  # TorchScript
        return list(model.parameters() if attr == "_parameters" else model.buffers())
    seen: set[int] = set()
    out = []
    for m in modules:
        for t in getattr(m, attr).values():
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                out.append(t)
    return out


class ModelState:
    """A snapshot of everything about a module that an explanation must not change."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = list(model.modules())
        self.training = [m.training for m in self.modules]
        self.hook_keys = [
            {attr: set(hooks) for attr in _HOOK_DICTS if (hooks := m.__dict__.get(attr))}
            for m in self.modules
        ]
        # which tensor each module holds under each buffer name (a forward may reassign or
        # register buffers), and every buffer's values, compared by value: fused kernels
        # (BatchNorm, quantization observers) update them without bumping their version
        self.buffer_slots = [
            (dict(m._buffers), set(getattr(m, "_non_persistent_buffers_set", ())))
            if isinstance(m._buffers, dict)  # (TorchScript modules wrap theirs)
            else None
            for m in self.modules
        ]
        self.buffers = _BufferValues(_members(model, self.modules, "_buffers"))
        self.params = _members(model, self.modules, "_parameters")
        self.requires_grad = [p.requires_grad for p in self.params]
        self.grads = [p.grad for p in self.params]
        self.grad_versions = [None if p.grad is None else p.grad._version for p in self.params]

    def restore(self) -> None:
        """Remove hooks added since the snapshot and restore modes, flags and `.grad` fields."""
        for module, training, keys in zip(self.modules, self.training, self.hook_keys):
            if module.training != training:
                module.training = training
            for attr in _HOOK_DICTS:
                current = module.__dict__.get(attr)
                if current:
                    before = keys.get(attr, ())
                    for key in [k for k in current if k not in before]:
                        del current[key]
        for p, flag, grad in zip(self.params, self.requires_grad, self.grads):
            if p.requires_grad != flag:
                p.requires_grad_(flag)
            if p.grad is not grad:
                p.grad = grad
        for module, snapshot in zip(self.modules, self.buffer_slots):
            if snapshot is None:
                continue
            slots, non_persistent = snapshot
            current = module._buffers
            if current.keys() != slots.keys() or any(current[k] is not v for k, v in slots.items()):
                current.clear()
                current.update(slots)
                module._non_persistent_buffers_set.clear()
                module._non_persistent_buffers_set.update(non_persistent)
        with torch.no_grad():
            for buffer, saved in self.buffers.changed():
                if buffer.shape != saved.shape:
                    buffer.resize_(saved.shape)
                buffer.copy_(saved)


@contextlib.contextmanager
def preserved(model: Any, *, freeze: bool = True) -> Iterator[None]:
    """Run a block and leave `model` as it was: mode, hooks, `requires_grad`, `.grad`.

    With `freeze`, parameters stop requiring gradients inside the block: gradient methods
    differentiate with respect to the inputs only, and autograd then skips weight gradients.
    """
    if not isinstance(model, nn.Module):
        yield
        return
    state = ModelState(model)
    stochastic = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
    if any(m.training and isinstance(m, stochastic) for m in state.modules):
        warnings.warn(
            "The model is in train mode: BatchNorm and dropout make explanations depend on the "
            "batch and on chance. Call model.eval() first (lumos restores the statistics).",
            stacklevel=4,
        )
    try:
        if freeze:
            for p in state.params:
                p.requires_grad_(False)
        yield
    finally:
        state.restore()


def model_device(model: Any, default: torch.device | None = None) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for callables)."""
    if isinstance(model, nn.Module):
        for tensor in model.parameters():
            return tensor.device
        for tensor in model.buffers():
            return tensor.device
    return default or torch.device("cpu")


def unwrap_compiled(model: Any) -> Any:
    """The eager module behind a `torch.compile` wrapper (its hooks and function modes work)."""
    return getattr(model, "_orig_mod", model)


def is_scripted(model: Any) -> bool:
    return isinstance(model, (torch.jit.ScriptModule, torch.jit.ScriptFunction))


class LayerRecorder:
    """Records a layer's output on every forward pass while active, optionally replacing it.

    ``with LayerRecorder(module) as rec: model(x)`` leaves the outputs in `rec.outputs` (with
    their autograd graph, so gradients w.r.t. the layer can be taken). `replace`, when given, maps
    the layer's output to the value the rest of the network sees (layer IG interpolates there;
    ablation zeroes channels). The hook is always removed on exit.
    """

    def __init__(self, module: nn.Module, replace: Callable[[Any], Any] | None = None) -> None:
        self.module, self.replace = module, replace
        self.outputs: list[Any] = []
        self._handle = None

    def _hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        if self.replace is not None:
            output = self.replace(output)
        self.outputs.append(output)
        return output if self.replace is not None else None

    def __enter__(self) -> LayerRecorder:
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def output(self) -> Any:
        """The single recorded output; a layer called several times per forward is an error."""
        if len(self.outputs) != 1:
            raise UnsupportedModelError(
                f"The layer was called {len(self.outputs)} times in one forward pass; layer "
                "methods need a layer that runs exactly once. Pick a module used once."
            )
        return self.outputs[0]
