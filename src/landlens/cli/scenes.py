"""``landlens scenes classify | similarity``: maps of whole georeferenced scenes.

Thin layers over :func:`landlens.training.landuse.classify_scene` and
:func:`landlens.retrieval.geo.similarity_map` (both :func:`landlens.scenes.maps.make_map`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from landlens.cli.common import OneLineErrorCommand, OneLineErrorGroup, echo_json, parse_lon_lat
from landlens.cli.index import tiling_options, tiling_settings


@click.group("scenes", cls=OneLineErrorGroup)
def scenes() -> None:
    """Maps of whole GeoTIFF scenes: land use from a trained run, similarity to a query."""


def map_options(f):
    """--out / --batch-size / --no-preview / --restart / --json / --quiet."""
    opts = [
        click.option("--out", "-o", required=True, type=click.Path(path_type=Path),
                     help="the map GeoTIFF to write (.tif); a PNG preview and, for classes, a CSV class table "
                          "are written beside it"),
        click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
                     help="chips per forward pass"),
        click.option("--no-preview", "no_preview", is_flag=True, help="do not write the PNG preview"),
        click.option("--restart", is_flag=True,
                     help="discard an unfinished map of OUT (OUT.partial) instead of resuming it"),
        click.option("--json", "as_json", is_flag=True, help="print what was written and measured as JSON"),
        click.option("--quiet", "-q", is_flag=True, help="no progress bar"),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _report(result: Any, as_json: bool) -> None:
    if as_json:
        echo_json(result.to_dict())
        return
    w, h = result.cells
    click.echo(f"wrote {result.out}: {w}x{h} cells of {result.stride} px from {result.scored} chips of "
               f"{result.chip} px ({result.skipped} without enough data; {result.nodata_cells} nodata cells) "
               f"in {result.seconds:.1f} s" + (f", resumed at window {result.resumed_at}" if result.resumed_at else ""))
    for c in result.classes:
        if c["cells"]:
            click.echo(f"  {c['class']:<24} {100 * c['share']:6.2f} %  ({c['cells']} cells)")
    if result.value_range is not None:
        click.echo(f"  similarity from {result.value_range[0]:.4f} to {result.value_range[1]:.4f}")
    for what in ("table", "probabilities", "preview"):
        if getattr(result, what):
            click.echo(f"{what}: {getattr(result, what)}")


@scenes.command("classify", cls=OneLineErrorCommand)
@click.argument("run", type=click.Path(path_type=Path))
@click.argument("scene", type=click.Path(path_type=Path))
@map_options
@click.option("--probabilities", type=click.Path(path_type=Path), default=None,
              help="also write the mean class probabilities to this GeoTIFF (float32, one band per class)")
@click.option("--device", default="cpu", show_default=True, help="torch device (cpu, cuda, cuda:1...)")
@tiling_options
def classify_cmd(run: Path, scene: Path, out: Path, batch_size: int, no_preview: bool, restart: bool, as_json: bool,
                 quiet: bool, probabilities: Path | None, device: str, **tiling: Any) -> None:
    """A land-use map of SCENE by the classifier of the run directory RUN (`landlens train run`).

    Chips of --chip pixels every --stride pixels are classified; the map has one cell per
    --stride pixels holding the most probable class of the windows covering it (--stride below
    --chip averages overlapping windows, which blurs class boundaries: 96.9 % of cells at
    --stride 64 against 68.6 % at 32 on a EuroSAT val mosaic, benchmarks/results/scene_maps.md).
    Match the scale RUN was trained at: EuroSAT images are
    64 px at 10 m (a 30 m Landsat scene: --gsd 10 --chip 64), UC Merced 256 px at 0.3 m (--gsd 0.3
    --chip 256). Writes OUT (uint8 classes, nodata 255, colour table), OUT's .csv class table and
    .png preview. An interrupted map resumes when the command is run again.

    \b
    landlens scenes classify runs/eurosat scene.tif --gsd 10 --chip 64 --bands 3,2,1 --out landuse.tif
    """
    from landlens.training.landuse import classify_scene

    result = classify_scene(run, scene, out, probabilities=probabilities, device=device, batch_size=batch_size,
                            preview=not no_preview, restart=restart, progress=not quiet, **tiling_settings(tiling))
    _report(result, as_json)


@scenes.command("similarity", cls=OneLineErrorCommand)
@click.argument("archive", type=click.Path(path_type=Path))
@click.argument("query")
@click.argument("scene", type=click.Path(path_type=Path))
@map_options
@tiling_options
def similarity_cmd(archive: Path, query: str, scene: Path, out: Path, batch_size: int, no_preview: bool,
                   restart: bool, as_json: bool, quiet: bool, **tiling: Any) -> None:
    """Where else looks like this: the similarity of every chip of SCENE to QUERY under
    ARCHIVE's extractor, as a float32 GeoTIFF OUT (nodata NaN) with a PNG preview.

    QUERY: an image file, a chip reference (SCENE.tif#window=COL,ROW,W,H), the id of an archive
    image, or @LON,LAT (the archive chip holding that place, else a chip centred on it). SCENE
    need not be in the archive. Tiling defaults to the archive's (chip, GSD, bands...);
    --stride is the map's cell size.

    \b
    landlens scenes similarity scenes.archive @120.982,14.596 other.tif --stride 128 --out similar.tif
    """
    from landlens.retrieval.archive import Archive
    from landlens.retrieval.geo import query_at, similarity_map

    arch = Archive.open(archive)
    q: Any = query
    if query.startswith("@"):
        q, what = query_at(arch, *parse_lon_lat(query[1:]))
        if not quiet:
            click.echo(f"query: {what}", err=True)
    elif query.isdigit():
        q = int(query)
    result = similarity_map(arch, q, scene, out, batch_size=batch_size, preview=not no_preview, restart=restart,
                            progress=not quiet, **tiling_settings(tiling))
    _report(result, as_json)
