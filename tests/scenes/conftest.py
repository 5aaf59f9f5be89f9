"""Scenes need rasterio (``landlens[scenes]``) and the tests check footprints against pyproj:
without them these tests are skipped, and fail under CI (``scripts/setup.sh`` installs both)."""

from __future__ import annotations

import pytest
from fixtures.weights import require


@pytest.fixture(autouse=True)
def _scene_packages() -> None:
    require("rasterio", "pyproj", why="scene reading (pip install 'landlens[scenes]') and its reference")
