"""``landlens retrieval index`` and ``landlens search``: FAISS search indexes over feature stores,
and search by example image with an optional gallery PNG.

:data:`index_cmd` is registered in the ``retrieval`` group and :data:`search_cmd` at the top
level of ``landlens`` (see :mod:`landlens.cli.main`).

Both commands are thin layers over :mod:`landlens.retrieval.index` and
:mod:`landlens.retrieval.gallery`. A user error (a bad path, an unreadable query image, an
index whose backbone cannot be rebuilt) is printed as one line and exits with status 2, the
same as under the ``landlens`` group, also when a command is run on its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from landlens.cli.common import OneLineErrorCommand, echo_json


KIND_HELP = ("auto (exact below 50,000 vectors, else the benchmarked large-archive index) | exact | hnsw | "
             "ivf-flat | ivf-pq | a FAISS factory string such as 'IVF4096,PQ64'")


@click.command("index", cls=OneLineErrorCommand)
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="index folder to write")
@click.option("--kind", default="auto", show_default=True, help=KIND_HELP)
@click.option("--metric", type=click.Choice(["cosine", "euclidean"]), default="cosine", show_default=True)
@click.option("--nprobe", type=int, default=None, help="IVF lists visited per query (IVF kinds)")
@click.option("--ef-search", type=int, default=None, help="HNSW search beam width (hnsw)")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the training sample and k-means")
@click.option("--overwrite", is_flag=True, help="replace an existing index folder at --out")
@click.option("--json", "as_json", is_flag=True, help="print the index description as JSON")
def index_cmd(store: Path, out: Path, kind: str, metric: str, nprobe: int | None, ef_search: int | None,
              seed: int, overwrite: bool, as_json: bool) -> None:
    """Build a search index over the features of the feature store STORE and save it to OUT.

    OUT holds index.faiss and index.json (the store's backbone, weights and preprocessing,
    the image paths, labels and classes), so `landlens search OUT IMAGE` can embed query
    images the same way.
    """
    from landlens.retrieval.index import INDEX_JSON, SearchIndexError, build_index_from_store

    if out.exists() and (out / INDEX_JSON).is_file() and not overwrite:
        raise SearchIndexError(f"{out} already holds a search index; use --overwrite to replace it")
    settings: dict[str, Any] = {"seed": seed}
    if nprobe is not None:
        settings["nprobe"] = nprobe
    if ef_search is not None:
        settings["ef_search"] = ef_search
    index = build_index_from_store(store, kind=kind, metric=metric, **settings)
    index.save(out)
    if as_json:
        echo_json(index.describe())
        return
    ident = index.meta.get("identity", {})
    click.echo(f"{out}: {index.ntotal} x {index.dim_} {ident.get('backbone', '')} features, "
               f"{index.factory_} ({index.kind_}), {metric}, built in {index.build_seconds_:.1f} s")
    skipped = index.meta.get("n_skipped_rows", 0)
    if skipped:
        click.echo(f"left out {skipped} row(s) of unreadable images", err=True)


@click.command("search", cls=OneLineErrorCommand)
@click.argument("index_dir", metavar="INDEX", type=click.Path(path_type=Path))
@click.argument("queries", metavar="QUERY...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--k", "-k", default=10, show_default=True, help="hits per query")
@click.option("--json", "as_json", is_flag=True, help="print the results as JSON")
@click.option("--gallery", type=click.Path(path_type=Path), default=None,
              help="write a PNG: each query and its hits, framed green (same class) or red")
@click.option("--query-class", "query_class", multiple=True,
              help="class of the queries (once for all, or once per query) when they are not archive images")
@click.option("--weights", default=None,
              help="reload the index's backbone weights from here (e.g. a checkpoint that moved); "
                   "they must have the recorded digest")
@click.option("--nprobe", type=int, default=None, help="override the IVF lists visited per query")
@click.option("--ef-search", type=int, default=None, help="override the HNSW search beam width")
@click.option("--matcher", type=click.Path(path_type=Path), default=None,
              help="re-rank the nearest --shortlist rows by this matching discriminator (`landlens matching train-dml`)")
@click.option("--shortlist", type=int, default=100, show_default=True, help="rows re-ranked per query with --matcher")
def search_cmd(index_dir: Path, queries: tuple[Path, ...], k: int, as_json: bool, gallery: Path | None,
               query_class: tuple[str, ...], weights: str | None, nprobe: int | None,
               ef_search: int | None, matcher: Path | None, shortlist: int) -> None:
    """Find the K archive images most similar to each QUERY image in the search index INDEX.

    The backbone the index was built with is rebuilt from its recorded weights (and checked
    against the recorded weights digest and preprocessing); every query is decoded before any
    work is done, so an unreadable query stops the command with nothing written.
    """
    from landlens.retrieval.index import (SearchIndex, SearchIndexError, archive_root, backbone_for_index,
                                          decode_queries, search_images)

    index = SearchIndex.load(index_dir)
    if nprobe is not None:
        index.nprobe = nprobe
    if ef_search is not None:
        index.ef_search = ef_search
    index.check_k(k)
    if query_class and len(query_class) not in (1, len(queries)):
        raise SearchIndexError(f"--query-class given {len(query_class)} times for {len(queries)} queries; "
                               f"give it once (all queries) or once per query")
    classes = None
    if query_class:
        classes = list(query_class) * len(queries) if len(query_class) == 1 else list(query_class)
    if gallery is not None and gallery.suffix.lower() != ".png":
        raise SearchIndexError(f"{gallery}: a gallery is written as PNG; give a file name ending in .png")
    images = decode_queries(index, [str(q) for q in queries])
    backbone = backbone_for_index(index, weights)
    if shortlist < 1:
        raise SearchIndexError(f"--shortlist {shortlist}: must be >= 1")
    results = search_images(index, backbone, [str(q) for q in queries], k, query_classes=classes, images=images,
                            matcher=matcher, shortlist=shortlist)
    if gallery is not None:
        from landlens.retrieval.gallery import write_gallery

        root = archive_root(index)
        write_gallery(results, gallery, lambda rel: (root / rel) if root is not None else Path(rel))
    if as_json:
        echo_json({"index": str(index_dir), "k": k, "metric": index.metric, "factory": index.factory_,
                   "gallery": str(gallery) if gallery is not None else None,
                   "results": [r.to_dict() for r in results]})
        return
    for res in results:
        click.echo(f"query {res.query} (class: {res.query_class or 'unknown'})")
        click.echo("| rank | distance | class | path |")
        click.echo("|---:|---:|---|---|")
        for hit, rel in zip(res.hits, res.relevant()):
            mark = "" if rel is None else (" +" if rel else " -")
            click.echo(f"| {hit.rank} | {hit.distance:.4f} | {hit.class_name or '-'}{mark} | {hit.path or hit.row} |")
        click.echo("")
    if gallery is not None:
        click.echo(f"gallery: {gallery}")


__all__ = ["index_cmd", "search_cmd"]
