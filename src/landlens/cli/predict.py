"""``landlens predict`` and ``landlens export``: use a trained classifier (a run directory).

:data:`predict_cmd` prints the top-k classes of image files and folders; :data:`export_cmd`
writes a TorchScript or ONNX file checked against the checkpoint. Both are thin layers over
:mod:`landlens.training.predict` and :mod:`landlens.training.export`, registered at the top level
of ``landlens`` (see :mod:`landlens.cli.main`).

A user error (a run directory without ``model.json``, an input path that does not exist, a bad
``--top-k``) is printed as one line and exits with status 2, also when a command is run on its
own. An image that cannot be decoded is reported on stderr with its path while the others are
still predicted; ``predict`` then exits with status 1.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import click

from landlens.cli.common import OneLineErrorCommand, echo_json, write_json
from landlens.errors import ConfigError

CSV_HEADER = ("path", "rank", "label", "probability")
DEFAULT_TOP_K = 5


def _text_line(pred) -> str:
    return "  ".join([str(pred.path)] + [f"{lab} {p:.3f}" for lab, p in zip(pred.labels, pred.probabilities)])


def _csv_rows(pred) -> list[list[str]]:
    return [[str(pred.path), str(r + 1), lab, f"{p:.6g}"]
            for r, (lab, p) in enumerate(zip(pred.labels, pred.probabilities))]


@click.command("predict", cls=OneLineErrorCommand)
@click.argument("run_dir", metavar="RUN", type=click.Path(path_type=Path))
@click.argument("inputs", metavar="IMAGE_OR_FOLDER...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top-k", "-k", "top_k", type=int, default=None,
              help="classes reported per image  [default: 5, or all classes of a model with fewer]")
@click.option("--json", "as_json", is_flag=True, help="print a JSON list: one object per image")
@click.option("--csv", "as_csv", is_flag=True, help="print CSV rows: path,rank,label,probability")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None,
              help="write the output to this file instead of stdout")
@click.option("--batch-size", default=32, show_default=True, help="images per forward pass")
@click.option("--num-workers", default=0, show_default=True, help="image decoding worker processes")
@click.option("--device", default="cpu", show_default=True, help="torch device (cpu, cuda, cuda:1...)")
@click.option("--zero-shot", "zero_shot", is_flag=True,
              help="RUN is an image-text alignment (`landlens retrieval align`): label with --classes, "
                   "classes nobody trained on")
@click.option("--classes", "classes", default=None, help="--zero-shot: comma-separated class names")
@click.option("--classes-file", type=click.Path(path_type=Path), default=None,
              help="--zero-shot: class names, one per line")
@click.option("--templates", "templates_file", type=click.Path(path_type=Path), default=None,
              help="--zero-shot: prompt templates, one per line with {} [default: the built-in ensemble]")
def predict_cmd(run_dir: Path, inputs: tuple[Path, ...], top_k: int | None, as_json: bool, as_csv: bool,
                out: Path | None, batch_size: int, num_workers: int, device: str, zero_shot: bool,
                classes: str | None, classes_file: Path | None, templates_file: Path | None) -> None:
    """Predict the scene class of each image with the trained classifier in RUN, or, with
    --zero-shot, with any class names through the image-text alignment file RUN.

    IMAGE_OR_FOLDER: image files, or folders scanned recursively for image files (natural
    order). Prints one line per image, `path  label1 0.973  label2 0.011 ...`, the top-k
    classes with their probabilities, or JSON (--json) or CSV (--csv). Images are preprocessed
    with the preprocessing recorded with the model. An unreadable image is reported on stderr
    and the exit status is then 1.
    """
    from landlens.atomic import atomic_write_bytes
    from landlens.training.predict import Predictor, expand_inputs

    if as_json and as_csv:
        raise ConfigError("give --json or --csv, not both")
    if zero_shot:
        predictor = _zero_shot_predictor(run_dir, classes, classes_file, templates_file, batch_size)
    elif classes or classes_file or templates_file:
        raise ConfigError("--classes, --classes-file and --templates go with --zero-shot")
    else:
        predictor = Predictor(run_dir, device=device, batch_size=batch_size, num_workers=num_workers)
    if top_k is None:
        top_k = min(DEFAULT_TOP_K, len(predictor.classes))
    predictor.check_top_k(top_k)
    files = expand_inputs(inputs)
    stream = out is None and not as_json  # lines go out as soon as each batch is predicted
    preds = []
    failed = 0
    text = io.StringIO()
    writer = csv.writer(text if not stream else _EchoFile(), lineterminator="\n")
    if as_csv:
        writer.writerow(CSV_HEADER)
    for pred in predictor.iter_predictions(files, top_k):
        if not pred.ok:
            failed += 1
            click.echo(f"landlens: error: {pred.error}", err=True)
        if as_json:
            preds.append(pred.to_dict())
        elif pred.ok and as_csv:
            writer.writerows(_csv_rows(pred))
        elif pred.ok:
            line = _text_line(pred)
            if stream:
                click.echo(line)
            else:
                text.write(line + "\n")
    if as_json:
        if out is not None:
            write_json(out, preds)
        else:
            echo_json(preds)
    elif out is not None:
        atomic_write_bytes(out, text.getvalue().encode())
    if out is not None:
        click.echo(f"wrote {len(files) - failed} prediction(s) to {out}", err=True)
    if failed:
        click.echo(f"landlens: {failed} of {len(files)} image(s) could not be read", err=True)
        click.get_current_context().exit(1)


def _zero_shot_predictor(alignment: Path, classes: str | None, classes_file: Path | None, templates_file: Path | None,
                         batch_size: int):
    from landlens.retrieval.textspace import read_templates
    from landlens.training.predict import ZeroShotPredictor

    if (classes is None) == (classes_file is None):
        raise ConfigError("--zero-shot needs the class names: --classes a,b,c or --classes-file FILE (one of them)")
    if classes_file is not None:
        try:
            names = [s.strip() for s in classes_file.read_text(encoding="utf-8").splitlines() if s.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read --classes-file {classes_file}: {exc}") from None
    else:
        names = [s.strip() for s in (classes or "").split(",")]
    templates = read_templates(templates_file) if templates_file is not None else None
    return ZeroShotPredictor(alignment, names, templates=templates, batch_size=batch_size)


class _EchoFile:
    """A file-like object that sends what the csv writer writes to stdout through click."""

    def write(self, s: str) -> int:
        click.echo(s, nl=False)
        return len(s)


@click.command("export", cls=OneLineErrorCommand)
@click.argument("run_dir", metavar="RUN", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["onnx", "torchscript"]), required=True,
              help="onnx (input 'image', output 'log_probs', metadata in metadata_props) or "
                   "torchscript (traced, model.json embedded)")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None,
              help="file (or folder) to write; default RUN/model.onnx or RUN/model.torchscript.pt")
@click.option("--opset", default=17, show_default=True, help="ONNX opset version")
@click.option("--static-batch", is_flag=True, help="ONNX: fix the batch dimension to 1 (default: dynamic)")
@click.option("--atol", default=1e-4, show_default=True,
              help="largest accepted difference of log-probabilities against the checkpoint")
@click.option("--json", "as_json", is_flag=True, help="print the export description as JSON")
def export_cmd(run_dir: Path, fmt: str, out: Path | None, opset: int, static_batch: bool, atol: float,
               as_json: bool) -> None:
    """Export the trained classifier in RUN to ONNX or TorchScript and check it against the checkpoint.

    The exported network takes a normalised float batch (B, 3, S, S), preprocessed as recorded
    with the model, and returns log-probabilities (B, C). The file is kept only if its outputs on
    random images match the checkpoint's within --atol; the difference is printed.
    """
    from landlens.training.export import export_model

    result = export_model(run_dir, fmt, out, opset=opset, dynamic_batch=not static_batch, atol=atol)
    if as_json:
        echo_json(result.to_dict())
        return
    click.echo(str(result.path))
    opset_note = f", opset {result.opset}" if result.opset is not None else ""
    click.echo(f"parity: max |log-prob difference| vs checkpoint {result.max_abs_diff:.3g} on "
               f"{result.n_checked} random images (limit {atol:g}); {result.exporter}{opset_note}, "
               f"{result.seconds:.1f} s")


__all__ = ["CSV_HEADER", "export_cmd", "predict_cmd"]
