"""Scanning class-per-folder datasets: every catalog layout, ordering, errors, real data."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fixtures.make_datasets import make_dataset, make_folder_dataset

from landlens.data.catalog import CATALOG, get_spec
from landlens.data.folder import ImageFolderDataset, natural_key, scan_folder
from landlens.data.io import load_rgb, probe_image, read_image
from landlens.errors import DatasetError


@pytest.mark.parametrize("name", list(CATALOG))
def test_every_catalog_layout_scans(tmp_path: Path, name: str) -> None:
    spec = get_spec(name)
    dataset_root = make_dataset(tmp_path, name, per_class=2, size=8)
    class_root = dataset_root / spec.subdir if spec.subdir else dataset_root

    ds = scan_folder(dataset_root, name)  # the dataset root resolves to its subdir
    assert ds.root == class_root
    assert ds.classes == list(spec.classes)
    assert ds.class_counts() == {c: 2 for c in spec.classes}
    assert len(ds) == 2 * spec.num_classes
    assert ds.spec is spec and ds.name == spec.name
    first = spec.classes[0]
    assert ds.paths[:2] == [
        f"{first}/{spec.filename(first, spec.first_index + k)}" for k in range(2)
    ]
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == sorted(ds.labels.tolist())

    # The class root itself, and the folder the archive was extracted into, work too.
    assert scan_folder(class_root, name).paths == ds.paths
    if spec.root_dir:
        assert scan_folder(tmp_path, name).root == class_root
    # Without a name, the folder is recognised by its classes (and file type).
    auto = scan_folder(dataset_root)
    assert auto.spec is spec and auto.paths == ds.paths


def test_generated_classes_differ(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, "ucmerced", per_class=3, classes=4, size=16)
    ds = scan_folder(root)
    means = np.array(
        [read_image(ds.absolute_path(i)).reshape(-1, 3).mean(0) for i in range(len(ds))]
    )
    centroids = np.array([means[ds.labels == c].mean(0) for c in range(4)])
    within = max(np.abs(means[ds.labels == c] - centroids[c]).max() for c in range(4))
    between = min(
        np.abs(centroids[a] - centroids[b]).max() for a in range(4) for b in range(a + 1, 4)
    )
    assert between > 2 * within
    assert ds.spec is None  # four of 21 classes: not the catalog's folder


def test_natural_order_hidden_and_ignored_files(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "scenes", {"b": 1, "a": 1, "B": 1}, size=4)
    for n in (10, 2, 1):
        make_folder_dataset(tmp_path / "tmp", {"x": 1}, size=4)
        (tmp_path / "tmp" / "x" / "x_1.jpg").rename(root / "a" / f"img_{n}.jpg")
    (root / "a" / ".DS_Store").write_bytes(b"\x00")
    (root / "a" / "._img_1.jpg").write_bytes(b"\x00")  # AppleDouble: hidden, skipped
    (root / "a" / "notes.txt").write_text("x")
    (root / "a" / "nested").mkdir()
    make_folder_dataset(tmp_path / "tmp2", {"y": 1}, size=4)
    (tmp_path / "tmp2" / "y" / "y_1.jpg").rename(root / "a" / "nested" / "deep.png.jpg")
    (root / ".hidden_class").mkdir()
    (root / "README.md").write_text("about")
    (root / "empty").mkdir()

    ds = scan_folder(root)
    assert ds.classes == ["B", "a", "b"]  # sorted() order, like torchvision ImageFolder
    assert ds.paths == [
        "B/B_1.jpg", "a/a_1.jpg", "a/img_1.jpg", "a/img_2.jpg", "a/img_10.jpg",
        "a/nested/deep.png.jpg", "b/b_1.jpg",
    ]  # fmt: skip
    assert ds.labels.tolist() == [0, 1, 1, 1, 1, 1, 2]
    assert sorted(ds.ignored) == ["README.md", "a/notes.txt"]
    assert ds.empty_classes == ["empty"]
    assert ds.name == "scenes" and ds.spec is None


def test_natural_key() -> None:
    names = ["x10.jpg", "x2.jpg", "x1.jpg", "x01b.jpg", "y.jpg", "10.jpg"]
    assert sorted(names, key=lambda s: (natural_key(s), s)) == [
        "10.jpg",
        "x1.jpg",
        "x01b.jpg",
        "x2.jpg",
        "x10.jpg",
        "y.jpg",
    ]


def test_dataset_methods(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "d", {"a": 3, "b": 2}, size=4)
    ds = scan_folder(root)
    assert len(ds) == 5 and ds.class_counts() == {"a": 3, "b": 2}
    assert ds.absolute_path(3) == root / "b" / "b_1.jpg" and ds.absolute_path(3).is_file()
    sub = ds.subset([4, 0])
    assert isinstance(sub, ImageFolderDataset)
    assert sub.paths == ["b/b_2.jpg", "a/a_1.jpg"] and sub.labels.tolist() == [1, 0]
    assert sub.classes == ds.classes and sub.class_counts() == {"a": 1, "b": 1}
    assert len(ds.subset(np.array([], dtype=np.int64))) == 0
    with pytest.raises(IndexError):
        ds.subset([5])


@pytest.mark.parametrize("case", ["missing", "file", "empty", "loose_images", "unknown_name"])
def test_scan_errors(tmp_path: Path, case: str) -> None:
    target = tmp_path / case
    dataset = None
    if case == "file":
        target.write_text("x")
    elif case == "empty":
        target.mkdir()
        (target / "class_without_images").mkdir()
    elif case == "loose_images":
        make_folder_dataset(tmp_path / "src", {"a": 1}, size=4)
        target.mkdir()
        (tmp_path / "src" / "a" / "a_1.jpg").rename(target / "a_1.jpg")
    elif case == "unknown_name":
        make_folder_dataset(target, {"a": 1}, size=4)
        dataset = "not-a-dataset"
    with pytest.raises(DatasetError) as info:
        scan_folder(target, dataset)
    msg = str(info.value)
    assert "\n" not in msg
    assert (case in msg) if case != "unknown_name" else "not-a-dataset" in msg


def test_real_ucmerced(ucmerced_real: Path) -> None:
    ds = scan_folder(ucmerced_real)
    assert ds.spec is not None and ds.spec.name == "ucmerced"
    assert ds.root == ucmerced_real / "Images"
    assert ds.classes == list(get_spec("ucmerced").classes)
    assert ds.class_counts() == {c: 100 for c in ds.classes} and len(ds) == 2100
    assert ds.paths[:2] == ["agricultural/agricultural00.jpg", "agricultural/agricultural01.jpg"]
    odd = []
    for i in range(len(ds)):
        info = probe_image(ds.absolute_path(i))
        if (info.width, info.height) != (256, 256):
            odd.append((i, info))
    assert len(odd) == 44
    for i, info in odd:
        arr = read_image(ds.absolute_path(i))
        assert arr.shape == (info.height, info.width, 3) and arr.dtype == np.uint8
        assert load_rgb(ds.absolute_path(i)).size == (info.width, info.height)


def test_real_eurosat_counts(ucmerced_real: Path) -> None:
    path = ucmerced_real.parent / "EuroSAT_RGB"
    if not path.is_dir():
        pytest.skip(f"real data not available: {path}")
    ds = scan_folder(path)
    assert ds.spec is not None and ds.spec.name == "eurosat"
    assert ds.class_counts() == dict(get_spec("eurosat").images_per_class)


def test_fake_dataset_fixture(fake_dataset: Callable[..., Path]) -> None:
    root = fake_dataset("eurosat-ms", per_class=1, classes=["Forest", "SeaLake"], size=6)
    ds = scan_folder(root, "eurosat-ms")
    assert ds.paths == ["Forest/Forest_1.tif", "SeaLake/SeaLake_1.tif"]
    assert read_image(ds.absolute_path(0)).shape == (6, 6, 13)
