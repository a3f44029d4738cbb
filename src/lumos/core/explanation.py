"""`Explanation`: what every method returns — attributions with the inputs, targets, outputs, the
method and its options, the identity error (`delta`) and timing — plus saving and loading."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lumos.core.errors import InputError
from lumos.core.inputs import Structure

_FORMAT = "lumos.explanation/1"


@dataclass
class Explanation:
    """The result of an attribution method.

    Attributions come back in the structure of the inputs (tensor, tuple or dict) with the same
    shape, dtype and device — except for methods that explain a layer or return one map per
    example (CAM family), which say so in `extras`.
    """

    attributions_flat: tuple[torch.Tensor, ...]
    inputs_flat: tuple[torch.Tensor, ...]
    structure: Structure
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    targets: torch.Tensor | None = None
    outputs: torch.Tensor | None = None
    delta: torch.Tensor | None = None
    timing: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    attribution_structure: Structure | None = None

    @property
    def attributions(self) -> Any:
        """Attributions, in the structure of the inputs (or of the method's maps)."""
        return (self.attribution_structure or self.structure).restore(self.attributions_flat)

    @property
    def inputs(self) -> Any:
        return self.structure.restore(self.inputs_flat)

    def __len__(self) -> int:
        return int(self.inputs_flat[0].shape[0])

    def numpy(self) -> Any:
        """Attributions as NumPy arrays, in the same structure."""
        arrays = [a.detach().cpu().numpy() for a in self.attributions_flat]
        return (self.attribution_structure or self.structure).restore(arrays)

    def __repr__(self) -> str:
        shapes = ", ".join(str(tuple(a.shape)) for a in self.attributions_flat)
        delta = "" if self.delta is None else f", max|delta|={self.delta.abs().max().item():.3g}"
        seconds = self.timing.get("total", float("nan"))
        return f"Explanation(method={self.method!r}, attributions={shapes}{delta}, {seconds:.3g}s)"

    def select(self, rows: slice, inputs: tuple[torch.Tensor, ...] | None = None) -> Explanation:
        """The explanation of a slice of the examples (per-example fields are sliced)."""

        def cut(value: Any) -> Any:
            return value[rows] if isinstance(value, torch.Tensor) and value.dim() else value

        return Explanation(
            attributions_flat=tuple(a[rows] for a in self.attributions_flat),
            inputs_flat=inputs if inputs is not None else tuple(x[rows] for x in self.inputs_flat),
            structure=self.structure,
            attribution_structure=self.attribution_structure,
            method=self.method,
            options=dict(self.options),
            targets=cut(self.targets),
            outputs=cut(self.outputs),
            delta=cut(self.delta),
            timing=dict(self.timing),
            extras=dict(self.extras),
        )

    # -- visualization (matplotlib lives in lumos.viz) ------------------------------------
    def figure(self, **options: Any):
        """A matplotlib figure: input, signed map and overlay per example (see lumos.viz)."""
        from lumos.viz import explanation_figure

        return explanation_figure(self, **options)

    def plot(self, **options: Any):
        """Draw `figure(**options)` and return it (shown inline in notebooks)."""
        return self.figure(**options)

    def _repr_html_(self) -> str:
        from lumos.viz import explanation_html

        return explanation_html(self)

    # -- persistence -------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write tensors as safetensors with the metadata as JSON in its header (no pickle)."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        for prefix, flat in (
            ("attributions", self.attributions_flat),
            ("inputs", self.inputs_flat),
        ):
            for i, t in enumerate(flat):
                tensors[f"{prefix}.{i}"] = t
        for name in ("targets", "outputs", "delta"):
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                tensors[name] = value
        extras_json = {}
        for key, value in self.extras.items():
            if isinstance(value, torch.Tensor):
                tensors[f"extras.{key}"] = value
            else:
                extras_json[key] = _jsonable(value)
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {
            "format": _FORMAT,
            "method": self.method,
            "options": {k: _jsonable(v) for k, v in self.options.items()},
            "timing": self.timing,
            "extras": extras_json,
            "structure": self.structure.to_json(),
            "attribution_structure": (self.attribution_structure or self.structure).to_json(),
            "n_attributions": len(self.attributions_flat),
            "n_inputs": len(self.inputs_flat),
        }
        path = Path(path)
        save_file(tensors, str(path), metadata={"lumos": json.dumps(meta)})
        return path


def load_explanation(path: str | Path) -> Explanation:
    """Read an `Explanation` written by `Explanation.save` (options come back as JSON values)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise InputError(f"No such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:
        raise InputError(f"{path} is not a lumos explanation file: {exc}") from exc
    if "lumos" not in header:
        raise InputError(f"{path} is a safetensors file but not a lumos explanation.")
    meta = json.loads(header["lumos"])
    extras = dict(meta["extras"])
    for key, value in tensors.items():
        if key.startswith("extras."):
            extras[key[len("extras.") :]] = value
    return Explanation(
        attributions_flat=tuple(
            tensors[f"attributions.{i}"] for i in range(meta["n_attributions"])
        ),
        inputs_flat=tuple(tensors[f"inputs.{i}"] for i in range(meta["n_inputs"])),
        structure=Structure.from_json(meta["structure"]),
        attribution_structure=Structure.from_json(meta["attribution_structure"]),
        method=meta["method"],
        options=meta["options"],
        targets=tensors.get("targets"),
        outputs=tensors.get("outputs"),
        delta=tensors.get("delta"),
        timing=meta["timing"],
        extras=extras,
    )


def _jsonable(value: Any) -> Any:
    """A JSON-safe stand-in for an option value (tensors and objects become short summaries)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        if value.numel() == 1:
            return value.item()
        return f"<tensor shape={tuple(value.shape)} dtype={value.dtype}>"
    if isinstance(value, torch.nn.Module):
        return f"<module {type(value).__name__}>"
    return repr(value)
