"""``landlens retrieval evaluate``: retrieval metrics of one or several (fused) backbones on a dataset."""

from __future__ import annotations

import platform
import time
import warnings
from pathlib import Path

import click

from landlens.cli.common import command_line

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
                   "not with an archive, whose vectors are evaluated as they are")
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
                   "or aqe+diffusion / aqe+kreciprocal")
@click.option("--precision-at", "precision_at", default="5,10,50,100,1000", show_default=True,
              help="the k of P@k, comma-separated")
@click.option("--confusion-k", type=int, default=10, show_default=True,
              help="results per query counted in the class confusion matrix")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=Path("runs/features"), show_default=True,
              help="feature cache: extracted once per dataset, backbone and weights, then reused")
@click.option("--workers", type=int, default=None, help="decoding processes for extraction")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="results JSON file")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar")
def evaluate_cmd(data: Path, backbones: tuple[str, ...], weights: tuple[str, ...], dataset: str | None, distance: str,
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
    import numpy as np
    import torch

    from landlens import __version__
    from landlens.data.folder import scan_folder
    from landlens.data.splits import SplitManifest
    from landlens.errors import LandlensError
    from landlens.features.cache import cached_features, store_path
    from landlens.atomic import atomic_write_json
    from landlens.features.store import FeatureStore
    from landlens.models.registry import create_backbone
    from landlens.retrieval.evaluate import evaluate
    from landlens.features.fusion import align, fuse
    from landlens.retrieval.metrics import NoRelevantWarning
    from landlens.retrieval.protocols import resolve_protocol

    from landlens.retrieval.archive import Archive, is_archive

    archive = Archive.open(data) if is_archive(data) else None
    if archive is not None and backbones:
        raise LandlensError(f"{data} is an archive: its vectors are evaluated as indexed; drop --backbone")
    if archive is None and not backbones:
        raise LandlensError("give --backbone (repeat it to fuse several), or DATA an archive folder")
    if len(weights) not in (1, max(1, len(backbones))):
        raise LandlensError(f"--weights: give one value for every backbone or one per --backbone "
                            f"({len(backbones)} backbones, {len(weights)} --weights)")
    if pca is not None and pca < 1:
        raise LandlensError(f"--pca {pca}: the number of components must be >= 1")
    if confusion_k < 1:
        raise LandlensError(f"--confusion-k {confusion_k}: must be >= 1")
    ks = _parse_ks(precision_at)
    if protocol == "archive" and split_path is not None:
        raise LandlensError("--split is for --protocol split; drop it or add --protocol split")
    if protocol == "split" and split_path is None:
        raise LandlensError("--protocol split needs --split FILE (make one with `landlens data split`)")
    if protocol == "archive" and database != "archive-minus-query":
        raise LandlensError("--database test needs --protocol split")
    if (distance == "learned") != (matcher is not None):
        raise LandlensError("--distance learned and --matcher DIR go together (the discriminator to rank with)")
    if shortlist is not None and (distance != "learned" or shortlist < 1):
        raise LandlensError("--shortlist K (K >= 1) applies to --distance learned")
    if rerank is not None:
        from landlens.retrieval.rerank import make_reranker

        if distance != "cosine":
            raise LandlensError(f"--rerank ranks by cosine similarity; drop --distance {distance} or --rerank")
        make_reranker(rerank)  # a bad spec fails before any extraction
    manifest = SplitManifest.load(split_path) if split_path is not None else None
    per_backbone = list(weights) if len(weights) == len(backbones) else list(weights) * len(backbones)

    command = command_line()
    sets, records = [], []
    if archive is not None:
        fs = archive.feature_set()
        sets.append(fs)
        records.append({"backbone": archive.backbone_name, "archive": str(data), "generation": archive.generation,
                        "identity": fs.meta.get("identity"), "images": len(fs), "dim": int(fs.features.shape[1])})
        click.echo(f"features  {archive.backbone_name}: {len(fs)} labelled images x {fs.features.shape[1]} "
                   f"from archive {data} (generation {archive.generation})")
        ds_doc = {"path": str(data), "root": str(data), "dataset": fs.meta["dataset"]["name"], "images": len(fs),
                  "classes": list(fs.classes)}
    else:
        ds = scan_folder(data, dataset)
        ds_doc = {"path": str(data), "root": str(ds.root), "dataset": ds.name, "images": len(ds.paths),
                  "classes": list(ds.classes)}
    for name, w in zip(backbones, per_backbone):
        bb = create_backbone(name, w)
        path = store_path(cache_dir, ds.name, ds.paths, ds.labels, bb)
        store = FeatureStore(path)
        reused = store.exists() and store.read_meta().get("status") == "complete"
        t0 = time.perf_counter()
        fs = cached_features(data, dataset, bb, cache_dir=cache_dir, workers=workers, progress=not quiet,
                             command=command)
        secs = time.perf_counter() - t0
        click.echo(f"features  {bb.name}: {len(fs)} images x {fs.features.shape[1]} "
                   f"({'reused' if reused else f'extracted in {secs:.1f} s'}) {path}")
        meta = fs.meta or {}
        records.append({
            "backbone": bb.name,
            "weights_option": w,
            "weights": (meta.get("backbone") or {}).get("weights", bb.weights.to_dict()),
            "identity": meta.get("identity"),
            "describe": meta.get("backbone"),
            "store": str(path),
            "reused": bool(reused),
            "images": len(fs),
            "dim": int(fs.features.shape[1]),
            "unreadable": len(meta.get("failures", [])),
        })
        sets.append(fs)

    if len(sets) > 1 or pca is not None or whiten:
        aligned = align(sets)
        p = resolve_protocol(aligned[0], protocol, manifest=manifest, database=database)
        everything = p.n_database == len(aligned[0])
        features = fuse(aligned, pca_dim=pca, whiten=whiten, fit_on=None if everything else p.database_indices)
    else:
        features = sets[0]
        p = resolve_protocol(features, protocol, manifest=manifest, database=database)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoRelevantWarning)  # reported in the summary's notes
        dist: object = distance
        if distance == "learned":
            from landlens.matching.files import feature_identity
            from landlens.retrieval.distances import get_distance

            dist = get_distance("learned", model=matcher, shortlist=shortlist, features=feature_identity(features))
        result = evaluate(features, distance=dist, protocol=p, precision_at=ks, confusion_k=confusion_k,
                          rerank=rerank)
    click.echo("")
    click.echo(result.to_markdown())
    if result.rerank is not None:
        r = result.rerank
        click.echo(f"\nrerank  {r['spec']}: fitted in {r['fit_seconds']:.2f} s on {r['database_size']} database "
                   f"images; {r['query_ms']:.3f} ms/query ({r['added_query_ms']:+.3f} ms/query over cosine "
                   f"{r['cosine_query_ms']:.3f})")

    doc = {
        "command": command,
        "versions": {"landlens": __version__, "torch": torch.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "data": ds_doc,
        "backbones": records,
        "fusion": (features.meta or {}).get("fusion"),
        "split": None if manifest is None else {
            "path": str(split_path), "kind": manifest.kind, "seed": manifest.seed, "ratios": manifest.ratios,
            "source_digest": manifest.source_digest, "sizes": {k: len(v) for k, v in manifest.parts.items()}},
        **result.to_dict(),
    }
    atomic_write_json(out, doc)
    click.echo(f"\nresults: {out}")


__all__ = ["retrieval"]
