"""Land-use maps of whole scenes from a trained classification run (``landlens scenes classify``).

:func:`classify_scene` slides the run's classifier over a georeferenced scene
(:func:`landlens.scenes.maps.make_map`): every chip is read from the scene by its window, made
8-bit RGB by the scene's radiometric mapping, then preprocessed exactly as the run's images were
(:func:`~landlens.models.preprocessing.resize_and_crop` and the model's normalisation, as
:class:`~landlens.training.predict.Predictor` does for files). The map holds the most probable
class of each cell, the mean class probabilities of the windows covering it.

Match the scale the run was trained at: a chip should cover the ground its training images
covered, at about their pixel size. EuroSAT images are 64 px at 10 m, so a 30 m Landsat scene is
mapped with ``gsd=10, chip=64`` (resampled to 10 m, 640 m chips); UC Merced images are 256 px at
0.3 m (``gsd=0.3, chip=256``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from landlens.scenes.maps import MapResult, make_map


class RunScorer:
    """Class probabilities of RGB chips from a :class:`~landlens.training.predict.Predictor`
    (a :class:`~landlens.scenes.maps.ChipScorer`)."""

    def __init__(self, predictor: Any) -> None:
        from landlens.hashing import cached_file_digest

        self.predictor = predictor
        self.outputs = len(predictor.classes)
        files = [predictor.run_dir / name for name in ("model.json", "model.safetensors")]
        self.identity = "run:" + ",".join(cached_file_digest(f) for f in files if f.is_file())

    def __call__(self, chips: list[np.ndarray]) -> np.ndarray:
        from PIL import Image

        from landlens.models.preprocessing import resize_and_crop, to_uint8_array

        pre = self.predictor.preprocessing
        arrays = [to_uint8_array(resize_and_crop(Image.fromarray(c), pre)) for c in chips]
        return self.predictor.probabilities(arrays)


def classify_scene(run: str | os.PathLike[str], scene: str | os.PathLike[str], out: str | os.PathLike[str], *,
                   chip: int = 256, stride: int | None = None, gsd: float | None = None,
                   bands: Sequence[int] | None = None, nodata: float | None = None, stretch: Any = "auto",
                   resampling: str | None = None, min_valid: float = 0.5, probabilities: str | os.PathLike[str] | None = None,
                   device: str = "cpu", batch_size: int = 32, preview: bool = True, restart: bool = False,
                   progress: bool = False) -> MapResult:
    """A land-use map of ``scene`` by the classifier of the run directory ``run``, written to the
    GeoTIFF ``out`` with a CSV class table and a PNG preview (:mod:`landlens.scenes.maps`).

    ``chip`` and ``gsd`` should match the run's training images (module docstring); ``stride``
    (default ``chip``) is the map's cell size, and ``stride < chip`` averages overlapping windows.
    ``probabilities``: also write the mean class probabilities (float32, one band per class).
    An interrupted map resumes when run again (``restart=True`` discards an unfinished one).

    Raises:
        CheckpointError: ``run`` holds no trained classifier.
        ImageReadError: the scene cannot be read.
        LandlensError: bad settings, or no chip of the scene with enough data.
    """
    from landlens.training.predict import Predictor

    predictor = Predictor(run, device=device, batch_size=batch_size)
    predictor.optimize("jit")  # a traced graph, checked against eager mode (eager where it cannot be)
    scorer = RunScorer(predictor)
    return make_map(scene, scorer, out, kind="classes", classes=predictor.classes, chip=chip, stride=stride, gsd=gsd,
                    bands=bands, nodata=nodata, stretch=stretch, resampling=resampling, min_valid=min_valid,
                    batch_size=batch_size, probabilities=probabilities, preview=preview, restart=restart,
                    progress=progress)


def map_accuracy(map_path: str | os.PathLike[str], truth: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Overall accuracy of a class map (:func:`classify_scene`) against a truth raster of the same
    cell grid (class indices of ``classes``; negative: unknown), over cells known in both:
    ``cells``, ``correct``, ``accuracy`` and the map's ``nodata_cells``.

    Raises:
        LandlensError: the map's classes are not ``classes``, or the shapes differ.
    """
    import json

    from landlens.scenes.reader import rasterio_module

    rasterio = rasterio_module()

    from landlens.errors import LandlensError

    with rasterio.open(Path(map_path)) as src:
        pred = src.read(1).astype(np.int64)
        names = src.tags().get("landlens_classes")
    if names is not None and json.loads(names) != list(classes):
        raise LandlensError(f"{map_path}: the map's classes {json.loads(names)} are not {list(classes)}")
    if pred.shape != truth.shape:
        raise LandlensError(f"{map_path}: the map ({pred.shape}) and the truth ({truth.shape}) differ in shape")
    known = (truth >= 0) & (pred != 255)
    correct = int((pred[known] == truth[known]).sum())
    n = int(known.sum())
    return {"cells": n, "correct": correct, "accuracy": correct / n if n else float("nan"),
            "nodata_cells": int((pred == 255).sum())}


__all__ = ["RunScorer", "classify_scene", "map_accuracy"]
