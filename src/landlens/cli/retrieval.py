"""``landlens retrieval evaluate``: retrieval metrics of one or several (fused) backbones on a dataset."""

from __future__ import annotations

from pathlib import Path

import click

from landlens.cli.common import command_line, plain_rerank

DISTANCES = ("euclidean", "cosine", "manhattan", "chi2")


@click.group("retrieval")
def retrieval() -> None:
    """Content-based image retrieval: evaluate backbones, fusions and distances."""


def _parse_ks(text: str) -> tuple[int, ...]:
    from landlens.errors import LandlensError

    try:
        ks = tuple(int(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        raise LandlensError(f"--precision-at {text!r}: expected comma-separated integers, e.g. 5,10,50,100") from None
    if not ks or any(k < 1 for k in ks):
        raise LandlensError(f"--precision-at {text!r}: every k must be >= 1")
    return ks


@retrieval.command("evaluate")
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--backbone", "-b", "backbones", multiple=True,
              help="backbone name (`landlens models list`); repeat to fuse several (L2-normalised, concatenated); "
                   "not with an archive, whose vectors are evaluated as they are [default: the best measured "
                   "unsupervised pipeline, -b fusion (four offline backbones, about 4.7x the extraction time of Lite0 "
                   "alone) with --rerank clusterlda+kreciprocal:k1=80,k2=6,lambda=0.1]")
@click.option("--plain", is_flag=True,
              help="the single-backbone baseline: EfficientNet-Lite0 (unless -b), no re-ranking (an archive: "
                   "without its recorded re-ranking)")
@click.option("--weights", "weights", multiple=True, default=("auto",), show_default=True,
              help="auto | hub[:TAG] | package[:KEY] | PATH; one for all backbones or one per --backbone")
@click.option("--dataset", "-d", default=None, help="catalog name (`landlens data list`), for layout")
@click.option("--distance", type=click.Choice([*DISTANCES, "learned"]), default="cosine", show_default=True,
              help="'learned' ranks by a trained matching discriminator's match probability (--matcher)")
@click.option("--matcher", type=click.Path(path_type=Path), default=None,
              help="discriminator run (`landlens matching train-dml`) for --distance learned")
@click.option("--shortlist", type=int, default=None,
              help="--distance learned: re-rank only each query's K Euclidean neighbours")
@click.option("--protocol", type=click.Choice(["archive", "split"]), default="archive", show_default=True,
              help="archive: every image queries all the others; split: the test part of --split queries")
@click.option("--split", "split_path", type=click.Path(path_type=Path), default=None,
              help="split manifest (`landlens data split`) for --protocol split")
@click.option("--database", type=click.Choice(["archive-minus-query", "test"]), default="archive-minus-query",
              show_default=True, help="what split queries search: the whole archive or the test part (self excluded)")
@click.option("--pca", type=int, default=None, help="project the (fused) features to N PCA components learned on the database")
@click.option("--whiten", is_flag=True, help="whiten the PCA components (PCA to all dimensions without --pca)")
@click.option("--rerank", "rerank", default=None, metavar="SPEC",
              help="unsupervised re-ranking on the database's k-NN graph (cosine base, no labels): "
                   "aqe[:n=2,alpha=3,dba=0] (alpha query expansion), "
                   "diffusion[:k=50,kq=10,gamma=3,alpha=0.99], kreciprocal[:k1=20,k2=6,lambda=0.3], "
                   "clusterlda[:kmin=24,kmax=96,steps=5,weight=1] (cluster projections of the database), "
                   "or aqe+diffusion / aqe+kreciprocal / clusterlda+kreciprocal; none [default: "
                   "clusterlda+kreciprocal when no -b is given, an "
                   "archive's own re-ranking for an archive, else none]")
@click.option("--precision-at", "precision_at", default="5,10,50,100,1000", show_default=True,
              help="the k of P@k, comma-separated")
@click.option("--confusion-k", type=int, default=10, show_default=True,
              help="results per query counted in the class confusion matrix")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=Path("runs/features"), show_default=True,
              help="feature cache: extracted once per dataset, backbone and weights, then reused")
@click.option("--workers", type=int, default=None, help="decoding processes for extraction")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="results JSON file")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar")
def evaluate_cmd(data: Path, backbones: tuple[str, ...], plain: bool, weights: tuple[str, ...], dataset: str | None,
                 distance: str,
                 matcher: Path | None, shortlist: int | None, protocol: str, split_path: Path | None, database: str, pca: int | None, whiten: bool,
                 rerank: str | None, precision_at: str, confusion_k: int, cache_dir: Path, workers: int | None,
                 out: Path, quiet: bool) -> None:
    """Evaluate retrieval on the images under DATA (one sub-folder per class), or on the labelled
    images of an archive (`landlens index build`) as it is indexed.

    Features are extracted into --cache-dir on the first run and reused afterwards. With
    several --backbone, each backbone's features are L2-normalised and concatenated (then
    optionally PCA/whitened). --rerank re-ranks every query without labels (learned on the
    database only); the result records its settings and the query time it adds. Prints a
    summary table and writes --out (JSON) with the command, versions, backbones, protocol and
    every metric.
    """
    from landlens.atomic import atomic_write_json
    from landlens.retrieval.archive import is_archive
    from landlens.retrieval.study import evaluate_sources

    rerank = plain_rerank(plain, rerank, "evaluates")
    defaulted = not backbones and not is_archive(data)
    if defaulted:
        backbones = ("tf_efficientnet_lite0",) if plain else ("fusion",)
    if rerank is None and not plain and (defaulted or not backbones):
        rerank = "auto"  # an archive's own re-ranking, or the default pipeline's

    result, doc = evaluate_sources(
        data, backbones, weights, dataset=dataset, distance=distance, matcher=matcher, shortlist=shortlist,
        protocol=protocol, split=split_path, database=database, pca=pca, whiten=whiten, rerank=rerank,
        precision_at=_parse_ks(precision_at), confusion_k=confusion_k, cache_dir=cache_dir, workers=workers,
        progress=not quiet, command=command_line(), say=click.echo)
    click.echo("")
    click.echo(result.to_markdown())
    if result.rerank is not None:
        r = result.rerank
        click.echo(f"\nrerank  {r['spec']}: fitted in {r['fit_seconds']:.2f} s on {r['database_size']} database "
                   f"images; {r['query_ms']:.3f} ms/query ({r['added_query_ms']:+.3f} ms/query over cosine "
                   f"{r['cosine_query_ms']:.3f})")
    atomic_write_json(out, doc)
    click.echo(f"\nresults: {out}")


__all__ = ["retrieval"]
