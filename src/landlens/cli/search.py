"""``landlens retrieval index`` and ``landlens search``: archives over feature stores, and
search by example image with an optional gallery PNG.

:data:`index_cmd` is registered in the ``retrieval`` group and :data:`search_cmd` at the top
level of ``landlens`` (see :mod:`landlens.cli.main`). Both are thin shells over
:class:`landlens.retrieval.archive.Archive` (:meth:`~landlens.retrieval.archive.Archive.from_store`,
:func:`~landlens.retrieval.search.search_files`) and :mod:`landlens.retrieval.gallery`. A user
error is printed as one line and exits with status 2, also when a command is run on its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from landlens.cli.common import OneLineErrorCommand, echo_json, max_pixels_option, parse_lon_lat, plain_rerank

KIND_HELP = ("auto (exact below 50,000 vectors, ivf-pq-disk once IVF-Flat's vectors would pass a quarter of the "
             "RAM, else the benchmarked ivf-flat) | exact | hnsw | ivf-flat | ivf-pq | ivf-pq-disk | a FAISS factory "
             "string such as 'IVF4096,PQ64'")

OLD_INDEX = ("{path} is a search index of landlens 0.1 (index.json, rows instead of ids); search works on "
             "archives now: rebuild it with `landlens retrieval index STORE --out {path}.archive` or "
             "`landlens index build DATA --out {path}.archive`")


@click.command("index", cls=OneLineErrorCommand)
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="archive folder to write")
@click.option("--kind", default="auto", show_default=True, help=KIND_HELP)
@click.option("--metric", type=click.Choice(["cosine", "euclidean"]), default="cosine", show_default=True)
@click.option("--nprobe", type=int, default=None, help="IVF lists visited per query (IVF kinds)")
@click.option("--ef-search", type=int, default=None, help="HNSW search beam width (hnsw)")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the training sample and k-means")
@click.option("--rerank", default="none", show_default=True, metavar="SPEC",
              help="the archive's default re-ranking of every search: none, auto (what `index build` records: "
                   "cluster projections then k-reciprocal for cosine archives of up to 50,000 images) or a spec as "
                   "in `retrieval evaluate`")
@click.option("--overwrite", is_flag=True, help="replace an existing archive at --out (atomically)")
@click.option("--json", "as_json", is_flag=True, help="print the archive summary as JSON")
def index_cmd(store: Path, out: Path, kind: str, metric: str, nprobe: int | None, ef_search: int | None,
              seed: int, rerank: str, overwrite: bool, as_json: bool) -> None:
    """Build a search archive over the features of the feature store STORE, in the folder OUT.

    The same archive as `landlens index build` makes from an image folder: it records the
    store's backbone, weights and preprocessing, so `landlens search OUT IMAGE` and `landlens
    serve OUT` embed query images the same way. The store's vectors are searched as they are
    unless --rerank records a default re-ranking.
    """
    from landlens.retrieval.archive import Archive

    settings: dict[str, Any] = {"seed": seed}
    if nprobe is not None:
        settings["nprobe"] = nprobe
    if ef_search is not None:
        settings["ef_search"] = ef_search
    arch = Archive.from_store(store, out, index_factory=kind, metric=metric, rerank=rerank, overwrite=overwrite,
                              **settings)
    if as_json:
        echo_json(arch.info())
        return
    index = arch.index
    click.echo(f"{out}: {index.ntotal} x {index.dim_} {arch.backbone_name} features, "
               f"{index.factory_} ({index.kind_}), {metric}, built in {index.build_seconds_:.1f} s")
    skipped = index.meta.get("n_skipped_rows", 0)
    if skipped:
        click.echo(f"left out {skipped} row(s) of unreadable images", err=True)


def open_archive(path: Path) -> Any:
    """The archive at ``path``; a landlens 0.1 index folder is refused with what to do instead."""
    from landlens.retrieval.archive import Archive, ArchiveError

    if (path / "index.json").is_file() and not (path / "CURRENT").is_file():
        raise ArchiveError(OLD_INDEX.format(path=path))
    return Archive.open(path)


def _lon_lat(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[tuple[float, float], ...]:
    return tuple(parse_lon_lat(value) for value in values)


@click.command("search", cls=OneLineErrorCommand)
@click.argument("archive_dir", metavar="ARCHIVE", type=click.Path(path_type=Path))
@click.argument("queries", metavar="[QUERY]...", nargs=-1, type=click.Path(path_type=Path))
@click.option("--text", "-t", "text", default=None, metavar="SENTENCE",
              help="search by words (the archive needs an alignment: `landlens index text`); with QUERY "
                   "images, each image combined with the sentence ('this image, but with water')")
@click.option("--image-weight", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="--text with QUERY images: the image's share of the combined query")
@click.option("--k", "-k", default=10, show_default=True, help="hits per query")
@click.option("--json", "as_json", is_flag=True, help="print the results as JSON")
@click.option("--gallery", type=click.Path(path_type=Path), default=None,
              help="write a PNG: each query and its hits, framed green (same class) or red")
@click.option("--class", "class_name", default=None, help="only hits of this class")
@click.option("--query-class", "query_class", multiple=True,
              help="class of the queries (once for all, or once per query) when they are not archive images")
@click.option("--weights", default=None,
              help="reload the archive's backbone weights from here (e.g. a checkpoint that moved); "
                   "they must have the recorded digest")
@click.option("--nprobe", type=int, default=None, help="override the IVF lists visited per query")
@click.option("--ef-search", type=int, default=None, help="override the HNSW search beam width")
@click.option("--matcher", type=click.Path(path_type=Path), default=None,
              help="re-rank the nearest --shortlist images by this matching discriminator (`landlens matching train-dml`)")
@click.option("--shortlist", type=int, default=100, show_default=True, help="images re-ranked per query with --matcher")
@click.option("--relevant", type=int, multiple=True, metavar="ID",
              help="relevance feedback: an archive image id (the 'id' of a hit) marked relevant; repeatable")
@click.option("--irrelevant", type=int, multiple=True, metavar="ID",
              help="relevance feedback: an archive image id marked not relevant; repeatable")
@click.option("--rocchio", "rocchio_weights", type=float, nargs=3, default=(1.0, 0.75, 0.15), show_default=True,
              metavar="A B C", help="Rocchio weights of the query, the relevant and the non-relevant centroid")
@click.option("--rerank", "rerank", default=None, metavar="SPEC",
              help="unsupervised re-ranking of the whole archive, fitted on its vectors (no labels): "
                   "aqe, diffusion, kreciprocal, aqe+diffusion, ... with settings as in `retrieval evaluate --rerank`, "
                   "or none [default: the archive's own, set by `index build --rerank`; `index info` shows it]")
@click.option("--plain", is_flag=True, help="no re-ranking: the archive index's nearest neighbours (same as --rerank none)")
@click.option("--at", "places", multiple=True, callback=_lon_lat, metavar="LON,LAT",
              help="query with the place at this WGS84 longitude, latitude (repeatable): the archive's chip "
                   "containing it, or one cut centred on it from the archive scene holding it (write "
                   "--at=-47.9,-15.8 for a negative longitude)")
@click.option("--scene", type=click.Path(path_type=Path), default=None,
              help="--at: cut the query centred on the place from this scene (read with the archive's tiling)")
@click.option("--cut", is_flag=True, help="--at: cut a chip centred on the place rather than take the archive's chip")
@click.option("--geojson", type=click.Path(path_type=Path), default=None,
              help="write the hits as GeoJSON (RFC 7946 FeatureCollection: each hit's chip footprint as a WGS84 "
                   "polygon, properties rank, score, id, scene, window); hits that are not chips of scenes "
                   "have no geometry")
@max_pixels_option
def search_cmd(archive_dir: Path, queries: tuple[Path, ...], k: int, as_json: bool, gallery: Path | None,
               class_name: str | None, query_class: tuple[str, ...], weights: str | None, nprobe: int | None,
               ef_search: int | None, matcher: Path | None, shortlist: int, relevant: tuple[int, ...],
               irrelevant: tuple[int, ...], rocchio_weights: tuple[float, float, float], rerank: str | None, plain: bool,
               max_pixels: int, text: str | None, image_weight: float, places: tuple[tuple[float, float], ...],
               scene: Path | None, cut: bool, geojson: Path | None) -> None:
    """Find the K images of ARCHIVE (`landlens index build`) most similar to each QUERY image,
    or to a sentence (--text "harbor with many boats"), or to each QUERY image with a sentence.

    The backbone the archive was built with is rebuilt from its recorded weights (and checked
    against the recorded weights digest and preprocessing); every query is decoded before any
    work is done, so an unreadable query stops the command with nothing written. A query with
    the content of an archive image is that image: it is found first and its class is known.

    Relevance feedback: --relevant ID and --irrelevant ID (archive ids, as printed in the 'id'
    column of a hit; repeat them, and keep them across rounds) refine the query embedding by
    Rocchio's formula q' = A q + B mean(relevant) - C mean(not relevant) on L2-normalised
    vectors (Manning, Raghavan & Schutze 2008, eq. 9.3; default A B C = 1 0.75 0.15).

    --rerank SPEC re-ranks the whole archive without labels (alpha query expansion, cluster
    projections, diffusion, k-reciprocal; see `landlens retrieval evaluate --help`); it combines with relevance feedback.

    --text ranks the archive by cosine in the space of the alignment attached with `landlens
    index text` (one text encoding and one scan of the projected vectors per query); relevance
    feedback refines it in that space; --rerank and --matcher do not apply to it.

    Archives of scenes (`landlens index build SCENE.tif ...`): a QUERY may be a chip,
    SCENE.tif#window=COL,ROW,W,H; --at LON,LAT queries with a place; --geojson writes where
    the hits lie.
    """
    from landlens.retrieval.archive import ArchiveError
    from landlens.retrieval.rerank import make_reranker
    from landlens.retrieval.search import NO_RERANK, search_files

    rerank = plain_rerank(plain, rerank, "searches")
    if (scene is not None or cut) and not places:
        raise ArchiveError("--scene and --cut say where an --at query comes from: give --at LON,LAT")
    if not queries and text is None and not places:
        raise ArchiveError("give QUERY images, --at LON,LAT, --text SENTENCE, or a combination")
    if geojson is not None and geojson.suffix.lower() not in (".geojson", ".json"):
        raise ArchiveError(f"{geojson}: GeoJSON is written to a file ending in .geojson or .json")
    if text is not None and (rerank not in (None, NO_RERANK) or matcher is not None):
        raise ArchiveError("--rerank and --matcher re-rank image queries; they do not apply to --text")
    arch = open_archive(archive_dir)
    arch.set_search_params(nprobe=nprobe, ef_search=ef_search)
    where: list[tuple[float, float] | None] = [None] * len(queries)
    described: dict[int, str] = {}
    if places:
        from landlens.retrieval.geo import query_at

        found = []
        for lon, lat in places:
            ref, what = query_at(arch, lon, lat, scene=scene, cut=cut)
            described[len(queries) + len(found)] = f"at {lon},{lat}: {what}"
            found.append(Path(ref))
        queries = (*queries, *found)
        where += list(places)
    if query_class and len(query_class) not in (1, len(queries)):
        raise ArchiveError(f"--query-class given {len(query_class)} times for {len(queries)} queries; "
                           f"give it once (all queries) or once per query")
    classes = None
    if query_class:
        classes = list(query_class) * len(queries) if len(query_class) == 1 else list(query_class)
    if gallery is not None and gallery.suffix.lower() != ".png":
        raise ArchiveError(f"{gallery}: a gallery is written as PNG; give a file name ending in .png")
    if rerank not in (None, NO_RERANK):
        make_reranker(rerank)  # a bad spec fails before any work
    if matcher is not None and (relevant or irrelevant):
        raise ArchiveError("--relevant/--irrelevant cannot be combined with --matcher")
    if weights is not None:
        arch.use_weights(weights)
    relevant_ids, irrelevant_ids = list(dict.fromkeys(relevant)), list(dict.fromkeys(irrelevant))
    if text is not None:
        from landlens.retrieval.textsearch import search_text_files

        results = search_text_files(arch, text, [str(q) for q in queries], k, image_weight=image_weight,
                                    class_name=class_name, relevant=relevant_ids, irrelevant=irrelevant_ids,
                                    weights=rocchio_weights, max_pixels=max_pixels)
    else:
        results = search_files(arch, [str(q) for q in queries], k, query_classes=classes, class_name=class_name,
                               rerank=rerank, matcher=matcher, shortlist=shortlist, relevant=relevant_ids,
                               irrelevant=irrelevant_ids, weights=rocchio_weights, max_pixels=max_pixels)
    feedback_doc = None
    if relevant_ids or irrelevant_ids:
        a, b, c = rocchio_weights
        feedback_doc = {"method": "rocchio", "weights": {"a": a, "b": b, "c": c},
                        "relevant": relevant_ids, "irrelevant": irrelevant_ids}
    if gallery is not None:
        from landlens.retrieval.gallery import write_gallery

        write_gallery(results, gallery)
    if geojson is not None:
        from landlens.retrieval.geo import results_geojson
        from landlens.scenes.geojson import write_geojson

        write_geojson(geojson, results_geojson(arch, results, places=where if len(where) == len(results) else None))
    if as_json:
        echo_json({"archive": str(archive_dir), "k": k, "metric": "cosine (words)" if text else arch.metric,
                   **({"at": [list(p) if p else None for p in where]} if places else {}),
                   "geojson": str(geojson) if geojson is not None else None,
                   "factory": arch.factory, **({"text": text, "image_weight": image_weight} if text else {}),
                   "rerank": arch.rerank_for(rerank) if text is None and matcher is None else None,
                   "matcher": str(matcher) if matcher is not None else None,
                   "gallery": str(gallery) if gallery is not None else None,
                   **({"feedback": feedback_doc} if feedback_doc is not None else {}),
                   "results": [r.to_dict() for r in results]})
        return
    for qi, res in enumerate(results):
        if text is not None and not queries:
            click.echo(f"query: {text!r}")
        elif text is not None:
            click.echo(f"query {res.query} + {text!r} (image weight {image_weight:g})")
        elif qi in described:
            click.echo(f"query {described[qi]}")
        else:
            click.echo(f"query {res.query} (class: {res.query_class or 'unknown'})")
        if feedback_doc is not None:
            w = feedback_doc["weights"]
            click.echo(f"refined by Rocchio (a={w['a']:g}, b={w['b']:g}, c={w['c']:g}) with "
                       f"{len(relevant_ids)} relevant and {len(irrelevant_ids)} non-relevant image(s)")
        click.echo("| rank | distance | class | name | id |")
        click.echo("|---:|---:|---|---|---:|")
        for hit, rel in zip(res.hits, res.relevant()):
            mark = "" if rel is None else (" +" if rel else " -")
            click.echo(f"| {hit.rank} | {hit.distance:.4f} | {hit.record.class_name or '-'}{mark} | "
                       f"{hit.record.name} | {hit.record.id} |")
        click.echo("")
    if gallery is not None:
        click.echo(f"gallery: {gallery}")
    if geojson is not None:
        click.echo(f"geojson: {geojson}")


__all__ = ["index_cmd", "open_archive", "search_cmd"]
