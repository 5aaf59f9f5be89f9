"""``landlens retrieval align`` and ``landlens retrieval evaluate-text``: search by words.

Thin shells over :func:`landlens.retrieval.textstudy.align_text` (train an image-text alignment on a
captions file, offline) and :func:`~landlens.retrieval.textstudy.evaluate_text` /
:func:`~landlens.retrieval.textstudy.evaluate_zero_shot` (R@k on a captions split, zero-shot
accuracy on a labelled folder). Registered in the ``retrieval`` group (:mod:`landlens.cli.main`).
"""

from __future__ import annotations

from pathlib import Path

import click

from landlens.cli.common import OneLineErrorCommand, command_line, echo_json


def _pct(d: dict, key: str) -> str:
    return f"{100 * d[key]:.2f}" if key in d else "-"


def _recall_lines(r: dict) -> list[str]:
    t2i, i2t = r["text_to_image"], r["image_to_text"]
    return [f"{r['split']} split: {r['sentences']} sentences, {r['images']} images",
            "| direction | R@1 | R@5 | R@10 |", "|---|---:|---:|---:|",
            f"| text -> image | {_pct(t2i, 'R@1')} | {_pct(t2i, 'R@5')} | {_pct(t2i, 'R@10')} |",
            f"| image -> text | {_pct(i2t, 'R@1')} | {_pct(i2t, 'R@5')} | {_pct(i2t, 'R@10')} |",
            f"mean recall {100 * r['mean_recall']:.2f}; text -> image R@1 ceiling of this split "
            f"{100 * r['t2i_R1_ceiling']:.2f} (identical sentences)"]


def templates_option(f):
    return click.option("--templates", "templates_file", type=click.Path(path_type=Path), default=None,
                        help="prompt templates, one per line with {} for the class name [default: the "
                             "built-in remote-sensing ensemble]")(f)


def _templates(path: Path | None):
    from landlens.retrieval.textspace import DEFAULT_TEMPLATES, read_templates

    return read_templates(path) if path is not None else DEFAULT_TEMPLATES


@click.command("align", cls=OneLineErrorCommand)
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--captions", "-c", type=click.Path(path_type=Path), default=None,
              help="captions file (UCM-captions JSON layout, or CSV image,split,sentence) describing DATA's images "
                   "(not with --clip)")
@click.option("--backbone", "-b", "backbones", multiple=True, default=("fusion",), show_default=True,
              help="image tower: a backbone (the default: the fused offline backbones that `index build` uses by "
                   "default); repeat to fuse several (L2-normalised, concatenated)")
@click.option("--weights", multiple=True, default=("auto",), show_default=True,
              help="one for all backbones or one per --backbone")
@click.option("--text", "text", default="minilm", show_default=True,
              help="text tower: minilm (packaged, offline), a model name with --text-weights, openclip:ARCH")
@click.option("--text-weights", default="package", show_default=True,
              help="package | PATH (a Hugging Face model folder or CLIP checkpoint) | hub:NAME")
@click.option("--head", type=click.Choice(["linear", "mlp"]), default=None, help="projection heads [default: the benchmarked one]")
@click.option("--clip", "clip", is_flag=True,
              help="no training: the image and text towers of one CLIP-family model (--backbone openclip:ARCH "
                   "--weights CHECKPOINT; text tower the same unless --text/--text-weights say otherwise)")
@click.option("--dim", type=int, default=None, help="shared space dimensions [default: the benchmarked one]")
@click.option("--epochs", type=int, default=None, help="training epochs [default: the benchmarked number]")
@click.option("--class-weight", type=float, default=None,
              help="weight of the class-name prompts term (labels of DATA's train-split images); 0 turns it off")
