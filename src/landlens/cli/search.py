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

from landlens.cli.common import OneLineErrorCommand, echo_json, max_pixels_option


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
@click.option("--relevant", type=int, multiple=True, metavar="ROW",
              help="relevance feedback: an index row (the 'row' of a hit) marked relevant; repeatable")
@click.option("--irrelevant", type=int, multiple=True, metavar="ROW",
              help="relevance feedback: an index row marked not relevant; repeatable")
@click.option("--rocchio", "rocchio_weights", type=float, nargs=3, default=(1.0, 0.75, 0.15), show_default=True,
              metavar="A B C", help="Rocchio weights of the query, the relevant and the non-relevant centroid")
@click.option("--rerank", "rerank", default=None, metavar="SPEC",
              help="unsupervised re-ranking of the whole archive, fitted on the index's features (no labels): "
                   "aqe, diffusion, kreciprocal, aqe+diffusion, ... with settings as in `retrieval evaluate --rerank`")
@max_pixels_option
def search_cmd(index_dir: Path, queries: tuple[Path, ...], k: int, as_json: bool, gallery: Path | None,
               query_class: tuple[str, ...], weights: str | None, nprobe: int | None,
               ef_search: int | None, matcher: Path | None, shortlist: int, relevant: tuple[int, ...],
               irrelevant: tuple[int, ...], rocchio_weights: tuple[float, float, float], rerank: str | None,
               max_pixels: int) -> None:
    """Find the K archive images most similar to each QUERY image in the search index INDEX.

    The backbone the index was built with is rebuilt from its recorded weights (and checked
    against the recorded weights digest and preprocessing); every query is decoded before any
    work is done, so an unreadable query stops the command with nothing written.

    Relevance feedback: --relevant ROW and --irrelevant ROW (index rows, as printed in the
    'row' of a hit; repeat them, and keep them across rounds) refine the query embedding by
    Rocchio's formula q' = A q + B mean(relevant) - C mean(not relevant) on L2-normalised
    vectors (Manning, Raghavan & Schutze 2008, eq. 9.3; default A B C = 1 0.75 0.15), reading
    the marked rows' vectors from the index's feature store, and print the refined hits.

    --rerank SPEC re-ranks the whole archive without labels (alpha query expansion, diffusion,
    k-reciprocal; see `landlens retrieval evaluate --help`), fitted on the index's feature
    store each time; it combines with relevance feedback (the refined query is re-ranked).
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
    if rerank is not None:
        from landlens.retrieval.rerank import make_reranker

        if matcher is not None:
            raise SearchIndexError("--rerank and --matcher cannot be combined; choose one")
        make_reranker(rerank)  # a bad spec fails before any work
    feedback = bool(relevant or irrelevant)
    if feedback:
        if len(queries) != 1:
            raise SearchIndexError(f"--relevant/--irrelevant refine one query; {len(queries)} QUERY images given")
        if matcher is not None:
            raise SearchIndexError("--relevant/--irrelevant cannot be combined with --matcher")
        both = sorted(set(relevant) & set(irrelevant))
        if both:
            raise SearchIndexError(f"row {both[0]} is given both as --relevant and as --irrelevant")
    images = decode_queries(index, [str(q) for q in queries], max_pixels=max_pixels)
    backbone = backbone_for_index(index, weights)
    if shortlist < 1:
        raise SearchIndexError(f"--shortlist {shortlist}: must be >= 1")
    feedback_doc = None
    if feedback:
        results = [_feedback_search(index, backbone, queries[0], images[0], k, classes[0] if classes else None,
                                    list(dict.fromkeys(relevant)), list(dict.fromkeys(irrelevant)),
                                    rocchio_weights, rerank)]
        a, b, c = rocchio_weights
        feedback_doc = {"method": "rocchio", "weights": {"a": a, "b": b, "c": c},
                        "relevant": list(dict.fromkeys(relevant)), "irrelevant": list(dict.fromkeys(irrelevant))}
    else:
        results = search_images(index, backbone, [str(q) for q in queries], k, query_classes=classes,
                                images=images, matcher=matcher, shortlist=shortlist, rerank=rerank)
    if gallery is not None:
        from landlens.retrieval.gallery import write_gallery

        root = archive_root(index)
        write_gallery(results, gallery, lambda rel: (root / rel) if root is not None else Path(rel))
    if as_json:
        echo_json({"index": str(index_dir), "k": k, "metric": index.metric, "factory": index.factory_,
                   "rerank": rerank,
                   "gallery": str(gallery) if gallery is not None else None,
                   **({"feedback": feedback_doc} if feedback_doc is not None else {}),
                   "results": [r.to_dict() for r in results]})
        return
    for res in results:
        click.echo(f"query {res.query} (class: {res.query_class or 'unknown'})")
        if feedback_doc is not None:
            w = feedback_doc["weights"]
            click.echo(f"refined by Rocchio (a={w['a']:g}, b={w['b']:g}, c={w['c']:g}) with "
                       f"{len(feedback_doc['relevant'])} relevant and {len(feedback_doc['irrelevant'])} "
                       f"non-relevant row(s)")
        click.echo("| rank | distance | class | path | row |")
        click.echo("|---:|---:|---|---|---:|")
        for hit, rel in zip(res.hits, res.relevant()):
            mark = "" if rel is None else (" +" if rel else " -")
            click.echo(f"| {hit.rank} | {hit.distance:.4f} | {hit.class_name or '-'}{mark} | {hit.path or hit.row} | "
                       f"{hit.row} |")
        click.echo("")
    if gallery is not None:
        click.echo(f"gallery: {gallery}")


def _feedback_search(index: Any, backbone: Any, query: Path, image: Any, k: int, query_class: str | None,
                     relevant: list[int], irrelevant: list[int], weights: tuple[float, float, float],
                     rerank: str | None = None) -> Any:
    """The hits of one query image after Rocchio relevance feedback on index rows."""
    import numpy as np

    from landlens.retrieval.feedback import index_row_vectors, rocchio
    from landlens.retrieval.index import (QueryResult, SearchIndexError, archive_row, check_backbone, embed_images,
                                          index_hits, row_class, search_features)

    check_backbone(index, backbone)
    known = set(index.classes_ or [])
    if query_class is not None and query_class not in known:
        raise SearchIndexError(f"query class {query_class!r} is not a class of this index "
                               f"({', '.join(sorted(known)) or 'it has no classes'})")
    q = embed_images(backbone, [image])[0]
    rel = index_row_vectors(index, relevant, "--relevant")
    irr = index_row_vectors(index, irrelevant, "--irrelevant")
    scale = 1.0 if index.metric == "cosine" else (float(np.linalg.norm(q)) or 1.0)
    a, b, c = weights
    refined = rocchio(q, rel, irr, a=a, b=b, c=c, scale=scale)
    # the refined vector is no archive row: a re-ranker treats it as an outside query
    dist, rows = search_features(index, refined[None], k, rerank=rerank)
    row = archive_row(index, query)
    if query_class is None and row is not None:
        query_class = row_class(index, row)
    return QueryResult(str(query), query_class, index_hits(index, dist[0], rows[0]), row)


__all__ = ["index_cmd", "search_cmd"]
