"""Class maps for cross-dataset evaluation, on generated folder datasets."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fixtures.make_datasets import make_folder_dataset

from landlens.data.folder import scan_folder
from landlens.errors import ConfigError, DatasetError
from landlens.training.class_map import (
    apply_class_map,
    check_same_classes,
    load_class_map,
    normalize_class_name,
)

MODEL = ["agricultural", "beach", "denseresidential", "forest", "river", "sparseresidential"]


@pytest.fixture(scope="module")
def test_ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("aid")
    counts = {"Beach": 2, "Dense_Residential": 3, "Farmland": 4, "Forest": 1, "Medium-Residential": 2,
              "Port": 2, "Sparse Residential": 3}
    make_folder_dataset(root / "AID", counts, ext=".png", size=8)
    return scan_folder(root / "AID")


def test_normalize_class_name():
    assert normalize_class_name("Dense_Residential") == normalize_class_name("dense residential")
    assert normalize_class_name("Medium-Residential") == "mediumresidential"
    assert normalize_class_name("denseResidential") == "denseresidential"


def test_automatic_match_by_name(test_ds):
    sub, targets, report = apply_class_map(test_ds, MODEL)
    # Beach, Dense_Residential, Forest, Sparse Residential match; Farmland, Medium-Residential, Port do not
    want = {"Beach": "beach", "Dense_Residential": "denseresidential", "Forest": "forest",
            "Sparse Residential": "sparseresidential"}
    assert {k["test_class"]: k["train_class"] for k in report["kept"]} == want
    assert {d["test_class"] for d in report["dropped"]} == {"Farmland", "Medium-Residential", "Port"}
    assert all(d["reason"] == "no model class of that name" for d in report["dropped"])
    assert report["model_classes_without_test_images"] == ["agricultural", "river"]
    assert report["images_kept"] == 2 + 3 + 1 + 3 and report["images_dropped"] == 4 + 2 + 2
    assert len(sub) == len(targets) == 9
    # each kept image's target is the model index of its test class's match
    for path, label, target in zip(sub.paths, sub.labels, targets):
        assert path.split("/")[0] == sub.classes[label]
        assert MODEL[target] == want[sub.classes[label]]
    assert targets.dtype == np.int64
    json.dumps(report)


def test_json_class_map_many_to_one_and_null(test_ds, tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"Farmland": "agricultural", "Dense_Residential": "denseresidential",
                                "Medium-Residential": "denseresidential", "Port": None, "Beach": ""}))
    sub, targets, report = apply_class_map(test_ds, MODEL, path)
    assert report["mode"] == "class_map" and report["class_map"] == str(path)
    assert np.bincount(targets, minlength=len(MODEL)).tolist() == [4, 0, 5, 0, 0, 0]
    reasons = {d["test_class"]: d["reason"] for d in report["dropped"]}
    assert reasons == {"Port": "mapped to null", "Beach": "mapped to null",
                       "Forest": "not in the class map", "Sparse Residential": "not in the class map"}
    assert set(report["model_classes_without_test_images"]) == {"beach", "forest", "river", "sparseresidential"}
    assert len(sub) == 9 and report["images_kept"] == 9


def test_csv_and_tsv_class_maps(tmp_path):
    csv_path = tmp_path / "map.csv"
    csv_path.write_text("# AID -> UC Merced\ntest_class,train_class\n\nFarmland,agricultural\n"
                        "Port,\n  Beach , beach  \nDesert\n")
    assert load_class_map(csv_path) == {"Farmland": "agricultural", "Port": None, "Beach": "beach",
                                        "Desert": None}
    tsv_path = tmp_path / "map.tsv"
    tsv_path.write_text("Farmland\tagricultural\nSparse Residential\tsparseresidential\n")
    assert load_class_map(tsv_path) == {"Farmland": "agricultural", "Sparse Residential": "sparseresidential"}
    # names are resolved to the exact spelling of the model and the test data
    got = load_class_map(tsv_path, model_classes=MODEL, test_classes=["Farmland", "Sparse_Residential"])
    assert got == {"Farmland": "agricultural", "Sparse_Residential": "sparseresidential"}


def test_class_map_errors_name_file_line_and_class(test_ds, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("Farmland,agricultural\n# fine\nPort,harbor,extra\n")
    with pytest.raises(ConfigError, match=r"bad\.csv, line 3: expected 'test_class,train_class', got 3 fields"):
        load_class_map(bad)

    with pytest.raises(ConfigError, match=r"class map not found: .*nope\.json"):
        load_class_map(tmp_path / "nope.json")

    broken = tmp_path / "broken.json"
    broken.write_text('{"Farmland": "agricultural",')
    with pytest.raises(ConfigError, match=r"broken\.json: not valid JSON"):
        load_class_map(broken)

    twice = tmp_path / "twice.csv"
    twice.write_text("Port,beach\nPort,river\n")
    with pytest.raises(ConfigError, match=r"twice\.csv, line 2: test class 'Port' is given twice"):
        load_class_map(twice)

    unknown_train = tmp_path / "train.json"
    unknown_train.write_text(json.dumps({"Farmland": "agricultura"}))
    with pytest.raises(ConfigError, match=r"train\.json: train class 'agricultura' is not a class of the model; "
                                          r"did you mean 'agricultural'\?"):
        apply_class_map(test_ds, MODEL, unknown_train)

    unknown_test = tmp_path / "test.json"
    unknown_test.write_text(json.dumps({"Harbour": "beach"}))
    with pytest.raises(ConfigError, match=r"test\.json: test class 'Harbour' is not a class of the test data"):
        apply_class_map(test_ds, MODEL, unknown_test)

    not_object = tmp_path / "list.json"
    not_object.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        load_class_map(not_object)


def test_no_shared_class_is_one_clear_line(test_ds):
    with pytest.raises(DatasetError) as info:
        apply_class_map(test_ds, ["airplane", "golfcourse"])
    msg = str(info.value)
    assert "\n" not in msg
    assert "no test class matches a model class" in msg and "airplane" in msg and "Beach" in msg
    with pytest.raises(DatasetError, match="no test class matches a model class by the class map"):
        apply_class_map(test_ds, MODEL, {"Port": None})


def test_check_same_classes(tmp_path):
    root = make_folder_dataset(tmp_path / "ucm", ["beach", "forest", "river"], per_class=2, ext=".png", size=8)
    (root / "harbor").mkdir()  # an empty class folder
    ds = scan_folder(root)
    with pytest.raises(DatasetError) as info:
        check_same_classes(ds, ["beach", "forest", "harbor", "river", "urban"])
    msg = str(info.value)
    assert str(root) in msg and "2 class folder(s) of the model missing" in msg
    assert "harbor (empty folder)" in msg and "urban" in msg

    with pytest.raises(DatasetError, match="the model was not trained on: river"):
        check_same_classes(ds, ["beach", "forest"])

    np.testing.assert_array_equal(check_same_classes(ds, ["beach", "forest", "river"]), ds.labels)
    # a model whose class order differs gets its own indices
    np.testing.assert_array_equal(check_same_classes(ds, ["river", "beach", "forest"]),
                                  np.array([1, 1, 2, 2, 0, 0]))
