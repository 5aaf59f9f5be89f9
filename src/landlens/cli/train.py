"""``landlens train``: scene classification by transfer learning."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from landlens.cli.common import OneLineErrorGroup, command_line, echo_json, quiet_lightning, shortcut_overrides
from landlens.training.config import AUGMENTS, CLASSIFICATION_LOSSES, HEADS, STRATEGIES

_SHORTCUTS = {  # option -> config key
    "data_path": "data.path", "dataset": "data.dataset", "split": "data.split", "backbone": "model.backbone",
    "weights": "model.weights", "strategy": "model.strategy", "head": "model.head", "loss": "loss.name",
    "augment": "data.augment", "epochs": "trainer.epochs", "lr": "optim.lr", "batch_size": "data.batch_size",
    "input_size": "data.input_size", "out": "out",
}


def _overrides(sets: tuple[str, ...], **shortcuts) -> list[str]:
    return shortcut_overrides(_SHORTCUTS, sets, **shortcuts)


def _config_options(f):
    for name, flag, kind, help_ in reversed([
        ("data_path", "--data", str, "image folder (data.path)"),
        ("dataset", "--dataset", str, "catalog name of the folder (data.dataset)"),
        ("split", "--split", str, "ratios such as 80/20 or 70/20/10, or a split manifest (data.split)"),
        ("backbone", "--backbone", str, "backbone name (model.backbone)"),
        ("weights", "--weights", str, "auto | package | hub | none | PATH (model.weights)"),
        ("strategy", "--strategy", click.Choice(STRATEGIES), "transfer strategy (model.strategy)"),
        ("head", "--head", click.Choice(HEADS), "classification head (model.head)"),
        ("loss", "--loss", click.Choice(CLASSIFICATION_LOSSES), "loss (loss.name)"),
        ("augment", "--augment", str, f"{' | '.join(AUGMENTS)} (data.augment)"),
        ("epochs", "--epochs", int, "maximum epochs (trainer.epochs)"),
        ("lr", "--lr", float, "learning rate (optim.lr) [default: 0.01 for --strategy linear, else 0.001]"),
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
    quiet_lightning()


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

    \b
    With nothing but --data PATH --split 80/20 the run is the best measured recipe that fits a
    CPU: a linear head (AdamW, lr 0.01, 10 epochs) on the frozen `fusion` backbone
    (EfficientNet-Lite0, MobileNetV2, SqueezeNet 1.1, GeoEmbed v3; offline weights), trained on
    features cached once. Cost on 2 cores: the extraction, about 4 minutes per 3,000 images,
    then under a minute of training (benchmarks/results/default_pipeline.md).
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
            f"fit {results['timing_s']['fit']:.0f} s")


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

    from landlens.training.augment import preview_augment
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


@train.command("evaluate")
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--dataset", default=None, help="catalog name of DATA")
@click.option("--class-map", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="JSON or CSV mapping DATA's classes to the model's (cross-dataset)")
@click.option("--match-names", is_flag=True, help="cross-dataset: match classes by name (case, _ - and spaces ignored)")
@click.option("--split", default=None, help="score one part of a split of DATA (ratios or a manifest)")
@click.option("--part", default="test", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="write evaluation.json, report.md and confusion_matrix.png here")
@click.option("--json", "as_json", is_flag=True)
def evaluate_cmd(run: Path, data: Path, dataset: str | None, class_map: Path | None, match_names: bool,
                 split: str | None, part: str, seed: int, batch_size: int, workers: int, out_dir: Path | None,
                 as_json: bool) -> None:
    """Score a trained RUN on DATA: a held-out folder, or another dataset's shared classes."""
    from landlens.training.assess import evaluate_run

    res = evaluate_run(run, data, dataset=dataset, class_map=class_map, match_names=match_names, split=split,
                       part=part, seed=seed, batch_size=batch_size, num_workers=workers, out_dir=out_dir)
    if as_json:
        res.pop("markdown", None)
        echo_json(res)
        return
    if res["class_mapping"]:
        m = res["class_mapping"]
        click.echo(f"classes kept: {len(m.get('kept', {}))}, images kept: {m.get('images_kept')}, "
                   f"dropped: {m.get('images_dropped')}")
    click.echo(res["markdown"])


@train.command("feature-maps")
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--layer", "layers", multiple=True, help="layer name (repeatable); default: the last layer of each stage")
@click.option("--list", "list_only", is_flag=True, help="print the layers that output feature maps and exit")
@click.option("--max-channels", type=int, default=32, show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("feature_maps"),
              show_default=True)
def feature_maps_cmd(run: Path, image: Path, layers: tuple[str, ...], list_only: bool, max_channels: int,
                     out_dir: Path) -> None:
    """Save activation grids of a trained model's layers for one IMAGE (one PNG per layer)."""
    from landlens.models.classifier import load_classifier
    from landlens.models.preprocessing import decode_image, preprocess_images, resize_and_crop
    from landlens.training.feature_maps import capture_feature_maps, list_layers, save_feature_maps

    model = load_classifier(run)
    names = list_layers(model.backbone, input_size=model.preprocessing.input_size)
    if list_only:
        click.echo("\n".join(names))
        return
    chosen = list(layers) or _default_layers(model, names)
    img = decode_image(image, model.preprocessing)
    x = preprocess_images([img], model.preprocessing).contiguous()
    maps = capture_feature_maps(model.backbone, x, chosen)
    for path in save_feature_maps(maps, out_dir, max_channels=max_channels,
                                  image=resize_and_crop(img, model.preprocessing)):
        click.echo(str(path))


def _default_layers(model, names: list[str]) -> list[str]:
    """The last feature-map layer inside each backbone stage (at most 4, spread over the depth)."""
    from landlens.training.strategies import backbone_stages

    stages = backbone_stages(model.backbone)
    all_mods = {p.rsplit(".", 1)[0] for st in stages for p in st.parameters}

    def within(n: str, mods: set[str]) -> bool:  # n lies inside this stage only
        related = {m for m in all_mods if m == n or m.startswith(n + ".") or n.startswith(m + ".")}
        return bool(related) and related <= mods

    picks = []
    for stage in stages:
        mods = {p.rsplit(".", 1)[0] for p in stage.parameters}
        inside = [n for n in names if within(n, mods)]
        if inside:
            picks.append(inside[-1])
    picks = list(dict.fromkeys(picks))
    if len(picks) > 4:
        idx = np.linspace(0, len(picks) - 1, 4).round().astype(int)
        picks = [picks[i] for i in idx]
    return picks or names[-1:]


def _register() -> None:
    from landlens.cli.baseline import baseline

    train.add_command(baseline)


_register()
