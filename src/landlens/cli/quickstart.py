"""``landlens quickstart``: verify a dataset, extract features, print a retrieval summary."""

from __future__ import annotations

import platform
from pathlib import Path

import click

from landlens.cli.common import backbone_options, command_line, make_backbone, write_json

DEFAULT_DATA = Path("../shared/data/UCMerced_LandUse")


def _default_data() -> Path | None:
    here = Path(__file__).resolve()
    for base in (Path.cwd(), *here.parents):
        cand = (base / DEFAULT_DATA).resolve()
        if cand.is_dir():
            return cand
    return None


@click.command("quickstart")
@click.argument("data", required=False, type=click.Path(path_type=Path))
@click.option("--dataset", "-d", default=None, help="catalog name; guessed as 'ucmerced' for the default data")
@backbone_options
@click.option("--distance", type=click.Choice(["cosine", "euclidean", "manhattan"]), default="cosine", show_default=True,
              help="distance of the plain row")
@click.option("--plain", is_flag=True, help="the plain single-backbone row only (skip the best pipeline)")
@click.option("--out", "-o", default=Path("runs/quickstart"), type=click.Path(path_type=Path), show_default=True)
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="feature cache shared with every other command [default: runs/features]")
@click.option("--workers", type=int, default=None)
@click.option("--quiet", "-q", is_flag=True)
def quickstart(data: Path | None, dataset: str | None, backbone: str, weights: str, input_size, resize_mode,
               distance: str, plain: bool, out: Path, cache_dir: Path | None, workers, quiet: bool) -> None:
    """Verify DATA, then evaluate archive retrieval (every image queries the rest) twice: the
    plain single backbone, and the best unsupervised pipeline landlens knows (the fused offline
    backbones, cluster projections and k-reciprocal re-ranking; its extraction took 116 s for UC
    Merced's 2,100 images on 2 cores, the plain row's 17 s), side by side with the time each took.

    DATA defaults to ../shared/data/UCMerced_LandUse when that folder exists.
    """
    from landlens import __version__
    from landlens.data.folder import scan_folder
    from landlens.data.verify import verify_dataset
    from landlens.errors import LandlensError
    from landlens.retrieval.rerank import DEFAULT_RERANK

    if data is None:
        data = _default_data()
        if data is None:
            raise LandlensError(f"no DATA given and {DEFAULT_DATA} was not found; "
                                f"pass a folder with one sub-folder per class: landlens quickstart PATH")
        dataset = dataset or "ucmerced"
    steps = 2 if plain else 3
    bb = make_backbone(backbone, weights, input_size, resize_mode)
    click.echo(f"[1/{steps}] verifying {data}")
    report = verify_dataset(data, dataset, workers=workers)
    against = f"catalog '{report.dataset}'" if report.dataset else "no catalog entry"
    click.echo(f"      {report.n_images} images in {len(report.classes)} classes, {report.n_readable} readable "
               f"({against}): {'OK' if report.ok else 'PROBLEMS'} in {report.elapsed_s:.1f} s")
    for line in report.problems()[:10]:
        click.echo(f"      {line}")
    if len(report.problems()) > 10:
        click.echo(f"      ... {len(report.problems()) - 10} more (landlens data verify {data})")
    for line in report.notes(bb.preprocessing.input_size):
        click.echo(f"      note: {line}")

    ds = scan_folder(data, dataset)
    rows = []
    click.echo(f"[2/{steps}] plain: {bb.name} features ({bb.weights.source}: {bb.weights.ref}), {distance} distance")
    rows.append(_row("plain", ds, bb, distance, None, out, cache_dir, workers, quiet))
    _echo_table(ds, data, rows)
    if not plain:
        best_weights = weights if weights in ("auto", "package", "hub", "none") else "auto"
        best = make_backbone("fusion", best_weights, None, None)
        click.echo(f"\n[3/{steps}] best unsupervised pipeline: {best.name} features, re-ranked by {DEFAULT_RERANK} "
                   f"(no labels)")
        rows.append(_row("best", ds, best, "cosine", DEFAULT_RERANK, out, cache_dir, workers, quiet))
        _echo_table(ds, data, rows)
    fs_best = rows[-1]
    cw = fs_best["classwise_map"]
    ranked = sorted(cw.items(), key=lambda kv: -kv[1])
    click.echo(f"\nbest classes ({fs_best['pipeline']}):  " + ", ".join(f"{k} {100 * v:.1f}" for k, v in ranked[:3]))
    click.echo(f"worst classes ({fs_best['pipeline']}): " + ", ".join(f"{k} {100 * v:.1f}" for k, v in ranked[-3:]))
    result = {
        "command": command_line(),
        "landlens": __version__,
        "python": platform.python_version(),
        "dataset": {"name": ds.name, "root": str(ds.root), "images": rows[0]["images"], "classes": list(ds.classes)},
        "verify": {k: v for k, v in report.to_dict().items() if k not in ("off_size", "non_image_files")},
        "notes": report.notes(bb.preprocessing.input_size),
        "rows": rows,
        # the plain row's figures at the top level, as before the best pipeline was added
        "backbone": rows[0]["backbone"], "metrics": rows[0]["metrics"], "classwise_map": rows[0]["classwise_map"],
        "protocol": rows[0]["protocol"], "extraction": rows[0]["extraction"],
    }
    write_json(out / "results.json", result)
    click.echo(f"\nresults: {out / 'results.json'}")


