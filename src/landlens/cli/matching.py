"""``landlens matching``: residual-dyad image matching (Khurshid et al.): autoencoder, discriminator, retrieval."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from landlens.cli.common import (OneLineErrorGroup, command_line, echo_json, quiet_lightning, shortcut_overrides,
                                 write_json)

_SHORTCUTS = {  # option -> config key
    "data_path": "data.path", "dataset": "data.dataset", "split": "data.split", "input_size": "data.input_size",
    "batch_size": "data.batch_size", "epochs": "optim.epochs", "lr": "optim.lr", "out": "out",
    "ae_run": "features.ae", "backbone": "features.backbone", "weights": "features.weights",
    "cache_dir": "features.cache_dir",
}


def _overrides(sets: tuple[str, ...], **shortcuts: Any) -> list[str]:
    return shortcut_overrides(_SHORTCUTS, sets, **shortcuts)


_COMMON = [
    ("data_path", "--data", str, "image folder (data.path)"),
    ("dataset", "--dataset", str, "catalog name of the folder (data.dataset)"),
    ("input_size", "--input-size", int, "autoencoder input side: 64, 128, 256... (data.input_size)"),
    ("epochs", "--epochs", int, "maximum epochs (optim.epochs)"),
    ("lr", "--lr", float, "initial learning rate (optim.lr)"),
    ("batch_size", "--batch-size", int, "batch size (data.batch_size)"),
    ("out", "--out", str, "run directory (out)"),
]
_SPLIT = [("split", "--split", str, "ratios such as 80/20 or 70/10/20, or a split manifest (data.split)")]
_FEATURES = [
    ("ae_run", "--ae-run", str, "autoencoder run whose latent maps are the features (features.ae)"),
    ("backbone", "--backbone", str, "backbone whose pooled features are used instead (features.backbone)"),
    ("weights", "--weights", str, "weights of --backbone (features.weights)"),
    ("cache_dir", "--cache-dir", str, "feature cache (features.cache_dir)"),
]


def _run_options(*groups):
    def wrap(f):
        specs = [s for g in groups for s in g]
        for name, flag, kind, help_ in reversed(specs):
            f = click.option(flag, name, type=kind, default=None, help=help_)(f)
        f = click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE",
                         help="override any config key, e.g. --set ae.widths=[32,64,128] (repeatable)")(f)
        f = click.option("--json", "as_json", is_flag=True, help="print the results as JSON")(f)
        f = click.option("--no-progress", is_flag=True, help="no progress bar")(f)
        f = click.option("--resume", is_flag=True,
                         help="continue the run in the config's out directory from its last checkpoint")(f)
        return click.argument("config", required=False, type=click.Path(path_type=Path))(f)
    return wrap


def _config_path(config: Path | None) -> Path | None:
    if config is not None and config.is_dir():
        return config / "config.json"
    return config


@click.group("matching", cls=OneLineErrorGroup)
def matching() -> None:
    """Residual-dyad image matching (Khurshid et al.): an autoencoder trained without labels
    describes images by 8x8xn latent maps, a discriminator trained on labelled pairs decides
    whether two images show the same class, and retrieval ranks the archive by match probability.

    Steps: pretrain-ae (any image folder), finetune-ae (train part of the target dataset),
    train-dml (pairs of the train part), evaluate (retrieval of the test part).
    """
    quiet_lightning()


def _finish(result, as_json: bool, line: str) -> None:
    if result.status != "complete":
        click.echo(f"interrupted; continue with: {result.results.get('resume')}", err=True)
        raise SystemExit(130)
    if as_json:
        echo_json(result.results)
        return
    click.echo(line)
    click.echo(f"run directory: {result.run_dir}")


def _ae_line(r: dict[str, Any]) -> str:
    m, d = r["model"], r["data"]
    mse = "-" if r.get("val_mse") is None else f"{r['val_mse']:.5f}"
    skipped = f", {r['unreadable']['count']} unreadable skipped" if r["unreadable"]["count"] else ""
    return (f"{r['step']}: {m['kind']} autoencoder, {m['input_size']} px -> {'x'.join(map(str, m['latent_shape']))} "
            f"latent, on {d['root']} ({d['train_images']} train / {d['val_images']} validation images{skipped}): "
            f"{r['epochs_run']} epochs (best {r['best_epoch']}), validation MSE {mse}, "
            f"fit {r['timing_s']['fit']:.0f} s")


def _ae_command(mode: str, config: Path | None, sets: tuple[str, ...], resume: bool, no_progress: bool,
                as_json: bool, init: Path | None, **shortcuts: Any) -> None:
    from landlens.matching.config import load_matching_config
    from landlens.matching.files import read_autoencoder_meta
    from landlens.matching.pipeline import finetune_ae, pretrain_ae

    base = None
    if init is not None:  # the pre-trained architecture carries over unless the config changes it
        ae = read_autoencoder_meta(init)["config"]
        base = {"ae": {"kind": ae["kind"], "widths": ae["widths"], "latent_channels": ae["latent_channels"]},
                "data": {"input_size": ae["input_size"]}}
    cfg = load_matching_config(_config_path(config), _overrides(sets, **shortcuts), base=base)
    if mode == "pretrain":
        result = pretrain_ae(cfg, resume=resume, progress=not no_progress, command=command_line())
    else:
        result = finetune_ae(cfg, init, resume=resume, progress=not no_progress, command=command_line())
    _finish(result, as_json, _ae_line(result.results) if result.status == "complete" else "")


@matching.command("pretrain-ae")
@_run_options(_COMMON)
def pretrain_ae_cmd(config: Path | None, sets: tuple[str, ...], resume: bool, no_progress: bool, as_json: bool,
                    **shortcuts: Any) -> None:
    """Pre-train the autoencoder on every image under --data (searched recursively, labels ignored).

    CONFIG is a YAML/JSON matching config (optional), or a run directory to --resume. Writes
    the run directory: autoencoder.safetensors/.json, reconstructions.png, latent_maps.png,
    history, learning_curves.png, results.json.
    """
    _ae_command("pretrain", config, sets, resume, no_progress, as_json, None, **shortcuts)


@matching.command("finetune-ae")
@_run_options(_COMMON, _SPLIT)
@click.option("--init", type=click.Path(path_type=Path), default=None,
              help="pre-trained autoencoder run to start from (ae.init); its architecture is kept")
def finetune_ae_cmd(config: Path | None, sets: tuple[str, ...], resume: bool, no_progress: bool, as_json: bool,
                    init: Path | None, **shortcuts: Any) -> None:
    """Fine-tune a pre-trained autoencoder on the train part of the dataset under --data.

    The split (--split, data.seed) is saved as split.json; test images are never read.
    """
    if init is None and not resume and config is None:
        from landlens.errors import ConfigError

        raise ConfigError("finetune-ae needs --init AE_RUN (the pre-trained autoencoder)")
    _ae_command("finetune", config, sets, resume, no_progress, as_json, init, **shortcuts)


def _dml_line(r: dict[str, Any]) -> str:
    f, m = r["features"], r["model"]
    pct = lambda s: "-" if not s else f"{100 * s['accuracy']:.2f}%"  # noqa: E731
    return (f"train-dml: {m['kind']} discriminator (width {m['width']}) on {f.get('backbone') or 'given'} features "
            f"{tuple(f['identity']['shape'])}, {r['data']['fit_images']} train images, "
            f"{r['data']['pairs_per_epoch']} pairs per epoch: {r['epochs_run']} epochs (best {r['best_epoch']}), "
            f"validation pair accuracy {pct(r['val_pairs'])}, test pair accuracy {pct(r['test_pairs'])}, "
            f"fit {r['timing_s']['fit']:.0f} s")


@matching.command("train-dml")
@_run_options(_COMMON, _SPLIT, _FEATURES)
def train_dml_cmd(config: Path | None, sets: tuple[str, ...], resume: bool, no_progress: bool, as_json: bool,
                  **shortcuts: Any) -> None:
    """Train the pair discriminator on features of the images under --data (pairs of the train part only).

    Features: the latent maps of --ae-run (a fine-tuned run's data.path, split and seed are
    used unless given), or the pooled features of --backbone. Writes the discriminator, with
    the identity of its features, and results.json with the validation and test pair accuracy.
    """
    from landlens.config import read_config_file
    from landlens.matching.config import apply_matching_overrides, load_matching_config, load_matching_run_config
    from landlens.matching.files import SPLIT_FILE
    from landlens.matching.pipeline import train_dml

    path = _config_path(config)
    overrides = _overrides(sets, **shortcuts)
    raw = apply_matching_overrides(read_config_file(path) if path is not None else {}, overrides)
    ae = (raw.get("features") or {}).get("ae")
    base = None
    if ae and (Path(ae) / SPLIT_FILE).is_file() and (Path(ae) / "config.json").is_file():
        d = load_matching_run_config(ae).data  # the fine-tuned autoencoder's split, so its test part stays unseen
        base = {"data": {"path": d.path, "dataset": d.dataset, "split": d.split, "seed": d.seed}}
    cfg = load_matching_config(path, overrides, base=base)
    result = train_dml(cfg, resume=resume, progress=not no_progress, command=command_line())
    _finish(result, as_json, _dml_line(result.results) if result.status == "complete" else "")


@matching.command("evaluate")
@click.argument("dml_run", type=click.Path(path_type=Path))
@click.option("--data", "data_path", default=None, help="image folder (default: the run's data.path)")
@click.option("--dataset", default=None, help="catalog name of the folder")
@click.option("--ae-run", default=None, help="features: this autoencoder's latent maps (default: the run's)")
@click.option("--backbone", default=None, help="features: this backbone's pooled features (default: the run's)")
@click.option("--weights", default=None, help="weights of --backbone")
@click.option("--split", "split_path", type=click.Path(path_type=Path), default=None,
              help="split manifest whose test part queries (default: the run's split.json)")
@click.option("--protocol", type=click.Choice(["split", "archive"]), default="split", show_default=True)
@click.option("--database", type=click.Choice(["archive-minus-query", "test"]), default="archive-minus-query",
              show_default=True, help="what the test queries search (split protocol)")
@click.option("--shortlist", type=int, default=None,
              help="re-rank only each query's K Euclidean neighbours with the discriminator")
@click.option("--baseline", default="euclidean", show_default=True, help="distance compared on the same features")
@click.option("--cache-dir", default=None, help="feature cache (default: the run's features.cache_dir)")
@click.option("--workers", type=int, default=None, help="decoding processes for feature extraction")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="results JSON file")
@click.option("--json", "as_json", is_flag=True, help="print the results as JSON")
@click.option("--no-progress", is_flag=True, help="no progress bar")
def evaluate_cmd(dml_run: Path, data_path: str | None, dataset: str | None, ae_run: str | None,
                 backbone: str | None, weights: str | None, split_path: Path | None, protocol: str, database: str,
                 shortlist: int | None, baseline: str, cache_dir: str | None, workers: int | None, out: Path,
                 as_json: bool, no_progress: bool) -> None:
    """Retrieval of the test part ranked by the discriminator of DML_RUN, next to --baseline.

    Features are those the run was trained on (re-extracted or taken from the cache) unless
    --ae-run / --backbone name others, which the discriminator refuses when they differ.
    """
    import platform

    import numpy as np
    import torch

    from landlens import __version__
    from landlens.errors import LandlensError
    from landlens.matching.pipeline import evaluate_matching, load_run, resolve_features

    if protocol == "archive" and split_path is not None:
        raise LandlensError("--split is for --protocol split; drop it or use --protocol split")
    if protocol == "archive" and database != "archive-minus-query":
        raise LandlensError("--database test needs --protocol split")
    cfg, _ = load_run(dml_run)
    if data_path is not None:
        cfg.data.path, cfg.data.dataset = str(data_path), dataset
    elif dataset is not None:
        cfg.data.dataset = dataset
    if ae_run is not None:
        cfg.features.ae, cfg.features.backbone = ae_run, None
    if backbone is not None:
        cfg.features.backbone, cfg.features.ae = backbone, None
    if weights is not None:
        cfg.features.weights = weights
    if cache_dir is not None:
        cfg.features.cache_dir = cache_dir
    if workers is not None:
        cfg.data.num_workers = int(workers)
    command = command_line()
    features, source = resolve_features(cfg, progress=not no_progress, command=command)
    ev = evaluate_matching(dml_run, features, split_path, protocol, shortlist, database=database,
                           baseline=baseline or None)
    doc = {"command": command,
           "versions": {"landlens": __version__, "torch": torch.__version__, "numpy": np.__version__,
                        "python": platform.python_version()},
           "data": {"path": cfg.data.path, "dataset": cfg.data.dataset},
           "features_source": source,
           **ev.to_dict()}
    write_json(out, doc)
    if as_json:
        echo_json(doc)
        return
    click.echo(ev.summary())
    if ev.baseline is not None:
        click.echo(f"\nmAP {100 * ev.learned.metrics['mAP']:.2f} (learned) vs "
                   f"{100 * ev.baseline.metrics['mAP']:.2f} ({baseline})")
    click.echo(f"results: {out}")


__all__ = ["matching"]
