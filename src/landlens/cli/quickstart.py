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
@click.option("--distance", type=click.Choice(["cosine", "euclidean", "manhattan"]), default="cosine", show_default=True)
@click.option("--out", "-o", default=Path("runs/quickstart"), type=click.Path(path_type=Path), show_default=True)
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="feature cache shared with every other command [default: runs/features]")
@click.option("--workers", type=int, default=None)
@click.option("--quiet", "-q", is_flag=True)
def quickstart(data: Path | None, dataset: str | None, backbone: str, weights: str, input_size, resize_mode,
               distance: str, out: Path, cache_dir: Path | None, workers, quiet: bool) -> None:
    """Verify DATA, extract features and evaluate archive retrieval (every image queries the rest).

    DATA defaults to ../shared/data/UCMerced_LandUse when that folder exists.
    """
    from landlens import __version__
    from landlens.data.folder import scan_folder
    from landlens.data.verify import verify_dataset
    from landlens.errors import LandlensError
    from landlens.features.cache import DEFAULT_CACHE_DIR, ensure_features
    from landlens.features.extract import extract_features
    from landlens.features.store import FeatureStore
    from landlens.retrieval.evaluate import evaluate

    if data is None:
        data = _default_data()
        if data is None:
            raise LandlensError(f"no DATA given and {DEFAULT_DATA} was not found; "
                                f"pass a folder with one sub-folder per class: landlens quickstart PATH")
        dataset = dataset or "ucmerced"
    click.echo(f"[1/3] verifying {data}")
    report = verify_dataset(data, dataset, workers=workers)
    against = f"catalog '{report.dataset}'" if report.dataset else "no catalog entry"
    click.echo(f"      {report.n_images} images in {len(report.classes)} classes, {report.n_readable} readable "
               f"({against}): {'OK' if report.ok else 'PROBLEMS'} in {report.elapsed_s:.1f} s")
    for line in report.problems()[:10]:
        click.echo(f"      {line}")
    if len(report.problems()) > 10:
        click.echo(f"      ... {len(report.problems()) - 10} more (landlens data verify {data})")

    ds = scan_folder(data, dataset)
    bb = make_backbone(backbone, weights, input_size, resize_mode)
    click.echo(f"[2/3] extracting {bb.name} features ({bb.weights.source}: {bb.weights.ref})")
    if bb.weights.digest is not None:  # the feature cache every command shares
        store_dir, res = ensure_features(ds, bb, cache_dir=cache_dir or DEFAULT_CACHE_DIR, workers=workers,
                                         progress=not quiet, command=command_line())
    else:  # random weights: nothing to share, kept with this run
        store_dir = out / f"features-{bb.name}"
        rgb = getattr(ds.spec, "rgb_bands", None) if ds.spec is not None else None
        res = extract_features(ds.root, ds.paths, ds.labels, ds.classes, bb, store_dir, dataset_name=ds.name,
                               workers=workers, rgb_bands=rgb, progress=not quiet,
                               extra_meta={"command": command_line()})
    click.echo(f"      -> {store_dir}")
    if res is not None and res.n_extracted:
        click.echo(f"      {res.n_extracted} images in {res.seconds:.1f} s ({res.images_per_second:.1f} img/s)")
    else:
        click.echo("      features already extracted; reusing them")

    click.echo(f"[3/3] archive retrieval, {distance} distance")
    fs = FeatureStore(store_dir).load().only_valid()
    ev = evaluate(fs, distance=distance, protocol="archive")
    summ = ev.metrics
    cw = ev.scores.classwise_map()
    click.echo("")
    click.echo("| dataset | backbone | images | mAP | ANMRR | P@5 | P@10 | P@50 | P@100 |")
    click.echo("|---|---|---|---|---|---|---|---|---|")
    click.echo(f"| {ds.name or data.name} | {bb.name} | {len(fs)} | {100 * summ['mAP']:.2f} | {summ['ANMRR']:.4f} | "
               + " | ".join(f"{100 * summ[f'P@{k}']:.2f}" for k in (5, 10, 50, 100)) + " |")
    best = sorted(cw.items(), key=lambda kv: -kv[1])
    click.echo("\nbest classes:  " + ", ".join(f"{k} {100 * v:.1f}" for k, v in best[:3]))
    click.echo("worst classes: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in best[-3:]))
    result = {
        "command": command_line(),
        "landlens": __version__,
        "python": platform.python_version(),
        "protocol": ev.protocol.to_dict(),
        "distance": ev.distance,
        "dataset": {"name": ds.name, "root": str(ds.root), "images": len(fs), "classes": fs.classes},
        "verify": {k: v for k, v in report.to_dict().items() if k not in ("off_size", "non_image_files")},
        "backbone": bb.describe(),
        "extraction": {"images": res.n_extracted if res else 0, "seconds": round(res.seconds, 2) if res else 0.0,
                       "store": str(store_dir)},
        "metrics": summ,
        "classwise_map": cw,
        "evaluation_seconds": round(ev.seconds, 3),
    }
    write_json(out / "results.json", result)
    click.echo(f"\nresults: {out / 'results.json'}")