def _row(pipeline: str, ds, bb, distance: str, rerank: str | None, out: Path, cache_dir: Path | None, workers,
         quiet: bool) -> dict:
    """Features of ``ds`` under ``bb`` (the shared cache, or this run's folder for random weights),
    then archive retrieval: one row of the table, with what each step cost."""
    import time

    from landlens.features.cache import DEFAULT_CACHE_DIR, ensure_features
    from landlens.features.extract import extract_features
    from landlens.features.store import FeatureStore
    from landlens.retrieval.evaluate import evaluate

    if bb.weights.digest is not None:  # the feature cache every command shares
        store_dir, res = ensure_features(ds, bb, cache_dir=cache_dir or DEFAULT_CACHE_DIR, workers=workers,
                                         progress=not quiet, command=command_line())
    else:  # random weights: nothing to share, kept with this run
        store_dir = out / f"features-{bb.name}"
        rgb = getattr(ds.spec, "rgb_bands", None) if ds.spec is not None else None
        res = extract_features(ds.root, ds.paths, ds.labels, ds.classes, bb, store_dir, dataset_name=ds.name,
                               workers=workers, rgb_bands=rgb, progress=not quiet,
                               extra_meta={"command": command_line()})
    if res is not None and res.n_extracted:
        click.echo(f"      {res.n_extracted} images in {res.seconds:.1f} s ({res.images_per_second:.1f} img/s) "
                   f"-> {store_dir}")
    else:
        click.echo(f"      features already extracted; reusing {store_dir}")
    fs = FeatureStore(store_dir).load().only_valid()
    t0 = time.perf_counter()
    ev = evaluate(fs, distance=distance, protocol="archive", rerank=rerank)
    seconds = time.perf_counter() - t0
    extract_s = round(res.seconds, 2) if res is not None and res.n_extracted else 0.0
    return {"pipeline": pipeline, "backbone": bb.describe(), "backbone_name": bb.name, "distance": ev.distance,
            "rerank": rerank, "images": len(fs), "metrics": ev.metrics, "classwise_map": ev.scores.classwise_map(),
            "extraction": {"images": res.n_extracted if res else 0, "seconds": extract_s, "store": str(store_dir)},
            "evaluation_seconds": round(seconds, 3), "protocol": ev.protocol.to_dict()}


def _echo_table(ds, data: Path, rows: list[dict]) -> None:
    click.echo("")
    click.echo("| pipeline | dataset | backbone | re-ranking | images | mAP | ANMRR | P@5 | P@10 | P@50 | P@100 "
               "| extract s | evaluate s |")
    click.echo("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m = r["metrics"]
        rr = " + ".join(_METHOD_NAMES.get(part.split(":")[0], part) for part in r["rerank"].split("+")) \
            if r["rerank"] else "none"
        click.echo(f"| {r['pipeline']} | {ds.name or data.name} | {_short(r['backbone_name'])} | {rr} | {r['images']} "
                   f"| {100 * m['mAP']:.2f} | {m['ANMRR']:.4f} | "
                   + " | ".join(f"{100 * m[f'P@{k}']:.2f}" for k in (5, 10, 50, 100))
                   + f" | {r['extraction']['seconds']:.0f} | {r['evaluation_seconds']:.1f} |")


_METHOD_NAMES = {"kreciprocal": "k-reciprocal", "clusterlda": "cluster LDA", "aqe": "alpha-QE",
                 "diffusion": "diffusion"}


def _short(name: str) -> str:
    """A fusion's members, shortened for the table (``fusion:tv_a+tv_b`` -> ``fusion: a + b``)."""
    if not name.startswith("fusion:"):
        return name
    return "fusion: " + " + ".join(m.replace("tf_efficientnet_", "").replace("tv_", "") for m in name[7:].split("+"))
