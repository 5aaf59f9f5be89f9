"""``landlens train``: scene classification by transfer learning."""

from __future__ import annotations

from pathlib import Path

import click

from landlens.cli.common import OneLineErrorGroup, command_line, echo_json

_SHORTCUTS = {  # option -> config key
    "data_path": "data.path", "dataset": "data.dataset", "split": "data.split", "backbone": "model.backbone",
    "weights": "model.weights", "strategy": "model.strategy", "head": "model.head", "loss": "loss.name",
    "augment": "data.augment", "epochs": "trainer.epochs", "lr": "optim.lr", "batch_size": "data.batch_size",
    "input_size": "data.input_size", "out": "out",
}


def _overrides(sets: tuple[str, ...], **shortcuts) -> list[str]:
    import json

    out = [f"{_SHORTCUTS[k]}={json.dumps(v) if not isinstance(v, str) else v}"
           for k, v in shortcuts.items() if v is not None]
    return out + list(sets)


def _config_options(f):
    for name, flag, kind, help_ in reversed([
        ("data_path", "--data", str, "image folder (data.path)"),
        ("dataset", "--dataset", str, "catalog name of the folder (data.dataset)"),
        ("split", "--split", str, "ratios such as 80/20 or 70/20/10, or a split manifest (data.split)"),
        ("backbone", "--backbone", str, "backbone name (model.backbone)"),
        ("weights", "--weights", str, "auto | package | hub | none | PATH (model.weights)"),
        ("strategy", "--strategy", click.Choice(["linear", "partial", "full"]), "transfer strategy (model.strategy)"),
        ("head", "--head", click.Choice(["linear", "mlp", "se"]), "classification head (model.head)"),
        ("loss", "--loss", click.Choice(["ce", "nll", "label_smoothing", "ice"]), "loss (loss.name)"),
        ("augment", "--augment", str, "none | crop-flip | colour | geometric | dihedral (data.augment)"),
        ("epochs", "--epochs", int, "maximum epochs (trainer.epochs)"),
        ("lr", "--lr", float, "learning rate (optim.lr)"),
        ("batch_size", "--batch-size", int, "batch size (data.batch_size)"),
        ("input_size", "--input-size", int, "network input side in pixels (data.input_size)"),
        ("out", "--out", str, "run directory (out)"),
    ]):
        f = click.option(flag, name, type=kind, default=None, help=help_)(f)
    f = click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE",
                     help="override any config key, e.g. --set optim.schedule=step (repeatable)")(f)
    return f


@click.group(cls=OneLineErrorGroup)
def train() -> None:
    """Train and evaluate scene classifiers (transfer learning from pretrained backbones).

    One config (YAML or JSON) drives the dataset division, training and test evaluation;
    see `landlens train run --help` and the README's classification section.
    """


@train.command("run")
@click.argument("config", required=False, type=click.Path(dir_okay=True, path_type=Path))
@_config_options
@click.option("--resume", is_flag=True, help="continue the run in the config's out directory from its last checkpoint")
@click.option("--no-progress", is_flag=True, help="no progress bar")
@click.option("--json", "as_json", is_flag=True, help="print the results as JSON")
def run_cmd(config: Path | None, sets: tuple[str, ...], resume: bool, no_progress: bool, as_json: bool,
            **shortcuts) -> None:
    """Divide the dataset, train, evaluate on the test part and save the model.

    CONFIG is a YAML/JSON file (optional: flags and --set can give everything), or a run
    directory to --resume.
    """
    from landlens.training.config import load_config

    if config is not None and config.is_dir():
        config = config / "config.json"
    cfg = load_config(config, _overrides(sets, **shortcuts))
    from landlens.training.engine import train as train_fn

    result = train_fn(cfg, resume=resume, progress=not no_progress, command=command_line())
    if result.status != "complete":
        click.echo(f"interrupted; continue with: landlens train run {cfg.out} --resume", err=True)
        raise SystemExit(130)
    if as_json:
        echo_json(result.results)
        return
    click.echo(_summary(result.results))
    click.echo((result.run_dir / "report.md").read_text())
    click.echo(f"run directory: {result.run_dir}")


def _summary(results: dict) -> str:
    cfg = results["config"]
    parts = ", ".join(f"{k} {v}" for k, v in results["data"]["parts"].items())
    return (f"{cfg['model']['backbone']} ({cfg['model']['strategy']}, {cfg['model']['head']} head, "
            f"{cfg['loss']['name']} loss) on {results['data']['root']} [{parts}]: {results['epochs_run']} epochs, "
            f"fit {results['timing_s']['fit']:.0f} s\n{results['test_summary']}")


@train.command("grid")
@click.argument("config", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_config_options
@click.option("--grid", "axes", multiple=True, required=True, metavar="SECTION.KEY=V1,V2,...",
              help="one axis of the grid (repeatable), e.g. --grid optim.lr=0.03,0.003")
@click.option("--grid-out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="folder for the runs and grid.md/json/csv")
@click.option("--no-progress", is_flag=True)
def grid_cmd(config: Path | None, sets: tuple[str, ...], axes: tuple[str, ...], grid_out: Path, no_progress: bool,
             **shortcuts) -> None:
    """Train every combination of the grid's values; one table of test accuracy."""
    from landlens.training.config import apply_overrides, read_config_file
    from landlens.training.grid import parse_grid, run_grid

    base = apply_overrides(read_config_file(config) if config else {}, _overrides(sets, **shortcuts))
    grid = parse_grid(axes)
    run_grid(base, grid, grid_out, progress=not no_progress, command=command_line())
    click.echo((grid_out / "grid.md").read_text())


@train.command("preview-augment")
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--preset", default="dihedral", show_default=True,
              help="none | crop-flip | colour | geometric | dihedral")
@click.option("--backbone", default="tf_efficientnet_lite0", show_default=True,
              help="whose preprocessing (input size, normalisation) to use")
@click.option("--input-size", type=int, default=None)
@click.option("--images", "n_images", type=int, default=4, show_default=True, help="rows: one image per class")
@click.option("--samples", type=int, default=6, show_default=True, help="augmented samples per image")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("augment_preview.png"),
              show_default=True)
def preview_augment_cmd(data: Path, preset: str, backbone: str, input_size: int | None, n_images: int,
                        samples: int, seed: int, out: Path) -> None:
    """Write a PNG grid: each row an image's evaluation view, then augmented samples."""
    import numpy as np

    from landlens.data.augment import preview_augment
    from landlens.data.folder import scan_folder
    from landlens.models.registry import default_preprocessing, get_spec

    ds = scan_folder(data)
    pre = default_preprocessing(get_spec(backbone))
    if input_size:
        pre = pre.replace(input_size=input_size)
    rng = np.random.default_rng(seed)
    picks = []
    for c in range(len(ds.classes))[: max(1, n_images)]:
        members = np.flatnonzero(ds.labels == c)
        picks.append(int(rng.choice(members)))
    paths = [ds.absolute_path(i) for i in picks]
    path = preview_augment(paths, preset, pre, out, n_per_image=samples, seed=seed,
                           titles=[ds.classes[int(ds.labels[i])] for i in picks])
    click.echo(str(path))


def _register() -> None:
    from landlens.cli.baseline import baseline

    train.add_command(baseline)


_register()