@templates_option
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dataset", "-d", default=None, help="catalog name of DATA, for its layout")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=Path("runs/features"), show_default=True,
              help="feature cache (image features and text vectors are reused from it)")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="alignment file to write (.safetensors)")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def align_cmd(data: Path, captions: Path | None, backbones: tuple[str, ...], weights: tuple[str, ...], text: str,
              text_weights: str, head: str | None, clip: bool, dim: int | None, epochs: int | None,
              class_weight: float | None, templates_file: Path | None, seed: int, dataset: str | None,
              cache_dir: Path, out: Path, as_json: bool) -> None:
    """Train an image-text alignment for search by words, offline: frozen image features of
    DATA and a frozen text tower, small projection heads trained contrastively on the captions
    of the train split (and on class-name prompts of DATA's labels). Reports R@k on the val split.
    Attach the file to an archive of the same backbone with `landlens index text`.

    --clip writes the identity alignment of a CLIP-family checkpoint instead (RemoteCLIP,
    GeoRSCLIP, SkyCLIP, OpenAI CLIP through open_clip): nothing is trained, DATA is not read."""
    from landlens.errors import LandlensError
    from landlens.retrieval.textstudy import align_text, clip_alignment

    if clip:
        if len(backbones) != 1 or len(weights) != 1 or captions is not None:
            raise LandlensError("--clip takes one --backbone openclip:ARCH with one --weights, and no --captions")
        same = text == "minilm" and text_weights == "package"  # the defaults: use the CLIP model's own tower
        model = clip_alignment(backbones[0], weights[0], None if same else text, None if same else text_weights, out)
        click.echo(f"{out}: identity alignment of {backbones[0]} ({model.dim}-d; nothing trained)")
        return
    if captions is None:
        raise LandlensError("give --captions FILE (or --clip for a CLIP-family model)")

    settings = {k: v for k, v in {"head": head, "dim": dim, "epochs": epochs, "class_weight": class_weight,
                                  "seed": seed}.items() if v is not None}
    if templates_file is not None:
        settings["templates"] = _templates(templates_file)
    _, report = align_text(data, captions, out, backbones=backbones, weights=weights, text=text, text_weights=text_weights,
                      dataset=dataset, cache_dir=cache_dir, progress=not as_json, **settings)
    report["command"] = command_line()
    if as_json:
        echo_json(report)
        return
    t = report["trained"]
    click.echo(f"{out}: {t['head']} heads, {t['dim']}-d, {t['epochs']} epochs on {t['sentences']} sentences of "
               f"{t['images']} images ({report['seconds']:.1f} s)")
    if "val" in report:
        click.echo("\n".join(_recall_lines(report["val"])))


@click.command("evaluate-text", cls=OneLineErrorCommand)
@click.argument("alignment", type=click.Path(path_type=Path))
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--captions", "-c", type=click.Path(path_type=Path), default=None,
              help="captions file of DATA: text->image and image->text R@1/5/10 on --split")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@click.option("--zero-shot", "zero", is_flag=True, help="zero-shot accuracy on DATA's class sub-folders")
@click.option("--class-names", default=None,
              help="with --zero-shot: comma-separated names to prompt with, one per class folder in sorted order "
                   "[default: the folder names made readable]")
@templates_option
@click.option("--dataset", "-d", default=None, help="catalog name of DATA, for its layout")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=Path("runs/features"), show_default=True)
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None, help="results JSON file")
def evaluate_text_cmd(alignment: Path, data: Path, captions: Path | None, split: str, zero: bool,
                      class_names: str | None, templates_file: Path | None, dataset: str | None, cache_dir: Path,
                      out: Path | None) -> None:
    """Evaluate the ALIGNMENT file on DATA: retrieval by words on a captions split (--captions),
    and/or zero-shot labels of DATA's class folders (--zero-shot). Image features come from the
    alignment's recorded backbones through the feature cache."""
    from landlens.atomic import atomic_write_json
    from landlens.errors import LandlensError
    from landlens.retrieval.textspace import open_text_space
    from landlens.retrieval.textstudy import alignment_features, evaluate_text, evaluate_zero_shot

    if captions is None and not zero:
        raise LandlensError("give --captions FILE, --zero-shot, or both")
    space = open_text_space(alignment)
    fs = alignment_features(space, data, dataset=dataset, cache_dir=cache_dir, progress=True)
    doc: dict = {"command": command_line(), "alignment": str(alignment), "data": str(data)}
    if captions is not None:
        doc["retrieval"] = evaluate_text(space, fs, captions, split, cache_dir=cache_dir)
        click.echo("\n".join(_recall_lines(doc["retrieval"])))
    if zero:
        names = [c.strip() for c in class_names.split(",")] if class_names else None
        doc["zero_shot"] = z = evaluate_zero_shot(space, fs, names, _templates(templates_file))
        click.echo(f"zero-shot accuracy {100 * z['accuracy']:.2f} % on {z['images']} images of {len(z['per_class'])} "
                   f"classes ({len(z['templates'])} prompt templates)")
        for c, acc in z["per_class"].items():
            click.echo(f"  {c}: {100 * acc:.1f} %")
    if out is not None:
        atomic_write_json(out, doc)
        click.echo(f"results: {out}")


__all__ = ["align_cmd", "evaluate_text_cmd"]
