"""Fixtures of the service tests: a tiny archive (LBP-RGB features, 64 px images), a tiny
classifier run directory, query images, and FastAPI test clients over them."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures.make_datasets import class_image, make_dataset
from PIL import Image

SERVICE_CLASSES = ("agricultural", "airplane", "beach")
"""UC Merced classes of the test archive."""

PER_CLASS = 4
IMAGE_SIZE = 64
TOKEN = "test-token-7f3a"
BASE_URL = "http://localhost"
"""Where the test clients send requests: a host name the app accepts by default (not
TestClient's ``testserver``)."""


@pytest.fixture(scope="session")
def service_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fake UC Merced copy: 3 classes x 4 images of 64 x 64 px (TIFF)."""
    return make_dataset(tmp_path_factory.mktemp("service_data"), "ucmerced", per_class=PER_CLASS,
                        size=IMAGE_SIZE, classes=list(SERVICE_CLASSES))


@pytest.fixture(scope="session")
def service_archive_dir(service_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An archive of :func:`service_dataset` with the hand-crafted ``lbp_rgb`` backbone (read-only
    in tests: tests that write use :func:`writable_archive_dir`)."""
    from landlens.retrieval.archive import Archive

    out = tmp_path_factory.mktemp("service_archive") / "arch"
    Archive.build(service_dataset, out, backbone="lbp_rgb", rerank=None, progress=False)
    return out


@pytest.fixture(scope="session")
def service_archive(service_archive_dir: Path) -> Any:
    """The archive, opened independently of any app (the reference for results)."""
    from landlens.retrieval.archive import Archive

    return Archive.open(service_archive_dir)


@pytest.fixture
def writable_archive_dir(service_archive_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the test archive that a test may add to and remove from."""
    dest = tmp_path / "arch"
    shutil.copytree(service_archive_dir, dest)
    return dest


@pytest.fixture(scope="session")
def classifier_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory of an (untrained) LBP-RGB classifier with 4 classes whose head has
    seeded random weights large enough to give clearly unequal probabilities."""
    import torch

    from landlens.models.classifier import build_classifier, save_classifier

    torch.manual_seed(0)
    model = build_classifier("lbp_rgb", ["forest", "harbor", "river", "desert"], weights="none")
    with torch.no_grad():
        for p in model.head.parameters():
            p.copy_(torch.randn_like(p) * 20.0)
    run = tmp_path_factory.mktemp("service_run") / "run"
    save_classifier(model, run)
    return run


def _write_query(path: Path, class_index: int = 0, image_index: int = 99, *, fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(class_image(class_index, image_index, (IMAGE_SIZE, IMAGE_SIZE))).save(path, fmt)
    return path


@pytest.fixture(scope="session")
def write_query() -> Callable[..., Path]:
    """``write_query(path, class_index=0, image_index=99, fmt="PNG")``: write a new 64 px image
    of a test class (not in the archive) and return its path."""
    return _write_query


@pytest.fixture
def query_png(tmp_path: Path) -> Path:
    """A query PNG of the first class, not in the archive."""
    return _write_query(tmp_path / "query.png")


@pytest.fixture(scope="session")
def service_setup() -> dict[str, Any]:
    """Constants of the test archive: classes, images per class, image size, the test token."""
    return {"classes": SERVICE_CLASSES, "per_class": PER_CLASS, "size": IMAGE_SIZE, "token": TOKEN}


@pytest.fixture
def make_client() -> Iterator[Callable[..., Any]]:
    """``make_client(archive, **create_app_kwargs)``: a started ``TestClient`` on
    ``http://localhost`` (closed after the test)."""
    from fastapi.testclient import TestClient

    from landlens.service.app import create_app

    clients: list[Any] = []

    def make(archive: Any, *, raise_server_exceptions: bool = True, **kwargs: Any) -> Any:
        client = TestClient(create_app(archive, **kwargs), raise_server_exceptions=raise_server_exceptions,
                            base_url=BASE_URL)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture(scope="module")
def read_client(service_archive_dir: Path, classifier_run: Path) -> Iterator[Any]:
    """A client of an app over the shared archive, with the classifier and no token."""
    from fastapi.testclient import TestClient

    from landlens.service.app import create_app

    with TestClient(create_app(service_archive_dir, classifier_run=classifier_run), base_url=BASE_URL) as client:
        yield client
