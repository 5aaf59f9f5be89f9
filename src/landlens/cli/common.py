"""Options and helpers shared by the command groups."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

import click

from landlens.errors import LandlensError
from landlens.atomic import atomic_write_json


class _OneLineErrors:
    """Prints a :class:`LandlensError` as ``landlens: error: ...`` (one line, no traceback), exit 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)  # type: ignore[misc]
        except LandlensError as exc:
            click.echo(f"landlens: error: {exc}", err=True)
            ctx.exit(2)


class OneLineErrorGroup(_OneLineErrors, click.Group):
    """A click group whose user errors are one line."""


class OneLineErrorCommand(_OneLineErrors, click.Command):
    """A click command whose user errors are one line, also when run on its own."""


def quiet_lightning() -> None:
    """No Lightning tips and banners ("GPU available", "Seed set") in a command's output: its
    loggers show warnings only. The command's business, not the library's (which leaves
    logging to its caller)."""
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)


def backbone_options(f=None, *, default: str = "tf_efficientnet_lite0", note: str = ""):
    """--backbone / --weights / --input-size / --resize-mode (``@backbone_options``, or
    ``@backbone_options(default="fusion", note=...)`` for a command whose default is another)."""
    def add(f):
        f = click.option("--resize-mode", type=click.Choice(["crop", "squash"]), default=None,
                         help="override the weights' resize rule: 'crop' (shorter side + centre crop) "
                              "or 'squash' (whole image to the input size)")(f)
        f = click.option("--input-size", type=int, default=None, help="override the network input size")(f)
        f = click.option("--weights", default="auto", show_default=True,
                         help="auto | hub[:TAG] | package[:KEY] | none | PATH to a checkpoint")(f)
        f = click.option("--backbone", "-b", default=default, show_default=True,
                         help="backbone name (`landlens models list`), any timm model name, or "
                              "fusion[:A+B+...] (several as one), any of these behind c4: (averaged over four "
                              "rotations, 4x the time)" + (f"; {note}" if note else ""))(f)
        return f

    return add if f is None else add(f)


def plain_rerank(plain: bool, rerank: str | None, doing: str) -> str | None:
    """``--plain`` means ``--rerank none``; given with any other ``--rerank`` it is one error line
    (``doing``: what the command does without re-ranking, e.g. ``"searches"``)."""
    if not plain:
        return rerank
    if rerank is not None and rerank.strip().lower() != "none":
        raise LandlensError(f"--plain {doing} without re-ranking; drop --rerank {rerank}")
    return "none"


def engine_options(f):
    """--engine / --address / --actors: where features are extracted (local processes or Ray)."""
    opts = [
        click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                     help="local: decoding processes and one model in this process; ray: Ray Data, decoding in "
                          "Ray tasks and the model in a pool of actors (pip install 'landlens[ray]'), into the "
                          "same resumable store"),
        click.option("--address", default=None,
                     help="--engine ray: the cluster (auto: the one this machine joined; ray://HOST:10001) "
                          "[default: start Ray on this machine]; every node must see DATA at the same path"),
        click.option("--actors", type=click.IntRange(min=1), default=None,
                     help="--engine ray: model replicas [default: one per two CPUs of the cluster]"),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def parse_lon_lat(value: str) -> tuple[float, float]:
    """``"LON,LAT"`` as floats in range, or click's one-line error naming the value."""
    try:
        lon, lat = (float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: LON,LAT in degrees, e.g. 121.0247,14.5832") from None
    if not (-180 <= lon <= 180 and -90 <= lat <= 90):
        raise click.BadParameter(f"{value!r}: longitude first (-180..180), then latitude (-90..90)")
    return lon, lat


def max_pixels_option(f):
    """--max-pixels: the decode size limit of :mod:`landlens.data.io` (header checked first)."""
    from landlens.data.io import DEFAULT_MAX_PIXELS

    return click.option("--max-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS, show_default=True,
                        help="refuse images larger than this many pixels (width x height; images of more than "
                             "4 bands count width x height x bands / 4), checked on the header before decoding")(f)


def printable(text: str) -> str:
    """``text`` with control characters (a newline in a file name) escaped as ``\\n``, ``\\x1b``..., so
    one record stays on one line of tab-separated output."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def shortcut_overrides(keys: dict[str, str], sets: Sequence[str], **shortcuts: Any) -> list[str]:
    """Shortcut options (``--lr 0.01``) as ``section.key=value`` overrides (``keys``: option -> config key),
    followed by the ``--set`` ones, which therefore win."""
    out = [f"{keys[k]}={v if isinstance(v, str) else json.dumps(v)}" for k, v in shortcuts.items() if v is not None]
    return out + list(sets)


def make_backbone(backbone: str, weights: str, input_size: int | None, resize_mode: str | None):
    from landlens.models.registry import create_backbone

    bb = create_backbone(backbone, weights)
    changes: dict[str, Any] = {}
    if input_size:
        changes["input_size"] = input_size
    if resize_mode:
        changes["resize_mode"] = resize_mode
    if changes:
        bb.preprocessing = bb.preprocessing.replace(**changes)
    return bb


def command_line() -> str:
    return "landlens " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_json(Path(path), obj)


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=1, sort_keys=True))
