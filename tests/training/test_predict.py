"""Predictor: probabilities against an independent forward pass, top-k order, folders, bad files, errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.make_datasets import class_image, make_bad_files, write_image
from PIL import Image

from landlens.data.io import load_rgb
from landlens.errors import CheckpointError, ConfigError, DatasetError
from landlens.models.classifier import HeadConfig, build_classifier, load_classifier, save_classifier
from landlens.models.preprocessing import Preprocessing, preprocess_images
from landlens.training.predict import Prediction, Predictor, expand_inputs

CLASSES = ["beach", "forest", "harbor", "river", "urban"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random ResNet-10-T classifier (64 px input, crop mode) with a sharpened head."""
    torch.manual_seed(0)
    model = build_classifier("resnet10t", CLASSES, HeadConfig("linear"), weights="none",
                             preprocessing=Preprocessing(input_size=64, crop_pct=0.875))
    with torch.no_grad():  # spread the logits so the top-k order is not a near tie
        model.head.fc.weight.mul_(20.0)
        model.head.fc.bias.copy_(torch.tensor([0.5, -0.3, 0.1, 0.0, -0.6]))
    d = tmp_path_factory.mktemp("predict_run")
    save_classifier(model, d)
    return d


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Five images of different sizes and aspect ratios (JPEG and PNG)."""
    d = tmp_path_factory.mktemp("predict_images")
    sizes = [(40, 30), (30, 50), (64, 64), (90, 70), (33, 33)]
    paths = []
    for i, wh in enumerate(sizes):
        p = d / f"scene_{i}.{'jpg' if i % 2 else 'png'}"
        write_image(p, class_image(i, i, wh))
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def predictor(run_dir: Path) -> Predictor:
    return Predictor(run_dir, batch_size=3)


@pytest.fixture(scope="module")
def ref(run_dir: Path, images: list[Path]) -> np.ndarray:
    return _reference(run_dir, images)


def _reference(run_dir: Path, paths: list[Path]) -> np.ndarray:
    """exp(model(preprocess_images(...))), computed image by image without the Predictor."""
    model = load_classifier(run_dir)
    rows = []
    with torch.no_grad():
        for p in paths:
            x = preprocess_images([load_rgb(p)], model.preprocessing)
            rows.append(model(x).double().exp()[0].numpy())
    return np.stack(rows)


def test_probabilities_match_independent_forward(predictor: Predictor, images: list[Path], ref: np.ndarray) -> None:
    preds = predictor.predict_paths(images, top_k=len(CLASSES))
    assert [p.path for p in preds] == [str(p) for p in images]
    for pred, row in zip(preds, ref):
        assert pred.ok and pred.error is None
        got = dict(zip(pred.labels, pred.probabilities))
        assert sorted(got) == sorted(CLASSES)
        np.testing.assert_allclose([got[c] for c in CLASSES], row, rtol=1e-5, atol=1e-6)
        assert math.isclose(sum(pred.probabilities), 1.0, abs_tol=1e-5)
    # the images do not all get the same answer (the comparison above is not vacuous)
    assert len({tuple(np.round(r, 3)) for r in ref}) == len(images)


def test_top_k_order_and_length(predictor: Predictor, images: list[Path], ref: np.ndarray) -> None:
    preds = predictor.predict_paths(images, top_k=3)
    for pred, row in zip(preds, ref):
        order = np.argsort(-row, kind="stable")[:3]
        assert list(pred.labels) == [CLASSES[j] for j in order]
        assert len(pred.probabilities) == 3
        assert all(a >= b for a, b in zip(pred.probabilities, pred.probabilities[1:]))
        assert pred.label == CLASSES[int(np.argmax(row))]
        np.testing.assert_allclose(pred.probabilities, row[order], rtol=1e-5, atol=1e-6)


def test_batch_size_and_workers_do_not_change_results(run_dir: Path, predictor: Predictor,
                                                      images: list[Path]) -> None:
    a = predictor.predict_paths(images, top_k=2)  # batches of 3
    b = Predictor(run_dir, batch_size=32, num_workers=1).predict_paths(images, top_k=2)
    for x, y in zip(a, b):
        assert x.labels == y.labels
        np.testing.assert_allclose(x.probabilities, y.probabilities, rtol=1e-5, atol=1e-6)


def test_predict_images_equals_predict_paths(predictor: Predictor, images: list[Path]) -> None:
    pred = predictor
    from_files = pred.predict_paths(images, top_k=4)
    from_pil = pred.predict_images([Image.open(p) for p in images], top_k=4)
    assert [p.path for p in from_pil] == [None] * len(images)
    for x, y in zip(from_files, from_pil):
        assert x.labels == y.labels
        np.testing.assert_allclose(x.probabilities, y.probabilities, rtol=1e-5, atol=1e-6)


def test_folder_input_recursive_natural_order(run_dir: Path, predictor: Predictor, tmp_path: Path) -> None:
    root = tmp_path / "folder"
    names = ["img10.png", "img2.png", "sub/img1.jpg", "sub/deeper/a.png", "img1.png"]
    for i, n in enumerate(names):
        write_image(root / n, class_image(i, 0, (36, 36)))
    (root / "notes.txt").write_text("not an image")
    write_image(root / ".hidden.png", class_image(0, 0))
    write_image(root / ".cache" / "x.png", class_image(0, 0))
    expected = [root / "img1.png", root / "img2.png", root / "img10.png", root / "sub/deeper/a.png",
                root / "sub/img1.jpg"]
    assert expand_inputs([root]) == expected
    single = tmp_path / "single.png"
    write_image(single, class_image(3, 1, (50, 40)))
    preds = predictor.predict_paths([single, root], top_k=2)
    assert [p.path for p in preds] == [str(single)] + [str(p) for p in expected]
    ref = _reference(run_dir, [single] + expected)
    for pred, row in zip(preds, ref):
        assert pred.label == CLASSES[int(np.argmax(row))]
        assert pred.probabilities[0] == pytest.approx(row.max(), abs=1e-6)


def test_bad_image_among_good_ones(predictor: Predictor, images: list[Path], ref: np.ndarray,
                                   tmp_path: Path) -> None:
    bad = make_bad_files(tmp_path / "bad")
    inputs = [images[0], bad["truncated"], images[1], bad["not_image"], images[2]]
    preds = predictor.predict_paths(inputs, top_k=2)
    assert [p.ok for p in preds] == [True, False, True, False, True]
    for p, path in ((preds[1], bad["truncated"]), (preds[3], bad["not_image"])):
        assert p.path == str(path)
        assert str(path) in p.error and "\n" not in p.error
        assert p.labels == () and p.probabilities == () and p.label is None
        assert p.to_dict()["top"] == []
    for pred, row in zip([preds[0], preds[2], preds[4]], ref[:3]):
        assert pred.label == CLASSES[int(np.argmax(row))]
        assert pred.probabilities[0] == pytest.approx(row.max(), abs=1e-6)


def test_missing_path_is_one_line_error(predictor: Predictor, images: list[Path], tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "gone.jpg"
    with pytest.raises(DatasetError) as err:
        predictor.predict_paths([images[0], missing])
    assert str(missing) in str(err.value) and "\n" not in str(err.value)
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no image"):
        expand_inputs([empty])


@pytest.mark.parametrize("k", [6, 0])
def test_top_k_out_of_range(predictor: Predictor, images: list[Path], k: int) -> None:
    with pytest.raises(ConfigError) as err:
        predictor.predict_paths(images[:1], top_k=k)
    assert f"top-k {k}" in str(err.value) and "5 classes" in str(err.value)


def test_run_dir_without_model_json(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as err:
        Predictor(tmp_path)
    msg = str(err.value)
    assert "model.json" in msg and str(tmp_path) in msg and "\n" not in msg


def test_bad_settings(run_dir: Path) -> None:
    with pytest.raises(ConfigError, match="batch size"):
        Predictor(run_dir, batch_size=0)
    with pytest.raises(ConfigError, match="device"):
        Predictor(run_dir, device="warp-drive")


def test_prediction_to_dict() -> None:
    d = Prediction("a.jpg", ("x", "y"), (0.75, 0.25)).to_dict()
    assert d == {"path": "a.jpg", "error": None,
                 "top": [{"rank": 1, "label": "x", "probability": 0.75},
                         {"rank": 2, "label": "y", "probability": 0.25}]}


def test_an_optimized_predictor_gives_the_same_probabilities(run_dir: Path, images: list[Path], ref: np.ndarray) -> None:
    fast = Predictor(run_dir, batch_size=3)
    assert fast.optimize("jit") == "jit" and fast._fast is not None
    preds = fast.predict_paths(images, top_k=len(CLASSES))
    for pred, row in zip(preds, ref):
        got = dict(zip(pred.labels, pred.probabilities))
        np.testing.assert_allclose([got[c] for c in CLASSES], row, rtol=1e-4, atol=1e-5)
    assert fast.optimize("none") == "eager" and fast._fast is None
    with pytest.raises(ConfigError, match="unknown forward-pass mode"):
        fast.optimize("compile")
