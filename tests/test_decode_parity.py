"""One decode path: the same file gives the same network input in every part of landlens.

Extraction (and the matching autoencoder, which extracts through it), archive queries (and so
the service), training, prediction and feature maps all decode through
``landlens.models.preprocessing.decode_image``. Before that was so, training and prediction
decoded JPEGs at full size while extraction used DCT draft scaling: on a 600 px JPEG the 224 px
inputs differed by up to 4 grey levels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures.make_datasets import class_image
from landlens.training.augment import build_eval_transform
from landlens.data.folder import scan_folder
from landlens.data.io import load_rgb
from landlens.features.extract import DecodeDataset
from landlens.models.preprocessing import Preprocessing, decode_image, normalize_batch, resize_and_crop
from landlens.retrieval.archive import Archive
from landlens.training.datamodule import SceneImages
from landlens.training.predict import _DecodeDataset as PredictDecode  # noqa: PLC2701 - the path under test

PRE = Preprocessing(input_size=224, crop_pct=0.875, resize_mode="crop", interpolation="bilinear")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes of AID-sized (600 x 600) and odd-sized JPEGs, plus a PNG."""
    root = tmp_path_factory.mktemp("parity") / "scenes"
    rng = np.random.default_rng(0)
    for c, name in enumerate(["airport", "farmland"]):
        (root / name).mkdir(parents=True)
        for k, size in enumerate([(600, 600), (640, 480), (533, 611)]):
            arr = class_image(c, k, (size[1], size[0]))
            arr = np.clip(arr.astype(np.int16) + rng.integers(-40, 40, arr.shape), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"{k}.jpg", quality=92)
        Image.fromarray(class_image(c, 9, (300, 300))).save(root / name / "9.png")
    return root


def _files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.jpg")) + sorted(folder.rglob("*.png"))


def test_every_path_gives_identical_inputs(folder: Path) -> None:
    files = _files(folder)
    ds = scan_folder(folder)
    rel = [str(f.relative_to(folder)) for f in files]
    extraction = DecodeDataset(folder, rel, PRE)
    prediction = PredictDecode(files, PRE, None)
    rows = {str(ds.absolute_path(i)): i for i in range(len(ds))}
    training = SceneImages(ds, np.array([rows[str(f)] for f in files]), build_eval_transform(PRE), PRE)
    for i, f in enumerate(files):
        ref = np.asarray(resize_and_crop(decode_image(f, PRE), PRE))
        arr, _, reason = extraction[i]
        assert reason is None
        np.testing.assert_array_equal(arr, ref)
        np.testing.assert_array_equal(prediction[i][1], ref)
        x_train, _ = training[i]
        x_extract = normalize_batch(torch.from_numpy(np.array(arr[None])), PRE)[0]
        torch.testing.assert_close(x_train, x_extract, rtol=0, atol=0)


def test_archive_queries_decode_as_extraction_did(folder: Path, tmp_path: Path) -> None:
    arch = Archive.build(folder, tmp_path / "arch", backbone="lbp_rgb", rerank=None, progress=False)
    pre = arch.preprocessing
    extraction = DecodeDataset(folder, ["airport/0.jpg"], pre)
    arr, _, _ = extraction[0]
    query = arch.load_query(folder / "airport" / "0.jpg")
    np.testing.assert_array_equal(np.asarray(resize_and_crop(query, pre)), arr)
    # and the query embeds to the indexed vector of the same file
    rec = next(r for r in arch.records() if r.path.endswith("airport/0.jpg"))
    np.testing.assert_allclose(arch.embed([query])[0], arch.vector(rec.id), rtol=1e-5, atol=1e-6)


def test_the_draft_is_what_made_the_paths_differ(folder: Path) -> None:
    """Full-size decoding (what training and prediction did) gives other pixels on a 600 px JPEG,
    so the parity above is not vacuous."""
    f = folder / "airport" / "0.jpg"
    full = np.asarray(resize_and_crop(load_rgb(f), PRE)).astype(int)
    draft = np.asarray(resize_and_crop(decode_image(f, PRE), PRE)).astype(int)
    assert decode_image(f, PRE).size == (300, 300)  # half scale still covers the 256 px resize
    assert np.abs(full - draft).max() >= 2
