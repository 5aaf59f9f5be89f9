"""Evaluate a trained run on a folder: the same dataset's held-out part, or another dataset.

In-dataset (the default), the test folder must have every class of the model; a missing class
folder is an error naming it. Cross-dataset (ResNet50-TL study: a NWPU-RESISC45 model checked on
RSSCN7), pass a class map file or ``match_names=True`` and only the shared classes are scored
(see :mod:`landlens.training.class_map`). Images are read and preprocessed exactly as in the
run's test evaluation (the backbone's evaluation view).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from landlens.atomic import atomic_write_json, atomic_write_text
from landlens.data.folder import scan_folder
from landlens.errors import ConfigError, DatasetError
from landlens.models.classifier import load_classifier


def evaluate_run(run_dir: str | os.PathLike[str], data: str | os.PathLike[str], *, dataset: str | None = None,
                 class_map: str | os.PathLike[str] | None = None, match_names: bool = False,
                 split: str | None = None, part: str = "test", seed: int = 0, batch_size: int = 64,
                 num_workers: int = 2, bootstrap: int = 1000, out_dir: str | os.PathLike[str] | None = None,
                 progress: bool = False) -> dict[str, Any]:
    """Score a saved classifier on ``data`` and return (and optionally write) the report.

    Args:
        run_dir: a run directory with ``model.json`` + ``model.safetensors``.
        data: folder of class sub-folders.
        class_map: mapping file from the test folder's classes to the model's (cross-dataset).
        match_names: cross-dataset without a file: match classes by normalised name.
        split: score only one part of a split of ``data`` (ratios with ``seed``, or a manifest).
        part: which part of ``split``.
        out_dir: where to write ``evaluation.json``, ``report.md`` and ``confusion_matrix.png``.
    """
    from landlens.training.augment import build_eval_transform
    from landlens.data.splits import SplitManifest, make_split
    from landlens.reports.figures import plot_confusion_matrix
    from landlens.training.class_map import apply_class_map, check_same_classes
    from landlens.training.datamodule import SceneImages
    from landlens.training.evaluation import classification_report
    from landlens.training.runs import environment, unwrap_worker_error

    if class_map is not None and match_names:
        raise ConfigError("give either a class map file or --match-names, not both")
    model = load_classifier(run_dir)
    ds = scan_folder(data, dataset)
    split_info = None
    if split is not None:
        p = Path(split).expanduser()
        manifest = SplitManifest.load(p) if (p.suffix == ".json" or p.is_file()) else make_split(
            ds.paths, ds.labels, ds.classes, ratios=split, seed=seed, dataset=ds.name)
        manifest.check_against(ds.paths, ds.labels, ds.classes, allow_extra=True)
        ds = ds.subset(manifest.indices(part, ds.paths))
        split_info = {"split": str(split), "part": part, "seed": manifest.seed, "n": len(ds)}
    mapping_report: dict[str, Any] | None = None
    if class_map is not None or match_names:
        ds, targets, mapping_report = apply_class_map(ds, model.classes, class_map)
    else:
        targets = check_same_classes(ds, model.classes)
    if len(ds) == 0:
        raise DatasetError(f"no image of {data} is left to evaluate")
    images = SceneImages(ds, np.arange(len(ds)), build_eval_transform(model.preprocessing), model.preprocessing,
                         labels=targets)
    loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers)
    t0 = time.perf_counter()
    probs_list, ys = [], []
    try:
        with torch.inference_mode():
            for x, y in loader:
                probs_list.append(model(x).float().exp())
                ys.append(y)
    except DatasetError as exc:
        raise unwrap_worker_error(exc) from None
    probs = torch.cat(probs_list).numpy()
    y_true = torch.cat(ys).numpy()
    rep = classification_report(y_true, probs.argmax(1), model.classes, probs=probs, n_boot=bootstrap, seed=seed)
    result = {
        "run": str(run_dir), "data": str(data), "dataset": ds.name, "n_images": len(ds),
        "mode": "cross-dataset" if mapping_report is not None else "in-dataset",
        "class_mapping": mapping_report, "split": split_info, "environment": environment(),
        "seconds": round(time.perf_counter() - t0, 2), "summary": rep.summary_line(), "report": rep.to_dict(),
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "evaluation.json", result, indent=2, sort_keys=False)
        atomic_write_text(out / "report.md", rep.to_markdown() + "\n")
        present = sorted(set(y_true.tolist()))
        cm = rep.confusion[np.ix_(present, present)]
        plot_confusion_matrix(cm, [model.classes[i] for i in present], out / "confusion_matrix.png",
                              title=f"{Path(str(data)).name}: OA {100 * rep.accuracy:.2f}%")
    result["markdown"] = rep.to_markdown()
    return result


__all__ = ["evaluate_run"]
