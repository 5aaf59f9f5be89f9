"""``landlens features``: extract backbone features into a resumable feature store."""

from __future__ import annotations

from pathlib import Path

import click

from landlens.cli.common import backbone_options, command_line, echo_json, engine_options, make_backbone


@click.group("features")
def features() -> None:
    """Extract and inspect CNN features of image collections."""


def extraction_options(f):
    for opt in reversed([
        click.option("--dataset", "-d", default=None, help="catalog name (`landlens data list`), for layout and counts"),
        click.option("--batch-size", default=64, show_default=True),
        click.option("--workers", type=int, default=None, help="decoding processes [default: CPU count, max 8]"),
        click.option("--chunk-size", default=1024, show_default=True, help="images per saved chunk (resume unit)"),
        click.option("--optimize", type=click.Choice(["auto", "onnx", "jit", "compile", "none"]), default="auto",
                     show_default=True, help="inference graph: ONNX Runtime (onnx, needs landlens[onnx]), torch.compile with "
                     "freezing (compile), traced+frozen (jit), eager (none); auto: onnx where installed, else compile, for "
                     "long runs"),
        click.option("--strict", is_flag=True, help="stop at the first unreadable image instead of skipping it"),
        click.option("--max-pixels", type=int, default=None, help="refuse images with more pixels (decompression bombs)"),
        click.option("--quiet", "-q", is_flag=True, help="no progress bar"),
    ]):
        f = opt(f)
    return f


@features.command("extract")
@click.argument("data", type=click.Path(path_type=Path))
@backbone_options
@extraction_options
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="feature store folder")
@click.option("--overwrite", is_flag=True, help="replace an existing store instead of resuming it")
@engine_options
def extract_cmd(data: Path, backbone: str, weights: str, input_size, resize_mode, dataset, batch_size, workers,
                chunk_size, optimize, strict, max_pixels, quiet, out: Path, overwrite: bool, engine: str,
                address: str | None, actors: int | None) -> None:
    """Extract features of every image under DATA (one sub-folder per class) into OUT.

    An interrupted run resumes when the same command is run again (with either engine); a
    store made with a different backbone, weights, preprocessing or image list is refused.

    \b
    landlens features extract EuroSAT_RGB -b tf_efficientnet_lite0 --out eurosat.store --engine ray
    landlens features extract /shared/EuroSAT_RGB --out eurosat.store --engine ray --address auto
    """
    from landlens.data.folder import scan_folder
    from landlens.features.extract import extract_features

    ds = scan_folder(data, dataset)
    bb = make_backbone(backbone, weights, input_size, resize_mode)
    rgb = getattr(ds.spec, "rgb_bands", None) if ds.spec is not None else None
    res = extract_features(ds.root, ds.paths, ds.labels, ds.classes, bb, out, dataset_name=ds.name,
                           batch_size=batch_size, workers=workers, chunk_size=chunk_size, strict=strict,
                           overwrite=overwrite, optimize=optimize, max_pixels=max_pixels, rgb_bands=rgb,
                           progress=not quiet, extra_meta={"command": command_line()}, engine=engine,
                           address=address, actors=actors)
    fails = res.meta.get("failures", [])
    if res.n_extracted == 0:
        click.echo(f"{out}: already complete ({res.n_items} images, {bb.name}); nothing to do")
    else:
        click.echo(f"{out}: {res.n_extracted} images in {res.seconds:.1f} s "
                   f"({res.images_per_second:.1f} img/s), {bb.num_features}-d {bb.name} features")
    if fails:
        click.echo(f"skipped {len(fails)} unreadable image(s):", err=True)
        for f in fails[:20]:
            click.echo(f"  {f['path']}: {f['reason']}", err=True)
        if len(fails) > 20:
            click.echo(f"  ... and {len(fails) - 20} more (see {out}/meta.json)", err=True)


@features.command("info")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def info_cmd(store: Path, as_json: bool) -> None:
    """Summarise a feature store: extractor, weights, dataset, status."""
    from landlens.features.store import FeatureStore

    fs = FeatureStore(store)
    meta = fs.read_meta()
    if as_json:
        echo_json(meta)
        return
    ident = meta["identity"]
    ds = meta["dataset"]
    done = len(fs.completed_chunks()) if meta["status"] != "complete" else meta["n_chunks"]
    click.echo(f"store        {store} ({meta['status']}, {done}/{meta['n_chunks']} chunks)")
    click.echo(f"backbone     {ident['backbone']} ({ident['arch']}), {ident['num_features']}-d")
    w = meta.get("backbone", {}).get("weights", {})
    click.echo(f"weights      {w.get('source')}: {w.get('ref')} (digest {str(ident['weights_digest'])[:16]})")
    click.echo(f"dataset      {ds.get('name') or '-'} at {ds['root']}: {ds['n_items']} images, {len(ds['classes'])} classes")
    click.echo(f"failures     {len(meta.get('failures', []))}")
