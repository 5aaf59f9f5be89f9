"""``landlens data split``: write a reproducible split manifest for an image folder."""

from __future__ import annotations

from pathlib import Path

import click

from landlens.errors import LandlensError


@click.command("split")
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--ratios",
    default=None,
    help='Part ratios, e.g. "80/20", "70/10/20", "train=0.7,val=0.1,test=0.2" [default: 80/20].',
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the shuffle.")
@click.option("--dataset", "-d", default=None, help="Catalog name of the dataset (recorded in the manifest).")
@click.option("--kfold", "kfold", default=None, type=int, help="Make K stratified folds instead of a hold-out split.")
@click.option(
    "--out",
    default="split.json",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Manifest file to write.",
)
def split(
    data: Path, ratios: str | None, seed: int, dataset: str | None, kfold: int | None, out: Path
) -> None:
    """Split the image folder DATA (one sub-folder per class) into stratified parts."""
    from landlens.data.folder import scan_folder
    from landlens.data.splits import make_kfold, make_split

    if kfold is not None and ratios is not None:
        raise click.UsageError("give either --ratios or --kfold, not both")
    try:
        ds = scan_folder(data, dataset=dataset)
        name = dataset or getattr(ds, "name", None)
        if kfold is not None:
            manifest = make_kfold(ds.paths, ds.labels, ds.classes, k=kfold, seed=seed, dataset=name)
        else:
            manifest = make_split(
                ds.paths, ds.labels, ds.classes, ratios=ratios or "80/20", seed=seed, dataset=name
            )
        click.echo(manifest.format_summary())
        written = manifest.save(out)
    except LandlensError as exc:
        raise click.ClickException(str(exc)) from None
    how = f"{kfold} folds" if kfold is not None else ", ".join(
        f"{p}={r:g}" for p, r in manifest.ratios.items()
    )
    click.echo(
        f"wrote {written} ({manifest.kind}: {how}; seed {seed}; "
        f"{len(manifest)} images; digest {manifest.source_digest[:12]})"
    )
