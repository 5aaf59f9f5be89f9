"""``landlens data``: the dataset catalog, folder checks and downloads.

A thin layer over :mod:`landlens.data`: each command parses its options, calls one library
function and prints a short summary. User errors are raised as
:class:`~landlens.errors.LandlensError` (the main CLI prints them as one line).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from landlens.data.catalog import CATALOG, DatasetSpec, get_spec
from landlens.data.download import DEFAULT_TIMEOUT, download_dataset
from landlens.data.io import DEFAULT_MAX_PIXELS
from landlens.data.verify import VerifyReport, verify_dataset

__all__ = ["data"]

_MAX_NOTES = 20


def _table(rows: list[list[str]], header: list[str], right: set[int]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def _size_text(spec: DatasetSpec) -> str:
    return f"{spec.image_size[0]}x{spec.image_size[1]}"


def _write_json(payload: dict[str, Any], target: Path) -> None:
    text = json.dumps(payload, indent=2, ensure_ascii=False) + "\n"
    if str(target) == "-":
        click.echo(text, nl=False)
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise click.ClickException(f"{target}: cannot write ({exc.strerror or exc})") from None


@click.group("data")
def data() -> None:
    """Dataset catalog, folder checks and downloads."""


@data.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the catalog as JSON.")
def list_command(as_json: bool) -> None:
    """List the datasets landlens knows by name."""
    if as_json:
        click.echo(json.dumps([s.to_dict() for s in CATALOG.values()], indent=2))
        return
    rows = [
        [s.name, str(s.num_classes), f"{s.total_images:,}", _size_text(s), s.gsd_text(), s.title]
        for s in CATALOG.values()
    ]
    header = ["name", "classes", "images", "size", "GSD", "title"]
    click.echo(_table(rows, header, right={1, 2}))


@data.command("info")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the entry as JSON.")
def info_command(name: str, as_json: bool) -> None:
    """Show everything the catalog knows about dataset NAME."""
    spec = get_spec(name)
    if as_json:
        click.echo(json.dumps(spec.to_dict(), indent=2))
        return
    counts = sorted(set(spec.images_per_class.values()))
    per_class = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    layout = "/".join(p for p in (spec.root_dir or "<dest>", spec.subdir, "<class>") if p)
    lines = [
        f"{spec.title} ({spec.name})",
        f"  aliases:     {', '.join(spec.aliases) or '-'}",
        f"  images:      {spec.total_images:,} in {spec.num_classes} classes "
        f"({per_class} per class)",
        f"  image size:  {_size_text(spec)} px",
        f"  GSD:         {spec.gsd_text()}",
        f"  bands:       {', '.join(spec.bands)} ({spec.dtype}); RGB = bands "
        f"{', '.join(map(str, spec.rgb_bands))}",
        f"  layout:      {layout}/{spec.filename(spec.classes[0], spec.first_index)}",
        f"  homepage:    {spec.homepage}",
        f"  download:    {spec.url or 'none (download by hand from the homepage)'}",
    ]
    lines += [f"  mirror:      {m}" for m in spec.mirrors]
    lines += [
        f"  archive:     {spec.archive or '-'}",
        f"  checksum:    {spec.checksum or '-'}",
        f"  citation:    {spec.citation}",
    ]
    if spec.notes:
        lines.append(f"  notes:       {spec.notes}")
    lines.append("  classes:")
    lines += [f"    {c:<28} {spec.images_per_class[c]:>6,}" for c in spec.classes]
    click.echo("\n".join(lines))


def _print_report(report: VerifyReport) -> None:
    what = f"compared with {report.dataset}" if report.dataset else "no catalog entry"
    click.echo(
        f"{report.root}: {report.n_images:,} images in {len(report.classes)} classes "
        f"({what}), checked in {report.elapsed_s:.1f} s"
    )
    expected = report.expected or {}
    names = list(report.classes) + [c for c in expected if c not in report.counts]
    rows = []
    for c in names:
        found = report.counts.get(c, 0)
        exp = expected.get(c)
        if report.expected is None:
            status = ""
        elif c in report.missing_classes:
            status = "MISSING"
        elif c in report.unexpected_classes:
            status = "UNEXPECTED"
        elif c in report.count_mismatches:
            status = "MISMATCH"
        else:
            status = "ok"
        rows.append([c, f"{found:,}", "-" if exp is None else f"{exp:,}", status])
    click.echo(_table(rows, ["class", "found", "expected", "status"], right={1, 2}))
    if report.bad_files:
        click.echo(f"unreadable files ({len(report.bad_files)}):")
        for bad in report.bad_files:
            click.echo(f"  {bad.path}: {bad.reason}")
    if report.non_image_files:
        click.echo(f"note: {len(report.non_image_files)} file(s) skipped (not an image extension):")
        for p in report.non_image_files[:_MAX_NOTES]:
            click.echo(f"  {p}")
        if len(report.non_image_files) > _MAX_NOTES:
            click.echo(f"  ... and {len(report.non_image_files) - _MAX_NOTES} more")
    if report.empty_classes:
        click.echo(f"note: class folders without images: {', '.join(report.empty_classes)}")
    if report.off_size and report.expected_size is not None:
        w, h = report.expected_size
        click.echo(f"note: {len(report.off_size)} image(s) are not {w}x{h}:")
        for p, iw, ih in report.off_size[:_MAX_NOTES]:
            click.echo(f"  {p}: {iw}x{ih}")
        if len(report.off_size) > _MAX_NOTES:
            click.echo(f"  ... and {len(report.off_size) - _MAX_NOTES} more")
    side = report.short_side_summary()
    if side:
        click.echo(f"shorter side of the readable images: {side['min']}-{side['max']} px (median {side['median']}); "
                   f"a network upsamples images below its input size (EfficientNet-Lite0: 224 px)")
    problems = report.problems()
    click.echo("OK" if report.ok else f"FAILED: {len(problems)} problem(s)")


@data.command("verify")
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--dataset", "-d", default=None, help="Catalog name to compare with (default: detect)."
)
@click.option(
    "--max-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS, show_default=True,
    help="Largest width x height accepted per image.",
)  # fmt: skip
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="Write the full report as JSON to FILE ('-' for stdout).",
)  # fmt: skip
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Decoding processes (default: CPUs).",
)
@click.pass_context
def verify_command(
    ctx: click.Context,
    path: Path,
    dataset: str | None,
    max_pixels: int,
    json_path: Path | None,
    workers: int | None,
) -> None:
    """Decode every image under PATH and compare class counts with the catalog.

    Exits with status 1 if any file is unreadable or classes/counts differ.
    """
    report = verify_dataset(
        path, dataset, max_pixels=max_pixels, workers=workers, progress=sys.stderr.isatty()
    )
    if json_path is not None and str(json_path) == "-":
        _write_json(report.to_dict(), json_path)
    else:
        _print_report(report)
        if json_path is not None:
            payload = report.to_dict()
            payload["command"] = " ".join(["landlens", *sys.argv[1:]])
            _write_json(payload, json_path)
    if not report.ok:
        ctx.exit(1)


@data.command("download")
@click.argument("name")
@click.option(
    "--dest", type=click.Path(file_okay=False, path_type=Path), default=Path("data"),
    show_default=True, help="Folder for the archive and the extracted dataset.",
)  # fmt: skip
@click.option(
    "--timeout",
    type=float,
    default=DEFAULT_TIMEOUT,
    show_default=True,
    help="Network timeout in seconds.",
)
def download_command(name: str, dest: Path, timeout: float) -> None:
    """Download, check and extract dataset NAME (needs network access)."""
    spec = get_spec(name)
    root = download_dataset(spec, dest, timeout=timeout, progress=sys.stderr.isatty())
    click.echo(f"{spec.title}: {root}")
