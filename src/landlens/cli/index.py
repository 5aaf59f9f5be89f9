"""``landlens index build | add | remove | text | info | list``: persistent, updatable search archives.

A thin layer over :class:`landlens.retrieval.archive.Archive`; the archive folder is what
``landlens serve`` serves. Every update is atomic: an interrupted ``add`` or ``remove`` leaves
the previous archive intact and loadable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from landlens.cli.common import (OneLineErrorCommand, OneLineErrorGroup, echo_json, engine_options, max_pixels_option,
                                 plain_rerank, printable)


def _bands(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        bands = [int(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r}: band numbers separated by commas, e.g. 3,2,1") from None
    if len(bands) not in (1, 3) or min(bands) < 1:
        raise click.BadParameter(f"{value!r}: three band numbers (red, green, blue) or one (gray), counted from 1")
    return bands


def tiling_options(f):
    """--chip / --stride / --gsd / --bands / --nodata / --stretch / --resampling / --min-valid."""
    from landlens.scenes.refs import RESAMPLINGS

    opts = [
        click.option("--chip", type=click.IntRange(min=1), default=None,
                     help="scenes: chip side in pixels of the chip grid [default: 256]"),
        click.option("--stride", type=click.IntRange(min=1), default=None,
                     help="scenes: pixels between chips (less than --chip: overlapping chips) [default: --chip]"),
        click.option("--gsd", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="scenes: resample to this ground sampling distance in metres (e.g. 0.3, UC Merced's) "
                          "[default: the scene's own pixels]"),
        click.option("--bands", callback=_bands, default=None, metavar="R,G,B",
                     help="scenes: bands shown as red, green, blue, counted from 1 as GDAL does (e.g. 3,2,1 for a "
                          "blue-green-red file), or one band shown as gray [default: the RGB-interpreted bands, "
                          "else 1,2,3]"),
        click.option("--nodata", type=float, default=None,
                     help="scenes: a value marking pixels without data (where all shown bands equal it), for files "
                          "that declare none [default: the file's nodata value or mask]"),
        click.option("--stretch", type=click.Choice(["auto", "none", "percentile"]), default=None,
                     help="scenes: to 8 bits: per-band 2-98 percentile stretch computed once per scene "
                          "(auto: for samples wider than 8 bits) or the samples as they are [default: auto]"),
        click.option("--resampling", type=click.Choice(list(RESAMPLINGS)), default=None,
                     help="scenes: resampling to --gsd [default: average when coarser, bilinear when finer]"),
        click.option("--min-valid", "min_valid", type=click.FloatRange(0, 1), default=None,
                     help="scenes: skip chips with a smaller share of pixels holding data [default: 0.5]"),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


TILING_KEYS = ("chip", "stride", "gsd", "bands", "nodata", "stretch", "resampling", "min_valid")


@click.group("index", cls=OneLineErrorGroup)
def index_group() -> None:
    """Build and update a persistent search archive (FAISS index + image catalog) for `landlens serve`."""


@index_group.command("build", cls=OneLineErrorCommand)
@click.argument("data", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="archive folder to write")
@click.option("--dataset", default=None, help="catalog name of DATA (default: recognised from the folder)")
@click.option("--backbone", "-b", default=None,
              help="backbone name (`landlens models list`), any timm model name, fusion[:A+B+...], or any of these "
                   "behind c4: (features averaged over four rotations, 4x the time) "
                   "[default: fusion, i.e. EfficientNet-Lite0 + MobileNetV2 + SqueezeNet 1.1 + GeoEmbed v3 with "
                   "offline weights: 150 s to extract UC Merced's 2,100 images on 2 cores, Lite0 alone 32 s]")
@click.option("--weights", default="auto", show_default=True,
              help="auto | hub[:TAG] | package[:KEY] | PATH to a checkpoint")
@click.option("--index-factory", "index_factory", default="auto", show_default=True,
              help="auto (exact below 50,000 images; ivf-pq-disk once IVF-Flat's vectors would pass a quarter of "
                   "the RAM; else ivf-flat) | exact | hnsw | ivf-flat | ivf-pq | ivf-pq-disk (IVF-PQ with OPQ, its "
                   "lists memory-mapped from disk, re-ranked exactly) | a FAISS factory string such as 'IVF256,Flat'")
@click.option("--metric", type=click.Choice(["cosine", "euclidean"]), default="cosine", show_default=True)
@click.option("--rerank", default=None, metavar="SPEC",
              help="the archive's default re-ranking of every search: auto (cluster projections then k-reciprocal, "
                   "clusterlda+kreciprocal:k1=80,k2=6,lambda=0.1, for cosine archives of up to 50,000 images; fitted "
                   "at the first search of each generation, about 18 s for UC Merced's 2,100 fused vectors on 2 "
                   "cores, and kept in the archive's rerank/ folder for later processes), none, or a spec as in "
                   "`retrieval evaluate --rerank` [default: auto]")
@click.option("--plain", is_flag=True,
              help="the single-backbone archive: EfficientNet-Lite0 (unless --backbone), no re-ranking")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="feature cache to extract into or reuse [default: runs/features, shared by every command]")
@click.option("--workers", type=int, default=None, help="image decoding processes")
@click.option("--overwrite", is_flag=True, help="rebuild an existing archive at OUT (atomically)")
@click.option("--json", "as_json", is_flag=True, help="print the archive summary as JSON")
@engine_options
@tiling_options
def build_cmd(data: tuple[Path, ...], out: Path, dataset: str | None, backbone: str | None, weights: str,
              index_factory: str, metric: str, rerank: str | None, plain: bool, cache_dir: Path | None,
              workers: int | None, overwrite: bool, as_json: bool, engine: str, address: str | None,
              actors: int | None, **tiling: Any) -> None:
    """Index every image of the class-folder dataset DATA into the archive folder OUT, or tile
    the georeferenced scenes DATA (GeoTIFF files, any CRS) into chips and index those.

    \b
    landlens index build UCMerced_LandUse --out ucm.archive
    landlens index build a.tif b.tif --chip 256 --stride 128 --gsd 0.3 --bands 3,2,1 --out scenes.archive

    The catalog of an archive of scenes records, for every chip, its scene, pixel window and
    footprint in the scene CRS and in WGS84: `landlens search ARCHIVE --at LON,LAT --geojson
    hits.geojson` answers with places. Chips mostly without data (--min-valid) are skipped.

    By default the archive holds the best measured unsupervised pipeline (fused offline
    backbones, cluster projections and k-reciprocal re-ranking: 89.4 mAP on UC Merced against 59.0
    for EfficientNet-Lite0 alone, benchmarks/results/cluster_projection.md); --plain gives the
    single backbone.
    """
    from landlens.errors import LandlensError
    from landlens.retrieval.archive import Archive

    rerank = plain_rerank(plain, rerank, "builds an archive") or "auto"
    backbone = backbone or ("tf_efficientnet_lite0" if plain else "fusion")

    given = {k: v for k, v in tiling.items() if v is not None}
    folders = [p for p in data if p.is_dir()]
    if folders:
        if len(data) > 1:
            raise LandlensError(f"{folders[0]} is a folder: give one folder of class sub-folders, or scene files "
                                f"(GeoTIFF) to tile; add more with `landlens index add`")
        if given:
            raise LandlensError(f"--{next(iter(given)).replace('_', '-')} tiles scenes; {data[0]} is a folder of images")
        arch = Archive.build(data[0], out, dataset=dataset, backbone=backbone, weights=weights,
                             index_factory=index_factory, metric=metric, rerank=rerank, cache_dir=cache_dir,
                             workers=workers, overwrite=overwrite, engine=engine, address=address, actors=actors)
    else:
        if dataset is not None:
            raise LandlensError("--dataset names a folder of class sub-folders; scenes have no classes")
        arch = Archive.build_from_scenes(list(data), out, backbone=backbone, weights=weights,
                                         index_factory=index_factory, metric=metric, rerank=rerank,
                                         cache_dir=cache_dir,
                                         workers=workers, overwrite=overwrite, progress=not as_json,
                                         engine=engine, address=address, actors=actors, **tiling_settings(given))
    _summary(arch, as_json)


def tiling_settings(given: dict[str, Any]) -> dict[str, Any]:
    """The tiling options given (not ``None``), under the names :meth:`Archive.build_from_scenes`
    and the maps of :mod:`landlens.cli.scenes` take."""
    return {k: v for k, v in given.items() if k in TILING_KEYS and v is not None}


@index_group.command("add", cls=OneLineErrorCommand)
@click.argument("archive", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--class", "class_name", default=None, help="class of every added image")
@click.option("--class-from-folder", is_flag=True, help="each image's class is the name of its folder")
@click.option("--tile", is_flag=True,
              help="IMAGES are georeferenced scenes: tile them into chips (settings: the archive's, or the options below)")
@click.option("--json", "as_json", is_flag=True, help="print the new records as JSON")
@max_pixels_option
@tiling_options
def add_cmd(archive: Path, images: tuple[Path, ...], class_name: str | None, class_from_folder: bool, tile: bool,
            as_json: bool, max_pixels: int, **tiling: Any) -> None:
    """Add IMAGES (files, or folders searched recursively; chips of scenes as SCENE.tif#window=...)
    to ARCHIVE, or with --tile, the chips of the scenes IMAGES.

    Every image is read before anything changes: one unreadable file refuses the whole update.
    Files already indexed (same content) are skipped.
    """
    from landlens.errors import ConfigError
    from landlens.retrieval.archive import Archive
    from landlens.training.predict import expand_inputs

    if class_name is not None and class_from_folder:
        raise ConfigError("give --class or --class-from-folder, not both")
    given = {k: v for k, v in tiling.items() if v is not None}
    if given and not tile:
        raise ConfigError(f"--{next(iter(given)).replace('_', '-')} tiles scenes: add --tile")
    arch = Archive.open(archive)
    before = len(arch)
    if tile:
        if class_name is not None or class_from_folder:
            raise ConfigError("chips of scenes are added unlabelled: leave out --class and --class-from-folder")
        new = arch.add_scenes(list(images), progress=not as_json, max_pixels=max_pixels, **tiling_settings(given))
        if as_json:
            echo_json({"added": [r.to_dict() for r in new], "generation": arch.generation, "images": len(arch)})
            return
        click.echo(f"{archive}: added {len(new)} chip(s) of {len(images)} scene(s) (ids {_id_range(new)}; chips "
                   f"already indexed are skipped); {before} -> {len(arch)} images, generation {arch.generation}")
        return
    else:
        files = expand_inputs([str(p) for p in images])
        classes = [p.parent.name for p in files] if class_from_folder else [class_name] * len(files)
        new = arch.add(files, classes, progress=not as_json and len(files) > 64, max_pixels=max_pixels)
        skipped = len(files) - len(new)
    if as_json:
        echo_json({"added": [r.to_dict() for r in new], "skipped": skipped,
                   "generation": arch.generation, "images": len(arch)})
        return
    click.echo(f"{archive}: added {len(new)} image(s) (ids {_id_range(new)}), skipped {skipped} "
               f"already indexed; {before} -> {len(arch)} images, generation {arch.generation}")


@index_group.command("remove", cls=OneLineErrorCommand)
@click.argument("archive", type=click.Path(path_type=Path))
@click.argument("ids", nargs=-1, required=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def remove_cmd(archive: Path, ids: tuple[int, ...], as_json: bool) -> None:
    """Remove the images with these IDS from ARCHIVE (`landlens index list` shows ids)."""
    from landlens.retrieval.archive import Archive

    arch = Archive.open(archive)
    n = arch.remove(ids)
    if as_json:
        echo_json({"removed": n, "generation": arch.generation, "images": len(arch)})
        return
    click.echo(f"{archive}: removed {n} image(s); {len(arch)} images, generation {arch.generation}")


@index_group.command("compact", cls=OneLineErrorCommand)
@click.argument("archive", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print the archive summary as JSON")
def compact_cmd(archive: Path, as_json: bool) -> None:
    """Merge the segments of ARCHIVE into one without its removed images, the index rebuilt with
    the archive's settings. Updates write segments of their own and merge them as they go; this
    takes time and disk in proportion to the whole archive."""
    from landlens.retrieval.archive import Archive

    arch = Archive.open(archive)
    before = arch.info()
    changed = arch.compact()
    if as_json:
        echo_json({"compacted": changed, "segments_before": before["segments"], "deleted_before": before["deleted"],
                   "generation": arch.generation, "images": len(arch)})
        return
    click.echo(f"{archive}: " + (f"{before['segments']} segment(s) and {before['deleted']} removed image(s) "
                                 f"merged into one segment; {len(arch)} images, generation {arch.generation}"
                                 if changed else "already one segment without removed images; nothing to do"))


@index_group.command("text", cls=OneLineErrorCommand)
@click.argument("archive", type=click.Path(path_type=Path))
@click.argument("alignment", required=False, type=click.Path(path_type=Path))
@click.option("--detach", is_flag=True, help="remove the attached alignment (text queries are then refused)")
@click.option("--json", "as_json", is_flag=True, help="print the archive summary as JSON")
def text_cmd(archive: Path, alignment: Path | None, detach: bool, as_json: bool) -> None:
    """Let ARCHIVE answer text queries with ALIGNMENT (`landlens retrieval align`, trained on the
    archive's backbone): its image vectors are projected once and kept with every update."""
    from landlens.errors import LandlensError
    from landlens.retrieval.archive import Archive

    if (alignment is None) == (not detach):
        raise LandlensError("give an ALIGNMENT file to attach, or --detach")
    arch = Archive.open(archive)
    arch.enable_text(None if detach else alignment)
    _summary(arch, as_json)


@index_group.command("info", cls=OneLineErrorCommand)
@click.argument("archive", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
def info_cmd(archive: Path, as_json: bool) -> None:
    """Summarise ARCHIVE: images, classes, extractor, index and disk use."""
    from landlens.retrieval.archive import Archive

    _summary(Archive.open(archive), as_json)


@index_group.command("list", cls=OneLineErrorCommand)
@click.argument("archive", type=click.Path(path_type=Path))
@click.option("--class", "class_name", default=None, help="only images of this class")
@click.option("--json", "as_json", is_flag=True, help="print the records as JSON")
def list_cmd(archive: Path, class_name: str | None, as_json: bool) -> None:
    """List the images of ARCHIVE: id, class, size, file."""
    from landlens.retrieval.archive import Archive

    recs = [r for r in Archive.open(archive).records() if class_name is None or r.class_name == class_name]
    if as_json:
        echo_json([{**r.to_dict(), "path": r.path} for r in recs])
        return
    for r in recs:
        click.echo(f"{r.id}\t{printable(r.class_name or '-')}\t{r.width}x{r.height}\t{printable(r.path)}")


def _id_range(records: list) -> str:
    if not records:
        return "-"
    ids = [r.id for r in records]
    return f"{ids[0]}" if len(ids) == 1 else f"{ids[0]}..{ids[-1]}"


def _summary(arch, as_json: bool) -> None:
    info = arch.info()
    if as_json:
        echo_json(info)
        return
    idx = info["index"]
    extra = f" (+{info['unlabelled']} unlabelled)" if info["unlabelled"] else ""
    click.echo(f"{info['directory']}: {info['images']} images in {len(info['classes'])} classes{extra}, "
               f"generation {info['generation']}")
    click.echo(f"  features: {info['backbone']} ({(info['weights'] or {}).get('source')}: "
               f"{(info['weights'] or {}).get('ref')}), {idx['dim']}-d")
    click.echo(f"  index: {idx['factory']} ({idx['kind']}), {idx['metric']}, {idx['bytes'] / 1e6:.1f} MB; "
               f"generation on disk {info['generation_bytes'] / 1e6:.1f} MB in {info['segments']} segment(s)"
               + (f", {info['deleted']} removed image(s) awaiting compaction" if info["deleted"] else ""))
    click.echo(f"  re-ranking: {info['rerank'] or 'none'}"
               + (" (every search; `landlens search --plain` for one without)" if info["rerank"] else ""))
    if info.get("chips"):
        t = info.get("tiling") or {}
        settings = ", ".join(f"{k} {v}" for k, v in t.items() if v is not None and k in ("chip", "stride", "gsd", "bands"))
        click.echo(f"  scenes: {info['chips']} chips of {len(info['scenes'])} scene(s)"
                   + (f" ({settings})" if settings else "") + ": "
                   + ", ".join(Path(s).name for s in info["scenes"][:5]) + (" ..." if len(info["scenes"]) > 5 else ""))
    text = info.get("text")
    if text:
        click.echo(f"  words: {text['text_tower']} aligned to {text['image_tower']} ({text['head']} heads, "
                   f"{text['dim']}-d shared space)")
    click.echo(f"  data: {info['data_root']}; updated {info['updated']}")


__all__ = ["index_group"]
