"""``landlens train baseline``: SVM / logistic regression / k-NN on frozen backbone features."""

from __future__ import annotations

import platform
from pathlib import Path

import click

from landlens.cli.common import OneLineErrorCommand, backbone_options, command_line, make_backbone, write_json


def _parse_methods(values: tuple[str, ...]) -> list[str]:
    from landlens.errors import ConfigError
    from landlens.training.baselines import BASELINES

    methods: list[str] = []
    for value in values:
        for item in value.split(","):
            name = item.strip().lower()
            if not name:
                continue
            if name not in BASELINES:
                raise ConfigError(f"--method {item.strip()!r}: unknown baseline; choose from {', '.join(BASELINES)}")
            if name not in methods:
                methods.append(name)
    if not methods:
        raise ConfigError(f"--method: give at least one of {', '.join(BASELINES)}")
    return methods


FUSION_NOTE = ("the default 'fusion' runs EfficientNet-Lite0, MobileNetV2, SqueezeNet 1.1 and GeoEmbed v3 "
               "(offline weights) on each image, about 4.7x the time of Lite0 alone: some 4 minutes per 3,000 "
               "images on 2 cores (extracted once, then cached); -b tf_efficientnet_lite0 for one backbone")


def _parse_c(text: str) -> float | str:
    from landlens.errors import ConfigError

    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--C {text!r}: a number > 0 or 'auto'") from None
    if not value > 0:
        raise ConfigError(f"--C {text}: must be > 0")
    return value


def _summary_table(results: list[dict]) -> str:
    lines = ["| method | OA | 95% CI | macro F1 | kappa | fit time |", "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        rep = r["report"]
        ci = rep["ci"]
        kappa = "n/a" if rep["kappa"] is None else f"{rep['kappa']:.3f}"
        level = f"{100 * ci['level']:g}"
        ci_text = f"{100 * ci['low']:.1f}-{100 * ci['high']:.1f}" if level == "95" else \
            f"{100 * ci['low']:.1f}-{100 * ci['high']:.1f} ({level}%)"
        lines.append(f"| {r['method']} | {100 * rep['accuracy']:.2f}% | {ci_text} | {100 * rep['macro_f1']:.2f}% "
                     f"| {kappa} | {r['fit_seconds']:.2f} s |")
    return "\n".join(lines)


@click.command("baseline", cls=OneLineErrorCommand)
@click.argument("data", type=click.Path(path_type=Path))
@backbone_options(default="fusion", note=FUSION_NOTE)
@click.option("--method", "-m", "methods", multiple=True, default=("logreg",), show_default=True,
              help="svm | logreg | knn; repeat (or comma-separate) to run several on the same features")
@click.option("--split", "split", default="80/20", show_default=True,
              help="train/test ratios (80/20, 20/80, 70/20/10, ...) drawn with --seed, or a split manifest "
                   "JSON (`landlens data split`); with three parts the val part is unused")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the split, the classifier and the bootstrap")
@click.option("--C", "c_value", default="auto", show_default=True,
              help="regularisation of svm and logreg (larger: less regularised); 'auto' picks it by "
                   "3-fold cross-validation on the train part (logreg 0.01/0.1/1, svm 0.1/1/10)")
@click.option("--k", "k", type=int, default=5, show_default=True, help="neighbours of knn")
@click.option("--n-boot", type=int, default=1000, show_default=True, help="bootstrap replicates of the OA interval")
@click.option("--dataset", "-d", default=None, help="catalog name (`landlens data list`), for layout")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=Path("runs/features"), show_default=True,
              help="feature cache: extracted once per dataset, backbone and weights, then reused")
@click.option("--workers", type=int, default=None, help="decoding processes for extraction")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="results JSON file")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar")
def baseline(data: Path, backbone: str, weights: str, input_size: int | None, resize_mode: str | None,
                 methods: tuple[str, ...], split: str, seed: int, c_value: str, k: int, n_boot: int,
                 dataset: str | None, cache_dir: Path, workers: int | None, out: Path, quiet: bool) -> None:
    """Classical classifiers on frozen features of the images under DATA (one sub-folder per class).

    Features of the whole dataset are extracted once into --cache-dir (and reused), each
    --method is fitted on the train part of --split and evaluated on its test part. The
    defaults are the best measured recipe (fused offline backbones, logistic regression with C
    cross-validated on the train part; benchmarks/results/default_pipeline.md). Prints one
    row per method (OA with its bootstrap 95% CI, macro F1, kappa, fit time) and writes --out
    (JSON) with the command, versions, dataset, split, backbone identity and every metric.
    """
    import numpy as np
    import sklearn
    import torch

    from landlens import __version__
    from landlens.errors import ConfigError
    from landlens.training.baselines import baseline_features, run_baseline

    chosen = _parse_methods(methods)
    c_value = _parse_c(c_value)
    if k < 1:
        raise ConfigError(f"--k {k}: must be >= 1")
    if n_boot < 1:
        raise ConfigError(f"--n-boot {n_boot}: must be >= 1")

    command = command_line()
    bb = make_backbone(backbone, weights, input_size, resize_mode)
    sf = baseline_features(data, bb, weights, split, seed, cache_dir, dataset, workers=workers,
                           progress=not quiet, command=command)
    sf.backbone["weights_option"] = weights
    rec = sf.backbone
    how = "reused" if rec["reused"] else f"extracted in {rec['extract_seconds']:.1f} s"
    click.echo(f"features  {rec['backbone']}: {rec['images']} images x {rec['dim']} ({how}) {rec['store']}")
    split_rec = sf.split_record()
    click.echo(f"split     {split_rec.get('path') or split_rec.get('spec')} seed {split_rec['seed']}: "
               f"{len(sf.y_train)} train, {len(sf.y_test)} test images"
               + (f" ({sum(sf.unreadable.values())} unreadable skipped)" if sum(sf.unreadable.values()) else ""))
    if len(sf.y_train) == 0 or len(sf.y_test) == 0:
        raise ConfigError("the split leaves no readable train or test image")

    results = []
    for method in chosen:
        results.append(run_baseline(method, sf.X_train, sf.y_train, sf.X_test, sf.y_test, sf.classes,
                                    C=c_value, k=k, seed=seed, n_boot=n_boot))
    click.echo("")
    click.echo(_summary_table(results))
    for r in results:
        search = r["settings"].get("C_search")
        if search and search.get("folds"):
            cv = ", ".join(f"C={c} {100 * a:.2f}%" for c, a in search["cv_accuracy"].items())
            click.echo(f"{r['method']}: C={search['chosen']:g} chosen by {search['folds']}-fold CV on the train part ({cv})")
        for w in r["warnings"]:
            click.echo(f"note: {r['method']}: {w}")

    ds = sf.dataset
    doc = {
        "command": command,
        "versions": {"landlens": __version__, "torch": torch.__version__, "numpy": np.__version__,
                     "scikit-learn": sklearn.__version__, "python": platform.python_version()},
        "data": {"path": str(data), "root": str(ds.root), "dataset": ds.name, "images": len(ds.paths),
                 "classes": list(ds.classes)},
        "split": split_rec,
        "backbone": rec,
        "results": results,
    }
    write_json(out, doc)
    click.echo(f"\nresults: {out}")


baseline_cmd = baseline

__all__ = ["baseline", "baseline_cmd"]
