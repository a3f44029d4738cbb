"""Loading models and inputs named on the command line, safely.

Models: ``zoo:NAME`` (a zoo model), ``path/to/model.pt`` (TorchScript; a pickled full model only
with ``trust_pickle=True``, because unpickling runs arbitrary code), or ``package.module:factory``
(a callable returning the model). Inputs: images (PNG/JPEG), ``.pt`` tensors (loaded with
``weights_only=True``), ``.npy`` arrays (no pickle) and ``.safetensors`` files.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lumos.core.errors import InputError, ModelLoadError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def load_model(spec: str, *, trust_pickle: bool = False) -> tuple[Any, dict[str, Any]]:
    """The model named by `spec` in eval mode, and what is known about it (zoo bundle, shape)."""
    if spec.startswith("zoo:"):
        from lumos import zoo

        bundle = zoo.load(spec[len("zoo:") :])
        return bundle.model, {"bundle": bundle, "input_shape": tuple(bundle.input_shape)}
    path = Path(spec)
    if path.suffix in (".pt", ".pth", ".ts", ".jit") or path.exists():
        return _load_file(path, trust_pickle), {}
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ModelLoadError(
                f"Cannot import {module_name!r} for model {spec!r}: {exc}"
            ) from exc
        if not hasattr(module, attr):
            raise ModelLoadError(f"{module_name!r} has no attribute {attr!r}.")
        factory = getattr(module, attr)
        model = (
            factory() if callable(factory) and not isinstance(factory, torch.nn.Module) else factory
        )
        return _eval(model), {}
    raise ModelLoadError(
        f"Cannot interpret model {spec!r}: use zoo:NAME (e.g. zoo:shapes), a TorchScript file "
        "path/to/model.pt, or package.module:factory."
    )


def _load_file(path: Path, trust_pickle: bool) -> Any:
    if not path.exists():
        raise ModelLoadError(f"No such model file: {path}")
    try:
        return _eval(torch.jit.load(str(path), map_location="cpu"))
    except (RuntimeError, ValueError):
        pass
    if not trust_pickle:
        raise ModelLoadError(
            f"{path} is not a TorchScript file. If it is a pickled full model, loading it runs "
            "arbitrary code from the file: pass --trust-pickle only if you trust its source. "
            "Safer: export with torch.jit.script/trace, or use package.module:factory."
        )
    model = torch.load(str(path), map_location="cpu", weights_only=False)
    if not callable(model):
        raise ModelLoadError(
            f"{path} holds a {type(model).__name__} (a state dict?), not a model: a state dict "
            "needs its architecture, so use package.module:factory."
        )
    return _eval(model)


def _eval(model: Any) -> Any:
    if isinstance(model, torch.nn.Module):
        model.eval()
    return model


def load_input(
    path: str | Path, *, size: tuple[int, int] | None = None, channels: int | None = None
):
    """A batch-first float tensor from an image, ``.pt``, ``.npy`` or ``.safetensors`` file.

    Images become (1, C, H, W) in [0, 1], resized to `size` and converted to `channels` (1 or 3)
    when given; tensors and arrays are returned as stored (a single example gets a batch axis
    when `size` says the model expects one more dimension).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"No such input file: {path}")
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        x = _read_image(path)
        if channels == 1 and x.shape[1] == 3:
            x = x.mean(1, keepdim=True)
        elif channels == 3 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if size is not None and tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x.contiguous()
    if suffix in (".pt", ".pth"):
        try:
            x = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InputError(f"{path} is not a plain tensor file: {exc}") from exc
    elif suffix == ".npy":
        x = torch.from_numpy(np.load(str(path), allow_pickle=False))
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if len(tensors) != 1:
            raise InputError(f"{path} holds {len(tensors)} tensors; expected exactly one.")
        x = next(iter(tensors.values()))
    else:
        raise InputError(
            f"Unsupported input file {path.name}: use an image, .pt, .npy or .safetensors."
        )
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{path} holds a {type(x).__name__}, not a tensor.")
    return x


def _read_image(path: Path) -> torch.Tensor:
    from skimage import io as skio

    array = np.asarray(skio.imread(str(path)))
    if array.ndim == 2:
        array = array[..., None]
    array = array[..., :3]
    scale = 255.0 if array.dtype == np.uint8 else (65535.0 if array.dtype == np.uint16 else 1.0)
    x = torch.from_numpy(array.astype(np.float32) / scale).permute(2, 0, 1)
    return x.unsqueeze(0)


def parse_value(text: str) -> Any:
    """A CLI option value: int, float, bool, None, or the string itself."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text
