"""Zoo models are trained once per test run, in a temporary cache shared by the pytest-xdist
workers, or in the default cache when `$LUMOS_CACHE_DIR` is set."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from lumos import zoo
from lumos.zoo.cache import default_cache_dir


@pytest.fixture(scope="session")
def zoo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.environ.get("LUMOS_CACHE_DIR"):
        return default_cache_dir()
    run_root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        run_root = run_root.parent  # shared by this run's workers; `zoo.load` locks the entries
    return run_root / "zoo"


@pytest.fixture(scope="session")
def load_zoo(zoo_cache: Path) -> Callable[[str], zoo.Bundle]:
    loaded: dict[str, zoo.Bundle] = {}

    def load(name: str) -> zoo.Bundle:
        if name not in loaded:
            loaded[name] = zoo.load(name, cache_dir=zoo_cache)
        return loaded[name]

    return load


@pytest.fixture(scope="session", params=["digits", "shapes", "tabular"])
def bundle(request: pytest.FixtureRequest, load_zoo: Callable[[str], zoo.Bundle]) -> zoo.Bundle:
    return load_zoo(request.param)
