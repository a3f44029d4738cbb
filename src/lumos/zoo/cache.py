"""Where trained zoo models are kept: a safetensors file of weights and a JSON file of metadata.

File names carry the model's version, so a changed recipe never loads stale weights. Files are
written to a temporary name and renamed, so a reader never sees half a file, and a lock file lets
one process train while others (e.g. pytest-xdist workers) wait for its result.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock
from safetensors.torch import load_file, save_file
from torch import nn

from lumos.core.errors import ModelLoadError


def default_cache_dir() -> Path:
    """`$LUMOS_CACHE_DIR/zoo`, else `$XDG_CACHE_HOME/lumos/zoo`, else `~/.cache/lumos/zoo`."""
    root = os.environ.get("LUMOS_CACHE_DIR")
    if root:
        return Path(root).expanduser() / "zoo"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lumos" / "zoo"


def lock(directory: Path, stem: str) -> FileLock:
    """An inter-process lock for the entry `directory/stem.*`."""
    directory.mkdir(parents=True, exist_ok=True)
    return FileLock(directory / f"{stem}.lock")


def _paths(directory: Path, stem: str) -> tuple[Path, Path]:
    return directory / f"{stem}.safetensors", directory / f"{stem}.json"


def _replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(temporary)
    os.replace(temporary, path)


def save(directory: Path, stem: str, model: nn.Module, metadata: dict[str, Any]) -> None:
    """Store the state dict of `model` and `metadata` under `directory/stem.*`."""
    weights, info = _paths(directory, stem)
    state = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    _replace_atomically(info, lambda path: path.write_text(json.dumps(metadata, indent=2)))
    # The weights go last: their presence marks a complete entry.
    _replace_atomically(weights, lambda path: save_file(state, str(path)))


def load(directory: Path, stem: str, model: nn.Module) -> dict[str, Any] | None:
    """Load cached weights into `model` and return the metadata, or None when nothing is cached."""
    weights, info = _paths(directory, stem)
    if not weights.exists():
        return None
    try:
        model.load_state_dict(load_file(str(weights)))
        return json.loads(info.read_text())
    except Exception as error:  # safetensors, JSON and state-dict errors share no base class
        raise ModelLoadError(
            f"The cached zoo model {weights} is unreadable ({error}). "
            "Delete it or pass retrain=True."
        ) from error
