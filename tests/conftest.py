"""Shared fixtures: hand-built models (tests/models.py) and one zoo cache per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# One zoo cache for the test runs of this checkout (ignored by git): every xdist worker shares
# it, the zoo's lock file lets one of them train while the others wait and read.
os.environ.setdefault("LUMOS_CACHE_DIR", str(Path(__file__).parent.parent / ".cache" / "tests"))

# under pytest-xdist each worker gets one core; alone, the suite may use two
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
