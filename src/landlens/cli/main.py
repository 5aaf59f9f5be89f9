"""The ``landlens`` command: one group per capability, each a thin layer over the library."""

from __future__ import annotations

import sys

import click

from landlens import __version__
from landlens.cli.common import OneLineErrorGroup


@click.group(cls=OneLineErrorGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="landlens")
def cli() -> None:
    """landlens: remote-sensing scene retrieval and classification.

    Datasets (`data`), backbones and their offline weights (`models`), feature
    extraction (`features`), retrieval evaluation and indexes (`retrieval`), search by
    example (`search`), persistent archives (`index`) and the search service and web page (`serve`), scene classification by transfer learning (`train`, `predict`,
    `export`), learned matching (`matching`), maps of whole GeoTIFF scenes (`scenes`), and the end-to-end
    `quickstart`.
    """


def _register() -> None:
    from landlens.cli.data import data
    from landlens.cli.features import features
    from landlens.cli.index import index_group
    from landlens.cli.matching import matching
    from landlens.cli.models import models
    from landlens.cli.predict import export_cmd, predict_cmd
    from landlens.cli.quickstart import quickstart
    from landlens.cli.retrieval import retrieval
    from landlens.cli.scenes import scenes
    from landlens.cli.search import index_cmd, search_cmd
    from landlens.cli.serve import serve_cmd
    from landlens.cli.split import split
    from landlens.cli.text import align_cmd, evaluate_text_cmd
    from landlens.cli.train import train

    data.add_command(split)
    retrieval.add_command(index_cmd)
    retrieval.add_command(align_cmd)
    retrieval.add_command(evaluate_text_cmd)
    for group in (data, models, features, retrieval, search_cmd, train, predict_cmd, export_cmd, matching,
                  quickstart, index_group, serve_cmd, scenes):
        cli.add_command(group)


_register()


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="landlens")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
